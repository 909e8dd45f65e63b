//! Shared by the service integration tests: starts the real server on port 0 with the
//! bundled tiny model (models/shapes), plus test doubles that wrap the REAL pipeline
//! to reach states a model cannot reach on demand (slow steps, a panic).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sdserve::config::{ApiKey, ModelSpec, Settings};
use sdserve::error::{ModelError, PipelineError};
use sdserve::pipeline::{GeneratedImage, GenerationRequest, ModelDefaults, StepObserver};
use sdserve::workers::{CandleBackend, ImageGenerator, ModelBackend};
use sdserve::RunningServer;
use serde_json::{json, Value};

/// Settings for a test server: the built-in config (the bundled model), port 0.
pub fn test_settings() -> Settings {
    let mut settings = Settings::builtin().expect("built-in config is valid");
    settings.bind = "127.0.0.1:0".parse().unwrap();
    settings.queue_capacity = 8;
    settings
}

pub fn with_api_key(mut settings: Settings, key: &str) -> Settings {
    settings.api_keys = vec![ApiKey(key.to_string())];
    settings
}

/// A small, fast request for the bundled model.
pub fn tiny_request(prompt: &str) -> Value {
    json!({ "prompt": prompt, "steps": 2, "width": 64, "height": 64, "seed": 7 })
}

/// How test doubles change the real pipeline.
#[derive(Clone, Copy)]
pub enum Double {
    /// The real pipeline, unchanged.
    None,
    /// Sleeps this long after every real step, so jobs stay running long enough to
    /// observe, cancel or queue behind them.
    SlowSteps(Duration),
    /// Panics (before running) when the prompt contains "PANIC".
    PanicsOnPrompt,
}

/// The real backend, with a test double around every loaded pipeline.
pub struct DoubledBackend {
    real: CandleBackend,
    double: Double,
}

impl ModelBackend for DoubledBackend {
    fn probe(&self, spec: &ModelSpec) -> Result<ModelDefaults, ModelError> {
        self.real.probe(spec)
    }

    fn load(&self, spec: &ModelSpec, device: &str) -> Result<Arc<dyn ImageGenerator>, ModelError> {
        Ok(self.wrap(self.real.load(spec, device)?))
    }

    fn load_with_loras(
        &self,
        spec: &ModelSpec,
        device: &str,
        loras: &Arc<sdserve::adapters::lora::LoraLibrary>,
    ) -> Result<Arc<dyn ImageGenerator>, ModelError> {
        Ok(self.wrap(self.real.load_with_loras(spec, device, loras)?))
    }
}

impl DoubledBackend {
    fn wrap(&self, real: Arc<dyn ImageGenerator>) -> Arc<dyn ImageGenerator> {
        match self.double {
            Double::None => real,
            Double::SlowSteps(per_step) => Arc::new(SlowSteps { real, per_step }),
            Double::PanicsOnPrompt => Arc::new(PanicsOnPrompt { real }),
        }
    }
}

/// The real pipeline, slowed down after each step.
pub struct SlowSteps {
    real: Arc<dyn ImageGenerator>,
    per_step: Duration,
}

struct SlowObserver<'a> {
    outer: &'a mut dyn StepObserver,
    per_step: Duration,
}

impl StepObserver for SlowObserver<'_> {
    fn on_step(&mut self, image_index: u32, step: usize, steps: usize) {
        self.outer.on_step(image_index, step, steps);
        std::thread::sleep(self.per_step);
    }
    fn should_cancel(&self) -> bool {
        self.outer.should_cancel()
    }
}

impl ImageGenerator for SlowSteps {
    fn defaults(&self) -> &ModelDefaults {
        self.real.defaults()
    }
    fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let mut slow = SlowObserver { outer: observer, per_step: self.per_step };
        self.real.generate(request, &mut slow)
    }
}

/// The real pipeline, except that it panics on prompts containing "PANIC".
pub struct PanicsOnPrompt {
    real: Arc<dyn ImageGenerator>,
}

impl ImageGenerator for PanicsOnPrompt {
    fn defaults(&self) -> &ModelDefaults {
        self.real.defaults()
    }
    fn generate(
        &self,
        request: &GenerationRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        if request.prompt.contains("PANIC") {
            panic!("test double: a panic inside generation");
        }
        self.real.generate(request, observer)
    }
}

/// A started test server and a client for it.
pub struct TestServer {
    pub server: RunningServer,
    pub base: String,
    pub client: reqwest::Client,
}

impl TestServer {
    /// Starts the server and waits until /ready says the models are loaded.
    pub async fn start(settings: Settings, double: Double) -> TestServer {
        let key = settings.api_keys.first().map(|k| k.0.clone()).unwrap_or_default();
        let real = CandleBackend {
            embeddings: settings.embedding_library().expect("embeddings directories load"),
            t2i_adapters: Some(settings.t2i_adapter_library()),
            controlnets: Some(settings.controlnet_library()),
            ..Default::default()
        };
        let backend = Arc::new(DoubledBackend { real, double });
        let server = sdserve::start(settings, backend).await.expect("server starts");
        let base = format!("http://{}", server.local_addr());
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = client
                .get(format!("{base}/ready"))
                .header("x-api-key", &key)
                .send()
                .await
                .expect("server answers");
            if ready.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "server not ready: {}", ready.text().await.unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TestServer { server, base, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request sent")
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.expect("request sent")
    }

    /// Submits an async job; returns its id.
    pub async fn submit(&self, body: &Value) -> String {
        let response = self.post_json("/v1/jobs", body).await;
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        let accepted: Value = response.json().await.unwrap();
        accepted["id"].as_str().unwrap().to_string()
    }

    pub async fn job(&self, id: &str) -> Value {
        let response = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Polls a job until `done(job)` holds (within `timeout`).
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "timed out waiting on job {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_finished(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(120), |job| {
            matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
        .await
    }

    /// Shuts down and waits for a clean exit.
    pub async fn stop(self) {
        self.server.shutdown();
        tokio::time::timeout(Duration::from_secs(120), self.server.wait())
            .await
            .expect("server stops in time")
            .expect("server stops cleanly");
    }
}

/// Asserts the OpenAI error shape and returns the error object.
pub async fn error_body(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status, "unexpected status");
    let body: Value = response.json().await.expect("error bodies are JSON");
    let error = body["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "error body lacks {field}: {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
