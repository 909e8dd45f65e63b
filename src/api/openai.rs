//! The OpenAI Images dialect: `POST /v1/images/generations` translated into the native
//! request (same validation, queue and workers), answered in OpenAI's response shape;
//! `POST /v1/images/edits` becomes an img2img / inpainting request (the mask's
//! transparency marks what to repaint).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Multipart, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::dto::{GenerateRequest, OutputFormat};
use super::error::{ApiError, AppJson, ErrorResponse};
use super::native::{submit, unsuccessful_job_error, wait_for_job};
use super::AppState;
use crate::codec;
use crate::jobs::{JobSnapshot, JobState};
use crate::pipeline::image_input;

/// How images come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// The encoded image, base64, in the response.
    #[default]
    B64Json,
    /// A URL of this server (`/v1/jobs/{id}/images/{index}`) that serves the image while
    /// the job's result is retained (`result_retention_secs`).
    Url,
}

/// OpenAI's image generation request, plus the extensions local servers add. Unknown
/// fields are refused (422), as OpenAI refuses them.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageGenerationRequest {
    /// What to draw. Required.
    #[schema(example = "a watercolor fox in the snow")]
    pub prompt: Option<String>,
    /// Registry name of the model. OpenAI's own names (`dall-e-2`, `dall-e-3`,
    /// `gpt-image-*`) and absence mean the server's default model.
    #[schema(example = "shapes")]
    pub model: Option<String>,
    /// Number of images.
    #[schema(default = 1, minimum = 1)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` (multiples of 8) or `auto`; the model's native size when absent.
    #[schema(example = "512x512")]
    pub size: Option<String>,
    /// `b64_json` (the default here) or `url`.
    pub response_format: Option<ResponseFormat>,
    /// `png`, `jpeg` or `webp`; the server's default when absent.
    pub output_format: Option<OutputFormat>,
    /// JPEG compression 0-100 (0 = best quality); becomes quality `100 - compression`.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Accepted for compatibility, no effect: `standard`, `hd`, `low`, `medium`, `high`,
    /// `auto` (use `steps` to trade time for quality).
    pub quality: Option<String>,
    /// Accepted for compatibility, no effect: `vivid` or `natural`.
    pub style: Option<String>,
    /// `auto` or `opaque` (no effect); `transparent` is refused.
    pub background: Option<String>,
    /// Accepted for compatibility, no effect.
    pub moderation: Option<String>,
    /// Accepted for compatibility (end-user id), only logged.
    pub user: Option<String>,
    /// Streaming is not offered; only `false` is accepted.
    pub stream: Option<bool>,
    /// Extension: what to steer away from.
    pub negative_prompt: Option<String>,
    /// Extension: denoising steps.
    #[schema(minimum = 1)]
    pub steps: Option<u32>,
    /// Extension: classifier-free guidance scale.
    pub guidance_scale: Option<f64>,
    /// Extension: seed of the first image (image i uses seed + i); -1 or absent: random.
    pub seed: Option<i64>,
    /// Extension: sampler id or A1111 name (`GET /v1/samplers`).
    pub sampler: Option<String>,
    /// Extension: CLIP layers to skip, A1111 style.
    pub clip_skip: Option<u32>,
    /// Extension: LoRAs to apply (`GET /v1/loras`), as in the native API.
    pub loras: Option<Vec<super::dto::LoraRequest>>,
    /// Extension: IP-Adapters (reference images), as in the native API.
    pub ip_adapters: Option<Vec<super::dto::IpAdapterRequest>>,
}

/// One image of an OpenAI-style response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiImage {
    /// The encoded image, base64 (response_format `b64_json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Where to download the image while it is retained (response_format `url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The prompt as used (sdserve does not rewrite prompts).
    pub revised_prompt: String,
    /// Extension: the seed this image was made from.
    pub seed: u64,
}

/// OpenAI's images response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<OpenAiImage>,
}

/// OpenAI model names that mean "the default model", so clients configured for OpenAI
/// work unchanged.
fn is_openai_model_name(name: &str) -> bool {
    name.starts_with("dall-e") || name.starts_with("gpt-image")
}

