"""How far diffusers itself moves from its float32 references when its products run in
bf16 on the CPU: a yardstick for sdserve's `--cpu-matmul bf16` (tests/parity_bf16.rs).

For the tiny fixture pipelines (tests/fixtures/{sd1,sdxl}) and the cases parity_bf16.rs
checks, runs diffusers (a) under `torch.autocast("cpu", dtype=torch.bfloat16)` (matrix
products and convolutions in bf16, the rest f32: the closest analogue of sdserve's mode)
and (b) with the whole pipeline in bfloat16, and prints max |Δ| of the final latents and of
the RGB8 image against the committed float32 references. Writes nothing.

Run from the repository root:  /work/pyenv/bin/python tools/bf16_reference_error.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as fixtures  # noqa: E402

CASES = {"sd1": ["euler", "ddim", "euler_a"], "sdxl": ["euler"]}


def main() -> None:
    torch.set_num_threads(2)
    for family, names in CASES.items():
        folder = fixtures.FIXTURES / family
        meta = json.loads((fixtures.FIXTURES / "reference" / f"{family}.json").read_text())
        refs = load_file(str(fixtures.FIXTURES / "reference" / f"{family}.safetensors"))
        pipe = fixtures.load_folder_pipeline(family, folder)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        for mode in ("autocast", "bfloat16"):
            if mode == "bfloat16":
                pipe = pipe.to(torch.bfloat16)
            for name in names:
                spec = meta["cases"][name]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                    latents = fixtures.run_case(pipe, base, family, spec, "latent").float()
                    image = fixtures.run_case(pipe, base, family, spec, "np")
                image = np.round(np.asarray(image, dtype=np.float32) * 255.0).astype(np.int16)
                latent_diff = (latents - refs[f"pipeline.{name}.latents"]).abs().max().item()
                image_diff = np.abs(image - refs[f"pipeline.{name}.image"].numpy()).max()
                print(
                    f"{family}/{name} diffusers {mode}: latents max |Δ| {latent_diff:.3e}, "
                    f"image {image_diff}/255"
                )


if __name__ == "__main__":
    main()
