//! The HTTP-free generation pipeline: validated request → text encoding → initial noise
//! from the seed → denoising loop with classifier-free guidance → VAE decode → RGB8.
//!
//! Used by the worker threads of the service and by the `generate` CLI command.

pub mod generate;
pub mod image_input;
pub mod memory;
pub mod prompt;
pub mod request;
pub mod t2i_adapter;
pub mod text;
pub mod tokenizer;

pub use generate::{parse_device, probe, BatchKey, LoadOptions, Pipeline};
pub use memory::{MemorySettings, VaeTiling};
pub use request::{
    ControlNetParams, ControlNetUnit, GenerationParams, GenerationRequest, Limits, LoraChoice,
    ModelDefaults,
};
pub use text::PromptContext;

/// Receives progress from a running generation and can stop it.
///
/// The pipeline calls `on_step` after every denoising step and `should_cancel` before
/// every step; when it returns true the run ends with `PipelineError::Cancelled`.
pub trait StepObserver {
    /// `step` of `steps` steps is done (1-based: the last call has `step == steps`).
    /// `image_index` is the image of the request being denoised.
    fn on_step(&mut self, image_index: u32, step: usize, steps: usize);
    /// Whether the run should stop before its next step.
    fn should_cancel(&self) -> bool;
}

/// An observer that ignores progress and never cancels.
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn on_step(&mut self, _image_index: u32, _step: usize, _steps: usize) {}
    fn should_cancel(&self) -> bool {
        false
    }
}

/// One generated image: 8-bit RGB, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Position of this image in the request (0-based).
    pub index: u32,
    /// The seed this image was made from (`request.seed + index`).
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}
