"""Make the tiny Stable Diffusion test models and their diffusers reference outputs.

Writes, under tests/fixtures/:
  sd1/, sd2v/, sdxl/                 tiny random-weight models in diffusers folder layout
  single/<family>.safetensors        the same weights under original LDM/A1111 key names
  single/<family>.config.json        the diffusers configs the single file needs (sidecar)
  reference/<family>.safetensors     inputs and outputs computed by diffusers (float32, CPU)
  reference/<family>.json            the settings of every reference pipeline run

Run from the repository root:  /work/pyenv/bin/python tools/make_fixtures.py
The output is deterministic for a given torch/diffusers/transformers version.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER_ASSETS = ROOT / "assets" / "clip-tokenizer"

TEXT_PROMPT = "a photo of an astronaut riding a horse, (detailed) 4k!"
PIPELINE_PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE_PROMPT = "blurry, low quality"
UNET_TIMESTEP = 421.0
STEPS = 5
SEED = 42
TOKEN_EMBEDDING_GRID = 32

# ----------------------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------------------


def randomize_(module: torch.nn.Module) -> None:
    """Give every parameter a non-trivial random value that f16 stores exactly.

    diffusers zero-initialises some output layers (conv_out, proj_out); left that way a
    parity test could not see a bug behind them. Matrices get N(0, 1/fan_in) so
    activations stay O(1); norm scales 1 + 0.1 N(0,1); biases 0.02 N(0,1).
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:
                if name.endswith("bias"):
                    param.copy_(0.02 * torch.randn_like(param))
                else:
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn_like(param) / math.sqrt(fan_in))
            if "token_embedding" in name:
                # The 49408-row token tables are most of the fixtures' bytes. On a 1/32 grid
                # they stay random and distinct per token but compress ~2.5x in git.
                param.copy_((param * TOKEN_EMBEDDING_GRID).round() / TOKEN_EMBEDDING_GRID)
            # References are computed with exactly the values the f16 files hold.
            param.copy_(param.half().float())


def check_one_d_params_are_norms_or_biases(module: torch.nn.Module) -> None:
    for name, param in module.named_parameters():
        if param.ndim == 1 and not name.endswith("bias"):
            assert "norm" in name, f"unexpected 1-D weight {name}: randomize_ treats it as a norm"


def f16_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            half = value.detach().half().contiguous()
            assert torch.equal(half.float(), value.float()), f"{key} is not exactly representable in f16"
            out[key] = half
        else:
            out[key] = value.contiguous()
    return out


# ----------------------------------------------------------------------------------------
# Model definitions
# ----------------------------------------------------------------------------------------


