//! Jobs: ids, the state machine, the bounded priority queue, metrics, and the
//! [`JobManager`] that owns every job record and enforces the state machine in one place.
//!
//! The manager is shared by the async HTTP side (short, non-blocking calls) and the
//! worker threads (which block in [`JobManager::next_batch`]).

pub mod manager;
pub mod metrics;
pub mod queue;
pub mod state;

pub use manager::{
    CancelOutcome, ClaimedJob, EncodedImage, JobError, JobErrorKind, JobEvent, JobManager,
    JobOutcome, JobResult, JobSettings, JobSnapshot, LookupError, OutputOptions, Progress,
    SubmitError,
};
pub use metrics::Metrics;
pub use queue::{JobQueue, QueueFull};
pub use state::{JobId, JobState};
