//! Handlers of the native API: synchronous generation, asynchronous jobs (status,
//! Server-Sent Events, cancellation, image download).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::dto::{
    cancelled_detail, rfc3339, GenerateRequest, GenerateResponse, JobAccepted, JobStatus,
    OutputFormat, ProgressBody,
};
use super::error::{ApiError, AppJson, ErrorResponse};
use super::AppState;
use crate::codec::ImageFormat;
use crate::jobs::{
    CancelOutcome, JobEvent, JobId, JobManager, JobSnapshot, JobState, OutputOptions,
};

/// Validates a request body and queues it (every dialect ends here).
pub(super) fn submit(
    state: &AppState,
    body: &GenerateRequest,
    accepted: Option<ImageFormat>,
) -> Result<JobSnapshot, ApiError> {
    if body.prompt.is_none() {
        return Err(ApiError::invalid_value("prompt", "prompt: is required (it may be empty)"));
    }
    let model = state.registry.resolve(body.model.as_deref())?;
    let mut request =
        body.to_params().validate(&model.defaults, &state.settings.request_limits())?;
    for lora in &request.loras {
        state
            .loras
            .resolve(&lora.name)
            .map_err(|e| crate::error::ValidationError::new("loras", e.to_string()))?;
    }
    for (i, adapter) in request.t2i_adapters.iter().enumerate() {
        crate::adapters::t2i::resolve(&state.settings.t2i_adapter_dirs, &adapter.model).map_err(
            |e| {
                crate::error::ValidationError::new(
                    format!("t2i_adapters[{i}].model"),
                    e.to_string(),
                )
            },
        )?;
    }
    for (index, unit) in request.controlnets.iter().enumerate() {
        state.controlnets.resolve(&unit.model).map_err(|e| {
            crate::error::ValidationError::new(format!("controlnets[{index}].model"), e.to_string())
        })?;
    }
    if !request.ip_adapters.is_empty() {
        let library = crate::adapters::ip_adapter::IpAdapterLibrary::new(
            state.settings.ip_adapter_dirs.clone(),
        );
        for (index, choice) in request.ip_adapters.iter_mut().enumerate() {
            let path = library.resolve(&choice.model).map_err(|e| {
                crate::error::ValidationError::new(
                    format!("ip_adapters[{index}].model"),
                    e.to_string(),
                )
            })?;
            choice.path = Some(path);
        }
    }
    let format = match (body.output_format.map(OutputFormat::to_codec), accepted) {
        (Some(asked), Some(accepted)) if asked != accepted => {
            return Err(ApiError::invalid_value(
                "output_format",
                format!(
                    "output_format: the Accept header asks for {} but output_format for {}",
                    accepted.mime_type(),
                    asked.mime_type()
                ),
            ))
        }
        (Some(asked), _) => asked,
        (None, Some(accepted)) => accepted,
        (None, None) => state.settings.output_format(),
    };
    let quality = body.output_quality.unwrap_or(state.settings.output.quality);
    if !(1..=100).contains(&quality) {
        return Err(ApiError::invalid_value(
            "output_quality",
            format!("output_quality: must be between 1 and 100, got {quality}"),
        ));
    }
    let output = OutputOptions { format, quality };
    Ok(state.jobs.submit(request, output, body.priority.unwrap_or(0))?)
}

/// The image format an `Accept` header prefers, if it prefers an image over JSON.
fn accepted_image_format(headers: &HeaderMap) -> Option<ImageFormat> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    accept.split(',').map(|range| range.split(';').next().unwrap_or("").trim()).find_map(
        |media| match media {
            "image/png" => Some(Some(ImageFormat::Png)),
            "image/jpeg" => Some(Some(ImageFormat::Jpeg)),
            "image/webp" => Some(Some(ImageFormat::Webp)),
            "application/json" | "*/*" | "application/*" => Some(None),
            _ => None,
        },
    )?
}

/// Cancels its job when dropped armed: the synchronous handler's future is dropped when
/// the client disconnects, and nobody else would ever collect that job's result.
struct CancelOnDrop {
    jobs: Arc<JobManager>,
    id: JobId,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(job = %self.id, "client went away; cancelling its job");
            let _ = self.jobs.cancel(&self.id);
        }
    }
}

