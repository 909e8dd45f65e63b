//! f32 kernels for the token-wise (dense) layers of the transformer blocks: linear layers and
//! per-pixel projections between NCHW images and token rows as single strided GEMMs (bias
//! and residual pre-filled into the output, weights and transposes read through strides),
//! layer normalisation, and GEGLU with an accurate erf.

use crate::bf16::{Lhs, PackedRhs, Rhs};
use rayon::prelude::*;

/// A read-only matrix over a slice: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatrixRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatrixRef<'_> {
    /// Panics unless every element of a `rows × cols` matrix lies inside `data`.
    pub(crate) fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(last < self.data.len(), "{what}: {rows}×{cols} matrix runs past its slice");
    }
}

/// `dst (m × n) = [dst +] lhs (m × k) · rhs (k × n)`, `dst` element `(i, j)` at
/// `i * dst_row_stride + j * dst_col_stride`. With `accumulate` the product is added to what
/// `dst` holds (a pre-filled bias or residual), otherwise it overwrites it.
///
/// gemm splits the depth `k` into blocks whose size depends only on `k` (and the caches)
/// once `m` or `n` exceeds 64, so an output element's rounding does not depend on `m`.
///
/// # Panics
/// When a matrix does not fit its slice (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    dst_col_stride: usize,
    lhs: MatrixRef,
    rhs: MatrixRef,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    MatrixRef { data: dst, row_stride: dst_row_stride, col_stride: dst_col_stride }.check(
        m,
        n,
        "matmul dst",
    );
    lhs.check(m, k, "matmul lhs");
    rhs.check(k, n, "matmul rhs");
    if crate::bf16::use_bf16(m, n, k, dst_col_stride) {
        let (lhs, rhs) = (crate::bf16::Lhs::Strided(lhs), crate::bf16::Rhs::Strided(rhs));
        crate::bf16::matmul(dst, dst_row_stride, lhs, rhs, (m, n, k), accumulate, threads);
        return;
    }
    let parallelism =
        if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: all three matrices were checked to lie inside their slices, and `dst` is a
    // unique borrow so it cannot overlap the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A buffer of `len` floats whose rows of `bias.len()` start as `bias` (plus `residual`,
/// element-wise, when given); zeros when there is neither. Returns whether it holds
/// anything a product must add to.
fn prefilled(len: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> (Vec<f32>, bool) {
    match (bias, residual) {
        (None, None) => (vec![0f32; len], false),
        (None, Some(residual)) => (residual.to_vec(), true),
        (Some(bias), None) => {
            let mut out = Vec::with_capacity(len);
            while out.len() < len {
                out.extend_from_slice(bias);
            }
            (out, true)
        }
        (Some(bias), Some(residual)) => {
            let mut out = Vec::with_capacity(len);
            for row in residual.chunks_exact(bias.len()) {
                out.extend(row.iter().zip(bias).map(|(r, b)| r + b));
            }
            (out, true)
        }
    }
}

/// Rows from which [`linear`] uses the AVX-512 kernel (see there).
#[cfg(target_arch = "x86_64")]
const OWN_KERNEL_MIN_ROWS: usize = 2048;

/// A linear layer over `batch` blocks of `rows` input rows (`[batch, rows, in_features]`,
/// contiguous): `input · weightᵀ + bias (+ residual)` as `[batch, rows, out]`, with `weight`
/// `[out, in_features]` read in place (transposed through strides) and bias/residual
/// pre-filled into the output. One product per batch block, so a block's rounding is the
/// same whatever the batch size.
///
/// # Panics
/// When lengths do not match (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    input: &[f32],
    batch: usize,
    rows: usize,
    in_features: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    linear_with_packed(input, batch, rows, in_features, weight, None, bias, residual, threads)
}

