//! Matrix products with bf16 operands and f32 accumulation on CPUs with AVX512-BF16
//! (`vdpbf16ps`): the optional fast path of [`crate::matmul`], the convolutions, the linear
//! layers and attention, chosen process-wide with [`set_matmul_precision`]. Everything
//! outside the products stays f32.
//!
//! Operands are rounded to bf16 (round to nearest even, as torch's `.to(torch.bfloat16)`)
//! while they are packed into panels; each `vdpbf16ps` multiplies bf16 pairs (exactly: the
//! products fit an f32) and adds them to 16 f32 accumulators, so the extra error is mostly
//! the operands' rounding: at most 2⁻⁸ relative per operand (8 significant bits), so a dot
//! product of length k is off by about 2⁻⁸·√k times its terms' magnitude (random signs).
//! The packing and blocking follow the usual Goto/BLIS scheme (Goto & van de Geijn 2008,
//! "Anatomy of high-performance matrix multiplication"): a register tile of [`MR`] × [`NR`]
//! outputs, depth blocks of [`KC`] that keep one right-hand micro-panel in the 32 KiB L1
//! and a left-hand block in the 1 MiB L2 of a Zen 4 core.
//!
//! Per-element arithmetic depends only on `k` (the depth blocking), never on `m`, `n` or the
//! thread count, so a batch item's result is the same alone or batched.

use crate::MatrixRef;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Rows of the register tile (12 × 2 zmm accumulators = 24 of the 32 registers).
pub const MR: usize = 12;
/// Columns of the register tile: two 16-lane f32 vectors.
pub const NR: usize = 32;
/// Depth block in bf16 elements (192 pairs): a right-hand micro-panel is 192 · 32 · 4 B =
/// 24 KiB (L1), a left-hand micro-panel 9 KiB.
pub const KC: usize = 384;
/// Pairs per depth block.
const KCP: usize = KC / 2;
/// Left-hand rows per task (8 micro-panels): a 96 × 384 bf16 block is 72 KiB of L2.
const MC: usize = 8 * MR;
/// Right-hand columns per task (16 micro-panels): 384 KiB of packed bf16 per depth block.
const NC: usize = 16 * NR;

/// Precision of the CPU matrix products (convolutions, linear layers, attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulPrecision {
    /// f32 operands and accumulation (the default; the kernels' reference behaviour).
    #[default]
    F32,
    /// bf16 operands, f32 accumulation and output (AVX512-BF16 CPUs only).
    Bf16,
}

/// The process-wide precision: 0 f32, 1 bf16.
static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Whether this CPU has the instructions of the bf16 path (AVX512-F/BW and AVX512-BF16).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sets the process-wide precision of the CPU products and returns the one in effect:
/// [`MatmulPrecision::Bf16`] falls back to f32 where the CPU lacks AVX512-BF16.
pub fn set_matmul_precision(precision: MatmulPrecision) -> MatmulPrecision {
    let effective = match precision {
        MatmulPrecision::Bf16 if bf16_supported() => MatmulPrecision::Bf16,
        _ => MatmulPrecision::F32,
    };
    PRECISION.store(u8::from(effective == MatmulPrecision::Bf16), Ordering::Relaxed);
    effective
}

/// The process-wide precision in effect (see [`set_matmul_precision`]).
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) == 1 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// Whether a product whose operands are both packed per call should take the bf16 path in
/// bf16 mode: each operand's packing (about a nanosecond per element) is spread over the
/// other's extent, so both need enough rows/columns for the faster products to pay for it
/// (measured with `examples/bf16_bench.rs`); the destination must have contiguous rows
/// (every caller's does).
pub(crate) fn use_bf16(m: usize, n: usize, k: usize, dst_col_stride: usize) -> bool {
    matmul_precision() == MatmulPrecision::Bf16
        && dst_col_stride == 1
        && k >= 32
        && m.min(n) >= MIN_UNPACKED_EXTENT
        && bf16_supported()
}

/// Whether, in bf16 mode, a product with a weight packed once and `rows` output rows should
/// use it: yes unless the 12-row register tile would be mostly empty (the 3- and 4-channel
/// convolutions, the time embedding's single row), and only on CPUs that can.
pub fn packed_weight_pays(rows: usize) -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && rows >= MR && bf16_supported()
}

/// See [`use_bf16`].
const MIN_UNPACKED_EXTENT: usize = 128;

