//! `sdserve bench --jobs N`: throughput of the service's job layer — a burst of small
//! jobs pushed through the real [`JobManager`] and [`WorkerPool`] (as `serve` builds them,
//! without the HTTP front), measured in images per second for a given `max_batch`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::BenchArgs;
use crate::codec::ImageFormat;
use crate::config::{Dtype, ModelSpec};
use crate::jobs::{JobManager, JobSettings, JobState, Metrics, OutputOptions};
use crate::pipeline::{probe, GenerationParams, Limits};
use crate::workers::{CandleBackend, SlotState, WorkerPool};

/// Runs the burst and prints one line with the throughput.
pub fn run(args: &BenchArgs, jobs: usize) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        candle_core::DType::F16 => Dtype::F16,
        candle_core::DType::BF16 => Dtype::Bf16,
        _ => Dtype::F32,
    };
    let spec = ModelSpec { name: "bench".into(), path: args.model.clone(), dtype };
    let defaults = probe(&spec.name, &spec.path)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let size = args.sizes.first().copied().unwrap_or(defaults.width);
    let settings = JobSettings {
        queue_capacity: jobs.max(1),
        job_timeout: Duration::from_secs(24 * 3600),
        retention: Duration::from_secs(24 * 3600),
        worker_slots: 1,
        max_batch: args.max_batch.max(1),
        batch_wait: Duration::ZERO,
    };
    let manager = Arc::new(JobManager::new(settings, Arc::new(Metrics::default())));
    let pool = WorkerPool::spawn(
        std::slice::from_ref(&args.device),
        1,
        std::slice::from_ref(&spec),
        Arc::new(CandleBackend::default()),
        manager.clone(),
    );
    let health = pool.health();
    loop {
        let states: Vec<SlotState> = health.borrow().iter().map(|s| s.state.clone()).collect();
        if let Some(SlotState::Failed(message)) =
            states.iter().find(|s| matches!(s, SlotState::Failed(_)))
        {
            anyhow::bail!("the worker failed to load the model: {message}");
        }
        if states.iter().all(|s| *s == SlotState::Ready) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = OutputOptions { format: ImageFormat::Png, quality: 90 };
    let (started, cpu_started) = (Instant::now(), crate::cli::process_cpu_seconds());
    let mut ids = Vec::with_capacity(jobs);
    for index in 0..jobs {
        let request = GenerationParams {
            prompt: format!("a red circle on a blue background, variant {index}"),
            width: Some(size),
            height: Some(size),
            steps: Some(args.job_steps),
            seed: Some(index as i64),
            sampler: Some("euler".into()),
            ..Default::default()
        }
        .validate(&defaults, &Limits::default())
        .map_err(|e| anyhow::anyhow!("bench request: {}", e.message))?;
        ids.push(manager.submit(request, output, 0)?.id);
    }
    while !manager.is_idle() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = crate::cli::process_cpu_seconds().zip(cpu_started).map_or(f64::NAN, |(b, a)| b - a);
    let mut succeeded = 0;
    // FNV-1a over every image's bytes in job order: equal digests across runs with
    // different max_batch mean batching changed no pixel.
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    for id in &ids {
        let Ok(job) = manager.get(id) else { continue };
        if job.state != JobState::Succeeded {
            continue;
        }
        succeeded += 1;
        for image in job.result.iter().flat_map(|r| r.images.iter()) {
            for &byte in &image.bytes {
                digest = (digest ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    manager.stop_accepting();
    pool.join();
    println!(
        "{jobs} jobs {size}x{size}, {} steps, cfg, max_batch {}: {succeeded} succeeded in \
         {seconds:.2} s = {:.2} images/s; cpu {cpu:.2} s = {:.3} cpu-s/image; images digest \
         {digest:016x}",
        args.job_steps,
        args.max_batch,
        succeeded as f64 / seconds,
        cpu / succeeded.max(1) as f64
    );
    if succeeded != jobs {
        anyhow::bail!("{} of {jobs} jobs did not succeed", jobs - succeeded);
    }
    Ok(())
}
