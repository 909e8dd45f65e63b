//! Prometheus metrics of the service (names `sdserve_*`), kept in memory and rendered in
//! the text exposition format by `GET /metrics`. Hand-rolled: a handful of counters and
//! histograms do not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::JobState;

/// A histogram with fixed upper bounds (seconds).
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Default)]
struct HistogramData {
    /// Per bound, observations `<=` it (not cumulative; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        let data = HistogramData { counts: vec![0; bounds.len()], ..Default::default() };
        Histogram { bounds, inner: Mutex::new(data) }
    }

    fn observe(&self, value: f64) {
        let mut data = self.inner.lock().expect("metrics lock poisoned; this is a bug");
        if let Some(slot) = self.bounds.iter().position(|b| value <= *b) {
            data.counts[slot] += 1;
        }
        data.sum += value;
        data.count += 1;
    }

    fn mean(&self) -> Option<f64> {
        let data = self.inner.lock().expect("metrics lock poisoned; this is a bug");
        (data.count > 0).then(|| data.sum / data.count as f64)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let data = self.inner.lock().expect("metrics lock poisoned; this is a bug");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&data.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", data.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", data.sum, data.count);
    }
}

const JOB_SECONDS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
const STEP_SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    jobs_by_state: Mutex<BTreeMap<&'static str, u64>>,
    jobs_rejected: AtomicU64,
    queue_seconds: Histogram,
    inference_seconds: Histogram,
    step_seconds: Histogram,
    images: AtomicU64,
    http_requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            jobs_by_state: Mutex::default(),
            jobs_rejected: AtomicU64::new(0),
            queue_seconds: Histogram::new(JOB_SECONDS),
            inference_seconds: Histogram::new(JOB_SECONDS),
            step_seconds: Histogram::new(STEP_SECONDS),
            images: AtomicU64::new(0),
            http_requests: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A job entered `state` (queued on submit, then its final state).
    pub fn job_entered(&self, state: JobState) {
        let mut jobs = self.jobs_by_state.lock().expect("metrics lock poisoned; this is a bug");
        *jobs.entry(state.as_str()).or_default() += 1;
    }

    /// A job was refused because the queue was full.
    pub fn job_rejected(&self) {
        self.jobs_rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_queue_time(&self, waited: Duration) {
        self.queue_seconds.observe(waited.as_secs_f64());
    }

    pub fn observe_inference_time(&self, ran: Duration) {
        self.inference_seconds.observe(ran.as_secs_f64());
    }

    pub fn observe_step_time(&self, step: Duration) {
        self.step_seconds.observe(step.as_secs_f64());
    }

    pub fn images_generated(&self, count: usize) {
        self.images.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Mean time a job ran so far, if any ran; used for Retry-After.
    pub fn mean_inference_seconds(&self) -> Option<f64> {
        self.inference_seconds.mean()
    }

    /// One HTTP response went out.
    pub fn http_request(&self, method: &str, route: &str, status: u16) {
        let mut requests = self.http_requests.lock().expect("metrics lock poisoned; this is a bug");
        *requests.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
    }

    /// The text exposition format; `queue_depth` and `running` are sampled by the caller.
    pub fn render(&self, queue_depth: usize, running: usize) -> String {
        let mut out = String::new();
        out.push_str("# HELP sdserve_jobs_total Jobs that entered each state (rejected: refused, queue full).\n");
        out.push_str("# TYPE sdserve_jobs_total counter\n");
        {
            let jobs = self.jobs_by_state.lock().expect("metrics lock poisoned; this is a bug");
            for state in
                [JobState::Queued, JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            {
                let count = jobs.get(state.as_str()).copied().unwrap_or(0);
                let _ = writeln!(out, "sdserve_jobs_total{{state=\"{}\"}} {count}", state.as_str());
            }
            let rejected = self.jobs_rejected.load(Ordering::Relaxed);
            let _ = writeln!(out, "sdserve_jobs_total{{state=\"rejected\"}} {rejected}");
        }
        let _ = writeln!(
            out,
            "# HELP sdserve_queue_depth Jobs waiting in the queue.\n# TYPE sdserve_queue_depth gauge\nsdserve_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP sdserve_jobs_running Jobs being generated now.\n# TYPE sdserve_jobs_running gauge\nsdserve_jobs_running {running}"
        );
        self.queue_seconds.render(
            &mut out,
            "sdserve_job_queue_seconds",
            "Time jobs waited in the queue.",
        );
        self.inference_seconds.render(
            &mut out,
            "sdserve_job_inference_seconds",
            "Time jobs ran on a worker (generation and encoding).",
        );
        self.step_seconds.render(&mut out, "sdserve_step_seconds", "Time of one denoising step.");
        let _ = writeln!(
            out,
            "# HELP sdserve_images_total Images generated.\n# TYPE sdserve_images_total counter\nsdserve_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP sdserve_http_requests_total HTTP responses by method, route and status.\n",
        );
        out.push_str("# TYPE sdserve_http_requests_total counter\n");
        let requests = self.http_requests.lock().expect("metrics lock poisoned; this is a bug");
        for ((method, route, status), count) in requests.iter() {
            let _ = writeln!(
                out,
                "sdserve_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let metrics = Metrics::default();
        metrics.observe_step_time(Duration::from_millis(20));
        metrics.observe_step_time(Duration::from_secs(100));
        let text = metrics.render(0, 0);
        assert!(text.contains("sdserve_step_seconds_bucket{le=\"0.025\"} 1"), "{text}");
        assert!(text.contains("sdserve_step_seconds_bucket{le=\"10\"} 1"), "{text}");
        assert!(text.contains("sdserve_step_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("sdserve_step_seconds_count 2"), "{text}");
    }

    #[test]
    fn every_documented_metric_is_rendered() {
        let metrics = Metrics::default();
        metrics.job_entered(JobState::Succeeded);
        metrics.http_request("GET", "/health", 200);
        let text = metrics.render(3, 1);
        for name in [
            "sdserve_jobs_total{state=\"succeeded\"} 1",
            "sdserve_queue_depth 3",
            "sdserve_job_queue_seconds_count 0",
            "sdserve_job_inference_seconds_count 0",
            "sdserve_step_seconds_count 0",
            "sdserve_images_total 0",
            "sdserve_http_requests_total{method=\"GET\",route=\"/health\",status=\"200\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
