//! Attention tasks on AVX-512 with own register-blocked microkernels, for the shapes Stable
//! Diffusion has: head widths of 40-160 (UNets) and 512 (the VAE's one-head mid-block).
//!
//! Why not the `gemm` crate here: `Q Kᵀ` has a depth of only `head_dim` (40 for SD 1.5), so
//! a general gemm spends much of its time loading and storing accumulators and packing, and
//! `P V` is only `head_dim` wide. Measured on Zen 4 (SD 1.5 self-attention at 512², batch 2,
//! 8 heads of 40): the gemm-based task ran at ≈ 48 GFLOP per CPU-second, half of the core's
//! f32 peak (≈ 96).
//!
//! The operands are laid out once per call so that the microkernels need no masks:
//! - keys per (batch, head) as tiles of 64 keys, each tile `[head_dim][64]` (`Kᵀ` in
//!   64-column slabs), the key count padded with zeros to a multiple of 64;
//! - values per (batch, head) as `[key_tokens][head_dim rounded up to 8]`, zero-padded;
//! - a task's query rows (a multiple of 24, zero rows past the end) packed as
//!   `[rows][head_dim]` and multiplied by the softmax scale.
//!
//! `scores_tile` computes 6 query rows × 64 keys in 24 zmm accumulators (per depth step:
//! four key vectors, six broadcasts); `weighted_values_tile` accumulates 8 rows × up to 48
//! value columns (16-wide vectors plus one 8-wide, so SD 1.5's 40 columns waste nothing)
//! over a chunk of keys. Padded key columns are never read back (softmax and
//! `P V` stop at the real key count) and padded query rows are never written out.

use super::attention::{for_each_task, AttentionGeometry, OutputWindow};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Keys per score tile: four 16-lane vectors.
const KEY_TILE: usize = 64;
/// Query rows per score tile.
const SCORE_ROWS: usize = 6;
/// Query rows per `P V` tile.
const VALUE_ROWS: usize = 8;
/// Task row counts are multiples of this (both tiles' row counts divide it).
const ROW_QUANTUM: usize = 24;
/// Keys per `P V` pass: the pass's value rows (128 × 48 floats for SD 1.5) stay in L1.
const VALUE_KEY_CHUNK: usize = 128;

/// Whether this CPU runs the kernels of this module (see [`crate::gemm_avx512`]'s switch).
pub(crate) fn available() -> bool {
    crate::gemm_avx512::available()
}

