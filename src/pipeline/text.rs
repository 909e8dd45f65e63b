//! Prompt → conditioning: tokenization and the text encoders, per model family.
//!
//! SD 1.x / 2.x use the last layer after the final layer norm (or, with clip skip `c`,
//! the output `c - 1` layers earlier, also through the final norm). SDXL concatenates the
//! penultimate hidden states of both encoders (no final norm) and takes the projected
//! pooled output of the second as `text_embeds`; the refiner has only the second encoder.

use candle_core::{Tensor, D};

use super::tokenizer::ClipTokenizer;
use crate::error::{ModelError, PipelineError};
use crate::models::clip::{ClipTextModel, ClipTextOutput};
use crate::models::loader::TokenizerSource;

/// The length CLIP text encoders take.
pub const MAX_TOKENS: usize = 77;

/// What the UNet is conditioned on for one prompt.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// `[1, 77, cross_attention_dim]`
    pub context: Tensor,
    /// SDXL: the pooled, projected output of the second encoder, `[1, projection_dim]`.
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// The all-zero conditioning SDXL uses for an empty negative prompt
    /// (`force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> candle_core::Result<TextConditioning> {
        Ok(TextConditioning {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}

/// One tokenizer with its encoder.
pub struct EncoderStage {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
}

/// The text side of a pipeline.
pub struct PromptEncoder {
    /// SD 1.x / 2.x / SDXL's first encoder.
    pub first: Option<EncoderStage>,
    /// SDXL's second encoder (with projection).
    pub second: Option<EncoderStage>,
    /// SDXL layout: penultimate layers, concatenated.
    pub sdxl: bool,
}

/// Builds a tokenizer from where the loader found it.
pub fn tokenizer_from(source: &TokenizerSource) -> Result<ClipTokenizer, ModelError> {
    match source {
        TokenizerSource::Folder(dir) => ClipTokenizer::from_folder(dir),
        TokenizerSource::Bundled { pad_token } => ClipTokenizer::bundled(pad_token),
    }
}

impl PromptEncoder {
    fn run(
        stage: &EncoderStage,
        encoder: Option<&ClipTextModel>,
        text: &str,
    ) -> Result<ClipTextOutput, PipelineError> {
        let encoder = encoder.unwrap_or(&stage.encoder);
        let ids = stage.tokenizer.encode_padded(text, MAX_TOKENS)?;
        let ids = Tensor::from_vec(ids, (1, MAX_TOKENS), encoder.device())?;
        Ok(encoder.forward(&ids)?)
    }

    /// Encodes `text` with A1111's clip skip (1 = last layer).
    pub fn encode(&self, text: &str, clip_skip: u32) -> Result<TextConditioning, PipelineError> {
        self.encode_with(text, clip_skip, [None, None])
    }

    /// [`PromptEncoder::encode`] with the first / second encoder replaced where
    /// `encoders` gives one (a request's LoRA-patched copies).
    pub fn encode_with(
        &self,
        text: &str,
        clip_skip: u32,
        encoders: [Option<&ClipTextModel>; 2],
    ) -> Result<TextConditioning, PipelineError> {
        let skip = clip_skip.saturating_sub(1) as usize;
        if !self.sdxl {
            let stage = self
                .first
                .as_ref()
                .expect("SD 1.x/2.x pipelines have a first encoder; this is a bug");
            let output = Self::run(stage, encoders[0], text)?;
            let context = if skip == 0 {
                output.last_hidden_state
            } else {
                let hidden = ClipTextModel::hidden_state_from_end(&output, skip)?;
                encoders[0].unwrap_or(&stage.encoder).final_layer_norm(&hidden)?
            };
            return Ok(TextConditioning { context, pooled: None });
        }
        let mut contexts = Vec::new();
        let mut pooled = None;
        for (stage, encoder) in [&self.first, &self.second].into_iter().zip(encoders) {
            let Some(stage) = stage else {
                continue;
            };
            let output = Self::run(stage, encoder, text)?;
            // SDXL always starts from the penultimate layer.
            contexts.push(ClipTextModel::hidden_state_from_end(&output, skip + 1)?);
            if let Some(embeds) = output.text_embeds {
                pooled = Some(embeds);
            }
        }
        let context = Tensor::cat(&contexts, D::Minus1)?;
        Ok(TextConditioning { context, pooled })
    }
}
