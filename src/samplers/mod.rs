//! Samplers: noise schedules, timestep spacings, solvers and the torch-compatible RNG.
//!
//! Pure math on tensors; this module imports neither `pipeline` nor `models`.
//! Every sampler follows a named reference (a diffusers scheduler class) and says so in
//! its module docs.

pub mod rng;
pub mod schedule;

pub mod ddim;
pub mod euler;
pub mod euler_ancestral;

mod step_math;

#[cfg(test)]
mod parity_tests;

use candle_core::{Result, Tensor};

pub use rng::TorchGenerator;
pub use schedule::{PredictionType, SchedulerConfig, TimestepSpacing};

/// The samplers this build knows, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM (diffusers `DDIMScheduler`), with `eta`.
    Ddim,
    /// Euler (diffusers `EulerDiscreteScheduler`).
    Euler,
    /// Euler ancestral, A1111's "Euler a" (diffusers `EulerAncestralDiscreteScheduler`).
    EulerA,
}

impl SamplerKind {
    /// Every sampler, in the order they are listed to users.
    pub const ALL: [SamplerKind; 3] = [SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::EulerA];

    /// The id used in requests and responses.
    pub fn id(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_a",
        }
    }

    /// The name AUTOMATIC1111 shows.
    pub fn display_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
        }
    }

    /// Other names users send for this sampler (ComfyUI, diffusers class names).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            SamplerKind::Ddim => &["DDIMScheduler"],
            SamplerKind::Euler => &["EulerDiscreteScheduler"],
            SamplerKind::EulerA => {
                &["euler_ancestral", "EulerAncestralDiscreteScheduler", "k_euler_a"]
            }
        }
    }

    /// Looks a name up among ids, display names and aliases (case-insensitive).
    pub fn from_name(name: &str) -> Option<SamplerKind> {
        let wanted = name.trim();
        SamplerKind::ALL.into_iter().find(|kind| {
            kind.id().eq_ignore_ascii_case(wanted)
                || kind.display_name().eq_ignore_ascii_case(wanted)
                || kind.aliases().iter().any(|a| a.eq_ignore_ascii_case(wanted))
        })
    }

    /// Builds the sampler for one generation of `steps` steps (DDIM with eta 0).
    ///
    /// Errors (never panics) on 0 steps, more steps than the model's training timesteps,
    /// or a config the sampler cannot run.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Sampler>> {
        Ok(match self {
            SamplerKind::Ddim => Box::new(ddim::Ddim::new(config, steps, 0.0)?),
            SamplerKind::Euler => Box::new(euler::Euler::new(config, steps)?),
            SamplerKind::EulerA => Box::new(euler_ancestral::EulerAncestral::new(config, steps)?),
        })
    }
}

/// One denoising run: built per job for a fixed number of steps, driven by the pipeline.
///
/// The pipeline calls, for each `step_index` in `0..timesteps().len()`:
/// `scale_model_input`, then the model at `timesteps()[step_index]`, then `step`.
pub trait Sampler: Send {
    /// The model timesteps, one per step, in the order they are visited (descending).
    fn timesteps(&self) -> &[f64];

    /// The factor the initial unit-variance noise is multiplied by.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the latent before it enters the model at `step_index`
    /// (identity for DDIM; divides by sqrt(sigma^2 + 1) for the Euler family).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor>;

    /// Takes one step: from `sample` at `step_index` and the model output there (already
    /// after classifier-free guidance; its meaning is given by the prediction type of the
    /// config) to the sample at the next step. Stochastic samplers draw their noise from
    /// `generators`, in the same order diffusers does: batch item `i` draws its noise (of
    /// the per-item shape) from `generators[i]`, as diffusers does with a list of
    /// generators; `generators.len()` equals the batch size of `sample`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        generators: &mut [TorchGenerator],
    ) -> Result<Tensor>;
}
