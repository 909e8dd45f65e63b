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
    /// "Inpaint only masked": `init_rgb` and `mask` are the masked region scaled up to
    /// the output size; the result is scaled back and pasted into this canvas.
    #[serde(default)]
    pub full_res: Option<FullResCrop>,
}

/// The region "inpaint only masked" repaints, and the full image it goes back into.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullResCrop {
    /// The init image at the output size.
    pub canvas_rgb: Vec<u8>,
    /// The blurred mask at the output size.
    pub canvas_mask: Vec<u8>,
    /// The region (left, top, width, height) in canvas pixels.
    pub region: (u32, u32, u32, u32),
}

/// The bounding box of the mask's non-zero pixels grown by `padding` and then to the
/// output's aspect ratio (within the image), as A1111's "inpaint only masked" picks it:
/// (left, top, width, height); `None` for an empty mask.
pub fn masked_region(
    mask: &[u8],
    width: u32,
    height: u32,
    padding: u32,
) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for (index, &value) in mask.iter().enumerate() {
        if value > 0 {
            let (x, y) = (index as u32 % width, index as u32 / width);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
        }
    }
    if x0 == u32::MAX {
        return None;
    }
    let (mut x0, mut y0) = (x0.saturating_sub(padding), y0.saturating_sub(padding));
    let (mut x1, mut y1) = ((x1 + padding).min(width), (y1 + padding).min(height));
    // Grow the short side so the region has the output's aspect ratio, shifting it back
    // inside the image where it would overflow.
    let grow = |start: &mut u32, end: &mut u32, wanted: u32, limit: u32| {
        let wanted = wanted.min(limit);
        let missing = wanted.saturating_sub(*end - *start);
        let before = (missing / 2).min(*start);
        *start -= before;
        *end = (*end + missing - before).min(limit);
        *start = (*end).saturating_sub(wanted).min(*start);
    };
    let ratio = width as f64 / height as f64;
    let (region_w, region_h) = ((x1 - x0) as f64, (y1 - y0) as f64);
    if region_w / region_h < ratio {
        grow(&mut x0, &mut x1, (region_h * ratio).round() as u32, width);
    } else {
        grow(&mut y0, &mut y1, (region_w / ratio).round() as u32, height);
    }
    Some((x0, y0, x1 - x0, y1 - y0))
}

/// Crops `region` out of a `width`-wide image with `channels` bytes per pixel.
fn crop(pixels: &[u8], width: u32, channels: usize, region: (u32, u32, u32, u32)) -> Vec<u8> {
    let (left, top, region_w, region_h) = region;
    (top..top + region_h)
        .flat_map(|y| {
            let start = (y * width + left) as usize * channels;
            pixels[start..start + region_w as usize * channels].iter().copied()
        })
        .collect()
}

/// Prepares "inpaint only masked": the masked region of the (already fitted) image and
/// mask, scaled up to the output size, plus what [`paste_full_res`] needs.
pub fn full_res_inputs(
    init_rgb: Vec<u8>,
    mask: Vec<u8>,
    width: u32,
    height: u32,
    padding: u32,
) -> Option<(Vec<u8>, Vec<u8>, FullResCrop)> {
    let region = masked_region(&mask, width, height, padding)?;
    let (_, _, region_w, region_h) = region;
    let image =
        DecodedImage { width: region_w, height: region_h, rgb: crop(&init_rgb, width, 3, region) };
    let scaled_rgb = fit_rgb(image, width, height, ResizeMode::Resize);
    let scaled_mask = fit_mask(
        (region_w, region_h, crop(&mask, width, 1, region)),
        width,
        height,
        ResizeMode::Resize,
    );
    Some((scaled_rgb, scaled_mask, FullResCrop { canvas_rgb: init_rgb, canvas_mask: mask, region }))
}

/// Scales a generated region back and pastes it into the canvas: through the blurred
/// mask when `blend`, else the whole region.
pub fn paste_full_res(
    generated: &[u8],
    width: u32,
    height: u32,
    full: &FullResCrop,
    blend: bool,
) -> Vec<u8> {
    let (left, top, region_w, region_h) = full.region;
    let image = DecodedImage { width, height, rgb: generated.to_vec() };
    let scaled = fit_rgb(image, region_w, region_h, ResizeMode::Resize);
    let mut canvas = full.canvas_rgb.clone();
    for y in 0..region_h {
        for x in 0..region_w {
            let target = ((top + y) * width + left + x) as usize;
            let m = if blend { full.canvas_mask[target] as f32 / 255.0 } else { 1.0 };
            for c in 0..3 {
                let source = scaled[((y * region_w + x) as usize) * 3 + c] as f32;
                let original = canvas[target * 3 + c] as f32;
                canvas[target * 3 + c] = (source * m + original * (1.0 - m)).round() as u8;
            }
        }
    }
    canvas
}

fn image_error(field: &str, error: codec::CodecError) -> ValidationError {
    ValidationError::new(field, error.to_string())
}

/// Decodes the init image sent in `field`.
pub fn decode_init_image(field: &str, data: &str) -> Result<DecodedImage, ValidationError> {
    codec::decode_base64_image(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
        .map_err(|e| image_error(field, e))
}

/// Decodes a ControlNet control image sent in `field` to RGB. Alpha is dropped, not
/// flattened onto white: diffusers' control image processor converts with PIL's
/// `convert("RGB")`, which keeps the colour under transparent pixels (an edge map or pose
/// skeleton on a transparent background stays black there).
pub fn decode_control_image(field: &str, data: &str) -> Result<DecodedImage, ValidationError> {
    let (width, height, rgba) =
        codec::decode_base64_image_rgba(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
            .map_err(|e| image_error(field, e))?;
    let rgb = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    Ok(DecodedImage { width, height, rgb })
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
    fn control_images_drop_alpha_instead_of_flattening_it() {
        // A transparent black pixel and an opaque white one.
        let rgba = image::RgbaImage::from_raw(2, 1, vec![0, 0, 0, 0, 255, 255, 255, 255]).unwrap();
        let mut png = Vec::new();
        image::DynamicImage::ImageRgba8(rgba)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let decoded =
            decode_control_image("controlnets[0].image", &codec::base64_encode(&png)).unwrap();
        assert_eq!(decoded.rgb, [0, 0, 0, 255, 255, 255]);
        let error = decode_control_image("controlnets[2].image", "not an image!").unwrap_err();
        assert_eq!(error.field, "controlnets[2].image");
    }

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
    fn masked_region_pads_and_keeps_the_output_aspect_ratio() {
        let mut mask = vec![0u8; 64 * 32];
        mask[10 * 64 + 20] = 255; // one pixel at (20, 10)
        let (left, top, w, h) = masked_region(&mask, 64, 32, 4).unwrap();
        assert!(left <= 16 && left + w >= 25 && top <= 6 && top + h >= 15);
        assert_eq!(w * 32, h * 64, "aspect ratio 2:1");
        assert!(masked_region(&vec![0u8; 64 * 32], 64, 32, 4).is_none());
        let (rgb, scaled_mask, full) =
            full_res_inputs(vec![9u8; 64 * 32 * 3], mask.clone(), 64, 32, 4).unwrap();
        assert_eq!((rgb.len(), scaled_mask.len()), (64 * 32 * 3, 64 * 32));
        let pasted = paste_full_res(&vec![200u8; 64 * 32 * 3], 64, 32, &full, true);
        assert_eq!(pasted[0], 9, "outside the mask stays");
        assert_eq!(pasted[(10 * 64 + 20) * 3], 200, "the masked pixel is repainted");
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
