"""Makes tiny random-weight T2I-Adapters and records diffusers' outputs with them for the
Rust parity test (tests/parity_t2i_adapter.rs).

Run with the project venv: /work/pyenv/bin/python tools/make_t2i_adapter_fixtures.py
Reads the tiny fixture models (tests/fixtures/sd1, tests/fixtures/sdxl; made by
tools/make_fixtures.py) and writes:

  tests/fixtures/t2i_adapters/sd1_full/    full_adapter, RGB input, channels (32, 64, 64)
  tests/fixtures/t2i_adapters/sd1_light/   light_adapter, grayscale input, channels (32, 64)
  tests/fixtures/t2i_adapters/sdxl_full/   full_adapter_xl, grayscale input, channels (32, 64)
  tests/fixtures/images/control_rgb_64.png, control_gray_64.png   64x64 control images
  tests/fixtures/reference/t2i_adapter.{json,safetensors}

The tiny UNets have two down blocks (32 and 64 channels): diffusers adds one feature
per down block and offers the next one to the mid block, which takes it only when the
shapes agree. sd1_full has a third level (64 channels at 1/32) so that its total
downscale factor (32) equals the light adapter's, as MultiAdapter requires. Each adapter is
a diffusers folder (config.json + f16 diffusion_pytorch_model.safetensors); weights are
exact in f16, so the float32 references use exactly the stored values.

References (F32 unless noted):
  unet_<family>.{sample, encoder_hidden_states, text_embeds, time_ids, residual.N, output}
      one UNet forward at timestep 421 with random `down_intrablock_additional_residuals`,
      one per down block plus one for the mid block, to pin the UNet's adapter semantics.
  adapter_<name>.feature.N: the adapter's features for its control image (preprocessed as
      the pipelines do: pixels / 255, NCHW; grayscale images have one channel).
  <case>.latents, <case>.image (U8 [n, H, W, 3]): StableDiffusionAdapterPipeline /
      StableDiffusionXLAdapterPipeline (MultiAdapter for several adapters, with
      adapter_conditioning_scale as the per-adapter weights), one CPU generator per image
      seeded seed + i.
"""

import json
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MultiAdapter,
    StableDiffusionAdapterPipeline,
    StableDiffusionXLAdapterPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import f16_state, randomize_  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
ADAPTERS = FIXTURES / "t2i_adapters"
PROMPT = "a red cube on a blue table"
NEGATIVE_PROMPT = "blurry"

# name → (adapter config, torch seed, control image)
ADAPTER_SPECS = {
    "sd1_full": (
        dict(in_channels=3, channels=[32, 64, 64], num_res_blocks=1, downscale_factor=8,
             adapter_type="full_adapter"),
        601,
        "control_rgb_64.png",
    ),
    "sd1_light": (
        dict(in_channels=1, channels=[32, 64], num_res_blocks=2, downscale_factor=8,
             adapter_type="light_adapter"),
        602,
        "control_gray_64.png",
    ),
    "sdxl_full": (
        dict(in_channels=1, channels=[32, 64], num_res_blocks=2, downscale_factor=16,
             adapter_type="full_adapter_xl"),
        603,
        "control_gray_64.png",
    ),
}

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def case(family, sampler, adapters, n=1, steps=5, seed=42):
    """`adapters`: [(adapter name, control image file, scale)]."""
    return {
        "family": family,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": 7.5,
        "seed": seed,
        "n": n,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "width": 64,
        "height": 64,
        "adapters": [{"model": m, "image": f"images/{i}", "scale": s} for m, i, s in adapters],
    }


CASES = {
    "sd1_full_euler": case("sd1", "euler", [("sd1_full", "control_rgb_64.png", 1.0)]),
    "sd1_full_half_ddim": case("sd1", "ddim", [("sd1_full", "control_rgb_64.png", 0.5)]),
    "sd1_full_n2_euler_a": case(
        "sd1", "euler_a", [("sd1_full", "control_rgb_64.png", 0.8)], n=2
    ),
    "sd1_light_euler": case("sd1", "euler", [("sd1_light", "control_gray_64.png", 1.2)]),
    "sd1_multi_euler": case(
        "sd1",
        "euler",
        [("sd1_full", "control_rgb_64.png", 0.8), ("sd1_light", "control_gray_64.png", 0.6)],
    ),
    "sdxl_full_euler": case("sdxl", "euler", [("sdxl_full", "control_gray_64.png", 1.0)]),
    "sdxl_full_scaled_ddim": case("sdxl", "ddim", [("sdxl_full", "control_gray_64.png", 0.4)]),
    # The RGB image goes to a one-channel adapter: converted to luma (PIL's "L").
    "sdxl_multi_euler": case(
        "sdxl",
        "euler",
        [("sdxl_full", "control_gray_64.png", 0.7), ("sdxl_full", "control_rgb_64.png", 0.5)],
    ),
}


def control_images():
    """An RGB image of coloured edges and a grayscale one of blobs, both 64x64."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    rgb = np.zeros((64, 64, 3), np.float32)
    rgb[..., 0] = 255.0 * ((x // 8 + y // 8) % 2)
    rgb[..., 1] = 4.0 * x
    rgb[..., 2] = 255.0 * (((x - 32) ** 2 + (y - 30) ** 2) < 300)
    gray = 127.5 + 127.5 * np.sin(x / 5.0) * np.cos(y / 7.0)
    gray[10:20, 40:60] = 255.0
    return (
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB"),
        Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L"),
    )


def make_adapters():
    made = {}
    for name, (config, seed, _) in ADAPTER_SPECS.items():
        torch.manual_seed(seed)
        adapter = T2IAdapter(**config)
        randomize_(adapter)
        folder = ADAPTERS / name
        folder.mkdir(parents=True, exist_ok=True)
        adapter.save_config(str(folder))
        save_file(
            f16_state(adapter.state_dict()),
            folder / "diffusion_pytorch_model.safetensors",
        )
        made[name] = T2IAdapter.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    return made


def load_control(file_name, adapter):
    """The control image as the adapter takes it: PIL's "L" for one-channel adapters."""
    image = Image.open(FIXTURES / "images" / file_name)
    mode = "L" if adapter.config.in_channels == 1 else "RGB"
    return image.convert(mode)


