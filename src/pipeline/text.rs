//! Prompt → conditioning: tokenization and the text encoders, per model family.
//!
//! SD 1.x / 2.x use the last layer after the final layer norm (or, with clip skip `c`,
//! the output `c - 1` layers earlier, also through the final norm). SDXL concatenates the
//! penultimate hidden states of both encoders (no final norm) and takes the projected
//! pooled output of the second as `text_embeds`; the refiner has only the second encoder.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use super::prompt::{parse_prompt, PromptPiece};
use super::tokenizer::ClipTokenizer;
use crate::adapters::embeddings::{EmbeddingLibrary, EncoderSlot};
use crate::error::{ModelError, PipelineError, ValidationError};
use crate::models::clip::{ClipTextModel, ClipTextOutput};
use crate::models::loader::TokenizerSource;

/// The length CLIP text encoders take.
pub const MAX_TOKENS: usize = 77;

/// What the UNet is conditioned on for one prompt.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// `[1, 77 × chunks, cross_attention_dim]`
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

/// What prompt encoding may draw on beyond the model: the textual-inversion embeddings.
/// Cheap to clone; one per worker (or per call).
#[derive(Debug, Clone, Default)]
pub struct PromptContext {
    /// Embeddings prompts may name by file stem; `None`: no embeddings.
    pub embeddings: Option<Arc<EmbeddingLibrary>>,
}

impl PromptContext {
    /// A context with the embeddings of `library`.
    pub fn with_embeddings(library: Arc<EmbeddingLibrary>) -> PromptContext {
        PromptContext { embeddings: Some(library) }
    }
}

/// A1111's `comma_padding_backtrack`: when a chunk fills up and its last comma is at most
/// this many tokens back, the chunk ends after that comma and the tokens after it move to
/// the next chunk, so a phrase is not cut in two.
pub const COMMA_PADDING_BACKTRACK: usize = 20;

/// Prompt tokens per chunk (77 minus the start and end tokens).
pub const CHUNK_TOKENS: usize = MAX_TOKENS - 2;

/// Placeholder id at positions whose embedding an embedding vector replaces (A1111 uses 0
/// too); only its position matters, the pooled token is found by the end token.
const EMBEDDING_PLACEHOLDER: u32 = 0;

/// Special ids a tokenizer contributes to chunking.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkIds {
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub comma: Option<u32>,
}

/// A parsed prompt piece, tokenized.
#[derive(Debug, Clone)]
pub(crate) enum TokenSegment {
    Tokens { ids: Vec<u32>, weight: f32 },
    Break,
}

/// An embedding a prompt may use: the token ids of its name, how many vectors replace them.
#[derive(Debug, Clone)]
pub(crate) struct EmbeddingCandidate {
    pub name_ids: Vec<u32>,
    pub vectors: usize,
}

/// One 77-token encoder input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChunkPlan {
    pub tokens: Vec<u32>,
    pub multipliers: Vec<f32>,
    /// (position in `tokens`, candidate index): the candidate's vectors start there.
    pub fixes: Vec<(usize, usize)>,
}

#[derive(Default)]
struct OpenChunk {
    tokens: Vec<u32>,
    multipliers: Vec<f32>,
    fixes: Vec<(usize, usize)>,
}

