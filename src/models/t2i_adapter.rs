//! diffusers' `T2IAdapter` (`full_adapter`, `light_adapter`, `full_adapter_xl`),
//! configured from its `config.json`: a small convolutional network that turns a control
//! image into one feature map per UNet down block (see `UNetResiduals::down_intrablock`).
//! Follows `diffusers/models/adapter.py` (itself TencentARC's `Adapter` / `AdapterLight`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::common::{conv2d, Conv2d};

/// The three network layouts diffusers knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    /// SD 1.x / 2.x `full_adapter`: conv_in, then one block per level, each level but the
    /// first halving the resolution.
    Full,
    /// SD 1.x / 2.x `light_adapter`: no conv_in, narrow blocks (a quarter of the width)
    /// between 1×1 projections, one more level than `channels` has.
    Light,
    /// SDXL `full_adapter_xl`: like `Full`, but only the third level halves the resolution
    /// (SDXL's UNet has three down blocks, the first without attention).
    FullXl,
}

/// The fields of a diffusers `T2IAdapter` config.
#[derive(Debug, Clone, Deserialize)]
pub struct T2IAdapterConfig {
    /// Channels of the control image (3 for RGB, 1 for sketches / canny / depth maps).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Output channels of each level.
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
    #[serde(default = "default_res_blocks")]
    pub num_res_blocks: usize,
    /// Side of the pixel-unshuffle at the input.
    #[serde(default = "default_downscale")]
    pub downscale_factor: usize,
    #[serde(default = "default_adapter_type")]
    pub adapter_type: String,
}

