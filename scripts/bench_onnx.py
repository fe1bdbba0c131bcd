#!/usr/bin/env python3
"""`clipft export`'s ONNX graphs beside torch.onnx.export's, both run in ONNX Runtime on the same
weights: are clipft's graphs right (against transformers) and as fast as the ones clip-as-service
users made with torch?

    target/peer-venv/bin/python scripts/bench_onnx.py --model target/vitb32-rand \
        --clipft-onnx DIR --batch-sizes 1,8,32 --seconds 10

DIR holds `clipft export --model MODEL --output DIR`'s textual.onnx and visual.onnx. The torch
graphs are bench_peers.py's (exported once, cached under MODEL/onnx/). Each tower is first checked
against transformers' get_text_features / get_image_features (max abs diff, stderr); then both
graphs are timed with the same session options (bench_peers.ort_session: ORT_ENABLE_ALL, CPU,
--threads), one JSON line per graph x tower x batch size:

    {"graph": "clipft"|"torch", "tower": ..., "batch_size": B, "text_tokens": T|null,
     "items_per_second": X}

Text rows are T tokens long (bench_peers.make_ids: BOS first, EOS last); clipft's graph is fed
int32 input_ids and an all-ones attention_mask, as clip_server feeds it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import (  # noqa: E402
    TOWERS,
    TextFeatures,
    VisionFeatures,
    export_onnx,
    log,
    make_ids,
    make_pixels,
    ort_session,
    time_calls,
)


def feeds(graph, tower, x):
    if tower == "vision":
        return {"pixel_values": x.numpy()}
    if graph == "clipft":
        ids = x.numpy().astype(np.int32)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {"input_ids": x.numpy()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--clipft-onnx", required=True, help="clipft export's output folder")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--text-tokens", type=int, default=77)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from transformers import CLIPModel

    model_dir = Path(args.model).resolve()
    model = CLIPModel.from_pretrained(str(model_dir)).float().eval()
    size = model.config.vision_config.image_size
    feats = {"text": TextFeatures(model).eval(), "vision": VisionFeatures(model).eval()}
    paths = {
        ("clipft", "text"): Path(args.clipft_onnx) / "textual.onnx",
        ("clipft", "vision"): Path(args.clipft_onnx) / "visual.onnx",
        ("torch", "text"): model_dir / "onnx" / "text.onnx",
        ("torch", "vision"): model_dir / "onnx" / "vision.onnx",
    }
    for (graph, tower), path in paths.items():
        if graph == "torch" and not path.exists():
            export_onnx(tower, model_dir, path, size)
    sessions = {k: ort_session(p, args.threads) for k, p in paths.items()}

    gen = torch.Generator().manual_seed(7)
    for tower in ("text", "vision"):
        shapes = [(1, 77), (3, 16), (2, 5)] if tower == "text" else [(1, None), (3, None)]
        for b, t in shapes:
            x = make_ids(b, t, gen) if tower == "text" else make_pixels(b, size, gen)
            with torch.inference_mode():
                ref = feats[tower](x).numpy()
            scale = float(np.abs(ref).max())
            for graph in ("clipft", "torch"):
                got = sessions[(graph, tower)].run(["embedding"] if graph == "clipft" else None,
                                                   feeds(graph, tower, x))[0]
                diff = float(np.abs(got - ref).max())
                log(f"[check] {graph} graph vs transformers, {TOWERS[tower]} {b}x{t}: "
                    f"max abs diff {diff:.3g} (largest value {scale:.3g})")
                if diff > 1e-3 * max(scale, 1.0):
                    raise SystemExit(f"{graph}'s {tower} graph does not match transformers")

    gen = torch.Generator().manual_seed(0)
    for tower in ("text", "vision"):
        for b in [int(v) for v in args.batch_sizes.split(",") if v]:
            t = args.text_tokens if tower == "text" else None
            x = make_ids(b, t, gen) if tower == "text" else make_pixels(b, size, gen)
            for graph in ("clipft", "torch"):
                sess, feed = sessions[(graph, tower)], feeds(graph, tower, x)
                ips = time_calls(lambda: sess.run(None, feed), b, args.seconds)
                print(json.dumps({"graph": graph, "tower": TOWERS[tower], "batch_size": b,
                                  "text_tokens": t, "items_per_second": round(ips, 3)}), flush=True)


if __name__ == "__main__":
    main()
