//! TCD (A1111-style "TCD"), following diffusers' `TCDScheduler` (Trajectory Consistency
//! Distillation's strategic stochastic sampling). Each step predicts x0 and the noise (any
//! prediction type), jumps to the intermediate timestep s = floor((1 − γ) · t_prev), then,
//! except at the last step, re-noises from s to the next timestep with fresh noise from
//! the request's generators (per batch item). γ ("gamma", diffusers' `eta` argument of
//! `step`) is the request's `eta`: 0 is deterministic, 1 fully stochastic; the default
//! 0.3 is `TCDScheduler.step`'s default and the TCD authors' recommendation (diffusers'
//! `StableDiffusionPipeline` itself passes `eta=0` unless told otherwise). Timesteps are
//! LCM's (from `original_inference_steps`, see [`super::lcm`]).

use candle_core::{Error, Result, Tensor};

use super::lcm::consistency_timesteps;
use super::schedule::{alphas_cumprod, check_epsilon_at_zero_snr, PredictionType, SchedulerConfig};
use super::sigmas::Schedule;
use super::step_math::{batch_noise, mul, step_inputs, vp_data_and_noise};
use super::step_table::AlphaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// Only the distillation schedule.
pub const SCHEDULES: &[Schedule] = &[Schedule::Default];

/// γ when the request gives no `eta` (`TCDScheduler.step`'s default).
pub const DEFAULT_GAMMA: f64 = 0.3;

/// A TCD run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Tcd {
    table: AlphaTable,
    prediction_type: PredictionType,
    gamma: f32,
}

impl Tcd {
    /// TCD for `steps` steps with stochasticity `gamma` in [0, 1].
    pub fn new(config: &SchedulerConfig, steps: usize, gamma: f64) -> Result<Self> {
        if !(gamma.is_finite() && (0.0..=1.0).contains(&gamma)) {
            return Err(Error::Msg(format!("eta (TCD's gamma) must be in [0, 1], got {gamma}")));
        }
        let timesteps = consistency_timesteps(config, steps, "tcd")?;
        let alphas_cumprod = alphas_cumprod(config)?;
        check_epsilon_at_zero_snr(config, &alphas_cumprod, &timesteps, "tcd")?;
        Ok(Tcd {
            table: AlphaTable::new(timesteps, alphas_cumprod),
            prediction_type: config.prediction_type,
            gamma: gamma as f32,
        })
    }
}

impl Sampler for Tcd {
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
        let AlphaTable { train_timesteps, alphas_cumprod, .. } = &self.table;
        let steps = train_timesteps.len();
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, steps)?;

        let last = step_index + 1 == steps;
        let timestep = train_timesteps[step_index];
        let previous_timestep = if last { 0 } else { train_timesteps[step_index + 1] };
        // torch: floor((1 - gamma) * prev) with a float32 product.
        let intermediate = ((1.0 - self.gamma) * previous_timestep as f32).floor() as usize;
        let alpha_t = alphas_cumprod[timestep];
        let beta_t = 1.0 - alpha_t;
        let alpha_prev = alphas_cumprod[previous_timestep];
        let alpha_s = alphas_cumprod[intermediate];
        let beta_s = 1.0 - alpha_s;
        let (original, epsilon) = vp_data_and_noise(
            self.prediction_type,
            model_output,
            &sample,
            alpha_t.sqrt(),
            beta_t.sqrt(),
        )?;
        let noised = (mul(&original, alpha_s.sqrt())? + mul(&epsilon, beta_s.sqrt())?)?;
        if self.gamma == 0.0 || last {
            return noised.to_dtype(out_dtype);
        }
        let noise = batch_noise(generators, &noised)?;
        let ratio = alpha_prev / alpha_s;
        let next = (mul(&noised, ratio.sqrt())? + mul(&noise, (1.0 - ratio).sqrt())?)?;
        next.to_dtype(out_dtype)
    }
}