/// `x` rounded to bf16, round to nearest even (NaN stays a quiet NaN).
#[inline(always)]
pub fn to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    // Branch-free (a select), so packing loops vectorise.
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if x.is_nan() { quiet_nan } else { rounded }) as u16
}

/// The f32 value of bf16 bits.
#[inline(always)]
pub fn from_bf16_bits(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Two bf16 values (`first` in the low half) in one 32-bit word: the unit `vdpbf16ps`
/// multiplies pairwise.
#[inline(always)]
fn pair(first: f32, second: f32) -> u32 {
    to_bf16_bits(first) as u32 | (to_bf16_bits(second) as u32) << 16
}

/// Where depth block `block` of a packed operand with `panels` panels of `width` starts,
/// and how many pairs it holds.
#[inline(always)]
fn block_span(block: usize, pairs: usize, panels: usize, width: usize) -> (usize, usize) {
    let start = block * KCP * panels * width;
    (start, KCP.min(pairs - block * KCP))
}

/// A left-hand matrix (`m × k`) rounded to bf16 and packed into [`MR`]-row panels, pairs
/// along the depth: `[depth block][panel][pair][MR]` words, zero-padded to whole panels and
/// an even depth. Pack a constant operand (a weight) once and reuse it.
#[derive(Clone)]
pub struct PackedLhs {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

/// A right-hand matrix (`k × n`) rounded to bf16 and packed into [`NR`]-column panels,
/// pairs along the depth: `[depth block][panel][pair][NR]` words.
#[derive(Clone)]
pub struct PackedRhs {
    k: usize,
    n: usize,
    data: Vec<u32>,
}

impl std::fmt::Debug for PackedLhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLhs").field("m", &self.m).field("k", &self.k).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for PackedRhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedRhs").field("k", &self.k).field("n", &self.n).finish_non_exhaustive()
    }
}

/// One depth block of one panel of an operand being packed: `rows` rows (of `width`) from
/// `first_row`, pairs `first_pair ..` of the depth `k`.
struct Panel<'a> {
    matrix: MatrixRef<'a>,
    k: usize,
    first_pair: usize,
    pairs: usize,
    first_row: usize,
    rows: usize,
    width: usize,
}

