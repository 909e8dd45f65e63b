//! Times 3×3 stride-1 convolutions at SD UNet/VAE shapes, im2col+gemm against Winograd
//! F(2×2,3×3) and F(4×4,3×3), in process CPU seconds (robust on a shared machine), and
//! measures Winograd's max |Δ| against im2col and against an f64 reference on realistic
//! data (N(0,1) activations, N(0, 1/(9·C_in)) weights).
//! `cargo run -p sdserve-cpu-kernels --example winograd_bench [FILTER]`
//! (THREADS, default 2, and REPEATS, default 5).

use sdserve_cpu_kernels::winograd::{conv2d_3x3, WinogradVariant, WinogradWeight};
use sdserve_cpu_kernels::{conv2d, Conv2dGeometry};

/// utime + stime of this process, in seconds (clock ticks of 10 ms).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Mean CPU seconds of `repeats` runs after one warm-up (a mean over the whole batch of runs,
/// since the clock ticks in 10 ms), and the last result.
fn measure(repeats: usize, mut run: impl FnMut() -> Vec<f32>) -> (f64, Vec<f32>) {
    let mut result = run();
    let c0 = process_cpu_seconds();
    for _ in 0..repeats {
        result = run();
    }
    ((process_cpu_seconds() - c0) / repeats as f64, result)
}

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

/// f64 convolution of the first `channels` output channels of image 0.
fn reference(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    g: &Conv2dGeometry,
    channels: usize,
) -> Vec<f64> {
    let (h, w, c_in) = (g.height, g.width, g.in_channels);
    let mut out = vec![0f64; channels * h * w];
    for o in 0..channels {
        for y in 0..h {
            for x in 0..w {
                let mut acc = bias[o] as f64;
                for c in 0..c_in {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) =
                                (y as isize + ky as isize - 1, x as isize + kx as isize - 1);
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            acc += input[(c * h + iy as usize) * w + ix as usize] as f64
                                * weight[((o * c_in + c) * 3 + ky) * 3 + kx] as f64;
                        }
                    }
                }
                out[(o * h + y) * w + x] = acc;
            }
        }
    }
    out
}

fn main() {
    let threads: usize = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let repeats: usize = std::env::var("REPEATS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("rayon pool");
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("threads {threads}, mean of {repeats}; GF/s = direct-conv GFLOP per CPU second");
    let shapes = [
        ("unet b2 320@64", 2, 320, 64),
        ("unet b2 640@32", 2, 640, 32),
        ("unet b2 1280@16", 2, 1280, 16),
        ("unet b2 1280@8", 2, 1280, 8),
        ("vae 512@64", 1, 512, 64),
        ("vae 512@128", 1, 512, 128),
        ("vae 256@256", 1, 256, 256),
        ("vae 128@512", 1, 128, 512),
        ("small 16@64", 1, 16, 64),
        ("small 32@64", 1, 32, 64),
        ("tiny b2 1280@4", 2, 1280, 4),
        ("tiny 640@4", 1, 640, 4),
        ("small 64@64", 1, 64, 64),
    ];
    for (name, batch, channels, side) in shapes {
        if !name.contains(&filter) {
            continue;
        }
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
        let input = normal(batch * channels * side * side, 1.0, 1);
        let weight = normal(channels * channels * 9, (1.0 / (9.0 * channels as f32)).sqrt(), 2);
        let bias = normal(channels, 0.1, 3);
        let gflop = 2.0 * (batch * channels * channels * 9 * side * side) as f64 / 1e9;
        let (im2col_cpu, im2col) =
            measure(repeats, || conv2d(&input, &weight, Some(&bias), &g, threads));
        let checked = 2.min(channels);
        let exact = reference(&input, &weight, &bias, &g, checked);
        let error = |out: &[f32]| {
            out[..exact.len()]
                .iter()
                .zip(&exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0f64, f64::max)
        };
        let magnitude = exact.iter().map(|v| v.abs()).fold(0f64, f64::max);
        print!(
            "{name:<16} {gflop:6.2} GFLOP | im2col {im2col_cpu:6.3}s {:5.1} GF/s err {:.1e}",
            gflop / im2col_cpu,
            error(&im2col)
        );
        for variant in [WinogradVariant::F2x2, WinogradVariant::F4x4] {
            let c0 = process_cpu_seconds();
            let transformed = WinogradWeight::new(&weight, channels, channels, variant);
            let transform_cpu = process_cpu_seconds() - c0;
            let (cpu, out) = measure(repeats, || {
                conv2d_3x3(&input, &transformed, Some(&bias), batch, side, side, threads)
            });
            let to_im2col =
                out.iter().zip(&im2col).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            print!(
                " | {variant:?} {cpu:6.3}s {:5.1} GF/s x{:4.2} Δim2col {to_im2col:.1e} err {:.1e} (w {transform_cpu:.2}s)",
                gflop / cpu,
                im2col_cpu / cpu,
                error(&out)
            );
        }
        println!(" | max|out| {magnitude:.2}");
    }
}
