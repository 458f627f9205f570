//! The accounting file of one claim (`CUDA_DEVICE_MEMORY_SHARED_CACHE`): the contract between
//! the enforcement library, which writes it from every process of the claim, and the kubelet
//! plugin, which reads it at scrape time to export usage.
//!
//! Both sides use the types of this crate, so the layout exists once; the constants below and
//! the compile-time assertions pin it, so a change to it is a change of [`VERSION`].
//!
//! Layout, version 3 (all integers little-endian, as the host writes them; offsets in bytes):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `VGPUSHR1` |
//! | 8 | 4 | version (3) |
//! | 12 | 4 | number of process slots (128) |
//! | 16 | 16 × 48 | per device ([`DeviceCounters`]): peak bytes, refused allocations, throttled ns, utilization (1/100 %), when it was measured (Unix ms), reserved |
//! | 4096 | 128 × 208 | process slots ([`Slot`]): in use, PID, host PID, flags, bytes per device, host name |
//!
//! The header counters are claim-wide and live as long as the file: a process that exits does
//! not take its share of the peak or of the refusals with it. What a process uses lives in its
//! slot, which the library frees when the process dies (see the library's `shared.rs` for the
//! locks that tell a live slot from a dead one; [`read`] asks the same locks).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use thiserror::Error;

pub mod hami;

/// Devices a claim's processes can address (`CUDA_DEVICE_MEMORY_LIMIT_<i>`); HAMi-core has the
/// same bound.
pub const MAX_DEVICES: usize = 16;
pub const MAGIC: u64 = u64::from_le_bytes(*b"VGPUSHR1");
/// 2: reservations announce then check without the lock; a process of version 1 sums then adds
/// under the lock, and the two would not exclude each other.
/// 3: claim-wide counters per device in the header (peak, refusals, throttled time,
/// utilization) and the host name (the pod's, in Kubernetes) in each slot, for the plugin's
/// metrics.
pub const VERSION: u32 = 3;
/// Processes of one claim that can use a GPU at once.
pub const SLOTS: usize = 128;
pub const SLOTS_OFFSET: usize = 4096;
pub const SLOT_SIZE: usize = std::mem::size_of::<Slot>();
pub const FILE_SIZE: usize = SLOTS_OFFSET + SLOTS * SLOT_SIZE;
/// Bytes of the host name kept in a slot: Linux's `HOST_NAME_MAX` is 64.
pub const HOST_NAME_LEN: usize = 64;
/// The slot's process throttles open loop: NVML could not report the claim's utilization.
pub const FLAG_THROTTLE_OPEN_LOOP: u32 = 1;

/// Claim-wide counters of one device.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// The most the claim's live processes held at once.
    pub peak_bytes: AtomicU64,
    /// Allocations refused because they would have passed the limit.
    pub cap_failures: AtomicU64,
    /// Time launches waited for the compute cap, summed over the claim's threads.
    pub throttled_ns: AtomicU64,
    /// The claim's utilization of the device as last measured by a throttling process, in
    /// hundredths of a percent.
    pub utilization_centi_percent: AtomicU64,
    /// When that was measured, Unix milliseconds; 0: never.
    pub utilization_unix_ms: AtomicU64,
    pub reserved: AtomicU64,
}

#[repr(C)]
#[derive(Debug)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub slots: AtomicU32,
    pub devices: [DeviceCounters; MAX_DEVICES],
}

#[repr(C)]
#[derive(Debug)]
pub struct Slot {
    /// 1 while a process holds the slot.
    pub in_use: AtomicU32,
    /// The PID in the process's own namespace, for people reading the file.
    pub pid: AtomicU32,
    /// The PID NVML reports for the process (the host's), 0 until known.
    pub host_pid: AtomicU32,
    /// `FLAG_*`: conditions a watcher of the file may want to export.
    pub flags: AtomicU32,
    pub used: [AtomicU64; MAX_DEVICES],
    /// The process's host name, NUL-padded: in a pod, the pod's name. Packed 8 bytes to a word
    /// so that it is written with the same atomics as everything else.
    pub host_name: [AtomicU64; HOST_NAME_LEN / 8],
}

