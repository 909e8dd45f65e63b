"""Records diffusers scheduler behaviour for the Rust samplers' parity tests.

Run with the project venv: /work/pyenv/bin/python tools/make_sampler_refs.py
Writes tests/fixtures/samplers/references.json:

* `timesteps`: for every config and sampler class, the timesteps (and the Euler family's
  sigmas and init_noise_sigma) for many step counts, including counts where numpy's float
  `arange` makes diffusers' trailing spacing return one timestep too many.
* `loops`: a full fake denoising loop per config, sampler and step count (5 and 8):
  sample0 = randn([2,4,4,4], CPU generator seed 7) * init_noise_sigma; at each step the
  "model" returns 0.9 * scale_model_input(sample) + 0.01 * t / 1000, and
  scheduler.step(..., generator=[Generator(100), Generator(101)]). The sample after the first
  step and the final sample are stored as float32 values.
"""

import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# Each config lists its keys the way a model's scheduler_config.json would; keys a config
# leaves out take each scheduler class's own default, as diffusers' from_config does.
CONFIGS = {
    "sd15_leading": {
        **SD_BETAS,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    },
    "trailing_linear_clip": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "steps_offset": 1,
        "set_alpha_to_one": True,
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
    },
    "linspace_cosine": {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "steps_offset": 0,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
    },
    "v_prediction_leading": {
        **SD_BETAS,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "v_prediction",
        "timestep_spacing": "leading",
    },
    "zero_snr_trailing_v": {
        **SD_BETAS,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    },
    # No timestep_spacing key (like SD 1.5's PNDM config): DDIM defaults to leading, the
    # Euler classes to linspace.
    "sd15_no_spacing_key": {
        **SD_BETAS,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "clip_sample": False,
    },
}

# sampler id -> (class, extra step kwargs)
SAMPLERS = {
    "ddim": (DDIMScheduler, {"eta": 0.0}),
    "ddim_eta": (DDIMScheduler, {"eta": 0.7}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
}

TIMESTEP_COUNTS = [1, 2, 3, 4, 5, 7, 8, 10, 13, 16, 20, 25, 30, 48, 50, 61, 103, 1000]
LOOP_STEPS = [5, 8]


def make(sampler: str, config: dict):
    cls, _ = SAMPLERS[sampler]
    return cls.from_config(config)


def f32_list(values) -> list:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    # Shortest decimal that round-trips as float32: the Rust side parses it back exactly.
    return [float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")")) for v in arr]


def timesteps_record(sampler: str, config: dict, steps: int) -> dict:
    sched = make(sampler, config)
    try:
        sched.set_timesteps(steps)
        timesteps = [float(t) for t in sched.timesteps]
        if sampler.startswith("ddim"):
            bad = [t for t in timesteps if not (0 <= t < config["num_train_timesteps"])]
            if bad:
                # diffusers would index alphas_cumprod out of range (or wrap at -1).
                return {"steps": steps, "diffusers_invalid": True, "timesteps": timesteps}
    except Exception as exc:  # noqa: BLE001 - recorded as an expected error
        return {"steps": steps, "error": str(exc)}
    record = {"steps": steps, "timesteps": timesteps}
    if not sampler.startswith("ddim"):
        record["sigmas"] = f32_list(sched.sigmas)
        record["init_noise_sigma"] = float(sched.init_noise_sigma)
    return record


def run_loop(sampler: str, config: dict, steps: int) -> dict:
    _, step_kwargs = SAMPLERS[sampler]
    sched = make(sampler, config)
    sched.set_timesteps(steps)
    init = sched.init_noise_sigma
    sample = torch.randn([2, 4, 4, 4], generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    sample = sample * init
    generators = [torch.Generator("cpu").manual_seed(100), torch.Generator("cpu").manual_seed(101)]
    after_first = None
    for t in sched.timesteps:
        scaled = sched.scale_model_input(sample, t)
        model_output = scaled * 0.9 + (0.01 * float(t) / 1000.0)
        sample = sched.step(model_output, t, sample, generator=generators, **step_kwargs).prev_sample
        if after_first is None:
            after_first = sample
    return {
        "sampler": sampler,
        "steps": steps,
        "timesteps": [float(t) for t in sched.timesteps],
        "init_noise_sigma": float(init),
        "after_first_step": f32_list(after_first),
        "final": f32_list(sample),
    }


def main() -> None:
    timesteps = {}
    loops = {}
    for name, config in CONFIGS.items():
        timesteps[name] = {}
        loops[name] = []
        for sampler in SAMPLERS:
            if sampler == "ddim_eta":
                continue
            timesteps[name][sampler] = [timesteps_record(sampler, config, n) for n in TIMESTEP_COUNTS]
        for sampler in SAMPLERS:
            for steps in LOOP_STEPS:
                loops[name].append(run_loop(sampler, config, steps))
    out = {
        "generated_by": "tools/make_sampler_refs.py",
        "torch": torch.__version__,
        "configs": CONFIGS,
        "eta": {k: v[1].get("eta") for k, v in SAMPLERS.items()},
        "timesteps": timesteps,
        "loops": loops,
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "fixtures", "samplers", "references.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
