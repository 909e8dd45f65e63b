//! The CLIP image encoder as transformers' `CLIPVisionModelWithProjection` defines it
//! (patch embedding, class token, pre-norm ViT, pooled class token projected), configured
//! from its `config.json`, and the image preprocessing of transformers' `CLIPImageProcessor`
//! (shortest side resized with antialiased bicubic, center crop, mean/std normalisation),
//! configured from `preprocessor_config.json`.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::clip::{Activation, EncoderLayer};

/// The fields of a transformers `CLIPVisionConfig` that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Width of `image_embeds` (`visual_projection`).
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn default_channels() -> usize {
    3
}
fn default_projection_dim() -> usize {
    512
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// Reads a config that is either a `CLIPVisionConfig` or a full `CLIPConfig` (whose
    /// vision part sits under `vision_config`).
    pub fn from_json(value: &serde_json::Value) -> serde_json::Result<ClipVisionConfig> {
        match value.get("vision_config") {
            Some(vision) if value.get("hidden_size").is_none() => {
                ClipVisionConfig::deserialize(vision)
            }
            _ => ClipVisionConfig::deserialize(value),
        }
    }
}

/// What one encoder run gives the IP-Adapter projections.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `visual_projection(post_layernorm(class token))`: `[batch, projection_dim]`.
    pub image_embeds: Tensor,
    /// `hidden_states[-2]` as transformers counts them (the input of the last layer):
    /// `[batch, 1 + patches, hidden]`, what "plus" adapters read.
    pub penultimate_hidden_state: Tensor,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layernorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Loads from a `VarBuilder` at the root of `model.safetensors` (keys `vision_model.*`
    /// and `visual_projection.weight`).
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        let vision = vb.pp("vision_model");
        let embeddings = vision.pp("embeddings");
        let hidden = config.hidden_size;
        if config.patch_size == 0 || !config.image_size.is_multiple_of(config.patch_size) {
            candle_core::bail!(
                "image_size {} is not a multiple of patch_size {}",
                config.image_size,
                config.patch_size
            );
        }
        let patches = (config.image_size / config.patch_size).pow(2);
        let patch_embedding = candle_nn::conv2d_no_bias(
            config.num_channels,
            hidden,
            config.patch_size,
            Conv2dConfig { stride: config.patch_size, ..Default::default() },
            embeddings.pp("patch_embedding"),
        )?;
        let class_embedding = embeddings.get(hidden, "class_embedding")?;
        let position_embedding =
            embeddings.get((patches + 1, hidden), "position_embedding.weight")?;
        // transformers spells the pre-encoder norm `pre_layrnorm`.
        let pre_layernorm =
            candle_nn::layer_norm(hidden, config.layer_norm_eps, vision.pp("pre_layrnorm"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::with_dims(
                    vision.pp(format!("encoder.layers.{i}")),
                    hidden,
                    config.intermediate_size,
                    config.num_attention_heads,
                    config.layer_norm_eps,
                    config.hidden_act,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm =
            candle_nn::layer_norm(hidden, config.layer_norm_eps, vision.pp("post_layernorm"))?;
        let visual_projection =
            candle_nn::linear_no_bias(hidden, config.projection_dim, vb.pp("visual_projection"))?;
        Ok(ClipVisionModel {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layernorm,
            layers,
            post_layernorm,
            visual_projection,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    /// Encodes preprocessed images (`[batch, 3, image_size, image_size]`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let batch = pixel_values.dim(0)?;
        let hidden = self.config.hidden_size;
        let patches = self.patch_embedding.forward(&pixel_values.to_dtype(self.dtype())?)?;
        let patches = patches.flatten_from(2)?.transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, hidden))?.repeat((batch, 1, 1))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layernorm.forward(&x)?;
        let mut penultimate = x.clone();
        for (index, layer) in self.layers.iter().enumerate() {
            if index + 1 == self.layers.len() {
                penultimate = x.clone();
            }
            x = layer.forward(&x, None)?;
        }
        let pooled = self.post_layernorm.forward(&x.i((.., 0))?)?;
        let image_embeds = self.visual_projection.forward(&pooled)?;
        Ok(ClipVisionOutput { image_embeds, penultimate_hidden_state: penultimate })
    }
}

/// A size in a `preprocessor_config.json`: a number, `{"shortest_edge"}` or
/// `{"height", "width"}`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProcessorSize {
    Square(usize),
    ShortestEdge { shortest_edge: usize },
    Exact { height: usize, width: usize },
}

/// The fields of transformers' `CLIPImageProcessor` config that change the pixels.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageProcessor {
    #[serde(default = "yes")]
    pub do_resize: bool,
    pub size: ProcessorSize,
    /// PIL's resampling filter id; only 3 (bicubic) is implemented.
    #[serde(default = "bicubic")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    pub crop_size: ProcessorSize,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "openai_mean")]
    pub image_mean: [f32; 3],
    #[serde(default = "openai_std")]
    pub image_std: [f32; 3],
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
/// OpenAI CLIP's normalisation, as transformers writes it (`OPENAI_CLIP_MEAN` / `_STD`);
/// torch rounds the Python floats to f32, so do we.
const OPENAI_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn openai_mean() -> [f32; 3] {
    OPENAI_MEAN.map(|v| v as f32)
}
fn openai_std() -> [f32; 3] {
    OPENAI_STD.map(|v| v as f32)
}

impl ClipImageProcessor {
    /// What diffusers' `load_ip_adapter` builds when the folder has no
    /// `preprocessor_config.json`: `CLIPImageProcessor(size=image_size,
    /// crop_size=image_size)` (OpenAI CLIP mean/std, bicubic).
    pub fn for_image_size(image_size: usize) -> ClipImageProcessor {
        ClipImageProcessor {
            do_resize: true,
            size: ProcessorSize::ShortestEdge { shortest_edge: image_size },
            resample: bicubic(),
            do_center_crop: true,
            crop_size: ProcessorSize::Exact { height: image_size, width: image_size },
            do_rescale: true,
            rescale_factor: default_rescale(),
            do_normalize: true,
            image_mean: openai_mean(),
            image_std: openai_std(),
        }
    }

    /// Rejects settings this implementation does not reproduce.
    pub fn check_supported(&self) -> std::result::Result<(), String> {
        if self.do_resize && self.resample != 3 {
            return Err(format!(
                "resample {} is not supported (only 3, bicubic, as CLIP uses)",
                self.resample
            ));
        }
        Ok(())
    }

    /// The output size (height, width) of `resize` for an image of `height` × `width`, as
    /// transformers computes it (the long side truncated, not rounded).
    fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            ProcessorSize::Square(side) => (side, side),
            ProcessorSize::Exact { height, width } => (height, width),
            ProcessorSize::ShortestEdge { shortest_edge } => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = (shortest_edge as f64 * long as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, shortest_edge)
                } else {
                    (shortest_edge, new_long)
                }
            }
        }
    }

    fn crop_dims(&self) -> (usize, usize) {
        match self.crop_size {
            ProcessorSize::Square(side) | ProcessorSize::ShortestEdge { shortest_edge: side } => {
                (side, side)
            }
            ProcessorSize::Exact { height, width } => (height, width),
        }
    }

    /// Turns an RGB8 image (row-major, `width * height * 3` bytes) into the encoder's input,
    /// `[3, H, W]` f32 values, as `CLIPImageProcessor` (torchvision backend) does: resize
    /// (uint8 antialiased bicubic), center crop (zero padding when the crop is larger),
    /// `(x - mean * 255) / (std * 255)` in f32.
    pub fn preprocess(&self, rgb: &[u8], width: usize, height: usize) -> Vec<f32> {
        let (mut pixels, mut h, mut w) = (rgb.to_vec(), height, width);
        if self.do_resize {
            let (new_h, new_w) = self.resized_size(h, w);
            pixels = resize_bicubic_antialiased(&pixels, w, h, new_w.max(1), new_h.max(1));
            (h, w) = (new_h.max(1), new_w.max(1));
        }
        if self.do_center_crop {
            let (crop_h, crop_w) = self.crop_dims();
            pixels = center_crop(&pixels, w, h, crop_w, crop_h);
            (h, w) = (crop_h, crop_w);
        }
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        let rescale = self.rescale_factor as f32;
        for channel in 0..3 {
            // transformers fuses rescaling into normalisation: mean / rescale_factor.
            let (mean, std) = if self.do_normalize && self.do_rescale {
                (
                    self.image_mean[channel] * (1.0 / self.rescale_factor) as f32,
                    self.image_std[channel] * (1.0 / self.rescale_factor) as f32,
                )
            } else if self.do_normalize {
                (self.image_mean[channel], self.image_std[channel])
            } else {
                (0.0, 1.0)
            };
            for i in 0..plane {
                let value = pixels[i * 3 + channel] as f32;
                let value =
                    if self.do_rescale && !self.do_normalize { value * rescale } else { value };
                out[channel * plane + i] = (value - mean) / std;
            }
        }
        out
    }

    /// The side lengths (height, width) of [`ClipImageProcessor::preprocess`]'s output.
    pub fn output_size(&self) -> (usize, usize) {
        self.crop_dims()
    }
}

