//! f32 CPU kernels for sdserve's networks on plain slices: 2-D convolution (im2col tiles fed
//! to the `gemm` crate, written straight into NCHW output; Winograd for 3×3 stride-1
//! padding-1 layers in [`winograd`]) and group normalisation with an optional fused SiLU.
//! They live in their own crate so that dev and test builds optimise them (the main crate
//! builds at opt-level 1) and so they can be tested without candle. On CPUs with
//! AVX512-BF16 the matrix products can instead take bf16 operands with f32 accumulation,
//! process-wide and off by default ([`bf16`], [`set_matmul_precision`]).
//!
//! # Winograd
//!
//! 3×3/s1/p1 convolutions (nearly all of the SD UNet's and VAE's FLOPs) use Winograd minimal
//! filtering (Lavin & Gray 2015, "Fast Algorithms for Convolutional Neural Networks"):
//! F(4×4,3×3) (36 multiplies per 16 outputs instead of 144) with the transform matrices of
//! their Toom-Cook construction on the points {0, 1, −1, 1/2, −2, ∞}, which Barabasz et al.
//! 2020 found more accurate than Lavin & Gray's {0, ±1, ±2} (measured here: half the worst
//! error); F(2×2,3×3) (Lavin & Gray's matrices) when an image has fewer than 16 4×4 tiles;
//! im2col below 32 channels or 16 2×2 tiles. [`winograd::preferred_variant`] decides;
//! sdserve's `Conv2d` layer transforms each weight once and keeps it.
//!
//! Measured with `cargo run -p sdserve-cpu-kernels --example winograd_bench` (2 threads, CPU
//! seconds per call; N(0,1) activations, N(0, 1/(9·C)) weights, C in = out; Zen 4 shared
//! with other builds, so ±10%):
//!
//! | shape             | im2col | F(2×2) | F(4×4) | F(4×4) max abs Δ vs im2col / vs f64 |
//! |-------------------|--------|--------|--------|-------------------------------------|
//! | UNet 320@64² b2   | 0.180s | 0.112s | 0.062s | 3.3e-5 / 1.5e-5                     |
//! | UNet 640@32² b2   | 0.164s | 0.086s | 0.052s | 2.4e-5 / 2.1e-5                     |
//! | UNet 1280@16² b2  | 0.204s | 0.082s | 0.054s | 2.5e-5 / 9.8e-6                     |
//! | UNet 1280@8² b2   | 0.046s | 0.024s | 0.032s | (F(2×2) chosen: 3.8e-6 / 1.4e-6)    |
//! | VAE 512@64²       | 0.234s | 0.126s | 0.074s | 3.9e-5 / 2.2e-5                     |
//! | VAE 512@128²      | 0.940s | 0.476s | 0.306s | 4.0e-5 / 2.5e-5                     |
//! | VAE 256@256²      | 1.074s | 0.704s | 0.410s | 2.8e-5 / 2.3e-5                     |
//! | VAE 128@512²      | 1.272s | 1.120s | 0.606s | 2.4e-5 / 1.6e-5                     |
//!
//! Outputs there have standard deviation ≈ 1 and max |y| ≈ 3-5; im2col's own error against
//! f64 is 1-3e-6 and F(2×2)'s 2-4e-6 (5e-6 vs im2col). The "vs f64" column covers two
//! output channels of the first image. F(4×4)'s speed-up is 2.6-3.8× from 256 channels up
//! and 2.1× at 128 channels, where the tile transforms weigh more; a 1280×1280 weight takes
//! ≈ 0.35 CPU-seconds to transform (mostly first-touch page faults of its 236 MB).

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
pub use attention::{attention, attention_into, exp_nonpositive, AttentionGeometry};

pub mod bf16;
pub use bf16::{bf16_supported, matmul_precision, set_matmul_precision, MatmulPrecision};

