//! Operational endpoints: liveness, readiness, metrics, the OpenAPI document, and the
//! model and sampler lists.

use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::dto::{
    AdapterCard, AdapterList, EmbeddingCard, EmbeddingList, HealthResponse, LoraCard, LoraList,
    ModelCard, ModelList, ReadyResponse, SamplerInfo, SamplerList, ScheduleInfo, ScheduleList,
    WorkerStatus,
};
use super::error::ErrorResponse;
use super::AppState;
use crate::samplers::{SamplerKind, Schedule};
use crate::workers::SlotState;

/// The process is alive (never needs an API key).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok".into() })
}

/// Every model is loaded on every device and the server takes work.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadyResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
        (status = 503, description = "Loading, failed or shutting down", body = ReadyResponse),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let slots = state.workers.borrow().clone();
    let workers: Vec<WorkerStatus> = slots
        .iter()
        .map(|slot| {
            let (name, error) = match &slot.state {
                SlotState::Loading => ("loading", None),
                SlotState::Ready => ("ready", None),
                SlotState::Failed(message) => ("failed", Some(message.clone())),
                SlotState::Stopped => ("stopped", None),
            };
            WorkerStatus { device: slot.device.clone(), slot: slot.slot, state: name.into(), error }
        })
        .collect();
    let status = if !state.jobs.is_accepting() {
        "shutting_down"
    } else if slots.iter().any(|s| matches!(s.state, SlotState::Failed(_))) {
        "failed"
    } else if slots.iter().all(|s| s.state == SlotState::Ready) {
        "ready"
    } else {
        "loading"
    };
    let code = if status == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = ReadyResponse {
        status: status.into(),
        workers,
        queue_depth: state.jobs.queue_depth(),
        running: state.jobs.running(),
    };
    (code, Json(body)).into_response()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Metrics", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.jobs.metrics().render(state.jobs.queue_depth(), state.jobs.running());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.yaml", tag = "operations",
    responses(
        (status = 200, description = "OpenAPI 3.1 YAML", content_type = "application/yaml", body = String),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn openapi_yaml() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], super::openapi::openapi_yaml()).into_response()
}

/// The models this server serves (OpenAI's list shape).
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses(
        (status = 200, description = "Models", body = ModelList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    // Every device loads every model, so a model is loaded once no slot is still loading
    // or failed.
    let loaded = state
        .workers
        .borrow()
        .iter()
        .all(|s| matches!(s.state, SlotState::Ready | SlotState::Stopped));
    let created = state.started_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let data = state
        .registry
        .models
        .iter()
        .map(|model| ModelCard {
            id: model.spec.name.clone(),
            object: "model".into(),
            created,
            owned_by: "sdserve".into(),
            family: model.defaults.family.id().into(),
            loaded,
            default: model.spec.name == state.registry.default_model,
            width: model.defaults.width,
            height: model.defaults.height,
        })
        .collect();
    Json(ModelList { object: "list".into(), data })
}

/// The textual-inversion embeddings of the configured directories (names without
/// paths, read from the file headers).
#[utoipa::path(get, path = "/v1/embeddings", tag = "models",
    responses(
        (status = 200, description = "Embeddings", body = EmbeddingList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_embeddings(State(state): State<AppState>) -> Json<EmbeddingList> {
    let infos = embedding_infos(&state).await;
    let data = infos
        .into_iter()
        .map(|info| EmbeddingCard {
            name: info.name,
            format: info.format,
            vectors: info.vectors,
            width: info.width,
            width_g: info.width_g,
            metadata: info.metadata,
        })
        .collect();
    Json(EmbeddingList { object: "list".into(), data })
}

/// The samplers requests may name.
#[utoipa::path(get, path = "/v1/samplers", tag = "models",
    responses(
        (status = 200, description = "Samplers", body = SamplerList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_samplers() -> Json<SamplerList> {
    let data = SamplerKind::ALL
        .iter()
        .map(|kind| SamplerInfo {
            id: kind.id().into(),
            display_name: kind.display_name().into(),
            aliases: kind.aliases().iter().map(|a| a.to_string()).collect(),
            schedules: kind.schedules().iter().map(|s| s.id().to_string()).collect(),
            eta: kind.takes_eta(),
            s_noise: kind.takes_s_noise(),
        })
        .collect();
    Json(SamplerList { object: "list".into(), data })
}

/// The embeddings of the configured directories (read off the async runtime: it touches
/// the disk). Shared by the native and the AUTOMATIC1111 listings.
pub(crate) async fn embedding_infos(
    state: &AppState,
) -> Vec<crate::adapters::embeddings::EmbeddingInfo> {
    let Some(library) = state.embeddings.clone() else {
        return Vec::new();
    };
    tokio::task::spawn_blocking(move || library.list()).await.unwrap_or_else(|error| {
        tracing::error!(%error, "listing embeddings panicked");
        Vec::new()
    })
}

/// The LoRAs requests may name (`lora_dirs`), with their safetensors metadata.
#[utoipa::path(get, path = "/v1/loras", tag = "models",
    responses(
        (status = 200, description = "LoRA files", body = LoraList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_loras(State(state): State<AppState>) -> Json<LoraList> {
    let library = state.loras.clone();
    // Listing reads file headers from disk: keep it off the async runtime's threads.
    let loras = tokio::task::spawn_blocking(move || library.list()).await.unwrap_or_default();
    let data = loras
        .into_iter()
        .map(|info| LoraCard { name: info.name, metadata: info.metadata })
        .collect();
    Json(LoraList { object: "list".into(), data })
}

/// The adapters requests may name besides LoRAs: ControlNets (`controlnet_dirs`),
/// T2I-Adapters and IP-Adapters.
#[utoipa::path(get, path = "/v1/adapters", tag = "models",
    responses(
        (status = 200, description = "Adapters by kind", body = AdapterList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_adapters(State(state): State<AppState>) -> Json<AdapterList> {
    let controlnets = state.controlnets.clone();
    let t2i_dirs = state.settings.t2i_adapter_dirs.clone();
    let ip_dirs = state.settings.ip_adapter_dirs.clone();
    // Listing walks directories: keep it off the async runtime's threads.
    let (controlnets, t2i_adapters, ip_adapters) = tokio::task::spawn_blocking(move || {
        (
            controlnets.list(),
            crate::adapters::t2i::discover(&t2i_dirs),
            crate::adapters::ip_adapter::discover(&ip_dirs),
        )
    })
    .await
    .unwrap_or_default();
    let card = |entry: crate::adapters::controlnet::AdapterEntry| AdapterCard {
        name: entry.name,
        path: entry.path.display().to_string(),
    };
    let named = |(name, path): (String, std::path::PathBuf)| AdapterCard {
        name,
        path: path.display().to_string(),
    };
    Json(AdapterList {
        controlnets: controlnets.into_iter().map(card).collect(),
        t2i_adapters: t2i_adapters.into_iter().map(named).collect(),
        ip_adapters: ip_adapters.into_iter().map(named).collect(),
    })
}

/// The noise schedules requests may name.
#[utoipa::path(get, path = "/v1/schedules", tag = "models",
    responses(
        (status = 200, description = "Schedules", body = ScheduleList),
        (status = 401, description = "Missing or wrong API key", body = ErrorResponse),
    ))]
pub async fn list_schedules() -> Json<ScheduleList> {
    let data = Schedule::ALL
        .iter()
        .map(|schedule| ScheduleInfo {
            id: schedule.id().into(),
            display_name: schedule.display_name().into(),
        })
        .collect();
    Json(ScheduleList { object: "list".into(), data })
}
