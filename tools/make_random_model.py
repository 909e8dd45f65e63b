"""Write a full-size SD 1.5 or SDXL base architecture with random weights, in diffusers
layout, from the real configs in assets/configs/ (nothing is downloaded). For timing
only: the images are noise. Made where it is used (it is GBs, never committed or carried):
the GPU check (tools/gpu_check.sh) runs it on the device machine with --device cuda, where
initialising on the GPU takes seconds.

Usage:
  python tools/make_random_model.py --family sd1  --out /tmp/sd15  [--device cuda] [--dtype fp16]
  python tools/make_random_model.py --family sdxl --out /tmp/sdxl  --device cuda --dtype fp16

Weights of rank ≥ 2 are drawn from N(0, 1/fan_in) (as tools/make_random_sd15.py), so the
activations keep a sane scale through the deep stacks; norms and biases keep their
defaults.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parent.parent


def load_config(family, name):
    text = (ROOT / "assets" / "configs" / family / f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def randomise(module):
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() > 1:
                std = (1.0 / parameter[0].numel()) ** 0.5
                parameter.normal_(0, std, generator=generator)
    return module


def write_tokenizer(folder, pad_token):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(ROOT / "assets" / "clip-tokenizer" / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd1", "sdxl"], required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    out, family = args.out, args.family
    out.mkdir(parents=True, exist_ok=True)

    def save(name, build):
        with torch.device(args.device):
            module = randomise(build())
        module.to(dtype).save_pretrained(out / name, safe_serialization=True)
        del module
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    save("unet", lambda: UNet2DConditionModel(**load_config(family, "unet")))
    save("vae", lambda: AutoencoderKL(**load_config(family, "vae")))
    save("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**load_config(family, "text_encoder"))))
    write_tokenizer(out / "tokenizer", "<|endoftext|>")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(load_config(family, "scheduler")))
    index = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler" if family == "sdxl" else "PNDMScheduler"],
    }
    if family == "sdxl":
        save("text_encoder_2", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**load_config(family, "text_encoder_2"))))
        write_tokenizer(out / "tokenizer_2", "!")
        index.update({
            "_class_name": "StableDiffusionXLPipeline",
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
        })
    else:
        index.update({
            "_class_name": "StableDiffusionPipeline",
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        })
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {family} ({args.dtype}) to {out}")


if __name__ == "__main__":
    main()
