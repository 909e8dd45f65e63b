//! Image-conditioned requests (img2img and inpainting) in pixel space: decoding the
//! user's init image and mask, fitting them to the output size (resize modes), blurring
//! the mask, the masks the latent loop uses, and pasting the original back outside the
//! mask after decoding.

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodedImage};
use crate::error::ValidationError;

/// Largest encoded user image accepted (bytes).
pub const MAX_IMAGE_BYTES: usize = 32 * 1024 * 1024;
/// Largest decoded user image accepted (width × height); bigger ones are refused before
/// their pixels are decoded (decompression bombs).
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
/// Default img2img strength (diffusers' and A1111's default).
pub const DEFAULT_STRENGTH: f64 = 0.75;
/// Default mask blur in pixels (A1111's default).
pub const DEFAULT_MASK_BLUR: u32 = 4;
/// Largest mask blur accepted, in pixels.
pub const MAX_MASK_BLUR: u32 = 64;

/// How an init image (and its mask) whose size differs from the output is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Stretch to the output size (A1111 "Just resize", 0).
    #[default]
    Resize,
    /// Scale to cover the output, then crop the overflow centred (A1111 "Crop and
    /// resize", 1).
    Crop,
    /// Scale to fit inside the output, centre it and fill the borders by extending the
    /// image's edge pixels (A1111 "Resize and fill", 2).
    Fill,
}

impl ResizeMode {
    /// Every mode, as listed to users.
    pub const ALL: [ResizeMode; 3] = [ResizeMode::Resize, ResizeMode::Crop, ResizeMode::Fill];

    /// The id used in requests.
    pub fn id(self) -> &'static str {
        match self {
            ResizeMode::Resize => "resize",
            ResizeMode::Crop => "crop",
            ResizeMode::Fill => "fill",
        }
    }

    /// Looks a mode up by id (case-insensitive).
    pub fn from_name(name: &str) -> Option<ResizeMode> {
        ResizeMode::ALL.into_iter().find(|mode| mode.id().eq_ignore_ascii_case(name.trim()))
    }

    /// A1111's numeric `resize_mode` (0, 1, 2; 3 "latent upscale" is not supported).
    pub fn from_a1111(index: u32) -> Option<ResizeMode> {
        ResizeMode::ALL.get(index as usize).copied()
    }
}

/// The validated image conditioning of a request, already fitted to the output size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConditioning {
    /// The init image, RGB8 row-major at the request's width × height.
    pub init_rgb: Vec<u8>,
    /// How much of the schedule is run (0..1]: 1 starts from pure noise.
    pub strength: f64,
    /// Inpainting mask at width × height (255 = repaint), already blurred.
    pub mask: Option<Vec<u8>>,
    /// Whether the original is pasted back outside the (blurred) mask after decoding.
    pub paste_back: bool,
}

fn image_error(field: &str, error: codec::CodecError) -> ValidationError {
    ValidationError::new(field, error.to_string())
}

