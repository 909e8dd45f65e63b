//! Which model family a checkpoint is, from its tensor names and shapes alone.
//!
//! The text encoder layout tells the families apart (it is the one part that differs in
//! kind, not just in size):
//! - SD 1.x: a Hugging Face CLIP under `cond_stage_model.transformer.*`;
//! - SD 2.x: an OpenCLIP encoder under `cond_stage_model.model.*` (fused
//!   `attn.in_proj_weight` per layer);
//! - SDXL base: HF CLIP under `conditioner.embedders.0.transformer.*` plus OpenCLIP
//!   under `conditioner.embedders.1.model.*`;
//! - SDXL refiner: only OpenCLIP, under `conditioner.embedders.0.model.*`.

use crate::models::ModelFamily;

use super::header::Header;
use super::unet_keys::UNET_PREFIX;

pub(crate) const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub(crate) const SD2_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub(crate) const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub(crate) const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
pub(crate) const REFINER_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// The family, or a sentence saying what the file looks like instead.
pub(crate) fn detect(header: &Header) -> Result<ModelFamily, String> {
    if !header.has_prefix(UNET_PREFIX) {
        return Err(format!("no {UNET_PREFIX}* keys: {}", describe_foreign(header)));
    }
    if header.has_prefix(SDXL_CLIP_PREFIX) && header.has_prefix(SDXL_OPEN_CLIP_PREFIX) {
        return Ok(ModelFamily::Sdxl);
    }
    if header.has_prefix(REFINER_OPEN_CLIP_PREFIX) && !header.has_prefix("conditioner.embedders.1.")
    {
        return Ok(ModelFamily::SdxlRefiner);
    }
    if header.has_prefix(SD2_OPEN_CLIP_PREFIX) {
        return Ok(ModelFamily::Sd2);
    }
    if header.has_prefix(SD1_CLIP_PREFIX) {
        return Ok(ModelFamily::Sd1);
    }
    let mut roots: Vec<String> = header
        .tensors
        .keys()
        .filter(|name| !name.starts_with(UNET_PREFIX))
        .map(|name| name.split('.').take(3).collect::<Vec<_>>().join("."))
        .collect();
    roots.sort();
    roots.dedup();
    roots.truncate(8);
    Err(format!(
        "a UNet ({UNET_PREFIX}*) but no text encoder in a known layout \
         (cond_stage_model.transformer/model.* or conditioner.embedders.*); other keys start with: {}",
        if roots.is_empty() { "(none)".to_string() } else { roots.join(", ") }
    ))
}

/// Names what a file without a UNet probably is, so the user knows where it belongs.
fn describe_foreign(header: &Header) -> String {
    let names = header.sorted_names();
    let any = |test: &dyn Fn(&str) -> bool| names.iter().any(|name| test(name));
    let what = if names.is_empty() {
        "the file holds no tensors".to_string()
    } else if any(&|name| {
        name.starts_with("lora_") || name.contains(".lora_down.") || name.contains(".lora_A.")
    }) {
        "this looks like a LoRA; load it as an adapter".to_string()
    } else if any(&|name| name.starts_with("string_to_param") || name.starts_with("emb_params"))
        || names.iter().all(|name| matches!(*name, "clip_l" | "clip_g"))
    {
        "this looks like a textual-inversion embedding".to_string()
    } else if any(&|name| {
        name.starts_with("first_stage_model.")
            || name.starts_with("encoder.down.")
            || name.starts_with("encoder.down_blocks.")
    }) {
        "this looks like a VAE-only file".to_string()
    } else if any(&|name| name.starts_with("control_model.") || name.starts_with("controlnet_")) {
        "this looks like a ControlNet".to_string()
    } else if any(&|name| name.starts_with("down_blocks.") || name.starts_with("text_model.")) {
        "this looks like one component in diffusers layout; point sdserve at the diffusers \
         model folder instead"
            .to_string()
    } else {
        let sample: Vec<&str> = names.iter().take(5).copied().collect();
        format!("this is not a Stable Diffusion checkpoint (first keys: {})", sample.join(", "))
    };
    what
}

/// Which SD 2.x checkpoint this is: the 768px v-prediction model (2.0-v / 2.1) or the
/// 512px epsilon "base" model. Both have identical tensor names and shapes, so diffusers'
/// single-file loader decides from a marker: the `global_step` stored in the original
/// `.ckpt` (875000 means 2.0-base → epsilon), otherwise v-prediction. safetensors exports
/// rarely keep `global_step`, so we also honour the markers other tools write:
/// a `v_pred` key (ComfyUI/A1111 convention) and `modelspec.prediction_type` metadata.
/// A sidecar `<stem>.config.json` with a `scheduler` (and `unet`) overrides all of this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sd2Variant {
    /// stabilityai/stable-diffusion-2-1: 768px, v_prediction. diffusers' default.
    V768,
    /// stabilityai/stable-diffusion-2-base: 512px, epsilon.
    Base512,
}

/// Decides the SD 2.x variant; `global_step` is the scalar tensor's value if present.
pub(crate) fn sd2_variant(header: &Header, global_step: Option<i64>) -> Sd2Variant {
    if header.contains("v_pred") {
        return Sd2Variant::V768;
    }
    if let Some(prediction) = header.metadata.get("modelspec.prediction_type") {
        match prediction.to_ascii_lowercase().as_str() {
            "v" | "v_prediction" | "v-prediction" => return Sd2Variant::V768,
            "epsilon" | "eps" => return Sd2Variant::Base512,
            _ => {}
        }
    }
    if global_step == Some(875_000) {
        return Sd2Variant::Base512;
    }
    Sd2Variant::V768
}
