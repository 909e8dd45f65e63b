//! sdserve: an HTTP image-generation service for Stable Diffusion 1.x / 2.x / SDXL.
//!
//! Layers (see DESIGN.md): `api` → `jobs` → `workers` → `pipeline` → `models`, `samplers`.
//! Dependencies point one way; `pipeline` and below know nothing about HTTP.

pub mod adapters;
pub mod api;
pub mod bench_service;
pub mod cli;
pub mod codec;
pub mod config;
pub mod error;
pub mod jobs;
pub mod models;
pub mod pipeline;
pub mod samplers;
pub mod workers;

pub use api::{app, run, start, AppState, RunningServer};
