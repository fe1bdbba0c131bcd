#!/usr/bin/env python3
"""Render the small synthetic captioned image set used by `clipft demo`.

Run from the repository root (needs only Pillow and numpy):

    /work/venvs/ref/bin/python scripts/make_demo_data.py
    /work/venvs/ref/bin/python scripts/make_demo_data.py --contact-sheet /tmp/demo_sheet.png

Nothing is downloaded. Every image is a flat drawing of a garment made with PIL:

    5 categories  dress, t-shirt, trousers, skirt, hat
    6 colours     red, blue, green, yellow, black, white
    4 patterns    plain, striped, dotted, checked

= 120 combinations. Each image is 64x64 RGB PNG on a light-grey background, the garment
centred with a small random jitter of position, scale and rotation (+-10 degrees) and a
slight variation of its colour and background (no per-pixel noise, which would double the
file sizes). The pattern is drawn in a tint or shade of the garment colour (lighter for
red/blue/green/black, darker for yellow/white) so that the named colour stays dominant.

Output (default data/demo/, all paths in the CSVs relative to the CSV's folder, no header):

    images/*.png     840 images
    train.csv        480 rows  caption,image_path      (120 combinations x 4 renders)
    eval.csv         120 rows  caption,image_path      (1 new render per combination)
    index.csv        240 rows  image_path,label        (2 new renders per combination)
    query.csv        120 rows  caption,label           (1 caption per combination)
    captions_demo.txt  5 example captions, one per line
    README.md

label = "<colour> <pattern> <category>", e.g. "red striped dress", "white plain t-shirt".

Deterministic: every image has its own numpy Generator seeded from (SEED, split, combination,
render number), captions come from a seeded generator too, and PNGs are written with fixed
settings and no metadata, so re-running gives byte-identical files (with the same Pillow/zlib).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SEED = 20240611

CATEGORIES = ["dress", "t-shirt", "trousers", "skirt", "hat"]
COLOURS = {
    "red": (205, 32, 38),
    "blue": (36, 72, 196),
    "green": (34, 142, 56),
    "yellow": (242, 208, 34),
    "black": (26, 26, 30),
    "white": (248, 248, 246),
}
PATTERNS = ["plain", "striped", "dotted", "checked"]
LIGHT = {"yellow", "white"}  # pattern drawn darker than the garment for these

BACKGROUND = (196, 198, 202)  # light grey, so white garments stand out
SS = 256  # supersampled drawing canvas
OUT = 64  # final image size
SPLITS = {"train": 4, "eval": 1, "index": 2}  # renders per combination

# ---------------------------------------------------------------- shapes
# Outlines in unit coordinates, x and y in about [-1, 1] (y down), mapped to the SS canvas.


def _dress():
    return [[
        (-0.26, -0.96), (-0.12, -0.96), (-0.10, -0.72), (0.0, -0.62), (0.10, -0.72),
        (0.12, -0.96), (0.26, -0.96), (0.32, -0.62), (0.27, -0.26), (0.23, -0.16),
        (0.72, 0.90), (0.36, 0.95), (0.0, 0.96), (-0.36, 0.95), (-0.72, 0.90),
        (-0.23, -0.16), (-0.27, -0.26), (-0.32, -0.62),
    ]], []


def _tshirt():
    neck = [(-0.22 + 0.44 * t, -0.74 + 0.16 * math.sin(math.pi * t)) for t in np.linspace(0, 1, 9)]
    return [neck + [
        (0.46, -0.70), (0.92, -0.36), (0.74, -0.08), (0.50, -0.26),
        (0.50, 0.80), (-0.50, 0.80),
        (-0.50, -0.26), (-0.74, -0.08), (-0.92, -0.36), (-0.46, -0.70),
    ]], []


def _trousers():
    return [[
        (-0.44, -0.92), (0.44, -0.92), (0.50, 0.94), (0.10, 0.94), (0.0, -0.22),
        (-0.10, 0.94), (-0.50, 0.94),
    ]], []


def _skirt():
    return [[
        (-0.40, -0.58), (0.40, -0.58), (0.41, -0.44), (0.80, 0.52), (0.40, 0.58),
        (0.0, 0.60), (-0.40, 0.58), (-0.80, 0.52), (-0.41, -0.44),
    ]], []


def _hat():
    dy = 0.22
    top = [(0.30 * math.cos(a), -0.66 + dy + 0.10 * (1 - math.sin(a)))
           for a in np.linspace(0, math.pi, 9)]
    crown = [(0.40, -0.02 + dy)] + top + [(-0.40, -0.02 + dy)]
    brim = (-0.88, -0.18 + dy, 0.88, 0.20 + dy)  # ellipse bbox
    return [crown], [brim]


SHAPES = {"dress": _dress, "t-shirt": _tshirt, "trousers": _trousers, "skirt": _skirt, "hat": _hat}


def garment_mask(category: str) -> Image.Image:
    polys, ellipses = SHAPES[category]()
    m = Image.new("L", (SS, SS), 0)
    d = ImageDraw.Draw(m)
    s, c = 0.40 * SS, SS / 2

    def tr(x, y):
        return (c + s * x, c + s * y)

    for p in polys:
        d.polygon([tr(x, y) for x, y in p], fill=255)
    for x0, y0, x1, y1 in ellipses:
        d.ellipse([tr(x0, y0), tr(x1, y1)], fill=255)
    return m


# ---------------------------------------------------------------- patterns


def mix(a, b, t):
    return tuple(float(x) * (1 - t) + float(y) * t for x, y in zip(a, b))


def pattern_rgb(pattern: str, base, accent, rng: np.random.Generator) -> np.ndarray:
    """SS x SS x 3 float array of the garment fabric."""
    yy, xx = np.mgrid[0:SS, 0:SS].astype(np.float32)
    base = np.array(base, np.float32)
    accent = np.array(accent, np.float32)
    a = np.zeros((SS, SS), np.float32)  # accent weight
    if pattern == "striped":
        period = rng.uniform(22, 27)
        coord = yy if rng.random() < 0.5 else xx  # horizontal or vertical stripes
        phase = (coord + rng.uniform(0, period)) % period
        a = (phase < 0.40 * period).astype(np.float32)
    elif pattern == "dotted":
        sp = rng.uniform(24, 28)
        r = 0.27 * sp
        ox, oy = rng.uniform(0, sp, 2)
        row = np.floor((yy + oy) / sp)
        cy = (row + 0.5) * sp - oy
        shift = (row % 2) * sp / 2  # staggered rows
        cx = (np.floor((xx + ox + shift) / sp) + 0.5) * sp - ox - shift
        a = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.float32)
    elif pattern == "checked":
        sq = rng.uniform(20, 25)
        ox, oy = rng.uniform(0, 2 * sq, 2)
        bx = (np.floor((xx + ox) / sq) % 2).astype(np.float32)
        by = (np.floor((yy + oy) / sq) % 2).astype(np.float32)
        a = 0.5 * bx + 0.5 * by  # gingham: base, half-tone and full-accent squares
    elif pattern != "plain":
        raise ValueError(pattern)
    return base[None, None, :] * (1 - a[..., None]) + accent[None, None, :] * a[..., None]


# ---------------------------------------------------------------- rendering

_MASKS: dict[str, Image.Image] = {}


def render(category: str, colour: str, pattern: str, rng: np.random.Generator) -> Image.Image:
    # Slightly varied garment colour.
    bright = rng.uniform(0.93, 1.05)
    base = np.clip(np.array(COLOURS[colour], np.float32) * bright + rng.normal(0, 2.5, 3), 0, 255)
    if colour in LIGHT:
        accent = mix(base, (0, 0, 0), 0.62)
    else:
        accent = mix(base, (255, 255, 255), 0.72)
    outline = mix(base, (0, 0, 0), 0.6)

    if category not in _MASKS:
        _MASKS[category] = garment_mask(category)
    mask = _MASKS[category]
    fabric = pattern_rgb(pattern, base, accent, rng)
    m = np.asarray(mask, np.float32)[..., None] / 255.0
    rgb = fabric * m + np.array(outline, np.float32) * (1 - m)
    alpha = mask.filter(ImageFilter.MaxFilter(7))  # ~1 px dark outline at 64x64
    layer = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
    layer.putalpha(alpha)

    # Jitter: scale, then rotate about the centre and translate.
    scale = rng.uniform(0.86, 1.0)
    n = int(round(SS * scale))
    small = layer.resize((n, n), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (SS, SS), (0, 0, 0, 0))
    canvas.paste(small, ((SS - n) // 2, (SS - n) // 2))
    angle = rng.uniform(-10, 10)
    dx, dy = rng.uniform(-12, 12, 2)
    canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC,
                           center=(SS / 2, SS / 2), translate=(float(dx), float(dy)))

    bg_rgb = np.clip(np.array(BACKGROUND) + rng.normal(0, 4) + rng.normal(0, 2, 3), 0, 255)
    bg = Image.new("RGBA", (SS, SS), tuple(int(round(v)) for v in bg_rgb) + (255,))
    # No per-pixel noise: it would roughly double the PNG sizes (the demo set must stay
    # under 2 MB); the colour, background and geometry jitter already make renders differ.
    return Image.alpha_composite(bg, canvas).convert("RGB").reduce(SS // OUT)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)  # no pnginfo/time chunks are written
    return buf.getvalue()


# ---------------------------------------------------------------- captions

NOUNS = {
    "dress": ["dress"],
    "t-shirt": ["t-shirt", "t-shirt", "tee shirt"],
    "trousers": ["trousers", "trousers", "pants"],
    "skirt": ["skirt"],
    "hat": ["hat"],
}
PLURAL = {"trousers"}
PAT_ADJ = {
    "plain": ["plain", "plain", "solid"],
    "striped": ["striped"],
    "dotted": ["dotted", "polka dot", "spotted"],
    "checked": ["checked", "checked", "checkered"],
}
PAT_PHRASE = {
    "plain": ["with no pattern", "in a plain colour"],
    "striped": ["with stripes", "with a striped pattern"],
    "dotted": ["with dots", "with polka dots", "with a dotted pattern"],
    "checked": ["with a checked pattern", "with checks"],
}
# {a}: "a" / "a pair of"; {c}: colour; {adj}/{ph}: pattern; {n}: noun. No commas anywhere,
# so no CSV quoting is needed.
TEMPLATES = [
    "{a} {c} {adj} {n}",
    "{c} {n} {ph}",
    "{a} {c} {n} {ph}",
    "{adj} {c} {n}",
    "{c} {adj} {n}",
    "a picture of {a} {c} {adj} {n}",
    "a drawing of {a} {c} {n} {ph}",
    "an image of {a} {adj} {n} in {c}",
    "{a} {adj} {n} in {c}",
]


def caption(category: str, colour: str, pattern: str, rng: np.random.Generator,
            template: str | None = None) -> str:
    t = template if template is not None else TEMPLATES[rng.integers(len(TEMPLATES))]
    noun = NOUNS[category][rng.integers(len(NOUNS[category]))]
    adj = PAT_ADJ[pattern][rng.integers(len(PAT_ADJ[pattern]))]
    ph = PAT_PHRASE[pattern][rng.integers(len(PAT_PHRASE[pattern]))]
    art = "a pair of" if category in PLURAL else "a"
    s = t.format(a=art, c=colour, adj=adj, ph=ph, n=noun)
    return " ".join(s.split())


def label(category: str, colour: str, pattern: str) -> str:
    return f"{colour} {pattern} {category}"


DEMO_CAPTIONS = [
    "a red striped dress",
    "a blue dotted hat",
    "a plain white t-shirt",
    "a green skirt with a checked pattern",
    "yellow striped trousers",
]

# ---------------------------------------------------------------- README

README = """# clipft demo data

