#!/usr/bin/env bash
# Packs what a lent GPU machine needs for scripts/gpu-check.sh into .gpu/ (ignored by git; name
# it in the device tool's `carry`): the CUDA binary, examples/device_check and the library's
# test binary, built by scripts/build-cuda.sh, xz-compressed (78 + 62 + 59 MB raw, about 30 MB
# packed: the device tool carries 64 MiB at most).
#
#   scripts/build-cuda.sh && scripts/pack-gpu.sh
#
# On the GPU machine, from the repository root, in two calls (each under the 10-minute limit):
#   scripts/gpu-check.sh .gpu "$OUT" 1
#   scripts/gpu-check.sh .gpu "$OUT" 2
# (gpu-check.sh unpacks .gpu/*.xz itself and runs the kernel tests and device_check first).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/cuda/release
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
mkdir -p .gpu
# The library's unit tests built with CUDA (the kernels against their CPU twins on a GPU).
T="${CLIPFT_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}/nvidia/cu13"
lib_tests=$(PATH="$T/bin:$PATH" CUDA_HOME="$T" CUDA_PATH="$T" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" \
  CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR="$PWD/target/cuda" LIBRARY_PATH="$T/lib:$T/lib/stubs" \
  cargo test --release --features cuda --lib --no-run --message-format=json 2>/dev/null |
  "${PYTHON:-python3}" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "clipft" and m["profile"]["test"]:
        print(m["executable"])')
for f in "$OUT/clipft" "$OUT/examples/device_check" "$lib_tests"; do
  name=$(basename "$f"); [ "$f" = "$lib_tests" ] && name=lib_tests
  xz -T2 -6 -c "$f" >".gpu/$name.xz"
done
ls -la .gpu >&2
