//! The kernels in bf16 mode (`set_matmul_precision(Bf16)`: products with bf16 operands and
//! f32 accumulation) against f32 mode on SD-like data: im2col and Winograd convolutions,
//! linear layers with packed weights, attention. Its own test binary because the precision
//! is process-wide. Skipped, with a message, on CPUs without AVX512-BF16.
//!
//! Tolerance: an operand rounded to bf16 is off by at most 2⁻⁸ relative (about 0.4 · 2⁻⁸
//! rms), so each term a·b of a product is off by about 0.6 · 2⁻⁸ of itself and, for random
//! signs, an output that sums k comparable terms by σ ≈ 0.6 · 2⁻⁸ of its own rms. The
//! bounds are on max |Δ| / rms(output) over 10⁴-10⁵ outputs (≈ 4.5σ expected): 8 · 2⁻⁸ for
//! direct products, 16 · 2⁻⁸ for Winograd F(2×2) (its transforms grow the operands'
//! rounding) and attention (see there).
//! Measured values are printed (`--nocapture`).

use sdserve_cpu_kernels::bf16::{bf16_supported, PackedLhs, PackedRhs};
use sdserve_cpu_kernels::winograd::{conv2d_3x3, WinogradVariant, WinogradWeight};
use sdserve_cpu_kernels::{
    attention, conv2d, conv2d_with_packed, linear, linear_with_packed, set_matmul_precision,
    AttentionGeometry, Conv2dGeometry, MatmulPrecision, MatrixRef,
};

fn normal(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * std
        })
        .collect()
}

/// max |bf16 − f32| / rms(f32).
fn relative_error(bf16: &[f32], f32: &[f32]) -> f64 {
    assert_eq!(bf16.len(), f32.len());
    let rms = (f32.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / f32.len() as f64).sqrt();
    let worst =
        bf16.iter().zip(f32).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
    worst / rms
}

/// Runs `compute` in f32 mode and in bf16 mode; checks the bound and that they differ.
fn compare(what: &str, bound: f64, compute: impl Fn() -> Vec<f32>) {
    set_matmul_precision(MatmulPrecision::F32);
    let reference = compute();
    set_matmul_precision(MatmulPrecision::Bf16);
    let result = compute();
    set_matmul_precision(MatmulPrecision::F32);
    let error = relative_error(&result, &reference);
    println!("{what}: max |Δ| / rms = {error:.2e} (bound {bound:.2e})");
    assert!(error > 0.0, "{what}: bf16 mode gave f32's result");
    assert!(error <= bound, "{what}: {error:e} > {bound:e}");
}

#[test]
fn bf16_mode_stays_within_the_bf16_rounding_bound() {
    if set_matmul_precision(MatmulPrecision::Bf16) != MatmulPrecision::Bf16 {
        assert!(!bf16_supported());
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let direct = 8.0 / 256.0;
    for (batch, channels, side, kernel, stride) in
        [(1, 64, 40, 3, 1), (2, 48, 17, 3, 2), (1, 96, 20, 1, 1)]
    {
        let g = Conv2dGeometry {
            batch,
            in_channels: channels,
            height: side,
            width: side,
            out_channels: channels + 8,
            kernel_h: kernel,
            kernel_w: kernel,
            stride,
            padding: kernel / 2,
        };
        let depth = channels * kernel * kernel;
        let input = normal(batch * channels * side * side, 1.0, 1);
        let weight = normal(g.out_channels * depth, (1.0 / depth as f32).sqrt(), 2);
        let bias = normal(g.out_channels, 0.1, 3);
        let matrix = MatrixRef { data: &weight, row_stride: depth, col_stride: 1 };
        let packed = PackedLhs::new(matrix, g.out_channels, depth, 2);
        compare(&format!("im2col conv {g:?}"), direct, || {
            conv2d_with_packed(&input, &weight, Some(&packed), Some(&bias), &g, 2)
        });
        if kernel == 3 && stride == 1 {
            // F(2×2)'s products run in bf16; F(4×4)'s stay f32 (see `WinogradVariant`).
            let f2 = WinogradWeight::new(&weight, g.out_channels, channels, WinogradVariant::F2x2);
            compare(&format!("winograd F(2×2) {g:?}"), 2.0 * direct, || {
                conv2d_3x3(&input, &f2, Some(&bias), batch, side, side, 2)
            });
            let f4 = WinogradWeight::new(&weight, g.out_channels, channels, WinogradVariant::F4x4);
            set_matmul_precision(MatmulPrecision::F32);
            let f32_mode = conv2d_3x3(&input, &f4, Some(&bias), batch, side, side, 2);
            set_matmul_precision(MatmulPrecision::Bf16);
            let bf16_mode = conv2d_3x3(&input, &f4, Some(&bias), batch, side, side, 2);
            assert_eq!(f32_mode, bf16_mode, "F(4×4) products stay f32");
        }
    }
    // Per-call packing (no packed weight) of a product big enough for it: the same bound.
    let g = Conv2dGeometry {
        batch: 1,
        in_channels: 128,
        height: 16,
        width: 16,
        out_channels: 136,
        kernel_h: 1,
        kernel_w: 1,
        stride: 1,
        padding: 0,
    };
    let input = normal(128 * 256, 1.0, 10);
    let weight = normal(136 * 128, (1.0 / 128f32).sqrt(), 11);
    compare("1×1 conv, weight packed per call", direct, || conv2d(&input, &weight, None, &g, 2));
    let (batch, rows, inputs, outputs) = (2, 150, 320, 200);
    let x = normal(batch * rows * inputs, 1.0, 4);
    let w = normal(outputs * inputs, (1.0 / inputs as f32).sqrt(), 5);
    let bias = normal(outputs, 0.1, 6);
    let transposed = MatrixRef { data: &w, row_stride: 1, col_stride: inputs };
    let packed = PackedRhs::new(transposed, inputs, outputs, 1);
    compare("linear with packed weight", direct, || {
        linear_with_packed(&x, batch, rows, inputs, &w, Some(&packed), Some(&bias), None, 2)
    });
    compare("linear, weight packed per call", direct, || {
        linear(&x, batch, rows, inputs, &w, Some(&bias), None, 2)
    });
    for (query_tokens, key_tokens) in [(300, 300), (130, 77)] {
        let g = AttentionGeometry { batch: 2, heads: 3, query_tokens, key_tokens, head_dim: 40 };
        let q = normal(g.batch * query_tokens * 120, 1.0, 7);
        let k = normal(g.batch * key_tokens * 120, 1.0, 8);
        let v = normal(g.batch * key_tokens * 120, 1.0, 9);
        let scale = 1.0 / (40f32).sqrt();
        // Attention outputs are softmax-weighted means of the values, whose rms shrinks
        // with the softmax's spread while the values' rounding does not: twice the bound.
        compare(&format!("attention {g:?}"), 2.0 * direct, || attention(&q, &k, &v, &g, scale, 2));
    }
}
