#!/usr/bin/env python3
"""PyTorch reference for CLIP fine-tuning steps (clipft's trainer reproduces it step by step).

Run from the repository root (CPU only, nothing is downloaded):

    /work/venvs/ref/bin/python scripts/make_train_reference.py
    /work/venvs/ref/bin/python scripts/make_train_reference.py --out /tmp/x   # e.g. to check determinism

Procedure (deterministic):

* Model: CLIPModel.from_pretrained("tests/fixtures/clip-tiny", attn_implementation="eager"), float32,
  model.train(). CLIP has no dropout (attention_dropout 0.0, no other dropout layers), so train() vs
  eval() makes no difference. torch.manual_seed(0); torch.use_deterministic_algorithms(True);
  torch.set_num_threads(--threads, default 1).
* Data: the first 24 rows of data/demo/train.csv (`caption,image_path`, path relative to data/demo/,
  no header, read with the csv module), in file order, batch size 8 -> 3 batches. 2 epochs over the
  same 3 batches in the same order (no shuffling) = 6 optimizer steps.
* Text: CLIPTokenizerFast.from_pretrained(clip-tiny)(caption, truncation=True, max_length=77), each
  batch padded to its longest sequence with 49407 (the EOS id); NO attention_mask is passed (HF pools
  at argmax(input_ids) = the first 49407 and the causal mask makes trailing padding irrelevant).
* Image: CLIPImageProcessorPil.from_pretrained(clip-tiny) with default settings (convert RGB, resize
  short side 224 bicubic, centre crop 224, rescale 1/255, normalise with the CLIP mean/std).
* Forward: t = get_text_features(input_ids).pooler_output, i = get_image_features(pixel_values)
  .pooler_output (transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the
  projected embedding); t, i L2-normalised (x / x.norm(dim=-1, keepdim=True));
  logits = exp(logit_scale) * t @ i.T; loss = (CE(logits, arange B) + CE(logits.T, arange B)) / 2.
* Optimiser: torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
  weight_decay=0.01, foreach=False) over EVERY parameter (biases, LayerNorms, embeddings and
  logit_scale included). foreach=False is what torch picks on CPU anyway (single-tensor path).
  Constant lr, no gradient clipping, zero_grad(set_to_none=True) before each backward. After each
  optimizer.step(): with torch.no_grad(): model.logit_scale.clamp_(0, ln 100).
* The gradient L2 norm of every parameter is recorded for the first step (first batch, before the
  first update).

Outputs in tests/fixtures/train/ (or --out): reference.json, after.safetensors, README.md.
after.safetensors holds every parameter after step 6 under the HF CLIPModel names, float32, except
text_model.embeddings.token_embedding.weight (49408x32): only the rows of the token ids that occur in
any batch are stored, as `...token_embedding.weight.rows` [R, 32] f32 and
`...token_embedding.weight.row_ids` [R] i64 (ascending). All other rows have zero gradient at every
step, so AdamW only decays them: row_after = row_before * (1 - lr*wd)^6 (checked here).
"""

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "tests" / "fixtures" / "clip-tiny"
DATA_DIR = ROOT / "data" / "demo"
TRAIN_CSV = DATA_DIR / "train.csv"
OUT_DIR = ROOT / "tests" / "fixtures" / "train"

SEED = 0
N_ROWS = 24
BATCH_SIZE = 8
EPOCHS = 2
MAX_LENGTH = 77
PAD_ID = 49407
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
LOGIT_SCALE_MAX = math.log(100)
TOKEN_EMB = "text_model.embeddings.token_embedding.weight"


def rel(p: Path) -> str:
    return p.resolve().relative_to(ROOT).as_posix()


def features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


def clip_loss(model, input_ids, pixel_values):
    t = features(model.get_text_features(input_ids=input_ids))
    i = features(model.get_image_features(pixel_values=pixel_values))
    t = t / t.norm(dim=-1, keepdim=True)
    i = i / i.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * t @ i.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def read_rows():
    with open(TRAIN_CSV, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f)]
    rows = rows[:N_ROWS]
    assert len(rows) == N_ROWS and all(len(r) == 2 for r in rows), rows
    return [(caption, path) for caption, path in rows]