thread_local! {
    /// Per-thread packed query rows, score block and output accumulators.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Keys and values re-laid out for the microkernels (see the module docs).
struct PackedHeads {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Key tokens rounded up to a multiple of [`KEY_TILE`].
    padded_keys: usize,
    /// `head_dim` rounded up to a multiple of 8.
    padded_dim: usize,
}

fn pack_heads(key: &[f32], value: &[f32], g: &AttentionGeometry, threads: usize) -> PackedHeads {
    use rayon::prelude::*;
    let width = g.heads * g.head_dim;
    let padded_keys = g.key_tokens.div_ceil(KEY_TILE) * KEY_TILE;
    let padded_dim = g.head_dim.div_ceil(8) * 8;
    let key_block = padded_keys * g.head_dim;
    let value_block = g.key_tokens * padded_dim;
    let heads = g.batch * g.heads;
    let mut keys = vec![0f32; heads * key_block];
    let mut values = vec![0f32; heads * value_block];
    let pack = |(pair, (keys_out, values_out)): (usize, (&mut [f32], &mut [f32]))| {
        let (batch, head) = (pair / g.heads, pair % g.heads);
        let tokens = key[batch * g.key_tokens * width..].chunks(width).take(g.key_tokens);
        for (j, token) in tokens.enumerate() {
            let tile = &mut keys_out[(j / KEY_TILE) * KEY_TILE * g.head_dim..];
            for (d, &x) in token[head * g.head_dim..][..g.head_dim].iter().enumerate() {
                tile[d * KEY_TILE + j % KEY_TILE] = x;
            }
        }
        let tokens = value[batch * g.key_tokens * width..].chunks(width).take(g.key_tokens);
        for (token, row) in tokens.zip(values_out.chunks_exact_mut(padded_dim)) {
            row[..g.head_dim].copy_from_slice(&token[head * g.head_dim..][..g.head_dim]);
        }
    };
    let blocks = keys.chunks_mut(key_block).zip(values.chunks_mut(value_block));
    if threads > 1 {
        blocks.collect::<Vec<_>>().into_par_iter().enumerate().for_each(pack);
    } else {
        blocks.enumerate().for_each(pack);
    }
    PackedHeads { keys, values, padded_keys, padded_dim }
}

/// [`super::attention::attention_into`] on AVX-512 (the caller checked [`available`] and the
/// slice lengths).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_into(
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
    let g = *g;
    let width = g.heads * g.head_dim;
    let packed = pack_heads(key, value, &g, threads);
    // Rows per task: the score block (rows × padded keys) stays near 768 KiB so it lives in
    // L2 while keys and values stream past; at most 48 rows, a multiple of 24.
    let budget_rows = (192 << 10) / packed.padded_keys;
    let block_rows = (budget_rows / ROW_QUANTUM).clamp(1, 2) * ROW_QUANTUM;
    let block_rows = block_rows.min(g.query_tokens.div_ceil(ROW_QUANTUM) * ROW_QUANTUM);
    let blocks_per_head = g.query_tokens.div_ceil(block_rows);
    let tasks = g.batch * g.heads * blocks_per_head;
    let window = OutputWindow::new(output, &g, output_scale, weight);
    let run = |task: usize| {
        let pair = task / blocks_per_head;
        let (batch, head) = (pair / g.heads, pair % g.heads);
        let row0 = (task % blocks_per_head) * block_rows;
        let rows = block_rows.min(g.query_tokens - row0);
        let keys = &packed.keys[pair * packed.padded_keys * g.head_dim..]
            [..packed.padded_keys * g.head_dim];
        let values = &packed.values[pair * g.key_tokens * packed.padded_dim..]
            [..g.key_tokens * packed.padded_dim];
        SCRATCH.with(|scratch| {
            let (queries, scores, sums_and_out) = &mut *scratch.borrow_mut();
            queries.clear();
            queries.resize(block_rows * g.head_dim, 0.0);
            for (r, packed_row) in queries.chunks_exact_mut(g.head_dim).take(rows).enumerate() {
                let start = (batch * g.query_tokens + row0 + r) * width + head * g.head_dim;
                for (p, &x) in packed_row.iter_mut().zip(&query[start..start + g.head_dim]) {
                    *p = x * scale;
                }
            }
            scores.resize(block_rows * packed.padded_keys, 0.0);
            for (tile, tile_keys) in keys.chunks_exact(KEY_TILE * g.head_dim).enumerate() {
                for row in (0..block_rows).step_by(SCORE_ROWS) {
                    // SAFETY: the CPU has AVX-512F (checked by the caller); the query rows
                    // row..row+6 exist in `queries` (block_rows is a multiple of 6), the tile
                    // holds head_dim × 64 keys, and the score rows hold padded_keys floats
                    // from column tile·64.
                    unsafe {
                        scores_tile(
                            queries[row * g.head_dim..].as_ptr(),
                            g.head_dim,
                            tile_keys.as_ptr(),
                            scores[row * packed.padded_keys + tile * KEY_TILE..].as_mut_ptr(),
                            packed.padded_keys,
                        );
                    }
                }
            }
            let mut sums = [0f32; 2 * ROW_QUANTUM];
            for (row, sum) in scores.chunks_exact_mut(packed.padded_keys).take(rows).zip(&mut sums)
            {
                // SAFETY: the CPU has AVX-512F (checked by the caller).
                *sum = unsafe { softmax_numerators(&mut row[..g.key_tokens]) };
            }
            let accumulators = sums_and_out;
            accumulators.clear();
            accumulators.resize(block_rows * packed.padded_dim, 0.0);
            for key0 in (0..g.key_tokens).step_by(VALUE_KEY_CHUNK) {
                let chunk = VALUE_KEY_CHUNK.min(g.key_tokens - key0);
                let mut column = 0;
                while column < packed.padded_dim {
                    // Up to three 16-wide vectors, plus the 8-wide tail with the last block.
                    let left = packed.padded_dim - column;
                    let (vectors, half) = match left / 16 {
                        0 => (0, true),
                        full @ 1..=2 => (full, left % 16 == 8),
                        _ if left == 56 => (3, true),
                        _ => (3, false),
                    };
                    for row in (0..block_rows).step_by(VALUE_ROWS) {
                        let p = scores[row * packed.padded_keys + key0..].as_ptr();
                        let v = values[key0 * packed.padded_dim + column..].as_ptr();
                        let acc = accumulators[row * packed.padded_dim + column..].as_mut_ptr();
                        let strides = (packed.padded_keys, packed.padded_dim);
                        // SAFETY: AVX-512F as above; rows row..row+8 of the score block hold
                        // key0+chunk ≤ key_tokens columns, the value rows key0..key0+chunk
                        // exist with `vectors` · 16 columns from `column`, and the
                        // accumulator rows likewise.
                        unsafe {
                            match (vectors, half) {
                                (3, false) => {
                                    weighted_values_tile::<3, false>(p, v, acc, chunk, strides)
                                }
                                (3, true) => {
                                    weighted_values_tile::<3, true>(p, v, acc, chunk, strides)
                                }
                                (2, false) => {
                                    weighted_values_tile::<2, false>(p, v, acc, chunk, strides)
                                }
                                (2, true) => {
                                    weighted_values_tile::<2, true>(p, v, acc, chunk, strides)
                                }
                                (1, false) => {
                                    weighted_values_tile::<1, false>(p, v, acc, chunk, strides)
                                }
                                (1, true) => {
                                    weighted_values_tile::<1, true>(p, v, acc, chunk, strides)
                                }
                                _ => weighted_values_tile::<0, true>(p, v, acc, chunk, strides),
                            }
                        }
                    }
                    column += vectors * 16 + if half { 8 } else { 0 };
                }
            }
            let (stride, sums) = (packed.padded_dim, &sums[..rows]);
            // SAFETY: this task alone writes these rows of this head.
            unsafe { window.write_rows(batch, head, row0, accumulators, stride, sums) };
        });
    };
    for_each_task(tasks, threads, run);
}

