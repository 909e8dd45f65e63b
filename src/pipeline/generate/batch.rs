//! Batching across requests: several text-to-image requests that share model, size,
//! steps, sampler, schedule and guidance (their prompts, negative prompts, seeds, `n`,
//! clip skip, SDXL conditioning and VAE tiling may differ) denoised as one UNet batch, and
//! the result split back per request.
//!
//! Each request's rows are laid out as [`Pipeline::denoise_with`] lays out a lone request
//! (its images' noise from seeds `seed + i`, classifier-free guidance as
//! `[negatives…, positives…]`), so every row sees the same arithmetic as when the request
//! runs alone; the batch only changes the UNet's batch dimension.

use candle_core::{DType, Tensor};

use super::{rescale_guidance, Pipeline};
use crate::error::{ModelError, PipelineError};
use crate::models::unet::AddedConditions;
use crate::pipeline::text::{PromptContext, TextConditioning};
use crate::pipeline::{GeneratedImage, GenerationRequest, StepObserver};
use crate::samplers::TorchGenerator;

/// Everything requests must share to run in one batch. Requests with LoRAs (which change
/// the UNet's weights), adapters (ControlNet, T2I-, IP-Adapter: per-request networks and
/// conditioning) or an init image (img2img / inpainting, which start part-way and carry
/// per-request latents) have none and always run alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    model: String,
    width: u32,
    height: u32,
    steps: u32,
    sampler: &'static str,
    schedule: &'static str,
    /// f64 settings by their bits: equal only when exactly equal.
    eta: Option<u64>,
    s_noise: Option<u64>,
    guidance_scale: u64,
    guidance_rescale: u64,
    scheduler_overrides: crate::samplers::SchedulerOverrides,
}

impl GenerationRequest {
    /// The key of the batches this request may join; `None` when it must run alone.
    pub fn batch_key(&self) -> Option<BatchKey> {
        // Adapters bring per-request networks and conditioning that the batched loop
        // does not carry, so such requests run alone.
        let adapters = !self.controlnets.is_empty()
            || !self.t2i_adapters.is_empty()
            || !self.ip_adapters.is_empty();
        if !self.loras.is_empty() || self.image.is_some() || adapters {
            return None;
        }
        Some(BatchKey {
            model: self.model.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            sampler: self.sampler.id(),
            schedule: self.schedule.id(),
            eta: self.eta.map(f64::to_bits),
            s_noise: self.s_noise.map(f64::to_bits),
            guidance_scale: self.guidance_scale.to_bits(),
            guidance_rescale: self.guidance_rescale.to_bits(),
            scheduler_overrides: self.scheduler_overrides,
        })
    }
}

/// One request of a batch, with its encoded prompts.
struct Member<'a> {
    request: &'a GenerationRequest,
    positive: TextConditioning,
    negative: Option<TextConditioning>,
    /// Set once its observer asked to stop; its rows keep running (the sampler's state
    /// spans the whole batch) but nothing is reported and its result is `Cancelled`.
    cancelled: bool,
}

