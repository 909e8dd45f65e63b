//! Samplers: noise schedules, timestep spacings, solvers and the torch-compatible RNG.
//!
//! Pure math on tensors; this module imports neither `pipeline` nor `models`.
//! Every sampler follows a named reference (a diffusers scheduler class) and says so in
//! its module docs.

pub mod rng;
pub mod schedule;

pub mod ddim;
pub mod ddpm;
pub mod dpm2;
pub mod dpmpp_2m;
pub mod dpmpp_2s_ancestral;
pub mod dpmpp_3m_sde;
pub mod dpmpp_sde;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lms;
pub mod pndm;
pub mod sigmas;
pub mod unipc;
// Third batch (issue #4): DEIS, LCM, TCD.
pub mod deis;
pub mod lcm;
pub mod tcd;

mod step_math;
mod step_table;

#[cfg(test)]
mod add_noise_tests;
#[cfg(test)]
mod parity_harness;
#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod samplers2_parity_tests;
#[cfg(test)]
mod samplers3_parity_tests;
#[cfg(test)]
mod samplers4_parity_tests;
#[cfg(test)]
mod schedule_parity_tests;

use candle_core::{Error, Result, Tensor};

pub use rng::TorchGenerator;
pub use schedule::{PredictionType, SchedulerConfig, SchedulerOverrides, TimestepSpacing};
pub use sigmas::Schedule;
pub use step_table::StepTable;

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
    /// Heun (diffusers `HeunDiscreteScheduler`), two model evaluations per step.
    Heun,
    /// Linear multistep (diffusers `LMSDiscreteScheduler`).
    Lms,
    /// DPM2 (diffusers `KDPM2DiscreteScheduler`), two evaluations per step.
    Dpm2,
    /// DPM2 ancestral (diffusers `KDPM2AncestralDiscreteScheduler`).
    Dpm2A,
    /// DPM++ 2M (diffusers `DPMSolverMultistepScheduler`, dpmsolver++).
    DpmPp2m,
    /// DPM++ 2M SDE (diffusers `DPMSolverMultistepScheduler`, sde-dpmsolver++).
    DpmPp2mSde,
    /// DPM++ SDE (diffusers `DPMSolverSDEScheduler` / k-diffusion `sample_dpmpp_sde`), with
    /// its Brownian-tree noise drawn from the request's generators instead.
    DpmPpSde,
    /// DPM++ 2S ancestral (k-diffusion `sample_dpmpp_2s_ancestral`).
    DpmPp2sA,
    /// DPM++ 3M SDE (diffusers `DPMSolverMultistepScheduler`, sde-dpmsolver++, order 3).
    DpmPp3mSde,
    /// UniPC (diffusers `UniPCMultistepScheduler`, bh2, order 2).
    UniPc,
    /// PLMS (diffusers `PNDMScheduler` with `skip_prk_steps`, as SD 1.x ships it).
    Pndm,
    /// DDPM (diffusers `DDPMScheduler`, fixed_small variance), ancestral.
    Ddpm,
    // Third batch (issue #4).
    /// DEIS (diffusers `DEISMultistepScheduler`, logrho, order 2).
    Deis,
    /// LCM (diffusers `LCMScheduler`), for latent consistency models and LCM-LoRA.
    Lcm,
    /// TCD (diffusers `TCDScheduler`), with `eta` as its gamma.
    Tcd,
}

/// Per-request options of a sampler run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerOptions {
    pub schedule: Schedule,
    /// DDIM's eta (0 = deterministic); `None` = the sampler's default.
    pub eta: Option<f64>,
    /// Scale of the noise the ancestral / SDE samplers add (1 = reference).
    pub s_noise: Option<f64>,
    /// Settings of the model's scheduler config this request replaces.
    pub overrides: SchedulerOverrides,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            schedule: Schedule::Default,
            eta: None,
            s_noise: None,
            overrides: SchedulerOverrides::default(),
        }
    }
}

/// Schedules that work on sigmas (every schedule).
const SIGMA_SCHEDULES: &[Schedule] = &Schedule::ALL;

