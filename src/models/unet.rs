//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x / SDXL, configured from the
//! component's `config.json`: cross-attention down/up blocks, the mid block, and SDXL's
//! `text_time` additional embedding.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::backbone_config::BackboneConfig;
pub use super::common::ExtraKeyValues;
use super::common::{
    conv2d, group_norm, linear, timestep_embedding, Attention, Conv2d, GroupNorm, Linear, PerBlock,
    ResnetBlock, TimestepMlp,
};
use super::layers::{
    geglu, layer_norm, project_pixels_to_tokens, project_tokens_to_pixels_add, LayerNorm,
};

/// The fields of a diffusers `UNet2DConditionModel` config that shape the network: those
/// a ControlNet shares (read through `Deref`) and the UNet's own.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(flatten)]
    pub backbone: BackboneConfig,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    pub up_block_types: Vec<String>,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
}

impl std::ops::Deref for UNetConfig {
    type Target = BackboneConfig;

    fn deref(&self) -> &BackboneConfig {
        &self.backbone
    }
}

fn default_sample_size() -> usize {
    64
}
fn default_channels() -> usize {
    4
}

impl UNetConfig {
    /// Rejects configurations this implementation does not run, with the reason.
    pub fn check_supported(&self) -> std::result::Result<(), String> {
        let blocks = self.block_out_channels.len();
        if blocks == 0
            || self.down_block_types.len() != blocks
            || self.up_block_types.len() != blocks
        {
            return Err(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({}) must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len(),
                blocks
            ));
        }
        self.check_down_block_types()?;
        for kind in &self.up_block_types {
            if kind != "CrossAttnUpBlock2D" && kind != "UpBlock2D" {
                return Err(format!("unsupported up block type {kind}"));
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => return Err(format!("unsupported mid block type {other}")),
        }
        self.check_addition_embedding()?;
        if let Some(kind) = &self.class_embed_type {
            return Err(format!("unsupported class_embed_type {kind}"));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err("time_cond_proj_dim (LCM-distilled UNets) is not supported yet".into());
        }
        self.check_attention()
    }
}

/// SDXL conditioning beside the text: pooled text embeddings and the six time ids.
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// `[batch, projection_dim]`
    pub text_embeds: Tensor,
    /// `[batch, 6]`
    pub time_ids: Tensor,
}

/// Features that adapters add to the UNet's down path, with diffusers' semantics.
///
/// ControlNet fills `down_block` (one tensor per skip connection, conv_in's output
/// included, added to the skips before the up path) and `mid_block` (added to the mid
/// block's output). T2I-Adapter fills `down_intrablock`: one tensor per down block, added
/// to that block's output (for blocks with attention: after the last resnet/attention
/// pair, before it becomes a skip; for blocks without: after the block, downsampler
/// included, which also changes its last skip — diffusers adds in place there); any
/// tensor left over after the down blocks is added to the mid block's output when the
/// shapes agree.
#[derive(Debug, Clone, Default)]
pub struct UNetResiduals {
    /// ControlNet residuals for every skip connection, in order.
    pub down_block: Option<Vec<Tensor>>,
    /// ControlNet residual for the mid block's output.
    pub mid_block: Option<Tensor>,
    /// T2I-Adapter features, one per down block (plus optionally one for the mid block).
    pub down_intrablock: Option<Vec<Tensor>>,
}

impl UNetResiduals {
    /// True when nothing would be added.
    pub fn is_empty(&self) -> bool {
        self.down_block.is_none() && self.mid_block.is_none() && self.down_intrablock.is_none()
    }
}

/// Extra keys and values for the cross-attention layers (IP-Adapter image tokens):
/// `layers[i]` serves the i-th cross-attention layer in diffusers' processor order (down
/// blocks, up blocks, then the mid block; see [`UNet::cross_attention_widths`]), one
/// entry per adapter. Layers without an entry attend to the text only.
#[derive(Debug, Clone, Default)]
pub struct CrossAttentionExtras {
    pub layers: Vec<Vec<ExtraKeyValues>>,
}

impl CrossAttentionExtras {
    fn for_layer(&self, index: usize) -> &[ExtraKeyValues] {
        self.layers.get(index).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    project_in: Linear,
    project_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            project_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            project_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// GEGLU (half of the projection gates the other half through an exact GELU), then
    /// the output projection with `residual` added.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let gated = geglu(&self.project_in.forward(x)?)?;
        self.project_out.forward_add(&gated, residual)
    }
}

