"""Train the bundled "shapes" model: a tiny Stable Diffusion 1.x that draws one flat shape.

The world: 64x64 images of one shape (circle, square, triangle) in one of five colours, at one
of five positions, on a background of another of those colours, captioned
"a red circle at the top left on a blue background" ("in the center" for the middle).
Everything is generated here from a seed; a fixed list of combinations is held out of
training so tests can ask for pictures the model never saw.

Stages (CPU, meant for a shared 2-core machine; run it niced in the background):
  1. VAE (AutoencoderKL, 4 blocks: 64x64 images <-> 8x8x4 latents), on 32x32 crops.
  2. Text encoder: a small CLIP text model (real 49408-token vocabulary) left at its seeded
     random initialisation - frozen, so every caption's embedding is computed once.
  3. UNet (epsilon prediction, SD 1.x scaled_linear schedule, 1000 steps) on the VAE's
     latents with 10% of captions dropped to "" so classifier-free guidance works.
Checkpoints are written to the output folder as diffusers folders (float16) during training,
so an interrupted run still leaves a usable model. The loss curve goes to train_log.tsv.

Run from the repository root:
  nice -n 10 /work/pyenv/bin/python tools/train_shapes.py --out models/shapes
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_ASSETS = ROOT / "assets" / "clip-tokenizer"

SIZE = 64
# Colour names and the RGB the renderer paints; the Rust judge (tests/common/shapes_judge.rs)
# carries the same table.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle"]
# Shape centre in pixels for each position phrase.
POSITIONS = {
    "top left": (18, 18),
    "top right": (46, 18),
    "bottom left": (18, 46),
    "bottom right": (46, 46),
    "center": (32, 32),
}
# Combinations never shown in training: (colour, shape, position, background). Each attribute
# value still appears in training in other combinations. tests/semantic.rs prompts these.
HELD_OUT = [
    ("red", "circle", "top left", "blue"),
    ("green", "square", "bottom right", "yellow"),
    ("blue", "triangle", "center", "white"),
    ("yellow", "circle", "bottom left", "green"),
    ("white", "square", "top right", "red"),
    ("red", "triangle", "bottom right", "green"),
    ("green", "circle", "center", "blue"),
    ("blue", "square", "top left", "yellow"),
    ("yellow", "triangle", "top right", "blue"),
    ("white", "circle", "bottom right", "green"),
    ("red", "square", "center", "white"),
    ("green", "triangle", "bottom left", "red"),
    ("blue", "circle", "bottom right", "red"),
    ("yellow", "square", "center", "red"),
    ("white", "triangle", "top left", "blue"),
    ("red", "circle", "bottom left", "yellow"),
]


def caption(colour: str, shape: str, position: str, background: str) -> str:
    where = "in the center" if position == "center" else f"at the {position}"
    return f"a {colour} {shape} {where} on a {background} background"


def all_combinations() -> list[tuple[str, str, str, str]]:
    return [
        (c, s, p, b)
        for c, s, p, b in itertools.product(COLOURS, SHAPES, POSITIONS, COLOURS)
        if c != b
    ]


def render(colour, shape, position, background, rng: random.Random) -> np.ndarray:
    """One anti-aliased picture (HxWx3 float in [-1, 1]), jittered a little in place and size."""
    ss = 4  # supersampling factor for smooth edges
    cx, cy = POSITIONS[position]
    cx += rng.uniform(-2, 2)
    cy += rng.uniform(-2, 2)
    half = rng.uniform(10, 12.5)
    coords = (np.arange(SIZE * ss) + 0.5) / ss
    x, y = np.meshgrid(coords, coords)
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        h = half * 0.9
        mask = (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    elif shape == "triangle":
        # Upright isosceles triangle in the box [cx-half, cx+half] x [cy-half, cy+half].
        top, bottom = cy - half, cy + half
        t = np.clip((y - top) / (bottom - top), 0, 1)
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * half)
    else:
        raise ValueError(shape)
    cover = mask.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3))[..., None]
    fg = np.array(COLOURS[colour], dtype=np.float32) / 255.0
    bg = np.array(COLOURS[background], dtype=np.float32) / 255.0
    image = cover * fg + (1 - cover) * bg
    return (image * 2 - 1).astype(np.float32)


def render_batch(combos, rng) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(*c, rng) for c in combos])).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=SIZE,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=1.0,  # replaced by 1/std of the training latents
    )


def make_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_scheduler() -> PNDMScheduler:
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=False,
    )


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------
# Writing the diffusers folder
# ----------------------------------------------------------------------------------------


def f16(state):
    return {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def write_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
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
        link = directory / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(TOKENIZER_ASSETS / name, directory.resolve()), link)


def text_encoder_state(model) -> dict:
    out = {}
    for key, value in model.state_dict().items():
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def write_component(folder: Path, name: str, model) -> None:
    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    if name == "text_encoder":
        config = model.config.to_dict()
        config["dtype"] = "float16"
        (sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(f16(text_encoder_state(model)), sub / "model.safetensors", metadata={"format": "pt"})
    else:
        model.save_config(sub)
        save_file(f16(model.state_dict()), sub / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def write_static(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    make_scheduler().save_config(folder / "scheduler")
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["clip_sample"] = False  # as the SD 1.5 repo records it
    path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    write_tokenizer(folder / "tokenizer")


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("w")
        self.file.write("stage\tstep\tseconds\tloss\tlr\n")
        self.start = time.time()

    def __call__(self, stage, step, loss, lr):
        elapsed = time.time() - self.start
        self.file.write(f"{stage}\t{step}\t{elapsed:.0f}\t{loss:.5f}\t{lr:.2e}\n")
        self.file.flush()
        print(f"[{elapsed:6.0f}s] {stage} step {step} loss {loss:.5f} lr {lr:.2e}", flush=True)


def lr_at(fraction: float, peak: float, warmup: float = 0.03) -> float:
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))


def train_vae(args, train_combos, log: Log) -> AutoencoderKL:
    torch.manual_seed(args.seed + 1)
    rng = random.Random(args.seed + 1)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = time.time()
    budget = args.vae_minutes * 60
    step = 0
    while True:
        fraction = max(step / args.vae_steps, (time.time() - start) / budget)
        if fraction >= 1:
            break
        lr = lr_at(fraction, args.vae_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        images = render_batch(rng.choices(train_combos, k=args.vae_batch), rng)
        # 32x32 crops on the 8-pixel latent grid: a quarter of the cost, same local statistics.
        crops = []
        for image in images:
            ox, oy = rng.randrange(0, 5) * 8, rng.randrange(0, 5) * 8
            crops.append(image[:, oy : oy + 32, ox : ox + 32])
        x = torch.stack(crops)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log("vae", step, rec.item(), lr)
        step += 1
    log("vae", step, rec.item(), 0.0)
    vae.eval()
    return vae


def tune_decoder(args, vae, train_combos, log: Log) -> AutoencoderKL:
    """Trains the decoder alone on whole 64x64 pictures, the encoder frozen.

    The crop-trained decoder never saw an image border far from a crop edge and leaves
    stripes there; whole pictures fix that. The encoder (and so every latent the UNet
    learns) stays as it is, which is why this stage may also run beside UNet training.
    """
    torch.manual_seed(args.seed + 3)
    rng = random.Random(args.seed + 3)
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    start = time.time()
    budget = args.decoder_minutes * 60
    step = 0
    vae.train()
    while True:
        fraction = max(step / args.decoder_steps, (time.time() - start) / budget)
        if fraction >= 1:
            break
        lr = lr_at(fraction, args.decoder_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x = render_batch(rng.choices(train_combos, k=args.decoder_batch), rng)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log("decoder", step, loss.item(), lr)
        step += 1
    log("decoder", step, loss.item(), 0.0)
    vae.requires_grad_(True)
    vae.eval()
    return vae


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids).last_hidden_state


def train_unet(args, vae, text_encoder, tokenizer, train_combos, folder: Path, log: Log) -> UNet2DConditionModel:
    torch.manual_seed(args.seed + 2)
    rng = random.Random(args.seed + 2)
    # Fixed latent dataset: every training combination drawn several times (jittered).
    combos = [c for c in train_combos for _ in range(args.variants)]
    latents = []
    with torch.no_grad():
        for i in range(0, len(combos), 64):
            images = render_batch(combos[i : i + 64], rng)
            latents.append(vae.encode(images).latent_dist.sample())
    latents = torch.cat(latents)
    if not args.resume_unet:
        vae.register_to_config(scaling_factor=round(float(1.0 / latents.std()), 5))
    latents = latents * vae.config.scaling_factor
    print(f"latents: {tuple(latents.shape)}, scaling_factor {vae.config.scaling_factor}", flush=True)
    write_component(folder, "vae", vae)

    captions = sorted({caption(*c) for c in train_combos})
    caption_index = {c: i for i, c in enumerate(captions)}
    text_embeds = encode_captions(tokenizer, text_encoder, captions + [""])
    empty = len(captions)
    labels = torch.tensor([caption_index[caption(*c)] for c in combos])

    unet = make_unet()
    if args.resume_unet:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").float()
        unet.train()
    print(f"unet parameters: {count(unet) / 1e6:.2f}M", flush=True)
    sched = make_scheduler()
    alphas_cumprod = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.0)
    start = time.time()
    last_save = start
    budget = args.unet_minutes * 60
    step = 0
    running = None
    while True:
        fraction = max(step / args.unet_steps, (time.time() - start) / budget)
        if fraction >= 1:
            break
        lr = lr_at(fraction, args.unet_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(combos), (args.unet_batch,))
        x0 = latents[idx]
        cond = labels[idx].clone()
        cond[torch.rand(args.unet_batch) < args.caption_dropout] = empty
        context = text_embeds[cond]
        t = torch.randint(0, 1000, (args.unet_batch,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            log("unet", step, running, lr)
        if time.time() - last_save > args.save_every_minutes * 60:
            write_component(folder, "unet", unet)
            last_save = time.time()
            print(f"checkpoint at step {step}", flush=True)
        step += 1
    log("unet", step, running, 0.0)
    write_component(folder, "unet", unet)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "shapes")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-minutes", type=float, default=7)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--decoder-steps", type=int, default=5000)
    parser.add_argument("--decoder-minutes", type=float, default=20)
    parser.add_argument("--decoder-batch", type=int, default=4)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument(
        "--only-decoder",
        action="store_true",
        help="only fine-tune the decoder of the VAE already in --out (it can run beside UNet training)",
    )
    parser.add_argument(
        "--resume-unet",
        action="store_true",
        help="continue training the UNet already in --out (keeps its VAE and text encoder)",
    )
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--unet-minutes", type=float, default=30)
    parser.add_argument("--unet-batch", type=int, default=128)
    parser.add_argument("--unet-lr", type=float, default=1.5e-3)
    parser.add_argument("--variants", type=int, default=6)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--save-every-minutes", type=float, default=4)
    parser.add_argument("--benchmark", action="store_true", help="time a few steps and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    held = set(HELD_OUT)
    assert len(held) == len(HELD_OUT) and held <= set(all_combinations())
    train_combos = [c for c in all_combinations() if c not in held]
    for i, values in enumerate((COLOURS, SHAPES, POSITIONS, COLOURS)):
        assert {c[i] for c in train_combos} == set(values), "every attribute value must be trained"

    torch.manual_seed(args.seed)
    text_encoder = make_text_encoder().eval()
    tokenizer = CLIPTokenizer(str(TOKENIZER_ASSETS / "vocab.json"), str(TOKENIZER_ASSETS / "merges.txt"))
    if args.benchmark:
        rng = random.Random(0)
        vae, unet = make_vae(), make_unet()
        print(f"vae {count(vae) / 1e6:.2f}M unet {count(unet) / 1e6:.2f}M text {count(text_encoder) / 1e6:.2f}M")
        x = render_batch(rng.choices(train_combos, k=args.vae_batch), rng)[:, :, :32, :32]
        t0 = time.time()
        for _ in range(3):
            out = vae.decode(vae.encode(x).latent_dist.sample()).sample
            F.mse_loss(out, x).backward()
        print(f"vae step {(time.time() - t0) / 3:.2f}s")
        ctx = torch.randn(args.unet_batch, 77, 64)
        z = torch.randn(args.unet_batch, 4, 8, 8)
        t0 = time.time()
        for _ in range(3):
            unet(z, torch.randint(0, 1000, (args.unet_batch,)), encoder_hidden_states=ctx).sample.square().mean().backward()
        print(f"unet step {(time.time() - t0) / 3:.2f}s")
        return

    folder = args.out
    if args.resume_unet:
        # Continue the UNet of an earlier run (same VAE and text encoder) for more steps.
        vae = AutoencoderKL.from_pretrained(folder / "vae").float().eval()
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").float().eval()
        log = Log(folder.parent / f"{folder.name}-resume_log.tsv")
        train_unet(args, vae, text_encoder, tokenizer, train_combos, folder, log)
        print("done", flush=True)
        return
    if args.only_decoder:
        vae = AutoencoderKL.from_pretrained(folder / "vae").float()
        log = Log(folder.parent / f"{folder.name}-decoder_log.tsv")
        vae = tune_decoder(args, vae, train_combos, log)
        write_component(folder, "vae", vae)
        print("done", flush=True)
        return
    if folder.exists():
        shutil.rmtree(folder)
    write_static(folder)
    write_component(folder, "text_encoder", text_encoder)
    log = Log(folder.parent / f"{folder.name}-train_log.tsv")
    vae = train_vae(args, train_combos, log)
    write_component(folder, "vae", vae)
    # The UNet only needs the (now fixed) encoder; the decoder could be tuned beside it.
    vae = tune_decoder(args, vae, train_combos, log)
    write_component(folder, "vae", vae)
    train_unet(args, vae, text_encoder, tokenizer, train_combos, folder, log)
    log.file.close()
    (folder / "training").mkdir(exist_ok=True)
    shutil.move(str(log.path), folder / "training" / "train_log.tsv")
    print("done", flush=True)


if __name__ == "__main__":
    main()
