#!/usr/bin/env python3
"""Make the committed test fixtures for clipft (CLIP on candle).

Run from the repository root:

    /work/venvs/ref/bin/python scripts/make_fixtures.py
    /work/venvs/ref/bin/python scripts/make_fixtures.py --full-size target/vit-b-32   # not committed

Nothing is downloaded: the model has random weights and the tokenizer is built from
the BPE file that ships inside the open-clip-torch package (OpenAI's
bpe_simple_vocab_16e6.txt.gz, the real 49,408-token CLIP vocabulary).

What it writes (default mode), all deterministic (fixed seeds):

tests/fixtures/clip-tiny/   a tiny random-weight CLIP in Hugging Face layout
    config.json                  CLIPConfig (model_type "clip"): text 32 wide / 2 layers / 4 heads,
                                 vision 64 wide / 2 layers / 4 heads, patch 32, image 224,
                                 projection 32, quick_gelu, text eos_token_id 2 (the legacy value of
                                 openai/clip-vit-base-patch32, which makes HF pool at argmax(ids)).
    model.safetensors            float32 weights. Every parameter is re-initialised with random
                                 values so that a mis-loaded or ignored tensor changes the outputs:
                                 LayerNorm weights 1 + 0.1*randn, all biases 0.02*randn, Linear and
                                 patch-conv weights randn/sqrt(fan_in), text token/position
                                 embeddings 0.02*randn, vision class/position embeddings 0.5*randn.
                                 logit_scale stays 2.6592.
    tokenizer.json               built with the `tokenizers` library exactly like HF's CLIP
                                 tokenizer.json (NFC + whitespace Replace + Lowercase; Split regex +
                                 ByteLevel; BPE with "</w>"; RobertaProcessing BOS 49406 / EOS 49407).
    tokenizer_config.json, special_tokens_map.json   so CLIPTokenizerFast.from_pretrained(dir) works.
    preprocessor_config.json     as openai/clip-vit-base-patch32 has it.

tests/fixtures/reference/   reference outputs of transformers for the Rust tests
    texts.json       [{"text", "ids", "embedding"}]: ids from CLIPTokenizerFast (truncation to 77, no
                     padding); embedding = CLIPModel.get_text_features for that text alone.
    text_batch.json  {"texts", "ids_padded", "embeddings"}: all texts as ONE batch padded to the
                     longest with 49407 and no attention_mask.
    images/*         deterministic synthetic test images in many formats/modes, plus for each one
                     <name>.pixels.png: the 224x224 RGB uint8 pixels after HF resize + centre crop
                     (CLIPImageProcessorPil with do_rescale=False, do_normalize=False).
    images.json      [{"file", "mode", "width", "height", "pixels", "embedding", "processor_class",
                       "pil_max_abs_diff", "composited_on_white"}]: embedding = CLIPModel.get_image_features(pixel_values) with
                     pixel_values from the PIL-backed HF processor.
    NOTES.md         versions used, processor class, pure-PIL vs HF pixel differences, tokenizer check.

The script also checks (and fails loudly otherwise) that the HF tokenizer ids equal open_clip's
SimpleTokenizer ids on every reference text (truncated to 77 with EOS last), and that the
`tokenizers` library loading tokenizer.json directly (as the Rust `tokenizers` crate does) gives
the same ids.

--full-size DIR writes a random-weight model with the exact openai/clip-vit-base-patch32
architecture (151,277,313 parameters) plus DIR/reference/{texts,images,text_batch}.json in the same
formats, using the committed images. It is for benchmarks and large-model checks, not committed.
"""

import argparse
import gzip
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TINY_DIR = FIXTURES / "clip-tiny"
REF_DIR = FIXTURES / "reference"

BOS_ID = 49406
EOS_ID = 49407
CONTEXT_LENGTH = 77

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VIT_B_32_PARAMS = 151_277_313

PREPROCESSOR_CONFIG = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor",
    "image_std": CLIP_STD,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_PROJ = 32
FULL_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
FULL_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
FULL_PROJ = 512

