//! Loading a model into a [`Pipeline`] and running a [`GenerationRequest`] through it.

use std::path::Path;

use candle_core::{DType, Device};

use super::{GeneratedImage, GenerationRequest, ModelDefaults, StepObserver};
use crate::error::{ModelError, PipelineError};

/// Where and in which precision a model runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the networks (F32 default; F16/BF16 selectable).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// A loaded model (text encoders, UNet, VAE, scheduler config) ready to generate.
/// `generate` takes `&self`, so one pipeline may serve jobs one after another; it is
/// `Send + Sync`.
pub struct Pipeline {
    defaults: ModelDefaults,
}

impl Pipeline {
    /// Loads a diffusers folder or a single-file `.safetensors` checkpoint from `path`
    /// and registers it under `name`.
    pub fn load(name: &str, path: &Path, options: &LoadOptions) -> Result<Pipeline, ModelError> {
        let _ = (name, path, options);
        todo!("Pipeline::load")
    }

    /// The model's name, family and native size.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// Runs a validated request; one image per `request.n`, image `i` from seed `seed + i`.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let _ = (request, observer);
        todo!("Pipeline::generate")
    }
}

/// Reads only the configs of the model at `path` (no weights): its family and native
/// size, for validating requests before the model is loaded.
pub fn probe(name: &str, path: &Path) -> Result<ModelDefaults, ModelError> {
    let _ = (name, path);
    todo!("probe")
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let _ = name;
    todo!("parse_device")
}
