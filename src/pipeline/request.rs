//! The generation request as a typestate: every API dialect and the CLI fill a
//! [`GenerationParams`] (anything may be missing or wrong), and only
//! [`GenerationParams::validate`] makes a [`GenerationRequest`], in which every default is
//! filled in and every value is in range. Only validated requests reach the pipeline.

use serde::{Deserialize, Serialize};

use super::image_input::{self, ImageConditioning, ResizeMode};
use super::memory::VaeTiling;
use super::t2i_adapter::{self, T2IAdapterChoice, T2IAdapterParams};
use crate::adapters::ip_adapter::{self, IpAdapterChoice, IpAdapterParams};
use crate::adapters::lora;
use crate::error::ValidationError;
use crate::models::ModelFamily;
use crate::samplers::{
    resolve_sampler_name, PredictionType, SamplerKind, SamplerOptions, Schedule,
    SchedulerOverrides, TimestepSpacing,
};

/// Limits a deployment puts on requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
    pub max_n: u32,
    /// Maximum prompt length in characters (prompt and negative prompt each).
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_width: 2048,
            max_height: 2048,
            max_steps: 150,
            max_n: 8,
            max_prompt_chars: 10_000,
        }
    }
}

/// What validation needs to know about the chosen model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDefaults {
    /// The model's registry name.
    pub name: String,
    pub family: ModelFamily,
    /// The model's native image size (UNet sample size × 8).
    pub width: u32,
    pub height: u32,
}

/// One LoRA a request applies: its name (in the configured LoRA directories, or a file
/// the CLI registered) and its strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraChoice {
    pub name: String,
    /// Multiplies the adapter's change; 1 is full strength, negative values invert it.
    #[serde(default = "full_strength")]
    pub weight: f64,
}

fn full_strength() -> f64 {
    1.0
}

/// One ControlNet of a request as sent: its name, control image (base64 or data URI;
/// PNG, JPEG, WebP) and how strongly and when it guides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlNetParams {
    /// A ControlNet in the configured directories (folder name or file stem).
    pub model: String,
    /// The control image (already preprocessed: edges, depth, pose...).
    pub image: String,
    /// diffusers' `controlnet_conditioning_scale`; default 1.
    #[serde(default)]
    pub scale: Option<f64>,
    /// Fraction of the steps after which it starts guiding (diffusers'
    /// `control_guidance_start`); default 0.
    #[serde(default)]
    pub start: Option<f64>,
    /// Fraction of the steps after which it stops (`control_guidance_end`); default 1.
    #[serde(default)]
    pub end: Option<f64>,
}

/// One validated ControlNet of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetUnit {
    /// The name the ControlNet library resolves.
    pub model: String,
    /// The control image fitted to the request's size, RGB8 row-major.
    pub image_rgb: Vec<u8>,
    pub scale: f64,
    /// Guidance window as fractions of the steps, `0 <= start < end <= 1`.
    pub start: f64,
    pub end: f64,
}