/// Parses `WIDTHxHEIGHT` (or `auto`: the model's size).
fn parse_size(size: &str) -> Result<Option<(u32, u32)>, ApiError> {
    let size = size.trim();
    if size.is_empty() || size.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let parsed = size
        .split_once(['x', 'X', '×'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some(dimensions) => Ok(Some(dimensions)),
        None => Err(ApiError::invalid_value(
            "size",
            format!("size: expected WIDTHxHEIGHT such as 512x512, or auto; got {size:?}"),
        )),
    }
}

/// Checks a no-op option against the values OpenAI documents, so typos are caught.
fn check_choice(field: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(value) if !allowed.contains(&value) => Err(ApiError::invalid_value(
            field,
            format!("{field}: {value:?} is not one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    }
}

impl ImageGenerationRequest {
    /// The native request this one means.
    fn to_native(&self) -> Result<GenerateRequest, ApiError> {
        let prompt = self
            .prompt
            .clone()
            .ok_or_else(|| ApiError::invalid_value("prompt", "prompt: is required"))?;
        check_choice(
            "quality",
            self.quality.as_deref(),
            &["standard", "hd", "low", "medium", "high", "auto"],
        )?;
        check_choice("style", self.style.as_deref(), &["vivid", "natural"])?;
        check_choice("moderation", self.moderation.as_deref(), &["auto", "low"])?;
        match self.background.as_deref() {
            Some("transparent") => {
                return Err(ApiError::invalid_value(
                    "background",
                    "background: transparent images are not supported; use auto or opaque",
                ))
            }
            other => check_choice("background", other, &["auto", "opaque"])?,
        }
        if self.stream == Some(true) {
            return Err(ApiError::invalid_value(
                "stream",
                "stream: streaming is not supported; follow an async job's progress with \
                 POST /v1/jobs and GET /v1/jobs/{id}/events instead",
            ));
        }
        let output_quality = match self.output_compression {
            Some(compression) if compression > 100 => {
                return Err(ApiError::invalid_value(
                    "output_compression",
                    format!("output_compression: must be between 0 and 100, got {compression}"),
                ))
            }
            Some(compression) => Some((100 - compression).max(1)),
            None => None,
        };
        let size = self.size.as_deref().map(parse_size).transpose()?.flatten();
        let model = self.model.clone().filter(|name| !is_openai_model_name(name));
        Ok(GenerateRequest {
            model,
            prompt: Some(prompt),
            negative_prompt: self.negative_prompt.clone(),
            width: size.map(|(w, _)| w),
            height: size.map(|(_, h)| h),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            sampler: self.sampler.clone(),
            seed: self.seed,
            n: self.n,
            clip_skip: self.clip_skip,
            output_format: self.output_format,
            output_quality,
            loras: self.loras.clone().unwrap_or_default(),
            ip_adapters: self.ip_adapters.clone().unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// The address clients reached this server at, for image URLs: the `X-Forwarded-Proto`
/// and `X-Forwarded-Host` a reverse proxy sets, else `http` and the `Host` header.
fn public_base_url(headers: &HeaderMap, state: &AppState) -> String {
    let header_text = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').next().unwrap_or(""))
    };
    let scheme = header_text("x-forwarded-proto").map(str::trim).unwrap_or("http");
    let host = header_text("x-forwarded-host")
        .or_else(|| header_text(header::HOST.as_str()))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| state.settings.bind.to_string());
    format!("{scheme}://{host}")
}

fn images_response(job: &JobSnapshot, format: ResponseFormat, base_url: &str) -> ImagesResponse {
    let result = job.result.as_ref().expect("succeeded jobs carry a result; this is a bug");
    let created = job
        .finished_at
        .unwrap_or_else(SystemTime::now)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data = result
        .images
        .iter()
        .map(|image| {
            let (b64_json, url) = match format {
                ResponseFormat::B64Json => (Some(codec::base64_encode(&image.bytes)), None),
                ResponseFormat::Url => {
                    (None, Some(format!("{base_url}/v1/jobs/{}/images/{}", job.id, image.index)))
                }
            };
            OpenAiImage {
                b64_json,
                url,
                revised_prompt: job.request.prompt.clone(),
                seed: image.seed,
            }
        })
        .collect();
    ImagesResponse { created, data }
}

/// Create images (OpenAI Images API).
///
/// A thin translation into `POST /v1/generate`: the same validation, queue and workers.
/// `quality`, `style`, `moderation` and `user` are accepted and have no effect;
/// `output_compression` maps to JPEG quality `100 - compression`. Extensions:
/// `negative_prompt`, `steps`, `guidance_scale`, `seed`, `sampler`, `clip_skip`, `loras`,
/// `ip_adapters`.
#[utoipa::path(
    post, path = "/v1/images/generations", tag = "openai",
    request_body = ImageGenerationRequest,
    responses(
        (status = 200, description = "The images", body = ImagesResponse,
            headers(("x-job-id" = String, description = "The job id"))),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 409, description = "The job was cancelled", body = ErrorResponse),
        (status = 422, description = "Invalid value; `param` names the field", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "Shutting down", body = ErrorResponse),
    )
)]
pub async fn create_images(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(body): AppJson<ImageGenerationRequest>,
) -> Result<Response, ApiError> {
    let native = body.to_native()?;
    if let Some(user) = &body.user {
        tracing::info!(user = %user, "OpenAI images request");
    }
    let job = submit(&state, &native, None).map_err(|mut error| {
        // OpenAI clients send one `size`; name it rather than our width / height.
        if matches!(error.detail.param.as_deref(), Some("width" | "height")) {
            error.detail.message = format!("size: {}", error.detail.message);
            error.detail.param = Some("size".into());
        }
        error
    })?;
    let finished = wait_for_job(&state, &job.id).await?;
    if finished.state != JobState::Succeeded {
        return Err(unsuccessful_job_error(&finished));
    }
    let base_url = public_base_url(&headers, &state);
    let format = body.response_format.unwrap_or_default();
    let mut response = Json(images_response(&finished, format, &base_url)).into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-job-id"),
        HeaderValue::from_str(finished.id.as_str()).expect("ids are ASCII"),
    );
    Ok(response)
}

/// The multipart form of an image edit request, as OpenAI documents it, plus sdserve's
/// extensions.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct ImageEditForm {
    /// The image to edit (PNG, JPEG or WebP); `image[]` is accepted too (the first one
    /// is used).
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Where to edit: fully transparent pixels (alpha 0) are repainted, opaque ones kept
    /// (partial alpha repaints partly). Without a mask the whole image is reworked
    /// (img2img).
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Vec<u8>>,
    /// What to draw. Required.
    prompt: String,
    model: Option<String>,
    n: Option<u32>,
    /// `WIDTHxHEIGHT`; the image's own size (down to a multiple of 8) when absent.
    size: Option<String>,
    response_format: Option<ResponseFormat>,
    /// Extension: how much of the image is reworked (0-1]; default 1 with a mask (the
    /// masked region is repainted from noise), 0.75 without.
    strength: Option<f64>,
    /// Extension.
    negative_prompt: Option<String>,
    /// Extension.
    steps: Option<u32>,
    /// Extension.
    guidance_scale: Option<f64>,
    /// Extension.
    seed: Option<i64>,
    /// Extension.
    sampler: Option<String>,
}

/// Parses a text field of the edit form, naming it on failure.
fn form_number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.trim().parse().map_err(|_| {
        ApiError::invalid_value(name.to_string(), format!("{name}: {text:?} is not a valid number"))
    })
}

