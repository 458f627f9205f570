//! The exported functions that stand in for libcuda's and libnvidia-ml's.
//!
//! A process reaches them three ways, and each is covered: by linking (this library is
//! preloaded, so its definitions come first), by `dlsym` on a libcuda handle (`dlsym.rs`), and
//! by `cuGetProcAddress`, which CUDA 12 runtimes use for everything (`procaddr.rs`).
//!
//! Every hook holds to the same rules: it never calls an exported CUDA symbol (only the real
//! pointers), takes no lock that a callee could want, and when anything is off it passes the
//! call through.

use std::ffi::{CStr, c_void};

use crate::ffi::{CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS, CUresult};
use crate::ledger::{Charge, Kind};
use crate::state;

pub mod launch;
pub mod legacy;
pub mod memory;
pub mod nvml;
pub mod procaddr;

/// Every name a hook is exported under.
pub const HOOKED: &[&CStr] = &[
    c"cuGetProcAddress",
    c"cuGetProcAddress_v2",
    c"cuMemAlloc_v2",
    c"cuMemAllocPitch_v2",
    c"cuMemAllocManaged",
    c"cuMemAllocAsync",
    c"cuMemAllocAsync_ptsz",
    c"cuMemAllocFromPoolAsync",
    c"cuMemAllocFromPoolAsync_ptsz",
    c"cuMemFree_v2",
    c"cuMemFreeAsync",
    c"cuMemFreeAsync_ptsz",
    c"cuMemCreate",
    c"cuMemRelease",
    c"cuMemMap",
    c"cuMemUnmap",
    c"cuMemRetainAllocationHandle",
    c"cuArrayCreate_v2",
    c"cuArray3DCreate_v2",
    c"cuArrayDestroy",
    c"cuMemGetInfo_v2",
    c"cuDeviceTotalMem_v2",
    c"cuMemAlloc",
    c"cuMemAllocPitch",
    c"cuMemFree",
    c"cuArrayCreate",
    c"cuArray3DCreate",
    c"cuMemGetInfo",
    c"cuDeviceTotalMem",
    c"cuMipmappedArrayCreate",
    c"cuMipmappedArrayDestroy",
    c"cuLaunchKernel",
    c"cuLaunchKernel_ptsz",
    c"cuLaunchKernelEx",
    c"cuLaunchKernelEx_ptsz",
    c"cuLaunchCooperativeKernel",
    c"cuLaunchCooperativeKernel_ptsz",
    c"cuGraphLaunch",
    c"cuGraphLaunch_ptsz",
    c"cuDevicePrimaryCtxRetain",
    c"cuCtxCreate_v2",
    c"nvmlDeviceGetMemoryInfo",
    c"nvmlDeviceGetMemoryInfo_v2",
];

macro_rules! hooks {
    ($name:expr, { $($module:ident :: $f:ident),* $(,)? }) => {
        match $name {
            $(n if n == stringify!($f).as_bytes() => Some($module::$f as *const () as *mut c_void),)*
            _ => None,
        }
    };
}

/// The hook exported as `name`.
pub fn hook_for(name: &[u8]) -> Option<*mut c_void> {
    hooks!(name, {
        procaddr::cuGetProcAddress,
        procaddr::cuGetProcAddress_v2,
        memory::cuMemAlloc_v2,
        memory::cuMemAllocPitch_v2,
        memory::cuMemAllocManaged,
        memory::cuMemAllocAsync,
        memory::cuMemAllocAsync_ptsz,
        memory::cuMemAllocFromPoolAsync,
        memory::cuMemAllocFromPoolAsync_ptsz,
        memory::cuMemFree_v2,
        memory::cuMemFreeAsync,
        memory::cuMemFreeAsync_ptsz,
        memory::cuMemCreate,
        memory::cuMemRelease,
        memory::cuMemMap,
        memory::cuMemUnmap,
        memory::cuMemRetainAllocationHandle,
        memory::cuArrayCreate_v2,
        memory::cuArray3DCreate_v2,
        memory::cuArrayDestroy,
        memory::cuMemGetInfo_v2,
        memory::cuDeviceTotalMem_v2,
        legacy::cuMemAlloc,
        legacy::cuMemAllocPitch,
        legacy::cuMemFree,
        legacy::cuArrayCreate,
        legacy::cuArray3DCreate,
        legacy::cuMemGetInfo,
        legacy::cuDeviceTotalMem,
        memory::cuMipmappedArrayCreate,
        memory::cuMipmappedArrayDestroy,
        launch::cuLaunchKernel,
        launch::cuLaunchKernel_ptsz,
        launch::cuLaunchKernelEx,
        launch::cuLaunchKernelEx_ptsz,
        launch::cuLaunchCooperativeKernel,
        launch::cuLaunchCooperativeKernel_ptsz,
        launch::cuGraphLaunch,
        launch::cuGraphLaunch_ptsz,
        launch::cuDevicePrimaryCtxRetain,
        launch::cuCtxCreate_v2,
        nvml::nvmlDeviceGetMemoryInfo,
        nvml::nvmlDeviceGetMemoryInfo_v2,
    })
}

