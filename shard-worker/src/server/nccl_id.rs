//! The NCCL unique id of a GPU group, on the worker's side of the internal API: made in this
//! process when the worker is a job's rank 0 (CreateNcclId; NCCL's rendezvous listener then runs
//! here), and read back from `PrepareJobRequest.nccl_unique_id` on every rank.

use tessera_cluster::codec::NCCL_ID_BYTES;
use tessera_kernels::cuda::nccl::NcclId;
use tessera_kernels::cuda::CudaMissing;
use tessera_kernels::KernelError;
use tessera_proto::reason::{invalid_field, status, Reason};
use tonic::Status;

/// A fresh NCCL unique id as its bytes. A missing NCCL library is FAILED_PRECONDITION (the message
/// names `libnccl.so`); any other failure of NCCL is INTERNAL.
pub(super) async fn create_nccl_id(job_id: &str) -> Result<Vec<u8>, Status> {
    // `ncclGetUniqueId` may look at network interfaces and start a thread: off the async threads.
    let made = tokio::task::spawn_blocking(NcclId::new).await.map_err(|e| status(Reason::Internal, None, format!("the NCCL id task failed: {e}")))?;
    match made {
        Ok(id) => {
            tracing::info!(job_id, "made the group's NCCL unique id (this worker hosts the rendezvous)");
            Ok(id.to_bytes())
        }
        Err(e @ KernelError::CudaUnavailable(CudaMissing::Nccl)) => Err(status(Reason::Precondition, None, e.to_string())),
        Err(e) => Err(status(Reason::Internal, None, format!("cannot make an NCCL unique id: {e}"))),
    }
}

/// The group's NCCL id from PrepareJob's `nccl_unique_id`: `None` when empty (CPU groups, single
/// ranks), INVALID_ARGUMENT naming the field when it is not an id's 128 bytes.
pub(super) fn parse_nccl_id(bytes: &[u8]) -> Result<Option<NcclId>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    NcclId::from_bytes(bytes)
        .map(Some)
        .map_err(|_| invalid_field("nccl_unique_id", format!("nccl_unique_id: {} bytes, but an NCCL unique id is {NCCL_ID_BYTES} bytes", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_none_an_id_round_trips_and_other_lengths_are_refused() {
        assert!(parse_nccl_id(&[]).unwrap().is_none());
        let raw: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 3 % 256) as u8).collect();
        assert_eq!(parse_nccl_id(&raw).unwrap().unwrap().to_bytes(), raw);
        let err = parse_nccl_id(&raw[..5]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("nccl_unique_id: 5 bytes"), "{}", err.message());
    }
}
