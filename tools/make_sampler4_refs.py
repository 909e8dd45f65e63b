"""Records diffusers references for the third batch of samplers (deis, lcm, tcd) and for
per-request scheduler overrides (timestep_spacing, rescale_betas_zero_snr, prediction_type).

Run with the project venv: /work/pyenv/bin/python tools/make_sampler4_refs.py
(LOOPS_ONLY=1 skips the pipeline runs). Writes:

* tests/fixtures/samplers/samplers4.json: fake denoising loops in the format of
  samplers2.json (see tools/make_sampler2_refs.py), 4 and 20 steps. "configs" holds the
  model configs; "overrides" maps a loop set to {"base": config, <overridden keys>}: the
  Rust test builds the sampler from the base config plus the request overrides, diffusers
  from the merged config. Runs may carry "eta" (TCD's gamma; absent = the default 0.3).
* tests/fixtures/reference/samplers4_<family>.{json,safetensors}: whole-pipeline runs of
  the tiny sd1 / sd2v fixtures with the scheduler swapped (seed 42), 4 and 20 steps,
  including sd1 runs with scheduler overrides.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    TCDScheduler,
)
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sampler2_refs import CONFIGS, DIFFUSERS_SCHEDULES, NEGATIVE, PROMPT, f32_list, takes_generator  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = [4, 20]
CLASSES = {
    "deis": DEISMultistepScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
NEW = [("deis", s, None) for s in ["default", "karras", "exponential", "beta"]] + [
    ("lcm", "default", None),
    ("tcd", "default", None),
    ("tcd", "default", 0.0),
    ("tcd", "default", 0.7),
]
OVERRIDABLE = [("ddim", "default", None), ("euler", "default", None), ("dpmpp_2m", "default", None)]
# loop set -> (base config, overrides, runs)
OVERRIDES = {
    "sd15_linspace": ("sd15_leading", {"timestep_spacing": "linspace"}, OVERRIDABLE + [("deis", "default", None)]),
    "sd15_trailing": ("sd15_leading", {"timestep_spacing": "trailing"}, OVERRIDABLE + [("deis", "default", None)]),
    # An epsilon model at zero SNR: DDIM divides by sqrt(alpha_bar) = 0 at t = 999 in
    # diffusers too, so only the samplers that nudge the terminal alpha_bar run here.
    "sd15_zero_snr_trailing": (
        "sd15_leading",
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        [("euler", "default", None), ("dpmpp_2m", "default", None)],
    ),
    "sd15_zero_snr_trailing_v": (
        "sd15_leading",
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        OVERRIDABLE + [("lcm", "default", None), ("tcd", "default", None)],
    ),
    "sd15_v": ("sd15_leading", {"prediction_type": "v_prediction"}, OVERRIDABLE + NEW[:1] + NEW[4:6]),
    "sd15_sample": ("sd15_leading", {"prediction_type": "sample"}, OVERRIDABLE + [("lcm", "default", None), ("tcd", "default", None)]),
}


# DDIM's class defaults (clip_sample, set_alpha_to_one true) differ from SD's shipped
# configs and from a missing key in ours; the SD values are explicit.
EXTRA = {"ddim": {"clip_sample": False, "set_alpha_to_one": False}}


def make(sampler: str, config: dict, schedule: str):
    return CLASSES[sampler].from_config({**config, **EXTRA.get(sampler, {}), **DIFFUSERS_SCHEDULES[schedule]})


def add_noise_record(sampler: str, config: dict, schedule: str) -> dict:
    """diffusers' img2img start: 6 steps, begin index 2, add_noise at timesteps[2]."""
    sched = make(sampler, config, schedule)
    sched.set_timesteps(6)
    sched.set_begin_index(2)
    original = torch.randn([1, 4, 2, 2], generator=torch.Generator("cpu").manual_seed(3))
    noise = torch.randn([1, 4, 2, 2], generator=torch.Generator("cpu").manual_seed(4))
    noised = sched.add_noise(original, noise, sched.timesteps[2:3])
    return {"sampler": sampler, "schedule": schedule, "steps": 6, "start": 2, "noised": f32_list(noised)}


def run_loop(sched, sampler: str, steps: int, eta) -> dict:
    sched.set_timesteps(steps)
    init = float(sched.init_noise_sigma)
    sample = torch.randn([2, 4, 4, 4], generator=torch.Generator("cpu").manual_seed(7)) * init
    generators = [torch.Generator("cpu").manual_seed(100), torch.Generator("cpu").manual_seed(101)]
    timesteps = [float(t) for t in sched.timesteps]
    kwargs = {"generator": generators} if takes_generator(sched) else {}
    if eta is not None:
        kwargs["eta"] = eta
    for t in sched.timesteps:
        scaled = sched.scale_model_input(sample, t)
        model_output = scaled * 0.9 + (0.01 * float(t) / 1000.0)
        sample = sched.step(model_output, t, sample, **kwargs).prev_sample
    record = {"sampler": sampler, "steps": steps, "timesteps": timesteps, "init_noise_sigma": init, "final": f32_list(sample)}
    if eta is not None:
        record["eta"] = eta
    return record


