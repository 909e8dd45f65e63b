//! DEIS (A1111-style "DEIS"), following diffusers' `DEISMultistepScheduler` with its
//! defaults: `solver_order=2`, `algorithm_type="deis"`, `solver_type="logrho"`,
//! `lower_order_final=True`. The solver works in VP coordinates (initial noise scale 1,
//! model input unscaled) on noise predictions re-derived from the data prediction; the
//! first step is first order (DDIM-equivalent), and so is the last one when the run has
//! fewer than 15 steps, as diffusers decides it. Timesteps and sigmas are those of the
//! DPM-Solver family (integer timesteps, `default`/`karras`/`exponential`/`beta`), except
//! that diffusers' DEIS ends at the smallest training sigma instead of 0 (see
//! [`SigmaFamily::Deis`]).
//!
//! diffusers' DEIS class has no `rescale_betas_zero_snr`; here a zero-SNR config applies
//! as it does to the other sigma samplers (the terminal ᾱ nudged to 2^-24, as diffusers'
//! DPM-Solver does), so a request's override is not silently dropped.

use candle_core::{Error, Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{alpha_sigma, div, lambda, mul, step_inputs, vp_data_prediction_at_sigma};
use super::step_table::VpSigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// The schedules diffusers' class offers.
pub const SCHEDULES: &[Schedule] =
    &[Schedule::Default, Schedule::Karras, Schedule::Exponential, Schedule::Beta];

/// diffusers' `lower_order_final` applies only to runs shorter than this.
const LOWER_ORDER_FINAL_BELOW: usize = 15;

/// A DEIS run (order 2) of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Deis {
    table: VpSigmaTable,
    prediction_type: PredictionType,
    /// The previous step's noise estimate, with the step index it was made at.
    previous: Option<(usize, Tensor)>,
}

/// The log-rho integral of DEIS's second-order Lagrange basis (diffusers' `ind_fn`):
/// ∫ (log t − log c) / (log b − log c) dt, float32.
fn log_rho_integral(t: f32, b: f32, c: f32) -> f32 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

impl Deis {
    /// DEIS for `steps` steps under `schedule` (one of [`SCHEDULES`]).
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: Schedule) -> Result<Self> {
        if !SCHEDULES.contains(&schedule) {
            return Err(Error::Msg(format!("deis does not support schedule {}", schedule.id())));
        }
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::Deis)?;
        Ok(Deis { table: plan.into(), prediction_type: config.prediction_type, previous: None })
    }

    /// The sigmas, one per step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }

    /// diffusers' `convert_model_output`: the data prediction x0, turned back into the
    /// noise estimate (sample − alpha_t x0) / sigma_t that DEIS integrates.
    fn noise_estimate(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let x0 = vp_data_prediction_at_sigma(self.prediction_type, model_output, sample, sigma)?;
        div(&(sample - mul(&x0, alpha_t)?)?, sigma_t)
    }
}

impl Sampler for Deis {
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
        let VpSigmaTable { timesteps, sigmas } = &self.table;
        let steps = timesteps.len();
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, steps)?;
        let m0 = self.noise_estimate(&model_output, &sample, sigmas[step_index])?;

        let (alpha_t, sigma_t) = alpha_sigma(sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[step_index]);
        let lower_order_final = step_index == steps - 1 && steps < LOWER_ORDER_FINAL_BELOW;
        // Only a previous estimate from the step just before counts: a run started
        // part-way (img2img) begins first order, as diffusers' fresh scheduler does.
        let previous = match &self.previous {
            Some((index, m1)) if *index + 1 == step_index && !lower_order_final => Some(m1),
            _ => None,
        };
        let next = match previous {
            None => {
                let lambda_t = lambda(alpha_t, sigma_t);
                let lambda_s = lambda(alpha_s0, sigma_s0);
                let h = lambda_t - lambda_s;
                (mul(&sample, alpha_t / alpha_s0)? - mul(&m0, sigma_t * (h.exp() - 1.0))?)?
            }
            Some(m1) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(sigmas[step_index - 1]);
                let (rho_t, rho_s0, rho_s1) =
                    (sigma_t / alpha_t, sigma_s0 / alpha_s0, sigma_s1 / alpha_s1);
                let coef1 = log_rho_integral(rho_t, rho_s0, rho_s1)
                    - log_rho_integral(rho_s0, rho_s0, rho_s1);
                let coef2 = log_rho_integral(rho_t, rho_s1, rho_s0)
                    - log_rho_integral(rho_s0, rho_s1, rho_s0);
                let inner = ((div(&sample, alpha_s0)? + mul(&m0, coef1)?)? + mul(m1, coef2)?)?;
                mul(&inner, alpha_t)?
            }
        };
        self.previous = Some((step_index, m0));
        next.to_dtype(out_dtype)
    }
}