/// Edit an image (OpenAI Images API): inpainting with a mask, img2img without.
///
/// A translation into `POST /v1/generate` with `init_image` (the `image`), `mask_image`
/// (the `mask`'s transparency turned into white = repaint) and `strength`. The original
/// is pasted back outside the mask. Extensions: `strength`, `negative_prompt`, `steps`,
/// `guidance_scale`, `seed`, `sampler`.
#[utoipa::path(
    post, path = "/v1/images/edits", tag = "openai",
    request_body(content = ImageEditForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The edited images", body = ImagesResponse,
            headers(("x-job-id" = String, description = "The job id"))),
        (status = 400, description = "Not a multipart form", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 422, description = "Missing, undecodable or invalid field; `param` names it", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "Shutting down", body = ErrorResponse),
    )
)]
pub async fn edit_images(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_multipart",
            format!("image edits take a multipart/form-data body: {rejection}"),
        )
    })?;
    let limits = &state.settings.limits;
    let max_pixels = u64::from(limits.max_width) * u64::from(limits.max_height);
    let mut native =
        GenerateRequest { output_format: Some(OutputFormat::Png), ..Default::default() };
    let mut response_format = ResponseFormat::default();
    let mut size = None;
    loop {
        let field = multipart.next_field().await.map_err(multipart_error)?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(multipart_error)?;
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match name.as_str() {
            "prompt" => native.prompt = Some(text()),
            "image" | "image[]" => {
                codec::decode_image_bytes(&bytes, max_pixels)
                    .map_err(|error| ApiError::invalid_value("image", format!("image: {error}")))?;
                if native.init_image.is_none() {
                    native.init_image = Some(codec::base64_encode(&bytes));
                }
            }
            "mask" => {
                let (width, height, luma) =
                    image_input::mask_from_alpha("mask", &codec::base64_encode(&bytes)).map_err(
                        |error| ApiError::invalid_value("mask", format!("mask: {}", error.message)),
                    )?;
                let rgb: Vec<u8> = luma.iter().flat_map(|&v| [v, v, v]).collect();
                let png = codec::encode_image(
                    &rgb,
                    width,
                    height,
                    codec::ImageFormat::Png,
                    None,
                    None,
                )
                .map_err(|error| ApiError::invalid_value("mask", format!("mask: {error}")))?;
                native.mask_image = Some(codec::base64_encode(&png));
            }
            "model" => native.model = Some(text()).filter(|m| !is_openai_model_name(m)),
            "n" => native.n = Some(form_number("n", &text())?),
            "size" => size = parse_size(&text())?,
            "response_format" => {
                response_format = match text().trim() {
                    "b64_json" => ResponseFormat::B64Json,
                    "url" => ResponseFormat::Url,
                    other => {
                        return Err(ApiError::invalid_value(
                            "response_format",
                            format!("response_format: {other:?} is not one of b64_json, url"),
                        ))
                    }
                }
            }
            "strength" => native.strength = Some(form_number("strength", &text())?),
            "negative_prompt" => native.negative_prompt = Some(text()),
            "steps" => native.steps = Some(form_number("steps", &text())?),
            "guidance_scale" => {
                native.guidance_scale = Some(form_number("guidance_scale", &text())?)
            }
            "seed" => native.seed = Some(form_number("seed", &text())?),
            "sampler" => native.sampler = Some(text()),
            _ => {}
        }
    }
    if native.prompt.is_none() {
        return Err(ApiError::invalid_value("prompt", "prompt: is required"));
    }
    if native.init_image.is_none() {
        return Err(ApiError::invalid_value("image", "image: is required"));
    }
    if native.mask_image.is_some() && native.strength.is_none() {
        native.strength = Some(1.0);
    }
    if let Some((width, height)) = size {
        native.width = Some(width);
        native.height = Some(height);
    }
    let job = submit(&state, &native, None)?;
    let finished = wait_for_job(&state, &job.id).await?;
    if finished.state != JobState::Succeeded {
        return Err(unsuccessful_job_error(&finished));
    }
    let base_url = public_base_url(&headers, &state);
    let mut response = Json(images_response(&finished, response_format, &base_url)).into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-job-id"),
        HeaderValue::from_str(finished.id.as_str()).expect("ids are ASCII"),
    );
    Ok(response)
}

