//! libvgpu.so: preloaded into every container of a claim, it holds the container's processes
//! to the claim's GPU memory and compute limits with no change to the application.
//!
//! It reads HAMi-core's environment contract (`config.rs`), so either library can be mounted
//! by the kubelet plugin's CDI spec. See README.md beside this crate for the mechanism.

mod compute;
mod config;
mod dlopen;
mod dlsym;
mod ffi;
mod hooks;
mod ledger;
mod real;
mod report;
mod shared;
mod state;
mod throttle;
