#!/usr/bin/env python3
"""Writes tests/fixtures/finetuner-artifact/: an artifact in the layout Jina's Finetuner produced
for a Hugging Face CLIP backbone (reference notes: finetuner.md section 2), made from the tiny
fixture CLIP, so that clipft's loader for such artifacts is tested without Finetuner's cloud.

models/clip-text/model.pt is `torch.save(wrapper.state_dict())` of a module holding `_model`
(CLIPModel.text_model) and `_projection` (text_projection); clip-vision likewise with
vision_model / visual_projection. Tensors are stored as float16 to keep the fixture small.
Run: /work/venvs/ref/bin/python scripts/make_finetuner_artifact.py
"""
import os
import shutil

import torch
from transformers import CLIPModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "tests/fixtures/clip-tiny")
OUT = os.path.join(ROOT, "tests/fixtures/finetuner-artifact")


class Wrapper(torch.nn.Module):
    def __init__(self, model, projection):
        super().__init__()
        self._model = model
        self._projection = projection


def main():
    model = CLIPModel.from_pretrained(SRC).eval()
    shutil.rmtree(OUT, ignore_errors=True)
    for name, tower, proj in [
        ("clip-text", model.text_model, model.text_projection),
        ("clip-vision", model.vision_model, model.visual_projection),
    ]:
        d = os.path.join(OUT, "models", name)
        os.makedirs(d)
        state = {k: v.detach().to(torch.float16).clone() for k, v in Wrapper(tower, proj).state_dict().items()}
        torch.save(state, os.path.join(d, "model.pt"))
        with open(os.path.join(d, "metadata.yml"), "w") as f:
            f.write(f"name: {name}\ndescriptor: openai/clip-vit-base-patch32\n"
                    f"builder: CLIP{'Text' if name == 'clip-text' else 'Vision'}Builder\n"
                    f"task: text-to-image\nembedding_layer: null\noutput_dim: {proj.out_features}\n")
    with open(os.path.join(OUT, "config.yml"), "w") as f:
        f.write("model:\n  name: openai/clip-vit-base-patch32\nloss: CLIPLoss\n")
    with open(os.path.join(OUT, "metadata.yml"), "w") as f:
        f.write("name: finetuner-fixture\nproduct: finetuner\nartifact_type: run\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
