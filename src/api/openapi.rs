//! The OpenAPI document, generated from the handlers and DTOs (utoipa). The committed
//! `openapi.yaml` is checked against it by `tests/service_openapi.rs`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{a1111, dto, error, native, openai, playground, system};

/// The HTTP contract of sdserve.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sdserve",
        description = "HTTP image generation with Stable Diffusion 1.x / 2.x / SDXL. \
            When the server has API keys configured, every route except /health and the \
            playground page (/, /playground) needs one (`Authorization: Bearer KEY`, \
            `x-api-key: KEY`, or HTTP basic auth with the key as the password). Every error \
            has the body `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` \
            (the /sdapi routes add a top-level `detail`).",
        license(name = "Apache-2.0")
    ),
    paths(
        native::generate, native::create_job, native::get_job, native::cancel_job,
        native::job_image, native::job_events,
        system::list_models, system::list_samplers, system::list_embeddings,
        system::list_loras, system::list_schedules, system::list_adapters,
        system::health, system::ready, system::metrics, system::openapi_yaml,
        playground::playground,
        openai::create_images, openai::edit_images,
        a1111::txt2img, a1111::img2img, a1111::progress, a1111::interrupt, a1111::skip,
        a1111::samplers, a1111::schedulers, a1111::sd_models, a1111::loras, a1111::embeddings,
        a1111::get_options, a1111::set_options, a1111::png_info,
    ),
    components(schemas(
        dto::GenerateRequest, dto::GenerateResponse, dto::NormalizedParameters, dto::ImageData,
        dto::Timings, dto::OutputFormat, dto::JobAccepted, dto::JobStatus, dto::ProgressBody,
        dto::ModelList, dto::ModelCard, dto::SamplerList, dto::SamplerInfo,
        dto::EmbeddingList, dto::EmbeddingCard,
        dto::LoraList, dto::LoraCard, dto::LoraRequest, dto::T2IAdapterRequest,
        dto::ControlNetRequest, dto::AdapterList, dto::AdapterCard, dto::IpAdapterRequest,
        dto::ScheduleList, dto::ScheduleInfo,
        dto::HealthResponse, dto::ReadyResponse, dto::WorkerStatus,
        error::ErrorResponse, error::ErrorDetail, crate::jobs::JobState,
        openai::ImageGenerationRequest, openai::ResponseFormat, openai::ImagesResponse,
        openai::OpenAiImage, openai::ImageEditForm,
        a1111::Txt2ImgRequest, a1111::Txt2ImgResponse, a1111::ProgressResponse,
        a1111::ProgressState, a1111::A1111Sampler, a1111::A1111Scheduler, a1111::A1111Model,
        a1111::PngInfoRequest, a1111::PngInfoResponse,
    )),
    modifiers(&ApiKeySchemes),
    security((), ("bearer" = []), ("api_key" = [])),
    tags(
        (name = "generation", description = "Synchronous generation"),
        (name = "jobs", description = "Asynchronous jobs: status, events, cancellation, images"),
        (name = "models", description = "Models, samplers and embeddings"),
        (name = "operations", description = "Health, readiness, metrics, this document, the playground page"),
        (name = "openai", description = "The OpenAI Images API dialect"),
        (name = "automatic1111", description = "The AUTOMATIC1111 (/sdapi/v1) dialect; error bodies also carry `detail`"),
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
