//! The networks (CLIP text encoders, UNet, VAE, T2I-Adapter), configured from each component's
//! diffusers `config.json`, and the loaders for the layouts users have on disk.

pub mod backbone_config;
pub mod clip;
pub mod clip_vision;
pub mod common;
pub mod controlnet;
pub mod ip_adapter;
pub mod layers;
pub mod loader;
pub mod profile;
pub mod single_file;
pub mod t2i_adapter;
pub mod unet;
pub mod vae;
pub mod vae_tiling;

/// The model families sdserve runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// Stable Diffusion 1.x: one CLIP ViT-L text encoder, 768-wide context.
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H text encoder, 1024-wide context.
    Sd2,
    /// SDXL base: two text encoders, text_time conditioning.
    Sdxl,
    /// SDXL refiner: second text encoder only, aesthetic-score time ids.
    SdxlRefiner,
}

impl ModelFamily {
    pub fn id(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "sd1",
            ModelFamily::Sd2 => "sd2",
            ModelFamily::Sdxl => "sdxl",
            ModelFamily::SdxlRefiner => "sdxl_refiner",
        }
    }
}
