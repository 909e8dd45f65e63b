//! The diffusers configs a single-file checkpoint is built with: the embedded configs of
//! the real model families (assets/configs/), replaced per component by a sidecar
//! `<stem>.config.json` beside the checkpoint when one exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::ModelError;
use crate::models::ModelFamily;

use super::detect::Sd2Variant;

/// The components every family has, in the order they are listed.
pub(crate) fn components_of(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Sd1 | ModelFamily::Sd2 => &["unet", "vae", "text_encoder", "scheduler"],
        ModelFamily::Sdxl => &["unet", "vae", "text_encoder", "text_encoder_2", "scheduler"],
        ModelFamily::SdxlRefiner => &["unet", "vae", "text_encoder_2", "scheduler"],
    }
}

/// A real model whose diffusers configs are embedded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KnownModel {
    /// runwayml/stable-diffusion-v1-5
    Sd15,
    /// stabilityai/stable-diffusion-2-1 (768px, v_prediction)
    Sd21V,
    /// stabilityai/stable-diffusion-2-base (512px, epsilon)
    Sd2Base,
    /// stabilityai/stable-diffusion-xl-base-1.0
    SdxlBase,
    /// stabilityai/stable-diffusion-xl-refiner-1.0
    SdxlRefiner,
}

impl KnownModel {
    pub fn for_family(family: ModelFamily, sd2: Sd2Variant) -> Self {
        match (family, sd2) {
            (ModelFamily::Sd1, _) => KnownModel::Sd15,
            (ModelFamily::Sd2, Sd2Variant::V768) => KnownModel::Sd21V,
            (ModelFamily::Sd2, Sd2Variant::Base512) => KnownModel::Sd2Base,
            (ModelFamily::Sdxl, _) => KnownModel::SdxlBase,
            (ModelFamily::SdxlRefiner, _) => KnownModel::SdxlRefiner,
        }
    }

    pub fn repo(self) -> &'static str {
        match self {
            KnownModel::Sd15 => "runwayml/stable-diffusion-v1-5",
            KnownModel::Sd21V => "stabilityai/stable-diffusion-2-1",
            KnownModel::Sd2Base => "stabilityai/stable-diffusion-2-base",
            KnownModel::SdxlBase => "stabilityai/stable-diffusion-xl-base-1.0",
            KnownModel::SdxlRefiner => "stabilityai/stable-diffusion-xl-refiner-1.0",
        }
    }

    fn sources(self) -> &'static [(&'static str, &'static str)] {
        macro_rules! config {
            ($dir:literal, $component:literal) => {
                (
                    $component,
                    include_str!(concat!(
                        "../../../assets/configs/",
                        $dir,
                        "/",
                        $component,
                        ".json"
                    )),
                )
            };
        }
        match self {
            KnownModel::Sd15 => &[
                config!("sd1", "unet"),
                config!("sd1", "vae"),
                config!("sd1", "text_encoder"),
                config!("sd1", "scheduler"),
            ],
            KnownModel::Sd21V => &[
                config!("sd2", "unet"),
                config!("sd2", "vae"),
                config!("sd2", "text_encoder"),
                config!("sd2", "scheduler"),
            ],
            KnownModel::Sd2Base => &[
                config!("sd2_base", "unet"),
                config!("sd2_base", "vae"),
                config!("sd2_base", "text_encoder"),
                config!("sd2_base", "scheduler"),
            ],
            KnownModel::SdxlBase => &[
                config!("sdxl", "unet"),
                config!("sdxl", "vae"),
                config!("sdxl", "text_encoder"),
                config!("sdxl", "text_encoder_2"),
                config!("sdxl", "scheduler"),
            ],
            KnownModel::SdxlRefiner => &[
                config!("sdxl_refiner", "unet"),
                config!("sdxl_refiner", "vae"),
                config!("sdxl_refiner", "text_encoder_2"),
                config!("sdxl_refiner", "scheduler"),
            ],
        }
    }

    /// The embedded configs, component → config dict.
    pub fn configs(self) -> BTreeMap<String, Value> {
        self.sources()
            .iter()
            .map(|(component, text)| {
                let value = serde_json::from_str(text)
                    .expect("embedded config JSON is checked by tests; this is a bug");
                (component.to_string(), value)
            })
            .collect()
    }
}

