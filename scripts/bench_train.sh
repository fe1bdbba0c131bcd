#!/usr/bin/env bash
# Training throughput of `clipft bench --train` against PyTorch doing the same steps
# (scripts/bench_train_peer.py: CLIPLoss + AdamW + logit_scale clamp, random 77-token texts and
# random pixels, f32), in one run on one machine: the two alternate, never run concurrently.
#
#   scripts/bench_train.sh [ROUNDS]      # default 3 rounds per model
#
# Models: the tiny fixture CLIP at batch 32 and a random-weight ViT-B/32 at batch 8 (made by
# scripts/make_fixtures.py --full-size if missing). Writes target/bench/train.jsonl and prints a
# Markdown table (ranges over the rounds, ratio of the medians) for BENCHMARKS.md.
# Env: CLIPFT_BENCH_PYTHON (a Python with torch and transformers; default: a venv made in
# target/bench-venv from scripts/requirements-bench.txt), CLIPFT_BENCH_MODEL (the ViT-B/32 folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
VIT="${CLIPFT_BENCH_MODEL:-target/vit-b-32}"
TINY=tests/fixtures/clip-tiny
OUT=target/bench
mkdir -p "$OUT"
PY="${CLIPFT_BENCH_PYTHON:-}"
if [ -z "$PY" ]; then
  VENV=target/bench-venv
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r scripts/requirements-bench.txt
  fi
  PY="$VENV/bin/python"
fi
[ -f "$VIT/model.safetensors" ] || "$PY" scripts/make_fixtures.py --full-size "$VIT"
cargo build --release --quiet
BIN=target/release/clipft
RES="$OUT/train.jsonl"
: > "$RES"

# model label, folder, batch, clipft seconds, PyTorch steps
run() {
  "$BIN" bench --train --model "$2" --batch-size "$3" --seconds "$4" 2>/dev/null | tail -n1 \
    | sed "s/^{/{\"peer\":\"clipft\",\"model\":\"$1\",/" >> "$RES"
  "$PY" scripts/bench_train_peer.py --model "$2" --batch "$3" --steps "$5" 2>/dev/null | tail -n1 \
    | sed "s/^{/{\"model\":\"$1\",/" >> "$RES"
}
for _ in $(seq "$ROUNDS"); do
  run tiny "$TINY" 32 8 100
  run vit-b-32 "$VIT" 8 12 5
done

"$PY" - "$RES" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rate = lambda r: r.get("items_per_second") or r.get("pairs_per_second")
print("| model | batch | clipft pairs/s | PyTorch pairs/s | clipft / PyTorch (medians) |")
print("|---|---|---|---|---|")
for model in ["tiny", "vit-b-32"]:
    mine = [rate(r) for r in rows if r["model"] == model and r["peer"] == "clipft"]
    peer = [rate(r) for r in rows if r["model"] == model and r["peer"] == "torch"]
    if not mine or not peer:
        continue
    batch = next(r["batch_size"] for r in rows if r["model"] == model)
    span = lambda v: f"{min(v):.2f}-{max(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    ratio = statistics.median(mine) / statistics.median(peer)
    print(f"| {model} | {batch} | {span(mine)} | {span(peer)} | {ratio:.2f}x |")
PY
