//! DDPM (A1111-style "DDPM"), following diffusers' `DDPMScheduler` with
//! `variance_type="fixed_small"`: ancestral sampling over the inference timesteps, each
//! step moving to the posterior mean q(x_prev | x_t, x0) and adding noise with the
//! posterior variance, drawn from the request's generators (per batch item, as diffusers'
//! `randn_tensor`) at every step except the one at timestep 0. Timesteps as DDIM's
//! (leading by default); only the `default` schedule. `clip_sample` follows the model's
//! config (diffusers' class default, true, applies only when the config has no such key;
//! here a missing key means false, as for every other sampler).

use candle_core::{Error, Result, Tensor};

use super::schedule::{alphas_cumprod, ddim_timesteps, PredictionType, SchedulerConfig};
use super::sigmas::Schedule;
use super::step_math::{
    add_alpha_noise, batch_noise, check_step_index, mul, step_inputs, vp_data_prediction,
};
use super::{Sampler, TorchGenerator};

/// Only the model's own timesteps.
pub const SCHEDULES: &[Schedule] = &[Schedule::Default];

/// A DDPM run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Ddpm {
    timesteps: Vec<usize>,
    timesteps_f64: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
}

impl Ddpm {
    /// DDPM for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config.clip_sample
            && !(config.clip_sample_range.is_finite() && config.clip_sample_range > 0.0)
        {
            return Err(Error::Msg(format!(
                "scheduler config: clip_sample_range must be > 0, got {}",
                config.clip_sample_range
            )));
        }
        let timesteps = ddim_timesteps(config, steps)?;
        Ok(Ddpm {
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            alphas_cumprod: alphas_cumprod(config)?,
            prediction_type: config.prediction_type,
            clip_range: config.clip_sample.then_some(config.clip_sample_range as f32),
        })
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        // diffusers' `add_noise` of the class: sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) noise.
        add_alpha_noise(original, noise, self.alphas_cumprod[self.timesteps[step_index]])
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        generators: &mut [TorchGenerator],
    ) -> Result<Tensor> {
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, self.timesteps.len())?;

        let timestep = self.timesteps[step_index];
        let alpha_t = self.alphas_cumprod[timestep];
        let alpha_prev = match self.timesteps.get(step_index + 1) {
            Some(&previous) => self.alphas_cumprod[previous],
            None => 1.0,
        };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let original = vp_data_prediction(
            self.prediction_type,
            &model_output,
            &sample,
            alpha_t.sqrt(),
            beta_t.sqrt(),
        )?;
        let original = match self.clip_range {
            Some(range) => original.clamp(-range, range)?,
            None => original,
        };
        let original_coeff = (alpha_prev.sqrt() * current_beta) / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut previous = (mul(&original, original_coeff)? + mul(&sample, sample_coeff)?)?;
        if timestep > 0 {
            let noise = batch_noise(generators, &model_output)?;
            let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
            previous = (previous + mul(&noise, variance.sqrt())?)?;
        }
        previous.to_dtype(out_dtype)
    }
}
