//! The AUTOMATIC1111 dialect (`/sdapi/v1/*`): txt2img translated into the native request
//! (same validation, queue and workers), A1111's progress, interrupt and skip over the
//! jobs this dialect submitted, the listing endpoints, options and png-info.
//!
//! Where A1111 and sdserve differ, the choices are:
//! - width/height default to the model's native size (A1111 says 512, which is the native
//!   size of SD 1.x; SDXL users get 1024 rather than a size the model draws badly).
//! - Fields sdserve does not use (hires fix, face restoration, scripts ...) are accepted,
//!   ignored, and listed in one log line per request.
//! - An interrupted txt2img answers 200 with no images (A1111 would return the partly
//!   denoised image; sdserve stops at the next step and keeps nothing).
//! - `/skip` stops the running job like `/interrupt`: a batch's images are denoised
//!   together, so one image cannot be dropped alone.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::dto::GenerateRequest;
use super::error::{from_json_value, ApiError, AppJson, ErrorResponse};
use super::native::{submit, unsuccessful_job_error, wait_for_job};
use super::{AppState, RegisteredModel};
use crate::codec;
use crate::jobs::{CancelOutcome, JobId, JobSnapshot, JobState};
use crate::pipeline::image_input::{self, ResizeMode};
use crate::samplers::{resolve_sampler_name, SamplerKind, Schedule};

/// A1111's API default step count.
const A1111_STEPS: u32 = 50;
/// A1111's API default guidance scale.
const A1111_CFG_SCALE: f64 = 7.0;
/// A1111's API default sampler (`sampler_index` defaults to it).
const A1111_SAMPLER: &str = "Euler";

/// What the A1111 dialect remembers between requests: its options and its jobs.
#[derive(Debug, Default)]
pub struct A1111Session {
    inner: Mutex<SessionInner>,
}

#[derive(Debug, Default)]
struct SessionInner {
    /// `sd_model_checkpoint` set through `POST /sdapi/v1/options`.
    default_model: Option<String>,
    /// `CLIP_stop_at_last_layers` set through `POST /sdapi/v1/options`.
    clip_skip: Option<u32>,
    /// Jobs submitted through this dialect that have not been collected.
    jobs: Vec<JobId>,
    /// The last job was stopped by `/interrupt` or `/skip`.
    interrupted: bool,
}

impl A1111Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A1111's txt2img request (the fields sdserve uses; any other field is accepted and
/// ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Txt2ImgRequest {
    #[schema(example = "a lighthouse at dusk <lora:film:0.6>")]
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// -1: random.
    #[schema(default = -1)]
    pub seed: Option<i64>,
    /// A1111 sampler name, legacy combined names included (`DPM++ 2M Karras`), or an
    /// sdserve id.
    #[schema(default = "Euler", example = "Euler a")]
    pub sampler_name: Option<String>,
    /// Older clients' name for `sampler_name`.
    pub sampler_index: Option<String>,
    /// A1111 scheduler (`Automatic`, `Karras`, ...; `GET /sdapi/v1/schedulers`).
    #[schema(default = "Automatic")]
    pub scheduler: Option<String>,
    #[schema(default = 50, minimum = 1)]
    pub steps: Option<u32>,
    #[schema(default = 7.0)]
    pub cfg_scale: Option<f64>,
    /// The model's native width when absent.
    pub width: Option<u32>,
    /// The model's native height when absent.
    pub height: Option<u32>,
    /// Images per batch; images in all = batch_size × n_iter.
    #[schema(default = 1, minimum = 1)]
    pub batch_size: Option<u32>,
    /// Batches; image i uses seed + i over all batches, as in A1111.
    #[schema(default = 1, minimum = 1)]
    pub n_iter: Option<u32>,
    /// Honoured: `sd_model_checkpoint` (model title or name) and
    /// `CLIP_stop_at_last_layers` (clip skip); others are ignored.
    #[schema(value_type = Option<Object>)]
    pub override_settings: Option<Map<String, Value>>,
    /// False: the response carries no images.
    #[schema(default = true)]
    pub send_images: Option<bool>,
}

/// A1111's txt2img response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Txt2ImgResponse {
    /// PNG images, base64 (no data URI prefix).
    pub images: Vec<String>,
    /// The request, with A1111's defaults for absent fields.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON document as a string: `seed`, `all_seeds`, `infotexts`, `prompt`, ...
    pub info: String,
}

/// A1111's progress.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressResponse {
    /// 0 to 1 over the whole job.
    pub progress: f64,
    /// Estimated seconds left.
    pub eta_relative: f64,
    pub state: ProgressState,
    /// Always null: previews are not rendered.
    #[schema(value_type = Option<String>)]
    pub current_image: Option<String>,
    #[schema(value_type = Option<String>)]
    pub textinfo: Option<String>,
}

