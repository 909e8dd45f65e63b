//! Request and response bodies of the native API (serde + utoipa schemas), and their
//! conversions from the job layer's types.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ErrorDetail;
use crate::codec::{self, ImageFormat};
use crate::jobs::{JobSnapshot, JobState, Progress};
use crate::pipeline::GenerationParams;

/// Output image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    #[serde(alias = "jpg")]
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn to_codec(self) -> ImageFormat {
        match self {
            OutputFormat::Png => ImageFormat::Png,
            OutputFormat::Jpeg => ImageFormat::Jpeg,
            OutputFormat::Webp => ImageFormat::Webp,
        }
    }

    pub fn from_codec(format: ImageFormat) -> OutputFormat {
        match format {
            ImageFormat::Png => OutputFormat::Png,
            ImageFormat::Jpeg => OutputFormat::Jpeg,
            ImageFormat::Webp => OutputFormat::Webp,
        }
    }
}

/// One LoRA to apply to a request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// Name of a `.safetensors` file in a configured LoRA directory, without the
    /// extension (`GET /v1/loras`).
    #[schema(example = "watercolor")]
    pub name: String,
    /// Strength, -10 to 10 (1 = as trained).
    #[schema(default = 1.0, minimum = -10, maximum = 10)]
    pub weight: Option<f64>,
}

/// One T2I-Adapter to condition a request on.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct T2IAdapterRequest {
    /// Name of an adapter in a configured T2I-Adapter directory: a diffusers folder (its
    /// name) or a `.safetensors` file (its stem).
    #[schema(example = "t2iadapter_canny_sd15v2")]
    pub model: String,
    /// Control image: base64 or a data URI (PNG, JPEG, WebP), stretched to the output
    /// size; converted to grayscale for one-channel adapters. Without `width`/`height`
    /// the output takes the first control image's size (down to a multiple of 8).
    pub image: String,
    /// Multiplies the adapter's features (0-10).
    #[schema(default = 1.0, minimum = 0, maximum = 10)]
    pub scale: Option<f64>,
}

/// One ControlNet guiding a request.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlNetRequest {
    /// A ControlNet in a configured ControlNet directory: folder name or `.safetensors`
    /// file stem (`GET /v1/adapters`).
    #[schema(example = "control_v11p_sd15_canny")]
    pub model: String,
    /// The control image (edges, depth, pose... already preprocessed: the server runs no
    /// detector): base64 or a data URI (PNG, JPEG, WebP). Resized to the output size;
    /// without `width`/`height` (and `init_image`) the output takes the first control
    /// image's size.
    pub image: String,
    /// Conditioning scale, 0-5 (diffusers' `controlnet_conditioning_scale`).
    #[schema(default = 1.0, minimum = 0, maximum = 5)]
    pub scale: Option<f64>,
    /// Fraction of the steps after which it starts guiding (`control_guidance_start`).
    #[schema(default = 0.0, minimum = 0, maximum = 1)]
    pub start: Option<f64>,
    /// Fraction of the steps after which it stops guiding (`control_guidance_end`).
    #[schema(default = 1.0, minimum = 0, maximum = 1)]
    pub end: Option<f64>,
}

/// One IP-Adapter to apply: a reference image (or several) that steers the picture.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterRequest {
    /// Name of an IP-Adapter weights file in a configured `ip_adapter_dirs` directory,
    /// without `.safetensors` (its CLIP image encoder sits beside it in `image_encoder/`).
    #[schema(example = "ip-adapter_sd15")]
    pub model: String,
    /// The reference image: base64 or a data URI (PNG, JPEG, WebP).
    pub image: Option<String>,
    /// Several reference images instead of `image` (at most 8): their image tokens are
    /// attended to together, as diffusers does with a list of images for one adapter.
    pub images: Option<Vec<String>>,
    /// Strength of the image prompt, -1 to 5 (1 = as trained, 0 = off).
    #[schema(default = 1.0, minimum = -1, maximum = 5)]
    pub scale: Option<f64>,
}

