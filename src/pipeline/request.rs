//! The generation request as a typestate: every API dialect and the CLI fill a
//! [`GenerationParams`] (anything may be missing or wrong), and only
//! [`GenerationParams::validate`] makes a [`GenerationRequest`], in which every default is
//! filled in and every value is in range. Only validated requests reach the pipeline.

use serde::{Deserialize, Serialize};

use super::image_input::{self, ImageConditioning, ResizeMode};
use super::memory::VaeTiling;
use crate::adapters::lora;
use crate::error::ValidationError;
use crate::models::ModelFamily;
use crate::samplers::{resolve_sampler_name, SamplerKind, SamplerOptions, Schedule};

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
        // Without an explicit size, img2img keeps the init image's size (down to a
        // multiple of 8), as diffusers' image processor does.
        let init_size =
            init_image.as_ref().map(|image| (image.width / 8 * 8, image.height / 8 * 8));
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
                    format!("sampler {} has no eta (only ddim does)", sampler.id()),
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
            vae_tiling,
        })
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
    /// The sampler options of this request.
    pub fn sampler_options(&self) -> SamplerOptions {
        SamplerOptions { schedule: self.schedule, eta: self.eta, s_noise: self.s_noise }
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