/// Waits until the job finished, cancelling it if the caller's future is dropped (the
/// client went away). Cancelled and failed jobs are returned as they are.
pub(super) async fn wait_for_job(state: &AppState, id: &JobId) -> Result<JobSnapshot, ApiError> {
    let mut guard = CancelOnDrop { jobs: state.jobs.clone(), id: id.clone(), armed: true };
    let finished = wait_until_finished(&state.jobs, id).await;
    guard.armed = false;
    finished
}

/// The error of a job that finished without succeeding.
pub(super) fn unsuccessful_job_error(job: &JobSnapshot) -> ApiError {
    match (&job.error, job.state) {
        (_, JobState::Cancelled) => ApiError {
            status: StatusCode::CONFLICT,
            detail: cancelled_detail(),
            retry_after_secs: None,
        },
        (Some(error), _) => ApiError::from(error),
        (None, _) => ApiError::internal("the job failed"),
    }
}

/// Waits until the job finished.
async fn wait_until_finished(jobs: &JobManager, id: &JobId) -> Result<JobSnapshot, ApiError> {
    let (snapshot, mut events) = jobs.subscribe(id)?;
    if snapshot.state.is_finished() {
        return Ok(snapshot);
    }
    loop {
        match events.recv().await {
            Ok(JobEvent::Finished(_)) | Err(broadcast::error::RecvError::Closed) => {
                return Ok(jobs.get(id)?);
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let snapshot = jobs.get(id)?;
                if snapshot.state.is_finished() {
                    return Ok(snapshot);
                }
            }
        }
    }
}

fn millis_header(value: u64) -> HeaderValue {
    HeaderValue::from(value)
}

fn image_response(bytes: Vec<u8>, format: ImageFormat, seed: u64) -> Response {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.mime_type()));
    headers.insert(HeaderName::from_static("x-seed"), HeaderValue::from(seed));
    response
}

/// Generate images and wait for them.
///
/// Returns JSON with base64 images; with `Accept: image/png` (or jpeg/webp) and `n = 1`
/// the image bytes themselves (seed in `x-seed`). If the client disconnects, the job is
/// cancelled.
#[utoipa::path(
    post, path = "/v1/generate", tag = "generation",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The images (JSON), or the image itself for an image Accept header",
            content(
                (GenerateResponse = "application/json"),
                (Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/webp"),
            ),
            headers(("x-queue-time" = u64, description = "Milliseconds queued"),
                    ("x-inference-time" = u64, description = "Milliseconds generating"),
                    ("x-job-id" = String, description = "The job id"),
                    ("x-seed" = u64, description = "Seed of the image (image responses only)"))),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 409, description = "The job was cancelled (DELETE /v1/jobs/{id})", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 422, description = "Invalid value; `param` names the field", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "Shutting down", body = ErrorResponse),
        (status = 504, description = "The job passed its deadline", body = ErrorResponse),
    )
)]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(body): AppJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let accepted = accepted_image_format(&headers);
    if accepted.is_some() && body.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid_value(
            "n",
            "n: an image Accept header returns one image; ask for JSON to get several",
        ));
    }
    let job = submit(&state, &body, accepted)?;
    let mut guard = CancelOnDrop { jobs: state.jobs.clone(), id: job.id.clone(), armed: true };
    let finished = wait_until_finished(&state.jobs, &job.id).await;
    guard.armed = false;
    let finished = finished?;
    match finished.state {
        JobState::Succeeded => {}
        JobState::Cancelled => {
            let detail = cancelled_detail();
            return Err(ApiError { status: StatusCode::CONFLICT, detail, retry_after_secs: None });
        }
        _ => {
            let error = finished.error.as_ref().expect("failed jobs carry an error; this is a bug");
            return Err(ApiError::from(error));
        }
    }
    let result = finished.result.as_ref().expect("succeeded jobs carry a result; this is a bug");
    let mut response = match accepted {
        Some(_) => {
            let image = result.images.first().expect("a succeeded job has an image; this is a bug");
            image_response(image.bytes.clone(), image.format, image.seed)
        }
        None => Json(GenerateResponse::from_snapshot(&finished)).into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static("x-queue-time"), millis_header(result.queue_ms));
    headers.insert(HeaderName::from_static("x-inference-time"), millis_header(result.inference_ms));
    headers.insert(
        HeaderName::from_static("x-job-id"),
        HeaderValue::from_str(job.id.as_str()).expect("ids are ASCII"),
    );
    Ok(response)
}

