//! The compute cap at run time: launches wait on a per-device token bucket, and a watcher
//! thread measures the claim's utilization through NVML every tick and revises the rate
//! (`throttle.rs` has the arithmetic).
//!
//! NVML reports utilization per host PID. A process inside a container does not know its host
//! PID, so it learns it when it creates a context: the PID that appears in the device's process
//! list across that call is its own. Each process writes its host PID into its slot of the
//! shared file, so every process can sum the utilization of the whole claim.

use std::ffi::{c_char, c_uint};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::config::MAX_DEVICES;
use crate::ffi::*;
use crate::real;
use crate::report;
use crate::state;
use crate::throttle::{Bucket, Controller, TICK};

pub struct Compute {
    /// Percent per device; 0: not throttled.
    targets: [u32; MAX_DEVICES],
    buckets: [Bucket; MAX_DEVICES],
    active: [AtomicBool; MAX_DEVICES],
    /// Cleared when the watcher cannot run: then nothing refills, so nothing may wait.
    throttling: AtomicBool,
    watcher: Once,
    host_pid: AtomicU32,
    /// `VGPU_TRACE_THROTTLE`: one stderr line per device and tick, for tuning.
    trace: bool,
}

impl Compute {
    /// `target(device)`: the device's share in percent, `None` when it is not throttled.
    pub fn new(target: impl Fn(usize) -> Option<u32>) -> Self {
        Compute {
            targets: std::array::from_fn(|d| target(d).unwrap_or(0)),
            buckets: std::array::from_fn(|_| Bucket::new()),
            active: std::array::from_fn(|_| AtomicBool::new(false)),
            throttling: AtomicBool::new(true),
            watcher: Once::new(),
            host_pid: AtomicU32::new(0),
            trace: std::env::var_os("VGPU_TRACE_THROTTLE").is_some(),
        }
    }