def loops() -> None:
    data = {"generated_by": "tools/make_sampler4_refs.py", "configs": CONFIGS, "overrides": {}, "loops": {}}
    for config_name, config in CONFIGS.items():
        data["loops"][config_name] = [
            {"schedule": schedule, **run_loop(make(sampler, config, schedule), sampler, steps, eta)}
            for sampler, schedule, eta in NEW
            for steps in STEPS
        ]
    data["add_noise"] = {
        config_name: [add_noise_record(sampler, config, schedule) for sampler, schedule in
                      [("deis", "default"), ("deis", "karras"), ("lcm", "default"), ("tcd", "default")]]
        for config_name, config in CONFIGS.items()
    }
    for name, (base, overrides, runs) in OVERRIDES.items():
        data["overrides"][name] = {"base": base, **overrides}
        config = {**CONFIGS[base], **overrides}
        data["loops"][name] = [
            {"schedule": schedule, **run_loop(make(sampler, config, schedule), sampler, steps, eta)}
            for sampler, schedule, eta in runs
            for steps in STEPS
        ]
    path = ROOT / "tests/fixtures/samplers/samplers4.json"
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


# Pipeline cases: name stem -> (sampler, schedule, eta, overrides).
PIPELINE_CASES = {
    "deis_default": ("deis", "default", None, {}),
    "deis_karras": ("deis", "karras", None, {}),
    "lcm_default": ("lcm", "default", None, {}),
    "tcd_default": ("tcd", "default", 0.3, {}),
}
SD1_OVERRIDE_CASES = {
    "ddim_trailing": ("ddim", "default", None, {"timestep_spacing": "trailing"}),
    # Zero SNR as it is meant to be used: trailing spacing and a v-prediction model. (An
    # epsilon model at sigma 4096 multiplies the UNet's float32 rounding by 4096 per step.)
    "euler_zero_snr_trailing_v": (
        "euler", "default", None,
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    ),
    "dpmpp_2m_v_linspace": ("dpmpp_2m", "default", None, {"timestep_spacing": "linspace", "prediction_type": "v_prediction"}),
    "deis_linspace": ("deis", "default", None, {"timestep_spacing": "linspace"}),
}


def pipelines() -> None:
    """With CASES=stem,stem only those stems are recomputed and merged into the files."""
    only = [c for c in os.environ.get("CASES", "").split(",") if c]
    for family in ("sd1", "sd2v"):
        out = ROOT / "tests/fixtures/reference"
        cases, refs = {}, {}
        if only and (out / f"samplers4_{family}.json").exists():
            cases = json.loads((out / f"samplers4_{family}.json").read_text())["cases"]
            refs = load_file(str(out / f"samplers4_{family}.safetensors"))
        pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "tests/fixtures" / family), torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        table = {**PIPELINE_CASES, **(SD1_OVERRIDE_CASES if family == "sd1" else {})}
        # Drop cases whose stem left the table.
        for name in [n for n in cases if n.rsplit("_", 1)[0] not in table]:
            del cases[name]
            refs.pop(f"{name}.latents", None)
            refs.pop(f"{name}.image", None)
        for stem, (sampler, schedule, eta, overrides) in table.items():
            if only and stem not in only:
                continue
            for steps in STEPS:
                name = f"{stem}_{steps}"
                results = {}
                for output_type in ("latent", "np"):
                    pipe.scheduler = CLASSES[sampler].from_config({**base, **EXTRA.get(sampler, {}), **overrides, **DIFFUSERS_SCHEDULES[schedule]})
                    with torch.no_grad():
                        results[output_type] = pipe(
                            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                            guidance_scale=7.5, width=64, height=64, eta=0.0 if eta is None else eta,
                            generator=torch.Generator("cpu").manual_seed(42), output_type=output_type,
                        ).images
                refs[f"{name}.latents"] = results["latent"].float().contiguous()
                refs[f"{name}.image"] = torch.from_numpy(np.round(results["np"] * 255.0).astype(np.uint8)).contiguous()
                case = {"sampler": sampler, "schedule": schedule, "steps": steps, "seed": 42,
                        "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 7.5,
                        "width": 64, "height": 64, **overrides}
                if eta is not None:
                    case["eta"] = eta
                cases[name] = case
                print(f"  {family}/{name}: latents std {results['latent'].std():.3f}")
        save_file(refs, str(out / f"samplers4_{family}.safetensors"))
        (out / f"samplers4_{family}.json").write_text(json.dumps({"family": family, "cases": cases}, indent=1, sort_keys=True) + "\n")


def main() -> None:
    if os.environ.get("CASES") is None:
        loops()
    if os.environ.get("LOOPS_ONLY") is None:
        pipelines()


if __name__ == "__main__":
    main()
