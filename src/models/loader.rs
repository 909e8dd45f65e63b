//! Loading the networks of a model from the layouts users have on disk: a diffusers
//! folder (`model_index.json` + one folder per component) or a single-file checkpoint
//! (see [`super::single_file`]). Pickle files are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::clip::{ClipTextConfig, ClipTextModel};
use super::single_file;
use super::unet::{UNet, UNetConfig};
use super::vae::{AutoencoderKl, VaeConfig};
use super::ModelFamily;
use crate::error::ModelError;

/// Where a component's tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// A diffusers `tokenizer/` folder.
    Folder(PathBuf),
    /// The CLIP BPE files bundled with sdserve, padding with this token (single files
    /// carry no tokenizer).
    Bundled { pad_token: String },
}

/// The configs of a model, read without its weights.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub family: ModelFamily,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    /// The scheduler config as saved (parsed by the samplers).
    pub scheduler: Value,
    /// SDXL: an empty negative prompt becomes zero embeddings.
    pub force_zeros_for_empty_prompt: bool,
    /// The image size the model was trained at (UNet sample size × VAE scale factor).
    pub native_size: u32,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Folder { root: PathBuf, text_encoders: Vec<(String, ClipTextConfig)> },
    SingleFile { path: PathBuf, text_encoders: Vec<(String, ClipTextConfig)> },
}

/// The tensors the UNet and the text encoders were built from, by diffusers name, so
/// adapters can rebuild those networks with some weights replaced. The networks share
/// storage with these maps: keeping them costs no memory.
#[derive(Debug, Clone)]
pub struct NetworkWeights {
    pub unet: HashMap<String, Tensor>,
    /// The UNet's diffusers `config.json` (LDM-style adapter names are derived from it).
    pub unet_config: Value,
    /// ("text_encoder" | "text_encoder_2", tensors).
    pub text_encoders: Vec<(String, HashMap<String, Tensor>)>,
}

impl NetworkWeights {
    /// The tensors of component `id` ("unet", "text_encoder", "text_encoder_2").
    pub fn tensors(&self, id: &str) -> Option<&HashMap<String, Tensor>> {
        if id == "unet" {
            return Some(&self.unet);
        }
        self.text_encoders.iter().find(|(name, _)| name == id).map(|(_, tensors)| tensors)
    }
}

/// The loaded networks of a model.
pub struct LoadedModel {
    pub layout: ModelLayout,
    pub unet: UNet,
    pub vae: AutoencoderKl,
    /// SD 1.x / 2.x / SDXL: `text_encoder`; absent for the SDXL refiner.
    pub text_encoder: Option<ClipTextModel>,
    /// SDXL (base and refiner): `text_encoder_2`, with projection.
    pub text_encoder_2: Option<ClipTextModel>,
    pub tokenizer: Option<TokenizerSource>,
    pub tokenizer_2: Option<TokenizerSource>,
    /// The weights of the UNet and text encoders, for rebuilding them with adapters.
    pub weights: NetworkWeights,
}

fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref(),
        Some("ckpt" | "bin" | "pt" | "pth" | "pkl")
    )
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::BadConfig { path: path.to_path_buf(), reason: e.to_string() })
}

fn parse_config<T: DeserializeOwned>(
    value: &Value,
    path: &Path,
    component: &str,
) -> Result<T, ModelError> {
    serde_json::from_value(value.clone()).map_err(|e| ModelError::BadConfig {
        path: path.to_path_buf(),
        reason: format!("{component}: {e}"),
    })
}

/// Infers the family from the configs of a folder or sidecar.
fn family_of(
    unet: &UNetConfig,
    has_text_encoder: bool,
    text_encoder: Option<&ClipTextConfig>,
) -> ModelFamily {
    if unet.uses_text_time() {
        if has_text_encoder {
            ModelFamily::Sdxl
        } else {
            ModelFamily::SdxlRefiner
        }
    } else if text_encoder.is_some_and(|c| c.hidden_act == super::clip::Activation::Gelu) {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    }
}

fn native_size(unet: &UNetConfig, vae: &VaeConfig) -> u32 {
    let scale = 1usize << vae.block_out_channels.len().saturating_sub(1);
    (unet.sample_size * scale) as u32
}

