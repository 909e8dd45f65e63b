//! T2I-Adapter conditioning of a request: validating the `t2i_adapters` field (names,
//! scales, control images decoded under limits and fitted to the output size) and turning
//! the chosen adapters into the UNet's `down_intrablock` features, as diffusers'
//! `StableDiffusionAdapterPipeline` / `StableDiffusionXLAdapterPipeline` (with
//! `MultiAdapter` for several) prepare them.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::image_input::{self, ResizeMode};
use crate::adapters::t2i::{self, T2IAdapterLibrary};
use crate::codec::{self, DecodedImage};
use crate::error::{PipelineError, ValidationError};
use crate::models::unet::UNetConfig;

/// Scale used when a request gives none (diffusers' `adapter_conditioning_scale`).
pub const DEFAULT_T2I_ADAPTER_SCALE: f64 = 1.0;

/// One T2I-Adapter as a request names it (not yet validated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T2IAdapterParams {
    /// Adapter name in the configured T2I-Adapter directories.
    pub model: String,
    /// Control image: base64 or a data URI (PNG, JPEG, WebP).
    pub image: String,
    /// Multiplies the adapter's features; default 1.
    #[serde(default)]
    pub scale: Option<f64>,
}

/// A validated T2I-Adapter of a request: its control image already fitted to the output
/// size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T2IAdapterChoice {
    pub model: String,
    /// RGB8, row-major, at the request's width × height.
    pub image_rgb: Vec<u8>,
    pub scale: f64,
}

fn field(index: usize, name: &str) -> String {
    format!("t2i_adapters[{index}].{name}")
}

/// Decodes every control image (PNG, JPEG or WebP, under the user-image limits); errors
/// name the image's field, e.g. `t2i_adapters[1].image`.
pub fn decode_images(params: &[T2IAdapterParams]) -> Result<Vec<DecodedImage>, ValidationError> {
    if params.len() > t2i::MAX_T2I_ADAPTERS_PER_REQUEST {
        return Err(ValidationError::new(
            "t2i_adapters",
            format!("at most {} T2I-Adapters per request", t2i::MAX_T2I_ADAPTERS_PER_REQUEST),
        ));
    }
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            codec::decode_base64_image(
                &p.image,
                image_input::MAX_IMAGE_BYTES,
                image_input::MAX_IMAGE_PIXELS,
            )
            .map_err(|e| ValidationError::new(field(i, "image"), e.to_string()))
        })
        .collect()
}

/// Checks names and scales and stretches each decoded image to `width` × `height` (as
/// diffusers resizes control images, Lanczos).
pub fn validate(
    params: &[T2IAdapterParams],
    images: Vec<DecodedImage>,
    width: u32,
    height: u32,
) -> Result<Vec<T2IAdapterChoice>, ValidationError> {
    params
        .iter()
        .zip(images)
        .enumerate()
        .map(|(i, (p, image))| {
            t2i::check_name(&p.model)
                .map_err(|e| ValidationError::new(field(i, "model"), e.to_string()))?;
            let scale = p.scale.unwrap_or(DEFAULT_T2I_ADAPTER_SCALE);
            let limit = t2i::MAX_T2I_ADAPTER_SCALE;
            if !scale.is_finite() || !(0.0..=limit).contains(&scale) {
                return Err(ValidationError::new(
                    field(i, "scale"),
                    format!("must be between 0 and {limit}, got {scale}"),
                ));
            }
            Ok(T2IAdapterChoice {
                model: p.model.clone(),
                image_rgb: image_input::fit_rgb(image, width, height, ResizeMode::Resize),
                scale,
            })
        })
        .collect()
}

/// PIL's `convert("L")`: ITU-R 601 luma in 16-bit fixed point, rounded.
fn luma(rgb: &[u8]) -> Vec<f32> {
    rgb.chunks_exact(3)
        .map(|p| {
            let weighted = p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471;
            ((weighted + 0x8000) >> 16) as f32
        })
        .collect()
}

/// `[channels, height, width]` per down block where diffusers' UNet adds a T2I-Adapter
/// feature, then the mid block's: blocks with attention take it at their own resolution,
/// blocks without after their downsampler (stride-2 convolutions round odd sizes up).
fn expected_shapes(unet: &UNetConfig, latent_h: usize, latent_w: usize) -> Vec<[usize; 3]> {
    let blocks = unet.block_out_channels.len();
    let halve = |(h, w): (usize, usize)| (h.div_ceil(2), w.div_ceil(2));
    let mut size = (latent_h, latent_w);
    let mut shapes = Vec::with_capacity(blocks + 1);
    for (i, kind) in unet.down_block_types.iter().enumerate() {
        let has_downsampler = i + 1 < blocks;
        let at =
            if kind == "CrossAttnDownBlock2D" || !has_downsampler { size } else { halve(size) };
        shapes.push([unet.block_out_channels[i], at.0, at.1]);
        if has_downsampler {
            size = halve(size);
        }
    }
    shapes.push([unet.block_out_channels[blocks - 1], size.0, size.1]);
    shapes
}