/// [`linear`] that, in bf16 mode ([`crate::set_matmul_precision`]), multiplies with
/// `packed`: `weightᵀ` (`in × out`) packed once by the caller ([`PackedRhs::new`]), so
/// that only the input rows are rounded per call.
///
/// # Panics
/// As [`linear`], and when `packed` has another shape than `weightᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn linear_with_packed(
    input: &[f32],
    batch: usize,
    rows: usize,
    in_features: usize,
    weight: &[f32],
    packed: Option<&PackedRhs>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    assert_eq!(input.len(), batch * rows * in_features, "linear input length");
    assert!(in_features > 0 && weight.len().is_multiple_of(in_features), "linear weight length");
    let out_features = weight.len() / in_features;
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_features, "linear bias length");
    }
    let len = batch * rows * out_features;
    if let Some(residual) = residual {
        assert_eq!(residual.len(), len, "linear residual length");
    }
    let (mut output, accumulate) = prefilled(len, bias.filter(|_| out_features > 0), residual);
    if rows == 0 || out_features == 0 {
        return output;
    }
    let packed = packed.filter(|_| crate::bf16::packed_weight_pays(rows));
    let item = |(block, out_block): (&[f32], &mut [f32]), threads: usize| {
        let input = MatrixRef { data: block, row_stride: in_features, col_stride: 1 };
        let weight_t = MatrixRef { data: weight, row_stride: 1, col_stride: in_features };
        let shape = (rows, out_features, in_features);
        if let Some(packed) = packed {
            let (lhs, rhs) = (Lhs::Strided(input), Rhs::Packed(packed));
            let stride = out_features;
            return crate::bf16::matmul(out_block, stride, lhs, rhs, shape, accumulate, threads);
        }
        // The transposed weight is the right matrix; on AVX-512 the own f32 kernel packs it
        // per call and then beats the gemm crate's AVX2 kernels by 15-40% (see
        // `gemm_avx512`), once there are enough rows to pay for the packing: below 2048 rows
        // (measured at SD 1.5 256², 64-1024 tokens) the packing cost more than the kernel
        // gained. Convolutions' products stay on the gemm crate, where it was no faster.
        #[cfg(target_arch = "x86_64")]
        if rows >= OWN_KERNEL_MIN_ROWS
            && crate::bf16::matmul_precision() == crate::bf16::MatmulPrecision::F32
            && crate::gemm_avx512::available()
        {
            let out_stride = out_features;
            crate::gemm_avx512::matmul(
                out_block, out_stride, input, weight_t, shape, accumulate, threads,
            );
            return;
        }
        matmul(out_block, out_features, 1, input, weight_t, shape, accumulate, threads);
    };
    // Several items: side by side, each single-threaded (see `crate::per_item`).
    if threads > 1 && batch >= threads {
        input
            .par_chunks_exact(rows * in_features)
            .zip(output.par_chunks_exact_mut(rows * out_features))
            .for_each(|pair| item(pair, 1));
    } else {
        input
            .chunks_exact(rows * in_features)
            .zip(output.chunks_exact_mut(rows * out_features))
            .for_each(|pair| item(pair, threads));
    }
    output
}

/// A per-pixel projection (a 1×1 convolution or a linear layer over channels) of NCHW
/// `input` (`[batch, in, pixels]`) into token rows `[batch, pixels, out]`: per image
/// `tokens = imageᵀ · weightᵀ + bias`, both transposes read through strides, so the
/// "convolve, permute, copy" of the reference becomes one product.
///
/// # Panics
/// When lengths do not match (a caller bug).
pub fn pixels_to_tokens(
    input: &[f32],
    batch: usize,
    pixels: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let in_channels = input.len() / (batch * pixels).max(1);
    assert_eq!(input.len(), batch * in_channels * pixels, "pixels_to_tokens input length");
    assert!(
        in_channels > 0 && weight.len().is_multiple_of(in_channels),
        "pixels_to_tokens weight length"
    );
    let out_channels = weight.len() / in_channels;
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_channels, "pixels_to_tokens bias length");
    }
    let len = batch * pixels * out_channels;
    let (mut output, accumulate) = prefilled(len, bias.filter(|_| out_channels > 0), None);
    if pixels == 0 || out_channels == 0 {
        return output;
    }
    for (image, tokens) in
        input.chunks_exact(in_channels * pixels).zip(output.chunks_exact_mut(len / batch))
    {
        matmul(
            tokens,
            out_channels,
            1,
            MatrixRef { data: image, row_stride: 1, col_stride: pixels },
            MatrixRef { data: weight, row_stride: 1, col_stride: in_channels },
            (pixels, out_channels, in_channels),
            accumulate,
            threads,
        );
    }
    output
}

