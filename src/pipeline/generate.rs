//! Loading a model into a [`Pipeline`] and running a [`GenerationRequest`] through it:
//! text encoding → initial noise from the seed → the denoising loop with
//! classifier-free guidance → VAE decode → RGB8. Follows diffusers'
//! `StableDiffusionPipeline` / `StableDiffusionXLPipeline` step for step.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::image_input::{self, ImageConditioning};
use super::memory::{MemorySettings, VaeTiling};
use super::t2i_adapter::{adapter_features, FeatureContext};
use super::text::{tokenizer_from, EncoderStage, PromptContext, PromptEncoder, TextConditioning};
use super::{GeneratedImage, GenerationRequest, ModelDefaults, StepObserver};
use crate::adapters::controlnet::ControlNetLibrary;
use crate::adapters::ip_adapter::{IpAdapterCache, IpAdapterLibrary};
use crate::adapters::lora::targets::{patch_weights, with_overrides, Component, ModuleTable};
use crate::adapters::lora::{LoraError, LoraLibrary};
use crate::adapters::t2i::T2IAdapterLibrary;
use crate::error::{ModelError, PipelineError, ValidationError};
use crate::models::clip::ClipTextModel;
use crate::models::controlnet::{ControlNet, ControlScale};
use crate::models::loader::{self, ModelLayout, NetworkWeights};
use crate::models::unet::{
    AddedConditions, CrossAttentionExtras, ExtraKeyValues, UNet, UNetResiduals,
};
use crate::models::vae::AutoencoderKl;
use crate::models::vae_tiling::{self, TileLayout};
use crate::models::ModelFamily;
use crate::samplers::{Sampler, SchedulerConfig, TorchGenerator};

mod batch;
pub use batch::BatchKey;

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
    /// What [`Pipeline::generate`] encodes prompts with (embeddings).
    prompt_context: PromptContext,
    /// The base weights of the UNet and text encoders, for LoRA-patched rebuilds.
    weights: NetworkWeights,
    /// Every adaptable weight under the names LoRA files use for it.
    lora_targets: ModuleTable,
    /// Where request LoRA names resolve (empty: none do).
    loras: Arc<LoraLibrary>,
    /// Where request T2I-Adapter names resolve (empty: none do).
    t2i_adapters: Arc<T2IAdapterLibrary>,
    /// Where request ControlNet names resolve (empty: none do).
    controlnets: Arc<ControlNetLibrary>,
    /// Where IP-Adapter names the server or CLI did not resolve resolve (empty: none do).
    ip_adapter_library: Arc<IpAdapterLibrary>,
    /// IP-Adapters loaded onto this pipeline's device.
    ip_adapter_cache: IpAdapterCache,
    /// When `vae_tiling: auto` tiles.
    memory: MemorySettings,
}

/// The networks one request runs with where its LoRAs change them; `None` = the base.
#[derive(Default)]
struct PatchedNetworks {
    unet: Option<UNet>,
    text_encoders: [Option<ClipTextModel>; 2],
}

impl PatchedNetworks {
    fn encoders(&self) -> [Option<&ClipTextModel>; 2] {
        [self.text_encoders[0].as_ref(), self.text_encoders[1].as_ref()]
    }
}

