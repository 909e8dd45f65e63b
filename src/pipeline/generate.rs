//! Loading a model into a [`Pipeline`] and running a [`GenerationRequest`] through it:
//! text encoding → initial noise from the seed → the denoising loop with
//! classifier-free guidance → VAE decode → RGB8. Follows diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` step for step.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use super::text::{tokenizer_from, EncoderStage, PromptEncoder, TextConditioning};
use super::{GeneratedImage, GenerationRequest, ModelDefaults, StepObserver};
use crate::error::{ModelError, PipelineError, ValidationError};
use crate::models::loader::{self, ModelLayout};
use crate::models::unet::{AddedConditions, UNet};
use crate::models::vae::AutoencoderKl;
use crate::models::ModelFamily;
use crate::samplers::{SchedulerConfig, TorchGenerator};

/// Where and in which precision a model runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the networks (F32 default; F16/BF16 selectable).
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// A loaded model (text encoders, UNet, VAE, scheduler config) ready to generate.
/// `generate` takes `&self`, so one pipeline may serve jobs one after another; it is
/// `Send + Sync`.
pub struct Pipeline {
    defaults: ModelDefaults,
    layout: ModelLayout,
    prompts: PromptEncoder,
    unet: UNet,
    vae: AutoencoderKl,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
}

fn defaults_from(name: &str, layout: &ModelLayout) -> ModelDefaults {
    ModelDefaults {
        name: name.to_string(),
        family: layout.family,
        width: layout.native_size,
        height: layout.native_size,
    }
}

fn scheduler_config(layout: &ModelLayout) -> Result<SchedulerConfig, ModelError> {
    if layout.scheduler.is_null() {
        return Ok(SchedulerConfig::default());
    }
    serde_json::from_value(layout.scheduler.clone()).map_err(|e| ModelError::BadConfig {
        path: "scheduler/scheduler_config.json".into(),
        reason: e.to_string(),
    })
}

impl Pipeline {
    /// Loads a diffusers folder or a single-file `.safetensors` checkpoint from `path`
    /// and registers it under `name`.
    pub fn load(name: &str, path: &Path, options: &LoadOptions) -> Result<Pipeline, ModelError> {
        let loaded = loader::load(path, &options.device, options.dtype)?;
        let stage = |tokenizer: &Option<_>, encoder| -> Result<Option<EncoderStage>, ModelError> {
            match (tokenizer, encoder) {
                (Some(source), Some(encoder)) => {
                    Ok(Some(EncoderStage { tokenizer: tokenizer_from(source)?, encoder }))
                }
                _ => Ok(None),
            }
        };
        let sdxl = matches!(loaded.layout.family, ModelFamily::Sdxl | ModelFamily::SdxlRefiner);
        let prompts = PromptEncoder {
            first: stage(&loaded.tokenizer, loaded.text_encoder)?,
            second: stage(&loaded.tokenizer_2, loaded.text_encoder_2)?,
            sdxl,
        };
        if prompts.first.is_none() && prompts.second.is_none() {
            return Err(ModelError::UnknownLayout {
                path: path.to_path_buf(),
                reason: "the model has no text encoder".into(),
            });
        }
        let scheduler = scheduler_config(&loaded.layout)?;
        Ok(Pipeline {
            defaults: defaults_from(name, &loaded.layout),
            layout: loaded.layout,
            prompts,
            unet: loaded.unet,
            vae: loaded.vae,
            scheduler,
            device: options.device.clone(),
            dtype: options.dtype,
        })
    }

    /// The model's name, family and native size.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// The scheduler configuration the model shipped with.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Encodes the prompt and the negative prompt.
    fn conditioning(
        &self,
        request: &GenerationRequest,
        guided: bool,
    ) -> Result<(TextConditioning, Option<TextConditioning>), PipelineError> {
        let positive = self.prompts.encode(&request.prompt, request.clip_skip)?;
        if !guided {
            return Ok((positive, None));
        }
        let negative =
            if request.negative_prompt.is_empty() && self.layout.force_zeros_for_empty_prompt {
                positive.zeros_like()?
            } else {
                self.prompts.encode(&request.negative_prompt, request.clip_skip)?
            };
        Ok((positive, Some(negative)))
    }

    /// SDXL's time ids for one half of the guidance batch: `[1, 6]` (base) or `[1, 5]`
    /// (refiner, with an aesthetic score).
    fn time_ids(
        &self,
        request: &GenerationRequest,
        negative: bool,
    ) -> Result<Tensor, PipelineError> {
        let sdxl = &request.sdxl;
        let (original_w, original_h) = sdxl.original_size;
        let (crop_top, crop_left) = sdxl.crop_top_left;
        let (target_w, target_h) = sdxl.target_size;
        let mut ids = vec![original_h as f32, original_w as f32, crop_top as f32, crop_left as f32];
        if self.layout.family == ModelFamily::SdxlRefiner {
            let score = if negative { sdxl.negative_aesthetic_score } else { sdxl.aesthetic_score };
            ids.push(score as f32);
        } else {
            ids.extend([target_h as f32, target_w as f32]);
        }
        let count = ids.len();
        Ok(Tensor::from_vec(ids, (1, count), &self.device)?)
    }

