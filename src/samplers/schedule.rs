//! Noise schedules and the scheduler configuration read from a model's
//! `scheduler/scheduler_config.json`: betas, cumulative alphas, inference timestep spacings
//! and the Euler family's sigmas, computed with diffusers' float32/float64 arithmetic so
//! timesteps match exactly and sigmas to the last float32 bit.

use candle_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    /// Every prediction type, by the names diffusers' configs use.
    pub const ALL: [PredictionType; 3] =
        [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample];

    /// The name diffusers' `prediction_type` uses.
    pub fn id(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }

    /// Looks a prediction type up by id (case-insensitive; "v" means v_prediction).
    pub fn from_name(name: &str) -> Option<PredictionType> {
        let wanted = name.trim();
        if wanted.eq_ignore_ascii_case("v") {
            return Some(PredictionType::VPrediction);
        }
        PredictionType::ALL.into_iter().find(|kind| kind.id().eq_ignore_ascii_case(wanted))
    }
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    #[default]
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    /// Every spacing, by the names diffusers' `timestep_spacing` uses.
    pub const ALL: [TimestepSpacing; 3] =
        [TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace];

    /// The name diffusers' `timestep_spacing` uses.
    pub fn id(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Trailing => "trailing",
            TimestepSpacing::Linspace => "linspace",
        }
    }

    /// Looks a spacing up by id (case-insensitive).
    pub fn from_name(name: &str) -> Option<TimestepSpacing> {
        let wanted = name.trim();
        TimestepSpacing::ALL.into_iter().find(|kind| kind.id().eq_ignore_ascii_case(wanted))
    }
}

/// Per-request replacements for settings of the model's scheduler config (`None` keeps
/// the model's value). Applied to the config before a sampler is built, so every sampler
/// whose diffusers class reads the setting sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct SchedulerOverrides {
    pub timestep_spacing: Option<TimestepSpacing>,
    /// diffusers' `rescale_betas_zero_snr` (Lin et al. 2023).
    pub rescale_betas_zero_snr: Option<bool>,
    pub prediction_type: Option<PredictionType>,
}

impl SchedulerOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        *self == SchedulerOverrides::default()
    }

    /// The model's config with these settings replaced.
    pub fn apply(&self, config: &SchedulerConfig) -> SchedulerConfig {
        let mut config = config.clone();
        if let Some(spacing) = self.timestep_spacing {
            config.timestep_spacing = Some(spacing);
        }
        if let Some(zero_snr) = self.rescale_betas_zero_snr {
            config.rescale_betas_zero_snr = zero_snr;
        }
        if let Some(prediction_type) = self.prediction_type {
            config.prediction_type = prediction_type;
        }
        config
    }
}

/// The subset of diffusers' scheduler config that the samplers use. Unknown keys are
/// ignored (configs carry the fields of whichever class saved them).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// "linear" | "scaled_linear" | "squaredcos_cap_v2".
    pub beta_schedule: String,
    pub prediction_type: PredictionType,
    /// `None` when the config file has no `timestep_spacing` key (SD 1.x's PNDM config):
    /// then each sampler uses its diffusers class default, as `from_config` does
    /// (DDIM: leading; Euler and Euler ancestral: linspace).
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub rescale_betas_zero_snr: bool,
    /// LCM / TCD: the distillation schedule's step count (diffusers' default 50).
    pub original_inference_steps: Option<usize>,
    /// LCM / TCD: the timestep scale of the consistency boundary condition (default 10).
    pub timestep_scaling: Option<f64>,
}

impl Default for SchedulerConfig {
    /// Stable Diffusion 1.x's scheduler settings.
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".to_string(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            rescale_betas_zero_snr: false,
            original_inference_steps: None,
            timestep_scaling: None,
        }
    }
}

impl SchedulerConfig {
    /// The spacing to use, falling back to the sampler class's own default.
    pub fn spacing_or(&self, class_default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(class_default)
    }

    /// Checks the config and a requested step count before any schedule is computed.
    pub fn validate_steps(&self, steps: usize) -> Result<()> {
        if self.num_train_timesteps < 2 {
            return Err(Error::Msg(format!(
                "scheduler config: num_train_timesteps must be at least 2, got {}",
                self.num_train_timesteps
            )));
        }
        if steps == 0 {
            return Err(Error::Msg("steps must be at least 1, got 0".to_string()));
        }
        if steps > self.num_train_timesteps {
            return Err(Error::Msg(format!(
                "steps ({steps}) cannot exceed the model's num_train_timesteps ({})",
                self.num_train_timesteps
            )));
        }
        Ok(())
    }
}

