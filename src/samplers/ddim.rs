//! DDIM, following diffusers' `DDIMScheduler` (`set_timesteps` + `step`), including
//! `eta` > 0 with per-item variance noise, `set_alpha_to_one`, the three prediction types
//! and `clip_sample` (dynamic thresholding is not supported).

use candle_core::{Error, Result, Tensor};

use super::schedule::{
    alphas_cumprod, check_epsilon_at_zero_snr, ddim_timesteps, PredictionType, SchedulerConfig,
};
use super::step_math::{batch_noise, clip, clip_range, mul, step_inputs, vp_data_and_noise};
use super::step_table::AlphaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// A DDIM run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    table: AlphaTable,
    /// ᾱ used after the last step ("previous" timestep below 0).
    final_alpha_cumprod: f32,
    /// diffusers steps back by train/steps (integer division) whatever the spacing.
    step_back: usize,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
    eta: f32,
}

impl Ddim {
    /// DDIM for `steps` steps; `eta` 0 is deterministic DDIM, 1 is DDPM-like.
    pub fn new(config: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        if !eta.is_finite() || eta < 0.0 {
            return Err(Error::Msg(format!("eta must be a finite number >= 0, got {eta}")));
        }
        let clip_range = clip_range(config)?;
        let timesteps = ddim_timesteps(config, steps)?;
        let alphas_cumprod = alphas_cumprod(config)?;
        check_epsilon_at_zero_snr(config, &alphas_cumprod, &timesteps, "ddim")?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Ddim {
            table: AlphaTable::new(timesteps, alphas_cumprod),
            final_alpha_cumprod,
            step_back: config.num_train_timesteps / steps,
            prediction_type: config.prediction_type,
            clip_range,
            eta: eta as f32,
        })
    }
}

impl Sampler for Ddim {
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
        let alpha_prev = match timestep.checked_sub(self.step_back) {
            Some(previous) => self.table.alphas_cumprod[previous],
            None => self.final_alpha_cumprod,
        };
        let beta_t = 1.0 - alpha_t;

        let (pred_original, pred_epsilon) = vp_data_and_noise(
            self.prediction_type,
            model_output,
            &sample,
            alpha_t.sqrt(),
            beta_t.sqrt(),
        )?;
        let pred_original = clip(pred_original, self.clip_range)?;

        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = mul(&pred_epsilon, ((1.0 - alpha_prev) - std_dev * std_dev).sqrt())?;
        let mut previous = (mul(&pred_original, alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let noise = batch_noise(generators, &previous)?;
            previous = (previous + mul(&noise, std_dev)?)?;
        }
        previous.to_dtype(out_dtype)
    }
}