/// Splits tokenized segments into chunks as A1111's `tokenize_line` does: 75 tokens each
/// (backtracking to a recent comma), `BREAK` ends a chunk, an embedding never straddles
/// two. Each chunk is `<start>` + 75 tokens + `<end>`, padded with the end token up to
/// the first end token and with the pad token after it (so a short plain prompt gives
/// exactly the ids transformers' tokenizer gives with `padding="max_length"`).
pub(crate) fn plan_chunks(
    segments: &[TokenSegment],
    ids: ChunkIds,
    candidates: &[EmbeddingCandidate],
) -> Vec<ChunkPlan> {
    let mut chunks = Vec::new();
    let mut chunk = OpenChunk::default();
    let mut last_comma: Option<usize> = None;
    let close = |chunk: &mut OpenChunk, chunks: &mut Vec<ChunkPlan>| {
        let mut tokens = Vec::with_capacity(MAX_TOKENS);
        tokens.push(ids.bos);
        tokens.append(&mut chunk.tokens);
        tokens.resize(MAX_TOKENS - 1, ids.eos);
        tokens.push(ids.eos);
        let first_end = tokens.iter().position(|&t| t == ids.eos).unwrap_or(MAX_TOKENS - 1);
        tokens[first_end + 1..].iter_mut().for_each(|t| *t = ids.pad);
        let mut multipliers = Vec::with_capacity(MAX_TOKENS);
        multipliers.push(1.0);
        multipliers.append(&mut chunk.multipliers);
        multipliers.resize(MAX_TOKENS, 1.0);
        let fixes = chunk.fixes.drain(..).map(|(offset, index)| (offset + 1, index)).collect();
        chunks.push(ChunkPlan { tokens, multipliers, fixes });
    };
    // Longest names first, so a name that extends another wins.
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(candidates[i].name_ids.len()));
    for segment in segments {
        let (tokens, weight) = match segment {
            TokenSegment::Break => {
                close(&mut chunk, &mut chunks);
                last_comma = None;
                continue;
            }
            TokenSegment::Tokens { ids, weight } => (ids, *weight),
        };
        let mut position = 0;
        while position < tokens.len() {
            let token = tokens[position];
            if Some(token) == ids.comma {
                last_comma = Some(chunk.tokens.len());
            } else if let Some(comma) = last_comma.filter(|&comma| {
                chunk.tokens.len() == CHUNK_TOKENS
                    && chunk.tokens.len() - comma <= COMMA_PADDING_BACKTRACK
            }) {
                let cut = comma + 1;
                let moved_tokens = chunk.tokens.split_off(cut);
                let moved_multipliers = chunk.multipliers.split_off(cut);
                let (moved_fixes, kept_fixes): (Vec<_>, Vec<_>) =
                    chunk.fixes.drain(..).partition(|&(offset, _)| offset >= cut);
                chunk.fixes = kept_fixes;
                close(&mut chunk, &mut chunks);
                chunk.tokens = moved_tokens;
                chunk.multipliers = moved_multipliers;
                chunk.fixes = moved_fixes.into_iter().map(|(o, i)| (o - cut, i)).collect();
                last_comma = None;
            }
            if chunk.tokens.len() == CHUNK_TOKENS {
                close(&mut chunk, &mut chunks);
                last_comma = None;
            }
            let found = order.iter().copied().find(|&i| {
                let name = &candidates[i].name_ids;
                !name.is_empty() && tokens[position..].starts_with(name)
            });
            match found {
                None => {
                    chunk.tokens.push(token);
                    chunk.multipliers.push(weight);
                    position += 1;
                }
                Some(index) => {
                    let count = candidates[index].vectors;
                    if chunk.tokens.len() + count > CHUNK_TOKENS {
                        close(&mut chunk, &mut chunks);
                        last_comma = None;
                    }
                    chunk.fixes.push((chunk.tokens.len(), index));
                    chunk.tokens.extend(std::iter::repeat_n(EMBEDDING_PLACEHOLDER, count));
                    chunk.multipliers.extend(std::iter::repeat_n(weight, count));
                    position += candidates[index].name_ids.len();
                }
            }
        }
    }
    if !chunk.tokens.is_empty() || chunks.is_empty() {
        close(&mut chunk, &mut chunks);
    }
    chunks
}

/// A1111's "Original" emphasis: scales each token's output by its multiplier, then
/// rescales the whole chunk so its mean is what it was. All-ones multipliers leave the
/// tensor untouched (bit for bit).
fn apply_emphasis(hidden: &Tensor, multipliers: &[f32]) -> candle_core::Result<Tensor> {
    if multipliers.iter().all(|&m| m == 1.0) {
        return Ok(hidden.clone());
    }
    let dtype = hidden.dtype();
    let hidden = hidden.to_dtype(DType::F32)?;
    let original_mean = hidden.mean_all()?;
    let scale = Tensor::from_slice(multipliers, (1, multipliers.len(), 1), hidden.device())?;
    let weighted = hidden.broadcast_mul(&scale)?;
    let new_mean = weighted.mean_all()?;
    if new_mean.to_scalar::<f32>()? == 0.0 {
        return weighted.to_dtype(dtype);
    }
    weighted.broadcast_mul(&(original_mean / new_mean)?)?.to_dtype(dtype)
}

