//! NVML's memory queries tell the same story as cuMemGetInfo, so nvidia-smi and frameworks
//! that read NVML agree with CUDA.

#![allow(non_snake_case)]

use std::ffi::{CStr, c_char, c_uint};

use super::memory::slice_of;
use crate::ffi::*;
use crate::real;
use crate::state;

/// NVML_ERROR_UNINITIALIZED: what NVML itself answers before it is loaded.
const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = 1;

/// The CUDA ordinal of an NVML device: its place in CUDA_VISIBLE_DEVICES, by UUID or index.
fn ordinal(device: nvmlDevice_t) -> Option<usize> {
    let api = &real::nvml()?.api;
    let mut uuid = [0 as c_char; 96];
    let uuid = api.nvmlDeviceGetUUID.and_then(|get| {
        // SAFETY: a buffer of the stated length.
        (unsafe { get(device, uuid.as_mut_ptr(), uuid.len() as c_uint) } == NVML_SUCCESS)
            // SAFETY: NVML NUL-terminates within the buffer on success.
            .then(|| {
                unsafe { CStr::from_ptr(uuid.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            })
    });
    let mut index: c_uint = 0;
    let index = api.nvmlDeviceGetIndex.and_then(|get| {
        // SAFETY: a valid out pointer.
        (unsafe { get(device, &mut index) } == NVML_SUCCESS).then_some(index)
    });
    state::config().ordinal_of(uuid.as_deref(), index)
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    let Some(real) = real::nvml().and_then(|n| n.api.nvmlDeviceGetMemoryInfo) else {
        return NVML_ERROR_UNINITIALIZED;
    };
    let rc = unsafe { real(device, memory) };
    if rc != NVML_SUCCESS || memory.is_null() {
        return rc;
    }
    if let Some((limit, used)) = ordinal(device).and_then(slice_of) {
        // SAFETY: checked non-null and just written by NVML.
        let m = unsafe { &mut *memory };
        m.total = limit.min(m.total);
        m.used = used.min(m.total);
        m.free = m.total - m.used;
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    let Some(real) = real::nvml().and_then(|n| n.api.nvmlDeviceGetMemoryInfo_v2) else {
        return NVML_ERROR_UNINITIALIZED;
    };
    let rc = unsafe { real(device, memory) };
    if rc != NVML_SUCCESS || memory.is_null() {
        return rc;
    }
    if let Some((limit, used)) = ordinal(device).and_then(slice_of) {
        // SAFETY: checked non-null and just written by NVML.
        let m = unsafe { &mut *memory };
        m.total = limit.min(m.total);
        m.reserved = 0;
        m.used = used.min(m.total);
        m.free = m.total - m.used;
    }
    rc
}
