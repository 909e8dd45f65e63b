//! Winograd minimal-filtering convolution for 3×3, stride-1, padding-1 layers (the bulk of
//! the SD UNet and VAE): a weight transformed once per layer ([`WinogradWeight`]), input
//! tiles transformed a block at a time into one matrix per transform-domain position, one
//! `gemm` per position, and the inverse transform written straight into NCHW output.
//!
//! Transforms follow Lavin & Gray 2015, "Fast Algorithms for Convolutional Neural Networks"
//! (arXiv:1509.09308): F(2×2,3×3) with interpolation points {0, 1, −1, ∞} (their matrices)
//! and F(4×4,3×3) built by their Toom-Cook construction on {0, 1, −1, 1/2, −2, ∞} (more
//! accurate than their {0, ±1, ±2}, see `F4_G`); the 2-D transform is the 1-D one nested (`Bᵀ d B`,
//! `G g Gᵀ`, `Aᵀ m A`). Accuracy and speed measured on this machine are in the crate docs.

use crate::bf16::{self, Lhs, PackedLhs, Rhs};
use crate::MatrixRef;
use rayon::prelude::*;
use std::cell::RefCell;

/// Which Winograd algorithm a [`WinogradWeight`] was transformed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradVariant {
    /// F(2×2,3×3): 4×4 input tiles, 16 products per 4 outputs (2.25× fewer multiplies).
    F2x2,
    /// F(4×4,3×3): 6×6 input tiles, 36 products per 16 outputs (4× fewer multiplies).
    F4x4,
}

impl WinogradVariant {
    /// Output tile side `m`.
    pub fn tile(self) -> usize {
        match self {
            WinogradVariant::F2x2 => 2,
            WinogradVariant::F4x4 => 4,
        }
    }

    /// Input tile side `m + 2`.
    pub fn alpha(self) -> usize {
        self.tile() + 2
    }

    /// Whether bf16 mode rounds this variant's transform-domain products to bf16. F(2×2):
    /// yes (max |Δ| / rms of a layer 2e-2, against 1.1e-2 for direct bf16 products).
    /// F(4×4): no, its products stay f32. Its transforms amplify the operands' rounding
    /// about tenfold (1.2e-1 per layer, `examples/bf16_bench.rs conv`); on the full-size
    /// SD 1.5 architecture (random weights, 256², 2 steps) that doubled bf16 mode's image
    /// error against f32 mode (max 14/255, mean 1.4, instead of 7/255, mean 0.85) for
    /// 12 % (UNet) to 22 % (VAE) less CPU time.
    fn products_in_bf16(self) -> bool {
        self == WinogradVariant::F2x2
    }

    /// `G` (alpha × 3), the filter transform.
    fn filter_matrix(self) -> &'static [[f64; 3]] {
        match self {
            WinogradVariant::F2x2 => &F2_G,
            WinogradVariant::F4x4 => &F4_G,
        }
    }
}

