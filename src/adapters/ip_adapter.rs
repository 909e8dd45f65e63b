//! IP-Adapters chosen per request: finding them by name in the configured directories
//! (confined like LoRAs), loading an adapter with the CLIP image encoder that sits beside
//! it, validating the request's `ip_adapters` field (untrusted images: size limits,
//! PNG/JPEG/WebP only, errors naming the field), and turning reference images into the
//! image tokens the UNet's cross-attention attends to.
//!
//! On disk an IP-Adapter is the public IP-Adapter repository's layout: a `.safetensors`
//! weights file (`image_proj.*`, `ip_adapter.N.to_k_ip/to_v_ip.weight`) with an
//! `image_encoder/` folder beside it (`config.json`, `model.safetensors`, optionally
//! `preprocessor_config.json`). A name is the weights file's path below a configured
//! directory without `.safetensors` (`ip-adapter_sd15`, `models/ip-adapter-plus_sd15`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::adapters::directory::{self, EntryKind, FileStamp, ModelCache, NameShape};
use crate::codec;
use crate::error::ValidationError;
use crate::models::clip_vision::{ClipImageProcessor, ClipVisionConfig, ClipVisionModel};
use crate::models::ip_adapter::{join_images, IpAdapterWeights};
/// Largest reference image file accepted (decoded from base64).
const MAX_IMAGE_BYTES: usize = 32 * 1024 * 1024;
/// Largest reference image accepted, in pixels.
const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;

/// At most this many IP-Adapters per request.
pub const MAX_IP_ADAPTERS_PER_REQUEST: usize = 4;
/// At most this many reference images per adapter.
pub const MAX_IMAGES_PER_ADAPTER: usize = 8;
/// Scales outside this range are refused (1 = as trained; ComfyUI's range).
pub const SCALE_RANGE: (f64, f64) = (-1.0, 5.0);
/// The folder beside an adapter's weights that holds its image encoder.
pub const IMAGE_ENCODER_FOLDER: &str = "image_encoder";
/// How deep [`discover`] looks below a directory.
const MAX_LIST_DEPTH: usize = 4;

/// Why an IP-Adapter could not be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IpAdapterError {
    #[error("IP-Adapter name {name:?} is not allowed: {reason}")]
    BadName { name: String, reason: String },
    #[error("no IP-Adapter named {0:?} in the configured ip_adapter_dirs")]
    UnknownName(String),
    #[error("IP-Adapter {path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
}

fn bad_file(path: &Path, reason: impl ToString) -> IpAdapterError {
    IpAdapterError::BadFile { path: path.to_path_buf(), reason: reason.to_string() }
}

/// One reference image, decoded (RGB8, row-major).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReferenceImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// One IP-Adapter of a request, as any dialect or the CLI parsed it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpAdapterParams {
    /// The adapter's name in the configured directories.
    pub model: String,
    /// One reference image (base64 or data URI).
    #[serde(default)]
    pub image: Option<String>,
    /// Several reference images (instead of `image`).
    #[serde(default)]
    pub images: Vec<String>,
    /// Strength; 1 when absent.
    #[serde(default)]
    pub scale: Option<f64>,
}

/// One validated IP-Adapter of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpAdapterChoice {
    /// The name the request gave.
    pub model: String,
    /// The decoded reference images (at least one).
    pub images: Vec<ReferenceImage>,
    /// Multiplies the image attention; 0 turns the adapter off.
    pub scale: f64,
    /// The weights file, once the server or CLI resolved `model` in its directories;
    /// the pipeline resolves unresolved names in its own library.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// Validates the `ip_adapters` field: names, scales, counts, and every image decoded