def clip_text_config(hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def vae_model(scaling_factor: float, force_upcast: bool) -> AutoencoderKL:
    # Four blocks, like the real SD VAE, so latents are 1/8 of the image size (64x64 -> 8x8,
    # the UNet's sample_size); two blocks would only halve it. The last block widens to 64
    # so the encoder and decoder keep a channel-changing resnet (nin_shortcut), as real ones.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=64,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def sd_scheduler_kwargs() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_family(family: str) -> dict:
    """The components of one tiny model, random weights already set and f16-rounded."""
    parts: dict = {}
    if family == "sd1":
        torch.manual_seed(1001)
        parts["unet"] = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(1002)
        parts["vae"] = vae_model(0.18215, force_upcast=True)
        torch.manual_seed(1003)
        parts["text_encoder"] = CLIPTextModel(clip_text_config("quick_gelu"))
        parts["scheduler"] = PNDMScheduler(
            **sd_scheduler_kwargs(), skip_prk_steps=True, set_alpha_to_one=False
        )
        # PNDM ignores it, but the SD 1.5 repo's scheduler_config.json records it.
        parts["extra_scheduler_config"] = {"clip_sample": False}
        parts["pad"] = {"tokenizer": "<|endoftext|>"}
    elif family == "sd2v":
        torch.manual_seed(2001)
        parts["unet"] = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=32,
        )
        torch.manual_seed(2002)
        parts["vae"] = vae_model(0.18215, force_upcast=True)
        torch.manual_seed(2003)
        parts["text_encoder"] = CLIPTextModel(clip_text_config("gelu"))
        kwargs = sd_scheduler_kwargs()
        kwargs.update(prediction_type="v_prediction", timestep_spacing="trailing")
        parts["scheduler"] = DDIMScheduler(**kwargs, set_alpha_to_one=False, clip_sample=False)
        parts["extra_scheduler_config"] = {"skip_prk_steps": True}
        parts["pad"] = {"tokenizer": "!"}
    elif family == "sdxl":
        torch.manual_seed(3001)
        parts["unet"] = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=32,
        )
        torch.manual_seed(3002)
        parts["vae"] = vae_model(0.13025, force_upcast=True)
        torch.manual_seed(3003)
        parts["text_encoder"] = CLIPTextModel(clip_text_config("quick_gelu"))
        torch.manual_seed(3004)
        parts["text_encoder_2"] = CLIPTextModelWithProjection(clip_text_config("gelu"))
        kwargs = sd_scheduler_kwargs()
        parts["scheduler"] = EulerDiscreteScheduler(
            **kwargs, interpolation_type="linear", use_karras_sigmas=False
        )
        # The SDXL base repo's scheduler_config.json carries these DDIM/PNDM keys too; they
        # matter: DDIMScheduler.from_config would otherwise default to clip_sample=True and
        # set_alpha_to_one=True.
        parts["extra_scheduler_config"] = {
            "clip_sample": False,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "sample_max_value": 1.0,
        }
        parts["pad"] = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    else:
        raise ValueError(family)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            check_one_d_params_are_norms_or_biases(parts[name])
            # Seeded right after construction so the weights do not depend on init code.
            torch.manual_seed(component_seed(family, name))
            randomize_(parts[name])
            parts[name].eval()
    return parts


def component_seed(family: str, component: str) -> int:
    return 10_000 + 100 * ["sd1", "sd2v", "sdxl"].index(family) + [
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
    ].index(component)


# ----------------------------------------------------------------------------------------
# Writing the diffusers folder
# ----------------------------------------------------------------------------------------