/// Scores of 6 packed query rows (`[6][depth]`, already scaled) against one key tile
/// (`[depth][64]`), stored to 6 rows of `scores` (row stride `score_stride`).
///
/// # Safety
/// The CPU has AVX-512F and the pointers cover the extents above.
#[target_feature(enable = "avx512f")]
unsafe fn scores_tile(
    queries: *const f32,
    depth: usize,
    keys: *const f32,
    scores: *mut f32,
    score_stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 4]; SCORE_ROWS];
    for d in 0..depth {
        let k = keys.add(d * KEY_TILE);
        let key_vectors = [
            _mm512_loadu_ps(k),
            _mm512_loadu_ps(k.add(16)),
            _mm512_loadu_ps(k.add(32)),
            _mm512_loadu_ps(k.add(48)),
        ];
        for (r, row_acc) in acc.iter_mut().enumerate() {
            let q = _mm512_set1_ps(*queries.add(r * depth + d));
            for (a, &kv) in row_acc.iter_mut().zip(&key_vectors) {
                *a = _mm512_fmadd_ps(q, kv, *a);
            }
        }
    }
    for (r, row_acc) in acc.iter().enumerate() {
        for (c, &a) in row_acc.iter().enumerate() {
            _mm512_storeu_ps(scores.add(r * score_stride + c * 16), a);
        }
    }
}

/// Adds `P V` over `keys` keys for 8 rows and `VECTORS` · 16 (+ 8 with `HALF`) columns:
/// `p` rows of stride `strides.0`, value and accumulator rows of stride `strides.1`.
///
/// # Safety
/// The CPU has AVX-512F and the pointers cover the extents above.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weighted_values_tile<const VECTORS: usize, const HALF: bool>(
    p: *const f32,
    values: *const f32,
    accumulators: *mut f32,
    keys: usize,
    (p_stride, value_stride): (usize, usize),
) {
    let tail = VECTORS * 16;
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; VALUE_ROWS];
    let mut acc_tail = [_mm256_setzero_ps(); VALUE_ROWS];
    for (r, (row_acc, row_tail)) in acc.iter_mut().zip(&mut acc_tail).enumerate() {
        let row = accumulators.add(r * value_stride);
        for (c, a) in row_acc.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(row.add(c * 16));
        }
        if HALF {
            *row_tail = _mm256_loadu_ps(row.add(tail));
        }
    }
    for j in 0..keys {
        let v = values.add(j * value_stride);
        let mut value_vectors = [_mm512_setzero_ps(); VECTORS];
        for (c, vv) in value_vectors.iter_mut().enumerate() {
            *vv = _mm512_loadu_ps(v.add(c * 16));
        }
        let value_tail = if HALF { _mm256_loadu_ps(v.add(tail)) } else { _mm256_setzero_ps() };
        for (r, (row_acc, row_tail)) in acc.iter_mut().zip(&mut acc_tail).enumerate() {
            let weight_scalar = *p.add(r * p_stride + j);
            let weight = _mm512_set1_ps(weight_scalar);
            for (a, &vv) in row_acc.iter_mut().zip(&value_vectors) {
                *a = _mm512_fmadd_ps(weight, vv, *a);
            }
            if HALF {
                *row_tail = _mm256_fmadd_ps(_mm256_set1_ps(weight_scalar), value_tail, *row_tail);
            }
        }
    }
    for (r, (row_acc, row_tail)) in acc.iter().zip(&acc_tail).enumerate() {
        let row = accumulators.add(r * value_stride);
        for (c, &a) in row_acc.iter().enumerate() {
            _mm512_storeu_ps(row.add(c * 16), a);
        }
        if HALF {
            _mm256_storeu_ps(row.add(tail), *row_tail);
        }
    }
}

