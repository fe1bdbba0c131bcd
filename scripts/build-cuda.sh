#!/usr/bin/env bash
# Builds the CUDA-enabled clipft binary on a machine without a GPU or a CUDA installation, from
# PyPI's CUDA 13.0 wheels (13.0.x: the GPU machines' driver 580 runs PTX up to CUDA 13.0 only).
#
#   scripts/build-cuda.sh [COMPUTE_CAP]      # default 90 (H100/H200); 80 for A100, 89 for L4/L40
#
# Output: target/cuda/release/clipft (and target/cuda/release/examples/device_check). At run time it needs the driver's libcuda.so.1 and the
# cuBLAS/cuRAND/cudart 13 libraries (LD_LIBRARY_PATH=<toolkit>/lib works, or the GPU image's own).
# Linking needs libcuda.so, which only a driver provides: a stub with the same symbols stands in
# for it at link time, and the real driver library satisfies them at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
CAP="${1:-${CUDA_COMPUTE_CAP:-90}}"
TOOLKIT="${CLIPFT_CUDA_TOOLKIT:-$PWD/target/cuda-toolkit}"
PY="${PYTHON:-python3}"

if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ]; then
  echo "installing the CUDA 13.0 toolchain wheels into $TOOLKIT" >&2
  "$PY" -m pip install --quiet --no-deps --target "$TOOLKIT" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
CUDA_HOME="$TOOLKIT/nvidia/cu13"
chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/* 2>/dev/null || true
mkdir -p "$CUDA_HOME/lib/stubs"
# Unversioned names for the linker (the wheels ship only versioned sonames).
for lib in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$CUDA_HOME"/lib/lib${lib}.so.* 2>/dev/null | sort | head -n1 || true)
  [ -n "$real" ] && ln -sf "$(basename "$real")" "$CUDA_HOME/lib/lib${lib}.so"
done

export PATH="$CUDA_HOME/bin:$PATH" CUDA_HOME CUDA_PATH="$CUDA_HOME" CUDA_COMPUTE_CAP="$CAP"
export CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR="$PWD/target/cuda"
export LIBRARY_PATH="$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

# 1. Compile everything but the final link (the library and its dependencies).
cargo build --release --features cuda --lib

# 2. A libcuda.so stub exporting every driver symbol the compiled code refers to.
stub="$CUDA_HOME/lib/stubs"
{
  echo "/* link-time stand-in for the NVIDIA driver's libcuda.so.1; never loaded at run time */"
  for f in "$CARGO_TARGET_DIR"/release/deps/*.rlib $(find "$CARGO_TARGET_DIR/release/build" -name '*.a'); do
    nm -u "$f" 2>/dev/null | awk '{print $NF}'
  done | grep -E '^cu[A-Z][A-Za-z0-9_]*$' | sort -u | sed 's/.*/void &(void) {}/'
} > "$stub/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda_stub.c"
echo "libcuda stub: $(grep -c '^void' "$stub/libcuda_stub.c") symbols" >&2

# 3. The binary, and the op-by-op device check that scripts/gpu-check.sh runs first.
cargo build --release --features cuda --bin clipft --example device_check
echo "built $CARGO_TARGET_DIR/release/clipft and .../examples/device_check" >&2
