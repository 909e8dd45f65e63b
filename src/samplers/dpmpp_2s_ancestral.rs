//! DPM++ 2S ancestral (A1111's "DPM++ 2S a"), following k-diffusion's
//! `sample_dpmpp_2s_ancestral` (eta 1) driven by a k-diffusion-style denoiser (model input
//! x / sqrt(sigma² + 1), timestep from diffusers' log-sigma interpolation, x0 as the Euler
//! family computes it). diffusers has no such scheduler. Each step evaluates the model at
//! the step's sigma, takes a DPM-Solver++ half step (in log sigma) towards the ancestral
//! sigma_down, evaluates there, takes the full step to sigma_down with that second
//! prediction and adds sigma_up noise, drawn from the request's generators (per batch
//! item); the last step, whose sigma_down is 0, is a single Euler step. Sigmas follow the
//! Euler family's schedules (diffusers' `EulerDiscreteScheduler`, any [`Schedule`]); the
//! run starts from noise × the first sigma, as k-diffusion does.

use candle_core::{Error, Result, Tensor};

use super::euler::{ode_derivative, predicted_original};
use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{log_sigmas, sigma_schedule, sigma_to_t, train_sigmas, Schedule, SigmaFamily};
use super::step_math::{batch_noise, check_s_noise, kdiffusion_ancestral_step, mul, step_inputs};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// k-diffusion's `t_fn`: sigma to "time" −log(sigma).
pub(super) fn t_of(sigma: f32) -> f32 {
    -sigma.ln()
}

/// k-diffusion's `sigma_fn`: time back to sigma, exp(−t).
pub(super) fn sigma_of(t: f32) -> f32 {
    (-t).exp()
}

/// One step's precomputed noise levels.
#[derive(Debug, Clone, Copy)]
struct StepPlan {
    sigma: f32,
    sigma_next: f32,
    sigma_down: f32,
    sigma_up: f32,
    /// The half-step sigma where the second evaluation happens (None: Euler step).
    midpoint: Option<f32>,
}

/// A DPM++ 2S ancestral run of a fixed number of steps (2 × steps − 1 evaluations).
#[derive(Debug, Clone)]
pub struct DpmPp2sAncestral {
    /// Per model evaluation: its timestep and the sigma the sample sits at there (the
    /// step's sigma, or the midpoint for a second evaluation); the run starts from noise ×
    /// the first sigma, as k-diffusion does (not diffusers' Euler `init_noise_sigma`).
    table: SigmaTable,
    plans: Vec<StepPlan>,
    /// Per model evaluation: its step and whether it is the step's second evaluation.
    evaluations: Vec<(usize, bool)>,
    prediction_type: PredictionType,
    s_noise: f32,
    /// The sample at the start of the current step, kept between its two evaluations.
    held_sample: Option<Tensor>,
}

impl DpmPp2sAncestral {
    /// DPM++ 2S a for `steps` steps under `schedule`; `s_noise` scales the ancestral noise
    /// (1 = the reference). Models predicting the sample are refused (the k-diffusion
    /// denoisers take epsilon and v).
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
        s_noise: f64,
    ) -> Result<Self> {
        check_s_noise(s_noise)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Msg(
                "dpmpp_2s_a does not support prediction_type \"sample\"".to_string(),
            ));
        }
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusion)?;
        let logs = log_sigmas(&train_sigmas(config)?);
        let mut timesteps = Vec::with_capacity(2 * steps);
        let mut input_sigmas = Vec::with_capacity(2 * steps);
        let mut plans = Vec::with_capacity(steps);
        let mut evaluations = Vec::with_capacity(2 * steps);
        for (index, &timestep) in plan.timesteps.iter().enumerate() {
            let (sigma, sigma_next) = (plan.sigmas[index], plan.sigmas[index + 1]);
            let (sigma_down, sigma_up) = kdiffusion_ancestral_step(sigma, sigma_next);
            timesteps.push(timestep);
            input_sigmas.push(sigma);
            evaluations.push((index, false));
            let midpoint = (sigma_down != 0.0).then(|| {
                let t = t_of(sigma);
                let h = t_of(sigma_down) - t;
                sigma_of(t + 0.5 * h)
            });
            if let Some(midpoint) = midpoint {
                timesteps.push(sigma_to_t(midpoint as f64, &logs) as f32 as f64);
                input_sigmas.push(midpoint);
                evaluations.push((index, true));
            }
            plans.push(StepPlan { sigma, sigma_next, sigma_down, sigma_up, midpoint });
        }
        Ok(DpmPp2sAncestral {
            table: SigmaTable { timesteps, sigmas: input_sigmas, init_noise_sigma: plan.sigmas[0] },
            plans,
            evaluations,
            prediction_type: config.prediction_type,
            s_noise: s_noise as f32,
            held_sample: None,
        })
    }

    /// The step a model evaluation belongs to and whether it is the step's second one.
    fn locate(&self, step_index: usize) -> (usize, bool) {
        self.evaluations[step_index]
    }
}

impl Sampler for DpmPp2sAncestral {
    /// k-diffusion img2img (as A1111 runs it) noises to x0 + noise × the start sigma; the
    /// table's sigmas are where each evaluation's sample sits, so `add_noise` and
    /// `scale_model_input` both read them.
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
        generators: &mut [TorchGenerator],
    ) -> Result<Tensor> {
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, self.table.timesteps.len())?;
        let (step, second) = self.locate(step_index);
        let plan = self.plans[step];
        let t = t_of(plan.sigma);
        let next = match (second, plan.midpoint) {
            (false, None) => {
                // sigma_down is 0: an Euler step (the last step).
                let derivative =
                    ode_derivative(self.prediction_type, &model_output, &sample, plan.sigma)?;
                (&sample + mul(&derivative, plan.sigma_down - plan.sigma)?)?
            }
            (false, Some(_)) => {
                // First half: DPM-Solver++(1) to the midpoint in log sigma.
                let denoised =
                    predicted_original(self.prediction_type, &model_output, &sample, plan.sigma)?;
                let h = t_of(plan.sigma_down) - t;
                let s = t + 0.5 * h;
                let ratio = sigma_of(s) / sigma_of(t);
                let next = (mul(&sample, ratio)? - mul(&denoised, (-h * 0.5).exp_m1())?)?;
                self.held_sample = Some(sample);
                return next.to_dtype(out_dtype);
            }
            (true, Some(midpoint)) => {
                let held = self.held_sample.take().ok_or_else(|| {
                    Error::Msg(format!(
                        "dpmpp_2s_a: step {step_index} is a second evaluation, but the step's \
                         first was not run"
                    ))
                })?;
                let denoised =
                    predicted_original(self.prediction_type, &model_output, &sample, midpoint)?;
                let t_next = t_of(plan.sigma_down);
                let h = t_next - t;
                let ratio = sigma_of(t_next) / sigma_of(t);
                (mul(&held, ratio)? - mul(&denoised, (-h).exp_m1())?)?
            }
            (true, None) => unreachable!("steps without a midpoint have one evaluation"),
        };
        let next = if plan.sigma_next > 0.0 {
            let noise = batch_noise(generators, &next)?;
            (next + mul(&mul(&noise, self.s_noise)?, plan.sigma_up)?)?
        } else {
            next
        };
        next.to_dtype(out_dtype)
    }
}