impl SamplerKind {
    /// Every sampler, in the order they are listed to users.
    pub const ALL: [SamplerKind; 18] = [
        SamplerKind::Euler,
        SamplerKind::EulerA,
        SamplerKind::Heun,
        SamplerKind::Lms,
        SamplerKind::Dpm2,
        SamplerKind::Dpm2A,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mSde,
        SamplerKind::DpmPpSde,
        SamplerKind::DpmPp2sA,
        SamplerKind::DpmPp3mSde,
        SamplerKind::Ddim,
        SamplerKind::UniPc,
        SamplerKind::Pndm,
        SamplerKind::Ddpm,
        // Third batch (issue #4).
        SamplerKind::Deis,
        SamplerKind::Lcm,
        SamplerKind::Tcd,
    ];

    /// The id used in requests and responses.
    pub fn id(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerA => "euler_a",
            SamplerKind::Heun => "heun",
            SamplerKind::Lms => "lms",
            SamplerKind::Dpm2 => "dpm2",
            SamplerKind::Dpm2A => "dpm2_a",
            SamplerKind::DpmPp2m => "dpmpp_2m",
            SamplerKind::DpmPp2mSde => "dpmpp_2m_sde",
            SamplerKind::DpmPpSde => "dpmpp_sde",
            SamplerKind::DpmPp2sA => "dpmpp_2s_a",
            SamplerKind::DpmPp3mSde => "dpmpp_3m_sde",
            SamplerKind::UniPc => "unipc",
            SamplerKind::Pndm => "pndm",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Deis => "deis",
            SamplerKind::Lcm => "lcm",
            SamplerKind::Tcd => "tcd",
        }
    }

    /// The name AUTOMATIC1111 shows.
    pub fn display_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerA => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::Lms => "LMS",
            SamplerKind::Dpm2 => "DPM2",
            SamplerKind::Dpm2A => "DPM2 a",
            SamplerKind::DpmPp2m => "DPM++ 2M",
            SamplerKind::DpmPp2mSde => "DPM++ 2M SDE",
            SamplerKind::DpmPpSde => "DPM++ SDE",
            SamplerKind::DpmPp2sA => "DPM++ 2S a",
            SamplerKind::DpmPp3mSde => "DPM++ 3M SDE",
            SamplerKind::UniPc => "UniPC",
            SamplerKind::Pndm => "PLMS",
            SamplerKind::Ddpm => "DDPM",
            SamplerKind::Deis => "DEIS",
            SamplerKind::Lcm => "LCM",
            SamplerKind::Tcd => "TCD",
        }
    }

    /// Other names users send for this sampler (ComfyUI, k-diffusion, diffusers classes).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            SamplerKind::Ddim => &["DDIMScheduler"],
            SamplerKind::Euler => &["EulerDiscreteScheduler", "k_euler"],
            SamplerKind::EulerA => {
                &["euler_ancestral", "EulerAncestralDiscreteScheduler", "k_euler_a"]
            }
            SamplerKind::Heun => &["HeunDiscreteScheduler", "k_heun"],
            SamplerKind::Lms => &["LMSDiscreteScheduler", "k_lms"],
            SamplerKind::Dpm2 => &["KDPM2DiscreteScheduler", "k_dpm_2"],
            SamplerKind::Dpm2A => &[
                "dpm2_ancestral",
                "dpm_2_ancestral",
                "KDPM2AncestralDiscreteScheduler",
                "k_dpm_2_a",
            ],
            SamplerKind::DpmPp2m => &["DPMSolverMultistepScheduler", "k_dpmpp_2m"],
            SamplerKind::DpmPp2mSde => &["k_dpmpp_2m_sde"],
            SamplerKind::DpmPpSde => &["DPMSolverSDEScheduler", "k_dpmpp_sde"],
            SamplerKind::DpmPp2sA => {
                &["dpmpp_2s_ancestral", "k_dpmpp_2s_a", "k_dpmpp_2s_ancestral"]
            }
            SamplerKind::DpmPp3mSde => &["k_dpmpp_3m_sde"],
            SamplerKind::UniPc => &["uni_pc", "uni_pc_bh2", "UniPCMultistepScheduler"],
            SamplerKind::Pndm => &["plms", "PNDMScheduler"],
            SamplerKind::Ddpm => &["DDPMScheduler"],
            SamplerKind::Deis => &["DEISMultistepScheduler", "deis_2m"],
            SamplerKind::Lcm => &["LCMScheduler", "lcm_lora"],
            SamplerKind::Tcd => &["TCDScheduler"],
        }
    }

    /// The schedules this sampler runs with (`default` always first).
    pub fn schedules(self) -> &'static [Schedule] {
        match self {
            SamplerKind::Ddim => &[Schedule::Default],
            SamplerKind::UniPc => unipc::SCHEDULES,
            SamplerKind::Pndm => pndm::SCHEDULES,
            SamplerKind::Ddpm => ddpm::SCHEDULES,
            SamplerKind::Deis => deis::SCHEDULES,
            SamplerKind::Lcm => lcm::SCHEDULES,
            SamplerKind::Tcd => tcd::SCHEDULES,
            _ => SIGMA_SCHEDULES,
        }
    }

    /// Whether the sampler takes `eta` (DDIM's eta; TCD's gamma).
    pub fn takes_eta(self) -> bool {
        matches!(self, SamplerKind::Ddim | SamplerKind::Tcd)
    }

    /// Whether the sampler reads the config's `timestep_spacing` (LCM and TCD take their
    /// timesteps from the distillation schedule instead, as their diffusers classes do).
    pub fn uses_timestep_spacing(self) -> bool {
        !matches!(self, SamplerKind::Lcm | SamplerKind::Tcd)
    }

    /// Whether the sampler adds noise that `s_noise` scales.
    pub fn takes_s_noise(self) -> bool {
        matches!(
            self,
            SamplerKind::EulerA
                | SamplerKind::Dpm2A
                | SamplerKind::DpmPp2mSde
                | SamplerKind::DpmPpSde
                | SamplerKind::DpmPp2sA
                | SamplerKind::DpmPp3mSde
        )
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

    /// Builds the sampler for one generation of `steps` steps (default options).
    ///
    /// Errors (never panics) on 0 steps, more steps than the model's training timesteps,
    /// or a config the sampler cannot run.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Sampler>> {
        self.build_with(config, steps, &SamplerOptions::default())
    }

    /// Builds the sampler with per-request options; a schedule the sampler does not
    /// support is an error.
    pub fn build_with(
        self,
        config: &SchedulerConfig,
        steps: usize,
        options: &SamplerOptions,
    ) -> Result<Box<dyn Sampler>> {
        let schedule = options.schedule;
        if !self.schedules().contains(&schedule) {
            return Err(Error::Msg(format!(
                "sampler {} does not support schedule {}",
                self.id(),
                schedule.id()
            )));
        }
        let s_noise = options.s_noise.unwrap_or(1.0);
        let overridden;
        let config = if options.overrides.is_empty() {
            config
        } else {
            overridden = options.overrides.apply(config);
            &overridden
        };
        Ok(match self {
            SamplerKind::Ddim => {
                Box::new(ddim::Ddim::new(config, steps, options.eta.unwrap_or(0.0))?)
            }
            SamplerKind::Euler => Box::new(euler::Euler::with_schedule(config, steps, schedule)?),
            SamplerKind::EulerA => Box::new(euler_ancestral::EulerAncestral::with_schedule(
                config, steps, schedule, s_noise,
            )?),
            SamplerKind::Heun => Box::new(heun::Heun::new(config, steps, schedule)?),
            SamplerKind::Lms => Box::new(lms::Lms::new(config, steps, schedule)?),
            SamplerKind::Dpm2 => Box::new(dpm2::Dpm2::new(config, steps, schedule, false, 1.0)?),
            SamplerKind::Dpm2A => {
                Box::new(dpm2::Dpm2::new(config, steps, schedule, true, s_noise)?)
            }
            SamplerKind::DpmPp2m => {
                Box::new(dpmpp_2m::DpmPp2m::new(config, steps, schedule, false, 1.0)?)
            }
            SamplerKind::DpmPp2mSde => {
                Box::new(dpmpp_2m::DpmPp2m::new(config, steps, schedule, true, s_noise)?)
            }
            SamplerKind::DpmPpSde => {
                Box::new(dpmpp_sde::DpmPpSde::new(config, steps, schedule, s_noise)?)
            }
            SamplerKind::DpmPp2sA => Box::new(dpmpp_2s_ancestral::DpmPp2sAncestral::new(
                config, steps, schedule, s_noise,
            )?),
            SamplerKind::DpmPp3mSde => {
                Box::new(dpmpp_3m_sde::DpmPp3mSde::new(config, steps, schedule, s_noise)?)
            }
            SamplerKind::UniPc => Box::new(unipc::UniPc::new(config, steps, schedule)?),
            SamplerKind::Pndm => Box::new(pndm::Pndm::new(config, steps)?),
            SamplerKind::Ddpm => Box::new(ddpm::Ddpm::new(config, steps)?),
            SamplerKind::Deis => Box::new(deis::Deis::new(config, steps, schedule)?),
            SamplerKind::Lcm => Box::new(lcm::Lcm::new(config, steps)?),
            SamplerKind::Tcd => {
                Box::new(tcd::Tcd::new(config, steps, options.eta.unwrap_or(tcd::DEFAULT_GAMMA))?)
            }
        })
    }
}

