//! Step tables: per model evaluation, the timestep the model sees and the noise level the
//! sample sits at, in the noise coordinates of one diffusers scheduler family. A sampler
//! that embeds one returns it from [`Sampler::step_table`](super::Sampler::step_table), and
//! the trait's bookkeeping methods (`timesteps`, `init_noise_sigma`, `add_noise`,
//! `scale_model_input`) read it, so each sampler module writes only its `step` and what
//! really differs.
//!
//! The three families differ in what `add_noise`, `scale_model_input` and the initial noise
//! scale mean, which is why they are three types and a sampler picks one by name:
//!
//! * [`SigmaTable`]: variance-exploding sigmas (diffusers' `EulerDiscreteScheduler` family,
//!   k-diffusion): x_t = x0 + sigma·noise, the model sees x_t / sqrt(sigma² + 1).
//! * [`VpSigmaTable`]: sigmas in variance-preserving coordinates (diffusers'
//!   `DPMSolverMultistepScheduler` family): x_t = alpha_t·x0 + sigma_t·noise, model input
//!   unscaled, initial noise scale 1.
//! * [`AlphaTable`]: integer training timesteps and ᾱ (diffusers' `DDIMScheduler` /
//!   `DDPMScheduler` family): x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, model input
//!   unscaled, initial noise scale 1.

use candle_core::{Result, Tensor};

use super::sigmas::SigmaSchedule;
use super::step_math::{
    add_alpha_noise, add_sigma_noise, add_vp_noise, alpha_sigma, check_step_index, scale_for_sigma,
};

/// What a sampler's table answers for the [`Sampler`](super::Sampler) trait. Every method
/// that takes a `step_index` fails (never panics) unless it addresses one of `timesteps()`.
pub trait StepTable {
    /// The model timesteps, one per model evaluation, in the order they are visited.
    fn timesteps(&self) -> &[f64];

    /// The factor the initial unit-variance noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;

    /// Noises the clean latent `original` to the level of evaluation `step_index`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

    /// Scales the latent before it enters the model at evaluation `step_index`.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;
}

/// Variance-exploding sigmas, one per model evaluation (extra trailing entries, such as the
/// final 0 the Euler family keeps for its last step, are allowed): diffusers'
/// `EulerDiscreteScheduler` and the classes that share its `add_noise` and
/// `scale_model_input` (Heun, LMS, KDPM2, DPM-Solver SDE), and k-diffusion's samplers.
#[derive(Debug, Clone)]
pub(crate) struct SigmaTable {
    pub(crate) timesteps: Vec<f64>,
    pub(crate) sigmas: Vec<f32>,
    pub(crate) init_noise_sigma: f32,
}

impl From<SigmaSchedule> for SigmaTable {
    /// The table of a one-evaluation-per-step sampler on `schedule`.
    fn from(schedule: SigmaSchedule) -> Self {
        let SigmaSchedule { timesteps, sigmas, init_noise_sigma } = schedule;
        SigmaTable { timesteps, sigmas, init_noise_sigma }
    }
}

impl StepTable for SigmaTable {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        add_sigma_noise(original, noise, self.sigmas[step_index])
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        scale_for_sigma(sample, self.sigmas[step_index])
    }
}

/// Sigmas (one per step plus the final one) read in variance-preserving coordinates, as
/// diffusers' DPM-Solver family does (`_sigma_to_alpha_sigma_t`).
#[derive(Debug, Clone)]
pub(crate) struct VpSigmaTable {
    pub(crate) timesteps: Vec<f64>,
    pub(crate) sigmas: Vec<f32>,
}

impl From<SigmaSchedule> for VpSigmaTable {
    /// The table of `schedule`, whose initial noise scale (1 for the DPM-Solver families)
    /// is not kept: these samplers start from unit noise.
    fn from(schedule: SigmaSchedule) -> Self {
        VpSigmaTable { timesteps: schedule.timesteps, sigmas: schedule.sigmas }
    }
}

impl StepTable for VpSigmaTable {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        add_vp_noise(original, noise, alpha_t, sigma_t)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }
}

/// Integer training timesteps, one per model evaluation, with the training schedule's ᾱ.
#[derive(Debug, Clone)]
pub(crate) struct AlphaTable {
    /// The training timesteps, as indices into `alphas_cumprod`.
    pub(crate) train_timesteps: Vec<usize>,
    /// The same timesteps as the model sees them.
    timesteps: Vec<f64>,
    pub(crate) alphas_cumprod: Vec<f32>,
}

impl AlphaTable {
    /// The table of `train_timesteps` (each below `alphas_cumprod.len()`).
    pub(crate) fn new(train_timesteps: Vec<usize>, alphas_cumprod: Vec<f32>) -> Self {
        AlphaTable {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod,
        }
    }

    /// ᾱ at the training timestep of evaluation `step_index`.
    pub(crate) fn alpha_cumprod_at_step(&self, step_index: usize) -> f32 {
        self.alphas_cumprod[self.train_timesteps[step_index]]
    }
}

impl StepTable for AlphaTable {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        add_alpha_noise(original, noise, self.alpha_cumprod_at_step(step_index))
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }
}