const F2_G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// `G` for F(4×4,3×3) on points {0, 1, −1, 1/2, −2, ∞}: row j is (1, p, p²) / Π(p − q)
/// over the other finite points q (Lavin & Gray's Toom-Cook construction). These points
/// replace Lavin & Gray's {0, ±1, ±2}: Barabasz et al. 2020 ("Error analysis and improving
/// the accuracy of Winograd convolution for deep neural networks") show that mixing a point
/// with its reciprocal's sign flip balances the transforms' magnitudes; measured here it
/// halves the worst error at SD shapes (≈ 2e-5 instead of ≈ 5e-5).
const F4_G: [[f64; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
    [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
    [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
    [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// Smallest channel count (in and out) for which Winograd beat im2col (at 32 channels, 64²:
/// F(4×4) 2× faster, at 16 even; the VAE's 3- and 4-channel conv_in/conv_out stay on im2col).
const MIN_CHANNELS: usize = 32;

/// Fewest tiles per image for which a variant beat im2col and the other variant: with
/// 1280 channels, batch 2, F(4×4) is 3.8× faster than im2col at 16×16 (16 tiles per image)
/// but F(2×2) wins at 8×8 (F(2×2) 1.9×, F(4×4) 1.4×); at 4×4 F(2×2) is even and F(4×4) 2×
/// slower.
const MIN_TILES: usize = 16;

/// The Winograd algorithm that beats im2col+gemm for this convolution, if any, for 3×3,
/// stride-1, padding-1 layers with enough channels: F(4×4,3×3) when an image has at least
/// [`MIN_TILES`] 4×4 tiles, else F(2×2,3×3) when it has that many 2×2 tiles (see the crate
/// docs for the measurements); `None` keeps [`crate::conv2d`].
pub fn preferred_variant(geometry: &crate::Conv2dGeometry) -> Option<WinogradVariant> {
    let g = geometry;
    if g.kernel_h != 3
        || g.kernel_w != 3
        || g.stride != 1
        || g.padding != 1
        || g.in_channels < MIN_CHANNELS
        || g.out_channels < MIN_CHANNELS
    {
        return None;
    }
    // Per image, not over the batch: the choice (and so each image's rounding) must not
    // depend on what the image is batched with.
    let tiles = |side: usize| g.height.div_ceil(side) * g.width.div_ceil(side);
    let variant = if tiles(4) >= MIN_TILES {
        WinogradVariant::F4x4
    } else if tiles(2) >= MIN_TILES {
        WinogradVariant::F2x2
    } else {
        return None;
    };
    // In bf16 mode, im2col's bf16 products beat an F(2×2) whose products stay f32 for lack
    // of tiles and equal an F(4×4) on few tiles (`examples/bf16_bench.rs conv`, 2 threads:
    // 1280@8² batch 2, im2col bf16 40 ms, F(2×2) 66 ms; 640@16², im2col bf16 29 ms, F(4×4)
    // 30 ms); F(4×4) on more tiles stays ahead (320@32²: 23 ms against 32 ms).
    if bf16::matmul_precision() == bf16::MatmulPrecision::Bf16
        && bf16::bf16_supported()
        && tiles(variant.tile()) < MIN_BF16_TILES
    {
        return None;
    }
    Some(variant)
}

/// A 3×3 convolution weight in the Winograd domain: `alpha²` matrices of `out × in`
/// (`[alpha², out, in]`), each the left operand of one GEMM.
#[derive(Clone)]
pub struct WinogradWeight {
    variant: WinogradVariant,
    out_channels: usize,
    in_channels: usize,
    transformed: Vec<f32>,
    /// The per-position matrices rounded to bf16 and packed for [`crate::bf16::matmul`],
    /// made on the first product in bf16 mode (half the f32 transform's memory again).
    packed_bf16: std::sync::OnceLock<Vec<PackedLhs>>,
}

impl std::fmt::Debug for WinogradWeight {
    // Shape only: the transformed values run to hundreds of MB.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WinogradWeight")
            .field("variant", &self.variant)
            .field("out_channels", &self.out_channels)
            .field("in_channels", &self.in_channels)
            .finish_non_exhaustive()
    }
}

impl WinogradWeight {
    /// Transforms an OIHW `[out, in, 3, 3]` weight (`G g Gᵀ` per channel pair, in f64).
    ///
    /// # Panics
    /// When `weight.len() != out_channels · in_channels · 9` (a caller bug).
    pub fn new(
        weight: &[f32],
        out_channels: usize,
        in_channels: usize,
        variant: WinogradVariant,
    ) -> Self {
        assert_eq!(weight.len(), out_channels * in_channels * 9, "winograd weight length");
        let alpha = variant.alpha();
        let g = variant.filter_matrix();
        let pairs = out_channels * in_channels;
        let mut transformed = vec![0f32; alpha * alpha * pairs];
        let target = SharedMut(transformed.as_mut_ptr());
        // Output channels in parallel: a layer's weight is transformed once, but the UNet has
        // dozens of 1280-channel layers whose first use should not stall a request.
        weight.par_chunks(in_channels * 9).enumerate().for_each(|(out, kernels)| {
            for (channel, kernel) in kernels.chunks_exact(9).enumerate() {
                // G·g (alpha × 3), then (G·g)·Gᵀ (alpha × alpha).
                let mut left = [[0f64; 3]; 6];
                for (row, g_row) in left.iter_mut().zip(g) {
                    for (x, value) in row.iter_mut().enumerate() {
                        *value = g_row[0] * kernel[x] as f64
                            + g_row[1] * kernel[3 + x] as f64
                            + g_row[2] * kernel[6 + x] as f64;
                    }
                }
                let pair = out * in_channels + channel;
                for (i, row) in left.iter().take(alpha).enumerate() {
                    for (j, g_row) in g.iter().enumerate() {
                        let value = row[0] * g_row[0] + row[1] * g_row[1] + row[2] * g_row[2];
                        // SAFETY: in bounds ([alpha², out, in]); each output channel writes
                        // only its own `[.., out, ..]` rows.
                        unsafe { *target.at((i * alpha + j) * pairs + pair) = value as f32 };
                    }
                }
            }
        });
        WinogradWeight {
            variant,
            out_channels,
            in_channels,
            transformed,
            packed_bf16: std::sync::OnceLock::new(),
        }
    }

    /// The per-position weight matrices packed for the bf16 products (made once).
    fn packed_bf16(&self) -> &[PackedLhs] {
        self.packed_bf16.get_or_init(|| {
            let (m, k) = (self.out_channels, self.in_channels);
            self.transformed
                .par_chunks_exact(m * k)
                .map(|matrix| {
                    PackedLhs::new(
                        MatrixRef { data: matrix, row_stride: k, col_stride: 1 },
                        m,
                        k,
                        1,
                    )
                })
                .collect()
        })
    }

    /// The algorithm this weight was transformed for.
    pub fn variant(&self) -> WinogradVariant {
        self.variant
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Bytes held by the transformed weight (and its bf16 packing, once made).
    pub fn size_bytes(&self) -> usize {
        self.transformed.len() * std::mem::size_of::<f32>()
            + self
                .packed_bf16
                .get()
                .map_or(0, |packed| packed.iter().map(PackedLhs::size_bytes).sum())
    }
}

/// Tiles transformed side by side; the transforms below are element-wise over these lanes,
/// which is what lets LLVM vectorise them.
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// Target number of tiles per block: wide enough that each GEMM's right-hand matrix is
/// efficient for `gemm`, small enough that the block's buffers stay near the caches.
const BLOCK_TILES: usize = 256;

/// Fewest tiles per block for which the bf16 products beat f32 (the 32-column register
/// tile is half empty at 16; measured with `examples/bf16_bench.rs`).
const MIN_BF16_TILES: usize = 64;

/// Upper bound on the block buffers (transformed input + products), in floats (24 MiB).
const BLOCK_FLOATS: usize = 6 << 20;

thread_local! {
    /// Reused block buffers (transformed input, then GEMM products): see `COLUMN_SCRATCH`.
    static WINOGRAD_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// 1-D transforms of one algorithm, element-wise over [`LANES`] tiles.
trait Algorithm {
    const TILE: usize;
    const ALPHA: usize;
    /// `Bᵀ d` for one column/row of `ALPHA` values (only the first `ALPHA` are used).
    fn input(d: &[Lanes; 6]) -> [Lanes; 6];
    /// `Aᵀ m` for `ALPHA` values into `TILE` outputs.
    fn output(m: &[Lanes; 6]) -> [Lanes; 4];
}

struct F2;
struct F4;

impl Algorithm for F2 {
    const TILE: usize = 2;
    const ALPHA: usize = 4;

    #[inline(always)]
    fn input(d: &[Lanes; 6]) -> [Lanes; 6] {
        let mut v = [[0f32; LANES]; 6];
        for l in 0..LANES {
            v[0][l] = d[0][l] - d[2][l];
            v[1][l] = d[1][l] + d[2][l];
            v[2][l] = d[2][l] - d[1][l];
            v[3][l] = d[1][l] - d[3][l];
        }
        v
    }

    #[inline(always)]
    fn output(m: &[Lanes; 6]) -> [Lanes; 4] {
        let mut y = [[0f32; LANES]; 4];
        for l in 0..LANES {
            y[0][l] = m[0][l] + m[1][l] + m[2][l];
            y[1][l] = m[1][l] - m[2][l] - m[3][l];
        }
        y
    }
}

impl Algorithm for F4 {
    const TILE: usize = 4;
    const ALPHA: usize = 6;

    #[inline(always)]
    fn input(d: &[Lanes; 6]) -> [Lanes; 6] {
        let mut v = [[0f32; LANES]; 6];
        for l in 0..LANES {
            let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
            // Bᵀ rows for points {0, 1, −1, 1/2, −2, ∞} (see F4_G).
            v[0][l] = d0 - 1.5 * d1 - 2.0 * d2 + 1.5 * d3 + d4;
            v[1][l] = -d1 + 0.5 * d2 + 2.5 * d3 + d4;
            v[2][l] = d1 - 2.5 * d2 + 0.5 * d3 + d4;
            v[3][l] = -2.0 * d1 - d2 + 2.0 * d3 + d4;
            v[4][l] = 0.5 * d1 - d2 - 0.5 * d3 + d4;
            v[5][l] = d1 - 1.5 * d2 - 2.0 * d3 + 1.5 * d4 + d5;
        }
        v
    }

    #[inline(always)]
    fn output(m: &[Lanes; 6]) -> [Lanes; 4] {
        let mut y = [[0f32; LANES]; 4];
        for l in 0..LANES {
            let [m0, m1, m2, m3, m4, m5] = [m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]];
            let (sum12, diff12) = (m1 + m2, m1 - m2);
            // Aᵀ: powers 0..3 of each point (the ∞ column only in the last row).
            y[0][l] = m0 + sum12 + m3 + m4;
            y[1][l] = diff12 + 0.5 * m3 - 2.0 * m4;
            y[2][l] = sum12 + 0.25 * m3 + 4.0 * m4;
            y[3][l] = diff12 + 0.125 * m3 - 8.0 * m4 + m5;
        }
        y
    }
}

/// `Bᵀ d B` of `LANES` tiles (`d[row][col]`), into `v[row][col]`.
#[inline(always)]
fn input_tile<A: Algorithm>(d: &[[Lanes; 6]; 6]) -> [[Lanes; 6]; 6] {
    let mut columns = [[[0f32; LANES]; 6]; 6];
    for k in 0..A::ALPHA {
        let column = std::array::from_fn(|i| d[i][k]);
        columns[k] = A::input(&column);
    }
    let mut v = [[[0f32; LANES]; 6]; 6];
    for (j, row) in v.iter_mut().enumerate().take(A::ALPHA) {
        let across = std::array::from_fn(|k| columns[k][j]);
        *row = A::input(&across);
    }
    v
}

/// `Aᵀ m A` of `LANES` tiles (`m[row][col]`), into `y[row][col]`.
#[inline(always)]
fn output_tile<A: Algorithm>(m: &[[Lanes; 6]; 6]) -> [[Lanes; 4]; 4] {
    let mut columns = [[[0f32; LANES]; 4]; 6];
    for k in 0..A::ALPHA {
        let column = std::array::from_fn(|i| m[i][k]);
        columns[k] = A::output(&column);
    }
    let mut y = [[[0f32; LANES]; 4]; 4];
    for (r, row) in y.iter_mut().enumerate().take(A::TILE) {
        let across = std::array::from_fn(|k| columns[k][r]);
        *row = A::output(&across);
    }
    y
}

/// A raw pointer that threads write through at provably disjoint offsets.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every user writes a disjoint set of elements (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The element `offset` places on (a method, so closures capture the whole wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Shape of one Winograd convolution call.
#[derive(Clone, Copy)]
struct Plan {
    height: usize,
    width: usize,
    in_channels: usize,
    out_channels: usize,
    tiles_y: usize,
    tiles_x: usize,
}

fn for_each_index(count: usize, threads: usize, work: impl Fn(usize) + Send + Sync) {
    if threads > 1 {
        (0..count).into_par_iter().for_each(work);
    } else {
        (0..count).for_each(work);
    }
}

/// Convolution of `input` (`[batch, in, height, width]`) with a Winograd-domain 3×3
/// weight, stride 1, padding 1, plus `bias` (`[out]`), as `[batch, out, height, width]`.
/// `threads > 1` runs the transforms and the per-position GEMMs on rayon's pool.
///
/// # Panics
/// When slice lengths do not match the shapes (a caller bug).
pub fn conv2d_3x3(
    input: &[f32],
    weight: &WinogradWeight,
    bias: Option<&[f32]>,
    batch: usize,
    height: usize,
    width: usize,
    threads: usize,
) -> Vec<f32> {
    match weight.variant {
        WinogradVariant::F2x2 => {
            conv2d_3x3_with::<F2>(input, weight, bias, batch, height, width, threads)
        }
        WinogradVariant::F4x4 => {
            conv2d_3x3_with::<F4>(input, weight, bias, batch, height, width, threads)
        }
    }
}

fn conv2d_3x3_with<A: Algorithm>(
    input: &[f32],
    weight: &WinogradWeight,
    bias: Option<&[f32]>,
    batch: usize,
    height: usize,
    width: usize,
    threads: usize,
) -> Vec<f32> {
    let (in_channels, out_channels) = (weight.in_channels, weight.out_channels);
    assert_eq!(input.len(), batch * in_channels * height * width, "winograd input length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_channels, "winograd bias length");
    }
    let mut output = vec![0f32; batch * out_channels * height * width];
    if output.is_empty() || in_channels == 0 {
        if let Some(bias) = bias {
            for (plane, &b) in output.chunks_exact_mut(height * width).zip(bias.iter().cycle()) {
                plane.fill(b);
            }
        }
        return output;
    }
    let plan = Plan {
        height,
        width,
        in_channels,
        out_channels,
        tiles_y: height.div_ceil(A::TILE),
        tiles_x: width.div_ceil(A::TILE),
    };
    let positions = A::ALPHA * A::ALPHA;
    let tile_rows = batch * plan.tiles_y;
    let floats_per_row = positions * (in_channels + out_channels) * plan.tiles_x;
    // Blocks never span two images and start at the same tile rows in every image, so an
    // image's GEMMs (and their rounding) are the same alone or in any batch: requests
    // batched together get exactly the pixels they get alone.
    let rows_per_block =
        (BLOCK_TILES / plan.tiles_x).min(BLOCK_FLOATS / floats_per_row).clamp(1, plan.tiles_y);
    let output_ptr = SharedMut(output.as_mut_ptr());
    WINOGRAD_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut row0 = 0;
        while row0 < tile_rows {
            let rows = rows_per_block.min(plan.tiles_y - row0 % plan.tiles_y);
            let tiles = rows * plan.tiles_x;
            let (v_len, m_len) =
                (positions * in_channels * tiles, positions * out_channels * tiles);
            if scratch.len() < v_len + m_len {
                scratch.resize(v_len + m_len, 0.0);
            }
            let (transformed, products) = scratch[..v_len + m_len].split_at_mut(v_len);
            transform_input::<A>(input, &plan, row0, rows, transformed, threads);
            multiply(weight, transformed, products, tiles, positions, threads);
            // SAFETY: output has batch·out·height·width elements, the bound `plan` describes.
            unsafe {
                transform_output::<A>(products, bias, &plan, row0, rows, output_ptr, threads)
            };
            row0 += rows;
        }
    });
    output
}

/// Fills `transformed` (`[alpha², in, tiles]`) for tile rows `row0 .. row0 + rows`
/// (global over the batch: row `image · tiles_y + ty`).
fn transform_input<A: Algorithm>(
    input: &[f32],
    plan: &Plan,
    row0: usize,
    rows: usize,
    transformed: &mut [f32],
    threads: usize,
) {
    let tiles = rows * plan.tiles_x;
    let channels = plan.in_channels;
    // Padded input rows: one zero column on the left, zeros past the right edge up to the
    // last tile's reach, so every tile reads in bounds.
    let padded_width = plan.tiles_x * A::TILE + 2;
    let target = SharedMut(transformed.as_mut_ptr());
    let target_len = transformed.len();
    let job = InputJob { input, plan, row0, rows, tiles, padded_width, target, target_len };
    let wide = has_avx2();
    for_each_index(channels, threads, |channel| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX2 is present (checked at run time).
            return unsafe { input_channel_avx2::<A>(&job, channel) };
        }
        let _ = wide;
        input_channel::<A>(&job, channel);
    });
}

/// `products[ξ] (out × tiles) = weight[ξ] (out × in) · transformed[ξ] (in × tiles)` for
/// every transform-domain position ξ; positions run in parallel, each GEMM on one thread.
fn multiply(
    weight: &WinogradWeight,
    transformed: &[f32],
    products: &mut [f32],
    tiles: usize,
    positions: usize,
    threads: usize,
) {
    let (m, k) = (weight.out_channels, weight.in_channels);
    if bf16::matmul_precision() == bf16::MatmulPrecision::Bf16
        && tiles >= MIN_BF16_TILES
        && bf16::bf16_supported()
        && weight.variant.products_in_bf16()
    {
        let packed = weight.packed_bf16();
        let run = |(position, product): (usize, &mut [f32])| {
            let rhs = &transformed[position * k * tiles..][..k * tiles];
            let rhs = MatrixRef { data: rhs, row_stride: tiles, col_stride: 1 };
            let lhs = Lhs::Packed(&packed[position]);
            bf16::matmul(product, tiles, lhs, Rhs::Strided(rhs), (m, tiles, k), false, 1);
        };
        let products = &mut products[..positions * m * tiles];
        if threads > 1 {
            products.par_chunks_mut(m * tiles).enumerate().for_each(run);
        } else {
            products.chunks_mut(m * tiles).enumerate().for_each(run);
        }
        return;
    }
    let run = |(position, product): (usize, &mut [f32])| {
        let lhs = &weight.transformed[position * m * k..][..m * k];
        let rhs = &transformed[position * k * tiles..][..k * tiles];
        // SAFETY: lhs m×k, rhs k×tiles, product m×tiles, all row-major and in bounds.
        unsafe {
            gemm::gemm(
                m,
                tiles,
                k,
                product.as_mut_ptr(),
                1,
                tiles as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                tiles as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let products = &mut products[..positions * m * tiles];
    if threads > 1 {
        products.par_chunks_mut(m * tiles).enumerate().for_each(run);
    } else {
        products.chunks_mut(m * tiles).enumerate().for_each(run);
    }
}

/// Inverse-transforms `products` (`[alpha², out, tiles]`) of tile rows `row0 .. row0 + rows`
/// into the NCHW output, adding `bias`.
///
/// # Safety
/// `output` must point to `batch · out · height · width` writable floats, with `batch` the
/// number of images the tile rows range over.
unsafe fn transform_output<A: Algorithm>(
    products: &[f32],
    bias: Option<&[f32]>,
    plan: &Plan,
    row0: usize,
    rows: usize,
    output: SharedMut,
    threads: usize,
) {
    let tiles = rows * plan.tiles_x;
    let channels = plan.out_channels;
    let job = OutputJob { products, bias, plan, row0, rows, tiles, output };
    let wide = has_avx2();
    for_each_index(channels, threads, |channel| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: AVX2 is present (checked at run time); the caller's bound holds.
            return unsafe { output_channel_avx2::<A>(&job, channel) };
        }
        let _ = wide;
        // SAFETY: the caller's bound on `output` holds.
        unsafe { output_channel::<A>(&job, channel) };
    });
}

/// What every channel's input transform reads and where it writes.
struct InputJob<'a> {
    input: &'a [f32],
    plan: &'a Plan,
    row0: usize,
    rows: usize,
    tiles: usize,
    padded_width: usize,
    target: SharedMut,
    target_len: usize,
}

/// AVX2 build of [`input_channel`]: the lane loops become 256-bit operations.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn input_channel_avx2<A: Algorithm>(job: &InputJob, channel: usize) {
    input_channel::<A>(job, channel)
}