/// A text-to-image request. Every field but `prompt` is optional; unknown fields are
/// refused (422) so that a typo never silently does nothing.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Registry name of the model (`GET /v1/models`); the server's default when absent.
    #[schema(example = "shapes")]
    pub model: Option<String>,
    /// What to draw. Required (may be empty).
    #[schema(example = "a watercolor fox in the snow")]
    pub prompt: Option<String>,
    /// What to steer away from.
    #[schema(default = "", example = "blurry")]
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 8; the model's native width when absent.
    #[schema(example = 512, minimum = 8, multiple_of = 8)]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8; the model's native height when absent.
    #[schema(example = 512, minimum = 8, multiple_of = 8)]
    pub height: Option<u32>,
    /// Denoising steps.
    #[schema(default = 30, minimum = 1)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (0-100; 1 or less disables guidance).
    #[schema(default = 7.5, minimum = 0, maximum = 100)]
    pub guidance_scale: Option<f64>,
    /// Guidance rescale φ (0-1), against over-exposure with zero-SNR models.
    #[schema(default = 0.0, minimum = 0, maximum = 1)]
    pub guidance_rescale: Option<f64>,
    /// Sampler id, A1111 display name or alias (`GET /v1/samplers`).
    #[schema(default = "euler_a", example = "euler_a")]
    pub sampler: Option<String>,
    /// Noise schedule (`GET /v1/schedules`); `default` (the model's own) when absent, or
    /// the one a legacy A1111 sampler name implies ("DPM++ 2M Karras").
    #[schema(default = "default", example = "karras")]
    pub schedule: Option<String>,
    /// DDIM's eta (0-1; 0 = deterministic; default 0), or TCD's gamma (default 0.3).
    /// Only for `ddim` and `tcd`.
    #[schema(minimum = 0, maximum = 1)]
    pub eta: Option<f64>,
    /// Scale of the noise ancestral / SDE samplers add (0-2). Only for samplers that add
    /// noise (`euler_a`, `dpm2_a`, `dpmpp_2m_sde`, `dpmpp_sde`, `dpmpp_2s_a`,
    /// `dpmpp_3m_sde`; `s_noise: true` in `GET /v1/samplers`).
    #[schema(default = 1.0, minimum = 0, maximum = 2)]
    pub s_noise: Option<f64>,
    /// Replaces the model scheduler's timestep spacing for this request: `leading`,
    /// `trailing` or `linspace` (diffusers' `timestep_spacing`); the model's own when
    /// absent. Not for `lcm` / `tcd`, which use their distillation schedule.
    #[schema(example = "trailing")]
    pub timestep_spacing: Option<String>,
    /// Replaces the model scheduler's `rescale_betas_zero_snr`: rescale the noise schedule
    /// to zero terminal SNR (Lin et al. 2023; use with `trailing` spacing, as diffusers
    /// recommends, and a v-prediction model). The model's own setting when absent.
    pub rescale_betas_zero_snr: Option<bool>,
    /// Replaces the model's prediction type: `epsilon`, `v_prediction` or `sample`; for
    /// checkpoints whose config does not say what they predict.
    #[schema(example = "v_prediction")]
    pub prediction_type: Option<String>,
    /// Seed of the first image (image i uses seed + i); absent or -1: random (reported).
    #[schema(default = -1, example = 42)]
    pub seed: Option<i64>,
    /// Number of images.
    #[schema(default = 1, minimum = 1)]
    pub n: Option<u32>,
    /// CLIP layers to skip, A1111 style (1 = last layer, 2 = penultimate).
    #[schema(default = 1, minimum = 1, maximum = 12)]
    pub clip_skip: Option<u32>,
    /// SDXL micro-conditioning `[width, height]`; the image size when absent.
    pub original_size: Option<[u32; 2]>,
    /// SDXL micro-conditioning `[top, left]`.
    #[schema(default = json!([0, 0]))]
    pub crop_top_left: Option<[u32; 2]>,
    /// SDXL micro-conditioning `[width, height]`; the image size when absent.
    pub target_size: Option<[u32; 2]>,
    /// SDXL refiner aesthetic score.
    #[schema(default = 6.0, minimum = 0, maximum = 10)]
    pub aesthetic_score: Option<f64>,
    /// SDXL refiner negative aesthetic score.
    #[schema(default = 2.5, minimum = 0, maximum = 10)]
    pub negative_aesthetic_score: Option<f64>,
    /// LoRAs to apply (at most 16); `<lora:name:weight>` tags in the prompts add more.
    #[serde(default)]
    pub loras: Vec<LoraRequest>,
    /// img2img / inpainting source image: base64 or a data URI (PNG, JPEG, WebP). Without
    /// `width`/`height` the output takes its size (rounded down to a multiple of 8).
    pub init_image: Option<String>,
    /// img2img strength (0 exclusive to 1): the share of the steps run from the noised
    /// init image; 1 ignores the image (inpainting: starts from pure noise).
    #[schema(default = 0.75, minimum = 0, maximum = 1)]
    pub strength: Option<f64>,
    /// How the init image and mask are fitted when their size differs from the output:
    /// `resize` (stretch), `crop` (cover, crop the overflow), `fill` (fit, extend edges).
    #[schema(default = "resize", example = "crop")]
    pub resize_mode: Option<String>,
    /// Inpainting mask (white = repaint, black = keep; grayscale or RGB, alpha ignored),
    /// fitted like the init image. Needs `init_image`.
    pub mask_image: Option<String>,
    /// Gaussian blur of the mask, in pixels (0-64).
    #[schema(default = 4, minimum = 0, maximum = 64)]
    pub mask_blur: Option<u32>,
    /// A1111's "inpaint only masked": the mask's bounding box (plus padding, grown to the
    /// output's aspect ratio) is scaled up to the output size, inpainted, scaled back and
    /// pasted into the image through the blurred mask. Needs `mask_image`.
    #[schema(default = false)]
    pub inpaint_full_res: Option<bool>,
    /// Padding around the masked region for `inpaint_full_res`, in pixels.
    #[schema(default = 32)]
    pub inpaint_full_res_padding: Option<u32>,
    /// Paste the original back outside the (blurred) mask after decoding, so that
    /// unmasked pixels survive the lossy VAE round trip.
    #[schema(default = true)]
    pub paste_back: Option<bool>,
    /// T2I-Adapters (at most 4): each adds its features, times its scale, to the UNet's
    /// down blocks; several are summed (diffusers' MultiAdapter).
    #[serde(default)]
    pub t2i_adapters: Vec<T2IAdapterRequest>,
    /// ControlNets guiding the image (at most 4; their residuals add up).
    #[serde(default)]
    pub controlnets: Vec<ControlNetRequest>,
    /// ControlNet guess mode (diffusers' `guess_mode`): the ControlNets see only the
    /// prompt half of the guidance batch and their residuals grow from 0.1× at the first
    /// skip connection to 1× at the mid block; a guidance scale of 3-5 suits it.
    #[schema(default = false)]
    pub guess_mode: Option<bool>,
    /// IP-Adapters (at most 4): reference images that steer the picture.
    #[serde(default)]
    pub ip_adapters: Vec<IpAdapterRequest>,
    /// VAE tiling: `auto` (tile images of at least the server's `vae_tiling_auto_pixels`),
    /// `on` or `off`. Tiling bounds the VAE's memory; seams are blended.
    #[schema(default = "auto", example = "auto")]
    pub vae_tiling: Option<String>,
    /// Output format; the server's default (`output.format`) when absent.
    pub output_format: Option<OutputFormat>,
    /// JPEG/WebP quality 1-100; the server's default (`output.quality`) when absent.
    #[schema(minimum = 1, maximum = 100)]
    pub output_quality: Option<u8>,
    /// Queue priority: higher runs first; equal priorities run in arrival order.
    #[schema(default = 0)]
    pub priority: Option<i32>,
}

