#!/usr/bin/env bash
# The image's build steps, kept outside the Dockerfile so CI runs them too and they cannot rot.
#
#   scripts/build-release.sh deps            # compile the dependencies only (a cached layer)
#   scripts/build-release.sh cpu OUT         # the CPU binary, copied to OUT
#   scripts/build-release.sh cuda OUT [CAP]  # the CUDA binary (scripts/build-cuda.sh), to OUT
#
# `deps` builds against a placeholder crate so that source edits do not invalidate the layer.
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: build-release.sh deps|cpu|cuda [OUT] [CAP]}"
case "$step" in
  deps)
    if [ -e src/lib.rs ]; then
      echo "deps: run in a tree without src/ (the image's dependency layer)" >&2
      exit 2
    fi
    mkdir -p src
    echo 'fn main() {}' > src/main.rs
    touch src/lib.rs
    cargo build --release --locked
    rm -rf src
    touch target/.placeholder-crate
    ;;
  cpu)
    out="${2:?usage: build-release.sh cpu OUT}"
    # After `deps`, the real sources may carry older times than the placeholder's build.
    if [ -e target/.placeholder-crate ]; then
      touch src/main.rs src/lib.rs
      rm target/.placeholder-crate
    fi
    cargo build --release --locked --bin clipft
    install -m 0755 target/release/clipft "$out"
    ;;
  cuda)
    out="${2:?usage: build-release.sh cuda OUT [CAP]}"
    if [ -e target/.placeholder-crate ]; then
      touch src/main.rs src/lib.rs
      rm target/.placeholder-crate
    fi
    scripts/build-cuda.sh "${3:-${CUDA_COMPUTE_CAP:-90}}"
    install -m 0755 target/cuda/release/clipft "$out"
    ;;
  *)
    echo "unknown step $step (deps, cpu, cuda)" >&2
    exit 2
    ;;
esac