const DEVICES_OFFSET: usize = std::mem::offset_of!(Header, devices);
const DEVICE_SIZE: usize = std::mem::size_of::<DeviceCounters>();

// The table in the module documentation, checked by the compiler.
const _: () = {
    assert!(std::mem::offset_of!(Header, version) == 8);
    assert!(std::mem::offset_of!(Header, slots) == 12);
    assert!(DEVICES_OFFSET == 16);
    assert!(DEVICE_SIZE == 48);
    assert!(std::mem::size_of::<Header>() <= SLOTS_OFFSET);
    assert!(std::mem::offset_of!(Slot, used) == 16);
    assert!(std::mem::offset_of!(Slot, host_name) == 16 + 8 * MAX_DEVICES);
    assert!(SLOT_SIZE == 208);
    assert!(SLOT_SIZE.is_multiple_of(8));
    assert!(FILE_SIZE == 30720);
};

/// Where slot `index` starts.
pub const fn slot_offset(index: usize) -> usize {
    SLOTS_OFFSET + index * SLOT_SIZE
}

impl Slot {
    /// Stores `name` (cut at [`HOST_NAME_LEN`] bytes), NUL-padded.
    pub fn set_host_name(&self, name: &[u8]) {
        let mut bytes = [0u8; HOST_NAME_LEN];
        let n = name.len().min(HOST_NAME_LEN);
        bytes[..n].copy_from_slice(&name[..n]);
        for (word, chunk) in self.host_name.iter().zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
    }
}

/// Why a file cannot be read as an accounting file. Each names a reason for metrics.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
}

/// What is wrong with the content.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("{len} bytes, a version {VERSION} accounting file has {FILE_SIZE}")]
    Size { len: u64 },
    #[error("not a vgpu accounting file (wrong magic); another library's file?")]
    Magic,
    #[error("accounting file version {found}, this reader knows {VERSION}")]
    Version { found: u32 },
    #[error("{found} process slots, version {VERSION} has {SLOTS}")]
    Slots { found: u32 },
    #[error(
        "HAMi-core shared region version {major}.{minor}, this reader knows {}.{}",
        hami::MAJOR_VERSION,
        hami::MINOR_VERSION
    )]
    HamiVersion { major: u32, minor: u32 },
}

impl ReadError {
    /// A short, fixed reason, for a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadError::Io { .. } => "io",
            ReadError::NotRegular { .. } => "not_regular",
            ReadError::Format { source, .. } => match source {
                FormatError::Size { .. } => "size",
                FormatError::Magic => "magic",
                FormatError::Version { .. } | FormatError::HamiVersion { .. } => "version",
                FormatError::Slots { .. } => "slots",
            },
        }
    }
}

/// One device of a claim, as the file says.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceUsage {
    /// Held now by the claim's live processes.
    pub used_bytes: u64,
    pub peak_bytes: u64,
    pub cap_failures: u64,
    pub throttled_ns: u64,
    /// The last measured utilization, 0.0–1.0, and when (Unix ms).
    pub utilization: Option<(f64, u64)>,
}

/// One live process of the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub slot: usize,
    pub pid: u32,
    pub host_pid: u32,
    pub flags: u32,
    /// The host name as written, non-printable bytes replaced: the writer is the container.
    pub host_name: String,
    pub used: [u64; MAX_DEVICES],
}

/// A claim's accounting file at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimUsage {
    pub devices: [DeviceUsage; MAX_DEVICES],
    /// Live processes (slots in use whose owner still holds its lock), by slot.
    pub processes: Vec<Process>,
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(b)
}