/// An unvalidated request, as any API dialect or the CLI parsed it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f64>,
    pub guidance_rescale: Option<f64>,
    /// Sampler id, A1111 display name or alias.
    pub sampler: Option<String>,
    /// Noise schedule id (`default`, `karras`, ...); a legacy combined sampler name
    /// ("DPM++ 2M Karras") may imply one.
    #[serde(default)]
    pub schedule: Option<String>,
    /// DDIM's eta (0-1).
    #[serde(default)]
    pub eta: Option<f64>,
    /// Noise scale of the ancestral / SDE samplers (0-2).
    #[serde(default)]
    pub s_noise: Option<f64>,
    /// Replaces the model's scheduler `timestep_spacing`: leading, trailing or linspace.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Replaces the model's scheduler `rescale_betas_zero_snr` (zero terminal SNR).
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Replaces the model's scheduler `prediction_type`: epsilon, v_prediction or sample.
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Absent or negative: a random seed is chosen (and reported).
    pub seed: Option<i64>,
    pub n: Option<u32>,
    /// A1111 semantics: 1 = last layer, 2 = penultimate, ...
    pub clip_skip: Option<u32>,
    pub original_size: Option<(u32, u32)>,
    pub crop_top_left: Option<(u32, u32)>,
    pub target_size: Option<(u32, u32)>,
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
    /// LoRAs to apply; `<lora:name:weight>` tags in the prompts add more.
    #[serde(default)]
    pub loras: Vec<LoraChoice>,
    /// img2img / inpainting source image (base64 or data URI; PNG, JPEG, WebP).
    #[serde(default)]
    pub init_image: Option<String>,
    /// img2img strength in (0, 1]; default 0.75.
    #[serde(default)]
    pub strength: Option<f64>,
    /// `resize`, `crop` or `fill` when the init image size differs from the output.
    #[serde(default)]
    pub resize_mode: Option<String>,
    /// Inpainting mask (white = repaint); needs `init_image`.
    #[serde(default)]
    pub mask_image: Option<String>,
    /// Gaussian blur of the mask in pixels; default 4.
    #[serde(default)]
    pub mask_blur: Option<u32>,
    /// A1111's "inpaint only masked": repaint the masked region scaled up to full size.
    #[serde(default)]
    pub inpaint_full_res: Option<bool>,
    /// Padding around the masked region for `inpaint_full_res` (default 32).
    #[serde(default)]
    pub inpaint_full_res_padding: Option<u32>,
    /// Paste the original back outside the mask; default true.
    #[serde(default)]
    pub paste_back: Option<bool>,
    /// T2I-Adapters with their control images and scales.
    #[serde(default)]
    pub t2i_adapters: Vec<T2IAdapterParams>,
    /// ControlNets guiding the generation (summed, as diffusers' MultiControlNetModel).
    #[serde(default)]
    pub controlnets: Vec<ControlNetParams>,
    /// diffusers' `guess_mode` for the ControlNets: they see only the prompt's half of
    /// the guidance batch, with residuals scaled from 0.1 (first skip) to 1 (mid block).
    #[serde(default)]
    pub guess_mode: Option<bool>,
    /// IP-Adapters: reference images that steer the picture through the UNet's
    /// cross-attention.
    #[serde(default)]
    pub ip_adapters: Vec<IpAdapterParams>,
    /// VAE tiling: `auto` (default), `on` or `off`.
    #[serde(default)]
    pub vae_tiling: Option<String>,
}

/// SDXL micro-conditioning (ignored by SD 1.x / 2.x).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdxlConditioning {
    /// (width, height)
    pub original_size: (u32, u32),
    /// (top, left) in pixels, as diffusers' `crops_coords_top_left`.
    pub crop_top_left: (u32, u32),
    /// (width, height)
    pub target_size: (u32, u32),
    /// Refiner only.
    pub aesthetic_score: f64,
    /// Refiner only.
    pub negative_aesthetic_score: f64,
}

/// A validated request: every default filled in, every value in range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRequest {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub sampler: SamplerKind,
    /// Noise schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// DDIM's eta; `None` = the sampler's default.
    #[serde(default)]
    pub eta: Option<f64>,
    /// Noise scale of the ancestral / SDE samplers; `None` = 1.
    #[serde(default)]
    pub s_noise: Option<f64>,
    /// Scheduler-config settings this request replaces (none: the model's own).
    #[serde(default)]
    pub scheduler_overrides: SchedulerOverrides,
    /// Image `i` of the request uses seed `seed + i`.
    pub seed: u64,
    pub n: u32,
    pub clip_skip: u32,
    pub sdxl: SdxlConditioning,
    /// The LoRAs of the request (explicit ones first, then the prompt tags), names
    /// checked for shape; whether they exist is checked against the LoRA library.
    #[serde(default)]
    pub loras: Vec<LoraChoice>,
    /// img2img / inpainting input; `None` = text-to-image.
    #[serde(default)]
    pub image: Option<ImageConditioning>,
    /// T2I-Adapters, control images fitted to the output size; whether the names exist is
    /// checked against the T2I-Adapter library.
    #[serde(default)]
    pub t2i_adapters: Vec<T2IAdapterChoice>,
    /// ControlNets, in request order.
    #[serde(default)]
    pub controlnets: Vec<ControlNetUnit>,
    /// diffusers' ControlNet `guess_mode`.
    #[serde(default)]
    pub guess_mode: bool,
    /// IP-Adapters with their decoded reference images.
    #[serde(default)]
    pub ip_adapters: Vec<IpAdapterChoice>,
    /// Whether the VAE works in tiles.
    #[serde(default)]
    pub vae_tiling: VaeTiling,
}

/// Default step count (diffusers' pipelines default to 50; A1111's UI to 20).
pub const DEFAULT_STEPS: u32 = 30;
/// Default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;