/// A1111's shared state, for the jobs of this dialect.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressState {
    pub skipped: bool,
    pub interrupted: bool,
    /// The running job's id, or empty.
    pub job: String,
    /// Jobs of this dialect queued or running.
    pub job_count: usize,
    /// The image being denoised (0-based).
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
}

/// A sampler, A1111 style.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct A1111Sampler {
    #[schema(example = "Euler a")]
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: Map<String, Value>,
}

/// A scheduler, A1111 style.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct A1111Scheduler {
    #[schema(example = "automatic")]
    pub name: String,
    #[schema(example = "Automatic")]
    pub label: String,
    pub aliases: Option<Vec<String>>,
}

/// A checkpoint, A1111 style.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct A1111Model {
    /// What `sd_model_checkpoint` takes.
    pub title: String,
    pub model_name: String,
    /// Null: hashing multi-gigabyte files at start-up is not worth it.
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

/// The png-info request.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct PngInfoRequest {
    /// A PNG, base64 or a data URI.
    pub image: String,
}

/// The png-info response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PngInfoResponse {
    /// The `parameters` text; empty when the image has none.
    pub info: String,
    /// Other text chunks (none are read; always empty).
    #[schema(value_type = Object)]
    pub items: Map<String, Value>,
    /// The parameters text parsed: `Prompt`, `Negative prompt`, `Steps`, `Seed`, ...
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

/// Resolves an A1111 sampler and scheduler to a sampler and schedule of this build.
/// Legacy combined names ("DPM++ 2M Karras") resolve through the samplers' own name
/// table; a `scheduler` other than `Automatic` overrides the schedule such a name implies.
/// The one place A1111 names are mapped.
pub fn resolve_sampler(
    sampler_name: Option<&str>,
    scheduler: Option<&str>,
) -> Result<(SamplerKind, Schedule), ApiError> {
    let name = sampler_name.map(str::trim).filter(|n| !n.is_empty()).unwrap_or(A1111_SAMPLER);
    let Some((kind, implied)) = resolve_sampler_name(name) else {
        let valid: Vec<&str> = SamplerKind::ALL.iter().map(|s| s.display_name()).collect();
        return Err(ApiError::invalid_value(
            "sampler_name",
            format!("sampler_name: unknown sampler {name:?}; valid samplers: {}", valid.join(", ")),
        ));
    };
    let explicit = match scheduler.map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(wanted) if wanted.eq_ignore_ascii_case("automatic") => None,
        Some(wanted) => {
            Some(scheduler_by_a1111_name(wanted).ok_or_else(|| unknown_scheduler(wanted))?)
        }
    };
    let schedule = explicit.or(implied).unwrap_or(Schedule::Default);
    if !kind.schedules().contains(&schedule) {
        return Err(ApiError::invalid_value(
            "scheduler",
            format!(
                "scheduler: sampler {:?} has no {} schedule on this server",
                kind.display_name(),
                schedule.display_name()
            ),
        ));
    }
    Ok((kind, schedule))
}

/// A schedule by A1111 scheduler id or label (`karras`, `Karras`, `SGM Uniform`, ...).
fn scheduler_by_a1111_name(wanted: &str) -> Option<Schedule> {
    Schedule::ALL.into_iter().find(|schedule| {
        schedule.id().eq_ignore_ascii_case(wanted)
            || schedule.display_name().eq_ignore_ascii_case(wanted)
    })
}

fn unknown_scheduler(wanted: &str) -> ApiError {
    let valid: Vec<String> = available_schedulers().into_iter().map(|s| s.label).collect();
    ApiError::invalid_value(
        "scheduler",
        format!(
            "scheduler: unknown or unavailable scheduler {wanted:?}; valid: {}",
            valid.join(", ")
        ),
    )
}

/// `automatic`, plus every schedule some sampler of this build offers.
fn available_schedulers() -> Vec<A1111Scheduler> {
    Schedule::ALL
        .into_iter()
        .filter(|schedule| SamplerKind::ALL.iter().any(|kind| kind.schedules().contains(schedule)))
        .map(|schedule| A1111Scheduler {
            name: if schedule == Schedule::Default { "automatic" } else { schedule.id() }
                .to_string(),
            label: schedule.display_name().to_string(),
            aliases: None,
        })
        .collect()
}