/// Transforms one input channel's tiles of the job's tile rows.
#[inline(always)]
fn input_channel<A: Algorithm>(job: &InputJob, channel: usize) {
    let InputJob { input, plan, row0, rows, tiles, padded_width, target, target_len } = *job;
    let (channels, plane) = (plan.in_channels, plan.height * plan.width);
    let mut padded = [const { Vec::new() }; 6];
    for row in padded.iter_mut().take(A::ALPHA) {
        row.resize(padded_width, 0f32);
    }
    for row in 0..rows {
        let (image, ty) = ((row0 + row) / plan.tiles_y, (row0 + row) % plan.tiles_y);
        let source = &input[(image * channels + channel) * plane..][..plane];
        for (i, padded_row) in padded.iter_mut().enumerate().take(A::ALPHA) {
            let y = (ty * A::TILE + i) as isize - 1;
            if y < 0 || y >= plan.height as isize {
                padded_row.fill(0.0);
            } else {
                let line = &source[y as usize * plan.width..][..plan.width];
                padded_row[1..=plan.width].copy_from_slice(line);
            }
        }
        let mut tx0 = 0;
        while tx0 < plan.tiles_x {
            let count = LANES.min(plan.tiles_x - tx0);
            let mut d = [[[0f32; LANES]; 6]; 6];
            for (i, d_row) in d.iter_mut().enumerate().take(A::ALPHA) {
                for (k, lanes) in d_row.iter_mut().enumerate().take(A::ALPHA) {
                    for (l, value) in lanes.iter_mut().enumerate().take(count) {
                        *value = padded[i][(tx0 + l) * A::TILE + k];
                    }
                }
            }
            let v = input_tile::<A>(&d);
            let first_tile = row * plan.tiles_x + tx0;
            for (j, v_row) in v.iter().enumerate().take(A::ALPHA) {
                for (k, lanes) in v_row.iter().enumerate().take(A::ALPHA) {
                    let offset = ((j * A::ALPHA + k) * channels + channel) * tiles + first_tile;
                    debug_assert!(offset + count <= target_len);
                    // SAFETY: in bounds of `transformed` ([alpha², in, tiles]); each
                    // channel writes only its own `[.., channel, ..]` rows.
                    unsafe {
                        std::ptr::copy_nonoverlapping(lanes.as_ptr(), target.at(offset), count)
                    };
                }
            }
            tx0 += count;
        }
    }
}

