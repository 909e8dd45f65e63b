//! The job manager: every job record, the wait queue, cancellation tokens, deadlines,
//! result retention and per-job event channels. All state changes of a job go through
//! [`JobManager::transition`], which refuses anything the state machine does not allow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

use super::{JobId, JobQueue, JobState, Metrics};
use crate::codec::ImageFormat;
use crate::pipeline::{BatchKey, GenerationRequest};

/// How many ids of expired jobs are remembered (to answer 410 rather than 404).
const REMEMBERED_EXPIRED_IDS: usize = 100_000;
/// Events a slow subscriber may fall behind before it skips some (progress only matters
/// as the latest value; the terminal event is re-read from the record).
const EVENT_BUFFER: usize = 64;
/// Retention and queued deadlines are enforced at most this often (and on every lookup
/// of the job itself).
const PRUNE_INTERVAL: Duration = Duration::from_millis(250);

/// Settings of the job layer.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Jobs that may wait; running jobs are not counted.
    pub queue_capacity: usize,
    /// A job not finished this long after submission fails.
    pub job_timeout: Duration,
    /// Finished jobs are kept this long.
    pub retention: Duration,
    /// Worker slots over all devices (for the Retry-After estimate).
    pub worker_slots: usize,
    /// Compatible jobs a worker takes as one batch (see [`JobManager::next_batch`]).
    pub max_batch: usize,
    /// How long a worker holding a batchable job waits for compatible ones.
    pub batch_wait: Duration,
}

/// How a job's images are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputOptions {
    pub format: ImageFormat,
    /// JPEG/WebP quality 1-100.
    pub quality: u8,
}

/// Progress of a running job, over all its images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Denoising steps done, over all images of the job.
    pub step: usize,
    /// Denoising steps in total (`steps × n`).
    pub steps: usize,
    /// Estimated milliseconds left, from the pace so far.
    pub eta_ms: Option<u64>,
}

/// Why a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobErrorKind {
    /// The pipeline refused the request (a value the API could not check up front).
    InvalidRequest,
    /// The job's deadline passed.
    Timeout,
    /// A bug or a broken model: details are in the log, not in the response.
    Internal,
    /// The server shut down before the job could run.
    ShuttingDown,
}

impl JobErrorKind {
    /// Stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            JobErrorKind::InvalidRequest => "invalid_value",
            JobErrorKind::Timeout => "job_timeout",
            JobErrorKind::Internal => "generation_failed",
            JobErrorKind::ShuttingDown => "shutting_down",
        }
    }
}

/// A job's failure, as shown to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub kind: JobErrorKind,
    pub message: String,
    /// The request field at fault, for `InvalidRequest`.
    pub param: Option<String>,
}

impl JobError {
    pub fn new(kind: JobErrorKind, message: impl Into<String>) -> JobError {
        JobError { kind, message: message.into(), param: None }
    }
}

/// One encoded output image.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub index: u32,
    pub seed: u64,
    pub format: ImageFormat,
    pub bytes: Vec<u8>,
}

/// The images of a succeeded job and how long it took.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub images: Vec<EncodedImage>,
    pub queue_ms: u64,
    pub inference_ms: u64,
}

/// How a worker ended a job.
#[derive(Debug)]
pub enum JobOutcome {
    Succeeded(Vec<EncodedImage>),
    Failed(JobError),
    Cancelled,
}

/// Something that happened to a job, for subscribers (SSE, waiting handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// The job's place in the queue changed (0: next).
    Queued {
        position: usize,
    },
    Started,
    Progress(Progress),
    /// The job reached a final state; read the record for its result or error.
    Finished(JobState),
}

/// A copy of a job record at one moment.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub id: JobId,
    pub state: JobState,
    pub queue_position: Option<usize>,
    pub progress: Option<Progress>,
    pub result: Option<Arc<JobResult>>,
    pub error: Option<JobError>,
    pub request: Arc<GenerationRequest>,
    pub output: OutputOptions,
    pub priority: i32,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// A DELETE arrived while it ran; it stops at its next step.
    pub cancel_requested: bool,
}