/// Finds a model by A1111 checkpoint title: the registry name, or a title such as
/// `name.safetensors [hash]`, or the file name of the model's path.
fn resolve_model<'a>(state: &'a AppState, title: &str) -> Result<&'a RegisteredModel, ApiError> {
    let without_hash = match title.rsplit_once(" [") {
        Some((head, tail)) if tail.ends_with(']') => head,
        _ => title,
    }
    .trim();
    let stem = without_hash
        .rsplit_once('.')
        .filter(|(_, ext)| matches!(*ext, "safetensors" | "ckpt"))
        .map_or(without_hash, |(stem, _)| stem);
    let registry = &state.registry;
    registry
        .models
        .iter()
        .find(|m| {
            let file = m.spec.path.file_name().map(|f| f.to_string_lossy().to_string());
            [title, without_hash, stem].iter().any(|t| m.spec.name == *t)
                || file.as_deref().is_some_and(|f| f == without_hash || f == stem)
        })
        .ok_or_else(|| {
            let valid: Vec<String> = registry.models.iter().map(|m| m.spec.name.clone()).collect();
            ApiError::model_not_found(title, &valid).with_param("sd_model_checkpoint")
        })
}

fn clip_skip_option(value: &Value) -> Result<u32, ApiError> {
    value.as_u64().filter(|n| (1..=12).contains(n)).map(|n| n as u32).ok_or_else(|| {
        ApiError::invalid_value(
            "CLIP_stop_at_last_layers",
            format!("CLIP_stop_at_last_layers: must be an integer from 1 to 12, got {value}"),
        )
    })
}

/// The field names `T` knows (from a default value serialized with every field).
fn known_fields<T: Default + Serialize>() -> HashSet<String> {
    match serde_json::to_value(T::default()) {
        Ok(Value::Object(fields)) => fields.into_iter().map(|(k, _)| k).collect(),
        _ => HashSet::new(),
    }
}

fn log_ignored(route: &str, ignored: &[String]) {
    if !ignored.is_empty() {
        tracing::info!(route, ignored = %ignored.join(", "), "A1111 fields accepted but ignored");
    }
}

/// What a txt2img request becomes: the native request, and how A1111 sees it.
struct Translated {
    native: GenerateRequest,
    parameters: Value,
    batch_size: u32,
    send_images: bool,
}

fn translate(
    state: &AppState,
    raw: Value,
    route: &str,
    known: HashSet<String>,
) -> Result<Translated, ApiError> {
    let Value::Object(raw_fields) = &raw else {
        return Err(ApiError::invalid_value("body", "the body must be a JSON object"));
    };
    let request: Txt2ImgRequest = from_json_value(raw.clone())?;
    let mut ignored: Vec<String> =
        raw_fields.keys().filter(|k| !known.contains(*k)).cloned().collect();

    let (session_model, session_clip_skip) = {
        let session = state.a1111.lock();
        (session.default_model.clone(), session.clip_skip)
    };
    let mut model = session_model;
    let mut clip_skip = session_clip_skip;
    for (key, value) in request.override_settings.iter().flatten() {
        match key.as_str() {
            "sd_model_checkpoint" => {
                let title = value.as_str().ok_or_else(|| {
                    ApiError::invalid_value(
                        "sd_model_checkpoint",
                        "sd_model_checkpoint: must be a string",
                    )
                })?;
                model = Some(resolve_model(state, title)?.spec.name.clone());
            }
            "CLIP_stop_at_last_layers" => clip_skip = Some(clip_skip_option(value)?),
            other => ignored.push(format!("override_settings.{other}")),
        }
    }
    log_ignored(route, &ignored);

    let (sampler, schedule) = resolve_sampler(
        request.sampler_name.as_deref().or(request.sampler_index.as_deref()),
        request.scheduler.as_deref(),
    )?;
    let batch_size = request.batch_size.unwrap_or(1);
    let n_iter = request.n_iter.unwrap_or(1);
    for (field, value) in [("batch_size", batch_size), ("n_iter", n_iter)] {
        if value == 0 {
            return Err(ApiError::invalid_value(field, format!("{field}: must be at least 1")));
        }
    }
    let max_n = state.settings.limits.max_n;
    let n = batch_size.saturating_mul(n_iter);
    if n > max_n {
        return Err(ApiError::invalid_value(
            "batch_size",
            format!("batch_size: batch_size × n_iter is {n}, more than this server's {max_n} images per request"),
        ));
    }
    let native = GenerateRequest {
        model: model.clone(),
        prompt: Some(request.prompt.clone().unwrap_or_default()),
        negative_prompt: request.negative_prompt.clone(),
        width: request.width,
        height: request.height,
        steps: Some(request.steps.unwrap_or(A1111_STEPS)),
        guidance_scale: Some(request.cfg_scale.unwrap_or(A1111_CFG_SCALE)),
        sampler: Some(sampler.id().to_string()),
        schedule: Some(schedule.id().to_string()),
        seed: request.seed,
        n: Some(n),
        clip_skip,
        output_format: Some(super::dto::OutputFormat::Png),
        ..Default::default()
    };
    let registered = state.registry.resolve(model.as_deref())?;
    let mut parameters = raw_fields.clone();
    for (key, default) in [
        ("prompt", json!("")),
        ("negative_prompt", json!("")),
        ("seed", json!(-1)),
        ("sampler_name", json!(sampler.display_name())),
        ("scheduler", json!(schedule.display_name())),
        ("steps", json!(A1111_STEPS)),
        ("cfg_scale", json!(A1111_CFG_SCALE)),
        ("width", json!(registered.defaults.width)),
        ("height", json!(registered.defaults.height)),
        ("batch_size", json!(1)),
        ("n_iter", json!(1)),
    ] {
        let slot = parameters.entry(key).or_insert(Value::Null);
        if slot.is_null() {
            *slot = default;
        }
    }
    Ok(Translated {
        native,
        parameters: Value::Object(parameters),
        batch_size,
        send_images: request.send_images.unwrap_or(true),
    })
}

