#!/usr/bin/env python3
"""Pillow's side of benches/preprocess.rs: transformers' PIL path on the same files, one image
at a time on one thread. resize_crop: make_strip_fixtures.hf_pixels (Image.resize BICUBIC, short
side to 224, long side int(224 * long / short), then the centre crop); preprocess: open + convert('RGB') + resize + crop
+ rescale and normalise to float32 CHW with numpy, as CLIPImageProcessorPil does.
Prints one JSON line per file. argv: [SECONDS per measurement, default 1]"""
import io
import json
import sys
import time

import numpy as np
from PIL import Image

# The same resize and crop that made the strips' reference pixels (transformers' PIL path).
from make_strip_fixtures import hf_pixels as resize_crop

FILES = [
    "tests/fixtures/reference/images/rgb_640x480.png",
    "tests/fixtures/reference/images/photo_500x375.jpg",
    "tests/fixtures/reference/strips/panorama_2400x40.png",
    "tests/fixtures/reference/strips/banner_36x1500.png",
    "tests/fixtures/reference/strips/strip_5000x2.png",
]
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def preprocess(data):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    arr = np.asarray(resize_crop(img), dtype=np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


def timed(budget, f):
    f()
    start, n = time.perf_counter(), 0
    while n < 5 or time.perf_counter() - start < budget:
        f()
        n += 1
    return (time.perf_counter() - start) * 1e3 / n


def main():
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    for f in FILES:
        data = open(f, "rb").read()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        row = {
            "impl": "pillow",
            "file": f,
            "size": list(img.size),
            "resize_crop_ms": round(timed(budget, lambda: resize_crop(img)), 4),
            "preprocess_ms": round(timed(budget, lambda: preprocess(data)), 4),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
