#!/usr/bin/env python3
"""Benchmark the peers that `clipft bench` is compared with: PyTorch (transformers CLIPModel) and
ONNX Runtime, on the same weights, model only (inputs are already tokenized / preprocessed).

    /work/venvs/ref/bin/python scripts/bench_peers.py --model target/vit-b-32 \
        --tower both --batch-sizes 1,8,32 --text-tokens 16,77 --seconds 20 --peers torch,onnxruntime

For each peer x tower x batch size (x text length for the text tower) it prints one JSON line to
stdout:

    {"peer": "torch"|"onnxruntime", "tower": "clip-text"|"clip-vision", "batch_size": B,
     "text_tokens": T or null, "items_per_second": X}

Timed call, float32, CPU:
  torch        model.eval(), torch.inference_mode(), model.get_text_features(input_ids) /
               model.get_image_features(pixel_values) (`.pooler_output` of the returned object in
               transformers 5). Default attention implementation (sdpa).
  onnxruntime  one ONNX graph per tower that returns only the projected features, exported once with
               torch.onnx.export (TorchScript exporter, dynamo=False, opset 17; falls back to the dynamo
               exporter) and cached under MODEL/onnx/ (re-exported if missing). Dynamic batch axis, and
               dynamic sequence axis for text. Session: ORT_ENABLE_ALL, CPUExecutionProvider,
               intra_op_num_threads = --threads.
Inputs: random token ids of exactly T tokens (BOS 49406 first, EOS 49407 last, others < 49406);
random pixel tensors [B, 3, 224, 224]. Each config is warmed up, then run for at least --seconds
(and at least 3 calls); items_per_second = B * calls / elapsed.

Before timing, ORT is checked against torch once per tower at several shapes (max abs diff < 1e-3);
the check goes to stderr. --rss prints the peak RSS of this process at the end (stderr).
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

BOS_ID, EOS_ID = 49406, 49407
TOWERS = {"text": "clip-text", "vision": "clip-vision"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


class TextFeatures(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return _features(self.model.get_text_features(input_ids=input_ids))


class VisionFeatures(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return _features(self.model.get_image_features(pixel_values=pixel_values))


def caption_lengths(batch, tokens, tokens_min=None):
    """Row i's length: every row `tokens` long, or spread evenly from `tokens_min` as
    `clipft bench --text-tokens-min` spreads them (the same rows on both sides)."""
    lo = tokens if tokens_min is None else tokens_min
    return [lo + (i * (tokens - lo)) // (batch - 1) if batch > 1 else lo for i in range(batch)]


def make_ids(batch, tokens, gen, tokens_min=None):
    """Random rows of `caption_lengths`, padded with end-of-text to the longest, as a tokenizer
    pads a batch (HF pools at the first end-of-text)."""
    assert tokens >= 2
    ids = torch.randint(0, BOS_ID, (batch, tokens), generator=gen, dtype=torch.long)
    ids[:, 0] = BOS_ID
    for i, n in enumerate(caption_lengths(batch, tokens, tokens_min)):
        ids[i, n - 1:] = EOS_ID
    return ids


def make_pixels(batch, size, gen):
    return torch.randn((batch, 3, size, size), generator=gen, dtype=torch.float32)


def export_onnx(tower, model_dir, path, image_size):
    """Export one tower to `path`. Tries the TorchScript exporter (dynamo=False) first."""
    from transformers import CLIPModel

    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(123)
    if tower == "text":
        args, in_name, out_name = (make_ids(2, 16, gen),), "input_ids", "text_embeds"
        axes = {in_name: {0: "batch", 1: "sequence"}, out_name: {0: "batch"}}
    else:
        args, in_name, out_name = (make_pixels(2, image_size, gen),), "pixel_values", "image_embeds"
        axes = {in_name: {0: "batch"}, out_name: {0: "batch"}}
    errors = []
    # eager attention exports to plain MatMul/Softmax, which ORT fuses; sdpa as a second try.
    for attn in ("eager", "sdpa"):
        model = CLIPModel.from_pretrained(str(model_dir), attn_implementation=attn).float().eval()
        wrapper = (TextFeatures if tower == "text" else VisionFeatures)(model).eval()
        for dynamo in (False, True):
            try:
                kw = dict(input_names=[in_name], output_names=[out_name], opset_version=17, dynamo=dynamo)
                if dynamo:
                    shapes = {0: torch.export.Dim("batch", min=1, max=1024)}
                    if tower == "text":
                        shapes[1] = torch.export.Dim("sequence", min=2, max=77)
                    # the wrapper's forward argument is named like the ONNX input
                    kw.update(dynamic_shapes={in_name: shapes}, external_data=False)
                else:
                    kw.update(dynamic_axes=axes, do_constant_folding=True)
                with torch.no_grad():
                    torch.onnx.export(wrapper, args, str(path), **kw)
                log(f"[onnx] exported {tower} tower -> {path} (attn={attn}, dynamo={dynamo})")
                return
            except Exception as e:  # noqa: BLE001
                errors.append(f"attn={attn} dynamo={dynamo}: {type(e).__name__}: {str(e)[:300]}")
                log(f"[onnx] export failed: {errors[-1]}")
    raise SystemExit("ONNX export failed:\n" + "\n".join(errors))


def ort_session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def time_calls(fn, batch, seconds):
    fn()  # warm-up
    t_warm = time.perf_counter()
    fn()
    warm = time.perf_counter() - t_warm
    # a little more warm-up for fast configs (up to ~1 s)
    for _ in range(min(10, int(1.0 / max(warm, 1e-6)))):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return batch * calls / elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face CLIP folder (config.json + model.safetensors)")
    ap.add_argument("--tower", choices=["text", "vision", "both"], default="both")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--text-tokens", default="16,77")
    ap.add_argument("--text-tokens-min", type=int, default=None,
                    help="captions of mixed lengths, as clipft bench --text-tokens-min makes them")
    ap.add_argument("--seconds", type=float, default=20.0, help="minimum timed seconds per config (after warm-up)")
    ap.add_argument("--peers", default="torch,onnxruntime")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rss", action="store_true", help="print peak RSS at the end (stderr)")
    ap.add_argument("--device", default="cpu", help="torch peer only: cpu or cuda")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32", help="torch peer only")
    args = ap.parse_args()

    from transformers import CLIPModel

    model_dir = Path(args.model).resolve()
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    text_tokens = [int(x) for x in args.text_tokens.split(",") if x]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        if p not in ("torch", "onnxruntime"):
            raise SystemExit(f"unknown peer {p!r}")
    towers = ["text", "vision"] if args.tower == "both" else [args.tower]

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    wdtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if dev.type != "cpu" and peers != ["torch"]:
        raise SystemExit("--device other than cpu: --peers torch only")
    model = CLIPModel.from_pretrained(str(model_dir)).to(dev, wdtype).eval()
    image_size = model.config.vision_config.image_size
    max_pos = model.config.text_config.max_position_embeddings
    for t in text_tokens:
        if not 2 <= t <= max_pos:
            raise SystemExit(f"--text-tokens {t} out of range 2..{max_pos}")
    feats = {"text": TextFeatures(model).eval(), "vision": VisionFeatures(model).eval()}
    log(f"[setup] model {model_dir}, threads {args.threads}, torch {torch.__version__}, peers {peers}")

    sessions = {}
    if "onnxruntime" in peers:
        import onnxruntime as ort

        log(f"[setup] onnxruntime {ort.__version__}")
        for tower in towers:
            path = model_dir / "onnx" / f"{tower}.onnx"
            if not path.exists():
                export_onnx(tower, model_dir, path, image_size)
            sess = ort_session(path, args.threads)
            sessions[tower] = sess
            # correctness check against torch at a few shapes (other than the export shape)
            gen = torch.Generator().manual_seed(7)
            shapes = [(1, 77), (3, 16), (2, 5)] if tower == "text" else [(1, None), (3, None)]
            worst = 0.0
            for b, t in shapes:
                x = make_ids(b, t, gen) if tower == "text" else make_pixels(b, image_size, gen)
                with torch.inference_mode():
                    ref = feats[tower](x).numpy()
                got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
                worst = max(worst, float(np.abs(got - ref).max()))
            ok = worst < 1e-3
            log(f"[check] onnxruntime vs torch, {TOWERS[tower]}: max abs diff {worst:.3g} over shapes {shapes} -> {'OK' if ok else 'FAIL'}")
            if not ok:
                raise SystemExit(f"ONNX Runtime output for {tower} does not match torch (max abs diff {worst})")

    gen = torch.Generator().manual_seed(0)
    for peer in peers:
        for tower in towers:
            for b in batch_sizes:
                for t in text_tokens if tower == "text" else [None]:
                    x = (make_ids(b, t, gen, args.text_tokens_min) if tower == "text"
                         else make_pixels(b, image_size, gen))
                    if peer == "torch":
                        f = feats[tower]
                        x = x.to(dev) if tower == "text" else x.to(dev, wdtype)

                        def fn(f=f, x=x):
                            # the features back on the host, as clipft's bench returns them
                            with torch.inference_mode():
                                return f(x).float().cpu()

                    else:
                        sess = sessions[tower]
                        feed = {sess.get_inputs()[0].name: x.numpy()}

                        def fn(sess=sess, feed=feed):
                            return sess.run(None, feed)

                    ips = time_calls(fn, b, args.seconds)
                    print(
                        json.dumps(
                            {
                                "peer": peer,
                                "tower": TOWERS[tower],
                                "batch_size": b,
                                "text_tokens": t,
                                "text_tokens_min": args.text_tokens_min if tower == "text" else None,
                                "items_per_second": round(ips, 3),
                                "device": args.device,
                                "dtype": args.dtype,
                            }
                        ),
                        flush=True,
                    )
    if args.rss:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log(f"[rss] peak RSS {peak_kib / 1024:.1f} MiB (whole process: all peers loaded)")


if __name__ == "__main__":
    main()
