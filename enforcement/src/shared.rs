//! Memory use counted across every process of a claim, in the file named by
//! `CUDA_DEVICE_MEMORY_SHARED_CACHE`.
//!
//! The file is memory-mapped; each process owns one slot in it and counts its bytes per device
//! there. Two kinds of open-file-description (OFD) locks make it safe:
//! - a write lock on byte 0 serializes "sum everyone's use, then add mine", so two processes
//!   can never each take the whole limit;
//! - each process holds a read lock on its own slot for as long as it lives. The kernel drops
//!   both when the process dies, however it dies, so a lock is never stranded and a slot whose
//!   lock is gone belongs to a dead process: its bytes are reclaimed.
//!
//! OFD locks, unlike classic POSIX locks, belong to the open file, not the process, so they
//! also work between containers in different PID namespaces that bind-mount the same file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use crate::config::MAX_DEVICES;

// The library's bound and the file's must agree.
const _: () = assert!(MAX_DEVICES == vgpu_accounting::MAX_DEVICES);

// The layout is the contract with the kubelet plugin, which reads the file for its metrics:
// defined once, in vgpu-accounting.
pub use vgpu_accounting::{FILE_SIZE, FLAG_THROTTLE_OPEN_LOOP, SLOTS};
use vgpu_accounting::{Header, MAGIC, SLOT_SIZE, Slot, VERSION, slot_offset};

#[derive(Debug, Error)]
pub enum SharedError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: not a vgpu accounting file (wrong size or magic); another library's file?")]
    Incompatible { path: PathBuf },
    #[error("{path}: all {SLOTS} process slots are held by live processes")]
    Full { path: PathBuf },
}

/// Past the limit: what was asked, what the claim already uses, the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub requested: u64,
    pub used: u64,
    pub limit: u64,
}

pub struct SharedRegion {
    path: PathBuf,
    file: File,
    base: *mut u8,
    slot: usize,
    /// OFD locks do not exclude threads sharing the description: this does.
    serial: Mutex<()>,
}

