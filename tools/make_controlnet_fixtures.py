"""Tiny random ControlNets and diffusers' ControlNet pipeline outputs for the Rust parity
test (tests/parity_controlnet.rs).

Run with the project venv: /work/pyenv/bin/python tools/make_controlnet_fixtures.py
Reads the tiny fixture models (tests/fixtures/sd1, tests/fixtures/sdxl; made by
tools/make_fixtures.py) and writes:

  tests/fixtures/images/control_edges_64.png   a 64x64 edge map (white lines on black)
  tests/fixtures/images/control_depth_64.png   a 64x64 "depth" gradient with a disc
  tests/fixtures/controlnets/sd1/tiny_edges/   ControlNetModel.from_unet(sd1 UNet) shape,
                                               random weights (f16), diffusers folder
  tests/fixtures/controlnets/sd1/tiny_depth/   a second, smaller one: no attention in the
                                               down blocks, UNetMidBlock2D mid block
  tests/fixtures/controlnets/sd1/tiny_edges_single.safetensors
                                               tiny_edges under the original LDM names
                                               (`control_model.*`: input_hint_block,
                                               zero_convs, middle_block_out, input_blocks,
                                               middle_block, time_embed), checked with
                                               diffusers' own single-file converter;
                                               `tiny_edges_single.config.json` is its config
  tests/fixtures/controlnets/sdxl/tiny_xl/     ControlNetModel.from_unet(sdxl UNet) shape
                                               (text_time add-embedding) with one
                                               transformer layer per block, random weights
  tests/fixtures/reference/controlnet_<family>.{json,safetensors}

Each case runs StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline
(MultiControlNetModel for two) with CPU generators, the scheduler class of the case's
`sampler` from the folder's scheduler config, and stores the final latents
(output_type="latent") and the RGB8 image (output_type="np", rounded).

Weights: as tools/make_fixtures.py (every layer random, zero convs included, exact in
f16), but drawn on a coarse grid (1/8 of the layer's scale) so git compresses them.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import ldm_checkpoint  # noqa: E402
from make_fixtures import bridge_flattened_clip, f16_state  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
CONTROLNETS = FIXTURES / "controlnets"
LDM_CONTROLNET_PREFIX = "control_model."

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def grid_randomize_(module: torch.nn.Module) -> None:
    """Random values on a coarse grid (few distinct f16 values, so git compresses them)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                if name.endswith("bias"):
                    value = 0.02 * torch.randn_like(param)
                    step = 0.02 / 8
                else:
                    value = 1.0 + 0.1 * torch.randn_like(param)
                    step = 0.1 / 8
                    value = 1.0 + ((value - 1.0) / step).round() * step
                    param.copy_(value.half().float())
                    continue
            else:
                scale = 1.0 / math.sqrt(param[0].numel())
                value = torch.randn_like(param) * scale
                step = scale / 8
            # A power-of-two step keeps every grid value exact in f16.
            step = 2.0 ** math.floor(math.log2(step))
            param.copy_(((value / step).round() * step).half().float())


def control_images() -> dict[str, Image.Image]:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    edges = np.zeros((64, 64, 3), np.uint8)
    ring = np.abs(np.sqrt((x - 24) ** 2 + (y - 26) ** 2) - 12) < 1.2
    edges[ring] = 255
    edges[44:46, 8:56] = 255
    edges[10:54, 50:52] = 255
    depth = np.clip(255 - y * 3, 0, 255)
    disc = (x - 40) ** 2 + (y - 36) ** 2 < 150
    depth[disc] = 230
    depth_rgb = np.repeat(depth[..., None], 3, axis=-1).astype(np.uint8)
    return {
        "control_edges_64.png": Image.fromarray(edges, "RGB"),
        "control_depth_64.png": Image.fromarray(depth_rgb, "RGB"),
    }


def make_controlnet(unet_folder: Path, seed: int, **overrides) -> ControlNetModel:
    unet = UNet2DConditionModel.from_pretrained(str(unet_folder), torch_dtype=torch.float32)
    base = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    config = {**dict(base.config), **overrides}
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_config(config)
    grid_randomize_(controlnet)
    return controlnet


