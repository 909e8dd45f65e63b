//! Times candle-transformers' own Stable Diffusion 1.5 UNet and VAE on a diffusers folder,
//! with the conventions of `sdserve bench`, so both engines can be compared on the same files.
//!
//! Parts: one UNet step (timestep 500, zero latents, random encoder hidden states
//! [batch, 77, 768]) at batch 1 and 2, and one VAE decode of zero latents to 8-bit RGB, at
//! each `--size`. Each part runs once untimed, then `--repeats` timed runs; a line gives the
//! median/min/max wall seconds and the median CPU seconds of the process (all threads).
//! Configuration: `StableDiffusionConfig::v1_5` with no attention slicing, no flash
//! attention, f32 on the CPU; threads follow RAYON_NUM_THREADS like sdserve.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::StableDiffusionConfig;

/// SD 1.x latent scaling factor (vae/config.json `scaling_factor`), divided out before
/// decoding as the diffusers pipeline and sdserve do.
const VAE_SCALING_FACTOR: f64 = 0.18215;
/// SD 1.x CLIP text length and width of the encoder hidden states.
const TEXT_TOKENS: usize = 77;
const CONTEXT_WIDTH: usize = 768;
/// The timestep `sdserve bench` and tools/bench_compare.py use for one UNet step.
const BENCH_TIMESTEP: f64 = 500.0;

/// Command-line options: --model DIR, --size N (repeatable), --repeats N.
struct Options {
    model: PathBuf,
    sizes: Vec<usize>,
    repeats: usize,
}

fn parse_options() -> Result<Options> {
    let mut model = None;
    let mut sizes = Vec::new();
    let mut repeats = 3;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--size" => {
                let size: usize = value()?.parse().context("--size: not a whole number")?;
                if size == 0 || !size.is_multiple_of(8) {
                    bail!("--size: {size} is not a positive multiple of 8");
                }
                sizes.push(size);
            }
            "--repeats" => repeats = value()?.parse().context("--repeats: not a whole number")?,
            "-h" | "--help" => {
                println!("usage: candle_sd_bench --model DIR [--size N]... [--repeats N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    let model = model.context("--model DIR is required (a diffusers SD 1.5 folder)")?;
    if sizes.is_empty() {
        sizes.push(256);
    }
    Ok(Options { model, sizes, repeats: repeats.max(1) })
}

/// User + system CPU seconds of this process, all threads (Linux /proc/self/stat utime and
/// stime, 10 ms ticks), as `sdserve bench` reads them.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// One untimed warm-up run, then `repeats` timed runs: [median, min, max] wall seconds and
/// the median CPU seconds per run.
fn time_runs(repeats: usize, mut run: impl FnMut() -> Result<()>) -> Result<[f64; 4]> {
    run()?;
    let mut wall = Vec::with_capacity(repeats);
    let mut cpu = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let (started, cpu_started) = (Instant::now(), process_cpu_seconds());
        run()?;
        wall.push(started.elapsed().as_secs_f64());
        cpu.push(process_cpu_seconds().zip(cpu_started).map_or(f64::NAN, |(b, a)| b - a));
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let middle = wall.len() / 2;
    Ok([wall[middle], wall[0], wall[wall.len() - 1], cpu[middle]])
}

/// Prints one part in `sdserve bench`'s line format (which tools/bench_compare.py parses).
fn report(part: &str, [median, min, max, cpu]: [f64; 4]) {
    println!(
        "{part:<32} median {median:>8.3} s   min {min:>8.3} s   max {max:>8.3} s   \
         cpu {cpu:>8.3} s"
    );
}

fn main() -> Result<()> {
    let options = parse_options()?;
    let device = Device::Cpu;
    let dtype = DType::F32;
    let unet_file = options.model.join("unet/diffusion_pytorch_model.safetensors");
    let vae_file = options.model.join("vae/diffusion_pytorch_model.safetensors");
    for file in [&unet_file, &vae_file] {
        if !file.is_file() {
            bail!("--model: {} not found (expected a diffusers folder)", file.display());
        }
    }
    let loading = Instant::now();
    // Size only matters to the config's default image size and scheduler, not to the
    // UNet/VAE weights; each part below feeds its own latent size.
    let config = StableDiffusionConfig::v1_5(None, None, None);
    let use_flash_attn = false;
    let unet = config
        .build_unet(&unet_file, &device, 4, use_flash_attn, dtype)
        .with_context(|| format!("loading {}", unet_file.display()))?;
    let vae = config
        .build_vae(&vae_file, &device, dtype)
        .with_context(|| format!("loading {}", vae_file.display()))?;
    println!(
        "model {} (candle-transformers SD 1.5), dtype F32, device cpu, threads {}, \
         loaded in {:.1} s",
        options.model.display(),
        candle_core::utils::get_num_threads(),
        loading.elapsed().as_secs_f64()
    );

    // Random stand-in for the CLIP output (candle cannot seed its CPU generator; the
    // values do not change the cost).
    let context = Tensor::randn(0f32, 1f32, (1, TEXT_TOKENS, CONTEXT_WIDTH), &device)?;
    for &size in &options.sizes {
        let latent_side = size / 8;
        for batch in [1usize, 2] {
            let sample = Tensor::zeros((batch, 4, latent_side, latent_side), dtype, &device)?;
            let batch_context = context.repeat((batch, 1, 1))?;
            report(
                &format!("unet step {size}x{size} batch {batch}"),
                time_runs(options.repeats, || {
                    unet.forward(&sample, BENCH_TIMESTEP, &batch_context)?;
                    Ok(())
                })?,
            );
        }
        let latents = Tensor::zeros((1, 4, latent_side, latent_side), dtype, &device)?;
        report(
            &format!("vae decode {size}x{size}"),
            time_runs(options.repeats, || {
                let image = vae.decode(&(&latents / VAE_SCALING_FACTOR)?)?;
                // To 8-bit RGB as sdserve's decode does, so both sides include the same work.
                let pixels = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)? * 255.0;
                pixels?.round()?.to_dtype(DType::U8)?.squeeze(0)?.to_vec3::<u8>()?;
                Ok(())
            })?,
        );
    }
    Ok(())
}
