//! DDPM (A1111-style "DDPM"), following diffusers' `DDPMScheduler` with
//! `variance_type="fixed_small"`: ancestral sampling over the inference timesteps, each
//! step moving to the posterior mean q(x_prev | x_t, x0) and adding noise with the
//! posterior variance, drawn from the request's generators (per batch item, as diffusers'
//! `randn_tensor`) at every step except the one at timestep 0. Timesteps as DDIM's
//! (leading by default); only the `default` schedule. `clip_sample` follows the model's
//! config (diffusers' class default, true, applies only when the config has no such key;
//! here a missing key means false, as for every other sampler).

use candle_core::{Result, Tensor};

use super::schedule::{alphas_cumprod, ddim_timesteps, PredictionType, SchedulerConfig};
use super::sigmas::Schedule;
use super::step_math::{batch_noise, clip, clip_range, mul, step_inputs, vp_data_prediction};
use super::step_table::AlphaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// Only the model's own timesteps.
pub const SCHEDULES: &[Schedule] = &[Schedule::Default];

/// A DDPM run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Ddpm {
    table: AlphaTable,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
}

impl Ddpm {
    /// DDPM for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let clip_range = clip_range(config)?;
        let timesteps = ddim_timesteps(config, steps)?;
        Ok(Ddpm {
            table: AlphaTable::new(timesteps, alphas_cumprod(config)?),
            prediction_type: config.prediction_type,
            clip_range,
        })
    }
}

impl Sampler for Ddpm {
    fn step_table(&self) -> Option<&dyn StepTable> {
        Some(&self.table)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        generators: &mut [TorchGenerator],
    ) -> Result<Tensor> {
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, self.table.train_timesteps.len())?;

        let timestep = self.table.train_timesteps[step_index];
        let alpha_t = self.table.alphas_cumprod[timestep];
        let alpha_prev = match self.table.train_timesteps.get(step_index + 1) {
            Some(&previous) => self.table.alphas_cumprod[previous],
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
        let original = clip(original, self.clip_range)?;
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
