"""Makes random-weight IP-Adapters in the public IP-Adapter repository's layout and records
diffusers' outputs with them, for the Rust parity test (tests/parity_ip_adapter.rs).

Run with the project venv: /work/pyenv/bin/python tools/make_ip_adapter_fixtures.py
Reads the tiny fixture models (tests/fixtures/sd1, tests/fixtures/sdxl; made by
tools/make_fixtures.py) and writes, for each family in (sd1, sdxl):

  tests/fixtures/ip_adapters/<family>/ip-adapter_<family>.safetensors       base adapter
  tests/fixtures/ip_adapters/<family>/ip-adapter-plus_<family>.safetensors  "plus" (Resampler)
  tests/fixtures/ip_adapters/<family>/image_encoder/{config.json, model.safetensors,
                                                     preprocessor_config.json}
  tests/fixtures/reference/ip_adapter_<family>.{json,safetensors}

The adapters hold the original (tencent-ailab) key names: `image_proj.*` and
`ip_adapter.N.to_k_ip.weight` / `to_v_ip.weight`, N = 1, 3, 5, ... one per cross-attention
layer in diffusers' processor order (down blocks, up blocks, mid block). The image encoder is a
tiny random CLIPVisionModelWithProjection (32x32 images, 8x8 patches). All weights are f16 and
the references are computed in f32 from exactly the stored values.

References: `encoder.pixel_values` (the CLIPImageProcessor output for reference image a),
`encoder.image_embeds`, `encoder.penultimate` (hidden_states[-2]), `base.tokens` /
`plus.tokens` (the projected image tokens of image a, [1, T, cross]), `plus.uncond_tokens`
(the Resampler on the encoder's output for a zero image), and per pipeline case
`<case>.image` (U8 [n,H,W,3]) and `<case>.latents` (final latents), from
StableDiffusion(XL)Pipeline with load_ip_adapter, set_ip_adapter_scale and ip_adapter_image
(one CPU generator per image, seeded seed + i).
"""

import json
import math
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from make_fixtures import bridge_flattened_clip, f16_state, randomize_  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
IMAGE_SIZE = 32
PROMPT = "a red cube on a blue table"
NEGATIVE_PROMPT = "blurry"
SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}
# Vision encoder per family: hidden_act differs so both activations are exercised.
ENCODERS = {
    "sd1": dict(hidden_act="gelu", projection_dim=24),
    "sdxl": dict(hidden_act="quick_gelu", projection_dim=40),
}
PLUS_QUERIES = 4
PLUS_HIDDEN = 32
PLUS_HEADS = 1  # diffusers infers heads = to_q rows / 64
PLUS_DEPTH = 4  # diffusers' IPAdapterPlusImageProjection is always 4 blocks deep


def rand(generator: torch.Generator, *shape: int, kind: str = "matrix") -> torch.Tensor:
    if kind == "bias":
        value = 0.02 * torch.randn(*shape, generator=generator)
    elif kind == "norm":
        value = 1.0 + 0.1 * torch.randn(*shape, generator=generator)
    else:
        value = torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])
    return value.half().float()


def reference_images() -> tuple[Image.Image, Image.Image]:
    """Two small RGB pictures of different sizes and aspect ratios (resize + crop run)."""
    y, x = np.mgrid[0:40, 0:48].astype(np.float32)
    a = np.stack([x * 5.0, y * 6.0, 255 - (x + y) * 2.5], axis=-1)
    a[(x - 30) ** 2 + (y - 18) ** 2 < 70] = [250, 220, 30]
    y, x = np.mgrid[0:56, 0:40].astype(np.float32)
    b = np.stack([200 - y * 3.0, 40 + x * 4.0, (x * y) % 256], axis=-1)
    b[10:30, 8:22] = [30, 60, 200]
    to_image = lambda arr: Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")  # noqa: E731
    return to_image(a), to_image(b)


def cross_attention_layers(unet) -> list[int]:
    """Hidden size of each cross-attention processor, in diffusers' processor order."""
    sizes = []
    channels = unet.config.block_out_channels
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            sizes.append(channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(channels))[int(name[len("up_blocks.")])])
        else:
            sizes.append(channels[int(name[len("down_blocks.")])])
    return sizes


