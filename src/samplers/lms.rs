//! Linear multistep (LMS, order 4), following diffusers' `LMSDiscreteScheduler`: the
//! next sample adds the last (up to four) derivatives weighted by the integrals of their
//! Lagrange basis polynomials over [sigma_i, sigma_{i+1}]. diffusers integrates those
//! numerically (scipy `quad`, float32 integrand); the polynomials are integrated exactly
//! here, which agrees to float32 precision.

use candle_core::{Result, Tensor};

use super::euler::ode_derivative;
use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{mul, step_inputs};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// The highest order diffusers' pipelines use (its `step(order=4)` default).
const ORDER: usize = 4;

/// An LMS run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Lms {
    table: SigmaTable,
    prediction_type: PredictionType,
    /// The latest derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    /// LMS for `steps` steps under `schedule`.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: Schedule) -> Result<Self> {
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusion)?;
        Ok(Lms {
            table: plan.into(),
            prediction_type: config.prediction_type,
            derivatives: Vec::new(),
        })
    }

    /// ∫ over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of node `current`
    /// among the nodes sigma_t, sigma_{t-1}, ..., sigma_{t-order+1}.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sigmas = &self.table.sigmas;
        let node = |k: usize| sigmas[t - k] as f64;
        // Polynomial coefficients, lowest degree first.
        let mut poly = vec![1.0f64];
        for k in (0..order).filter(|&k| k != current) {
            let denominator = node(current) - node(k);
            let mut next = vec![0.0; poly.len() + 1];
            for (degree, c) in poly.iter().enumerate() {
                next[degree + 1] += c / denominator;
                next[degree] -= c * node(k) / denominator;
            }
            poly = next;
        }
        let antiderivative = |x: f64| {
            poly.iter()
                .enumerate()
                .map(|(d, c)| c * x.powi(d as i32 + 1) / (d + 1) as f64)
                .sum::<f64>()
        };
        antiderivative(sigmas[t + 1] as f64) - antiderivative(sigmas[t] as f64)
    }
}

impl Sampler for Lms {
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
        self.derivatives.push(ode_derivative(self.prediction_type, &model_output, &sample, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        // diffusers picks the order from the step index and then zips the coefficients
        // with the derivatives it has, so a run begun part-way (img2img) computes
        // higher-order coefficients but uses only as many as it has derivatives.
        let order = (step_index + 1).min(ORDER);
        let mut update: Option<Tensor> = None;
        for (current, derivative) in self.derivatives.iter().rev().enumerate() {
            let term = mul(derivative, self.coefficient(order, step_index, current) as f32)?;
            update = Some(match update {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        let update = update.expect("at least one derivative was just pushed; this is a bug");
        (sample + update)?.to_dtype(out_dtype)
    }
}