/// What [`adapter_features`] needs from the pipeline.
pub struct FeatureContext<'a> {
    pub library: &'a T2IAdapterLibrary,
    pub unet: &'a UNetConfig,
    pub width: u32,
    pub height: u32,
    /// Images per request (features are repeated per image).
    pub images: usize,
    /// Classifier-free guidance doubles the batch.
    pub guided: bool,
    pub device: &'a Device,
    pub dtype: DType,
}

/// The UNet's `down_intrablock` features for `choices`: each adapter's features times its
/// scale, summed over the adapters (diffusers' `MultiAdapter` with the scales as weights),
/// repeated for every image and both halves of the guidance batch. `None` without
/// adapters. Adapters that do not fit the model or each other are the request's error.
pub fn adapter_features(
    choices: &[T2IAdapterChoice],
    context: &FeatureContext,
) -> Result<Option<Vec<Tensor>>, PipelineError> {
    if choices.is_empty() {
        return Ok(None);
    }
    let (width, height) = (context.width as usize, context.height as usize);
    let expected = expected_shapes(context.unet, height / 8, width / 8);
    let down_blocks = expected.len() - 1;
    let mut summed: Option<Vec<Tensor>> = None;
    for (i, choice) in choices.iter().enumerate() {
        let invalid = |message: String| -> PipelineError {
            ValidationError::new(field(i, "model"), message).into()
        };
        let adapter = context
            .library
            .load(&choice.model, context.device, context.dtype)
            .map_err(|e| invalid(e.to_string()))?;
        let config = adapter.config();
        let factor = config.downscale_factor;
        if width % factor != 0 || height % factor != 0 {
            return Err(invalid(format!(
                "T2I-Adapter {:?} needs a width and height that are multiples of {factor}, got \
                 {width}x{height}",
                choice.model
            )));
        }
        let pixels: Vec<f32> = match config.in_channels {
            3 => choice.image_rgb.iter().map(|&v| v as f32).collect(),
            1 => luma(&choice.image_rgb),
            other => {
                return Err(invalid(format!(
                    "T2I-Adapter {:?} takes {other}-channel images; only 1 (grayscale) and 3 \
                     (RGB) are supported",
                    choice.model
                )))
            }
        };
        let channels = config.in_channels;
        // diffusers feeds pixels / 255 (no [-1, 1] normalisation), NCHW.
        let image = (Tensor::from_vec(pixels, (height, width, channels), context.device)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            / 255.0)?
            .to_dtype(context.dtype)?;
        let features = adapter.forward(&image)?;
        for (level, feature) in features.iter().enumerate().take(down_blocks) {
            let [c, h, w] = expected[level];
            if feature.dims()[1..] != [c, h, w] {
                return Err(invalid(format!(
                    "T2I-Adapter {:?} makes a {:?} feature map for down block {level}, which \
                     needs [{c}, {h}, {w}]: the adapter does not fit this model (an SDXL \
                     adapter on SD 1.x, or the reverse?)",
                    choice.model,
                    &feature.dims()[1..]
                )));
            }
        }
        let scaled =
            features.iter().map(|f| f * choice.scale).collect::<candle_core::Result<Vec<_>>>()?;
        summed = Some(match summed {
            None => scaled,
            Some(total) => {
                let same = total.len() == scaled.len()
                    && total.iter().zip(&scaled).all(|(a, b)| a.dims() == b.dims());
                if !same {
                    return Err(invalid(format!(
                        "T2I-Adapter {:?} downscales differently from t2i_adapters[0]; only \
                         adapters with the same feature sizes can be combined",
                        choice.model
                    )));
                }
                total.iter().zip(&scaled).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?
            }
        });
    }
    let summed = summed.expect("at least one adapter was processed; this is a bug");
    let copies = context.images * if context.guided { 2 } else { 1 };
    let batched = summed
        .iter()
        .map(|feature| feature.repeat((copies, 1, 1, 1)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(batched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_rounds_as_pil() {
        // PIL: L(255, 0, 0) = 76, L(0, 255, 0) = 150, L(0, 0, 255) = 29, L(v, v, v) = v.
        assert_eq!(luma(&[255, 0, 0, 0, 255, 0, 0, 0, 255]), [76.0, 150.0, 29.0]);
        assert!((0..=255u8).all(|v| luma(&[v, v, v]) == [v as f32]));
    }

    #[test]
    fn scales_and_names_are_checked() {
        let png = {
            let mut bytes = Vec::new();
            image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8))
                .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
                .unwrap();
            codec::base64_encode(&bytes)
        };
        let params = |model: &str, scale| {
            vec![T2IAdapterParams { model: model.into(), image: png.clone(), scale }]
        };
        let check = |p: Vec<T2IAdapterParams>| {
            let images = decode_images(&p)?;
            validate(&p, images, 16, 16)
        };
        assert_eq!(check(params("canny", None)).unwrap()[0].image_rgb.len(), 16 * 16 * 3);
        assert_eq!(check(params("canny", Some(-1.0))).unwrap_err().field, "t2i_adapters[0].scale");
        assert_eq!(check(params("../x", None)).unwrap_err().field, "t2i_adapters[0].model");
        let mut bad = params("canny", None);
        bad[0].image = "not an image".into();
        assert_eq!(check(bad).unwrap_err().field, "t2i_adapters[0].image");
    }
}