def make_encoder(family: str, folder: Path) -> None:
    torch.manual_seed(1000 + len(family))
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        layer_norm_eps=1e-5,
        **ENCODERS[family],
    )
    model = CLIPVisionModelWithProjection(config).eval()
    randomize_(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(f16_state(model.state_dict()), folder / "model.safetensors")
    CLIPImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE).save_pretrained(folder)


def make_adapters(family: str, unet, folder: Path, embed_dim: int, hidden: int) -> None:
    cross = unet.config.cross_attention_dim
    layers = cross_attention_layers(unet)
    for plus in (False, True):
        g = torch.Generator().manual_seed(7 + 2 * int(plus) + 10 * len(family))
        state = {}
        if plus:
            inner = 64 * PLUS_HEADS
            d = PLUS_HIDDEN
            state["image_proj.latents"] = rand(g, 1, PLUS_QUERIES, d)
            state["image_proj.proj_in.weight"] = rand(g, d, hidden)
            state["image_proj.proj_in.bias"] = rand(g, d, kind="bias")
            state["image_proj.proj_out.weight"] = rand(g, cross, d)
            state["image_proj.proj_out.bias"] = rand(g, cross, kind="bias")
            state["image_proj.norm_out.weight"] = rand(g, cross, kind="norm")
            state["image_proj.norm_out.bias"] = rand(g, cross, kind="bias")
            for i in range(PLUS_DEPTH):
                p = f"image_proj.layers.{i}"
                for norm in ("norm1", "norm2"):
                    state[f"{p}.0.{norm}.weight"] = rand(g, d, kind="norm")
                    state[f"{p}.0.{norm}.bias"] = rand(g, d, kind="bias")
                state[f"{p}.0.to_q.weight"] = rand(g, inner, d)
                state[f"{p}.0.to_kv.weight"] = rand(g, 2 * inner, d)
                state[f"{p}.0.to_out.weight"] = rand(g, d, inner)
                state[f"{p}.1.0.weight"] = rand(g, d, kind="norm")
                state[f"{p}.1.0.bias"] = rand(g, d, kind="bias")
                state[f"{p}.1.1.weight"] = rand(g, 4 * d, d)
                state[f"{p}.1.3.weight"] = rand(g, d, 4 * d)
        else:
            state["image_proj.proj.weight"] = rand(g, 4 * cross, embed_dim)
            state["image_proj.proj.bias"] = rand(g, 4 * cross, kind="bias")
            state["image_proj.norm.weight"] = rand(g, cross, kind="norm")
            state["image_proj.norm.bias"] = rand(g, cross, kind="bias")
        for index, size in enumerate(layers):
            key = 2 * index + 1
            state[f"ip_adapter.{key}.to_k_ip.weight"] = rand(g, size, cross)
            state[f"ip_adapter.{key}.to_v_ip.weight"] = rand(g, size, cross)
        name = f"ip-adapter-plus_{family}" if plus else f"ip-adapter_{family}"
        save_file(f16_state(state), folder / f"{name}.safetensors")


def load_pipeline(family: str, adapter_dir: Path, weight_name: str):
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(FIXTURES / family), torch_dtype=torch.float32, local_files_only=True)
    bridge_flattened_clip(pipe.text_encoder)
    pipe.load_ip_adapter(str(adapter_dir), subfolder="", weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def case(adapter: str, sampler: str, scale: float, images: list[str], n: int = 1, seed: int = 5) -> dict:
    return {
        "adapter": adapter,
        "sampler": sampler,
        "scale": scale,
        "images": images,
        "n": n,
        "seed": seed,
        "steps": 4,
        "guidance_scale": 7.5,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "width": 64,
        "height": 64,
    }


CASES = {
    "sd1": {
        "base_euler_scale_0_6": case("base", "euler", 0.6, ["a"]),
        "base_ddim_two_images_scale_1": case("base", "ddim", 1.0, ["a", "b"]),
        "base_euler_scale_0_25": case("base", "euler", 0.25, ["b"]),
        "plus_euler_scale_0_5": case("plus", "euler", 0.5, ["a"]),
        "plus_euler_a_scale_1_n2": case("plus", "euler_a", 1.0, ["b"], n=2),
    },
    "sdxl": {
        "base_euler_scale_0_7": case("base", "euler", 0.7, ["a"]),
        "plus_euler_scale_0_5": case("plus", "euler", 0.5, ["b"]),
    },
}


def run_case(pipe, base_config: dict, spec: dict, images: dict, output_type: str):
    pipe.scheduler = SAMPLERS[spec["sampler"]].from_config(base_config)
    pipe.set_ip_adapter_scale(spec["scale"])
    chosen = [images[name] for name in spec["images"]]
    generators = [torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(spec["n"])]
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        ip_adapter_image=chosen[0] if len(chosen) == 1 else [chosen],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        num_images_per_prompt=spec["n"],
        generator=generators[0] if spec["n"] == 1 else generators,
        width=spec["width"],
        height=spec["height"],
        output_type=output_type,
    )
    if spec["sampler"] == "ddim":
        kwargs["eta"] = 0.0
    with torch.no_grad():
        return pipe(**kwargs).images


