//! The shared domain model of the vGPU DRA driver: GPUs, their shareable capacities, the
//! configuration API users write, and the ResourceSlices a node publishes.
//!
//! Everything here is pure (no I/O, no API server) so that the kubelet plugin, the controller
//! and the simulator agree by construction. It speaks resource.k8s.io/v1 only; the `dra` crate
//! converts at the wire.

pub mod allocation;
pub mod capacity;
pub mod class;
pub mod config;
pub mod gpu;
pub mod names;
pub mod quantity;
pub mod slice;

pub use allocation::{AllocatedDevice, AllocationError, ClaimAllocation};
pub use capacity::Capacity;
pub use config::{ConfigEntry, ConfigError, ConfigSource, SliceConfig, SliceLimits};
pub use gpu::{Gpu, Inventory};
pub use quantity::Quantity;
pub use slice::{NodeRef, PoolOptions, PublishedDevice, SliceView};

/// The default driver name: `spec.driver` of our slices and `results[].driver` of allocations.
pub const DEFAULT_DRIVER_NAME: &str = "vgpu.hami.io";
