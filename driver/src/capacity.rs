//! The shareable capacities of a GPU.

/// Device memory, in bytes (a Kubernetes quantity).
pub const MEMORY: &str = "memory";
/// Compute, in percent of the GPU: 100 is all of it.
pub const CORES: &str = "cores";
/// The cores capacity of a whole GPU.
pub const FULL_CORES: u8 = 100;

/// What a GPU offers, or what is taken of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capacity {
    pub memory_bytes: u64,
    /// 0–100 for one GPU.
    pub cores: u32,
}

impl Capacity {
    pub const fn whole_gpu(memory_bytes: u64) -> Self {
        Capacity {
            memory_bytes,
            cores: FULL_CORES as u32,
        }
    }

    /// Whether `other` more fits within `self` given `used` already taken.
    pub fn fits(&self, used: &Capacity, other: &Capacity) -> bool {
        used.memory_bytes
            .checked_add(other.memory_bytes)
            .is_some_and(|m| m <= self.memory_bytes)
            && used.cores + other.cores <= self.cores
    }

    pub fn saturating_add(&self, other: &Capacity) -> Capacity {
        Capacity {
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            cores: self.cores.saturating_add(other.cores),
        }
    }

    pub fn saturating_sub(&self, other: &Capacity) -> Capacity {
        Capacity {
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            cores: self.cores.saturating_sub(other.cores),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_checks_both_dimensions() {
        let gpu = Capacity::whole_gpu(80);
        let used = Capacity {
            memory_bytes: 60,
            cores: 70,
        };
        assert!(gpu.fits(
            &used,
            &Capacity {
                memory_bytes: 20,
                cores: 30
            }
        ));
        assert!(!gpu.fits(
            &used,
            &Capacity {
                memory_bytes: 21,
                cores: 0
            }
        ));
        assert!(!gpu.fits(
            &used,
            &Capacity {
                memory_bytes: 0,
                cores: 31
            }
        ));
        assert!(!gpu.fits(
            &used,
            &Capacity {
                memory_bytes: u64::MAX,
                cores: 0
            }
        ));
    }
}
