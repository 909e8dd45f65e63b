"""Reference outputs of diffusers' tiled VAE (AutoencoderKL.enable_tiling) on the tiny
sd1 fixture, for tests/vae_tiling.rs.

The fixture VAE's own config (sample_size 64, four levels) gives 64-pixel / 8-latent
tiles, so a 16x16 latent (128x128 image) decodes in 3x3 tiles and a 136x136 image encodes
in 3x3 tiles: tiling really applies. Inputs are made here from a fixed seed and stored.

    /work/pyenv/bin/python tools/make_vae_tiling_refs.py
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/reference"


def main():
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(ROOT / "tests/fixtures/sd1/vae").float().eval()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    # A smooth image with some detail: tiles must blend it back together.
    ys = torch.linspace(-1, 1, 136).view(1, 1, 136, 1)
    xs = torch.linspace(-1, 1, 136).view(1, 1, 1, 136)
    image = torch.cat(
        [torch.sin(3 * xs + 2 * ys), torch.cos(4 * ys - xs), torch.sin(5 * xs * ys)], dim=1
    ).clamp(-1, 1)
    # Stored as f16 (exact), so the encoder sees exactly what the Rust test reads.
    image = image.half().float()
    with torch.no_grad():
        vae.disable_tiling()
        untiled = vae.decode(latents).sample
        vae.enable_tiling()
        assert vae.tile_latent_min_size == 8 and vae.tile_sample_min_size == 64
        tiled = vae.decode(latents).sample
        moments = vae._tiled_encode(image)
    tensors = {
        "latents": latents.contiguous(),
        "decoded_tiled": tiled.contiguous(),
        "image": image.half().contiguous(),
        "encoded_tiled_mean": moments[:, :4].contiguous(),
        "encoded_tiled_logvar": moments[:, 4:].clamp(-30.0, 20.0).contiguous(),
    }
    save_file(tensors, OUT / "vae_tiling_sd1.safetensors")
    meta = {
        "source": "tools/make_vae_tiling_refs.py",
        "diffusers": __import__("diffusers").__version__,
        "tile_sample_min_size": vae.tile_sample_min_size,
        "tile_latent_min_size": vae.tile_latent_min_size,
        "tile_overlap_factor": vae.tile_overlap_factor,
        "tiled_vs_untiled_max_abs": float((tiled - untiled).abs().max()),
    }
    (OUT / "vae_tiling_sd1.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(meta)


if __name__ == "__main__":
    main()
