#!/usr/bin/env bash
# Every GPU check of BENCHMARKS.md's GPU section in one run, for a lent GPU machine (one H100 or
# H200, minutes of time): the CUDA binary against PyTorch on the same machine and weights.
#
#   scripts/gpu-check.sh [CLIPFT_BINARY | PACKED_DIR] [OUT_DIR] [PART]
#
# PART: all (default), 1 (kernel tests, parity, inference; steps 1-4 and 5b's inference, about 6
# minutes on an H100), 2 (training, 5b's training, the demo; about 5 minutes) or 3 (step 7, the
# executor end to end; about 5 minutes). A lent machine runs one command for at most 10 minutes:
# run part 1, then part 2 at once (the machine stays warm for 30 s), each with its own OUT_DIR;
# part 3 where time is left (15 minutes of device time hold parts 1 and 2 and a start; part 3 may
# need a session of its own). The ViT-B/32 fixtures stay in /tmp between the calls.
#
# PACKED_DIR is what scripts/pack-gpu.sh wrote (.gpu/: the binary, device_check and the library's
# CUDA unit tests, xz-compressed): they are unpacked, the CUDA kernels are tested against their
# CPU twins and device_check runs before the checks below.
#
# Needs python3 with torch + transformers + safetensors + pyyaml (the GPU image's), the binary from
# scripts/build-cuda.sh and the repository's fixtures. Writes OUT_DIR/summary.txt (one line per
# check, JSON where the step prints it) and OUT_DIR/log.txt (everything).
#  1. a random ViT-B/32 with PyTorch references (scripts/make_fixtures.py --full-size)
#  2. embeddings on the GPU vs PyTorch's f32 CPU references, f32 / f16 / bf16
#  3. step parity: `clipft fit` (tiny CLIP, 6 AdamW steps) on the GPU vs PyTorch's losses
#  4. inference throughput: clipft bench vs scripts/bench_peers.py (torch), f16, batch 256 and 1
#  5. training throughput: clipft bench --train vs scripts/bench_train_peer.py, batch 256, bf16, f32
#     (and clipft with its CUDA kernels off, CLIPFT_NO_FUSED=1)
#  (the embedding ops', the tensor-core attention's, the residual norm's, the one-launch
#  Adam's and the block nodes' own tests run first in each part; if one fails, both parts run
#  without it,
#  CLIPFT_NO_TC_ATTENTION=1, CLIPFT_NO_RESIDUAL_NORM=1, CLIPFT_NO_MULTI_TENSOR_ADAM=1,
#  CLIPFT_NO_FUSED_BLOCK=1 or CLIPFT_NO_FUSED_EMBED=1, and say so)
#  5b. captions of mixed lengths (8 to 32 tokens, as a tokenizer pads a batch): text inference
#     and bf16 training, clipft's packed captions against torch padded to the batch's longest
#     (and clipft padded too, CLIPFT_NO_PACKED_TEXT=1)
#  6. the demo's fine-tune on the GPU (bf16): after-metrics vs before
#  7. (part 3) `clipft executor --device cuda --dtype f16` against the Python peer on the same GPU
#     (scripts/peer_executor.py --device cuda: fp16, as clip_server on CUDA), both driven by
#     clip_client with captions and 600x400 JPEG files, and each one's GPU memory
#     (scripts/bench_executor.py --gpu; every number in OUT_DIR/executor.json). jina, clip_client
#     and docarray v1 come from .gpu/wheels (scripts/pack-gpu.sh), installed into /tmp/clipft-site.
set -u
cd "$(dirname "$0")/.."
BIN="$(realpath "${1:-target/cuda/release/clipft}")"
OUTDIR="${2:-${OUT:-target/gpu-check}}"
PART="${3:-all}"
# part N: whether this run includes part N.
part() { [ "$PART" = all ] || [ "$PART" = "$1" ]; }
if [ -d "$BIN" ]; then
  PACKED="$BIN" BIN="$(mktemp -d)/clipft"
  for f in clipft device_check lib_tests; do
    xz -d -c "$PACKED/$f.xz" >"$(dirname "$BIN")/$f" && chmod +x "$(dirname "$BIN")/$f"
  done
  DEVICE_CHECK="${DEVICE_CHECK:-$(dirname "$BIN")/device_check}"
  LIB_TESTS="$(dirname "$BIN")/lib_tests"
