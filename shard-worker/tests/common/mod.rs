//! Helpers shared by the worker's integration tests.

pub mod etcd;
