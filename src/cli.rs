//! Command-line uses of the library that need no server: `sdserve generate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;

use crate::adapters::embeddings::EmbeddingLibrary;
use crate::adapters::ip_adapter::{IpAdapterLibrary, IpAdapterParams};
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
    /// DDIM's eta (0-1), or TCD's gamma (default 0.3).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Noise scale of the ancestral / SDE samplers (0-2).
    #[arg(long)]
    pub s_noise: Option<f64>,
    /// Replaces the model scheduler's timestep spacing: leading, trailing or linspace.
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// Replaces the model scheduler's zero-terminal-SNR rescale (true or false).
    #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true")]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Replaces the model's prediction type: epsilon, v_prediction or sample.
    #[arg(long)]
    pub prediction_type: Option<String>,
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
    /// Precision of the CPU matrix products: f32 or bf16 (AVX512-BF16 CPUs: bf16 operands,
    /// f32 accumulation; faster, less exact).
    #[arg(long, env = "SDSERVE_CPU_MATMUL", value_enum, default_value = "f32")]
    pub cpu_matmul: crate::config::CpuMatmul,
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
    /// A directory of T2I-Adapters (diffusers folders or .safetensors files) that
    /// --t2i-adapter names. Repeatable.
    #[arg(long = "t2i-adapter-dir", value_name = "DIR")]
    pub t2i_adapter_dirs: Vec<PathBuf>,
    /// A T2I-Adapter by name (in --t2i-adapter-dir), its control image and optionally its
    /// scale (default 1): `--t2i-adapter canny:edges.png:0.8`. Repeatable.
    #[arg(long = "t2i-adapter", value_name = "NAME:IMAGE[:SCALE]", value_parser = parse_t2i_adapter_arg)]
    pub t2i_adapters: Vec<(String, PathBuf, Option<f64>)>,
    /// A directory of ControlNets (diffusers folders or `.safetensors` files) that
    /// --controlnet names. Repeatable.
    #[arg(long = "controlnet-dir", value_name = "DIR")]
    pub controlnet_dirs: Vec<PathBuf>,
    /// A ControlNet from --controlnet-dir with its control image, optionally its scale
    /// (default 1) and guidance window as fractions of the steps (default 0:1):
    /// `--controlnet canny:edges.png:0.8:0:0.6` (repeatable; residuals add up).
    #[arg(long = "controlnet", value_name = "NAME:IMAGE[:SCALE[:START:END]]", value_parser = parse_controlnet_arg)]
    pub controlnets: Vec<ControlNetArg>,
    /// ControlNet guess mode (diffusers' `guess_mode`).
    #[arg(long)]
    pub guess_mode: bool,
    /// A directory of IP-Adapters (weights `.safetensors` files with `image_encoder/`
    /// beside them) that --ip-adapter names resolve in. Repeatable.
    #[arg(long = "ip-adapter-dir", value_name = "DIR")]
    pub ip_adapter_dirs: Vec<PathBuf>,
    /// An IP-Adapter with its reference image and scale (default 1):
    /// `--ip-adapter ip-adapter_sd15:face.png:0.6` (repeatable). NAME is a name in an
    /// --ip-adapter-dir or a weights file path; several images are separated by commas
    /// (`NAME:a.png,b.png`).
    #[arg(long = "ip-adapter", value_name = "NAME:IMAGE[:SCALE]", value_parser = parse_ip_adapter_arg)]
    pub ip_adapters: Vec<IpAdapterArg>,
    /// VAE tiling: auto (tiles images of at least --vae-tiling-auto-pixels), on or off.
    #[arg(long, value_name = "auto|on|off")]
    pub vae_tiling: Option<String>,
    /// The pixel count from which `--vae-tiling auto` tiles.
    #[arg(long, default_value_t = crate::pipeline::memory::DEFAULT_VAE_TILING_AUTO_PIXELS)]
    pub vae_tiling_auto_pixels: u64,
}

