//! The compute cap at run time: launches wait on a per-device token bucket, and a watcher
//! thread measures the claim's utilization through NVML every tick and revises the rate
//! (`throttle.rs` has the arithmetic).
//!
//! NVML reports utilization per host PID. A process inside a container does not know its host
//! PID, so it learns it when it creates a context: the PID that appears in the device's process
//! list across that call is its own. Each process writes its host PID into its slot of the
//! shared file, so every process can sum the utilization of the whole claim.

use std::ffi::{c_char, c_int, c_uint};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use crate::config::MAX_DEVICES;
use crate::ffi::*;
use crate::real;
use crate::report;
use crate::state;
use crate::throttle::{Bucket, Controller, TICK, share_of_tick};

/// Launches whose GPU time is remembered per device (by kernel or graph), direct-mapped.
const ESTIMATES: usize = 256;
/// One launch in this many of a known kernel or graph is timed again (unknown ones always).
const SAMPLE_EVERY: u64 = 16;
/// What a launch is taken to cost before anything was measured on its device: 10 µs.
const FIRST_GUESS_NS: u64 = 10_000;

pub struct Compute {
    /// Percent per device; 0: not throttled.
    targets: [u32; MAX_DEVICES],
    buckets: [Bucket; MAX_DEVICES],
    timing: [Timing; MAX_DEVICES],
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
        let targets: [u32; MAX_DEVICES] = std::array::from_fn(|d| target(d).unwrap_or(0));
        Compute {
            targets,
            buckets: std::array::from_fn(|d| Bucket::new(share_of_tick(targets[d]))),
            timing: std::array::from_fn(|_| Timing::default()),
            active: std::array::from_fn(|_| AtomicBool::new(false)),
            throttling: AtomicBool::new(true),
            watcher: Once::new(),
            host_pid: AtomicU32::new(0),
            trace: std::env::var_os("VGPU_TRACE_THROTTLE").is_some(),
        }
    }

    /// Runs `launch` (of the kernel or graph `key` on `stream`, on `device`) once it fits the
    /// claim's share, timing a sample of launches with CUDA events.
    pub fn launch(
        &'static self,
        device: usize,
        key: u64,
        stream: CUstream,
        launch: impl FnOnce() -> CUresult,
    ) -> CUresult {
        if device >= MAX_DEVICES
            || self.targets[device] == 0
            || !self.throttling.load(Ordering::Relaxed)
        {
            return launch();
        }
        self.active[device].store(true, Ordering::Relaxed);
        self.watcher.call_once(|| self.start());
        let bucket = &self.buckets[device];
        let timing = &self.timing[device];
        let n = timing.launches.fetch_add(1, Ordering::Relaxed);
        let (mut cost, mut known) = timing.estimate(key);
        // Settling costs a lock and a query per timed launch in flight: every 4th launch, and
        // for a launch never timed (a new graph's first runs must not go unpaid).
        if (n.is_multiple_of(4) || !known) && timing.in_flight.load(Ordering::Relaxed) > 0 {
            timing.settle(bucket);
            (cost, known) = timing.estimate(key);
        }
        let mut waiting_since = None;
        while !bucket.try_take(cost) {
            if !self.throttling.load(Ordering::Relaxed) {
                break;
            }
            waiting_since.get_or_insert_with(std::time::Instant::now);
            timing.settle(bucket);
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(since) = waiting_since
            && let Some(region) = state::enforcer().and_then(|e| e.shared_region())
        {
            // For the plugin's metrics: how long the cap held the claim back.
            region.add_throttled(device, since.elapsed());
        }
        let events = if !known || n.is_multiple_of(SAMPLE_EVERY) {
            timing.begin(stream)
        } else {
            None
        };
        let rc = launch();
        if let Some(events) = events {
            timing.end(rc, stream, key, cost, events);
        }
        rc
    }

    fn start(&'static self) {
        let nvml_ok = match real::nvml() {
            None => {
                self.open_loop(None, "libnvidia-ml.so.1 cannot be loaded");
                false
            }
            Some(nvml) => match nvml.api.nvmlInit_v2 {
                // SAFETY: no arguments; NVML counts its initializations.
                Some(init) if unsafe { init() } == NVML_SUCCESS => true,
                _ => {
                    self.open_loop(None, "nvmlInit_v2 failed");
                    false
                }
            },
        };
        let spawned = std::thread::Builder::new()
            .name("vgpu-throttle".into())
            .spawn(move || self.watch(nvml_ok));
        if let Err(err) = spawned {
            self.stop(&format!("the watcher thread cannot start: {err}"));
        }
    }

    fn stop(&self, why: &str) {
        self.throttling.store(false, Ordering::Relaxed);
        report::once(
            "no-throttle",
            &format!("{why}: CUDA_DEVICE_SM_LIMIT cannot be enforced"),
        );
    }

    /// Without a measurement of the claim's utilization the throttle still holds, open loop on
    /// the measured GPU time of launches: said loudly, once, and flagged in the process's slot
    /// of the accounting file for whoever watches it.
    fn open_loop(&self, device: Option<usize>, why: &str) {
        let which = device.map_or_else(|| "every device".to_string(), |d| format!("device {d}"));
        report::once(
            "open-loop",
            &format!(
                "WARNING: {which}: NVML cannot report the claim's utilization ({why}); \
                 CUDA_DEVICE_SM_LIMIT is enforced open loop on the measured GPU time of \
                 launches: kernels that run at once on several streams or processes are each \
                 counted in full, so the claim may get less than its share, never more on one \
                 stream"
            ),
        );
        if let Some(region) = state::enforcer().and_then(|e| e.shared_region()) {
            region.set_flags(crate::shared::FLAG_THROTTLE_OPEN_LOOP);
        }
    }

    fn watch(&'static self, nvml_ok: bool) {
        let mut controllers: Vec<Controller> = (0..MAX_DEVICES)
            .map(|d| Controller::new(self.targets[d]))
            .collect();
        let mut meters: Vec<Meter> = (0..MAX_DEVICES).map(Meter::new).collect();
        let mut last = std::time::Instant::now();
        loop {
            std::thread::sleep(TICK);
            // A tick lasts longer than TICK (the sleep overshoots, the loop takes time): the
            // refill is for the time that really passed, at most two ticks' worth.
            let now = std::time::Instant::now();
            let stretch = (now - last).as_secs_f64() / TICK.as_secs_f64();
            let stretch = stretch.clamp(1.0, 2.0);
            last = now;
            for device in 0..MAX_DEVICES {
                if !self.active[device].load(Ordering::Relaxed) {
                    continue;
                }
                let util = if nvml_ok {
                    match meters[device].measure(self) {
                        Measured::Util(util) => {
                            if let Some(region) = state::enforcer().and_then(|e| e.shared_region())
                            {
                                region.set_utilization(device, util);
                            }
                            Some(util)
                        }
                        Measured::Nothing => None,
                        Measured::Unavailable(why) => {
                            self.open_loop(Some(device), why);
                            None
                        }
                    }
                } else {
                    None
                };
                let bucket = &self.buckets[device];
                let (consumed, starved) = bucket.end_tick();
                let rate = controllers[device].update(consumed, util, starved);
                if self.trace {
                    report::say(&format!(
                        "throttle device {device}: util {util:?} consumed {consumed} ns starved \
                         {starved} -> rate {rate:.0} ns tokens {}",
                        bucket.tokens()
                    ));
                }
                bucket.refill(rate * stretch);
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
    fn measure(&mut self, compute: &Compute) -> Measured {
        if self.handle.is_none() {
            self.handle = nvml_handle(self.device);
        }
        let Some(handle) = self.handle else {
            return Measured::Unavailable("the device has no NVML handle");
        };
        let Some(api) = real::nvml().map(|n| &n.api) else {
            return Measured::Unavailable("libnvidia-ml.so.1 cannot be loaded");
        };
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
            let Some(get) = api.nvmlDeviceGetUtilizationRates else {
                return Measured::Unavailable("no nvmlDeviceGetUtilizationRates");
            };
            let mut util = nvmlUtilization_t::default();
            // SAFETY: a handle from NVML and a valid out pointer.
            return match unsafe { get(handle, &mut util) } {
                NVML_SUCCESS => Measured::Util(f64::from(util.gpu.min(100))),
                NVML_ERROR_NOT_SUPPORTED => {
                    Measured::Unavailable("nvmlDeviceGetUtilizationRates is not supported")
                }
                _ => Measured::Nothing,
            };
        }
        let Some(get) = api.nvmlDeviceGetProcessUtilization else {
            return Measured::Unavailable("no nvmlDeviceGetProcessUtilization");
        };
        let mut samples = [nvmlProcessUtilizationSample_t::default(); 128];
        let mut count = samples.len() as c_uint;
        // SAFETY: the buffer holds `count` samples.
        let rc = unsafe { get(handle, samples.as_mut_ptr(), &mut count, self.last_seen) };
        match rc {
            NVML_SUCCESS => {}
            NVML_ERROR_NOT_SUPPORTED | NVML_ERROR_NO_PERMISSION => {
                return Measured::Unavailable(
                    "nvmlDeviceGetProcessUtilization is not supported or not permitted",
                );
            }
            // NOT_FOUND: no sample since the last one; anything else: try again next tick.
            _ => return Measured::Nothing,
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
        if first {
            Measured::Nothing
        } else {
            Measured::Util(total.min(100.0))
        }
    }
}

enum Measured {
    Util(f64),
    /// No new sample this tick.
    Nothing,
    /// NVML cannot tell, and will not: the throttle runs open loop.
    Unavailable(&'static str),
}

/// A timed launch in flight: its events and what it was charged before it ran.
struct Pending {
    key: u64,
    start: CUevent,
    end: CUevent,
    charged: u64,
}

/// Event handles, kept for reuse; only this library uses them.
struct Events(Vec<CUevent>);
// SAFETY: CUDA events may be used from any thread.
unsafe impl Send for Events {}
struct PendingList(Vec<Pending>);
// SAFETY: as above.
unsafe impl Send for PendingList {}

/// The GPU time of launches on one device: what each kernel or graph took when last timed.
struct Timing {
    keys: [AtomicU64; ESTIMATES],
    costs: [AtomicU64; ESTIMATES],
    /// The last time measured on the device, for a launch never timed.
    last: AtomicU64,
    launches: AtomicU64,
    in_flight: AtomicUsize,
    pending: Mutex<PendingList>,
    spare: Mutex<Events>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keys: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            costs: std::array::from_fn(|_| AtomicU64::new(0)),
            last: AtomicU64::new(FIRST_GUESS_NS),
            launches: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            pending: Mutex::new(PendingList(Vec::new())),
            spare: Mutex::new(Events(Vec::new())),
        }
    }
}

fn slot_of(key: u64) -> usize {
    ((key >> 4) ^ (key >> 16) ^ (key >> 40)) as usize % ESTIMATES
}

impl Timing {
    /// The expected GPU time of a launch of `key`, and whether it was ever timed.
    fn estimate(&self, key: u64) -> (u64, bool) {
        let slot = slot_of(key);
        if self.keys[slot].load(Ordering::Acquire) == key {
            (self.costs[slot].load(Ordering::Relaxed), true)
        } else {
            (self.last.load(Ordering::Relaxed), false)
        }
    }

    fn remember(&self, key: u64, ns: u64) {
        let slot = slot_of(key);
        let previous = self.keys[slot].swap(key, Ordering::AcqRel);
        let cost = if previous == key {
            (self.costs[slot].load(Ordering::Relaxed) + ns) / 2
        } else {
            ns
        };
        self.costs[slot].store(cost, Ordering::Release);
        self.last.store(ns, Ordering::Relaxed);
    }

    /// Records a start event on `stream`, unless it is being captured into a graph (nothing
    /// runs then) or events cannot be had.
    fn begin(&self, stream: CUstream) -> Option<(CUevent, CUevent)> {
        let api = &real::cuda()?.api;
        if let Some(capturing) = api.cuStreamIsCapturing {
            let mut status: c_int = 0;
            // SAFETY: the caller's stream and a valid out pointer.
            if unsafe { capturing(stream, &mut status) } != CUDA_SUCCESS || status != 0 {
                return None;
            }
        }
        let record = api.cuEventRecord?;
        let (start, end) = (self.event()?, self.event()?);
        // SAFETY: an event of ours and the caller's stream.
        if unsafe { record(start, stream) } != CUDA_SUCCESS {
            self.spare(&[start, end]);
            return None;
        }
        Some((start, end))
    }

    /// Records the end event after the launch, and leaves the pair to be settled.
    fn end(
        &self,
        rc: CUresult,
        stream: CUstream,
        key: u64,
        charged: u64,
        events: (CUevent, CUevent),
    ) {
        let (start, end) = events;
        let recorded = rc == CUDA_SUCCESS
            && real::cuda()
                .and_then(|c| c.api.cuEventRecord)
                // SAFETY: as in begin.
                .is_some_and(|record| unsafe { record(end, stream) } == CUDA_SUCCESS);
        if !recorded {
            self.spare(&[start, end]);
            return;
        }
        lock(&self.pending).0.push(Pending {
            key,
            start,
            end,
            charged,
        });
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Charges `bucket` the difference between the measured and the charged time of every
    /// timed launch that has finished.
    fn settle(&self, bucket: &Bucket) {
        let Some(api) = real::cuda().map(|c| &c.api) else {
            return;
        };
        let (Some(query), Some(elapsed)) = (api.cuEventQuery, api.cuEventElapsedTime) else {
            return;
        };
        let mut done = Vec::new();
        {
            let mut pending = lock(&self.pending);
            pending.0.retain(|p| {
                // SAFETY: events of ours, recorded.
                match unsafe { query(p.end) } {
                    CUDA_ERROR_NOT_READY => true,
                    rc => {
                        let mut ms: f32 = 0.0;
                        if rc == CUDA_SUCCESS
                            // SAFETY: as above; a valid out pointer.
                            && unsafe { elapsed(&mut ms, p.start, p.end) } == CUDA_SUCCESS
                            && ms.is_finite()
                            && ms >= 0.0
                        {
                            let ns = (f64::from(ms) * 1e6) as u64;
                            bucket.adjust(ns as i64 - p.charged as i64);
                            self.remember(p.key, ns);
                        }
                        done.push(p.start);
                        done.push(p.end);
                        false
                    }
                }
            });
            self.in_flight.store(pending.0.len(), Ordering::Relaxed);
        }
        self.spare(&done);
    }

    fn event(&self) -> Option<CUevent> {
        if let Some(event) = lock(&self.spare).0.pop() {
            return Some(event);
        }
        let create = real::cuda()?.api.cuEventCreate?;
        let mut event: CUevent = std::ptr::null_mut();
        // SAFETY: a valid out pointer; flags 0: a timing event.
        (unsafe { create(&mut event, 0) } == CUDA_SUCCESS && !event.is_null()).then_some(event)
    }

    fn spare(&self, events: &[CUevent]) {
        lock(&self.spare).0.extend_from_slice(events);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