/// A job could not be submitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} jobs waiting); retry in {retry_after_secs} s")]
    QueueFull { capacity: usize, retry_after_secs: u64 },
    #[error("the server is shutting down and takes no new work")]
    ShuttingDown,
}

/// A job id that names no job now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no job with this id")]
    NotFound,
    #[error("this job finished longer ago than the result retention time; its result is gone")]
    Expired,
}

/// What a cancellation request did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// The job was waiting and is cancelled now.
    Cancelled(JobSnapshot),
    /// The job is running and stops at its next step.
    Cancelling(JobSnapshot),
    /// The job had already finished; nothing changed.
    AlreadyFinished(JobSnapshot),
}

/// A job handed to a worker.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub request: Arc<GenerationRequest>,
    pub output: OutputOptions,
    /// Set when the job should stop (DELETE, client gone, shutdown).
    pub cancel: Arc<AtomicBool>,
    /// After this instant the job fails with a timeout.
    pub deadline: Instant,
}

#[derive(Debug)]
struct JobRecord {
    id: JobId,
    request: Arc<GenerationRequest>,
    output: OutputOptions,
    priority: i32,
    state: JobState,
    created: Instant,
    created_at: SystemTime,
    deadline: Instant,
    started: Option<Instant>,
    started_at: Option<SystemTime>,
    finished: Option<Instant>,
    finished_at: Option<SystemTime>,
    /// Steps done per image (images may be denoised one after another or together).
    steps_done: Vec<usize>,
    steps_per_image: usize,
    last_step: Option<Instant>,
    result: Option<Arc<JobResult>>,
    error: Option<JobError>,
    cancel: Arc<AtomicBool>,
    events: broadcast::Sender<JobEvent>,
}

impl JobRecord {
    fn progress(&self) -> Option<Progress> {
        let started = self.started?;
        let steps = self.steps_per_image * self.steps_done.len();
        let step: usize = self.steps_done.iter().sum();
        let eta_ms = match self.state {
            JobState::Running if step > 0 => {
                let per_step = started.elapsed().as_secs_f64() / step as f64;
                Some((per_step * (steps.saturating_sub(step)) as f64 * 1000.0).round() as u64)
            }
            JobState::Running => None,
            _ => Some(0),
        };
        Some(Progress { step, steps, eta_ms })
    }

    fn is_expired(&self, now: Instant, retention: Duration) -> bool {
        self.finished.is_some_and(|finished| now.duration_since(finished) >= retention)
    }

