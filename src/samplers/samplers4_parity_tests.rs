//! Parity of the third batch of samplers (deis, lcm, tcd) and of per-request scheduler
//! overrides (timestep spacing, zero-SNR rescale, prediction type) against diffusers at 4
//! and 20 steps, reading `tests/fixtures/samplers/samplers4.json` (made by
//! `tools/make_sampler4_refs.py`). An overridden loop set is built from its base config
//! plus [`SchedulerOverrides`], exactly as a request's overrides reach the samplers;
//! diffusers ran the merged config.

use std::collections::BTreeMap;

use candle_core::Device;
use serde::Deserialize;

use super::parity_harness::{max_abs, read_references, replay, LoopRecord, Outcome};
use super::{
    PredictionType, SamplerKind, SamplerOptions, Schedule, SchedulerConfig, SchedulerOverrides,
    TimestepSpacing, TorchGenerator,
};

#[derive(Deserialize)]
struct References {
    configs: BTreeMap<String, SchedulerConfig>,
    overrides: BTreeMap<String, OverrideRecord>,
    loops: BTreeMap<String, Vec<Run>>,
    add_noise: BTreeMap<String, Vec<AddNoiseRecord>>,
}

/// diffusers' img2img start: `add_noise` at `timesteps[start]` after `set_begin_index`.
#[derive(Deserialize)]
struct AddNoiseRecord {
    sampler: String,
    schedule: String,
    steps: usize,
    start: usize,
    noised: Vec<f32>,
}

fn references() -> References {
    read_references("samplers4.json")
}

#[derive(Deserialize)]
struct OverrideRecord {
    base: String,
    timestep_spacing: Option<TimestepSpacing>,
    rescale_betas_zero_snr: Option<bool>,
    prediction_type: Option<PredictionType>,
}

#[derive(Deserialize)]
struct Run {
    #[serde(flatten)]
    record: LoopRecord,
    /// TCD's gamma; absent = the sampler's default.
    eta: Option<f64>,
}

/// Zero-SNR loops start at sigma 4096 (ᾱ nudged to 2^-24): Euler's latents reach ~130
/// there, so its tolerance is relative to the run's scale, like every other run here.
#[test]
fn third_batch_samplers_and_overrides_match_diffusers() {
    let refs = references();
    let mut outcome = Outcome::default();
    let mut overridden_runs = 0;
    for (set_name, runs) in &refs.loops {
        let (config, overrides) = match refs.overrides.get(set_name) {
            Some(o) => (
                &refs.configs[&o.base],
                SchedulerOverrides {
                    timestep_spacing: o.timestep_spacing,
                    rescale_betas_zero_snr: o.rescale_betas_zero_snr,
                    prediction_type: o.prediction_type,
                },
            ),
            None => (&refs.configs[set_name], SchedulerOverrides::default()),
        };
        for Run { record: run, eta } in runs {
            let context = format!(
                "{set_name} {} {} eta {eta:?} {} steps",
                run.sampler, run.schedule, run.steps
            );
            let kind = SamplerKind::from_name(&run.sampler).unwrap();
            let schedule = Schedule::from_name(&run.schedule).unwrap();
            let options = SamplerOptions { schedule, eta: *eta, s_noise: None, overrides };
            overridden_runs += usize::from(!overrides.is_empty());
            let replayed = replay(config, kind, run.steps, &options, [100, 101]);
            // Fractional (Euler linspace) timesteps may lose the last f64 bit in JSON.
            outcome.compare(&context, run, &replayed, 1e-9);
        }
    }
    assert!(overridden_runs >= 30, "only {overridden_runs} runs with overrides");
    outcome.finish();
}

/// The consistency samplers refuse more steps than their distillation schedule has, and
/// TCD's gamma outside [0, 1], with messages naming the setting.
#[test]
fn consistency_samplers_refuse_bad_settings() {
    let config = SchedulerConfig::default();
    for kind in [SamplerKind::Lcm, SamplerKind::Tcd] {
        let message = kind.build(&config, 51).err().expect("51 > 50 steps").to_string();
        assert!(message.contains("original_inference_steps (50)"), "{message}");
        assert!(kind.build(&config, 50).is_ok());
    }
    let wider = SchedulerConfig { original_inference_steps: Some(100), ..config.clone() };
    assert_eq!(SamplerKind::Lcm.build(&wider, 100).unwrap().timesteps().len(), 100);
    let options = SamplerOptions { eta: Some(1.5), ..Default::default() };
    let message = SamplerKind::Tcd.build_with(&config, 4, &options).err().unwrap().to_string();
    assert!(message.contains("gamma"), "{message}");
}

/// img2img with the new samplers: `add_noise` at the start step equals diffusers'
/// (DEIS: DPM-Solver's VP `add_noise` at the begin index; LCM/TCD: DDPM's at the start
/// timestep), within float32 rounding.
#[test]
fn new_samplers_add_noise_like_diffusers() {
    let refs = references();
    let device = Device::Cpu;
    let original = TorchGenerator::new(3).randn_tensor((1, 4, 2, 2), &device).unwrap();
    let noise = TorchGenerator::new(4).randn_tensor((1, 4, 2, 2), &device).unwrap();
    let mut checked = 0;
    for (config_name, records) in &refs.add_noise {
        let config = &refs.configs[config_name];
        for record in records {
            let kind = SamplerKind::from_name(&record.sampler).unwrap();
            let schedule = Schedule::from_name(&record.schedule).unwrap();
            let options = SamplerOptions { schedule, ..Default::default() };
            let sampler = kind.build_with(config, record.steps, &options).unwrap();
            let noised = sampler.add_noise(&original, &noise, record.start).unwrap();
            let diff = max_abs(&noised, &record.noised);
            assert!(diff < 1e-6, "{config_name} {} {}: {diff:e}", record.sampler, record.schedule);
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

/// An epsilon model at zero SNR: DDIM, LCM and TCD would divide by sqrt(ᾱ) = 0 at timestep
/// 999 (diffusers returns NaN); they refuse with a message naming the way out, while the
/// sigma samplers (ᾱ nudged, as diffusers) and a v-prediction override run.
#[test]
fn epsilon_at_zero_snr_is_refused_where_it_would_divide_by_zero() {
    let config = SchedulerConfig::default();
    let zero_snr = SchedulerOverrides {
        timestep_spacing: Some(TimestepSpacing::Trailing),
        rescale_betas_zero_snr: Some(true),
        prediction_type: None,
    };
    let options = SamplerOptions { overrides: zero_snr, ..Default::default() };
    for kind in [SamplerKind::Ddim, SamplerKind::Lcm, SamplerKind::Tcd] {
        let message = kind.build_with(&config, 4, &options).err().unwrap().to_string();
        assert!(message.contains("v_prediction"), "{kind:?}: {message}");
        let v =
            SchedulerOverrides { prediction_type: Some(PredictionType::VPrediction), ..zero_snr };
        let options = SamplerOptions { overrides: v, ..Default::default() };
        assert!(kind.build_with(&config, 4, &options).is_ok(), "{kind:?}");
    }
    for kind in [SamplerKind::Euler, SamplerKind::DpmPp2m, SamplerKind::Deis] {
        assert!(kind.build_with(&config, 4, &options).is_ok(), "{kind:?}");
    }
    // Leading spacing never reaches timestep 999: DDIM runs.
    let leading = SchedulerOverrides { timestep_spacing: None, ..zero_snr };
    let options = SamplerOptions { overrides: leading, ..Default::default() };
    assert!(SamplerKind::Ddim.build_with(&config, 4, &options).is_ok());
}
