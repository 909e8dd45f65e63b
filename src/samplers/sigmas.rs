//! Per-request noise schedules ([`Schedule`]) and the sigma schedules of the samplers that
//! work on sigmas (the Euler/Heun/LMS/KDPM2 classes and DPM-Solver++), with each
//! schedule's reference:
//!
//! * `default`: the model's scheduler config, as each diffusers class's `set_timesteps`;
//! * `karras`, `exponential`, `beta`: diffusers' `use_karras_sigmas`,
//!   `use_exponential_sigmas`, `use_beta_sigmas` (beta α = β = 0.6) of the sampler's class;
//! * `normal`, `sgm_uniform`, `simple`, `ddim_uniform`: ComfyUI's `comfy/samplers.py`
//!   definitions of the same names, applied to the model's (diffusers-computed) training
//!   sigmas; model timesteps for those sigmas come from diffusers' log-sigma
//!   interpolation (`_sigma_to_t`), as diffusers does for custom sigmas.

use candle_core::{Error, Result};

use super::schedule::{
    alphas_cumprod, euler_schedule, numpy_arange_prefix, numpy_interp_on_index, numpy_linspace,
    SchedulerConfig, TimestepSpacing,
};

/// How the noise levels of a run are spread over the steps.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The model's own scheduler config (timestep spacing and sigmas as diffusers).
    #[default]
    Default,
    /// Karras et al. 2022, rho = 7.
    Karras,
    /// Uniform in log sigma.
    Exponential,
    /// ComfyUI's `sgm_uniform`: uniform in timesteps, end point excluded.
    SgmUniform,
    /// ComfyUI's `simple`: every (train/steps)-th training sigma.
    Simple,
    /// ComfyUI's `normal`: uniform in timesteps, end points included.
    Normal,
    /// ComfyUI's `ddim_uniform`: DDIM-like leading training sigmas.
    DdimUniform,
    /// Lee et al. 2024 ("Beta sampling is all you need"), alpha = beta = 0.6.
    Beta,
}

impl Schedule {
    /// Every schedule, in the order listed to users.
    pub const ALL: [Schedule; 8] = [
        Schedule::Default,
        Schedule::Karras,
        Schedule::Exponential,
        Schedule::SgmUniform,
        Schedule::Simple,
        Schedule::Normal,
        Schedule::DdimUniform,
        Schedule::Beta,
    ];

    /// The id used in requests and responses.
    pub fn id(self) -> &'static str {
        match self {
            Schedule::Default => "default",
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
            Schedule::SgmUniform => "sgm_uniform",
            Schedule::Simple => "simple",
            Schedule::Normal => "normal",
            Schedule::DdimUniform => "ddim_uniform",
            Schedule::Beta => "beta",
        }
    }

    /// The suffix AUTOMATIC1111 appends to a sampler name ("DPM++ 2M Karras").
    pub fn display_name(self) -> &'static str {
        match self {
            Schedule::Default => "Automatic",
            Schedule::Karras => "Karras",
            Schedule::Exponential => "Exponential",
            Schedule::SgmUniform => "SGM Uniform",
            Schedule::Simple => "Simple",
            Schedule::Normal => "Normal",
            Schedule::DdimUniform => "DDIM Uniform",
            Schedule::Beta => "Beta",
        }
    }

    /// Looks a schedule up by id or display name (case-insensitive; "automatic" and ""
    /// mean the default).
    pub fn from_name(name: &str) -> Option<Schedule> {
        let wanted = name.trim();
        if wanted.is_empty() {
            return Some(Schedule::Default);
        }
        Schedule::ALL.into_iter().find(|schedule| {
            schedule.id().eq_ignore_ascii_case(wanted)
                || schedule.display_name().eq_ignore_ascii_case(wanted)
        })
    }
}

