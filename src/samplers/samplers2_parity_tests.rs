//! Parity of the second batch of samplers (unipc, pndm, ...) against diffusers at 4 and 20
//! steps and every schedule their class offers, reading
//! `tests/fixtures/samplers/samplers2.json` (made by `tools/make_sampler2_refs.py`): the
//! timesteps, the initial noise scale and a fake denoising loop with the request's
//! generators (replayed by [`super::parity_harness`]).

use super::parity_harness::replay_reference_loops;

/// Timesteps exactly equal (integers); final samples within
/// [`super::parity_harness::LOOP_TOLERANCE`] of their scale.
#[test]
fn second_batch_samplers_match_diffusers() {
    replay_reference_loops("samplers2.json", 0.0).0.finish();
}