impl GenerationParams {
    /// Checks every field and fills in every default.
    pub fn validate(
        self,
        model: &ModelDefaults,
        limits: &Limits,
    ) -> Result<GenerationRequest, ValidationError> {
        let init_image = match &self.init_image {
            Some(data) => Some(image_input::decode_init_image("init_image", data)?),
            None => None,
        };
        let adapter_images = t2i_adapter::decode_images(&self.t2i_adapters)?;
        let control_images = self.decode_control_images()?;
        // Without an explicit size, img2img keeps the init image's size (down to a
        // multiple of 8), as diffusers' image processor does; ControlNet and T2I-Adapter
        // requests take their first control image's, as diffusers' ControlNet and adapter
        // pipelines do.
        let init_size = init_image
            .as_ref()
            .or(control_images.first())
            .or(adapter_images.first())
            .map(|image| (image.width / 8 * 8, image.height / 8 * 8));
        let width = self.width.or(init_size.map(|s| s.0)).unwrap_or(model.width);
        let height = self.height.or(init_size.map(|s| s.1)).unwrap_or(model.height);
        for (field, value, max) in
            [("width", width, limits.max_width), ("height", height, limits.max_height)]
        {
            if value == 0 || value % 8 != 0 {
                return Err(ValidationError::new(
                    field,
                    format!("must be a positive multiple of 8, got {value}"),
                ));
            }
            if value > max {
                return Err(ValidationError::new(
                    field,
                    format!("must be at most {max}, got {value}"),
                ));
            }
        }
        let image = self.image_conditioning(init_image, width, height)?;
        let t2i_adapters =
            t2i_adapter::validate(&self.t2i_adapters, adapter_images, width, height)?;
        let controlnets = self.controlnet_units(control_images, width, height)?;
        let ip_adapters = ip_adapter::validate(&self.ip_adapters)?;
        let steps = self.steps.unwrap_or(DEFAULT_STEPS);
        if steps == 0 || steps > limits.max_steps {
            return Err(ValidationError::new(
                "steps",
                format!("must be between 1 and {}, got {steps}", limits.max_steps),
            ));
        }
        let guidance_scale = self.guidance_scale.unwrap_or(DEFAULT_GUIDANCE_SCALE);
        if !guidance_scale.is_finite() || !(0.0..=100.0).contains(&guidance_scale) {
            return Err(ValidationError::new(
                "guidance_scale",
                format!("must be between 0 and 100, got {guidance_scale}"),
            ));
        }
        let guidance_rescale = self.guidance_rescale.unwrap_or(0.0);
        if !guidance_rescale.is_finite() || !(0.0..=1.0).contains(&guidance_rescale) {
            return Err(ValidationError::new(
                "guidance_rescale",
                format!("must be between 0 and 1, got {guidance_rescale}"),
            ));
        }
        let (sampler, implied_schedule) = match self.sampler.as_deref() {
            None | Some("") => (SamplerKind::EulerA, None),
            Some(name) => resolve_sampler_name(name).ok_or_else(|| {
                let valid: Vec<&str> = SamplerKind::ALL.iter().map(|s| s.id()).collect();
                ValidationError::new(
                    "sampler",
                    format!(
                        "unknown sampler {name:?}; valid samplers: {} (A1111 names such as \
                         \"DPM++ 2M Karras\" are accepted too)",
                        valid.join(", ")
                    ),
                )
            })?,
        };
        let schedule = match self.schedule.as_deref() {
            None => implied_schedule.unwrap_or_default(),
            Some(name) => Schedule::from_name(name).ok_or_else(|| {
                let valid: Vec<&str> = Schedule::ALL.iter().map(|s| s.id()).collect();
                ValidationError::new(
                    "schedule",
                    format!("unknown schedule {name:?}; valid schedules: {}", valid.join(", ")),
                )
            })?,
        };
        if !sampler.schedules().contains(&schedule) {
            let valid: Vec<&str> = sampler.schedules().iter().map(|s| s.id()).collect();
            return Err(ValidationError::new(
                "schedule",
                format!(
                    "sampler {} does not support schedule {}; it supports: {}",
                    sampler.id(),
                    schedule.id(),
                    valid.join(", ")
                ),
            ));
        }
        if let Some(eta) = self.eta {
            if !sampler.takes_eta() {
                return Err(ValidationError::new(
                    "eta",
                    format!(
                        "sampler {} has no eta (only ddim, and tcd as its gamma, do)",
                        sampler.id()
                    ),
                ));
            }
            if !eta.is_finite() || !(0.0..=1.0).contains(&eta) {
                return Err(ValidationError::new(
                    "eta",
                    format!("must be between 0 and 1, got {eta}"),
                ));
            }
        }
        if let Some(s_noise) = self.s_noise {
            if !sampler.takes_s_noise() {
                return Err(ValidationError::new(
                    "s_noise",
                    format!("sampler {} adds no noise; s_noise does not apply", sampler.id()),
                ));
            }
            if !s_noise.is_finite() || !(0.0..=2.0).contains(&s_noise) {
                return Err(ValidationError::new(
                    "s_noise",
                    format!("must be between 0 and 2, got {s_noise}"),
                ));
            }
        }
        let scheduler_overrides = self.scheduler_overrides(sampler)?;
        let seed = match self.seed {
            Some(seed) if seed >= 0 => seed as u64,
            _ => u64::from(rand::random::<u32>()),
        };
        let n = self.n.unwrap_or(1);
        if n == 0 || n > limits.max_n {
            return Err(ValidationError::new(
                "n",
                format!("must be between 1 and {}, got {n}", limits.max_n),
            ));
        }
        let clip_skip = self.clip_skip.unwrap_or(1);
        if !(1..=12).contains(&clip_skip) {
            return Err(ValidationError::new(
                "clip_skip",
                format!("must be between 1 and 12, got {clip_skip}"),
            ));
        }
        let (prompt, prompt_tags) = lora::extract_lora_tags(&self.prompt);
        let (negative_prompt, negative_tags) =
            lora::extract_lora_tags(&self.negative_prompt.unwrap_or_default());
        let tagged = prompt_tags.into_iter().chain(negative_tags);
        let loras: Vec<LoraChoice> = self
            .loras
            .into_iter()
            .chain(tagged.map(|(name, weight)| LoraChoice { name, weight }))
            .collect();
        if loras.len() > lora::MAX_LORAS_PER_REQUEST {
            return Err(ValidationError::new(
                "loras",
                format!("at most {} LoRAs per request", lora::MAX_LORAS_PER_REQUEST),
            ));
        }
        for choice in &loras {
            let limit = lora::MAX_LORA_WEIGHT;
            if !choice.weight.is_finite() || choice.weight.abs() > limit {
                return Err(ValidationError::new(
                    "loras",
                    format!(
                        "weight of LoRA {:?} must be between -{limit} and {limit}, got {}",
                        choice.name, choice.weight
                    ),
                ));
            }
            lora::library::check_name(&choice.name)
                .map_err(|e| ValidationError::new("loras", e.to_string()))?;
        }
        let original_prompt = self.prompt;
        for (field, text) in [("prompt", &original_prompt), ("negative_prompt", &negative_prompt)] {
            if text.chars().count() > limits.max_prompt_chars {
                return Err(ValidationError::new(
                    field,
                    format!("must be at most {} characters", limits.max_prompt_chars),
                ));
            }
        }
        for (field, size) in
            [("original_size", self.original_size), ("target_size", self.target_size)]
        {
            if let Some((w, h)) = size {
                if w == 0 || h == 0 || w > 16384 || h > 16384 {
                    return Err(ValidationError::new(
                        field,
                        format!("must be between 1 and 16384 per side, got {w}x{h}"),
                    ));
                }
            }
        }
        let crop_top_left = self.crop_top_left.unwrap_or((0, 0));
        if crop_top_left.0 > 16384 || crop_top_left.1 > 16384 {
            return Err(ValidationError::new(
                "crop_top_left",
                "must be at most 16384 per coordinate",
            ));
        }
        let aesthetic_score = self.aesthetic_score.unwrap_or(6.0);
        let negative_aesthetic_score = self.negative_aesthetic_score.unwrap_or(2.5);
        for (field, score) in [
            ("aesthetic_score", aesthetic_score),
            ("negative_aesthetic_score", negative_aesthetic_score),
        ] {
            if !score.is_finite() || !(0.0..=10.0).contains(&score) {
                return Err(ValidationError::new(
                    field,
                    format!("must be between 0 and 10, got {score}"),
                ));
            }
        }
        let vae_tiling = match self.vae_tiling.as_deref() {
            None | Some("") => VaeTiling::default(),
            Some(name) => VaeTiling::from_name(name).ok_or_else(|| {
                ValidationError::new(
                    "vae_tiling",
                    format!("unknown VAE tiling mode {name:?}; valid modes: auto, on, off"),
                )
            })?,
        };
        Ok(GenerationRequest {
            model: model.name.clone(),
            prompt,
            negative_prompt,
            width,
            height,
            steps,
            guidance_scale,
            guidance_rescale,
            sampler,
            schedule,
            eta: self.eta,
            s_noise: self.s_noise,
            scheduler_overrides,
            seed,
            n,
            clip_skip,
            sdxl: SdxlConditioning {
                original_size: self.original_size.unwrap_or((width, height)),
                crop_top_left,
                target_size: self.target_size.unwrap_or((width, height)),
                aesthetic_score,
                negative_aesthetic_score,
            },
            loras,
            image,
            t2i_adapters,
            controlnets,
            guess_mode: self.guess_mode.unwrap_or(false),
            ip_adapters,
            vae_tiling,
        })
    }