/// Queue a generation and return at once.
///
/// Follow it with `GET /v1/jobs/{id}` or `GET /v1/jobs/{id}/events`.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = GenerateRequest,
    responses(
        (status = 202, description = "Queued", body = JobAccepted,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "Unknown model", body = ErrorResponse),
        (status = 413, description = "Body too large", body = ErrorResponse),
        (status = 422, description = "Invalid value; `param` names the field", body = ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Shutting down", body = ErrorResponse),
    )
)]
pub async fn create_job(
    State(state): State<AppState>,
    AppJson(body): AppJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let job = submit(&state, &body, None)?;
    let location = format!("/v1/jobs/{}", job.id);
    let accepted = JobAccepted {
        id: job.id.to_string(),
        state: job.state,
        queue_position: job.queue_position.unwrap_or(0),
    };
    let mut response = (StatusCode::ACCEPTED, Json(accepted)).into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(&location).expect("ids are ASCII"));
    Ok(response)
}

/// A job's state, progress and (once it succeeded) result.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
        (status = 410, description = "The result expired (result_retention_secs)", body = ErrorResponse),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let job = state.jobs.get(&JobId::from_client(&id))?;
    Ok(Json(JobStatus::from_snapshot(&job)))
}

/// Cancel a job: a queued one at once (200), a running one at its next step (202).
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = JobStatus),
        (status = 202, description = "Running; it stops at its next step", body = JobStatus),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
        (status = 409, description = "The job already finished", body = ErrorResponse),
        (status = 410, description = "The result expired", body = ErrorResponse),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.jobs.cancel(&JobId::from_client(&id))? {
        CancelOutcome::Cancelled(job) => Ok(Json(JobStatus::from_snapshot(&job)).into_response()),
        CancelOutcome::Cancelling(job) => {
            Ok((StatusCode::ACCEPTED, Json(JobStatus::from_snapshot(&job))).into_response())
        }
        CancelOutcome::AlreadyFinished(job) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "job_finished",
            format!("the job already finished ({})", job.state.as_str()),
        )),
    }
}

/// One image of a succeeded job, as bytes.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/images/{index}", tag = "jobs",
    params(("id" = String, Path, description = "Job id"),
           ("index" = u32, Path, description = "Image index (0-based)")),
    responses(
        (status = 200, description = "The image",
            content((Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/webp")),
            headers(("x-seed" = u64, description = "Seed of the image"))),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job or image", body = ErrorResponse),
        (status = 409, description = "The job has not succeeded", body = ErrorResponse),
        (status = 410, description = "The result expired", body = ErrorResponse),
        (status = 422, description = "The index is not a number", body = ErrorResponse),
    )
)]
pub async fn job_image(
    State(state): State<AppState>,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = state.jobs.get(&JobId::from_client(&id))?;
    let index: u32 = index.parse().map_err(|_| {
        ApiError::invalid_value("index", format!("index: {index:?} is not an image index"))
    })?;
    if job.state != JobState::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "job_not_succeeded",
            format!("the job is {}; images exist once it succeeded", job.state.as_str()),
        ));
    }
    let result = job.result.as_ref().expect("succeeded jobs carry a result; this is a bug");
    let image = result.images.iter().find(|image| image.index == index).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "image_not_found",
            format!("the job has {} image(s); there is no index {index}", result.images.len()),
        )
        .with_param("index")
    })?;
    Ok(image_response(image.bytes.clone(), image.format, image.seed))
}