/// The training noise schedule (betas), in float32 as diffusers keeps it, after the
/// optional zero-terminal-SNR rescale.
pub fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.num_train_timesteps;
    if n < 2 {
        return Err(Error::Msg(format!(
            "scheduler config: num_train_timesteps must be at least 2, got {n}"
        )));
    }
    let finite_range = config.beta_start.is_finite() && config.beta_end.is_finite();
    let betas = match config.beta_schedule.as_str() {
        "linear" | "scaled_linear" if !finite_range => {
            return Err(Error::Msg(format!(
                "scheduler config: beta_start ({}) and beta_end ({}) must be finite",
                config.beta_start, config.beta_end
            )))
        }
        "linear" => torch_linspace_f32(config.beta_start, config.beta_end, n),
        "scaled_linear" => torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
            .into_iter()
            .map(|root| root * root)
            .collect(),
        "squaredcos_cap_v2" => cosine_betas(n),
        other => {
            return Err(Error::Msg(format!(
                "scheduler config: beta_schedule {other:?} is not supported \
                 (expected linear, scaled_linear or squaredcos_cap_v2)"
            )))
        }
    };
    Ok(if config.rescale_betas_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas })
}

/// Refuses an epsilon-prediction run that visits a timestep whose ᾱ the zero-SNR rescale
/// made exactly 0: the samplers that index ᾱ directly (DDIM, LCM, TCD) estimate
/// x0 = (x − sqrt(1 − ᾱ)·ε) / sqrt(ᾱ) there, a division by zero (diffusers returns a NaN
/// image). The sigma samplers nudge that ᾱ to 2^-24 instead, as diffusers does.
pub(crate) fn check_epsilon_at_zero_snr(
    config: &SchedulerConfig,
    alphas_cumprod: &[f32],
    timesteps: &[usize],
    sampler: &str,
) -> Result<()> {
    if config.prediction_type != PredictionType::Epsilon {
        return Ok(());
    }
    match timesteps.iter().find(|&&t| alphas_cumprod[t] == 0.0) {
        Some(t) => Err(Error::Msg(format!(
            "{sampler} with rescale_betas_zero_snr visits timestep {t}, where the signal is \
             zero and an epsilon-prediction model cannot recover the image; use \
             prediction_type v_prediction (zero-SNR models predict v) or another sampler"
        ))),
        None => Ok(()),
    }
}

/// Cumulative products of (1 - beta), float32 values as diffusers' `alphas_cumprod`.
pub fn alphas_cumprod(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let alphas: Vec<f32> = betas(config)?.iter().map(|beta| 1.0 - beta).collect();
    Ok(cumprod(&alphas))
}

/// torch's CPU `cumprod` on float32: it accumulates in float64 and rounds each output.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&value| {
            product *= value as f64;
            product as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` bit for bit: endpoints and step are
/// float32, each value is one fused `start + i*step` (or `end - (n-1-i)*step` for the
/// second half) rounded once.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                (step as f64).mul_add(i as f64, start as f64) as f32
            } else {
                (-(step as f64)).mul_add((n - 1 - i) as f64, end as f64) as f32
            }
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha-bar ("squaredcos_cap_v2"),
/// computed in float64 and stored as float32.
fn cosine_betas(n: usize) -> Vec<f32> {
    const MAX_BETA: f64 = 0.999;
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}

/// Rescales betas so the last timestep has zero SNR (Lin et al. 2023, algorithm 1), in
/// float32 like diffusers' `rescale_zero_terminal_snr`.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
    let sqrt_cumprod: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_cumprod[0];
    let last = *sqrt_cumprod.last().expect("at least two betas; this is a bug");
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = sqrt_cumprod
        .iter()
        .map(|s| {
            let shifted = (s - last) * scale;
            shifted * shifted
        })
        .collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alphas_bar[0]);
    for pair in alphas_bar.windows(2) {
        rescaled.push(1.0 - pair[1] / pair[0]);
    }
    rescaled
}

/// `np.linspace(0, stop, n)` in float64 (numpy: i * step, last value exactly `stop`).
pub(crate) fn numpy_linspace(stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![0.0];
    }
    let step = stop / (n - 1) as f64;
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + 0.0).collect();
    values[n - 1] = stop;
    values
}

/// The first `n` values of numpy's float `np.arange(start, stop, step)`: numpy fills
/// `start + i * ((start + step) - start)`. numpy's own length, ceil((stop-start)/step), is
/// sometimes n + 1 for trailing spacing (e.g. 61 steps), which makes diffusers run an extra
/// step at timestep -1; this port keeps exactly the requested number of steps.
pub(crate) fn numpy_arange_prefix(start: f64, step: f64, n: usize) -> Vec<f64> {
    let delta = (start + step) - start;
    (0..n)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// Integer timesteps of diffusers' `DDIMScheduler.set_timesteps`, descending.
pub fn ddim_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<usize>> {
    config.validate_steps(steps)?;
    let train = config.num_train_timesteps;
    let timesteps: Vec<i64> = match config.spacing_or(TimestepSpacing::Leading) {
        TimestepSpacing::Linspace => numpy_linspace((train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            leading_timesteps(config, steps).into_iter().map(|t| t as i64).collect()
        }
        TimestepSpacing::Trailing => {
            trailing_timesteps(train, steps).into_iter().map(|t| t as i64).collect()
        }
    };
    timesteps
        .into_iter()
        .map(|t| {
            usize::try_from(t).ok().filter(|&t| t < train).ok_or_else(|| {
                Error::Msg(format!(
                    "{steps} steps with steps_offset {} give timestep {t}, outside the \
                     model's 0..{train} training timesteps; use fewer steps",
                    config.steps_offset
                ))
            })
        })
        .collect()
}

/// Leading spacing: multiples of floor(train / steps) plus `steps_offset`, descending.
pub(crate) fn leading_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let ratio = config.num_train_timesteps / steps;
    (0..steps).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
}

/// Trailing spacing: round(train - i * train/steps) - 1, descending from train - 1.
pub(crate) fn trailing_timesteps(train: usize, steps: usize) -> Vec<f64> {
    let ratio = train as f64 / steps as f64;
    numpy_arange_prefix(train as f64, -ratio, steps)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// Timesteps (float32 values, possibly fractional for linspace) and sigmas (with a final 0)
/// of diffusers' `EulerDiscreteScheduler` / `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerSchedule {
    /// One per step, descending.
    pub timesteps: Vec<f32>,
    /// One per step plus the final 0.
    pub sigmas: Vec<f32>,
    /// Standard deviation of the initial noise.
    pub init_noise_sigma: f32,
}