/// The user's description of a checkpoint whose configs are not the embedded ones.
#[derive(Debug, Clone)]
pub(crate) struct Sidecar {
    pub path: PathBuf,
    pub family: Option<ModelFamily>,
    pub components: BTreeMap<String, Value>,
}

/// `dir/model.safetensors` → `dir/model.config.json`.
pub(crate) fn sidecar_path(checkpoint: &Path) -> PathBuf {
    let stem =
        checkpoint.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    checkpoint.with_file_name(format!("{stem}.config.json"))
}

const SIDECAR_KEYS: [&str; 5] = ["unet", "vae", "text_encoder", "text_encoder_2", "scheduler"];

/// Reads the sidecar if there is one.
pub(crate) fn read_sidecar(checkpoint: &Path) -> Result<Option<Sidecar>, ModelError> {
    let path = sidecar_path(checkpoint);
    if !path.exists() {
        return Ok(None);
    }
    let bad = |reason: String| ModelError::BadConfig { path: path.clone(), reason };
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ModelError::Io { path: path.clone(), source })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|err| bad(format!("invalid JSON: {err}")))?;
    let object = json.as_object().ok_or_else(|| bad("the sidecar must be a JSON object".into()))?;
    let mut sidecar = Sidecar { path: path.clone(), family: None, components: BTreeMap::new() };
    for (key, value) in object {
        if key == "family" {
            let family = serde_json::from_value(value.clone()).map_err(|_| {
                bad(format!(
                    "\"family\" must be one of \"sd1\", \"sd2\", \"sdxl\", \"sdxl_refiner\", got {value}"
                ))
            })?;
            sidecar.family = Some(family);
        } else if SIDECAR_KEYS.contains(&key.as_str()) {
            if !value.is_object() {
                return Err(bad(format!("\"{key}\" must be a diffusers config object")));
            }
            sidecar.components.insert(key.clone(), value.clone());
        } else if !key.starts_with('_') {
            return Err(bad(format!(
                "unknown key \"{key}\"; expected family, {}",
                SIDECAR_KEYS.join(", ")
            )));
        }
    }
    Ok(Some(sidecar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_config_parses_and_covers_its_family() {
        for (model, family) in [
            (KnownModel::Sd15, ModelFamily::Sd1),
            (KnownModel::Sd21V, ModelFamily::Sd2),
            (KnownModel::Sd2Base, ModelFamily::Sd2),
            (KnownModel::SdxlBase, ModelFamily::Sdxl),
            (KnownModel::SdxlRefiner, ModelFamily::SdxlRefiner),
        ] {
            let configs = model.configs();
            let names: Vec<&str> = configs.keys().map(String::as_str).collect();
            let mut expected = components_of(family).to_vec();
            expected.sort_unstable();
            assert_eq!(names, expected, "{}", model.repo());
        }
        let v = KnownModel::Sd21V.configs();
        assert_eq!(v["scheduler"]["prediction_type"], "v_prediction");
        assert_eq!(v["unet"]["sample_size"], 96);
        let base = KnownModel::Sd2Base.configs();
        assert_eq!(base["scheduler"]["prediction_type"], "epsilon");
        assert_eq!(base["unet"]["sample_size"], 64);
        assert_eq!(KnownModel::SdxlBase.configs()["vae"]["scaling_factor"], 0.13025);
    }

    #[test]
    fn sidecar_path_sits_beside_the_checkpoint() {
        let path = sidecar_path(Path::new("/models/tiny.sd1.safetensors"));
        assert_eq!(path, Path::new("/models/tiny.sd1.config.json"));
    }
}