/// Reads the configs of the model at `path` (a diffusers folder or a `.safetensors`
/// single file with its known family or a sidecar) without loading weights.
pub fn read_layout(path: &Path) -> Result<ModelLayout, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        return read_folder_layout(path);
    }
    if is_pickle(path) {
        return Err(ModelError::PickleRefused(path.to_path_buf()));
    }
    let (family, configs) = single_file::read_configs(path)?;
    let get = |name: &str| {
        configs.get(name).ok_or_else(|| ModelError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("no {name} config for this checkpoint"),
        })
    };
    let unet: UNetConfig = parse_config(get("unet")?, path, "unet")?;
    let vae: VaeConfig = parse_config(get("vae")?, path, "vae")?;
    let mut text_encoders = Vec::new();
    for name in ["text_encoder", "text_encoder_2"] {
        if let Some(value) = configs.get(name) {
            text_encoders.push((name.to_string(), parse_config(value, path, name)?));
        }
    }
    let scheduler = configs.get("scheduler").cloned().unwrap_or(Value::Null);
    let native_size = native_size(&unet, &vae);
    Ok(ModelLayout {
        family,
        unet,
        vae,
        scheduler,
        force_zeros_for_empty_prompt: matches!(
            family,
            ModelFamily::Sdxl | ModelFamily::SdxlRefiner
        ),
        native_size,
        source: Source::SingleFile { path: path.to_path_buf(), text_encoders },
    })
}

fn read_folder_layout(root: &Path) -> Result<ModelLayout, ModelError> {
    let index_path = root.join("model_index.json");
    if !index_path.exists() {
        return Err(ModelError::UnknownLayout {
            path: root.to_path_buf(),
            reason: "a model folder needs a model_index.json (diffusers layout)".into(),
        });
    }
    let index: Value = read_json(&index_path)?;
    // A component is present when model_index.json names a class for it.
    let present = |name: &str| {
        index.get(name).and_then(|v| v.as_array()).is_some_and(|v| v.iter().all(|x| !x.is_null()))
    };
    for required in ["unet", "vae"] {
        if !present(required) {
            return Err(ModelError::UnknownLayout {
                path: root.to_path_buf(),
                reason: format!("model_index.json has no {required} component"),
            });
        }
    }
    let unet: UNetConfig = read_json(&root.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&root.join("vae/config.json"))?;
    let mut text_encoders = Vec::new();
    for name in ["text_encoder", "text_encoder_2"] {
        if present(name) {
            let config: ClipTextConfig = read_json(&root.join(name).join("config.json"))?;
            text_encoders.push((name.to_string(), config));
        }
    }
    if text_encoders.is_empty() {
        return Err(ModelError::UnknownLayout {
            path: root.to_path_buf(),
            reason: "model_index.json names no text encoder".into(),
        });
    }
    let scheduler_path = root.join("scheduler/scheduler_config.json");
    let scheduler = if scheduler_path.exists() { read_json(&scheduler_path)? } else { Value::Null };
    let first_encoder = text_encoders.iter().find(|(n, _)| n == "text_encoder").map(|(_, c)| c);
    let family = family_of(&unet, present("text_encoder"), first_encoder);
    let force_zeros = index
        .get("force_zeros_for_empty_prompt")
        .and_then(Value::as_bool)
        .unwrap_or(matches!(family, ModelFamily::Sdxl | ModelFamily::SdxlRefiner));
    let native_size = native_size(&unet, &vae);
    Ok(ModelLayout {
        family,
        unet,
        vae,
        scheduler,
        force_zeros_for_empty_prompt: force_zeros,
        native_size,
        source: Source::Folder { root: root.to_path_buf(), text_encoders },
    })
}

/// The weight files of one diffusers component, preferring the variant that matches
/// `dtype` (`*.fp16.safetensors` for f16) and falling back to the other.
fn component_weights(folder: &Path, stem: &str, dtype: DType) -> Result<Vec<PathBuf>, ModelError> {
    let plain = folder.join(format!("{stem}.safetensors"));
    let half = folder.join(format!("{stem}.fp16.safetensors"));
    let index = folder.join(format!("{stem}.safetensors.index.json"));
    let preferred = if dtype == DType::F16 { [&half, &plain] } else { [&plain, &half] };
    for candidate in preferred {
        if candidate.exists() {
            return Ok(vec![candidate.clone()]);
        }
    }
    if index.exists() {
        let index_json: Value = read_json(&index)?;
        let mut files: Vec<PathBuf> = index_json
            .get("weight_map")
            .and_then(Value::as_object)
            .map(|map| map.values().filter_map(Value::as_str).map(|f| folder.join(f)).collect())
            .unwrap_or_default();
        files.sort();
        files.dedup();
        if !files.is_empty() {
            return Ok(files);
        }
    }
    let pickle = folder.join(format!("{stem}.bin"));
    if pickle.exists() {
        return Err(ModelError::PickleRefused(pickle));
    }
    Err(ModelError::NotFound(plain))
}

