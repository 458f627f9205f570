//! Launch hooks (the compute throttle) and context-creation hooks (where a process learns its
//! host PID, which the throttle needs to find its own utilization).

#![allow(non_snake_case)]

use std::ffi::{c_uint, c_void};

use super::real_or_fail;
use crate::ffi::*;
use crate::state;
use crate::throttle::launch_cost;

type Params = *mut *mut c_void;

/// Waits for the claim's share before a launch of `grid` blocks; free when nothing throttles.
#[inline]
fn admit(grid: [c_uint; 3]) {
    let Some(compute) = state::enforcer().and_then(|e| e.compute.as_ref()) else {
        return;
    };
    if let Some(device) = state::current_device() {
        compute.admit(device, launch_cost(grid));
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: CUstream,
    params: Params,
    extra: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchKernel);
    admit([gx, gy, gz]);
    unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: CUstream,
    params: Params,
    extra: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchKernel_ptsz);
    admit([gx, gy, gz]);
    unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfigHead,
    f: CUfunction,
    params: Params,
    extra: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchKernelEx);
    // SAFETY: the caller's launch configuration, or null (which the driver rejects).
    if let Some(c) = unsafe { config.as_ref() } {
        admit(c.grid_dim);
    }
    unsafe { real(config, f, params, extra) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfigHead,
    f: CUfunction,
    params: Params,
    extra: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchKernelEx_ptsz);
    if let Some(c) = unsafe { config.as_ref() } {
        admit(c.grid_dim);
    }
    unsafe { real(config, f, params, extra) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: CUstream,
    params: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchCooperativeKernel);
    admit([gx, gy, gz]);
    unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: CUstream,
    params: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchCooperativeKernel_ptsz);
    admit([gx, gy, gz]);
    unsafe { real(f, gx, gy, gz, bx, by, bz, shared, stream, params) }
}

/// A graph's kernels are not visible at launch: it costs one block, and the feedback loop
/// prices it by the utilization it causes.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGraphLaunch(graph: CUgraphExec, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuGraphLaunch);
    admit([1, 1, 1]);
    unsafe { real(graph, stream) }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(graph: CUgraphExec, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuGraphLaunch_ptsz);
    admit([1, 1, 1]);
    unsafe { real(graph, stream) }
}

fn around_context_creation(device: CUdevice, create: impl FnOnce() -> CUresult) -> CUresult {
    match state::enforcer().and_then(|e| e.compute.as_ref()) {
        Some(compute) if device >= 0 => compute.around_context_creation(device as usize, create),
        _ => create(),
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(
    ctx: *mut CUcontext,
    device: CUdevice,
) -> CUresult {
    let real = real_or_fail!(cuDevicePrimaryCtxRetain);
    around_context_creation(device, || unsafe { real(ctx, device) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuCtxCreate_v2(
    ctx: *mut CUcontext,
    flags: c_uint,
    device: CUdevice,
) -> CUresult {
    let real = real_or_fail!(cuCtxCreate_v2);
    around_context_creation(device, || unsafe { real(ctx, flags, device) })
}