/// The inverse of [`pixels_to_tokens`]: token rows `[batch, pixels, in]` through a
/// per-pixel projection into NCHW `[batch, out, pixels]`, plus `residual` (NCHW) when
/// given: per image `image = weight · tokensᵀ + bias + residual`, the residual and bias
/// pre-filled into the output.
///
/// # Panics
/// When lengths do not match (a caller bug).
pub fn tokens_to_pixels(
    tokens: &[f32],
    batch: usize,
    pixels: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let in_channels = tokens.len() / (batch * pixels).max(1);
    assert_eq!(tokens.len(), batch * pixels * in_channels, "tokens_to_pixels input length");
    assert!(
        in_channels > 0 && weight.len().is_multiple_of(in_channels),
        "tokens_to_pixels weight length"
    );
    let out_channels = weight.len() / in_channels;
    let len = batch * out_channels * pixels;
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_channels, "tokens_to_pixels bias length");
    }
    if let Some(residual) = residual {
        assert_eq!(residual.len(), len, "tokens_to_pixels residual length");
    }
    // Bias is per output channel, i.e. per row of `pixels` values in NCHW.
    let mut output = match residual {
        Some(residual) => residual.to_vec(),
        None => vec![0f32; len],
    };
    let accumulate = residual.is_some() || bias.is_some();
    if let Some(bias) = bias {
        for (plane, &b) in output.chunks_exact_mut(pixels.max(1)).zip(bias.iter().cycle()) {
            plane.iter_mut().for_each(|v| *v += b);
        }
    }
    if pixels == 0 || out_channels == 0 {
        return output;
    }
    for (block, image) in
        tokens.chunks_exact(pixels * in_channels).zip(output.chunks_exact_mut(len / batch))
    {
        matmul(
            image,
            pixels,
            1,
            MatrixRef { data: weight, row_stride: in_channels, col_stride: 1 },
            MatrixRef { data: block, row_stride: 1, col_stride: in_channels },
            (out_channels, pixels, in_channels),
            accumulate,
            threads,
        );
    }
    output
}

/// Lanes of the partial sums in [`layer_norm`]: independent sums LLVM can vectorise.
const LANES: usize = 16;

fn lane_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += term(value);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| term(v) as f64).sum();
    lanes.iter().map(|&lane| lane as f64).sum::<f64>() + tail
}

/// Rows handed to one rayon task by the row-wise kernels (enough work to amortise a task).
fn rows_per_task(width: usize) -> usize {
    (16 * 1024 / width.max(1)).max(1)
}

/// torch's `layer_norm` over the last `gamma.len()` values of each row of `input`: biased
/// variance (two passes, mean first), `eps` inside the square root, then `gamma`/`beta`.
/// Rows run in parallel on rayon's pool.
///
/// # Panics
/// When lengths do not match (a caller bug).
pub fn layer_norm(input: &[f32], gamma: &[f32], beta: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let width = gamma.len();
    assert!(width > 0 && input.len().is_multiple_of(width), "layer_norm input length");
    if let Some(beta) = beta {
        assert_eq!(beta.len(), width, "layer_norm beta length");
    }
    let mut output = vec![0f32; input.len()];
    let chunk = rows_per_task(width) * width;
    output.par_chunks_mut(chunk).zip(input.par_chunks(chunk)).for_each(|(out, x)| {
        for (out, x) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
            let mean = (lane_sum(x, |v| v) / width as f64) as f32;
            let variance = lane_sum(x, |v| (v - mean) * (v - mean)) / width as f64;
            let inv_std = (1.0 / (variance + eps as f64).sqrt()) as f32;
            match beta {
                Some(beta) => {
                    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
                        *o = (v - mean) * inv_std * g + b;
                    }
                }
                None => {
                    for ((o, &v), &g) in out.iter_mut().zip(x).zip(gamma) {
                        *o = (v - mean) * inv_std * g;
                    }
                }
            }
        }
    });
    output
}

