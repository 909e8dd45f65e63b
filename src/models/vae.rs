//! diffusers' `AutoencoderKL`: the VAE that maps images to latents (encode) and back
//! (decode), configured from the component's `config.json`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::common::{conv2d, group_norm, Attention, Conv2d, GroupNorm, ResnetBlock};

/// The fields of a diffusers `AutoencoderKL` config that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// The VAE overflows in f16: run it in f32 whatever the pipeline's dtype.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// The image size the VAE was made for (a number or `[height, width]`); the tile
    /// size of tiled encode/decode.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

fn default_image_channels() -> usize {
    3
}
fn default_layers() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

const VAE_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<(GroupNorm, Attention)>,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        let attention = if config.mid_block_add_attention {
            let vb_attention = vb.pp("attentions.0");
            Some((
                group_norm(groups, channels, VAE_EPS, vb_attention.pp("group_norm"))?,
                Attention::new(vb_attention, channels, channels, 1, channels, true, true)?,
            ))
        } else {
            None
        };
        Ok(MidBlock {
            resnet_in: ResnetBlock::new(
                vb.pp("resnets.0"),
                channels,
                channels,
                None,
                groups,
                VAE_EPS,
            )?,
            attention,
            resnet_out: ResnetBlock::new(
                vb.pp("resnets.1"),
                channels,
                channels,
                None,
                groups,
                VAE_EPS,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet_in.forward(x, None)?;
        if let Some((norm, attention)) = &self.attention {
            let (batch, channels, height, width) = x.dims4()?;
            let tokens = norm
                .forward(&x)?
                .reshape((batch, channels, height * width))?
                .transpose(1, 2)?
                .contiguous()?;
            let attended = attention.forward(&tokens, None)?;
            let attended = attended.transpose(1, 2)?.reshape((batch, channels, height, width))?;
            x = (attended + x)?;
        }
        self.resnet_out.forward(&x, None)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let mut down_blocks = Vec::new();
        let mut output_channels = channels[0];
        for i in 0..channels.len() {
            let input_channels = output_channels;
            output_channels = channels[i];
            let vb_block = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    let resnet_in = if j == 0 { input_channels } else { output_channels };
                    ResnetBlock::new(
                        vb_block.pp(format!("resnets.{j}")),
                        resnet_in,
                        output_channels,
                        None,
                        groups,
                        VAE_EPS,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < channels.len() {
                Some(conv2d(
                    vb_block.pp("downsamplers.0.conv"),
                    output_channels,
                    output_channels,
                    3,
                    0,
                    2,
                )?)
            } else {
                None
            };
            down_blocks.push((resnets, downsampler));
        }
        let last = *channels.last().expect("block_out_channels checked non-empty; this is a bug");
        Ok(Encoder {
            conv_in: conv2d(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), last, config)?,
            conv_norm_out: group_norm(groups, last, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(vb.pp("conv_out"), last, 2 * config.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, downsampler) in &self.down_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(conv) = downsampler {
                // Asymmetric padding (right and bottom only), then a stride-2 conv.
                x = conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?;
            }
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let mut up_blocks = Vec::new();
        let mut output_channels = reversed[0];
        for i in 0..reversed.len() {
            let previous_output = output_channels;
            output_channels = reversed[i];
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    let resnet_in = if j == 0 { previous_output } else { output_channels };
                    ResnetBlock::new(
                        vb_block.pp(format!("resnets.{j}")),
                        resnet_in,
                        output_channels,
                        None,
                        groups,
                        VAE_EPS,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(conv2d(
                    vb_block.pp("upsamplers.0.conv"),
                    output_channels,
                    output_channels,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push((resnets, upsampler));
        }
        let first = config.block_out_channels[0];
        Ok(Decoder {
            conv_in: conv2d(vb.pp("conv_in"), config.latent_channels, reversed[0], 3, 1, 1)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), reversed[0], config)?,
            up_blocks,
            conv_norm_out: group_norm(groups, first, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(vb.pp("conv_out"), first, config.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for (resnets, upsampler) in &self.up_blocks {
            for resnet in resnets {
                x = resnet.forward(&x, None)?;
            }
            if let Some(conv) = upsampler {
                let (_, _, height, width) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(height * 2, width * 2)?)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

/// The latent distribution an image encodes to.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

/// The VAE.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: VaeConfig,
}

impl AutoencoderKl {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        if config.block_out_channels.is_empty() {
            candle_core::bail!("VAE config has no block_out_channels");
        }
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 0, 1)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(vb.pp("post_quant_conv"), latent, latent, 1, 0, 1)?)
        } else {
            None
        };
        Ok(AutoencoderKl {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            quant_conv,
            post_quant_conv,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images in [-1, 1] (`[batch, 3, H, W]`) to their latent distribution
    /// (unscaled: multiply by `scaling_factor` for the UNet).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Decodes unscaled latents (`[batch, latent_channels, h, w]`) to images in about
    /// [-1, 1] (`[batch, 3, 8h, 8w]`).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}
