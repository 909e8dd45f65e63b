//! The OpenAPI document, generated from the handlers and DTOs (utoipa). The committed
//! `openapi.yaml` is checked against it by `tests/service_openapi.rs`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{dto, error, native, system};

/// The HTTP contract of sdserve.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdserve",
        description = "HTTP image generation with Stable Diffusion 1.x / 2.x / SDXL. \
            When the server has API keys configured, every route except /health needs one \
            (`Authorization: Bearer KEY` or `x-api-key: KEY`). Every error has the body \
            `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
        license(name = "Apache-2.0")
    ),
    paths(
        native::generate, native::create_job, native::get_job, native::cancel_job,
        native::job_image, native::job_events,
        system::list_models, system::list_samplers, system::list_schedules,
        system::health, system::ready, system::metrics, system::openapi_yaml,
    ),
    components(schemas(
        dto::GenerateRequest, dto::GenerateResponse, dto::NormalizedParameters, dto::ImageData,
        dto::Timings, dto::OutputFormat, dto::JobAccepted, dto::JobStatus, dto::ProgressBody,
        dto::ModelList, dto::ModelCard, dto::SamplerList, dto::SamplerInfo,
        dto::ScheduleList, dto::ScheduleInfo,
        dto::HealthResponse, dto::ReadyResponse, dto::WorkerStatus,
        error::ErrorResponse, error::ErrorDetail, crate::jobs::JobState,
    )),
    modifiers(&ApiKeySchemes),
    security((), ("bearer" = []), ("api_key" = [])),
    tags(
        (name = "generation", description = "Synchronous generation"),
        (name = "jobs", description = "Asynchronous jobs: status, events, cancellation, images"),
        (name = "models", description = "Models and samplers"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct ApiKeySchemes;

impl Modify for ApiKeySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The OpenAPI document as YAML (what `sdserve print-openapi` prints).
pub fn openapi_yaml() -> String {
    ApiDoc::openapi().to_yaml().expect("the OpenAPI document serializes; this is a bug")
}