def save_controlnet(controlnet: ControlNetModel, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    controlnet.save_config(str(folder))
    save_file(f16_state(controlnet.state_dict()), folder / "diffusion_pytorch_model.safetensors")


def controlnet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers ControlNetModel names -> the original `control_model.*` names."""
    shared, out = {}, {}
    hint_blocks = len(config["conditioning_embedding_out_channels"]) * 2 - 2
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if module == "controlnet_cond_embedding.conv_in":
            new = f"input_hint_block.0.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.{2 * hint_blocks + 2}.{param}"
        elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
            new = f"input_hint_block.{2 * int(parts[2]) + 2}.{param}"
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{param}"
        elif module == "controlnet_mid_block":
            new = f"middle_block_out.0.{param}"
        else:
            shared[key] = value
            continue
        out[LDM_CONTROLNET_PREFIX + new] = value
    # The down path and mid block use the UNet's LDM names; the UNet helper needs
    # up-block types only for keys a ControlNet does not have.
    unet_names = ldm_checkpoint.unet_to_ldm(shared, {**config, "up_block_types": []})
    for key, value in unet_names.items():
        out[LDM_CONTROLNET_PREFIX + key[len(ldm_checkpoint.UNET_PREFIX):]] = value
    assert len(out) == len(state)
    return out


def write_single_file(folder: Path, path: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_file(controlnet_to_ldm(state, config), path, metadata={"format": "pt"})
    path.with_suffix("").with_suffix(".config.json").write_text(json.dumps(config, indent=2) + "\n")
    # diffusers' own converter must read back exactly the folder's weights.
    loaded = ControlNetModel.from_single_file(str(path), config=str(folder), torch_dtype=torch.float16)
    got = loaded.state_dict()
    assert set(got) == set(state), set(got) ^ set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def case(sampler: str, controlnets: list[dict], **overrides) -> dict:
    spec = {
        "sampler": sampler,
        "steps": 6,
        "guidance_scale": 7.5,
        "seed": 42,
        "n": 1,
        "prompt": "a red cube on a blue table",
        "negative_prompt": "blurry",
        "guess_mode": False,
        "controlnets": controlnets,
    }
    spec.update(overrides)
    return spec


def unit(model: str, image: str, scale=1.0, start=0.0, end=1.0) -> dict:
    return {"model": model, "image": image, "scale": scale, "start": start, "end": end}


EDGES = "images/control_edges_64.png"
DEPTH = "images/control_depth_64.png"

CASES = {
    "sd1": {
        "single_euler": case("euler", [unit("tiny_edges", EDGES)]),
        "single_scale_window_ddim": case("ddim", [unit("tiny_edges", EDGES, 0.6, 0.2, 0.7)]),
        "single_guess_mode": case("euler", [unit("tiny_edges", EDGES, 0.9)], guess_mode=True),
        "single_guess_mode_unguided": case(
            "euler", [unit("tiny_edges", EDGES, 1.0)], guess_mode=True, guidance_scale=1.0
        ),
        "single_n2_euler_a": case("euler_a", [unit("tiny_edges", EDGES, 0.8)], n=2),
        "multi_euler": case(
            "euler", [unit("tiny_edges", EDGES, 0.8), unit("tiny_depth", DEPTH, 1.2)]
        ),
        "multi_windows": case(
            "ddim",
            [unit("tiny_edges", EDGES, 1.0, 0.0, 0.5), unit("tiny_depth", DEPTH, 0.7, 0.34, 1.0)],
        ),
        "multi_guess_mode": case(
            "euler",
            [unit("tiny_edges", EDGES, 0.5, 0.1, 0.9), unit("tiny_depth", DEPTH, 1.0)],
            guess_mode=True,
        ),
    },
    "sdxl": {
        "single_euler": case("euler", [unit("tiny_xl", EDGES)]),
        "single_window_guess_mode": case(
            "euler", [unit("tiny_xl", EDGES, 0.7, 0.2, 0.8)], guess_mode=True
        ),
        "multi_ddim": case(
            "ddim", [unit("tiny_xl", EDGES, 0.8), unit("tiny_xl", DEPTH, 0.5, 0.0, 0.6)]
        ),
    },
}


def run(pipe, base_config, spec: dict, models: dict, images: dict, output_type: str):
    pipe.scheduler = SAMPLERS[spec["sampler"]].from_config(base_config)
    units = spec["controlnets"]
    nets = [models[u["model"]] for u in units]
    pipe.controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    single = len(units) == 1
    pick = lambda key: units[0][key] if single else [u[key] for u in units]  # noqa: E731
    n = spec["n"]
    generator = (
        torch.Generator("cpu").manual_seed(spec["seed"])
        if n == 1
        else [torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(n)]
    )
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        image=images[units[0]["image"]] if single else [images[u["image"]] for u in units],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        num_images_per_prompt=n,
        generator=generator,
        controlnet_conditioning_scale=pick("scale"),
        control_guidance_start=pick("start"),
        control_guidance_end=pick("end"),
        guess_mode=spec["guess_mode"],
        output_type=output_type,
    )
    if spec["sampler"] == "ddim":
        kwargs["eta"] = 0.0
    with torch.no_grad():
        return pipe(**kwargs).images


def main() -> None:
    images_dir = FIXTURES / "images"
    images_dir.mkdir(exist_ok=True)
    for name, image in control_images().items():
        image.save(images_dir / name)
    images = {
        f"images/{name}": Image.open(images_dir / name).convert("RGB") for name in control_images()
    }

    sd1_dir, sdxl_dir = CONTROLNETS / "sd1", CONTROLNETS / "sdxl"
    save_controlnet(make_controlnet(FIXTURES / "sd1" / "unet", 601), sd1_dir / "tiny_edges")
    save_controlnet(
        make_controlnet(
            FIXTURES / "sd1" / "unet",
            602,
            down_block_types=["DownBlock2D", "DownBlock2D"],
            mid_block_type="UNetMidBlock2D",
            conditioning_channels=3,
        ),
        sd1_dir / "tiny_depth",
    )
    write_single_file(sd1_dir / "tiny_edges", sd1_dir / "tiny_edges_single.safetensors")
    # One transformer layer where the UNet has two, as the published "small" SDXL
    # ControlNets thin their blocks.
    save_controlnet(
        make_controlnet(FIXTURES / "sdxl" / "unet", 603, transformer_layers_per_block=[1, 1]),
        sdxl_dir / "tiny_xl",
    )

    for family, cases in CASES.items():
        folder = CONTROLNETS / family
        models = {
            name: ControlNetModel.from_pretrained(str(folder / name), torch_dtype=torch.float32)
            for name in {u["model"] for spec in cases.values() for u in spec["controlnets"]}
        }
        first = next(iter(models.values()))
        if family == "sdxl":
            pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
                str(FIXTURES / family), controlnet=first, torch_dtype=torch.float32,
                local_files_only=True,
            )
        else:
            pipe = StableDiffusionControlNetPipeline.from_pretrained(
                str(FIXTURES / family), controlnet=first, torch_dtype=torch.float32,
                local_files_only=True, safety_checker=None, requires_safety_checker=False,
            )
        bridge_flattened_clip(pipe.text_encoder)
        pipe.set_progress_bar_config(disable=True)
        base_config = dict(pipe.scheduler.config)
        refs = {}
        for name, spec in cases.items():
            latents = run(pipe, base_config, spec, models, images, "latent")
            image = run(pipe, base_config, spec, models, images, "np")
            image_u8 = np.round(image * 255.0).astype(np.uint8)
            assert torch.isfinite(latents).all(), name
            refs[f"{name}.latents"] = latents.float().contiguous()
            refs[f"{name}.image"] = torch.from_numpy(image_u8).contiguous()
            print(f"  {family}/{name}: latents std {latents.std():.3f}, image mean {image.mean():.3f}")
        out = FIXTURES / "reference"
        save_file(refs, out / f"controlnet_{family}.safetensors")
        meta = {
            "family": family,
            "cases": cases,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        (out / f"controlnet_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