/// What every channel's output transform reads and where it writes.
struct OutputJob<'a> {
    products: &'a [f32],
    bias: Option<&'a [f32]>,
    plan: &'a Plan,
    row0: usize,
    rows: usize,
    tiles: usize,
    output: SharedMut,
}

/// AVX2 build of [`output_channel`].
///
/// # Safety
/// The CPU must support AVX2; `output_channel`'s bound holds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn output_channel_avx2<A: Algorithm>(job: &OutputJob, channel: usize) {
    unsafe { output_channel::<A>(job, channel) }
}

/// Inverse-transforms one output channel's tiles of the job's tile rows into its planes.
///
/// # Safety
/// `job.output` must point to the whole NCHW output the tile rows range over.
#[inline(always)]
unsafe fn output_channel<A: Algorithm>(job: &OutputJob, channel: usize) {
    let OutputJob { products, bias, plan, row0, rows, tiles, output } = *job;
    let (channels, plane) = (plan.out_channels, plan.height * plan.width);
    let b = bias.map_or(0.0, |bias| bias[channel]);
    for row in 0..rows {
        let (image, ty) = ((row0 + row) / plan.tiles_y, (row0 + row) % plan.tiles_y);
        let rows_here = A::TILE.min(plan.height - ty * A::TILE);
        let mut tx0 = 0;
        while tx0 < plan.tiles_x {
            let count = LANES.min(plan.tiles_x - tx0);
            let first_tile = row * plan.tiles_x + tx0;
            let mut m = [[[0f32; LANES]; 6]; 6];
            for (j, m_row) in m.iter_mut().enumerate().take(A::ALPHA) {
                for (k, lanes) in m_row.iter_mut().enumerate().take(A::ALPHA) {
                    let offset = ((j * A::ALPHA + k) * channels + channel) * tiles + first_tile;
                    lanes[..count].copy_from_slice(&products[offset..offset + count]);
                }
            }
            let y = output_tile::<A>(&m);
            let plane_start = (image * channels + channel) * plane;
            for (r, y_row) in y.iter().enumerate().take(rows_here) {
                let line = plane_start + (ty * A::TILE + r) * plan.width;
                for l in 0..count {
                    let x0 = (tx0 + l) * A::TILE;
                    for (s, lanes) in y_row.iter().enumerate().take(A::TILE) {
                        if x0 + s < plan.width {
                            // SAFETY: inside this channel's plane (caller's bound); each
                            // channel writes only its own planes.
                            unsafe { *output.at(line + x0 + s) = lanes[l] + b };
                        }
                    }
                }
            }
            tx0 += count;
        }
    }
}

