//! PLMS (A1111's "PLMS"), following diffusers' `PNDMScheduler` with `skip_prk_steps=True`
//! as Stable Diffusion 1.x ships it: pseudo linear multistep on the model outputs (up to
//! fourth-order Adams–Bashforth weights), where the second model evaluation repeats the
//! first step's timestep and averages the two outputs (a Heun-like start instead of the
//! Runge–Kutta warm-up). A run of n steps evaluates the model n + 1 times. Works on
//! timesteps (no sigmas): only the `default` schedule; epsilon and v-prediction models.

use candle_core::{Error, Result, Tensor};

use super::schedule::{
    alphas_cumprod, leading_timesteps, numpy_linspace, trailing_timesteps, PredictionType,
    SchedulerConfig, TimestepSpacing,
};
use super::sigmas::Schedule;
use super::step_math::{div, mul, step_inputs};
use super::step_table::AlphaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// Only the model's own timesteps.
pub const SCHEDULES: &[Schedule] = &[Schedule::Default];

/// A PLMS run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Pndm {
    /// The timesteps (the second-highest twice) with the training ᾱ; `add_noise` is
    /// diffusers' of the class, sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) noise.
    table: AlphaTable,
    final_alpha_cumprod: f32,
    /// diffusers steps back by train/steps (integer division) whatever the spacing.
    step_back: i64,
    prediction_type: PredictionType,
    /// The latest raw model outputs, oldest first (at most four).
    outputs: Vec<Tensor>,
    /// The sample the first step started from; the second evaluation restarts there.
    first_sample: Option<Tensor>,
    /// Steps taken so far (diffusers' `counter`): the second call is the repeated
    /// evaluation, wherever the run started.
    counter: usize,
}

impl Pndm {
    /// PLMS for `steps` steps. Models predicting the sample are refused, as diffusers does.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.validate_steps(steps)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Msg(
                "pndm does not support prediction_type \"sample\"; use ddim or euler".to_string(),
            ));
        }
        let train = config.num_train_timesteps;
        // Ascending, as diffusers' `_timesteps`.
        let ascending: Vec<f64> = match config.spacing_or(TimestepSpacing::Leading) {
            TimestepSpacing::Linspace => numpy_linspace((train - 1) as f64, steps)
                .into_iter()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => {
                leading_timesteps(config, steps).into_iter().rev().collect()
            }
            TimestepSpacing::Trailing => {
                trailing_timesteps(train, steps).into_iter().rev().collect()
            }
        };
        if let Some(bad) = ascending.iter().find(|&&t| !(0.0..train as f64).contains(&t)) {
            return Err(Error::Msg(format!(
                "{steps} steps with steps_offset {} give timestep {bad}, outside the model's \
                 0..{train} training timesteps; use fewer steps",
                config.steps_offset
            )));
        }
        // skip_prk_steps: every timestep once, the second-highest twice, descending. They
        // are whole numbers in 0..train (checked above), so they index ᾱ exactly.
        let mut timesteps: Vec<usize> = ascending.iter().map(|&t| t as usize).collect();
        if steps >= 2 {
            timesteps.insert(steps - 1, timesteps[steps - 2]);
        }
        timesteps.reverse();
        let alphas_cumprod = alphas_cumprod(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Pndm {
            table: AlphaTable::new(timesteps, alphas_cumprod),
            final_alpha_cumprod,
            step_back: (train / steps) as i64,
            prediction_type: config.prediction_type,
            outputs: Vec::new(),
            first_sample: None,
            counter: 0,
        })
    }

    /// ᾱ at `timestep`; below 0 it is the final ᾱ (diffusers' `final_alpha_cumprod`).
    fn alpha_at(&self, timestep: i64) -> Result<f32> {
        if timestep < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.table.alphas_cumprod.get(timestep as usize).copied().ok_or_else(|| {
            Error::Msg(format!(
                "pndm reached timestep {timestep}, outside the training schedule; use another \
                 step count or spacing"
            ))
        })
    }

    /// diffusers' `_get_prev_sample`: the DDIM-like transfer from `timestep` to
    /// `previous` with the combined model output (formula (9) of the PNDM paper).
    fn transfer(
        &self,
        sample: &Tensor,
        timestep: i64,
        previous: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_t = self.alpha_at(timestep)?;
        let alpha_prev = self.alpha_at(previous)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let model_output = match self.prediction_type {
            PredictionType::VPrediction => {
                (mul(model_output, alpha_t.sqrt())? + mul(sample, beta_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denominator = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        mul(sample, sample_coeff)? - div(&mul(&model_output, alpha_prev - alpha_t)?, denominator)?
    }
}

impl Sampler for Pndm {
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
        let (out_dtype, model_output, mut sample) =
            step_inputs(model_output, step_index, sample, self.table.train_timesteps.len())?;
        // diffusers counts calls, not positions: an img2img run that starts part-way (at
        // `timesteps[start]`, as its pipeline slices them) takes its first two calls as the
        // warm-up pair, whatever timesteps they carry.
        let counter = self.counter;
        self.counter += 1;
        let mut timestep = self.table.train_timesteps[step_index] as i64;
        let mut previous = timestep - self.step_back;
        if counter == 1 {
            // The repeated evaluation: redo the first step from its start.
            previous = timestep;
            timestep += self.step_back;
        } else {
            if self.outputs.len() > 3 {
                self.outputs.remove(0);
            }
            self.outputs.push(model_output.clone());
        }
        let e = |back: usize| &self.outputs[self.outputs.len() - back];
        let combined = match (self.outputs.len(), counter) {
            (1, 0) => {
                self.first_sample = Some(sample.clone());
                model_output
            }
            (1, 1) => {
                sample = self.first_sample.take().expect("set by step 0; this is a bug");
                div(&(model_output + e(1))?, 2.0)?
            }
            (2, _) => div(&(mul(e(1), 3.0)? - e(2))?, 2.0)?,
            (3, _) => div(&((mul(e(1), 23.0)? - mul(e(2), 16.0)?)? + mul(e(3), 5.0)?)?, 12.0)?,
            _ => {
                let sum = (((mul(e(1), 55.0)? - mul(e(2), 59.0)?)? + mul(e(3), 37.0)?)?
                    - mul(e(4), 9.0)?)?;
                mul(&sum, (1.0f64 / 24.0) as f32)?
            }
        };
        self.transfer(&sample, timestep, previous, &combined)?.to_dtype(out_dtype)
    }
}
