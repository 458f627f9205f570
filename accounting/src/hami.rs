//! HAMi-core's shared region (`shared_region_t` of its
//! `src/multiprocess/multiprocess_memory_limit.h`, version 1.2), for the per-GPU totals the
//! plugin can show when HAMi-core's `libvgpu.so` is mounted instead of ours.
//!
//! What is read, per CUDA device `i < device_num`: `uuids[i]`, `limit[i]`, `sm_limit[i]`, and
//! `procs[p].used[i].total` summed over the slots `p < proc_num` whose `pid` is not 0. HAMi-core
//! keeps no peak, no count of refusals and no throttled time, so those metrics are absent for
//! its claims. The offsets are those of the C struct on x86-64 and arm64 Linux (glibc's
//! `sem_t` is 32 bytes on both), as a C compiler lays it out.

use crate::FormatError;

/// `MULTIPROCESS_SHARED_REGION_MAGIC_FLAG`, in `initialized_flag`.
pub const MAGIC: i32 = 19920718;
pub const MAJOR_VERSION: u32 = 1;
pub const MINOR_VERSION: u32 = 2;
/// `sizeof(shared_region_t)`: HAMi-core sizes the file to it.
pub const FILE_SIZE: usize = 2_008_952;
const MAX_DEVICES: usize = 16;
const MAX_PROCS: usize = 1024;
const DEVICE_NUM: usize = 56;
const UUIDS: usize = 64;
const UUID_LEN: usize = 96;
const LIMIT: usize = 1600;
const SM_LIMIT: usize = 1728;
const PROCS: usize = 1856;
const PROC_SIZE: usize = 1960;
/// In a slot: `used[16]` of `device_memory_t` (8 × u64), whose `total` is the 5th.
const PROC_USED: usize = 8;
const DEVICE_MEMORY_SIZE: usize = 64;
const DEVICE_MEMORY_TOTAL: usize = 32;
const PROC_NUM: usize = PROCS + MAX_PROCS * PROC_SIZE;

const _: () = assert!(PROC_NUM + 56 == FILE_SIZE);

/// One CUDA device of a HAMi-core region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HamiDevice {
    /// As HAMi-core wrote it (the GPU's UUID).
    pub uuid: String,
    pub used_bytes: u64,
    pub limit_bytes: u64,
    /// Percent; 0: not throttled.
    pub sm_limit: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HamiUsage {
    /// CUDA device order.
    pub devices: Vec<HamiDevice>,
    /// Slots with a process.
    pub processes: usize,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes a region of exactly [`FILE_SIZE`] bytes. Never panics.
pub fn parse(bytes: &[u8]) -> Result<HamiUsage, FormatError> {
    if bytes.len() != FILE_SIZE {
        return Err(FormatError::Size {
            len: bytes.len() as u64,
        });
    }
    if u32_at(bytes, 0) as i32 != MAGIC {
        return Err(FormatError::Magic);
    }
    let (major, minor) = (u32_at(bytes, 4), u32_at(bytes, 8));
    if (major, minor) != (MAJOR_VERSION, MINOR_VERSION) {
        return Err(FormatError::HamiVersion { major, minor });
    }
    let device_num = (u64_at(bytes, DEVICE_NUM) as usize).min(MAX_DEVICES);
    let proc_num = (u32_at(bytes, PROC_NUM) as usize).min(MAX_PROCS);
    let live: Vec<usize> = (0..proc_num)
        .map(|p| PROCS + p * PROC_SIZE)
        .filter(|&slot| u32_at(bytes, slot) != 0)
        .collect();
    let devices = (0..device_num)
        .map(|d| {
            let uuid = &bytes[UUIDS + d * UUID_LEN..UUIDS + (d + 1) * UUID_LEN];
            HamiDevice {
                uuid: uuid
                    .iter()
                    .take_while(|&&b| b != 0)
                    .map(|&b| {
                        if b.is_ascii_graphic() {
                            char::from(b)
                        } else {
                            '?'
                        }
                    })
                    .collect(),
                used_bytes: live.iter().fold(0u64, |sum, &slot| {
                    let at = slot + PROC_USED + d * DEVICE_MEMORY_SIZE + DEVICE_MEMORY_TOTAL;
                    sum.saturating_add(u64_at(bytes, at))
                }),
                limit_bytes: u64_at(bytes, LIMIT + 8 * d),
                sm_limit: u64_at(bytes, SM_LIMIT + 8 * d),
            }
        })
        .collect();
    Ok(HamiUsage {
        devices,
        processes: live.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region as HAMi-core 1.2 leaves it: two devices, three slots of which one is free.
    fn region() -> Vec<u8> {
        let mut b = vec![0u8; FILE_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[DEVICE_NUM..DEVICE_NUM + 8].copy_from_slice(&2u64.to_le_bytes());
        b[UUIDS..UUIDS + 8].copy_from_slice(b"GPU-aaaa");
        b[UUIDS + UUID_LEN..UUIDS + UUID_LEN + 8].copy_from_slice(b"GPU-bbbb");
        b[LIMIT + 8..LIMIT + 16].copy_from_slice(&(2u64 << 30).to_le_bytes());
        b[SM_LIMIT + 8..SM_LIMIT + 16].copy_from_slice(&30u64.to_le_bytes());
        b[PROC_NUM..PROC_NUM + 4].copy_from_slice(&3u32.to_le_bytes());
        for (p, pid, mib) in [(0usize, 41u32, 100u64), (1, 0, 999), (2, 43, 300)] {
            let slot = PROCS + p * PROC_SIZE;
            b[slot..slot + 4].copy_from_slice(&pid.to_le_bytes());
            let at = slot + PROC_USED + DEVICE_MEMORY_SIZE + DEVICE_MEMORY_TOTAL;
            b[at..at + 8].copy_from_slice(&(mib << 20).to_le_bytes());
        }
        b
    }

    #[test]
    fn per_device_totals_of_the_live_slots() {
        let usage = parse(&region()).unwrap();
        assert_eq!(usage.processes, 2);
        assert_eq!(
            usage.devices,
            vec![
                HamiDevice {
                    uuid: "GPU-aaaa".into(),
                    used_bytes: 0,
                    limit_bytes: 0,
                    sm_limit: 0,
                },
                HamiDevice {
                    uuid: "GPU-bbbb".into(),
                    used_bytes: 400 << 20,
                    limit_bytes: 2 << 30,
                    sm_limit: 30,
                },
            ]
        );
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut old = region();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse(&old),
            Err(FormatError::HamiVersion { major: 1, minor: 1 })
        );
        assert_eq!(parse(&vec![0u8; FILE_SIZE]), Err(FormatError::Magic));
        assert_eq!(parse(&[0u8; 8]), Err(FormatError::Size { len: 8 }));
        // Counts past the arrays are clamped, not followed.
        let mut wild = region();
        wild[DEVICE_NUM..DEVICE_NUM + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        wild[PROC_NUM..PROC_NUM + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let usage = parse(&wild).unwrap();
        assert_eq!(usage.devices.len(), MAX_DEVICES);
    }

    #[test]
    fn read_any_tells_the_two_libraries_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.cache");
        std::fs::write(&path, region()).unwrap();
        match crate::read_any(&path).unwrap() {
            crate::Usage::HamiCore(usage) => assert_eq!(usage.processes, 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(crate::read(&path).unwrap_err().reason(), "size");
    }
}
