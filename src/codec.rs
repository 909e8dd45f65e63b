//! Image bytes in and out of the service: encoding generated RGB images as PNG/JPEG/WebP
//! (with AUTOMATIC1111-style generation parameters embedded), reading those parameters
//! back, base64, and decoding user-supplied images under size limits.
//!
//! Where the parameters go, as A1111 does it:
//! - PNG: a text chunk with keyword `parameters`; `tEXt` when the text is Latin-1, else
//!   `iTXt` (UTF-8), because `tEXt` cannot carry other characters.
//! - JPEG and WebP: an EXIF `UserComment` tag, charset `UNICODE`, UTF-16 big-endian.
//!
//! WebP output is lossless: the only pure-Rust WebP encoder available (`image`'s, built on
//! `image-webp`) has no lossy mode, so `quality` is ignored for WebP.

use std::io::Cursor;

use base64::Engine as _;
use image::{ExtendedColorType, ImageDecoder, ImageEncoder};
use serde::{Deserialize, Serialize};

/// JPEG quality used when the request names none.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The PNG text keyword (and A1111 infotext field) that carries generation parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Output image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Png,
    #[serde(alias = "jpg")]
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// Parses a format name as users write it (`png`, `jpeg`/`jpg`, `webp`; any case).
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name.trim().to_ascii_lowercase().as_str() {
            "png" => Some(ImageFormat::Png),
            "jpeg" | "jpg" => Some(ImageFormat::Jpeg),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    /// The lower-case name, as serialized.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// MIME type for `Content-Type` headers and data URIs.
    pub fn mime_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// File name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Webp => "webp",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Encoding or decoding an image failed; messages are meant for API users.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("invalid base64 image data: {0}")]
    InvalidBase64(String),
    #[error("invalid data URI: {0}")]
    InvalidDataUri(String),
    #[error("image is {bytes} bytes, more than the limit of {max_bytes} bytes")]
    TooLarge { bytes: usize, max_bytes: usize },
    #[error("image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")]
    TooManyPixels { width: u32, height: u32, max_pixels: u64 },
    #[error("unsupported image format {0}: send PNG, JPEG or WebP")]
    UnsupportedFormat(String),
    #[error("image data could not be decoded: {0}")]
    Corrupt(String),
    #[error("invalid image to encode: {0}")]
    InvalidInput(String),
    #[error("{format} encoding failed: {reason}")]
    Encode { format: ImageFormat, reason: String },
}

/// A decoded user image: 8-bit RGB, row-major, `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Encodes an 8-bit RGB image (`width * height * 3` bytes, row-major).
///
/// `quality` (1–100, default 90) applies to JPEG only. `parameters`, when given, is
/// embedded as A1111 does (see the module docs).
pub fn encode_image(
    rgb: &[u8],
    width: u32,
    height: u32,
    format: ImageFormat,
    quality: Option<u8>,
    parameters: Option<&str>,
) -> Result<Vec<u8>, CodecError> {
    check_rgb_buffer(rgb, width, height)?;
    match format {
        ImageFormat::Png => encode_png(rgb, width, height, parameters),
        ImageFormat::Jpeg => {
            let quality = quality.unwrap_or(DEFAULT_JPEG_QUALITY);
            if !(1..=100).contains(&quality) {
                return Err(CodecError::InvalidInput(format!(
                    "JPEG quality must be between 1 and 100, got {quality}"
                )));
            }
            let mut out = Vec::new();
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            write_with_exif(encoder, rgb, width, height, format, parameters)?;
            Ok(out)
        }
        ImageFormat::Webp => {
            let mut out = Vec::new();
            let encoder = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            write_with_exif(encoder, rgb, width, height, format, parameters)?;
            Ok(out)
        }
    }
}

fn check_rgb_buffer(rgb: &[u8], width: u32, height: u32) -> Result<(), CodecError> {
    if width == 0 || height == 0 {
        return Err(CodecError::InvalidInput(format!("image size {width}x{height} is empty")));
    }
    let expected = width as u64 * height as u64 * 3;
    if rgb.len() as u64 != expected {
        return Err(CodecError::InvalidInput(format!(
            "{width}x{height} RGB needs {expected} bytes, got {}",
            rgb.len()
        )));
    }
    Ok(())
}

fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: Option<&str>,
) -> Result<Vec<u8>, CodecError> {
    let failed = |e: png::EncodingError| CodecError::Encode {
        format: ImageFormat::Png,
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Generated images are served once and often large: fast deflate costs a few percent
    // in size and saves most of the encoding time.
    encoder.set_compression(png::Compression::Fast);
    if let Some(text) = parameters {
        if is_latin1(text) {
            encoder.add_text_chunk(PARAMETERS_KEYWORD.into(), text.into()).map_err(failed)?;
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEYWORD.into(), text.into()).map_err(failed)?;
        }
    }
    let mut writer = encoder.write_header().map_err(failed)?;
    writer.write_image_data(rgb).map_err(failed)?;
    writer.finish().map_err(failed)?;
    Ok(out)
}

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) <= 0xFF)
}

fn write_with_exif(
    mut encoder: impl ImageEncoder,
    rgb: &[u8],
    width: u32,
    height: u32,
    format: ImageFormat,
    parameters: Option<&str>,
) -> Result<(), CodecError> {
    if let Some(text) = parameters {
        encoder
            .set_exif_metadata(exif_user_comment(text))
            .map_err(|e| CodecError::Encode { format, reason: e.to_string() })?;
    }
    encoder
        .write_image(rgb, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| CodecError::Encode { format, reason: e.to_string() })
}

/// A minimal big-endian TIFF/EXIF block: IFD0 holding only the pointer to an EXIF IFD
/// holding only `UserComment` = "UNICODE\0" + UTF-16BE text (A1111 and piexif's layout).
fn exif_user_comment(text: &str) -> Vec<u8> {
    const TYPE_LONG: u16 = 4;
    const TYPE_UNDEFINED: u16 = 7;
    const TAG_EXIF_IFD_POINTER: u16 = 0x8769;
    const TAG_USER_COMMENT: u16 = 0x9286;
    // Header (8) + IFD0 with one entry (2 + 12 + 4) puts the EXIF IFD at 26, and its one
    // entry (2 + 12 + 4) puts the comment at 44.
    const EXIF_IFD_OFFSET: u32 = 26;
    const COMMENT_OFFSET: u32 = 44;

    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(u16::to_be_bytes));

    let mut tiff = Vec::with_capacity(COMMENT_OFFSET as usize + comment.len());
    tiff.extend_from_slice(b"MM\0\x2a");
    tiff.extend_from_slice(&8u32.to_be_bytes());
    let mut ifd_with_one_entry = |tag: u16, kind: u16, count: u32, value: u32| {
        tiff.extend_from_slice(&1u16.to_be_bytes());
        tiff.extend_from_slice(&tag.to_be_bytes());
        tiff.extend_from_slice(&kind.to_be_bytes());
        tiff.extend_from_slice(&count.to_be_bytes());
        tiff.extend_from_slice(&value.to_be_bytes());
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    };
    ifd_with_one_entry(TAG_EXIF_IFD_POINTER, TYPE_LONG, 1, EXIF_IFD_OFFSET);
    let comment_len = u32::try_from(comment.len()).unwrap_or(u32::MAX);
    ifd_with_one_entry(TAG_USER_COMMENT, TYPE_UNDEFINED, comment_len, COMMENT_OFFSET);
    debug_assert_eq!(tiff.len(), COMMENT_OFFSET as usize, "EXIF layout offsets are a bug");
    tiff.extend_from_slice(&comment);
    tiff
}

/// The `parameters` text of a PNG (from a `tEXt`, `zTXt` or `iTXt` chunk), if any.
///
/// Text chunks before the image data are read without decoding pixels; only when none
/// matches is the image decoded to reach chunks written after it.
pub fn png_parameters(bytes: &[u8]) -> Option<String> {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    // Pixel data is decoded only on the slow path below; cap it like user uploads.
    decoder.set_limits(png::Limits { bytes: 256 * 1024 * 1024 });
    let mut reader = decoder.read_info().ok()?;
    if let Some(text) = find_parameters(reader.info()) {
        return Some(text);
    }
    let mut pixels = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut pixels).ok()?;
    reader.finish().ok()?;
    find_parameters(reader.info())
}

fn find_parameters(info: &png::Info<'_>) -> Option<String> {
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
        .map(|chunk| chunk.text.clone());
    latin1
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
                .and_then(|chunk| chunk.get_text().ok())
        })
        .or_else(|| {
            info.compressed_latin1_text
                .iter()
                .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
                .and_then(|chunk| chunk.get_text().ok())
        })
}

