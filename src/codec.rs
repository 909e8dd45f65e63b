//! Image encoding for responses: PNG (with the AUTOMATIC1111 `parameters` text chunk),
//! JPEG and WebP, and base64.
//!
//! TEMPORARY minimal version written by the service branch so that it compiles; the codec
//! engineer's module replaces it (same public names: `ImageFormat`, `encode_image`,
//! `base64_encode`, `CodecError`).

use std::io::Cursor;

use base64::Engine;

/// The output formats the service can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// Parses `png`, `jpeg`/`jpg` or `webp` (case-insensitive), or a MIME type.
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name.trim().to_ascii_lowercase().as_str() {
            "png" | "image/png" => Some(ImageFormat::Png),
            "jpeg" | "jpg" | "image/jpeg" => Some(ImageFormat::Jpeg),
            "webp" | "image/webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    /// The MIME type of the format.
    pub fn mime_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// Encoding an image failed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("image buffer has {actual} bytes, expected {expected} for {width}x{height} RGB")]
    BadBuffer {
        width: u32,
        height: u32,
        expected: usize,
        actual: usize,
    },
    #[error("quality must be between 1 and 100, got {0}")]
    BadQuality(u8),
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Encodes an 8-bit RGB buffer. `quality` (1-100) applies to JPEG; `parameters` is written
/// into PNGs as the `parameters` text chunk that AUTOMATIC1111 reads back.
pub fn encode_image(
    rgb: &[u8],
    width: u32,
    height: u32,
    format: ImageFormat,
    quality: Option<u8>,
    parameters: Option<&str>,
) -> Result<Vec<u8>, CodecError> {
    let expected = width as usize * height as usize * 3;
    if rgb.len() != expected {
        return Err(CodecError::BadBuffer {
            width,
            height,
            expected,
            actual: rgb.len(),
        });
    }
    let mut out = Vec::new();
    match format {
        ImageFormat::Png => {
            let mut encoder = png::Encoder::new(&mut out, width, height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            if let Some(text) = parameters {
                // tEXt is Latin-1 only; other text goes into an iTXt chunk (UTF-8).
                let added = if text.is_ascii() {
                    encoder.add_text_chunk("parameters".to_string(), text.to_string())
                } else {
                    encoder.add_itxt_chunk("parameters".to_string(), text.to_string())
                };
                added.map_err(|e| CodecError::Encode(e.to_string()))?;
            }
            let mut writer = encoder
                .write_header()
                .map_err(|e| CodecError::Encode(e.to_string()))?;
            writer
                .write_image_data(rgb)
                .map_err(|e| CodecError::Encode(e.to_string()))?;
            writer
                .finish()
                .map_err(|e| CodecError::Encode(e.to_string()))?;
        }
        ImageFormat::Jpeg => {
            let quality = quality.unwrap_or(90);
            if !(1..=100).contains(&quality) {
                return Err(CodecError::BadQuality(quality));
            }
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), quality)
                .encode(rgb, width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| CodecError::Encode(e.to_string()))?;
        }
        ImageFormat::Webp => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut Cursor::new(&mut out))
                .encode(rgb, width, height, image::ExtendedColorType::Rgb8)
                .map_err(|e| CodecError::Encode(e.to_string()))?;
        }
    }
    Ok(out)
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
