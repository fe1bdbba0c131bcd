#!/usr/bin/env python3
"""PyTorch peer of `cargo bench --bench train_step`: the same CLIPLoss + AdamW steps on the same
model folder, random 77-token texts and random pixels, float32 on the CPU. Prints pairs/second
as one JSON line.

    python scripts/bench_train_peer.py --model target/vit-b-32 --batch 8 --steps 5
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(a.model, attn_implementation="eager").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    ids = torch.randint(1, 49400, (a.batch, 77))
    ids[:, 0], ids[:, -1] = 49406, 49407
    size = model.config.vision_config.image_size
    pixels = torch.randn(a.batch, 3, size, size)
    labels = torch.arange(a.batch)

    def step():
        t = features(model.get_text_features(input_ids=ids))
        i = features(model.get_image_features(pixel_values=pixels))
        t = t / t.norm(dim=-1, keepdim=True)
        i = i / i.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * t @ i.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    secs = time.perf_counter() - start
    print(json.dumps({"peer": "torch", "batch_size": a.batch, "steps": a.steps, "text_tokens": 77,
                      "pairs_per_second": round(a.batch * a.steps / secs, 3)}))


if __name__ == "__main__":
    main()
