//! Command-line uses of the library that need no server: `sdserve generate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;

use crate::adapters::embeddings::EmbeddingLibrary;
use crate::codec::{encode_image, ImageFormat};
use crate::pipeline::{GenerationParams, LoadOptions, Pipeline, PromptContext, StepObserver};

/// `sdserve generate`: one request through the pipeline, written to image files.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// What to draw, in A1111 prompt syntax: (word:1.2), [word], BREAK, embeddings by
    /// file stem (see the README's "Prompt syntax").
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (empty: unconditional; SDXL uses zeros).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Image width in pixels (multiple of 8; default: the model's native size).
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height in pixels (multiple of 8; default: the model's native size).
    #[arg(long)]
    pub height: Option<u32>,
    /// Denoising steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Guidance rescale φ (0 = off), for v-prediction / zero-SNR models.
    #[arg(long)]
    pub guidance_rescale: Option<f64>,
    /// Sampler id, A1111 name or alias (see `GET /v1/samplers`).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Noise schedule: default, karras, exponential, sgm_uniform, simple, normal,
    /// ddim_uniform, beta (see `GET /v1/schedules`).
    #[arg(long)]
    pub schedule: Option<String>,
    /// DDIM's eta (0-1).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Noise scale of the ancestral / SDE samplers (0-2).
    #[arg(long)]
    pub s_noise: Option<f64>,
    /// Seed of the first image (image i uses seed + i); default random.
    #[arg(long)]
    pub seed: Option<i64>,
    /// Number of images.
    #[arg(long)]
    pub n: Option<u32>,
    /// A1111 clip skip: 1 = last CLIP layer, 2 = penultimate, ...
    #[arg(long)]
    pub clip_skip: Option<u32>,
    /// SDXL original_size micro-conditioning, WxH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    pub original_size: Option<(u32, u32)>,
    /// SDXL crop micro-conditioning, TOP,LEFT in pixels (default 0,0).
    #[arg(long, value_parser = parse_pair)]
    pub crop_top_left: Option<(u32, u32)>,
    /// SDXL target_size micro-conditioning, WxH (default: the output size).
    #[arg(long, value_parser = parse_size)]
    pub target_size: Option<(u32, u32)>,
    /// Compute precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output file; its extension picks the format (png, jpg, webp). With n > 1,
    /// `out.png` becomes out-0.png, out-1.png, ...
    #[arg(long, default_value = "out.png")]
    pub output: PathBuf,
    /// A directory of textual-inversion embeddings (.safetensors), used by file stem in
    /// the prompt and negative prompt. Repeatable.
    #[arg(long = "embeddings-dir", value_name = "DIR")]
    pub embeddings_dirs: Vec<PathBuf>,
    /// A LoRA `.safetensors` file to apply, optionally with its weight (default 1):
    /// `--lora style.safetensors:0.8` (repeatable). `<lora:STEM:WEIGHT>` in the prompt
    /// names these files by stem too.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", value_parser = parse_lora_arg)]
    pub loras: Vec<(PathBuf, f64)>,
    /// img2img / inpainting source image (PNG, JPEG or WebP). Without --width/--height
    /// the output takes its size (down to a multiple of 8).
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// img2img strength, (0, 1] (default 0.75).
    #[arg(long)]
    pub strength: Option<f64>,
    /// How the init image is fitted when sizes differ: resize, crop or fill.
    #[arg(long)]
    pub resize_mode: Option<String>,
    /// Inpainting mask (white = repaint); needs --init-image.
    #[arg(long, value_name = "FILE")]
    pub mask_image: Option<PathBuf>,
    /// Gaussian blur of the mask in pixels (default 4).
    #[arg(long)]
    pub mask_blur: Option<u32>,
    /// Paste the original back outside the mask (default true).
    #[arg(long, value_name = "true|false")]
    pub paste_back: Option<bool>,
    /// VAE tiling: auto (tile from --vae-tiling-auto-pixels on), on or off.
    #[arg(long, value_name = "auto|on|off")]
    pub vae_tiling: Option<String>,
    /// `--vae-tiling auto` tiles images of at least this many pixels.
    #[arg(long, default_value_t = crate::pipeline::memory::DEFAULT_VAE_TILING_AUTO_PIXELS)]
    pub vae_tiling_auto_pixels: u64,
}

/// Reads an image file given on the command line as base64 for the request.
fn image_file(flag: &str, path: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    path.as_ref()
        .map(|path| {
            std::fs::read(path)
                .map(|bytes| crate::codec::base64_encode(&bytes))
                .map_err(|e| anyhow::anyhow!("--{flag}: cannot read {}: {e}", path.display()))
        })
        .transpose()
}

/// Parses `FILE[:WEIGHT]`; a suffix that is not a number stays part of the path.
fn parse_lora_arg(text: &str) -> Result<(PathBuf, f64), String> {
    if let Some((path, weight)) = text.rsplit_once(':') {
        if let Ok(weight) = weight.trim().parse::<f64>() {
            return Ok((PathBuf::from(path), weight));
        }
    }
    Ok((PathBuf::from(text), 1.0))
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) =
        text.split_once(['x', 'X']).ok_or_else(|| format!("expected WxH, got {text:?}"))?;
    Ok((
        w.trim().parse().map_err(|_| format!("bad width in {text:?}"))?,
        h.trim().parse().map_err(|_| format!("bad height in {text:?}"))?,
    ))
}

