//! Collective operations over a group of ranks (all-gather, all-to-all, ring exchange with the
//! transfer in flight while compute goes on, broadcast, barrier), built on a [`Transport`], with
//! the bytes each operation moves counted.

use super::transport::Transport;
use crate::{Result, WorkerError};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes sent by this rank, per kind of operation (shared by a communicator and its subgroups).
#[derive(Debug, Default)]
pub struct CommStats {
    all_gather: AtomicU64,
    gather: AtomicU64,
    cfg: AtomicU64,
    all_to_all: AtomicU64,
    ring: AtomicU64,
    broadcast: AtomicU64,
    halo: AtomicU64,
    received: AtomicU64,
}

/// A snapshot of [`CommStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommCounts {
    /// Bytes sent by all-gathers.
    pub all_gather: u64,
    /// Bytes sent by gathers to one rank (a sharded latent brought to rank 0).
    pub gather: u64,
    /// Bytes sent to the CFG partner (the other guidance branch's velocity rows).
    pub cfg: u64,
    /// Bytes sent by all-to-alls.
    pub all_to_all: u64,
    /// Bytes sent by ring exchanges.
    pub ring: u64,
    /// Bytes sent by broadcasts.
    pub broadcast: u64,
    /// Bytes sent to neighbouring bands of a frame split by rows (the split VAE decode's halos).
    pub halo: u64,
    /// Bytes received, all operations.
    pub received: u64,
}

impl CommCounts {
    /// Everything sent.
    pub fn sent(&self) -> u64 {
        self.all_gather + self.gather + self.cfg + self.all_to_all + self.ring + self.broadcast + self.halo
    }
}

impl std::ops::Sub for CommCounts {
    type Output = CommCounts;
    fn sub(self, o: CommCounts) -> CommCounts {
        CommCounts {
            all_gather: self.all_gather - o.all_gather,
            gather: self.gather - o.gather,
            cfg: self.cfg - o.cfg,
            all_to_all: self.all_to_all - o.all_to_all,
            ring: self.ring - o.ring,
            broadcast: self.broadcast - o.broadcast,
            halo: self.halo - o.halo,
            received: self.received - o.received,
        }
    }
}

/// The kind of a transfer, for the byte counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// All-gathers (every member's part to every member).
    AllGather,
    /// Gathers (every member's part to one member).
    Gather,
    /// CFG-parallel exchanges (a rank's velocity rows to its partner in the other half).
    Cfg,
    /// All-to-alls (a part per member).
    AllToAll,
    /// Ring hops.
    Ring,
    /// Broadcasts.
    Broadcast,
    /// Rows sent to a neighbouring band of a frame split by rows.
    Halo,
}

impl CommStats {
    fn counter(&self, kind: Traffic) -> &AtomicU64 {
        match kind {
            Traffic::AllGather => &self.all_gather,
            Traffic::Gather => &self.gather,
            Traffic::Cfg => &self.cfg,
            Traffic::AllToAll => &self.all_to_all,
            Traffic::Ring => &self.ring,
            Traffic::Broadcast => &self.broadcast,
            Traffic::Halo => &self.halo,
        }
    }