/// Standard base64 with padding, as every API dialect returns images.
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes a user image sent as base64 or as a `data:image/...;base64,` URI.
///
/// Whitespace inside the base64 text and missing padding are tolerated, as is the
/// URL-safe alphabet. The format is recognised from the bytes (PNG, JPEG, WebP), EXIF
/// orientation is applied, and transparency is flattened onto white (A1111's default
/// background for img2img), because the colour under fully transparent pixels is
/// arbitrary. `max_bytes` bounds the decoded file size, `max_pixels` its width × height;
/// both are checked before pixels are decoded.
pub fn decode_base64_image(
    data: &str,
    max_bytes: usize,
    max_pixels: u64,
) -> Result<DecodedImage, CodecError> {
    let payload = strip_data_uri(data.trim())?;
    let bytes = decode_base64_limited(payload, max_bytes)?;
    decode_image_bytes(&bytes, max_pixels)
}

/// The base64 part of a data URI, or the whole text when it is not one.
fn strip_data_uri(data: &str) -> Result<&str, CodecError> {
    let Some(rest) = data.strip_prefix("data:") else {
        return Ok(data);
    };
    let (header, payload) = rest.split_once(',').ok_or_else(|| {
        CodecError::InvalidDataUri("no ',' separates the header from the data".into())
    })?;
    let mut parts = header.split(';');
    let mime = parts.next().unwrap_or_default().trim();
    if !mime.is_empty() && !mime.to_ascii_lowercase().starts_with("image/") {
        return Err(CodecError::InvalidDataUri(format!("media type {mime:?} is not an image")));
    }
    if !parts.any(|part| part.trim().eq_ignore_ascii_case("base64")) {
        return Err(CodecError::InvalidDataUri("only base64 data URIs are accepted".into()));
    }
    Ok(payload)
}

fn decode_base64_limited(payload: &str, max_bytes: usize) -> Result<Vec<u8>, CodecError> {
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(CodecError::InvalidBase64("the image data is empty".into()));
    }
    // Reject oversized input before allocating its decoded form.
    let decoded_upper_bound = compact.len() / 4 * 3 + 3;
    let padding = compact.bytes().rev().take_while(|&b| b == b'=').count();
    let estimated = (compact.len() * 3 / 4).saturating_sub(padding);
    if estimated > max_bytes {
        return Err(CodecError::TooLarge { bytes: estimated, max_bytes });
    }
    let url_safe = compact.contains(['-', '_']);
    let config = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    let alphabet = if url_safe { &base64::alphabet::URL_SAFE } else { &base64::alphabet::STANDARD };
    let engine = base64::engine::GeneralPurpose::new(alphabet, config);
    let mut bytes = Vec::with_capacity(decoded_upper_bound.min(max_bytes));
    engine
        .decode_vec(compact.as_bytes(), &mut bytes)
        .map_err(|e| CodecError::InvalidBase64(e.to_string()))?;
    if bytes.len() > max_bytes {
        return Err(CodecError::TooLarge { bytes: bytes.len(), max_bytes });
    }
    Ok(bytes)
}

/// Decodes a user image as [`decode_base64_image`] does but keeps its alpha channel:
/// `(width, height, rgba)`, `rgba` row-major with 4 bytes per pixel (opaque images get
/// alpha 255). Masks use it, where transparency carries meaning.
pub fn decode_base64_image_rgba(
    data: &str,
    max_bytes: usize,
    max_pixels: u64,
) -> Result<(u32, u32, Vec<u8>), CodecError> {
    let payload = strip_data_uri(data.trim())?;
    let bytes = decode_base64_limited(payload, max_bytes)?;
    let image = decode_dynamic(&bytes, max_pixels)?;
    Ok((image.width(), image.height(), image.to_rgba8().into_raw()))
}

