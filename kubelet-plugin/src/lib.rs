//! The node agent of the vGPU DRA driver.
//!
//! It discovers the node's GPUs ([`discovery`]), publishes them as ResourceSlices
//! ([`publish`]), answers the kubelet through the `dra` crate's helper ([`driver`]), and
//! prepares claims as CDI specs ([`prepare`], [`cdi_spec`], [`checkpoint`]). [`plugin`] wires
//! them together; the binary only parses flags.

pub mod cdi_spec;
pub mod checkpoint;
pub mod discovery;
pub mod driver;
pub mod metrics;
pub mod plugin;
pub mod prepare;
pub mod publish;
pub mod uninstall;
pub mod usage;
