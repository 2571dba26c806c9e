//! Clients of a worker's internal API as the coordinator makes them: every call carries the
//! job secret the tests give their jobs in PrepareJob.

use tessera_proto::capability::JobSecret;
use tessera_proto::worker::v1::shard_worker_client::ShardWorkerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The secret of every job these tests run.
pub const SECRET: [u8; 32] = [0x5a; 32];

/// A client sending a job secret with each call.
pub type Client = ShardWorkerClient<InterceptedService<Channel, JobSecret>>;

/// Connects to `addr` (`host:port`), sending `secret` with every call.
pub async fn connect_with(addr: &str, secret: &[u8]) -> Result<Client, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("a worker address").connect().await?;
    Ok(ShardWorkerClient::new(InterceptedService::new(channel, JobSecret::new(secret))))
}

/// Connects to `addr` as a coordinator of `epoch` (its ownership of a state store), sending
/// `secret` and the epoch with every call.
pub async fn connect_as(addr: &str, secret: &[u8], epoch: u64) -> Result<Client, tonic::transport::Error> {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("a worker address").connect().await?;
    Ok(ShardWorkerClient::new(InterceptedService::new(channel, JobSecret::new(secret).with_epoch(epoch))))
}

/// Connects to `addr`, sending [`SECRET`].
pub async fn connect(addr: &str) -> Result<Client, tonic::transport::Error> {
    connect_with(addr, &SECRET).await
}
