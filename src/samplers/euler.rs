//! Euler, following diffusers' `EulerDiscreteScheduler` with its defaults (linear sigma
//! interpolation or a per-request [`Schedule`], `s_churn` 0 so no noise is drawn,
//! final sigma 0).

use candle_core::{Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily, SigmaSchedule};
use super::step_math::{add_sigma_noise, as_f32, check_step_index, div, mul, step_inputs};
use super::{Sampler, TorchGenerator};

/// An Euler run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Euler {
    schedule: SigmaSchedule,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
}

impl Euler {
    /// Euler for `steps` steps with the model's own schedule.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_schedule(config, steps, Schedule::Default)
    }

    /// Euler for `steps` steps under `schedule` (diffusers' `use_*_sigmas` options).
    pub fn with_schedule(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
    ) -> Result<Self> {
        let schedule = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusion)?;
        Ok(Euler {
            timesteps: schedule.timesteps.clone(),
            schedule,
            prediction_type: config.prediction_type,
        })
    }

    /// The sigmas, one per step plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// diffusers' x0 estimate for the Euler family at noise level `sigma`.
pub(crate) fn predicted_original(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => sample - mul(model_output, sigma)?,
        PredictionType::VPrediction => {
            let variance_plus_one = sigma * sigma + 1.0;
            mul(model_output, -sigma / variance_plus_one.sqrt())? + div(sample, variance_plus_one)?
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// diffusers' `scale_model_input` for the Euler family: sample / sqrt(sigma² + 1).
pub(crate) fn scale_for_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let out_dtype = sample.dtype();
    div(&as_f32(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(out_dtype)
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma as f64
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        add_sigma_noise(original, noise, self.schedule.sigmas[step_index])
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        scale_for_sigma(sample, self.schedule.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _generators: &mut [TorchGenerator],
    ) -> Result<Tensor> {
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, self.timesteps.len())?;
        let sigma = self.schedule.sigmas[step_index];
        let original = predicted_original(self.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div(&(&sample - original)?, sigma)?;
        let dt = self.schedule.sigmas[step_index + 1] - sigma;
        (sample + mul(&derivative, dt)?)?.to_dtype(out_dtype)
    }
}
