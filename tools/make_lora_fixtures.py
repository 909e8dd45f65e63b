"""Random LoRA-family adapters for the tiny fixtures, and diffusers' images with them.

Writes tests/fixtures/loras/<family>_<format>.safetensors (kohya with alpha, diffusers /
peft, LoCon with 3x3 convolutions, LoHa with a Tucker-core convolution, LoKr) for the
sd1 and sdxl fixtures, and tests/fixtures/reference/lora_<family>.{json,safetensors}:
the RGB8 image of each case (seed 42, euler, 5 steps, the prompts of parity_pipeline).

References: kohya / peft / LoCon files go through diffusers itself
(`load_lora_weights` + `set_adapters(weights)`). diffusers cannot load LoHa / LoKr, so
for those (and for any file diffusers refuses) the script merges the update into a copy
of the model's weights with its own implementation of the formats and runs the plain
diffusers pipeline on the merged folder. When diffusers can load a file, the script
also checks that its own merge gives the same image (a cross-check of this script).

Usage: /work/pyenv/bin/python tools/make_lora_fixtures.py   (deterministic output)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402
    FIXTURES,
    NEGATIVE_PROMPT,
    PIPELINE_PROMPT,
    SEED,
    STEPS,
    load_folder_pipeline,
    SAMPLERS,
)

LORA_DIR = FIXTURES / "loras"
REFERENCE_DIR = FIXTURES / "reference"
RANK = 4
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def weights_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {c: load_file(folder / f) for c, f in WEIGHT_FILES.items() if (folder / f).exists()}


# ---------------------------------------------------------------- LDM names (own mapping)


def ldm_names(config: dict) -> dict[str, str]:
    """diffusers UNet module prefix -> original LDM prefix, derived from the config."""
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    table = {}
    index = 1
    for b, kind in enumerate(config["down_block_types"]):
        for layer in range(layers):
            table[f"down_blocks.{b}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{b}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if b + 1 < blocks:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    table["conv_in"] = "input_blocks.0.0"
    table["conv_out"] = "out.2"
    table["time_embedding.linear_1"] = "time_embed.0"
    table["time_embedding.linear_2"] = "time_embed.2"
    table["add_embedding.linear_1"] = "label_emb.0.0"
    table["add_embedding.linear_2"] = "label_emb.0.2"
    table["mid_block.resnets.0"] = "middle_block.0"
    table["mid_block.attentions.0"] = "middle_block.1"
    table["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for b, kind in enumerate(config["up_block_types"]):
        for layer in range(layers + 1):
            table[f"up_blocks.{b}.resnets.{layer}"] = f"output_blocks.{index}.0"
            slot = 1
            if kind.startswith("CrossAttn"):
                table[f"up_blocks.{b}.attentions.{layer}"] = f"output_blocks.{index}.1"
                slot = 2
            if layer == layers and b + 1 < blocks:
                table[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return table


RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def to_ldm(module: str, table: dict[str, str]) -> str:
    for prefix in sorted(table, key=len, reverse=True):
        if module == prefix:
            return table[prefix]
        if module.startswith(prefix + "."):
            rest = module[len(prefix) + 1 :]
            if ".resnets." in prefix or prefix.startswith("mid_block.resnets"):
                rest = RESNET_LDM[rest]
            return f"{table[prefix]}.{rest}"
    raise KeyError(module)


# ---------------------------------------------------------------- building adapters


def kohya_key(family: str, component: str, module: str, ldm: dict | None) -> str:
    if component == "unet":
        name = to_ldm(module, ldm) if ldm is not None else module
        return "lora_unet_" + name.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    return prefix + module.replace(".", "_")


def pick(weights: dict, component: str, patterns: tuple[str, ...], convs: bool = False) -> list[str]:
    names = []
    for key, tensor in sorted(weights[component].items()):
        if not key.endswith(".weight") or tensor.dim() < 2:
            continue
        module = key[: -len(".weight")]
        is_conv3 = tensor.dim() == 4 and tensor.shape[-1] == 3
        if (convs and is_conv3) or any(module.endswith(p) for p in patterns):
            names.append(module)
    return names


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def low_rank_pair(gen, shape, rank):
    out, inner = shape[0], shape[1]
    kernel = list(shape[2:])
    down = torch.randn([rank, inner] + kernel, generator=gen) / (inner * max(1, np.prod(kernel))) ** 0.5
    up = torch.randn([out, rank] + [1] * len(kernel), generator=gen) * 0.35 / rank**0.5
    return down, up


def make_lora(family, weights, fmt, gen, ldm):
    """Returns {tensor name: tensor} for format fmt ('kohya', 'peft', 'locon')."""
    state = {}
    components = ["unet", "text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in weights else [])
    for component in components:
        patterns = ATTENTION if component == "unet" else TEXT
        modules = pick(weights, component, patterns, convs=(fmt == "locon" and component == "unet"))
        if fmt == "locon" and component == "unet":
            modules += pick(weights, component, ("time_emb_proj", "conv_shortcut"))
        for module in sorted(set(modules)):
            shape = list(weights[component][module + ".weight"].shape)
            down, up = low_rank_pair(gen, shape, RANK)
            if fmt == "peft":
                base = f"{component}.{module}"
                state[f"{base}.lora_A.weight"] = down
                state[f"{base}.lora_B.weight"] = up
            else:
                key = kohya_key(family, component, module, ldm)
                state[f"{key}.lora_down.weight"] = down.half()
                state[f"{key}.lora_up.weight"] = up.half()
                state[f"{key}.alpha"] = torch.tensor(float(RANK) / 2, dtype=torch.float16)
    return state


def make_loha(family, weights, gen, ldm):
    state = {}
    unet = pick(weights, "unet", ("attn1.to_q", "attn2.to_v", "ff.net.2"))
    convs = pick(weights, "unet", (), convs=True)[:4]
    text = pick(weights, "text_encoder", ("q_proj", "fc1"))
    for component, modules in (("unet", unet + convs), ("text_encoder", text)):
        for i, module in enumerate(modules):
            shape = list(weights[component][module + ".weight"].shape)
            key = kohya_key(family, component, module, ldm)
            out, inner = shape[0], int(np.prod(shape[1:]))
            tucker = len(shape) == 4 and i % 2 == 1
            for side in ("1", "2"):
                if tucker:
                    state[f"{key}.hada_t{side}"] = torch.randn(RANK, RANK, shape[2], shape[3], generator=gen) * 0.5
                    state[f"{key}.hada_w{side}_a"] = torch.randn(RANK, out, generator=gen) * 0.5
                    state[f"{key}.hada_w{side}_b"] = torch.randn(RANK, shape[1], generator=gen) * 0.5 / shape[1] ** 0.5
                else:
                    state[f"{key}.hada_w{side}_a"] = torch.randn(out, RANK, generator=gen) * 0.5
                    state[f"{key}.hada_w{side}_b"] = torch.randn(RANK, inner, generator=gen) * 0.5 / inner**0.5
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    return state


def make_lokr(family, weights, gen, ldm):
    state = {}
    unet = pick(weights, "unet", ("attn1.to_k", "ff.net.0.proj"))
    convs = pick(weights, "unet", (), convs=True)[:2]
    text = pick(weights, "text_encoder", ("fc1", "v_proj"))
    for component, modules in (("unet", unet + convs), ("text_encoder", text)):
        for i, module in enumerate(modules):
            shape = list(weights[component][module + ".weight"].shape)
            key = kohya_key(family, component, module, ldm)
            a = next(f for f in (4, 2, 1) if shape[0] % f == 0)
            b = next(f for f in (4, 2, 1) if shape[1] % f == 0)
            c, d = shape[0] // a, shape[1] // b
            state[f"{key}.lokr_w1"] = torch.randn(a, b, generator=gen) * 0.5
            if len(shape) == 4:
                state[f"{key}.lokr_w2"] = torch.randn(c, d, shape[2], shape[3], generator=gen) * 0.3 / (d * 9) ** 0.5
            elif i % 2 == 0:
                state[f"{key}.lokr_w2_a"] = torch.randn(c, RANK, generator=gen) * 0.5
                state[f"{key}.lokr_w2_b"] = torch.randn(RANK, d, generator=gen) * 0.5 / d**0.5
                state[f"{key}.alpha"] = torch.tensor(float(RANK) * 2)
            else:
                state[f"{key}.lokr_w2"] = torch.randn(c, d, generator=gen) * 0.5 / d**0.5
    return state


# ---------------------------------------------------------------- own merge (reference)


def deltas_of(family: str, state: dict, weights: dict, ldm) -> dict[tuple[str, str], torch.Tensor]:
    """(component, weight name) -> scale * delta, for every layer of the file."""
    lookup = {}
    for component, tensors in weights.items():
        for key in tensors:
            if key.endswith(".weight"):
                module = key[: -len(".weight")]
                try:
                    lookup[kohya_key(family, component, module, ldm if component == "unet" else None)] = (component, key)
                except KeyError:  # norms and other layers with no LDM name here
                    pass
                lookup[f"{component}.{module}"] = (component, key)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        module, _, param = name.rpartition(".")
        if param == "weight":
            module, _, param = module.rpartition(".")
        groups.setdefault(module, {})[param] = tensor.float()
    result = {}
    for module, p in groups.items():
        component, key = lookup[module]
        shape = weights[component][key].shape
        if "lora_down" in p or "lora_A" in p:
            down, up = p.get("lora_down", p.get("lora_A")), p.get("lora_up", p.get("lora_B"))
            delta = up.flatten(1) @ down.flatten(1)
            rank = down.shape[0]
        elif "hada_w1_a" in p:
            if "hada_t1" in p:
                w1 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
                w2 = torch.einsum("ijkl,jr,ip->prkl", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
            else:
                w1 = p["hada_w1_a"] @ p["hada_w1_b"]
                w2 = p["hada_w2_a"] @ p["hada_w2_b"]
            delta = (w1.reshape(shape) * w2.reshape(shape))
            rank = p["hada_w1_b"].shape[0]
        else:
            w1 = p["lokr_w1"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            if w2.dim() == 4:
                delta = torch.kron(w1[:, :, None, None], w2)
            else:
                delta = torch.kron(w1, w2)
            rank = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
        alpha = p.get("alpha")
        scale = float(alpha) / rank if alpha is not None and rank else 1.0
        result[(component, key)] = delta.reshape(shape) * scale
    return result


def merged_folder(base: Path, family: str, loras: list[tuple[dict, float]], ldm, out: Path) -> Path:
    shutil.copytree(base, out)
    weights = weights_of(base)
    merged = {c: {k: v.clone() for k, v in t.items()} for c, t in weights.items()}
    for state, weight in loras:
        for (component, key), delta in deltas_of(family, state, weights, ldm).items():
            merged[component][key] = merged[component][key] + weight * delta
    for component, tensors in merged.items():
        save_file(tensors, str(out / WEIGHT_FILES[component]))
    return out


# ---------------------------------------------------------------- images


def run(pipe, scheduler_config) -> np.ndarray:
    pipe.scheduler = SAMPLERS["euler"].from_config(scheduler_config)
    with torch.no_grad():
        image = pipe(
            prompt=PIPELINE_PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def is_unet_key(key: str) -> bool:
    return key.startswith("lora_unet_") or key.startswith("unet.")


def diffusers_image(family, folder, files: list[tuple[Path, float]], ldm):
    """The UNet part goes through diffusers' LoRA loader. diffusers 0.42 cannot put LoRAs
    on transformers 5's flattened CLIP (its text-encoder loader finds no layers), so the
    text-encoder part is merged by this script's own code."""
    with tempfile.TemporaryDirectory() as tmp:
        text_parts = [({k: v for k, v in load_file(str(p)).items() if not is_unet_key(k)}, w) for p, w in files]
        merged = merged_folder(folder, family, text_parts, ldm, Path(tmp) / "m")
        pipe = load_folder_pipeline(family, merged)
        config = pipe.scheduler.config
        names = []
        for i, (path, _) in enumerate(files):
            unet_part = {k: v for k, v in load_file(str(path)).items() if is_unet_key(k)}
            pipe.load_lora_weights(unet_part, adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, adapter_weights=[w for _, w in files])
        return run(pipe, config)