def main() -> None:
    image_a, image_b = reference_images()
    images_dir = FIXTURES / "images"
    image_a.save(images_dir / "ip_ref_a.png")
    image_b.save(images_dir / "ip_ref_b.png")
    # Read back so the references see exactly the pixels the Rust test decodes.
    images = {
        "a": Image.open(images_dir / "ip_ref_a.png").convert("RGB"),
        "b": Image.open(images_dir / "ip_ref_b.png").convert("RGB"),
    }
    for family, cases in CASES.items():
        adapter_dir = FIXTURES / "ip_adapters" / family
        encoder_dir = adapter_dir / "image_encoder"
        make_encoder(family, encoder_dir)
        unet_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        unet = unet_cls.from_pretrained(str(FIXTURES / family), torch_dtype=torch.float32, local_files_only=True).unet
        encoder_config = json.loads((encoder_dir / "config.json").read_text())
        make_adapters(
            family, unet, adapter_dir, encoder_config["projection_dim"], encoder_config["hidden_size"]
        )
        refs: dict[str, torch.Tensor] = {}
        for adapter in ("base", "plus"):
            weight = f"ip-adapter-plus_{family}.safetensors" if adapter == "plus" else f"ip-adapter_{family}.safetensors"
            pipe = load_pipeline(family, adapter_dir, weight)
            base_config = dict(pipe.scheduler.config)
            with torch.no_grad():
                pixels = pipe.feature_extractor(images["a"], return_tensors="pt").pixel_values
                projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
                if adapter == "base":
                    refs["encoder.pixel_values"] = pixels
                    embeds = pipe.image_encoder(pixels).image_embeds
                    refs["encoder.image_embeds"] = embeds
                    refs["base.tokens"] = projection(embeds)
                    refs["base.uncond_tokens"] = projection(torch.zeros_like(embeds))
                else:
                    hidden = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
                    refs["encoder.penultimate"] = hidden
                    refs["plus.tokens"] = projection(hidden)
                    zero = pipe.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
                    refs["plus.uncond_tokens"] = projection(zero)
            for name, spec in cases.items():
                if spec["adapter"] != adapter:
                    continue
                image = run_case(pipe, base_config, spec, images, "np")
                refs[f"pipeline.{name}.image"] = torch.from_numpy(np.round(image * 255).astype(np.uint8))
                refs[f"pipeline.{name}.latents"] = run_case(pipe, base_config, spec, images, "latent")
                print(f"{family} {name}: image mean {image.mean():.4f}")
        reference_dir = FIXTURES / "reference"
        save_file({k: v.contiguous() for k, v in refs.items()}, reference_dir / f"ip_adapter_{family}.safetensors")
        meta = {
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "images": {"a": "images/ip_ref_a.png", "b": "images/ip_ref_b.png"},
            "adapters": {
                "base": f"ip-adapter_{family}",
                "plus": f"ip-adapter-plus_{family}",
            },
            "cases": cases,
        }
        (reference_dir / f"ip_adapter_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")
        for key in sorted(refs):
            print(f"  {key:48s} {list(refs[key].shape)}")


if __name__ == "__main__":
    main()