/// Decodes the init image sent in `field`.
pub fn decode_init_image(field: &str, data: &str) -> Result<DecodedImage, ValidationError> {
    codec::decode_base64_image(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
        .map_err(|e| image_error(field, e))
}

/// Decodes a mask sent in `field` to grayscale `(width, height, luma)`: RGB is weighted
/// as ITU-R 601 luma (PIL's `convert("L")`), alpha is ignored.
pub fn decode_mask(field: &str, data: &str) -> Result<(u32, u32, Vec<u8>), ValidationError> {
    let (width, height, rgba) =
        codec::decode_base64_image_rgba(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
            .map_err(|e| image_error(field, e))?;
    let luma = rgba
        .chunks_exact(4)
        .map(|p| {
            let weighted = p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114;
            (weighted / 1000) as u8
        })
        .collect();
    Ok((width, height, luma))
}

/// Turns an OpenAI-style mask (transparent = edit) into a white = repaint grayscale
/// mask `(width, height, luma)`.
pub fn mask_from_alpha(field: &str, data: &str) -> Result<(u32, u32, Vec<u8>), ValidationError> {
    let (width, height, rgba) =
        codec::decode_base64_image_rgba(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
            .map_err(|e| image_error(field, e))?;
    Ok((width, height, rgba.chunks_exact(4).map(|p| 255 - p[3]).collect()))
}

/// Fits an image to `width` × `height` under `mode`; an image already that size is
/// returned unchanged (no resampling).
fn fit(image: DynamicImage, width: u32, height: u32, mode: ResizeMode) -> DynamicImage {
    if image.width() == width && image.height() == height {
        return image;
    }
    let (source_w, source_h) = (image.width() as f64, image.height() as f64);
    match mode {
        ResizeMode::Resize => image.resize_exact(width, height, FilterType::Lanczos3),
        ResizeMode::Crop => {
            let scale = (width as f64 / source_w).max(height as f64 / source_h);
            let scaled_w = ((source_w * scale).round() as u32).max(width);
            let scaled_h = ((source_h * scale).round() as u32).max(height);
            let scaled = image.resize_exact(scaled_w, scaled_h, FilterType::Lanczos3);
            scaled.crop_imm((scaled_w - width) / 2, (scaled_h - height) / 2, width, height)
        }
        ResizeMode::Fill => {
            let scale = (width as f64 / source_w).min(height as f64 / source_h);
            let scaled_w = ((source_w * scale).round() as u32).clamp(1, width);
            let scaled_h = ((source_h * scale).round() as u32).clamp(1, height);
            let scaled = image.resize_exact(scaled_w, scaled_h, FilterType::Lanczos3);
            let (left, top) = ((width - scaled_w) / 2, (height - scaled_h) / 2);
            // Every output pixel takes the nearest pixel of the placed image, so the
            // borders extend its edges.
            let pick = |x: u32, y: u32| {
                let sx = x.saturating_sub(left).min(scaled_w - 1);
                let sy = y.saturating_sub(top).min(scaled_h - 1);
                (sx, sy)
            };
            match scaled {
                DynamicImage::ImageLuma8(gray) => {
                    DynamicImage::ImageLuma8(GrayImage::from_fn(width, height, |x, y| {
                        let (sx, sy) = pick(x, y);
                        *gray.get_pixel(sx, sy)
                    }))
                }
                other => {
                    let rgb = other.to_rgb8();
                    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
                        let (sx, sy) = pick(x, y);
                        *rgb.get_pixel(sx, sy)
                    }))
                }
            }
        }
    }
}

/// Fits an RGB8 image to the output size.
pub fn fit_rgb(image: DecodedImage, width: u32, height: u32, mode: ResizeMode) -> Vec<u8> {
    let buffer = RgbImage::from_raw(image.width, image.height, image.rgb)
        .expect("decoded images hold width * height * 3 bytes; this is a bug");
    fit(DynamicImage::ImageRgb8(buffer), width, height, mode).to_rgb8().into_raw()
}

/// Fits a grayscale mask to the output size.
pub fn fit_mask(
    (mask_w, mask_h, luma): (u32, u32, Vec<u8>),
    width: u32,
    height: u32,
    mode: ResizeMode,
) -> Vec<u8> {
    let buffer = GrayImage::from_raw(mask_w, mask_h, luma)
        .expect("masks hold width * height bytes; this is a bug");
    fit(DynamicImage::ImageLuma8(buffer), width, height, mode).to_luma8().into_raw()
}