/// `erf(x) = x · P(x²)` for `|x| < 1`, lowest power first: a degree-7 Chebyshev interpolant
/// of `erf(√t)/√t` on `t ∈ [0, 1]` (fitted for sdserve with numpy against scipy's `erf`;
/// relative error 3.7e-11, and exact at 0, so tiny arguments keep their relative accuracy).
const ERF_NEAR_ZERO: [f64; 8] = [
    1.128379167061543,
    -0.37612638468025955,
    0.1128378249519891,
    -0.026865430725748318,
    0.0052210318032539504,
    -0.0008484080348978296,
    0.0001126595868043978,
    -9.667043741501402e-06,
];

/// `erfcx(a) = exp(a²) · erfc(a)` for `1 ≤ a ≤ 6` as a polynomial in `u = (a - 3.5) / 2.5`,
/// lowest power first: a degree-14 Chebyshev interpolant (fitted the same way against
/// scipy's `erfcx`; relative error 3.2e-8, so `erfc` is within 5e-9 for `a ≥ 1`). Beyond
/// 6, `erfc` is below 2e-17 and `erfcx(6)` stands in.
const ERFCX_BEYOND_ONE: [f64; 15] = [
    0.15529365560889435,
    -0.10330901064354875,
    0.06663211379776976,
    -0.041764336551111,
    0.0254943962446919,
    -0.015208601891492562,
    0.008845809640900216,
    -0.004907038394473297,
    0.002745833591268668,
    -0.001815590305867451,
    0.0009568690484742806,
    -9.069665793314622e-05,
    6.126744766371928e-05,
    -0.0003082240908459729,
    0.0001501239390563569,
];

/// Taylor coefficients `1/k!` of `exp(r)`, `k = 0..=11`: for `|r| ≤ ln 2 / 2` the
/// truncation error is below 1e-14.
const EXP_TAYLOR: [f64; 12] = {
    let mut coefficients = [1.0; 12];
    let mut k = 1;
    while k < 12 {
        coefficients[k] = coefficients[k - 1] / k as f64;
        k += 1;
    }
    coefficients
};

/// `Σ coefficients[i] · x^i` by Horner's rule, fused multiply-adds when `FMA` (only where
/// the CPU has them: otherwise `mul_add` is a slow library call).
#[inline(always)]
fn horner<const FMA: bool>(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().rev().fold(0.0, |acc, &c| if FMA { acc.mul_add(x, c) } else { acc * x + c })
}

/// `exp(y)` for `-700 ≤ y ≤ 0` without branches (so loops of it vectorise): `y = n·ln 2 + r`
/// with integer `n` from the "add 1.5·2⁵², read the low bits" rounding, `exp(r)` from its
/// Taylor polynomial, `2ⁿ` written straight into the exponent bits.
#[inline(always)]
fn exp_non_positive<const FMA: bool>(y: f64) -> f64 {
    const ROUNDING: f64 = 6_755_399_441_055_744.0;
    let shifted = y * std::f64::consts::LOG2_E + ROUNDING;
    let n = shifted - ROUNDING;
    let r = y - n * std::f64::consts::LN_2;
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDING.to_bits());
    let scale = f64::from_bits(n_bits.wrapping_add(1023) << 52);
    horner::<FMA>(&EXP_TAYLOR, r) * scale
}

/// `(erf(a), erfc(a))` for `a ≥ 0`, each exact to 5e-9, without branches: the near-zero
/// polynomial and the `exp(-a²) · erfcx(a)` form are both evaluated and one is selected.
#[inline(always)]
fn erf_erfc_of_magnitude<const FMA: bool>(a: f64) -> (f64, f64) {
    let near = a * horner::<FMA>(&ERF_NEAR_ZERO, a * a);
    let clamped = a.clamp(1.0, 6.0);
    let limited = a.min(26.0);
    let far = exp_non_positive::<FMA>(-limited * limited)
        * horner::<FMA>(&ERFCX_BEYOND_ONE, (clamped - 3.5) * 0.4);
    if a < 1.0 {
        (near, 1.0 - near)
    } else {
        (1.0 - far, far)
    }
}

