//! The process-wide state: the configuration (read once) and the enforcer built from it on the
//! first hooked call.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::compute::Compute;
use crate::config::Config;
use crate::ffi::CUdevice;
use crate::ledger::Ledger;
use crate::real;
use crate::report;
use crate::shared::{Accounting, LocalCounters, OverLimit, SharedRegion};

static CONFIG: OnceLock<Config> = OnceLock::new();
static ENFORCER: OnceLock<Option<Enforcer>> = OnceLock::new();

pub fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let config = Config::from_env();
        for problem in &config.problems {
            report::say(&problem.to_string());
        }
        if config.disabled {
            report::say("CUDA_DISABLE_CONTROL is set: no limits are enforced in this process");
        }
        config
    })
}

/// Whether hooks should be handed out at all.
pub fn interposing() -> bool {
    !config().disabled
}

pub struct Enforcer {
    pub config: &'static Config,
    /// `None` when no device has a memory limit.
    pub accounting: Option<Accounting>,
    pub ledger: Ledger,
    /// `None` when nothing is throttled.
    pub compute: Option<Compute>,
    ooms: AtomicU64,
}

/// The enforcer, or `None` when enforcement is off or there is nothing to enforce.
pub fn enforcer() -> Option<&'static Enforcer> {
    ENFORCER.get_or_init(build).as_ref()
}

fn build() -> Option<Enforcer> {
    let config = config();
    if config.disabled {
        return None;
    }
    let accounting =
        config
            .limits_memory()
            .then(|| match SharedRegion::open(&config.shared_cache) {
                Ok(region) => Accounting::Shared(region),
                Err(err) => {
                    report::say(&format!(
                        "{err}; counting this process's memory alone, so the claim's processes \
                     together may pass the limit"
                    ));
                    Accounting::Local(LocalCounters::default())
                }
            });
    let compute = config
        .throttles()
        .then(|| Compute::new(|device| config.sm_limit(device)));
    if accounting.is_none() && compute.is_none() {
        return None;
    }
    Some(Enforcer {
        config,
        accounting,
        ledger: Ledger::default(),
        compute,
        ooms: AtomicU64::new(0),
    })
}

impl Enforcer {
    /// Says why an allocation failed: the first time, then at every power of two, since
    /// frameworks retry after emptying their caches.
    pub fn report_oom(&self, device: usize, over: OverLimit) {
        let n = self.ooms.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            report::say(&format!(
                "device {device}: out of memory: {} MiB requested, {} MiB of the limit {} MiB in \
                 use by this claim ({n} refusals so far)",
                over.requested >> 20,
                over.used >> 20,
                over.limit >> 20
            ));
        }
    }

    pub fn shared_region(&self) -> Option<&SharedRegion> {
        match &self.accounting {
            Some(Accounting::Shared(region)) => Some(region),
            _ => None,
        }
    }
}

/// The device of the calling thread's current context.
pub fn current_device() -> Option<usize> {
    let get = real::cuda()?.api.cuCtxGetDevice?;
    let mut device: CUdevice = -1;
    // SAFETY: a valid out pointer.
    let rc = unsafe { get(&mut device) };
    (rc == 0 && device >= 0).then_some(device as usize)
}
