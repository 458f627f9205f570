//! cuGetProcAddress: CUDA 12 runtimes (and PyTorch through them) fetch every driver function
//! here, never by name from the library. Whatever version of a symbol the driver resolves,
//! its pointer is compared with the real functions the library hooks and swapped for the hook.

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_void};

use super::real_or_fail;
use crate::ffi::*;
use crate::real;
use crate::state;

unsafe fn swap(pfn: *mut *mut c_void) {
    if pfn.is_null() || !state::interposing() {
        return;
    }
    // SAFETY: the driver just wrote it; the caller owns the slot.
    let found = unsafe { *pfn };
    if let Some(hook) = real::cuda().and_then(|c| c.hook_for_real(found)) {
        unsafe { *pfn = hook };
    }
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    let real = real_or_fail!(cuGetProcAddress);
    let rc = unsafe { real(symbol, pfn, version, flags) };
    if rc == CUDA_SUCCESS {
        unsafe { swap(pfn) };
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    let real = real_or_fail!(cuGetProcAddress_v2);
    let rc = unsafe { real(symbol, pfn, version, flags, status) };
    if rc == CUDA_SUCCESS {
        unsafe { swap(pfn) };
    }
    rc
}