    /// Validates the per-request scheduler-config overrides for `sampler`.
    fn scheduler_overrides(
        &self,
        sampler: SamplerKind,
    ) -> Result<SchedulerOverrides, ValidationError> {
        let timestep_spacing = match self.timestep_spacing.as_deref() {
            None => None,
            Some(name) => {
                let spacing = TimestepSpacing::from_name(name).ok_or_else(|| {
                    let valid: Vec<&str> = TimestepSpacing::ALL.iter().map(|s| s.id()).collect();
                    ValidationError::new(
                        "timestep_spacing",
                        format!(
                            "unknown timestep spacing {name:?}; valid spacings: {}",
                            valid.join(", ")
                        ),
                    )
                })?;
                if !sampler.uses_timestep_spacing() {
                    return Err(ValidationError::new(
                        "timestep_spacing",
                        format!(
                            "sampler {} takes its timesteps from its distillation schedule; \
                             timestep_spacing does not apply",
                            sampler.id()
                        ),
                    ));
                }
                Some(spacing)
            }
        };
        let prediction_type = match self.prediction_type.as_deref() {
            None => None,
            Some(name) => Some(PredictionType::from_name(name).ok_or_else(|| {
                let valid: Vec<&str> = PredictionType::ALL.iter().map(|p| p.id()).collect();
                ValidationError::new(
                    "prediction_type",
                    format!(
                        "unknown prediction type {name:?}; valid prediction types: {}",
                        valid.join(", ")
                    ),
                )
            })?),
        };
        Ok(SchedulerOverrides {
            timestep_spacing,
            rescale_betas_zero_snr: self.rescale_betas_zero_snr,
            prediction_type,
        })
    }