impl GenerateRequest {
    /// The pipeline's unvalidated parameters (the prompt must have been checked present).
    pub fn to_params(&self) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            guidance_rescale: self.guidance_rescale,
            sampler: self.sampler.clone(),
            schedule: self.schedule.clone(),
            eta: self.eta,
            s_noise: self.s_noise,
            timestep_spacing: self.timestep_spacing.clone(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
            prediction_type: self.prediction_type.clone(),
            seed: self.seed,
            n: self.n,
            clip_skip: self.clip_skip,
            original_size: self.original_size.map(|[w, h]| (w, h)),
            crop_top_left: self.crop_top_left.map(|[t, l]| (t, l)),
            target_size: self.target_size.map(|[w, h]| (w, h)),
            aesthetic_score: self.aesthetic_score,
            negative_aesthetic_score: self.negative_aesthetic_score,
            loras: self
                .loras
                .iter()
                .map(|l| crate::pipeline::LoraChoice {
                    name: l.name.clone(),
                    weight: l.weight.unwrap_or(1.0),
                })
                .collect(),
            init_image: self.init_image.clone(),
            strength: self.strength,
            resize_mode: self.resize_mode.clone(),
            mask_image: self.mask_image.clone(),
            mask_blur: self.mask_blur,
            inpaint_full_res: self.inpaint_full_res,
            inpaint_full_res_padding: self.inpaint_full_res_padding,
            paste_back: self.paste_back,
            t2i_adapters: self
                .t2i_adapters
                .iter()
                .map(|a| crate::pipeline::t2i_adapter::T2IAdapterParams {
                    model: a.model.clone(),
                    image: a.image.clone(),
                    scale: a.scale,
                })
                .collect(),
            controlnets: self
                .controlnets
                .iter()
                .map(|c| crate::pipeline::ControlNetParams {
                    model: c.model.clone(),
                    image: c.image.clone(),
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                })
                .collect(),
            guess_mode: self.guess_mode,
            ip_adapters: self
                .ip_adapters
                .iter()
                .map(|a| crate::adapters::ip_adapter::IpAdapterParams {
                    model: a.model.clone(),
                    image: a.image.clone(),
                    images: a.images.clone().unwrap_or_default(),
                    scale: a.scale,
                })
                .collect(),
            vae_tiling: self.vae_tiling.clone(),
        }
    }
}

