//! Memory-saving choices of a request: whether the VAE works in tiles ([`VaeTiling`]) and
//! the deployment's threshold for the automatic choice ([`MemorySettings`]).

use serde::{Deserialize, Serialize};

/// Whether the VAE encodes/decodes in overlapping tiles (diffusers' `enable_tiling`).
/// Tiling bounds the VAE's memory by the tile size instead of the image size; the tiles'
/// blended seams differ slightly from an untiled run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VaeTiling {
    /// Tile when the image has at least the deployment's `vae_tiling_auto_pixels`.
    #[default]
    Auto,
    /// Tile whenever the image is larger than one tile.
    On,
    /// Never tile.
    Off,
}

impl VaeTiling {
    /// Every choice, as the API names them.
    pub const ALL: [VaeTiling; 3] = [VaeTiling::Auto, VaeTiling::On, VaeTiling::Off];

    pub fn id(self) -> &'static str {
        match self {
            VaeTiling::Auto => "auto",
            VaeTiling::On => "on",
            VaeTiling::Off => "off",
        }
    }

    pub fn from_name(name: &str) -> Option<VaeTiling> {
        VaeTiling::ALL.into_iter().find(|mode| mode.id().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether a `width × height` image is tiled under `settings`.
    pub fn applies(self, width: u32, height: u32, settings: &MemorySettings) -> bool {
        match self {
            VaeTiling::On => true,
            VaeTiling::Off => false,
            VaeTiling::Auto => {
                u64::from(width) * u64::from(height) >= settings.vae_tiling_auto_pixels
            }
        }
    }
}

/// Default of [`MemorySettings::vae_tiling_auto_pixels`]: 1024 × 1024.
pub const DEFAULT_VAE_TILING_AUTO_PIXELS: u64 = 1024 * 1024;

/// A deployment's memory settings for the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySettings {
    /// `vae_tiling: "auto"` tiles images of at least this many pixels.
    pub vae_tiling_auto_pixels: u64,
    /// Tile side in pixels (a multiple of 8 × the VAE's downscale); `None`: the VAE
    /// config's `sample_size`, as diffusers.
    pub vae_tile_pixels: Option<usize>,
}

impl Default for MemorySettings {
    fn default() -> Self {
        MemorySettings {
            vae_tiling_auto_pixels: DEFAULT_VAE_TILING_AUTO_PIXELS,
            vae_tile_pixels: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_tiles_from_the_threshold_on() {
        let settings = MemorySettings { vae_tiling_auto_pixels: 512 * 512, vae_tile_pixels: None };
        assert!(!VaeTiling::Auto.applies(512, 504, &settings));
        assert!(VaeTiling::Auto.applies(512, 512, &settings));
        assert!(VaeTiling::On.applies(64, 64, &settings));
        assert!(!VaeTiling::Off.applies(4096, 4096, &settings));
        assert_eq!(VaeTiling::from_name(" ON "), Some(VaeTiling::On));
        assert_eq!(VaeTiling::from_name("sometimes"), None);
    }
}