    /// Counts a transfer made outside a [`Communicator`] (e.g. by NCCL on a GPU): `sent` bytes of
    /// kind `kind` and `received` bytes.
    pub fn record(&self, kind: Traffic, sent: u64, received: u64) {
        self.counter(kind).fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> CommCounts {
        CommCounts {
            all_gather: self.all_gather.load(Ordering::Relaxed),
            gather: self.gather.load(Ordering::Relaxed),
            cfg: self.cfg.load(Ordering::Relaxed),
            all_to_all: self.all_to_all.load(Ordering::Relaxed),
            ring: self.ring.load(Ordering::Relaxed),
            broadcast: self.broadcast.load(Ordering::Relaxed),
            halo: self.halo.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// f32 values as little-endian bytes.
pub fn f32_to_bytes(v: &[f32]) -> Bytes {
    let mut b = Vec::with_capacity(v.len() * 4);
    for x in v {
        b.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(b)
}

/// Little-endian bytes back to f32 values; a length that is not a multiple of 4 is garbage.
pub fn bytes_to_f32(b: &[u8]) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return Err(WorkerError::Collective(format!("message of {} bytes is not a whole number of f32 values", b.len())));
    }
    Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// A group of ranks that run the same sequence of collectives. Every member must call the same
/// operations in the same order: each call takes the next sequence number, which tags its messages.
pub struct Communicator {
    transport: Arc<dyn Transport>,
    /// Global ranks of the members, in group order.
    members: Vec<usize>,
    /// This rank's index in `members`.
    index: usize,
    group_id: u64,
    seq: AtomicU64,
    stats: Arc<CommStats>,
}

impl Communicator {
    /// All ranks of the transport, in rank order.
    pub fn world(transport: Arc<dyn Transport>) -> Self {
        let members = (0..transport.world()).collect();
        let index = transport.rank();
        Self { transport, members, index, group_id: 0, seq: AtomicU64::new(0), stats: Arc::new(CommStats::default()) }
    }

    /// A subgroup of this group's transport: `members` are global ranks and must include this
    /// rank; `group_id` (1..65535) must differ between overlapping groups so their tags differ.
    pub fn subgroup(&self, members: Vec<usize>, group_id: u16) -> Result<Self> {
        let me = self.transport.rank();
        let index = members.iter().position(|&r| r == me).ok_or_else(|| WorkerError::Collective(format!("rank {me} is not in subgroup {members:?}")))?;
        if members.iter().any(|&r| r >= self.transport.world()) {
            return Err(WorkerError::Collective(format!("subgroup {members:?} names ranks beyond {}", self.transport.world())));
        }
        Ok(Self { transport: self.transport.clone(), members, index, group_id: group_id as u64, seq: AtomicU64::new(0), stats: self.stats.clone() })
    }

    /// This rank's position in the group.
    pub fn rank(&self) -> usize {
        self.index
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Bytes moved so far by this rank through this group and its relatives.
    pub fn stats(&self) -> CommCounts {
        self.stats.snapshot()
    }

    /// The shared byte counters (transfers made beside this communicator count there too).
    pub fn stats_handle(&self) -> Arc<CommStats> {
        self.stats.clone()
    }

    fn next_tag(&self) -> u64 {
        (self.group_id << 48) | self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, to: usize, tag: u64, data: Bytes, kind: Traffic) -> Result<()> {
        self.stats.counter(kind).fetch_add(data.len() as u64, Ordering::Relaxed);
        self.transport.send(self.members[to], tag, data)
    }

    fn recv_bytes(&self, from: usize, tag: u64) -> Result<Bytes> {
        let b = self.transport.recv(self.members[from], tag)?;
        self.stats.received.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        bytes_to_f32(&self.recv_bytes(from, tag)?)
    }

    /// Sends `parts[i]` to member `i` and returns what each member sent here, in group order
    /// (this member's own part comes back without travelling). Counted as `kind`.
    pub fn exchange_bytes(&self, mut parts: Vec<Bytes>, kind: Traffic) -> Result<Vec<Bytes>> {
        if parts.len() != self.size() {
            return Err(WorkerError::Collective(format!("exchange with {} parts in a group of {}", parts.len(), self.size())));
        }
        let tag = self.next_tag();
        for (i, p) in parts.iter().enumerate().filter(|(i, _)| *i != self.index) {
            self.send(i, tag, p.clone(), kind)?;
        }
        let mut own = Some(std::mem::take(&mut parts[self.index]));
        (0..self.size()).map(|i| if i == self.index { Ok(own.take().unwrap_or_default()) } else { self.recv_bytes(i, tag) }).collect()
    }

    /// Every member's `data` (sizes may differ), in group order.
    pub fn all_gather(&self, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        let bytes = f32_to_bytes(data);
        self.exchange_bytes(vec![bytes; self.size()], Traffic::AllGather)?.iter().map(|b| bytes_to_f32(b)).collect()
    }

    /// Sends `parts[i]` to member `i` and returns what each member sent here, in group order.
    pub fn all_to_all(&self, parts: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let parts = parts.iter().map(|p| f32_to_bytes(p)).collect();
        self.exchange_bytes(parts, Traffic::AllToAll)?.iter().map(|b| bytes_to_f32(b)).collect()
    }

    /// Starts one hop of a ring: sends `data` to the next member and returns a handle that
    /// receives the previous member's block. The transfer proceeds while the caller computes.
    pub fn ring_shift(&self, data: &[f32]) -> Result<PendingRecv<'_>> {
        let ticket = self.ring_post(f32_to_bytes(data))?;
        Ok(PendingRecv { comm: self, ticket })
    }

    /// Sends `data` to the next member of the ring; the previous member's block is then taken
    /// with [`ring_take`](Self::ring_take) and the ticket.
    pub fn ring_post(&self, data: Bytes) -> Result<RingTicket> {
        let tag = self.next_tag();
        let n = self.size();
        self.send((self.index + 1) % n, tag, data, Traffic::Ring)?;
        Ok(RingTicket { from: (self.index + n - 1) % n, tag })
    }

    /// Waits for the block of the hop that `ticket` was posted for.
    pub fn ring_take(&self, ticket: RingTicket) -> Result<Bytes> {
        self.recv_bytes(ticket.from, ticket.tag)
    }

    /// Member `root`'s `data` on every member.
    pub fn broadcast(&self, root: usize, data: &[f32]) -> Result<Vec<f32>> {
        let tag = self.next_tag();
        if self.index == root {
            let bytes = f32_to_bytes(data);
            for i in (0..self.size()).filter(|&i| i != root) {
                self.send(i, tag, bytes.clone(), Traffic::Broadcast)?;
            }
            Ok(data.to_vec())
        } else {
            self.recv(root, tag)
        }
    }

    /// Returns once every member has reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// A ring hop in flight: whom its block comes from, and its tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingTicket {
    from: usize,
    tag: u64,
}

/// A receive posted by [`Communicator::ring_shift`].
pub struct PendingRecv<'a> {
    comm: &'a Communicator,
    ticket: RingTicket,
}

impl PendingRecv<'_> {
    /// Waits for the block.
    pub fn wait(self) -> Result<Vec<f32>> {
        bytes_to_f32(&self.comm.ring_take(self.ticket)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::transport::InProcessTransport;
    use std::time::Duration;

    /// Runs `f(rank communicator)` on `world` threads and returns their results in rank order.
    pub(crate) fn on_ranks<T: Send>(world: usize, f: impl Fn(Communicator) -> T + Sync) -> Vec<T> {
        let ts = InProcessTransport::group(world, Duration::from_secs(20));
        std::thread::scope(|s| {
            let hs: Vec<_> = ts.into_iter().map(|t| s.spawn(|| f(Communicator::world(Arc::new(t))))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_deliver_and_count() {
        let out = on_ranks(3, |c| {
            let r = c.rank() as f32;
            let g = c.all_gather(&vec![r; c.rank() + 1]).unwrap();
            let a = c.all_to_all((0..3).map(|j| vec![r * 10.0 + j as f32]).collect()).unwrap();
            let prev = c.ring_shift(&[r]).unwrap().wait().unwrap();
            let b = c.broadcast(2, &[r, r]).unwrap();
            c.barrier().unwrap();
            (g, a, prev, b, c.stats())
        });
        for (rank, (g, a, prev, b, stats)) in out.into_iter().enumerate() {
            assert_eq!(g, vec![vec![0.0], vec![1.0, 1.0], vec![2.0, 2.0, 2.0]]);
            assert_eq!(a, (0..3).map(|j| vec![j as f32 * 10.0 + rank as f32]).collect::<Vec<_>>());
            assert_eq!(prev, vec![((rank + 2) % 3) as f32]);
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(stats.all_gather, 2 * 4 * (rank as u64 + 1));
            assert_eq!(stats.all_to_all, 2 * 4);
            assert_eq!(stats.ring, 4);
            assert_eq!(stats.broadcast, if rank == 2 { 16 } else { 0 });
        }
    }

    #[test]
    fn subgroups_keep_their_messages_apart() {
        let out = on_ranks(4, |c| {
            let r = c.rank();
            let pair = c.subgroup(if r < 2 { vec![0, 1] } else { vec![2, 3] }, 1).unwrap();
            let cross = c.subgroup(if r % 2 == 0 { vec![0, 2] } else { vec![1, 3] }, 2).unwrap();
            (pair.all_gather(&[r as f32]).unwrap(), cross.all_gather(&[r as f32]).unwrap())
        });
        assert_eq!(out[3].0, vec![vec![2.0], vec![3.0]]);
        assert_eq!(out[3].1, vec![vec![1.0], vec![3.0]]);
        assert_eq!(out[0].1, vec![vec![0.0], vec![2.0]]);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(bytes_to_f32(&[1, 2, 3]).is_err());
    }
}