Synthetic captioned images for the offline demo (`clipft demo`): a tiny random-weight CLIP is
fine-tuned on `train.csv` for a few minutes on CPU, and text-to-image retrieval over
`index.csv` is shown before and after. Generated by `scripts/make_demo_data.py`
(deterministic; re-running it reproduces these files byte for byte with the same Pillow).

## What the images are

Flat drawings of garments, rendered with Pillow, not photographs:

- 5 categories: dress, t-shirt, trousers, skirt, hat
- 6 colours: red, blue, green, yellow, black, white
- 4 patterns: plain, striped, dotted, checked (gingham-style)

= 120 combinations. Each image is a 64x64 RGB PNG on a light-grey background with the
garment centred, jittered slightly in position (about +-3 px), scale (0.86-1.0) and rotation
(+-10 degrees), with a small variation of garment colour (brightness +-6 %, each channel
about +-5) and background, so renders of the same combination differ (no pixel noise).
Stripes, dots and checks are drawn in a tint of the garment colour (lighter for
red/blue/green/black, darker for yellow/white), so the named colour is always the dominant
one. Every caption names the image's true colour, pattern and category (synonyms: "pants"
for trousers, "tee shirt" for t-shirt, "solid" for plain, "polka dot"/"spotted" for dotted,
"checkered" for checked).