fi
PY="${PYTHON:-python3}"
# DEVICE_CHECK=PATH runs that build of examples/device_check first (op-by-op CPU vs GPU, then
# where the time of a batch of 256 goes); QUICK=1 leaves out the demo fine-tune and the sdpa peer.
# Knobs for a dry run elsewhere (DEVICE=cpu BATCH=2 SECS=0 EPOCHS=1 VIT=target/vit-b-32).
DEV="${DEVICE:-cuda}" BATCH="${BATCH:-256}" SECS="${SECS:-8}" EPOCHS="${EPOCHS:-30}"
mkdir -p "$OUTDIR"
SUM="$OUTDIR/summary.txt" LOG="$OUTDIR/log.txt"
: >"$SUM"; : >"$LOG"
# cuBLAS / cuRAND / cudart 13 from the Python environment's NVIDIA wheels.
SP="$("$PY" -c 'import site; print(site.getsitepackages()[0])')"
LD_LIBRARY_PATH="$(ls -d "$SP"/nvidia/*/lib "$SP"/nvidia/cu13/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK="$(mktemp -d)"
VIT="${VIT:-/tmp/clipft-gpu-check-vit-b-32}"

# step NAME TIMEOUT COMMAND...: runs one check; its last stdout line goes to the summary.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" >>"$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/out" 2>>"$LOG"
  local rc=$?
  cat "$WORK/out" >>"$LOG"
  echo "$name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$WORK/out")" | tee -a "$SUM"
}

echo "part $PART" | tee -a "$SUM"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$SUM"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$SUM"
ldd "$BIN" | grep -E "not found|cublas|cuda" >>"$SUM"
[ -f "$VIT/model.safetensors" ] || step fixtures 240 "$PY" scripts/make_fixtures.py --full-size "$VIT"
MIXED="--text-tokens 32 --text-tokens-min 8"

# A feature's own GPU test, first: if it fails, every check below runs without the feature
# (SWITCH=1, exported) and the summary says so. gate NAME SECONDS FILTER SWITCH WHAT
gate() {
  [ -n "${LIB_TESTS:-}" ] || return 0
  step "$1" "$2" "$LIB_TESTS" "$3" --nocapture
  if ! grep -q "test result: ok. 1 passed" "$WORK/out"; then
    export "$4=1"
    echo "$5 failed its test: $4=1 from here on" | tee -a "$SUM"
  fi
}
# The tensor-core attention (else the CUDA-core kernels), the residual add fused with the layer
# norm (else two kernels), the optimiser's one launch over every parameter (else one per
# parameter), each encoder block as one training node (else op by op), each tower's embedding
# as one op (else candle's gathers, concatenation and adds).
gate embed-test 60 cuda_embeddings CLIPFT_NO_FUSED_EMBED "embedding ops"
gate tc-attention-test 60 cuda_tc_attention CLIPFT_NO_TC_ATTENTION "tensor-core attention"
gate residual-norm-test 60 cuda_residual_norm CLIPFT_NO_RESIDUAL_NORM "residual norm"
gate multi-adam-test 60 cuda_multi_tensor_step CLIPFT_NO_MULTI_TENSOR_ADAM "one-launch Adam"
gate gpu-block-test 90 cuda_gpu_block CLIPFT_NO_FUSED_BLOCK "block nodes"

if part 1; then
# The CUDA kernels against their CPU twins, the optimiser step and the staged upload (the
# library's unit tests of a CUDA build whose names start with cuda_).
[ -z "${LIB_TESTS:-}" ] || step kernel-tests 120 "$LIB_TESTS" cuda_ --nocapture
if [ -n "${DEVICE_CHECK:-}" ]; then
  DEVICE_CHECK_TIMING=1 step device-check 180 "$DEVICE_CHECK" "$VIT"
  cat "$WORK/out" >>"$SUM"
fi
for dt in f32 f16 bf16; do
  step "parity-$dt" 120 "$PY" scripts/gpu_parity.py --bin "$BIN" --model "$VIT" \
    --images tests/fixtures/reference/images --device "$DEV" --dtype "$dt"
done

