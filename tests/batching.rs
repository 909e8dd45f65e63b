//! Batching across requests: compatible requests run as one UNet batch
//! ([`Pipeline::generate_batch`]) must give each request exactly the images it gets alone,
//! a request cancelled mid-batch must not change the others, and requests that may not
//! share a batch (LoRAs, img2img, different settings) have no common batch key.

use std::cell::Cell;
use std::path::PathBuf;

use sdserve::pipeline::{
    GeneratedImage, GenerationParams, GenerationRequest, Limits, LoadOptions, NoObserver, Pipeline,
    StepObserver,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn request(
    pipeline: &Pipeline,
    prompt: &str,
    negative: &str,
    seed: i64,
    n: u32,
) -> GenerationRequest {
    GenerationParams {
        prompt: prompt.into(),
        negative_prompt: Some(negative.into()),
        steps: Some(4),
        seed: Some(seed),
        n: Some(n),
        sampler: Some("euler_a".into()),
        ..Default::default()
    }
    .validate(pipeline.defaults(), &Limits::default())
    .expect("valid request")
}

/// Counts progress and cancels from a given step on.
struct Observer {
    steps_seen: Cell<usize>,
    cancel_after: Option<usize>,
}

impl StepObserver for Observer {
    fn on_step(&mut self, _image_index: u32, step: usize, _steps: usize) {
        self.steps_seen.set(step);
    }
    fn should_cancel(&self) -> bool {
        self.cancel_after.is_some_and(|after| self.steps_seen.get() >= after)
    }
}

fn max_pixel_difference(a: &[GeneratedImage], b: &[GeneratedImage]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!((x.seed, x.index), (y.seed, y.index));
            x.rgb.iter().zip(&y.rgb).map(|(p, q)| p.abs_diff(*q))
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_batch_gives_every_request_the_images_it_gets_alone() {
    for family in ["sd1", "sdxl"] {
        let pipeline = Pipeline::load(family, &fixture(family), &LoadOptions::default()).unwrap();
        let requests = [
            request(&pipeline, "a red cube", "", 11, 1),
            request(&pipeline, "a blue sphere on grass", "blurry", 400, 2),
            request(&pipeline, "a cat", "ugly, dark", 7, 1),
        ];
        let alone: Vec<Vec<GeneratedImage>> =
            requests.iter().map(|r| pipeline.generate(r, &mut NoObserver).unwrap()).collect();
        let refs: Vec<&GenerationRequest> = requests.iter().collect();
        let mut observers: Vec<Observer> =
            (0..3).map(|_| Observer { steps_seen: Cell::new(0), cancel_after: None }).collect();
        let mut observer_refs: Vec<&mut dyn StepObserver> =
            observers.iter_mut().map(|o| o as &mut dyn StepObserver).collect();
        let batched = pipeline.generate_batch(&refs, pipeline.prompt_context(), &mut observer_refs);
        for (index, (alone, batched)) in alone.iter().zip(batched).enumerate() {
            let batched = batched.expect("batched request succeeds");
            let difference = max_pixel_difference(alone, &batched);
            println!("{family} request {index}: max |Δ| alone vs batched = {difference}/255");
            // Identical. (Before the time embedding's linear layers ran row by row,
            // gemm's batch-size dependent rounding there made ≤ 1/255 differences.)
            assert_eq!(difference, 0, "{family} request {index} differs from its lone run");
        }
        assert!(observers.iter().all(|o| o.steps_seen.get() == 4), "each job sees its progress");
    }
}

#[test]
fn cancelling_one_request_of_a_batch_leaves_the_others_untouched() {
    let pipeline = Pipeline::load("sd1", &fixture("sd1"), &LoadOptions::default()).unwrap();
    let requests =
        [request(&pipeline, "a red cube", "", 1, 1), request(&pipeline, "a green tree", "", 2, 1)];
    let alone = pipeline.generate(&requests[1], &mut NoObserver).unwrap();
    let refs: Vec<&GenerationRequest> = requests.iter().collect();
    let mut cancelled = Observer { steps_seen: Cell::new(0), cancel_after: Some(2) };
    let mut kept = Observer { steps_seen: Cell::new(0), cancel_after: None };
    let mut observers: Vec<&mut dyn StepObserver> = vec![&mut cancelled, &mut kept];
    let results = pipeline.generate_batch(&refs, pipeline.prompt_context(), &mut observers);
    assert!(matches!(results[0], Err(sdserve::error::PipelineError::Cancelled)));
    let images = results[1].as_ref().expect("the other request finishes");
    assert_eq!(max_pixel_difference(&alone, images), 0);
    assert_eq!(cancelled.steps_seen.get(), 2, "a cancelled job's progress stops");
    assert_eq!(kept.steps_seen.get(), 4);
}

#[test]
fn only_requests_that_can_share_a_unet_batch_share_a_key() {
    let pipeline = Pipeline::load("sd1", &fixture("sd1"), &LoadOptions::default()).unwrap();
    let base = request(&pipeline, "a", "", 1, 1);
    let other_prompt_seed_n = request(&pipeline, "b", "c", 9, 3);
    assert!(base.batch_key().is_some());
    assert_eq!(base.batch_key(), other_prompt_seed_n.batch_key());
    let mut more_steps = base.clone();
    more_steps.steps = 5;
    let mut other_guidance = base.clone();
    other_guidance.guidance_scale = 3.0;
    let mut other_size = base.clone();
    other_size.width = 128;
    for different in [more_steps, other_guidance, other_size] {
        assert_ne!(base.batch_key(), different.batch_key());
    }
    let mut with_lora = base.clone();
    with_lora.loras.push(sdserve::pipeline::LoraChoice { name: "style".into(), weight: 1.0 });
    assert_eq!(with_lora.batch_key(), None, "LoRAs change the UNet: such jobs run alone");
}

#[test]
fn the_service_worker_batches_queued_jobs_and_each_gets_its_own_images() {
    use std::sync::Arc;
    use std::time::Duration;

    use sdserve::codec::ImageFormat;
    use sdserve::config::ModelSpec;
    use sdserve::jobs::{JobManager, JobSettings, JobState, Metrics, OutputOptions};
    use sdserve::workers::{encode_output, CandleBackend, WorkerPool};

    let pipeline = Pipeline::load("sd1", &fixture("sd1"), &LoadOptions::default()).unwrap();
    let settings = JobSettings {
        queue_capacity: 8,
        job_timeout: Duration::from_secs(600),
        retention: Duration::from_secs(600),
        worker_slots: 1,
        max_batch: 4,
        batch_wait: Duration::from_millis(200),
    };
    let jobs = Arc::new(JobManager::new(settings, Arc::new(Metrics::default())));
    let output = OutputOptions { format: ImageFormat::Png, quality: 90 };
    let requests = [
        request(&pipeline, "a red cube", "", 5, 1),
        request(&pipeline, "a blue sphere", "dark", 6, 2),
        request(&pipeline, "a cat", "", 7, 1),
    ];
    // Queued before the worker has loaded its model, so it finds them all waiting.
    let ids: Vec<_> =
        requests.iter().map(|r| jobs.submit(r.clone(), output, 0).unwrap().id).collect();
    let spec = ModelSpec { name: "sd1".into(), path: fixture("sd1"), dtype: Default::default() };
    let pool = WorkerPool::spawn(
        &["cpu".to_string()],
        1,
        &[spec],
        Arc::new(CandleBackend::default()),
        jobs.clone(),
    );
    let started = std::time::Instant::now();
    while !jobs.is_idle() {
        assert!(started.elapsed() < Duration::from_secs(300), "jobs did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (id, request) in ids.iter().zip(&requests) {
        let job = jobs.get(id).unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        let expected =
            encode_output(request, output, &pipeline.generate(request, &mut NoObserver).unwrap())
                .unwrap();
        let got = &job.result.as_ref().unwrap().images;
        assert_eq!(got.len(), expected.len());
        for (got, expected) in got.iter().zip(&expected) {
            assert_eq!(
                got.bytes, expected.bytes,
                "a batched job's image differs from its lone run"
            );
        }
    }
    jobs.stop_accepting();
    pool.join();
}
