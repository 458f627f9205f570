//! Launch hooks (the compute throttle) and context-creation hooks (where a process learns its
//! host PID, which the throttle needs to find its own utilization).

#![allow(non_snake_case)]

use std::ffi::{c_uint, c_void};

use super::real_or_fail;
use crate::ffi::*;
use crate::state;

type Params = *mut *mut c_void;

/// Graphs and kernels are timed apart (a graph handle could equal a function pointer).
const GRAPH: u64 = 1 << 63;

/// Runs `launch` once the claim's share allows it; a plain call when nothing throttles.
/// `ptsz`: the per-thread-default-stream variant, whose null stream is the thread's own.
#[inline]
fn throttled(
    key: u64,
    stream: CUstream,
    ptsz: bool,
    launch: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(compute) = state::enforcer().and_then(|e| e.compute.as_ref()) else {
        return launch();
    };
    let Some(device) = state::current_device() else {
        return launch();
    };
    let stream = if stream.is_null() && ptsz {
        CU_STREAM_PER_THREAD
    } else {
        stream
    };
    compute.launch(device, key, stream, launch)
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
    throttled(f as u64, stream, false, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
    })
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
    throttled(f as u64, stream, true, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
    })
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
    let stream = unsafe { config.as_ref() }.map_or(std::ptr::null_mut(), |c| c.stream);
    throttled(f as u64, stream, false, || unsafe {
        real(config, f, params, extra)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfigHead,
    f: CUfunction,
    params: Params,
    extra: Params,
) -> CUresult {
    let real = real_or_fail!(cuLaunchKernelEx_ptsz);
    let stream = unsafe { config.as_ref() }.map_or(std::ptr::null_mut(), |c| c.stream);
    throttled(f as u64, stream, true, || unsafe {
        real(config, f, params, extra)
    })
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
    throttled(f as u64, stream, false, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shared, stream, params)
    })
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
    throttled(f as u64, stream, true, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shared, stream, params)
    })
}

/// A graph costs the GPU time it was measured to take, like a kernel: a long graph pays for
/// its whole run.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGraphLaunch(graph: CUgraphExec, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuGraphLaunch);
    throttled(graph as u64 | GRAPH, stream, false, || unsafe {
        real(graph, stream)
    })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGraphLaunch_ptsz(graph: CUgraphExec, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuGraphLaunch_ptsz);
    throttled(graph as u64 | GRAPH, stream, true, || unsafe {
        real(graph, stream)
    })
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
