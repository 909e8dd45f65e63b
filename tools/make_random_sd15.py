"""Write a full-size Stable Diffusion 1.5 architecture with random weights, in diffusers
layout, for benchmarks (no real weights can be downloaded here). Not committed: it is
~4 GB in float32.

Usage: python tools/make_random_sd15.py /tmp/sd15-random
The configs are the real SD 1.5 ones embedded in assets/configs/sd1/.
"""
import json
import os
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "assets" / "configs" / "sd1"


def load(name):
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if not k.startswith("_")}


def main():
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel(**load("unet"))
    vae = AutoencoderKL(**load("vae"))
    text = CLIPTextModel(CLIPTextConfig(**load("text_encoder")))
    for module in (unet, vae, text):
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0, (1.0 / p[0].numel()) ** 0.5)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text.save_pretrained(out / "text_encoder", safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(load("scheduler")))
    for f in ("vocab.json", "merges.txt"):
        target = out / "tokenizer" / f
        if not target.exists():
            os.symlink(ROOT / "assets" / "clip-tokenizer" / f, target)
    (out / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"})
    )
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