/// Builds the Euler family's schedule: timesteps per spacing, sigmas = sqrt((1-ᾱ)/ᾱ)
/// interpolated linearly at each timestep (numpy `interp`, in float64), then a final 0.
pub fn euler_schedule(config: &SchedulerConfig, steps: usize) -> Result<EulerSchedule> {
    config.validate_steps(steps)?;
    let train = config.num_train_timesteps;
    let spacing = config.spacing_or(TimestepSpacing::Linspace);
    let timesteps: Vec<f32> = match spacing {
        TimestepSpacing::Linspace => {
            numpy_linspace((train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            leading_timesteps(config, steps).into_iter().map(|t| t as f32).collect()
        }
        TimestepSpacing::Trailing => {
            trailing_timesteps(train, steps).into_iter().map(|t| t as f32).collect()
        }
    };

    let mut cumprod = alphas_cumprod(config)?;
    if config.rescale_betas_zero_snr {
        // diffusers' Euler classes nudge the zero terminal ᾱ so its sigma stays finite.
        *cumprod.last_mut().expect("at least two timesteps; this is a bug") = 2f32.powi(-24);
    }
    let train_sigmas: Vec<f32> = cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
    let mut sigmas: Vec<f32> =
        timesteps.iter().map(|&t| numpy_interp_on_index(t as f64, &train_sigmas) as f32).collect();
    sigmas.push(0.0);

    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    };
    Ok(EulerSchedule { timesteps, sigmas, init_noise_sigma })
}

/// `np.interp(x, arange(len(values)), values)` in float64, clamped at both ends.
pub(crate) fn numpy_interp_on_index(x: f64, values: &[f32]) -> f64 {
    let last = values.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return values[0] as f64;
    }
    if x >= last as f64 {
        return values[last] as f64;
    }
    let j = x.floor() as usize;
    let (left, right) = (values[j] as f64, values[j + 1] as f64);
    let slope = (right - left) / 1.0;
    slope * (x - j as f64) + left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    #[test]
    fn bad_steps_and_schedules_are_errors_not_panics() {
        let config = sd15();
        assert!(ddim_timesteps(&config, 0).is_err());
        assert!(euler_schedule(&config, 0).is_err());
        let message = ddim_timesteps(&config, 1001).unwrap_err().to_string();
        assert!(message.contains("num_train_timesteps"), "{message}");
        assert!(euler_schedule(&config, 1001).is_err());
        // Leading spacing with steps_offset 1 would reach timestep 1000 with 1000 steps.
        assert!(ddim_timesteps(&config, 1000).is_err());
        let unknown = SchedulerConfig { beta_schedule: "sigmoid".to_string(), ..sd15() };
        assert!(betas(&unknown).unwrap_err().to_string().contains("sigmoid"));
        let tiny = SchedulerConfig { num_train_timesteps: 1, ..sd15() };
        assert!(betas(&tiny).is_err());
        assert!(euler_schedule(&tiny, 1).is_err());
    }

    #[test]
    fn config_without_spacing_key_uses_class_defaults() {
        let config: SchedulerConfig =
            serde_json::from_str(r#"{"steps_offset": 1, "skip_prk_steps": true}"#).unwrap();
        assert_eq!(config.timestep_spacing, None);
        assert_eq!(ddim_timesteps(&config, 5).unwrap(), vec![801, 601, 401, 201, 1]);
        let euler = euler_schedule(&config, 5).unwrap();
        assert_eq!(euler.timesteps, vec![999.0, 749.25, 499.5, 249.75, 0.0]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let config = SchedulerConfig { rescale_betas_zero_snr: true, ..sd15() };
        let cumprod = alphas_cumprod(&config).unwrap();
        assert_eq!(*cumprod.last().unwrap(), 0.0);
        let original = alphas_cumprod(&sd15()).unwrap()[0];
        assert!((cumprod[0] - original).abs() < 1e-6, "{} vs {original}", cumprod[0]);
    }
}