/// within the limits (PNG, JPEG or WebP); errors name `ip_adapters[i].<field>`.
pub fn validate(params: &[IpAdapterParams]) -> Result<Vec<IpAdapterChoice>, ValidationError> {
    if params.len() > MAX_IP_ADAPTERS_PER_REQUEST {
        return Err(ValidationError::new(
            "ip_adapters",
            format!("at most {MAX_IP_ADAPTERS_PER_REQUEST} IP-Adapters per request"),
        ));
    }
    params
        .iter()
        .enumerate()
        .map(|(i, adapter)| {
            let field = |name: &str| format!("ip_adapters[{i}].{name}");
            check_name(&adapter.model)
                .map_err(|e| ValidationError::new(field("model"), e.to_string()))?;
            let scale = adapter.scale.unwrap_or(1.0);
            let (low, high) = SCALE_RANGE;
            if !scale.is_finite() || !(low..=high).contains(&scale) {
                return Err(ValidationError::new(
                    field("scale"),
                    format!("must be between {low} and {high}, got {scale}"),
                ));
            }
            let sources: Vec<(String, &String)> = match (&adapter.image, adapter.images.is_empty())
            {
                (Some(_), false) => {
                    return Err(ValidationError::new(
                        field("images"),
                        "give either image or images, not both",
                    ))
                }
                (Some(image), true) => vec![(field("image"), image)],
                (None, false) => adapter
                    .images
                    .iter()
                    .enumerate()
                    .map(|(j, image)| (field(&format!("images[{j}]")), image))
                    .collect(),
                (None, true) => {
                    return Err(ValidationError::new(
                        field("image"),
                        "a reference image is required",
                    ))
                }
            };
            if sources.len() > MAX_IMAGES_PER_ADAPTER {
                return Err(ValidationError::new(
                    field("images"),
                    format!("at most {MAX_IMAGES_PER_ADAPTER} images per IP-Adapter"),
                ));
            }
            let images = sources
                .into_iter()
                .map(|(name, data)| {
                    let decoded =
                        codec::decode_base64_image(data, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS)
                            .map_err(|e| ValidationError::new(name, e.to_string()))?;
                    Ok(ReferenceImage {
                        width: decoded.width,
                        height: decoded.height,
                        rgb: decoded.rgb,
                    })
                })
                .collect::<Result<Vec<_>, ValidationError>>()?;
            Ok(IpAdapterChoice { model: adapter.model.clone(), images, scale, path: None })
        })
        .collect()
}

/// Checks that `name` is a relative path of plain components (no traversal).
pub fn check_name(name: &str) -> Result<(), IpAdapterError> {
    let shape = NameShape::RelativePath { absolute_hint: "use a name in an ip_adapter_dir" };
    directory::check_name_shape(name, shape)
        .map_err(|reason| IpAdapterError::BadName { name: name.to_string(), reason })
}

/// True when `path` is an adapter weights file: a `.safetensors` file with an
/// `image_encoder/` folder beside it.
fn is_adapter_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
        && path.is_file()
        && path.parent().is_some_and(|dir| dir.join(IMAGE_ENCODER_FOLDER).is_dir())
}

/// Every IP-Adapter under `dirs` as `(name, weights file)`, sorted by name; the first
/// directory wins when two hold the same name. Only files inside each directory's
/// canonical path count (no symlink escapes); `image_encoder/` folders are not searched.
pub fn discover(dirs: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let classify = |path: &Path, real: &Path| {
        if real.is_dir() {
            if path.file_name().is_some_and(|n| n == IMAGE_ENCODER_FOLDER) {
                EntryKind::Skip
            } else {
                EntryKind::Folder
            }
        } else if is_adapter_file(path) {
            EntryKind::Adapter
        } else {
            EntryKind::Skip
        }
    };
    directory::list_confined(dirs, MAX_LIST_DEPTH, classify)
        .into_iter()
        .map(|listed| (listed.name, listed.real))
        .collect()
}

/// The IP-Adapter directories (and files the CLI registered) names resolve in.
#[derive(Debug, Clone, Default)]
pub struct IpAdapterLibrary {
    dirs: Vec<PathBuf>,
    files: BTreeMap<String, PathBuf>,
}