/// A1111's `info` document for a finished job.
fn info_document(job: &JobSnapshot, batch_size: u32) -> Value {
    let r = &job.request;
    let seeds: Vec<u64> = (0..u64::from(r.n)).map(|i| r.seed + i).collect();
    let infotexts: Vec<String> = (0..r.n).map(|i| r.infotext(i)).collect();
    json!({
        "prompt": r.prompt,
        "all_prompts": vec![&r.prompt; r.n as usize],
        "negative_prompt": r.negative_prompt,
        "all_negative_prompts": vec![&r.negative_prompt; r.n as usize],
        "seed": r.seed,
        "all_seeds": seeds,
        "subseed": r.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": r.width,
        "height": r.height,
        "sampler_name": r.sampler.display_name(),
        "cfg_scale": r.guidance_scale,
        "steps": r.steps,
        "batch_size": batch_size,
        "clip_skip": r.clip_skip,
        "sd_model_name": r.model,
        "sd_model_hash": Value::Null,
        "restore_faces": false,
        "styles": [],
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_timestamp": job.created_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string(),
        "version": format!("sdserve {}", env!("CARGO_PKG_VERSION")),
        "interrupted": job.state == JobState::Cancelled,
    })
}

/// Text to image, AUTOMATIC1111 style.
///
/// A thin translation into `POST /v1/generate` with A1111's names and defaults (steps
/// 50, cfg_scale 7, sampler `Euler`, seed -1); n = batch_size × n_iter. Unknown fields
/// are accepted, ignored and logged. `<lora:...>` in the prompt is passed on as text.
#[utoipa::path(
    post, path = "/sdapi/v1/txt2img", tag = "automatic1111",
    request_body = Txt2ImgRequest,
    responses(
        (status = 200, description = "The images (none when interrupted)", body = Txt2ImgResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 422, description = "Invalid value; `param` names the field (also in `detail`)", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "Shutting down", body = ErrorResponse),
    )
)]
pub async fn txt2img(
    State(state): State<AppState>,
    AppJson(raw): AppJson<Value>,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    let translated = translate(&state, raw, "/sdapi/v1/txt2img", known_fields::<Txt2ImgRequest>())?;
    run_translated(&state, translated).await
}

/// Runs a translated A1111 request and answers in A1111's shape.
async fn run_translated(
    state: &AppState,
    translated: Translated,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    let job = submit(state, &translated.native, None)?;
    {
        let mut session = state.a1111.lock();
        session.jobs.push(job.id.clone());
        session.interrupted = false;
    }
    let finished = wait_for_job(state, &job.id).await;
    state.a1111.lock().jobs.retain(|id| *id != job.id);
    let finished = finished?;
    let images = match finished.state {
        JobState::Succeeded if translated.send_images => {
            let result =
                finished.result.as_ref().expect("succeeded jobs carry a result; this is a bug");
            result.images.iter().map(|image| codec::base64_encode(&image.bytes)).collect()
        }
        JobState::Succeeded | JobState::Cancelled => Vec::new(),
        _ => return Err(unsuccessful_job_error(&finished)),
    };
    let info = info_document(&finished, translated.batch_size).to_string();
    Ok(Json(Txt2ImgResponse { images, parameters: translated.parameters, info }))
}