    /// Waits until a launch of `cost` blocks on `device` fits the claim's share.
    pub fn admit(&'static self, device: usize, cost: u64) {
        if device >= MAX_DEVICES
            || self.targets[device] == 0
            || !self.throttling.load(Ordering::Relaxed)
        {
            return;
        }
        self.active[device].store(true, Ordering::Relaxed);
        self.watcher.call_once(|| self.start());
        let bucket = &self.buckets[device];
        while !bucket.try_take(cost) {
            if !self.throttling.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn start(&'static self) {
        let Some(nvml) = real::nvml() else {
            self.stop("libnvidia-ml.so.1 cannot be loaded");
            return;
        };
        match nvml.api.nvmlInit_v2 {
            // SAFETY: no arguments; NVML counts its initializations.
            Some(init) if unsafe { init() } == NVML_SUCCESS => {}
            _ => {
                self.stop("nvmlInit_v2 failed");
                return;
            }
        }
        let spawned = std::thread::Builder::new()
            .name("vgpu-throttle".into())
            .spawn(move || self.watch());
        if let Err(err) = spawned {
            self.stop(&format!("the watcher thread cannot start: {err}"));
        }
    }

    fn stop(&self, why: &str) {
        self.throttling.store(false, Ordering::Relaxed);
        report::once(
            "no-throttle",
            &format!("{why}: CUDA_DEVICE_SM_LIMIT cannot be measured and is not enforced"),
        );
    }

    fn watch(&'static self) {
        let mut controllers: Vec<Controller> = (0..MAX_DEVICES)
            .map(|d| Controller::new(self.targets[d]))
            .collect();
        let mut meters: Vec<Meter> = (0..MAX_DEVICES).map(Meter::new).collect();
        loop {
            std::thread::sleep(TICK);
            for device in 0..MAX_DEVICES {
                if !self.active[device].load(Ordering::Relaxed) {
                    continue;
                }
                let util = meters[device].measure(self);
                let bucket = &self.buckets[device];
                let (consumed, starved) = bucket.end_tick();
                let rate = controllers[device].update(consumed, util, starved);
                if self.trace {
                    report::say(&format!(
                        "throttle device {device}: util {util:?} consumed {consumed} starved \
                         {starved} -> rate {rate:.0} tokens {}",
                        bucket.tokens()
                    ));
                }
                bucket.refill(rate);
            }
        }
    }

    /// Runs `create` (a context creation on `device`) and learns this process's host PID from
    /// the device's process list around it.
    pub fn around_context_creation(
        &self,
        device: usize,
        create: impl FnOnce() -> CUresult,
    ) -> CUresult {
        if self.host_pid.load(Ordering::Relaxed) != 0 {
            return create();
        }
        let Some(handle) = nvml_handle(device) else {
            return create();
        };
        let before = running_pids(handle);
        let rc = create();
        if rc == CUDA_SUCCESS {
            let after = running_pids(handle);
            let own = std::process::id();
            let new: Vec<u32> = after
                .iter()
                .copied()
                .filter(|p| !before.contains(p))
                .collect();
            if after.contains(&own) {
                self.set_host_pid(own);
            } else if let [pid] = new[..] {
                self.set_host_pid(pid);
            }
        }
        rc
    }

    fn set_host_pid(&self, pid: u32) {
        self.host_pid.store(pid, Ordering::Relaxed);
        if let Some(region) = state::enforcer().and_then(|e| e.shared_region()) {
            region.set_host_pid(pid);
        }
    }

    /// The host PIDs whose utilization counts against the claim.
    fn claim_pids(&self) -> Vec<u32> {
        let own = self.host_pid.load(Ordering::Relaxed);
        let mut pids = state::enforcer()
            .and_then(|e| e.shared_region())
            .map(|r| r.host_pids())
            .unwrap_or_default();
        if own != 0 && !pids.contains(&own) {
            pids.push(own);
        }
        pids
    }
}

/// Utilization of one device, sample by sample.
struct Meter {
    device: usize,
    handle: Option<Opaque>,
    last_seen: u64,
}

impl Meter {
    fn new(device: usize) -> Self {
        Meter {
            device,
            handle: None,
            last_seen: 0,
        }
    }

    /// The claim's share of the device since the last call, in percent.
    fn measure(&mut self, compute: &Compute) -> Option<f64> {
        if self.handle.is_none() {
            self.handle = nvml_handle(self.device);
        }
        let handle = self.handle?;
        let api = &real::nvml()?.api;
        if compute.host_pid.load(Ordering::Relaxed) == 0
            && running_pids(handle).contains(&std::process::id())
        {
            compute.set_host_pid(std::process::id());
        }
        let pids = compute.claim_pids();
        if pids.is_empty() {
            report::once(
                "device-utilization",
                "this process's host PID is unknown: throttling on the whole device's \
                 utilization, which counts other tenants too",
            );
            let get = api.nvmlDeviceGetUtilizationRates?;
            let mut util = nvmlUtilization_t::default();
            // SAFETY: a handle from NVML and a valid out pointer.
            let rc = unsafe { get(handle, &mut util) };
            return (rc == NVML_SUCCESS).then_some(f64::from(util.gpu.min(100)));
        }
        let get = api.nvmlDeviceGetProcessUtilization?;
        let mut samples = [nvmlProcessUtilizationSample_t::default(); 128];
        let mut count = samples.len() as c_uint;
        // SAFETY: the buffer holds `count` samples.
        let rc = unsafe { get(handle, samples.as_mut_ptr(), &mut count, self.last_seen) };
        if rc != NVML_SUCCESS {
            return None;
        }
        let samples = &samples[..(count as usize).min(samples.len())];
        let mut total = 0.0;
        for pid in &pids {
            let ours: Vec<_> = samples
                .iter()
                .filter(|s| s.pid == *pid && s.time_stamp > self.last_seen)
                .collect();
            if !ours.is_empty() {
                total += ours.iter().map(|s| f64::from(s.sm_util)).sum::<f64>() / ours.len() as f64;
            }
        }
        let first = self.last_seen == 0;
        if let Some(latest) = samples.iter().map(|s| s.time_stamp).max() {
            self.last_seen = self.last_seen.max(latest);
        }
        // The first answer covers NVML's whole history, not the last tick.
        (!first).then_some(total.min(100.0))
    }
}

/// NVML's handle of CUDA device `device`, matched by UUID.
fn nvml_handle(device: usize) -> Option<Opaque> {
    let get_uuid = real::cuda()?.api.cuDeviceGetUuid?;
    let by_uuid = real::nvml()?.api.nvmlDeviceGetHandleByUUID?;
    let mut uuid = [0u8; 16];
    // SAFETY: a 16-byte out buffer.
    if unsafe { get_uuid(&mut uuid, device as CUdevice) } != CUDA_SUCCESS {
        return None;
    }
    let text = format_uuid(&uuid);
    let mut handle: Opaque = std::ptr::null_mut();
    // SAFETY: a NUL-terminated string and a valid out pointer.
    let rc = unsafe { by_uuid(text.as_ptr() as *const c_char, &mut handle) };
    (rc == NVML_SUCCESS && !handle.is_null()).then_some(handle)
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, NUL-terminated.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}\0",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn running_pids(handle: Opaque) -> Vec<u32> {
    let Some(get) = real::nvml().and_then(|n| n.api.nvmlDeviceGetComputeRunningProcesses_v3) else {
        return Vec::new();
    };
    let mut infos = [nvmlProcessInfo_t::default(); 256];
    let mut count = infos.len() as c_uint;
    // SAFETY: the buffer holds `count` entries.
    let rc = unsafe { get(handle, &mut count, infos.as_mut_ptr()) };
    if rc != NVML_SUCCESS {
        return Vec::new();
    }
    infos[..(count as usize).min(infos.len())]
        .iter()
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_formatted_like_nvml() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(
            super::format_uuid(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff\0"
        );
    }
}