impl IpAdapterLibrary {
    pub fn new(dirs: Vec<PathBuf>) -> IpAdapterLibrary {
        IpAdapterLibrary { dirs, files: BTreeMap::new() }
    }

    /// Registers one weights file (the CLI's `--ip-adapter FILE:...`) under its stem.
    pub fn add_file(&mut self, path: &Path) -> Result<String, IpAdapterError> {
        if !is_adapter_file(path) {
            return Err(bad_file(
                path,
                "not a .safetensors file with an image_encoder/ folder beside it",
            ));
        }
        let name = directory::stem_name(path).map_err(|reason| bad_file(path, reason))?;
        self.files.insert(name.clone(), path.to_path_buf());
        Ok(name)
    }

    /// The configured directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Every adapter the library can resolve, `(name, weights file)`, sorted by name.
    pub fn list(&self) -> Vec<(String, PathBuf)> {
        let mut all: BTreeMap<String, PathBuf> = discover(&self.dirs).into_iter().collect();
        for (name, path) in &self.files {
            all.entry(name.clone()).or_insert(path.clone());
        }
        all.into_iter().collect()
    }

    /// The weights file `name` stands for, confined to its directory.
    pub fn resolve(&self, name: &str) -> Result<PathBuf, IpAdapterError> {
        if let Some(path) = self.files.get(name) {
            return Ok(path.clone());
        }
        check_name(name)?;
        let candidates = [directory::safetensors_file_name(name)];
        let escaped = || IpAdapterError::BadName {
            name: name.to_string(),
            reason: "it (or its image_encoder) links outside its directory, or it has no \
                     image_encoder/ folder beside it"
                .into(),
        };
        let found = directory::find_confined(&self.dirs, &candidates, Path::is_file)
            .map_err(|directory::Escaped| escaped())?
            .ok_or_else(|| IpAdapterError::UnknownName(name.to_string()))?;
        let encoder = found.candidate.parent().map(|p| p.join(IMAGE_ENCODER_FOLDER));
        let encoder_inside =
            encoder.and_then(|e| e.canonicalize().ok()).is_some_and(|e| e.starts_with(&found.root));
        if !encoder_inside {
            return Err(escaped());
        }
        Ok(found.real)
    }
}

/// A CLIP image encoder with its preprocessing, from an adapter's `image_encoder/`
/// folder. Adapters in one folder share it (the public repository has one per family).
#[derive(Debug)]
pub struct ImageEncoder {
    pub model: ClipVisionModel,
    pub processor: ClipImageProcessor,
}

impl ImageEncoder {
    /// Loads `folder` (`config.json`, `model.safetensors`, optionally
    /// `preprocessor_config.json`; without it, what diffusers builds for the encoder's
    /// `image_size`).
    pub fn load(folder: &Path, device: &Device, dtype: DType) -> Result<Self, IpAdapterError> {
        let config_path = folder.join("config.json");
        let config = ClipVisionConfig::from_json(&read_json(&config_path)?)
            .map_err(|e| bad_file(&config_path, e))?;
        let weights_path = folder.join("model.safetensors");
        let tensors = read_tensors(&weights_path, device)?;
        let model = ClipVisionModel::new(VarBuilder::from_tensors(tensors, dtype, device), &config)
            .map_err(|e| bad_file(&weights_path, e))?;
        let processor_path = folder.join("preprocessor_config.json");
        let processor: ClipImageProcessor = if processor_path.is_file() {
            serde_json::from_value(read_json(&processor_path)?)
                .map_err(|e| bad_file(&processor_path, e))?
        } else {
            ClipImageProcessor::for_image_size(config.image_size)
        };
        processor.check_supported().map_err(|e| bad_file(&processor_path, e))?;
        Ok(ImageEncoder { model, processor })
    }
}

/// A loaded IP-Adapter: projection and attention weights with their image encoder.
#[derive(Debug)]
pub struct IpAdapter {
    pub weights: IpAdapterWeights,
    pub encoder: Arc<ImageEncoder>,
}