/// A1111's img2img request: the txt2img fields plus the image ones below (any other
/// field is accepted and ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Img2ImgRequest {
    #[serde(flatten)]
    pub base: Txt2ImgRequest,
    /// The init image (base64 or data URI); only the first is used.
    pub init_images: Option<Vec<String>>,
    /// Inpainting mask: white = repaint.
    pub mask: Option<String>,
    #[schema(default = 0.75)]
    pub denoising_strength: Option<f64>,
    #[schema(default = 4)]
    pub mask_blur: Option<u32>,
    /// 0 just resize, 1 crop and resize, 2 resize and fill (3, latent upscale, is refused).
    #[schema(default = 0)]
    pub resize_mode: Option<u32>,
    /// Accepted and ignored: the masked area always starts from the noised original
    /// (A1111's "original", 1); "fill", "latent noise" and "latent nothing" are not
    /// implemented.
    pub inpainting_fill: Option<u32>,
    /// "Only masked" inpainting (the masked region at full size); ignored without a mask.
    #[schema(default = false)]
    pub inpaint_full_res: Option<bool>,
    pub inpaint_full_res_padding: Option<u32>,
    /// 1 inverts the mask (black = repaint).
    #[schema(default = 0)]
    pub inpainting_mask_invert: Option<u32>,
}

/// Image to image and inpainting, AUTOMATIC1111 style.
///
/// The txt2img translation plus `init_images[0]` → `init_image`, `mask` → `mask_image`,
/// `denoising_strength` → `strength`, `mask_blur`, `resize_mode` (0/1/2 → resize, crop,
/// fill), `inpaint_full_res` + `inpaint_full_res_padding` (with a mask). `inpainting_fill`
/// is ignored (the masked region always starts from the noised original). Without
/// width/height the output takes the init image's size. The original is pasted back
/// outside the blurred mask, as A1111 does.
#[utoipa::path(
    post, path = "/sdapi/v1/img2img", tag = "automatic1111",
    request_body = Img2ImgRequest,
    responses(
        (status = 200, description = "The images (none when interrupted)", body = Txt2ImgResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 422, description = "Missing, undecodable or invalid field; `param` names it", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "Shutting down", body = ErrorResponse),
    )
)]
pub async fn img2img(
    State(state): State<AppState>,
    AppJson(raw): AppJson<Value>,
) -> Result<Json<Txt2ImgResponse>, ApiError> {
    let request: Img2ImgRequest = from_json_value(raw.clone())?;
    let init = request.init_images.as_ref().and_then(|images| images.first()).ok_or_else(|| {
        ApiError::invalid_value("init_images", "init_images: needs at least one image")
    })?;
    let rename = |error: crate::error::ValidationError, field: &str| {
        ApiError::invalid_value(field.to_string(), format!("{field}: {}", error.message))
    };
    image_input::decode_init_image("init_images", init).map_err(|e| rename(e, "init_images"))?;
    let mask = match &request.mask {
        Some(mask) if request.inpainting_mask_invert == Some(1) => {
            let (width, height, luma) =
                image_input::decode_mask("mask", mask).map_err(|e| rename(e, "mask"))?;
            let rgb: Vec<u8> = luma.iter().flat_map(|&v| [255 - v; 3]).collect();
            let png = codec::encode_image(&rgb, width, height, codec::ImageFormat::Png, None, None)
                .map_err(|e| ApiError::invalid_value("mask", format!("mask: {e}")))?;
            Some(codec::base64_encode(&png))
        }
        Some(mask) => {
            image_input::decode_mask("mask", mask).map_err(|e| rename(e, "mask"))?;
            Some(mask.clone())
        }
        None => None,
    };
    let resize_mode = match request.resize_mode {
        None => None,
        Some(index) => Some(ResizeMode::from_a1111(index).ok_or_else(|| {
            ApiError::invalid_value(
                "resize_mode",
                format!("resize_mode: {index} is not supported; use 0, 1 or 2"),
            )
        })?),
    };
    let mut translated =
        translate(&state, raw, "/sdapi/v1/img2img", known_fields::<Img2ImgRequest>())?;
    let native = &mut translated.native;
    // A1111 takes the output size from the request (512 by default); sdserve's default is
    // the init image's own size, so only explicit sizes are passed on.
    native.init_image = Some(init.clone());
    native.strength = Some(request.denoising_strength.unwrap_or(0.75));
    native.resize_mode = resize_mode.map(|mode| mode.id().to_string());
    native.mask_blur = request.mask_blur;
    native.inpaint_full_res = request.inpaint_full_res.filter(|_| mask.is_some());
    native.inpaint_full_res_padding = request.inpaint_full_res_padding;
    native.mask_image = mask;
    if let Value::Object(parameters) = &mut translated.parameters {
        parameters.remove("init_images");
        parameters.remove("mask");
        parameters.entry("denoising_strength").or_insert(json!(0.75));
    }
    run_translated(&state, translated).await
}

