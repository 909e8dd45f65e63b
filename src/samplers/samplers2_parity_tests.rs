//! Parity of the second batch of samplers (unipc, pndm, ...) against diffusers at 4 and 20
//! steps and every schedule their class offers, reading
//! `tests/fixtures/samplers/samplers2.json` (made by `tools/make_sampler2_refs.py`): the
//! timesteps, the initial noise scale and a fake denoising loop with the request's
//! generators.

use candle_core::Device;

use super::{SamplerKind, SamplerOptions, Schedule, TorchGenerator};

use super::schedule_parity_tests::{max_abs, References, LOOP_TOLERANCE};

#[test]
fn second_batch_samplers_match_diffusers() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/samplers/samplers2.json");
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
            if timesteps != run.timesteps {
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
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