    fn snapshot(&self, queue: &JobQueue) -> JobSnapshot {
        JobSnapshot {
            id: self.id.clone(),
            state: self.state,
            queue_position: queue.position(&self.id),
            progress: self.progress(),
            result: self.result.clone(),
            error: self.error.clone(),
            request: self.request.clone(),
            output: self.output,
            priority: self.priority,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            cancel_requested: self.cancel.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct Inner {
    queue: JobQueue,
    jobs: HashMap<JobId, JobRecord>,
    expired: HashSet<JobId>,
    expired_order: VecDeque<JobId>,
    running: usize,
    /// Jobs taken out of the queue by a worker still filling its batch (not yet running).
    held: usize,
    accepting: bool,
    stop_workers: bool,
    last_prune: Instant,
}

/// Owns all jobs; shared (in an `Arc`) by the HTTP handlers and the worker threads.
#[derive(Debug)]
pub struct JobManager {
    settings: JobSettings,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    /// Wakes workers blocked in `next_batch`.
    work_available: Condvar,
}

impl JobManager {
    pub fn new(settings: JobSettings, metrics: Arc<Metrics>) -> JobManager {
        let inner = Inner {
            queue: JobQueue::new(settings.queue_capacity),
            jobs: HashMap::new(),
            expired: HashSet::new(),
            expired_order: VecDeque::new(),
            running: 0,
            held: 0,
            accepting: true,
            stop_workers: false,
            last_prune: Instant::now(),
        };
        JobManager { settings, metrics, inner: Mutex::new(inner), work_available: Condvar::new() }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn settings(&self) -> &JobSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file (no user code runs
        // under it); recover the data rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a validated request.
    pub fn submit(
        &self,
        request: GenerationRequest,
        output: OutputOptions,
        priority: i32,
    ) -> Result<JobSnapshot, SubmitError> {
        let mut inner = self.lock();
        self.prune(&mut inner, false);
        if !inner.accepting {
            return Err(SubmitError::ShuttingDown);
        }
        let id = JobId::random();
        if let Err(full) = inner.queue.push(id.clone(), priority) {
            self.metrics.job_rejected();
            let retry_after_secs = self.retry_after_secs(inner.queue.len());
            return Err(SubmitError::QueueFull { capacity: full.capacity, retry_after_secs });
        }
        let now = Instant::now();
        let images = request.n.max(1) as usize;
        let steps_per_image = request.denoising_steps();
        let record = JobRecord {
            id: id.clone(),
            request: Arc::new(request),
            output,
            priority,
            state: JobState::Queued,
            created: now,
            created_at: SystemTime::now(),
            deadline: now + self.settings.job_timeout,
            started: None,
            started_at: None,
            finished: None,
            finished_at: None,
            steps_done: vec![0; images],
            steps_per_image,
            last_step: None,
            result: None,
            error: None,
            cancel: Arc::new(AtomicBool::new(false)),
            events: broadcast::channel(EVENT_BUFFER).0,
        };
        let snapshot = record.snapshot(&inner.queue);
        inner.jobs.insert(id, record);
        self.metrics.job_entered(JobState::Queued);
        // Positions behind a higher-priority arrival moved back.
        if priority != 0 {
            Self::announce_positions(&inner);
        }
        drop(inner);
        // A worker filling a batch waits on the same condition: wake them all so an
        // idle worker still sees a job the filling one does not take.
        if self.settings.max_batch > 1 {
            self.work_available.notify_all();
        } else {
            self.work_available.notify_one();
        }
        Ok(snapshot)
    }

    /// Seconds until a slot is likely free: the mean job time × queued jobs per worker.
    fn retry_after_secs(&self, waiting: usize) -> u64 {
        let per_job = self.metrics.mean_inference_seconds().unwrap_or(5.0);
        let slots = self.settings.worker_slots.max(1) as f64;
        ((per_job * waiting as f64 / slots).ceil() as u64).clamp(1, 3600)
    }

    /// The job as it is now.
    pub fn get(&self, id: &JobId) -> Result<JobSnapshot, LookupError> {
        let mut inner = self.lock();
        self.prune(&mut inner, false);
        let inner = &*inner;
        Self::live_record(inner, id, self.settings.retention).map(|r| r.snapshot(&inner.queue))
    }

    /// The job as it is now, and a receiver of everything that happens to it from now on
    /// (taken under one lock, so no event falls between the two).
    pub fn subscribe(
        &self,
        id: &JobId,
    ) -> Result<(JobSnapshot, broadcast::Receiver<JobEvent>), LookupError> {
        let mut inner = self.lock();
        self.prune(&mut inner, false);
        let inner = &*inner;
        let record = Self::live_record(inner, id, self.settings.retention)?;
        Ok((record.snapshot(&inner.queue), record.events.subscribe()))
    }

    fn live_record<'a>(
        inner: &'a Inner,
        id: &JobId,
        retention: Duration,
    ) -> Result<&'a JobRecord, LookupError> {
        match inner.jobs.get(id) {
            Some(record) if record.is_expired(Instant::now(), retention) => {
                Err(LookupError::Expired)
            }
            Some(record) => Ok(record),
            None if inner.expired.contains(id) => Err(LookupError::Expired),
            None => Err(LookupError::NotFound),
        }
    }

    /// Cancels a job: a waiting one at once, a running one at its next step.
    pub fn cancel(&self, id: &JobId) -> Result<CancelOutcome, LookupError> {
        let mut inner = self.lock();
        self.prune(&mut inner, false);
        let state = Self::live_record(&inner, id, self.settings.retention)?.state;
        match state {
            JobState::Queued => {
                inner.queue.remove(id);
                self.transition(&mut inner, id, JobState::Cancelled, None, None);
                Self::announce_positions(&inner);
                let record = &inner.jobs[id];
                Ok(CancelOutcome::Cancelled(record.snapshot(&inner.queue)))
            }
            JobState::Running => {
                let record = &inner.jobs[id];
                record.cancel.store(true, Ordering::Relaxed);
                Ok(CancelOutcome::Cancelling(record.snapshot(&inner.queue)))
            }
            _ => Ok(CancelOutcome::AlreadyFinished(inner.jobs[id].snapshot(&inner.queue))),
        }
    }

    /// Takes from the queue up to `wanted` waiting jobs whose batch key is `key`, front
    /// first (a compatible job may so run before incompatible ones ahead of it).
    fn take_compatible(inner: &mut Inner, key: &BatchKey, wanted: usize) -> Vec<JobId> {
        let ids: Vec<JobId> = inner
            .queue
            .iter()
            .filter(|id| {
                inner.jobs.get(*id).is_some_and(|r| r.request.batch_key().as_ref() == Some(key))
            })
            .take(wanted)
            .cloned()
            .collect();
        for id in &ids {
            inner.queue.remove(id);
        }
        ids
    }

    /// Blocks until jobs are waiting, then claims the first one and up to `max - 1` more
    /// with the same [`GenerationRequest::batch_key`] (marks them running); a job without
    /// a key runs alone. With `batch_wait` set, a worker holding a batchable job waits that
    /// long for compatible jobs to fill the batch. None when the worker should exit:
    /// shutdown and nothing left to drain, or aborted.
    pub fn next_batch(&self, max: usize) -> Option<Vec<ClaimedJob>> {
        let mut inner = self.lock();
        loop {
            if inner.stop_workers {
                return None;
            }
            self.prune(&mut inner, false);
            let mut ids = inner.queue.pop_batch(1);
            let key = ids.first().and_then(|id| inner.jobs[id].request.batch_key());
            if let (Some(key), true) = (&key, max > 1) {
                ids.extend(Self::take_compatible(&mut inner, key, max - 1));
                inner.held += ids.len();
                let wait_until = Instant::now() + self.settings.batch_wait;
                while ids.len() < max && !inner.stop_workers {
                    let now = Instant::now();
                    if now >= wait_until {
                        break;
                    }
                    inner = self
                        .work_available
                        .wait_timeout(inner, wait_until - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                    let wanted = max - ids.len();
                    let more = Self::take_compatible(&mut inner, key, wanted);
                    inner.held += more.len();
                    ids.extend(more);
                }
                inner.held -= ids.len();
                if inner.stop_workers {
                    // Aborted while filling: these jobs were out of the queue's drain.
                    for id in &ids {
                        if inner.jobs.get(id).is_some_and(|r| r.state == JobState::Queued) {
                            self.fail_unstarted(&mut inner, id, JobErrorKind::ShuttingDown);
                        }
                    }
                    return None;
                }
            }
            if !ids.is_empty() {
                let now = Instant::now();
                let mut batch = Vec::with_capacity(ids.len());
                for id in ids {
                    // Cancelled (or failed by shutdown) while the batch was filling.
                    if inner.jobs.get(&id).is_none_or(|r| r.state != JobState::Queued) {
                        continue;
                    }
                    if inner.jobs[&id].deadline <= now {
                        self.fail_unstarted(&mut inner, &id, JobErrorKind::Timeout);
                        continue;
                    }
                    self.transition(&mut inner, &id, JobState::Running, None, None);
                    let record = &inner.jobs[&id];
                    batch.push(ClaimedJob {
                        id: id.clone(),
                        request: record.request.clone(),
                        output: record.output,
                        cancel: record.cancel.clone(),
                        deadline: record.deadline,
                    });
                }
                Self::announce_positions(&inner);
                if !batch.is_empty() {
                    return Some(batch);
                }
                continue;
            }
            if !inner.accepting {
                return None;
            }
            // Wake up now and then to enforce the deadlines of waiting jobs.
            inner = self
                .work_available
                .wait_timeout(inner, Duration::from_secs(1))
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Records that `step` of `steps` steps of image `image_index` of a running job is done.
    pub fn report_progress(&self, id: &JobId, image_index: u32, step: usize, steps: usize) {
        let mut inner = self.lock();
        let Some(record) = inner.jobs.get_mut(id) else {
            return;
        };
        if record.state != JobState::Running {
            return;
        }
        let now = Instant::now();
        if let Some(previous) = record.last_step.replace(now) {
            self.metrics.observe_step_time(now.duration_since(previous));
        }
        record.steps_per_image = steps;
        if let Some(done) = record.steps_done.get_mut(image_index as usize) {
            *done = (*done).max(step);
        }
        if let Some(progress) = record.progress() {
            let _ = record.events.send(JobEvent::Progress(progress));
        }
    }

    /// Ends a running job.
    pub fn finish(&self, id: &JobId, outcome: JobOutcome) {
        let mut inner = self.lock();
        match outcome {
            JobOutcome::Succeeded(images) => {
                self.metrics.images_generated(images.len());
                self.transition(&mut inner, id, JobState::Succeeded, Some(images), None);
            }
            JobOutcome::Failed(error) => {
                self.transition(&mut inner, id, JobState::Failed, None, Some(error));
            }
            JobOutcome::Cancelled => {
                self.transition(&mut inner, id, JobState::Cancelled, None, None)
            }
        }
    }

    /// The one place a job changes state.
    fn transition(
        &self,
        inner: &mut Inner,
        id: &JobId,
        next: JobState,
        images: Option<Vec<EncodedImage>>,
        error: Option<JobError>,
    ) {
        let Some(record) = inner.jobs.get_mut(id) else {
            tracing::error!(job = %id, ?next, "state change for an unknown job; this is a bug");
            return;
        };
        if !record.state.can_become(next) {
            tracing::error!(job = %id, from = ?record.state, to = ?next, "refused state change; this is a bug");
            return;
        }
        let now = Instant::now();
        let was_running = record.state == JobState::Running;
        record.state = next;
        match next {
            JobState::Running => {
                record.started = Some(now);
                record.started_at = Some(SystemTime::now());
                record.last_step = Some(now);
                inner.running += 1;
                self.metrics.observe_queue_time(now.duration_since(record.created));
                let _ = record.events.send(JobEvent::Started);
            }
            _ => {
                record.finished = Some(now);
                record.finished_at = Some(SystemTime::now());
                if was_running {
                    inner.running -= 1;
                    let started =
                        record.started.expect("running jobs have a start time; this is a bug");
                    self.metrics.observe_inference_time(now.duration_since(started));
                }
                if let Some(images) = images {
                    let started = record.started.unwrap_or(now);
                    record.result = Some(Arc::new(JobResult {
                        images,
                        queue_ms: started.duration_since(record.created).as_millis() as u64,
                        inference_ms: now.duration_since(started).as_millis() as u64,
                    }));
                }
                record.error = error;
                self.metrics.job_entered(next);
                let _ = record.events.send(JobEvent::Finished(next));
            }
        }
    }

    fn fail_unstarted(&self, inner: &mut Inner, id: &JobId, kind: JobErrorKind) {
        let message = match kind {
            JobErrorKind::Timeout => format!(
                "the job waited longer than its deadline ({} s) before it could run",
                self.settings.job_timeout.as_secs()
            ),
            _ => "the server shut down before the job could run".to_string(),
        };
        self.transition(inner, id, JobState::Failed, None, Some(JobError::new(kind, message)));
    }

    /// Tells subscribers of waiting jobs their new places.
    fn announce_positions(inner: &Inner) {
        for (position, id) in inner.queue.iter().enumerate() {
            if let Some(record) = inner.jobs.get(id) {
                if record.events.receiver_count() > 0 {
                    let _ = record.events.send(JobEvent::Queued { position });
                }
            }
        }
    }

    /// Forgets finished jobs past retention and fails waiting jobs past their deadline.
    fn prune(&self, inner: &mut Inner, force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(inner.last_prune) < PRUNE_INTERVAL {
            return;
        }
        inner.last_prune = now;
        let retention = self.settings.retention;
        let expired: Vec<JobId> = inner
            .jobs
            .values()
            .filter(|r| r.is_expired(now, retention))
            .map(|r| r.id.clone())
            .collect();
        for id in expired {
            inner.jobs.remove(&id);
            inner.expired.insert(id.clone());
            inner.expired_order.push_back(id);
            if inner.expired_order.len() > REMEMBERED_EXPIRED_IDS {
                if let Some(oldest) = inner.expired_order.pop_front() {
                    inner.expired.remove(&oldest);
                }
            }
        }
        let overdue: Vec<JobId> = inner
            .queue
            .iter()
            .filter(|id| inner.jobs.get(*id).is_some_and(|r| r.deadline <= now))
            .cloned()
            .collect();
        for id in &overdue {
            inner.queue.remove(id);
            self.fail_unstarted(inner, id, JobErrorKind::Timeout);
        }
        if !overdue.is_empty() {
            Self::announce_positions(inner);
        }
    }

    /// Stops taking new work (503); workers drain the queue, then exit.
    pub fn stop_accepting(&self) {
        self.lock().accepting = false;
        self.work_available.notify_all();
    }

    pub fn is_accepting(&self) -> bool {
        self.lock().accepting
    }

    /// After the drain timeout: fails waiting jobs, asks running ones to stop, and tells
    /// workers to exit after their current job.
    pub fn abort_remaining(&self) {
        let mut inner = self.lock();
        inner.accepting = false;
        inner.stop_workers = true;
        for id in inner.queue.drain_all() {
            self.fail_unstarted(&mut inner, &id, JobErrorKind::ShuttingDown);
        }
        for record in inner.jobs.values().filter(|r| r.state == JobState::Running) {
            record.cancel.store(true, Ordering::Relaxed);
        }
        drop(inner);
        self.work_available.notify_all();
    }

    /// Jobs waiting.
    pub fn queue_depth(&self) -> usize {
        self.lock().queue.len()
    }

    /// Jobs running.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    /// Nothing waits and nothing runs.
    pub fn is_idle(&self) -> bool {
        let inner = self.lock();
        inner.queue.is_empty() && inner.running == 0 && inner.held == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelFamily;
    use crate::pipeline::{GenerationParams, Limits, ModelDefaults};

    fn manager(capacity: usize, retention: Duration, timeout: Duration) -> JobManager {
        let settings = JobSettings {
            queue_capacity: capacity,
            job_timeout: timeout,
            retention,
            worker_slots: 1,
            max_batch: 1,
            batch_wait: Duration::ZERO,
        };
        JobManager::new(settings, Arc::new(Metrics::default()))
    }

    fn request(steps: u32, n: u32) -> GenerationRequest {
        let model =
            ModelDefaults { name: "tiny".into(), family: ModelFamily::Sd1, width: 64, height: 64 };
        GenerationParams {
            prompt: "a cat".into(),
            steps: Some(steps),
            n: Some(n),
            ..Default::default()
        }
        .validate(&model, &Limits::default())
        .expect("valid test request")
    }

    const PNG: OutputOptions = OutputOptions { format: ImageFormat::Png, quality: 90 };
    const LONG: Duration = Duration::from_secs(3600);

    fn image(index: u32) -> EncodedImage {
        EncodedImage { index, seed: 1, format: ImageFormat::Png, bytes: vec![1, 2, 3] }
    }

    #[test]
    fn a_job_runs_through_its_states_and_reports_progress() {
        let jobs = manager(4, LONG, LONG);
        let job = jobs.submit(request(2, 2), PNG, 0).unwrap();
        assert_eq!((job.state, job.queue_position), (JobState::Queued, Some(0)));
        let (_, mut events) = jobs.subscribe(&job.id).unwrap();

        let claimed = jobs.next_batch(1).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Running);
        for image_index in 0..2 {
            for step in 1..=2 {
                jobs.report_progress(&job.id, image_index, step, 2);
            }
        }
        let running = jobs.get(&job.id).unwrap();
        assert_eq!(running.progress.as_ref().map(|p| (p.step, p.steps)), Some((4, 4)));
        jobs.finish(&job.id, JobOutcome::Succeeded(vec![image(0), image(1)]));

        let done = jobs.get(&job.id).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.result.as_ref().unwrap().images.len(), 2);
        assert!(done.finished_at.is_some() && done.started_at.is_some());

        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            seen.push(event);
        }
        assert_eq!(seen.first(), Some(&JobEvent::Started));
        assert_eq!(seen.iter().filter(|e| matches!(e, JobEvent::Progress(_))).count(), 4);
        assert_eq!(seen.last(), Some(&JobEvent::Finished(JobState::Succeeded)));
    }

    #[test]
    fn the_queue_refuses_work_beyond_capacity_with_a_retry_time() {
        let jobs = manager(1, LONG, LONG);
        let running = jobs.submit(request(1, 1), PNG, 0).unwrap();
        jobs.next_batch(1).unwrap();
        jobs.submit(request(1, 1), PNG, 0).unwrap();
        match jobs.submit(request(1, 1), PNG, 0) {
            Err(SubmitError::QueueFull { capacity: 1, retry_after_secs }) => {
                assert!(retry_after_secs >= 1)
            }
            other => panic!("expected a full queue, got {other:?}"),
        }
        jobs.finish(&running.id, JobOutcome::Succeeded(vec![image(0)]));
        assert_eq!(jobs.queue_depth(), 1);
    }

    #[test]
    fn cancelling_a_waiting_job_is_immediate_and_a_running_one_is_flagged() {
        let jobs = manager(4, LONG, LONG);
        let first = jobs.submit(request(1, 1), PNG, 0).unwrap();
        let second = jobs.submit(request(1, 1), PNG, 0).unwrap();
        let claimed = jobs.next_batch(1).unwrap().remove(0);
        assert_eq!(claimed.id, first.id);

        assert!(
            matches!(jobs.cancel(&second.id), Ok(CancelOutcome::Cancelled(s)) if s.state == JobState::Cancelled)
        );
        assert!(
            matches!(jobs.cancel(&first.id), Ok(CancelOutcome::Cancelling(s)) if s.state == JobState::Running)
        );
        assert!(claimed.cancel.load(Ordering::Relaxed));
        jobs.finish(&first.id, JobOutcome::Cancelled);
        assert!(matches!(jobs.cancel(&first.id), Ok(CancelOutcome::AlreadyFinished(_))));
        assert_eq!(jobs.cancel(&JobId::from_client("nope")).unwrap_err(), LookupError::NotFound);
        assert!(jobs.is_idle());
    }

    #[test]
    fn finished_jobs_expire_after_retention() {
        let jobs = manager(4, Duration::from_millis(50), LONG);
        let job = jobs.submit(request(1, 1), PNG, 0).unwrap();
        jobs.next_batch(1).unwrap();
        jobs.finish(&job.id, JobOutcome::Succeeded(vec![image(0)]));
        assert!(jobs.get(&job.id).is_ok());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(jobs.get(&job.id).unwrap_err(), LookupError::Expired);
        jobs.prune(&mut jobs.lock(), true);
        assert_eq!(
            jobs.get(&job.id).unwrap_err(),
            LookupError::Expired,
            "still 410 once forgotten"
        );
    }

    #[test]
    fn a_job_past_its_deadline_in_the_queue_fails_without_running() {
        let jobs = manager(4, LONG, Duration::from_millis(20));
        let job = jobs.submit(request(1, 1), PNG, 0).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        jobs.stop_accepting();
        assert!(jobs.next_batch(1).is_none(), "nothing left to run");
        let failed = jobs.get(&job.id).unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(failed.error.unwrap().kind, JobErrorKind::Timeout);
    }

    #[test]
    fn shutdown_refuses_new_work_but_drains_the_queue() {
        let jobs = manager(4, LONG, LONG);
        let waiting = jobs.submit(request(1, 1), PNG, 0).unwrap();
        jobs.stop_accepting();
        assert_eq!(jobs.submit(request(1, 1), PNG, 0).unwrap_err(), SubmitError::ShuttingDown);
        let batch = jobs.next_batch(1).expect("queued work is still handed out");
        assert_eq!(batch[0].id, waiting.id);
        jobs.finish(&waiting.id, JobOutcome::Succeeded(vec![image(0)]));
        assert!(jobs.next_batch(1).is_none());
    }

    #[test]
    fn abort_fails_waiting_jobs_and_flags_running_ones() {
        let jobs = manager(4, LONG, LONG);
        let running = jobs.submit(request(1, 1), PNG, 0).unwrap();
        let waiting = jobs.submit(request(1, 1), PNG, 0).unwrap();
        let claimed = jobs.next_batch(1).unwrap().remove(0);
        jobs.abort_remaining();
        assert!(claimed.cancel.load(Ordering::Relaxed));
        let failed = jobs.get(&waiting.id).unwrap();
        assert_eq!(failed.error.unwrap().kind, JobErrorKind::ShuttingDown);
        jobs.finish(&running.id, JobOutcome::Cancelled);
        assert!(jobs.next_batch(1).is_none());
    }

    #[test]
    fn an_illegal_transition_changes_nothing() {
        let jobs = manager(4, LONG, LONG);
        let job = jobs.submit(request(1, 1), PNG, 0).unwrap();
        // Finishing a job that never ran is a worker bug; the record must stay queued.
        jobs.finish(&job.id, JobOutcome::Succeeded(vec![image(0)]));
        assert_eq!(jobs.get(&job.id).unwrap().state, JobState::Queued);
    }

    fn batching_manager(max_batch: usize, batch_wait: Duration) -> JobManager {
        let settings = JobSettings {
            queue_capacity: 16,
            job_timeout: LONG,
            retention: LONG,
            worker_slots: 1,
            max_batch,
            batch_wait,
        };
        JobManager::new(settings, Arc::new(Metrics::default()))
    }

    #[test]
    fn compatible_jobs_are_claimed_together_and_others_wait_their_turn() {
        let jobs = batching_manager(3, Duration::ZERO);
        let a = jobs.submit(request(2, 1), PNG, 0).unwrap();
        let other_steps = jobs.submit(request(3, 1), PNG, 0).unwrap();
        let b = jobs.submit(request(2, 2), PNG, 0).unwrap();
        let mut with_lora = request(2, 1);
        with_lora.loras.push(crate::pipeline::LoraChoice { name: "x".into(), weight: 1.0 });
        let lora = jobs.submit(with_lora, PNG, 0).unwrap();
        let c = jobs.submit(request(2, 1), PNG, 0).unwrap();
        let d = jobs.submit(request(2, 1), PNG, 0).unwrap();
        let ids = |batch: Vec<ClaimedJob>| batch.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(jobs.next_batch(3).unwrap()), vec![a.id, b.id, c.id], "max_batch caps it");
        assert_eq!(ids(jobs.next_batch(3).unwrap()), vec![other_steps.id]);
        assert_eq!(ids(jobs.next_batch(3).unwrap()), vec![lora.id], "LoRA jobs run alone");
        assert_eq!(ids(jobs.next_batch(3).unwrap()), vec![d.id]);
    }

    #[test]
    fn a_filling_batch_waits_for_compatible_arrivals() {
        let jobs = Arc::new(batching_manager(4, Duration::from_millis(300)));
        let first = jobs.submit(request(2, 1), PNG, 0).unwrap();
        let submitter = {
            let jobs = jobs.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let second = jobs.submit(request(2, 1), PNG, 0).unwrap();
                let third = jobs.submit(request(2, 1), PNG, 0).unwrap();
                (second.id, third.id)
            })
        };
        let started = Instant::now();
        let batch = jobs.next_batch(4).unwrap();
        let (second, _third) = submitter.join().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250), "it waited for more");
        assert_eq!(batch[0].id, first.id);
        assert!(batch.iter().any(|j| j.id == second), "a job arriving in the wait joins");
        assert!(batch.iter().all(|j| jobs.get(&j.id).unwrap().state == JobState::Running));
    }

    #[test]
    fn waiting_subscribers_learn_their_new_position() {
        let jobs = manager(4, LONG, LONG);
        jobs.submit(request(1, 1), PNG, 0).unwrap();
        let second = jobs.submit(request(1, 1), PNG, 0).unwrap();
        let (snapshot, mut events) = jobs.subscribe(&second.id).unwrap();
        assert_eq!(snapshot.queue_position, Some(1));
        jobs.next_batch(1).unwrap();
        assert_eq!(events.try_recv().unwrap(), JobEvent::Queued { position: 0 });
    }
}