/// Progress of this dialect's running job (A1111 shape).
#[utoipa::path(
    get, path = "/sdapi/v1/progress", tag = "automatic1111",
    params(("skip_current_image" = Option<bool>, Query, description = "Accepted; previews are never rendered")),
    responses((status = 200, description = "Progress", body = ProgressResponse))
)]
pub async fn progress(State(state): State<AppState>) -> Json<ProgressResponse> {
    let (snapshots, interrupted) = live_jobs(&state);
    let running = snapshots.iter().find(|job| job.state == JobState::Running);
    let mut response = ProgressResponse {
        progress: 0.0,
        eta_relative: 0.0,
        state: ProgressState {
            skipped: false,
            interrupted,
            job: String::new(),
            job_count: snapshots.len(),
            job_no: 0,
            sampling_step: 0,
            sampling_steps: 0,
        },
        current_image: None,
        textinfo: None,
    };
    if let Some(job) = running {
        // The steps that run (img2img runs int(steps × strength)); once the pipeline
        // reports, its own count.
        let images = (job.request.n as usize).max(1);
        let per_image = match &job.progress {
            Some(progress) if progress.steps >= images => progress.steps / images,
            _ => job.request.denoising_steps(),
        };
        response.state.job = job.id.to_string();
        response.state.sampling_steps = per_image;
        if let Some(progress) = &job.progress {
            if progress.steps > 0 {
                response.progress = progress.step as f64 / progress.steps as f64;
            }
            response.eta_relative = progress.eta_ms.unwrap_or(0) as f64 / 1000.0;
            let image = (progress.step / per_image.max(1)).min(job.request.n as usize - 1);
            response.state.job_no = image;
            response.state.sampling_step = progress.step - image * per_image;
        }
    }
    Json(response)
}

/// This dialect's unfinished jobs (forgetting finished ones), and the interrupted flag.
fn live_jobs(state: &AppState) -> (Vec<JobSnapshot>, bool) {
    let mut session = state.a1111.lock();
    let mut live = Vec::new();
    session.jobs.retain(|id| match state.jobs.get(id) {
        Ok(job) if !job.state.is_finished() => {
            live.push(job);
            true
        }
        _ => false,
    });
    (live, session.interrupted)
}

fn stop_running(state: &AppState) -> Json<Value> {
    let (jobs, _) = live_jobs(state);
    let mut stopped = 0;
    for job in jobs.iter().filter(|job| job.state == JobState::Running) {
        if let Ok(CancelOutcome::Cancelling(_) | CancelOutcome::Cancelled(_)) =
            state.jobs.cancel(&job.id)
        {
            stopped += 1;
        }
    }
    if stopped > 0 {
        state.a1111.lock().interrupted = true;
        tracing::info!(stopped, "A1111 interrupt: running jobs stop at their next step");
    }
    Json(json!({}))
}

/// Stop the running txt2img job(s) of this dialect at their next step (queued ones
/// still run, as in A1111). The interrupted request answers with no images.
#[utoipa::path(
    post, path = "/sdapi/v1/interrupt", tag = "automatic1111",
    responses((status = 200, description = "Done", body = Object))
)]
pub async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    stop_running(&state)
}

/// Same as interrupt: the images of a batch are denoised together, so one image cannot
/// be skipped alone.
#[utoipa::path(
    post, path = "/sdapi/v1/skip", tag = "automatic1111",
    responses((status = 200, description = "Done", body = Object))
)]
pub async fn skip(State(state): State<AppState>) -> Json<Value> {
    stop_running(&state)
}

/// The samplers (A1111 shape); `aliases` holds sdserve's id and other accepted names.
#[utoipa::path(
    get, path = "/sdapi/v1/samplers", tag = "automatic1111",
    responses((status = 200, description = "Samplers", body = Vec<A1111Sampler>))
)]
pub async fn samplers() -> Json<Vec<A1111Sampler>> {
    Json(
        SamplerKind::ALL
            .iter()
            .map(|kind| A1111Sampler {
                name: kind.display_name().to_string(),
                aliases: std::iter::once(kind.id())
                    .chain(kind.aliases().iter().copied())
                    .map(String::from)
                    .collect(),
                options: Map::new(),
            })
            .collect(),
    )
}

/// The schedulers (A1111 shape): `automatic`, plus those some sampler offers.
#[utoipa::path(
    get, path = "/sdapi/v1/schedulers", tag = "automatic1111",
    responses((status = 200, description = "Schedulers", body = Vec<A1111Scheduler>))
)]
pub async fn schedulers() -> Json<Vec<A1111Scheduler>> {
    Json(available_schedulers())
}

/// The models (A1111 checkpoint shape).
#[utoipa::path(
    get, path = "/sdapi/v1/sd-models", tag = "automatic1111",
    responses((status = 200, description = "Checkpoints", body = Vec<A1111Model>))
)]
pub async fn sd_models(State(state): State<AppState>) -> Json<Vec<A1111Model>> {
    Json(
        state
            .registry
            .models
            .iter()
            .map(|m| A1111Model {
                title: m.spec.name.clone(),
                model_name: m.spec.name.clone(),
                hash: None,
                sha256: None,
                filename: m.spec.path.display().to_string(),
                config: None,
            })
            .collect(),
    )
}

