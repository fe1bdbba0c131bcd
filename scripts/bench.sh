#!/usr/bin/env bash
# Side-by-side CPU benchmark of `clipft bench` against PyTorch and ONNX Runtime on the same
# random-weight ViT-B/32, model only, same machine, one after the other (never concurrently).
#
#   scripts/bench.sh [SECONDS]        # default 20 s per configuration
#
# Writes target/bench/results.jsonl and prints a Markdown table with ratios (paste into
# BENCHMARKS.md). Needs Python 3 with pip (a venv is created in target/bench-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER="${1:-20}"
MODEL="${CLIPFT_BENCH_MODEL:-target/vit-b-32}"
OUT=target/bench
VENV="${CLIPFT_BENCH_VENV:-target/bench-venv}"
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet -r scripts/requirements-bench.txt
fi
[ -f "$MODEL/model.safetensors" ] || "$VENV/bin/python" scripts/make_fixtures.py --full-size "$MODEL"
cargo build --release --quiet
BIN=target/release/clipft
RES="$OUT/results.jsonl"
: > "$RES"
for b in 1 8 32; do
  "$BIN" bench --model "$MODEL" --select-model clip-vision --batch-size "$b" --seconds "$SECONDS_PER" 2>/dev/null \
    | tail -n1 | sed 's/^{/{"peer":"clipft",/' >> "$RES"
  for t in 16 77; do
    "$BIN" bench --model "$MODEL" --select-model clip-text --batch-size "$b" --text-tokens "$t" --seconds "$SECONDS_PER" 2>/dev/null \
      | tail -n1 | sed 's/^{/{"peer":"clipft",/' >> "$RES"
  done
done
# The same at batch 32 with plain f32 products (no AMX), for comparison.
"$BIN" bench --model "$MODEL" --select-model clip-vision --batch-size 32 --seconds "$SECONDS_PER" --matmul-precision highest 2>/dev/null \
  | tail -n1 | sed 's/^{/{"peer":"clipft-f32",/' >> "$RES"
"$BIN" bench --model "$MODEL" --select-model clip-text --batch-size 32 --text-tokens 77 --seconds "$SECONDS_PER" --matmul-precision highest 2>/dev/null \
  | tail -n1 | sed 's/^{/{"peer":"clipft-f32",/' >> "$RES"
"$VENV/bin/python" scripts/bench_peers.py --model "$MODEL" --tower both --batch-sizes 1,8,32 \
  --text-tokens 16,77 --seconds "$SECONDS_PER" >> "$RES"

# Peak RSS of `clipft encode` with one tower and with both.
IMG=tests/fixtures/reference/images/rgb_640x480.png
rss() { /usr/bin/time -f '%M' "$BIN" encode --model "$MODEL" "$@" 2>&1 >/dev/null | tail -n1; }
echo "{\"peer\":\"clipft-encode-rss\",\"text_kib\":$(rss --text 'a photo'),\"vision_kib\":$(rss --image $IMG),\"both_kib\":$(rss --text 'a photo' --image $IMG)}" >> "$RES"

"$VENV/bin/python" - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rss = [r for r in rows if r["peer"] == "clipft-encode-rss"]
rows = [r for r in rows if r["peer"] != "clipft-encode-rss"]
key = lambda r: (r["tower"], r["batch_size"], r.get("text_tokens"))
by = {}
for r in rows:
    by.setdefault(key(r), {})[r["peer"]] = r["items_per_second"]
print("| tower | batch | tokens | clipft items/s | clipft f32 items/s | PyTorch items/s | ONNX Runtime items/s | clipft / PyTorch | clipft / ORT |")
print("|---|---|---|---|---|---|---|---|---|")
for k in sorted(by, key=lambda k: (k[0], k[1], k[2] or 0)):
    v = by[k]; c = v.get("clipft"); c32 = v.get("clipft-f32"); t = v.get("torch"); o = v.get("onnxruntime")
    f = lambda x: f"{x:.2f}" if x else "-"
    rt = f"{c / t:.2f}x" if c and t else "-"; ro = f"{c / o:.2f}x" if c and o else "-"
    print(f"| {k[0]} | {k[1]} | {k[2] or '-'} | {f(c)} | {f(c32)} | {f(t)} | {f(o)} | {rt} | {ro} |")
for r in rss:
    print(f"\nPeak RSS of `clipft encode`: text tower {r['text_kib']/1024:.0f} MiB, "
          f"vision tower {r['vision_kib']/1024:.0f} MiB, both {r['both_kib']/1024:.0f} MiB")
PY