/// Charges `bytes` on `device` (the current context's when `None`) before `allocate` runs,
/// refunds them if it fails, and records the allocation under the key `key` reads afterwards.
pub(crate) fn charged(
    device: Option<usize>,
    bytes: u64,
    kind: Kind,
    allocate: impl FnOnce() -> CUresult,
    key: impl FnOnce() -> u64,
) -> CUresult {
    let Some(enforcer) = state::enforcer() else {
        return allocate();
    };
    let Some(accounting) = &enforcer.accounting else {
        return allocate();
    };
    let Some(device) = device.or_else(state::current_device) else {
        return allocate();
    };
    let Some(limit) = enforcer.config.memory_limit(device) else {
        return allocate();
    };
    if let Err(over) = accounting.reserve(device, bytes, limit) {
        enforcer.report_oom(device, over);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let rc = allocate();
    if rc == CUDA_SUCCESS {
        let charge = Charge { device, bytes };
        if let Some(stale) = enforcer.ledger.insert(kind, key(), charge) {
            // The driver reused a key we never saw freed: give the stale charge back.
            accounting.release(stale.device, stale.bytes);
        }
    } else {
        accounting.release(device, bytes);
    }
    rc
}

/// Runs `free` and gives back what the allocation under `key` was charged, if it succeeds.
pub(crate) fn refunded(kind: Kind, key: u64, free: impl FnOnce() -> CUresult) -> CUresult {
    let Some(enforcer) = state::enforcer() else {
        return free();
    };
    let Some(accounting) = &enforcer.accounting else {
        return free();
    };
    // Out of the ledger before the driver can hand the key to another thread's allocation.
    // A VMM handle that is still mapped or retained keeps its charge (`last` is None).
    let last = enforcer.ledger.remove(kind, key);
    let rc = free();
    if rc == CUDA_SUCCESS {
        if let Some(charge) = last {
            accounting.release(charge.device, charge.bytes);
        }
    } else {
        enforcer.ledger.restore(kind, key, last);
    }
    rc
}

/// Runs `unmap` of `[start, start + size)` and gives back the charges of the VMM allocations
/// whose last reference was one of its mappings.
pub(crate) fn unmapped(start: u64, size: u64, unmap: impl FnOnce() -> CUresult) -> CUresult {
    let Some(enforcer) = state::enforcer() else {
        return unmap();
    };
    let Some(accounting) = &enforcer.accounting else {
        return unmap();
    };
    let taken = enforcer.ledger.take_mappings(start, size);
    let rc = unmap();
    if rc == CUDA_SUCCESS {
        for charge in enforcer.ledger.unmapped(&taken) {
            accounting.release(charge.device, charge.bytes);
        }
    } else {
        enforcer.ledger.remap(taken);
    }
    rc
}

/// The ledger, when memory is being counted.
pub(crate) fn ledger() -> Option<&'static crate::ledger::Ledger> {
    let enforcer = state::enforcer()?;
    enforcer.accounting.as_ref()?;
    Some(&enforcer.ledger)
}

/// The real function, or an early return of CUDA_ERROR_NOT_INITIALIZED when libcuda lacks it.
macro_rules! real_or_fail {
    ($f:ident) => {
        match crate::real::cuda().and_then(|c| c.api.$f) {
            Some(f) => f,
            None => return crate::hooks::not_initialized(stringify!($f)),
        }
    };
}
pub(crate) use real_or_fail;

pub(crate) fn not_initialized(name: &str) -> CUresult {
    crate::report::once("missing-symbol", &format!("libcuda has no {name}"));
    CUDA_ERROR_NOT_INITIALIZED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hooked_name_has_a_hook_and_only_those() {
        for name in HOOKED {
            assert!(hook_for(name.to_bytes()).is_some(), "{name:?}");
        }
        assert!(hook_for(b"cuMemAlloc_v3").is_none());
        assert!(hook_for(b"cuInit").is_none());
        assert!(hook_for(b"").is_none());
    }
}