/// The error function of an f32, computed in f64 and rounded once (absolute error below
/// 1e-7: 5e-9 of approximation plus the final rounding).
pub fn erf(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let (erf, _) = erf_erfc_of_magnitude::<false>((x as f64).abs());
    erf.copysign(x as f64) as f32
}

/// torch's exact GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))`, evaluated in f64 and rounded
/// once; for negative `x` the `1 + erf` is taken as `erfc(|x|/√2)`, which keeps its
/// relative accuracy far into the tail.
#[inline(always)]
fn gelu_erf_in<const FMA: bool>(x: f32) -> f32 {
    let x = x as f64;
    let (erf, erfc) = erf_erfc_of_magnitude::<FMA>((x * std::f64::consts::FRAC_1_SQRT_2).abs());
    let one_plus_erf = if x >= 0.0 { 1.0 + erf } else { erfc };
    (0.5 * x * one_plus_erf) as f32
}

/// torch's exact GELU of one value (see [`geglu`] for the vectorised loop).
pub fn gelu_erf(x: f32) -> f32 {
    gelu_erf_in::<false>(x)
}

/// `out = hidden · gelu(gate)` element-wise, written so LLVM vectorises it.
#[inline(always)]
fn gate_rows<const FMA: bool>(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
        *o = h * gelu_erf_in::<FMA>(g);
    }
}

/// [`gate_rows`] compiled for AVX2 + FMA (four f64 lanes, fused multiply-adds).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gate_rows_avx2(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    gate_rows::<true>(out, hidden, gate)
}

fn gate_rows_dispatch(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: both features were just detected.
        return unsafe { gate_rows_avx2(out, hidden, gate) };
    }
    gate_rows::<false>(out, hidden, gate)
}

