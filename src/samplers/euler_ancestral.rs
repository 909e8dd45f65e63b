//! Euler ancestral ("Euler a"), following diffusers' `EulerAncestralDiscreteScheduler`:
//! an Euler step down to sigma_down, then fresh noise scaled by sigma_up, drawn at every
//! step (the last one included) from the per-item generators.

use candle_core::{Error, Result, Tensor};

use super::euler::ode_derivative;
use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{batch_noise, check_s_noise, diffusers_ancestral_step, mul, step_inputs};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// An Euler ancestral run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    table: SigmaTable,
    prediction_type: PredictionType,
    s_noise: f32,
}

impl EulerAncestral {
    /// Euler ancestral for `steps` steps. Models predicting the sample are refused, as
    /// diffusers does for this scheduler.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_schedule(config, steps, Schedule::Default, 1.0)
    }

    /// Euler ancestral under `schedule`; `s_noise` scales the added noise (1 = reference).
    pub fn with_schedule(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
        s_noise: f64,
    ) -> Result<Self> {
        check_s_noise(s_noise)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Msg(
                "euler_a does not support prediction_type \"sample\"; use euler or ddim"
                    .to_string(),
            ));
        }
        let schedule = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusion)?;
        Ok(EulerAncestral {
            table: schedule.into(),
            prediction_type: config.prediction_type,
            s_noise: s_noise as f32,
        })
    }

    /// The sigmas, one per step plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }
}

impl Sampler for EulerAncestral {
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
            step_inputs(model_output, step_index, sample, self.table.timesteps.len())?;
        let sigma_from = self.table.sigmas[step_index];
        let sigma_to = self.table.sigmas[step_index + 1];
        let derivative = ode_derivative(self.prediction_type, &model_output, &sample, sigma_from)?;
        let (sigma_down, sigma_up) = diffusers_ancestral_step(sigma_from, sigma_to);

        let previous = (&sample + mul(&derivative, sigma_down - sigma_from)?)?;
        let noise = batch_noise(generators, &previous)?;
        (previous + mul(&noise, sigma_up * self.s_noise)?)?.to_dtype(out_dtype)
    }
}