fn read_json(path: &Path) -> Result<serde_json::Value, IpAdapterError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| bad_file(path, e))
}

fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, IpAdapterError> {
    candle_core::safetensors::load(path, device).map_err(|e| bad_file(path, e))
}

/// The `image_encoder/` folder beside the weights file at `path`.
fn encoder_folder(path: &Path) -> Result<PathBuf, IpAdapterError> {
    path.parent()
        .map(|p| p.join(IMAGE_ENCODER_FOLDER))
        .ok_or_else(|| bad_file(path, "no parent folder"))
}

impl IpAdapter {
    /// Loads the weights file at `path` and the image encoder beside it.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<IpAdapter, IpAdapterError> {
        let encoder = Arc::new(ImageEncoder::load(&encoder_folder(path)?, device, dtype)?);
        IpAdapter::load_with_encoder(path, encoder, device, dtype)
    }

    /// Loads the weights file at `path` for an already loaded `encoder`.
    pub fn load_with_encoder(
        path: &Path,
        encoder: Arc<ImageEncoder>,
        device: &Device,
        dtype: DType,
    ) -> Result<IpAdapter, IpAdapterError> {
        let tensors = read_tensors(path, device)?;
        let builder = VarBuilder::from_tensors(tensors.clone(), dtype, device);
        let config = encoder.model.config();
        let weights = IpAdapterWeights::from_tensors(
            &tensors,
            builder,
            config.projection_dim,
            config.hidden_size,
        )
        .map_err(|e| bad_file(path, e))?;
        Ok(IpAdapter { weights, encoder })
    }

    /// The encoder's input for `images`: `[images, 3, H, W]`.
    pub fn pixel_values(&self, images: &[ReferenceImage]) -> candle_core::Result<Tensor> {
        let processor = &self.encoder.processor;
        let (height, width) = processor.output_size();
        let mut values = Vec::with_capacity(images.len() * 3 * height * width);
        for image in images {
            values.extend(processor.preprocess(
                &image.rgb,
                image.width as usize,
                image.height as usize,
            ));
        }
        Tensor::from_vec(values, (images.len(), 3, height, width), self.encoder.model.device())
    }

    /// The image tokens of `images` and of the unconditional half, each `[1, images ×
    /// tokens, cross_attention_dim]` (several images' tokens side by side, as diffusers
    /// passes a list of images for one adapter). The unconditional tokens are what
    /// diffusers uses: the projection of zero embeddings (base) or of the encoder's
    /// hidden states for an all-zero input (plus).
    pub fn image_tokens(&self, images: &[ReferenceImage]) -> candle_core::Result<(Tensor, Tensor)> {
        let pixels = self.pixel_values(images)?;
        let projection = &self.weights.projection;
        let encoder = &self.encoder.model;
        let (conditional, unconditional) = if projection.reads_hidden_states() {
            let hidden = encoder.forward(&pixels)?.penultimate_hidden_state;
            let zero = encoder.forward(&pixels.zeros_like()?)?.penultimate_hidden_state;
            (projection.forward(&hidden)?, projection.forward(&zero)?)
        } else {
            let embeds = encoder.forward(&pixels)?.image_embeds;
            (projection.forward(&embeds)?, projection.forward(&embeds.zeros_like()?)?)
        };
        Ok((join_images(&conditional)?, join_images(&unconditional)?))
    }
}

fn stamp(path: &Path) -> Result<FileStamp, IpAdapterError> {
    directory::file_stamp(path).map_err(|e| bad_file(path, e))
}

/// Loaded adapters and image encoders kept per pipeline (they live on its device):
/// the last 4 adapters and the last 2 encoders; adapters of one folder share its
/// encoder, and a changed file is reloaded.
#[derive(Debug)]
pub struct IpAdapterCache {
    adapters: ModelCache<PathBuf, FileStamp, IpAdapter>,
    encoders: ModelCache<PathBuf, FileStamp, ImageEncoder>,
}