def make_batches(rows, tok, proc):
    batches = []
    for b in range(0, len(rows), BATCH_SIZE):
        chunk = rows[b : b + BATCH_SIZE]
        ids = [tok(c, truncation=True, max_length=MAX_LENGTH)["input_ids"] for c, _ in chunk]
        longest = max(len(x) for x in ids)
        padded = [x + [PAD_ID] * (longest - len(x)) for x in ids]
        images, modes = [], []
        for _, p in chunk:
            with Image.open(DATA_DIR / p) as im:
                im.load()
                modes.append(im.mode)
                images.append(im.copy())
        pv = proc(images=images, return_tensors="pt")["pixel_values"].float()
        assert pv.shape == (len(chunk), 3, 224, 224), pv.shape
        batches.append(
            {
                "captions": [c for c, _ in chunk],
                "image_paths": [p for _, p in chunk],
                "image_modes": modes,
                "input_ids": padded,
                "input_ids_t": torch.tensor(padded, dtype=torch.long),
                "pixel_values": pv,
            }
        )
    return batches


def versions(threads):
    import PIL
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "device": "cpu",
        "torch_num_threads": threads,
    }


def write_readme(out_dir: Path, ref: dict, decay_err: float, n_rows_stored: int):
    losses = "\n".join(f"| {k + 1} | {l!r} | {s!r} |" for k, (l, s) in enumerate(zip(ref["losses"], ref["logit_scale_after"])))
    v = ref["versions"]
    noise_norms = ", ".join(f"{ref['first_step_grad_norms'][n]:.2g}" for n in ref["gradient_is_rounding_noise"])
    noise_norms += " at step 1"
    text = f"""# Training reference (PyTorch)

Generated by `scripts/make_train_reference.py` (deterministic; rerun it to regenerate, do not edit by hand):

    /work/venvs/ref/bin/python scripts/make_train_reference.py

Versions: python {v['python']}, torch {v['torch']} (CPU, {v['torch_num_threads']} thread), transformers {v['transformers']},
tokenizers {v['tokenizers']}, safetensors {v['safetensors']}, pillow {v['pillow']}, numpy {v['numpy']}.

## Procedure

- **Model**: `CLIPModel.from_pretrained("tests/fixtures/clip-tiny", attn_implementation="eager")`, float32,
  `model.train()`. CLIP has no dropout (attention_dropout 0.0 and no dropout layers), so train/eval mode is
  irrelevant. `torch.manual_seed(0)`, `torch.use_deterministic_algorithms(True)`, `torch.set_num_threads(1)`.
  Nothing in the procedure is random.
- **Data**: the first 24 rows of `data/demo/train.csv` (`caption,image_path`, path relative to `data/demo/`, no
  header), in file order, batch size 8 -> 3 batches; 2 epochs over the same 3 batches in the same order (no
  shuffling) = **6 optimizer steps** (steps 4-6 reuse batches 1-3). The rows of each batch are in
  `reference.json` `procedure.batches` together with the padded token ids.
- **Text**: `CLIPTokenizerFast.from_pretrained(clip-tiny)(caption, truncation=True, max_length=77)`, padded to the
  longest in the batch with 49407; **no attention_mask** (HF pools at `argmax(input_ids)` = the first 49407;
  the causal mask makes the trailing padding irrelevant).
- **Image**: `CLIPImageProcessorPil.from_pretrained(clip-tiny)`, default settings (RGB; all 24 images are 64x64
  RGB PNGs, so they are upscaled to 224 with PIL bicubic; rescale 1/255; CLIP mean/std). `procedure.batches[*].
  pixel_values_sum` is the float64 sum of each image's pixel_values, for debugging preprocessing.
- **Forward / loss** (per batch of B = 8):
  `t = get_text_features(input_ids).pooler_output`, `i = get_image_features(pixel_values).pooler_output` (the
  projected embeddings), `t /= ||t||`, `i /= ||i||` (plain `x / x.norm(dim=-1, keepdim=True)`, no epsilon),
  `logits = exp(logit_scale) * t @ i.T`,
  `loss = (cross_entropy(logits, arange B) + cross_entropy(logits.T, arange B)) / 2` (mean reduction).
- **Optimiser**: `torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
  weight_decay=0.01, foreach=False)` over **every** parameter (biases, LayerNorm weights, embeddings and
  `logit_scale` included). Constant lr, no gradient clipping, `zero_grad(set_to_none=True)` before each
  backward. After each `optimizer.step()`: `model.logit_scale.clamp_(0, ln 100)` under `no_grad` (never active
  here: logit_scale stays near 2.66).
  torch's single-tensor AdamW (what CPU uses), per parameter, with step count k = 1..6:

      p   = p * (1 - lr*wd)                       # decoupled decay first, on the old parameter
      m   = m.lerp(g, 1 - b1)                     # = b1*m + (1-b1)*g
      v   = v*b2 + (1-b2)*g*g
      bc1 = 1 - b1^k ; bc2 = 1 - b2^k             # Python floats (double)
      p   = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)

  m and v start at zero. `lr/bc1` and `sqrt(bc2)` are computed in double and applied as float32 scalars.

## Files

- `reference.json`
  - `procedure`: every hyper-parameter and the data used (per batch: captions, image paths, padded input ids,
    pixel_values sums; the step -> batch order).
  - `losses`: 6 floats, the loss of each step's forward (before that step's update).
  - `logit_scale_after`: logit_scale after each step (after the clamp).
  - `first_step_grad_norms`: {{HF parameter name: L2 norm of its gradient}} for step 1 (first batch,
    before any update); for localising a mismatch.
  - `checks`: results of the self-checks below. `versions`: library versions.
- `after.safetensors`: every parameter after step 6, float32, under the HF `CLIPModel` names (the names of
  `tests/fixtures/clip-tiny/model.safetensors`), **except** `{TOKEN_EMB}` (49408x32, 6 MB):
  only the {n_rows_stored} rows of the token ids that occur in any batch (padding id 49407 and BOS 49406 included)
  are stored, as `{TOKEN_EMB}.rows` [{n_rows_stored}, 32] float32 and `{TOKEN_EMB}.row_ids` [{n_rows_stored}]
  int64, ascending. Every other row has a zero gradient at every step (AdamW's m and v stay 0, the Adam update is
  exactly 0), so it changes only by the decoupled decay: `row_after = row_before * (1 - lr*wd)^6` in exact
  arithmetic (= `row_before * 0.99999^6`). The script checks this against torch's result: max relative error
  {decay_err:.3g} (float32 rounding of six multiplications by float32(0.99999)).

## Steps

| step | loss (before update) | logit_scale after |
|---|---|---|
{losses}

## Determinism and tolerances

Measured when this fixture was generated (torch 2.15 CPU, MKL/oneDNN, 2-core x86-64):

- Two runs of the script with the default 1 thread give **byte-identical** `reference.json`,
  `after.safetensors` and `README.md`. Two runs with `--threads 2` are also byte-identical to each other.
- 1 thread vs 2 threads (different reduction order, same maths): losses differ by <= 2.1e-7 relative;
  parameters after step 6 differ by <= 2.2e-6 absolute (patch_embedding.weight; most <= 2.4e-7), against a
  typical total movement of ~5.5e-3 (6 steps of ~lr). This is the floor of what a reimplementation can match.
- **Exception: `*.self_attn.k_proj.bias`** (4 tensors: text and vision, layers 0 and 1; listed in
  `reference.json` `gradient_is_rounding_noise`). Their gradient is exactly zero in exact arithmetic (adding
  the same vector to every key shifts each query's scores by a constant, which softmax ignores), so torch's
  gradient there is float rounding noise (norm {noise_norms}). Adam divides m by sqrt(v), which turns that
  noise into updates of up to ~lr per step with a random sign: between 1 and 2 threads these tensors differ by
  up to 1.1e-3 after 6 steps, i.e. as much as they moved. A Rust test cannot match them; it should only check
  `|after - before| <= 6*lr` (plus the decay) for them, or skip them.
- Suggested Rust tolerances: losses ~1e-5 relative; other parameters ~1e-4 absolute (about 2% of a step's
  movement); `first_step_grad_norms` ~1e-4 relative except for the k_proj biases.
"""
    (out_dir / "README.md").write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = True
    except Exception as e:  # pragma: no cover
        print(f"use_deterministic_algorithms failed: {e}")
        deterministic = False

    model = CLIPModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager").float()
    model.train()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()), "unexpected dropout"
    tok = CLIPTokenizerFast.from_pretrained(str(MODEL_DIR))
    proc = CLIPImageProcessorPil.from_pretrained(str(MODEL_DIR))

    rows = read_rows()
    batches = make_batches(rows, tok, proc)
    assert len(batches) == N_ROWS // BATCH_SIZE
    order = [b for _ in range(EPOCHS) for b in range(len(batches))]

    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
        tok_before = f.get_tensor(TOKEN_EMB).clone()
    assert set(names) == file_keys, (set(names) ^ file_keys)
    assert torch.equal(tok_before, params[TOKEN_EMB].detach())

    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False
    )

    scale0 = float(model.logit_scale.item())
    losses, scales, grad_norms = [], [], {}
    t0 = time.perf_counter()
    for step, bi in enumerate(order):
        b = batches[bi]
        opt.zero_grad(set_to_none=True)
        loss = clip_loss(model, b["input_ids_t"], b["pixel_values"])
        loss.backward()
        if step == 0:
            for n in names:
                g = params[n].grad
                assert g is not None, n
                grad_norms[n] = float(g.norm().item())
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        losses.append(float(loss.item()))
        scales.append(float(model.logit_scale.item()))
        print(f"step {step + 1} (batch {bi + 1}): loss {losses[-1]!r}  logit_scale {scales[-1]!r}")
    elapsed = time.perf_counter() - t0
    print(f"6 steps (forward+backward+AdamW) took {elapsed:.3f} s with {args.threads} thread(s)")

    # k_proj biases: zero gradient in exact arithmetic (softmax is shift invariant per query), so what
    # torch computes is rounding noise, which Adam's m/sqrt(v) amplifies to ~lr-sized random updates.
    noise_params = [n for n in names if n.endswith("self_attn.k_proj.bias")]
    assert len(noise_params) == 4, noise_params
    for n in noise_params:
        assert grad_norms[n] < 1e-5, (n, grad_norms[n])
    print("k_proj.bias grad norms (rounding noise):", {n: f"{grad_norms[n]:.2g}" for n in noise_params})

    # ---- after.safetensors
    used = sorted({i for b in batches for row in b["input_ids"] for i in row})
    row_ids = torch.tensor(used, dtype=torch.int64)
    tok_after = params[TOKEN_EMB].detach().clone()
    tensors = {}
    for n in names:
        if n == TOKEN_EMB:
            continue
        tensors[n] = params[n].detach().to(torch.float32).contiguous().clone()
    tensors[TOKEN_EMB + ".rows"] = tok_after[row_ids].contiguous()
    tensors[TOKEN_EMB + ".row_ids"] = row_ids

    # ---- check: untouched rows change only by the decoupled decay
    mask = torch.ones(tok_after.shape[0], dtype=torch.bool)
    mask[row_ids] = False
    before64 = tok_before[mask].double()
    expected = before64 * (1.0 - LR * WEIGHT_DECAY) ** len(order)
    actual = tok_after[mask].double()
    nz = expected != 0
    decay_rel = float(((actual - expected).abs()[nz] / expected.abs()[nz]).max().item())
    decay_abs = float((actual - expected).abs().max().item())
    # repeated float32 multiplication by float32(1 - lr*wd) reproduces it bitwise?
    f32 = tok_before[mask].clone()
    for _ in range(len(order)):
        f32.mul_(1.0 - LR * WEIGHT_DECAY)
    decay_f32_exact = bool(torch.equal(f32, tok_after[mask]))
    print(
        f"untouched token rows ({int(mask.sum())}): max rel err vs row_before*(1-lr*wd)^6 = {decay_rel:.3g} "
        f"(max abs {decay_abs:.3g}); bitwise equal to 6x float32 multiply: {decay_f32_exact}"
    )
    assert decay_rel < 1e-6, decay_rel
    # stored rows did move by more than the decay (they had gradients)
    moved = (tok_after[row_ids] - tok_before[row_ids] * (1.0 - LR * WEIGHT_DECAY) ** len(order)).abs().amax(dim=1)
    assert bool((moved > 1e-6).all()), "a stored token row did not get a gradient"

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "after.safetensors"), metadata={"format": "pt"})

    # ---- check: nothing missing from after.safetensors, values round-trip
    with safe_open(str(args.out / "after.safetensors"), "pt") as f:
        stored = set(f.keys())
        for k in stored:
            t = f.get_tensor(k)
            if k == TOKEN_EMB + ".row_ids":
                assert t.dtype == torch.int64
            else:
                assert t.dtype == torch.float32, (k, t.dtype)
            assert torch.equal(t, tensors[k]), k
    expect_keys = (file_keys - {TOKEN_EMB}) | {TOKEN_EMB + ".rows", TOKEN_EMB + ".row_ids"}
    assert stored == expect_keys, (stored ^ expect_keys)
    print(f"after.safetensors: {len(stored)} tensors, all {len(file_keys)} parameters covered")

    ref = {
        "procedure": {
            "model_dir": rel(MODEL_DIR),
            "model_class": "CLIPModel",
            "attn_implementation": "eager",
            "dtype": "float32",
            "mode": "train (CLIP has no dropout; identical to eval)",
            "seed": SEED,
            "use_deterministic_algorithms": deterministic,
            "data_csv": rel(TRAIN_CSV),
            "image_root": rel(DATA_DIR),
            "rows_used": N_ROWS,
            "batch_size": BATCH_SIZE,
            "epochs": EPOCHS,
            "shuffle": False,
            "steps": len(order),
            "step_batch_order": [b + 1 for b in order],
            "tokenizer": "CLIPTokenizerFast.from_pretrained(model_dir)",
            "truncation": True,
            "max_length": MAX_LENGTH,
            "padding": "longest in batch",
            "pad_id": PAD_ID,
            "attention_mask": None,
            "image_processor": "CLIPImageProcessorPil.from_pretrained(model_dir), defaults",
            "text_features": "get_text_features(input_ids).pooler_output",
            "image_features": "get_image_features(pixel_values).pooler_output",
            "normalise": "x / x.norm(dim=-1, keepdim=True)",
            "logits": "exp(logit_scale) * t @ i.T",
            "loss": "(cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2",
            "optimizer": {
                "name": "torch.optim.AdamW",
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
                "amsgrad": False,
                "foreach": False,
                "params": "all model.parameters()",
                "lr_schedule": "constant",
                "grad_clip": None,
                "zero_grad": "set_to_none=True before each backward",
            },
            "logit_scale_clamp_after_step": [0.0, LOGIT_SCALE_MAX],
            "batches": [
                {
                    "captions": b["captions"],
                    "image_paths": b["image_paths"],
                    "image_modes": b["image_modes"],
                    "input_ids": b["input_ids"],
                    "pixel_values_sum": [float(x) for x in b["pixel_values"].double().sum(dim=(1, 2, 3))],
                }
                for b in batches
            ],
        },
        "losses": losses,
        "logit_scale_before": scale0,
        "logit_scale_after": scales,
        "first_step_grad_norms": grad_norms,
        "token_embedding_row_ids": used,
        "gradient_is_rounding_noise": noise_params,
        "checks": {
            "untouched_token_rows": int(mask.sum()),
            "untouched_rows_max_rel_err_vs_decay_formula": decay_rel,
            "untouched_rows_bitwise_equal_to_6_f32_multiplies": decay_f32_exact,
        },
        "versions": versions(args.threads),
    }
    (args.out / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")

    write_readme(args.out, ref, decay_rel, len(used))

    for p in sorted(args.out.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes  sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