mod dense;
#[cfg(target_arch = "x86_64")]
mod gemm_avx512;
pub use dense::{
    erf, geglu, gelu_erf, layer_norm, linear, linear_with_packed, matmul, pixels_to_tokens,
    tokens_to_pixels, MatrixRef,
};

use rayon::prelude::*;
use std::cell::RefCell;

pub mod winograd;

/// Geometry of one 2-D convolution over NCHW input with an OIHW weight (groups = 1,
/// dilation = 1: the only kind Stable Diffusion networks use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dGeometry {
    /// Output height; `None` when the kernel does not fit the padded input.
    pub fn out_h(&self) -> Option<usize> {
        out_size(self.height, self.kernel_h, self.stride, self.padding)
    }

    /// Output width; `None` when the kernel does not fit the padded input.
    pub fn out_w(&self) -> Option<usize> {
        out_size(self.width, self.kernel_w, self.stride, self.padding)
    }
}

fn out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = input + 2 * padding;
    (stride > 0 && kernel > 0 && padded >= kernel).then(|| (padded - kernel) / stride + 1)
}

/// `compute(item, threads)` for each of `count` batch items, their outputs concatenated
/// in item order. With several threads and at least as many items, the items run side by
/// side on rayon's pool, each single-threaded: one parallel section per layer instead of
/// several per item, which is what batches of small images spend their time on. An item's
/// result is the same either way: no kernel's per-element arithmetic depends on its thread
/// count (the GEMMs split rows and columns among threads, never the depth).
pub fn per_item(
    count: usize,
    threads: usize,
    compute: impl Fn(usize, usize) -> Vec<f32> + Sync,
) -> Vec<f32> {
    if threads > 1 && count >= threads {
        let parts: Vec<Vec<f32>> =
            (0..count).into_par_iter().map(|item| compute(item, 1)).collect();
        parts.concat()
    } else if count == 1 {
        compute(0, threads)
    } else {
        (0..count).flat_map(|item| compute(item, threads)).collect()
    }
}

/// Upper bound on the im2col tile, in floats (16 MiB): large enough that the GEMM sees
/// wide matrices (the SD UNet's 64×64 level fits whole), small enough for a 512² VAE.
const COLUMN_TILE_FLOATS: usize = 4 << 20;