// The mapping is only reached through atomics, and `serial` orders the read-modify-write.
unsafe impl Send for SharedRegion {}
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// Opens (creating if needed) the file and takes a slot, reclaiming a dead process's.
    pub fn open(path: &Path) -> Result<Self, SharedError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| SharedError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("open"))?;
        set_lock(&file, libc::F_WRLCK, 0, 1, true).map_err(io("lock"))?;
        let result = Self::attach(path, file);
        // On success the region unlocks through its own handle; on failure the file closes,
        // which drops the lock.
        let region = result?;
        region.unlock_global();
        Ok(region)
    }

    fn attach(path: &Path, file: File) -> Result<Self, SharedError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| SharedError::Io { path, op, source }
        };
        let len = file.metadata().map_err(io("stat"))?.len();
        let fresh = len == 0;
        if fresh {
            file.set_len(FILE_SIZE as u64).map_err(io("truncate"))?;
            // Containers of one claim may run as different users.
            let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
        } else if len != FILE_SIZE as u64 {
            return Err(SharedError::Incompatible { path: path.into() });
        }
        // SAFETY: a fresh shared mapping of a file of exactly FILE_SIZE bytes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io("mmap")(io::Error::last_os_error()));
        }
        let mut region = SharedRegion {
            path: path.to_path_buf(),
            file,
            base: base.cast(),
            slot: usize::MAX,
            serial: Mutex::new(()),
        };
        let header = region.header();
        if fresh {
            header.version.store(VERSION, Ordering::Relaxed);
            header.slots.store(SLOTS as u32, Ordering::Relaxed);
            header.magic.store(MAGIC, Ordering::Release);
        } else if header.magic.load(Ordering::Acquire) != MAGIC
            || header.version.load(Ordering::Relaxed) != VERSION
            || header.slots.load(Ordering::Relaxed) != SLOTS as u32
        {
            return Err(SharedError::Incompatible { path: path.into() });
        }
        region.slot = region.claim_slot()?;
        Ok(region)
    }

    /// Takes the first slot nobody holds; the caller holds the global lock.
    fn claim_slot(&self) -> Result<usize, SharedError> {
        for index in 0..SLOTS {
            if self.slot_is_held(index) {
                continue;
            }
            let slot = self.slot_at(index);
            for used in &slot.used {
                used.store(0, Ordering::Relaxed);
            }
            slot.pid.store(std::process::id(), Ordering::Relaxed);
            slot.host_pid.store(0, Ordering::Relaxed);
            slot.flags.store(0, Ordering::Relaxed);
            slot.set_host_name(&host_name());
            if set_lock(
                &self.file,
                libc::F_RDLCK,
                slot_offset(index),
                SLOT_SIZE,
                false,
            )
            .is_ok()
            {
                slot.in_use.store(1, Ordering::Release);
                return Ok(index);
            }
        }
        Err(SharedError::Full {
            path: self.path.clone(),
        })
    }

    /// Adds `bytes` to this process's use of `device` unless the claim would pass `limit`.
    ///
    /// The fast path takes no lock: it announces the bytes in its own slot, then sums every
    /// slot, and takes them back if the sum passes the limit. Both steps are sequentially
    /// consistent, so of two reservations racing, each sees at least the other's announcement:
    /// both may fail, never both pass. A process that dies between the steps leaves its bytes
    /// in its own slot, reclaimed with it. Only past the limit does it take the global lock,
    /// reclaim dead processes' slots and try once more.
    pub fn reserve(&self, device: usize, bytes: u64, limit: u64) -> Result<(), OverLimit> {
        let Some(device) = (device < MAX_DEVICES).then_some(device) else {
            return Ok(());
        };
        if self.announce_and_check(device, bytes, limit).is_ok() {
            return Ok(());
        }
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let locked = set_lock(&self.file, libc::F_WRLCK, 0, 1, true).is_ok();
        self.reap_dead();
        let result = self.announce_and_check(device, bytes, limit);
        if locked {
            self.unlock_global();
        }
        if result.is_err() {
            self.counters(device)
                .cap_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn announce_and_check(&self, device: usize, bytes: u64, limit: u64) -> Result<(), OverLimit> {
        let own = &self.slot_at(self.slot).used[device];
        own.fetch_add(bytes, Ordering::SeqCst);
        let used = self.sum(device);
        if used <= limit {
            // The sum counts every reservation that passed, so the largest one seen is the
            // claim's peak (one racing reservation may be in it and then refused: a peak that
            // is at most one allocation high, never low).
            self.counters(device)
                .peak_bytes
                .fetch_max(used, Ordering::Relaxed);
            return Ok(());
        }
        let _ = own.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            Some(v.saturating_sub(bytes))
        });
        Err(OverLimit {
            requested: bytes,
            used: used.saturating_sub(bytes),
            limit,
        })
    }

    /// Gives back what `reserve` took.
    pub fn release(&self, device: usize, bytes: u64) {
        if let Some(used) = self.slot_at(self.slot).used.get(device) {
            let _ = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            });
        }
    }

    /// What the live processes of the claim use on `device`, reclaiming dead ones first.
    pub fn used(&self, device: usize) -> u64 {
        if device >= MAX_DEVICES {
            return 0;
        }
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let locked = set_lock(&self.file, libc::F_WRLCK, 0, 1, true).is_ok();
        self.reap_dead();
        let used = self.sum(device);
        if locked {
            self.unlock_global();
        }
        used
    }

    /// What this process uses on `device`.
    #[cfg(test)]
    pub fn own_use(&self, device: usize) -> u64 {
        self.slot_at(self.slot)
            .used
            .get(device)
            .map_or(0, |u| u.load(Ordering::Acquire))
    }

    pub fn set_flags(&self, flags: u32) {
        self.slot_at(self.slot)
            .flags
            .fetch_or(flags, Ordering::AcqRel);
    }

    pub fn set_host_pid(&self, pid: u32) {
        self.slot_at(self.slot)
            .host_pid
            .store(pid, Ordering::Release);
    }

    /// The NVML PIDs of the claim's live processes that have one.
    pub fn host_pids(&self) -> Vec<u32> {
        (0..SLOTS)
            .map(|i| self.slot_at(i))
            .filter(|s| s.in_use.load(Ordering::Acquire) == 1)
            .map(|s| s.host_pid.load(Ordering::Acquire))
            .filter(|&p| p != 0)
            .collect()
    }

    /// Adds time a launch on `device` waited for the compute cap.
    pub fn add_throttled(&self, device: usize, waited: std::time::Duration) {
        if device < MAX_DEVICES {
            let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
            self.counters(device)
                .throttled_ns
                .fetch_add(ns, Ordering::Relaxed);
        }
    }

    /// Records the claim's utilization of `device` as just measured, in percent.
    pub fn set_utilization(&self, device: usize, percent: f64) {
        if device >= MAX_DEVICES {
            return;
        }
        let centi = (percent.clamp(0.0, 100.0) * 100.0).round() as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let counters = self.counters(device);
        counters
            .utilization_centi_percent
            .store(centi, Ordering::Relaxed);
        counters
            .utilization_unix_ms
            .store(now.max(1), Ordering::Release);
    }

    fn counters(&self, device: usize) -> &vgpu_accounting::DeviceCounters {
        &self.header().devices[device]
    }

    fn sum(&self, device: usize) -> u64 {
        (0..SLOTS)
            .map(|i| self.slot_at(i))
            .filter(|s| s.in_use.load(Ordering::Acquire) == 1)
            .fold(0u64, |acc, s| {
                acc.saturating_add(s.used[device].load(Ordering::SeqCst))
            })
    }

    /// Frees the slots of processes that died; the caller holds the global lock.
    fn reap_dead(&self) {
        for index in 0..SLOTS {
            if index == self.slot {
                continue;
            }
            let slot = self.slot_at(index);
            if slot.in_use.load(Ordering::Acquire) == 1 && !self.slot_is_held(index) {
                slot.in_use.store(0, Ordering::Release);
                for used in &slot.used {
                    used.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// In a forked child: lets go of the parent's mapping and open file description (the
    /// parent keeps its own), so that the parent's locks are the parent's alone and die with
    /// it. The region must not be used afterwards. Async-signal-safe: munmap and close.
    pub fn let_go_in_child(&self) {
        // SAFETY: the mapping made in attach and the descriptor of `file`; the caller never
        // touches this region again and never drops it, so neither is used or closed twice.
        unsafe {
            libc::munmap(self.base.cast(), FILE_SIZE);
            libc::close(self.file.as_raw_fd());
        }
    }

    fn slot_is_held(&self, index: usize) -> bool {
        // F_OFD_GETLK never reports our own description's locks, so ask about our own slot
        // directly.
        index == self.slot || lock_held(&self.file, slot_offset(index), SLOT_SIZE)
    }

    fn unlock_global(&self) {
        let _ = set_lock(&self.file, libc::F_UNLCK, 0, 1, false);
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is FILE_SIZE bytes, page-aligned, and lives as long as self.
        unsafe { &*(self.base as *const Header) }
    }

    fn slot_at(&self, index: usize) -> &Slot {
        assert!(index < SLOTS);
        // SAFETY: in bounds (checked), 8-aligned (4096 + k·SLOT_SIZE, SLOT_SIZE a multiple of 8).
        unsafe { &*(self.base.add(slot_offset(index)) as *const Slot) }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if self.slot < SLOTS {
            let slot = self.slot_at(self.slot);
            for used in &slot.used {
                used.store(0, Ordering::Relaxed);
            }
            slot.in_use.store(0, Ordering::Release);
        }
        // SAFETY: base/FILE_SIZE are the mapping made in attach; closing the file drops the locks.
        unsafe { libc::munmap(self.base.cast(), FILE_SIZE) };
    }
}

/// This process's host name: in a pod, the pod's name, which the plugin exports as a label.
fn host_name() -> Vec<u8> {
    let mut buf = [0u8; vgpu_accounting::HOST_NAME_LEN + 1];
    // SAFETY: the buffer is as long as the length given.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Vec::new();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    buf[..len].to_vec()
}

fn flock(kind: i32, start: usize, len: usize) -> libc::flock {
    // SAFETY: flock is plain data; OFD locks need l_pid = 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = start as libc::off_t;
    lock.l_len = len as libc::off_t;
    lock
}

fn set_lock(file: &File, kind: i32, start: usize, len: usize, wait: bool) -> io::Result<()> {
    let mut lock = flock(kind, start, len);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: a valid descriptor and a valid flock.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether some other open file description holds a lock on the range.
fn lock_held(file: &File, start: usize, len: usize) -> bool {
    let mut lock = flock(libc::F_WRLCK, start, len);
    // SAFETY: a valid descriptor and a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    // When we cannot tell, the slot counts as held: never reclaim a live process's bytes.
    rc != 0 || lock.l_type != libc::F_UNLCK as libc::c_short
}

/// Counting without a shared file: one process, same rules.
#[derive(Default)]
pub struct LocalCounters {
    used: [AtomicU64; MAX_DEVICES],
    serial: Mutex<()>,
}

impl LocalCounters {
    pub fn reserve(&self, device: usize, bytes: u64, limit: u64) -> Result<(), OverLimit> {
        let Some(counter) = self.used.get(device) else {
            return Ok(());
        };
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let used = counter.load(Ordering::Acquire);
        if used.saturating_add(bytes) > limit {
            return Err(OverLimit {
                requested: bytes,
                used,
                limit,
            });
        }
        counter.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }

    pub fn release(&self, device: usize, bytes: u64) {
        if let Some(counter) = self.used.get(device) {
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            });
        }
    }

    pub fn used(&self, device: usize) -> u64 {
        self.used
            .get(device)
            .map_or(0, |c| c.load(Ordering::Acquire))
    }
}

/// Where a process counts its bytes.
pub enum Accounting {
    Shared(SharedRegion),
    Local(LocalCounters),
}

impl Accounting {
    pub fn reserve(&self, device: usize, bytes: u64, limit: u64) -> Result<(), OverLimit> {
        match self {
            Accounting::Shared(r) => r.reserve(device, bytes, limit),
            Accounting::Local(l) => l.reserve(device, bytes, limit),
        }
    }

    pub fn release(&self, device: usize, bytes: u64) {
        match self {
            Accounting::Shared(r) => r.release(device, bytes),
            Accounting::Local(l) => l.release(device, bytes),
        }
    }

    pub fn used(&self, device: usize) -> u64 {
        match self {
            Accounting::Shared(r) => r.used(device),
            Accounting::Local(l) => l.used(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn two_openers_share_one_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        // Two opens are two open file descriptions: to the locks, two processes.
        let a = SharedRegion::open(&path).unwrap();
        let b = SharedRegion::open(&path).unwrap();
        assert_ne!(a.slot, b.slot);
        a.reserve(0, 3 * GIB, 4 * GIB).unwrap();
        assert_eq!(
            b.reserve(0, 2 * GIB, 4 * GIB),
            Err(OverLimit {
                requested: 2 * GIB,
                used: 3 * GIB,
                limit: 4 * GIB
            })
        );
        b.reserve(0, GIB, 4 * GIB).unwrap();
        assert_eq!(a.used(0), 4 * GIB);
        // Devices are counted apart.
        b.reserve(1, 4 * GIB, 4 * GIB).unwrap();
        a.release(0, GIB);
        b.reserve(0, GIB, 4 * GIB).unwrap();
        assert_eq!(b.own_use(0), 2 * GIB);
    }

    #[test]
    fn racing_reservations_never_pass_the_limit_together() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        // Two descriptions (two processes, to the locks), two threads on each.
        let regions = [
            Arc::new(SharedRegion::open(&path).unwrap()),
            Arc::new(SharedRegion::open(&path).unwrap()),
        ];
        let held = Arc::new(AtomicU64::new(0));
        let max = Arc::new(AtomicU64::new(0));
        let chunk = 3 * GIB / 2;
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let region = Arc::clone(&regions[t % 2]);
                let (held, max) = (Arc::clone(&held), Arc::clone(&max));
                std::thread::spawn(move || {
                    let mut granted = 0;
                    for _ in 0..20_000 {
                        if region.reserve(0, chunk, 4 * GIB).is_ok() {
                            granted += 1;
                            let now = held.fetch_add(chunk, Ordering::SeqCst) + chunk;
                            max.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(chunk, Ordering::SeqCst);
                            region.release(0, chunk);
                        }
                    }
                    granted
                })
            })
            .collect();
        let granted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(
            max.load(Ordering::SeqCst) <= 4 * GIB,
            "never 3 chunks at once"
        );
        assert!(
            granted > 20_000,
            "contention costs some refusals, not most: {granted}"
        );
        assert_eq!(regions[0].used(0), 0, "nothing left behind");
    }

    #[test]
    fn a_closed_openers_bytes_are_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        let a = SharedRegion::open(&path).unwrap();
        let b = SharedRegion::open(&path).unwrap();
        b.reserve(0, 4 * GIB, 4 * GIB).unwrap();
        assert!(a.reserve(0, 1, 4 * GIB).is_err());
        // Simulate a crash: what the kernel does at exit (unmap, close), without Drop's cleanup.
        // The mapping holds the open file description too, so both must go.
        let b_slot = b.slot;
        let raw = b.file.as_raw_fd();
        let base = b.base;
        std::mem::forget(b);
        // SAFETY: the mapping and descriptor belong to the forgotten region, used by nothing else.
        unsafe {
            libc::munmap(base.cast(), FILE_SIZE);
            libc::close(raw);
        }
        assert_eq!(a.used(0), 0);
        a.reserve(0, 4 * GIB, 4 * GIB).unwrap();
        // The dead slot is free for the next process.
        let c = SharedRegion::open(&path).unwrap();
        assert_eq!(c.slot, b_slot);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hami.cache");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        assert!(matches!(
            SharedRegion::open(&path),
            Err(SharedError::Incompatible { .. })
        ));
        std::fs::write(&path, vec![7u8; FILE_SIZE]).unwrap();
        assert!(matches!(
            SharedRegion::open(&path),
            Err(SharedError::Incompatible { .. })
        ));
        let missing = dir.path().join("no/such/dir/x.cache");
        let err = SharedRegion::open(&missing).err().unwrap().to_string();
        assert!(err.contains("no/such/dir/x.cache: open"), "{err}");
    }

    #[test]
    fn host_pids_of_live_slots_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        let a = SharedRegion::open(&path).unwrap();
        let b = SharedRegion::open(&path).unwrap();
        a.set_host_pid(4242);
        assert_eq!(a.host_pids(), vec![4242]);
        b.set_host_pid(4343);
        drop(b);
        assert_eq!(a.host_pids(), vec![4242]);
    }

    #[test]
    fn slots_run_out_only_with_live_holders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        let held: Vec<SharedRegion> = (0..SLOTS)
            .map(|_| SharedRegion::open(&path).unwrap())
            .collect();
        assert!(matches!(
            SharedRegion::open(&path),
            Err(SharedError::Full { .. })
        ));
        drop(held);
        SharedRegion::open(&path).unwrap();
    }

    /// The contract with the kubelet plugin: what this side writes, its reader reads.
    #[test]
    fn the_plugins_reader_sees_what_the_processes_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        let a = SharedRegion::open(&path).unwrap();
        let b = SharedRegion::open(&path).unwrap();
        a.reserve(1, 3 * GIB, 4 * GIB).unwrap();
        b.reserve(1, GIB, 4 * GIB).unwrap();
        assert!(b.reserve(1, 1, 4 * GIB).is_err());
        assert!(a.reserve(1, GIB, 4 * GIB).is_err());
        b.release(1, GIB);
        a.add_throttled(1, std::time::Duration::from_millis(1500));
        b.add_throttled(1, std::time::Duration::from_millis(500));
        b.set_utilization(1, 42.5);
        b.set_host_pid(777);
        b.set_flags(FLAG_THROTTLE_OPEN_LOOP);

        let usage = vgpu_accounting::read(&path).unwrap();
        let d = usage.devices[1];
        assert_eq!(d.used_bytes, 3 * GIB);
        assert_eq!(d.peak_bytes, 4 * GIB);
        assert_eq!(d.cap_failures, 2);
        assert_eq!(d.throttled_ns, 2_000_000_000);
        let (util, at) = d.utilization.unwrap();
        assert_eq!(util, 0.425);
        assert!(at > 1_600_000_000_000, "Unix ms: {at}");
        assert_eq!(usage.devices[0], vgpu_accounting::DeviceUsage::default());
        assert_eq!(usage.processes.len(), 2);
        let own = std::process::id();
        assert!(usage.processes.iter().all(|p| p.pid == own));
        let host = String::from_utf8(host_name()).unwrap();
        assert!(!host.is_empty());
        assert!(usage.processes.iter().all(|p| p.host_name == host));
        let pb = usage.processes.iter().find(|p| p.slot == b.slot).unwrap();
        assert_eq!((pb.host_pid, pb.flags), (777, FLAG_THROTTLE_OPEN_LOOP));

        // A process gone: its bytes go with it, the claim's counters stay.
        drop(a);
        let usage = vgpu_accounting::read(&path).unwrap();
        assert_eq!(usage.devices[1].used_bytes, 0);
        assert_eq!(usage.devices[1].peak_bytes, 4 * GIB);
        assert_eq!(usage.processes.len(), 1);
    }

    #[test]
    fn local_counters_enforce_the_same_rule() {
        let local = LocalCounters::default();
        local.reserve(0, GIB, GIB).unwrap();
        assert!(local.reserve(0, 1, GIB).is_err());
        local.release(0, GIB);
        assert_eq!(local.used(0), 0);
        local.release(0, GIB);
        assert_eq!(local.used(0), 0, "release never underflows");
        assert!(local.reserve(MAX_DEVICES, u64::MAX, 1).is_ok());
    }
}