fn parse_pair(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text.split_once(',').ok_or_else(|| format!("expected A,B, got {text:?}"))?;
    Ok((
        a.trim().parse().map_err(|_| format!("bad number in {text:?}"))?,
        b.trim().parse().map_err(|_| format!("bad number in {text:?}"))?,
    ))
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(text: &str) -> Result<DType, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype {other:?}; use f32, f16 or bf16")),
    }
}

/// Prints one line per step to stderr.
struct StderrProgress {
    started: Instant,
}

impl StepObserver for StderrProgress {
    fn on_step(&mut self, _image_index: u32, step: usize, steps: usize) {
        let elapsed = self.started.elapsed().as_secs_f64();
        eprintln!("step {step}/{steps} ({:.2} s/step)", elapsed / step as f64);
    }
    fn should_cancel(&self) -> bool {
        false
    }
}

/// The file image `index` of `count` is written to.
fn output_path(output: &Path, index: u32, count: u32) -> PathBuf {
    if count == 1 {
        return output.to_path_buf();
    }
    let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let name = match output.extension().and_then(|e| e.to_str()) {
        Some(extension) => format!("{stem}-{index}.{extension}"),
        None => format!("{stem}-{index}"),
    };
    output.with_file_name(name)
}

/// Runs `sdserve generate`.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let extension = args.output.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let Some(format) = ImageFormat::from_name(extension) else {
        bail!("--output: unknown image extension {extension:?}; use .png, .jpg or .webp");
    };
    let device = crate::pipeline::parse_device(&args.device).context("--device")?;
    let name = args.model.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
    let loading = Instant::now();
    let options = LoadOptions { device, dtype: args.dtype };
    let mut library = crate::adapters::lora::LoraLibrary::new(Vec::new(), 4096);
    let mut loras = Vec::new();
    for (path, weight) in &args.loras {
        let name = library.add_file(path).context("--lora")?;
        loras.push(crate::pipeline::LoraChoice { name, weight: *weight });
    }
    let mut pipeline = Pipeline::load(&name, &args.model, &options)
        .with_context(|| format!("--model {}", args.model.display()))?
        .with_lora_library(Arc::new(library));
    pipeline.set_memory_settings(crate::pipeline::MemorySettings {
        vae_tiling_auto_pixels: args.vae_tiling_auto_pixels,
        vae_tile_pixels: None,
    });
    if !args.embeddings_dirs.is_empty() {
        let library = EmbeddingLibrary::new(&args.embeddings_dirs).context("--embeddings-dir")?;
        pipeline.set_prompt_context(PromptContext::with_embeddings(Arc::new(library)));
    }
    eprintln!(
        "loaded {} ({}) in {:.1} s",
        name,
        pipeline.defaults().family.id(),
        loading.elapsed().as_secs_f64()
    );
    let params = GenerationParams {
        prompt: args.prompt.clone(),
        negative_prompt: Some(args.negative_prompt.clone()),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        guidance_rescale: args.guidance_rescale,
        sampler: args.sampler.clone(),
        schedule: args.schedule.clone(),
        eta: args.eta,
        s_noise: args.s_noise,
        seed: args.seed,
        n: args.n,
        clip_skip: args.clip_skip,
        original_size: args.original_size,
        crop_top_left: args.crop_top_left,
        target_size: args.target_size,
        loras,
        init_image: image_file("init-image", &args.init_image)?,
        strength: args.strength,
        resize_mode: args.resize_mode.clone(),
        mask_image: image_file("mask-image", &args.mask_image)?,
        mask_blur: args.mask_blur,
        paste_back: args.paste_back,
        vae_tiling: args.vae_tiling.clone(),
        ..Default::default()
    };
    let limits = crate::pipeline::Limits { max_n: 64, max_steps: 1000, ..Default::default() };
    let request = params
        .validate(pipeline.defaults(), &limits)
        .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))?;
    let images = pipeline.generate(&request, &mut StderrProgress { started: Instant::now() })?;
    for image in &images {
        let bytes = encode_image(
            &image.rgb,
            image.width,
            image.height,
            format,
            None,
            Some(&request.infotext(image.index)),
        )?;
        let path = output_path(&args.output, image.index, request.n);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} (seed {})", path.display(), image.seed);
    }
    Ok(())
}

