//! DPM-Solver++(2M) and its SDE variant, following diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` (A1111's "DPM++ 2M")
//! or `"sde-dpmsolver++"` ("DPM++ 2M SDE"), `solver_order=2`, `solver_type="midpoint"`,
//! `lower_order_final=True`, `final_sigmas_type="zero"`. The solver works in VP
//! coordinates (initial noise scale 1, model input unscaled) on data predictions; the
//! first step and the last are first order. The SDE variant draws fresh noise at every
//! step from the request's generators (per batch item, as diffusers' `randn_tensor`).

use candle_core::{Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{
    alpha_sigma, batch_noise, check_s_noise, lambda, mul, step_inputs, vp_data_prediction_at_sigma,
};
use super::step_table::VpSigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// A DPM++ 2M (or 2M SDE) run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct DpmPp2m {
    sde: bool,
    table: VpSigmaTable,
    prediction_type: PredictionType,
    s_noise: f32,
    /// The previous step's data prediction.
    previous_x0: Option<Tensor>,
}

impl DpmPp2m {
    /// DPM++ 2M (`sde` false) or 2M SDE for `steps` steps; `s_noise` scales the SDE noise.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
        sde: bool,
        s_noise: f64,
    ) -> Result<Self> {
        check_s_noise(s_noise)?;
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::DpmSolver)?;
        Ok(DpmPp2m {
            sde,
            table: plan.into(),
            prediction_type: config.prediction_type,
            s_noise: s_noise as f32,
            previous_x0: None,
        })
    }
}

impl Sampler for DpmPp2m {
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
        let VpSigmaTable { timesteps, sigmas } = &self.table;
        let steps = timesteps.len();
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, steps)?;
        let x0 = vp_data_prediction_at_sigma(
            self.prediction_type,
            &model_output,
            &sample,
            sigmas[step_index],
        )?;
        let noise = if self.sde { Some(batch_noise(generators, &x0)?) } else { None };

        let (alpha_t, sigma_t) = alpha_sigma(sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[step_index]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let lower_order_final = step_index == steps - 1;
        let second_order = match &self.previous_x0 {
            Some(previous) if !lower_order_final => {
                let (alpha_s1, sigma_s1) = alpha_sigma(sigmas[step_index - 1]);
                let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                Some(mul(&(&x0 - previous)?, 1.0 / r0)?)
            }
            _ => None,
        };
        let next = if self.sde {
            let decay = (-h).exp();
            let weight = alpha_t * (1.0 - (-2.0 * h).exp());
            let mut next = (mul(&sample, sigma_t / sigma_s0 * decay)? + mul(&x0, weight)?)?;
            if let Some(d1) = &second_order {
                next = (next + mul(d1, 0.5 * weight)?)?;
            }
            let noise = noise.expect("drawn above for the SDE variant; this is a bug");
            let scale = sigma_t * (1.0 - (-2.0 * h).exp()).sqrt();
            (next + mul(&mul(&noise, self.s_noise)?, scale)?)?
        } else {
            let weight = alpha_t * ((-h).exp() - 1.0);
            let mut next = (mul(&sample, sigma_t / sigma_s0)? - mul(&x0, weight)?)?;
            if let Some(d1) = &second_order {
                next = (next - mul(d1, 0.5 * weight)?)?;
            }
            next
        };
        self.previous_x0 = Some(x0);
        next.to_dtype(out_dtype)
    }
}