/// Replaces `row` by `exp(row − max(row))` and returns the sum of those values (the
/// softmax's numerators and denominator); a row of −∞ only becomes zeros with sum 1.
///
/// The exponential: `x = n·ln2 + r` with `n` rounded to nearest and `|r| ≤ ln2/2`
/// (Cody–Waite split of ln2), `e^r` by its degree-7 Taylor polynomial (truncation < 6e-9
/// relative), and `2^n` applied by `vscalefps`, which also flushes large negative `n` to 0
/// correctly; arguments are clamped at −100 so `n` stays finite. Within 3e-7 relative of
/// the true value (tested), like the portable path's `exp_nonpositive`.
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn softmax_numerators(row: &mut [f32]) -> f32 {
    let len = row.len();
    let data = row.as_mut_ptr();
    let full = len / 16 * 16;
    let tail_mask: __mmask16 = ((1u32 << (len % 16)) - 1) as __mmask16;
    let mut maxima = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(16) {
        maxima = _mm512_max_ps(maxima, _mm512_loadu_ps(data.add(i)));
    }
    let tail = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), tail_mask, data.add(full));
    let max = _mm512_reduce_max_ps(_mm512_max_ps(maxima, tail));
    if max == f32::NEG_INFINITY {
        // Every score is −∞ (or the row is empty): no key to attend to; yield zeros.
        row.fill(0.0);
        return 1.0;
    }
    let shift = _mm512_set1_ps(max);
    let mut sums = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        let e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(data.add(i)), shift));
        _mm512_storeu_ps(data.add(i), e);
        sums = _mm512_add_ps(sums, e);
    }
    if tail_mask != 0 {
        let x = _mm512_maskz_loadu_ps(tail_mask, data.add(full));
        let e = exp_nonpositive(_mm512_sub_ps(x, shift));
        _mm512_mask_storeu_ps(data.add(full), tail_mask, e);
        sums = _mm512_mask_add_ps(sums, tail_mask, sums, e);
    }
    _mm512_reduce_add_ps(sums)
}

/// `e^x` lane-wise for `x ≤ 0` (see [`softmax_numerators`]).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp_nonpositive(x: __m512) -> __m512 {
    const LN2_HIGH: f32 = 0.693_145_75; // ln2 with its low 11 mantissa bits clear
    const LN2_LOW: f32 = 1.428_606_8e-6; // ln2 − LN2_HIGH
    let x = _mm512_max_ps(x, _mm512_set1_ps(-100.0));
    // Round to nearest, suppress exceptions.
    let n =
        _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_numerators_are_accurate() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        // Rows of every tail length, spanning the exponential's whole useful range.
        for len in [1usize, 15, 16, 17, 77, 4096] {
            let original: Vec<f32> =
                (0..len).map(|i| 3.0 - ((i * 7919) % 9001) as f32 * 0.011).collect();
            let mut row = original.clone();
            // SAFETY: checked above that the CPU has AVX-512F.
            let sum = unsafe { softmax_numerators(&mut row) };
            let max = original.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let mut exact_sum = 0f64;
            for (&x, &e) in original.iter().zip(&row) {
                let exact = (x as f64 - max).exp();
                exact_sum += exact;
                // Relative accuracy where results are normal floats (below e^−87 they are
                // subnormal, and no softmax sum can notice them).
                let error =
                    if exact > 1e-37 { (e as f64 - exact) / exact } else { e as f64 - exact };
                assert!(error.abs() < 3e-7, "e^{x}: {e} vs {exact}");
            }
            assert!(((sum as f64 - exact_sum) / exact_sum).abs() < 1e-6, "sum of {len}");
        }
        let mut empty = [f32::NEG_INFINITY; 3];
        // SAFETY: as above.
        assert_eq!(unsafe { softmax_numerators(&mut empty) }, 1.0);
        assert_eq!(empty, [0.0; 3]);
    }
}