/// `sdserve bench`: times the parts of one generation on a model.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Image sizes to time (square), e.g. --size 256 --size 512.
    #[arg(long = "size", default_values_t = vec![256u32])]
    pub sizes: Vec<u32>,
    /// Timed repetitions of each part (after one warm-up run).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Compute precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,
    /// Device: cpu, cuda[:N], metal[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Steps of the timed whole request (with guidance).
    #[arg(long, default_value_t = 20)]
    pub request_steps: u32,
    /// VAE tiling of the timed decodes: auto, on or off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub vae_tiling: String,
    /// Time only one VAE decode per size (no warm-up) and report its peak memory.
    #[arg(long)]
    pub decode_only: bool,
    /// VAE tile side in pixels (default: the VAE config's sample_size, as diffusers).
    #[arg(long, value_name = "PIXELS")]
    pub vae_tile_pixels: Option<usize>,
    /// Instead of the parts: push this many small jobs through the service's job queue
    /// and worker (no HTTP) and report images per second.
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// With --jobs: the worker's max_batch (see `serve --max-batch`).
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// With --jobs: steps of each job.
    #[arg(long, default_value_t = 4)]
    pub job_steps: u32,
}

/// Median, min and max of `repeats` timed runs of `run`, after one warm-up run.
fn time_runs(
    repeats: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<[f64; 3]> {
    run()?;
    let mut seconds = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        run()?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    Ok([seconds[seconds.len() / 2], seconds[0], seconds[seconds.len() - 1]])
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resident memory of this process now (Linux), in MiB.
fn resident_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak-resident-memory mark to the current use (Linux `clear_refs` 5), so
/// that [`peak_memory_mib`] measures from here; false where unsupported.
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs `sdserve bench`, printing one line per timed part.
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(jobs) = args.jobs {
        return crate::bench_service::run(args, jobs);
    }
    let vae_tiling = crate::pipeline::VaeTiling::from_name(&args.vae_tiling)
        .ok_or_else(|| anyhow::anyhow!("--vae-tiling: use auto, on or off"))?;
    let device = crate::pipeline::parse_device(&args.device).context("--device")?;
    let options = LoadOptions { device, dtype: args.dtype };
    let loading = Instant::now();
    let mut pipeline = Pipeline::load("bench", &args.model, &options)
        .with_context(|| format!("--model {}", args.model.display()))?;
    pipeline.set_memory_settings(crate::pipeline::MemorySettings {
        vae_tile_pixels: args.vae_tile_pixels,
        ..Default::default()
    });
    println!(
        "model {} ({}), dtype {:?}, device {}, threads {}, loaded in {:.1} s",
        args.model.display(),
        pipeline.defaults().family.id(),
        args.dtype,
        args.device,
        candle_core::utils::get_num_threads(),
        loading.elapsed().as_secs_f64()
    );
    let report = |part: &str, [median, min, max]: [f64; 3]| {
        println!("{part:<32} median {median:>8.3} s   min {min:>8.3} s   max {max:>8.3} s");
    };
    let request = |size: u32, steps: u32| {
        GenerationParams {
            prompt: "a photo of an astronaut riding a horse".into(),
            width: Some(size),
            height: Some(size),
            steps: Some(steps),
            seed: Some(0),
            sampler: Some("euler".into()),
            vae_tiling: Some(vae_tiling.id().into()),
            ..Default::default()
        }
        .validate(pipeline.defaults(), &crate::pipeline::Limits::default())
        .map_err(|e| anyhow::anyhow!("--size: {}", e.message))
    };
    if args.decode_only {
        for &size in &args.sizes {
            let one = request(size, 1)?;
            let tiled = pipeline.vae_tile_layout(one.vae_tiling, size, size).is_some();
            let before = resident_memory_mib().unwrap_or(0.0);
            let reset = reset_peak_memory();
            let started = Instant::now();
            pipeline.bench_vae_decode(&one)?;
            let seconds = started.elapsed().as_secs_f64();
            let peak = peak_memory_mib().unwrap_or(0.0);
            println!(
                "vae decode {size}x{size} tiled={tiled}: {seconds:.1} s, resident before \
                 {before:.0} MiB, peak {peak:.0} MiB{}, decode added {:.0} MiB",
                if reset { "" } else { " (whole process: peak reset unsupported)" },
                peak - before
            );
        }
        return Ok(());
    }
    let text = request(512, 1)?;
    report(
        "text encoder (prompt)",
        time_runs(args.repeats, || Ok(pipeline.bench_text(&text).map(|_| ())?))?,
    );
    for &size in &args.sizes {
        let one = request(size, 1)?;
        for batch in [1usize, 2] {
            report(
                &format!("unet step {size}x{size} batch {batch}"),
                time_runs(args.repeats, || Ok(pipeline.bench_unet_step(&one, batch)?))?,
            );
        }
        report(
            &format!("vae decode {size}x{size}"),
            time_runs(args.repeats, || Ok(pipeline.bench_vae_decode(&one).map(|_| ())?))?,
        );
        let whole = request(size, args.request_steps)?;
        report(
            &format!("request {size}x{size}, {} steps, cfg", args.request_steps),
            time_runs(1, || {
                Ok(pipeline.generate(&whole, &mut crate::pipeline::NoObserver).map(|_| ())?)
            })?,
        );
    }
    if let Some(peak) = peak_memory_mib() {
        println!("peak resident memory {peak:.0} MiB");
    }
    Ok(())
}
