//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

pub mod client;
pub mod etcd;
pub mod process;
