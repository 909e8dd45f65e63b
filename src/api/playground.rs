//! The web playground: one static HTML page (vanilla JS, no build step, no CDN) embedded
//! in the binary, served at `/` and `/playground`. It talks to the native API.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page itself.
pub const PLAYGROUND_HTML: &str = include_str!("playground.html");

/// A page to try the server in a browser: prompt, model, sampler, size, steps, seed;
/// it submits a job, shows its progress from the event stream, the images with their
/// seeds, and can cancel. Needs no API key to load (the page holds no secrets); the
/// key, when the server has keys, is typed into the page.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The playground page", content_type = "text/html", body = String)))]
pub async fn playground() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        PLAYGROUND_HTML,
    )
        .into_response()
}
