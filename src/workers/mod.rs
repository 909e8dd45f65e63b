//! Worker threads: one OS thread per device slot, owning the loaded pipelines of its
//! device. A worker takes batches from the [`JobManager`], runs them (tensor work never
//! touches the tokio runtime), reports progress and checks cancellation per step,
//! survives a panic in a job, encodes the images, and reports its health for `/ready`.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::watch;

use crate::adapters::controlnet::ControlNetLibrary;
use crate::adapters::embeddings::EmbeddingLibrary;
use crate::adapters::lora::LoraLibrary;
use crate::adapters::t2i::T2IAdapterLibrary;
use crate::codec;
use crate::config::ModelSpec;
use crate::error::{ModelError, PipelineError};
use crate::jobs::{ClaimedJob, EncodedImage, JobError, JobErrorKind, JobManager, JobOutcome};
use crate::pipeline::{
    parse_device, probe, GeneratedImage, GenerationRequest, LoadOptions, MemorySettings,
    ModelDefaults, Pipeline, PromptContext, StepObserver,
};

/// What a worker needs from a loaded model.
pub trait ImageGenerator: Send + Sync {
    /// The model's name, family and native size.
    fn defaults(&self) -> &ModelDefaults;
    /// Runs a validated request (see [`Pipeline::generate`]).
    fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError>;
    /// Runs compatible requests (equal [`GenerationRequest::batch_key`]) together; one
    /// result per request, in order. The default runs them one after another.
    fn generate_batch(
        &self,
        requests: &[&GenerationRequest],
        observers: &mut [&mut dyn StepObserver],
    ) -> Vec<Result<Vec<GeneratedImage>, PipelineError>> {
        requests
            .iter()
            .zip(observers.iter_mut())
            .map(|(request, observer)| self.generate(request, *observer))
            .collect()
    }
}

impl ImageGenerator for Pipeline {
    fn defaults(&self) -> &ModelDefaults {
        Pipeline::defaults(self)
    }

    fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        Pipeline::generate(self, request, observer)
    }

    fn generate_batch(
        &self,
        requests: &[&GenerationRequest],
        observers: &mut [&mut dyn StepObserver],
    ) -> Vec<Result<Vec<GeneratedImage>, PipelineError>> {
        Pipeline::generate_batch(self, requests, self.prompt_context(), observers)
    }
}

/// Reads model configs and loads models; the service uses [`CandleBackend`].
pub trait ModelBackend: Send + Sync {
    /// Family and native size, without loading weights.
    fn probe(&self, spec: &ModelSpec) -> Result<ModelDefaults, ModelError>;
    /// Loads the model onto `device` (called on a worker thread).
    fn load(&self, spec: &ModelSpec, device: &str) -> Result<Arc<dyn ImageGenerator>, ModelError>;
    /// Loads the model so that requests can name the LoRAs of `loras`; backends without
    /// adapter support load it plainly.
    fn load_with_loras(
        &self,
        spec: &ModelSpec,
        device: &str,
        loras: &Arc<LoraLibrary>,
    ) -> Result<Arc<dyn ImageGenerator>, ModelError> {
        let _ = loras;
        self.load(spec, device)
    }
}

/// The real backend: [`probe`] and [`Pipeline::load`]; every loaded pipeline encodes
/// prompts with `embeddings` and resolves request T2I-Adapters in `t2i_adapters` and
/// ControlNets in `controlnets`.
#[derive(Debug, Default)]
pub struct CandleBackend {
    pub embeddings: Option<Arc<EmbeddingLibrary>>,
    pub t2i_adapters: Option<Arc<T2IAdapterLibrary>>,
    pub controlnets: Option<Arc<ControlNetLibrary>>,
    /// When `vae_tiling: auto` tiles.
    pub memory: MemorySettings,
}

impl CandleBackend {
    fn with_adapters(&self, pipeline: Pipeline) -> Pipeline {
        let mut pipeline = match &self.t2i_adapters {
            Some(library) => pipeline.with_t2i_adapter_library(library.clone()),
            None => pipeline,
        };
        pipeline.set_memory_settings(self.memory);
        match &self.controlnets {
            Some(library) => pipeline.with_controlnet_library(library.clone()),
            None => pipeline,
        }
    }
}

impl ModelBackend for CandleBackend {
    fn probe(&self, spec: &ModelSpec) -> Result<ModelDefaults, ModelError> {
        probe(&spec.name, &spec.path)
    }