def merged_image(family, folder, files, ldm):
    with tempfile.TemporaryDirectory() as tmp:
        loras = [(load_file(str(path)), weight) for path, weight in files]
        merged = merged_folder(folder, family, loras, ldm, Path(tmp) / "m")
        pipe = load_folder_pipeline(family, merged)
        return run(pipe, pipe.scheduler.config)


def main() -> None:
    LORA_DIR.mkdir(parents=True, exist_ok=True)
    for family in ("sd1", "sdxl"):
        folder = FIXTURES / family
        weights = weights_of(folder)
        unet_config = json.loads((folder / "unet/config.json").read_text())
        # kohya's SDXL trainer names UNet layers by the original LDM modules.
        ldm = ldm_names(unet_config) if family == "sdxl" else None
        gen = torch.Generator().manual_seed(1234 if family == "sd1" else 5678)
        files = {
            "kohya": make_lora(family, weights, "kohya", gen, ldm),
            "peft": make_lora(family, weights, "peft", gen, ldm),
            "locon": make_lora(family, weights, "locon", gen, ldm),
            "loha": make_loha(family, weights, gen, ldm),
            "lokr": make_lokr(family, weights, gen, ldm),
        }
        paths = {}
        for fmt, state in files.items():
            path = LORA_DIR / f"{family}_{fmt}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"ss_network_dim": str(RANK), "format": fmt})
            paths[fmt] = path
        cases = {
            "base": [],
            "kohya": [("kohya", 0.8)],
            "peft": [("peft", 1.0)],
            "locon": [("locon", 0.7)],
            "loha": [("loha", 0.9)],
            "lokr": [("lokr", 1.0)],
            "two": [("kohya", 0.6), ("locon", -0.5)],
        }
        refs, meta = {}, {}
        base_image = None
        for name, chosen in cases.items():
            chosen_files = [(paths[fmt], weight) for fmt, weight in chosen]
            merged = merged_image(family, folder, chosen_files, ldm)
            source = "merged"
            image = merged
            if chosen and all(fmt in ("kohya", "peft", "locon") for fmt, _ in chosen):
                try:
                    image = diffusers_image(family, folder, chosen_files, ldm)
                    source = "diffusers"
                    cross = int(np.abs(image.astype(int) - merged.astype(int)).max())
                    print(f"{family}/{name}: diffusers vs own merge max |d| = {cross}/255")
                    assert cross <= 2, "own merge disagrees with diffusers"
                except Exception as error:  # diffusers refuses some key layouts
                    print(f"{family}/{name}: diffusers could not load it ({error!r:.200}); using own merge")
            if name == "base":
                base_image = image
            else:
                change = int(np.abs(image.astype(int) - base_image.astype(int)).max())
                print(f"{family}/{name}: {source}, differs from base by {change}/255")
                assert change > 10, "the adapter barely changes the image"
            refs[f"{name}.image"] = torch.from_numpy(np.ascontiguousarray(image))
            meta[name] = {
                "loras": [{"file": f"{family}_{fmt}.safetensors", "weight": w} for fmt, w in chosen],
                "reference": source if chosen else "diffusers",
                "prompt": PIPELINE_PROMPT,
                "negative_prompt": NEGATIVE_PROMPT,
                "seed": SEED,
                "steps": STEPS,
                "sampler": "euler",
                "guidance_scale": 7.5,
                "width": 64,
                "height": 64,
            }
        save_file(refs, str(REFERENCE_DIR / f"lora_{family}.safetensors"))
        (REFERENCE_DIR / f"lora_{family}.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
