//! Starting and stopping the service: probe the models, start the workers, bind, serve,
//! and on shutdown refuse new work (503), drain queued and running jobs up to the drain
//! timeout, then stop.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{app, AppState, ModelRegistry, RegisteredModel, SharedState};
use crate::adapters::lora::LoraLibrary;
use crate::config::Settings;
use crate::jobs::{JobManager, JobSettings, Metrics};
use crate::workers::{CandleBackend, ModelBackend, SlotHealth, SlotState, WorkerPool};

/// How long running jobs get to notice their cancellation after the drain timeout.
const ABORT_GRACE: Duration = Duration::from_secs(10);
/// How long exiting workers are waited for before the process gives up on them.
const JOIN_GRACE: Duration = Duration::from_secs(30);

/// A started server.
pub struct RunningServer {
    addr: SocketAddr,
    state: AppState,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Asks a running server to shut down; cheap to clone.
#[derive(Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    /// Begins the graceful shutdown (idempotent).
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl RunningServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger(self.shutdown.clone())
    }

    /// Begins the graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until the server stopped: after a shutdown, or when a model failed to load
    /// (an error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task panicked")?
    }
}

/// Probes the models, starts the workers (which load the models in the background;
/// `/ready` says when they are done) and starts serving on `settings.bind`.
pub async fn start(
    settings: Settings,
    backend: Arc<dyn ModelBackend>,
) -> anyhow::Result<RunningServer> {
    let settings = Arc::new(settings);
    let registry = {
        let settings = settings.clone();
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || probe_models(&settings, backend.as_ref()))
            .await
            .context("probing the models panicked")??
    };
    let metrics = Arc::new(Metrics::default());
    let job_settings = JobSettings {
        queue_capacity: settings.queue_capacity,
        job_timeout: Duration::from_secs(settings.job_timeout_secs),
        retention: Duration::from_secs(settings.result_retention_secs),
        worker_slots: settings.worker_slots(),
        max_batch: settings.max_batch,
        batch_wait: Duration::from_millis(settings.batch_wait_ms),
    };
    let jobs = Arc::new(JobManager::new(job_settings, metrics));
    let listener = TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("cannot listen on {}", settings.bind))?;
    let addr = listener.local_addr().context("the listener has no address")?;
    let loras = Arc::new(LoraLibrary::new(settings.lora_dirs.clone(), settings.lora_cache_mb));
    let pool = WorkerPool::spawn_with_loras(
        &settings.devices,
        settings.workers_per_device,
        &settings.models,
        backend,
        jobs.clone(),
        loras.clone(),
    );
    let state = AppState::new(SharedState {
        loras,
        controlnets: settings.controlnet_library(),
        settings: settings.clone(),
        registry,
        jobs,
        workers: pool.health(),
        started_at: SystemTime::now(),
        a1111: Default::default(),
        embeddings: settings.embedding_library()?,
    });
    let (shutdown, shutdown_requested) = watch::channel(false);
    let task = tokio::spawn(serve(listener, state.clone(), pool, shutdown_requested));
    tracing::info!(%addr, models = settings.models.len(), devices = ?settings.devices, "listening");
    Ok(RunningServer { addr, state, shutdown, task })
}

fn probe_models(settings: &Settings, backend: &dyn ModelBackend) -> anyhow::Result<ModelRegistry> {
    let models = settings
        .models
        .iter()
        .map(|spec| {
            let defaults = backend
                .probe(spec)
                .with_context(|| format!("model {:?} at {}", spec.name, spec.path.display()))?;
            tracing::info!(model = %spec.name, family = defaults.family.id(), width = defaults.width, height = defaults.height, "model found");
            Ok(RegisteredModel { spec: spec.clone(), defaults })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ModelRegistry { models, default_model: settings.default_model.clone() })
}

async fn serve(
    listener: TcpListener,
    state: AppState,
    pool: WorkerPool,
    mut shutdown_requested: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let failure = Arc::new(Mutex::new(None::<String>));
    let drain = {
        let state = state.clone();
        let failure = failure.clone();
        async move {
            let mut health = state.workers.clone();
            tokio::select! {
                _ = shutdown_requested.wait_for(|requested| *requested) => {
                    tracing::info!("shutdown requested: refusing new work, draining the queue");
                }
                message = first_failure(&mut health) => {
                    tracing::error!("{message}; shutting down");
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
                    state.jobs.abort_remaining();
                }
            }
            drain_jobs(&state.jobs, Duration::from_secs(state.settings.drain_timeout_secs)).await;
        }
    };
    axum::serve(listener, app(state.clone()))
        .with_graceful_shutdown(drain)
        .await
        .context("the HTTP server failed")?;
    let joined = tokio::task::spawn_blocking(move || pool.join());
    if tokio::time::timeout(JOIN_GRACE, joined).await.is_err() {
        tracing::error!("a worker did not stop in time; exiting without it");
    }
    let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failure {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Resolves with the first worker failure (a model that did not load).
async fn first_failure(health: &mut watch::Receiver<Vec<SlotHealth>>) -> String {
    loop {
        let failed = health.borrow_and_update().iter().find_map(|slot| match &slot.state {
            SlotState::Failed(message) => Some(message.clone()),
            _ => None,
        });
        if let Some(message) = failed {
            return message;
        }
        if health.changed().await.is_err() {
            // The pool is gone; no failure can come any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Stops taking work, waits for queued and running jobs up to `timeout`, then aborts
/// what is left and gives running jobs a moment to stop at their next step.
async fn drain_jobs(jobs: &JobManager, timeout: Duration) {
    jobs.stop_accepting();
    if tokio::time::timeout(timeout, wait_idle(jobs)).await.is_ok() {
        tracing::info!("all jobs finished");
        return;
    }
    tracing::warn!(
        queued = jobs.queue_depth(),
        running = jobs.running(),
        "drain timeout: cancelling what is left"
    );
    jobs.abort_remaining();
    let _ = tokio::time::timeout(ABORT_GRACE, wait_idle(jobs)).await;
}

async fn wait_idle(jobs: &JobManager) {
    while !jobs.is_idle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Runs the service with the real models until ctrl-c or SIGTERM, then shuts down
/// gracefully. A second ctrl-c exits at once.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if settings.cpu_matmul.apply() != settings.cpu_matmul {
        tracing::warn!("cpu_matmul = bf16 needs AVX512-BF16, which this CPU lacks: using f32");
    }
    let backend = CandleBackend {
        embeddings: settings.embedding_library()?,
        t2i_adapters: Some(settings.t2i_adapter_library()),
        controlnets: Some(settings.controlnet_library()),
        memory: crate::pipeline::MemorySettings {
            vae_tiling_auto_pixels: settings.vae_tiling_auto_pixels,
            vae_tile_pixels: None,
        },
    };
    let server = start(settings, Arc::new(backend)).await?;
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        shutdown_signal().await;
        trigger.shutdown();
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("second interrupt: exiting without draining");
            std::process::exit(130);
        }
    });
    server.wait().await
}
