//! The shareable capacities of a GPU.

/// Device memory, in bytes (a Kubernetes quantity).
pub const MEMORY: &str = "memory";
/// Compute, in percent of the GPU: 100 is all of it.
pub const CORES: &str = "cores";
/// The cores capacity of a whole GPU.
pub const FULL_CORES: u8 = 100;

/// Native sharing (DRA consumable capacity, Kubernetes 1.34+): the smallest memory share and its
/// granularity. 256 MiB keeps the scheduler's rounding loss small next to CUDA's own context
/// overhead (~500 MiB per process) while bounding the number of distinct share sizes.
pub const NATIVE_MEMORY_STEP: u64 = 256 << 20;
/// Native sharing: cores shares run from 1 to 100 percent in steps of 1.
pub const NATIVE_CORES_MIN: u8 = 1;

/// A request rounded up as the kube-scheduler applies a `requestPolicy.validRange`
/// (`min`, then `min + k * step`), capped at `max`; `None` when the request exceeds `max`.
pub fn round_up_to_policy(requested: u64, min: u64, step: u64, max: u64) -> Option<u64> {
    let value = if requested <= min {
        min
    } else {
        let over = requested - min;
        let steps = over.div_ceil(step.max(1));
        min.checked_add(steps.checked_mul(step.max(1))?)?
    };
    (value <= max).then_some(value)
}

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
    fn policy_rounding() {
        let step = NATIVE_MEMORY_STEP;
        assert_eq!(round_up_to_policy(1, step, step, 80 << 30), Some(step));
        assert_eq!(
            round_up_to_policy(step + 1, step, step, 80 << 30),
            Some(2 * step)
        );
        assert_eq!(
            round_up_to_policy(4 << 30, step, step, 80 << 30),
            Some(4 << 30)
        );
        assert_eq!(round_up_to_policy(81 << 30, step, step, 80 << 30), None);
        assert_eq!(round_up_to_policy(30, 1, 1, 100), Some(30));
    }

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
