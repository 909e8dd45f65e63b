//! Where a network's time goes, by kind of layer: `sdserve bench --profile` switches this
//! on and prints, for each timed part, the wall and CPU seconds and GFLOP/s of the
//! convolutions, linear layers, attention and normalisations that ran through the CPU
//! kernels (see [`super::layers`]). What is left of a part's time ("other") is candle's
//! own ops: residual adds, upsampling, concatenation, the time embedding, copies.
//!
//! Off by default; when off, [`timed`] costs one relaxed atomic load. Layers run one after
//! another on the calling thread (each parallel inside), so the per-kind wall times add up
//! to the part's time; CPU time is the whole process's (all threads).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// The kinds of layer the profile tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// 3×3 stride-1 convolutions through Winograd.
    ConvWinograd,
    /// Other convolutions (im2col + gemm).
    ConvIm2col,
    /// Linear layers and the transformers' per-pixel projections.
    Linear,
    /// Multi-head attention (scores, softmax, weighted values).
    Attention,
    /// Group norm (with the fused SiLU where the ResNet blocks use it).
    GroupNorm,
    /// Layer norm.
    LayerNorm,
    /// GEGLU's gate (exact GELU times the hidden half).
    Geglu,
}

impl LayerKind {
    /// Every kind, in report order.
    pub const ALL: [LayerKind; 7] = [
        LayerKind::ConvWinograd,
        LayerKind::ConvIm2col,
        LayerKind::Linear,
        LayerKind::Attention,
        LayerKind::GroupNorm,
        LayerKind::LayerNorm,
        LayerKind::Geglu,
    ];

    /// The name the report prints.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::ConvWinograd => "conv 3x3 (winograd)",
            LayerKind::ConvIm2col => "conv (im2col)",
            LayerKind::Linear => "linear / projection",
            LayerKind::Attention => "attention",
            LayerKind::GroupNorm => "group norm (+silu)",
            LayerKind::LayerNorm => "layer norm",
            LayerKind::Geglu => "geglu",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Per kind: calls, wall nanoseconds, process CPU nanoseconds, FLOPs.
static TOTALS: [[AtomicU64; 4]; LayerKind::ALL.len()] =
    [const { [const { AtomicU64::new(0) }; 4] }; LayerKind::ALL.len()];

/// Switches the profile on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Relaxed);
}

/// Whether the profile is on.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Runs `work`, adding its wall and CPU time and `flops` to `kind`'s totals when the
/// profile is on.
pub(crate) fn timed<T>(kind: LayerKind, flops: u64, work: impl FnOnce() -> T) -> T {
    if !enabled() {
        return work();
    }
    let (wall, cpu) = (Instant::now(), process_cpu_nanos());
    let result = work();
    let totals = &TOTALS[kind as usize];
    totals[0].fetch_add(1, Relaxed);
    totals[1].fetch_add(wall.elapsed().as_nanos() as u64, Relaxed);
    totals[2].fetch_add(process_cpu_nanos().saturating_sub(cpu), Relaxed);
    totals[3].fetch_add(flops, Relaxed);
    result
}

/// One kind's totals since the last [`take`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindTotals {
    pub kind: LayerKind,
    pub calls: u64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub flops: u64,
}

/// The totals of every kind that ran since the last call, and resets them.
pub fn take() -> Vec<KindTotals> {
    LayerKind::ALL
        .iter()
        .zip(&TOTALS)
        .map(|(&kind, totals)| KindTotals {
            kind,
            calls: totals[0].swap(0, Relaxed),
            wall_seconds: totals[1].swap(0, Relaxed) as f64 / 1e9,
            cpu_seconds: totals[2].swap(0, Relaxed) as f64 / 1e9,
            flops: totals[3].swap(0, Relaxed),
        })
        .filter(|totals| totals.calls > 0)
        .collect()
}

/// CPU time of the whole process (all threads) in nanoseconds; 0 where unsupported.
fn process_cpu_nanos() -> u64 {
    #[cfg(unix)]
    {
        let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `now` is a valid timespec for the call to fill.
        if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) } == 0 {
            return now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_accumulate_per_kind_and_reset() {
        enable(true);
        take();
        let value = timed(LayerKind::Geglu, 10, || 7);
        timed(LayerKind::Geglu, 5, || ());
        let totals = take();
        enable(false);
        assert_eq!(value, 7);
        let geglu = totals.iter().find(|t| t.kind == LayerKind::Geglu).expect("geglu ran");
        // At least: other tests may run layers in parallel while the profile is on.
        assert!(geglu.calls >= 2 && geglu.flops >= 15, "{geglu:?}");
    }
}
