//! Point-to-point message transport between the ranks of a job: tagged, buffered sends that
//! return at once (so a transfer runs while compute goes on) and blocking receives. Every
//! collective is built on this; implementations: in-process (tests) and TCP (worker processes).

use crate::{Result, WorkerError};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Moves tagged byte messages between ranks `0..world`.
pub trait Transport: Send + Sync {
    /// This endpoint's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Queues `data` for rank `dst` under `tag`; returns without waiting for delivery.
    fn send(&self, dst: usize, tag: u64, data: Bytes) -> Result<()>;
    /// Waits for the message from `src` with `tag`.
    fn recv(&self, src: usize, tag: u64) -> Result<Bytes>;
}

/// Received messages waiting for their `recv`, keyed by (source, tag); plus per-source failures.
/// The bytes waiting from one source are bounded: a peer that sends far ahead of what is asked
/// for is broken or hostile, and is failed rather than allowed to fill the memory.
pub(crate) struct Mailbox {
    state: Mutex<MailboxState>,
    arrived: Condvar,
    timeout: Duration,
    /// The most bytes one source may have waiting, not yet received.
    max_waiting: u64,
}

#[derive(Default)]
struct MailboxState {
    messages: HashMap<(usize, u64), VecDeque<Bytes>>,
    waiting: HashMap<usize, u64>,
    failed: HashMap<usize, String>,
}

impl Mailbox {
    /// A mailbox whose receives wait up to `timeout`, with no bound on what waits.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self::bounded(timeout, u64::MAX)
    }

    /// A mailbox holding at most `max_waiting` bytes from each source.
    pub(crate) fn bounded(timeout: Duration, max_waiting: u64) -> Self {
        Self { state: Mutex::new(MailboxState::default()), arrived: Condvar::new(), timeout, max_waiting }
    }

    /// Delivers a message; refused, with the reason, when `src` would have more than the bound
    /// waiting (the caller then fails the source).
    pub(crate) fn put(&self, src: usize, tag: u64, data: Bytes) -> std::result::Result<(), String> {
        let mut s = self.state.lock().expect("mailbox lock");
        let waiting = s.waiting.entry(src).or_default();
        let after = waiting.saturating_add(data.len() as u64);
        if after > self.max_waiting {
            return Err(format!("it sent {after} bytes ahead of what was asked for (at most {} may wait)", self.max_waiting));
        }
        *waiting = after;
        s.messages.entry((src, tag)).or_default().push_back(data);
        self.arrived.notify_all();
        Ok(())
    }

    /// Marks `src` as gone: pending and future receives from it fail with `why`.
    pub(crate) fn fail(&self, src: usize, why: String) {
        let mut s = self.state.lock().expect("mailbox lock");
        s.failed.entry(src).or_insert(why);
        self.arrived.notify_all();
    }

    /// Waits for the message (src, tag), the failure of `src`, or the timeout.
    pub(crate) fn take(&self, me: usize, src: usize, tag: u64) -> Result<Bytes> {
        let deadline = std::time::Instant::now() + self.timeout;
        let mut s = self.state.lock().expect("mailbox lock");
        loop {
            if let Some(q) = s.messages.get_mut(&(src, tag)) {
                if let Some(m) = q.pop_front() {
                    if q.is_empty() {
                        s.messages.remove(&(src, tag));
                    }
                    if let Some(w) = s.waiting.get_mut(&src) {
                        *w = w.saturating_sub(m.len() as u64);
                    }
                    return Ok(m);
                }
            }
            if let Some(why) = s.failed.get(&src) {
                return Err(WorkerError::Collective(format!("rank {me}: peer rank {src} is gone: {why}")));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(WorkerError::Collective(format!("rank {me}: no message from rank {src} (tag {tag:#x}) within {:?}", self.timeout)));
            }
            s = self.arrived.wait_timeout(s, deadline - now).expect("mailbox lock").0;
        }
    }
}

/// Ranks that are threads of one process: a send is a move into the receiver's mailbox.
pub struct InProcessTransport {
    rank: usize,
    boxes: Arc<Vec<Mailbox>>,
}

impl InProcessTransport {
    /// `world` connected endpoints, one per rank, with receives timing out after `timeout`.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcessTransport> {
        let boxes = Arc::new((0..world).map(|_| Mailbox::new(timeout)).collect::<Vec<_>>());
        (0..world).map(|rank| InProcessTransport { rank, boxes: boxes.clone() }).collect()
    }
}

impl Drop for InProcessTransport {
    fn drop(&mut self) {
        // Peers waiting on this rank learn that it is gone instead of waiting for the timeout.
        for (i, b) in self.boxes.iter().enumerate() {
            if i != self.rank {
                b.fail(self.rank, "endpoint dropped".into());
            }
        }
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.boxes.len()
    }
    fn send(&self, dst: usize, tag: u64, data: Bytes) -> Result<()> {
        let b = self.boxes.get(dst).ok_or_else(|| WorkerError::Collective(format!("rank {}: send to rank {dst} of {}", self.rank, self.boxes.len())))?;
        // In-process mailboxes are unbounded: the ranks are this process's own threads.
        let _ = b.put(self.rank, tag, data);
        Ok(())
    }
    fn recv(&self, src: usize, tag: u64) -> Result<Bytes> {
        if src >= self.boxes.len() {
            return Err(WorkerError::Collective(format!("rank {}: receive from rank {src} of {}", self.rank, self.boxes.len())));
        }
        self.boxes[self.rank].take(self.rank, src, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes waiting from one source are bounded; a receive frees its bytes.
    #[test]
    fn a_bounded_mailbox_refuses_what_would_wait_past_its_bound() {
        let m = Mailbox::bounded(Duration::from_secs(1), 10);
        m.put(1, 0, Bytes::from(vec![0u8; 6])).unwrap();
        m.put(2, 0, Bytes::from(vec![0u8; 6])).unwrap();
        let e = m.put(1, 1, Bytes::from(vec![0u8; 6])).unwrap_err();
        assert!(e.contains("12 bytes") && e.contains("at most 10"), "{e}");
        assert_eq!(m.take(0, 1, 0).unwrap().len(), 6);
        m.put(1, 1, Bytes::from(vec![0u8; 6])).unwrap();
    }

    #[test]
    fn messages_match_by_source_and_tag_in_any_order() {
        let g = InProcessTransport::group(2, Duration::from_secs(5));
        g[0].send(1, 7, Bytes::from_static(b"seven")).unwrap();
        g[0].send(1, 3, Bytes::from_static(b"three")).unwrap();
        assert_eq!(&g[1].recv(0, 3).unwrap()[..], b"three");
        assert_eq!(&g[1].recv(0, 7).unwrap()[..], b"seven");
    }

    #[test]
    fn a_dropped_peer_or_silence_is_a_clear_error() {
        let mut g = InProcessTransport::group(2, Duration::from_millis(50));
        let err = g[1].recv(0, 1).unwrap_err().to_string();
        assert!(err.contains("no message from rank 0"), "{err}");
        drop(g.remove(0));
        let err = g[0].recv(0, 1).unwrap_err().to_string();
        assert!(err.contains("peer rank 0 is gone"), "{err}");
        assert!(g[0].send(5, 1, Bytes::new()).is_err());
    }
}
