//! DPM++ 3M SDE (A1111's "DPM++ 3M SDE"), following diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="sde-dpmsolver++"`, `solver_order=3`,
//! `lower_order_final=True`, `final_sigmas_type="zero"`: the third-order multistep
//! SDE solver on data predictions in VP coordinates. The first step is first order, the
//! second is second order (warm-up), the last is first order and, below 15 steps, the
//! second to last is second order, as diffusers does. Fresh noise is drawn at every step
//! from the request's generators (per batch item, as diffusers' `randn_tensor`), so a seed
//! reproduces a run exactly. (k-diffusion's `sample_dpmpp_3m_sde`, which A1111 runs, is a
//! different discretisation with Brownian-tree noise; this sampler is diffusers'.)

use candle_core::{Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{
    alpha_sigma, batch_noise, check_s_noise, lambda, mul, step_inputs, vp_data_prediction_at_sigma,
};
use super::step_table::VpSigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// diffusers runs the second-to-last step at second order below this many steps.
const LOWER_ORDER_SECOND_BELOW: usize = 15;

/// A DPM++ 3M SDE run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct DpmPp3mSde {
    table: VpSigmaTable,
    prediction_type: PredictionType,
    s_noise: f32,
    /// Data predictions of the previous steps, oldest first (at most two).
    previous_x0: Vec<Tensor>,
}

impl DpmPp3mSde {
    /// DPM++ 3M SDE for `steps` steps under `schedule`; `s_noise` scales the noise
    /// (1 = the reference).
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
        s_noise: f64,
    ) -> Result<Self> {
        check_s_noise(s_noise)?;
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::DpmSolver)?;
        Ok(DpmPp3mSde {
            table: plan.into(),
            prediction_type: config.prediction_type,
            s_noise: s_noise as f32,
            previous_x0: Vec::new(),
        })
    }

    /// The solver order diffusers' `step` picks at `step_index` with `history` earlier
    /// data predictions stored.
    fn order_at(&self, step_index: usize, history: usize) -> usize {
        let steps = self.table.timesteps.len();
        if step_index == steps - 1 || history < 1 {
            1
        } else if history < 2 || (step_index == steps - 2 && steps < LOWER_ORDER_SECOND_BELOW) {
            2
        } else {
            3
        }
    }
}

impl Sampler for DpmPp3mSde {
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
        let sigmas = &self.table.sigmas;
        let m0 = vp_data_prediction_at_sigma(
            self.prediction_type,
            &model_output,
            &sample,
            sigmas[step_index],
        )?;
        let noise = batch_noise(generators, &m0)?;
        let order = self.order_at(step_index, self.previous_x0.len());

        let (alpha_t, sigma_t) = alpha_sigma(sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[step_index]);
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let decay = (-2.0 * h).exp();
        let weight = alpha_t * (1.0 - decay);
        let base = (mul(&sample, sigma_t / sigma_s0 * (-h).exp())? + mul(&m0, weight)?)?;
        let lambda_back = |back: usize| {
            let (alpha, sigma) = alpha_sigma(sigmas[step_index - back]);
            lambda(alpha, sigma)
        };
        let drift = match order {
            1 => base,
            2 => {
                // diffusers' midpoint second-order update.
                let m1 = &self.previous_x0[self.previous_x0.len() - 1];
                let r0 = (lambda_s0 - lambda_back(1)) / h;
                let d1 = mul(&(&m0 - m1)?, 1.0 / r0)?;
                (base + mul(&d1, 0.5 * weight)?)?
            }
            _ => {
                let count = self.previous_x0.len();
                let (m1, m2) = (&self.previous_x0[count - 1], &self.previous_x0[count - 2]);
                let lambda_s1 = lambda_back(1);
                let lambda_s2 = lambda_back(2);
                let (h_0, h_1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
                let (r0, r1) = (h_0 / h, h_1 / h);
                let d1_0 = mul(&(&m0 - m1)?, 1.0 / r0)?;
                let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
                let d1_diff = (&d1_0 - &d1_1)?;
                let d1 = (&d1_0 + mul(&d1_diff, r0 / (r0 + r1))?)?;
                let d2 = mul(&d1_diff, 1.0 / (r0 + r1))?;
                let two_h = 2.0 * h;
                let c1 = alpha_t * ((1.0 - decay) / (-two_h) + 1.0);
                let c2 = alpha_t * ((1.0 - decay - two_h) / (two_h * two_h) - 0.5);
                ((base + mul(&d1, c1)?)? + mul(&d2, c2)?)?
            }
        };
        let noise_scale = sigma_t * (1.0 - decay).sqrt();
        let next = (drift + mul(&mul(&noise, self.s_noise)?, noise_scale)?)?;
        self.previous_x0.push(m0);
        if self.previous_x0.len() > 2 {
            self.previous_x0.remove(0);
        }
        next.to_dtype(out_dtype)
    }
}
