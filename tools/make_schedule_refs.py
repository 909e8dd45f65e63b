"""Records diffusers references for the per-request schedules and the sigma samplers.

Run with the project venv: /work/pyenv/bin/python tools/make_schedule_refs.py
Writes:

* tests/fixtures/samplers/schedules.json: for the SD 1.x config (epsilon, leading) and the
  SD 2.x v-prediction config (trailing), each sampler class x schedule x steps (4, 20):
  timesteps, sigmas and a fake denoising loop exactly like tools/make_sampler_refs.py's
  (sample0 = randn([2,4,4,4], seed 7) * init_noise_sigma; "model" = 0.9 *
  scale_model_input(sample) + 0.01 * t / 1000; generators seeded 100 and 101). The ComfyUI
  schedules (normal, sgm_uniform, simple, ddim_uniform) get their sigmas from the
  definitions in ComfyUI's comfy/samplers.py (re-stated below on diffusers' training
  sigmas) and are run through EulerDiscreteScheduler.set_timesteps(sigmas=...).
* tests/fixtures/reference/samplers_<family>.{json,safetensors}: whole-pipeline runs of the
  tiny sd1 / sd2v fixtures with the scheduler swapped (seed 42, the prompts of
  tools/make_fixtures.py), 4 and 20 steps.
"""

import inspect
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
)
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CONFIGS = {
    "sd15_leading": {**SD_BETAS, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"},
    "v_trailing": {**SD_BETAS, "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
# sampler id -> (class, extra config)
SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
}
DIFFUSERS_SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
COMFY_SCHEDULES = ["normal", "sgm_uniform", "simple", "ddim_uniform"]
STEPS = [4, 20]


def f32_list(values) -> list:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    return [float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")")) for v in arr]


def make(sampler: str, config: dict, schedule: str):
    cls, extra = SAMPLERS[sampler]
    full = {**config, **extra, **DIFFUSERS_SCHEDULES.get(schedule, {})}
    sched = cls.from_config(full)
    for key in DIFFUSERS_SCHEDULES.get(schedule, {}):
        if key not in inspect.signature(cls.__init__).parameters:
            return None  # the class has no such option
    return sched


def train_sigmas(config: dict) -> torch.Tensor:
    ac = EulerDiscreteScheduler.from_config(config).alphas_cumprod
    return ((1 - ac) / ac) ** 0.5


def comfy_sigmas(name: str, sigmas: torch.Tensor, steps: int) -> list:
    """ComfyUI's schedules (comfy/samplers.py) on a discrete model's sigma table."""
    log_sigmas = sigmas.log()

    def sigma_at(t):
        t = torch.clamp(t.float(), min=0, max=len(sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    if name in ("normal", "sgm_uniform"):
        start, end = float(len(sigmas) - 1), 0.0
        if name == "sgm_uniform":
            ts = torch.linspace(start, end, steps + 1)[:-1]
        else:
            ts = torch.linspace(start, end, steps)
        return [float(sigma_at(t)) for t in ts] + [0.0]
    if name == "simple":
        ss = len(sigmas) / steps
        return [float(sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    if name == "ddim_uniform":
        sigs, x = [0.0], 1
        ss = max(len(sigmas) // steps, 1)
        while x < len(sigmas):
            sigs.append(float(sigmas[x]))
            x += ss
        return sigs[::-1]
    raise ValueError(name)


def run_loop(sched, sampler: str, steps: int, custom_sigmas=None) -> dict:
    if custom_sigmas is None:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(sigmas=custom_sigmas)
    init = float(sched.init_noise_sigma)
    sample = torch.randn([2, 4, 4, 4], generator=torch.Generator("cpu").manual_seed(7)) * init
    generators = [torch.Generator("cpu").manual_seed(100), torch.Generator("cpu").manual_seed(101)]
    timesteps = [float(t) for t in sched.timesteps]
    for t in sched.timesteps:
        scaled = sched.scale_model_input(sample, t)
        model_output = scaled * 0.9 + (0.01 * float(t) / 1000.0)
        kwargs = {"generator": generators} if sampler in ("euler_a", "dpm2_a", "dpmpp_2m_sde") else {}
        sample = sched.step(model_output, t, sample, **kwargs).prev_sample
    return {
        "sampler": sampler,
        "steps": steps,
        "timesteps": timesteps,
        "sigmas": f32_list(sched.sigmas),
        "init_noise_sigma": init,
        "final": f32_list(sample),
    }


def loops() -> dict:
    out = {}
    for config_name, config in CONFIGS.items():
        runs = []
        for schedule in DIFFUSERS_SCHEDULES:
            for sampler in SAMPLERS:
                for steps in STEPS:
                    sched = make(sampler, config, schedule)
                    if sched is None:
                        continue
                    runs.append({"schedule": schedule, **run_loop(sched, sampler, steps)})
        table = train_sigmas(config)
        for schedule in COMFY_SCHEDULES:
            for steps in STEPS:
                sigmas = comfy_sigmas(schedule, table, steps)
                sched = make("euler", config, "default")
                record = run_loop(sched, "euler", steps, custom_sigmas=sigmas)
                record["comfy_sigmas"] = f32_list(sigmas)
                runs.append({"schedule": schedule, **record})
        out[config_name] = runs
    return out


PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
PIPELINE_CASES = [
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m", "default"),
    ("dpmpp_2m_sde", "default"),
    ("dpmpp_2m_sde", "karras"),
    ("heun", "default"),
    ("lms", "default"),
    ("lms", "karras"),
    ("dpm2", "karras"),
    ("dpm2_a", "default"),
    ("euler", "exponential"),
]


def pipelines() -> None:
    for family in os.environ.get("FAMILIES", "sd1,sd2v").split(","):
        pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "tests/fixtures" / family), torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        refs, cases = {}, {}
        # The SD 2.x fixture runs the cases the issue names (CPU time on the tiny model).
        cases_here = PIPELINE_CASES if family == "sd1" else PIPELINE_CASES[:6] + [("dpm2_a", "default")]
        for sampler, schedule in cases_here:
            for steps in STEPS:
                name = f"{sampler}_{schedule}_{steps}"
                cls, extra = SAMPLERS[sampler]
                results = {}
                for output_type in ("latent", "np"):
                    pipe.scheduler = cls.from_config({**base, **extra, **DIFFUSERS_SCHEDULES[schedule]})
                    with torch.no_grad():
                        results[output_type] = pipe(
                            prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                            guidance_scale=7.5, width=64, height=64,
                            generator=torch.Generator("cpu").manual_seed(42), output_type=output_type,
                        ).images
                refs[f"{name}.latents"] = results["latent"].float().contiguous()
                refs[f"{name}.image"] = torch.from_numpy(np.round(results["np"] * 255.0).astype(np.uint8)).contiguous()
                cases[name] = {"sampler": sampler, "schedule": schedule, "steps": steps, "seed": 42,
                               "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 7.5,
                               "width": 64, "height": 64}
                print(f"  {family}/{name}: latents std {results['latent'].std():.3f}")
        out = ROOT / "tests/fixtures/reference"
        save_file(refs, out / f"samplers_{family}.safetensors")
        (out / f"samplers_{family}.json").write_text(json.dumps({"family": family, "cases": cases}, indent=1) + "\n")


def main() -> None:
    path = ROOT / "tests/fixtures/samplers/schedules.json"
    if os.environ.get("FAMILIES") is None:
        data = {"generated_by": "tools/make_schedule_refs.py", "configs": CONFIGS, "loops": loops()}
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    if os.environ.get("LOOPS_ONLY") is None:
        pipelines()


if __name__ == "__main__":
    main()