/// Resolves a sampler name as users send it: an id, A1111 display name or alias, or a
/// legacy A1111 combined name that also names a schedule ("DPM++ 2M Karras", "LMS Karras",
/// "DPM++ 2M SDE Exponential"). Returns the sampler and the schedule the name implies.
pub fn resolve_sampler_name(name: &str) -> Option<(SamplerKind, Option<Schedule>)> {
    if let Some(kind) = SamplerKind::from_name(name) {
        return Some((kind, None));
    }
    let wanted = name.trim();
    Schedule::ALL.into_iter().filter(|s| *s != Schedule::Default).find_map(|schedule| {
        let suffix = schedule.display_name();
        let cut = wanted.len().checked_sub(suffix.len())?;
        let (head, tail) = (wanted.get(..cut)?, wanted.get(cut..)?);
        if !tail.eq_ignore_ascii_case(suffix) {
            return None;
        }
        let head = head.trim_end_matches([' ', '_']);
        let kind = SamplerKind::from_name(head)?;
        kind.schedules().contains(&schedule).then_some((kind, Some(schedule)))
    })
}

/// One denoising run: built per job for a fixed number of steps, driven by the pipeline.
///
/// The pipeline calls, for each `step_index` in `0..timesteps().len()`:
/// `scale_model_input`, then the model at `timesteps()[step_index]`, then `step`.
/// Samplers that evaluate the model several times per step (Heun, DPM2) list every
/// evaluation in `timesteps()`, as diffusers does, and keep their state between calls.
pub trait Sampler: Send {
    /// The table of timesteps and noise levels this sampler runs over, when it keeps one
    /// (every sampler here does): `timesteps`, `init_noise_sigma`, `scale_model_input` and
    /// `add_noise` read it unless the sampler overrides them. A sampler without a table
    /// must implement the first three itself; its `add_noise` refuses img2img.
    fn step_table(&self) -> Option<&dyn StepTable> {
        None
    }