#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// Position of `attn2` in diffusers' processor order (set by the UNet).
    cross_index: usize,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(TransformerBlock {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, false, upcast)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                head_dim,
                false,
                upcast,
            )?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            cross_index: 0,
        })
    }

    /// Self-attention, cross-attention to `context` (and to `extras`' keys/values for
    /// this block's layer), feed-forward; each residual.
    fn forward_with_extras(
        &self,
        x: &Tensor,
        context: &Tensor,
        extras: Option<&CrossAttentionExtras>,
    ) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let extra = extras.map(|e| e.for_layer(self.cross_index)).unwrap_or(&[]);
        let cross =
            self.attn2.forward_with_extras(&self.norm2.forward(&x)?, Some(context), extra)?;
        let x = (cross + &x)?;
        self.ff.forward_add(&self.norm3.forward(&x)?, &x)
    }
}

/// Either a 1×1 convolution (SD 1.x) or a linear layer (`use_linear_projection`).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    /// The per-pixel weight (`[out, in, 1, 1]` or `[out, in]`) and bias.
    fn weight_and_bias(&self) -> (&Tensor, Option<&Tensor>) {
        match self {
            Projection::Conv(conv) => (conv.weight(), conv.bias()),
            Projection::Linear(linear) => (linear.weight(), linear.bias()),
        }
    }

    /// An NCHW image into tokens `[batch, h·w, channels]`: one product with the permute in
    /// its strides on CPU f32, else the reference's projection and permute.
    fn image_to_tokens(&self, image: &Tensor) -> Result<Tensor> {
        let (weight, bias) = self.weight_and_bias();
        if let Some(tokens) = project_pixels_to_tokens(image, weight, bias)? {
            return Ok(tokens);
        }
        let (batch, _, height, width) = image.dims4()?;
        let to_tokens = |t: Tensor| -> Result<Tensor> {
            let channels = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((batch, height * width, channels))
        };
        match self {
            Projection::Conv(conv) => to_tokens(conv.forward(image)?),
            Projection::Linear(linear) => linear.forward(&to_tokens(image.clone())?),
        }
    }

    /// Tokens `[batch, h·w, channels]` back into an NCHW image shaped like `residual`, plus
    /// `residual`: one product on CPU f32, else the reference's permute, projection, add.
    fn tokens_to_image_add(&self, tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (weight, bias) = self.weight_and_bias();
        if let Some(image) = project_tokens_to_pixels_add(tokens, weight, bias, residual)? {
            return Ok(image);
        }
        let (batch, _, height, width) = residual.dims4()?;
        let to_image = |t: Tensor| -> Result<Tensor> {
            let channels = t.dim(2)?;
            t.reshape((batch, height, width, channels))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let image = match self {
            Projection::Conv(conv) => conv.forward(&to_image(tokens.clone())?)?,
            Projection::Linear(linear) => to_image(linear.forward(tokens)?)?,
        };
        image + residual
    }
}