thread_local! {
    /// Reused im2col buffer: allocating a fresh one per call costs page faults that showed
    /// up as ~10% of a UNet step.
    static COLUMN_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Convolution of `input` (`[batch, in, h, w]`) with `weight` (`[out, in, kh, kw]`), plus
/// `bias` (`[out]`), as `[batch, out, out_h, out_w]`. `threads` is the GEMM parallelism.
///
/// Each image's output is `weight (out × in·kh·kw) · columns (in·kh·kw × pixels)`; the
/// columns are built a band of output rows at a time, row order (channel, ky, kx) matching
/// the weight's memory order, so the weight is used in place. 1×1 stride-1 convolutions
/// use the input itself as the right-hand matrix.
///
/// # Panics
/// When slice lengths do not match the geometry (a caller bug).
pub fn conv2d(
    input: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    geometry: &Conv2dGeometry,
    threads: usize,
) -> Vec<f32> {
    conv2d_with_packed(input, weight, None, bias, geometry, threads)
}

/// [`conv2d`] that, in bf16 mode ([`set_matmul_precision`]), multiplies with `packed`: the
/// weight as an `out × in·kh·kw` matrix packed once by the caller
/// ([`bf16::PackedLhs::new`]), so that only the image's columns are rounded per call.
///
/// # Panics
/// As [`conv2d`], and when `packed` has another shape than the weight matrix.
pub fn conv2d_with_packed(
    input: &[f32],
    weight: &[f32],
    packed: Option<&bf16::PackedLhs>,
    bias: Option<&[f32]>,
    geometry: &Conv2dGeometry,
    threads: usize,
) -> Vec<f32> {
    let g = geometry;
    let (out_h, out_w) = (
        g.out_h().expect("conv2d kernel larger than padded input: this is a bug"),
        g.out_w().expect("conv2d kernel larger than padded input: this is a bug"),
    );
    let image_in = g.in_channels * g.height * g.width;
    let pixels = out_h * out_w;
    let depth = g.in_channels * g.kernel_h * g.kernel_w;
    assert_eq!(input.len(), g.batch * image_in, "conv2d input length");
    assert_eq!(weight.len(), g.out_channels * depth, "conv2d weight length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), g.out_channels, "conv2d bias length");
    }
    let mut output = vec![0f32; g.batch * g.out_channels * pixels];
    if output.is_empty() {
        return output;
    }
    let weight_matrix = MatrixRef { data: weight, row_stride: depth, col_stride: 1 };
    let packed = packed.filter(|_| bf16::packed_weight_pays(g.out_channels));
    // dst (out × n, rows `pixels` apart) [+]= weight · rhs (depth × n).
    let product = |dst: &mut [f32], rhs: MatrixRef, n: usize| match packed {
        Some(packed) => bf16::matmul(
            dst,
            pixels,
            bf16::Lhs::Packed(packed),
            bf16::Rhs::Strided(rhs),
            (g.out_channels, n, depth),
            bias.is_some(),
            threads,
        ),
        None => matmul(
            dst,
            pixels,
            1,
            weight_matrix,
            rhs,
            (g.out_channels, n, depth),
            bias.is_some(),
            threads,
        ),
    };
    let pointwise = g.kernel_h == 1 && g.kernel_w == 1 && g.stride == 1 && g.padding == 0;
    let rows_per_tile = (COLUMN_TILE_FLOATS / (depth * out_w).max(1)).clamp(1, out_h);

    for (image, out_image) in
        input.chunks_exact(image_in).zip(output.chunks_exact_mut(g.out_channels * pixels))
    {
        if let Some(bias) = bias {
            for (row, &b) in out_image.chunks_exact_mut(pixels).zip(bias) {
                row.fill(b);
            }
        }
        if pointwise {
            product(
                out_image,
                MatrixRef { data: image, row_stride: pixels, col_stride: 1 },
                pixels,
            );
            continue;
        }
        COLUMN_SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut row0 = 0;
            while row0 < out_h {
                let rows = rows_per_tile.min(out_h - row0);
                let tile_pixels = rows * out_w;
                if scratch.len() < depth * tile_pixels {
                    scratch.resize(depth * tile_pixels, 0.0);
                }
                let columns = &mut scratch[..depth * tile_pixels];
                fill_columns(image, g, out_w, row0, rows, columns, threads);
                // The tile's output starts at pixel row0·out_w of each channel row.
                let rhs = MatrixRef { data: columns, row_stride: tile_pixels, col_stride: 1 };
                product(&mut out_image[row0 * out_w..], rhs, tile_pixels);
                row0 += rows;
            }
        });
    }
    output
}

