//! DDIM, following diffusers' `DDIMScheduler` (`set_timesteps` + `step`), including
//! `eta` > 0 with per-item variance noise, `set_alpha_to_one`, the three prediction types
//! and `clip_sample` (dynamic thresholding is not supported).

use candle_core::{Error, Result, Tensor};

use super::schedule::{
    alphas_cumprod, check_epsilon_at_zero_snr, ddim_timesteps, PredictionType, SchedulerConfig,
};
use super::step_math::{
    add_alpha_noise, batch_noise, check_step_index, mul, step_inputs, vp_data_and_noise,
};
use super::{Sampler, TorchGenerator};

/// A DDIM run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<usize>,
    timesteps_f64: Vec<f64>,
    alphas_cumprod: Vec<f32>,
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
        if config.clip_sample
            && !(config.clip_sample_range.is_finite() && config.clip_sample_range > 0.0)
        {
            return Err(Error::Msg(format!(
                "scheduler config: clip_sample_range must be > 0, got {}",
                config.clip_sample_range
            )));
        }
        let timesteps = ddim_timesteps(config, steps)?;
        let alphas_cumprod = alphas_cumprod(config)?;
        check_epsilon_at_zero_snr(config, &alphas_cumprod, &timesteps, "ddim")?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Ddim {
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_back: config.num_train_timesteps / steps,
            prediction_type: config.prediction_type,
            clip_range: config.clip_sample.then_some(config.clip_sample_range as f32),
            eta: eta as f32,
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
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
        let alpha_prev = match timestep.checked_sub(self.step_back) {
            Some(previous) => self.alphas_cumprod[previous],
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
        let pred_original = match self.clip_range {
            Some(range) => pred_original.clamp(-range, range)?,
            None => pred_original,
        };

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
