#!/usr/bin/env python3
"""Embeddings of `clipft encode` on a device against the PyTorch references that
scripts/make_fixtures.py wrote into MODEL/reference (float32, CPU): prints the lowest cosine
similarity per tower as one JSON line. Used by scripts/gpu-check.sh.

    python3 scripts/gpu_parity.py --bin target/cuda/release/clipft --model /tmp/vit-b-32 \
        --images tests/fixtures/reference/images --device cuda --dtype f32
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def cosine(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def encode(binary, model, device, dtype, flag, items):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.jsonl"
        cmd = [binary, "encode", "--model", model, "--device", device, "--dtype", dtype,
               "--output", str(out)]
        for it in items:
            cmd += [flag, it]
        subprocess.run(cmd, check=True)
        return [json.loads(line)["embedding"] for line in out.read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="the folder the reference image files are in")
    ap.add_argument("--reference", help="the folder of texts.json and images.json (default MODEL/reference)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32")
    a = ap.parse_args()
    ref = Path(a.reference or Path(a.model) / "reference")
    texts = json.loads((ref / "texts.json").read_text())
    images = json.loads((ref / "images.json").read_text())
    got_t = encode(a.bin, a.model, a.device, a.dtype, "--text", [t["text"] for t in texts])
    # JPEG decoders differ by a level or two (see the reference NOTES): those files are left out.
    images = [i for i in images if not i["file"].lower().endswith((".jpg", ".jpeg"))]
    got_i = encode(a.bin, a.model, a.device, a.dtype, "--image",
                   [str(Path(a.images) / i["file"]) for i in images])
    for i, g in zip(images, got_i):
        print(f"{i['file']}: cosine {cosine(i['embedding'], g):.7f}", file=sys.stderr)
    # The same binary on the CPU: isolates the device from reference differences (another
    # transformers version composites transparent images differently, for one).
    cpu_t = encode(a.bin, a.model, "cpu", "f32", "--text", [t["text"] for t in texts])
    cpu_i = encode(a.bin, a.model, "cpu", "f32", "--image", [str(Path(a.images) / i["file"]) for i in images])
    print(json.dumps({
        "device_vs_cpu_text_min_cosine": min(cosine(c, g) for c, g in zip(cpu_t, got_t)),
        "device_vs_cpu_image_min_cosine": min(cosine(c, g) for c, g in zip(cpu_i, got_i)),
        "device": a.device, "dtype": a.dtype,
        "texts": len(texts), "text_min_cosine": min(cosine(t["embedding"], g) for t, g in zip(texts, got_t)),
        "images": len(images), "image_min_cosine": min(cosine(i["embedding"], g) for i, g in zip(images, got_i)),
    }))


if __name__ == "__main__":
    main()