fn decode_dynamic(bytes: &[u8], max_pixels: u64) -> Result<image::DynamicImage, CodecError> {
    let format = image::guess_format(bytes).map_err(|_| {
        CodecError::UnsupportedFormat("(unrecognised data, not an image file)".into())
    })?;
    if !matches!(
        format,
        image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP
    ) {
        return Err(CodecError::UnsupportedFormat(format!("{format:?}").to_ascii_lowercase()));
    }
    let corrupt = |e: image::ImageError| CodecError::Corrupt(e.to_string());

    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // RGBA16 is the widest layout these decoders produce: 8 bytes per pixel, plus slack
    // for the decoders' own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 * 1024 * 1024));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width as u64 * height as u64 > max_pixels {
        return Err(CodecError::TooManyPixels { width, height, max_pixels });
    }
    if width == 0 || height == 0 {
        return Err(CodecError::Corrupt(format!("image size {width}x{height} is empty")));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Decodes an image file's bytes (PNG, JPEG or WebP) as [`decode_base64_image`] does.
pub fn decode_image_bytes(bytes: &[u8], max_pixels: u64) -> Result<DecodedImage, CodecError> {
    let image = decode_dynamic(bytes, max_pixels)?;
    let (width, height) = (image.width(), image.height());
    let rgb = if image.color().has_alpha() {
        flatten_onto_white(&image.to_rgba8())
    } else {
        image.to_rgb8().into_raw()
    };
    Ok(DecodedImage { width, height, rgb })
}

fn flatten_onto_white(rgba: &image::RgbaImage) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(rgba.width() as usize * rgba.height() as usize * 3);
    for pixel in rgba.pixels() {
        let alpha = pixel[3] as u32;
        for &channel in &pixel.0[..3] {
            // Rounded (c·a + 255·(255−a)) / 255.
            let blended = (channel as u32 * alpha + 255 * (255 - alpha) + 127) / 255;
            rgb.push(blended as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BYTES: usize = 10 * 1024 * 1024;
    const MAX_PIXELS: u64 = 4096 * 4096;

    /// A gradient, so that a format mixing up rows, columns or channels shows it.
    fn gradient(width: u32, height: u32) -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&[(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8]);
            }
        }
        rgb
    }

    fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
        a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
    }

    #[test]
    fn format_names_round_trip() {
        assert_eq!(ImageFormat::from_name("JPG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_name(" webp "), Some(ImageFormat::Webp));
        assert_eq!(ImageFormat::from_name("gif"), None);
        assert_eq!(serde_json::to_string(&ImageFormat::Jpeg).unwrap(), "\"jpeg\"");
        let parsed: ImageFormat = serde_json::from_str("\"jpg\"").unwrap();
        assert_eq!(parsed, ImageFormat::Jpeg);
        assert_eq!(ImageFormat::Png.mime_type(), "image/png");
        assert_eq!(ImageFormat::Jpeg.extension(), "jpg");
    }

    #[test]
    fn lossless_formats_round_trip_exactly() {
        let rgb = gradient(24, 16);
        for format in [ImageFormat::Png, ImageFormat::Webp] {
            let bytes = encode_image(&rgb, 24, 16, format, None, Some("steps: 20")).unwrap();
            let decoded = decode_base64_image(&base64_encode(&bytes), MAX_BYTES, MAX_PIXELS)
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!((decoded.width, decoded.height), (24, 16), "{format}");
            assert_eq!(decoded.rgb, rgb, "{format}");
        }
    }

    #[test]
    fn jpeg_round_trips_closely_and_quality_matters() {
        let rgb = gradient(32, 32);
        let good = encode_image(&rgb, 32, 32, ImageFormat::Jpeg, Some(95), None).unwrap();
        let poor = encode_image(&rgb, 32, 32, ImageFormat::Jpeg, Some(10), None).unwrap();
        assert!(poor.len() < good.len());
        let decoded = decode_base64_image(&base64_encode(&good), MAX_BYTES, MAX_PIXELS).unwrap();
        assert_eq!((decoded.width, decoded.height), (32, 32));
        assert!(max_abs_diff(&decoded.rgb, &rgb) < 24);
        let err = encode_image(&rgb, 32, 32, ImageFormat::Jpeg, Some(0), None).unwrap_err();
        assert!(err.to_string().contains("between 1 and 100"), "{err}");
    }

    #[test]
    fn png_parameters_are_read_back() {
        let rgb = gradient(4, 4);
        let ascii = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1";
        let latin1 = "café, Größe";
        let unicode = "猫 🐱, Steps: 20";
        for text in [ascii, latin1, unicode] {
            let png = encode_image(&rgb, 4, 4, ImageFormat::Png, None, Some(text)).unwrap();
            assert_eq!(png_parameters(&png).as_deref(), Some(text));
        }
        let ascii_png = encode_image(&rgb, 4, 4, ImageFormat::Png, None, Some(ascii)).unwrap();
        assert!(contains(&ascii_png, b"tEXtparameters\0"));
        let utf8_png = encode_image(&rgb, 4, 4, ImageFormat::Png, None, Some(unicode)).unwrap();
        assert!(contains(&utf8_png, b"iTXtparameters\0"));

        let plain = encode_image(&rgb, 4, 4, ImageFormat::Png, None, None).unwrap();
        assert_eq!(png_parameters(&plain), None);
        assert_eq!(png_parameters(b"not a png"), None);
    }

    #[test]
    fn jpeg_and_webp_carry_parameters_in_exif_user_comment() {
        let rgb = gradient(8, 8);
        let text = "猫, Steps: 20";
        let mut utf16 = b"UNICODE\0".to_vec();
        utf16.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        for format in [ImageFormat::Jpeg, ImageFormat::Webp] {
            let bytes = encode_image(&rgb, 8, 8, format, None, Some(text)).unwrap();
            assert!(contains(&bytes, &utf16), "{format} lacks the UserComment");
            assert!(decode_base64_image(&base64_encode(&bytes), MAX_BYTES, MAX_PIXELS).is_ok());
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|window| window == needle)
    }

    #[test]
    fn data_uris_and_sloppy_base64_are_accepted() {
        let rgb = gradient(3, 2);
        let png = encode_image(&rgb, 3, 2, ImageFormat::Png, None, None).unwrap();
        let b64 = base64_encode(&png);
        let wrapped: String = b64
            .as_bytes()
            .chunks(20)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&png);
        for input in [
            format!("data:image/png;base64,{b64}"),
            format!("  {b64}\n"),
            format!("data:;base64,{b64}"),
            wrapped,
            b64.trim_end_matches('=').to_owned(),
            url_safe,
        ] {
            let decoded = decode_base64_image(&input, MAX_BYTES, MAX_PIXELS)
                .unwrap_or_else(|e| panic!("{input:.40}: {e}"));
            assert_eq!(decoded.rgb, rgb);
        }
    }

    #[test]
    fn bad_input_gives_clear_errors() {
        let rgb = gradient(16, 16);
        let png = encode_image(&rgb, 16, 16, ImageFormat::Png, None, None).unwrap();
        let b64 = base64_encode(&png);

        let err = decode_base64_image("not base64 at all!", MAX_BYTES, MAX_PIXELS).unwrap_err();
        assert!(matches!(err, CodecError::InvalidBase64(_)), "{err}");
        let err = decode_base64_image("", MAX_BYTES, MAX_PIXELS).unwrap_err();
        assert!(matches!(err, CodecError::InvalidBase64(_)), "{err}");
        let err = decode_base64_image(&format!("data:image/png,{b64}"), MAX_BYTES, MAX_PIXELS)
            .unwrap_err();
        assert!(matches!(err, CodecError::InvalidDataUri(_)), "{err}");
        let err = decode_base64_image(&format!("data:text/plain;base64,{b64}"), MAX_BYTES, 1)
            .unwrap_err();
        assert!(matches!(err, CodecError::InvalidDataUri(_)), "{err}");
        let err = decode_base64_image("data:image/png;base64", MAX_BYTES, 1).unwrap_err();
        assert!(matches!(err, CodecError::InvalidDataUri(_)), "{err}");

        let err = decode_base64_image(&b64, png.len() - 1, MAX_PIXELS).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { .. }), "{err}");
        assert!(decode_base64_image(&b64, png.len(), MAX_PIXELS).is_ok());
        let err = decode_base64_image(&b64, MAX_BYTES, 255).unwrap_err();
        assert_eq!(err, CodecError::TooManyPixels { width: 16, height: 16, max_pixels: 255 });
        assert!(err.to_string().contains("16x16"));

        let gif = base64_encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
        let err = decode_base64_image(&gif, MAX_BYTES, MAX_PIXELS).unwrap_err();
        assert_eq!(err, CodecError::UnsupportedFormat("gif".into()));
        let text = base64_encode(b"hello world, no image here");
        let err = decode_base64_image(&text, MAX_BYTES, MAX_PIXELS).unwrap_err();
        assert!(matches!(err, CodecError::UnsupportedFormat(_)), "{err}");

        let truncated = base64_encode(&png[..png.len() / 2]);
        let err = decode_base64_image(&truncated, MAX_BYTES, MAX_PIXELS).unwrap_err();
        assert!(matches!(err, CodecError::Corrupt(_)), "{err}");

        let err = encode_image(&rgb[1..], 16, 16, ImageFormat::Png, None, None).unwrap_err();
        assert!(matches!(err, CodecError::InvalidInput(_)), "{err}");
        let err = encode_image(&[], 0, 16, ImageFormat::Webp, None, None).unwrap_err();
        assert!(matches!(err, CodecError::InvalidInput(_)), "{err}");
    }

    #[test]
    fn transparency_is_flattened_onto_white() {
        // 2x1 RGBA: an opaque red pixel and a fully transparent "black" one.
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 2, 1);
            encoder.set_color(png::ColorType::Rgba);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[255, 0, 0, 255, 0, 0, 0, 0]).unwrap();
        }
        let decoded = decode_base64_image(&base64_encode(&png), MAX_BYTES, MAX_PIXELS).unwrap();
        assert_eq!(decoded.rgb, vec![255, 0, 0, 255, 255, 255]);
    }
}