/// Which diffusers class's `set_timesteps` a sampler follows; they differ in timestep
/// spacing, in where Karras takes its end points, and in rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaFamily {
    /// `EulerDiscreteScheduler`, `HeunDiscreteScheduler`, `LMSDiscreteScheduler`:
    /// Karras/exponential/beta span the interpolated inference sigmas; timesteps stay
    /// fractional.
    KDiffusion,
    /// `KDPM2DiscreteScheduler` and its ancestral twin: as above, but Karras timesteps are
    /// rounded.
    KDiffusionRoundKarras,
    /// `DPMSolverMultistepScheduler` (and its multistep relatives): integer timesteps from
    /// `num_inference_steps + 1` spacing; Karras spans the whole training range.
    DpmSolver,
    /// `DEISMultistepScheduler`: as `DpmSolver`, except that Karras timesteps are always
    /// rounded (also for cosine betas) and the final sigma is not 0 but the smallest
    /// training sigma (`default`) or the schedule's last sigma repeated (the others).
    Deis,
}

/// Model timesteps, sigmas (one per step plus the final 0) and the initial noise scale.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// Training sigmas sqrt((1 - ᾱ) / ᾱ) in float32, as diffusers computes them.
pub fn train_sigmas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let mut cumprod = alphas_cumprod(config)?;
    if config.rescale_betas_zero_snr {
        // diffusers' sigma schedulers nudge the zero terminal ᾱ so its sigma stays finite.
        *cumprod.last_mut().expect("at least two timesteps; this is a bug") = 2f32.powi(-24);
    }
    Ok(cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect())
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log-sigma, linearly interpolated
/// over the training log-sigmas, equals log(sigma).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas.iter().filter(|&&l| log_sigma - l as f64 >= 0.0).count();
    let low_idx = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx] as f64, log_sigmas[high_idx] as f64);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// float32 logs of the training sigmas (numpy `np.log` on the float32 array).
pub fn log_sigmas(train: &[f32]) -> Vec<f32> {
    train.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// Karras sigmas from `sigma_max` down to `sigma_min` (float64, as diffusers).
fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    numpy_linspace(1.0, n)
        .iter()
        .map(|ramp| (max_inv + ramp * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `np.linspace(start, stop, n)` for any end points.
fn linspace_between(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    values[n - 1] = stop;
    values
}

fn exponential(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace_between(sigma_max.ln(), sigma_min.ln(), n).into_iter().map(f64::exp).collect()
}

fn beta_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    numpy_linspace(1.0, n)
        .iter()
        .map(|x| sigma_min + beta_ppf(1.0 - x, 0.6, 0.6) * (sigma_max - sigma_min))
        .collect()
}

/// The sigmas a spanning schedule (Karras, exponential or beta) lays from `sigma_max`
/// down to `sigma_min`; the families differ only in where they take those end points.
fn spanned_sigmas(schedule: Schedule, sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    match schedule {
        Schedule::Karras => karras(sigma_min, sigma_max, n),
        Schedule::Exponential => exponential(sigma_min, sigma_max, n),
        Schedule::Beta => beta_sigmas(sigma_min, sigma_max, n),
        _ => unreachable!("only the spanning schedules get here; this is a bug"),
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7; about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (i, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularized incomplete beta function I_x(a, b) (continued fraction, Lentz).
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    if x > (a + 1.0) / (a + b + 2.0) {
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a);
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp() / a;
    let tiny = 1e-300;
    let (mut c, mut d) = (1.0, 1.0 - (a + b) * x / (a + 1.0));
    d = if d.abs() < tiny { tiny } else { d };
    d = 1.0 / d;
    let mut f = d;
    for m in 1..500 {
        let m = m as f64;
        for numerator in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = 1.0 + numerator / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            f *= c * d;
        }
        if (c * d - 1.0).abs() < 1e-16 {
            break;
        }
    }
    front * f
}

/// The beta distribution's quantile function (scipy's `beta.ppf`), by bisection to the
/// last float64 bit.
fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut low, mut high) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if mid <= low || mid >= high {
            break;
        }
        if regularized_incomplete_beta(mid, a, b) < q {
            low = mid;
        } else {
            high = mid;
        }
    }
    0.5 * (low + high)
}

