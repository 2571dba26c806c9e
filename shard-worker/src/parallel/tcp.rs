//! The TCP transport between worker processes: one connection per pair of ranks, a versioned
//! handshake in which every peer proves it belongs to the job's group ([`super::handshake`]),
//! and length-prefixed frames. Handshakes with callers run concurrently, so idle or slow
//! strangers on the port hold up nobody. Sends are queued to a per-peer writer task and return
//! at once, so a transfer runs while the caller computes; a reader task per peer files incoming
//! frames in the rank's mailbox.
//!
//! Wire format (all integers little-endian): the handshake first on each connection, then
//! frames: kind u8 (1 = data, 2 = goodbye), 7 reserved zero bytes, tag u64, length u64, then
//! `length` payload bytes (24-byte header). A frame's buffer grows as its bytes arrive, never
//! to the length a header claims.

use super::handshake::{self, Hello};
use super::transport::{Mailbox, Transport};
use crate::{Result, WorkerError};
use bytes::{Buf, Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead};

pub use handshake::PROTOCOL_VERSION;

const HEADER_LEN: usize = 24;
/// Most bytes a frame's buffer grows by at once while its payload arrives.
const RESERVE_STEP: usize = 4 << 20;
/// Most handshakes with callers of the collective port under way at once.
const MAX_PENDING_HANDSHAKES: usize = 64;
const KIND_DATA: u8 = 1;
const KIND_GOODBYE: u8 = 2;

/// Settings of a TCP group.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// Identifies the job group: a peer presenting another session is refused.
    pub session: u64,
    /// The job's secret: every peer proves it holds it in the handshake (PrepareJob gives 16 to
    /// 64 random bytes; an empty secret proves nothing, for the `forward` tool on loopback).
    pub secret: Vec<u8>,
    /// How long to keep trying to reach peers that have not started listening yet.
    pub connect_timeout: Duration,
    /// How long a receive waits for its message.
    pub recv_timeout: Duration,
    /// Largest payload accepted in one frame; a larger length is treated as garbage.
    pub max_frame_bytes: u64,
    /// Cancelling it abandons a group still connecting (its job was released meanwhile).
    pub cancel: tokio_util::sync::CancellationToken,
}

/// How many of the largest frames one peer may have waiting, received but not yet asked for: the
/// collectives keep at most a frame or two in flight per peer (a ring hop ahead, one part of an
/// exchange); past this the peer is failed as broken or hostile instead of filling the memory.
const WAITING_FRAMES: u64 = 4;

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            session: 0,
            secret: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            recv_timeout: Duration::from_secs(300),
            max_frame_bytes: 16 << 30,
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// One decoded frame.
#[derive(Debug, PartialEq)]
enum Frame {
    Data { tag: u64, payload: Bytes },
    Goodbye,
}