fn multipart_error(error: axum::extract::multipart::MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            "the request body is larger than this server accepts (limits.max_body_bytes)",
        );
    }
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_multipart",
        format!("the multipart body cannot be read: {error}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_or_name_the_field() {
        assert_eq!(parse_size("512x768").unwrap(), Some((512, 768)));
        assert_eq!(parse_size("auto").unwrap(), None);
        assert_eq!(parse_size("64X64").unwrap(), Some((64, 64)));
        assert_eq!(parse_size("big").unwrap_err().detail.param.as_deref(), Some("size"));
    }

    #[test]
    fn openai_model_names_mean_the_default_model() {
        let request = ImageGenerationRequest {
            prompt: Some("x".into()),
            model: Some("dall-e-3".into()),
            output_compression: Some(20),
            ..Default::default()
        };
        let native = request.to_native().unwrap();
        assert_eq!(native.model, None);
        assert_eq!(native.output_quality, Some(80));
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        for (request, param) in [
            (ImageGenerationRequest { prompt: None, ..Default::default() }, "prompt"),
            (
                ImageGenerationRequest {
                    prompt: Some("x".into()),
                    quality: Some("ultra".into()),
                    ..Default::default()
                },
                "quality",
            ),
        ] {
            let error = request.to_native().unwrap_err();
            assert_eq!(error.detail.param.as_deref(), Some(param));
        }
    }
}