impl Pipeline {
    /// Runs compatible requests (equal [`GenerationRequest::batch_key`]) as one batch;
    /// one result per request, in order, each equal to what
    /// [`Pipeline::generate_with`] gives the request alone up to the UNet's batch-size
    /// dependent float rounding. `observers[i]` gets request `i`'s progress and may
    /// cancel it alone: the others run on. Requests whose prompts encode to different
    /// lengths (more than 75 tokens) run in separate sub-batches.
    pub fn generate_batch(
        &self,
        requests: &[&GenerationRequest],
        context: &PromptContext,
        observers: &mut [&mut dyn StepObserver],
    ) -> Vec<Result<Vec<GeneratedImage>, PipelineError>> {
        assert_eq!(requests.len(), observers.len(), "one observer per request; this is a bug");
        let key = requests.first().and_then(|r| r.batch_key());
        let batchable = key.is_some() && requests.iter().all(|r| r.batch_key() == key);
        if requests.len() <= 1 || !batchable {
            return requests
                .iter()
                .zip(observers.iter_mut())
                .map(|(request, observer)| self.generate_with(request, context, *observer))
                .collect();
        }
        let mut results: Vec<Option<Result<Vec<GeneratedImage>, PipelineError>>> =
            (0..requests.len()).map(|_| None).collect();
        // Encode every prompt; a request whose prompts fail fails alone.
        let mut groups: Vec<(usize, Vec<(usize, Member)>)> = Vec::new();
        for (index, request) in requests.iter().enumerate() {
            let guided = request.guidance_scale > 1.0;
            match self.conditioning(request, guided, context, [None, None]) {
                Ok((positive, negative)) => {
                    let length = positive.context.dim(1).unwrap_or(0);
                    let member = Member { request, positive, negative, cancelled: false };
                    match groups.iter_mut().find(|(l, _)| *l == length) {
                        Some((_, members)) => members.push((index, member)),
                        None => groups.push((length, vec![(index, member)])),
                    }
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        for (_, mut members) in groups {
            let indices: Vec<usize> = members.iter().map(|(i, _)| *i).collect();
            let mut group_observers: Vec<&mut dyn StepObserver> = Vec::new();
            for (position, observer) in observers.iter_mut().enumerate() {
                if indices.contains(&position) {
                    group_observers.push(&mut **observer);
                }
            }
            let mut group: Vec<Member> = members.drain(..).map(|(_, m)| m).collect();
            let outcome = self.denoise_group(&mut group, &mut group_observers);
            match outcome {
                Ok(latents) => {
                    let decoded = self.decode_members(&group, latents);
                    for ((index, member), images) in indices.iter().zip(&group).zip(decoded) {
                        results[*index] = Some(if member.cancelled {
                            Err(PipelineError::Cancelled)
                        } else {
                            images
                        });
                    }
                }
                Err(error) => {
                    // A failure of the shared batch fails each of its requests.
                    let message = error.to_string();
                    for (index, member) in indices.iter().zip(&group) {
                        results[*index] = Some(if member.cancelled {
                            Err(PipelineError::Cancelled)
                        } else {
                            Err(clone_error(&error, &message))
                        });
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every request of a batch gets a result; this is a bug"))
            .collect()
    }

    /// Decodes every member's latents: the untiled ones of all members in one VAE batch
    /// (the VAE's layers work per image, so this gives each image what it gets alone),
    /// tiled ones one by one. Cancelled members are skipped.
    fn decode_members(
        &self,
        members: &[Member],
        latents: Vec<Tensor>,
    ) -> Vec<Result<Vec<GeneratedImage>, PipelineError>> {
        let untiled: Vec<usize> = (0..members.len())
            .filter(|&i| {
                let request = members[i].request;
                !members[i].cancelled
                    && self
                        .vae_tile_layout(request.vae_tiling, request.width, request.height)
                        .is_none()
            })
            .collect();
        let mut shared: Vec<Option<Vec<Vec<u8>>>> = (0..members.len()).map(|_| None).collect();
        if untiled.len() > 1 {
            let joined = untiled.iter().map(|&i| latents[i].clone()).collect::<Vec<_>>();
            match Tensor::cat(&joined, 0)
                .map_err(PipelineError::from)
                .and_then(|all| self.decode_latents_to_rgb(&all))
            {
                Ok(mut pixels) => {
                    for &i in &untiled {
                        let rest = pixels.split_off(members[i].request.n as usize);
                        shared[i] = Some(std::mem::replace(&mut pixels, rest));
                    }
                }
                // Decoded one by one below, where each failure is its own.
                Err(error) => tracing::warn!(%error, "batched VAE decode failed"),
            }
        }
        members
            .iter()
            .zip(latents)
            .zip(shared)
            .map(|((member, latents), pixels)| {
                if member.cancelled {
                    return Err(PipelineError::Cancelled);
                }
                match pixels {
                    Some(pixels) => Ok(self.images_from_rgb(pixels, member.request)),
                    None => self.decode(&latents, member.request),
                }
            })
            .collect()
    }

    /// The denoising loop of [`Pipeline::denoise_with`] (text-to-image) over the rows of
    /// every member; returns each member's final latents (`[n, 4, h, w]`).
    fn denoise_group(
        &self,
        members: &mut [Member],
        observers: &mut [&mut dyn StepObserver],
    ) -> Result<Vec<Tensor>, PipelineError> {
        let first = members[0].request;
        let guided = first.guidance_scale > 1.0;
        let counts: Vec<usize> = members.iter().map(|m| m.request.n as usize).collect();
        let total_rows: usize = counts.iter().sum();
        let repeat = |t: &Tensor, n: usize| {
            t.repeat(
                vec![n].into_iter().chain(std::iter::repeat_n(1, t.rank() - 1)).collect::<Vec<_>>(),
            )
        };
        // Guidance batch: [negatives of every member, positives of every member], each
        // member's rows in its own order, as a lone request is [negative × n, positive × n].
        let mut negatives = Vec::new();
        let mut positives = Vec::new();
        for (member, &n) in members.iter().zip(&counts) {
            positives.push(repeat(&member.positive.context, n)?);
            if let Some(negative) = &member.negative {
                negatives.push(repeat(&negative.context, n)?);
            }
        }
        let context = Tensor::cat(&[negatives, positives].concat(), 0)?.to_dtype(self.dtype)?;
        let added = if self.unet.config().uses_text_time() {
            let mut embeds = (Vec::new(), Vec::new());
            let mut ids = (Vec::new(), Vec::new());
            for (member, &n) in members.iter().zip(&counts) {
                let pooled = member.positive.pooled.as_ref().ok_or_else(|| {
                    PipelineError::Model(ModelError::UnknownLayout {
                        path: self.defaults.name.clone().into(),
                        reason: "SDXL UNet without a second text encoder".into(),
                    })
                })?;
                embeds.1.push(repeat(pooled, n)?);
                ids.1.push(repeat(&self.time_ids(member.request, false)?, n)?);
                if let Some(negative) = &member.negative {
                    embeds.0.push(repeat(negative.pooled.as_ref().unwrap_or(pooled), n)?);
                    ids.0.push(repeat(&self.time_ids(member.request, true)?, n)?);
                }
            }
            Some(AddedConditions {
                text_embeds: Tensor::cat(&[embeds.0, embeds.1].concat(), 0)?
                    .to_dtype(self.dtype)?,
                time_ids: Tensor::cat(&[ids.0, ids.1].concat(), 0)?,
            })
        } else {
            None
        };
        let latent_channels = self.vae.config().latent_channels;
        if self.unet.config().in_channels != latent_channels {
            return Err(crate::error::ValidationError::new(
                "model",
                "this model's UNet does not take plain latents; its requests run alone",
            )
            .into());
        }
        let steps = first.steps as usize;
        let mut sampler =
            first.sampler.build_with(&self.scheduler, steps, &first.sampler_options())?;
        let mut generators: Vec<TorchGenerator> = members
            .iter()
            .flat_map(|m| {
                (0..m.request.n as u64).map(|i| TorchGenerator::new(m.request.seed.wrapping_add(i)))
            })
            .collect();
        let latent_shape =
            (1, latent_channels, first.height as usize / 8, first.width as usize / 8);
        let noise = generators
            .iter_mut()
            .map(|g| g.randn_tensor(latent_shape, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut latents = (Tensor::cat(&noise, 0)? * sampler.init_noise_sigma())?;

        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        for (index, &timestep) in timesteps.iter().enumerate() {
            for (member, observer) in members.iter_mut().zip(observers.iter()) {
                member.cancelled |= observer.should_cancel();
            }
            if members.iter().all(|m| m.cancelled) {
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
                let unconditional = prediction.narrow(0, 0, total_rows)?;
                let conditional = prediction.narrow(0, total_rows, total_rows)?;
                let combined =
                    (&unconditional + ((&conditional - &unconditional)? * first.guidance_scale)?)?;
                if first.guidance_rescale > 0.0 {
                    rescale_guidance(&combined, &conditional, first.guidance_rescale)?
                } else {
                    combined
                }
            } else {
                prediction
            };
            latents = sampler.step(&guided_prediction, index, &latents, &mut generators)?;
            for (member, observer) in members.iter().zip(observers.iter_mut()) {
                if !member.cancelled {
                    observer.on_step(0, index + 1, total);
                }
            }
        }
        let mut start = 0;
        counts
            .iter()
            .map(|&n| {
                let rows = latents.narrow(0, start, n)?;
                start += n;
                Ok(rows)
            })
            .collect()
    }
}

/// A copy of a batch-wide error for each of its requests (errors are not `Clone`).
fn clone_error(error: &PipelineError, message: &str) -> PipelineError {
    match error {
        PipelineError::Cancelled => PipelineError::Cancelled,
        PipelineError::Invalid(invalid) => PipelineError::Invalid(invalid.clone()),
        _ => PipelineError::Tensor(candle_core::Error::Msg(message.to_string())),
    }
}