/// diffusers' `init_noise_sigma` of the sigma classes.
fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    }
}

/// ComfyUI's `sigma(t)`: log-linear interpolation of the training sigmas, float32.
fn comfy_sigma_at(t: f32, log_sigmas: &[f32]) -> f32 {
    let t = t.clamp(0.0, (log_sigmas.len() - 1) as f32);
    let (low, high) = (t.floor() as usize, t.ceil() as usize);
    let w = t - t.floor();
    ((1.0 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
}

/// `torch.linspace(start, end, n)` in float32 (endpoints and step float32, halves from each
/// end, as torch computes it).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(
            |i| if i < halfway { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 },
        )
        .collect()
}

/// The ComfyUI schedules: sigmas (ending in 0) from the training sigmas.
fn comfy_sigmas(schedule: Schedule, train: &[f32], steps: usize) -> Vec<f32> {
    let logs = log_sigmas(train);
    let last = train.len() - 1;
    match schedule {
        Schedule::Normal | Schedule::SgmUniform => {
            // timestep(sigma_max) and timestep(sigma_min) are the two ends of the table.
            let (start, end) = (last as f32, 0.0f32);
            let timesteps = if schedule == Schedule::SgmUniform {
                let mut all = torch_linspace_f32(start, end, steps + 1);
                all.pop();
                all
            } else {
                torch_linspace_f32(start, end, steps)
            };
            let mut sigmas: Vec<f32> =
                timesteps.iter().map(|&t| comfy_sigma_at(t, &logs)).collect();
            sigmas.push(0.0);
            sigmas
        }
        Schedule::Simple => {
            let stride = train.len() as f64 / steps as f64;
            let mut sigmas: Vec<f32> =
                (0..steps).map(|x| train[last - (x as f64 * stride) as usize]).collect();
            sigmas.push(0.0);
            sigmas
        }
        Schedule::DdimUniform => {
            let stride = (train.len() / steps).max(1);
            let mut sigmas = vec![0.0f32];
            sigmas.extend((1..train.len()).step_by(stride).map(|x| train[x]));
            sigmas.reverse();
            sigmas
        }
        _ => unreachable!("only ComfyUI schedules reach comfy_sigmas; this is a bug"),
    }
}