fn lora_failure(error: LoraError) -> PipelineError {
    ValidationError::new("loras", error.to_string()).into()
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
        let lora_targets = ModuleTable::build(&loaded.weights);
        Ok(Pipeline {
            weights: loaded.weights,
            lora_targets,
            loras: Arc::new(LoraLibrary::default()),
            t2i_adapters: Arc::new(T2IAdapterLibrary::default()),
            controlnets: Arc::new(ControlNetLibrary::default()),
            ip_adapter_library: Arc::default(),
            ip_adapter_cache: IpAdapterCache::default(),
            defaults: defaults_from(name, &loaded.layout),
            layout: loaded.layout,
            prompts,
            unet: loaded.unet,
            vae: loaded.vae,
            scheduler,
            device: options.device.clone(),
            dtype: options.dtype,
            prompt_context: PromptContext::default(),
            memory: MemorySettings::default(),
        })
    }

    /// Lets requests name the LoRAs of `library`.
    pub fn with_lora_library(mut self, library: Arc<LoraLibrary>) -> Pipeline {
        self.loras = library;
        self
    }

    /// Lets requests name the T2I-Adapters of `library`.
    pub fn with_t2i_adapter_library(mut self, library: Arc<T2IAdapterLibrary>) -> Pipeline {
        self.t2i_adapters = library;
        self
    }

    /// Lets requests name the IP-Adapters of `library` (names the server or CLI already
    /// resolved to a path need no library).
    pub fn with_ip_adapter_library(mut self, library: Arc<IpAdapterLibrary>) -> Pipeline {
        self.ip_adapter_library = library;
        self
    }

    /// The image tokens of the request's IP-Adapters, projected to keys and values for
    /// every cross-attention layer of `unet`, laid out like the guidance batch
    /// (`[unconditional × n, conditional × n]`, as diffusers'
    /// `prepare_ip_adapter_image_embeds`). `None` without adapters.
    fn ip_adapter_extras(
        &self,
        request: &GenerationRequest,
        unet: &UNet,
        n: usize,
        guided: bool,
    ) -> Result<Option<CrossAttentionExtras>, PipelineError> {
        if request.ip_adapters.is_empty() {
            return Ok(None);
        }
        let widths = unet.cross_attention_widths();
        let context_width = unet.config().cross_attention_dim.for_block(0).unwrap_or(0);
        let mut layers: Vec<Vec<ExtraKeyValues>> = vec![Vec::new(); widths.len()];
        for (index, choice) in request.ip_adapters.iter().enumerate() {
            let field = format!("ip_adapters[{index}].model");
            let invalid = |message: String| -> PipelineError {
                ValidationError::new(field.clone(), message).into()
            };
            let path = match &choice.path {
                Some(path) => path.clone(),
                None => self
                    .ip_adapter_library
                    .resolve(&choice.model)
                    .map_err(|e| invalid(e.to_string()))?,
            };
            let adapter = self
                .ip_adapter_cache
                .load(&path, &self.device, self.dtype)
                .map_err(|e| invalid(e.to_string()))?;
            let adapter_widths = adapter.weights.layer_widths();
            if adapter_widths != widths || adapter.weights.cross_attention_dim != context_width {
                return Err(invalid(format!(
                    "IP-Adapter {:?} does not fit this model: it has {} attention layers of \
                     widths {adapter_widths:?} for {}-wide context, the model {} of widths \
                     {widths:?} for {context_width}-wide context (an adapter for another \
                     model family?)",
                    choice.model,
                    adapter_widths.len(),
                    adapter.weights.cross_attention_dim,
                    widths.len()
                )));
            }
            // diffusers skips an adapter whose scale is 0; the load above still checks it.
            if choice.scale == 0.0 {
                continue;
            }
            let (conditional, unconditional) = adapter.image_tokens(&choice.images)?;
            let conditional = conditional.repeat((n, 1, 1))?;
            let tokens = if guided {
                Tensor::cat(&[unconditional.repeat((n, 1, 1))?, conditional], 0)?
            } else {
                conditional
            };
            for (layer, (key, value)) in layers.iter_mut().zip(adapter.weights.key_values(&tokens)?)
            {
                layer.push(ExtraKeyValues { key, value, scale: choice.scale });
            }
        }
        Ok(Some(CrossAttentionExtras { layers }))
    }

    /// Sets the deployment's memory settings (when `vae_tiling: auto` tiles).
    pub fn set_memory_settings(&mut self, memory: MemorySettings) {
        self.memory = memory;
    }

    /// The tile layout a `width × height` request's VAE passes use under `mode`; `None`
    /// when they run untiled.
    pub fn vae_tile_layout(&self, mode: VaeTiling, width: u32, height: u32) -> Option<TileLayout> {
        mode.applies(width, height, &self.memory).then(|| {
            let mut layout = TileLayout::from_config(self.vae.config());
            if let Some(pixels) = self.memory.vae_tile_pixels {
                let scale = (layout.sample_tile / layout.latent_tile).max(1);
                layout.latent_tile = (pixels / scale).max(1);
                layout.sample_tile = layout.latent_tile * scale;
            }
            layout
        })
    }

    /// The LoRA library requests resolve names in.
    pub fn lora_library(&self) -> &Arc<LoraLibrary> {
        &self.loras
    }

    /// Lets requests name the ControlNets of `library`.
    pub fn with_controlnet_library(mut self, library: Arc<ControlNetLibrary>) -> Pipeline {
        self.controlnets = library;
        self
    }

    /// Loads the request's ControlNets (checking that each fits this model) and embeds
    /// their control images, as diffusers' ControlNet pipelines prepare them: RGB in
    /// [0, 1], no normalisation.
    fn prepare_controlnets(
        &self,
        request: &GenerationRequest,
    ) -> Result<Vec<PreparedControlNet>, PipelineError> {
        let unet = self.unet.config();
        let blocks = unet.block_out_channels.len();
        let unet_layers = unet.layers_per_block.expand(blocks, "layers_per_block")?;
        let unet_context = unet.cross_attention_dim.for_block(0);
        let (width, height) = (request.width as usize, request.height as usize);
        request
            .controlnets
            .iter()
            .enumerate()
            .map(|(index, unit)| {
                let field = format!("controlnets[{index}].model");
                let model = self
                    .controlnets
                    .load(&unit.model, &self.device, self.dtype)
                    .map_err(|e| ValidationError::new(field.clone(), e.to_string()))?;
                let config = model.config();
                let layers = config.layers_per_block.expand(blocks, "layers_per_block").ok();
                let fits = config.block_out_channels == unet.block_out_channels
                    && layers.as_ref() == Some(&unet_layers)
                    && config.context_width() == unet_context
                    && config.uses_text_time() == unet.uses_text_time()
                    && config.in_channels == self.vae.config().latent_channels;
                if !fits {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "ControlNet {:?} was made for another model family or size \
                             (blocks {:?}, context width {:?}); this model has blocks {:?}, \
                             context width {:?}",
                            unit.model,
                            config.block_out_channels,
                            config.context_width(),
                            unet.block_out_channels,
                            unet_context
                        ),
                    )
                    .into());
                }
                if config.conditioning_channels != 3 {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "ControlNet {:?} takes {} conditioning channels; only RGB (3) \
                             control images are supported",
                            unit.model, config.conditioning_channels
                        ),
                    )
                    .into());
                }
                let pixels = Tensor::from_vec(
                    unit.image_rgb.iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>(),
                    (height, width, 3),
                    &self.device,
                )?
                .permute((2, 0, 1))?
                .unsqueeze(0)?
                .to_dtype(self.dtype)?;
                let condition = model.embed_condition(&pixels)?;
                Ok(PreparedControlNet { model, condition, unit: unit.clone() })
            })
            .collect()
    }

    /// Builds the UNet / text encoders that `request`'s LoRAs change, from the base
    /// weights with the merged copies swapped in; the base networks stay untouched, so
    /// the next request without LoRAs runs on exactly the original weights.
    fn patched_networks(
        &self,
        request: &GenerationRequest,
    ) -> Result<PatchedNetworks, PipelineError> {
        if request.loras.is_empty() {
            return Ok(PatchedNetworks::default());
        }
        let started = std::time::Instant::now();
        let files = request
            .loras
            .iter()
            .map(|choice| Ok((self.loras.load(&choice.name)?, choice.weight)))
            .collect::<Result<Vec<_>, LoraError>>()
            .map_err(lora_failure)?;
        let overrides =
            patch_weights(&self.weights, &self.lora_targets, &files).map_err(lora_failure)?;
        let mut patched = PatchedNetworks::default();
        for (component, replaced) in &overrides.by_component {
            let base = self
                .weights
                .tensors(component.id())
                .expect("overrides only name loaded components; this is a bug");
            let builder =
                VarBuilder::from_tensors(with_overrides(base, replaced), self.dtype, &self.device);
            match component {
                Component::Unet => patched.unet = Some(UNet::new(builder, self.unet.config())?),
                Component::TextEncoder | Component::TextEncoder2 => {
                    let second = *component == Component::TextEncoder2;
                    let stage = if second { &self.prompts.second } else { &self.prompts.first };
                    let config = stage
                        .as_ref()
                        .expect("weights exist only for loaded encoders; this is a bug")
                        .encoder
                        .config();
                    let encoder = ClipTextModel::new(builder, config, second)?;
                    patched.text_encoders[usize::from(second)] = Some(encoder);
                }
            }
        }
        tracing::debug!(
            loras = request.loras.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "LoRAs merged"
        );
        Ok(patched)
    }

    /// The model's name, family and native size.
    pub fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    /// The scheduler configuration the model shipped with.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Sets the context [`Pipeline::generate`] encodes prompts with (the embeddings a
    /// worker offers); [`Pipeline::generate_with`] takes one per call instead.
    pub fn set_prompt_context(&mut self, context: PromptContext) {
        self.prompt_context = context;
    }

    /// The context [`Pipeline::generate`] uses.
    pub fn prompt_context(&self) -> &PromptContext {
        &self.prompt_context
    }

    /// Encodes the prompt and the negative prompt in A1111's prompt syntax; when their
    /// chunk counts differ, the shorter is padded with empty-prompt chunks.
    fn conditioning(
        &self,
        request: &GenerationRequest,
        guided: bool,
        context: &PromptContext,
        encoders: [Option<&ClipTextModel>; 2],
    ) -> Result<(TextConditioning, Option<TextConditioning>), PipelineError> {
        let positive = self.prompts.encode_prompt_with(
            &request.prompt,
            request.clip_skip,
            context,
            "prompt",
            encoders,
        )?;
        if !guided {
            return Ok((positive, None));
        }
        let negative =
            if request.negative_prompt.is_empty() && self.layout.force_zeros_for_empty_prompt {
                positive.zeros_like()?
            } else {
                self.prompts.encode_prompt_with(
                    &request.negative_prompt,
                    request.clip_skip,
                    context,
                    "negative_prompt",
                    encoders,
                )?
            };
        if positive.context.dim(1)? == negative.context.dim(1)? {
            return Ok((positive, Some(negative)));
        }
        let empty = self.prompts.encode_prompt("", request.clip_skip, context, "prompt")?;
        let (positive, negative) = PromptEncoder::pad_to_same_length(positive, negative, &empty)?;
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
        self.generate_with(request, &self.prompt_context, observer)
    }

    /// [`Pipeline::generate`] with an explicit prompt context (embeddings).
    pub fn generate_with(
        &self,
        request: &GenerationRequest,
        context: &PromptContext,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let latents = self.denoise_with(request, context, observer)?;
        self.decode(&latents, request)
    }

    /// The denoising part of [`Pipeline::generate`]: returns the final latents
    /// (`[n, 4, height / 8, width / 8]`, f32), before the VAE.
    pub fn denoise(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor, PipelineError> {
        self.denoise_with(request, &self.prompt_context, observer)
    }

    /// [`Pipeline::denoise`] with an explicit prompt context (embeddings).
    pub fn denoise_with(
        &self,
        request: &GenerationRequest,
        context: &PromptContext,
        observer: &mut dyn StepObserver,
    ) -> Result<Tensor, PipelineError> {
        let n = request.n as usize;
        let guided = request.guidance_scale > 1.0;
        let patched = self.patched_networks(request)?;
        let unet = patched.unet.as_ref().unwrap_or(&self.unet);
        let (positive, negative) =
            self.conditioning(request, guided, context, patched.encoders())?;

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

        let ip_extras = self.ip_adapter_extras(request, unet, n, guided)?;

        let latent_channels = self.vae.config().latent_channels;
        let in_channels = self.unet.config().in_channels;
        let masked = request.image.as_ref().is_some_and(|image| image.mask.is_some());
        let inpainting_unet = in_channels == 2 * latent_channels + 1;
        if in_channels != latent_channels && !(masked && inpainting_unet) {
            let reason = if inpainting_unet {
                format!(
                    "this UNet takes {in_channels} input channels (an inpainting model); it \
                     needs an init_image and a mask_image"
                )
            } else {
                format!(
                    "this UNet takes {in_channels} input channels; this pipeline runs \
                     {latent_channels}-channel models (and inpainting models with a mask)"
                )
            };
            return Err(ValidationError::new("model", reason).into());
        }
        let steps = request.steps as usize;
        // A sampler that cannot run this request on this model's schedule (e.g. LCM asked
        // for more steps than its distillation schedule has) is the request's problem.
        let mut sampler = request
            .sampler
            .build_with(&self.scheduler, steps, &request.sampler_options())
            .map_err(|error| {
                let error = crate::error::without_backtrace(error);
                ValidationError::new("sampler", format!("{}: {error}", request.sampler.id()))
            })?;
        let mut generators: Vec<TorchGenerator> =
            (0..n).map(|i| TorchGenerator::new(request.seed.wrapping_add(i as u64))).collect();
        let latent_shape =
            (1, latent_channels, request.height as usize / 8, request.width as usize / 8);
        let start = match &request.image {
            None => {
                let noise = generators
                    .iter_mut()
                    .map(|g| g.randn_tensor(latent_shape, &self.device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let latents = (Tensor::cat(&noise, 0)? * sampler.init_noise_sigma())?;
                ImageStart { start: 0, latents, blend: None, extra_channels: None }
            }
            Some(image) => self.image_start(
                image,
                request,
                sampler.as_ref(),
                &mut generators,
                inpainting_unet && masked,
                guided,
            )?,
        };
        let ImageStart { start, mut latents, blend, extra_channels } = start;
        let feature_context = FeatureContext {
            library: &self.t2i_adapters,
            unet: unet.config(),
            width: request.width,
            height: request.height,
            images: n,
            guided,
            device: &self.device,
            dtype: self.dtype,
        };
        // T2I-Adapter features are the same at every step; ControlNet residuals are not.
        let adapter_features = adapter_features(&request.t2i_adapters, &feature_context)?;

        let controlnets = self.prepare_controlnets(request)?;
        // diffusers' `guess_mode or controlnet.config.global_pool_conditions` (first net).
        let guess_mode = request.guess_mode
            || controlnets.first().is_some_and(|c| c.model.config().global_pool_conditions);
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len() - start;
        for (index, &timestep) in timesteps.iter().enumerate().skip(start) {
            if observer.should_cancel() {
                return Err(PipelineError::Cancelled);
            }
            let model_input =
                if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let mut model_input = sampler.scale_model_input(&model_input, index)?;
            let mut residuals = if controlnets.is_empty() {
                UNetResiduals::default()
            } else {
                let step = ControlStep {
                    latents: &latents,
                    model_input: &model_input,
                    sampler: sampler.as_ref(),
                    index,
                    position: (index - start, total),
                    timestep,
                    context: &context,
                    added: added.as_ref(),
                    guided,
                    guess_mode,
                    images: n,
                };
                self.control_residuals(&controlnets, &step)?
            };
            residuals.down_intrablock = adapter_features.clone();
            if let Some(extra) = &extra_channels {
                model_input = Tensor::cat(&[&model_input, extra], 1)?;
            }
            let prediction = unet
                .forward_with_adapters(
                    &model_input.to_dtype(self.dtype)?,
                    timestep,
                    &context,
                    added.as_ref(),
                    &residuals,
                    ip_extras.as_ref(),
                )?
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
            if let Some(blend) = &blend {
                // diffusers' 4-channel inpainting: keep the original outside the mask,
                // noised to the level of the next step (clean after the last one).
                let original = if index + 1 < timesteps.len() {
                    sampler.add_noise(&blend.image_latents, &blend.noise, index + 1)?
                } else {
                    blend.image_latents.clone()
                };
                let keep = (1.0 - &blend.mask)?;
                latents = (original.broadcast_mul(&keep)? + latents.broadcast_mul(&blend.mask)?)?;
            }
            observer.on_step(0, index + 1 - start, total);
        }
        Ok(latents)
    }

    /// The summed residuals of the request's ControlNets for one step, as diffusers'
    /// ControlNet pipelines compute them: each net's scale times its guidance-window keep
    /// (`1 - (i / steps < start or (i + 1) / steps > end)`, over the steps this run
    /// takes); in guess mode with guidance the nets see only the prompt's half of the
    /// batch and add zeros to the unconditional half. Nets whose scale is 0 this step are
    /// skipped (diffusers adds their zeros).
    fn control_residuals(
        &self,
        controlnets: &[PreparedControlNet],
        step: &ControlStep<'_>,
    ) -> Result<UNetResiduals, PipelineError> {
        let (position, steps) = step.position;
        let conditional_only = step.guess_mode && step.guided;
        let n = step.images;
        let (input, context, added) = if conditional_only {
            let input = step.sampler.scale_model_input(step.latents, step.index)?;
            let added = match step.added {
                Some(added) => Some(AddedConditions {
                    text_embeds: added.text_embeds.narrow(0, n, n)?,
                    time_ids: added.time_ids.narrow(0, n, n)?,
                }),
                None => None,
            };
            (input, step.context.narrow(0, n, n)?, added)
        } else {
            (step.model_input.clone(), step.context.clone(), step.added.cloned())
        };
        let input = input.to_dtype(self.dtype)?;
        let mut sum: Option<(Vec<Tensor>, Tensor)> = None;
        for prepared in controlnets {
            let unit = &prepared.unit;
            let outside = (position as f64 / steps as f64) < unit.start
                || ((position + 1) as f64 / steps as f64) > unit.end;
            let scale = if outside { 0.0 } else { unit.scale };
            if scale == 0.0 {
                continue;
            }
            let residuals = prepared.model.forward(
                &input,
                step.timestep,
                &context,
                added.as_ref(),
                &prepared.condition,
                ControlScale { scale, guess_mode: step.guess_mode },
            )?;
            let down = residuals.down_block.expect("ControlNets fill down_block; this is a bug");
            let mid = residuals.mid_block.expect("ControlNets fill mid_block; this is a bug");
            sum = Some(match sum {
                None => (down, mid),
                Some((total_down, total_mid)) => (
                    total_down
                        .iter()
                        .zip(&down)
                        .map(|(a, b)| a.broadcast_add(b))
                        .collect::<candle_core::Result<Vec<_>>>()?,
                    total_mid.broadcast_add(&mid)?,
                ),
            });
        }
        let Some((mut down, mut mid)) = sum else {
            return Ok(UNetResiduals::default());
        };
        if conditional_only {
            let with_zeros = |t: &Tensor| -> candle_core::Result<Tensor> {
                // Pooled residuals are [n, C, 1, 1]; widen before pairing with zeros.
                let t = t.broadcast_as(t.dims())?.contiguous()?;
                Tensor::cat(&[&t.zeros_like()?, &t], 0)
            };
            down = down.iter().map(with_zeros).collect::<candle_core::Result<Vec<_>>>()?;
            mid = with_zeros(&mid)?;
        }
        Ok(UNetResiduals { down_block: Some(down), mid_block: Some(mid), down_intrablock: None })
    }

    /// img2img / inpainting start, as diffusers' `StableDiffusionImg2ImgPipeline` and
    /// `StableDiffusionInpaintPipeline` prepare it: the init image VAE-encoded and sampled
    /// from its latent distribution, noised to the first step `strength` keeps
    /// (`get_timesteps`). Each image's generator draws, in diffusers' order, the encoder
    /// sample, the start noise, then (inpainting) the masked-image encoder sample.
    fn image_start(
        &self,
        image: &ImageConditioning,
        request: &GenerationRequest,
        sampler: &dyn Sampler,
        generators: &mut [TorchGenerator],
        inpainting_unet: bool,
        guided: bool,
    ) -> Result<ImageStart, PipelineError> {
        let steps = request.steps as usize;
        let kept_steps = request.denoising_steps();
        if kept_steps == 0 {
            return Err(ValidationError::new(
                "strength",
                format!(
                    "strength {} of {steps} steps leaves no step to run; raise strength or steps",
                    image.strength
                ),
            )
            .into());
        }
        let start = (steps - kept_steps) * sampler.order();
        let full_strength = image.strength == 1.0;
        let (width, height) = (request.width as usize, request.height as usize);
        let pixels = Tensor::from_vec(
            image.init_rgb.iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect::<Vec<_>>(),
            (height, width, 3),
            &self.device,
        )?
        .permute((2, 0, 1))?
        .unsqueeze(0)?;
        // 9-channel models at full strength start from pure noise: diffusers skips the
        // encoder sample (and its draw) there.
        let encode_init = !(inpainting_unet && full_strength);
        let tiling = self.vae_tile_layout(request.vae_tiling, request.width, request.height);
        let init = if encode_init {
            Some(self.encode_distribution(&pixels, tiling.as_ref())?)
        } else {
            None
        };
        let latent_shape = (1, self.vae.config().latent_channels, height / 8, width / 8);
        let mut image_latents = Vec::new();
        let mut noises = Vec::new();
        for generator in generators.iter_mut() {
            if let Some(init) = &init {
                image_latents.push(init.sample(generator, self.vae.config())?);
            }
            noises.push(generator.randn_tensor(latent_shape, &self.device)?);
        }
        let noise = Tensor::cat(&noises, 0)?;
        let image_latents =
            if image_latents.is_empty() { None } else { Some(Tensor::cat(&image_latents, 0)?) };
        // A sampler without `add_noise` cannot start part-way: the request's choice.
        let unsupported = |e: candle_core::Error| -> PipelineError {
            ValidationError::new("sampler", format!("{}: {e}", request.sampler.id())).into()
        };
        let latents = match (&image.mask, &image_latents) {
            (Some(_), _) if full_strength => {
                // Probe so the refusal comes before any step, as for the other paths.
                let probe = Tensor::zeros(latent_shape, DType::F32, &self.device)?;
                sampler.add_noise(&probe, &probe, start).map_err(unsupported)?;
                (&noise * sampler.init_noise_sigma())?
            }
            (_, Some(clean)) => sampler.add_noise(clean, &noise, start).map_err(unsupported)?,
            (_, None) => unreachable!("the init image is encoded unless masked at full strength"),
        };
        let Some(mask) = &image.mask else {
            return Ok(ImageStart { start, latents, blend: None, extra_channels: None });
        };
        let latent_mask = Tensor::from_vec(
            image_input::latent_mask(mask, request.width, request.height),
            (1, 1, height / 8, width / 8),
            &self.device,
        )?;
        let keep = Tensor::from_vec(
            image_input::binarized(mask).into_iter().map(|m| 1.0 - m).collect::<Vec<f32>>(),
            (1, 1, height, width),
            &self.device,
        )?;
        let masked_pixels = pixels.broadcast_mul(&keep)?;
        if inpainting_unet {
            let masked = self.encode_distribution(&masked_pixels, tiling.as_ref())?;
            let masked_latents = generators
                .iter_mut()
                .map(|g| masked.sample(g, self.vae.config()))
                .collect::<Result<Vec<_>, PipelineError>>()?;
            let n = generators.len();
            let extra = Tensor::cat(
                &[latent_mask.repeat((n, 1, 1, 1))?, Tensor::cat(&masked_latents, 0)?],
                1,
            )?;
            let extra = if guided { Tensor::cat(&[&extra, &extra], 0)? } else { extra };
            return Ok(ImageStart { start, latents, blend: None, extra_channels: Some(extra) });
        }
        // diffusers encodes the masked image for 4-channel models too (and discards it);
        // the draw it makes is repeated so later noise (ancestral samplers) matches.
        for generator in generators.iter_mut() {
            generator.randn_tensor(latent_shape, &self.device)?;
        }
        let image_latents =
            image_latents.expect("4-channel inpainting always encodes the init image");
        Ok(ImageStart {
            start,
            latents,
            blend: Some(LatentBlend { image_latents, noise, mask: latent_mask }),
            extra_channels: None,
        })
    }

    /// The VAE's latent distribution of images in [-1, 1] (`[1, 3, H, W]`), in f32, tiled
    /// when `tiling` is given.
    fn encode_distribution(
        &self,
        pixels: &Tensor,
        tiling: Option<&TileLayout>,
    ) -> Result<EncodedImage, PipelineError> {
        let pixels = pixels.to_dtype(self.vae_dtype())?;
        let distribution = vae_tiling::encode(&self.vae, &pixels, tiling)?;
        let mean = distribution.mean.to_dtype(DType::F32)?;
        let std = (distribution.logvar.to_dtype(DType::F32)? * 0.5)?.exp()?;
        Ok(EncodedImage { mean, std })
    }

    /// Decodes final latents to 8-bit RGB images (row-major, one `Vec` per image), as
    /// diffusers' image processor does: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    pub fn decode_latents_to_rgb(&self, latents: &Tensor) -> Result<Vec<Vec<u8>>, PipelineError> {
        self.decode_latents_to_rgb_tiled(latents, None)
    }

    /// [`Pipeline::decode_latents_to_rgb`], one image at a time (VAE slicing) and tiled
    /// when `tiling` is given.
    pub fn decode_latents_to_rgb_tiled(
        &self,
        latents: &Tensor,
        tiling: Option<&TileLayout>,
    ) -> Result<Vec<Vec<u8>>, PipelineError> {
        let vae_dtype = self.vae_dtype();
        let mut scaled = (latents / self.vae.config().scaling_factor)?;
        if let Some(shift) = self.vae.config().shift_factor {
            scaled = (scaled + shift)?;
        }
        let decoded = vae_tiling::decode(&self.vae, &scaled.to_dtype(vae_dtype)?, tiling)?
            .to_dtype(DType::F32)?;
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

    /// Encodes one prompt (A1111 syntax, chunked, with `context`'s embeddings) as the
    /// pipeline conditions the UNet on it; `field` names it in errors.
    pub fn encode_prompt(
        &self,
        text: &str,
        clip_skip: u32,
        context: &PromptContext,
        field: &str,
    ) -> Result<TextConditioning, PipelineError> {
        self.prompts.encode_prompt(text, clip_skip, context, field)
    }

    /// Encodes `text` literally (no prompt syntax; truncated to 77 tokens), as diffusers'
    /// `encode_prompt` does.
    pub fn encode_literal(
        &self,
        text: &str,
        clip_skip: u32,
    ) -> Result<TextConditioning, PipelineError> {
        self.prompts.encode(text, clip_skip)
    }

    /// Benchmark hook: encodes the request's prompt.
    pub fn bench_text(
        &self,
        request: &GenerationRequest,
    ) -> Result<TextConditioning, PipelineError> {
        let encoded = self.prompts.encode_prompt(
            &request.prompt,
            request.clip_skip,
            &self.prompt_context,
            "prompt",
        )?;
        // GPU work is queued asynchronously: wait for it, or the timing stops early.
        self.device.synchronize()?;
        Ok(encoded)
    }

    /// Benchmark hook: one UNet forward at the request's size with `batch` latents
    /// (2 = one image with classifier-free guidance).
    pub fn bench_unet_step(
        &self,
        request: &GenerationRequest,
        batch: usize,
    ) -> Result<(), PipelineError> {
        let (positive, _) =
            self.conditioning(request, false, &self.prompt_context, [None, None])?;
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
        self.device.synchronize()?;
        Ok(())
    }

    /// Benchmark hook: one VAE decode at the request's size (tiled as the request's
    /// `vae_tiling` says).
    pub fn bench_vae_decode(
        &self,
        request: &GenerationRequest,
    ) -> Result<Vec<Vec<u8>>, PipelineError> {
        let tiling = self.vae_tile_layout(request.vae_tiling, request.width, request.height);
        let shape = (
            1,
            self.vae.config().latent_channels,
            request.height as usize / 8,
            request.width as usize / 8,
        );
        let latents = Tensor::zeros(shape, DType::F32, &self.device)?;
        self.decode_latents_to_rgb_tiled(&latents, tiling.as_ref())
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
        let tiling = self.vae_tile_layout(request.vae_tiling, request.width, request.height);
        let pixels = self.decode_latents_to_rgb_tiled(latents, tiling.as_ref())?;
        Ok(self.images_from_rgb(pixels, request))
    }

    /// A request's decoded RGB images as [`GeneratedImage`]s, pasted back into the
    /// original where the request's inpainting asks for it.
    fn images_from_rgb(
        &self,
        mut pixels: Vec<Vec<u8>>,
        request: &GenerationRequest,
    ) -> Vec<GeneratedImage> {
        if let Some(image) = &request.image {
            if let Some(full) = &image.full_res {
                // "Inpaint only masked": the region goes back into the whole image.
                for rgb in &mut pixels {
                    *rgb = image_input::paste_full_res(
                        rgb,
                        request.width,
                        request.height,
                        full,
                        image.paste_back,
                    );
                }
            } else if let (Some(mask), true) = (&image.mask, image.paste_back) {
                for rgb in &mut pixels {
                    image_input::paste_back(rgb, &image.init_rgb, mask);
                }
            }
        }
        pixels
            .into_iter()
            .enumerate()
            .map(|(index, rgb)| GeneratedImage {
                index: index as u32,
                seed: request.seed.wrapping_add(index as u64),
                width: request.width,
                height: request.height,
                rgb,
            })
            .collect()
    }
}

/// A request's ControlNet, loaded, with its control image embedded.
struct PreparedControlNet {
    model: Arc<ControlNet>,
    /// The embedded control image, `[1, C, h, w]` (broadcast over the batch).
    condition: Tensor,
    unit: crate::pipeline::ControlNetUnit,
}

/// What the ControlNets of one denoising step see.
struct ControlStep<'a> {
    /// The unscaled latents of the `n` images.
    latents: &'a Tensor,
    /// The UNet's scaled input (doubled under guidance), before inpainting channels.
    model_input: &'a Tensor,
    sampler: &'a dyn Sampler,
    /// Index into the sampler's timesteps.
    index: usize,
    /// (step of this run, steps this run takes), for the guidance windows.
    position: (usize, usize),
    timestep: f64,
    context: &'a Tensor,
    added: Option<&'a AddedConditions>,
    guided: bool,
    guess_mode: bool,
    images: usize,
}

/// Where an image-conditioned run starts and what its loop needs besides the latents.
struct ImageStart {
    /// First index into the sampler's timesteps.
    start: usize,
    latents: Tensor,
    /// 4-channel inpainting: the original blended back outside the mask each step.
    blend: Option<LatentBlend>,
    /// 9-channel inpainting: `[mask, masked image latents]` appended to the UNet input
    /// (already doubled for guidance).
    extra_channels: Option<Tensor>,
}

struct LatentBlend {
    /// The clean init image latents (scaled), one per image.
    image_latents: Tensor,
    /// The start noise, reused to re-noise the original each step as diffusers does.
    noise: Tensor,
    /// `[1, 1, h, w]`, 1 = repaint.
    mask: Tensor,
}

/// A VAE latent distribution (diagonal Gaussian) in f32.
struct EncodedImage {
    mean: Tensor,
    std: Tensor,
}

impl EncodedImage {
    /// `latent_dist.sample(generator)` times the scaling factor (shift removed first).
    fn sample(
        &self,
        generator: &mut TorchGenerator,
        config: &crate::models::vae::VaeConfig,
    ) -> Result<Tensor, PipelineError> {
        let draw = generator.randn_tensor(self.mean.dims(), self.mean.device())?;
        let mut latents = (&self.mean + (&self.std * draw)?)?;
        if let Some(shift) = config.shift_factor {
            latents = (latents - shift)?;
        }
        Ok((latents * config.scaling_factor)?)
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
    let make: fn(usize) -> candle_core::Result<Device> = match kind.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::new_cuda,
        "metal" => Device::new_metal,
        _ => {
            return Err(ModelError::BadDevice(format!(
                "unknown device {name:?}; use cpu, cuda[:N] or metal[:N]"
            )))
        }
    };
    // One `Device` per GPU for the whole process: candle gives each `new_cuda`/`new_metal`
    // its own device id (cuBLAS handle, loaded kernels), tensors of two ids cannot meet in
    // one op, and the ControlNet / T2I-Adapter caches hand a model loaded for one pipeline
    // to every pipeline on the same GPU (they key by `DeviceLocation`). CUDA work still
    // runs on each calling thread's own stream.
    type Gpus = std::collections::HashMap<(String, usize), Device>;
    static GPUS: std::sync::OnceLock<std::sync::Mutex<Gpus>> = std::sync::OnceLock::new();
    let mut gpus =
        GPUS.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(device) = gpus.get(&(kind.clone(), ordinal)) {
        return Ok(device.clone());
    }
    let device = make(ordinal).map_err(|e| ModelError::BadDevice(format!("{name}: {e}")))?;
    gpus.insert((kind, ordinal), device.clone());
    Ok(device)
}

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn device_names_parse_and_gpus_are_shared() {
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        for bad in ["cuda:x", "tpu", "cuda:-1"] {
            assert!(matches!(parse_device(bad), Err(ModelError::BadDevice(_))), "{bad}");
        }
        // Without a GPU (or the cuda feature) a clean error each time, nothing cached; with
        // one, `cuda` and `cuda:0` are the same device, which tensors can share.
        match (parse_device("cuda:0"), parse_device("cuda")) {
            (Ok(first), Ok(second)) => assert!(first.same_device(&second)),
            (Err(_), Err(_)) => {}
            _ => panic!("cuda and cuda:0 name the same GPU"),
        }
    }
}