    fn load(&self, spec: &ModelSpec, device: &str) -> Result<Arc<dyn ImageGenerator>, ModelError> {
        let options = LoadOptions { device: parse_device(device)?, dtype: spec.dtype.to_candle() };
        let mut pipeline = self.with_adapters(Pipeline::load(&spec.name, &spec.path, &options)?);
        pipeline.set_prompt_context(PromptContext { embeddings: self.embeddings.clone() });
        Ok(Arc::new(pipeline))
    }

    fn load_with_loras(
        &self,
        spec: &ModelSpec,
        device: &str,
        loras: &Arc<LoraLibrary>,
    ) -> Result<Arc<dyn ImageGenerator>, ModelError> {
        let options = LoadOptions { device: parse_device(device)?, dtype: spec.dtype.to_candle() };
        // The pool loads through here: the prompt context must be set here too, or the
        // server would ignore its embeddings directories.
        let mut pipeline = self.with_adapters(Pipeline::load(&spec.name, &spec.path, &options)?);
        pipeline.set_prompt_context(PromptContext { embeddings: self.embeddings.clone() });
        Ok(Arc::new(pipeline.with_lora_library(loras.clone())))
    }
}

/// Health of one worker slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Its device is loading the models.
    Loading,
    /// Waiting for or running jobs.
    Ready,
    /// Loading failed; the message says why.
    Failed(String),
    /// Exited (shutdown).
    Stopped,
}

/// One worker slot, as `/ready` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotHealth {
    pub device: String,
    pub slot: usize,
    pub state: SlotState,
}

/// The worker threads and their health.
pub struct WorkerPool {
    health: watch::Receiver<Vec<SlotHealth>>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts one loader thread per device; each loads every model, then starts
    /// `workers_per_device` worker threads that share the loaded models.
    pub fn spawn(
        devices: &[String],
        workers_per_device: usize,
        models: &[ModelSpec],
        backend: Arc<dyn ModelBackend>,
        jobs: Arc<JobManager>,
    ) -> WorkerPool {
        let loras = Arc::new(LoraLibrary::default());
        WorkerPool::spawn_with_loras(devices, workers_per_device, models, backend, jobs, loras)
    }

    /// [`WorkerPool::spawn`] whose models resolve request LoRAs in `loras`.
    pub fn spawn_with_loras(
        devices: &[String],
        workers_per_device: usize,
        models: &[ModelSpec],
        backend: Arc<dyn ModelBackend>,
        jobs: Arc<JobManager>,
        loras: Arc<LoraLibrary>,
    ) -> WorkerPool {
        let slots: Vec<SlotHealth> = devices
            .iter()
            .flat_map(|device| {
                (0..workers_per_device).map(move |slot| SlotHealth {
                    device: device.clone(),
                    slot,
                    state: SlotState::Loading,
                })
            })
            .collect();
        let (health_tx, health) = watch::channel(slots);
        let health_tx = Arc::new(health_tx);
        let mut threads = Vec::new();
        for (device_index, device) in devices.iter().enumerate() {
            let first_slot = device_index * workers_per_device;
            let context = DeviceContext {
                device: device.clone(),
                first_slot,
                slots: workers_per_device,
                models: models.to_vec(),
                backend: backend.clone(),
                loras: loras.clone(),
                jobs: jobs.clone(),
                health: health_tx.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("sdserve-{device}"))
                .spawn(move || context.load_and_run())
                .expect("cannot start a worker thread; the OS is out of resources");
            threads.push(thread);
        }
        WorkerPool { health, threads }
    }

    /// A receiver of every slot's health.
    pub fn health(&self) -> watch::Receiver<Vec<SlotHealth>> {
        self.health.clone()
    }

    /// Waits (blocking) for every thread to exit.
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked outside a job; this is a bug");
            }
        }
    }
}

struct DeviceContext {
    device: String,
    first_slot: usize,
    slots: usize,
    models: Vec<ModelSpec>,
    backend: Arc<dyn ModelBackend>,
    loras: Arc<LoraLibrary>,
    jobs: Arc<JobManager>,
    health: Arc<watch::Sender<Vec<SlotHealth>>>,
}

impl DeviceContext {
    fn set_state(&self, slot: usize, state: SlotState) {
        self.health.send_modify(|slots| slots[slot].state = state);
    }

