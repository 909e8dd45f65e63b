//! `Sampler::add_noise` and `order`: every sampler of this build can start part-way
//! (img2img), at the noise level its own schedule gives the start step; a sampler that
//! does not implement it (none in this build) refuses clearly. Whole-run parity with diffusers is in
//! tests/parity_img2img.rs.

use candle_core::{Device, Tensor};

use super::{Sampler, SamplerKind, SchedulerConfig, TorchGenerator};

fn config() -> SchedulerConfig {
    serde_json::from_value(serde_json::json!({
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading"
    }))
    .unwrap()
}

/// Samplers that evaluate the model twice per step.
const TWO_EVALUATIONS: [SamplerKind; 5] = [
    SamplerKind::Heun,
    SamplerKind::Dpm2,
    SamplerKind::Dpm2A,
    SamplerKind::DpmPpSde,
    SamplerKind::DpmPp2sA,
];

#[test]
fn every_sampler_noises_an_image_to_its_start_step() {
    // The noised value itself is not monotonic along the schedule for VP samplers
    // (sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·noise), so compare the noise's share of it instead; the
    // image must not be zero for that share to exist.
    let original = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let noise = Tensor::full(1.0f32, (1, 4, 2, 2), &Device::Cpu).unwrap();
    let zeros = noise.zeros_like().unwrap();
    for kind in SamplerKind::ALL {
        let sampler = kind.build(&config(), 6).unwrap();
        let order = sampler.order();
        assert_eq!(order, if TWO_EVALUATIONS.contains(&kind) { 2 } else { 1 }, "{kind:?}");
        let start = 2 * order;
        // Noise over signal: (noised − noised without noise) / (noised without noise).
        let noise_to_signal = |step: usize| {
            let scalar = |t: Tensor| -> f32 {
                t.flatten_all().unwrap().get(0).unwrap().to_scalar().unwrap()
            };
            let noised = scalar(sampler.add_noise(&original, &noise, step).unwrap());
            let signal = scalar(sampler.add_noise(&original, &zeros, step).unwrap());
            (noised - signal) / signal
        };
        let (value, later) = (noise_to_signal(start), noise_to_signal(start + order));
        // More noise earlier in the schedule, relative to the signal kept.
        assert!(value.is_finite() && later.is_finite(), "{kind:?}");
        assert!(value > later, "{kind:?}: {value} then {later}");
        assert!(sampler.add_noise(&original, &noise, sampler.timesteps().len()).is_err());
    }
}

#[test]
fn euler_and_ddim_follow_diffusers_formulas() {
    let original = Tensor::full(0.5f32, (1, 1, 1, 1), &Device::Cpu).unwrap();
    let noise = Tensor::full(2.0f32, (1, 1, 1, 1), &Device::Cpu).unwrap();
    let scalar = |t: Tensor| t.flatten_all().unwrap().get(0).unwrap().to_scalar::<f32>().unwrap();
    let euler = super::euler::Euler::new(&config(), 6).unwrap();
    let sigma = euler.sigmas()[3];
    assert_eq!(scalar(euler.add_noise(&original, &noise, 3).unwrap()), 0.5 + 2.0 * sigma);
    let ddim = SamplerKind::Ddim.build(&config(), 6).unwrap();
    let timestep = ddim.timesteps()[3] as usize;
    let alpha = super::schedule::alphas_cumprod(&config()).unwrap()[timestep];
    let expected = 0.5 * alpha.sqrt() + 2.0 * (1.0 - alpha).sqrt();
    assert!((scalar(ddim.add_noise(&original, &noise, 3).unwrap()) - expected).abs() < 1e-6);
    // PNDM and DDPM noise at their own timestep like DDIM (PNDM's list repeats one).
    for kind in [SamplerKind::Pndm, SamplerKind::Ddpm] {
        let sampler = kind.build(&config(), 6).unwrap();
        let timestep = sampler.timesteps()[3] as usize;
        let alpha = super::schedule::alphas_cumprod(&config()).unwrap()[timestep];
        let expected = 0.5 * alpha.sqrt() + 2.0 * (1.0 - alpha).sqrt();
        let ours = scalar(sampler.add_noise(&original, &noise, 3).unwrap());
        assert!((ours - expected).abs() < 1e-6, "{kind:?}: {ours} vs {expected}");
    }
}

/// A sampler written before img2img: the default `add_noise` refuses with a clear error.
struct Legacy;

impl Sampler for Legacy {
    fn timesteps(&self) -> &[f64] {
        &[1.0]
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    fn step(
        &mut self,
        _: &Tensor,
        _: usize,
        sample: &Tensor,
        _: &mut [TorchGenerator],
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
}

#[test]
fn samplers_without_add_noise_refuse_img2img() {
    let x = Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let error = Legacy.add_noise(&x, &x, 0).unwrap_err().to_string();
    assert!(error.contains("img2img is not supported with this sampler yet"), "{error}");
    assert_eq!(Legacy.order(), 1);
}