/// im2col for output rows `row0 .. row0 + rows` of one image into `columns`
/// (`[in·kh·kw, rows·out_w]`), zero where the kernel reads padding.
fn fill_columns(
    image: &[f32],
    g: &Conv2dGeometry,
    out_w: usize,
    row0: usize,
    rows: usize,
    columns: &mut [f32],
    threads: usize,
) {
    let tile_pixels = rows * out_w;
    let taps = g.kernel_h * g.kernel_w;
    let fill_row = |(index, column_row): (usize, &mut [f32])| {
        let channel = index / taps;
        let (ky, kx) = ((index % taps) / g.kernel_w, index % g.kernel_w);
        let plane = &image[channel * g.height * g.width..(channel + 1) * g.height * g.width];
        for (r, segment) in column_row.chunks_exact_mut(out_w).enumerate() {
            let iy = ((row0 + r) * g.stride + ky) as isize - g.padding as isize;
            if iy < 0 || iy >= g.height as isize {
                segment.fill(0.0);
                continue;
            }
            let line = &plane[iy as usize * g.width..(iy as usize + 1) * g.width];
            if g.stride == 1 {
                // Output x reads input x + kx - padding: one shifted copy with zero edges.
                let shift = kx as isize - g.padding as isize;
                let first = (-shift).clamp(0, out_w as isize) as usize;
                let last =
                    (g.width as isize - shift).clamp(first as isize, out_w as isize) as usize;
                segment[..first].fill(0.0);
                segment[first..last].copy_from_slice(
                    &line[(first as isize + shift) as usize..(last as isize + shift) as usize],
                );
                segment[last..].fill(0.0);
            } else {
                for (ox, value) in segment.iter_mut().enumerate() {
                    let ix = (ox * g.stride + kx) as isize - g.padding as isize;
                    *value = if ix >= 0 && ix < g.width as isize { line[ix as usize] } else { 0.0 };
                }
            }
        }
    };
    if threads > 1 {
        columns.par_chunks_mut(tile_pixels).enumerate().for_each(fill_row);
    } else {
        columns.chunks_mut(tile_pixels).enumerate().for_each(fill_row);
    }
}

/// Lanes of the partial sums below: wide enough for LLVM to vectorise without reordering
/// concerns (each lane is its own sum).
const LANES: usize = 16;

fn lane_sum(values: &[f32], mut term: impl FnMut(f32) -> f32) -> f64 {
    let mut lanes = [0f32; LANES];
    let mut total = 0f64;
    // Fold the f32 lanes into f64 every few thousand values so long groups keep precision.
    for block in values.chunks(LANES * 256) {
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (lane, &value) in lanes.iter_mut().zip(chunk) {
                *lane += term(value);
            }
        }
        for &value in chunks.remainder() {
            lanes[0] += term(value);
        }
        total += lanes.iter().map(|&lane| lane as f64).sum::<f64>();
        lanes = [0f32; LANES];
    }
    total
}

