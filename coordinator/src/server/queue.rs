//! The bounded job queue: higher priority first, arrival order among equal priorities; entries can
//! be removed by id at any time (cancellation, a client that went away, a passed deadline).

use crate::CoordinatorError;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

/// Order key: priority descending, then arrival ascending.
type Key = (Reverse<i32>, u64);

/// A bounded priority queue of `T` keyed by job id.
#[derive(Debug)]
pub struct JobQueue<T> {
    limit: usize,
    next_seq: u64,
    order: BTreeMap<Key, (String, T)>,
    keys: HashMap<String, Key>,
}

impl<T> JobQueue<T> {
    /// An empty queue holding at most `limit` entries.
    pub fn new(limit: usize) -> Self {
        Self { limit, next_seq: 0, order: BTreeMap::new(), keys: HashMap::new() }
    }

    /// The most entries it holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Adds `item` for job `id` at `priority`; returns how many entries will leave before it.
    /// A full queue refuses with [`CoordinatorError::QueueFull`]; an id already queued is a bug of
    /// the caller and refused as invalid.
    pub fn push(&mut self, id: &str, priority: i32, item: T) -> Result<usize, CoordinatorError> {
        if self.keys.contains_key(id) {
            return Err(CoordinatorError::invalid_argument("job_id", format!("{id:?} is already queued")));
        }
        self.check_room()?;
        let key = (Reverse(priority), self.next_seq);
        self.next_seq += 1;
        let ahead = self.order.range(..key).count();
        self.order.insert(key, (id.to_string(), item));
        self.keys.insert(id.to_string(), key);
        Ok(ahead)
    }

    /// [`CoordinatorError::QueueFull`] when the queue holds `limit` entries.
    pub fn check_room(&self) -> Result<(), CoordinatorError> {
        if self.order.len() >= self.limit {
            return Err(CoordinatorError::QueueFull { limit: self.limit });
        }
        Ok(())
    }

    /// Takes the entry that runs next.
    pub fn pop(&mut self) -> Option<(String, T)> {
        let (_, (id, item)) = self.order.pop_first()?;
        self.keys.remove(&id);
        Some((id, item))
    }

    /// Takes job `id` out of the queue, if it is there.
    pub fn remove(&mut self, id: &str) -> Option<T> {
        let key = self.keys.remove(id)?;
        self.order.remove(&key).map(|(_, item)| item)
    }

    /// Entries that leave before job `id` (None when it is not queued).
    pub fn position(&self, id: &str) -> Option<usize> {
        let key = self.keys.get(id)?;
        Some(self.order.range(..*key).count())
    }

    /// Takes every entry, in the order they would have run.
    pub fn drain(&mut self) -> Vec<(String, T)> {
        self.keys.clear();
        std::mem::take(&mut self.order).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_first_then_arrival_order() {
        let mut q = JobQueue::new(10);
        assert_eq!(q.push("a", 0, ()).unwrap(), 0);
        assert_eq!(q.push("b", 0, ()).unwrap(), 1);
        assert_eq!(q.push("c", 5, ()).unwrap(), 0, "a higher priority goes ahead of everything");
        assert_eq!(q.push("d", -3, ()).unwrap(), 3);
        assert_eq!(q.push("e", 5, ()).unwrap(), 1, "after the earlier job of the same priority");
        assert_eq!(q.position("b"), Some(3));
        let order: Vec<String> = std::iter::from_fn(|| q.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, ["c", "e", "a", "b", "d"]);
        assert!(q.is_empty());
    }

    #[test]
    fn full_queue_refuses_naming_the_limit_and_removal_frees_a_place() {
        let mut q = JobQueue::new(2);
        q.push("a", 0, 1).unwrap();
        q.push("b", 0, 2).unwrap();
        let err = q.push("c", 0, 3).unwrap_err();
        assert!(matches!(err, CoordinatorError::QueueFull { limit: 2 }), "{err:?}");
        assert!(err.to_string().contains('2'), "{err}");
        assert_eq!(q.remove("a"), Some(1));
        assert_eq!(q.remove("a"), None);
        assert_eq!(q.position("b"), Some(0));
        q.push("c", 0, 3).unwrap();
        assert!(matches!(q.push("b", 1, 4), Err(CoordinatorError::InvalidArgument { field: "job_id", .. })), "an id queued twice is refused");
        assert_eq!(q.drain(), [("b".to_string(), 2), ("c".to_string(), 3)]);
        assert_eq!(q.len(), 0);
        assert_eq!(q.position("b"), None);
    }
}
