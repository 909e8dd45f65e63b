//! The HTTP API: the router ([`app`]), its shared state, middleware (request ids, tracing,
//! API keys, request metrics, body limit), and the handlers of the native `/v1` dialect,
//! the OpenAI and AUTOMATIC1111 dialects, the playground page and the operational
//! endpoints. Knows no tensors: requests become
//! `pipeline::GenerationRequest`s and go to the job queue.

pub mod a1111;
pub mod dto;
pub mod error;
pub mod native;
pub mod openai;
pub mod openapi;
pub mod playground;
pub mod server;
pub mod system;

use std::ops::Deref;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::adapters::embeddings::EmbeddingLibrary;
use crate::config::{ModelSpec, Settings};
use crate::jobs::JobManager;
use crate::pipeline::ModelDefaults;
use crate::workers::SlotHealth;
use error::ApiError;

pub use server::{run, start, RunningServer};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A model of the registry: its configured spec and what probing its files found.
#[derive(Debug, Clone)]
pub struct RegisteredModel {
    pub spec: ModelSpec,
    pub defaults: ModelDefaults,
}

/// The models this server serves.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    pub models: Vec<RegisteredModel>,
    pub default_model: String,
}

impl ModelRegistry {
    /// The named model, or the default one; 404 listing the valid names otherwise.
    pub fn resolve(&self, name: Option<&str>) -> Result<&RegisteredModel, ApiError> {
        let wanted = name.filter(|n| !n.is_empty()).unwrap_or(&self.default_model);
        self.models.iter().find(|m| m.spec.name == wanted).ok_or_else(|| {
            let valid: Vec<String> = self.models.iter().map(|m| m.spec.name.clone()).collect();
            ApiError::model_not_found(wanted, &valid)
        })
    }
}

/// What every handler shares.
pub struct SharedState {
    pub settings: Arc<Settings>,
    pub registry: ModelRegistry,
    pub jobs: Arc<JobManager>,
    /// Health of every worker slot, kept current by the worker threads.
    pub workers: watch::Receiver<Vec<SlotHealth>>,
    pub started_at: SystemTime,
    /// Options and jobs of the AUTOMATIC1111 dialect.
    pub a1111: a1111::A1111Session,
    /// The textual-inversion embeddings offered (`GET /v1/embeddings`).
    pub embeddings: Option<Arc<EmbeddingLibrary>>,
    /// The LoRAs requests may name (`lora_dirs`).
    pub loras: Arc<crate::adapters::lora::LoraLibrary>,
    /// The ControlNets requests may name (`controlnet_dirs`); names are checked here,
    /// the workers load them.
    pub controlnets: Arc<crate::adapters::controlnet::ControlNetLibrary>,
}

/// Cheap to clone handle on the shared state.
#[derive(Clone)]
pub struct AppState(Arc<SharedState>);

impl AppState {
    pub fn new(shared: SharedState) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = SharedState;
    fn deref(&self) -> &SharedState {
        &self.0
    }
}

/// The router with every route and middleware.
pub fn app(state: AppState) -> Router {
    let body_limit = state.settings.limits.max_body_bytes;
    // Layers listed first run first (outermost): the request id exists before the
    // tracing span that records it, and is copied onto the response last.
    let http_layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    let request_id =
                        request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id)
                })
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID));
    let automatic1111 = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::skip))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/embeddings", get(a1111::embeddings))
        .route("/sdapi/v1/options", get(a1111::get_options).post(a1111::set_options))
        .route("/sdapi/v1/png-info", post(a1111::png_info))
        .route_layer(middleware::from_fn(a1111::add_error_detail));
    Router::new()
        .route("/", get(playground::playground))
        .route("/playground", get(playground::playground))
        .route("/v1/images/generations", post(openai::create_images))
        .route("/v1/images/edits", post(openai::edit_images))
        .merge(automatic1111)
        .route("/v1/generate", post(native::generate))
        .route("/v1/jobs", post(native::create_job))
        .route("/v1/jobs/{id}", get(native::get_job).delete(native::cancel_job))
        .route("/v1/jobs/{id}/events", get(native::job_events))
        .route("/v1/jobs/{id}/images/{index}", get(native::job_image))
        .route("/v1/models", get(system::list_models))
        .route("/v1/samplers", get(system::list_samplers))
        .route("/v1/embeddings", get(system::list_embeddings))
        .route("/v1/loras", get(system::list_loras))
        .route("/v1/adapters", get(system::list_adapters))
        .route("/v1/schedules", get(system::list_schedules))
        .route("/health", get(system::health))
        .route("/ready", get(system::ready))
        .route("/metrics", get(system::metrics))
        .route("/openapi.yaml", get(system::openapi_yaml))
        // route_layer: these see the matched route; the last one added runs first, so
        // refused (401) requests are counted too.
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(http_layers)
        .with_state(state)
}

async fn unknown_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "unknown_route",
        "no such route; see /openapi.yaml",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "this route does not take this method; see /openapi.yaml",
    )
}

/// Routes that never need an API key: liveness, and the playground page (which holds no
/// secrets; its requests carry the key the user types in).
const OPEN_ROUTES: [&str; 3] = ["/health", "/", "/playground"];

/// When API keys are configured, every route but [`OPEN_ROUTES`] needs one, as
/// `Authorization: Bearer KEY` (what OpenAI clients send), `x-api-key: KEY`, or HTTP
/// basic auth with the key as the password (what A1111 clients send for `--api-auth`).
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let keys = &state.settings.api_keys;
    if keys.is_empty() || OPEN_ROUTES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::to_string)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string))
        .or_else(|| basic_auth_password(headers));
    let presented = presented.as_deref().map(str::trim);
    let error = match presented {
        Some(key) if keys.iter().any(|k| same_secret(k.0.as_bytes(), key.as_bytes())) => {
            return next.run(request).await
        }
        Some(_) => "invalid API key",
        None => "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key", error)
        .into_response()
}

/// The password of an `Authorization: Basic` header (the user name is not checked).
fn basic_auth_password(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    credentials.split_once(':').map(|(_, password)| password.to_string())
}

/// Compares without an early exit, so response times do not reveal matching prefixes.
fn same_secret(expected: &[u8], presented: &[u8]) -> bool {
    if expected.len() != presented.len() {
        return false;
    }
    expected.iter().zip(presented).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let response = next.run(request).await;
    state.jobs.metrics().http_request(&method, &route, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }
}
