//! f32 matrix products on AVX-512 for row-major outputs: an own register-blocked
//! microkernel (6 rows × 64 columns in 24 zmm accumulators; per depth step four vectors of
//! the right matrix and six broadcasts of the left one) instead of the `gemm` crate, whose
//! stable-Rust build uses 256-bit AVX2 kernels. Measured on Zen 4, one thread (the UNet's
//! 64²-level linear layers, 4096 rows): 320→2560 79-83 → 97-102 GFLOP/s, 1280→320 80 →
//! 106-111, 320→320 74 → 103.
//!
//! The right matrix is packed per call into slabs of 64 columns (`[depth][64]`, zero
//! padded past the last column), so any strides work, the transposed weights of linear
//! layers included; the left matrix is read in place through its strides (one broadcast
//! per element). The depth is cut into blocks of [`DEPTH_BLOCK`] whose boundaries depend
//! on the depth alone, and every output element is summed in depth order by one
//! microkernel call per block, so results do not depend on the number of rows, the
//! threads or how the work is split: a batch item's rounding is the same alone or batched.

use crate::dense::MatrixRef;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Columns per packed slab: four 16-lane vectors.
const SLAB: usize = 64;
/// Rows per microkernel call.
const ROWS: usize = 6;
/// Depth per pass over the output: a slab block (512 × 64 floats, 128 KiB) stays in L2.
const DEPTH_BLOCK: usize = 512;
/// Rows per task (a multiple of [`ROWS`]) and slabs per task.
const TASK_ROWS: usize = 48;
const TASK_SLABS: usize = 4;

/// Whether this CPU runs the kernels of this module (and the AVX-512 attention's):
/// AVX-512F detected, unless `SDSERVE_AVX512=0` asks for the portable paths (the `gemm`
/// crate's AVX2 kernels), for A/B timing.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::env::var("SDSERVE_AVX512").map_or(true, |v| v != "0")
    })
}