/// Memory-maps safetensors files, turning a corrupt or truncated file into a clear error.
fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, ModelError> {
    for file in files {
        single_file::check_safetensors(file)?;
    }
    // Safety: the files are memory-mapped read-only; sdserve never writes model files,
    // and users are told not to modify weights while the service runs.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
        ModelError::InvalidSafetensors { path: files[0].clone(), reason: e.to_string() }
    })
}

/// Reads every tensor of `files` into `dtype` on `device`, as the memory-mapped
/// `VarBuilder` would (load, then convert), keeping them by name.
fn load_tensors(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    for file in files {
        single_file::check_safetensors(file)?;
    }
    let invalid = |e: candle_core::Error| ModelError::InvalidSafetensors {
        path: files[0].clone(),
        reason: e.to_string(),
    };
    // Safety: as in `mmap_var_builder`, the files are mapped read-only.
    let mapped =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(invalid)?;
    let mut tensors = HashMap::new();
    for (name, _) in mapped.tensors() {
        let tensor = mapped.load(&name, device).and_then(|t| t.to_dtype(dtype)).map_err(invalid)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

fn weights_error(component: &str) -> impl Fn(candle_core::Error) -> ModelError + '_ {
    move |source| ModelError::Weights {
        component: component.to_string(),
        source: crate::error::without_backtrace(source),
    }
}

/// Older diffusers VAEs name the mid-block attention `query/key/value/proj_attn`.
fn vae_var_builder(vb: VarBuilder<'static>) -> VarBuilder<'static> {
    if vb.contains_tensor("encoder.mid_block.attentions.0.query.weight")
        || vb.contains_tensor("decoder.mid_block.attentions.0.query.weight")
    {
        vb.rename_f(|name: &str| {
            name.replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.")
        })
    } else {
        vb
    }
}

/// The VAE's dtype: f16 VAEs overflow, so `force_upcast` keeps them in f32.
fn vae_dtype(config: &VaeConfig, dtype: DType) -> DType {
    if dtype == DType::F16 && config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

/// Loads every network of the model at `path` on `device` in `dtype`.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel, ModelError> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(ModelError::BadDevice(
            "bf16 is not available on the CPU (candle's CPU backend has no bf16 matmul); \
             use f32 or f16 on the CPU, bf16 on a GPU"
                .into(),
        ));
    }
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::BadDevice(format!(
            "dtype {dtype:?} is not a compute dtype; use f32, f16 or bf16"
        )));
    }
    let layout = read_layout(path)?;
    let tokenizer_pad = |name: &str| -> TokenizerSource {
        // SD 1.x's tokenizer pads with <|endoftext|>; OpenCLIP-based ones (SD 2.x and
        // SDXL's second encoder) with "!".
        let open_clip = name == "text_encoder_2" || layout.family == ModelFamily::Sd2;
        TokenizerSource::Bundled {
            pad_token: if open_clip { "!" } else { "<|endoftext|>" }.to_string(),
        }
    };
    match layout.source.clone() {
        Source::Folder { root, text_encoders } => {
            let unet_tensors = load_tensors(
                &component_weights(&root.join("unet"), "diffusion_pytorch_model", dtype)?,
                dtype,
                device,
            )?;
            let unet_vb = VarBuilder::from_tensors(unet_tensors.clone(), dtype, device);
            let unet = UNet::new(unet_vb, &layout.unet).map_err(weights_error("unet"))?;
            let unet_config: Value = read_json(&root.join("unet/config.json"))?;
            let mut encoder_tensors = Vec::new();
            let vdtype = vae_dtype(&layout.vae, dtype);
            let vae_vb = mmap_var_builder(
                &component_weights(&root.join("vae"), "diffusion_pytorch_model", dtype)?,
                vdtype,
                device,
            )?;
            let vae = AutoencoderKl::new(vae_var_builder(vae_vb), &layout.vae)
                .map_err(weights_error("vae"))?;
            let mut encoders: HashMap<String, ClipTextModel> = HashMap::new();
            for (name, config) in &text_encoders {
                let tensors = load_tensors(
                    &component_weights(&root.join(name), "model", dtype)?,
                    dtype,
                    device,
                )?;
                let vb = VarBuilder::from_tensors(tensors.clone(), dtype, device);
                encoder_tensors.push((name.clone(), tensors));
                let model = ClipTextModel::new(vb, config, name == "text_encoder_2")
                    .map_err(weights_error(name))?;
                encoders.insert(name.clone(), model);
            }
            let tokenizer_for = |encoder: &str, folder: &str| {
                encoders.contains_key(encoder).then(|| {
                    let dir = root.join(folder);
                    if dir.is_dir() {
                        TokenizerSource::Folder(dir)
                    } else {
                        tokenizer_pad(encoder)
                    }
                })
            };
            let tokenizer = tokenizer_for("text_encoder", "tokenizer");
            let tokenizer_2 = tokenizer_for("text_encoder_2", "tokenizer_2");
            Ok(LoadedModel {
                text_encoder: encoders.remove("text_encoder"),
                text_encoder_2: encoders.remove("text_encoder_2"),
                layout,
                unet,
                vae,
                tokenizer,
                tokenizer_2,
                weights: NetworkWeights {
                    unet: unet_tensors,
                    unet_config,
                    text_encoders: encoder_tensors,
                },
            })
        }
        Source::SingleFile { path, text_encoders } => {
            let mut converted = single_file::load_single_file(&path, device, dtype)?;
            let unet_config = converted.configs.get("unet").cloned().unwrap_or(Value::Null);
            let mut kept: Vec<(String, HashMap<String, Tensor>)> = Vec::new();
            let mut take = |name: &str,
                            component_dtype: DType|
             -> Result<VarBuilder<'static>, ModelError> {
                let tensors: HashMap<String, Tensor> =
                    converted.components.remove(name).ok_or_else(|| ModelError::UnknownLayout {
                        path: path.clone(),
                        reason: format!("checkpoint has no {name} weights"),
                    })?;
                if name != "vae" {
                    kept.push((name.to_string(), tensors.clone()));
                }
                Ok(VarBuilder::from_tensors(tensors, component_dtype, device))
            };
            let unet =
                UNet::new(take("unet", dtype)?, &layout.unet).map_err(weights_error("unet"))?;
            let vae_vb = take("vae", vae_dtype(&layout.vae, dtype))?;
            let vae = AutoencoderKl::new(vae_vb, &layout.vae).map_err(weights_error("vae"))?;
            let mut text_encoder = None;
            let mut text_encoder_2 = None;
            for (name, config) in &text_encoders {
                let model =
                    ClipTextModel::new(take(name, dtype)?, config, name == "text_encoder_2")
                        .map_err(weights_error(name))?;
                if name == "text_encoder" {
                    text_encoder = Some(model);
                } else {
                    text_encoder_2 = Some(model);
                }
            }
            let tokenizer = text_encoder.as_ref().map(|_| tokenizer_pad("text_encoder"));
            let tokenizer_2 = text_encoder_2.as_ref().map(|_| tokenizer_pad("text_encoder_2"));
            let unet_tensors = kept.remove(0).1;
            Ok(LoadedModel {
                weights: NetworkWeights { unet: unet_tensors, unet_config, text_encoders: kept },
                layout,
                unet,
                vae,
                text_encoder,
                text_encoder_2,
                tokenizer,
                tokenizer_2,
            })
        }
    }
}

