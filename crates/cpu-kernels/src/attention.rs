//! Multi-head scaled dot-product attention on token-major f32 slices, blocked so that
//! the score matrix never exists whole.
//!
//! Queries, keys and values arrive as the projections make them, `[batch, tokens, heads ·
//! head_dim]`, and the result leaves in the same layout, so no head split/merge copies are
//! needed: each head is a column window read through the `gemm` crate's strides. The work
//! is cut into tasks of (batch, head, block of query rows); a task computes its block's
//! scores against all keys (`scale · Q Kᵀ`, sized to stay in the core's L2 cache), takes the
//! softmax of each row in place with a vectorised exponential, multiplies by V and divides
//! each output row by its softmax sum. Tasks run in parallel, each gemm single-threaded.
//!
//! Compared with materialising all scores (what two batched matmuls around a softmax do),
//! this touches a few hundred KiB per task instead of writing and re-reading a
//! `batch · heads · tokens²` matrix (1 GiB for SD 1.5's self-attention at 512², batch 2),
//! so memory traffic, allocation and page faults disappear. The arithmetic is the same
//! softmax(QKᵀ/√d)V; results differ from the unblocked form by float rounding only.

use crate::bf16::{self, Lhs, PackedRhs, Rhs};
use crate::MatrixRef;
use rayon::prelude::*;
use std::cell::RefCell;

/// Shape of one attention call. Queries are `[batch, query_tokens, heads · head_dim]`,
/// keys and values `[batch, key_tokens, heads · head_dim]`, all contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionGeometry {
    pub batch: usize,
    pub heads: usize,
    pub query_tokens: usize,
    pub key_tokens: usize,
    pub head_dim: usize,
}