impl Default for IpAdapterCache {
    fn default() -> Self {
        IpAdapterCache {
            adapters: ModelCache::with_capacity(4),
            encoders: ModelCache::with_capacity(2),
        }
    }
}

impl IpAdapterCache {
    /// The adapter at `path`, loaded onto `device` in `dtype` unless cached.
    pub fn load(
        &self,
        path: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Arc<IpAdapter>, IpAdapterError> {
        let adapter_stamp = stamp(path)?;
        if let Some(adapter) = self.adapters.get(&path.to_path_buf(), &adapter_stamp) {
            return Ok(adapter);
        }
        let folder = encoder_folder(path)?;
        let encoder_stamp = stamp(&folder.join("model.safetensors"))?;
        let encoder = self.encoders.get_or_load(folder.clone(), encoder_stamp, || {
            ImageEncoder::load(&folder, device, dtype)
        })?;
        self.adapters.get_or_load(path.to_path_buf(), adapter_stamp, || {
            IpAdapter::load_with_encoder(path, encoder, device, dtype)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_and_absolute_names_are_refused() {
        for name in ["../x", "a/../../x", "/etc/passwd", "..", "./x", "a\\b", "C:x", ""] {
            assert!(check_name(name).is_err(), "{name:?} was accepted");
        }
        for name in ["ip-adapter_sd15", "models/ip-adapter-plus_sd15"] {
            assert!(check_name(name).is_ok(), "{name:?} was refused");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let params = |image: Option<&str>, images: Vec<&str>, scale| IpAdapterParams {
            model: "x".into(),
            image: image.map(String::from),
            images: images.into_iter().map(String::from).collect(),
            scale,
        };
        let err = validate(&[params(Some("not an image"), vec![], None)]).unwrap_err();
        assert_eq!(err.field, "ip_adapters[0].image");
        let err = validate(&[params(None, vec![], None)]).unwrap_err();
        assert_eq!(err.field, "ip_adapters[0].image");
        let err = validate(&[params(Some("a"), vec!["b"], None)]).unwrap_err();
        assert_eq!(err.field, "ip_adapters[0].images");
        let err = validate(&[params(None, vec!["zz"], Some(9.0))]).unwrap_err();
        assert_eq!(err.field, "ip_adapters[0].scale");
        let good = codec::base64_encode(&tiny_png());
        let err =
            validate(&[params(Some(&good), vec![], None), params(None, vec![&good, "?"], None)])
                .unwrap_err();
        assert_eq!(err.field, "ip_adapters[1].images[1]");
        let ok = validate(&[params(None, vec![&good, &good], Some(0.5))]).unwrap();
        assert_eq!(ok[0].images.len(), 2);
        assert_eq!(ok[0].scale, 0.5);
    }

    fn tiny_png() -> Vec<u8> {
        codec::encode_image(&[10u8; 4 * 4 * 3], 4, 4, codec::ImageFormat::Png, None, None)
            .expect("encodes")
    }

    #[test]
    fn discovery_needs_an_image_encoder_beside_the_file() {
        let root = std::env::temp_dir().join(format!("sdserve-ipa-{}", std::process::id()));
        let models = root.join("models");
        std::fs::create_dir_all(models.join(IMAGE_ENCODER_FOLDER)).unwrap();
        std::fs::write(models.join("ip-adapter_sd15.safetensors"), b"x").unwrap();
        std::fs::write(models.join(IMAGE_ENCODER_FOLDER).join("model.safetensors"), b"x").unwrap();
        std::fs::write(root.join("lonely.safetensors"), b"x").unwrap();
        let found = discover(std::slice::from_ref(&root));
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["models/ip-adapter_sd15"]);
        let library = IpAdapterLibrary::new(vec![root.clone()]);
        assert!(library.resolve("models/ip-adapter_sd15").is_ok());
        assert!(matches!(library.resolve("lonely"), Err(IpAdapterError::BadName { .. })));
        assert!(matches!(library.resolve("missing"), Err(IpAdapterError::UnknownName(_))));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