/// One `--controlnet` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetArg {
    pub name: String,
    pub image: PathBuf,
    pub scale: Option<f64>,
    pub window: Option<(f64, f64)>,
}

/// Parses `NAME:IMAGE[:SCALE[:START:END]]`: trailing numbers are the scale and window;
/// whatever lies between the name and them is the image path.
fn parse_controlnet_arg(text: &str) -> Result<ControlNetArg, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let numbers = parts.iter().rev().take_while(|part| part.trim().parse::<f64>().is_ok()).count();
    let numbers = numbers.min(parts.len().saturating_sub(2));
    let (head, tail) = parts.split_at(parts.len() - numbers);
    if head.len() < 2 || head[0].is_empty() {
        return Err(format!("expected NAME:IMAGE[:SCALE[:START:END]], got {text:?}"));
    }
    let values: Vec<f64> = tail.iter().map(|part| part.trim().parse().unwrap_or(0.0)).collect();
    let (scale, window) = match values.as_slice() {
        [] => (None, None),
        [scale] => (Some(*scale), None),
        [scale, start, end] => (Some(*scale), Some((*start, *end))),
        _ => return Err(format!("expected NAME:IMAGE[:SCALE[:START:END]], got {text:?}")),
    };
    Ok(ControlNetArg {
        name: head[0].to_string(),
        image: PathBuf::from(head[1..].join(":")),
        scale,
        window,
    })
}

/// One `--ip-adapter NAME:IMAGE[,IMAGE...][:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct IpAdapterArg {
    pub name: String,
    pub images: Vec<PathBuf>,
    pub scale: Option<f64>,
}

/// Parses `NAME:IMAGE[,IMAGE...][:SCALE]`; a last part that is not a number belongs to
/// the image paths.
fn parse_ip_adapter_arg(text: &str) -> Result<IpAdapterArg, String> {
    let (name, rest) =
        text.split_once(':').ok_or_else(|| format!("expected NAME:IMAGE[:SCALE], got {text:?}"))?;
    let (images, scale) = match rest.rsplit_once(':') {
        Some((images, scale)) if scale.trim().parse::<f64>().is_ok() => {
            (images, scale.trim().parse::<f64>().ok())
        }
        _ => (rest, None),
    };
    let images: Vec<PathBuf> =
        images.split(',').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
    if name.is_empty() || images.is_empty() {
        return Err(format!("expected NAME:IMAGE[:SCALE], got {text:?}"));
    }
    Ok(IpAdapterArg { name: name.to_string(), images, scale })
}