impl Panel<'_> {
    /// Element `(row, depth)` of the panel's matrix, 0 past the depth (the odd pair's pad).
    #[inline(always)]
    fn at(&self, row: usize, depth: usize) -> f32 {
        let m = &self.matrix;
        if depth < self.k {
            m.data[(self.first_row + row) * m.row_stride + depth * m.col_stride]
        } else {
            0.0
        }
    }

    /// Portable packing: `target[p · width + r]` is the pair of row r at pair p.
    fn fill(&self, target: &mut [u32]) {
        for r in 0..self.rows {
            for p in 0..self.pairs {
                let d = 2 * (self.first_pair + p);
                target[p * self.width + r] = pair(self.at(r, d), self.at(r, d + 1));
            }
        }
    }

    /// [`Panel::fill`] with AVX-512 conversions (`vcvtneps2bf16`: round to nearest even,
    /// like [`to_bf16_bits`] except that it flushes subnormals to zero) for the two layouts
    /// the kernels use: rows contiguous (a right-hand operand read along its columns) and
    /// depth contiguous (row-major left operands, linear weights).
    ///
    /// # Safety
    /// AVX512-F/BW/BF16 present; the panel lies inside its (checked) matrix; one of the
    /// matrix's strides is 1.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn fill_avx512(&self, target: &mut [u32]) {
        use std::arch::x86_64::*;
        let m = &self.matrix;
        let base = m.data.as_ptr();
        let mask = |count: usize| -> __mmask16 {
            if count >= 16 {
                0xffff
            } else {
                (1u16 << count) - 1
            }
        };
        if m.row_stride == 1 {
            // Pair p of 16 rows: two 16-float loads (depths d, d + 1), each rounded to 16
            // bf16, widened to 32-bit words and merged (second value in the high half).
            for p in 0..self.pairs {
                let d = 2 * (self.first_pair + p);
                let mut r = 0;
                while r < self.rows {
                    let lanes = mask(self.rows - r);
                    let first = base.add(d * m.col_stride + self.first_row + r);
                    let x = _mm512_maskz_loadu_ps(lanes, first);
                    let y = if d + 1 < self.k {
                        _mm512_maskz_loadu_ps(lanes, first.add(m.col_stride))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let widen = |v: __m512| {
                        let bf16: __m256i =
                            std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                        _mm512_cvtepu16_epi32(bf16)
                    };
                    let (low, high) = (widen(x), widen(y));
                    let words = _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
                    _mm512_mask_storeu_epi32(
                        target.as_mut_ptr().add(p * self.width + r).cast(),
                        lanes,
                        words,
                    );
                    r += 16;
                }
            }
        } else {
            // Depth contiguous: 32 floats (16 pairs) of a row round to 32 bf16 in memory
            // order, i.e. 16 pair words, spread over the panel with stride `width`.
            let first_depth = 2 * self.first_pair;
            let depth_here = (2 * self.pairs).min(self.k - first_depth);
            let mut words = [0u32; 16];
            for r in 0..self.rows {
                let row = base.add((self.first_row + r) * m.row_stride + first_depth);
                let mut p = 0;
                while p < self.pairs {
                    let done = 2 * p;
                    let low = _mm512_maskz_loadu_ps(mask(depth_here - done), row.add(done));
                    let high = if depth_here > done + 16 {
                        _mm512_maskz_loadu_ps(mask(depth_here - done - 16), row.add(done + 16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                    _mm512_storeu_si512(words.as_mut_ptr().cast(), packed);
                    for (q, &word) in words.iter().enumerate().take(self.pairs - p) {
                        *target.get_unchecked_mut((p + q) * self.width + r) = word;
                    }
                    p += 16;
                }
            }
        }
    }
}

/// Packs `rows × k` of `matrix` (element `(row, depth)`) into `[block][panel][pair][width]`
/// words in `out` (resized), `width` rows per panel; panels are packed in parallel when
/// `threads > 1`. Shared by both operands: the right-hand one is packed as its transpose.
fn pack(
    matrix: MatrixRef,
    rows: usize,
    k: usize,
    width: usize,
    threads: usize,
    out: &mut Vec<u32>,
) {
    let pairs = k.div_ceil(2);
    let panels = rows.div_ceil(width);
    let blocks = pairs.div_ceil(KCP);
    out.clear();
    out.resize(panels * width * pairs, 0);
    // One task per (block, panel): `[pairs_in_block][width]` words.
    let fast = bf16_supported();
    let fill = |block: usize, panel: usize, target: &mut [u32]| {
        let (_, block_pairs) = block_span(block, pairs, panels, width);
        let panel = Panel {
            matrix,
            k,
            first_pair: block * KCP,
            pairs: block_pairs,
            first_row: panel * width,
            rows: width.min(rows - panel * width),
            width,
        };
        #[cfg(target_arch = "x86_64")]
        if fast && (matrix.row_stride == 1 || matrix.col_stride == 1) {
            // SAFETY: the instructions were detected; the panel lies inside the checked matrix.
            return unsafe { panel.fill_avx512(target) };
        }
        let _ = fast;
        panel.fill(target);
    };
    let mut tasks: Vec<(usize, usize, &mut [u32])> = Vec::with_capacity(blocks * panels);
    let mut rest = out.as_mut_slice();
    for block in 0..blocks {
        let (_, block_pairs) = block_span(block, pairs, panels, width);
        for panel in 0..panels {
            let (head, tail) = rest.split_at_mut(block_pairs * width);
            tasks.push((block, panel, head));
            rest = tail;
        }
    }
    if threads > 1 && tasks.len() > 1 {
        tasks.into_par_iter().for_each(|(block, panel, target)| fill(block, panel, target));
    } else {
        tasks.into_iter().for_each(|(block, panel, target)| fill(block, panel, target));
    }
}

impl PackedLhs {
    /// Packs `lhs` (`m × k`).
    ///
    /// # Panics
    /// When `lhs` does not hold an `m × k` matrix (a caller bug).
    pub fn new(lhs: MatrixRef, m: usize, k: usize, threads: usize) -> Self {
        lhs.check(m, k, "bf16 lhs");
        let mut data = Vec::new();
        pack(lhs, m, k, MR, threads, &mut data);
        PackedLhs { m, k, data }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Depth.
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.data.len() * 4
    }
}

impl PackedRhs {
    /// Packs `rhs` (`k × n`).
    ///
    /// # Panics
    /// When `rhs` does not hold a `k × n` matrix (a caller bug).
    pub fn new(rhs: MatrixRef, k: usize, n: usize, threads: usize) -> Self {
        rhs.check(k, n, "bf16 rhs");
        let mut data = Vec::new();
        pack(transposed(rhs), n, k, NR, threads, &mut data);
        PackedRhs { k, n, data }
    }

    /// Columns.
    pub fn columns(&self) -> usize {
        self.n
    }

    /// Depth.
    pub fn depth(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.data.len() * 4
    }
}

fn transposed(matrix: MatrixRef) -> MatrixRef {
    MatrixRef { data: matrix.data, row_stride: matrix.col_stride, col_stride: matrix.row_stride }
}

/// A left operand: packed already (a cached weight) or to be packed for this call.
#[derive(Debug, Clone, Copy)]
pub enum Lhs<'a> {
    Strided(MatrixRef<'a>),
    Packed(&'a PackedLhs),
}

/// A right operand: packed already or to be packed for this call.
#[derive(Debug, Clone, Copy)]
pub enum Rhs<'a> {
    Strided(MatrixRef<'a>),
    Packed(&'a PackedRhs),
}

thread_local! {
    /// Per-call packing buffers (left, right), reused: see the im2col scratch in lib.rs.
    static PACK_SCRATCH: RefCell<(Vec<u32>, Vec<u32>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A destination pointer shared by tasks that write disjoint tiles.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: tasks write disjoint output tiles (see `matmul`).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// `dst (m × n, rows dst_row_stride apart, contiguous columns) = [dst +] lhs · rhs` with
/// bf16 operands and f32 accumulation. Tasks of [`MC`] × [`NC`] outputs run on rayon's
/// pool when `threads > 1`.
///
/// # Panics
/// When the shapes do not match the operands or `dst`, or the CPU lacks AVX512-BF16 (a
/// caller bug: check [`bf16_supported`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: Lhs,
    rhs: Rhs,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: usize,
) {
    assert!(bf16_supported(), "bf16 matmul on a CPU without AVX512-BF16: this is a bug");
    if m == 0 || n == 0 {
        return;
    }
    MatrixRef { data: dst, row_stride: dst_row_stride, col_stride: 1 }.check(m, n, "bf16 dst");
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride.max(1)).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    PACK_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let (lhs_scratch, rhs_scratch) = &mut *scratch;
        let lhs_words: &[u32] = match lhs {
            Lhs::Packed(packed) => {
                assert_eq!((packed.m, packed.k), (m, k), "bf16 packed lhs shape");
                &packed.data
            }
            Lhs::Strided(matrix) => {
                matrix.check(m, k, "bf16 lhs");
                pack(matrix, m, k, MR, threads, lhs_scratch);
                lhs_scratch
            }
        };
        let rhs_words: &[u32] = match rhs {
            Rhs::Packed(packed) => {
                assert_eq!((packed.k, packed.n), (k, n), "bf16 packed rhs shape");
                &packed.data
            }
            Rhs::Strided(matrix) => {
                matrix.check(k, n, "bf16 rhs");
                pack(transposed(matrix), n, k, NR, threads, rhs_scratch);
                rhs_scratch
            }
        };
        let dst_ptr = Dst(dst.as_mut_ptr());
        let job = Job { lhs: lhs_words, rhs: rhs_words, m, n, k, dst_row_stride, accumulate };
        let (row_blocks, column_blocks) = (m.div_ceil(MC), n.div_ceil(NC));
        let tasks = row_blocks * column_blocks;
        let run = |task: usize| {
            let (row_block, column_block) = (task % row_blocks, task / row_blocks);
            // SAFETY: AVX512-BF16 was checked above; the task's tile lies inside `dst`
            // (checked above) and no other task writes it.
            unsafe { job.run_tile(row_block * MC, column_block * NC, dst_ptr) }
        };
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    });
}

/// One product's packed operands and destination geometry.
struct Job<'a> {
    lhs: &'a [u32],
    rhs: &'a [u32],
    m: usize,
    n: usize,
    k: usize,
    dst_row_stride: usize,
    accumulate: bool,
}

impl Job<'_> {
    /// Rows `row0 .. row0 + MC` × columns `col0 .. col0 + NC` of the output (clipped).
    ///
    /// # Safety
    /// AVX512-BF16 present; `dst` points to the whole checked destination.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn run_tile(&self, row0: usize, col0: usize, dst: Dst) {
        let pairs = self.k.div_ceil(2);
        let (row_panels, column_panels) = (self.m.div_ceil(MR), self.n.div_ceil(NR));
        let rows_end = (row0 + MC).min(self.m);
        let cols_end = (col0 + NC).min(self.n);
        for block in 0..pairs.div_ceil(KCP) {
            let (lhs_start, block_pairs) = block_span(block, pairs, row_panels, MR);
            let (rhs_start, _) = block_span(block, pairs, column_panels, NR);
            let load = self.accumulate || block > 0;
            let mut col = col0;
            while col < cols_end {
                let rhs_panel =
                    &self.rhs[rhs_start + (col / NR) * block_pairs * NR..][..block_pairs * NR];
                let mut row = row0;
                while row < rows_end {
                    let lhs_panel =
                        &self.lhs[lhs_start + (row / MR) * block_pairs * MR..][..block_pairs * MR];
                    let tile = Tile {
                        dst: dst.0.add(row * self.dst_row_stride + col),
                        row_stride: self.dst_row_stride,
                        rows: MR.min(self.m - row),
                        cols: NR.min(self.n - col),
                        load,
                    };
                    micro_kernel(block_pairs, lhs_panel.as_ptr(), rhs_panel.as_ptr(), &tile);
                    row += MR;
                }
                col += NR;
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn run_tile(&self, _row0: usize, _col0: usize, _dst: Dst) {
        unreachable!("bf16_supported() is false off x86-64")
    }
}

/// Where a register tile goes: `rows × cols` (at most MR × NR) floats from `dst`.
struct Tile {
    dst: *mut f32,
    row_stride: usize,
    rows: usize,
    cols: usize,
    /// Add to what `dst` holds (a bias, a residual, an earlier depth block's sums).
    load: bool,
}

/// The MR × NR register tile over `pairs` depth pairs: per pair, two 16-lane vectors of
/// right-hand pairs and MR broadcast left-hand pairs feed 24 `vdpbf16ps`.
///
/// # Safety
/// AVX512-BF16 present; `lhs` holds `pairs · MR` words, `rhs` `pairs · NR`; the tile lies
/// inside the destination.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn micro_kernel(pairs: usize, lhs: *const u32, rhs: *const u32, tile: &Tile) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(rhs.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(rhs.add(p * NR + 16).cast()));
        let a = lhs.add(p * MR);
        for (r, row) in acc.iter_mut().enumerate() {
            let a_r: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], a_r, b0);
            row[1] = _mm512_dpbf16_ps(row[1], a_r, b1);
        }
    }
    let low_mask: __mmask16 = if tile.cols >= 16 { 0xffff } else { (1u16 << tile.cols) - 1 };
    let high_mask: __mmask16 = match tile.cols {
        c if c >= NR => 0xffff,
        c if c > 16 => (1u16 << (c - 16)) - 1,
        _ => 0,
    };
    for (r, row) in acc.iter().enumerate().take(tile.rows) {
        let out = tile.dst.add(r * tile.row_stride);
        if tile.cols == NR {
            let (mut low, mut high) = (row[0], row[1]);
            if tile.load {
                low = _mm512_add_ps(low, _mm512_loadu_ps(out));
                high = _mm512_add_ps(high, _mm512_loadu_ps(out.add(16)));
            }
            _mm512_storeu_ps(out, low);
            _mm512_storeu_ps(out.add(16), high);
        } else {
            let (mut low, mut high) = (row[0], row[1]);
            if tile.load {
                low = _mm512_add_ps(low, _mm512_maskz_loadu_ps(low_mask, out));
                high = _mm512_add_ps(high, _mm512_maskz_loadu_ps(high_mask, out.add(16)));
            }
            _mm512_mask_storeu_ps(out, low_mask, low);
            _mm512_mask_storeu_ps(out.add(16), high_mask, high);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        assert_eq!(to_bf16_bits(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: even is 1 + 2⁻⁶.
        assert_eq!(from_bf16_bits(to_bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert_eq!(from_bf16_bits(to_bf16_bits(1.0 + 1.5 / 256.0)), 1.0 + 2.0 / 256.0);
        assert_eq!(from_bf16_bits(to_bf16_bits(-2.5)), -2.5);
        assert!(from_bf16_bits(to_bf16_bits(f32::NAN)).is_nan());
        assert_eq!(from_bf16_bits(to_bf16_bits(f32::INFINITY)), f32::INFINITY);
        // Relative rounding error at most 2⁻⁸ (half a unit in the 8th significant bit).
        for &x in &pseudo_random(10_000, 1) {
            let x = x * 1e3;
            let rounded = from_bf16_bits(to_bf16_bits(x));
            assert!(((rounded - x) / x).abs() <= 1.0 / 256.0, "{x} -> {rounded}");
        }
    }

    /// `lhs · rhs` in f64 over strided operands.
    fn reference(lhs: MatrixRef, rhs: MatrixRef, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|d| {
                        lhs.data[i * lhs.row_stride + d * lhs.col_stride] as f64
                            * rhs.data[d * rhs.row_stride + j * rhs.col_stride] as f64
                    })
                    .sum();
            }
        }
        out
    }

    /// Against an f64 reference on shapes with ragged edges in every dimension, several
    /// depth blocks, both operand layouts, packed and strided operands, accumulation and
    /// threads. Tolerance: each operand is rounded by at most 2⁻⁸ relative, so an output is
    /// off by about 2⁻⁸ · √k · (rms term) for random signs; the test asserts max |Δ| ≤
    /// 4 · 2⁻⁸ · √k · max|a|·max|b| (a 4σ-style bound; measured errors are far below it).
    #[test]
    fn matches_an_f64_reference_within_the_bf16_bound() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (case, &(m, n, k)) in
            [(1, 1, 1), (5, 7, 3), (13, 33, 17), (37, 70, 385), (100, 530, 800), (12, 32, 768)]
                .iter()
                .enumerate()
        {
            let a = pseudo_random(m * k, 40 + case as u64);
            let b = pseudo_random(k * n, 50 + case as u64);
            let init = pseudo_random(m * n, 60 + case as u64);
            let bound = 4.0 / 256.0 * (k as f64).sqrt();
            for transpose in [false, true] {
                let lhs = if transpose {
                    MatrixRef { data: &a, row_stride: 1, col_stride: m }
                } else {
                    MatrixRef { data: &a, row_stride: k, col_stride: 1 }
                };
                let rhs = if transpose {
                    MatrixRef { data: &b, row_stride: 1, col_stride: k }
                } else {
                    MatrixRef { data: &b, row_stride: n, col_stride: 1 }
                };
                let want = reference(lhs, rhs, (m, n, k));
                let packed_lhs = PackedLhs::new(lhs, m, k, 2);
                let packed_rhs = PackedRhs::new(rhs, k, n, 1);
                for (threads, packed) in [(1, false), (2, false), (2, true)] {
                    let (l, r) = if packed {
                        (Lhs::Packed(&packed_lhs), Rhs::Packed(&packed_rhs))
                    } else {
                        (Lhs::Strided(lhs), Rhs::Strided(rhs))
                    };
                    let mut got = vec![f32::NAN; m * n];
                    matmul(&mut got, n, l, r, (m, n, k), false, threads);
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(&g, &w)| (g as f64 - w).abs())
                        .fold(0.0, f64::max);
                    assert!(worst <= bound, "{m}x{n}x{k} t{transpose}: {worst} > {bound}");
                    let mut sum = init.clone();
                    matmul(&mut sum, n, l, r, (m, n, k), true, threads);
                    for ((&s, &i), &g) in sum.iter().zip(&init).zip(&got) {
                        assert!((s - (i + g)).abs() <= 1e-5 * (1.0 + s.abs()));
                    }
                }
            }
        }
    }

    /// A destination wider than the product (row stride > n) keeps the columns outside.
    #[test]
    fn writes_only_the_destination_window() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (m, n, k, stride) = (14, 20, 40, 50);
        let a = pseudo_random(m * k, 1);
        let b = pseudo_random(k * n, 2);
        let mut dst = vec![7f32; m * stride];
        let lhs = MatrixRef { data: &a, row_stride: k, col_stride: 1 };
        let rhs = MatrixRef { data: &b, row_stride: n, col_stride: 1 };
        matmul(&mut dst, stride, Lhs::Strided(lhs), Rhs::Strided(rhs), (m, n, k), false, 1);
        for row in dst.chunks(stride) {
            assert!(row[n..].iter().all(|&v| v == 7.0));
        }
    }
}
