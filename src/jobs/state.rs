//! Job ids and the job state machine: the only transitions a job may take.

use std::fmt;

use serde::Serialize;

/// A job's id: a random UUID, as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    /// A new random id.
    pub fn random() -> JobId {
        JobId(uuid::Uuid::new_v4().simple().to_string())
    }

    /// An id as a client sent it (it may name no job).
    pub fn from_client(text: &str) -> JobId {
        JobId(text.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job is in its life.
///
/// ```text
/// queued ──► running ──► succeeded
///   │           ├──────► failed
///   │           └──────► cancelled
///   ├──────────────────► cancelled   (DELETE while queued, or shutdown)
///   └──────────────────► failed      (deadline passed while queued)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, for metrics.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Succeeded, failed or cancelled: nothing will change any more.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Whether a job in this state may move to `next`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }

    /// The lowercase name used in JSON, SSE and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_states_are_final() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_finished()) {
            for to in JobState::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?} must be refused");
            }
        }
    }

    #[test]
    fn a_running_job_never_goes_back_to_the_queue() {
        assert!(!JobState::Running.can_become(JobState::Queued));
        assert!(JobState::Queued.can_become(JobState::Running));
        assert!(!JobState::Queued.can_become(JobState::Succeeded), "only run jobs succeed");
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(JobId::random(), JobId::random());
        assert_eq!(JobId::random().as_str().len(), 32);
    }
}