/// Loads a ControlNet from a diffusers folder (`config.json` +
/// `diffusion_pytorch_model[.fp16].safetensors`) or a single `.safetensors` file in the
/// original `control_model.*` layout (see [`single_file::load_controlnet`]).
pub fn load_controlnet(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<super::controlnet::ControlNet, ModelError> {
    use super::controlnet::{ControlNet, ControlNetConfig};
    if is_pickle(path) {
        return Err(ModelError::PickleRefused(path.to_path_buf()));
    }
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    let (config_value, config_path, vb) = if path.is_dir() {
        let config_path = path.join("config.json");
        let value: Value = read_json(&config_path)?;
        let files = component_weights(path, "diffusion_pytorch_model", dtype)?;
        (value, config_path, mmap_var_builder(&files, dtype, device)?)
    } else {
        let (value, tensors) = single_file::load_controlnet(path, device, dtype)?;
        let config_path = single_file::sidecar_path(path);
        (value, config_path, VarBuilder::from_tensors(tensors, dtype, device))
    };
    let config: ControlNetConfig = parse_config(&config_value, &config_path, "controlnet")?;
    config
        .check_supported()
        .map_err(|reason| ModelError::BadConfig { path: config_path.clone(), reason })?;
    ControlNet::new(vb, &config).map_err(weights_error("controlnet"))
}
