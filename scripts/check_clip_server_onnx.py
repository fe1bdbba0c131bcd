#!/usr/bin/env python3
"""clip-as-service's own ONNX model class on `clipft export`'s folder: the recipe of
clip-as-service's Finetuner guide (a `model_path` holding textual.onnx and visual.onnx) with
clipft's graphs instead of Finetuner's, checked against transformers on the same weights.

    target/peer-venv/bin/pip install --no-deps clip-server==0.8.3 && \
        target/peer-venv/bin/pip install ftfy regex
    clipft export --model target/vitb32-rand --output target/vitb32-rand-onnx
    target/peer-venv/bin/python scripts/check_clip_server_onnx.py \
        --model target/vitb32-rand --onnx target/vitb32-rand-onnx

clip_server's CLIPOnnxModel loads the folder (its name picks the tokenizer: ViT-B-32::openai),
its Tokenizer makes int32 input_ids and attention_mask padded to 77, as its executor feeds them;
the script prints the largest difference from transformers' get_text_features /
get_image_features and exits non-zero above 1e-4.
"""

import argparse
import sys

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the Hugging Face folder that was exported")
    ap.add_argument("--onnx", required=True, help="clipft export's output folder")
    ap.add_argument("--name", default="ViT-B-32::openai", help="clip_server's model name")
    args = ap.parse_args()

    from clip_server.model.clip_onnx import CLIPOnnxModel
    from clip_server.model.tokenization import Tokenizer
    from transformers import CLIPModel

    cas = CLIPOnnxModel(args.name, model_path=args.onnx)
    cas.start_sessions(dtype="fp32", providers=["CPUExecutionProvider"])
    hf = CLIPModel.from_pretrained(args.model).eval()
    size = hf.config.vision_config.image_size

    texts = ["a photo of a cat", "two dogs playing in the snow", "red"]
    inputs = Tokenizer(args.name)(texts)
    ids = inputs["input_ids"].cpu().numpy().astype(np.int32)
    mask = inputs["attention_mask"].cpu().numpy().astype(np.int32)
    got = cas.encode_text({"input_ids": ids, "attention_mask": mask})
    with torch.inference_mode():
        ref = hf.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                   attention_mask=torch.from_numpy(mask).long())
    ref = getattr(ref, "pooler_output", ref).numpy()
    text = float(np.abs(got - ref).max())
    print(f"text: {len(texts)} captions as {ids.shape} int32, max abs diff {text:.3g}")

    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    got = cas.encode_image({"pixel_values": pixels})
    with torch.inference_mode():
        ref = hf.get_image_features(pixel_values=torch.from_numpy(pixels))
    ref = getattr(ref, "pooler_output", ref).numpy()
    image = float(np.abs(got - ref).max())
    print(f"image: {pixels.shape[0]} images, max abs diff {image:.3g}")
    if max(text, image) > 1e-4:
        sys.exit("clip_server's embeddings differ from transformers'")


if __name__ == "__main__":
    main()