/// torchvision's `center_crop` on an RGB8 image: offsets `int((size - crop) / 2)`;
/// a crop larger than the image pads with zeros first (left/top get the smaller half).
fn center_crop(rgb: &[u8], width: usize, height: usize, crop_w: usize, crop_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; crop_w * crop_h * 3];
    // Offsets of the crop in (possibly padded) image coordinates, as signed values.
    let offset = |size: usize, crop: usize| -> isize {
        if crop > size {
            -(((crop - size) / 2) as isize)
        } else {
            ((size - crop) / 2) as isize
        }
    };
    let (top, left) = (offset(height, crop_h), offset(width, crop_w));
    for y in 0..crop_h {
        let source_y = y as isize + top;
        if source_y < 0 || source_y >= height as isize {
            continue;
        }
        for x in 0..crop_w {
            let source_x = x as isize + left;
            if source_x < 0 || source_x >= width as isize {
                continue;
            }
            let source = (source_y as usize * width + source_x as usize) * 3;
            let target = (y * crop_w + x) * 3;
            out[target..target + 3].copy_from_slice(&rgb[source..source + 3]);
        }
    }
    out
}

/// Keys's cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic).
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point weights of one output pixel: the first input index and the weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// The antialiased resampling taps for `in_size` → `out_size`, quantised as torch's uint8
/// CPU kernel does (after PIL-SIMD): support 2 × the downscale factor, weights normalised
/// per output pixel, then scaled by 2^precision with the largest precision (≤ 22) that
/// keeps the largest weight within int16.
fn taps(in_size: usize, out_size: usize) -> (Vec<Taps>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let mut float_taps = Vec::with_capacity(out_size);
    let mut max_weight: f64 = 0.0;
    for out in 0..out_size {
        let center = scale * (out as f64 + 0.5);
        let first = ((center - support + 0.5) as isize).max(0) as usize;
        let last =
            ((center + support + 0.5) as isize).min(in_size as isize).max(first as isize) as usize;
        let mut weights: Vec<f64> =
            (first..last).map(|i| cubic((i as f64 - center + 0.5) / filter_scale)).collect();
        let total: f64 = weights.iter().sum();
        if total != 0.0 {
            for w in &mut weights {
                *w /= total;
            }
        }
        for w in &weights {
            max_weight = max_weight.max(*w);
        }
        float_taps.push((first, weights));
    }
    let mut precision = 0u32;
    while precision < 22 {
        let next = (0.5 + max_weight * (1i64 << (precision + 1)) as f64) as i64;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    let unit = (1i64 << precision) as f64;
    let quantised = float_taps
        .into_iter()
        .map(|(first, weights)| Taps {
            first,
            weights: weights
                .into_iter()
                .map(|w| if w < 0.0 { (w * unit - 0.5) as i32 } else { (w * unit + 0.5) as i32 })
                .collect(),
        })
        .collect();
    (quantised, precision)
}

/// One separable pass over RGB8 rows (`horizontal`) or columns, rounding to uint8.
fn resample_pass(
    rgb: &[u8],
    width: usize,
    height: usize,
    new_size: usize,
    horizontal: bool,
) -> Vec<u8> {
    let (in_size, other) = if horizontal { (width, height) } else { (height, width) };
    let (taps, precision) = taps(in_size, new_size);
    let (out_w, out_h) = if horizontal { (new_size, height) } else { (width, new_size) };
    let mut out = vec![0u8; out_w * out_h * 3];
    let rounding = if precision > 0 { 1i64 << (precision - 1) } else { 0 };
    for line in 0..other {
        for (position, tap) in taps.iter().enumerate() {
            for channel in 0..3 {
                let mut sum = rounding;
                for (k, &weight) in tap.weights.iter().enumerate() {
                    let i = tap.first + k;
                    let index = if horizontal { line * width + i } else { i * width + line };
                    sum += rgb[index * 3 + channel] as i64 * weight as i64;
                }
                let value = (sum >> precision).clamp(0, 255) as u8;
                let target =
                    if horizontal { line * out_w + position } else { position * out_w + line };
                out[target * 3 + channel] = value;
            }
        }
    }
    out
}

/// Resizes RGB8 with antialiased bicubic interpolation as torch's uint8 CPU kernel
/// (`interpolate(..., mode="bicubic", antialias=True)`, what torchvision's `resize` runs
/// for uint8 images) does: horizontal pass first, each pass rounded to uint8; a pass
/// whose size does not change is skipped.
pub fn resize_bicubic_antialiased(
    rgb: &[u8],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
) -> Vec<u8> {
    let mut pixels = rgb.to_vec();
    let mut current_width = width;
    if new_width != width {
        pixels = resample_pass(&pixels, width, height, new_width, true);
        current_width = new_width;
    }
    if new_height != height {
        pixels = resample_pass(&pixels, current_width, height, new_height, false);
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_truncate_the_long_side_like_transformers() {
        let processor = ClipImageProcessor::for_image_size(32);
        assert_eq!(processor.resized_size(40, 48), (32, 38));
        assert_eq!(processor.resized_size(56, 40), (44, 32));
        assert_eq!(processor.resized_size(32, 32), (32, 32));
    }

    #[test]
    fn resizing_a_flat_image_keeps_it_flat_and_crop_pads_with_zeros() {
        let flat = vec![77u8; 30 * 20 * 3];
        let resized = resize_bicubic_antialiased(&flat, 30, 20, 13, 9);
        assert_eq!(resized.len(), 13 * 9 * 3);
        assert!(resized.iter().all(|&v| v == 77));
        let cropped = center_crop(&[9u8; 2 * 2 * 3], 2, 2, 4, 4);
        assert_eq!(cropped[(4 + 1) * 3], 9);
        assert_eq!(cropped[0], 0);
    }
}
