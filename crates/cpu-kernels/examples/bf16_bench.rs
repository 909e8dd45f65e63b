//! Times the CPU matrix products at SD shapes in f32 (the `gemm` crate) and in bf16 (own
//! `vdpbf16ps` kernel: operands packed per call, and with the constant operand packed once),
//! in GFLOP/s of wall time (median of REPEATS, default 7), and reports bf16's max |Δ|
//! against f32 relative to the output's largest magnitude.
//! `cargo run -p sdserve-cpu-kernels --example bf16_bench` (THREADS, default 2).

use sdserve_cpu_kernels::bf16::{self, Lhs, PackedLhs, PackedRhs, Rhs};
use sdserve_cpu_kernels::winograd::{conv2d_3x3, WinogradVariant, WinogradWeight};
use sdserve_cpu_kernels::{
    conv2d_with_packed, matmul, set_matmul_precision, Conv2dGeometry, MatmulPrecision, MatrixRef,
};
use std::time::Instant;

fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn median_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    run();
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// 3×3 stride-1 convolutions at SD shapes: wall seconds (median) of im2col and Winograd
/// F(2×2)/F(4×4) in f32 and bf16 mode, and each one's max |Δ| / rms against f32 im2col.
fn convolutions(threads: usize, repeats: usize) {
    println!("3x3 convolutions: median wall ms (max |Δ| / rms vs f32 im2col)");
    for (name, batch, channels, side) in [
        ("UNet 320@32² b2", 2, 320, 32),
        ("UNet 640@16² b2", 2, 640, 16),
        ("UNet 1280@8² b2", 2, 1280, 8),
        ("VAE 512@32²", 1, 512, 32),
        ("VAE 256@128²", 1, 256, 128),
        ("VAE 128@256²", 1, 128, 256),
    ] {
        let g = Conv2dGeometry {
            batch,
            in_channels: channels,
            height: side,
            width: side,
            out_channels: channels,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        let depth = channels * 9;
        let input = pseudo_random(batch * channels * side * side, 3);
        let weight: Vec<f32> =
            pseudo_random(channels * depth, 4).iter().map(|v| v / (depth as f32).sqrt()).collect();
        let matrix = MatrixRef { data: &weight, row_stride: depth, col_stride: 1 };
        let packed = PackedLhs::new(matrix, channels, depth, threads);
        let f4 = WinogradWeight::new(&weight, channels, channels, WinogradVariant::F4x4);
        let f2 = WinogradWeight::new(&weight, channels, channels, WinogradVariant::F2x2);
        let mut line = format!("{name:<18}");
        let mut reference: Option<Vec<f32>> = None;
        for (label, precision) in [("f32", MatmulPrecision::F32), ("bf16", MatmulPrecision::Bf16)] {
            set_matmul_precision(precision);
            for (kind, run) in [
                (
                    "im2col",
                    &(|| conv2d_with_packed(&input, &weight, Some(&packed), None, &g, threads))
                        as &dyn Fn() -> Vec<f32>,
                ),
                ("F2", &|| conv2d_3x3(&input, &f2, None, batch, side, side, threads)),
                ("F4", &|| conv2d_3x3(&input, &f4, None, batch, side, side, threads)),
            ] {
                let mut out = Vec::new();
                let seconds = median_seconds(repeats, || out = run());
                let reference = reference.get_or_insert_with(|| out.clone());
                let rms = (reference.iter().map(|v| v * v).sum::<f32>() / out.len() as f32).sqrt();
                let worst =
                    out.iter().zip(reference.iter()).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                line += &format!("  {kind} {label} {:6.1} ({:.1e})", seconds * 1e3, worst / rms);
            }
        }
        println!("{line}");
    }
}

fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let (threads, repeats) = (env("THREADS", 2), env("REPEATS", 7));
    assert!(bf16::bf16_supported(), "this CPU has no AVX512-BF16");
    if std::env::args().any(|a| a == "conv") {
        return convolutions(threads, repeats);
    }
    // (name, m, n, k, lhs is the weight?) — dst m × n = lhs m × k · rhs k × n.
    let cases = [
        ("im2col conv 320@32², k=2880", 320, 1024, 2880, true),
        ("im2col conv 1280@16² (s2 down), k=5760", 1280, 64, 5760, true),
        ("winograd position 320ch, 256 tiles", 320, 256, 320, true),
        ("winograd position 1280ch, 16 tiles", 1280, 16, 1280, true),
        ("winograd position 512ch (VAE), 256 tiles", 512, 256, 512, true),
        ("linear 1024 tok 320->1280 (ff)", 1024, 2560, 320, false),
        ("linear 256 tok 1280->1280", 256, 1280, 1280, false),
        ("linear 64 tok 1280->10240 (ff)", 64, 10240, 1280, false),
        ("attention QK^T 48x4096 d40", 48, 4096, 40, false),
        ("attention PV 48 rows, 4096 keys, d40", 48, 40, 4096, false),
    ];
    println!("threads {threads}, median of {repeats}; GFLOP/s (wall)");
    println!(
        "{:<42} {:>8} {:>10} {:>12} {:>12}",
        "product", "f32", "bf16", "bf16 packed", "rel max|Δ|"
    );
    for (name, m, n, k, weight_is_lhs) in cases {
        let a = pseudo_random(m * k, 1);
        let b = pseudo_random(k * n, 2);
        let lhs = MatrixRef { data: &a, row_stride: k, col_stride: 1 };
        // A linear layer's weight is read transposed, as `dense::linear` does.
        let rhs = if weight_is_lhs {
            MatrixRef { data: &b, row_stride: n, col_stride: 1 }
        } else {
            MatrixRef { data: &b, row_stride: 1, col_stride: k }
        };
        let mut dst = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        set_matmul_precision(MatmulPrecision::F32);
        let f32_s =
            median_seconds(repeats, || matmul(&mut dst, n, 1, lhs, rhs, (m, n, k), false, threads));
        let reference = dst.clone();
        set_matmul_precision(MatmulPrecision::Bf16);
        let bf16_s =
            median_seconds(repeats, || matmul(&mut dst, n, 1, lhs, rhs, (m, n, k), false, threads));
        let (packed_lhs, packed_rhs) =
            (PackedLhs::new(lhs, m, k, threads), PackedRhs::new(rhs, k, n, threads));
        let (l, r) = if weight_is_lhs {
            (Lhs::Packed(&packed_lhs), Rhs::Strided(rhs))
        } else {
            (Lhs::Strided(lhs), Rhs::Packed(&packed_rhs))
        };
        let packed_s =
            median_seconds(repeats, || bf16::matmul(&mut dst, n, l, r, (m, n, k), false, threads));
        let pack_lhs_s = median_seconds(repeats, || drop(PackedLhs::new(lhs, m, k, threads)));
        let pack_rhs_s = median_seconds(repeats, || drop(PackedRhs::new(rhs, k, n, threads)));
        let scale = reference.iter().fold(0f32, |acc, v| acc.max(v.abs()));
        let worst = dst.iter().zip(&reference).fold(0f32, |acc, (x, y)| acc.max((x - y).abs()));
        println!(
            "{name:<42} {:>8.1} {:>10.1} {:>12.1} {:>12.2e}   pack lhs {:.1} ms rhs {:.1} ms",
            flop / f32_s / 1e9,
            flop / bf16_s / 1e9,
            flop / packed_s / 1e9,
            worst / scale,
            pack_lhs_s * 1e3,
            pack_rhs_s * 1e3
        );
    }
}