/// The request as it ran: every default filled in.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NormalizedParameters {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    /// Sampler id.
    pub sampler: String,
    /// Schedule id.
    pub schedule: String,
    /// Seed of the first image.
    pub seed: u64,
    pub n: u32,
    pub clip_skip: u32,
    pub original_size: [u32; 2],
    pub crop_top_left: [u32; 2],
    pub target_size: [u32; 2],
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
    pub output_format: OutputFormat,
    pub output_quality: u8,
    pub priority: i32,
}

impl NormalizedParameters {
    pub fn from_snapshot(job: &JobSnapshot) -> NormalizedParameters {
        let r = &job.request;
        NormalizedParameters {
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            width: r.width,
            height: r.height,
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            guidance_rescale: r.guidance_rescale,
            sampler: r.sampler.id().to_string(),
            schedule: r.schedule.id().to_string(),
            seed: r.seed,
            n: r.n,
            clip_skip: r.clip_skip,
            original_size: [r.sdxl.original_size.0, r.sdxl.original_size.1],
            crop_top_left: [r.sdxl.crop_top_left.0, r.sdxl.crop_top_left.1],
            target_size: [r.sdxl.target_size.0, r.sdxl.target_size.1],
            aesthetic_score: r.sdxl.aesthetic_score,
            negative_aesthetic_score: r.sdxl.negative_aesthetic_score,
            output_format: OutputFormat::from_codec(job.output.format),
            output_quality: job.output.quality,
            priority: job.priority,
        }
    }
}