/// Group normalisation of `input` (`[batch, channels, spatial]`, contiguous) with per-channel
/// `gamma` and `beta`, as torch's `group_norm` (biased variance, `eps` inside the square
/// root), followed by SiLU when `silu`. Groups run in parallel on rayon's pool.
///
/// # Panics
/// When lengths do not match or `channels` is not a multiple of `groups` (a caller bug).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    input: &[f32],
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
    eps: f32,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<f32> {
    assert!(groups > 0 && channels.is_multiple_of(groups), "group_norm channels/groups");
    assert_eq!(input.len(), batch * channels * spatial, "group_norm input length");
    assert_eq!(gamma.len(), channels, "group_norm gamma length");
    assert_eq!(beta.len(), channels, "group_norm beta length");
    let per_group = channels / groups;
    let group_len = per_group * spatial;
    let mut output = vec![0f32; input.len()];
    if group_len == 0 {
        return output;
    }
    output.par_chunks_mut(group_len).zip(input.par_chunks(group_len)).enumerate().for_each(
        |(index, (out, x))| {
            let first_channel = (index % groups) * per_group;
            let count = x.len() as f64;
            let mean = lane_sum(x, |v| v) / count;
            let mean32 = mean as f32;
            let variance = lane_sum(x, |v| (v - mean32) * (v - mean32)) / count;
            let inv_std = (1.0 / (variance + eps as f64).sqrt()) as f32;
            for (c, (out_plane, x_plane)) in
                out.chunks_exact_mut(spatial).zip(x.chunks_exact(spatial)).enumerate()
            {
                let scale = inv_std * gamma[first_channel + c];
                let shift = beta[first_channel + c] - mean32 * scale;
                for (o, &v) in out_plane.iter_mut().zip(x_plane) {
                    *o = v * scale + shift;
                }
                if silu {
                    for o in out_plane.iter_mut() {
                        *o /= 1.0 + (-*o).exp();
                    }
                }
            }
        },
    );
    output
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    pub(crate) fn naive_conv(
        input: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        g: &Conv2dGeometry,
    ) -> Vec<f32> {
        let (oh, ow) = (g.out_h().unwrap(), g.out_w().unwrap());
        let mut out = vec![0f32; g.batch * g.out_channels * oh * ow];
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut acc = bias.map_or(0.0, |bias| bias[o] as f64);
                        for c in 0..g.in_channels {
                            for ky in 0..g.kernel_h {
                                for kx in 0..g.kernel_w {
                                    let iy = (y * g.stride + ky) as isize - g.padding as isize;
                                    let ix = (x * g.stride + kx) as isize - g.padding as isize;
                                    if iy < 0
                                        || ix < 0
                                        || iy >= g.height as isize
                                        || ix >= g.width as isize
                                    {
                                        continue;
                                    }
                                    let i = ((b * g.in_channels + c) * g.height + iy as usize)
                                        * g.width
                                        + ix as usize;
                                    let w = ((o * g.in_channels + c) * g.kernel_h + ky)
                                        * g.kernel_w
                                        + kx;
                                    acc += input[i] as f64 * weight[w] as f64;
                                }
                            }
                        }
                        out[((b * g.out_channels + o) * oh + y) * ow + x] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn conv2d_matches_naive_convolution_on_odd_shapes() {
        let cases = [
            (2, 3, 7, 5, 4, 3, 1, 1),
            (1, 5, 9, 6, 3, 3, 2, 1),
            (1, 4, 8, 8, 6, 3, 2, 0),
            (2, 6, 5, 7, 5, 1, 1, 0),
            (1, 3, 6, 6, 2, 1, 2, 0),
            (1, 2, 4, 4, 3, 3, 1, 2),
        ];
        for (i, &(batch, in_channels, height, width, out_channels, kernel, stride, padding)) in
            cases.iter().enumerate()
        {
            let g = Conv2dGeometry {
                batch,
                in_channels,
                height,
                width,
                out_channels,
                kernel_h: kernel,
                kernel_w: kernel,
                stride,
                padding,
            };
            let input = pseudo_random(batch * in_channels * height * width, i as u64);
            let weight =
                pseudo_random(out_channels * in_channels * kernel * kernel, 100 + i as u64);
            let bias = pseudo_random(out_channels, 200 + i as u64);
            for threads in [1, 2] {
                for bias in [None, Some(bias.as_slice())] {
                    let fast = conv2d(&input, &weight, bias, &g, threads);
                    let slow = naive_conv(&input, &weight, bias, &g);
                    let worst =
                        fast.iter().zip(&slow).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst < 1e-4, "case {i} threads {threads}: max |Δ| {worst}");
                }
            }
        }
    }

    #[test]
    fn group_norm_matches_two_pass_formula() {
        let (batch, channels, spatial, groups) = (2, 6, 37, 3);
        let input = pseudo_random(batch * channels * spatial, 7);
        let gamma = pseudo_random(channels, 8);
        let beta = pseudo_random(channels, 9);
        for silu in [false, true] {
            let fast =
                group_norm(&input, batch, channels, spatial, groups, 1e-5, &gamma, &beta, silu);
            let group_len = channels / groups * spatial;
            for (index, (x, y)) in input.chunks(group_len).zip(fast.chunks(group_len)).enumerate() {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
                let var =
                    x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / group_len as f64;
                for (j, (&v, &got)) in x.iter().zip(y).enumerate() {
                    let c = (index % groups) * (channels / groups) + j / spatial;
                    let mut want =
                        (v as f64 - mean) / (var + 1e-5).sqrt() * gamma[c] as f64 + beta[c] as f64;
                    if silu {
                        want /= 1.0 + (-want).exp();
                    }
                    assert!((want - got as f64).abs() < 1e-5, "silu {silu}: {want} vs {got}");
                }
            }
        }
    }
}