# Step parity: the first 24 demo pairs, as tests/train.rs::clipft_fit_takes_the_same_steps_as_pytorch.
"$PY" -c 'import csv, sys, os
rows = list(csv.reader(open("data/demo/train.csv")))[:24]
csv.writer(sys.stdout).writerows([r[0], os.path.abspath("data/demo/" + r[1])] for r in rows)' >"$WORK/pairs.csv"
step fit-parity 180 bash -c "'$BIN' fit --model tests/fixtures/clip-tiny --train-data '$WORK/pairs.csv' \
  --no-shuffle --max-steps 6 --epochs 2 --batch-size 8 --optimizer AdamW --learning-rate 1e-3 \
  --weight-decay 0.01 --device '$DEV' --dtype f32 --run-name parity --output '$WORK/fit' >&2 &&
  '$PY' -c 'import json, yaml, sys
got = yaml.safe_load(open(sys.argv[1]))[\"train_loss_per_step\"]
want = json.load(open(\"tests/fixtures/train/reference.json\"))[\"losses\"]
print(json.dumps({\"steps\": len(got), \"max_rel_diff\": max(abs(g - w) / abs(w) for g, w in zip(got, want))}))' '$WORK/fit/parity/metrics.yml'"

for tower in clip-text clip-vision; do
  step "bench-$tower-f16" 120 "$BIN" bench --model "$VIT" --select-model "$tower" --device "$DEV" \
    --dtype f16 --batch-size "$BATCH" --seconds "$SECS"
  # Batch 1: items/s is 1 / latency.
  step "bench-$tower-f16-b1" 60 "$BIN" bench --model "$VIT" --select-model "$tower" --device "$DEV" \
    --dtype f16 --batch-size 1 --seconds "$((SECS / 2 + 1))"
done
# The image tower with the attention forward on CUDA cores: what the tensor-core kernel brings.
[ -n "${QUICK:-}" ] || [ -n "${CLIPFT_NO_TC_ATTENTION:-}" ] || CLIPFT_NO_TC_ATTENTION=1 step \
  bench-clip-vision-f16-cuda-cores 120 "$BIN" bench --model "$VIT" --select-model clip-vision \
  --device "$DEV" --dtype f16 --batch-size "$BATCH" --seconds "$SECS"
# And with the residual add and the layer norm as two kernels: what their fusion brings.
[ -n "${QUICK:-}" ] || CLIPFT_NO_RESIDUAL_NORM=1 step bench-clip-vision-f16-two-pass-norm 120 \
  "$BIN" bench --model "$VIT" --select-model clip-vision --device "$DEV" --dtype f16 \
  --batch-size "$BATCH" --seconds "$SECS"
step bench-peer-torch-f16 240 "$PY" scripts/bench_peers.py --model "$VIT" --peers torch --device "$DEV" \
  --dtype f16 --batch-sizes "1,$BATCH" --text-tokens 77 --seconds "$SECS"
grep '"peer"' "$LOG" | tail -n 4 >>"$SUM"
# Captions of mixed lengths (5b): clipft packs each caption up to its end-of-text token.
step bench-clip-text-f16-mixed 120 "$BIN" bench --model "$VIT" --select-model clip-text --device "$DEV" \
  --dtype f16 --batch-size "$BATCH" --seconds "$SECS" $MIXED
step bench-peer-torch-text-f16-mixed 120 "$PY" scripts/bench_peers.py --model "$VIT" --peers torch \
  --tower text --device "$DEV" --dtype f16 --batch-sizes "$BATCH" --seconds "$SECS" $MIXED
fi

if part 2; then

for dt in bf16 f32; do
  step "train-clipft-$dt" 150 "$BIN" bench --train --model "$VIT" --device "$DEV" --dtype "$dt" \
    --batch-size "$BATCH" --seconds "$SECS"
  step "train-torch-$dt" 150 "$PY" scripts/bench_train_peer.py --model "$VIT" --device "$DEV" \
    --dtype "$dt" --batch "$BATCH" --steps 10
done
# The same step with the attention on CUDA cores: what the tensor-core forward and backward bring.
[ -n "${QUICK:-}" ] || [ -n "${CLIPFT_NO_TC_ATTENTION:-}" ] || CLIPFT_NO_TC_ATTENTION=1 step \
  train-clipft-bf16-cuda-cores 150 "$BIN" bench --train --model "$VIT" --device "$DEV" --dtype bf16 \
  --batch-size "$BATCH" --seconds "$SECS"
# The same step op by op (each encoder block twenty nodes of candle's graph instead of one):
# what the block nodes bring.
[ -n "${QUICK:-}" ] || [ -n "${CLIPFT_NO_FUSED_BLOCK:-}" ] || CLIPFT_NO_FUSED_BLOCK=1 step \
  train-clipft-bf16-per-op 150 "$BIN" bench --train \
  --model "$VIT" --device "$DEV" --dtype bf16 --batch-size "$BATCH" --seconds "$SECS"
# The same step with clipft's CUDA kernels off (candle's ops): what the kernels bring.
[ -n "${QUICK:-}" ] || CLIPFT_NO_FUSED=1 step train-clipft-bf16-candle-ops 150 "$BIN" bench --train \
  --model "$VIT" --device "$DEV" --dtype bf16 --batch-size "$BATCH" --seconds "$SECS"
[ -n "${QUICK:-}" ] || step train-torch-bf16-sdpa 150 "$PY" scripts/bench_train_peer.py --model "$VIT" --device "$DEV" \
  --dtype bf16 --attn sdpa --batch "$BATCH" --steps 10

# Captions of mixed lengths (5b), training.
step train-clipft-bf16-mixed 150 "$BIN" bench --train --model "$VIT" --device "$DEV" --dtype bf16 \
  --batch-size "$BATCH" --seconds "$SECS" $MIXED
[ -n "${QUICK:-}" ] || CLIPFT_NO_PACKED_TEXT=1 step train-clipft-bf16-mixed-padded 150 "$BIN" bench --train \
  --model "$VIT" --device "$DEV" --dtype bf16 --batch-size "$BATCH" --seconds "$SECS" $MIXED
step train-torch-bf16-sdpa-mixed 150 "$PY" scripts/bench_train_peer.py --model "$VIT" --device "$DEV" \
  --dtype bf16 --attn sdpa --batch "$BATCH" --steps 10 $MIXED

[ -n "${QUICK:-}" ] || step demo-fit-bf16 150 bash -c "'$BIN' fit --model tests/fixtures/clip-tiny --train-data data/demo/train.csv \
  --eval-data data/demo/eval.csv --query-data data/demo/query.csv --index-data data/demo/index.csv \
  --epochs $EPOCHS --batch-size 32 --learning-rate 1e-3 --scheduler cosine --warmup-steps 10 --eval-every 0 \
  --device '$DEV' --dtype bf16 --run-name demo --output '$WORK/demo' 2>&1 | tail -n 16 | tr '\n' ' '"
fi

if part 3; then
# 7. The executor end to end. The Jina stack the image lacks travels as wheels (PACKED_DIR/wheels,
# or WHEELS=DIR); /tmp/clipft-site goes first on the Python path of the bench, its clients and
# the peer, whose torch stays the image's.
WHEELS="${WHEELS:-${PACKED:-.gpu}/wheels}" SITE=/tmp/clipft-site
if [ ! -f "$SITE/.installed" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
    --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 && touch "$SITE/.installed"
fi
if [ -f "$SITE/.installed" ]; then
  # On the GPU each server runs on it and its memory is sampled; DEVICE=cpu is a dry run.
  if [ "$DEV" = cpu ]; then E2E=(--clipft-arg=--device --clipft-arg=cpu --peer-arg=--device --peer-arg=cpu)
  else E2E=(--gpu --clipft-arg=--device --clipft-arg="$DEV" --clipft-arg=--dtype --clipft-arg=f16
    --peer-arg=--device --peer-arg="$DEV" --peer-arg=--dtype --peer-arg=fp16); fi
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" step executor-e2e 540 "$PY" scripts/bench_executor.py \
    --model "$VIT" --seconds "$SECS" --servers "${E2E_SERVERS:-clipft,peer}" --clipft "$BIN" \
    --log-dir "$WORK/e2e-logs" --out "$OUTDIR/executor.json" "${E2E[@]}"
  cat "$WORK/out" >>"$SUM"
else
  echo "executor-e2e: skipped, no Jina wheels installed (scripts/pack-gpu.sh writes $WHEELS; see $LOG)" | tee -a "$SUM"
fi
fi
rm -rf "$WORK"