/// diffusers' `Transformer2DModel`: group norm, projection in, transformer blocks,
/// projection out, residual.
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
        upcast: bool,
    ) -> Result<Self> {
        let projection = |name: &str| -> Result<Projection> {
            if linear_projection {
                Ok(Projection::Linear(linear(channels, channels, vb.pp(name))?))
            } else {
                Ok(Projection::Conv(conv2d(vb.pp(name), channels, channels, 1, 0, 1)?))
            }
        };
        let blocks = (0..layers)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    channels,
                    heads,
                    context_dim,
                    upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SpatialTransformer {
            norm: group_norm(groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    fn from_shape(
        vb: VarBuilder,
        channels: usize,
        shape: &AttentionShape,
        groups: usize,
    ) -> Result<Self> {
        SpatialTransformer::new(
            vb,
            channels,
            shape.heads,
            shape.layers,
            shape.context_dim,
            groups,
            shape.linear_projection,
            shape.upcast,
        )
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with_extras(x, context, None)
    }

    fn forward_with_extras(
        &self,
        x: &Tensor,
        context: &Tensor,
        extras: Option<&CrossAttentionExtras>,
    ) -> Result<Tensor> {
        let mut h = self.proj_in.image_to_tokens(&self.norm.forward(x)?)?;
        for block in &self.blocks {
            h = block.forward_with_extras(&h, context, extras)?;
        }
        self.proj_out.tokens_to_image_add(&h, x)
    }
}

/// The attention of a block: a `Transformer2DModel` per resnet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionShape {
    pub heads: usize,
    /// Transformer blocks per `Transformer2DModel`.
    pub layers: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

/// The shape of one down block (`DownBlock2D`, or `CrossAttnDownBlock2D` with attention).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DownBlockShape {
    pub input_channels: usize,
    pub output_channels: usize,
    /// Resnets (and attentions) in the block.
    pub layers: usize,
    pub time_embed_dim: usize,
    pub groups: usize,
    pub eps: f64,
    pub attention: Option<AttentionShape>,
    /// The downsampler's padding; `None` for the last block, which has none.
    pub downsample_padding: Option<usize>,
}

/// diffusers' `DownBlock2D` / `CrossAttnDownBlock2D`, shared by the UNet and ControlNet.
#[derive(Debug, Clone)]
pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    pub(crate) fn new(vb: VarBuilder, shape: &DownBlockShape) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..shape.layers {
            let resnet_in = if j == 0 { shape.input_channels } else { shape.output_channels };
            resnets.push(ResnetBlock::new(
                vb.pp(format!("resnets.{j}")),
                resnet_in,
                shape.output_channels,
                Some(shape.time_embed_dim),
                shape.groups,
                shape.eps,
            )?);
            if let Some(attention) = &shape.attention {
                attentions.push(SpatialTransformer::from_shape(
                    vb.pp(format!("attentions.{j}")),
                    shape.output_channels,
                    attention,
                    shape.groups,
                )?);
            }
        }
        let downsampler = match shape.downsample_padding {
            Some(padding) => Some(conv2d(
                vb.pp("downsamplers.0.conv"),
                shape.output_channels,
                shape.output_channels,
                3,
                padding,
                2,
            )?),
            None => None,
        };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// Runs the block, pushing every output that becomes a skip connection (one per
    /// resnet, plus the downsampler's) onto `skips`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, Some(temb))?;
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(&x, context)?;
            }
            skips.push(x.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            x = downsampler.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Conv2d>,
}