/// One generated image.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageData {
    /// Position in the request (0-based).
    pub index: u32,
    /// The seed this image was made from.
    pub seed: u64,
    pub format: OutputFormat,
    /// The encoded image, base64.
    pub data: String,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Timings {
    pub queue_ms: u64,
    pub inference_ms: u64,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GenerateResponse {
    /// The job id (also usable with `/v1/jobs/{id}` until the result expires).
    pub id: String,
    pub images: Vec<ImageData>,
    pub parameters: NormalizedParameters,
    pub timings: Timings,
}

impl GenerateResponse {
    /// The response of a succeeded job; None for any other job.
    pub fn from_snapshot(job: &JobSnapshot) -> Option<GenerateResponse> {
        let result = job.result.as_ref()?;
        Some(GenerateResponse {
            id: job.id.to_string(),
            images: result
                .images
                .iter()
                .map(|image| ImageData {
                    index: image.index,
                    seed: image.seed,
                    format: OutputFormat::from_codec(image.format),
                    data: codec::base64_encode(&image.bytes),
                })
                .collect(),
            parameters: NormalizedParameters::from_snapshot(job),
            timings: Timings { queue_ms: result.queue_ms, inference_ms: result.inference_ms },
        })
    }
}

/// An accepted asynchronous job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobAccepted {
    pub id: String,
    pub state: JobState,
    /// Jobs ahead of this one (0: it runs next).
    pub queue_position: usize,
}

/// Progress over all images of a job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressBody {
    /// Denoising steps done (over all images).
    pub step: usize,
    /// Denoising steps in all (`steps × n`).
    pub steps: usize,
    /// Estimated milliseconds left; null before the first step.
    pub eta_ms: Option<u64>,
}

impl From<&Progress> for ProgressBody {
    fn from(progress: &Progress) -> Self {
        ProgressBody { step: progress.step, steps: progress.steps, eta_ms: progress.eta_ms }
    }
}

/// A job's status.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    /// Jobs ahead of this one while it waits; null otherwise.
    pub queue_position: Option<usize>,
    /// Null until the job starts.
    pub progress: Option<ProgressBody>,
    /// As from `POST /v1/generate`, once the job succeeded.
    pub result: Option<GenerateResponse>,
    /// Why the job failed or was cancelled.
    pub error: Option<ErrorDetail>,
    /// RFC 3339 UTC.
    #[schema(example = "2025-01-01T12:00:00.000Z")]
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// True when a cancellation was requested while the job ran.
    pub cancel_requested: bool,
}

impl JobStatus {
    pub fn from_snapshot(job: &JobSnapshot) -> JobStatus {
        let error = match (&job.error, job.state) {
            (Some(error), _) => Some(super::error::ApiError::from(error).detail),
            (None, JobState::Cancelled) => Some(cancelled_detail()),
            _ => None,
        };
        JobStatus {
            id: job.id.to_string(),
            state: job.state,
            queue_position: job.queue_position,
            progress: job.progress.as_ref().map(ProgressBody::from),
            result: GenerateResponse::from_snapshot(job),
            error,
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
            cancel_requested: job.cancel_requested,
        }
    }
}

/// The error shown for a cancelled job.
pub fn cancelled_detail() -> ErrorDetail {
    ErrorDetail {
        message: "the job was cancelled".into(),
        kind: "invalid_request_error".into(),
        param: None,
        code: Some("job_cancelled".into()),
    }
}

/// A model of the registry (OpenAI's model object, plus sdserve's fields).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name requests use.
    pub id: String,
    /// Always `model`.
    #[schema(example = "model")]
    pub object: String,
    /// Unix seconds when the server registered it.
    pub created: u64,
    pub owned_by: String,
    /// `sd1`, `sd2`, `sdxl` or `sdxl_refiner`.
    pub family: String,
    /// Loaded on every device.
    pub loaded: bool,
    /// Used when a request names no model.
    pub default: bool,
    /// Native width and height.
    pub width: u32,
    pub height: u32,
}