# Image name -> (generator kind, width, height, seed). See make_images().
IMAGE_SPECS = [
    ("rgb_640x480.png", 640, 480),
    ("rgb_224x224.png", 224, 224),
    ("rgb_300x200.png", 300, 200),
    ("tall_64x480.png", 64, 480),
    ("tiny_30x20.png", 30, 20),
    ("odd_225x333.png", 225, 333),
    ("grey_200x150.png", 200, 150),
    ("rgba_256x300.png", 256, 300),
    ("palette_120x90.png", 120, 90),
    ("photo_500x375.jpg", 500, 375),
    ("photo_grey_260x180.jpg", 260, 180),
    ("anim_100x80.gif", 100, 80),
    ("rgb_150x150.webp", 150, 150),
    ("rgb_90x70.bmp", 90, 70),
]


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------

_WORDS = (
    "a photo of the red blue green small large cat dog man woman child dress shirt hat shoe "
    "street city house tree river mountain sky under over with and in on near striped wooden "
    "old new bright dark running sitting standing beautiful two three many"
).split()


def reference_texts(tokenize_len):
    """The reference captions. `tokenize_len(text)` returns the HF id count (with BOS/EOS,
    untruncated); it is used to build one text just over the 77-token limit."""
    texts = [
        "a red striped dress",
        "a photo of a cat",
        "  A   Photo\tof  a DOG \n",
        "it's a man's hat!",
        "3 blue shirts, size 42",
        "café crème",
        "cafe\u0301 cre\u0300me (NFD accents)",
        "一只猫的照片",
        "🐶 dog",
        "Straße in München, weiß",
        "фотография кошки",
        "",
        "x",
    ]
    # ~80 tokens: add words until the untruncated length (with BOS/EOS) reaches 80.
    words = []
    i = 0
    while True:
        words.append(_WORDS[(7 * i) % len(_WORDS)])
        i += 1
        t = " ".join(words)
        if tokenize_len(t) >= 80:
            break
    texts.append(t)
    rng = random.Random(1234)
    texts.append(" ".join(rng.choice(_WORDS) for _ in range(300)))
    return texts


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_tokenizer_json(out_dir: Path):
    """Build tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) from open_clip's BPE
    file, the way HF's CLIP tokenizer.json is laid out. Without open_clip (a GPU machine's image
    may lack it), copy the committed fixture's files, which this function built."""
    try:
        import open_clip
    except ImportError:
        committed = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "clip-tiny"
        if out_dir.resolve() == committed.resolve():
            raise
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            shutil.copyfile(committed / name, out_dir / name)
        print(f"open_clip missing: copied the tokenizer of {committed}", file=sys.stderr)
        return
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    assert len(vocab) == 49408, len(vocab)
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # positional: sep first, then cls
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", EOS_ID), ("<|startoftext|>", BOS_ID), False, False)
    tok.add_special_tokens(
        [
            AddedToken("<|startoftext|>", single_word=False, lstrip=False, rstrip=False, normalized=True, special=True),
            AddedToken("<|endoftext|>", single_word=False, lstrip=False, rstrip=False, normalized=True, special=True),
        ]
    )
    assert tok.token_to_id("<|startoftext|>") == BOS_ID and tok.token_to_id("<|endoftext|>") == EOS_ID
    assert tok.get_vocab_size() == 49408, tok.get_vocab_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)

    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    cfg = dict(specials)
    cfg.update(
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CONTEXT_LENGTH,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
        }
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check_tokenizer(model_dir: Path, texts):
    """Fail loudly unless HF CLIPTokenizerFast ids == open_clip SimpleTokenizer ids == raw
    `tokenizers` ids (all truncated to 77 with EOS last). Returns a short summary string. Without
    open_clip (the --full-size model on a machine without it, whose tokenizer is the committed
    fixture's, checked against open_clip when it was made) the other three must agree."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizerFast

    try:
        from open_clip.tokenizer import SimpleTokenizer

        oc = SimpleTokenizer()
    except ImportError:
        oc = None
    hf_file = CLIPTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    hf_dir = CLIPTokenizerFast.from_pretrained(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.enable_truncation(max_length=CONTEXT_LENGTH)
    for t in texts:
        a = hf_file(t, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
        ref = a
        if oc is not None:
            ref = [oc.sot_token_id] + oc.encode(t) + [oc.eot_token_id]
            if len(ref) > CONTEXT_LENGTH:
                ref = ref[:CONTEXT_LENGTH]
                ref[-1] = oc.eot_token_id
        b = hf_dir(t, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
        c = raw.encode(t).ids
        if not (ref == a == b == c):
            raise SystemExit(
                f"TOKENIZER MISMATCH for {t!r}:\n open_clip {ref}\n hf(file)  {a}\n hf(dir)   {b}\n tokenizers {c}"
            )
    also = " and open_clip SimpleTokenizer" if oc is not None else " (open_clip not installed)"
    return (
        f"HF CLIPTokenizerFast (tokenizer_file= and from_pretrained), raw `tokenizers` Tokenizer.from_file "
        f"(truncation 77){also} give identical ids on all {len(texts)} reference texts."
    )


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_config(text, vision, proj):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            max_position_embeddings=CONTEXT_LENGTH,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=BOS_ID,
            eos_token_id=2,
            pad_token_id=1,
            projection_dim=proj,
            **text,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=32,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=proj,
            **vision,
        ),
        projection_dim=proj,
        logit_scale_init_value=2.6592,
    )


def _is_layer_norm(name):
    return any(k in name for k in ("layer_norm", "layernorm", "layrnorm"))


def make_model(config, seed):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(config).float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.6592)
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if _is_layer_norm(name):
                p.copy_(1.0 + 0.1 * noise if name.endswith(".weight") else 0.02 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.02 * noise)
            elif p.dim() >= 2 and "embedding" not in name:
                # Linear / patch-conv weights: std 1/sqrt(fan_in) (0.018..0.044 at ViT-B/32 width, i.e.
                # HF-like there), so the signal survives the tiny model too (with a flat 0.02 all
                # tiny image embeddings had cosine > 0.999 with each other).
                fan_in = p[0].numel()
                p.copy_(noise / fan_in**0.5)
            elif name.startswith("vision_model.embeddings."):
                # class_embedding and vision position_embedding: comparable to the patch embeddings
                p.copy_(0.5 * noise)
            else:  # text token / position embeddings
                p.copy_(0.02 * noise)
    model.eval()
    return model


def save_model_dir(out_dir: Path, text, vision, proj, seed):
    config = make_config(text, vision, proj)
    model = make_model(config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    build_tokenizer_json(out_dir)
    # reload from disk so the reference outputs come from exactly what was saved
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(out_dir), attn_implementation="eager").float().eval()
    return model


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _base_rgb(w, h, seed):
    """Smooth gradients + a sinusoidal texture + a little noise + shapes, as uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    xn, yn = x / max(w - 1, 1), y / max(h - 1, 1)
    r = 255 * xn
    g = 255 * yn
    b = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * (xn * 1.5 + yn * 0.7)))
    img = np.stack([r, g, b], axis=-1)
    # fine texture: resampling filters must handle it
    period = rng.uniform(5.0, 9.0)
    img += 25 * np.sin(2 * np.pi * (x + 0.5 * y) / period)[..., None]
    img += rng.normal(0, 2.0, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    im = Image.fromarray(img, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, w, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, h, size=2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.ellipse([x0, y0, x1, y1], fill=color)
        else:
            d.rectangle([x0, y0, x1, y1], fill=color)
    for _ in range(3):
        pts = rng.integers(0, [w, h], size=(2, 2)).tolist()
        d.line([tuple(pts[0]), tuple(pts[1])], fill=tuple(int(c) for c in rng.integers(0, 256, size=3)), width=max(1, w // 100))
    return im


def make_images(img_dir: Path):
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, w, h) in enumerate(IMAGE_SPECS):
        seed = 100 + i
        path = img_dir / name
        base = _base_rgb(w, h, seed)
        if name.startswith("grey_"):
            base.convert("L").save(path)
        elif name.startswith("rgba_"):
            a = np.fromfunction(lambda yy, xx: (255 * (0.15 + 0.85 * (xx / (w - 1)) * (yy / (h - 1)))), (h, w))
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
            a[: h // 6, : w // 6] = 0  # a fully transparent corner
            im = base.convert("RGBA")
            im.putalpha(Image.fromarray(a, "L"))
            im.save(path)
        elif name.startswith("palette_"):
            base.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path)
        elif name == "photo_500x375.jpg":
            base.save(path, quality=90)
        elif name == "photo_grey_260x180.jpg":
            base.convert("L").save(path, quality=90)
        elif name.endswith(".gif"):
            f0 = base.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            f1 = _base_rgb(w, h, seed + 1000).quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            f0.save(path, save_all=True, append_images=[f1], duration=100, loop=0)
        elif name.endswith(".webp"):
            base.save(path, lossless=True, quality=100, method=6)
        else:  # png, bmp
            base.save(path)
    # sanity: GIF first frame must not carry transparency (else HF composites it onto white)
    with Image.open(img_dir / "anim_100x80.gif") as g:
        assert getattr(g, "n_frames", 1) == 2, g.n_frames
        assert "transparency" not in g.info, g.info


def pil_reference_pixels(im: Image.Image, composite_alpha=False):
    """Pure-PIL pipeline: convert RGB, resize short side to 224 (long side floored) with BICUBIC
    (reducing_gap=None), centre crop with floor offsets. Returns HxWx3 uint8."""
    if composite_alpha and ("A" in im.getbands() or im.info.get("transparency") is not None):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB")
    else:
        im = im.convert("RGB")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(224 * long / short)
    nw, nh = (224, new_long) if w <= h else (new_long, 224)
    im = im.resize((nw, nh), resample=Image.BICUBIC, reducing_gap=None)
    top, left = (nh - 224) // 2, (nw - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)))


# --------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------


def write_text_reference(model, model_dir: Path, ref_dir: Path):
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(str(model_dir))
    texts = reference_texts(lambda t: len(tok(t)["input_ids"]))
    summary = check_tokenizer(model_dir, texts)
    print(summary)
    entries, all_ids = [], []
    with torch.inference_mode():
        for t in texts:
            ids = tok(t, truncation=True, max_length=CONTEXT_LENGTH)["input_ids"]
            assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) <= CONTEXT_LENGTH
            emb = _features(model.get_text_features(input_ids=torch.tensor([ids])))[0]
            entries.append({"text": t, "ids": ids, "embedding": emb.float().tolist()})
            all_ids.append(ids)
        longest = max(len(i) for i in all_ids)
        padded = [i + [EOS_ID] * (longest - len(i)) for i in all_ids]
        batch = _features(model.get_text_features(input_ids=torch.tensor(padded))).float()
    # padded batch must agree with the single runs (causal mask + first-EOS pooling)
    single = torch.tensor([e["embedding"] for e in entries])
    diff = (batch - single).abs().max().item()
    print(f"text: padded batch vs single max abs diff {diff:.3g}")
    assert diff < 1e-4, diff
    ref_dir.mkdir(parents=True, exist_ok=True)
    (ref_dir / "texts.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n")
    (ref_dir / "text_batch.json").write_text(
        json.dumps({"texts": texts, "ids_padded": padded, "embeddings": batch.tolist()}, ensure_ascii=False) + "\n"
    )
    return summary, texts


def write_image_reference(model, model_dir: Path, src_img_dir: Path, ref_dir: Path):
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPImageProcessorPil

    auto_cls = type(AutoImageProcessor.from_pretrained(str(model_dir))).__name__
    proc = CLIPImageProcessorPil.from_pretrained(str(model_dir))
    proc_tv = CLIPImageProcessor.from_pretrained(str(model_dir))
    proc_cls = type(proc).__name__
    out_img_dir = ref_dir / "images"
    out_img_dir.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for name, _, _ in IMAGE_SPECS:
        src = src_img_dir / name
        if src.resolve() != (out_img_dir / name).resolve():
            shutil.copyfile(src, out_img_dir / name)
        with Image.open(src) as im:
            im.load()
            mode, (w, h) = im.mode, im.size
            has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
            # (a) resized + cropped uint8 levels
            raw = proc(images=im, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
            assert raw.shape == (3, 224, 224), raw.shape
            assert np.all(raw == np.round(raw)) and raw.min() >= 0 and raw.max() <= 255
            hf_px = raw.transpose(1, 2, 0).astype(np.uint8)
            pix_name = name.rsplit(".", 1)[0] + ".pixels.png"
            Image.fromarray(hf_px, "RGB").save(out_img_dir / pix_name, optimize=True)
            # pure PIL comparisons
            pil_px = pil_reference_pixels(im)
            pil_cmp = pil_reference_pixels(im, composite_alpha=True)
            d_pil = int(np.abs(pil_px.astype(int) - hf_px.astype(int)).max())
            d_cmp = int(np.abs(pil_cmp.astype(int) - hf_px.astype(int)).max())
            # torchvision-backed HF processor, for the notes only
            tv = proc_tv(images=im, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"][0]
            tv = tv.numpy().transpose(1, 2, 0).astype(np.float64)
            d_tv = float(np.abs(tv - hf_px).max())
            m_tv = float(np.abs(tv - hf_px).mean())
            # (b) normal preprocessing + image features
            pv = proc(images=im, return_tensors="pt")["pixel_values"]
            # Rust will normalise the stored uint8 pixels itself; check that reproduces pv
            mine = (torch.from_numpy(hf_px).permute(2, 0, 1).float() / 255.0 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
            d_norm = (mine - pv[0]).abs().max().item()
            assert d_norm < 1e-5, d_norm
            pv_tv = proc_tv(images=im, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            emb = _features(model.get_image_features(pixel_values=pv))[0].float()
            emb_tv = _features(model.get_image_features(pixel_values=pv_tv))[0].float()
        d_emb = (emb - emb_tv).abs().max().item()
        entries.append(
            {
                "file": name,
                "mode": mode,
                "width": w,
                "height": h,
                "pixels": pix_name,
                "embedding": emb.tolist(),
                "processor_class": proc_cls,
                "pil_max_abs_diff": d_pil,
                "composited_on_white": has_alpha,
            }
        )
        rows.append((name, mode, w, h, d_pil, d_cmp, d_tv, m_tv, d_emb))
        print(f"image {name:24s} mode {mode:4s} PIL(convert RGB) vs HF max|d| {d_pil:3d}  "
              f"PIL(alpha on white) {d_cmp:3d}  torchvision-HF vs PIL-HF max {d_tv:.0f} mean {m_tv:.3f} emb {d_emb:.2g}")
    (ref_dir / "images.json").write_text(json.dumps(entries, indent=1) + "\n")
    return proc_cls, auto_cls, rows


def versions():
    import open_clip
    import PIL
    import tokenizers
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "pillow": PIL.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
    }


def write_notes(ref_dir, tok_summary, proc_cls, auto_cls, rows, n_params):
    v = versions()
    lines = [
        "# Reference fixtures: notes",
        "",
        "Generated by `scripts/make_fixtures.py` (deterministic; rerun it to regenerate). Do not edit by hand.",
        "",
        "## Versions",
        "",
    ]
    lines += [f"- {k} {val}" for k, val in v.items()]
    lines += [
        "",
        "## Model",
        "",
        f"`tests/fixtures/clip-tiny`: random-weight CLIP, {n_params:,} parameters, float32. Text eos_token_id = 2, so HF",
        "pools the text tower at `argmax(input_ids)` (the first 49407). Embeddings are the projected, *unnormalised*",
        "features (`get_text_features` / `get_image_features`, `.pooler_output` in transformers 5), computed with",
        "`attn_implementation=\"eager\"`.",
        "",
        "## Tokenizer",
        "",
        tok_summary,
        "`ids` in texts.json: `CLIPTokenizerFast.from_pretrained(clip-tiny)(text, truncation=True, max_length=77)`, no",
        "padding. `text_batch.json`: the same ids padded to the longest with 49407, run as one batch without",
        "attention_mask; it matches the single runs (causal mask + first-EOS pooling).",
        "",
        "The reference texts avoid what differs between HF and OpenAI/open_clip on purpose: open_clip also runs",
        "`ftfy.fix_text` and `html.unescape` (e.g. `&amp;`, curly quotes, mojibake), which the HF tokenizer.json does not.",
        "",
        "## Images",
        "",
        f"Processor class used: `{proc_cls}` (PIL backend, `CLIPImageProcessorPil.from_pretrained`). For the same folder",
        f"`AutoImageProcessor.from_pretrained` picks `{auto_cls}` (`CLIPImageProcessor` is the torchvision backend in",
        "transformers 5); it is not used for the fixtures.",
        "",
        "`<name>.pixels.png` = HF PIL-backend output with do_rescale=False, do_normalize=False (convert RGB, resize",
        "short side to 224 with long side `int(224*long/short)`, PIL BICUBIC, reducing_gap None, centre crop with floor",
        "offsets). `(pixels/255 - mean)/std` in float32 reproduces HF's pixel_values to < 1e-5.",
        "",
        "**Alpha:** transformers 5 `convert_to_rgb` composites transparent images onto a WHITE background",
        "(`Image.alpha_composite` on white, then RGB); it does not simply drop alpha like `Image.convert(\"RGB\")`.",
        "This applies to RGBA/LA images and to P/L images with a `transparency` entry (`composited_on_white` in",
        "images.json). Only rgba_256x300.png has alpha; the committed palette and GIF images have no transparency.",
        "`pil_max_abs_diff` in images.json is against the plain `convert(\"RGB\")` pipeline, hence 255 for the RGBA image.",
        "",
        "Pure-PIL pipeline vs HF pixels (max abs difference in uint8 levels); last three columns: the",
        "torchvision-backed `CLIPImageProcessor` against the PIL-backed one (not used, for information: pixel max and",
        "mean abs difference, and the max abs difference it makes to this model's image embedding, i.e. how much a",
        "few-level resampling difference moves the embedding):",
        "",
        "| file | mode | size | PIL convert(\"RGB\") | PIL alpha on white | torchvision max | torchvision mean | embedding max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, w, h, d_pil, d_cmp, d_tv, m_tv, d_emb in rows:
        lines.append(f"| {name} | {mode} | {w}x{h} | {d_pil} | {d_cmp} | {d_tv:.0f} | {m_tv:.3f} | {d_emb:.2g} |")
    lines += [
        "",
        "Decoding: JPEG pixels come from PIL's libjpeg decoder; another decoder (e.g. Rust `image`/zune-jpeg) may differ",
        "by a level or two before resizing.",
        "",
    ]
    (ref_dir / "NOTES.md").write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", metavar="DIR", help="write a full-size random ViT-B/32 (+DIR/reference) instead")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    if args.full_size:
        out = Path(args.full_size).resolve()
        src_imgs = REF_DIR / "images"
        if not all((src_imgs / n).exists() for n, _, _ in IMAGE_SPECS):
            raise SystemExit(f"committed images missing under {src_imgs}; run without --full-size first")
        model = save_model_dir(out, FULL_TEXT, FULL_VISION, FULL_PROJ, seed=0)
        n = sum(p.numel() for p in model.parameters())
        print(f"full-size parameters: {n:,}")
        assert n == VIT_B_32_PARAMS, n
        ref = out / "reference"
        write_text_reference(model, out, ref)
        write_image_reference(model, out, src_imgs, ref)
        print(f"wrote {out}")
        return

    for d in (TINY_DIR, REF_DIR):
        if d.exists():
            shutil.rmtree(d)
    model = save_model_dir(TINY_DIR, TINY_TEXT, TINY_VISION, TINY_PROJ, seed=0)
    n = sum(p.numel() for p in model.parameters())
    print(f"clip-tiny parameters: {n:,}")
    make_images(REF_DIR / "images")
    tok_summary, _ = write_text_reference(model, TINY_DIR, REF_DIR)
    proc_cls, auto_cls, rows = write_image_reference(model, TINY_DIR, REF_DIR / "images", REF_DIR)
    write_notes(REF_DIR, tok_summary, proc_cls, auto_cls, rows, n)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"tests/fixtures total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
