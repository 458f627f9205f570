//! The cluster-wide allocator of GPU slices: the allocation engine (pure, shared by the
//! controller loop and the simulator), CEL selectors, and the views of Kubernetes objects it
//! reads, and the Kubernetes loop (`run`).

pub mod cel;
pub mod engine;
pub mod model;
pub mod run;
pub mod simulate;
pub mod slim;