/// Whether the transforms may use their AVX2 builds (the crate targets baseline x86-64).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{naive_conv, pseudo_random};
    use crate::{conv2d, Conv2dGeometry};

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    #[test]
    fn winograd_matches_naive_and_im2col_convolution() {
        // (batch, in, height, width, out): odd sizes, sizes not divisible by either tile,
        // single-pixel and single-row images, enough channels for several lane chunks.
        let cases = [
            (2, 3, 7, 5, 4),
            (1, 5, 9, 6, 3),
            (2, 6, 8, 8, 5),
            (1, 4, 1, 1, 2),
            (1, 2, 1, 13, 3),
            (2, 7, 21, 19, 6),
            (1, 16, 35, 3, 9),
        ];
        for (i, &(batch, in_channels, height, width, out_channels)) in cases.iter().enumerate() {
            let g = Conv2dGeometry {
                batch,
                in_channels,
                height,
                width,
                out_channels,
                kernel_h: 3,
                kernel_w: 3,
                stride: 1,
                padding: 1,
            };
            let input = pseudo_random(batch * in_channels * height * width, 300 + i as u64);
            let weight = pseudo_random(out_channels * in_channels * 9, 400 + i as u64);
            let bias = pseudo_random(out_channels, 500 + i as u64);
            for variant in [WinogradVariant::F2x2, WinogradVariant::F4x4] {
                let transformed = WinogradWeight::new(&weight, out_channels, in_channels, variant);
                for threads in [1, 2] {
                    for bias in [None, Some(bias.as_slice())] {
                        let fast =
                            conv2d_3x3(&input, &transformed, bias, batch, height, width, threads);
                        let naive = naive_conv(&input, &weight, bias, &g);
                        let im2col = conv2d(&input, &weight, bias, &g, threads);
                        let (to_naive, to_im2col) =
                            (max_abs_diff(&fast, &naive), max_abs_diff(&fast, &im2col));
                        assert!(
                            to_naive < 1e-4 && to_im2col < 1e-4,
                            "case {i} {variant:?} threads {threads}: max |Δ| naive {to_naive} \
                             im2col {to_im2col}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn preferred_variant_follows_channels_tiles_and_geometry() {
        let g = |batch, channels, side, kernel, stride, padding| Conv2dGeometry {
            batch,
            in_channels: channels,
            height: side,
            width: side,
            out_channels: channels,
            kernel_h: kernel,
            kernel_w: kernel,
            stride,
            padding,
        };
        assert_eq!(preferred_variant(&g(2, 320, 64, 3, 1, 1)), Some(WinogradVariant::F4x4));
        assert_eq!(preferred_variant(&g(2, 1280, 16, 3, 1, 1)), Some(WinogradVariant::F4x4));
        assert_eq!(preferred_variant(&g(2, 1280, 8, 3, 1, 1)), Some(WinogradVariant::F2x2));
        assert_eq!(preferred_variant(&g(2, 1280, 4, 3, 1, 1)), None);
        assert_eq!(preferred_variant(&g(1, 16, 64, 3, 1, 1)), None);
        assert_eq!(preferred_variant(&g(2, 320, 64, 3, 2, 1)), None);
        assert_eq!(preferred_variant(&g(2, 320, 64, 1, 1, 0)), None);
    }

    #[test]
    fn blocks_smaller_than_the_image_cover_every_tile() {
        // Wide enough that a block holds fewer tile rows than the batch has.
        let (batch, channels, height, width) = (2, 3, 40, 1100);
        let g = Conv2dGeometry {
            batch,
            in_channels: channels,
            height,
            width,
            out_channels: channels,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        let input = pseudo_random(batch * channels * height * width, 11);
        let weight = pseudo_random(channels * channels * 9, 12);
        let bias = pseudo_random(channels, 13);
        let reference = conv2d(&input, &weight, Some(&bias), &g, 2);
        for variant in [WinogradVariant::F2x2, WinogradVariant::F4x4] {
            let transformed = WinogradWeight::new(&weight, channels, channels, variant);
            let fast = conv2d_3x3(&input, &transformed, Some(&bias), batch, height, width, 2);
            let worst = max_abs_diff(&fast, &reference);
            assert!(worst < 1e-4, "{variant:?}: max |Δ| {worst}");
        }
    }
}
