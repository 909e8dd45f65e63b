//! UniPC (A1111's "UniPC"), following diffusers' `UniPCMultistepScheduler` with its
//! defaults: `solver_order=2`, `solver_type="bh2"`, `predict_x0=True`,
//! `lower_order_final=True`, no disabled correctors, `final_sigmas_type="zero"`. Each step
//! first corrects the previous step's prediction with the new model output (UniC), then
//! predicts the next sample (UniP); the first step and the last are first order. Works in
//! VP coordinates on data predictions, with the timesteps and sigmas of the DPM-Solver
//! family (integer timesteps, `default`/`karras`/`exponential`/`beta` schedules).
//! A1111 makes variant and order settings (its own defaults are bh1, order 3); this
//! sampler is diffusers' default configuration only.

use candle_core::{Result, Tensor};

use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{sigma_schedule, Schedule, SigmaFamily};
use super::step_math::{alpha_sigma, div, lambda, mul, step_inputs, vp_data_prediction_at_sigma};
use super::step_table::VpSigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// The schedules diffusers' class offers (it has no custom-sigma path for ComfyUI's).
pub const SCHEDULES: &[Schedule] =
    &[Schedule::Default, Schedule::Karras, Schedule::Exponential, Schedule::Beta];

/// The solver order (diffusers' default, what A1111 runs).
const ORDER: usize = 2;

/// A UniPC run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct UniPc {
    table: VpSigmaTable,
    prediction_type: PredictionType,
    /// Data predictions of the latest steps, oldest first (at most `ORDER`).
    data_predictions: Vec<Tensor>,
    /// The sample the previous predictor started from (the corrector's base).
    last_sample: Option<Tensor>,
    /// The order the previous predictor ran with (the corrector reuses it).
    last_order: usize,
}

/// (alpha_t, sigma_t) of VP coordinates and lambda = log alpha − log sigma, float32.
fn vp(sigma: f32) -> (f32, f32, f32) {
    let (alpha, sigma_t) = alpha_sigma(sigma);
    (alpha, sigma_t, lambda(alpha, sigma_t))
}

/// The bh2 coefficient vector b of UniPC for `order` (1 or 2) and step size `hh` = −h:
/// b_k = k! · phi_{k+1}(hh) / B(hh) with B(hh) = expm1(hh), all float32 like diffusers.
fn b_coefficients(hh: f32, order: usize) -> Vec<f32> {
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0f32;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f32;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    b
}

/// Solves the 2×2 system [[1, 1], [rk, 1]] · rho = b by Gaussian elimination with partial
/// pivoting in float32, as LAPACK's `sgesv` behind `torch.linalg.solve` does.
fn solve_2x2(rk: f32, b: [f32; 2]) -> [f32; 2] {
    let mut rows = [[1.0f32, 1.0, b[0]], [rk, 1.0, b[1]]];
    if rk.abs() > 1.0 {
        rows.swap(0, 1);
    }
    let factor = rows[1][0] / rows[0][0];
    let u11 = rows[1][1] - factor * rows[0][1];
    let y1 = rows[1][2] - factor * rows[0][2];
    let x1 = y1 / u11;
    let x0 = (rows[0][2] - rows[0][1] * x1) / rows[0][0];
    [x0, x1]
}

impl UniPc {
    /// UniPC (bh2, order 2) for `steps` steps under `schedule` (one of [`SCHEDULES`]).
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: Schedule) -> Result<Self> {
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::DpmSolver)?;
        Ok(UniPc {
            table: plan.into(),
            prediction_type: config.prediction_type,
            data_predictions: Vec::new(),
            last_sample: None,
            last_order: 1,
        })
    }

    /// UniC: the corrected sample at `step_index`, recomputed from `last_sample` (where the
    /// previous predictor started) with the new data prediction `model_t` there.
    fn correct(&self, model_t: &Tensor, last_sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let order = self.last_order;
        let m0 = self.data_predictions.last().expect("a previous step exists; this is a bug");
        let sigmas = &self.table.sigmas;
        let (alpha_t, sigma_t, lambda_t) = vp(sigmas[step_index]);
        let (_, sigma_s0, lambda_s0) = vp(sigmas[step_index - 1]);
        let h = lambda_t - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let b = b_coefficients(hh, order);
        let base = (mul(last_sample, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order == 1 {
            mul(&d1_t, 0.5)?
        } else {
            let (_, _, lambda_s1) = vp(sigmas[step_index - 2]);
            let rk = (lambda_s1 - lambda_s0) / h;
            let m1 = &self.data_predictions[self.data_predictions.len() - 2];
            let d1 = div(&(m1 - m0)?, rk)?;
            let rhos = solve_2x2(rk, [b[0], b[1]]);
            (mul(&d1, rhos[0])? + mul(&d1_t, rhos[1])?)?
        };
        base - mul(&correction, alpha_t * b_h)?
    }

    /// UniP: predicts the sample at `step_index + 1` from `sample` with `order`.
    fn predict(&self, sample: &Tensor, step_index: usize, order: usize) -> Result<Tensor> {
        let m0 = self.data_predictions.last().expect("pushed before predicting; this is a bug");
        let sigmas = &self.table.sigmas;
        let (alpha_t, sigma_t, lambda_t) = vp(sigmas[step_index + 1]);
        let (_, sigma_s0, lambda_s0) = vp(sigmas[step_index]);
        let h = lambda_t - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let base = (mul(sample, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?)?;
        if order == 1 {
            return Ok(base);
        }
        let (_, _, lambda_s1) = vp(sigmas[step_index - 1]);
        let rk = (lambda_s1 - lambda_s0) / h;
        let m1 = &self.data_predictions[self.data_predictions.len() - 2];
        let d1 = div(&(m1 - m0)?, rk)?;
        // Order 2 uses rho = 0.5 (diffusers skips the solve there).
        base - mul(&mul(&d1, 0.5)?, alpha_t * b_h)?
    }
}

impl Sampler for UniPc {
    /// `add_noise` is the table's (diffusers' at the begin index, VP coordinates). A run
    /// started there has no earlier outputs, so its first step is first order and
    /// uncorrected, as diffusers' fresh state.
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
        let steps = self.table.timesteps.len();
        let (out_dtype, model_output, mut sample) =
            step_inputs(model_output, step_index, sample, steps)?;
        let x0 = vp_data_prediction_at_sigma(
            self.prediction_type,
            &model_output,
            &sample,
            self.table.sigmas[step_index],
        )?;
        if step_index > 0 {
            if let Some(last_sample) = &self.last_sample {
                sample = self.correct(&x0, last_sample, step_index)?;
            }
        }
        self.data_predictions.push(x0);
        if self.data_predictions.len() > ORDER {
            self.data_predictions.remove(0);
        }
        // Lower order at the last step; warm-up while fewer outputs are stored.
        let order = ORDER.min(steps - step_index).min(self.data_predictions.len());
        let next = self.predict(&sample, step_index, order)?;
        self.last_sample = Some(sample);
        self.last_order = order;
        next.to_dtype(out_dtype)
    }
}
