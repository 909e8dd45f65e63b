"""Records diffusers references for the second batch of samplers (unipc, pndm, ddpm, ...).

Run with the project venv: /work/pyenv/bin/python tools/make_sampler2_refs.py [sampler ...]
With sampler ids, only those are (re)recorded and merged into the existing files.
Writes:

* tests/fixtures/samplers/samplers2.json: for the SD 1.x config (epsilon, leading) and the
  SD 2.x v-prediction config (trailing), each sampler x the schedules its diffusers class
  offers x steps (4, 20): timesteps and a fake denoising loop exactly like
  tools/make_schedule_refs.py's (sample0 = randn([2,4,4,4], seed 7) * init_noise_sigma;
  "model" = 0.9 * scale_model_input(sample) + 0.01 * t / 1000; generators seeded 100 and
  101 passed to `step` when the class takes one).
* tests/fixtures/reference/samplers2_<family>.{json,safetensors}: whole-pipeline runs of
  the tiny sd1 / sd2v fixtures with the scheduler swapped (seed 42), 4 and 20 steps.
"""

import inspect
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CONFIGS = {
    "sd15_leading": {**SD_BETAS, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"},
    "v_trailing": {**SD_BETAS, "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
}
# sampler id -> (class, extra config, schedules it is recorded with)
SAMPLERS = {
    "unipc": (UniPCMultistepScheduler, {}, ["default", "karras", "exponential", "beta"]),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}, ["default"]),
    # clip_sample is explicit: the class defaults to True, the SD configs say False.
    "ddpm": (DDPMScheduler, {"clip_sample": False}, ["default"]),
}
DIFFUSERS_SCHEDULES = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
}
STEPS = [4, 20]
# Pipeline cases: (sampler, schedule); the sd2v fixture runs the same list.
PIPELINE_CASES = {
    "unipc": [("unipc", "default"), ("unipc", "karras")],
    "pndm": [("pndm", "default")],
    "ddpm": [("ddpm", "default")],
}


def f32_list(values) -> list:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    return [float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")")) for v in arr]


def make(sampler: str, config: dict, schedule: str):
    cls, extra, _ = SAMPLERS[sampler]
    return cls.from_config({**config, **extra, **DIFFUSERS_SCHEDULES[schedule]})


def takes_generator(sched) -> bool:
    return "generator" in inspect.signature(sched.step).parameters


def run_loop(sched, sampler: str, steps: int) -> dict:
    sched.set_timesteps(steps)
    init = float(sched.init_noise_sigma)
    sample = torch.randn([2, 4, 4, 4], generator=torch.Generator("cpu").manual_seed(7)) * init
    generators = [torch.Generator("cpu").manual_seed(100), torch.Generator("cpu").manual_seed(101)]
    timesteps = [float(t) for t in sched.timesteps]
    kwargs = {"generator": generators} if takes_generator(sched) else {}
    for t in sched.timesteps:
        scaled = sched.scale_model_input(sample, t)
        model_output = scaled * 0.9 + (0.01 * float(t) / 1000.0)
        sample = sched.step(model_output, t, sample, **kwargs).prev_sample
    return {
        "sampler": sampler,
        "steps": steps,
        "timesteps": timesteps,
        "init_noise_sigma": init,
        "final": f32_list(sample),
    }


PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"


def pipelines(samplers: list) -> None:
    for family in ("sd1", "sd2v"):
        out = ROOT / "tests/fixtures/reference"
        json_path, st_path = out / f"samplers2_{family}.json", out / f"samplers2_{family}.safetensors"
        cases = json.loads(json_path.read_text())["cases"] if json_path.exists() else {}
        refs = load_file(str(st_path)) if st_path.exists() else {}
        pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "tests/fixtures" / family), torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        base = pipe.scheduler.config
        for sampler in samplers:
            for name in [n for n, c in cases.items() if c["sampler"] == sampler]:
                del cases[name]
                refs.pop(f"{name}.latents", None)
                refs.pop(f"{name}.image", None)
            for sampler_id, schedule in PIPELINE_CASES[sampler]:
                for steps in STEPS:
                    name = f"{sampler_id}_{schedule}_{steps}"
                    cls, extra, _ = SAMPLERS[sampler_id]
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
                    cases[name] = {"sampler": sampler_id, "schedule": schedule, "steps": steps, "seed": 42,
                                   "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 7.5,
                                   "width": 64, "height": 64}
                    print(f"  {family}/{name}: latents std {results['latent'].std():.3f}")
        save_file(refs, str(st_path))
        json_path.write_text(json.dumps({"family": family, "cases": cases}, indent=1, sort_keys=True) + "\n")


def main() -> None:
    samplers = sys.argv[1:] or list(SAMPLERS)
    path = ROOT / "tests/fixtures/samplers/samplers2.json"
    data = json.loads(path.read_text()) if path.exists() else {"loops": {}}
    data["generated_by"] = "tools/make_sampler2_refs.py"
    data["configs"] = CONFIGS
    for config_name, config in CONFIGS.items():
        runs = [r for r in data["loops"].get(config_name, []) if r["sampler"] not in samplers]
        for sampler in samplers:
            for schedule in SAMPLERS[sampler][2]:
                for steps in STEPS:
                    runs.append({"schedule": schedule, **run_loop(make(sampler, config, schedule), sampler, steps)})
        data["loops"][config_name] = runs
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    if os.environ.get("LOOPS_ONLY") is None:
        pipelines(samplers)


if __name__ == "__main__":
    main()
