"""Diffusers-layout state dicts -> original LDM / A1111 single-file key names.

The single-file checkpoints people download for Stable Diffusion (``*.safetensors`` from
CompVis / Stability / A1111 / civitai) keep the key names of the original training code:
``model.diffusion_model.*`` for the UNet (input_blocks / middle_block / output_blocks),
``first_stage_model.*`` for the VAE, and the text encoders either in Hugging Face CLIP
layout (SD1 ``cond_stage_model.transformer.*``, SDXL ``conditioner.embedders.0.transformer.*``)
or in OpenCLIP layout (SD2 ``cond_stage_model.model.*``, SDXL ``conditioner.embedders.1.model.*``).

This module writes that layout from the diffusers one, so the test fixtures can carry a
single-file twin of every tiny diffusers folder. ``ldm_to_diffusers_keys`` inverts the
bijective part of the map so a round trip can be checked without diffusers.
"""
from __future__ import annotations

import math

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Renames inside one UNet residual block: diffusers name -> LDM name.
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size/crop/text-embedding conditioning lives in `label_emb` in the original code.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def _rename_resnet_tail(tail: str) -> str:
    first, _, rest = tail.partition(".")
    return f"{_UNET_RESNET_RENAMES.get(first, first)}.{rest}" if rest else tail


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to `model.diffusion_model.*` keys."""
    layers = config["layers_per_block"]
    up_types = config["up_block_types"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        parts = key.split(".")
        if module in _UNET_TOP_LEVEL:
            new = f"{_UNET_TOP_LEVEL[module]}.{param}"
        elif parts[0] == "down_blocks":
            block = int(parts[1])
            kind = parts[2]
            tail = ".".join(parts[4:])
            if kind == "resnets":
                index = 1 + block * (layers + 1) + int(parts[3])
                new = f"input_blocks.{index}.0.{_rename_resnet_tail(tail)}"
            elif kind == "attentions":
                index = 1 + block * (layers + 1) + int(parts[3])
                new = f"input_blocks.{index}.1.{tail}"
            elif kind == "downsamplers":
                # The downsampler is its own input block, after the block's resnets.
                index = (block + 1) * (layers + 1)
                new = f"input_blocks.{index}.0.op.{param}"
            else:
                raise KeyError(key)
        elif parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            tail = ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * index}.{_rename_resnet_tail(tail)}"
            elif kind == "attentions":
                new = f"middle_block.{1 + 2 * index}.{tail}"
            else:
                raise KeyError(key)
        elif parts[0] == "up_blocks":
            block = int(parts[1])
            kind = parts[2]
            tail = ".".join(parts[4:])
            if kind == "resnets":
                index = block * (layers + 1) + int(parts[3])
                new = f"output_blocks.{index}.0.{_rename_resnet_tail(tail)}"
            elif kind == "attentions":
                index = block * (layers + 1) + int(parts[3])
                new = f"output_blocks.{index}.1.{tail}"
            elif kind == "upsamplers":
                # The upsampler rides in the block's last output block, after the
                # attention when the block has one.
                index = block * (layers + 1) + layers
                slot = 2 if up_types[block].startswith("CrossAttn") else 1
                new = f"output_blocks.{index}.{slot}.conv.{param}"
            else:
                raise KeyError(key)
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[UNET_PREFIX + new] = value
    assert len(out) == len(state), "UNet key map is not one-to-one"
    return out


def _vae_resnet_tail(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def _vae_attention(tail: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    module, param = _split_param(tail)
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    new = names[module]
    if param == "weight" and value.ndim == 2:
        # The original VAE attention uses 1x1 convolutions, not linear layers.
        value = value[:, :, None, None]
    return f"{new}.{param}", value


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to `first_stage_model.*` keys."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] == "down_blocks":
            block = parts[2]
            if parts[3] == "resnets":
                new = f"{side}.down.{block}.block.{parts[4]}.{_vae_resnet_tail('.'.join(parts[5:]))}"
            else:  # downsamplers.0.conv.*
                new = f"{side}.down.{block}.downsample.conv.{parts[-1]}"
        elif parts[1] == "up_blocks":
            # diffusers counts decoder blocks from the bottom (lowest resolution) up; LDM the reverse.
            block = num_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{side}.up.{block}.block.{parts[4]}.{_vae_resnet_tail('.'.join(parts[5:]))}"
            else:  # upsamplers.0.conv.*
                new = f"{side}.up.{block}.upsample.conv.{parts[-1]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{_vae_resnet_tail('.'.join(parts[4:]))}"
            else:  # attentions.0.*
                tail, value = _vae_attention(".".join(parts[4:]), value)
                new = f"{side}.mid.attn_1.{tail}"
        else:
            raise KeyError(f"no LDM name for VAE key {key}")
        out[VAE_PREFIX + new] = value
    assert len(out) == len(state), "VAE key map is not one-to-one"
    return out


def hf_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model as the original checkpoints embed it: `<prefix>text_model.*`.

    `state` holds keys starting with `text_model.` (the layout of diffusers repos).
    Real checkpoints also carry the `position_ids` buffer; it is added here.
    """
    out = {prefix + key: value for key, value in state.items()}
    num_positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(num_positions)[None, :]
    return out


