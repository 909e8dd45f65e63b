//! Heun's second-order method, following diffusers' `HeunDiscreteScheduler`: every step
//! but the last evaluates the model twice (an Euler predictor at sigma_next, then the
//! averaged-slope corrector), so `timesteps()` repeats each inner timestep as diffusers
//! does and the last step, towards sigma 0, is a plain Euler step.

use candle_core::{Result, Tensor};

use super::euler::predicted_original;
use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{clip, div, mul, step_inputs};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// State kept between the predictor and the corrector evaluation of one step.
#[derive(Debug, Clone)]
struct Predictor {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// A Heun run of a fixed number of steps (2 × steps − 1 model evaluations).
#[derive(Debug, Clone)]
pub struct Heun {
    /// One timestep per model evaluation and diffusers' interleaved sigmas:
    /// [s0, s1, s1, ..., s(n-1), s(n-1), 0].
    table: SigmaTable,
    prediction_type: PredictionType,
    /// Not validated as the DDIM family's is ([`super::step_math::clip_range`]): like
    /// diffusers' Heun class, this clamps with whatever range the config gives, and
    /// validating here would turn configs Heun runs today into errors.
    clip_range: Option<f32>,
    predictor: Option<Predictor>,
}

/// Repeats every entry but the first (and, for sigmas, the final 0) twice, as diffusers'
/// second-order classes lay their schedules out.
pub(crate) fn interleave<T: Copy>(values: &[T], keep_last_single: bool) -> Vec<T> {
    let mut out = vec![values[0]];
    let inner_end = if keep_last_single { values.len() - 1 } else { values.len() };
    for &value in &values[1..inner_end] {
        out.push(value);
        out.push(value);
    }
    if keep_last_single {
        out.push(values[values.len() - 1]);
    }
    out
}

impl Heun {
    /// Heun for `steps` steps under `schedule`.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: Schedule) -> Result<Self> {
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusion)?;
        let timesteps: Vec<f64> =
            interleave(&plan.timesteps, false).into_iter().map(|t| t as f32 as f64).collect();
        Ok(Heun {
            table: SigmaTable {
                timesteps,
                sigmas: interleave(&plan.sigmas, true),
                init_noise_sigma: plan.init_noise_sigma,
            },
            prediction_type: config.prediction_type,
            clip_range: config.clip_sample.then_some(config.clip_sample_range as f32),
            predictor: None,
        })
    }
}

impl Sampler for Heun {
    fn step_table(&self) -> Option<&dyn StepTable> {
        Some(&self.table)
    }

    fn order(&self) -> usize {
        2
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
        let sigmas = &self.table.sigmas;
        let first_order = self.predictor.is_none();
        let (sigma, sigma_next) = if first_order {
            (sigmas[step_index], sigmas[step_index + 1])
        } else {
            (sigmas[step_index - 1], sigmas[step_index])
        };
        let sigma_input = if first_order { sigma } else { sigma_next };
        let original = clip(
            predicted_original(self.prediction_type, &model_output, &sample, sigma_input)?,
            self.clip_range,
        )?;
        let previous = match self.predictor.take() {
            None => {
                let derivative = div(&(&sample - original)?, sigma)?;
                let dt = sigma_next - sigma;
                let previous = (&sample + mul(&derivative, dt)?)?;
                self.predictor = Some(Predictor { derivative, dt, sample });
                previous
            }
            Some(predictor) => {
                let derivative = div(&(&sample - original)?, sigma_next)?;
                let averaged = div(&(predictor.derivative + derivative)?, 2.0)?;
                (predictor.sample + mul(&averaged, predictor.dt)?)?
            }
        };
        previous.to_dtype(out_dtype)
    }
}
