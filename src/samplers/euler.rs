//! Euler, following diffusers' `EulerDiscreteScheduler` with its defaults (linear sigma
//! interpolation or a per-request [`Schedule`], `s_churn` 0 so no noise is drawn,
//! final sigma 0).

use candle_core::{Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{div, mul, step_inputs};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// An Euler run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Euler {
    table: SigmaTable,
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
        Ok(Euler { table: schedule.into(), prediction_type: config.prediction_type })
    }

    /// The sigmas, one per step plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }
}

/// k-diffusion's `to_d` on the Euler family's x0 estimate: the probability-flow ODE
/// derivative dx/dsigma = (x − x0) / sigma at noise level `sigma`, as diffusers' Euler,
/// LMS and KDPM2 steps compute it. (Heun clips x0 in between, so it spells this out.)
pub(crate) fn ode_derivative(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let original = predicted_original(prediction_type, model_output, sample, sigma)?;
    div(&(sample - original)?, sigma)
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

impl Sampler for Euler {
    fn step_table(&self) -> Option<&dyn StepTable> {
        Some(&self.table)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _generators: &mut [TorchGenerator],
    ) -> Result<Tensor> {
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, self.table.timesteps.len())?;
        let sigma = self.table.sigmas[step_index];
        let derivative = ode_derivative(self.prediction_type, &model_output, &sample, sigma)?;
        let dt = self.table.sigmas[step_index + 1] - sigma;
        (sample + mul(&derivative, dt)?)?.to_dtype(out_dtype)
    }
}
