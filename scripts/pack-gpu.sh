#!/usr/bin/env bash
# Packs what a lent GPU machine needs for scripts/gpu-check.sh into .gpu/ (ignored by git; name
# it in the device tool's `carry`): the CUDA binary, examples/device_check and the library's
# test binary, built by scripts/build-cuda.sh, xz-compressed (78 + 62 + 59 MB raw, about 30 MB
# packed), and the Jina stack's wheels for part 3 (.gpu/wheels, about 21 MB; the device tool
# carries 64 MiB at most).
#
#   scripts/build-cuda.sh && scripts/pack-gpu.sh
#
# On the GPU machine, from the repository root, in two calls (each under the 10-minute limit):
#   scripts/gpu-check.sh .gpu "$OUT" 1
#   scripts/gpu-check.sh .gpu "$OUT" 2
#   scripts/gpu-check.sh .gpu "$OUT" 3     (the executor end to end; a third call, or a later session)
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

# Part 3 of gpu-check.sh (the executor end to end against the Python peer, driven by clip_client)
# needs jina, clip_client and docarray v1, which the GPU image lacks and cannot fetch: the pinned
# set of tests/interop/requirements.txt as Python 3.12 wheels, less what the image already has
# (the names below, from .library/device/KINDS.md's list; grpcio and protobuf are carried anyway,
# pinned, since grpcio-health-checking and -reflection must match them), and a setuptools that
# still has pkg_resources. About 22 MB.
ON_DEVICE='aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
  charset-normalizer click contourpy cycler filelock fonttools frozenlist h11 idna kiwisolver
  markdown-it-py matplotlib mdurl multidict numpy packaging pathspec pillow prometheus-client
  propcache pygments pyparsing python-dateutil pyyaml requests rich six typing-extensions uvloop
  wrapt yarl zipp'
W=target/gpu-wheels
WANT="$(mktemp)"
"${PYTHON:-python3}" - "$ON_DEVICE" >"$WANT" <<'PY'
import re, sys
skip = {n.lower() for n in sys.argv[1].split()}
for line in open("tests/interop/requirements.txt"):
    line = line.strip()
    name = re.split(r"[=<>]", line)[0].strip().lower().replace("_", "-")
    if line and not line.startswith("#") and name not in skip:
        print(line)
# jina's hubble SDK imports pkg_resources, gone from setuptools 81 (the image's may be newer).
print("setuptools==80.10.2")
PY
# Made again whenever the pinned set changed since the cached wheels were fetched.
if [ ! -f "$W/complete" ] || ! cmp -s "$WANT" "$W/requirements.txt"; then
  rm -rf "$W" && mkdir -p "$W" && mv "$WANT" "$W/requirements.txt"
  PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
  ok=1
  while read -r req; do
    # Most are on PyPI as wheels; jina, clip-client, docarray 0.21 and jcloud only as sources.
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: $PLAT -d "$W" "$req" 2>/dev/null ||
      "${PYTHON:-python3}" -m pip wheel -q --no-deps -w "$W" "$req" || { ok=0; echo "no wheel for $req" >&2; }
  done <"$W/requirements.txt"
  # jina's wheel, built here, is tagged with this Python though its one library (jraft) is abi3.
  for f in "$W"/jina-*-cp3*-cp3*-*.whl; do
    [ -e "$f" ] || continue
    case "$f" in *cp312-cp312*) ;; *)
      "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check wheel >/dev/null 2>&1
      "${PYTHON:-python3}" -m wheel tags --remove --python-tag cp312 --abi-tag abi3 "$f" >/dev/null ;;
    esac
  done
  [ "$ok" = 1 ] && touch "$W/complete"
fi
rm -f "$WANT"
if [ -f "$W/complete" ]; then
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels && cp "$W"/*.whl .gpu/wheels/
else
  echo "pack-gpu: the wheels for gpu-check.sh part 3 are incomplete; part 3 will say so" >&2
fi
ls -la .gpu >&2
du -sh .gpu >&2
