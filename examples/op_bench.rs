//! Times single operators at Stable Diffusion 1.5 shapes, candle's op against sdserve's
//! kernel, in process CPU time (all threads; robust on a shared machine) and wall time.
//! `cargo run --example op_bench` (RAYON_NUM_THREADS sets the thread count).

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Conv2dConfig;
use sdserve::models::layers::{Conv2d, GroupNorm, Linear};
use std::time::Instant;

/// utime + stime of this process, in seconds (clock ticks of 10 ms).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Median (cpu, wall) seconds of `repeats` runs after one warm-up.
fn measure(repeats: usize, mut run: impl FnMut() -> Result<Tensor>) -> Result<(f64, f64)> {
    run()?;
    let mut cpu = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..repeats {
        let (c0, w0) = (process_cpu_seconds(), Instant::now());
        run()?;
        cpu.push(process_cpu_seconds() - c0);
        wall.push(w0.elapsed().as_secs_f64());
    }
    cpu.sort_by(f64::total_cmp);
    wall.sort_by(f64::total_cmp);
    Ok((cpu[repeats / 2], wall[repeats / 2]))
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    let repeats: usize = std::env::var("REPEATS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let filter = std::env::args().nth(1).unwrap_or_default();
    println!("threads {}", candle_core::utils::get_num_threads());
    let convs = [
        ("unet256 b2 320@32 3x3", (2, 320, 32, 32), 320, 3, 1, 1),
        ("unet256 b2 1280@8 3x3", (2, 1280, 8, 8), 1280, 3, 1, 1),
        ("unet256 b2 320@32 down s2", (2, 320, 32, 32), 320, 3, 2, 1),
        ("unet256 b2 640@16 1x1", (2, 640, 16, 16), 640, 1, 1, 0),
        ("vae256 512@64 3x3", (1, 512, 64, 64), 512, 3, 1, 1),
        ("vae256 256@256 3x3", (1, 256, 256, 256), 256, 3, 1, 1),
        ("vae256 128@256 3x3", (1, 128, 256, 256), 128, 3, 1, 1),
    ];
    for (name, shape, out, k, stride, padding) in convs {
        if !name.contains(&filter) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, shape, &device)?;
        let w = Tensor::randn(0f32, 0.05, (out, shape.1, k, k), &device)?;
        let b = Tensor::randn(0f32, 0.05, out, &device)?;
        let config = Conv2dConfig { padding, stride, ..Default::default() };
        let candle = candle_nn::Conv2d::new(w, Some(b), config);
        let ours = Conv2d::new(candle.clone());
        let oh = (shape.2 + 2 * padding - k) / stride + 1;
        let gflop = 2.0 * (shape.0 * out * oh * oh * shape.1 * k * k) as f64 / 1e9;
        let (cc, cw) = measure(repeats, || candle.forward(&x))?;
        let (oc, ow) = measure(repeats, || ours.forward(&x))?;
        println!(
            "conv {name:<28} {gflop:6.2} GFLOP  candle cpu {cc:7.3}s wall {cw:7.3}s ({:5.1} GF/s)  ours cpu {oc:7.3}s wall {ow:7.3}s ({:5.1} GF/s)",
            gflop / cw,
            gflop / ow
        );
    }
    for (name, shape, groups) in [
        ("gn+silu unet 320@32 b2", (2, 320, 32, 32), 32),
        ("gn+silu vae 256@256", (1, 256, 256, 256), 32),
    ] {
        if !name.contains(&filter) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, shape, &device)?;
        let weight = Tensor::randn(1f32, 0.1, shape.1, &device)?;
        let bias = Tensor::randn(0f32, 0.1, shape.1, &device)?;
        let candle =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), shape.1, groups, 1e-6)?;
        let vb = candle_nn::VarBuilder::from_tensors(
            [("weight".to_string(), weight), ("bias".to_string(), bias)].into_iter().collect(),
            candle_core::DType::F32,
            &device,
        );
        let ours: GroupNorm = sdserve::models::layers::group_norm(groups, shape.1, 1e-6, vb)?;
        let (cc, cw) = measure(repeats, || candle_nn::ops::silu(&candle.forward(&x)?))?;
        let (oc, ow) = measure(repeats, || ours.forward_silu(&x))?;
        println!(
            "{name:<33} candle cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s"
        );
    }
    // Attention at the SD 1.5 UNet's 64² level (512² images, batch 2 with guidance), its
    // cross-attention, and the VAE mid-block at 512²: split heads + two batched matmuls
    // around a softmax (candle's ops) against the blocked kernel on token-major input.
    for (name, batch, heads, tokens, key_tokens, head_dim) in [
        ("attn unet512 b2 self 4096x40x8", 2, 8, 4096, 4096, 40),
        ("attn unet512 b2 cross 4096/77", 2, 8, 4096, 77, 40),
        ("attn unet512 b2 self 1024x80x8", 2, 8, 1024, 1024, 80),
        ("attn vae512 4096x512x1", 1, 1, 4096, 4096, 512),
    ] {
        if !name.contains(&filter) {
            continue;
        }
        let width = heads * head_dim;
        let q = Tensor::randn(0f32, 1.0, (batch, tokens, width), &device)?;
        let k = Tensor::randn(0f32, 1.0, (batch, key_tokens, width), &device)?;
        let v = Tensor::randn(0f32, 1.0, (batch, key_tokens, width), &device)?;
        let gflop = 4.0 * (batch * heads * tokens * key_tokens * head_dim) as f64 / 1e9;
        let candle_path = || {
            use sdserve::models::common::{merge_heads, scaled_dot_product_attention, split_heads};
            let (qh, kh, vh) =
                (split_heads(&q, heads)?, split_heads(&k, heads)?, split_heads(&v, heads)?);
            merge_heads(&scaled_dot_product_attention(&qh, &kh, &vh, None, false)?)
        };
        let kernel_path = || {
            sdserve::models::layers::blocked_attention(&q, &k, &v, heads, &[])
                .map(|o| o.expect("f32 CPU input takes the kernel"))
        };
        // SKIP_CANDLE=1 times the kernel alone (for profiling it).
        let (cc, cw) = if std::env::var("SKIP_CANDLE").is_ok_and(|v| v == "1") {
            (f64::NAN, f64::NAN)
        } else {
            measure(repeats, candle_path)?
        };
        let (oc, ow) = measure(repeats, kernel_path)?;
        println!(
            "{name:<33} {gflop:6.2} GFLOP  candle cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s ({:5.1} GF per cpu-s)",
            gflop / oc
        );
    }
    // The transformer blocks' dense ops at the UNet's 32×32 level of a 256² batch of 2.
    let tokens = 1024;
    for (name, inputs, outputs) in
        [("linear ff-in 320->2560 b2", 320, 2560), ("linear ff-out 1280->320 b2", 1280, 320)]
    {
        if !name.contains(&filter) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (2, tokens, inputs), &device)?;
        let w = Tensor::randn(0f32, 0.05, (outputs, inputs), &device)?;
        let b = Tensor::randn(0f32, 0.05, outputs, &device)?;
        let candle = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let ours = Linear::new(w, Some(b));
        let gflop = 2.0 * (2 * tokens * inputs * outputs) as f64 / 1e9;
        let (cc, cw) = measure(repeats, || candle.forward(&x))?;
        let (oc, ow) = measure(repeats, || ours.forward(&x))?;
        println!(
            "{name:<33} {gflop:6.2} GFLOP  candle cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s"
        );
    }
    if "proj in/out 320 b2".contains(&filter) {
        let image = Tensor::randn(0f32, 1.0, (2, 320, 32, 32), &device)?;
        let weight = Tensor::randn(0f32, 0.05, (320, 320, 1, 1), &device)?;
        let bias = Tensor::randn(0f32, 0.05, 320, &device)?;
        let conv = Conv2d::new(candle_nn::Conv2d::new(
            weight.clone(),
            Some(bias.clone()),
            Default::default(),
        ));
        let reference = || {
            let tokens = conv.forward(&image)?.permute((0, 2, 3, 1))?.reshape((2, tokens, 320))?;
            let back = tokens.reshape((2, 32, 32, 320))?.permute((0, 3, 1, 2))?.contiguous()?;
            conv.forward(&back)? + &image
        };
        let ours = || {
            let tokens =
                sdserve::models::layers::project_pixels_to_tokens(&image, &weight, Some(&bias))?
                    .expect("kernel path");
            Ok(sdserve::models::layers::project_tokens_to_pixels_add(
                &tokens,
                &weight,
                Some(&bias),
                &image,
            )?
            .expect("kernel path"))
        };
        let (cc, cw) = measure(repeats, reference)?;
        let (oc, ow) = measure(repeats, ours)?;
        println!(
            "{:<33} conv+permute cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s",
            "proj in/out 320 b2"
        );
    }
    if "layer norm 320 b2".contains(&filter) {
        let x = Tensor::randn(0f32, 1.0, (2, tokens, 320), &device)?;
        let vb = candle_nn::VarBuilder::from_tensors(
            [
                ("weight".to_string(), Tensor::randn(1f32, 0.1, 320, &device)?),
                ("bias".to_string(), Tensor::randn(0f32, 0.1, 320, &device)?),
            ]
            .into_iter()
            .collect(),
            candle_core::DType::F32,
            &device,
        );
        let candle = candle_nn::layer_norm(320, 1e-5, vb.clone())?;
        let ours = sdserve::models::layers::layer_norm(320, 1e-5, vb)?;
        let (cc, cw) = measure(repeats, || candle.forward(&x))?;
        let (oc, ow) = measure(repeats, || ours.forward(&x))?;
        println!(
            "{:<33} candle cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s",
            "layer norm 320 b2"
        );
    }
    if "geglu 2560 b2".contains(&filter) {
        let x = Tensor::randn(0f32, 1.0, (2, tokens, 2560), &device)?;
        let candle = || {
            let hidden = x.narrow(2, 0, 1280)?;
            hidden * x.narrow(2, 1280, 1280)?.gelu_erf()?
        };
        let (cc, cw) = measure(repeats, candle)?;
        let (oc, ow) = measure(repeats, || sdserve::models::layers::geglu(&x))?;
        println!(
            "{:<33} candle cpu {cc:7.3}s wall {cw:7.3}s   ours cpu {oc:7.3}s wall {ow:7.3}s",
            "geglu 2560 b2"
        );
    }
    Ok(())
}
