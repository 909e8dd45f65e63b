//! Building blocks shared by the networks: multi-head attention (the kernels' blocked
//! attention for f32 on CPU, batched matmuls around a softmax otherwise), ResNet blocks,
//! sinusoidal timestep embeddings and config helpers.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

pub use super::layers::{conv2d, group_norm, linear, linear_no_bias, Conv2d, GroupNorm, Linear};
use serde::Deserialize;

/// A config value diffusers allows as one number for all blocks or a list per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `index` of `blocks` blocks; `None` when a list is too short.
    pub fn for_block(&self, index: usize) -> Option<usize> {
        match self {
            PerBlock::One(value) => Some(*value),
            PerBlock::Each(values) => values.get(index).copied(),
        }
    }

    /// Expands to one value per block, checking a list's length.
    pub fn expand(&self, blocks: usize, name: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(value) => Ok(vec![*value; blocks]),
            PerBlock::Each(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::Each(values) => candle_core::bail!(
                "config {name} lists {} values for {blocks} blocks",
                values.len()
            ),
        }
    }
}

/// Score matrices (all batches and heads, f32) larger than this many bytes are computed
/// in query chunks ("attention slicing", as diffusers' `enable_attention_slicing`): each
/// query row's softmax needs only its own scores, so chunks give the same result with a
/// fraction of the memory (e.g. the VAE's mid-block at 1024² untiled: 1 GiB → 256 MiB).
pub const ATTENTION_SLICE_BYTES: usize = 256 << 20;

/// Scaled dot-product attention over `[batch, heads, tokens, head_dim]` tensors, as two
/// batched matmuls around a fused softmax. With `upcast`, scores are computed in f32
/// (diffusers' `upcast_attention`, which matters for f16/bf16 weights). Sliced by query
/// rows when the scores would exceed [`ATTENTION_SLICE_BYTES`].
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    let tokens = query.dim(D::Minus2)?;
    let keys = key.dim(D::Minus2)?;
    let leading = query.elem_count() / (tokens * query.dim(D::Minus1)?).max(1);
    let score_bytes = leading * tokens * keys * 4;
    if score_bytes > ATTENTION_SLICE_BYTES && tokens > 1 {
        let rows = (ATTENTION_SLICE_BYTES / (leading * keys * 4)).clamp(1, tokens);
        return sliced_attention(query, key, value, mask, upcast, rows);
    }
    attention_block(query, key, value, mask, upcast)
}

/// [`scaled_dot_product_attention`] computed `rows` query rows at a time.
pub fn sliced_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
    rows: usize,
) -> Result<Tensor> {
    let tokens = query.dim(D::Minus2)?;
    let mut chunks = Vec::with_capacity(tokens.div_ceil(rows.max(1)));
    for start in (0..tokens).step_by(rows.max(1)) {
        let length = rows.min(tokens - start);
        let query_rows = query.narrow(D::Minus2, start, length)?;
        // A mask broadcast over the query rows stays whole; a per-row one is cut too.
        let mask_rows = match mask {
            Some(mask) if mask.rank() >= 2 && mask.dim(D::Minus2)? == tokens => {
                Some(mask.narrow(D::Minus2, start, length)?)
            }
            other => other.cloned(),
        };
        chunks.push(attention_block(&query_rows, key, value, mask_rows.as_ref(), upcast)?);
    }
    Tensor::cat(&chunks, query.rank() - 2)
}

fn attention_block(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    let head_dim = query.dim(D::Minus1)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let in_dtype = query.dtype();
    let (query, key) = if upcast && in_dtype != DType::F32 {
        (query.to_dtype(DType::F32)?, key.to_dtype(DType::F32)?)
    } else {
        (query.clone(), key.clone())
    };
    // Q·Kᵀ and P·V: 2 · 2 · (leading · tokens · keys · head_dim) operations.
    let keys = key.dim(D::Minus2)?;
    super::layers::add_flops(4 * (query.elem_count() * keys) as u64);
    let mut scores = (query.matmul(&key.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probabilities = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(in_dtype)?;
    probabilities.matmul(value)
}

/// `[batch, tokens, heads * head_dim]` → `[batch, heads, tokens, head_dim]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, tokens, width) = x.dims3()?;
    x.reshape((batch, tokens, heads, width / heads))?.transpose(1, 2)?.contiguous()
}

/// `[batch, heads, tokens, head_dim]` → `[batch, tokens, heads * head_dim]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (batch, heads, tokens, head_dim) = x.dims4()?;
    x.transpose(1, 2)?.reshape((batch, tokens, heads * head_dim))
}

