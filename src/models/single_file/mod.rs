//! Single-file Stable Diffusion checkpoints in the original (LDM / AUTOMATIC1111 /
//! civitai) key layout: family detection, the diffusers configs they are built with, and
//! conversion of their tensors to per-component diffusers names.
//!
//! Everything that can go wrong with a file (truncation, unknown layout, configs that
//! do not fit the weights) is found from the header before any weight is read.
//!
//! Configs: the real families use their published diffusers configs (embedded from
//! `assets/configs/`). SD 2.x has two models with identical tensors (768px v-prediction
//! and 512px epsilon base); see [`detect::Sd2Variant`] for how they are told apart. A
//! sidecar `<stem>.config.json` beside the checkpoint,
//! `{"family": "sd1"|"sd2"|"sdxl"|"sdxl_refiner", "unet": {...}, "vae": {...},
//! "text_encoder": {...}, "text_encoder_2": {...}, "scheduler": {...}}`, replaces the
//! embedded config of each component it names (so tiny test models and fine-tunes with
//! other shapes load) and its `family` overrides detection.

mod clip_keys;
mod configs;
mod detect;
mod fields;
pub(crate) mod header;
mod plan;
mod unet_keys;
mod vae_keys;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::ModelError;
use crate::models::ModelFamily;

use configs::{components_of, read_sidecar, KnownModel, Sidecar};
use detect::{
    sd2_variant, Sd2Variant, REFINER_OPEN_CLIP_PREFIX, SD1_CLIP_PREFIX, SD2_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX,
};
use fields::Fields;
use header::{read_header, Header, MappedFile};
use plan::Plan;

/// A single-file checkpoint converted to diffusers names and configs.
pub struct ConvertedCheckpoint {
    pub family: ModelFamily,
    /// "unet", "vae", "text_encoder", "text_encoder_2" -> tensors keyed by diffusers names
    pub components: BTreeMap<String, HashMap<String, Tensor>>,
    /// "unet", "vae", "text_encoder", "text_encoder_2", "scheduler" -> the diffusers config.json dict
    pub configs: BTreeMap<String, Value>,
}