/// The request's IP-Adapters from the command line, and the library their names resolve
/// in (the directories, plus NAMEs given as weights file paths).
fn ip_adapter_params(
    args: &GenerateArgs,
) -> anyhow::Result<(Vec<IpAdapterParams>, IpAdapterLibrary)> {
    let mut library = IpAdapterLibrary::new(args.ip_adapter_dirs.clone());
    let mut params = Vec::new();
    for adapter in &args.ip_adapters {
        let as_file = Path::new(&adapter.name);
        let model = if library.resolve(&adapter.name).is_err() && as_file.is_file() {
            library.add_file(as_file).context("--ip-adapter")?
        } else {
            adapter.name.clone()
        };
        let images = adapter
            .images
            .iter()
            .map(|path| Ok(image_file("ip-adapter", &Some(path.clone()))?.unwrap_or_default()))
            .collect::<anyhow::Result<Vec<String>>>()?;
        params.push(IpAdapterParams { model, image: None, images, scale: adapter.scale });
    }
    Ok((params, library))
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

/// Parses `NAME:IMAGE[:SCALE]`; a last part that is not a number stays part of the path.
fn parse_t2i_adapter_arg(text: &str) -> Result<(String, PathBuf, Option<f64>), String> {
    let (name, rest) = text
        .split_once(':')
        .filter(|(name, rest)| !name.is_empty() && !rest.is_empty())
        .ok_or_else(|| format!("expected NAME:IMAGE[:SCALE], got {text:?}"))?;
    if let Some((image, scale)) = rest.rsplit_once(':') {
        if let Ok(scale) = scale.trim().parse::<f64>() {
            return Ok((name.to_string(), PathBuf::from(image), Some(scale)));
        }
    }
    Ok((name.to_string(), PathBuf::from(rest), None))
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

/// `sdserve samplers`: every sampler of this build, one a line: id, A1111 name, the
/// schedules it runs with and its aliases (what `GET /v1/samplers` lists).
pub fn sampler_table() -> String {
    let mut table = String::new();
    for kind in crate::samplers::SamplerKind::ALL {
        let schedules: Vec<&str> = kind.schedules().iter().map(|s| s.id()).collect();
        table.push_str(&format!(
            "{:<14} {:<14} schedules: {}; aliases: {}\n",
            kind.id(),
            kind.display_name(),
            schedules.join(", "),
            kind.aliases().join(", ")
        ));
    }
    table
}

/// The flag a request field came from: `t2i_adapters[1].image` → `t2i-adapter` (#2).
fn cli_flag(field: &str) -> String {
    match field.strip_prefix("t2i_adapters[") {
        Some(rest) => {
            let index = rest.split(']').next().and_then(|i| i.parse::<usize>().ok());
            index.map_or("t2i-adapter".into(), |i| format!("t2i-adapter (#{})", i + 1))
        }
        None => field.replace('_', "-"),
    }
}

/// Runs `sdserve generate`.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let extension = args.output.extension().and_then(|e| e.to_str()).unwrap_or("png");
    let Some(format) = ImageFormat::from_name(extension) else {
        bail!("--output: unknown image extension {extension:?}; use .png, .jpg or .webp");
    };
    let device = crate::pipeline::parse_device(&args.device).context("--device")?;
    apply_cpu_matmul(args.cpu_matmul);
    let name = args.model.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
    let loading = Instant::now();
    let options = LoadOptions { device, dtype: args.dtype };
    let mut library = crate::adapters::lora::LoraLibrary::new(Vec::new(), 4096);
    let mut loras = Vec::new();
    for (path, weight) in &args.loras {
        let name = library.add_file(path).context("--lora")?;
        loras.push(crate::pipeline::LoraChoice { name, weight: *weight });
    }
    let (ip_adapters, ip_adapter_library) = ip_adapter_params(args)?;
    let controlnet_library = crate::adapters::controlnet::ControlNetLibrary::new(
        args.controlnet_dirs.clone(),
        args.controlnets.len(),
    );
    let mut pipeline = Pipeline::load(&name, &args.model, &options)
        .with_context(|| format!("--model {}", args.model.display()))?
        .with_lora_library(Arc::new(library))
        .with_t2i_adapter_library(Arc::new(crate::adapters::t2i::T2IAdapterLibrary::new(
            args.t2i_adapter_dirs.clone(),
        )))
        .with_controlnet_library(Arc::new(controlnet_library))
        .with_ip_adapter_library(Arc::new(ip_adapter_library));
    pipeline.set_memory_settings(crate::pipeline::MemorySettings {
        vae_tiling_auto_pixels: args.vae_tiling_auto_pixels,
        vae_tile_pixels: None,
    });
    let t2i_adapters = args
        .t2i_adapters
        .iter()
        .map(|(model, image, scale)| {
            let image = image_file("t2i-adapter", &Some(image.clone()))?.unwrap_or_default();
            Ok(crate::pipeline::t2i_adapter::T2IAdapterParams {
                model: model.clone(),
                image,
                scale: *scale,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let controlnets = args
        .controlnets
        .iter()
        .map(|unit| {
            Ok(crate::pipeline::ControlNetParams {
                model: unit.name.clone(),
                image: image_file("controlnet", &Some(unit.image.clone()))?.unwrap_or_default(),
                scale: unit.scale,
                start: unit.window.map(|w| w.0),
                end: unit.window.map(|w| w.1),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
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
        timestep_spacing: args.timestep_spacing.clone(),
        rescale_betas_zero_snr: args.rescale_betas_zero_snr,
        prediction_type: args.prediction_type.clone(),
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
        t2i_adapters,
        controlnets,
        guess_mode: args.guess_mode.then_some(true),
        ip_adapters,
        vae_tiling: args.vae_tiling.clone(),
        ..Default::default()
    };
    let limits = crate::pipeline::Limits { max_n: 64, max_steps: 1000, ..Default::default() };
    let request = params
        .validate(pipeline.defaults(), &limits)
        .map_err(|e| anyhow::anyhow!("--{}: {}", cli_flag(&e.field), e.message))?;
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

/// Applies `--cpu-matmul` process-wide, warning when the CPU cannot do bf16.
fn apply_cpu_matmul(wanted: crate::config::CpuMatmul) -> crate::config::CpuMatmul {
    let effective = wanted.apply();
    if effective != wanted {
        eprintln!("sdserve: --cpu-matmul bf16 needs AVX512-BF16, which this CPU lacks: using f32");
    }
    effective
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
    /// Precision of the CPU matrix products: f32 or bf16 (AVX512-BF16 CPUs: bf16 operands,
    /// f32 accumulation; faster, less exact).
    #[arg(long, env = "SDSERVE_CPU_MATMUL", value_enum, default_value = "f32")]
    pub cpu_matmul: crate::config::CpuMatmul,
    /// Steps of the timed whole request (with guidance); 0 skips it.
    #[arg(long, default_value_t = 20)]
    pub request_steps: u32,
    /// VAE tiling of the timed decodes: auto, on or off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub vae_tiling: String,
    /// Time only one VAE decode per size (after one 64×64 warm-up decode) and report the
    /// memory it added.
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
    /// After each timed part, print where its time went by kind of layer (convolutions,
    /// linear layers, attention, norms; "other" is candle's own ops), per run.
    #[arg(long)]
    pub profile: bool,
}

/// Median, min and max wall seconds of `repeats` timed runs of `run`, after one warm-up
/// run, the median CPU seconds of the process (all threads) per run, and the GFLOP of one
/// run (architecture FLOPs of convolutions, matrix products and attention).
fn time_runs(
    repeats: usize,
    mut run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<[f64; 5]> {
    run()?;
    // The profile (when on) covers the timed runs only.
    crate::models::profile::take();
    let mut seconds = Vec::with_capacity(repeats);
    let mut cpu_seconds = Vec::with_capacity(repeats);
    let mut gflop = 0.0;
    for _ in 0..repeats.max(1) {
        let (started, cpu_started) = (Instant::now(), process_cpu_seconds());
        let flops_started = crate::models::layers::flop_count();
        run()?;
        seconds.push(started.elapsed().as_secs_f64());
        cpu_seconds.push(process_cpu_seconds().zip(cpu_started).map_or(f64::NAN, |(b, a)| b - a));
        gflop = (crate::models::layers::flop_count() - flops_started) as f64 / 1e9;
    }
    seconds.sort_by(f64::total_cmp);
    cpu_seconds.sort_by(f64::total_cmp);
    let middle = seconds.len() / 2;
    Ok([seconds[middle], seconds[0], seconds[seconds.len() - 1], cpu_seconds[middle], gflop])
}

/// The per-kind totals of `runs` timed runs as per-run rows under a part's line: wall and
/// CPU seconds, share of the part's median wall time, GFLOP/s; "other" is the rest.
fn print_profile(totals: Vec<crate::models::profile::KindTotals>, runs: usize, part_wall: f64) {
    let runs = runs as f64;
    let mut accounted = 0.0;
    for kind in &totals {
        let (wall, cpu) = (kind.wall_seconds / runs, kind.cpu_seconds / runs);
        accounted += wall;
        let rate = if kind.flops > 0 {
            format!("{:>6.1} GFLOP/s", kind.flops as f64 / 1e9 / kind.wall_seconds)
        } else {
            String::new()
        };
        println!(
            "    {:<28} {wall:>8.3} s  cpu {cpu:>8.3} s  {:>5.1} %  {:>5} calls  {rate}",
            kind.kind.name(),
            100.0 * wall / part_wall,
            (kind.calls as f64 / runs).round(),
        );
    }
    let other = part_wall - accounted;
    println!("    {:<28} {other:>8.3} s  {:>26.1} %", "other", 100.0 * other / part_wall);
}

/// User + system CPU time of this process, all threads (Linux, 10 ms ticks). On a shared
/// machine it varies far less than wall time, so `bench` prints it beside the wall time.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
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
    let cpu_matmul = apply_cpu_matmul(args.cpu_matmul);
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
        "model {} ({}), dtype {:?}, device {}, cpu matmul {cpu_matmul:?}, threads {}, loaded \
         in {:.1} s",
        args.model.display(),
        pipeline.defaults().family.id(),
        args.dtype,
        args.device,
        candle_core::utils::get_num_threads(),
        loading.elapsed().as_secs_f64()
    );
    crate::models::profile::enable(args.profile);
    let report = |part: &str, [median, min, max, cpu, gflop]: [f64; 5]| {
        println!(
            "{part:<32} median {median:>8.3} s   min {min:>8.3} s   max {max:>8.3} s   \
             cpu {cpu:>8.3} s   {gflop:>8.1} GFLOP {:>6.1} GFLOP/s",
            gflop / median
        );
        if args.profile {
            print_profile(crate::models::profile::take(), args.repeats.max(1), median);
        }
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
        // One small decode first, so that one-time work (the Winograd weight transforms,
        // scratch buffers) is not counted as the measured decode's memory.
        pipeline.bench_vae_decode(&request(64, 1)?)?;
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
        if args.request_steps == 0 {
            continue;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_table_lists_every_sampler() {
        let table = sampler_table();
        assert_eq!(table.lines().count(), crate::samplers::SamplerKind::ALL.len());
        for needle in ["dpmpp_3m_sde", "DPM++ 2S a", "DPMSolverSDEScheduler", "karras"] {
            assert!(table.contains(needle), "{needle}: {table}");
        }
    }

    #[test]
    fn controlnet_flags_parse() {
        let parsed = parse_controlnet_arg("canny:edges.png").unwrap();
        assert_eq!((parsed.name.as_str(), parsed.scale, parsed.window), ("canny", None, None));
        assert_eq!(parsed.image, PathBuf::from("edges.png"));
        let parsed = parse_controlnet_arg("sub/depth:a:b.png:0.8:0.1:0.6").unwrap();
        assert_eq!(parsed.image, PathBuf::from("a:b.png"));
        assert_eq!((parsed.scale, parsed.window), (Some(0.8), Some((0.1, 0.6))));
        // A numeric image name stays the image.
        assert_eq!(parse_controlnet_arg("x:1").unwrap().image, PathBuf::from("1"));
        for bad in ["canny", ":edges.png", "canny:e.png:1:0.5"] {
            assert!(parse_controlnet_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_adapter_arguments_parse_name_images_and_scale() {
        let parsed = parse_ip_adapter_arg("models/ip-adapter_sd15:face.png:0.6").unwrap();
        assert_eq!(parsed.name, "models/ip-adapter_sd15");
        assert_eq!(parsed.images, [PathBuf::from("face.png")]);
        assert_eq!(parsed.scale, Some(0.6));
        let parsed = parse_ip_adapter_arg("plus:a.png,b.png").unwrap();
        assert_eq!(parsed.images, [PathBuf::from("a.png"), PathBuf::from("b.png")]);
        assert_eq!(parsed.scale, None);
        assert!(parse_ip_adapter_arg("no-image").is_err());
        assert!(parse_ip_adapter_arg(":a.png").is_err());
    }
}
