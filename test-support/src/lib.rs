//! Test support for the whole workspace, in one place: GPU fixtures ([`gpus`]), a benchmark fleet ([`fleet`]) and strict
//! validation against the official Kubernetes schemas ([`schemas`]). Only ever a
//! dev-dependency: it runs Python and writes temporary files, which no product crate does.

pub mod fleet;
pub mod gpus;
pub mod schemas;

pub use gpus::{gpu, gpu_with, hgx};
pub use schemas::{validate_files, validate_k8s};