/// Keeps what a label may show of a name a container wrote: printable ASCII, up to the first
/// NUL.
fn host_name(raw: &[u8]) -> String {
    raw.iter()
        .take_while(|&&b| b != 0)
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// Decodes a whole file. `live(slot)` says whether a slot marked in use still has its process
/// (the library frees a dead process's slot only when it next needs room, so a crash leaves
/// one marked). Never panics, whatever `bytes` holds.
pub fn parse(bytes: &[u8], live: impl Fn(usize) -> bool) -> Result<ClaimUsage, FormatError> {
    if bytes.len() != FILE_SIZE {
        return Err(FormatError::Size {
            len: bytes.len() as u64,
        });
    }
    if u64_at(bytes, 0) != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u32_at(bytes, std::mem::offset_of!(Header, version));
    if version != VERSION {
        return Err(FormatError::Version { found: version });
    }
    let slots = u32_at(bytes, std::mem::offset_of!(Header, slots));
    if slots as usize != SLOTS {
        return Err(FormatError::Slots { found: slots });
    }
    let mut devices = [DeviceUsage::default(); MAX_DEVICES];
    for (d, device) in devices.iter_mut().enumerate() {
        let base = DEVICES_OFFSET + d * DEVICE_SIZE;
        let field = |offset: usize| u64_at(bytes, base + offset);
        device.peak_bytes = field(std::mem::offset_of!(DeviceCounters, peak_bytes));
        device.cap_failures = field(std::mem::offset_of!(DeviceCounters, cap_failures));
        device.throttled_ns = field(std::mem::offset_of!(DeviceCounters, throttled_ns));
        let at = field(std::mem::offset_of!(DeviceCounters, utilization_unix_ms));
        if at != 0 {
            let centi = field(std::mem::offset_of!(
                DeviceCounters,
                utilization_centi_percent
            ))
            .min(10_000);
            device.utilization = Some((centi as f64 / 10_000.0, at));
        }
    }
    let mut processes = Vec::new();
    for index in 0..SLOTS {
        let base = slot_offset(index);
        if u32_at(bytes, base + std::mem::offset_of!(Slot, in_use)) != 1 || !live(index) {
            continue;
        }
        let used_at = base + std::mem::offset_of!(Slot, used);
        let used: [u64; MAX_DEVICES] = std::array::from_fn(|d| u64_at(bytes, used_at + 8 * d));
        for (device, bytes) in devices.iter_mut().zip(used) {
            device.used_bytes = device.used_bytes.saturating_add(bytes);
        }
        let name_at = base + std::mem::offset_of!(Slot, host_name);
        processes.push(Process {
            slot: index,
            pid: u32_at(bytes, base + std::mem::offset_of!(Slot, pid)),
            host_pid: u32_at(bytes, base + std::mem::offset_of!(Slot, host_pid)),
            flags: u32_at(bytes, base + std::mem::offset_of!(Slot, flags)),
            host_name: host_name(&bytes[name_at..name_at + HOST_NAME_LEN]),
            used,
        });
    }
    Ok(ClaimUsage { devices, processes })
}

/// Reads the accounting file at `path` without writing to it or trusting it: the file lives in
/// a directory the claim's containers can write, so it may be anything.
///
/// It is read with `pread`, not mapped: a container could truncate a mapped file under the
/// reader, and touching the lost pages would kill the reader with SIGBUS. A copy may see one
/// counter mid-update; for metrics that is harmless, and the next scrape sees it whole.
pub fn read(path: &Path) -> Result<ClaimUsage, ReadError> {
    let (file, bytes) = read_bytes(path, &[FILE_SIZE])?;
    parse(&bytes, |index| slot_is_held(&file, index)).map_err(|source| ReadError::Format {
        path: path.into(),
        source,
    })
}

/// What a claim's accounting file holds, whichever library wrote it.
#[derive(Debug, Clone, PartialEq)]
pub enum Usage {
    // Boxed: the other variant is small.
    Vgpu(Box<ClaimUsage>),
    HamiCore(hami::HamiUsage),
}

/// [`read`], and HAMi-core's shared region when HAMi-core's library is mounted instead of ours
/// (it writes the same variable's file).
pub fn read_any(path: &Path) -> Result<Usage, ReadError> {
    let (file, bytes) = read_bytes(path, &[FILE_SIZE, hami::FILE_SIZE])?;
    let format = |source| ReadError::Format {
        path: path.into(),
        source,
    };
    if bytes.len() == hami::FILE_SIZE {
        return hami::parse(&bytes).map(Usage::HamiCore).map_err(format);
    }
    parse(&bytes, |index| slot_is_held(&file, index))
        .map(|u| Usage::Vgpu(Box::new(u)))
        .map_err(format)
}

/// The whole file, when its size is one of `sizes`.
fn read_bytes(path: &Path, sizes: &[usize]) -> Result<(File, Vec<u8>), ReadError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |source| ReadError::Io { path, op, source }
    };
    // O_NOFOLLOW: a symlink planted by a container must not make the plugin read another file;
    // O_NONBLOCK: nor a FIFO make it wait forever.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io("open"))?;
    let meta = file.metadata().map_err(io("stat"))?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular { path: path.into() });
    }
    let format = |source| ReadError::Format {
        path: path.into(),
        source,
    };
    let Some(&size) = sizes.iter().find(|&&s| s as u64 == meta.len()) else {
        return Err(format(FormatError::Size { len: meta.len() }));
    };
    let mut bytes = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        match file.read_at(&mut bytes[filled..], filled as u64) {
            // Truncated since the stat.
            Ok(0) => {
                return Err(format(FormatError::Size { len: filled as u64 }));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("read")(e)),
        }
    }
    Ok((file, bytes))
}