/// LoRAs of the configured `lora_dirs` (A1111 shape: name, alias, file name, metadata).
#[utoipa::path(
    get, path = "/sdapi/v1/loras", tag = "automatic1111",
    responses((status = 200, description = "LoRAs", body = Vec<Object>))
)]
pub async fn loras(State(state): State<AppState>) -> Json<Vec<Value>> {
    let library = state.loras.clone();
    // Listing reads file headers from disk: keep it off the async runtime's threads.
    let infos = tokio::task::spawn_blocking(move || library.list()).await.unwrap_or_default();
    Json(
        infos
            .into_iter()
            .map(|info| {
                json!({
                    "name": info.name,
                    "alias": info.name,
                    "path": format!("{}.safetensors", info.name),
                    "metadata": info.metadata,
                })
            })
            .collect(),
    )
}

/// Textual inversion embeddings of the configured `embeddings_dirs` (A1111 shape).
#[utoipa::path(
    get, path = "/sdapi/v1/embeddings", tag = "automatic1111",
    responses((status = 200, description = "Embeddings", body = Object,
        example = json!({"loaded": {}, "skipped": {}})))
)]
pub async fn embeddings(State(state): State<AppState>) -> Json<Value> {
    let loaded: Map<String, Value> = super::system::embedding_infos(&state)
        .await
        .into_iter()
        .map(|info| {
            let entry = json!({
                "step": Value::Null,
                "sd_checkpoint": Value::Null,
                "sd_checkpoint_name": Value::Null,
                "shape": info.width,
                "vectors": info.vectors,
            });
            (info.name, entry)
        })
        .collect();
    Json(json!({"loaded": loaded, "skipped": {}}))
}

fn current_options(state: &AppState) -> Value {
    let session = state.a1111.lock();
    let model =
        session.default_model.clone().unwrap_or_else(|| state.registry.default_model.clone());
    json!({
        "sd_model_checkpoint": model,
        "sd_checkpoint_hash": Value::Null,
        "CLIP_stop_at_last_layers": session.clip_skip.unwrap_or(1),
        "samples_format": "png",
        "sd_vae": "Automatic",
        "eta_noise_seed_delta": 0,
    })
}

/// The options A1111 clients read (`sd_model_checkpoint`, `CLIP_stop_at_last_layers`,
/// ...).
#[utoipa::path(
    get, path = "/sdapi/v1/options", tag = "automatic1111",
    responses((status = 200, description = "Options", body = Object))
)]
pub async fn get_options(State(state): State<AppState>) -> Json<Value> {
    Json(current_options(&state))
}

/// Set options: `sd_model_checkpoint` (the default model of A1111 requests) and
/// `CLIP_stop_at_last_layers` (their default clip skip); other options are ignored and
/// logged.
#[utoipa::path(
    post, path = "/sdapi/v1/options", tag = "automatic1111",
    request_body(content = Object, example = json!({"sd_model_checkpoint": "shapes"})),
    responses(
        (status = 200, description = "Set", body = bool),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 422, description = "Invalid value", body = ErrorResponse),
    )
)]
pub async fn set_options(
    State(state): State<AppState>,
    AppJson(options): AppJson<BTreeMap<String, Value>>,
) -> Result<Json<bool>, ApiError> {
    let mut model = None;
    let mut clip_skip = None;
    let mut ignored = Vec::new();
    for (key, value) in &options {
        match key.as_str() {
            "sd_model_checkpoint" => {
                let title = value.as_str().ok_or_else(|| {
                    ApiError::invalid_value(
                        "sd_model_checkpoint",
                        "sd_model_checkpoint: must be a string",
                    )
                })?;
                model = Some(resolve_model(&state, title)?.spec.name.clone());
            }
            "CLIP_stop_at_last_layers" => clip_skip = Some(clip_skip_option(value)?),
            other => ignored.push(other.to_string()),
        }
    }
    log_ignored("/sdapi/v1/options", &ignored);
    let mut session = state.a1111.lock();
    if model.is_some() {
        session.default_model = model;
    }
    if clip_skip.is_some() {
        session.clip_skip = clip_skip;
    }
    Ok(Json(true))
}