/// Builds the sigma schedule of `family` for `steps` steps under `schedule`.
pub fn sigma_schedule(
    config: &SchedulerConfig,
    steps: usize,
    schedule: Schedule,
    family: SigmaFamily,
) -> Result<SigmaSchedule> {
    config.validate_steps(steps)?;
    let train = train_sigmas(config)?;
    let logs = log_sigmas(&train);
    let cosine = config.beta_schedule == "squaredcos_cap_v2";
    let dpm = matches!(family, SigmaFamily::DpmSolver | SigmaFamily::Deis);

    if matches!(
        schedule,
        Schedule::Normal | Schedule::SgmUniform | Schedule::Simple | Schedule::DdimUniform
    ) {
        let sigmas = comfy_sigmas(schedule, &train, steps);
        let timesteps = sigmas[..sigmas.len() - 1]
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s as f64, &logs);
                if dpm {
                    t.round_ties_even()
                } else {
                    t as f32 as f64
                }
            })
            .collect();
        let init_noise_sigma = if dpm {
            1.0
        } else {
            init_noise_sigma(&sigmas, config.spacing_or(TimestepSpacing::Linspace))
        };
        return Ok(SigmaSchedule { timesteps, sigmas, init_noise_sigma });
    }

    if !dpm {
        let spacing = config.spacing_or(TimestepSpacing::Linspace);
        let base = euler_schedule(config, steps)?;
        if schedule == Schedule::Default {
            return Ok(SigmaSchedule {
                timesteps: base.timesteps.iter().map(|&t| t as f64).collect(),
                sigmas: base.sigmas,
                init_noise_sigma: base.init_noise_sigma,
            });
        }
        // The end points are the interpolated inference sigmas, in float64.
        let sigma_max = numpy_interp_on_index(base.timesteps[0] as f64, &train);
        let sigma_min = numpy_interp_on_index(base.timesteps[steps - 1] as f64, &train);
        let wide = spanned_sigmas(schedule, sigma_min, sigma_max, steps);
        let round = schedule == Schedule::Karras && family == SigmaFamily::KDiffusionRoundKarras;
        let timesteps = wide
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                if round {
                    t.round_ties_even()
                } else {
                    t as f32 as f64
                }
            })
            .collect();
        let mut sigmas: Vec<f32> = wide.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let init_noise_sigma = init_noise_sigma(&sigmas, spacing);
        return Ok(SigmaSchedule { timesteps, sigmas, init_noise_sigma });
    }

    // DPMSolverMultistepScheduler.
    let train_count = config.num_train_timesteps;
    let int_timesteps: Vec<f64> = match config.spacing_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => {
            let mut all: Vec<f64> = numpy_linspace((train_count - 1) as f64, steps + 1)
                .iter()
                .map(|t| t.round_ties_even())
                .rev()
                .collect();
            all.pop();
            all
        }
        TimestepSpacing::Leading => {
            let ratio = train_count / (steps + 1);
            (1..=steps).rev().map(|i| (i * ratio + config.steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            numpy_arange_prefix(train_count as f64, -(train_count as f64 / steps as f64), steps)
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    };
    let (timesteps, sigmas_wide): (Vec<f64>, Vec<f64>) = match schedule {
        Schedule::Default => {
            let sigmas = int_timesteps.iter().map(|&t| numpy_interp_on_index(t, &train)).collect();
            (int_timesteps, sigmas)
        }
        _ => {
            let (sigma_min, sigma_max) = (train[0] as f64, train[train_count - 1] as f64);
            let wide = spanned_sigmas(schedule, sigma_min, sigma_max, steps);
            let round = schedule == Schedule::Karras && (!cosine || family == SigmaFamily::Deis);
            let timesteps = wide
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    // diffusers stores these as int64: rounded (Karras) or truncated.
                    if round {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            (timesteps, wide)
        }
    };
    if let Some(bad) = timesteps.iter().find(|&&t| !(0.0..train_count as f64).contains(&t)) {
        return Err(Error::Msg(format!(
            "{steps} steps give timestep {bad}, outside the model's 0..{train_count} training \
             timesteps; use fewer steps"
        )));
    }
    let mut sigmas: Vec<f32> = sigmas_wide.iter().map(|&s| s as f32).collect();
    let final_sigma = match (family, schedule) {
        (SigmaFamily::Deis, Schedule::Default) => train[0],
        (SigmaFamily::Deis, _) => *sigmas.last().expect("at least one step; this is a bug"),
        _ => 0.0,
    };
    sigmas.push(final_sigma);
    Ok(SigmaSchedule { timesteps, sigmas, init_noise_sigma: 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve() {
        for schedule in Schedule::ALL {
            assert_eq!(Schedule::from_name(schedule.id()), Some(schedule));
            assert_eq!(Schedule::from_name(schedule.display_name()), Some(schedule));
        }
        assert_eq!(Schedule::from_name("KARRAS"), Some(Schedule::Karras));
        assert_eq!(Schedule::from_name("nope"), None);
    }

    #[test]
    fn beta_quantiles_match_scipy() {
        // scipy.stats.beta.ppf(q, 0.6, 0.6)
        for (q, expected) in
            [(0.25, 0.175_680_378_652_694_98), (0.5, 0.5), (0.9, 0.960_415_594_411_219_2)]
        {
            let ours = beta_ppf(q, 0.6, 0.6);
            assert!((ours - expected).abs() < 1e-9, "{q}: {ours} vs {expected}");
        }
    }
}
