//! HTTP errors: one type, [`ApiError`], whose body is always OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`, the table from the lower layers'
//! errors to status codes, and the [`AppJson`] extractor whose rejections use that body.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ValidationError;
use crate::jobs::{JobError, JobErrorKind, LookupError, SubmitError};

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "steps: must be between 1 and 150, got 0",
    "type": "invalid_request_error", "param": "steps", "code": "invalid_value"}}))]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// Class of error: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `unavailable_error`, `timeout_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Stable machine-readable code, e.g. `invalid_value`, `queue_full`, `job_not_found`.
    pub code: Option<String>,
}

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
    /// Seconds for the `Retry-After` header (429, 503).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind: kind.to_string(),
                param: None,
                code: Some(code.to_string()),
            },
            retry_after_secs: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.detail.param = Some(param.into());
        self
    }

    /// 400: the body is not JSON.
    pub fn malformed_json(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_json", message)
    }

    /// 422: a field has a value we cannot use.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            "invalid_value",
            message,
        )
        .with_param(param)
    }

    /// 404: no such job.
    pub fn job_not_found() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "job_not_found",
            "no job with this id",
        )
    }

    /// 404: no such model; the message lists the valid ones.
    pub fn model_not_found(name: &str, valid: &[String]) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "model_not_found",
            format!("unknown model {name:?}; available models: {}", valid.join(", ")),
        )
        .with_param("model")
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> ApiError {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "shutting_down",
            "the server is shutting down and takes no new work",
        );
        error.retry_after_secs = Some(5);
        error
    }

    /// 500: a bug or broken model; the details went to the log.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> ApiError {
        ApiError::invalid_value(error.field.clone(), error.to_string())
    }
}

impl From<LookupError> for ApiError {
    fn from(error: LookupError) -> ApiError {
        match error {
            LookupError::NotFound => ApiError::job_not_found(),
            LookupError::Expired => ApiError::new(
                StatusCode::GONE,
                "invalid_request_error",
                "result_expired",
                error.to_string(),
            ),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> ApiError {
        match error {
            SubmitError::QueueFull { retry_after_secs, .. } => {
                let mut api = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "queue_full",
                    error.to_string(),
                );
                api.retry_after_secs = Some(retry_after_secs);
                api
            }
            SubmitError::ShuttingDown => ApiError::shutting_down(),
        }
    }
}

impl From<&JobError> for ApiError {
    fn from(error: &JobError) -> ApiError {
        let (status, kind) = match error.kind {
            JobErrorKind::InvalidRequest => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error")
            }
            JobErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            JobErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            JobErrorKind::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "unavailable_error"),
        };
        let mut api = ApiError::new(status, kind, error.kind.code(), error.message.clone());
        api.detail.param = error.param.clone();
        api
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = ?self.detail.code, "{}", self.detail.message);
        }
        let mut response =
            (self.status, axum::Json(ErrorResponse { error: self.detail })).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// JSON body extractor: syntax errors are 400, values of the wrong type, missing or
/// unknown fields are 422 naming the field, an oversized body is 413, all in the
/// standard error body. The `Content-Type` is not checked, so `curl -d` works as is.
pub struct AppJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "body_too_large",
                    "the request body is larger than this server accepts (limits.max_body_bytes)",
                )
            } else {
                ApiError::malformed_json(format!("cannot read the request body: {rejection}"))
            }
        })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::malformed_json(format!("the body is not valid JSON: {e}")))?;
        from_json_value(value).map(AppJson)
    }
}

/// Parses an already-read JSON body into `T` with the same 422 errors as [`AppJson`]
/// (for handlers that also need the raw body, e.g. to list fields they ignore).
pub fn from_json_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(parsed) => Ok(parsed),
        Err(error) => {
            Err(ApiError::invalid_value(offending_field::<T>(&value, &error), error.to_string()))
        }
    }
}

/// Finds the field a data error is about: the first field that fails on its own (every
/// request field is optional, so a one-field object fails only for that field), or the
/// field a `missing field` message names.
fn offending_field<T: DeserializeOwned>(
    value: &serde_json::Value,
    error: &serde_json::Error,
) -> String {
    let empty_is_valid = serde_json::from_value::<T>(serde_json::json!({})).is_ok();
    if let (serde_json::Value::Object(fields), true) = (value, empty_is_valid) {
        for (name, field_value) in fields {
            let alone = serde_json::json!({ name.clone(): field_value.clone() });
            if serde_json::from_value::<T>(alone).is_err() {
                return name.clone();
            }
        }
    }
    let message = error.to_string();
    message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("missing field") || message.starts_with("unknown field"))
        .unwrap_or("body")
        .to_string()
}
