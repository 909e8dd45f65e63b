//! DPM2 and DPM2 ancestral (k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`),
//! following diffusers' `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`:
//! each step evaluates the model at the step's sigma, takes an Euler step to the
//! log-midpoint sigma, evaluates there, and takes the full step with that midpoint slope
//! (the ancestral variant steps to sigma_down and adds sigma_up noise from the request's
//! generators). `timesteps()` lists both evaluations per step as diffusers does; the last
//! step is a single Euler step to 0.

use candle_core::{Error, Result, Tensor};

use super::euler::ode_derivative;
use super::schedule::{PredictionType, SchedulerConfig};
use super::sigmas::{log_sigmas, sigma_schedule, sigma_to_t, train_sigmas, Schedule, SigmaFamily};
use super::step_math::{
    batch_noise, check_s_noise, check_step_index, diffusers_ancestral_step, mul, scale_for_sigma,
    step_inputs,
};
use super::step_table::SigmaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// diffusers' layout of per-step values over model evaluations:
/// [v0, v1, v1, v2, v2, ..., vn, vn, vn].
fn interleave_all(values: &[f32]) -> Vec<f32> {
    let mut out = vec![values[0]];
    for &value in &values[1..] {
        out.push(value);
        out.push(value);
    }
    out.push(values[values.len() - 1]);
    out
}

/// exp(lerp(log a, log b, 0.5)) in float32, as torch's `lerp` computes weight 0.5.
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    (end - (end - start) * 0.5).exp()
}

/// A DPM2 or DPM2 ancestral run of a fixed number of steps (2 × steps − 1 evaluations).
#[derive(Debug, Clone)]
pub struct Dpm2 {
    ancestral: bool,
    /// Per model evaluation: the timesteps and diffusers' interleaved step sigmas (what
    /// `add_noise` reads; the model input is scaled by its own rule, see
    /// `scale_model_input`).
    table: SigmaTable,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    prediction_type: PredictionType,
    s_noise: f32,
    /// The sample at the start of the current step, kept between its two evaluations.
    held_sample: Option<Tensor>,
}

impl Dpm2 {
    /// DPM2 (`ancestral` false) or DPM2 ancestral for `steps` steps; `s_noise` scales the
    /// ancestral noise (1 = the reference).
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: Schedule,
        ancestral: bool,
        s_noise: f64,
    ) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Msg(
                "dpm2 and dpm2_a do not support prediction_type \"sample\"".to_string(),
            ));
        }
        let plan = sigma_schedule(config, steps, schedule, SigmaFamily::KDiffusionRoundKarras)?;
        let logs = log_sigmas(&train_sigmas(config)?);
        let sigmas = plan.sigmas;
        let n = sigmas.len() - 1;
        let to_t = |sigma: f32| sigma_to_t(sigma as f64, &logs) as f32 as f64;
        let (interpol, up, down, timesteps) = if ancestral {
            let next = (0..=n).map(|i| if i < n { sigmas[i + 1] } else { 0.0 });
            let (mut down, up): (Vec<f32>, Vec<f32>) =
                sigmas.iter().zip(next).map(|(&s, nx)| diffusers_ancestral_step(s, nx)).unzip();
            down[n] = 0.0;
            let mut interpol: Vec<f32> =
                sigmas.iter().zip(&down).map(|(&s, &d)| log_midpoint(s, d)).collect();
            interpol[n - 1] = 0.0;
            interpol[n] = 0.0;
            let mut timesteps = vec![plan.timesteps[0]];
            for (&midpoint, &t) in interpol[..n - 1].iter().zip(&plan.timesteps[1..n]) {
                timesteps.push(to_t(midpoint));
                timesteps.push(t);
            }
            (interpol, up, down, timesteps)
        } else {
            let interpol: Vec<f32> =
                (0..=n).map(|i| log_midpoint(sigmas[i], sigmas[(i + n) % (n + 1)])).collect();
            let mut timesteps = vec![plan.timesteps[0]];
            for (&midpoint, &t) in interpol[1..n].iter().zip(&plan.timesteps[1..n]) {
                timesteps.push(to_t(midpoint));
                timesteps.push(t);
            }
            (interpol, vec![0.0; n + 1], vec![0.0; n + 1], timesteps)
        };
        check_s_noise(s_noise)?;
        Ok(Dpm2 {
            ancestral,
            table: SigmaTable {
                timesteps,
                sigmas: interleave_all(&sigmas),
                init_noise_sigma: plan.init_noise_sigma,
            },
            sigmas_interpol: interleave_all(&interpol),
            sigmas_up: interleave_all(&up),
            sigmas_down: interleave_all(&down),
            prediction_type: config.prediction_type,
            s_noise: s_noise as f32,
            held_sample: None,
        })
    }
}

impl Sampler for Dpm2 {
    fn step_table(&self) -> Option<&dyn StepTable> {
        Some(&self.table)
    }

    fn order(&self) -> usize {
        2
    }

    /// Not the table's rule: the second evaluation of a step sees the interpolated sigma,
    /// which the two KDPM2 classes index differently.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.table.timesteps.len())?;
        let sigma = match (&self.held_sample, self.ancestral) {
            (None, _) => self.table.sigmas[step_index],
            (Some(_), false) => self.sigmas_interpol[step_index],
            (Some(_), true) => self.sigmas_interpol[step_index - 1],
        };
        scale_for_sigma(sample, sigma)
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
        let i = step_index;
        let sigmas = &self.table.sigmas;
        let previous = match self.held_sample.take() {
            None => {
                let sigma = sigmas[i];
                let interpol = if self.ancestral {
                    self.sigmas_interpol[i]
                } else {
                    self.sigmas_interpol[i + 1]
                };
                let derivative =
                    ode_derivative(self.prediction_type, &model_output, &sample, sigma)?;
                let previous = (&sample + mul(&derivative, interpol - sigma)?)?;
                self.held_sample = Some(sample);
                previous
            }
            Some(held) => {
                let previous_index = i.checked_sub(1).expect("a held sample implies i > 0");
                let (sigma, interpol, target) = if self.ancestral {
                    (
                        sigmas[previous_index],
                        self.sigmas_interpol[previous_index],
                        self.sigmas_down[previous_index],
                    )
                } else {
                    (sigmas[previous_index], self.sigmas_interpol[i], sigmas[i])
                };
                let derivative =
                    ode_derivative(self.prediction_type, &model_output, &sample, interpol)?;
                let previous = (held + mul(&derivative, target - sigma)?)?;
                if self.ancestral {
                    let noise = batch_noise(generators, &previous)?;
                    let scale = self.sigmas_up[previous_index] * self.s_noise;
                    (previous + mul(&noise, scale)?)?
                } else {
                    previous
                }
            }
        };
        previous.to_dtype(out_dtype)
    }
}