    /// Decodes every control image (field `controlnets[i].image`; alpha dropped as
    /// diffusers does, see [`image_input::decode_control_image`]), checking the count and
    /// names first so a bad request fails before any decoding.
    fn decode_control_images(&self) -> Result<Vec<crate::codec::DecodedImage>, ValidationError> {
        use crate::adapters::controlnet;
        if self.controlnets.len() > controlnet::MAX_CONTROLNETS_PER_REQUEST {
            return Err(ValidationError::new(
                "controlnets",
                format!(
                    "at most {} ControlNets per request, got {}",
                    controlnet::MAX_CONTROLNETS_PER_REQUEST,
                    self.controlnets.len()
                ),
            ));
        }
        if self.controlnets.is_empty() && self.guess_mode == Some(true) {
            return Err(ValidationError::new("guess_mode", "needs at least one ControlNet"));
        }
        for (index, unit) in self.controlnets.iter().enumerate() {
            controlnet::check_name(&unit.model).map_err(|e| {
                ValidationError::new(format!("controlnets[{index}].model"), e.to_string())
            })?;
        }
        self.controlnets
            .iter()
            .enumerate()
            .map(|(index, unit)| {
                image_input::decode_control_image(
                    &format!("controlnets[{index}].image"),
                    &unit.image,
                )
            })
            .collect()
    }

    /// Checks each ControlNet's scale and window, and fits its image to the output size
    /// as diffusers' control image processor does (a plain resize; values stay 0-255).
    fn controlnet_units(
        &self,
        images: Vec<crate::codec::DecodedImage>,
        width: u32,
        height: u32,
    ) -> Result<Vec<ControlNetUnit>, ValidationError> {
        let limit = crate::adapters::controlnet::MAX_CONTROLNET_SCALE;
        self.controlnets
            .iter()
            .zip(images)
            .enumerate()
            .map(|(index, (unit, image))| {
                let field = |name: &str| format!("controlnets[{index}].{name}");
                let scale = unit.scale.unwrap_or(1.0);
                if !scale.is_finite() || !(0.0..=limit).contains(&scale) {
                    return Err(ValidationError::new(
                        field("scale"),
                        format!("must be between 0 and {limit}, got {scale}"),
                    ));
                }
                let start = unit.start.unwrap_or(0.0);
                let end = unit.end.unwrap_or(1.0);
                for (name, value) in [("start", start), ("end", end)] {
                    if !value.is_finite() || !(0.0..=1.0).contains(&value) {
                        return Err(ValidationError::new(
                            field(name),
                            format!(
                                "must be between 0 and 1 (a fraction of the steps), got {value}"
                            ),
                        ));
                    }
                }
                if start >= end {
                    return Err(ValidationError::new(
                        field("start"),
                        format!("must be less than end ({end}), got {start}"),
                    ));
                }
                Ok(ControlNetUnit {
                    model: unit.model.clone(),
                    image_rgb: image_input::fit_rgb(image, width, height, ResizeMode::Resize),
                    scale,
                    start,
                    end,
                })
            })
            .collect()
    }