/// Splits an A1111 infotext into its fields: `Prompt`, `Negative prompt`, and each
/// `key: value` of the last line (values may be quoted when they hold commas).
pub fn parse_infotext(text: &str) -> Map<String, Value> {
    let mut fields = Map::new();
    let mut lines: Vec<&str> = text.lines().collect();
    let settings = match lines.last() {
        Some(last) if last.contains("Steps: ") => lines.pop(),
        _ => None,
    };
    let (mut prompt, mut negative, mut in_negative) = (Vec::new(), Vec::new(), false);
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    fields.insert("Prompt".into(), Value::String(prompt.join("\n")));
    fields.insert("Negative prompt".into(), Value::String(negative.join("\n")));
    for (key, value) in settings.map(split_settings).unwrap_or_default() {
        fields.insert(key, Value::String(value));
    }
    fields
}

fn split_settings(line: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let (mut part, mut quoted) = (String::new(), false);
    let mut push = |part: &str| {
        if let Some((key, value)) = part.split_once(':') {
            let value = value.trim();
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
            pairs.push((key.trim().to_string(), value.to_string()));
        }
    };
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                part.push(c);
            }
            ',' if !quoted => {
                push(&part);
                part.clear();
            }
            _ => part.push(c),
        }
    }
    push(&part);
    pairs
}

/// The generation parameters a PNG carries (A1111's `parameters` text chunk).
#[utoipa::path(
    post, path = "/sdapi/v1/png-info", tag = "automatic1111",
    request_body = PngInfoRequest,
    responses(
        (status = 200, description = "The parameters (empty when there are none)", body = PngInfoResponse),
        (status = 422, description = "Not base64", body = ErrorResponse),
    )
)]
pub async fn png_info(
    State(state): State<AppState>,
    AppJson(body): AppJson<PngInfoRequest>,
) -> Result<Json<PngInfoResponse>, ApiError> {
    let data = body.image.trim();
    let payload = match data.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map_or("", |(_, payload)| payload),
        None => data,
    };
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.len() / 4 * 3 > state.settings.limits.max_body_bytes {
        return Err(ApiError::invalid_value("image", "image: larger than this server accepts"));
    }
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::invalid_value("image", format!("image: invalid base64: {e}")))?;
    let info = codec::png_parameters(&bytes).unwrap_or_default();
    let parameters = if info.is_empty() { Map::new() } else { parse_infotext(&info) };
    Ok(Json(PngInfoResponse { info, items: Map::new(), parameters }))
}

/// Adds A1111's top-level `detail` (the message) to error bodies of `/sdapi` routes, for
/// clients that read FastAPI's error field; the OpenAI-shaped `error` object stays.
pub async fn add_error_detail(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if !(response.status().is_client_error() || response.status().is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return parts.into_response();
    };
    let mut value: Value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(_) => return Response::from_parts(parts, Body::from(bytes)),
    };
    if let Some(message) = value.pointer("/error/message").cloned() {
        value["detail"] = message;
    }
    let bytes = serde_json::to_vec(&value).expect("JSON values serialize; this is a bug");
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_resolve_with_and_without_schedulers() {
        let resolve = |name, scheduler| resolve_sampler(name, scheduler).unwrap();
        assert_eq!(resolve(None, None), (SamplerKind::Euler, Schedule::Default));
        assert_eq!(
            resolve(Some("Euler a"), Some("Automatic")),
            (SamplerKind::EulerA, Schedule::Default)
        );
        assert_eq!(resolve(Some("euler_a"), Some("")), (SamplerKind::EulerA, Schedule::Default));
        assert_eq!(
            resolve(Some("DDIM"), Some("automatic")),
            (SamplerKind::Ddim, Schedule::Default)
        );
        let unknown = resolve_sampler(Some("Warp"), None).unwrap_err();
        assert_eq!(unknown.detail.param.as_deref(), Some("sampler_name"));
        let bad_scheduler = resolve_sampler(Some("Euler"), Some("Zigzag")).unwrap_err();
        assert_eq!(bad_scheduler.detail.param.as_deref(), Some("scheduler"));
    }

    #[test]
    fn legacy_combined_names_resolve_like_sampler_plus_scheduler() {
        // As webuiapi sends them: the legacy name with scheduler "automatic".
        for (combined, apart) in [
            ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
            ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
            ("LMS Karras", ("LMS", "karras")),
        ] {
            let legacy = resolve_sampler(Some(combined), Some("automatic")).unwrap();
            assert_eq!(
                legacy,
                resolve_sampler(Some(apart.0), Some(apart.1)).unwrap(),
                "{combined}"
            );
            assert_ne!(legacy.1, Schedule::Default, "{combined}");
        }
    }

    #[test]
    fn infotexts_parse_into_fields() {
        let fields = parse_infotext(
            "a cat, sitting\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: \"a, b\"",
        );
        assert_eq!(fields["Prompt"], "a cat, sitting");
        assert_eq!(fields["Negative prompt"], "blurry");
        assert_eq!(fields["Steps"], "2");
        assert_eq!(fields["Sampler"], "Euler a");
        assert_eq!(fields["Model"], "a, b");
    }
}
