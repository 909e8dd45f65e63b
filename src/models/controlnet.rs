//! diffusers' `ControlNetModel` (SD 1.x / 2.x / SDXL), configured from its `config.json`:
//! the control-image embedding, a copy of the UNet's down path and mid block (the UNet's
//! own building blocks), and the zero convolutions that turn each skip connection into a
//! residual for the UNet. Follows diffusers' `models/controlnets/controlnet.py`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::backbone_config::BackboneConfig;
use super::common::{conv2d, Conv2d, PerBlock, TimestepMlp};
use super::unet::embed_time;
use super::unet::{
    AddedConditions, AttentionShape, DownBlock, DownBlockShape, MidBlock, UNetResiduals,
};

/// The fields of a diffusers `ControlNetModel` config that shape the network: those it
/// shares with the UNet (read through `Deref`) and its own.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub backbone: BackboneConfig,
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    #[serde(default = "default_scale_factor")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// `rgb` (default) or `bgr`: the channel order the network was trained on.
    #[serde(default)]
    pub controlnet_conditioning_channel_order: Option<String>,
    #[serde(default = "default_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Residuals averaged over the image (shuffle-style ControlNets); implies guess mode.
    #[serde(default)]
    pub global_pool_conditions: bool,
}

impl std::ops::Deref for ControlNetConfig {
    type Target = BackboneConfig;

    fn deref(&self) -> &BackboneConfig {
        &self.backbone
    }
}

fn default_conditioning_channels() -> usize {
    3
}
fn default_scale_factor() -> f64 {
    1.0
}
fn default_cross_attention_dim() -> PerBlock {
    PerBlock::One(1280)
}
fn default_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl ControlNetConfig {
    /// Rejects configurations this implementation does not run, with the reason.
    pub fn check_supported(&self) -> std::result::Result<(), String> {
        let blocks = self.block_out_channels.len();
        if blocks == 0 || self.down_block_types.len() != blocks {
            return Err(format!(
                "down_block_types ({}) and block_out_channels ({blocks}) must have the same \
                 non-zero length",
                self.down_block_types.len()
            ));
        }
        self.check_down_block_types()?;
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") | Some("UNetMidBlock2D") => {}
            Some(other) => return Err(format!("unsupported mid block type {other}")),
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err("conditioning_embedding_out_channels is empty".into());
        }
        self.check_addition_embedding()?;
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return Err("class embeddings are not supported".into());
        }
        if self.encoder_hid_dim_type.is_some() || self.encoder_hid_dim.is_some() {
            return Err("encoder_hid_dim (projected text embeddings) is not supported".into());
        }
        if let Some(shift) = self.resnet_time_scale_shift.as_deref() {
            if shift != "default" {
                return Err(format!("unsupported resnet_time_scale_shift {shift}"));
            }
        }
        if self.mid_block_scale_factor != 1.0 {
            return Err("mid_block_scale_factor other than 1 is not supported".into());
        }
        match self.controlnet_conditioning_channel_order.as_deref() {
            None | Some("rgb") | Some("bgr") => {}
            Some(other) => return Err(format!("unknown conditioning channel order {other}")),
        }
        self.check_attention()
    }

    /// The width of the text context the network attends to (its first block's).
    pub fn context_width(&self) -> Option<usize> {
        self.cross_attention_dim.for_block(0)
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: the control image (`[b, 3, H, W]`) down
/// to latent resolution and the width of the first block, through small convolutions
/// (every second one with stride 2) with SiLU between them.
#[derive(Debug, Clone)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(
        vb: VarBuilder,
        conditioning_channels: usize,
        channels: &[usize],
        out_channels: usize,
    ) -> Result<Self> {
        let conv_in = conv2d(vb.pp("conv_in"), conditioning_channels, channels[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, pair) in channels.windows(2).enumerate() {
            let (from, to) = (pair[0], pair[1]);
            blocks.push(conv2d(vb.pp(format!("blocks.{}", 2 * i)), from, from, 3, 1, 1)?);
            blocks.push(conv2d(vb.pp(format!("blocks.{}", 2 * i + 1)), from, to, 3, 1, 2)?);
        }
        let last = *channels.last().expect("checked in check_supported; this is a bug");
        let conv_out = conv2d(vb.pp("conv_out"), last, out_channels, 3, 1, 1)?;
        Ok(ConditioningEmbedding { conv_in, blocks, conv_out })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = candle_nn::ops::silu(&self.conv_in.forward(image)?)?;
        for block in &self.blocks {
            x = candle_nn::ops::silu(&block.forward(&x)?)?;
        }
        self.conv_out.forward(&x)
    }
}

/// A loaded ControlNet.
#[derive(Debug, Clone)]
pub struct ControlNet {
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    conditioning: ConditioningEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    /// One 1×1 ("zero") convolution per skip connection.
    down_zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
    config: ControlNetConfig,
}

/// How strongly, and how, one ControlNet's residuals enter the UNet at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlScale {
    /// diffusers' `conditioning_scale` (already multiplied by the guidance window's keep).
    pub scale: f64,
    /// diffusers' `guess_mode`: the residuals grow geometrically from 0.1 × scale at the
    /// first skip connection to 1 × scale at the mid block.
    pub guess_mode: bool,
}

