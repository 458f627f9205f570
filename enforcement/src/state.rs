//! The process-wide state: the configuration (read once) and the enforcer built from it on the
//! first hooked call.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};

use crate::compute::Compute;
use crate::config::Config;
use crate::ffi::CUdevice;
use crate::ledger::Ledger;
use crate::real;
use crate::report;
use crate::shared::{Accounting, LocalCounters, OverLimit, SharedRegion};

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The enforcer of this process, built on first use; a forked child builds its own (see
/// `enforcer`). Never freed: hooks on other threads may hold references to it.
static CURRENT: AtomicPtr<Built> = AtomicPtr::new(std::ptr::null_mut());
/// Bumped in a forked child, by the pthread_atfork handler.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
/// Held while an enforcer is built (a spin lock: a std Mutex held by another thread at fork
/// time would stay locked forever in the child; this one the child handler resets).
static BUILDING: AtomicBool = AtomicBool::new(false);
static AT_FORK: Once = Once::new();

struct Built {
    generation: u64,
    enforcer: Option<Enforcer>,
}

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
///
/// A child made by `fork` inherits its parent's enforcer, with the parent's slot in the shared
/// file, its open file description (so its locks: the child's "exclusive" lock would not
/// exclude the parent's) and its ledger. So the child counts as a process of its own: the
/// atfork handler lets go of the inherited file (unmap, close: async-signal-safe, and the
/// parent keeps its own) and bumps the generation; the next hook in the child builds a fresh
/// enforcer, with a slot, a lock and a ledger of its own, and a throttle watcher (threads do
/// not survive fork). When the child dies, its slot's lock goes with it and its charges are
/// reclaimed like any dead process's.
#[inline]
pub fn enforcer() -> Option<&'static Enforcer> {
    let current = CURRENT.load(Ordering::Acquire);
    if !current.is_null() {
        // SAFETY: CURRENT only ever holds leaked, never-freed Builts.
        let built = unsafe { &*current };
        if built.generation == FORK_GENERATION.load(Ordering::Acquire) {
            return built.enforcer.as_ref();
        }
    }
    rebuild()
}

#[cold]
fn rebuild() -> Option<&'static Enforcer> {
    while BUILDING
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::yield_now();
    }
    let generation = FORK_GENERATION.load(Ordering::Acquire);
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: as in `enforcer`.
    let built: &'static Built = match unsafe { current.as_ref() } {
        Some(built) if built.generation == generation => built,
        _ => {
            AT_FORK.call_once(|| {
                // SAFETY: registers a handler that only touches atomics, munmap and close.
                unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) };
            });
            let built = Box::leak(Box::new(Built {
                generation,
                enforcer: build(),
            }));
            CURRENT.store(built, Ordering::Release);
            built
        }
    };
    BUILDING.store(false, Ordering::Release);
    built.enforcer.as_ref()
}

/// pthread_atfork's child handler: async-signal-safe work only.
extern "C" fn in_forked_child() {
    let current = CURRENT.load(Ordering::Acquire);
    let generation = FORK_GENERATION.load(Ordering::Acquire);
    // SAFETY: as in `enforcer`; only the forking thread exists in the child. An enforcer of an
    // older generation was let go of already (a child forking before it used the library):
    // its descriptor number and addresses may belong to something else by now.
    if let Some(region) = unsafe { current.as_ref() }
        .filter(|b| b.generation == generation)
        .and_then(|b| b.enforcer.as_ref())
        .and_then(Enforcer::shared_region)
    {
        region.let_go_in_child();
    }
    FORK_GENERATION.fetch_add(1, Ordering::AcqRel);
    BUILDING.store(false, Ordering::Release);
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
