//! Parity of every sigma sampler × schedule against diffusers at 4 and 20 steps, reading
//! `tests/fixtures/samplers/schedules.json` (made by `tools/make_schedule_refs.py`): the
//! timesteps, sigmas and a fake denoising loop with the request's generators (replayed by
//! [`super::parity_harness`]). ComfyUI's schedules are checked through Euler with
//! diffusers' custom-sigma path.

use super::parity_harness::replay_reference_loops;

/// Timesteps within 1e-3 (fractional sigma-derived timesteps); final samples within
/// [`super::parity_harness::LOOP_TOLERANCE`] of their scale.
#[test]
fn sigma_samplers_and_schedules_match_diffusers() {
    replay_reference_loops("schedules.json", 1e-3).0.finish();
}
