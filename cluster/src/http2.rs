//! The HTTP/2 limits every Tessera gRPC server runs with, public and internal alike: how many
//! calls one connection may have open, how large its headers may be, how many resets it may
//! leave pending, and keepalive pings that drop a peer gone silent.

use std::time::Duration;

/// Open calls per connection (each Generate holds one for its whole job; the coordinator holds a
/// few per worker).
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Bytes of request headers (a bearer token, a job secret and a traceparent are well under 1 KiB).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
/// A ping after this much silence on a connection...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...which must be answered within this, or the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a peer may open and reset before the server has accepted them (the "rapid reset" flood).
pub const MAX_PENDING_RESETS: usize = 64;

/// `builder` with the limits above.
pub fn limited(builder: tonic::transport::Server) -> tonic::transport::Server {
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
}