fn default_in_channels() -> usize {
    3
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_res_blocks() -> usize {
    2
}
fn default_downscale() -> usize {
    8
}
fn default_adapter_type() -> String {
    "full_adapter".into()
}

impl T2IAdapterConfig {
    /// The layout named by `adapter_type`, or why the config cannot be run.
    pub fn kind(&self) -> std::result::Result<AdapterKind, String> {
        let kind = match self.adapter_type.as_str() {
            "full_adapter" => AdapterKind::Full,
            "light_adapter" => AdapterKind::Light,
            "full_adapter_xl" => AdapterKind::FullXl,
            other => {
                return Err(format!(
                    "unsupported adapter_type {other:?} (full_adapter, light_adapter or \
                     full_adapter_xl)"
                ))
            }
        };
        if self.channels.is_empty() || self.channels.contains(&0) {
            return Err("channels must list at least one positive width".into());
        }
        if !(1..=4).contains(&self.in_channels) {
            return Err(format!("in_channels must be 1 to 4, got {}", self.in_channels));
        }
        if !(1..=64).contains(&self.downscale_factor) {
            return Err(format!("downscale_factor must be 1 to 64, got {}", self.downscale_factor));
        }
        if self.num_res_blocks == 0 || self.num_res_blocks > 64 {
            return Err(format!("num_res_blocks must be 1 to 64, got {}", self.num_res_blocks));
        }
        if kind == AdapterKind::Light && self.channels.iter().any(|&c| c < 4) {
            return Err("light_adapter channels must be at least 4".into());
        }
        // diffusers builds XL levels after the third as (channels[i] → channels[i]) blocks
        // fed with channels[i - 1]: they only run when the widths agree.
        if kind == AdapterKind::FullXl
            && self.channels.windows(2).skip(2).any(|pair| pair[0] != pair[1])
        {
            return Err("full_adapter_xl levels after the third must keep the width".into());
        }
        Ok(kind)
    }

    /// How much smaller than the image the last feature map is (diffusers'
    /// `total_downscale_factor`).
    pub fn total_downscale_factor(&self) -> usize {
        let levels = self.channels.len() as u32;
        match self.kind() {
            Ok(AdapterKind::Full) => self.downscale_factor << (levels - 1),
            Ok(AdapterKind::Light) => self.downscale_factor << levels,
            // diffusers' figure, whatever the level count.
            Ok(AdapterKind::FullXl) => self.downscale_factor * 2,
            Err(_) => self.downscale_factor,
        }
    }
}

/// `x + conv2(relu(conv1(x)))`: diffusers' `AdapterResnetBlock` (conv2 1×1) and
/// `LightAdapterResnetBlock` (conv2 3×3).
#[derive(Debug, Clone)]
struct ResidualBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, channels: usize, light: bool) -> Result<Self> {
        let (kernel, padding) = if light { (3, 1) } else { (1, 0) };
        Ok(ResidualBlock {
            block1: conv2d(vb.pp("block1"), channels, channels, 3, 1, 1)?,
            block2: conv2d(vb.pp("block2"), channels, channels, kernel, padding, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.block2.forward(&self.block1.forward(x)?.relu()?)? + x
    }
}

/// One level: optional 2×2 average pool, optional 1×1 projection in, residual blocks,
/// optional 1×1 projection out (light blocks only).
#[derive(Debug, Clone)]
struct Level {
    downsample: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResidualBlock>,
    out_conv: Option<Conv2d>,
}

impl Level {
    /// diffusers' `AdapterBlock`: a projection only where the width changes.
    fn full(
        vb: VarBuilder,
        input: usize,
        output: usize,
        blocks: usize,
        down: bool,
    ) -> Result<Self> {
        let in_conv = if input != output {
            Some(conv2d(vb.pp("in_conv"), input, output, 1, 0, 1)?)
        } else {
            None
        };
        let resnets = (0..blocks)
            .map(|i| ResidualBlock::new(vb.pp(format!("resnets.{i}")), output, false))
            .collect::<Result<_>>()?;
        Ok(Level { downsample: down, in_conv, resnets, out_conv: None })
    }

    /// diffusers' `LightAdapterBlock`: the residual blocks run at a quarter of the width.
    fn light(
        vb: VarBuilder,
        input: usize,
        output: usize,
        blocks: usize,
        down: bool,
    ) -> Result<Self> {
        let middle = output / 4;
        let resnets = (0..blocks)
            .map(|i| ResidualBlock::new(vb.pp(format!("resnets.{i}")), middle, true))
            .collect::<Result<_>>()?;
        Ok(Level {
            downsample: down,
            in_conv: Some(conv2d(vb.pp("in_conv"), input, middle, 1, 0, 1)?),
            resnets,
            out_conv: Some(conv2d(vb.pp("out_conv"), middle, output, 1, 0, 1)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = if self.downsample { average_pool_ceil(x)? } else { x.clone() };
        if let Some(conv) = &self.in_conv {
            x = conv.forward(&x)?;
        }
        for block in &self.resnets {
            x = block.forward(&x)?;
        }
        match &self.out_conv {
            Some(conv) => conv.forward(&x),
            None => Ok(x),
        }
    }
}

/// torch's `AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)`: odd sizes round up, and
/// a window cut by the edge averages only the pixels it covers (no padding counted), so
/// the feature sizes follow the UNet's stride-2 convolutions (e.g. 9 → 5).
fn average_pool_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    if height % 2 == 0 && width % 2 == 0 {
        return x.avg_pool2d(2);
    }
    let padded = x.pad_with_zeros(2, 0, height % 2)?.pad_with_zeros(3, 0, width % 2)?;
    let ones = Tensor::ones((1, 1, height, width), x.dtype(), x.device())?;
    let covered = ones.pad_with_zeros(2, 0, height % 2)?.pad_with_zeros(3, 0, width % 2)?;
    padded.avg_pool2d(2)?.broadcast_div(&covered.avg_pool2d(2)?)
}

/// torch's `pixel_unshuffle`: `[B, C, H·r, W·r]` → `[B, C·r², H, W]`, output channel
/// `c·r² + i·r + j` holding the pixels at row offset i, column offset j.
pub fn pixel_unshuffle(x: &Tensor, factor: usize) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    if height % factor != 0 || width % factor != 0 {
        candle_core::bail!("a {width}x{height} image does not split into {factor}x{factor} cells");
    }
    let (out_h, out_w) = (height / factor, width / factor);
    x.reshape(vec![batch, channels, out_h, factor, out_w, factor])?
        .permute(vec![0, 1, 3, 5, 2, 4])?
        .reshape((batch, channels * factor * factor, out_h, out_w))
}

/// A loaded T2I-Adapter.
#[derive(Debug, Clone)]
pub struct T2IAdapter {
    conv_in: Option<Conv2d>,
    levels: Vec<Level>,
    config: T2IAdapterConfig,
}

impl T2IAdapter {
    /// Builds the adapter from `config`, with diffusers' weight names (`adapter.…`) in `vb`.
    pub fn new(vb: VarBuilder, config: &T2IAdapterConfig) -> Result<Self> {
        let kind = config.kind().map_err(candle_core::Error::Msg)?;
        let vb = vb.pp("adapter");
        let channels = &config.channels;
        let unshuffled = config.in_channels * config.downscale_factor * config.downscale_factor;
        let blocks = config.num_res_blocks;
        let level = |i: usize| vb.pp(format!("body.{i}"));
        let (conv_in, levels) = match kind {
            AdapterKind::Full => {
                let conv_in = conv2d(vb.pp("conv_in"), unshuffled, channels[0], 3, 1, 1)?;
                let levels = (0..channels.len())
                    .map(|i| {
                        let input = channels[i.saturating_sub(1)];
                        Level::full(level(i), input, channels[i], blocks, i > 0)
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Some(conv_in), levels)
            }
            AdapterKind::FullXl => {
                let conv_in = conv2d(vb.pp("conv_in"), unshuffled, channels[0], 3, 1, 1)?;
                let levels = (0..channels.len())
                    .map(|i| match i {
                        1 => Level::full(level(i), channels[0], channels[1], blocks, false),
                        2 => Level::full(level(i), channels[1], channels[2], blocks, true),
                        _ => Level::full(level(i), channels[i], channels[i], blocks, false),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Some(conv_in), levels)
            }
            AdapterKind::Light => {
                let mut levels =
                    vec![Level::light(level(0), unshuffled, channels[0], blocks, false)?];
                for i in 1..channels.len() {
                    levels.push(Level::light(
                        level(i),
                        channels[i - 1],
                        channels[i],
                        blocks,
                        true,
                    )?);
                }
                let last = *channels.last().expect("checked non-empty in kind(); this is a bug");
                levels.push(Level::light(level(channels.len()), last, last, blocks, true)?);
                (None, levels)
            }
        };
        Ok(T2IAdapter { conv_in, levels, config: config.clone() })
    }

    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// The feature maps for `image` (`[B, in_channels, H, W]`, pixels in [0, 1]), one per
    /// level, the first at 1/`downscale_factor` of the image size.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        let mut x = pixel_unshuffle(image, self.config.downscale_factor)?;
        if let Some(conv_in) = &self.conv_in {
            x = conv_in.forward(&x)?;
        }
        let mut features = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            x = level.forward(&x)?;
            features.push(x.clone());
        }
        Ok(features)
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.levels
            .first()
            .and_then(|l| l.resnets.first())
            .map_or(DType::F32, |r| r.block1.weight().dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_unshuffle_orders_channels_as_torch() {
        // One 4x4 channel, factor 2: output channel i·2 + j holds pixels (2y + i, 2x + j).
        let x = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
        let y = pixel_unshuffle(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 4, 2, 2]);
        let values = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values, [0., 2., 8., 10., 1., 3., 9., 11., 4., 6., 12., 14., 5., 7., 13., 15.]);
        assert!(pixel_unshuffle(&x, 3).is_err());
    }

    #[test]
    fn ceil_mode_pool_averages_only_covered_pixels() {
        let x = Tensor::arange(0f32, 9., &Device::Cpu).unwrap().reshape((1, 1, 3, 3)).unwrap();
        let y = average_pool_ceil(&x).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        let values = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Windows: {0,1,3,4}, {2,5}, {6,7}, {8}.
        assert_eq!(values, [2.0, 3.5, 6.5, 8.0]);
    }

    #[test]
    fn total_downscale_factors_match_diffusers() {
        let config = |kind: &str, channels: Vec<usize>, factor| T2IAdapterConfig {
            in_channels: 3,
            channels,
            num_res_blocks: 2,
            downscale_factor: factor,
            adapter_type: kind.into(),
        };
        assert_eq!(
            config("full_adapter", vec![320, 640, 1280, 1280], 8).total_downscale_factor(),
            64
        );
        assert_eq!(config("light_adapter", vec![320, 640, 1280], 8).total_downscale_factor(), 64);
        assert_eq!(
            config("full_adapter_xl", vec![320, 640, 1280, 1280], 16).total_downscale_factor(),
            32
        );
        assert!(config("fancy_adapter", vec![320], 8).kind().is_err());
    }
}