    /// Validates the img2img / inpainting fields and fits the images to the output size.
    fn image_conditioning(
        &self,
        init_image: Option<crate::codec::DecodedImage>,
        width: u32,
        height: u32,
    ) -> Result<Option<ImageConditioning>, ValidationError> {
        let Some(init_image) = init_image else {
            let image_only = [
                ("mask_image", self.mask_image.is_some()),
                ("strength", self.strength.is_some()),
                ("resize_mode", self.resize_mode.is_some()),
            ];
            if let Some((field, _)) = image_only.into_iter().find(|(_, given)| *given) {
                return Err(ValidationError::new(field, "needs an init_image"));
            }
            return Ok(None);
        };
        let strength = self.strength.unwrap_or(image_input::DEFAULT_STRENGTH);
        if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
            return Err(ValidationError::new(
                "strength",
                format!("must be greater than 0 and at most 1, got {strength}"),
            ));
        }
        let resize_mode = match self.resize_mode.as_deref() {
            None => ResizeMode::default(),
            Some(name) => ResizeMode::from_name(name).ok_or_else(|| {
                ValidationError::new(
                    "resize_mode",
                    format!("unknown resize mode {name:?}; valid modes: resize, crop, fill"),
                )
            })?,
        };
        let mask_blur = self.mask_blur.unwrap_or(image_input::DEFAULT_MASK_BLUR);
        if mask_blur > image_input::MAX_MASK_BLUR {
            return Err(ValidationError::new(
                "mask_blur",
                format!("must be at most {}, got {mask_blur}", image_input::MAX_MASK_BLUR),
            ));
        }
        let mask = match &self.mask_image {
            Some(data) => {
                let decoded = image_input::decode_mask("mask_image", data)?;
                let fitted = image_input::fit_mask(decoded, width, height, resize_mode);
                Some(image_input::blur_mask(&fitted, width, height, mask_blur))
            }
            None => None,
        };
        let init_rgb = image_input::fit_rgb(init_image, width, height, resize_mode);
        let padding = self.inpaint_full_res_padding.unwrap_or(32);
        if padding > 4096 {
            return Err(ValidationError::new(
                "inpaint_full_res_padding",
                format!("must be at most 4096, got {padding}"),
            ));
        }
        let (init_rgb, mask, full_res) = match (self.inpaint_full_res, mask) {
            (Some(true), Some(mask)) => {
                let (rgb, mask, full) =
                    image_input::full_res_inputs(init_rgb, mask, width, height, padding)
                        .ok_or_else(|| {
                            ValidationError::new("mask_image", "the mask is empty (all black)")
                        })?;
                (rgb, Some(mask), Some(full))
            }
            (Some(true), None) => {
                return Err(ValidationError::new("inpaint_full_res", "needs a mask_image"))
            }
            (_, mask) => (init_rgb, mask, None),
        };
        Ok(Some(ImageConditioning {
            init_rgb,
            strength,
            mask,
            paste_back: self.paste_back.unwrap_or(true),
            full_res,
        }))
    }
}

impl GenerationRequest {
    /// The denoising steps that actually run per image: `steps`, or for img2img /
    /// inpainting `int(steps × strength)` (diffusers' `get_timesteps`, A1111's img2img).
    pub fn denoising_steps(&self) -> usize {
        let steps = self.steps as usize;
        match &self.image {
            Some(image) => ((steps as f64 * image.strength) as usize).min(steps),
            None => steps,
        }
    }

    /// The sampler options of this request.
    pub fn sampler_options(&self) -> SamplerOptions {
        SamplerOptions {
            schedule: self.schedule,
            eta: self.eta,
            s_noise: self.s_noise,
            overrides: self.scheduler_overrides,
        }
    }