/// diffusers' `Attention` with separate q/k/v projections (`to_q`, `to_k`, `to_v`,
/// `to_out.0`), used for self- and cross-attention in UNets and for the VAE mid block.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    /// `query_dim` wide queries, `context_dim` wide keys/values, `heads` heads of
    /// `head_dim`; `qkv_bias` for the VAE, which has biases on q/k/v.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let make = |name: &str, input: usize| {
            if qkv_bias {
                linear(input, inner, vb.pp(name))
            } else {
                linear_no_bias(input, inner, vb.pp(name))
            }
        };
        Ok(Attention {
            to_q: make("to_q", query_dim)?,
            to_k: make("to_k", context_dim)?,
            to_v: make("to_v", context_dim)?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            upcast,
        })
    }

    /// Attends `x` (`[batch, tokens, query_dim]`) to `context` (itself when `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_extras(x, context, &[])
    }

    /// The width of the queries' projection (heads × head_dim), which extra keys and
    /// values must match.
    pub fn query_width(&self) -> usize {
        self.to_q.weight().dim(0).expect("a linear weight is 2-D; this is a bug")
    }

    /// [`Attention::forward`] that also attends, with the same queries, to each of
    /// `extras` and adds those results, scaled, before the output projection.
    pub fn forward_with_extras(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        extras: &[ExtraKeyValues],
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let query = self.to_q.forward(x)?;
        let key = self.to_k.forward(context)?;
        let value = self.to_v.forward(context)?;
        // f32 on CPU: the blocked kernel reads the heads in place, scores never whole.
        let extra_tensors = extras
            .iter()
            .map(|e| Ok((e.key.to_dtype(x.dtype())?, e.value.to_dtype(x.dtype())?, e.scale as f32)))
            .collect::<Result<Vec<_>>>()?;
        if let Some(attended) =
            super::layers::blocked_attention(&query, &key, &value, self.heads, &extra_tensors)?
        {
            return self.to_out.forward(&attended);
        }
        let query = split_heads(&query, self.heads)?;
        let key = split_heads(&key, self.heads)?;
        let value = split_heads(&value, self.heads)?;
        let attended = scaled_dot_product_attention(&query, &key, &value, None, self.upcast)?;
        let mut attended = merge_heads(&attended)?;
        for extra in extras {
            let key = split_heads(&extra.key.to_dtype(x.dtype())?, self.heads)?;
            let value = split_heads(&extra.value.to_dtype(x.dtype())?, self.heads)?;
            let extra_attended =
                scaled_dot_product_attention(&query, &key, &value, None, self.upcast)?;
            attended = (attended + (merge_heads(&extra_attended)? * extra.scale)?)?;
        }
        self.to_out.forward(&attended)
    }
}

/// Keys and values a cross-attention layer attends to beside its context, the result
/// added `scale`-weighted to the context's attention output before the output projection:
/// IP-Adapter's decoupled cross-attention (diffusers' `IPAdapterAttnProcessor2_0`).
/// `key` and `value` are `[batch, tokens, heads × head_dim]`, already projected.
#[derive(Debug, Clone)]
pub struct ExtraKeyValues {
    pub key: Tensor,
    pub value: Tensor,
    pub scale: f64,
}

/// diffusers' `ResnetBlock2D` (default time-embedding mode: added after conv1).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<candle_nn::Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(vb.pp("conv_shortcut"), in_channels, out_channels, 1, 0, 1)?)
        } else {
            None
        };
        let time_emb_proj = match temb_channels {
            Some(channels) => {
                Some(candle_nn::linear(channels, out_channels, vb.pp("time_emb_proj"))?)
            }
            None => None,
        };
        Ok(ResnetBlock {
            norm1: group_norm(groups, in_channels, eps, vb.pp("norm1"))?,
            conv1: conv2d(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: group_norm(groups, out_channels, eps, vb.pp("norm2"))?,
            conv2: conv2d(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `temb` is the already-computed time embedding `[batch, temb_channels]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(projection), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = linear_per_row(projection, &candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// Sinusoidal embedding of `timesteps` (`[batch]`, f32) into `dim` channels, as diffusers'
/// `get_timestep_embedding` (max period 10000).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let device = timesteps.device();
    // Same rounding steps as diffusers: multiply by -ln(10000), then a true division.
    let divisor = Tensor::new(&[(half as f64 - downscale_freq_shift) as f32], device)?;
    let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)?
        * (-(10000f64.ln())))?
    .broadcast_div(&divisor)?;
    let frequencies = exponent.exp()?;
    let arguments =
        timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&frequencies.unsqueeze(0)?)?;
    let (sin, cos) = (arguments.sin()?, arguments.cos()?);
    let embedding = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        embedding.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(embedding)
    }
}

/// diffusers' `TimestepEmbedding`: linear → SiLU → linear.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    linear_1: candle_nn::Linear,
    linear_2: candle_nn::Linear,
}

impl TimestepMlp {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(TimestepMlp {
            linear_1: candle_nn::linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = candle_nn::ops::silu(&linear_per_row(&self.linear_1, x)?)?;
        linear_per_row(&self.linear_2, &hidden)
    }
}

/// `linear` applied to each row of a `[rows, features]` input on its own. For a few rows
/// (the batch of a time embedding), gemm's accumulation order depends on the row count,
/// so one product over all rows would make a row's result depend on its batch; row by
/// row it does not, and requests batched together get exactly what they get alone.
pub fn linear_per_row(linear: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    let rows = x.dim(0)?;
    if x.rank() != 2 || rows <= 1 {
        return linear.forward(x);
    }
    let outputs =
        (0..rows).map(|row| linear.forward(&x.narrow(0, row, 1)?)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outputs, 0)
}
