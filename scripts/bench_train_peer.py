#!/usr/bin/env python3
"""PyTorch peer of `clipft bench --train`: the same CLIPLoss + AdamW steps on the same model
folder, random texts (77 tokens, or --text-tokens / --text-tokens-min as clipft bench makes them)
and random pixels. Prints pairs/second as one JSON line.

    python scripts/bench_train_peer.py --model target/vit-b-32 --batch 8 --steps 5
    python scripts/bench_train_peer.py --model target/vit-b-32 --batch 256 --device cuda --dtype bf16

--dtype bf16|f16 is torch.autocast over the forward pass with f32 weights and AdamW state (f16
with a GradScaler), as clipft's mixed precision does; f32 on a GPU allows TF32 neither here nor
in clipft. --attn eager (default, the same math clipft runs) or sdpa (PyTorch's fused attention).
--matmul-precision high is torch.set_float32_matmul_precision("high"), the setting that allows
what clipft's default --matmul-precision high does on the CPU (bf16x3 on AMX).
--freeze backbone trains only the projections and logit_scale (requires_grad off elsewhere,
Finetuner's freeze=True), as clipft bench --train --freeze backbone does.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from transformers import CLIPModel


def features(out):
    return getattr(out, "pooler_output", out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="target/vit-b-32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--text-tokens", type=int, default=77)
    ap.add_argument("--text-tokens-min", type=int, default=None,
                    help="captions of mixed lengths, as clipft bench --text-tokens-min makes them")
    ap.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default="highest",
                    help="torch.set_float32_matmul_precision (clipft's default is high)")
    ap.add_argument("--freeze", choices=["backbone"], default=None,
                    help="train only the projections and logit_scale")
    a = ap.parse_args()
    torch.set_float32_matmul_precision(a.matmul_precision)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    model = CLIPModel.from_pretrained(a.model, attn_implementation=a.attn).to(dev).train()
    if a.freeze == "backbone":
        heads = ("text_projection.", "visual_projection.", "logit_scale")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(heads))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.01)
    t = a.text_tokens
    lo = t if a.text_tokens_min is None else a.text_tokens_min
    ids = torch.randint(1, 49400, (a.batch, t))
    ids[:, 0] = 49406
    for i in range(a.batch):
        # clipft bench's spread; padded with end-of-text to the longest, as a tokenizer pads
        n = lo + (i * (t - lo)) // (a.batch - 1) if a.batch > 1 else lo
        ids[i, n - 1:] = 49407
    ids = ids.to(dev)
    size = model.config.vision_config.image_size
    pixels = torch.randn(a.batch, 3, size, size).to(dev)
    labels = torch.arange(a.batch).to(dev)
    half = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.dtype)
    scaler = torch.amp.GradScaler(dev.type) if a.dtype == "f16" else None

    def step():
        with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
            t = features(model.get_text_features(input_ids=ids))
            i = features(model.get_image_features(pixel_values=pixels))
            t = t / t.norm(dim=-1, keepdim=True)
            i = i / i.norm(dim=-1, keepdim=True)
            logits = model.logit_scale.exp() * t @ i.T
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()  # waits for the GPU, as clipft's step does

    step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    secs = time.perf_counter() - start
    out = {"peer": "torch", "batch_size": a.batch, "steps": a.steps, "text_tokens": t,
           "text_tokens_min": a.text_tokens_min,
           "device": a.device, "dtype": a.dtype, "attn": a.attn,
           "matmul_precision": a.matmul_precision, "freeze": a.freeze,
           "pairs_per_second": round(a.batch * a.steps / secs, 3)}
    if dev.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