/// Whether some process holds its lock on slot `index`: the library's sign of life. Asking
/// does not need write access. When the kernel cannot tell, the slot counts as live, as the
/// library counts it.
pub fn slot_is_held(file: &File, index: usize) -> bool {
    // SAFETY: flock is plain data; OFD locks need l_pid = 0.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = slot_offset(index) as libc::off_t;
    lock.l_len = SLOT_SIZE as libc::off_t;
    // SAFETY: a valid descriptor and a valid flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    rc != 0 || lock.l_type != libc::F_UNLCK as libc::c_short
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid, empty version-3 file.
    fn empty() -> Vec<u8> {
        let mut bytes = vec![0u8; FILE_SIZE];
        bytes[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&(SLOTS as u32).to_le_bytes());
        bytes
    }

    fn put_u64(bytes: &mut [u8], offset: usize, v: u64) {
        bytes[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn sums_live_slots_and_reads_the_claim_counters() {
        let mut bytes = empty();
        for (slot, mib) in [(0usize, 100u64), (5, 300), (9, 1000)] {
            let base = slot_offset(slot);
            bytes[base..base + 4].copy_from_slice(&1u32.to_le_bytes());
            bytes[base + 4..base + 8].copy_from_slice(&(slot as u32 + 10).to_le_bytes());
            put_u64(&mut bytes, base + 16 + 8 * 2, mib << 20);
            bytes[base + 144..base + 144 + 6].copy_from_slice(b"pod-\x01x");
        }
        let dev2 = DEVICES_OFFSET + 2 * DEVICE_SIZE;
        put_u64(&mut bytes, dev2, 2000 << 20);
        put_u64(&mut bytes, dev2 + 8, 3);
        put_u64(&mut bytes, dev2 + 16, 1_500_000_000);
        put_u64(&mut bytes, dev2 + 24, 4_250);
        put_u64(&mut bytes, dev2 + 32, 1_700_000_000_000);
        // Slot 9's process died without freeing it.
        let usage = parse(&bytes, |slot| slot != 9).unwrap();
        let d = usage.devices[2];
        assert_eq!(d.used_bytes, 400 << 20);
        assert_eq!(d.peak_bytes, 2000 << 20);
        assert_eq!(d.cap_failures, 3);
        assert_eq!(d.throttled_ns, 1_500_000_000);
        assert_eq!(d.utilization, Some((0.425, 1_700_000_000_000)));
        assert_eq!(usage.devices[0], DeviceUsage::default());
        let slots: Vec<_> = usage.processes.iter().map(|p| (p.slot, p.pid)).collect();
        assert_eq!(slots, vec![(0, 10), (5, 15)]);
        assert_eq!(usage.processes[0].host_name, "pod-?x");
    }

    #[test]
    fn other_files_are_refused_for_what_they_are() {
        assert_eq!(
            parse(&[0u8; 100], |_| true),
            Err(FormatError::Size { len: 100 })
        );
        assert_eq!(
            parse(&vec![0u8; FILE_SIZE], |_| true),
            Err(FormatError::Magic)
        );
        let mut v2 = empty();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse(&v2, |_| true), Err(FormatError::Version { found: 2 }));
        let mut slots = empty();
        slots[12..16].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            parse(&slots, |_| true),
            Err(FormatError::Slots { found: 7 })
        );
    }

    #[test]
    fn read_refuses_links_fifos_and_short_files_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.cache");
        std::fs::write(&good, empty()).unwrap();
        let usage = read(&good).unwrap();
        assert!(usage.processes.is_empty());

        let link = dir.path().join("link.cache");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let err = read(&link).unwrap_err();
        assert_eq!(err.reason(), "io", "{err}");

        let fifo = dir.path().join("fifo.cache");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(read(&fifo).unwrap_err().reason(), "not_regular");

        let short = dir.path().join("short.cache");
        std::fs::write(&short, &empty()[..FILE_SIZE - 1]).unwrap();
        let err = read(&short).unwrap_err();
        assert_eq!(err.reason(), "size");
        assert!(err.to_string().contains("short.cache"), "{err}");

        assert_eq!(
            read(&dir.path().join("missing")).unwrap_err().reason(),
            "io"
        );
    }

    #[test]
    fn a_slot_marked_in_use_without_its_lock_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.cache");
        let mut bytes = empty();
        for slot in [1usize, 2] {
            let base = slot_offset(slot);
            bytes[base..base + 4].copy_from_slice(&1u32.to_le_bytes());
            put_u64(&mut bytes, base + 16, 1 << 30);
        }
        std::fs::write(&path, &bytes).unwrap();
        // Slot 2's owner: another open file description holding a read lock on it.
        let owner = std::fs::File::open(&path).unwrap();
        // SAFETY: plain data; a valid descriptor.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_RDLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = slot_offset(2) as libc::off_t;
        lock.l_len = SLOT_SIZE as libc::off_t;
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::fcntl(owner.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) },
            0
        );
        let usage = read(&path).unwrap();
        assert_eq!(usage.devices[0].used_bytes, 1 << 30);
        assert_eq!(usage.processes.len(), 1);
        assert_eq!(usage.processes[0].slot, 2);
        drop(owner);
        assert_eq!(read(&path).unwrap().devices[0].used_bytes, 0);
    }

    #[test]
    fn host_names_round_trip_through_the_slot_words() {
        let slot = Slot {
            in_use: AtomicU32::new(1),
            pid: AtomicU32::new(0),
            host_pid: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            used: Default::default(),
            host_name: Default::default(),
        };
        slot.set_host_name(b"trainer-7d9f");
        // SAFETY: Slot is repr(C) atomics, which have the layout of their integers.
        let raw: &[u8] =
            unsafe { std::slice::from_raw_parts((&slot as *const Slot).cast::<u8>(), SLOT_SIZE) };
        assert_eq!(host_name(&raw[144..144 + HOST_NAME_LEN]), "trainer-7d9f");
        slot.set_host_name(&[b'a'; 100]);
        assert_eq!(
            host_name(&raw[144..144 + HOST_NAME_LEN]).len(),
            HOST_NAME_LEN
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_parsed_or_refused_never_a_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            at in 0usize..FILE_SIZE,
            keep_header in proptest::bool::ANY,
        ) {
            let mut file = if keep_header { empty() } else { vec![0xa5; FILE_SIZE] };
            let end = (at + bytes.len()).min(FILE_SIZE);
            file[at..end].copy_from_slice(&bytes[..end - at]);
            if let Ok(usage) = parse(&file, |_| true) {
                proptest::prop_assert!(usage.processes.len() <= SLOTS);
                for d in usage.devices {
                    if let Some((u, _)) = d.utilization {
                        proptest::prop_assert!((0.0..=1.0).contains(&u));
                    }
                }
            }
            let _ = parse(&file[..at], |_| true);
        }
    }
}
