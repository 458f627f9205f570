//! The one boundary between this workspace and the Kubernetes DRA API, in the role that
//! `k8s.io/dynamic-resource-allocation` plays for Go drivers.
//!
//! - [`version`]: which resource.k8s.io version the API server serves.
//! - [`convert`]: v1beta1 ⇄ v1, once, at the wire; everything else speaks v1.
//! - [`client`]: the converting client (get, list, write, watch) over either version.
//! - [`events`]: Kubernetes Events with the API's limits applied.
//! - [`http`]: one metrics-and-health endpoint.
//! - [`connect`]: one kube client constructor; [`logging`]: one log setup for every binary.
//! - [`kubeletplugin`]: registration, both DRA gRPC versions and the claim checks, around a
//!   small [`kubeletplugin::Driver`] trait.

pub mod client;
pub mod connect;
pub mod convert;
pub mod events;
pub mod http;
pub mod kubeletplugin;
pub mod logging;
pub mod resourceslice;
pub mod version;

pub use client::{ClientError, DraApi};
pub use convert::{ConvertError, DraObject};
pub use version::{ApiVersion, DiscoveryError, GROUP};