    /// The A1111-style "parameters" text for image `index` (written into PNGs).
    pub fn infotext(&self, index: u32) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler.display_name(),
            self.guidance_scale,
            self.seed + u64::from(index),
            self.width,
            self.height,
            self.model
        ));
        if self.schedule != Schedule::Default {
            text.push_str(&format!(", Schedule type: {}", self.schedule.display_name()));
        }
        let overrides = &self.scheduler_overrides;
        if let Some(spacing) = overrides.timestep_spacing {
            text.push_str(&format!(", Timestep spacing: {}", spacing.id()));
        }
        if let Some(zero_snr) = overrides.rescale_betas_zero_snr {
            text.push_str(&format!(", Zero terminal SNR: {zero_snr}"));
        }
        if let Some(prediction_type) = overrides.prediction_type {
            text.push_str(&format!(", Prediction type: {}", prediction_type.id()));
        }
        if self.clip_skip > 1 {
            text.push_str(&format!(", Clip skip: {}", self.clip_skip));
        }
        if self.guidance_rescale > 0.0 {
            text.push_str(&format!(", Guidance rescale: {}", self.guidance_rescale));
        }
        if !self.loras.is_empty() {
            let list: Vec<String> =
                self.loras.iter().map(|l| format!("{}:{}", l.name, l.weight)).collect();
            text.push_str(&format!(", Lora: \"{}\"", list.join(", ")));
        }
        for (i, adapter) in self.t2i_adapters.iter().enumerate() {
            text.push_str(&format!(
                ", T2I-Adapter {i}: \"Model: {}, Scale: {}\"",
                adapter.model, adapter.scale
            ));
        }
        for (index, unit) in self.controlnets.iter().enumerate() {
            // AUTOMATIC1111's sd-webui-controlnet layout, so its PNG Info reads it.
            text.push_str(&format!(
                ", ControlNet {index}: \"Module: none, Model: {}, Weight: {}, Guidance Start: {}, \
                 Guidance End: {}\"",
                unit.model, unit.scale, unit.start, unit.end
            ));
        }
        if self.guess_mode {
            text.push_str(", Guess Mode: True");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelDefaults {
        ModelDefaults { name: "tiny".into(), family: ModelFamily::Sd1, width: 64, height: 64 }
    }

    #[test]
    fn defaults_are_filled_in() {
        let request =
            GenerationParams { prompt: "a cat".into(), seed: Some(3), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
        assert_eq!(
            (request.width, request.height, request.steps, request.n, request.seed),
            (64, 64, 30, 1, 3)
        );
        assert_eq!(request.sdxl.original_size, (64, 64));
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases: Vec<(GenerationParams, &str)> = vec![
            (GenerationParams { width: Some(65), ..Default::default() }, "width"),
            (GenerationParams { steps: Some(0), ..Default::default() }, "steps"),
            (GenerationParams { sampler: Some("nope".into()), ..Default::default() }, "sampler"),
            (GenerationParams { n: Some(0), ..Default::default() }, "n"),
            (
                GenerationParams { guidance_scale: Some(f64::NAN), ..Default::default() },
                "guidance_scale",
            ),
        ];
        for (params, field) in cases {
            let error = params.validate(&model(), &Limits::default()).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
    }

    #[test]
    fn sampler_names_resolve() {
        for name in ["euler_a", "Euler a", "EulerAncestralDiscreteScheduler"] {
            let request = GenerationParams { sampler: Some(name.into()), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
            assert_eq!(request.sampler, SamplerKind::EulerA);
        }
    }

    #[test]
    fn third_batch_sampler_names_resolve() {
        let cases = [
            ("deis", SamplerKind::Deis),
            ("DEIS", SamplerKind::Deis),
            ("DEISMultistepScheduler", SamplerKind::Deis),
            ("lcm", SamplerKind::Lcm),
            ("LCMScheduler", SamplerKind::Lcm),
            ("TCD", SamplerKind::Tcd),
            ("TCDScheduler", SamplerKind::Tcd),
        ];
        for (name, kind) in cases {
            let request = GenerationParams { sampler: Some(name.into()), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
            assert_eq!(request.sampler, kind, "{name}");
        }
        let request =
            GenerationParams { sampler: Some("DEIS Karras".into()), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
        assert_eq!((request.sampler, request.schedule), (SamplerKind::Deis, Schedule::Karras));
        let error = GenerationParams { sampler: Some("deis_3m".into()), ..Default::default() }
            .validate(&model(), &Limits::default())
            .unwrap_err();
        for listed in ["deis", "lcm", "tcd"] {
            assert!(error.to_string().contains(listed), "{error}");
        }
        // TCD takes eta as its gamma.
        let request =
            GenerationParams { sampler: Some("tcd".into()), eta: Some(0.5), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
        assert_eq!(request.sampler_options().eta, Some(0.5));
    }

    #[test]
    fn scheduler_overrides_validate_and_reach_the_sampler_options() {
        let request = GenerationParams {
            sampler: Some("ddim".into()),
            timestep_spacing: Some("Trailing".into()),
            rescale_betas_zero_snr: Some(true),
            prediction_type: Some("v_prediction".into()),
            seed: Some(1),
            ..Default::default()
        }
        .validate(&model(), &Limits::default())
        .unwrap();
        let expected = SchedulerOverrides {
            timestep_spacing: Some(TimestepSpacing::Trailing),
            rescale_betas_zero_snr: Some(true),
            prediction_type: Some(PredictionType::VPrediction),
        };
        assert_eq!(request.scheduler_overrides, expected);
        assert_eq!(request.sampler_options().overrides, expected);
        let text = request.infotext(0);
        assert!(text.contains("Timestep spacing: trailing"), "{text}");
        // Absent fields keep the model's config.
        let plain = GenerationParams::default().validate(&model(), &Limits::default()).unwrap();
        assert!(plain.scheduler_overrides.is_empty());

        let cases: Vec<(GenerationParams, &str, &str)> = vec![
            (
                GenerationParams { timestep_spacing: Some("uniform".into()), ..Default::default() },
                "timestep_spacing",
                "linspace",
            ),
            (
                GenerationParams { prediction_type: Some("flow".into()), ..Default::default() },
                "prediction_type",
                "v_prediction",
            ),
            (
                GenerationParams {
                    sampler: Some("lcm".into()),
                    timestep_spacing: Some("trailing".into()),
                    ..Default::default()
                },
                "timestep_spacing",
                "lcm",
            ),
        ];
        for (params, field, mentions) in cases {
            let error = params.validate(&model(), &Limits::default()).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().contains(mentions), "{error}");
        }
    }

    #[test]
    fn legacy_a1111_names_set_sampler_and_schedule() {
        let cases = [
            ("DPM++ 2M Karras", SamplerKind::DpmPp2m, Schedule::Karras),
            ("LMS Karras", SamplerKind::Lms, Schedule::Karras),
            ("DPM++ 2M SDE Exponential", SamplerKind::DpmPp2mSde, Schedule::Exponential),
            ("Euler a", SamplerKind::EulerA, Schedule::Default),
            ("dpmpp_2m", SamplerKind::DpmPp2m, Schedule::Default),
            ("KDPM2AncestralDiscreteScheduler", SamplerKind::Dpm2A, Schedule::Default),
        ];
        for (name, sampler, schedule) in cases {
            let request = GenerationParams { sampler: Some(name.into()), ..Default::default() }
                .validate(&model(), &Limits::default())
                .unwrap();
            assert_eq!((request.sampler, request.schedule), (sampler, schedule), "{name}");
        }
        // An explicit schedule wins over the one a legacy name implies.
        let request = GenerationParams {
            sampler: Some("DPM++ 2M Karras".into()),
            schedule: Some("beta".into()),
            ..Default::default()
        }
        .validate(&model(), &Limits::default())
        .unwrap();
        assert_eq!(request.schedule, Schedule::Beta);
    }

    #[test]
    fn bad_sampler_options_name_their_field() {
        let cases: Vec<(GenerationParams, &str, &str)> = vec![
            (
                GenerationParams { sampler: Some("DPM++ 9M".into()), ..Default::default() },
                "sampler",
                "dpmpp_2m",
            ),
            (
                GenerationParams { schedule: Some("fast".into()), ..Default::default() },
                "schedule",
                "karras",
            ),
            (
                GenerationParams {
                    sampler: Some("ddim".into()),
                    schedule: Some("karras".into()),
                    ..Default::default()
                },
                "schedule",
                "default",
            ),
            (GenerationParams { eta: Some(0.5), ..Default::default() }, "eta", "ddim"),
            (
                GenerationParams {
                    sampler: Some("ddim".into()),
                    eta: Some(1.5),
                    ..Default::default()
                },
                "eta",
                "between",
            ),
            (GenerationParams { s_noise: Some(-1.0), ..Default::default() }, "s_noise", "between"),
            (
                GenerationParams {
                    sampler: Some("euler".into()),
                    s_noise: Some(1.0),
                    ..Default::default()
                },
                "s_noise",
                "euler",
            ),
        ];
        for (params, field, mentions) in cases {
            let error = params.validate(&model(), &Limits::default()).unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(error.to_string().contains(mentions), "{error}");
        }
    }
}