def text_encoder_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the `text_model.` prefix that published diffusers repos use.

    transformers 5 flattened CLIPTextModel (no `text_model.` level); it still loads the
    prefixed names, and the published repos the service must read carry them.
    """
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("text_model.") or key == "text_projection.weight":
            out[key] = value
        else:
            out["text_model." + key] = value
    return out


def write_tokenizer(directory: Path, pad_token: str) -> None:
    directory.mkdir(parents=True)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for name in ("vocab.json", "merges.txt"):
        target = os.path.relpath(TOKENIZER_ASSETS / name, directory)
        os.symlink(target, directory / name)
        assert (directory / name).resolve() == (TOKENIZER_ASSETS / name).resolve()


def model_index(family: str, parts: dict) -> dict:
    index: dict = {
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(parts["scheduler"]).__name__],
        "text_encoder": ["transformers", type(parts["text_encoder"]).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if family == "sdxl":
        index["_class_name"] = "StableDiffusionXLPipeline"
        index["force_zeros_for_empty_prompt"] = True
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["feature_extractor"] = [None, None]
        index["image_encoder"] = [None, None]
    else:
        index["_class_name"] = "StableDiffusionPipeline"
        index["feature_extractor"] = [None, None]
        index["image_encoder"] = [None, None]
        index["safety_checker"] = [None, None]
        index["requires_safety_checker"] = False
    return dict(sorted(index.items(), key=lambda kv: (not kv[0].startswith("_"), kv[0])))


def write_folder(family: str, parts: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(family, parts), indent=2) + "\n")
    for name in ("unet", "vae"):
        sub = folder / name
        parts[name].save_config(sub)
        save_file(
            f16_state(parts[name].state_dict()),
            sub / "diffusion_pytorch_model.safetensors",
            metadata={"format": "pt"},
        )
    for name in ("text_encoder", "text_encoder_2"):
        if name not in parts:
            continue
        sub = folder / name
        sub.mkdir()
        config = parts[name].config.to_dict()
        config["dtype"] = "float16"  # the stored weights' dtype, as published repos record it
        (sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(f16_state(text_encoder_state(parts[name])), sub / "model.safetensors", metadata={"format": "pt"})
    parts["scheduler"].save_config(folder / "scheduler")
    if "extra_scheduler_config" in parts:
        path = folder / "scheduler" / "scheduler_config.json"
        config = read_config(path)
        config.update(parts["extra_scheduler_config"])
        path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    for name, pad in parts["pad"].items():
        write_tokenizer(folder / name, pad)


def read_config(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------
# Single-file checkpoints
# ----------------------------------------------------------------------------------------


def extra_open_clip_layer(seed: int, hidden: int, intermediate: int) -> tuple[dict, torch.Tensor]:
    """The unused last OpenCLIP block and the text projection SD2 files carry."""
    generator = torch.Generator().manual_seed(seed)
    block = {}
    for name, shape in ldm_checkpoint.open_clip_resblock_shapes(hidden, intermediate).items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            value = 0.02 * noise if name.endswith("bias") else 1.0 + 0.1 * noise
        else:
            value = noise / math.sqrt(shape[1])
        block[name] = value.half().float()
    projection = (torch.randn(hidden, hidden, generator=generator) / math.sqrt(hidden)).half().float()
    return block, projection


def single_file_state(family: str, folder: Path) -> dict[str, torch.Tensor]:
    """Read the folder's weights back and rename them to the original checkpoint layout."""
    unet_cfg = read_config(folder / "unet" / "config.json")
    vae_cfg = read_config(folder / "vae" / "config.json")
    te_cfg = read_config(folder / "text_encoder" / "config.json")
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    te = load_file(folder / "text_encoder" / "model.safetensors")
    out = {}
    out.update(ldm_checkpoint.unet_to_ldm(unet, unet_cfg))
    out.update(ldm_checkpoint.vae_to_ldm(vae, vae_cfg))
    if family == "sd1":
        out.update(ldm_checkpoint.hf_clip_to_ldm(te, "cond_stage_model.transformer."))
        out.update(ldm_checkpoint.ldm_schedule_buffers())
    elif family == "sd2v":
        block, projection = extra_open_clip_layer(4242, te_cfg["hidden_size"], te_cfg["intermediate_size"])
        out.update(
            ldm_checkpoint.hf_clip_to_open_clip(
                te, "cond_stage_model.model.", te_cfg["num_hidden_layers"], block, projection
            )
        )
        out.update(ldm_checkpoint.ldm_schedule_buffers())
    elif family == "sdxl":
        te2 = load_file(folder / "text_encoder_2" / "model.safetensors")
        te2_cfg = read_config(folder / "text_encoder_2" / "config.json")
        out.update(ldm_checkpoint.hf_clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        # SDXL's OpenCLIP bigG is used whole (no dropped layer); its projection is stored
        # as [hidden, proj], the transpose of the HF linear weight.
        projection = te2["text_projection.weight"].t().contiguous()
        out.update(
            ldm_checkpoint.hf_clip_to_open_clip(
                te2, "conditioner.embedders.1.model.", te2_cfg["num_hidden_layers"], None, projection
            )
        )
    return out


def write_single_file(family: str, folder: Path, single_dir: Path) -> Path:
    state = single_file_state(family, folder)
    path = single_dir / f"{family}.safetensors"
    save_file(f16_state_for_single(state), path, metadata={"format": "pt"})
    sidecar = {"family": {"sd1": "sd1", "sd2v": "sd2", "sdxl": "sdxl"}[family]}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / name).exists():
            sidecar[name] = read_config(folder / name / "config.json")
    sidecar["scheduler"] = read_config(folder / "scheduler" / "scheduler_config.json")
    (single_dir / f"{family}.config.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


# The diffusion-schedule buffers and OpenCLIP's temperature stay f32, as they are small
# and a loader must cope with mixed dtypes in real files anyway.
_F32_SINGLE_KEYS = set(ldm_checkpoint.ldm_schedule_buffers()) | {"logit_scale"}


def f16_state_for_single(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.split(".")[-1] in _F32_SINGLE_KEYS:
            out[key] = value.float().contiguous()
        else:
            out.update(f16_state({key: value}))
    return out


def validate_single_file(family: str, folder: Path, path: Path, reference_pipe) -> list[str]:
    """Load the single file with diffusers' own converter; every weight must match the folder."""
    notes = []
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = pipeline_cls.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32
    )
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in components:
        expected = getattr(reference_pipe, name).state_dict()
        if family == "sdxl" and name == "text_encoder_2":
            # diffusers picks the embedder by matching the position-embedding width; the
            # tiny model's two encoders are both 32 wide, so its pipeline loader fills
            # text_encoder_2 from embedders.0. Use its OpenCLIP converter directly instead.
            got = diffusers_open_clip_conversion(getattr(loaded, name), path, "conditioner.embedders.1.model.")
            how = "diffusers convert_open_clip_checkpoint (prefix conditioner.embedders.1.model.)"
        else:
            got = getattr(loaded, name).state_dict()
            how = "diffusers from_single_file"
        missing = sorted(set(expected) - set(got))
        assert not missing, f"{family}/{name}: diffusers did not load {missing[:5]}"
        for key, value in expected.items():
            assert got[key].dtype == torch.float32, f"{family}/{name}.{key} loaded as {got[key].dtype}"
            if not torch.equal(got[key], value):
                raise AssertionError(f"{family}/{name}.{key} differs after single-file load")
        notes.append(f"{family}/{name}: {len(expected)} tensors equal via {how}")
    # Our own inverse map must also round-trip every key of the file (including the
    # OpenCLIP layer diffusers drops).
    state = load_file(path)
    assert set(state) == set(single_file_state(family, folder)), "single file keys drifted"
    return notes


def diffusers_open_clip_conversion(model, path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    checkpoint = {k: v.float() for k, v in load_file(path).items()}
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    # Compare in the model's own (flattened or not) key space.
    own_keys = set(model.state_dict())
    return {k if k in own_keys else k.removeprefix("text_model."): v for k, v in converted.items()}


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------


def text_reference(prefix: str, encoder, tokenizer, refs: dict) -> None:
    ids = tokenizer(
        TEXT_PROMPT,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    refs[f"{prefix}.input_ids"] = ids.to(torch.int64)
    refs[f"{prefix}.last_hidden_state"] = out.last_hidden_state
    refs[f"{prefix}.penultimate_hidden_state"] = out.hidden_states[-2]
    if isinstance(encoder, CLIPTextModelWithProjection):
        refs[f"{prefix}.text_embeds"] = out.text_embeds
    else:
        refs[f"{prefix}.pooled_output"] = out.pooler_output


def unet_reference(family: str, unet, refs: dict) -> None:
    generator = torch.Generator().manual_seed(7)
    context_dim = unet.config.cross_attention_dim
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, context_dim, generator=generator)
    kwargs = {}
    refs["unet.sample"] = sample
    refs["unet.timestep"] = torch.tensor([UNET_TIMESTEP])
    refs["unet.encoder_hidden_states"] = context
    if family == "sdxl":
        text_embeds = torch.randn(2, 32, generator=generator)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [128, 96, 16, 8, 64, 80]], dtype=torch.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        refs["unet.text_embeds"] = text_embeds
        refs["unet.time_ids"] = time_ids
    with torch.no_grad():
        refs["unet.output"] = unet(sample, torch.tensor(UNET_TIMESTEP), encoder_hidden_states=context, **kwargs).sample


def vae_reference(vae, refs: dict) -> None:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.stack([xs, ys, xs * ys])[None]
    image = torch.tanh(1.5 * smooth + 0.3 * torch.randn(1, 3, 64, 64, generator=generator))
    with torch.no_grad():
        decoded = vae.decode(latents).sample
        posterior = vae.encode(image).latent_dist
    refs["vae.latents"] = latents
    refs["vae.decoded"] = decoded
    refs["vae.image"] = image
    refs["vae.encoded_mean"] = posterior.mean
    refs["vae.encoded_logvar"] = posterior.logvar


SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def case(sampler: str, **overrides) -> dict:
    spec = {
        "sampler": sampler,
        "steps": STEPS,
        "guidance_scale": 7.5,
        "guidance_rescale": 0.0,
        "seed": SEED,
        "n": 1,
        "width": 64,
        "height": 64,
        "prompt": PIPELINE_PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "diffusers_clip_skip": None,
        "original_size_hw": None,
        "crops_coords_top_left": None,
        "target_size_hw": None,
    }
    for key, value in overrides.items():
        assert key in spec, key
        spec[key] = value
    return spec


def pipeline_cases(family: str) -> dict[str, dict]:
    cases = {"ddim": case("ddim"), "euler": case("euler"), "euler_a": case("euler_a")}
    if family == "sd1":
        cases["euler_a_n2"] = case("euler_a", n=2)
        cases["clip_skip2"] = case("euler", diffusers_clip_skip=1)
        cases["rescale"] = case("euler", guidance_rescale=0.7)
        cases["no_cfg"] = case("euler", guidance_scale=1.0)
        cases["size_64x96"] = case("euler", width=64, height=96)
    elif family == "sd2v":
        cases["ddim_rescale"] = case("ddim", guidance_rescale=0.7)
    elif family == "sdxl":
        cases["euler_microcond"] = case(
            "euler", original_size_hw=[128, 96], crops_coords_top_left=[16, 8], target_size_hw=[64, 80]
        )
        # diffusers zeroes the negative embeddings (force_zeros_for_empty_prompt) only when
        # no negative prompt is given at all (None); an explicit "" is encoded like any text.
        # Both behaviours get a reference so the service can choose knowingly.
        cases["euler_empty_negative"] = case("euler", negative_prompt=None)
        cases["euler_negative_empty_string"] = case("euler", negative_prompt="")
    return cases


def run_case(pipe, base_scheduler_config, family: str, spec: dict, output_type: str):
    pipe.scheduler = SAMPLERS[spec["sampler"]].from_config(base_scheduler_config)
    if spec["n"] == 1:
        generator = torch.Generator("cpu").manual_seed(spec["seed"])
    else:
        generator = [torch.Generator("cpu").manual_seed(spec["seed"] + i) for i in range(spec["n"])]
    kwargs = dict(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"],
        guidance_rescale=spec["guidance_rescale"],
        num_images_per_prompt=spec["n"],
        width=spec["width"],
        height=spec["height"],
        generator=generator,
        output_type=output_type,
        clip_skip=spec["diffusers_clip_skip"],
    )
    if spec["sampler"] == "ddim":
        kwargs["eta"] = 0.0
    if spec["diffusers_clip_skip"] is not None and family != "sdxl":
        # diffusers applies clip_skip to the prompt only; AUTOMATIC1111 (whose setting
        # "clip skip" is) applies it to the negative prompt too, and so does sdserve. Give
        # diffusers the negative embeddings encoded with the same clip skip.
        with torch.no_grad():
            negative_embeds, _ = pipe.encode_prompt(
                spec["negative_prompt"], "cpu", 1, False, clip_skip=spec["diffusers_clip_skip"]
            )
        kwargs["negative_prompt"] = None
        kwargs["negative_prompt_embeds"] = negative_embeds
    if family == "sdxl":
        for key, arg in (
            ("original_size_hw", "original_size"),
            ("crops_coords_top_left", "crops_coords_top_left"),
            ("target_size_hw", "target_size"),
        ):
            if spec[key] is not None:
                kwargs[arg] = tuple(spec[key])
    with torch.no_grad():
        return pipe(**kwargs).images


def check_sane(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        return
    assert torch.isfinite(tensor).all(), f"{name} has NaN/inf"
    assert tensor.numel() < 2 or tensor.std() > 1e-4, f"{name} is (nearly) constant"


def make_references(family: str, out_dir: Path, pipe) -> dict:
    refs: dict[str, torch.Tensor] = {}
    text_reference("text_encoder", pipe.text_encoder, pipe.tokenizer, refs)
    if family == "sdxl":
        text_reference("text_encoder_2", pipe.text_encoder_2, pipe.tokenizer_2, refs)
    unet_reference(family, pipe.unet, refs)
    vae_reference(pipe.vae, refs)
    cases = pipeline_cases(family)
    base_scheduler_config = pipe.scheduler.config
    pipe.set_progress_bar_config(disable=True)
    for name, spec in cases.items():
        image = run_case(pipe, base_scheduler_config, family, spec, "np")
        latents = run_case(pipe, base_scheduler_config, family, spec, "latent")
        image_u8 = np.round(image * 255.0).astype(np.uint8)
        assert image_u8.shape == (spec["n"], spec["height"], spec["width"], 3), image_u8.shape
        refs[f"pipeline.{name}.image"] = torch.from_numpy(image_u8)
        refs[f"pipeline.{name}.latents"] = latents.float()
        saturated = float(((image_u8 == 0) | (image_u8 == 255)).mean())
        print(
            f"  {family}/{name}: latents std {latents.std():.3f}, image mean {image.mean():.3f} "
            f"std {image.std():.3f}, saturated {saturated:.1%}"
        )
    for key, value in refs.items():
        check_sane(key, value)
        assert value.dtype in (torch.float32, torch.int64, torch.uint8), (key, value.dtype)
    save_file({k: v.contiguous() for k, v in refs.items()}, out_dir / f"{family}.safetensors")
    meta = {
        "family": family,
        "text_prompt": TEXT_PROMPT,
        "unet_timestep": UNET_TIMESTEP,
        "cases": cases,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    (out_dir / f"{family}.json").write_text(json.dumps(meta, indent=2) + "\n")
    for key in sorted(refs):
        value = refs[key]
        stats = f"mean {value.float().mean():+.4f} std {value.float().std():.4f}" if value.numel() > 1 else ""
        print(f"  {key:48s} {str(value.dtype):12s} {list(value.shape)} {stats}")
    return refs


def load_folder_pipeline(family: str, folder: Path):
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    bridge_flattened_clip(pipe.text_encoder)
    return pipe


def bridge_flattened_clip(encoder) -> None:
    """Let diffusers' clip_skip path reach `text_encoder.text_model.final_layer_norm`.

    transformers 5 flattened CLIPTextModel (no `text_model` attribute) while diffusers
    0.42's StableDiffusionPipeline.encode_prompt still reads that path for clip_skip.
    The alias bypasses nn.Module registration so state dicts stay unchanged.
    """
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm))


def check_folder_matches(family: str, parts: dict, pipe) -> None:
    """The folder, loaded by diffusers/transformers, must hold exactly the built weights."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in parts:
            continue
        expected = parts[name].state_dict()
        got = getattr(pipe, name).state_dict()
        assert set(expected) == set(got), f"{family}/{name}: key sets differ"
        for key, value in expected.items():
            assert got[key].dtype == torch.float32, f"{family}/{name}.{key}: {got[key].dtype}"
            assert torch.equal(got[key], value), f"{family}/{name}.{key} changed on reload"


def total_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    families = ["sd1", "sd2v", "sdxl"]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="sdserve-fixtures-"))
    try:
        (staging / "single").mkdir()
        (staging / "reference").mkdir()
        notes = []
        for family in families:
            print(f"== {family}")
            parts = build_family(family)
            # Build in the final place: the tokenizer symlinks are relative to it.
            folder = FIXTURES / family
            if folder.exists():
                shutil.rmtree(folder)
            write_folder(family, parts, folder)
            pipe = load_folder_pipeline(family, folder)
            check_folder_matches(family, parts, pipe)
            single = write_single_file(family, folder, staging / "single")
            notes += validate_single_file(family, folder, single, pipe)
            make_references(family, staging / "reference", pipe)
        for sub in ("single", "reference"):
            target = FIXTURES / sub
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staging / sub), str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for note in notes:
        print("validated:", note)
    size = total_size(FIXTURES)
    print(f"total size of {FIXTURES.relative_to(ROOT)}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