/// diffusers' `UNetMidBlock2DCrossAttn` (resnet, attention, resnet) or, without
/// attention, `UNetMidBlock2D` with no layers (one resnet), as some ControlNets have.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Option<SpatialTransformer>,
    resnet_out: Option<ResnetBlock>,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        time_embed_dim: usize,
        groups: usize,
        eps: f64,
        attention: Option<AttentionShape>,
    ) -> Result<Self> {
        let resnet = |name: &str| {
            ResnetBlock::new(vb.pp(name), channels, channels, Some(time_embed_dim), groups, eps)
        };
        let resnet_in = resnet("resnets.0")?;
        let Some(attention) = attention else {
            return Ok(MidBlock { resnet_in, attention: None, resnet_out: None });
        };
        Ok(MidBlock {
            resnet_in,
            attention: Some(SpatialTransformer::from_shape(
                vb.pp("attentions.0"),
                channels,
                &attention,
                groups,
            )?),
            resnet_out: Some(resnet("resnets.1")?),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_with_extras(x, temb, context, None)
    }

    /// [`MidBlock::forward`] whose cross-attention also attends to `extras`.
    fn forward_with_extras(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        extras: Option<&CrossAttentionExtras>,
    ) -> Result<Tensor> {
        let mut x = self.resnet_in.forward(x, Some(temb))?;
        if let Some(attention) = &self.attention {
            x = attention.forward_with_extras(&x, context, extras)?;
        }
        if let Some(resnet) = &self.resnet_out {
            x = resnet.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// The denoising UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    /// Builds the UNet from `config`, loading weights with diffusers' names from `vb`.
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
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
        let linear = config.use_linear_projection;
        let upcast = config.upcast_attention;

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

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output_channels = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let input_channels = output_channels;
            output_channels = channels[i];
            let attention = (kind == "CrossAttnDownBlock2D").then(|| AttentionShape {
                heads: heads[i],
                layers: transformer_layers[i],
                context_dim: context_dims[i],
                linear_projection: linear,
                upcast,
            });
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                &DownBlockShape {
                    input_channels,
                    output_channels,
                    layers: layers_per_block[i],
                    time_embed_dim,
                    groups,
                    eps,
                    attention,
                    downsample_padding: (i + 1 < blocks)
                        .then(|| config.downsample_padding.unwrap_or(1)),
                },
            )?);
        }

        let last = blocks - 1;
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            channels[last],
            time_embed_dim,
            groups,
            eps,
            Some(AttentionShape {
                heads: heads[last],
                layers: transformer_layers[last],
                context_dim: context_dims[last],
                linear_projection: linear,
                upcast,
            }),
        )?;

        let reversed_channels: Vec<usize> = channels.iter().rev().copied().collect();
        let reversed_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let reversed_layers: Vec<usize> = layers_per_block.iter().rev().copied().collect();
        let reversed_transformer_layers: Vec<usize> =
            transformer_layers.iter().rev().copied().collect();
        let reversed_context: Vec<usize> = context_dims.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output_channels = reversed_channels[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let previous_output = output_channels;
            output_channels = reversed_channels[i];
            let input_channels = reversed_channels[(i + 1).min(blocks - 1)];
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let cross = kind == "CrossAttnUpBlock2D";
            let count = reversed_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..count {
                let skip = if j == count - 1 { input_channels } else { output_channels };
                let resnet_in = if j == 0 { previous_output } else { output_channels };
                resnets.push(ResnetBlock::new(
                    vb_block.pp(format!("resnets.{j}")),
                    resnet_in + skip,
                    output_channels,
                    Some(time_embed_dim),
                    groups,
                    eps,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        vb_block.pp(format!("attentions.{j}")),
                        output_channels,
                        reversed_heads[i],
                        reversed_transformer_layers[i],
                        reversed_context[i],
                        groups,
                        linear,
                        upcast,
                    )?);
                }
            }
            let upsampler = if i + 1 < blocks {
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
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        let mut unet = UNet {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(vb.pp("conv_out"), channels[0], config.out_channels, 3, 1, 1)?,
            config: config.clone(),
        };
        for (index, block) in unet.transformer_blocks_in_processor_order().into_iter().enumerate() {
            block.cross_index = index;
        }
        Ok(unet)
    }

    /// Every transformer block in diffusers' attention-processor order: down blocks, up
    /// blocks, then the mid block (the order `UNet2DConditionModel` registers them in,
    /// which numbers IP-Adapter layers).
    fn transformer_blocks_in_processor_order(&mut self) -> Vec<&mut TransformerBlock> {
        let down = self.down_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut());
        let up = self.up_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut());
        let mid = self.mid_block.attention.iter_mut();
        down.chain(up).chain(mid).flat_map(|t| t.blocks.iter_mut()).collect()
    }

    /// The channel width of every cross-attention layer, in diffusers' processor order
    /// (what [`CrossAttentionExtras::layers`] is indexed by).
    pub fn cross_attention_widths(&self) -> Vec<usize> {
        let width = |t: &SpatialTransformer| -> Vec<usize> {
            t.blocks.iter().map(|b| b.attn2.query_width()).collect()
        };
        let down = self.down_blocks.iter().flat_map(|b| b.attentions.iter());
        let up = self.up_blocks.iter().flat_map(|b| b.attentions.iter());
        down.chain(up).chain(self.mid_block.attention.iter()).flat_map(width).collect()
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts from `sample` (`[batch, in_channels, h, w]`) at `timestep` with the text
    /// `context` (`[batch, tokens, cross_attention_dim]`) and, for SDXL, the added
    /// conditions.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.forward_with_residuals(sample, timestep, context, added, &UNetResiduals::default())
    }

    /// [`UNet::forward`] with adapter features added to the down path and mid block.
    pub fn forward_with_residuals(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        residuals: &UNetResiduals,
    ) -> Result<Tensor> {
        self.forward_with_adapters(sample, timestep, context, added, residuals, None)
    }

    /// [`UNet::forward_with_residuals`] whose cross-attention layers also attend to
    /// `extras` (IP-Adapter image tokens).
    pub fn forward_with_adapters(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        residuals: &UNetResiduals,
        extras: Option<&CrossAttentionExtras>,
    ) -> Result<Tensor> {
        let temb = embed_time(
            &self.config,
            &self.time_embedding,
            self.add_embedding.as_ref(),
            timestep,
            sample,
            added,
            "UNet",
        )?;

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        let mut intrablock = residuals.down_intrablock.iter().flatten();
        for block in &self.down_blocks {
            let has_attention = !block.attentions.is_empty();
            let last = block.resnets.len().saturating_sub(1);
            // Blocks with attention take their adapter feature inside, after the last
            // resnet/attention pair; the others after the whole block (see UNetResiduals).
            let inside = if has_attention { intrablock.next() } else { None };
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&temb))?;
                if let Some(attention) = block.attentions.get(j) {
                    x = attention.forward_with_extras(&x, context, extras)?;
                }
                if let (true, Some(feature)) = (j == last, inside) {
                    x = x.broadcast_add(feature)?;
                }
                skips.push(x.clone());
            }
            if let Some(downsampler) = &block.downsampler {
                x = downsampler.forward(&x)?;
                skips.push(x.clone());
            }
            if !has_attention {
                if let Some(feature) = intrablock.next() {
                    x = x.broadcast_add(feature)?;
                    *skips.last_mut().expect("conv_in's output is a skip; this is a bug") =
                        x.clone();
                }
            }
        }

        x = self.mid_block.forward_with_extras(&x, &temb, context, extras)?;
        if let Some(feature) = intrablock.next() {
            if feature.dims() == x.dims() {
                x = (x + feature)?;
            }
        }

        if let Some(down) = &residuals.down_block {
            if down.len() != skips.len() {
                candle_core::bail!(
                    "{} down-block residuals for a UNet with {} skip connections",
                    down.len(),
                    skips.len()
                );
            }
            for (skip, residual) in skips.iter_mut().zip(down) {
                *skip = skip.broadcast_add(residual)?;
            }
        }
        if let Some(mid) = &residuals.mid_block {
            x = x.broadcast_add(mid)?;
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("skip connections match the blocks; this is a bug");
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&temb))?;
                if let Some(attention) = block.attentions.get(j) {
                    x = attention.forward_with_extras(&x, context, extras)?;
                }
            }
            if let Some(upsampler) = &block.upsampler {
                // Upsample to the size of the skip connection it meets next: twice the size
                // except where a downsampler rounded an odd size up (e.g. 72 px images:
                // 9 → 5 → 9, not 10), as diffusers' `forward_upsample_size` does.
                let (height, width) = match skips.last() {
                    Some(skip) => (skip.dim(2)?, skip.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = upsampler.forward(&x.upsample_nearest2d(height, width)?)?;
            }
        }

        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// The time embedding of a UNet-shaped network (the UNet and the ControlNet share it): the
/// sinusoidal embedding of `timestep` for each row of `sample` through `time_embedding`,
/// plus, for SDXL's `text_time` conditioning, `add_embedding` of the pooled text embeddings
/// and the embedded size/crop ids. `network` names the model in the error when those
/// conditions are missing.
pub(crate) fn embed_time(
    config: &BackboneConfig,
    time_embedding: &TimestepMlp,
    add_embedding: Option<&TimestepMlp>,
    timestep: f64,
    sample: &Tensor,
    added: Option<&AddedConditions>,
    network: &str,
) -> Result<Tensor> {
    let batch = sample.dim(0)?;
    let dtype = sample.dtype();
    let timesteps = Tensor::full(timestep as f32, batch, sample.device())?;
    let projected = timestep_embedding(
        &timesteps,
        config.block_out_channels[0],
        config.flip_sin_to_cos,
        config.freq_shift,
    )?
    .to_dtype(dtype)?;
    let temb = time_embedding.forward(&projected)?;
    let Some(add_embedding) = add_embedding else {
        return Ok(temb);
    };
    let Some(added) = added else {
        candle_core::bail!("this {network} (text_time) needs pooled text embeddings and time ids");
    };
    let time_dim =
        config.addition_time_embed_dim.expect("checked in check_supported; this is a bug");
    let time_embeds = timestep_embedding(
        &added.time_ids.flatten_all()?,
        time_dim,
        config.flip_sin_to_cos,
        config.freq_shift,
    )?
    .reshape((batch, ()))?
    .to_dtype(dtype)?;
    let add_input = Tensor::cat(&[added.text_embeds.to_dtype(dtype)?, time_embeds], D::Minus1)?;
    temb + add_embedding.forward(&add_input)?
}
