"""Tensor names and shapes of full-size single-file checkpoints, for tests/single_file.rs.

Builds each real model (SD 1.5, SD 2.1, SDXL base, SDXL refiner) from sdserve's embedded
diffusers configs (assets/configs/) on torch's meta device, renames it to the original
LDM layout with ldm_checkpoint.py (as real checkpoints store it: CLIP position_ids, SD2's
extra 24th OpenCLIP block, OpenCLIP text_projection and logit_scale), and writes
{name: shape} to tests/fixtures/single_file_layouts/<model>.json. No weights are stored;
the Rust test turns each list into a sparse safetensors file to check that the layout is
detected and its configs fit.

Run: /work/pyenv/bin/python tools/single_file_layouts.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import ldm_checkpoint as ldm  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

CONFIGS = ROOT / "assets" / "configs"
OUT = ROOT / "tests" / "fixtures" / "single_file_layouts"


def config(model: str, component: str) -> dict:
    return json.loads((CONFIGS / model / f"{component}.json").read_text())


def meta_state(build) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(build().state_dict())


def unet(model: str) -> dict:
    cfg = config(model, "unet")
    return ldm.unet_to_ldm(meta_state(lambda: UNet2DConditionModel.from_config(cfg)), cfg)


def vae(model: str) -> dict:
    cfg = config(model, "vae")
    return ldm.vae_to_ldm(meta_state(lambda: AutoencoderKL.from_config(cfg)), cfg)


def clip_state(model: str, component: str, with_projection: bool):
    cfg = CLIPTextConfig(**{k: v for k, v in config(model, component).items() if not k.startswith("_")})
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    state = meta_state(lambda: cls(cfg))
    # transformers 5 reports CLIPTextModel keys without the `text_model.` level it saves.
    state = {
        key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value
        for key, value in state.items()
    }
    return state, cfg


def hf_clip(model: str, component: str, prefix: str) -> dict:
    state, _ = clip_state(model, component, False)
    return ldm.hf_clip_to_ldm(state, prefix)


def open_clip(model: str, component: str, prefix: str, extra_layer: bool, projection: int) -> dict:
    state, cfg = clip_state(model, component, True)
    shapes = ldm.open_clip_resblock_shapes(cfg.hidden_size, cfg.intermediate_size)
    extra = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    text_projection = torch.empty(cfg.hidden_size, projection, device="meta")
    return ldm.hf_clip_to_open_clip(
        state, prefix, cfg.num_hidden_layers, extra if extra_layer else None, text_projection
    )


def main() -> None:
    layouts = {
        "sd15": {**unet("sd1"), **vae("sd1"), **hf_clip("sd1", "text_encoder", "cond_stage_model.transformer.")},
        # OpenCLIP ViT-H: 24 blocks on disk (diffusers keeps 23), 1024-wide projection.
        "sd21": {
            **unet("sd2"),
            **vae("sd2"),
            **open_clip("sd2", "text_encoder", "cond_stage_model.model.", True, 1024),
        },
        "sdxl_base": {
            **unet("sdxl"),
            **vae("sdxl"),
            **hf_clip("sdxl", "text_encoder", "conditioner.embedders.0.transformer."),
            **open_clip("sdxl", "text_encoder_2", "conditioner.embedders.1.model.", False, 1280),
        },
        "sdxl_refiner": {
            **unet("sdxl_refiner"),
            **vae("sdxl_refiner"),
            **open_clip("sdxl_refiner", "text_encoder_2", "conditioner.embedders.0.model.", False, 1280),
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    for name, tensors in layouts.items():
        shapes = {key: list(value.shape) for key, value in sorted(tensors.items())}
        (OUT / f"{name}.json").write_text(json.dumps(shapes, separators=(",", ":"), sort_keys=True) + "\n")
        print(name, len(shapes), "tensors")


if __name__ == "__main__":
    main()
