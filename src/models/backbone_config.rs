//! The `config.json` fields diffusers' `UNet2DConditionModel` and `ControlNetModel` share:
//! the part of the UNet a ControlNet copies (time embedding, down path, mid block,
//! attention layout, SDXL's `text_time` embedding). Both configs embed it with
//! `#[serde(flatten)]`, so the JSON they accept is unchanged, and deref to it, so its
//! fields read as the config's own.

use serde::Deserialize;

use super::common::PerBlock;

/// The shared fields, with diffusers' defaults where a config may leave them out.
#[derive(Debug, Clone, Deserialize)]
pub struct BackboneConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock,
    #[serde(default)]
    pub downsample_padding: Option<usize>,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// diffusers' historical name for the number of heads (used when
    /// `num_attention_heads` is absent).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `null` in the real SDXL base and refiner configs: false, as diffusers reads it.
    #[serde(default, deserialize_with = "false_when_null")]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
}

/// A boolean that a config may also give as `null` (meaning false).
fn false_when_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

fn default_in_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_layers_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn default_norm_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_attention_head_dim() -> PerBlock {
    PerBlock::One(8)
}

impl BackboneConfig {
    /// Rejects down block types other than diffusers' two (with and without attention).
    pub fn check_down_block_types(&self) -> Result<(), String> {
        for kind in &self.down_block_types {
            if kind != "CrossAttnDownBlock2D" && kind != "DownBlock2D" {
                return Err(format!("unsupported down block type {kind}"));
            }
        }
        Ok(())
    }

    /// Rejects additional embeddings other than SDXL's `text_time`, and `text_time`
    /// without the widths it needs.
    pub fn check_addition_embedding(&self) -> Result<(), String> {
        let text_time = self.uses_text_time();
        if let Some(other) = self.addition_embed_type.as_deref().filter(|_| !text_time) {
            return Err(format!("unsupported addition_embed_type {other}"));
        }
        if text_time
            && (self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none())
        {
            return Err("text_time needs addition_time_embed_dim and \
                        projection_class_embeddings_input_dim"
                .into());
        }
        Ok(())
    }

    /// Rejects `only_cross_attention: true` (attention blocks without self-attention).
    pub fn check_attention(&self) -> Result<(), String> {
        if matches!(self.only_cross_attention, serde_json::Value::Bool(true)) {
            return Err("only_cross_attention is not supported".into());
        }
        Ok(())
    }

    /// The number of attention heads per block (`num_attention_heads`, else diffusers'
    /// misnamed `attention_head_dim`).
    pub fn heads(&self) -> &PerBlock {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim)
    }

    /// True for SDXL-style networks that take pooled text embeddings and time ids.
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}

#[cfg(test)]
mod tests {
    use super::super::controlnet::ControlNetConfig;
    use super::super::unet::UNetConfig;

    /// The flattened fields read as before, defaults included, in both configs; the UNet
    /// still requires `cross_attention_dim` and the ControlNet still defaults it.
    #[test]
    fn both_configs_accept_the_same_json_as_before() {
        let json = serde_json::json!({
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [32, 64],
            "freq_shift": 0,
            "attention_head_dim": [2, 4],
            "addition_embed_type": "text_time",
            "cross_attention_dim": 32,
        });
        let unet: UNetConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(unet.in_channels, 4);
        assert_eq!(unet.block_out_channels, [32, 64]);
        assert_eq!(unet.freq_shift, 0.0);
        assert!(unet.flip_sin_to_cos && unet.uses_text_time());
        assert_eq!(unet.heads().for_block(1), Some(4));
        let controlnet: ControlNetConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(controlnet.norm_num_groups, 32);
        assert_eq!(controlnet.conditioning_channels, 3);
        assert_eq!(controlnet.context_width(), Some(32));
        let mut without_context = json;
        without_context.as_object_mut().unwrap().remove("cross_attention_dim");
        let error = serde_json::from_value::<UNetConfig>(without_context.clone()).unwrap_err();
        assert!(error.to_string().contains("cross_attention_dim"), "{error}");
        let controlnet: ControlNetConfig = serde_json::from_value(without_context).unwrap();
        assert_eq!(controlnet.context_width(), Some(1280));
    }

    /// The real configs embedded for single files (SDXL's say `"upcast_attention": null`).
    #[test]
    fn embedded_real_unet_configs_parse() {
        for (family, upcast) in [
            ("sd1", false),
            ("sd2", true),
            ("sd2_base", false),
            ("sdxl", false),
            ("sdxl_refiner", false),
        ] {
            let path = format!("{}/assets/configs/{family}/unet.json", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let unet: UNetConfig =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(unet.upcast_attention, upcast, "{family}");
        }
    }
}