def hf_clip_to_open_clip(
    state: dict[str, torch.Tensor],
    prefix: str,
    num_layers: int,
    extra_resblock: dict[str, torch.Tensor] | None,
    text_projection: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """HF CLIP text model (keys `text_model.*`) -> OpenCLIP `<prefix>*` keys.

    `text_projection` is the OpenCLIP matrix, `[hidden, proj]`, applied as `x @ P`
    (the transpose of a HF linear weight). `extra_resblock` (OpenCLIP names without the
    `transformer.resblocks.N.` prefix) is appended as layer `num_layers`: SD2's OpenCLIP
    ViT-H has one more layer than diffusers' text encoder keeps.
    """
    out: dict[str, torch.Tensor] = {}
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer_renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for key, value in state.items():
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key == "text_projection.weight":
            continue  # written from `text_projection` below
        parts = key.split(".")
        assert parts[:3] == ["text_model", "encoder", "layers"], key
        layer = parts[3]
        module, param = _split_param(".".join(parts[4:]))
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused below
        out[f"{prefix}transformer.resblocks.{layer}.{layer_renames[module]}.{param}"] = value
    for layer in range(num_layers):
        base = f"text_model.encoder.layers.{layer}.self_attn."
        for param in ("weight", "bias"):
            fused = torch.cat([state[f"{base}{p}_proj.{param}"] for p in ("q", "k", "v")], dim=0)
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    if extra_resblock is not None:
        for name, value in extra_resblock.items():
            out[f"{prefix}transformer.resblocks.{num_layers}.{name}"] = value
    out[prefix + "text_projection"] = text_projection
    # OpenCLIP's contrastive temperature; unused for generation but present in real files.
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return out


def open_clip_resblock_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one OpenCLIP text transformer block."""
    return {
        "ln_1.weight": (hidden,),
        "ln_1.bias": (hidden,),
        "attn.in_proj_weight": (3 * hidden, hidden),
        "attn.in_proj_bias": (3 * hidden,),
        "attn.out_proj.weight": (hidden, hidden),
        "attn.out_proj.bias": (hidden,),
        "ln_2.weight": (hidden,),
        "ln_2.bias": (hidden,),
        "mlp.c_fc.weight": (intermediate, hidden),
        "mlp.c_fc.bias": (intermediate,),
        "mlp.c_proj.weight": (hidden, intermediate),
        "mlp.c_proj.bias": (hidden,),
    }


def ldm_schedule_buffers(
    beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
) -> dict[str, torch.Tensor]:
    """The DDPM buffers the original LatentDiffusion module saves beside its weights."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        # The original clips the t=0 entry (0) by repeating the t=1 value before the log.
        "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {name: value.float() for name, value in buffers.items()}
