#!/usr/bin/env python3
"""Make the reference pixels for images of extreme aspect ratios (tests/parity.rs, strips).

Run from the repository root with Pillow and numpy installed (nothing else):

    python3 scripts/make_strip_fixtures.py

For each image it writes `<name>.png` and `<name>.pixels.png` into
tests/fixtures/reference/strips/: the 224x224 RGB pixels that transformers' PIL-backed
CLIPImageProcessor feeds the model before rescaling and normalising (what NOTES.md in the
reference folder describes): short side resized to 224 with the long side `int(224 * long /
short)`, PIL BICUBIC without reducing_gap, then the centre crop with floor offsets. clipft
computes only the cropped window of that resize; these files check it gives the same pixels.
"""

import os

import numpy as np
from PIL import Image

OUT = os.path.join("tests", "fixtures", "reference", "strips")
SIZE = 224

# name -> (width, height): an ordinary panorama, a tall banner and a near-degenerate strip.
SHAPES = {
    "panorama_2400x40": (2400, 40),
    "banner_36x1500": (36, 1500),
    "strip_5000x2": (5000, 2),
}


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    phase = np.array([0.0, 2.1, 4.2])[None, None, :]
    smooth = 127.5 + 100.0 * np.sin(40.0 * x + 3.0 * y + phase)
    grain = rng.integers(-27, 28, size=(height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), "RGB")


def hf_pixels(img):
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(SIZE * long / short)
    size = (SIZE, new_long) if w <= h else (new_long, SIZE)
    resized = img.resize(size, resample=Image.BICUBIC)
    arr = np.asarray(resized)
    top = (arr.shape[0] - SIZE) // 2
    left = (arr.shape[1] - SIZE) // 2
    return Image.fromarray(arr[top : top + SIZE, left : left + SIZE], "RGB")


def main():
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (w, h)) in enumerate(sorted(SHAPES.items())):
        img = image(w, h, seed)
        img.save(os.path.join(OUT, f"{name}.png"), optimize=True)
        hf_pixels(img).save(os.path.join(OUT, f"{name}.pixels.png"), optimize=True)
        print(name, w, h)


if __name__ == "__main__":
    main()
