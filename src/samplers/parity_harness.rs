//! The loop-replay harness the sampler parity tests share: the reference files' loop
//! records (made by `tools/make_schedule_refs.py` and `tools/make_sampler{2,3,4}_refs.py`),
//! the fake denoising loop those scripts ran through diffusers, replayed here with the
//! request's generators, and the comparison of a replay with its record.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{SamplerKind, SamplerOptions, Schedule, SchedulerConfig, TorchGenerator};

/// A reference file of fake denoising loops recorded from diffusers.
#[derive(Deserialize)]
pub(super) struct References {
    pub(super) configs: BTreeMap<String, SchedulerConfig>,
    pub(super) loops: BTreeMap<String, Vec<LoopRecord>>,
}

/// One recorded run: a sampler × schedule × step count on one config.
#[derive(Deserialize)]
pub(super) struct LoopRecord {
    pub(super) schedule: String,
    pub(super) sampler: String,
    pub(super) steps: usize,
    pub(super) timesteps: Vec<f64>,
    /// Recorded for the sigma samplers only; kept for reading failures by eye (the final
    /// sample already covers them).
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) sigmas: Vec<f32>,
    pub(super) init_noise_sigma: f64,
    /// The run's `s_noise` where the reference was recorded with one (e.g. 0 for the
    /// deterministic part of a sampler whose noise cannot be reproduced).
    #[serde(default)]
    pub(super) s_noise: Option<f64>,
    #[serde(rename = "final")]
    pub(super) final_sample: Vec<f32>,
}

/// Final samples agree within 1e-4 relative to their scale: both sides compute in float32,
/// but torch's float32 sqrt/log/exp differ from Rust's by an ulp now and then.
pub(super) const LOOP_TOLERANCE: f32 = 1e-4;

/// The largest absolute difference between `ours` and `expected`.
pub(super) fn max_abs(ours: &Tensor, expected: &[f32]) -> f32 {
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), expected.len());
    ours.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// The reference file `tests/fixtures/samplers/<file_name>`, parsed as `T`.
pub(super) fn read_references<T: DeserializeOwned>(file_name: &str) -> T {
    let path = format!("{}/tests/fixtures/samplers/{file_name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("read references");
    serde_json::from_str(&text).unwrap()
}

/// What one replayed loop gave: the sampler's timesteps, initial noise scale and final
/// sample.
pub(super) struct Replay {
    pub(super) timesteps: Vec<f64>,
    pub(super) init_noise_sigma: f64,
    pub(super) sample: Tensor,
}

/// The fake loop of the reference scripts: sample0 = randn(seed 7, `[2, 4, 4, 4]`) ×
/// init_noise_sigma, "model" = 0.9 × scaled input + 0.01 t / 1000, the step's noise from
/// two generators seeded `seeds`.
pub(super) fn replay(
    config: &SchedulerConfig,
    kind: SamplerKind,
    steps: usize,
    options: &SamplerOptions,
    seeds: [u64; 2],
) -> Replay {
    let mut sampler = kind.build_with(config, steps, options).unwrap();
    let init_noise_sigma = sampler.init_noise_sigma();
    let noise = TorchGenerator::new(7).randn_tensor((2, 4, 4, 4), &Device::Cpu).unwrap();
    let mut sample = noise.affine(init_noise_sigma, 0.0).unwrap();
    let mut generators = seeds.map(TorchGenerator::new);
    let timesteps = sampler.timesteps().to_vec();
    for (index, &t) in timesteps.iter().enumerate() {
        let scaled = sampler.scale_model_input(&sample, index).unwrap();
        let model_output = scaled.affine(0.9, 0.01 * t / 1000.0).unwrap();
        sample = sampler.step(&model_output, index, &sample, &mut generators).unwrap();
    }
    Replay { timesteps, init_noise_sigma, sample }
}

/// Findings over a set of replayed runs.
#[derive(Default)]
pub(super) struct Outcome {
    /// One line per compared run (printed).
    pub(super) report: Vec<String>,
    pub(super) failures: Vec<String>,
}

impl Outcome {
    /// Compares `replay` with its record `run`: timesteps within `timestep_tolerance`
    /// (absolute), the initial noise scale within 1e-5 relative, the final sample within
    /// [`LOOP_TOLERANCE`] of its scale. Returns whether the final sample was compared
    /// (not when the timesteps already differ).
    pub(super) fn compare(
        &mut self,
        context: &str,
        run: &LoopRecord,
        replay: &Replay,
        timestep_tolerance: f64,
    ) -> bool {
        let timesteps = &replay.timesteps;
        let timestep_error =
            timesteps.iter().zip(&run.timesteps).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        if timesteps.len() != run.timesteps.len() || timestep_error > timestep_tolerance {
            self.failures
                .push(format!("{context}: timesteps {timesteps:?} vs {:?}", run.timesteps));
            return false;
        }
        let init = replay.init_noise_sigma;
        if (init - run.init_noise_sigma).abs() > 1e-5 * run.init_noise_sigma.max(1.0) {
            self.failures.push(format!("{context}: init {init} vs {}", run.init_noise_sigma));
        }
        let scale = run.final_sample.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs(&replay.sample, &run.final_sample);
        self.report.push(format!("{context}: max |diff| {diff:e} (scale {scale})"));
        if diff > LOOP_TOLERANCE * scale || diff.is_nan() {
            self.failures.push(format!("{context}: final max |diff| {diff:e}"));
        }
        true
    }

    /// Prints the report and fails the test on any failure.
    pub(super) fn finish(self) {
        println!("{}", self.report.join("\n"));
        let failures = self.failures;
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    }
}

/// Replays every loop of the [`References`] file `file_name` (the record's schedule and
/// `s_noise`, generators seeded 100 and 101) and compares it with its record; returns the
/// outcome and how many final samples were compared.
pub(super) fn replay_reference_loops(file_name: &str, timestep_tolerance: f64) -> (Outcome, usize) {
    let refs: References = read_references(file_name);
    let mut outcome = Outcome::default();
    let mut compared = 0;
    for (config_name, runs) in &refs.loops {
        let config = &refs.configs[config_name];
        for run in runs {
            let context =
                format!("{config_name} {} {} {} steps", run.sampler, run.schedule, run.steps);
            let kind = SamplerKind::from_name(&run.sampler).unwrap();
            let schedule = Schedule::from_name(&run.schedule).unwrap();
            let options = SamplerOptions { schedule, s_noise: run.s_noise, ..Default::default() };
            let replayed = replay(config, kind, run.steps, &options, [100, 101]);
            compared += usize::from(outcome.compare(&context, run, &replayed, timestep_tolerance));
        }
    }
    (outcome, compared)
}
