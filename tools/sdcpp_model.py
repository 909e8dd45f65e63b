"""Write an SD 1.x diffusers folder as one original-layout (LDM) f32 .safetensors file.

stable-diffusion.cpp (commit 97d29908) takes a diffusers folder as `-m`, but then fails
to detect the model version ("get sd version from file failed"), so the benchmark in
tools/sdcpp_bench.sh gives it the same weights as a single-file checkpoint with the
original key names (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`), renamed by tools/ldm_checkpoint.py. Values are
written as float32, unchanged (the VAE attention's linear weights gain the 1x1 kernel
dimensions the original convolutions have), so sd.cpp and sdserve/diffusers compute on
the same numbers.

Usage: python tools/sdcpp_model.py /work/sd15-random /work/sd15-random-ldm.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_checkpoint  # noqa: E402


def read_config(path: Path) -> dict:
    return json.loads(path.read_text())


def sd1_single_file_state(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's UNet, VAE and CLIP text encoder under original checkpoint names, f32."""
    state: dict[str, torch.Tensor] = {}
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    state.update(ldm_checkpoint.unet_to_ldm(unet, read_config(folder / "unet" / "config.json")))
    del unet
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    state.update(ldm_checkpoint.vae_to_ldm(vae, read_config(folder / "vae" / "config.json")))
    text_encoder = load_file(folder / "text_encoder" / "model.safetensors")
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix older files carry.
    text_encoder = {
        (key if key.startswith("text_model.") else f"text_model.{key}"): value
        for key, value in text_encoder.items()
    }
    state.update(ldm_checkpoint.hf_clip_to_ldm(text_encoder, "cond_stage_model.transformer."))
    state.update(ldm_checkpoint.ldm_schedule_buffers())
    return {
        name: (value.float() if value.is_floating_point() else value).contiguous()
        for name, value in state.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="SD 1.x diffusers folder")
    parser.add_argument("output", type=Path, help="single-file .safetensors to write")
    args = parser.parse_args()
    state = sd1_single_file_state(args.folder)
    save_file(state, args.output, metadata={"format": "pt"})
    count = sum(v.numel() for v in state.values())
    print(f"wrote {args.output}: {len(state)} tensors, {count / 1e6:.1f} M values")


if __name__ == "__main__":
    main()