/// Follow a job as Server-Sent Events.
///
/// Events: `queued` (`{"id", "position"}`), `started` (`{"id", "started_at"}`), `progress`
/// (`{"id", "step", "steps", "eta_ms"}`), then exactly one of `succeeded` (the result, as
/// from `POST /v1/generate`), `failed` (an error body) or `cancelled` (`{"id"}`); the
/// stream ends after it. A client that connects late first gets the job's present state.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 404, description = "No such job", body = ErrorResponse),
        (status = 410, description = "The result expired", body = ErrorResponse),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = JobId::from_client(&id);
    let (snapshot, events) = state.jobs.subscribe(&id)?;
    let (sender, receiver) = mpsc::channel(32);
    tokio::spawn(forward_events(state.jobs.clone(), snapshot, events, sender));
    Ok(Sse::new(ReceiverStream::new(receiver).map(Ok)).keep_alive(KeepAlive::default()))
}

/// Turns a job's events into SSE events until the job finished or the client left.
async fn forward_events(
    jobs: Arc<JobManager>,
    snapshot: JobSnapshot,
    mut events: broadcast::Receiver<JobEvent>,
    sender: mpsc::Sender<Event>,
) {
    let id = snapshot.id.clone();
    let mut opening = Vec::new();
    match snapshot.state {
        JobState::Queued => opening.push(queued_event(&id, snapshot.queue_position.unwrap_or(0))),
        JobState::Running => {
            opening.push(started_event(&snapshot));
            if let Some(progress) = snapshot.progress.as_ref().filter(|p| p.step > 0) {
                opening.push(progress_event(&id, &ProgressBody::from(progress)));
            }
        }
        _ => opening.push(finished_event(&snapshot)),
    }
    for event in opening {
        if sender.send(event).await.is_err() {
            return;
        }
    }
    if snapshot.state.is_finished() {
        return;
    }
    loop {
        let event = match events.recv().await {
            Ok(JobEvent::Queued { position }) => queued_event(&id, position),
            Ok(JobEvent::Started) => match jobs.get(&id) {
                Ok(now) => started_event(&now),
                Err(_) => return,
            },
            Ok(JobEvent::Progress(progress)) => progress_event(&id, &ProgressBody::from(&progress)),
            Ok(JobEvent::Finished(_)) | Err(broadcast::error::RecvError::Closed) => {
                if let Ok(now) = jobs.get(&id) {
                    let _ = sender.send(finished_event(&now)).await;
                }
                return;
            }
            // Only progress is ever skipped: the newest events, the final one among
            // them, are kept.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
        };
        if sender.send(event).await.is_err() {
            return;
        }
    }
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default().event(name).json_data(data).expect("event payloads serialize; this is a bug")
}

fn queued_event(id: &JobId, position: usize) -> Event {
    json_event("queued", &json!({ "id": id.as_str(), "position": position }))
}

fn started_event(job: &JobSnapshot) -> Event {
    let started_at = job.started_at.map(rfc3339);
    json_event("started", &json!({ "id": job.id.as_str(), "started_at": started_at }))
}

fn progress_event(id: &JobId, progress: &ProgressBody) -> Event {
    json_event(
        "progress",
        &json!({ "id": id.as_str(), "step": progress.step, "steps": progress.steps, "eta_ms": progress.eta_ms }),
    )
}

fn finished_event(job: &JobSnapshot) -> Event {
    match job.state {
        JobState::Succeeded => json_event("succeeded", &GenerateResponse::from_snapshot(job)),
        JobState::Cancelled => json_event("cancelled", &json!({ "id": job.id.as_str() })),
        _ => {
            let detail = match &job.error {
                Some(error) => ApiError::from(error).detail,
                None => ApiError::internal("the job failed").detail,
            };
            json_event("failed", &ErrorResponse { error: detail })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Option<ImageFormat> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_str(value).unwrap());
        accepted_image_format(&headers)
    }

    #[test]
    fn the_first_acceptable_media_type_wins() {
        assert_eq!(accept("image/png"), Some(ImageFormat::Png));
        assert_eq!(accept("image/webp;q=0.9, application/json"), Some(ImageFormat::Webp));
        assert_eq!(accept("application/json, image/png"), None);
        assert_eq!(accept("*/*"), None);
        assert_eq!(accept("text/html, image/jpeg"), Some(ImageFormat::Jpeg));
        assert_eq!(accepted_image_format(&HeaderMap::new()), None);
    }
}