impl ControlNet {
    /// Builds the ControlNet from `config`, loading weights with diffusers' names.
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> Result<Self> {
        config.check_supported().map_err(candle_core::Error::Msg)?;
        let blocks = config.block_out_channels.len();
        let channels = &config.block_out_channels;
        let layers_per_block = config.layers_per_block.expand(blocks, "layers_per_block")?;
        let heads = config.heads().expand(blocks, "num_attention_heads")?;
        let transformer_layers =
            config.transformer_layers_per_block.expand(blocks, "transformer_layers_per_block")?;
        let context_dims = config.cross_attention_dim.expand(blocks, "cross_attention_dim")?;
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let time_embed_dim = channels[0] * 4;
        let attention_shape = |i: usize| AttentionShape {
            heads: heads[i],
            layers: transformer_layers[i],
            context_dim: context_dims[i],
            linear_projection: config.use_linear_projection,
            upcast: config.upcast_attention,
        };

        let conv_in = conv2d(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?;
        let time_embedding =
            TimestepMlp::new(vb.pp("time_embedding"), channels[0], time_embed_dim)?;
        let add_embedding = if config.uses_text_time() {
            let input = config
                .projection_class_embeddings_input_dim
                .expect("checked in check_supported; this is a bug");
            Some(TimestepMlp::new(vb.pp("add_embedding"), input, time_embed_dim)?)
        } else {
            None
        };
        let conditioning = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            channels[0],
        )?;

        let zero_conv = |index: usize, width: usize| {
            conv2d(vb.pp(format!("controlnet_down_blocks.{index}")), width, width, 1, 0, 1)
        };
        let mut down_zero_convs = vec![zero_conv(0, channels[0])?];
        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output_channels = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let input_channels = output_channels;
            output_channels = channels[i];
            let last_block = i + 1 == blocks;
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                &DownBlockShape {
                    input_channels,
                    output_channels,
                    layers: layers_per_block[i],
                    time_embed_dim,
                    groups,
                    eps,
                    attention: (kind == "CrossAttnDownBlock2D").then(|| attention_shape(i)),
                    downsample_padding: (!last_block)
                        .then(|| config.downsample_padding.unwrap_or(1)),
                },
            )?);
            let skips = layers_per_block[i] + usize::from(!last_block);
            for _ in 0..skips {
                down_zero_convs.push(zero_conv(down_zero_convs.len(), output_channels)?);
            }
        }
        let last = blocks - 1;
        let mid_attention = match config.mid_block_type.as_deref() {
            Some("UNetMidBlock2D") => None,
            _ => Some(attention_shape(last)),
        };
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            channels[last],
            time_embed_dim,
            groups,
            eps,
            mid_attention,
        )?;
        let mid_zero_conv =
            conv2d(vb.pp("controlnet_mid_block"), channels[last], channels[last], 1, 0, 1)?;
        Ok(ControlNet {
            conv_in,
            time_embedding,
            add_embedding,
            conditioning,
            down_blocks,
            mid_block,
            down_zero_convs,
            mid_zero_conv,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// Embeds a control image (`[batch, conditioning_channels, H, W]`, values in [0, 1])
    /// to the latent grid. It depends on the image alone, so the pipeline embeds once per
    /// request instead of once per step as diffusers does (same numbers).
    pub fn embed_condition(&self, image: &Tensor) -> Result<Tensor> {
        let image = match self.config.controlnet_conditioning_channel_order.as_deref() {
            Some("bgr") => {
                let channels = image.dim(1)?;
                let reversed: Vec<Tensor> =
                    (0..channels).rev().map(|c| image.narrow(1, c, 1)).collect::<Result<_>>()?;
                Tensor::cat(&reversed, 1)?
            }
            _ => image.clone(),
        };
        self.conditioning.forward(&image)
    }

    /// The residuals for the UNet at `timestep`, from `sample` (the UNet's scaled model
    /// input), the text `context`, SDXL's `added` conditions and the embedded control
    /// image (from [`ControlNet::embed_condition`], batch matching `sample`).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        embedded_condition: &Tensor,
        scale: ControlScale,
    ) -> Result<UNetResiduals> {
        let dtype = sample.dtype();
        let temb = embed_time(
            &self.config,
            &self.time_embedding,
            self.add_embedding.as_ref(),
            timestep,
            sample,
            added,
            "ControlNet",
        )?;

        let mut x =
            self.conv_in.forward(sample)?.broadcast_add(&embedded_condition.to_dtype(dtype)?)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &temb, context, &mut skips)?;
        }
        x = self.mid_block.forward(&x, &temb, context)?;

        if skips.len() != self.down_zero_convs.len() {
            candle_core::bail!(
                "{} skip connections for {} zero convolutions; this is a bug",
                skips.len(),
                self.down_zero_convs.len()
            );
        }
        // diffusers' guess mode: torch.logspace(-1, 0, skips + 1) times the scale.
        let count = skips.len();
        let factor = |index: usize| -> f64 {
            if scale.guess_mode && !self.config.global_pool_conditions {
                10f64.powf(-1.0 + index as f64 / count as f64) * scale.scale
            } else {
                scale.scale
            }
        };
        let pool = |t: Tensor| -> Result<Tensor> {
            if self.config.global_pool_conditions {
                t.mean_keepdim(3)?.mean_keepdim(2)
            } else {
                Ok(t)
            }
        };
        let down = skips
            .iter()
            .zip(&self.down_zero_convs)
            .enumerate()
            .map(|(index, (skip, conv))| pool((conv.forward(skip)? * factor(index))?))
            .collect::<Result<Vec<_>>>()?;
        let mid = pool((self.mid_zero_conv.forward(&x)? * factor(count))?)?;
        Ok(UNetResiduals { down_block: Some(down), mid_block: Some(mid), down_intrablock: None })
    }
}