/// One encoder's view of a prompt: its chunks and the embedding vectors they use.
struct StagePlan {
    chunks: Vec<ChunkPlan>,
    /// Per candidate index: its vectors for this encoder (only the ones used are loaded).
    vectors: Vec<Option<Tensor>>,
}

fn invalid(field: &str, message: impl Into<String>) -> PipelineError {
    ValidationError::new(field, message).into()
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

    /// Encodes `text` literally (no prompt syntax, truncated to 77 tokens) with A1111's
    /// clip skip (1 = last layer).
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
            let stage = self.single_stage();
            let output = Self::run(stage, encoders[0], text)?;
            let context = Self::sd_context(encoders[0].unwrap_or(&stage.encoder), &output, skip)?;
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

    fn single_stage(&self) -> &EncoderStage {
        self.first.as_ref().expect("SD 1.x/2.x pipelines have a first encoder; this is a bug")
    }

    fn sd_context(
        encoder: &ClipTextModel,
        output: &ClipTextOutput,
        skip: usize,
    ) -> Result<Tensor, PipelineError> {
        Ok(if skip == 0 {
            output.last_hidden_state.clone()
        } else {
            let hidden = ClipTextModel::hidden_state_from_end(output, skip)?;
            encoder.final_layer_norm(&hidden)?
        })
    }

    /// Encodes `text` in A1111's prompt syntax (see [`super::prompt`]): attention weights,
    /// `BREAK`, 75-token chunks whose encodings are concatenated along the token axis
    /// (`[1, 77 × chunks, dim]`), and textual-inversion embeddings from `context` named
    /// by file stem. LoRA tags are ignored here (they are removed from the text).
    /// `field` names the request field in errors (`prompt`, `negative_prompt`). A plain
    /// prompt of at most 75 tokens gives exactly [`PromptEncoder::encode`]'s result.
    pub fn encode_prompt(
        &self,
        text: &str,
        clip_skip: u32,
        context: &PromptContext,
        field: &str,
    ) -> Result<TextConditioning, PipelineError> {
        self.encode_prompt_with(text, clip_skip, context, field, [None, None])
    }

    /// [`PromptEncoder::encode_prompt`] with the first / second encoder replaced where
    /// `encoders` gives one (a request's LoRA-patched copies).
    pub fn encode_prompt_with(
        &self,
        text: &str,
        clip_skip: u32,
        context: &PromptContext,
        field: &str,
        encoders: [Option<&ClipTextModel>; 2],
    ) -> Result<TextConditioning, PipelineError> {
        let parsed = parse_prompt(text);
        for piece in &parsed.pieces {
            if let PromptPiece::Text { weight, .. } = piece {
                if !weight.is_finite() || weight.abs() > f32::MAX as f64 {
                    return Err(invalid(field, "an attention weight is out of range"));
                }
            }
        }
        let skip = clip_skip.saturating_sub(1) as usize;
        let stages: Vec<(&EncoderStage, EncoderSlot, &ClipTextModel)> = if self.sdxl {
            let mut stages = Vec::new();
            if let Some(first) = &self.first {
                stages.push((first, EncoderSlot::SdxlFirst, encoders[0].unwrap_or(&first.encoder)));
            }
            if let Some(second) = &self.second {
                let encoder = encoders[1].unwrap_or(&second.encoder);
                stages.push((second, EncoderSlot::SdxlSecond, encoder));
            }
            stages
        } else {
            let stage = self.single_stage();
            vec![(stage, EncoderSlot::Single, encoders[0].unwrap_or(&stage.encoder))]
        };
        let mut per_stage = Vec::with_capacity(stages.len());
        let mut pooled = None;
        for (stage, slot, encoder) in stages {
            let plan = Self::plan(stage, slot, &parsed.pieces, context, field)?;
            let mut chunk_contexts = Vec::with_capacity(plan.chunks.len());
            for (index, chunk) in plan.chunks.iter().enumerate() {
                let output = Self::run_chunk(encoder, chunk, &plan.vectors)?;
                let hidden = if self.sdxl {
                    ClipTextModel::hidden_state_from_end(&output, skip + 1)?
                } else {
                    Self::sd_context(encoder, &output, skip)?
                };
                chunk_contexts.push(apply_emphasis(&hidden, &chunk.multipliers)?);
                // A1111 (and SDXL's micro-conditioning) pool the first chunk only.
                if index == 0 {
                    if let Some(embeds) = output.text_embeds {
                        pooled = Some(embeds);
                    }
                }
            }
            per_stage.push(chunk_contexts);
        }
        let chunk_count = per_stage[0].len();
        if per_stage.iter().any(|chunks| chunks.len() != chunk_count) {
            return Err(invalid(
                field,
                "the two text encoders split this prompt into different chunk counts (an \
                 embedding with different vector counts per encoder?)",
            ));
        }
        let chunks = (0..chunk_count)
            .map(|i| {
                let parts: Vec<&Tensor> = per_stage.iter().map(|chunks| &chunks[i]).collect();
                Tensor::cat(&parts, D::Minus1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(TextConditioning { context: Tensor::cat(&chunks, 1)?, pooled })
    }

    /// Tokenizes the pieces, finds the embeddings they name, and chunks them.
    fn plan(
        stage: &EncoderStage,
        slot: EncoderSlot,
        pieces: &[PromptPiece],
        context: &PromptContext,
        field: &str,
    ) -> Result<StagePlan, PipelineError> {
        let tokenizer = &stage.tokenizer;
        let segments = pieces
            .iter()
            .map(|piece| match piece {
                PromptPiece::Break => Ok(TokenSegment::Break),
                PromptPiece::Text { text, weight } => Ok(TokenSegment::Tokens {
                    ids: tokenizer.encode(text)?,
                    weight: *weight as f32,
                }),
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let ids = ChunkIds {
            bos: tokenizer.bos_id(),
            eos: tokenizer.eos_id(),
            pad: tokenizer.pad_id(),
            comma: tokenizer.token_id(",</w>"),
        };
        let mut candidates = Vec::new();
        let mut vectors = Vec::new();
        if let Some(library) = &context.embeddings {
            for file in library.files() {
                let name_ids = tokenizer.encode(&file.name)?;
                let used = !name_ids.is_empty()
                    && segments.iter().any(|segment| match segment {
                        TokenSegment::Tokens { ids, .. } => {
                            ids.windows(name_ids.len()).any(|window| window == name_ids)
                        }
                        TokenSegment::Break => false,
                    });
                if !used {
                    continue;
                }
                let embedding = library.load(&file).map_err(|e| invalid(field, e.to_string()))?;
                let set = embedding
                    .vectors_for(slot, stage.encoder.hidden_size())
                    .map_err(|e| invalid(field, e.to_string()))?;
                candidates.push(EmbeddingCandidate { name_ids, vectors: set.dim(0)? });
                vectors.push(Some(set.clone()));
            }
        }
        Ok(StagePlan { chunks: plan_chunks(&segments, ids, &candidates), vectors })
    }

    /// Encodes one chunk, with embedding vectors put in place of their placeholders.
    fn run_chunk(
        encoder: &ClipTextModel,
        chunk: &ChunkPlan,
        vectors: &[Option<Tensor>],
    ) -> Result<ClipTextOutput, PipelineError> {
        let ids = Tensor::from_slice(&chunk.tokens, (1, MAX_TOKENS), encoder.device())?;
        if chunk.fixes.is_empty() {
            return Ok(encoder.forward(&ids)?);
        }
        let embedded = encoder.embed_tokens(&ids)?;
        let mut parts = Vec::new();
        let mut position = 0;
        for &(offset, index) in &chunk.fixes {
            let set = vectors[index].as_ref().expect("a planned fix has vectors; this is a bug");
            let count = set.dim(0)?;
            parts.push(embedded.narrow(1, position, offset - position)?);
            parts.push(set.to_device(encoder.device())?.to_dtype(embedded.dtype())?.unsqueeze(0)?);
            position = offset + count;
        }
        parts.push(embedded.narrow(1, position, MAX_TOKENS - position)?);
        let embedded = Tensor::cat(&parts, 1)?;
        Ok(encoder.forward_with_token_embeddings(&ids, &embedded)?)
    }

    /// Pads the shorter of two conditionings' token axes with `empty` (the encoding of an
    /// empty prompt, one chunk) so classifier-free guidance can batch them, as A1111's
    /// `pad_cond_uncond` does.
    pub fn pad_to_same_length(
        positive: TextConditioning,
        negative: TextConditioning,
        empty: &TextConditioning,
    ) -> Result<(TextConditioning, TextConditioning), PipelineError> {
        let pad = |conditioning: TextConditioning, tokens: usize| -> Result<_, PipelineError> {
            let have = conditioning.context.dim(1)?;
            if have >= tokens {
                return Ok(conditioning);
            }
            let chunk = empty.context.dim(1)?;
            let repeats = (tokens - have) / chunk;
            let filler =
                empty.context.repeat((1, repeats, 1))?.to_dtype(conditioning.context.dtype())?;
            Ok(TextConditioning {
                context: Tensor::cat(&[&conditioning.context, &filler], 1)?,
                pooled: conditioning.pooled,
            })
        };
        let tokens = positive.context.dim(1)?.max(negative.context.dim(1)?);
        Ok((pad(positive, tokens)?, pad(negative, tokens)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: ChunkIds = ChunkIds { bos: 1000, eos: 1001, pad: 0, comma: Some(7) };

    fn words(ids: &[u32], weight: f32) -> TokenSegment {
        TokenSegment::Tokens { ids: ids.to_vec(), weight }
    }

    fn body(chunk: &ChunkPlan) -> Vec<u32> {
        chunk.tokens[1..].iter().copied().take_while(|&t| t != IDS.eos).collect()
    }

    #[test]
    fn short_prompt_is_one_padded_chunk() {
        let chunks = plan_chunks(&[words(&[5, 6], 1.0)], IDS, &[]);
        assert_eq!(chunks.len(), 1);
        let mut expected = vec![1000, 5, 6, 1001];
        expected.resize(77, 0);
        assert_eq!(chunks[0].tokens, expected);
        assert_eq!(chunks[0].multipliers, vec![1.0; 77]);
    }

    #[test]
    fn pad_equal_to_end_token_matches_sd1_tokenizer() {
        let ids = ChunkIds { pad: 1001, ..IDS };
        let chunks = plan_chunks(&[words(&[5], 1.0)], ids, &[]);
        assert!(chunks[0].tokens[2..].iter().all(|&t| t == 1001));
    }

    #[test]
    fn empty_prompt_is_one_chunk() {
        let chunks = plan_chunks(&[words(&[], 1.0)], IDS, &[]);
        assert_eq!(chunks.len(), 1);
        assert_eq!(&chunks[0].tokens[..3], &[1000, 1001, 0]);
    }

    #[test]
    fn long_prompts_split_every_75_tokens() {
        let tokens: Vec<u32> = (0..160).map(|i| 10 + (i % 50)).collect();
        let chunks = plan_chunks(&[words(&tokens, 1.2)], IDS, &[]);
        assert_eq!(chunks.len(), 3);
        assert_eq!(body(&chunks[0]), tokens[..75]);
        assert_eq!(chunks[0].tokens[76], 1001);
        assert_eq!(body(&chunks[1]), tokens[75..150]);
        assert_eq!(body(&chunks[2]), tokens[150..]);
        assert_eq!(chunks[2].multipliers[10], 1.2);
        assert_eq!(chunks[2].multipliers[11], 1.0);
        // Exactly 75 tokens: one chunk.
        assert_eq!(plan_chunks(&[words(&tokens[..75], 1.0)], IDS, &[]).len(), 1);
    }

    #[test]
    fn a_full_chunk_backtracks_to_a_recent_comma() {
        // A comma at body position 60: 15 tokens back from the end (≤ 20) → cut after it.
        let mut tokens: Vec<u32> = (0..80).map(|i| 10 + i).collect();
        tokens[60] = 7;
        let chunks = plan_chunks(&[words(&tokens, 1.0)], IDS, &[]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(body(&chunks[0]), tokens[..61]);
        assert_eq!(body(&chunks[1]), tokens[61..]);
        // A comma 30 tokens back is too far: plain cut at 75.
        let mut tokens: Vec<u32> = (0..80).map(|i| 10 + i).collect();
        tokens[45] = 7;
        let chunks = plan_chunks(&[words(&tokens, 1.0)], IDS, &[]);
        assert_eq!(body(&chunks[0]), tokens[..75]);
    }

    #[test]
    fn break_starts_a_new_chunk() {
        let chunks =
            plan_chunks(&[words(&[5], 1.0), TokenSegment::Break, words(&[6], 1.0)], IDS, &[]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(body(&chunks[0]), [5]);
        assert_eq!(body(&chunks[1]), [6]);
        // A trailing BREAK adds nothing; a leading one gives an empty first chunk.
        assert_eq!(plan_chunks(&[words(&[5], 1.0), TokenSegment::Break], IDS, &[]).len(), 1);
        let chunks = plan_chunks(&[TokenSegment::Break, words(&[6], 1.0)], IDS, &[]);
        assert_eq!(chunks.len(), 2);
        assert_eq!(body(&chunks[0]), Vec::<u32>::new());
    }

    #[test]
    fn embeddings_replace_their_name_tokens() {
        let candidates = [
            EmbeddingCandidate { name_ids: vec![20, 21], vectors: 3 },
            EmbeddingCandidate { name_ids: vec![20], vectors: 1 },
        ];
        let chunks = plan_chunks(&[words(&[5, 20, 21, 6, 20], 1.1)], IDS, &candidates);
        let chunk = &chunks[0];
        // The longer name wins at position 1; the shorter one matches at the end.
        assert_eq!(&chunk.tokens[..8], &[1000, 5, 0, 0, 0, 6, 0, 1001]);
        assert_eq!(chunk.fixes, vec![(2, 0), (6, 1)]);
        assert!(chunk.multipliers[1..7].iter().all(|&m| m == 1.1));
    }

    #[test]
    fn an_embedding_never_straddles_chunks() {
        let candidates = [EmbeddingCandidate { name_ids: vec![20], vectors: 4 }];
        let mut tokens: Vec<u32> = (0..73).map(|i| 100 + i).collect();
        tokens.push(20);
        let chunks = plan_chunks(&[words(&tokens, 1.0)], IDS, &candidates);
        assert_eq!(chunks.len(), 2);
        assert_eq!(body(&chunks[0]).len(), 73);
        assert_eq!(chunks[1].fixes, vec![(1, 0)]);
    }

    #[test]
    fn backtracking_moves_embeddings_with_their_tokens() {
        let candidates = [EmbeddingCandidate { name_ids: vec![20], vectors: 2 }];
        let mut tokens: Vec<u32> = (0..80).map(|i| 100 + i).collect();
        tokens[60] = 7;
        tokens[65] = 20;
        let chunks = plan_chunks(&[words(&tokens, 1.0)], IDS, &candidates);
        assert!(chunks[0].fixes.is_empty());
        assert_eq!(chunks[1].fixes, vec![(1 + 4, 0)]);
    }

    #[test]
    fn emphasis_keeps_the_mean() {
        let hidden = Tensor::arange(0f32, 12.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 3, 4))
            .unwrap();
        let untouched = apply_emphasis(&hidden, &[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(untouched.to_vec3::<f32>().unwrap(), hidden.to_vec3::<f32>().unwrap());
        let weighted = apply_emphasis(&hidden, &[1.0, 2.0, 0.5]).unwrap();
        let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean(&weighted) - mean(&hidden)).abs() < 1e-5);
        let (rows, original) =
            (weighted.to_vec3::<f32>().unwrap(), hidden.to_vec3::<f32>().unwrap());
        let scale_of = |token: usize| rows[0][token][1] / original[0][token][1];
        assert!((scale_of(1) - 2.0 * scale_of(0)).abs() < 1e-5);
        assert!((scale_of(2) - 0.5 * scale_of(0)).abs() < 1e-5);
    }
}