impl AttentionGeometry {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Scores per task are kept under this many floats (768 KiB, 48 rows of 4096 keys): the
/// block stays in a 1 MiB L2 while the keys and values stream past it. Measured on Zen 4
/// (SD 1.5 self-attention at 512², 8 heads of 40): 16 rows 1.00 CPU-s, 48 rows 0.91.
const SCORE_BLOCK_FLOATS: usize = 192 << 10;

/// At most this many query rows per task: gemm (single-threaded) packs the left operand of
/// the transposed product when its width exceeds 8 · 6 columns.
const MAX_BLOCK_ROWS: usize = 48;

thread_local! {
    /// Per-thread score block and output rows, reused across tasks and calls.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `softmax(scale · Q Kᵀ) V` per batch and head, as `[batch, query_tokens, heads ·
/// head_dim]`. `threads` > 1 runs the tasks on rayon's pool.
///
/// # Panics
/// When slice lengths do not match the geometry (a caller bug).
pub fn attention(
    query: &[f32],
    key: &[f32],
    value: &[f32],
    geometry: &AttentionGeometry,
    scale: f32,
    threads: usize,
) -> Vec<f32> {
    let g = geometry;
    let mut output = vec![0f32; g.batch * g.query_tokens * g.width()];
    attention_into(&mut output, 0.0, query, key, value, g, scale, 1.0, threads);
    output
}

/// `output = output_scale · output + weight · softmax(scale · Q Kᵀ) V`: with
/// `output_scale` 1 this adds a weighted attention to an existing result (IP-Adapter's
/// extra keys and values), with 0 it overwrites `output`.
///
/// # Panics
/// When slice lengths do not match the geometry (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    output: &mut [f32],
    output_scale: f32,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    geometry: &AttentionGeometry,
    scale: f32,
    weight: f32,
    threads: usize,
) {
    let g = *geometry;
    let width = g.width();
    assert_eq!(query.len(), g.batch * g.query_tokens * width, "attention query length");
    assert_eq!(key.len(), g.batch * g.key_tokens * width, "attention key length");
    assert_eq!(value.len(), g.batch * g.key_tokens * width, "attention value length");
    assert_eq!(output.len(), query.len(), "attention output length");
    if output.is_empty() || g.key_tokens == 0 {
        return;
    }
    if bf16::matmul_precision() == bf16::MatmulPrecision::Bf16
        && bf16::bf16_supported()
        && g.key_tokens >= MIN_BF16_KEYS
    {
        return attention_bf16(output, output_scale, query, key, value, &g, scale, weight, threads);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::attention_avx512::available() {
        return crate::attention_avx512::attention_into(
            output,
            output_scale,
            query,
            key,
            value,
            &g,
            scale,
            weight,
            threads,
        );
    }
    attention_into_gemm(output, output_scale, query, key, value, &g, scale, weight, threads);
}

/// [`attention_into`] on any CPU: each task's two products through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn attention_into_gemm(
    output: &mut [f32],
    output_scale: f32,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    geometry: &AttentionGeometry,
    scale: f32,
    weight: f32,
    threads: usize,
) {
    let g = *geometry;
    let width = g.width();
    // Keys transposed per (batch, head) to `[head_dim, key_tokens]`: the layout gemm reads
    // without packing (as the column-major left operand of the transposed product), which
    // would otherwise repack every key once per block of query rows.
    let mut keys_transposed = vec![0f32; key.len()];
    let per_head = g.head_dim * g.key_tokens;
    let transpose = |(pair, out): (usize, &mut [f32])| {
        let (batch, head) = (pair / g.heads, pair % g.heads);
        for (j, token) in
            key[batch * g.key_tokens * width..].chunks(width).take(g.key_tokens).enumerate()
        {
            for (d, &x) in token[head * g.head_dim..][..g.head_dim].iter().enumerate() {
                out[d * g.key_tokens + j] = x;
            }
        }
    };
    if threads > 1 {
        keys_transposed.par_chunks_mut(per_head).enumerate().for_each(transpose);
    } else {
        keys_transposed.chunks_mut(per_head).enumerate().for_each(transpose);
    }
    // A multiple of the microkernel's 6 columns where the budget allows.
    let block_rows = match (SCORE_BLOCK_FLOATS / g.key_tokens).clamp(6, MAX_BLOCK_ROWS) {
        rows if rows >= 12 => rows / 6 * 6,
        rows => rows,
    }
    .min(g.query_tokens);
    let blocks_per_head = g.query_tokens.div_ceil(block_rows);
    let tasks = g.batch * g.heads * blocks_per_head;
    let window = OutputWindow::new(output, &g, output_scale, weight);
    let run = |task: usize| {
        let batch = task / (g.heads * blocks_per_head);
        let head = (task / blocks_per_head) % g.heads;
        let row0 = (task % blocks_per_head) * block_rows;
        let rows = block_rows.min(g.query_tokens - row0);
        let column = head * g.head_dim;
        let q = &query[(batch * g.query_tokens + row0) * width + column..];
        let k = &keys_transposed[(batch * g.heads + head) * per_head..][..per_head];
        let v = &value[batch * g.key_tokens * width + column..];
        SCRATCH.with(|scratch| {
            let (scores, block_out) = &mut *scratch.borrow_mut();
            scores.resize(block_rows * g.key_tokens, 0.0);
            block_out.resize(block_rows * g.head_dim, 0.0);
            // SAFETY: q has `rows` rows of stride `width` from its start, each head_dim
            // wide inside the row; k and v have key_tokens such rows; scores and block_out
            // were sized above. All reads stay inside the slices checked on entry.
            unsafe {
                gemm::gemm(
                    rows,
                    g.key_tokens,
                    g.head_dim,
                    scores.as_mut_ptr(),
                    1,
                    g.key_tokens as isize,
                    false,
                    q.as_ptr(),
                    1,
                    width as isize,
                    k.as_ptr(),
                    1,
                    g.key_tokens as isize,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            let mut sums = [0f32; MAX_BLOCK_ROWS];
            for (row, sum) in scores.chunks_exact_mut(g.key_tokens).take(rows).zip(&mut sums) {
                *sum = softmax_numerators(row);
            }
            // SAFETY: as above; block_out holds rows × head_dim.
            unsafe {
                gemm::gemm(
                    rows,
                    g.head_dim,
                    g.key_tokens,
                    block_out.as_mut_ptr(),
                    1,
                    g.head_dim as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    g.key_tokens as isize,
                    v.as_ptr(),
                    1,
                    width as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            // SAFETY: this task alone writes these rows of this head.
            unsafe { window.write_rows(batch, head, row0, block_out, g.head_dim, &sums[..rows]) };
        });
    };
    for_each_task(tasks, threads, run);
}

/// Where attention tasks put their finished rows: `output` held as an address, because the
/// tasks' (rows × head columns) windows interleave in memory, with the blend of
/// [`attention_into`]: `output = output_scale · output + weight · values / softmax sum`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputWindow {
    address: usize,
    len: usize,
    geometry: AttentionGeometry,
    output_scale: f32,
    weight: f32,
}

impl OutputWindow {
    pub(crate) fn new(
        output: &mut [f32],
        geometry: &AttentionGeometry,
        output_scale: f32,
        weight: f32,
    ) -> Self {
        let address = output.as_mut_ptr() as usize;
        OutputWindow { address, len: output.len(), geometry: *geometry, output_scale, weight }
    }

    /// Blends one task's rows into the output: `values` holds one row of `head_dim`
    /// weighted values every `values_stride` floats, `sums` their softmax sums (one per
    /// row), for query rows `row0..row0 + sums.len()` of `head` in item `batch`.
    ///
    /// # Safety
    /// No other task writes those rows of that head while this runs, and the output slice
    /// given to [`OutputWindow::new`] is still borrowed for the tasks.
    pub(crate) unsafe fn write_rows(
        &self,
        batch: usize,
        head: usize,
        row0: usize,
        values: &[f32],
        values_stride: usize,
        sums: &[f32],
    ) {
        let g = &self.geometry;
        for (r, (row_values, sum)) in values.chunks(values_stride).zip(sums).enumerate() {
            let start = (batch * g.query_tokens + row0 + r) * g.width() + head * g.head_dim;
            assert!(start + g.head_dim <= self.len, "attention output row out of range");
            let out =
                std::slice::from_raw_parts_mut((self.address as *mut f32).add(start), g.head_dim);
            let factor = self.weight / sum;
            if self.output_scale == 0.0 {
                for (o, &x) in out.iter_mut().zip(row_values) {
                    *o = x * factor;
                }
            } else {
                for (o, &x) in out.iter_mut().zip(row_values) {
                    *o = *o * self.output_scale + x * factor;
                }
            }
        }
    }
}

/// Runs `run` for every task index, on rayon's pool when there are threads and tasks to
/// share.
pub(crate) fn for_each_task(tasks: usize, threads: usize, run: impl Fn(usize) + Sync + Send) {
    if threads > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Fewest keys for which the bf16 products pay for packing the keys and values.
const MIN_BF16_KEYS: usize = 32;

/// Query rows per task of [`attention_bf16`]: four of the bf16 kernel's 12-row tiles.
const BF16_BLOCK_ROWS: usize = 4 * bf16::MR;

/// [`attention_into`] with both products in bf16 (f32 accumulation; see [`crate::bf16`]):
/// per (batch, head) the keys, pre-multiplied by `scale`, and the values are rounded and
/// packed once; each task packs its query rows and its softmax numerators. The softmax
/// itself and the normalisation stay f32.
#[allow(clippy::too_many_arguments)]
fn attention_bf16(
    output: &mut [f32],
    output_scale: f32,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    g: &AttentionGeometry,
    scale: f32,
    weight: f32,
    threads: usize,
) {
    let width = g.width();
    let pack = |pair: usize| {
        let (batch, head) = (pair / g.heads, pair % g.heads);
        let first = batch * g.key_tokens * width + head * g.head_dim;
        let mut scaled_keys = vec![0f32; g.key_tokens * g.head_dim];
        for (row, token) in scaled_keys.chunks_exact_mut(g.head_dim).zip(key[first..].chunks(width))
        {
            for (k, &x) in row.iter_mut().zip(&token[..g.head_dim]) {
                *k = x * scale;
            }
        }
        // Kᵀ (head_dim × key_tokens) and V (key_tokens × head_dim), read through strides.
        let keys = MatrixRef { data: &scaled_keys, row_stride: 1, col_stride: g.head_dim };
        let values = MatrixRef { data: &value[first..], row_stride: width, col_stride: 1 };
        (
            PackedRhs::new(keys, g.head_dim, g.key_tokens, 1),
            PackedRhs::new(values, g.key_tokens, g.head_dim, 1),
        )
    };
    let pairs = g.batch * g.heads;
    let packed: Vec<(PackedRhs, PackedRhs)> = if threads > 1 {
        (0..pairs).into_par_iter().map(pack).collect()
    } else {
        (0..pairs).map(pack).collect()
    };
    let block_rows = BF16_BLOCK_ROWS.min(g.query_tokens);
    let blocks_per_head = g.query_tokens.div_ceil(block_rows);
    let tasks = pairs * blocks_per_head;
    let window = OutputWindow::new(output, g, output_scale, weight);
    let run = |task: usize| {
        let pair = task / blocks_per_head;
        let (batch, head) = (pair / g.heads, pair % g.heads);
        let row0 = (task % blocks_per_head) * block_rows;
        let rows = block_rows.min(g.query_tokens - row0);
        let column = head * g.head_dim;
        let q = &query[(batch * g.query_tokens + row0) * width + column..];
        let (keys, values) = &packed[pair];
        SCRATCH.with(|scratch| {
            let (scores, block_out) = &mut *scratch.borrow_mut();
            scores.resize(block_rows * g.key_tokens, 0.0);
            block_out.resize(block_rows * g.head_dim, 0.0);
            let q = Lhs::Strided(MatrixRef { data: q, row_stride: width, col_stride: 1 });
            let shape = (rows, g.key_tokens, g.head_dim);
            bf16::matmul(scores, g.key_tokens, q, Rhs::Packed(keys), shape, false, 1);
            let mut sums = [0f32; BF16_BLOCK_ROWS];
            for (row, sum) in scores.chunks_exact_mut(g.key_tokens).take(rows).zip(&mut sums) {
                *sum = softmax_numerators(row);
            }
            let numerators =
                Lhs::Strided(MatrixRef { data: scores, row_stride: g.key_tokens, col_stride: 1 });
            let shape = (rows, g.head_dim, g.key_tokens);
            bf16::matmul(block_out, g.head_dim, numerators, Rhs::Packed(values), shape, false, 1);
            // SAFETY: this task alone writes these rows of this head.
            unsafe { window.write_rows(batch, head, row0, block_out, g.head_dim, &sums[..rows]) };
        });
    };
    for_each_task(tasks, threads, run);
}

/// Replaces `row` by `exp(row − max(row))` and returns the sum of those values: the
/// softmax's numerators and denominator.
fn softmax_numerators(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { softmax_numerators_avx2(row) };
        }
    }
    softmax_numerators_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx2(row: &mut [f32]) -> f32 {
    softmax_numerators_portable(row)
}

/// Lanes of the partial maxima and sums: independent accumulators LLVM keeps in vector
/// registers.
const LANES: usize = 16;

#[inline(always)]
fn softmax_numerators_portable(row: &mut [f32]) -> f32 {
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in lane_max.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    max = lane_max.iter().fold(max, |m, &x| m.max(x));
    if max == f32::NEG_INFINITY {
        // Every score is −∞ (or the row is empty): no key to attend to; yield zeros.
        row.fill(0.0);
        return 1.0;
    }
    let mut lane_sum = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in lane_sum.iter_mut().zip(chunk.iter_mut()) {
            *x = exp_nonpositive(*x - max);
            *s += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    sum + lane_sum.iter().sum::<f32>()
}

/// `e^x` for `x ≤ 0` (the softmax's shifted scores), within ~2 ulp, written branch-free
/// so loops over it vectorise: `x = n·ln2 + r` with `|r| ≤ ln2/2` (Cody–Waite split of
/// ln2), `e^r` by its degree-7 Taylor polynomial (truncation < 6e-9 relative), `2^n` built
/// in the exponent bits. Inputs below −87 give `e^−87` (≈ 1.6e-38) instead of smaller
/// values, which no softmax sum can notice.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HIGH: f32 = 0.693_145_75; // ln2 with its low 11 mantissa bits clear
    const LN2_LOW: f32 = 1.428_606_8e-6; // ln2 − LN2_HIGH
                                         // Adding and subtracting 1.5·2^23 rounds to the nearest integer for |v| < 2^22.
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // The rounded integer sits in the low mantissa bits of `shifted`; reading it from the
    // bits keeps the loop vectorised (a float-to-int `as` cast has NaN/saturation checks).
    let n_integer = shifted.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let r = (x - n * LN2_HIGH) - n * LN2_LOW;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_to_n = f32::from_bits(((n_integer + 127) as u32) << 23);
    p * two_to_n
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::pseudo_random as values;

    /// The textbook form in f64: all scores, softmax, weighted sum.
    fn reference(q: &[f32], k: &[f32], v: &[f32], g: &AttentionGeometry, scale: f32) -> Vec<f64> {
        let width = g.width();
        let mut out = vec![0f64; q.len()];
        for b in 0..g.batch {
            for h in 0..g.heads {
                for i in 0..g.query_tokens {
                    let qi = &q[(b * g.query_tokens + i) * width + h * g.head_dim..][..g.head_dim];
                    let scores: Vec<f64> = (0..g.key_tokens)
                        .map(|j| {
                            let kj =
                                &k[(b * g.key_tokens + j) * width + h * g.head_dim..][..g.head_dim];
                            qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = exps.iter().sum();
                    for d in 0..g.head_dim {
                        let acc: f64 = exps
                            .iter()
                            .enumerate()
                            .map(|(j, e)| {
                                e * v[(b * g.key_tokens + j) * width + h * g.head_dim + d] as f64
                            })
                            .sum();
                        out[(b * g.query_tokens + i) * width + h * g.head_dim + d] = acc / total;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn exponential_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let exact = (x as f64).exp();
            let relative = ((exp_nonpositive(x) as f64 - exact) / exact).abs();
            worst = worst.max(relative);
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    #[test]
    fn matches_the_textbook_form() {
        let cases = [
            // (batch, heads, query tokens, key tokens, head dim)
            (1, 1, 5, 7, 3),
            (2, 3, 33, 77, 8),
            (2, 8, 300, 300, 40),
            (1, 1, 64, 1100, 64),
            (2, 2, 9, 1, 16),
            // SD shapes' head widths: 160 (three, two and one vector column blocks), the
            // VAE's one head of 512, and key counts around the 64-key tile.
            (1, 2, 50, 130, 160),
            (1, 1, 30, 64, 512),
            (1, 3, 25, 63, 80),
            (1, 2, 30, 70, 24),
            (1, 2, 30, 70, 56),
        ];
        for (i, &(batch, heads, query_tokens, key_tokens, head_dim)) in cases.iter().enumerate() {
            let g = AttentionGeometry { batch, heads, query_tokens, key_tokens, head_dim };
            let width = heads * head_dim;
            let q: Vec<f32> = values(batch * query_tokens * width, 1 + i as u64)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            let k: Vec<f32> = values(batch * key_tokens * width, 100 + i as u64)
                .iter()
                .map(|x| x * 3.0)
                .collect();
            let v = values(batch * key_tokens * width, 200 + i as u64);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let expected = reference(&q, &k, &v, &g, scale);
            for threads in [1, 2] {
                // The dispatched kernel (AVX-512 where the CPU has it) and the gemm one.
                let mut portable = vec![0f32; q.len()];
                attention_into_gemm(&mut portable, 0.0, &q, &k, &v, &g, scale, 1.0, threads);
                for (path, got) in
                    [("dispatched", attention(&q, &k, &v, &g, scale, threads)), ("gemm", portable)]
                {
                    let worst = got
                        .iter()
                        .zip(&expected)
                        .map(|(&a, &b)| (a as f64 - b).abs())
                        .fold(0.0, f64::max);
                    // 4e-6: the 512-deep VAE case (scores up to ≈ 100 before the softmax)
                    // reaches 2.4e-6 with the scale folded into the queries; others < 2e-6.
                    assert!(worst < 4e-6, "case {i} {path} threads {threads}: max |Δ| {worst}");
                }
            }
        }
    }

    #[test]
    fn accumulates_a_weighted_second_attention() {
        let g =
            AttentionGeometry { batch: 2, heads: 2, query_tokens: 20, key_tokens: 6, head_dim: 4 };
        let q = values(2 * 20 * 8, 1);
        let (k1, v1) = (values(2 * 6 * 8, 2), values(2 * 6 * 8, 3));
        let (k2, v2) = (values(2 * 6 * 8, 4), values(2 * 6 * 8, 5));
        let first = attention(&q, &k1, &v1, &g, 0.5, 1);
        let second = attention(&q, &k2, &v2, &g, 0.5, 1);
        let mut combined = first.clone();
        attention_into(&mut combined, 1.0, &q, &k2, &v2, &g, 0.5, 0.7, 2);
        for ((c, f), s) in combined.iter().zip(&first).zip(&second) {
            assert!((c - (f + 0.7 * s)).abs() < 1e-6);
        }
    }
}