    fn load_and_run(self) {
        let started = Instant::now();
        let mut loaded: HashMap<String, Arc<dyn ImageGenerator>> = HashMap::new();
        for spec in &self.models {
            let span = tracing::info_span!("load_model", model = %spec.name, device = %self.device);
            let _entered = span.enter();
            let result = catch_unwind(AssertUnwindSafe(|| {
                self.backend.load_with_loras(spec, &self.device, &self.loras)
            }));
            match result {
                Ok(Ok(generator)) => {
                    loaded.insert(spec.name.clone(), generator);
                }
                Ok(Err(error)) => {
                    return self.fail(format!("loading model {:?}: {error}", spec.name))
                }
                Err(panic) => {
                    return self.fail(format!(
                        "loading model {:?} panicked: {}",
                        spec.name,
                        panic_message(panic.as_ref())
                    ))
                }
            }
        }
        tracing::info!(device = %self.device, models = loaded.len(), secs = started.elapsed().as_secs_f64(), "models loaded");
        let loaded = Arc::new(loaded);
        let workers: Vec<_> = (0..self.slots)
            .map(|i| {
                let slot = self.first_slot + i;
                let worker = Worker {
                    slot,
                    device: self.device.clone(),
                    models: loaded.clone(),
                    jobs: self.jobs.clone(),
                };
                self.set_state(slot, SlotState::Ready);
                std::thread::Builder::new()
                    .name(format!("sdserve-{}-{i}", self.device))
                    .spawn(move || worker.run())
                    .expect("cannot start a worker thread; the OS is out of resources")
            })
            .collect();
        for (i, worker) in workers.into_iter().enumerate() {
            if worker.join().is_err() {
                tracing::error!(device = %self.device, "worker thread panicked outside a job; this is a bug");
            }
            self.set_state(self.first_slot + i, SlotState::Stopped);
        }
    }

    fn fail(&self, message: String) {
        tracing::error!(device = %self.device, "{message}");
        for slot in self.first_slot..self.first_slot + self.slots {
            self.set_state(slot, SlotState::Failed(message.clone()));
        }
    }
}

struct Worker {
    slot: usize,
    device: String,
    models: Arc<HashMap<String, Arc<dyn ImageGenerator>>>,
    jobs: Arc<JobManager>,
}

impl Worker {
    fn run(self) {
        let max_batch = self.jobs.settings().max_batch.max(1);
        while let Some(batch) = self.jobs.next_batch(max_batch) {
            if batch.len() > 1 {
                self.run_batch(&batch);
                continue;
            }
            for job in batch {
                let span = tracing::info_span!("job", id = %job.id, model = %job.request.model, slot = self.slot, device = %self.device);
                let _entered = span.enter();
                let outcome = self.run_job(&job);
                Self::log_outcome(&outcome);
                self.jobs.finish(&job.id, outcome);
            }
        }
    }

    fn log_outcome(outcome: &JobOutcome) {
        match outcome {
            JobOutcome::Succeeded(images) => {
                tracing::info!(images = images.len(), "job succeeded")
            }
            JobOutcome::Failed(error) => {
                tracing::warn!(error = %error.message, "job failed")
            }
            JobOutcome::Cancelled => tracing::info!("job cancelled"),
        }
    }

