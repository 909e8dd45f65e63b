//! CLIP text encoders as transformers defines them: `CLIPTextModel` (SD 1.x / 2.x, SDXL's
//! first encoder) and `CLIPTextModelWithProjection` (SDXL's second encoder), configured
//! from the component's `config.json`.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::common::{merge_heads, scaled_dot_product_attention, split_heads};
use super::layers;

/// The fields of a transformers `CLIPTextConfig` that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (only `CLIPTextModelWithProjection` has one).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// transformers treats 2 as "legacy": the pooled token is then the highest id.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
}

fn default_max_positions() -> usize {
    77
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    49407
}

/// The MLP activation of the encoder layers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
        }
    }
}

/// One pre-norm transformer layer of a CLIP encoder (text or vision).
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: layers::LayerNorm,
    q_proj: layers::Linear,
    k_proj: layers::Linear,
    v_proj: layers::Linear,
    out_proj: layers::Linear,
    layer_norm2: layers::LayerNorm,
    fc1: layers::Linear,
    fc2: layers::Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        EncoderLayer::with_dims(
            vb,
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            config.layer_norm_eps,
            config.hidden_act,
        )
    }

    /// A layer of `hidden` width, `intermediate` MLP width and `heads` heads.
    pub(crate) fn with_dims(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        layer_norm_eps: f64,
        activation: Activation,
    ) -> Result<Self> {
        let attention = vb.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: layers::layer_norm(hidden, layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: layers::linear(hidden, hidden, attention.pp("q_proj"))?,
            k_proj: layers::linear(hidden, hidden, attention.pp("k_proj"))?,
            v_proj: layers::linear(hidden, hidden, attention.pp("v_proj"))?,
            out_proj: layers::linear(hidden, hidden, attention.pp("out_proj"))?,
            layer_norm2: layers::layer_norm(hidden, layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: layers::linear(hidden, intermediate, vb.pp("mlp.fc1"))?,
            fc2: layers::linear(intermediate, hidden, vb.pp("mlp.fc2"))?,
            heads,
            activation,
        })
    }

    /// `mask` is added to the attention scores (the text encoder's causal mask; none
    /// for the vision encoder).
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let query = split_heads(&self.q_proj.forward(&normed)?, self.heads)?;
        let key = split_heads(&self.k_proj.forward(&normed)?, self.heads)?;
        let value = split_heads(&self.v_proj.forward(&normed)?, self.heads)?;
        let attended = scaled_dot_product_attention(&query, &key, &value, mask, false)?;
        let x = self.out_proj.forward_add(&merge_heads(&attended)?, x)?;
        let normed = self.layer_norm2.forward(&x)?;
        self.fc2.forward_add(&self.activation.apply(&self.fc1.forward(&normed)?)?, &x)
    }
}

/// All hidden states of one encoder run.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[0]` is the embedding output, `hidden_states[i]` the output of layer
    /// `i` (no final layer norm), as transformers' `output_hidden_states=True`.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after the final layer norm (`last_hidden_state`).
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the EOS position (`pooler_output`).
    pub pooled: Tensor,
    /// `text_projection(pooled)` for encoders with a projection (`text_embeds`).
    pub text_embeds: Option<Tensor>,
}

/// A CLIP text encoder, with or without `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads from a `VarBuilder` at the root of the component's weights (the keys start with
    /// `text_model.`); `with_projection` for `CLIPTextModelWithProjection`.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        // transformers < 5 saves the encoder under `text_model.`; transformers 5 saves it
        // at the root.
        let text = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let embeddings = text.pp("embeddings");
        let token_embedding = candle_nn::embedding(
            config.vocab_size,
            config.hidden_size,
            embeddings.pp("token_embedding"),
        )?;
        let position_embedding = embeddings.get(
            (config.max_position_embeddings, config.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(text.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = candle_nn::layer_norm(
            config.hidden_size,
            config.layer_norm_eps,
            text.pp("final_layer_norm"),
        )?;
        let text_projection = if with_projection {
            let width = config.projection_dim.unwrap_or(config.hidden_size);
            Some(candle_nn::linear_no_bias(config.hidden_size, width, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(ClipTextModel {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// The final layer norm, for embeddings taken from an earlier layer (clip skip).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    fn causal_mask(tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..tokens)
            .flat_map(|i| (0..tokens).map(move |j| if j > i { f32::MIN } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, tokens, tokens), device)?.to_dtype(dtype)
    }

    /// Runs the encoder on `input_ids` (`[batch, tokens]`, u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_with_token_embeddings(input_ids, &self.embed_tokens(input_ids)?)
    }

    /// The token embeddings of `input_ids` (`[batch, tokens, hidden]`), before positions
    /// are added: where textual-inversion vectors replace some of them.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.token_embedding.forward(input_ids)
    }

    /// Runs the encoder on precomputed token embeddings (`[batch, tokens, hidden]`, e.g.
    /// [`ClipTextModel::embed_tokens`] with some rows replaced). `input_ids` still choose
    /// the pooled position.
    pub fn forward_with_token_embeddings(
        &self,
        input_ids: &Tensor,
        token_embeddings: &Tensor,
    ) -> Result<ClipTextOutput> {
        let (_, tokens) = input_ids.dims2()?;
        let (_, embedded_tokens, _) = token_embeddings.dims3()?;
        if embedded_tokens != tokens {
            candle_core::bail!("{embedded_tokens} token embeddings for {tokens} token ids");
        }
        if tokens > self.config.max_position_embeddings {
            candle_core::bail!(
                "{tokens} tokens exceed the encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let positions = self.position_embedding.i(..tokens)?;
        let mut x = token_embeddings.broadcast_add(&positions)?;
        let mask = Self::causal_mask(tokens, x.dtype(), x.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let pooled = self.pool(&last_hidden_state, input_ids)?;
        let text_embeds = match &self.text_projection {
            Some(projection) => Some(projection.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput { hidden_states, last_hidden_state, pooled, text_embeds })
    }

    /// Picks, per sequence, the hidden state at the EOS token: the first position holding
    /// `eos_token_id`, or, for legacy configs with `eos_token_id == 2`, the highest id.
    fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let mut rows = Vec::with_capacity(ids.len());
        for (row, sequence) in ids.iter().enumerate() {
            let position = if self.config.eos_token_id == 2 {
                let max = sequence.iter().copied().max().unwrap_or(0);
                sequence.iter().position(|&id| id == max)
            } else {
                sequence.iter().position(|&id| id == self.config.eos_token_id)
            }
            .unwrap_or(sequence.len().saturating_sub(1));
            rows.push(last_hidden_state.i((row, position))?.unsqueeze(0)?);
        }
        Tensor::cat(&rows, 0)
    }

    /// Hidden size (width of the embeddings this encoder produces).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Width of `text_embeds`, when the encoder has a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection
            .as_ref()
            .map(|_| self.config.projection_dim.unwrap_or(self.config.hidden_size))
    }

    /// Index helper: the hidden state `from_end` layers before the last
    /// (`0` = last layer's output, `1` = penultimate...). Errors when out of range.
    pub fn hidden_state_from_end(output: &ClipTextOutput, from_end: usize) -> Result<Tensor> {
        let count = output.hidden_states.len();
        if from_end + 1 >= count {
            candle_core::bail!("clip skip {from_end} is beyond the encoder's {} layers", count - 1);
        }
        Ok(output.hidden_states[count - 1 - from_end].clone())
    }
}
