//! Tessera's gRPC interfaces, generated from `proto/tessera/v1/*.proto`: the public API
//! (`tessera.v1.Tessera`: Generate, GetJob, CancelJob, ListWorkers) served by the coordinator, and
//! the internal API (`tessera.worker.v1.ShardWorker`) that the coordinator uses to drive workers,
//! the machine-readable reasons every error status of both carries ([`reason`]), and the per-job
//! secrets of the internal API ([`capability`]).

pub mod capability;
pub mod reason;

/// The public API, package `tessera.v1`.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The internal coordinator → worker API, package `tessera.worker.v1`.
pub mod worker {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.worker.v1");
    }
}

/// What a coordinator stores of each job (records and blobs for restarts), package `tessera.state.v1`.
pub mod state {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("tessera.state.v1");
    }
}

/// Encoded `FileDescriptorSet` of both packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");

#[cfg(test)]
mod tests {
    use super::v1::{generate_event, GenerateEvent, GenerateRequest, Progress};
    use prost::Message;

    #[test]
    fn messages_round_trip_and_the_descriptor_names_both_services() {
        let req = GenerateRequest { prompt: "a red ball".into(), num_frames: 9, guidance_scale: Some(5.0), seed: Some(7), ..Default::default() };
        let back = GenerateRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, req);
        let ev = GenerateEvent { event: Some(generate_event::Event::Progress(Progress { step: 3, total_steps: 50, ..Default::default() })) };
        assert_eq!(GenerateEvent::decode(ev.encode_to_vec().as_slice()).unwrap(), ev);
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = set.file.iter().flat_map(|f| f.service.iter().map(move |s| format!("{}.{}", f.package(), s.name()))).collect();
        assert!(services.contains(&"tessera.v1.Tessera".to_string()), "{services:?}");
        assert!(services.contains(&"tessera.worker.v1.ShardWorker".to_string()), "{services:?}");
    }
}
