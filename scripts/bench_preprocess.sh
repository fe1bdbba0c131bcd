#!/usr/bin/env bash
# Image preprocessing, clipft against Pillow (transformers' PIL path) on the same files, one
# image at a time on one thread each, alternating ROUNDS times (default 3):
#
#   scripts/bench_preprocess.sh [ROUNDS] [SECONDS per measurement, default 1]
#
# The peer's venv (Pillow, numpy) is built in target/preprocess-venv. Prints the JSON lines and
# a table of clipft / Pillow speed ratios (higher is faster for clipft), best round of each.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
SECS="${2:-1}"
VENV="${CLIPFT_PREPROCESS_VENV:-target/preprocess-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet pillow numpy
fi
cargo bench --bench preprocess --no-run --quiet
OUT=target/bench-preprocess.jsonl
: > "$OUT"
for _ in $(seq "$ROUNDS"); do
  CLIPFT_BENCH_SECONDS="$SECS" RAYON_NUM_THREADS=1 cargo bench --bench preprocess --quiet | tee -a "$OUT"
  OMP_NUM_THREADS=1 "$VENV/bin/python" scripts/bench_preprocess_peer.py "$SECS" | tee -a "$OUT"
  "$VENV/bin/python" -c "import PIL, numpy; print('# pillow', PIL.__version__, 'numpy', numpy.__version__)"
done
"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
best = {}
for line in open(sys.argv[1]):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    for k in ("resize_crop_ms", "preprocess_ms"):
        key = (r["impl"], r["file"], k)
        best[key] = min(best.get(key, float("inf")), r[k])
files = sorted({f for _, f, _ in best}, key=lambda f: f)
print("| file | resize+crop clipft / Pillow (ms) | ratio | preprocess clipft / Pillow (ms) | ratio |")
print("|---|---|---|---|---|")
for f in files:
    cells = []
    for k in ("resize_crop_ms", "preprocess_ms"):
        c, p = best[("clipft", f, k)], best[("pillow", f, k)]
        cells += [f"{c:.3f} / {p:.3f}", f"{p / c:.2f}x"]
    print(f"| {f.split('/')[-1]} | " + " | ".join(cells) + " |")
PY
