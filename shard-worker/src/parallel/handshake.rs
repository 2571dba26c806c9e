//! The collective wire's handshake: who a connection is with (group size, rank, session),
//! proven with the job's secret. Both ends send a hello carrying a fresh random nonce, then an
//! HMAC-SHA256 under the job secret over both hellos (the sender's first); each end checks the
//! other's proof in constant time. A process without the job's secret cannot join a group, and a
//! recorded handshake cannot be replayed: both nonces are new on every connection.
//!
//! Hello (40 bytes, integers little-endian): magic `TSRT`, version u16, reserved u16, world u32,
//! rank u32, session u64, nonce 16 bytes. Proof: 32 bytes.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Protocol magic: the first bytes every connection carries.
const MAGIC: [u8; 4] = *b"TSRT";
/// Protocol version; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes of a hello.
pub(super) const HELLO_LEN: usize = 40;
/// Bytes of a proof.
pub(super) const PROOF_LEN: usize = 32;
/// How long one end waits for each part of the other's handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// What the proofs are bound to (so they prove nothing elsewhere).
const CONTEXT: &[u8] = b"tessera collective handshake v2";

/// Who a connection is with, as its hello says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub version: u16,
    pub world: u32,
    pub rank: u32,
    pub session: u64,
    pub nonce: [u8; 16],
}

impl Hello {
    /// This rank's hello, with a fresh nonce from the operating system.
    pub fn new(world: u32, rank: u32, session: u64) -> std::io::Result<Self> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(std::io::Error::other)?;
        Ok(Self { version: PROTOCOL_VERSION, world, rank, session, nonce })
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.world.to_le_bytes());
        b[12..16].copy_from_slice(&self.rank.to_le_bytes());
        b[16..24].copy_from_slice(&self.session.to_le_bytes());
        b[24..40].copy_from_slice(&self.nonce);
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        if b[..4] != MAGIC {
            return Err(format!("not a Tessera collective peer (first bytes {:02x?})", &b[..4]));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut session = [0u8; 8];
        session.copy_from_slice(&b[16..24]);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[24..40]);
        Ok(Self { version: u16::from_le_bytes([b[4], b[5]]), world: u32_at(8), rank: u32_at(12), session: u64::from_le_bytes(session), nonce })
    }

    /// Checks that `peer` says it belongs to the same group as `self` (its proof is checked next).
    pub fn check_peer(&self, peer: &Hello) -> Result<(), String> {
        if peer.version != self.version {
            return Err(format!("peer speaks protocol version {}, this rank {}", peer.version, self.version));
        }
        if peer.session != self.session {
            return Err(format!("peer belongs to session {:#x}, this rank to {:#x}", peer.session, self.session));
        }
        if peer.world != self.world {
            return Err(format!("peer thinks the group has {} ranks, this rank {}", peer.world, self.world));
        }
        if peer.rank >= self.world || peer.rank == self.rank {
            return Err(format!("peer claims rank {} in a group of {} (this is rank {})", peer.rank, self.world, self.rank));
        }
        Ok(())
    }
}

fn mac(secret: &[u8], sender: &Hello, receiver: &Hello) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes a key of any length");
    m.update(CONTEXT);
    m.update(&sender.encode());
    m.update(&receiver.encode());
    m
}

/// What `sender` sends to prove it holds `secret`, in its handshake with `receiver`.
pub(super) fn proof(secret: &[u8], sender: &Hello, receiver: &Hello) -> [u8; PROOF_LEN] {
    mac(secret, sender, receiver).finalize().into_bytes().into()
}

/// Whether `presented` is `sender`'s proof (compared in constant time).
fn verify(secret: &[u8], sender: &Hello, receiver: &Hello, presented: &[u8; PROOF_LEN]) -> bool {
    mac(secret, sender, receiver).verify_slice(presented).is_ok()
}

async fn read_exact<const N: usize>(stream: &mut TcpStream, what: &str) -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.read_exact(&mut b))
        .await
        .map_err(|_| format!("no {what} within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| format!("reading the {what}: {e}"))?;
    Ok(b)
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.write_all(bytes)).await.map_err(|_| "the peer does not read".to_string())?.map_err(|e| e.to_string())
}

/// The dialing end: sends its hello, checks the answer, then the proofs both ways.
pub(super) async fn offer(stream: &mut TcpStream, me: &Hello, secret: &[u8]) -> Result<Hello, String> {
    write(stream, &me.encode()).await?;
    let theirs = Hello::decode(&read_exact::<HELLO_LEN>(stream, "hello").await?)?;
    me.check_peer(&theirs)?;
    write(stream, &proof(secret, me, &theirs)).await?;
    prove_peer(stream, me, &theirs, secret).await?;
    Ok(theirs)
}

/// The accepting end: reads the hello, answers with its own and its proof, then checks the
/// dialer's proof.
pub(super) async fn answer(stream: &mut TcpStream, me: &Hello, secret: &[u8]) -> Result<Hello, String> {
    let theirs = Hello::decode(&read_exact::<HELLO_LEN>(stream, "hello").await?)?;
    me.check_peer(&theirs)?;
    let mut both = Vec::with_capacity(HELLO_LEN + PROOF_LEN);
    both.extend_from_slice(&me.encode());
    both.extend_from_slice(&proof(secret, me, &theirs));
    write(stream, &both).await?;
    prove_peer(stream, me, &theirs, secret).await?;
    Ok(theirs)
}

async fn prove_peer(stream: &mut TcpStream, me: &Hello, theirs: &Hello, secret: &[u8]) -> Result<(), String> {
    let presented = read_exact::<PROOF_LEN>(stream, "proof").await?;
    if !verify(secret, theirs, me, &presented) {
        return Err(format!("rank {} does not prove it holds the job's secret", theirs.rank));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_proofs_bind_both_ends_and_the_secret() {
        let a = Hello::new(4, 0, 9).unwrap();
        let b = Hello::new(4, 1, 9).unwrap();
        assert_ne!(a.nonce, b.nonce, "fresh nonces");
        assert_eq!(Hello::decode(&a.encode()).unwrap(), a);
        assert!(Hello::decode(&[0u8; HELLO_LEN]).is_err());
        assert!(a.check_peer(&Hello { version: 1, ..b }).unwrap_err().contains("version 1"));
        assert!(a.check_peer(&Hello { rank: 4, ..b }).unwrap_err().contains("rank 4"));
        assert!(a.check_peer(&Hello { session: 8, ..b }).unwrap_err().contains("session"));
        let p = proof(b"secret of the job", &b, &a);
        assert!(verify(b"secret of the job", &b, &a, &p));
        assert!(!verify(b"another secret", &b, &a, &p), "another key");
        assert!(!verify(b"secret of the job", &a, &b, &p), "the other direction");
        let replayed = Hello::new(4, 0, 9).unwrap();
        assert!(!verify(b"secret of the job", &b, &replayed, &p), "another connection's nonce");
    }
}