/// The model list (OpenAI's list shape).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    #[schema(example = "list")]
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// A textual-inversion embedding a prompt may use by name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingCard {
    /// The file stem; writing it in a prompt uses the embedding.
    #[schema(example = "bad-hands-5")]
    pub name: String,
    /// File layout: `a1111`, `diffusers` or `sdxl`.
    #[schema(example = "a1111")]
    pub format: String,
    /// Number of token vectors it stands for.
    pub vectors: usize,
    /// Width of its vectors (SDXL files: the `clip_l` ones).
    pub width: usize,
    /// SDXL files: width of the `clip_g` vectors.
    pub width_g: Option<usize>,
    /// The file's safetensors metadata.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The embedding list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingList {
    #[schema(example = "list")]
    pub object: String,
    pub data: Vec<EmbeddingCard>,
}

/// A sampler.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SamplerInfo {
    /// The id requests use.
    #[schema(example = "euler_a")]
    pub id: String,
    /// The AUTOMATIC1111 name (also accepted).
    #[schema(example = "Euler a")]
    pub display_name: String,
    /// Other accepted names.
    pub aliases: Vec<String>,
    /// The schedules (`GET /v1/schedules`) this sampler runs with.
    pub schedules: Vec<String>,
    /// Whether the sampler takes `eta`.
    pub eta: bool,
    /// Whether the sampler takes `s_noise`.
    pub s_noise: bool,
}

/// A noise schedule.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScheduleInfo {
    /// The id requests use.
    #[schema(example = "karras")]
    pub id: String,
    /// The AUTOMATIC1111 name (also accepted, and as a suffix of a sampler name).
    #[schema(example = "Karras")]
    pub display_name: String,
}

/// The schedule list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScheduleList {
    #[schema(example = "list")]
    pub object: String,
    pub data: Vec<ScheduleInfo>,
}

/// The sampler list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SamplerList {
    #[schema(example = "list")]
    pub object: String,
    pub data: Vec<SamplerInfo>,
}

/// Liveness.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: String,
}

/// One worker slot.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WorkerStatus {
    pub device: String,
    pub slot: usize,
    /// `loading`, `ready`, `failed` or `stopped`.
    pub state: String,
    /// Why loading failed.
    pub error: Option<String>,
}

/// Readiness: every model loaded and every worker up.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready`, `loading`, `failed` or `shutting_down`.
    pub status: String,
    pub workers: Vec<WorkerStatus>,
    /// Jobs waiting.
    pub queue_depth: usize,
    /// Jobs running.
    pub running: usize,
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, second_of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian; eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339(leap_day), "2000-02-29T00:00:00.123Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_735_732_245);
        assert_eq!(rfc3339(later), "2025-01-01T11:50:45.000Z");
    }

    #[test]
    fn unknown_request_fields_are_refused() {
        let parsed: Result<GenerateRequest, _> =
            serde_json::from_str(r#"{"prompt":"a","stpes":3}"#);
        assert!(parsed.unwrap_err().to_string().contains("stpes"));
    }
}

/// The adapters requests may name, by kind.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterList {
    /// ControlNets (`controlnets[].model`).
    pub controlnets: Vec<AdapterCard>,
    /// T2I-Adapters.
    pub t2i_adapters: Vec<AdapterCard>,
    /// IP-Adapters.
    pub ip_adapters: Vec<AdapterCard>,
}

/// One adapter.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterCard {
    /// The name requests use.
    #[schema(example = "control_v11p_sd15_canny")]
    pub name: String,
    /// Where it is on the server (a folder or a `.safetensors` file).
    pub path: String,
}

/// The LoRA list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LoraList {
    /// Always `list`.
    #[schema(example = "list")]
    pub object: String,
    pub data: Vec<LoraCard>,
}

/// One LoRA file.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LoraCard {
    /// The name requests use (`loras[].name`, `<lora:name:weight>`).
    #[schema(example = "watercolor")]
    pub name: String,
    /// The file's safetensors `__metadata__` (kohya writes its training settings here).
    pub metadata: std::collections::BTreeMap<String, String>,
}
