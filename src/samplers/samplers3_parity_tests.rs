//! Parity of the third batch of samplers (dpmpp_3m_sde, dpmpp_2s_a, dpmpp_sde) at 4 and 20
//! steps and the schedules default, karras, exponential and beta, reading
//! `tests/fixtures/samplers/samplers3.json` (made by `tools/make_sampler3_refs.py`): the
//! timesteps, the initial noise scale and a fake denoising loop with the request's
//! generators. References: diffusers' `DPMSolverMultistepScheduler` (3M SDE, its noise
//! from the generators), k-diffusion's `sample_dpmpp_2s_ancestral` (noise sampler drawing
//! from the same generators), and diffusers' `DPMSolverSDEScheduler` with `s_noise` 0 (its
//! deterministic part). DPM++ SDE's noise (a Brownian tree in the reference) is checked
//! statistically against torchsde runs.

use serde::Deserialize;

use super::parity_harness::{read_references, replay, replay_reference_loops, References};
use super::{SamplerKind, SamplerOptions, Schedule};

const REFERENCES: &str = "samplers3.json";

/// Midpoint timesteps are fractional: diffusers computes them in float64 from float64
/// sigmas, we from the float32 sigmas (hence 1e-3). Final samples within
/// [`super::parity_harness::LOOP_TOLERANCE`] of their scale.
#[test]
fn third_batch_samplers_match_their_references() {
    let (outcome, checked) = replay_reference_loops(REFERENCES, 1e-3);
    outcome.finish();
    assert_eq!(checked, 2 * 3 * 4 * 2, "configs × samplers × schedules × step counts");
}

/// One recorded statistic of DPM++ SDE's noise: over `runs` Brownian-tree seeds, the
/// pooled mean and standard deviation of (final with s_noise 1) − (final with s_noise 0).
#[derive(Deserialize)]
struct NoiseStatistics {
    config: String,
    schedule: String,
    steps: usize,
    runs: usize,
    values: usize,
    residual_mean: f64,
    residual_std: f64,
}

/// Runs per statistic on our side (each gives 128 independent values: the fake model is
/// elementwise, so every element follows the same scalar SDE).
const OUR_RUNS: u64 = 64;

/// DPM++ SDE's noise, drawn from the request's generators, has the distribution of the
/// reference's Brownian-tree noise: the final latents' deviation from the noise-free run
/// has the reference's standard deviation and zero mean. Both sides estimate from 8192
/// Gaussian values, so each std carries a relative standard error of 1/sqrt(2 × 8192) ≈
/// 0.8 % and their ratio ≈ 1.1 %: the tolerance of 5 % is about 4.5 standard errors. The
/// means' difference has a standard error of std × sqrt(2 / 8192) ≈ 1.6 % of std; the
/// tolerance is 7 % of std. The test has the power to see a wrong noise model: drawing the
/// two sub-steps' noises independently instead of as overlapping Brownian increments gives
/// the reference a residual std 16 % lower (SD 1.x config, 4 steps: 0.385 vs 0.460) and
/// 11 % lower (karras, 20 steps: 0.438 vs 0.494), measured with diffusers' scheduler.
#[test]
fn dpmpp_sde_noise_matches_the_brownian_reference_statistically() {
    let refs: References = read_references(REFERENCES);
    #[derive(Deserialize)]
    struct Statistics {
        noise_statistics: Vec<NoiseStatistics>,
    }
    let statistics = read_references::<Statistics>(REFERENCES).noise_statistics;
    assert!(!statistics.is_empty());
    let mut failures = Vec::new();
    for stat in &statistics {
        let config = &refs.configs[&stat.config];
        let schedule = Schedule::from_name(&stat.schedule).unwrap();
        let options =
            |s_noise| SamplerOptions { schedule, s_noise: Some(s_noise), ..Default::default() };
        let sde = SamplerKind::DpmPpSde;
        let base = replay(config, sde, stat.steps, &options(0.0), [100, 101]).sample;
        let mut values = Vec::new();
        for index in 0..OUR_RUNS {
            let seeds = [1000 + 2 * index, 1001 + 2 * index];
            let noisy = replay(config, sde, stat.steps, &options(1.0), seeds).sample;
            let residual = (noisy - &base).unwrap().flatten_all().unwrap();
            values.extend(residual.to_vec1::<f32>().unwrap().into_iter().map(f64::from));
        }
        let count = values.len() as f64;
        let mean = values.iter().sum::<f64>() / count;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (count - 1.0)).sqrt();
        let context = format!("{} {} {} steps", stat.config, stat.schedule, stat.steps);
        println!(
            "{context}: residual std {std:.5} vs reference {:.5} ({} runs, {} values); mean \
             {mean:.5} vs {:.5}",
            stat.residual_std, stat.runs, stat.values, stat.residual_mean
        );
        if (std / stat.residual_std - 1.0).abs() > 0.05 {
            failures.push(format!("{context}: std {std} vs {}", stat.residual_std));
        }
        if (mean - stat.residual_mean).abs() > 0.07 * stat.residual_std {
            failures.push(format!("{context}: mean {mean} vs {}", stat.residual_mean));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
