"""Records diffusers' img2img and inpainting outputs for the Rust parity test
(tests/parity_img2img.rs).

Run with the project venv: /work/pyenv/bin/python tools/make_img2img_refs.py
Reads the tiny fixture models (tests/fixtures/sd1, tests/fixtures/sdxl; made by
tools/make_fixtures.py) and writes:

  tests/fixtures/images/init_64.png   a synthetic 64x64 RGB init image (gradient + shapes)
  tests/fixtures/images/mask_64.png   a 64x64 grayscale mask (white = repaint)
  tests/fixtures/sd1_inpaint/          a tiny 9-channel inpainting model: its own random
                                      UNet (in_channels 9, f16), the other components
                                      symlinked from tests/fixtures/sd1
  tests/fixtures/reference/img2img_<family>.{json,safetensors}

Each case runs StableDiffusion(XL)Img2ImgPipeline or StableDiffusion(XL)InpaintPipeline
(4-channel UNet: latent blending) with one CPU generator seeded 42, strength 0.6, 6 steps,
guidance 7.5, and stores the final latents (output_type="latent") and the RGB8 image
(output_type="np", rounded). diffusers' inpainting output has no paste-back (no
padding_mask_crop), so the Rust side compares with paste_back off and mask_blur 0.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import f16_state, randomize_  # noqa: E402
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 42
STEPS = 6
STRENGTH = 0.6
PROMPT = "a red cube on a blue table"
NEGATIVE_PROMPT = "blurry"

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
}


def synthetic_images() -> tuple[Image.Image, Image.Image]:
    """A gradient with a bright disc and a dark square, and a rectangular mask."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    rgb = np.stack([x * 4.0, y * 4.0, (x + y) * 2.0], axis=-1)
    disc = (x - 20) ** 2 + (y - 22) ** 2 < 100
    rgb[disc] = [250, 230, 40]
    rgb[40:56, 36:54] = [20, 30, 90]
    init = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:44, 24:52] = 255
    return init, Image.fromarray(mask, "L")


def case(kind: str, sampler: str, family: str = "sd1") -> dict:
    return {
        "kind": kind,
        "family": family,
        "sampler": sampler,
        "steps": STEPS,
        "strength": STRENGTH,
        "guidance_scale": 7.5,
        "seed": SEED,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "width": 64,
        "height": 64,
    }


CASES = {
    "sd1": {
        **{f"img2img_{s}": case("img2img", s) for s in SAMPLERS},
        **{f"inpaint_{s}": case("inpaint", s) for s in ("euler", "ddim", "euler_a")},
    },
    "sdxl": {
        **{f"img2img_{s}": case("img2img", s, "sdxl") for s in ("euler", "ddim")},
        "inpaint_euler": case("inpaint", "euler", "sdxl"),
    },
    "sd1_inpaint": {
        "inpaint9_euler": case("inpaint", "euler", "sd1_inpaint"),
        "inpaint9_ddim": case("inpaint", "ddim", "sd1_inpaint"),
        # Full strength: diffusers starts from pure noise and skips the init encoding.
        "inpaint9_euler_full": {**case("inpaint", "euler", "sd1_inpaint"), "strength": 1.0},
    },
}


def make_inpaint_model() -> None:
    """sd1's components with a 9-channel UNet ([latents, mask, masked image latents])."""
    source, target = FIXTURES / "sd1", FIXTURES / "sd1_inpaint"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        os.symlink(Path("..") / "sd1" / part, target / part)
    shutil.copy(source / "model_index.json", target / "model_index.json")
    config = dict(UNet2DConditionModel.load_config(str(source / "unet")))
    config["in_channels"] = 9
    torch.manual_seed(909)
    unet = UNet2DConditionModel.from_config(config)
    randomize_(unet)
    (target / "unet").mkdir()
    unet.save_config(str(target / "unet"))
    save_file(f16_state(unet.state_dict()), target / "unet" / "diffusion_pytorch_model.safetensors")


def run(pipe, base_config, spec: dict, init, mask, output_type: str):
    cls, extra = SAMPLERS[spec["sampler"]]
    pipe.scheduler = cls.from_config({**base_config, **extra})
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        image=init,
        strength=spec["strength"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(spec["seed"]),
        output_type=output_type,
    )
    if spec["sampler"] == "ddim":
        kwargs["eta"] = 0.0
    if spec["kind"] == "inpaint":
        kwargs.update(mask_image=mask, width=spec["width"], height=spec["height"])
    with torch.no_grad():
        return pipe(**kwargs).images


def main() -> None:
    images_dir = FIXTURES / "images"
    images_dir.mkdir(exist_ok=True)
    init, mask = synthetic_images()
    init.save(images_dir / "init_64.png")
    mask.save(images_dir / "mask_64.png")
    # Read back what Rust reads, so both sides start from identical pixels.
    init = Image.open(images_dir / "init_64.png").convert("RGB")
    mask = Image.open(images_dir / "mask_64.png").convert("L")

    make_inpaint_model()
    for family, cases in CASES.items():
        folder = str(FIXTURES / family)
        pipes = {}
        if family == "sdxl":
            pipes["img2img"] = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                folder, torch_dtype=torch.float32, local_files_only=True
            )
            pipes["inpaint"] = StableDiffusionXLInpaintPipeline(**pipes["img2img"].components)
        else:
            pipes["img2img"] = StableDiffusionImg2ImgPipeline.from_pretrained(
                folder, torch_dtype=torch.float32, local_files_only=True, safety_checker=None,
                requires_safety_checker=False,
            )
            pipes["inpaint"] = StableDiffusionInpaintPipeline(**pipes["img2img"].components)
            if family == "sd1_inpaint":
                pipes["img2img"] = pipes["inpaint"]
        for pipe in pipes.values():
            pipe.set_progress_bar_config(disable=True)
        base_config = dict(pipes["img2img"].scheduler.config)
        refs = {}
        for name, spec in cases.items():
            pipe = pipes[spec["kind"]]
            latents = run(pipe, base_config, spec, init, mask, "latent")
            image = run(pipe, base_config, spec, init, mask, "np")
            image_u8 = np.round(image * 255.0).astype(np.uint8)
            refs[f"{name}.latents"] = latents.float().contiguous()
            refs[f"{name}.image"] = torch.from_numpy(image_u8).contiguous()
            assert torch.isfinite(latents).all(), name
            print(f"  {family}/{name}: latents std {latents.std():.3f}, image mean {image.mean():.3f}")
        out = FIXTURES / "reference"
        save_file(refs, out / f"img2img_{family}.safetensors")
        meta = {
            "family": family,
            "init_image": "images/init_64.png",
            "mask_image": "images/mask_64.png",
            "cases": cases,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        (out / f"img2img_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