/// Gaussian blur of a grayscale mask with standard deviation `sigma` pixels (A1111's
/// `mask_blur`): a separable kernel of radius round(2.5 σ), edges extended.
pub fn blur_mask(mask: &[u8], width: u32, height: u32, sigma: u32) -> Vec<u8> {
    if sigma == 0 {
        return mask.to_vec();
    }
    let sigma = sigma as f32;
    let radius = (2.5 * sigma + 0.5) as i64;
    let mut kernel: Vec<f32> =
        (-radius..=radius).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let (w, h) = (width as i64, height as i64);
    let pass = |input: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; input.len()];
        for y in 0..h {
            for x in 0..w {
                let mut sum = 0f32;
                for (k, weight) in kernel.iter().enumerate() {
                    let offset = k as i64 - radius;
                    let (sx, sy) = if horizontal {
                        ((x + offset).clamp(0, w - 1), y)
                    } else {
                        (x, (y + offset).clamp(0, h - 1))
                    };
                    sum += weight * input[(sy * w + sx) as usize];
                }
                out[(y * w + x) as usize] = sum;
            }
        }
        out
    };
    let values: Vec<f32> = mask.iter().map(|&v| v as f32).collect();
    let blurred = pass(&pass(&values, true), false);
    blurred.into_iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect()
}

/// The mask binarised as diffusers' mask processor does (value / 255 ≥ 0.5 → 1).
pub fn binarized(mask: &[u8]) -> Vec<f32> {
    mask.iter().map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect()
}

/// The binarised mask at latent resolution (`width / 8` × `height / 8`), by nearest
/// neighbour as torch's `interpolate(mode="nearest")` picks it: pixel (8x, 8y).
pub fn latent_mask(mask: &[u8], width: u32, height: u32) -> Vec<f32> {
    let (latent_w, latent_h) = (width as usize / 8, height as usize / 8);
    let full = binarized(mask);
    (0..latent_h)
        .flat_map(|y| {
            let full = &full;
            (0..latent_w).map(move |x| full[y * 8 * width as usize + x * 8])
        })
        .collect()
}

/// Pastes `original` back over `generated` outside the mask:
/// `generated · m + original · (1 − m)` with m the blurred mask in [0, 1].
pub fn paste_back(generated: &mut [u8], original: &[u8], mask: &[u8]) {
    for (index, (pixel, &source)) in generated.iter_mut().zip(original).enumerate() {
        let m = mask[index / 3] as f32 / 255.0;
        *pixel = (*pixel as f32 * m + source as f32 * (1.0 - m)).round().clamp(0.0, 255.0) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_keeps_same_size_images_and_reaches_the_output_size() {
        let image = DecodedImage { width: 4, height: 2, rgb: (0..24).collect() };
        assert_eq!(fit_rgb(image.clone(), 4, 2, ResizeMode::Crop), image.rgb);
        for mode in ResizeMode::ALL {
            assert_eq!(fit_rgb(image.clone(), 8, 8, mode).len(), 8 * 8 * 3);
            assert_eq!(fit_mask((4, 2, vec![255; 8]), 16, 8, mode).len(), 16 * 8);
        }
        // Fill extends edges: a white mask stays white everywhere.
        assert!(fit_mask((4, 2, vec![255; 8]), 8, 8, ResizeMode::Fill).iter().all(|&v| v == 255));
    }

    #[test]
    fn blur_softens_edges_and_keeps_flat_regions() {
        let mut mask = vec![0u8; 32 * 32];
        for y in 0..32 {
            for x in 16..32 {
                mask[y * 32 + x] = 255;
            }
        }
        let blurred = blur_mask(&mask, 32, 32, 4);
        assert_eq!(blurred[0], 0);
        assert_eq!(blurred[31], 255);
        assert!(blurred[15] > 0 && blurred[15] < 255 && blurred[16] < 255);
        assert_eq!(blur_mask(&mask, 32, 32, 0), mask);
    }

    #[test]
    fn latent_mask_samples_block_corners_and_paste_back_blends() {
        let mut mask = vec![0u8; 16 * 16];
        mask[8] = 200; // top-left pixel of block (1, 0)
        assert_eq!(latent_mask(&mask, 16, 16), vec![0.0, 1.0, 0.0, 0.0]);
        let mut generated = vec![200u8; 6];
        paste_back(&mut generated, &[0u8; 6], &[255, 0]);
        assert_eq!(generated, vec![200, 200, 200, 0, 0, 0]);
    }
}