    /// The model timesteps, one per model evaluation, in the order they are visited.
    fn timesteps(&self) -> &[f64] {
        self.step_table().expect(NO_STEP_TABLE).timesteps()
    }

    /// The factor the initial unit-variance noise is multiplied by.
    fn init_noise_sigma(&self) -> f64 {
        self.step_table().expect(NO_STEP_TABLE).init_noise_sigma()
    }

    /// Scales the latent before it enters the model at `step_index`
    /// (identity for DDIM; divides by sqrt(sigma^2 + 1) for the Euler family).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.step_table().expect(NO_STEP_TABLE).scale_model_input(sample, step_index)
    }

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

    /// Model evaluations per step (2 for Heun and DPM2): a run that starts part-way, as
    /// img2img does at step `t_start`, starts at `timesteps()[t_start * order()]`
    /// (diffusers' `set_begin_index`).
    fn order(&self) -> usize {
        1
    }

    /// Noises a clean latent `original` to the noise level the sampler expects at
    /// `step_index` (diffusers' `add_noise` at the begin index, or at the current step
    /// index when inpainting re-noises the original after a step). A run started this way
    /// at `step_index` must then call `step` from `step_index` on with no earlier state.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        match self.step_table() {
            Some(table) => table.add_noise(original, noise, step_index),
            None => Err(Error::Msg("img2img is not supported with this sampler yet".into())),
        }
    }
}

/// Why a table-less sampler's default bookkeeping method cannot answer.
const NO_STEP_TABLE: &str =
    "a sampler without a step table must implement timesteps, init_noise_sigma and \
     scale_model_input; this is a bug";