    /// Runs a validated request; one image per `request.n`, image `i` from seed `seed + i`.
    /// All images of the request are denoised together in one batch.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let latents = self.denoise(request, observer)?;
        self.decode(&latents, request)
    }

    /// The denoising part of [`Pipeline::generate`]: returns the final latents
    /// (`[n, 4, height / 8, width / 8]`, f32), before the VAE.
    pub fn denoise(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor, PipelineError> {
        let n = request.n as usize;
        let guided = request.guidance_scale > 1.0;
        let (positive, negative) = self.conditioning(request, guided)?;

        // The guidance batch is [negative × n, positive × n], as diffusers lays it out.
        let repeat = |t: &Tensor| {
            t.repeat(
                vec![n].into_iter().chain(std::iter::repeat_n(1, t.rank() - 1)).collect::<Vec<_>>(),
            )
        };
        let context = match &negative {
            Some(negative) => {
                Tensor::cat(&[repeat(&negative.context)?, repeat(&positive.context)?], 0)?
            }
            None => repeat(&positive.context)?,
        }
        .to_dtype(self.dtype)?;
        let added = if self.unet.config().uses_text_time() {
            let pooled = positive.pooled.as_ref().ok_or_else(|| {
                PipelineError::Model(ModelError::UnknownLayout {
                    path: self.defaults.name.clone().into(),
                    reason: "SDXL UNet without a second text encoder".into(),
                })
            })?;
            let positive_ids = repeat(&self.time_ids(request, false)?)?;
            let (text_embeds, time_ids) = match &negative {
                Some(negative) => {
                    let negative_pooled = negative.pooled.as_ref().unwrap_or(pooled);
                    (
                        Tensor::cat(&[repeat(negative_pooled)?, repeat(pooled)?], 0)?,
                        Tensor::cat(&[repeat(&self.time_ids(request, true)?)?, positive_ids], 0)?,
                    )
                }
                None => (repeat(pooled)?, positive_ids),
            };
            Some(AddedConditions { text_embeds: text_embeds.to_dtype(self.dtype)?, time_ids })
        } else {
            None
        };

        let latent_channels = self.vae.config().latent_channels;
        if self.unet.config().in_channels != latent_channels {
            return Err(ValidationError::new(
                "model",
                format!(
                    "this UNet takes {} input channels (an inpainting model); text-to-image \
                     needs a {latent_channels}-channel model",
                    self.unet.config().in_channels
                ),
            )
            .into());
        }
        let steps = request.steps as usize;
        let mut sampler =
            request.sampler.build_with(&self.scheduler, steps, &request.sampler_options())?;
        let mut generators: Vec<TorchGenerator> =
            (0..n).map(|i| TorchGenerator::new(request.seed.wrapping_add(i as u64))).collect();
        let latent_shape =
            (1, latent_channels, request.height as usize / 8, request.width as usize / 8);
        let noise = generators
            .iter_mut()
            .map(|g| g.randn_tensor(latent_shape, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut latents = (Tensor::cat(&noise, 0)? * sampler.init_noise_sigma())?;

        let timesteps = sampler.timesteps().to_vec();
        for (index, &timestep) in timesteps.iter().enumerate() {
            if observer.should_cancel() {
                return Err(PipelineError::Cancelled);
            }
            let model_input =
                if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let model_input = sampler.scale_model_input(&model_input, index)?;
            let prediction = self
                .unet
                .forward(&model_input.to_dtype(self.dtype)?, timestep, &context, added.as_ref())?
                .to_dtype(DType::F32)?;
            let guided_prediction = if guided {
                let unconditional = prediction.narrow(0, 0, n)?;
                let conditional = prediction.narrow(0, n, n)?;
                let combined = (&unconditional
                    + ((&conditional - &unconditional)? * request.guidance_scale)?)?;
                if request.guidance_rescale > 0.0 {
                    rescale_guidance(&combined, &conditional, request.guidance_rescale)?
                } else {
                    combined
                }
            } else {
                prediction
            };
            latents = sampler.step(&guided_prediction, index, &latents, &mut generators)?;
            observer.on_step(0, index + 1, timesteps.len());
        }
        Ok(latents)
    }

    /// Decodes final latents to 8-bit RGB images (row-major, one `Vec` per image), as
    /// diffusers' image processor does: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    pub fn decode_latents_to_rgb(&self, latents: &Tensor) -> Result<Vec<Vec<u8>>, PipelineError> {
        let vae_dtype = self.vae_dtype();
        let mut scaled = (latents / self.vae.config().scaling_factor)?;
        if let Some(shift) = self.vae.config().shift_factor {
            scaled = (scaled + shift)?;
        }
        let decoded = self.vae.decode(&scaled.to_dtype(vae_dtype)?)?.to_dtype(DType::F32)?;
        let images = ((decoded * 0.5)? + 0.5)?.clamp(0f32, 1f32)?;
        let images = (images * 255.0)?.permute((0, 2, 3, 1))?.to_device(&Device::Cpu)?;
        let count = images.dim(0)?;
        (0..count)
            .map(|i| {
                let values = images.get(i)?.flatten_all()?.to_vec1::<f32>()?;
                // numpy's round() rounds half to even; match it.
                Ok(values.into_iter().map(|v| v.round_ties_even() as u8).collect())
            })
            .collect()
    }

    /// Benchmark hook: encodes the request's prompt.
    pub fn bench_text(
        &self,
        request: &GenerationRequest,
    ) -> Result<TextConditioning, PipelineError> {
        self.prompts.encode(&request.prompt, request.clip_skip)
    }

    /// Benchmark hook: one UNet forward at the request's size with `batch` latents
    /// (2 = one image with classifier-free guidance).
    pub fn bench_unet_step(
        &self,
        request: &GenerationRequest,
        batch: usize,
    ) -> Result<(), PipelineError> {
        let (positive, _) = self.conditioning(request, false)?;
        let context = positive.context.repeat((batch, 1, 1))?.to_dtype(self.dtype)?;
        let latent_channels = self.unet.config().in_channels;
        let shape =
            (batch, latent_channels, request.height as usize / 8, request.width as usize / 8);
        let sample = Tensor::zeros(shape, self.dtype, &self.device)?;
        let added = match &positive.pooled {
            Some(pooled) if self.unet.config().uses_text_time() => Some(AddedConditions {
                text_embeds: pooled.repeat((batch, 1))?.to_dtype(self.dtype)?,
                time_ids: self.time_ids(request, false)?.repeat((batch, 1))?,
            }),
            _ => None,
        };
        self.unet.forward(&sample, 500.0, &context, added.as_ref())?;
        Ok(())
    }

    /// Benchmark hook: one VAE decode at the request's size.
    pub fn bench_vae_decode(
        &self,
        request: &GenerationRequest,
    ) -> Result<Vec<Vec<u8>>, PipelineError> {
        let shape = (
            1,
            self.vae.config().latent_channels,
            request.height as usize / 8,
            request.width as usize / 8,
        );
        self.decode_latents_to_rgb(&Tensor::zeros(shape, DType::F32, &self.device)?)
    }

    fn vae_dtype(&self) -> DType {
        self.vae
            .config()
            .force_upcast
            .then_some(DType::F32)
            .filter(|_| self.dtype == DType::F16)
            .unwrap_or(self.dtype)
    }

    fn decode(
        &self,
        latents: &Tensor,
        request: &GenerationRequest,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let pixels = self.decode_latents_to_rgb(latents)?;
        Ok(pixels
            .into_iter()
            .enumerate()
            .map(|(index, rgb)| GeneratedImage {
                index: index as u32,
                seed: request.seed.wrapping_add(index as u64),
                width: request.width,
                height: request.height,
                rgb,
            })
            .collect())
    }
}

/// diffusers' `rescale_noise_cfg` (Lin et al., "Common Diffusion Noise Schedules and
/// Sample Steps are Flawed", §3.4): rescales the guided prediction to the standard
/// deviation of the text-conditioned one, blended by `factor`.
fn rescale_guidance(
    guided: &Tensor,
    conditional: &Tensor,
    factor: f64,
) -> candle_core::Result<Tensor> {
    let std = |t: &Tensor| -> candle_core::Result<Tensor> {
        let batch = t.dim(0)?;
        let flat = t.reshape((batch, ()))?;
        let count = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(D::Minus1)?;
        let variance = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)? / (count - 1.0))?;
        variance.sqrt()?.reshape((batch, 1, 1, 1))
    };
    let ratio = (std(conditional)? / std(guided)?)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    (rescaled * factor)? + (guided * (1.0 - factor))?
}

/// Reads only the configs of the model at `path` (no weights): its family and native
/// size, for validating requests before the model is loaded.
pub fn probe(name: &str, path: &Path) -> Result<ModelDefaults, ModelError> {
    Ok(defaults_from(name, &loader::read_layout(path)?))
}

/// Parses a device name: `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let name = name.trim().to_ascii_lowercase();
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, index)) => {
            let ordinal = index
                .parse::<usize>()
                .map_err(|_| ModelError::BadDevice(format!("bad device index in {name:?}")))?;
            (kind.to_string(), ordinal)
        }
        None => (name.clone(), 0),
    };
    match kind.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            Device::new_cuda(ordinal).map_err(|e| ModelError::BadDevice(format!("{name}: {e}")))
        }
        "metal" => {
            Device::new_metal(ordinal).map_err(|e| ModelError::BadDevice(format!("{name}: {e}")))
        }
        _ => Err(ModelError::BadDevice(format!(
            "unknown device {name:?}; use cpu, cuda[:N] or metal[:N]"
        ))),
    }
}