/// GEGLU as diffusers' `GEGLU` (exact GELU): each row of `projected` (`2 · inner` wide)
/// is a hidden half then a gate half; the result (`[rows, inner]`) is
/// `hidden · gelu(gate)`, computed in one pass.
///
/// # Panics
/// When `projected`'s length is not a multiple of `2 · inner` (a caller bug).
pub fn geglu(projected: &[f32], inner: usize) -> Vec<f32> {
    assert!(inner > 0 && projected.len().is_multiple_of(2 * inner), "geglu input length");
    let mut output = vec![0f32; projected.len() / 2];
    let rows = rows_per_task(inner);
    output.par_chunks_mut(rows * inner).zip(projected.par_chunks(rows * 2 * inner)).for_each(
        |(out, input)| {
            for (out, row) in out.chunks_exact_mut(inner).zip(input.chunks_exact(2 * inner)) {
                let (hidden, gate) = row.split_at(inner);
                gate_rows_dispatch(out, hidden, gate);
            }
        },
    );
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 product where the CPU has it, else the gemm crate's.
    fn product(
        dst: &mut [f32],
        dst_row_stride: usize,
        lhs: MatrixRef,
        rhs: MatrixRef,
        shape: (usize, usize, usize),
        accumulate: bool,
        threads: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::gemm_avx512::available() {
            let (l, r) = (lhs, rhs);
            return crate::gemm_avx512::matmul(
                dst,
                dst_row_stride,
                l,
                r,
                shape,
                accumulate,
                threads,
            );
        }
        matmul(dst, dst_row_stride, 1, lhs, rhs, shape, accumulate, threads);
    }

    /// Products at SD-like and odd shapes, plain and transposed operands, with and without
    /// accumulation, on 1 and 2 threads, against f64 sums; and a row's result does not
    /// depend on how many rows are multiplied with it.
    #[test]
    fn matmul_matches_f64_and_rows_are_independent() {
        for (case, &(m, n, k)) in
            [(1, 1, 1), (7, 65, 13), (50, 130, 600), (13, 64, 1100), (96, 300, 40)]
                .iter()
                .enumerate()
        {
            let a = pseudo_random(m * k, 10 + case as u64);
            let b = pseudo_random(k * n, 20 + case as u64);
            let start = pseudo_random(m * n, 30 + case as u64);
            for (transposed, accumulate, threads) in
                [(false, false, 1), (true, true, 2), (false, true, 2), (true, false, 1)]
            {
                // `b` as k × n row-major, or its transpose's storage (n × k) read transposed.
                let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let rhs = if transposed {
                    MatrixRef { data: &b_t, row_stride: 1, col_stride: k }
                } else {
                    MatrixRef { data: &b, row_stride: n, col_stride: 1 }
                };
                let lhs = MatrixRef { data: &a, row_stride: k, col_stride: 1 };
                let mut dst = if accumulate { start.clone() } else { vec![7.0; m * n] };
                product(&mut dst, n, lhs, rhs, (m, n, k), accumulate, threads);
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 =
                            (0..k).map(|d| a[i * k + d] as f64 * b[d * n + j] as f64).sum();
                        if accumulate {
                            want += start[i * n + j] as f64;
                        }
                        let got = dst[i * n + j] as f64;
                        assert!(
                            (got - want).abs() < 1e-6 * (k as f64).sqrt() * 4.0,
                            "case {case} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
                // The last row alone gives the same bits.
                let last = MatrixRef { data: &a[(m - 1) * k..], row_stride: k, col_stride: 1 };
                let mut alone =
                    if accumulate { start[(m - 1) * n..].to_vec() } else { vec![0.0; n] };
                product(&mut alone, n, last, rhs, (1, n, k), accumulate, 1);
                assert_eq!(alone, dst[(m - 1) * n..], "case {case}: row depends on the batch");
            }
        }
    }

    use crate::tests::pseudo_random;

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max)
    }

    /// `erf` in f64 from its Taylor series (converges everywhere; at |x| ≤ 4.5 the largest
    /// term is ~1e7, leaving ~1e-9 of f64 precision): an independent reference.
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_1e7_of_the_f64_series() {
        let mut worst = 0f64;
        for i in -90_000..=90_000 {
            let x = i as f32 * 5e-5;
            worst = worst.max((erf(x) as f64 - erf_series(x as f64)).abs());
        }
        assert!(worst < 1e-7, "max |erf - reference| {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(-7.0), -1.0);
        assert!((erf(1.0) as f64 - 0.842_700_792_949_714_9).abs() < 1e-7);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn geglu_gates_the_hidden_half() {
        let (rows, inner) = (37, 23);
        let projected: Vec<f32> =
            pseudo_random(rows * 2 * inner, 3).iter().map(|v| v * 5.0).collect();
        let got = geglu(&projected, inner);
        let want: Vec<f64> = projected
            .chunks_exact(2 * inner)
            .flat_map(|row| {
                (0..inner).map(move |j| {
                    let g = row[inner + j] as f64;
                    row[j] as f64 * 0.5 * g * (1.0 + erf_series(g / 2f64.sqrt()))
                })
            })
            .collect();
        // Two f32 roundings (the GELU, the product) of values up to 25.
        for (&g, &w) in got.iter().zip(&want) {
            assert!((g as f64 - w).abs() <= 2e-7 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn layer_norm_matches_two_pass_formula() {
        let width = 45;
        let input: Vec<f32> = pseudo_random(9 * width, 4).iter().map(|v| v * 3.0 + 1.5).collect();
        let gamma = pseudo_random(width, 5);
        let beta = pseudo_random(width, 6);
        let gamma = gamma.as_slice();
        for beta in [None, Some(beta.as_slice())] {
            let got = layer_norm(&input, gamma, beta, 1e-5);
            let want: Vec<f64> = input
                .chunks_exact(width)
                .flat_map(|x| {
                    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / width as f64;
                    let var =
                        x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / width as f64;
                    (0..width).map(move |j| {
                        (x[j] as f64 - mean) / (var + 1e-5).sqrt() * gamma[j] as f64
                            + beta.map_or(0.0, |b| b[j] as f64)
                    })
                })
                .collect();
            assert!(max_diff(&got, &want) < 1e-5);
        }
    }

    /// `x · wᵀ` over rows (a reference for all the products).
    fn naive_linear(x: &[f32], w: &[f32], inputs: usize) -> Vec<f64> {
        let outputs = w.len() / inputs;
        x.chunks_exact(inputs)
            .flat_map(|row| {
                (0..outputs).map(move |o| {
                    (0..inputs).map(|i| row[i] as f64 * w[o * inputs + i] as f64).sum::<f64>()
                })
            })
            .collect()
    }

    #[test]
    fn linear_adds_bias_and_residual() {
        // Shapes both below and above gemm's small-matrix threshold (64).
        for (batch, rows, inputs, outputs) in [(2, 5, 7, 3), (3, 70, 33, 90), (1, 1, 16, 8)] {
            let x = pseudo_random(batch * rows * inputs, 10);
            let w = pseudo_random(outputs * inputs, 11);
            let bias = pseudo_random(outputs, 12);
            let residual = pseudo_random(batch * rows * outputs, 13);
            let product = naive_linear(&x, &w, inputs);
            for threads in [1, 2] {
                for (with_bias, with_residual) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let got = linear(
                        &x,
                        batch,
                        rows,
                        inputs,
                        &w,
                        with_bias.then_some(bias.as_slice()),
                        with_residual.then_some(residual.as_slice()),
                        threads,
                    );
                    let want: Vec<f64> = product
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| {
                            p + if with_bias { bias[i % outputs] as f64 } else { 0.0 }
                                + if with_residual { residual[i] as f64 } else { 0.0 }
                        })
                        .collect();
                    assert!(max_diff(&got, &want) < 1e-4, "{batch}x{rows}x{inputs}->{outputs}");
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_the_batch() {
        let (rows, inputs, outputs) = (80, 300, 96);
        let x = pseudo_random(2 * rows * inputs, 20);
        let w = pseudo_random(outputs * inputs, 21);
        let bias = pseudo_random(outputs, 22);
        let both = linear(&x, 2, rows, inputs, &w, Some(&bias), None, 2);
        let first = linear(&x[..rows * inputs], 1, rows, inputs, &w, Some(&bias), None, 2);
        assert_eq!(&both[..rows * outputs], first.as_slice());
    }

    /// NCHW `[batch, channels, pixels]` → `[batch, pixels, channels]`.
    fn to_tokens(x: &[f32], batch: usize, channels: usize, pixels: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for b in 0..batch {
            for c in 0..channels {
                for p in 0..pixels {
                    out[(b * pixels + p) * channels + c] = x[(b * channels + c) * pixels + p];
                }
            }
        }
        out
    }

    #[test]
    fn projections_between_pixels_and_tokens() {
        for (batch, inputs, outputs, pixels) in [(2, 6, 5, 9), (1, 40, 72, 100)] {
            let image = pseudo_random(batch * inputs * pixels, 30);
            let w = pseudo_random(outputs * inputs, 31);
            let bias = pseudo_random(outputs, 32);
            for threads in [1, 2] {
                // Image → tokens is a linear layer over the permuted image.
                let got = pixels_to_tokens(&image, batch, pixels, &w, Some(&bias), threads);
                let want: Vec<f64> =
                    naive_linear(&to_tokens(&image, batch, inputs, pixels), &w, inputs)
                        .iter()
                        .enumerate()
                        .map(|(i, &p)| p + bias[i % outputs] as f64)
                        .collect();
                assert!(max_diff(&got, &want) < 1e-4);

                // Tokens → image (+ residual) is the same layer, permuted back.
                let tokens = to_tokens(&image, batch, inputs, pixels);
                let residual = pseudo_random(batch * outputs * pixels, 33);
                let got = tokens_to_pixels(
                    &tokens,
                    batch,
                    pixels,
                    &w,
                    Some(&bias),
                    Some(&residual),
                    threads,
                );
                let product = naive_linear(&tokens, &w, inputs);
                let mut want = vec![0f64; got.len()];
                for b in 0..batch {
                    for o in 0..outputs {
                        for p in 0..pixels {
                            let i = (b * outputs + o) * pixels + p;
                            want[i] = product[(b * pixels + p) * outputs + o]
                                + bias[o] as f64
                                + residual[i] as f64;
                        }
                    }
                }
                assert!(max_diff(&got, &want) < 1e-4);
                let plain = tokens_to_pixels(&tokens, batch, pixels, &w, None, None, threads);
                assert!(plain.iter().zip(&got).all(|(a, b)| a.is_finite() && b.is_finite()));
            }
        }
    }
}
