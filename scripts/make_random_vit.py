"""A random-weight CLIP ViT-B/32 in Hugging Face layout without torch (numpy + safetensors), for
side-by-side CPU benchmarks of two clipft builds on a machine that has no torch:

    python scripts/make_random_vit.py target/vitb32-rand
    clipft bench --model target/vitb32-rand --select-model clip-text --batch-size 32

Tokenizer and preprocessor come from tests/fixtures/clip-tiny (the real CLIP BPE). For numbers
against the peers use scripts/make_fixtures.py --full-size (torch), whose weights the peers load.
"""

import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "target/vitb32-rand"
tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "clip-tiny")
os.makedirs(out, exist_ok=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
    shutil.copy(os.path.join(tiny, f), out)
c = json.load(open(os.path.join(tiny, "config.json")))
c["projection_dim"] = 512
c["text_config"].update(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                        num_hidden_layers=12, projection_dim=512, eos_token_id=49407)
c["vision_config"].update(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                          num_hidden_layers=12, projection_dim=512)
json.dump(c, open(os.path.join(out, "config.json"), "w"))

rng = np.random.default_rng(0)
t = {}


def r(*shape, std=0.02):
    return rng.standard_normal(shape, dtype=np.float32) * std


def encoder(prefix, d, inter, layers):
    for i in range(layers):
        b = f"{prefix}.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[b + f"self_attn.{n}.weight"], t[b + f"self_attn.{n}.bias"] = r(d, d), r(d)
        for n in ("layer_norm1", "layer_norm2"):
            t[b + n + ".weight"], t[b + n + ".bias"] = np.ones(d, np.float32) + r(d), r(d)
        t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = r(inter, d), r(inter)
        t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = r(d, inter), r(d)


encoder("text_model", 512, 2048, 12)
encoder("vision_model", 768, 3072, 12)
t["text_model.embeddings.token_embedding.weight"] = r(49408, 512)
t["text_model.embeddings.position_embedding.weight"] = r(77, 512)
t["text_model.final_layer_norm.weight"] = np.ones(512, np.float32)
t["text_model.final_layer_norm.bias"] = r(512)
t["text_projection.weight"] = r(512, 512)
t["vision_model.embeddings.patch_embedding.weight"] = r(768, 3, 32, 32)
t["vision_model.embeddings.class_embedding"] = r(768)
t["vision_model.embeddings.position_embedding.weight"] = r(50, 768)
for n in ("pre_layrnorm", "post_layernorm"):
    t[f"vision_model.{n}.weight"], t[f"vision_model.{n}.bias"] = np.ones(768, np.float32), r(768)
t["visual_projection.weight"] = r(512, 768)
t["logit_scale"] = np.array(2.6592, np.float32)
save_file(t, os.path.join(out, "model.safetensors"))
print(out)