/// Loads a single-file `.safetensors` checkpoint, converting every tensor the diffusers
/// components need to `dtype` on `device`. Pickles are refused; EMA copies and other
/// unused tensors are skipped.
pub fn load_single_file(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<ConvertedCheckpoint, ModelError> {
    let file = MappedFile::open(path)?;
    let resolved = resolve(path, file.header(), || global_step(&file))?;
    let mut components = BTreeMap::new();
    for (component, plan) in &resolved.plans {
        let tensors =
            materialise(&file, plan, device, dtype).map_err(|error| attribute(component, error))?;
        components.insert(component.clone(), tensors);
    }
    Ok(ConvertedCheckpoint { family: resolved.family, components, configs: resolved.configs })
}

/// The original LDM path of each diffusers UNet module in `modules` that has one, for
/// adapters trained on the LDM model (kohya's SDXL LoRAs); `config` is the UNet's
/// diffusers config. Returns (LDM path, diffusers path) pairs, both without `.weight`.
pub fn ldm_unet_aliases(
    config: &Value,
    modules: &[String],
) -> Result<Vec<(String, String)>, String> {
    unet_keys::ldm_aliases(config, modules)
}

/// The family of a checkpoint, from its header's tensor names and shapes only.
pub fn detect_family(path: &Path) -> Result<ModelFamily, ModelError> {
    let header = read_header(path)?;
    detect::detect(&header)
        .map_err(|reason| ModelError::UnknownLayout { path: path.to_path_buf(), reason })
}

/// The family and diffusers configs of a checkpoint, from its header and sidecar, without
/// reading weights. The configs are checked against the header's shapes.
pub fn read_configs(path: &Path) -> Result<(ModelFamily, BTreeMap<String, Value>), ModelError> {
    let header = read_header(path)?;
    let resolved = resolve(path, &header, || {
        // Only SD 2.x files that carry a `global_step` need one scalar read.
        MappedFile::open(path).ok().and_then(|file| global_step(&file))
    })?;
    Ok((resolved.family, resolved.configs))
}

struct Resolved {
    family: ModelFamily,
    configs: BTreeMap<String, Value>,
    plans: BTreeMap<String, Plan>,
}

fn global_step(file: &MappedFile) -> Option<i64> {
    file.header().contains("global_step").then(|| file.read_scalar_i64("global_step")).flatten()
}

fn resolve(
    path: &Path,
    header: &Header,
    global_step: impl FnOnce() -> Option<i64>,
) -> Result<Resolved, ModelError> {
    let unknown = |reason: String| ModelError::UnknownLayout { path: path.to_path_buf(), reason };
    let sidecar = read_sidecar(path)?;
    let detected = detect::detect(header);
    let family = match (&sidecar, detected) {
        (Some(Sidecar { family: Some(declared), path: sidecar_path, .. }), Ok(found))
            if *declared != found =>
        {
            return Err(ModelError::BadConfig {
                path: sidecar_path.clone(),
                reason: format!(
                    "family is \"{}\" but the checkpoint's text encoders have the {} layout",
                    declared.id(),
                    found.id()
                ),
            });
        }
        (_, Ok(found)) => found,
        (_, Err(reason)) => return Err(unknown(reason)),
    };
    let sd2 = if family == ModelFamily::Sd2 {
        sd2_variant(header, if header.contains("global_step") { global_step() } else { None })
    } else {
        Sd2Variant::V768
    };
    let known = KnownModel::for_family(family, sd2);
    let mut configs = known.configs();
    if let Some(sidecar) = &sidecar {
        for (component, config) in &sidecar.components {
            if components_of(family).contains(&component.as_str()) {
                configs.insert(component.clone(), config.clone());
            }
        }
    }
    let mut plans = BTreeMap::new();
    for &component in components_of(family) {
        if component == "scheduler" {
            continue;
        }
        let config = &configs[component];
        let plan = component_plan(header, family, component, config)
            .map_err(|reason| explain_mismatch(path, sidecar.as_ref(), known, component, reason))?;
        plans.insert(component.to_string(), plan);
    }
    Ok(Resolved { family, configs, plans })
}

fn component_plan(
    header: &Header,
    family: ModelFamily,
    component: &str,
    config: &Value,
) -> Result<Plan, String> {
    match (component, family) {
        ("unet", _) => unet_keys::unet_plan(header, config),
        ("vae", _) => vae_keys::vae_plan(header, config),
        ("text_encoder", ModelFamily::Sd1) => {
            clip_keys::hf_clip_plan(header, SD1_CLIP_PREFIX, component, config)
        }
        ("text_encoder", ModelFamily::Sd2) => {
            clip_keys::open_clip_plan(header, SD2_OPEN_CLIP_PREFIX, component, config, false)
        }
        ("text_encoder", ModelFamily::Sdxl) => {
            clip_keys::hf_clip_plan(header, SDXL_CLIP_PREFIX, component, config)
        }
        ("text_encoder_2", ModelFamily::Sdxl) => {
            clip_keys::open_clip_plan(header, SDXL_OPEN_CLIP_PREFIX, component, config, true)
        }
        ("text_encoder_2", ModelFamily::SdxlRefiner) => {
            clip_keys::open_clip_plan(header, REFINER_OPEN_CLIP_PREFIX, component, config, true)
        }
        _ => unreachable!("components_of lists only these pairs; this is a bug"),
    }
}

/// A plan failure means the weights and the config disagree: with a sidecar, the sidecar
/// is wrong; without one, the file is not the standard model we assumed.
fn explain_mismatch(
    path: &Path,
    sidecar: Option<&Sidecar>,
    known: KnownModel,
    component: &str,
    reason: String,
) -> ModelError {
    match sidecar {
        Some(sidecar) if sidecar.components.contains_key(component) => ModelError::BadConfig {
            path: sidecar.path.clone(),
            reason: format!("the {component} config does not fit the checkpoint: {reason}"),
        },
        _ => ModelError::UnknownLayout {
            path: path.to_path_buf(),
            reason: format!(
                "{component}: {reason}. The weights do not fit the built-in {component} config \
                 of {}; if this is a model with other dimensions, a sidecar {} with its \
                 diffusers configs is needed",
                known.repo(),
                sidecar_path(path).display()
            ),
        },
    }
}

fn materialise(
    file: &MappedFile,
    plan: &Plan,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let mut tensors = HashMap::with_capacity(plan.len());
    // Fused OpenCLIP q/k/v feed three targets; read such a tensor once and keep it until
    // its last use.
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for source in plan.values() {
        *uses.entry(source.key.as_str()).or_default() += 1;
    }
    let mut shared: HashMap<&str, Tensor> = HashMap::new();
    for (name, source) in plan {
        let key = source.key.as_str();
        let remaining = uses.get_mut(key).expect("counted above; this is a bug");
        *remaining -= 1;
        let stored = match shared.get(key) {
            Some(tensor) => tensor.clone(),
            None => file.load(key)?,
        };
        if *remaining == 0 {
            shared.remove(key);
        } else {
            shared.insert(key, stored.clone());
        }
        let tensor = plan::apply(stored, source.reshape)
            .and_then(|tensor| tensor.to_dtype(dtype))
            .and_then(|tensor| tensor.to_device(device))
            .map_err(|source_error| {
                candle_core::Error::Msg(format!("{} -> {name}: {source_error}", source.key))
            })?;
        tensors.insert(name.clone(), tensor);
    }
    Ok(tensors)
}

fn attribute(component: &str, error: ModelError) -> ModelError {
    match error {
        ModelError::Candle(source) => {
            ModelError::Weights { component: component.to_string(), source }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;

/// Checks that a safetensors file's header is complete and every tensor's data lies
/// inside the file, so a corrupt or truncated file gives an error instead of a crash.
/// Used for diffusers component files too.
pub fn check_safetensors(path: &Path) -> Result<(), ModelError> {
    header::read_header(path).map(|_| ())
}

/// Where the ControlNet lives inside published single-file ControlNets (some, such as
/// thibaud's SD 2.1 ones, store it without the prefix).
const CONTROLNET_PREFIX: &str = "control_model.";

/// The sidecar config path of a single-file checkpoint or ControlNet:
/// `<stem>.config.json` beside it.
pub fn sidecar_path(path: &Path) -> std::path::PathBuf {
    configs::sidecar_path(path)
}

/// Loads a single-file ControlNet (original `control_model.*` names) as diffusers
/// tensors in `dtype` on `device`, with its diffusers config: the sidecar
/// `<stem>.config.json` (a diffusers ControlNet `config.json` dict) when there is one,
/// else the configuration of the ControlNets published for the UNet family its weights
/// show (SD 1.x, SD 2.x or SDXL), with the transformer depth per block and the
/// control-image embedding widths read from the weights.
pub fn load_controlnet(
    path: &Path,
    device: &Device,
    dtype: DType,
) -> Result<(Value, HashMap<String, Tensor>), ModelError> {
    let file = MappedFile::open(path)?;
    let header = file.header();
    let unknown = |reason: String| ModelError::UnknownLayout { path: path.to_path_buf(), reason };
    let prefix = if header.has_prefix(CONTROLNET_PREFIX) {
        CONTROLNET_PREFIX
    } else if header.contains("input_hint_block.0.weight") {
        ""
    } else {
        return Err(unknown(
            "not a ControlNet: no control_model.input_hint_block (or input_hint_block) tensors"
                .into(),
        ));
    };
    let sidecar = sidecar_path(path);
    let config = if sidecar.exists() {
        let text = std::fs::read_to_string(&sidecar)
            .map_err(|source| ModelError::Io { path: sidecar.clone(), source })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::BadConfig {
            path: sidecar.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(ModelError::BadConfig {
                path: sidecar,
                reason: "a ControlNet sidecar must be a diffusers ControlNet config object".into(),
            });
        }
        value
    } else {
        inferred_controlnet_config(header, prefix).map_err(|reason| {
            unknown(format!(
                "{reason}; put the ControlNet's diffusers config.json beside it as {}",
                sidecar.display()
            ))
        })?
    };
    let plan = unet_keys::controlnet_plan(header, prefix, &config).map_err(|reason| {
        if sidecar_path(path).exists() {
            ModelError::BadConfig {
                path: sidecar_path(path),
                reason: format!("the config does not fit the ControlNet: {reason}"),
            }
        } else {
            unknown(format!(
                "{reason}. If this ControlNet has other dimensions than the published ones, \
                 put its diffusers config.json beside it as {}",
                sidecar_path(path).display()
            ))
        }
    })?;
    let tensors =
        materialise(&file, &plan, device, dtype).map_err(|e| attribute("controlnet", e))?;
    Ok((config, tensors))
}

/// The config of a published ControlNet for the family its weights show: the family's
/// UNet config (the ControlNet copies its down path, as diffusers' `from_unet` does),
/// with the transformer depths and control-image embedding widths found in the weights.
fn inferred_controlnet_config(header: &Header, prefix: &str) -> Result<Value, String> {
    let family = if header.contains(&format!("{prefix}label_emb.0.0.weight")) {
        ModelFamily::Sdxl
    } else {
        let context_width = header
            .sorted_names()
            .into_iter()
            .find(|name| name.starts_with(prefix) && name.ends_with("attn2.to_k.weight"))
            .and_then(|name| header.shape(name))
            .and_then(|shape| shape.get(1).copied());
        match context_width {
            Some(1024) => ModelFamily::Sd2,
            Some(768) => ModelFamily::Sd1,
            other => {
                return Err(format!(
                    "cannot tell the ControlNet's model family (cross-attention width {other:?})"
                ))
            }
        }
    };
    let known = KnownModel::for_family(family, Sd2Variant::V768);
    let mut config = known.configs().remove("unet").expect("every family has a UNet config");
    let object = config.as_object_mut().expect("embedded configs are objects");
    for key in ["up_block_types", "out_channels", "sample_size", "center_input_sample"] {
        object.remove(key);
    }
    object.insert("_class_name".into(), Value::from("ControlNetModel"));
    object.insert("conditioning_channels".into(), Value::from(3));

    // Hint convolutions sit at even indices: conv_in, then pairs (3×3, strided 3×3), then
    // conv_out; the strided ones give the widths after the first.
    let mut hint: Vec<usize> = header
        .sorted_names()
        .into_iter()
        .filter_map(|name| {
            let rest = name.strip_prefix(prefix)?.strip_prefix("input_hint_block.")?;
            rest.strip_suffix(".weight")?.parse::<usize>().ok()
        })
        .collect();
    hint.sort_unstable();
    let width = |index: usize| -> Result<usize, String> {
        header
            .shape(&format!("{prefix}input_hint_block.{index}.weight"))
            .and_then(|shape| shape.first().copied())
            .ok_or_else(|| format!("missing {prefix}input_hint_block.{index}.weight"))
    };
    if hint.len() < 2 || !hint.len().is_multiple_of(2) {
        return Err(format!("unexpected input_hint_block layout {hint:?}"));
    }
    let mut widths = vec![width(hint[0])?];
    for pair in hint[1..hint.len() - 1].chunks(2) {
        widths.push(width(pair[1])?);
    }
    object.insert("conditioning_embedding_out_channels".into(), Value::from(widths));

    // Depth per down block: the most transformer blocks any of its attentions has
    // (published "small"/"mid" SDXL ControlNets thin the UNet's).
    let fields = Fields::new("controlnet", &config);
    let blocks = fields.usize_list("block_out_channels", &[320, 640, 1280, 1280])?.len();
    let layers = fields.usize_per_block("layers_per_block", blocks, 2)?;
    let mut depths = fields.usize_per_block("transformer_layers_per_block", blocks, 1)?;
    let mut input_index = 1;
    for (block, depth) in depths.iter_mut().enumerate() {
        let attention_prefix = |i: usize| format!("{prefix}input_blocks.{i}.1.transformer_blocks.");
        let found = (input_index..input_index + layers[block])
            .flat_map(|i| {
                let start = attention_prefix(i);
                header.sorted_names().into_iter().filter_map(move |name| {
                    name.strip_prefix(&start)?.split('.').next()?.parse::<usize>().ok()
                })
            })
            .max();
        if let Some(max_index) = found {
            *depth = max_index + 1;
        }
        input_index += layers[block] + 1;
    }
    let object = config.as_object_mut().expect("embedded configs are objects");
    object.insert("transformer_layers_per_block".into(), Value::from(depths));
    Ok(config)
}