thread_local! {
    /// Per-thread packed right matrix, reused across calls.
    static PACKED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dst (m × n, row stride dst_row_stride, columns contiguous) (+)= lhs · rhs` (the caller
/// checked the extents and that the CPU has AVX-512F).
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: MatrixRef,
    rhs: MatrixRef,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: usize,
) {
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_row_stride).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let slabs = n.div_ceil(SLAB);
    PACKED.with(|packed| {
        let packed = &mut *packed.borrow_mut();
        packed.resize(slabs * k * SLAB, 0.0);
        pack_rhs(packed, &rhs, n, k, threads);
        let row_blocks = m.div_ceil(TASK_ROWS);
        let slab_groups = slabs.div_ceil(TASK_SLABS);
        let tasks = row_blocks * slab_groups;
        // Tasks write disjoint (row block × column group) windows of `dst`.
        let dst_address = dst.as_mut_ptr() as usize;
        let packed = &packed[..];
        let run = |task: usize| {
            let (block, group) = (task / slab_groups, task % slab_groups);
            let rows = block * TASK_ROWS..(block * TASK_ROWS + TASK_ROWS).min(m);
            let slab_range = group * TASK_SLABS..(group * TASK_SLABS + TASK_SLABS).min(slabs);
            for depth0 in (0..k).step_by(DEPTH_BLOCK) {
                let depth = DEPTH_BLOCK.min(k - depth0);
                let load = accumulate || depth0 > 0;
                for slab in slab_range.clone() {
                    let columns = SLAB.min(n - slab * SLAB);
                    let slab_data = &packed[(slab * k + depth0) * SLAB..][..depth * SLAB];
                    let mut row = rows.start;
                    while row < rows.end {
                        let count = ROWS.min(rows.end - row);
                        let a = &lhs.data[row * lhs.row_stride + depth0 * lhs.col_stride..];
                        let strides = (lhs.row_stride, lhs.col_stride, dst_row_stride);
                        // SAFETY: AVX-512F was checked by the caller; rows row..row+count of
                        // lhs hold depth0..depth0+depth (checked extents), the slab holds
                        // depth × 64 floats, and dst rows row..row+count hold columns
                        // slab·64..slab·64+columns; this task alone writes them.
                        unsafe {
                            let c =
                                (dst_address as *mut f32).add(row * dst_row_stride + slab * SLAB);
                            let b = slab_data.as_ptr();
                            match count {
                                6 => tile::<6>(a, b, c, depth, strides, columns, load),
                                5 => tile::<5>(a, b, c, depth, strides, columns, load),
                                4 => tile::<4>(a, b, c, depth, strides, columns, load),
                                3 => tile::<3>(a, b, c, depth, strides, columns, load),
                                2 => tile::<2>(a, b, c, depth, strides, columns, load),
                                _ => tile::<1>(a, b, c, depth, strides, columns, load),
                            }
                        }
                        row += count;
                    }
                }
            }
        };
        if threads > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    });
}

/// `rhs` (`k × n`) into slabs `[slab][k][64]`, zeros past column `n`.
fn pack_rhs(packed: &mut [f32], rhs: &MatrixRef, n: usize, k: usize, threads: usize) {
    let pack_slab = |(slab, out): (usize, &mut [f32])| {
        let column0 = slab * SLAB;
        let columns = SLAB.min(n - column0);
        if rhs.col_stride == 1 {
            for (d, out_row) in out.chunks_exact_mut(SLAB).enumerate() {
                let start = d * rhs.row_stride + column0;
                out_row[..columns].copy_from_slice(&rhs.data[start..start + columns]);
                out_row[columns..].fill(0.0);
            }
        } else {
            if columns < SLAB {
                out.fill(0.0);
            }
            // Column by column: each is contiguous in memory when rows are (a transposed
            // weight), and the writes stay inside this slab.
            for j in 0..columns {
                let column = (column0 + j) * rhs.col_stride;
                for d in 0..k {
                    out[d * SLAB + j] = rhs.data[column + d * rhs.row_stride];
                }
            }
        }
    };
    if threads > 1 {
        packed.par_chunks_mut(k * SLAB).enumerate().for_each(pack_slab);
    } else {
        packed.chunks_mut(k * SLAB).enumerate().for_each(pack_slab);
    }
}

/// `R` output rows × one slab (`columns` ≤ 64 valid) over `depth` steps: starts from the
/// output (`load`) or zero, adds `a · b`, stores. `a` is read through `(row stride, column
/// stride)`, `c` has row stride `strides.2`.
///
/// # Safety
/// The CPU has AVX-512F and the pointers cover the extents above.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize>(
    a: &[f32],
    b: *const f32,
    c: *mut f32,
    depth: usize,
    (a_row_stride, a_col_stride, c_row_stride): (usize, usize, usize),
    columns: usize,
    load: bool,
) {
    let masks: [__mmask16; 4] = std::array::from_fn(|v| {
        let valid = columns.saturating_sub(v * 16).min(16);
        ((1u32 << valid) - 1) as __mmask16
    });
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    if load {
        for (r, row_acc) in acc.iter_mut().enumerate() {
            for (v, x) in row_acc.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(masks[v], c.add(r * c_row_stride + v * 16));
            }
        }
    }
    let a = a.as_ptr();
    for d in 0..depth {
        let bp = b.add(d * SLAB);
        let bv = [
            _mm512_loadu_ps(bp),
            _mm512_loadu_ps(bp.add(16)),
            _mm512_loadu_ps(bp.add(32)),
            _mm512_loadu_ps(bp.add(48)),
        ];
        let column = d * a_col_stride;
        for (r, row_acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * a_row_stride + column));
            for (x, &bb) in row_acc.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(av, bb, *x);
            }
        }
    }
    for (r, row_acc) in acc.iter().enumerate() {
        for (v, &x) in row_acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(r * c_row_stride + v * 16), masks[v], x);
        }
    }
}