## Files

All paths are relative to this folder. The CSVs have no header row; no field contains a
comma, so nothing is quoted.

| file | rows | columns |
|---|---|---|
| `train.csv` | {n_train} | `caption,image_path` (120 combinations x 4 renders, random caption template each) |
| `eval.csv` | {n_eval} | `caption,image_path` (1 further render per combination; validation loss) |
| `index.csv` | {n_index} | `image_path,label` (2 further renders per combination; the retrieval gallery) |
| `query.csv` | {n_query} | `caption,label` (1 caption per combination; the retrieval queries) |
| `captions_demo.txt` | {n_demo} | one example caption per line, whose top matches the demo prints |
| `images/` | {n_images} | `<split>_<category>_<colour>_<pattern>_<k>.png` |

`label` is `<colour> <pattern> <category>`, e.g. `red striped dress`, `white plain t-shirt`;
a retrieved image is relevant to a query when their labels are equal (2 relevant images per
query in the index). No image appears in more than one split.

Examples:

```
train.csv:  {ex_train}
index.csv:  {ex_index}
query.csv:  {ex_query}
```

Total size: {size_kb} KiB ({n_files} files).

## License

Generated data, no third-party content. Dedicated to the public domain (CC0 1.0).
"""


# ---------------------------------------------------------------- main


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=root / "data" / "demo")
    ap.add_argument("--contact-sheet", type=Path, default=None,
                    help="also write a PNG grid of sample images (for checking by eye)")
    args = ap.parse_args()

    out: Path = args.out
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()

    combos = [(cat, col, pat) for cat in CATEGORIES for col in COLOURS for pat in PATTERNS]
    rows = {"train": [], "eval": [], "index": []}
    sheet_imgs = []
    for split_id, (split, reps) in enumerate(SPLITS.items()):
        for ci, (cat, col, pat) in enumerate(combos):
            for k in range(reps):
                rng = np.random.default_rng([SEED, split_id, ci, k])
                img = render(cat, col, pat, rng)
                name = f"images/{split}_{cat}_{col}_{pat}_{k}.png"
                (out / name).write_bytes(png_bytes(img))
                if split == "index":
                    rows[split].append([name, label(cat, col, pat)])
                else:
                    rows[split].append([caption(cat, col, pat, rng), name])
                if split == "train" and k == 0:
                    sheet_imgs.append(img)

    qrng = np.random.default_rng([SEED, 99])
    query = []
    for ci, (cat, col, pat) in enumerate(combos):
        query.append([caption(cat, col, pat, qrng, TEMPLATES[ci % len(TEMPLATES)]),
                      label(cat, col, pat)])

    write_csv(out / "train.csv", rows["train"])
    write_csv(out / "eval.csv", rows["eval"])
    write_csv(out / "index.csv", rows["index"])
    write_csv(out / "query.csv", query)
    (out / "captions_demo.txt").write_text("\n".join(DEMO_CAPTIONS) + "\n", encoding="utf-8")

    # README last, with the size of everything else (+ an estimate of its own size).
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "README.md"]
    size = sum(p.stat().st_size for p in files)
    n_images = len(list(img_dir.glob("*.png")))
    readme = README.format(
        n_train=len(rows["train"]), n_eval=len(rows["eval"]), n_index=len(rows["index"]),
        n_query=len(query), n_demo=len(DEMO_CAPTIONS), n_images=n_images,
        ex_train=",".join(rows["train"][1]), ex_index=",".join(rows["index"][0]),
        ex_query=",".join(query[1]),
        size_kb=(size + 3000) // 1024, n_files=len(files) + 1,
    )
    (out / "README.md").write_text(readme, encoding="utf-8")
    size += (out / "README.md").stat().st_size
    print(f"wrote {n_images} images, train {len(rows['train'])}, eval {len(rows['eval'])}, "
          f"index {len(rows['index'])}, query {len(query)} -> {out} ({size / 1024:.0f} KiB)")

    if args.contact_sheet is not None:
        # Train render 0 of all 120 combinations, 2x upscaled, 12 per row (two rows per
        # category, each row 3 colours x 4 patterns).
        z = 2
        cols = 12
        rows_n = (len(sheet_imgs) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * (OUT * z + 2), rows_n * (OUT * z + 2)), "white")
        for i, im in enumerate(sheet_imgs):
            r, c = divmod(i, cols)
            sheet.paste(im.resize((OUT * z, OUT * z), Image.Resampling.NEAREST),
                        (c * (OUT * z + 2), r * (OUT * z + 2)))
        sheet.save(args.contact_sheet)
        print(f"contact sheet: {args.contact_sheet}")


if __name__ == "__main__":
    main()
