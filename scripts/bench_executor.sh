#!/usr/bin/env bash
# End-to-end serving benchmark: `clipft executor` against the Python peer (a Jina Flow serving
# transformers CLIP like clip_server's torch executor, scripts/peer_executor.py), both driven by
# the real clip_client at its defaults, one server at a time. See scripts/bench_executor.py.
#
#   scripts/bench_executor.sh [SECONDS] [more bench_executor.py options]   # default 20 s per load
#
# Writes target/bench-executor.json (every number) and target/bench-executor.txt (the console
# output); CLIPFT_BENCH_OUT replaces the target/bench-executor part. Needs Python 3.11 with pip: the
# peer's venv is built from scripts/requirements-peer.txt in target/peer-venv (CLIPFT_PEER_VENV
# points elsewhere; torch from PyPI is the large CUDA build, see that file). CLIPFT_BENCH_MODEL
# picks the model folder (default target/vit-b-32, written by scripts/make_fixtures.py
# --full-size if missing); CLIPFT_BENCH_NO_BUILD=1 skips `cargo build --release`. On a shared
# machine add --wait-quiet 300.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER="${1:-20}"
shift || true
MODEL="${CLIPFT_BENCH_MODEL:-target/vit-b-32}"
VENV="${CLIPFT_PEER_VENV:-target/peer-venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r scripts/requirements-peer.txt
fi
if [ ! -f "$MODEL/model.safetensors" ]; then
  # The fixture generator needs open-clip-torch (for CLIP's BPE vocabulary): scripts/bench.sh's venv.
  BENCH_VENV="${CLIPFT_BENCH_VENV:-target/bench-venv}"
  if [ ! -x "$BENCH_VENV/bin/python" ]; then
    "$PY" -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install --quiet -r scripts/requirements-bench.txt
  fi
  "$BENCH_VENV/bin/python" scripts/make_fixtures.py --full-size "$MODEL"
fi
[ "${CLIPFT_BENCH_NO_BUILD:-0}" = 1 ] || cargo build --release --quiet

OUT="${CLIPFT_BENCH_OUT:-target/bench-executor}"
mkdir -p "$(dirname "$OUT")"
"$VENV/bin/python" scripts/bench_executor.py --model "$MODEL" --seconds "$SECONDS_PER" \
  --out "$OUT.json" "$@" 2>&1 | tee "$OUT.txt"
