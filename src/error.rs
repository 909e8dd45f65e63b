//! Error types of the layers below the HTTP API. The API maps them to status codes
//! in one table (`api::error`); the messages here are written for users.

use std::path::PathBuf;

/// Loading a model from disk went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error(
        "{0} is a pickle file (.ckpt/.bin/.pt/.pth); loading pickles can run arbitrary code, \
         so sdserve only loads .safetensors: convert it first"
    )]
    PickleRefused(PathBuf),
    #[error("{path} is not a valid safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error("unrecognised model layout in {path}: {reason}")]
    UnknownLayout { path: PathBuf, reason: String },
    #[error("bad config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("weights of {component} do not fit its config: {source}")]
    Weights {
        component: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The device name is not one this build can use.
    #[error("device: {0}")]
    BadDevice(String),
    /// The CLIP tokenizer could not be built from its vocabulary files.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(candle_core::Error),
}

/// A request that failed validation: `field` names the offending request field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError { field: field.into(), message: message.into() }
    }
}

/// Running the pipeline went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The observer asked to stop; no images were produced.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor error: {0}")]
    Tensor(candle_core::Error),
}

/// Drops the backtraces candle attaches to its errors when `RUST_BACKTRACE` is set: they
/// would end up in messages written for users. Errors are logged where they happen.
pub fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(error: candle_core::Error) -> Self {
        ModelError::Candle(without_backtrace(error))
    }
}

impl From<candle_core::Error> for PipelineError {
    fn from(error: candle_core::Error) -> Self {
        PipelineError::Tensor(without_backtrace(error))
    }
}