    /// Runs compatible jobs (the manager batches only equal batch keys, hence one model)
    /// as one pipeline batch; each job ends with its own outcome. A job cancelled
    /// mid-batch stops being reported at once and ends `cancelled` when the batch ends;
    /// the others are unaffected.
    fn run_batch(&self, batch: &[ClaimedJob]) {
        let span = tracing::info_span!("batch", jobs = batch.len(), model = %batch[0].request.model, slot = self.slot, device = %self.device);
        let _entered = span.enter();
        let Some(generator) = self.models.get(&batch[0].request.model) else {
            for job in batch {
                self.jobs.finish(&job.id, self.run_job(job));
            }
            return;
        };
        let requests: Vec<&GenerationRequest> = batch.iter().map(|j| j.request.as_ref()).collect();
        let mut observers: Vec<JobObserver> =
            batch.iter().map(|job| JobObserver { job, jobs: &self.jobs }).collect();
        let mut observer_refs: Vec<&mut dyn StepObserver> =
            observers.iter_mut().map(|o| o as &mut dyn StepObserver).collect();
        let results = catch_unwind(AssertUnwindSafe(|| {
            generator.generate_batch(&requests, &mut observer_refs)
        }));
        match results {
            Ok(results) => {
                for (job, result) in batch.iter().zip(results) {
                    let outcome = self.outcome(job, Ok(result));
                    let _job = tracing::info_span!("job", id = %job.id).entered();
                    Self::log_outcome(&outcome);
                    self.jobs.finish(&job.id, outcome);
                }
            }
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                for job in batch {
                    let outcome = self.outcome(job, Err(message.clone()));
                    self.jobs.finish(&job.id, outcome);
                }
            }
        }
    }

    fn run_job(&self, job: &ClaimedJob) -> JobOutcome {
        let Some(generator) = self.models.get(&job.request.model) else {
            tracing::error!("job names a model this worker did not load; this is a bug");
            return JobOutcome::Failed(JobError::new(
                JobErrorKind::Internal,
                "the model is not loaded",
            ));
        };
        let mut observer = JobObserver { job, jobs: &self.jobs };
        let result =
            catch_unwind(AssertUnwindSafe(|| generator.generate(&job.request, &mut observer)))
                .map_err(|panic| panic_message(panic.as_ref()));
        self.outcome(job, result)
    }

    /// A job's outcome from its pipeline result (or the panic that replaced it).
    fn outcome(
        &self,
        job: &ClaimedJob,
        result: Result<Result<Vec<GeneratedImage>, PipelineError>, String>,
    ) -> JobOutcome {
        // A stop that nobody asked for was the deadline.
        let deadline_passed = Instant::now() >= job.deadline && !job.cancel.load(Ordering::Relaxed);
        match result {
            Ok(Ok(images)) => match encode_output(&job.request, job.output, &images) {
                Ok(encoded) => JobOutcome::Succeeded(encoded),
                Err(error) => {
                    tracing::error!(%error, "encoding the images failed");
                    JobOutcome::Failed(JobError::new(
                        JobErrorKind::Internal,
                        "encoding the images failed",
                    ))
                }
            },
            Ok(Err(PipelineError::Cancelled)) if deadline_passed => {
                JobOutcome::Failed(JobError::new(
                    JobErrorKind::Timeout,
                    format!(
                        "the job did not finish within its deadline ({} s)",
                        self.jobs.settings().job_timeout.as_secs()
                    ),
                ))
            }
            Ok(Err(PipelineError::Cancelled)) => JobOutcome::Cancelled,
            Ok(Err(PipelineError::Invalid(error))) => JobOutcome::Failed(JobError {
                kind: JobErrorKind::InvalidRequest,
                message: error.message.clone(),
                param: Some(error.field.clone()),
            }),
            Ok(Err(error)) => {
                tracing::error!(%error, "generation failed");
                JobOutcome::Failed(JobError::new(
                    JobErrorKind::Internal,
                    "generation failed; the server log has the details",
                ))
            }
            Err(panic) => {
                tracing::error!(%panic, "generation panicked; the worker goes on");
                JobOutcome::Failed(JobError::new(
                    JobErrorKind::Internal,
                    "generation failed (the worker caught a panic); the server log has the details",
                ))
            }
        }
    }
}

/// Encodes the generated images in the job's output format; PNGs carry the A1111
/// `parameters` text so that tools can read the settings back.
pub fn encode_output(
    request: &GenerationRequest,
    output: crate::jobs::OutputOptions,
    images: &[GeneratedImage],
) -> Result<Vec<EncodedImage>, codec::CodecError> {
    images
        .iter()
        .map(|image| {
            let parameters = request.infotext(image.index);
            let bytes = codec::encode_image(
                &image.rgb,
                image.width,
                image.height,
                output.format,
                Some(output.quality),
                Some(&parameters),
            )?;
            Ok(EncodedImage { index: image.index, seed: image.seed, format: output.format, bytes })
        })
        .collect()
}

/// Reports a job's steps to the manager and stops it when cancelled or overdue.
struct JobObserver<'a> {
    job: &'a ClaimedJob,
    jobs: &'a JobManager,
}

impl StepObserver for JobObserver<'_> {
    fn on_step(&mut self, image_index: u32, step: usize, steps: usize) {
        self.jobs.report_progress(&self.job.id, image_index, step, steps);
    }

    fn should_cancel(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed) || Instant::now() >= self.job.deadline
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_string())
}
