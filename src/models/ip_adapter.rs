//! IP-Adapter networks (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"):
//! the image projection that turns CLIP image features into extra context tokens (base:
//! linear + layer norm; "plus": the perceiver Resampler over the encoder's penultimate
//! hidden states) and the per-layer `to_k_ip` / `to_v_ip` projections of the decoupled
//! cross-attention. Weights use the original (public IP-Adapter repository) key names,
//! `image_proj.*` and `ip_adapter.N.*`; the layer numbering and the Resampler follow
//! diffusers' `IPAdapterAttnProcessor2_0`, `ImageProjection` and
//! `IPAdapterPlusImageProjection`.

use std::collections::HashMap;

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::common::{merge_heads, scaled_dot_product_attention, split_heads};

/// The Resampler's attention head width; the public format does not store the head
/// count, so (as diffusers does) it is `to_q` rows / 64.
const RESAMPLER_HEAD_DIM: usize = 64;

/// One Resampler block: perceiver attention (queries: the latents; keys/values: the
/// image features and the latents) and a GELU feed-forward, both residual.
#[derive(Debug, Clone)]
pub struct ResamplerBlock {
    norm_features: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl ResamplerBlock {
    fn forward(&self, features: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let features_normed = self.norm_features.forward(features)?;
        let latents_normed = self.norm_latents.forward(latents)?;
        let context = Tensor::cat(&[&features_normed, &latents_normed], 1)?;
        let query = split_heads(&self.to_q.forward(&latents_normed)?, self.heads)?;
        let key = split_heads(&self.to_k.forward(&context)?, self.heads)?;
        let value = split_heads(&self.to_v.forward(&context)?, self.heads)?;
        let attended = scaled_dot_product_attention(&query, &key, &value, None, false)?;
        let latents = (self.to_out.forward(&merge_heads(&attended)?)? + latents)?;
        let hidden = self.ff_in.forward(&self.ff_norm.forward(&latents)?)?.gelu_erf()?;
        self.ff_out.forward(&hidden)? + latents
    }
}

/// The base adapter's projection: `proj` (linear to `tokens × width`) then `norm`.
#[derive(Debug, Clone)]
pub struct LinearProjection {
    proj: Linear,
    norm: LayerNorm,
    tokens: usize,
    width: usize,
}

/// The "plus" adapter's perceiver Resampler: learned latent queries attend to the image
/// features through a stack of [`ResamplerBlock`]s.
#[derive(Debug, Clone)]
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    blocks: Vec<ResamplerBlock>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

/// The image projection of an adapter.
#[derive(Debug, Clone)]
pub enum ImageProjection {
    /// From `image_embeds` (base adapters).
    Base(LinearProjection),
    /// From the penultimate hidden states ("plus" adapters).
    Plus(Resampler),
}

impl ImageProjection {
    /// True for "plus" adapters, which read the encoder's penultimate hidden states
    /// (and, for the unconditional half, the encoder's output on a zero image).
    pub fn reads_hidden_states(&self) -> bool {
        matches!(self, ImageProjection::Plus(_))
    }

    /// Projects `[batch, projection_dim]` image embeddings (base) or `[batch, tokens,
    /// hidden]` hidden states (plus) to `[batch, tokens, cross_attention_dim]`.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        match self {
            ImageProjection::Base(base) => {
                let batch = features.dim(0)?;
                let projected = base.proj.forward(features)?;
                base.norm.forward(&projected.reshape((batch, base.tokens, base.width))?)
            }
            ImageProjection::Plus(resampler) => {
                let batch = features.dim(0)?;
                let mut latents = resampler.latents.repeat((batch, 1, 1))?;
                let features = resampler.proj_in.forward(features)?;
                for block in &resampler.blocks {
                    latents = block.forward(&features, &latents)?;
                }
                resampler.norm_out.forward(&resampler.proj_out.forward(&latents)?)
            }
        }
    }
}

/// A loaded adapter's networks (the image encoder is loaded beside it, see
/// `adapters::ip_adapter`).
#[derive(Debug, Clone)]
pub struct IpAdapterWeights {
    pub projection: ImageProjection,
    /// `(to_k_ip, to_v_ip)` of every cross-attention layer, in diffusers' processor order
    /// (down blocks, up blocks, mid block).
    pub layers: Vec<(Linear, Linear)>,
    /// The width of the image tokens (the UNet's cross-attention width).
    pub cross_attention_dim: usize,
}

fn shape_of(tensors: &HashMap<String, Tensor>, name: &str) -> Result<Vec<usize>> {
    tensors
        .get(name)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
}

