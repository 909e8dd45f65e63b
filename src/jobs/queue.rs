//! The bounded wait queue: higher priority first, first come first served within a
//! priority. It holds only waiting jobs; running jobs do not count against its capacity.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use super::JobId;

/// The queue is at capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue is full ({capacity} jobs waiting)")]
pub struct QueueFull {
    pub capacity: usize,
}

/// Orders by priority (descending), then arrival.
type QueueKey = (Reverse<i32>, u64);

/// A bounded priority queue of job ids.
#[derive(Debug)]
pub struct JobQueue {
    capacity: usize,
    order: BTreeMap<QueueKey, JobId>,
    keys: HashMap<JobId, QueueKey>,
    arrivals: u64,
}

impl JobQueue {
    pub fn new(capacity: usize) -> JobQueue {
        JobQueue { capacity, order: BTreeMap::new(), keys: HashMap::new(), arrivals: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Adds a job; refused when `capacity` jobs already wait.
    pub fn push(&mut self, id: JobId, priority: i32) -> Result<(), QueueFull> {
        if self.order.len() >= self.capacity {
            return Err(QueueFull { capacity: self.capacity });
        }
        let key = (Reverse(priority), self.arrivals);
        self.arrivals += 1;
        self.order.insert(key, id.clone());
        self.keys.insert(id, key);
        Ok(())
    }

    /// Takes up to `max` jobs from the front.
    pub fn pop_batch(&mut self, max: usize) -> Vec<JobId> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some((_, id)) = self.order.pop_first() else {
                break;
            };
            self.keys.remove(&id);
            batch.push(id);
        }
        batch
    }

    /// Removes a waiting job; false when it was not waiting.
    pub fn remove(&mut self, id: &JobId) -> bool {
        match self.keys.remove(id) {
            Some(key) => self.order.remove(&key).is_some(),
            None => false,
        }
    }

    /// Jobs ahead of `id` (0: it runs next); None when it is not waiting.
    pub fn position(&self, id: &JobId) -> Option<usize> {
        let key = self.keys.get(id)?;
        Some(self.order.range(..*key).count())
    }

    /// Waiting jobs, front first.
    pub fn iter(&self) -> impl Iterator<Item = &JobId> {
        self.order.values()
    }

    /// Every waiting job, front first.
    pub fn drain_all(&mut self) -> Vec<JobId> {
        self.keys.clear();
        std::mem::take(&mut self.order).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> JobId {
        JobId::from_client(name)
    }

    #[test]
    fn fifo_within_a_priority_and_higher_priority_first() {
        let mut queue = JobQueue::new(10);
        queue.push(id("a"), 0).unwrap();
        queue.push(id("b"), 0).unwrap();
        queue.push(id("urgent"), 5).unwrap();
        queue.push(id("c"), 0).unwrap();
        queue.push(id("low"), -1).unwrap();
        assert_eq!(queue.position(&id("urgent")), Some(0));
        assert_eq!(queue.position(&id("c")), Some(3));
        let order: Vec<String> =
            queue.pop_batch(10).into_iter().map(|j| j.as_str().to_string()).collect();
        assert_eq!(order, ["urgent", "a", "b", "c", "low"]);
    }

    #[test]
    fn capacity_counts_waiting_jobs_only() {
        let mut queue = JobQueue::new(2);
        queue.push(id("a"), 0).unwrap();
        queue.push(id("b"), 0).unwrap();
        assert_eq!(queue.push(id("c"), 9), Err(QueueFull { capacity: 2 }));
        assert_eq!(queue.pop_batch(1), vec![id("a")]);
        queue.push(id("c"), 0).unwrap();
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn removing_a_job_shifts_the_ones_behind_it() {
        let mut queue = JobQueue::new(4);
        for name in ["a", "b", "c"] {
            queue.push(id(name), 0).unwrap();
        }
        assert!(queue.remove(&id("a")));
        assert!(!queue.remove(&id("a")));
        assert_eq!(queue.position(&id("c")), Some(1));
        assert_eq!(queue.position(&id("a")), None);
        assert_eq!(queue.drain_all(), vec![id("b"), id("c")]);
        assert!(queue.is_empty());
    }
}