/// Splits the byte stream of a connection into frames, rejecting garbage.
struct FrameDecoder {
    max_frame_bytes: u64,
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<Frame>> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let garbage = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let kind = src[0];
        if src[1..8].iter().any(|&b| b != 0) {
            return Err(garbage(format!("frame header has non-zero reserved bytes {:02x?}", &src[1..8])));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[8..16]);
        let tag = u64::from_le_bytes(word);
        word.copy_from_slice(&src[16..24]);
        let len = u64::from_le_bytes(word);
        match kind {
            KIND_DATA => {}
            KIND_GOODBYE if len == 0 => {
                src.advance(HEADER_LEN);
                return Ok(Some(Frame::Goodbye));
            }
            _ => return Err(garbage(format!("unknown frame kind {kind} (length {len})"))),
        }
        if len > self.max_frame_bytes {
            return Err(garbage(format!("frame of {len} bytes exceeds the limit of {}", self.max_frame_bytes)));
        }
        let len = len as usize;
        if src.len() < HEADER_LEN + len {
            // Room for what comes next, not for the whole claimed length: the buffer grows with
            // the bytes that actually arrive.
            src.reserve((HEADER_LEN + len - src.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(Frame::Data { tag, payload: src.split_to(len).freeze() }))
    }
}

fn header(kind: u8, tag: u64, len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[8..16].copy_from_slice(&tag.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

/// The sending side of one peer connection.
struct PeerLink {
    queue: Option<mpsc::UnboundedSender<(u64, Bytes)>>,
    /// Set when the connection failed: later sends report it.
    broken: Arc<Mutex<Option<String>>>,
    /// Set by the writer task when it has flushed everything and said goodbye.
    done: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// Ranks in separate processes (or machines) connected by TCP.
pub struct TcpTransport {
    rank: usize,
    world: usize,
    mailbox: Arc<Mailbox>,
    /// `None` at this rank's own index.
    peers: Vec<Option<PeerLink>>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn err(rank: usize, detail: impl std::fmt::Display) -> WorkerError {
    WorkerError::Collective(format!("rank {rank}: {detail}"))
}

/// How long a collective port found in use is tried again before the error.
const BIND_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

impl TcpTransport {
    /// Binds `addrs[rank]` and connects the group: each rank dials the ranks below it and
    /// accepts the ranks above it. Blocks until every peer has shaken hands or
    /// `connect_timeout` has passed. Call from a blocking thread, not from async code.
    pub fn establish(rank: usize, addrs: &[SocketAddr], opts: TcpOptions) -> Result<Self> {
        let addr = *addrs.get(rank).ok_or_else(|| err(rank, format!("no address for rank {rank} among {} addresses", addrs.len())))?;
        // A worker's collective port is fixed, and its previous job's listener may still be
        // closing (a job abandoned while joining): a port in use is tried again for a moment.
        let deadline = std::time::Instant::now() + BIND_RETRY.min(opts.connect_timeout);
        let std_listener = loop {
            match std::net::TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(err(rank, format!("cannot listen on {addr}: {e}"))),
            }
        };
        Self::establish_with_listener(rank, addrs, std_listener, opts)
    }

    /// Like [`TcpTransport::establish`], with this rank's listening socket already bound (so a
    /// caller can bind port 0 and publish the port it got).
    pub fn establish_with_listener(rank: usize, addrs: &[SocketAddr], listener: std::net::TcpListener, opts: TcpOptions) -> Result<Self> {
        let world = addrs.len();
        if rank >= world {
            return Err(err(rank, format!("rank outside a group of {world}")));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("tessera-tcp-r{rank}"))
            .enable_all()
            .build()
            .map_err(|e| err(rank, format!("cannot start the network runtime: {e}")))?;
        let me = Hello::new(world as u32, rank as u32, opts.session).map_err(|e| err(rank, format!("no random nonce: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| err(rank, e))?;
        let streams = runtime.block_on(async {
            let listener = TcpListener::from_std(listener).map_err(|e| err(rank, e))?;
            tokio::select! {
                connected = tokio::time::timeout(opts.connect_timeout, connect_all(me, &opts.secret, addrs, listener)) => {
                    connected.map_err(|_| err(rank, format!("group of {world} not connected within {:?}", opts.connect_timeout)))?
                }
                _ = opts.cancel.cancelled() => Err(WorkerError::Cancelled(format!("rank {rank}: the group was abandoned while connecting"))),
            }
        })?;
        let mailbox = Arc::new(Mailbox::bounded(opts.recv_timeout, opts.max_frame_bytes.saturating_mul(WAITING_FRAMES)));
        let mut peers: Vec<Option<PeerLink>> = (0..world).map(|_| None).collect();
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            let broken = Arc::new(Mutex::new(None));
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = std::sync::mpsc::channel();
            runtime.spawn(write_loop(write, rx, mailbox.clone(), broken.clone(), peer, done_tx));
            runtime.spawn(read_loop(read, mailbox.clone(), broken.clone(), peer, opts.max_frame_bytes));
            peers[peer] = Some(PeerLink { queue: Some(tx), broken, done: Mutex::new(done) });
        }
        Ok(Self { rank, world, mailbox, peers, runtime: Some(runtime) })
    }
}

/// Dials lower ranks while accepting higher ranks; returns the stream to each peer by rank.
async fn connect_all(me: Hello, secret: &[u8], addrs: &[SocketAddr], listener: TcpListener) -> Result<Vec<Option<TcpStream>>> {
    let (mut higher, lower) = tokio::try_join!(accept_higher(me, secret, addrs.len(), listener), dial_lower(me, secret, addrs))?;
    for (peer, stream) in lower.into_iter().enumerate() {
        if stream.is_some() {
            higher[peer] = stream;
        }
    }
    Ok(higher)
}

/// Dials every lower rank in turn and shakes hands with it.
async fn dial_lower(me: Hello, secret: &[u8], addrs: &[SocketAddr]) -> Result<Vec<Option<TcpStream>>> {
    let rank = me.rank as usize;
    let mut streams: Vec<Option<TcpStream>> = (0..addrs.len()).map(|_| None).collect();
    for (peer, addr) in addrs.iter().enumerate().take(rank) {
        let mut stream = dial(rank, *addr).await?;
        let theirs = handshake::offer(&mut stream, &me, secret).await.map_err(|e| err(rank, format!("handshake with rank {peer} at {addr}: {e}")))?;
        if theirs.rank as usize != peer {
            return Err(err(rank, format!("{addr} answered as rank {}, expected rank {peer}", theirs.rank)));
        }
        streams[peer] = Some(stream);
    }
    Ok(streams)
}

/// Accepts callers until every higher rank has proven itself. Each caller's handshake runs as
/// its own task (at most [`MAX_PENDING_HANDSHAKES`] at once), so strangers, idle sockets and
/// impostors are refused without holding up the real peers.
async fn accept_higher(me: Hello, secret: &[u8], world: usize, listener: TcpListener) -> Result<Vec<Option<TcpStream>>> {
    let rank = me.rank as usize;
    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut waiting = world - rank - 1;
    let secret: Arc<[u8]> = secret.into();
    let mut pending = tokio::task::JoinSet::new();
    while waiting > 0 {
        tokio::select! {
            accepted = listener.accept(), if pending.len() < MAX_PENDING_HANDSHAKES => {
                let (mut stream, from) = accepted.map_err(|e| err(rank, format!("accept: {e}")))?;
                let secret = secret.clone();
                pending.spawn(async move {
                    match handshake::answer(&mut stream, &me, &secret).await {
                        Ok(theirs) => Ok((theirs.rank as usize, stream, from)),
                        Err(e) => Err((from, e)),
                    }
                });
            }
            Some(done) = pending.join_next() => match done {
                Ok(Ok((peer, stream, _))) if peer > rank && streams[peer].is_none() => {
                    streams[peer] = Some(stream);
                    waiting -= 1;
                }
                Ok(Ok((peer, _, from))) => tracing::warn!(rank, %from, peer, "refusing an unexpected or duplicate connection"),
                // A stray, misconfigured or hostile process: refused; the real peers go on.
                Ok(Err((from, e))) => tracing::warn!(rank, %from, "refusing a caller of the collective port: {e}"),
                Err(e) => tracing::warn!(rank, "a handshake task failed: {e}"),
            }
        }
    }
    pending.abort_all();
    Ok(streams)
}

/// Connects to `addr`, retrying while the peer is not listening yet (the caller bounds the time).
async fn dial(rank: usize, addr: SocketAddr) -> Result<TcpStream> {
    let mut pause = Duration::from_millis(10);
    loop {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::TimedOut) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            Err(e) => return Err(err(rank, format!("cannot connect to {addr}: {e}"))),
        }
    }
}

/// Writes queued messages to one peer, then a goodbye once the queue is closed.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<(u64, Bytes)>,
    mailbox: Arc<Mailbox>,
    broken: Arc<Mutex<Option<String>>>,
    peer: usize,
    done: std::sync::mpsc::Sender<()>,
) {
    let result: std::io::Result<()> = async {
        while let Some((tag, payload)) = queue.recv().await {
            write.write_all(&header(KIND_DATA, tag, payload.len() as u64)).await?;
            write.write_all(&payload).await?;
        }
        write.write_all(&header(KIND_GOODBYE, 0, 0)).await?;
        write.flush().await?;
        write.shutdown().await
    }
    .await;
    if let Err(e) = result {
        let why = format!("sending failed: {e}");
        broken.lock().expect("peer state lock").get_or_insert(why.clone());
        mailbox.fail(peer, why);
    }
    let _ = done.send(());
}

/// Files frames from one peer in the mailbox until it says goodbye or the connection breaks.
async fn read_loop(read: OwnedReadHalf, mailbox: Arc<Mailbox>, broken: Arc<Mutex<Option<String>>>, peer: usize, max_frame_bytes: u64) {
    use futures_util::StreamExt;
    let mut frames = FramedRead::new(read, FrameDecoder { max_frame_bytes });
    let why = loop {
        match frames.next().await {
            Some(Ok(Frame::Data { tag, payload })) => {
                if let Err(why) = mailbox.put(peer, tag, payload) {
                    break why;
                }
            }
            Some(Ok(Frame::Goodbye)) => break "it closed its end of the group".to_string(),
            Some(Err(e)) => break format!("it sent garbage or the connection broke: {e}"),
            None => break "the connection closed without a goodbye (process died?)".to_string(),
        }
    };
    if !why.starts_with("it closed") {
        broken.lock().expect("peer state lock").get_or_insert(why.clone());
    }
    mailbox.fail(peer, why);
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&self, dst: usize, tag: u64, data: Bytes) -> Result<()> {
        if dst == self.rank {
            self.mailbox.put(self.rank, tag, data).map_err(|why| WorkerError::Collective(format!("rank {}: a message to itself refused: {why}", self.rank)))?;
            return Ok(());
        }
        let link = self.peers.get(dst).and_then(Option::as_ref).ok_or_else(|| err(self.rank, format!("send to rank {dst} of {}", self.world)))?;
        if let Some(why) = link.broken.lock().expect("peer state lock").as_ref() {
            return Err(err(self.rank, format!("peer rank {dst} is gone: {why}")));
        }
        let queue = link.queue.as_ref().ok_or_else(|| err(self.rank, "transport is closing"))?;
        queue.send((tag, data)).map_err(|_| err(self.rank, format!("peer rank {dst}: writer stopped")))
    }

    fn recv(&self, src: usize, tag: u64) -> Result<Bytes> {
        if src >= self.world {
            return Err(err(self.rank, format!("receive from rank {src} of {}", self.world)));
        }
        self.mailbox.take(self.rank, src, tag)
    }
}

impl Drop for TcpTransport {
    /// Flushes what was queued, says goodbye to every peer (waiting at most a few seconds), and
    /// stops the network tasks.
    fn drop(&mut self) {
        for link in self.peers.iter_mut().flatten() {
            link.queue = None;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for link in self.peers.iter().flatten() {
            let _ = link.done.lock().expect("peer state lock").recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addrs(n: usize) -> Vec<SocketAddr> {
        let ls: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        ls.iter().map(|l| l.local_addr().unwrap()).collect()
    }

    fn group(n: usize, session: u64) -> Vec<TcpTransport> {
        group_with(n, TcpOptions { session, recv_timeout: Duration::from_secs(5), ..Default::default() })
    }

    fn group_with(n: usize, opts: TcpOptions) -> Vec<TcpTransport> {
        let addrs = free_addrs(n);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let (addrs, opts) = (addrs.clone(), opts.clone());
                    s.spawn(move || TcpTransport::establish(r, &addrs, opts))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        })
    }

    /// A peer that sends more than `WAITING_FRAMES` of the largest frames ahead of what is asked
    /// for is failed, naming why; what it sent within the bound was delivered first.
    #[test]
    fn a_peer_that_floods_frames_ahead_is_failed() {
        let g = group_with(2, TcpOptions { session: 3, recv_timeout: Duration::from_secs(5), max_frame_bytes: 1000, ..Default::default() });
        for tag in 0..WAITING_FRAMES + 1 {
            g[1].send(0, tag, Bytes::from(vec![1u8; 1000])).unwrap();
        }
        // Nothing is received meanwhile, so the last frame is the one past the bound.
        let e = g[0].recv(1, 99).unwrap_err().to_string();
        assert!(e.contains("peer rank 1 is gone") && e.contains("ahead of what was asked for") && e.contains("at most 4000"), "{e}");
        for tag in 0..WAITING_FRAMES {
            assert_eq!(g[0].recv(1, tag).unwrap().len(), 1000, "frame {tag}, within the bound");
        }
        assert!(g[0].recv(1, WAITING_FRAMES).is_err(), "the frame past the bound was not filed");
    }

    #[test]
    fn three_ranks_exchange_tagged_messages_in_any_order() {
        let g = group(3, 7);
        g[2].send(0, 9, Bytes::from_static(b"nine")).unwrap();
        g[2].send(0, 4, Bytes::from(vec![5u8; 1 << 20])).unwrap();
        g[0].send(1, 1, Bytes::from_static(b"one")).unwrap();
        assert_eq!(g[0].recv(2, 4).unwrap().len(), 1 << 20);
        assert_eq!(&g[0].recv(2, 9).unwrap()[..], b"nine");
        assert_eq!(&g[1].recv(0, 1).unwrap()[..], b"one");
    }

    #[test]
    fn a_peer_that_leaves_is_reported_not_waited_for() {
        let mut g = group(2, 1);
        g[1].send(0, 3, Bytes::from_static(b"last words")).unwrap();
        drop(g.remove(1));
        // What it sent before leaving is still delivered; anything more is a clear error.
        assert_eq!(&g[0].recv(1, 3).unwrap()[..], b"last words");
        let e = g[0].recv(1, 4).unwrap_err().to_string();
        assert!(e.contains("peer rank 1 is gone") && e.contains("closed"), "{e}");
    }

    const SECRET: &[u8] = b"the job's secret, 32 bytes long!";

    /// Shakes hands as rank `rank` of a group of `world` with the rank listening at `addr`, from
    /// a plain blocking socket (a process that speaks the wire by hand).
    fn raw_handshake(addr: SocketAddr, world: u32, rank: u32, session: u64, secret: &[u8]) -> std::net::TcpStream {
        use std::io::{Read, Write};
        let mut s = loop {
            match std::net::TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let me = Hello::new(world, rank, session).unwrap();
        s.write_all(&me.encode()).unwrap();
        let mut theirs = [0u8; handshake::HELLO_LEN];
        s.read_exact(&mut theirs).unwrap();
        let theirs = Hello::decode(&theirs).unwrap();
        let mut proof = [0u8; handshake::PROOF_LEN];
        s.read_exact(&mut proof).unwrap();
        s.write_all(&handshake::proof(secret, &me, &theirs)).unwrap();
        s
    }

    #[test]
    fn strangers_impostors_and_idle_sockets_are_refused_without_holding_up_the_group() {
        let addrs = free_addrs(2);
        let a = addrs.clone();
        let opts = || TcpOptions { session: 5, secret: SECRET.to_vec(), connect_timeout: Duration::from_secs(20), ..Default::default() };
        let rank0 = std::thread::spawn(move || TcpTransport::establish(0, &a, opts()));
        std::thread::sleep(Duration::from_millis(100));
        // Idle sockets that never say a word, a stray client speaking another protocol, a peer
        // of another session, and an impostor that knows the session but not the secret.
        let idle: Vec<_> = (0..4).map(|_| std::net::TcpStream::connect(addrs[0]).unwrap()).collect();
        let mut stray = std::net::TcpStream::connect(addrs[0]).unwrap();
        std::io::Write::write_all(&mut stray, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut wrong = std::net::TcpStream::connect(addrs[0]).unwrap();
        std::io::Write::write_all(&mut wrong, &Hello::new(2, 1, 6).unwrap().encode()).unwrap();
        let impostor = raw_handshake(addrs[0], 2, 1, 5, b"a guess at the secret");
        // The real rank 1 gets in at once (the idle sockets' handshakes time out on their own).
        let started = Instant::now();
        let r1 = TcpTransport::establish(1, &addrs, opts()).unwrap();
        let r0 = rank0.join().unwrap().unwrap();
        assert!(started.elapsed() < handshake::HANDSHAKE_TIMEOUT, "the group formed only after {:?}", started.elapsed());
        r1.send(0, 2, Bytes::from_static(b"ok")).unwrap();
        assert_eq!(&r0.recv(1, 2).unwrap()[..], b"ok");
        // The impostor's connection was closed, not admitted.
        let mut impostor = impostor;
        impostor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        match std::io::Read::read(&mut impostor, &mut [0u8; 8]) {
            Ok(0) => {}
            other => panic!("the impostor's connection was not closed: {other:?}"),
        }
        drop(idle);
    }

    #[test]
    fn a_rank_without_the_secret_cannot_join() {
        let addrs = free_addrs(2);
        let a = addrs.clone();
        let rank0 = std::thread::spawn(move || {
            TcpTransport::establish(
                0,
                &a,
                TcpOptions { session: 5, secret: SECRET.to_vec(), connect_timeout: Duration::from_millis(1500), ..Default::default() },
            )
        });
        let other = TcpOptions { session: 5, secret: b"another job's secret".to_vec(), connect_timeout: Duration::from_millis(1500), ..Default::default() };
        let e = TcpTransport::establish(1, &addrs, other).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("does not prove it holds the job's secret") || e.contains("handshake"), "{e}");
        assert!(rank0.join().unwrap().map(|_| ()).unwrap_err().to_string().contains("not connected within"));
    }

    #[test]
    fn the_decoder_rejects_bad_frames() {
        let mut d = FrameDecoder { max_frame_bytes: 100 };
        let mut buf = BytesMut::from(&header(KIND_DATA, 3, 4)[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None, "waits for the payload");
        buf.extend_from_slice(b"abcd");
        assert_eq!(d.decode(&mut buf).unwrap(), Some(Frame::Data { tag: 3, payload: Bytes::from_static(b"abcd") }));
        assert!(d.decode(&mut BytesMut::from(&header(9, 0, 0)[..])).is_err());
        assert!(d.decode(&mut BytesMut::from(&header(KIND_DATA, 0, 101)[..])).is_err());
        let mut reserved = header(KIND_DATA, 0, 0);
        reserved[3] = 1;
        assert!(d.decode(&mut BytesMut::from(&reserved[..])).is_err());
        // A header claiming 1 GiB reserves a step, not the gigabyte.
        let mut big = FrameDecoder { max_frame_bytes: 16 << 30 };
        let mut buf = BytesMut::from(&header(KIND_DATA, 1, 1 << 30)[..]);
        assert_eq!(big.decode(&mut buf).unwrap(), None);
        assert!(buf.capacity() <= HEADER_LEN + RESERVE_STEP + 64, "reserved {} bytes up front", buf.capacity());
    }

    #[test]
    fn a_peer_that_dies_without_goodbye_is_named() {
        let addrs = free_addrs(2);
        let a = addrs.clone();
        let rank0 =
            std::thread::spawn(move || TcpTransport::establish(0, &a, TcpOptions { session: 3, recv_timeout: Duration::from_secs(20), ..Default::default() }));
        // A rank 1 that shakes hands, sends half a frame and vanishes, as a killed process would.
        let mut s = raw_handshake(addrs[0], 2, 1, 3, b"");
        std::io::Write::write_all(&mut s, &header(KIND_DATA, 1, 100)[..]).unwrap();
        drop(s);
        let r0 = rank0.join().unwrap().unwrap();
        let t = Instant::now();
        let e = r0.recv(1, 1).unwrap_err().to_string();
        assert!(e.contains("peer rank 1 is gone"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "noticed only after {:?}", t.elapsed());
        assert!(r0.send(1, 2, Bytes::from_static(b"x")).is_err() || r0.recv(1, 2).is_err());
    }

    #[test]
    fn nobody_listening_times_out_with_the_group_size() {
        let addrs = free_addrs(2);
        let e = TcpTransport::establish(1, &addrs, TcpOptions { connect_timeout: Duration::from_millis(300), ..Default::default() })
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not connected within"), "{e}");
    }

    /// A collective port still held for a moment (a previous job's listener closing) is waited
    /// for; one held for good is an error naming it, once the retry is over.
    #[test]
    fn a_port_in_use_is_tried_again_for_a_moment() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        assert!(TcpTransport::establish(0, &[addr], TcpOptions::default()).is_ok(), "bound once the port was free");
        release.join().unwrap();
        let kept = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = kept.local_addr().unwrap();
        let e = TcpTransport::establish(0, &[addr], TcpOptions { connect_timeout: Duration::from_millis(100), ..Default::default() })
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("cannot listen on {addr}")), "{e}");
    }
}