impl IpAdapterWeights {
    /// Builds the adapter from the tensors of its file (keys `image_proj.*` and
    /// `ip_adapter.N.to_{k,v}_ip.weight`). `image_feature_width` is what the image encoder
    /// gives: its `projection_dim` for base adapters, its `hidden_size` for plus ones.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        vb: VarBuilder,
        encoder_projection_dim: usize,
        encoder_hidden_size: usize,
    ) -> Result<Self> {
        let image_proj = vb.pp("image_proj");
        let (projection, cross_attention_dim) = if tensors.contains_key("image_proj.proj.weight") {
            let shape = shape_of(tensors, "image_proj.proj.weight")?;
            let width = shape_of(tensors, "image_proj.norm.weight")?[0];
            if shape.len() != 2 || width == 0 || shape[0] % width != 0 {
                candle_core::bail!(
                    "image_proj.proj.weight {shape:?} does not fit norm width {width}"
                );
            }
            if shape[1] != encoder_projection_dim {
                candle_core::bail!(
                    "the adapter's projection takes {} wide image embeddings but its \
                     image_encoder gives {encoder_projection_dim}",
                    shape[1]
                );
            }
            let tokens = shape[0] / width;
            let projection = ImageProjection::Base(LinearProjection {
                proj: candle_nn::linear(shape[1], shape[0], image_proj.pp("proj"))?,
                norm: candle_nn::layer_norm(width, 1e-5, image_proj.pp("norm"))?,
                tokens,
                width,
            });
            (projection, width)
        } else if tensors.contains_key("image_proj.latents") {
            let latents_shape = shape_of(tensors, "image_proj.latents")?;
            let [_, queries, hidden] = latents_shape[..] else {
                candle_core::bail!("image_proj.latents has shape {latents_shape:?}");
            };
            let embed = shape_of(tensors, "image_proj.proj_in.weight")?[1];
            if embed != encoder_hidden_size {
                candle_core::bail!(
                    "the adapter's Resampler takes {embed} wide hidden states but its \
                     image_encoder gives {encoder_hidden_size}"
                );
            }
            let output = shape_of(tensors, "image_proj.proj_out.weight")?[0];
            let mut blocks = Vec::new();
            while tensors.contains_key(&format!("image_proj.layers.{}.0.to_q.weight", blocks.len()))
            {
                let i = blocks.len();
                let layer = image_proj.pp(format!("layers.{i}"));
                let inner = shape_of(tensors, &format!("image_proj.layers.{i}.0.to_q.weight"))?[0];
                let ff = shape_of(tensors, &format!("image_proj.layers.{i}.1.1.weight"))?[0];
                if inner % RESAMPLER_HEAD_DIM != 0 {
                    candle_core::bail!("Resampler to_q width {inner} is not a multiple of 64");
                }
                // to_kv holds the key and value projections stacked.
                let to_kv = layer.pp("0").get((2 * inner, hidden), "to_kv.weight")?;
                blocks.push(ResamplerBlock {
                    norm_features: candle_nn::layer_norm(hidden, 1e-5, layer.pp("0.norm1"))?,
                    norm_latents: candle_nn::layer_norm(hidden, 1e-5, layer.pp("0.norm2"))?,
                    to_q: candle_nn::linear_no_bias(hidden, inner, layer.pp("0.to_q"))?,
                    to_k: Linear::new(to_kv.narrow(0, 0, inner)?, None),
                    to_v: Linear::new(to_kv.narrow(0, inner, inner)?, None),
                    to_out: candle_nn::linear_no_bias(inner, hidden, layer.pp("0.to_out"))?,
                    heads: inner / RESAMPLER_HEAD_DIM,
                    ff_norm: candle_nn::layer_norm(hidden, 1e-5, layer.pp("1.0"))?,
                    ff_in: candle_nn::linear_no_bias(hidden, ff, layer.pp("1.1"))?,
                    ff_out: candle_nn::linear_no_bias(ff, hidden, layer.pp("1.3"))?,
                });
            }
            if blocks.is_empty() {
                candle_core::bail!("the Resampler has no layers");
            }
            let projection = ImageProjection::Plus(Resampler {
                latents: image_proj.get((1, queries, hidden), "latents")?,
                proj_in: candle_nn::linear(embed, hidden, image_proj.pp("proj_in"))?,
                blocks,
                proj_out: candle_nn::linear(hidden, output, image_proj.pp("proj_out"))?,
                norm_out: candle_nn::layer_norm(output, 1e-5, image_proj.pp("norm_out"))?,
            });
            (projection, output)
        } else {
            candle_core::bail!(
                "no image_proj.proj.weight (base) or image_proj.latents (plus): not an \
                 IP-Adapter this server runs (Full/FaceID variants are not supported)"
            );
        };
        let mut layers = Vec::new();
        loop {
            let key = 2 * layers.len() + 1;
            let name = format!("ip_adapter.{key}.to_k_ip.weight");
            if !tensors.contains_key(&name) {
                break;
            }
            let hidden = shape_of(tensors, &name)?[0];
            let layer = vb.pp(format!("ip_adapter.{key}"));
            layers.push((
                candle_nn::linear_no_bias(cross_attention_dim, hidden, layer.pp("to_k_ip"))?,
                candle_nn::linear_no_bias(cross_attention_dim, hidden, layer.pp("to_v_ip"))?,
            ));
        }
        if layers.is_empty() {
            candle_core::bail!("no ip_adapter.1.to_k_ip.weight: the file has no attention layers");
        }
        Ok(IpAdapterWeights { projection, layers, cross_attention_dim })
    }

    /// The width each layer's keys and values have (the UNet block's channel count).
    pub fn layer_widths(&self) -> Vec<usize> {
        self.layers.iter().map(|(to_k, _)| to_k.weight().dim(0).unwrap_or(0)).collect()
    }

    /// `(to_k_ip(tokens), to_v_ip(tokens))` for every layer.
    pub fn key_values(&self, tokens: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        self.layers
            .iter()
            .map(|(to_k, to_v)| Ok((to_k.forward(tokens)?, to_v.forward(tokens)?)))
            .collect()
    }
}

/// Concatenates per-image token sets `[images, tokens, width]` into one sequence
/// `[1, images × tokens, width]`, as diffusers' attention processor sees several images of
/// one adapter.
pub fn join_images(tokens: &Tensor) -> Result<Tensor> {
    let (images, count, width) = tokens.dims3()?;
    tokens.reshape((1, images * count, width))
}
