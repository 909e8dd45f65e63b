//! LCM (A1111-style "LCM"), following diffusers' `LCMScheduler`: multistep consistency
//! sampling for latent consistency models (and LCM-LoRA). Each step predicts x0 (any
//! prediction type), applies the consistency boundary condition
//! `c_skip(t) · x_t + c_out(t) · x0` with sigma_data 0.5 and `timestep_scaling` (default
//! 10), then re-noises the result to the next timestep with fresh noise from the
//! request's generators (per batch item, as diffusers' `randn_tensor`); the last step
//! returns the denoised sample. Timesteps come from the distillation schedule of
//! `original_inference_steps` (default 50) timesteps `k·i − 1` (k = train /
//! original steps), of which `steps` are taken at evenly spaced indices; `timestep_spacing`
//! and `steps_offset` do not apply (diffusers' class ignores them too), and `steps` may
//! not exceed `original_inference_steps`.

use candle_core::{Error, Result, Tensor};

use super::schedule::{alphas_cumprod, check_epsilon_at_zero_snr, PredictionType, SchedulerConfig};
use super::sigmas::Schedule;
use super::step_math::{batch_noise, clip, clip_range, mul, step_inputs, vp_data_prediction};
use super::step_table::AlphaTable;
use super::{Sampler, StepTable, TorchGenerator};

/// Only the distillation schedule.
pub const SCHEDULES: &[Schedule] = &[Schedule::Default];

/// diffusers' `original_inference_steps` default (the LCM distillation schedule).
pub const DEFAULT_ORIGINAL_STEPS: usize = 50;
/// diffusers' `timestep_scaling` default.
pub const DEFAULT_TIMESTEP_SCALING: f64 = 10.0;
/// sigma_data of the consistency boundary condition (diffusers' value).
const SIGMA_DATA: f32 = 0.5;

/// The timesteps of diffusers' `LCMScheduler.set_timesteps` / `TCDScheduler.set_timesteps`
/// (strength 1, no custom timesteps), descending; `name` labels errors.
pub(crate) fn consistency_timesteps(
    config: &SchedulerConfig,
    steps: usize,
    name: &str,
) -> Result<Vec<usize>> {
    config.validate_steps(steps)?;
    let train = config.num_train_timesteps;
    let original = config.original_inference_steps.unwrap_or(DEFAULT_ORIGINAL_STEPS);
    if original == 0 || original > train {
        return Err(Error::Msg(format!(
            "scheduler config: original_inference_steps must be between 1 and \
             num_train_timesteps ({train}), got {original}"
        )));
    }
    if steps > original {
        return Err(Error::Msg(format!(
            "steps ({steps}) cannot exceed {name}'s original_inference_steps ({original}): its \
             timesteps are a subset of that distillation schedule"
        )));
    }
    let stride = train / original;
    // The distillation schedule, descending: k·original − 1, ..., k − 1.
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * stride - 1).collect();
    // np.floor(np.linspace(0, original, steps, endpoint=False)): index i·original/steps.
    let interval = original as f64 / steps as f64;
    Ok((0..steps).map(|i| origin[(i as f64 * interval).floor() as usize]).collect())
}

/// An LCM run of a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Lcm {
    table: AlphaTable,
    prediction_type: PredictionType,
    clip_range: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    /// LCM for `steps` steps (at most the config's `original_inference_steps`).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let scaling = config.timestep_scaling.unwrap_or(DEFAULT_TIMESTEP_SCALING);
        if !(scaling.is_finite() && scaling > 0.0) {
            return Err(Error::Msg(format!(
                "scheduler config: timestep_scaling must be > 0, got {scaling}"
            )));
        }
        let timesteps = consistency_timesteps(config, steps, "lcm")?;
        let alphas_cumprod = alphas_cumprod(config)?;
        check_epsilon_at_zero_snr(config, &alphas_cumprod, &timesteps, "lcm")?;
        Ok(Lcm {
            table: AlphaTable::new(timesteps, alphas_cumprod),
            prediction_type: config.prediction_type,
            clip_range: clip_range(config)?,
            timestep_scaling: scaling as f32,
        })
    }

    /// diffusers' `get_scalings_for_boundary_condition_discrete`: (c_skip, c_out), float32.
    fn boundary_scalings(&self, timestep: usize) -> (f32, f32) {
        let scaled = timestep as f32 * self.timestep_scaling;
        let sigma_data_sq = SIGMA_DATA * SIGMA_DATA;
        let c_skip = sigma_data_sq / (scaled * scaled + sigma_data_sq);
        let c_out = scaled / (scaled * scaled + sigma_data_sq).sqrt();
        (c_skip, c_out)
    }
}

impl Sampler for Lcm {
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
        let steps = self.table.train_timesteps.len();
        let (out_dtype, model_output, sample) =
            step_inputs(model_output, step_index, sample, steps)?;

        let timestep = self.table.train_timesteps[step_index];
        let alpha_t = self.table.alphas_cumprod[timestep];
        let beta_t = 1.0 - alpha_t;
        let (c_skip, c_out) = self.boundary_scalings(timestep);
        let original = vp_data_prediction(
            self.prediction_type,
            &model_output,
            &sample,
            alpha_t.sqrt(),
            beta_t.sqrt(),
        )?;
        let original = clip(original, self.clip_range)?;
        let denoised = (mul(&original, c_out)? + mul(&sample, c_skip)?)?;
        if step_index + 1 == steps {
            // No noise after the last step (and none at all for one-step sampling).
            return denoised.to_dtype(out_dtype);
        }
        let alpha_prev = self.table.alpha_cumprod_at_step(step_index + 1);
        let noise = batch_noise(generators, &denoised)?;
        let next = (mul(&denoised, alpha_prev.sqrt())? + mul(&noise, (1.0 - alpha_prev).sqrt())?)?;
        next.to_dtype(out_dtype)
    }
}