def to_tensor(image):
    array = np.asarray(image).astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array.transpose(2, 0, 1)[None].copy())


def unet_reference(family, refs):
    unet = UNet2DConditionModel.from_pretrained(
        str(FIXTURES / family / "unet"), torch_dtype=torch.float32
    ).eval()
    g = torch.Generator("cpu").manual_seed(7)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context_dim = unet.config.cross_attention_dim
    context = torch.randn(2, 77, context_dim, generator=g)
    if family == "sd1":
        shapes = [(2, 32, 8, 8), (2, 64, 4, 4), (2, 64, 4, 4)]
    else:
        shapes = [(2, 32, 4, 4), (2, 64, 4, 4), (2, 64, 4, 4)]
    residuals = [torch.randn(*s, generator=g) for s in shapes]
    kwargs = {}
    if family == "sdxl":
        text_embeds = torch.randn(2, 32, generator=g)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        refs[f"unet_{family}.text_embeds"] = text_embeds
        refs[f"unet_{family}.time_ids"] = time_ids
    with torch.no_grad():
        output = unet(
            sample,
            421.0,
            encoder_hidden_states=context,
            down_intrablock_additional_residuals=[r.clone() for r in residuals],
            **kwargs,
        ).sample
    refs[f"unet_{family}.sample"] = sample
    refs[f"unet_{family}.encoder_hidden_states"] = context
    for i, r in enumerate(residuals):
        refs[f"unet_{family}.residual.{i}"] = r
    refs[f"unet_{family}.output"] = output


def run(pipe, base_config, spec, adapters, output_type):
    pipe.scheduler = SAMPLERS[spec["sampler"]].from_config(base_config)
    chosen = [adapters[a["model"]] for a in spec["adapters"]]
    images = [load_control(Path(a["image"]).name, adapters[a["model"]]) for a in spec["adapters"]]
    scales = [a["scale"] for a in spec["adapters"]]
    if len(chosen) == 1:
        pipe.adapter = chosen[0]
        image, scale = images[0], scales[0]
    else:
        pipe.adapter = MultiAdapter(chosen)
        image, scale = images, scales
    n = spec["n"]
    generator = (
        torch.Generator("cpu").manual_seed(spec["seed"])
        if n == 1
        else [torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(n)]
    )
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        image=image,
        adapter_conditioning_scale=scale,
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        num_images_per_prompt=n,
        width=spec["width"],
        height=spec["height"],
        generator=generator,
        output_type=output_type,
    )
    if spec["sampler"] == "ddim":
        kwargs["eta"] = 0.0
    with torch.no_grad():
        return pipe(**kwargs).images


def main():
    images_dir = FIXTURES / "images"
    rgb, gray = control_images()
    rgb.save(images_dir / "control_rgb_64.png")
    gray.save(images_dir / "control_gray_64.png")
    adapters = make_adapters()

    refs = {}
    for family in ("sd1", "sdxl"):
        unet_reference(family, refs)
    for name, (_, _, image_file) in ADAPTER_SPECS.items():
        adapter = adapters[name]
        with torch.no_grad():
            features = adapter(to_tensor(load_control(image_file, adapter)))
        for i, feature in enumerate(features):
            refs[f"adapter_{name}.feature.{i}"] = feature.contiguous()

    pipes = {}
    first = adapters["sd1_full"]
    pipes["sd1"] = StableDiffusionAdapterPipeline.from_pretrained(
        str(FIXTURES / "sd1"), adapter=first, torch_dtype=torch.float32,
        local_files_only=True, safety_checker=None, requires_safety_checker=False,
    )
    pipes["sdxl"] = StableDiffusionXLAdapterPipeline.from_pretrained(
        str(FIXTURES / "sdxl"), adapter=adapters["sdxl_full"], torch_dtype=torch.float32,
        local_files_only=True,
    )
    base_configs = {}
    for family, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        base_configs[family] = dict(pipe.scheduler.config)

    for name, spec in CASES.items():
        pipe = pipes[spec["family"]]
        base = base_configs[spec["family"]]
        latents = run(pipe, base, spec, adapters, "latent")
        image = run(pipe, base, spec, adapters, "np")
        refs[f"{name}.latents"] = latents.float().contiguous()
        refs[f"{name}.image"] = torch.from_numpy(np.round(image * 255.0).astype(np.uint8))
        assert torch.isfinite(latents).all(), name
        print(f"  {name}: latents std {latents.std():.3f}, image mean {image.mean():.3f}")

    out = FIXTURES / "reference"
    save_file({k: v.contiguous() for k, v in refs.items()}, out / "t2i_adapter.safetensors")
    meta = {
        "adapters": {name: spec[0] for name, spec in ADAPTER_SPECS.items()},
        "adapter_images": {name: f"images/{spec[2]}" for name, spec in ADAPTER_SPECS.items()},
        "unet_timestep": 421.0,
        "cases": CASES,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out / "t2i_adapter.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
