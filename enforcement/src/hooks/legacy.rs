//! The CUDA 2.x entry points (32-bit sizes and pointers) that the driver still exports under
//! the base names: `cuMemAlloc`, `cuMemAllocPitch`, `cuArrayCreate`, ... An application reaches
//! them by linking against an old import, by `dlsym(handle, "cuMemAlloc")`, or by
//! `cuGetProcAddress("cuMemAlloc", ..., version < 3020)`. They allocate the same device memory
//! as their `_v2` successors and are charged and refunded the same way.

#![allow(non_snake_case)]

use std::ffi::c_uint;

use super::memory::{array_bytes, slice_of};
use super::{charged, real_or_fail, refunded};
use crate::ffi::*;
use crate::ledger::Kind;
use crate::state;

/// cuMemAllocPitch pads rows to the device's pitch alignment, at most this many bytes.
const PITCH_ALIGNMENT: u64 = 512;

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAlloc(dptr: *mut CUdeviceptr_v1, bytesize: c_uint) -> CUresult {
    let real = real_or_fail!(cuMemAlloc);
    charged(
        None,
        u64::from(bytesize),
        Kind::Pointer,
        // SAFETY: the caller's arguments, passed on unchanged.
        || unsafe { real(dptr, bytesize) },
        // SAFETY: on success the driver wrote the pointer.
        || u64::from(unsafe { *dptr }),
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocPitch(
    dptr: *mut CUdeviceptr_v1,
    pitch: *mut c_uint,
    width: c_uint,
    height: c_uint,
    element_size: c_uint,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocPitch);
    let bytes = u64::from(width)
        .div_ceil(PITCH_ALIGNMENT)
        .saturating_mul(PITCH_ALIGNMENT)
        .saturating_mul(u64::from(height));
    charged(
        None,
        bytes,
        Kind::Pointer,
        || unsafe { real(dptr, pitch, width, height, element_size) },
        || u64::from(unsafe { *dptr }),
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemFree(dptr: CUdeviceptr_v1) -> CUresult {
    let real = real_or_fail!(cuMemFree);
    refunded(Kind::Pointer, u64::from(dptr), || unsafe { real(dptr) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuArrayCreate(
    array: *mut CUarray,
    desc: *const CUDA_ARRAY_DESCRIPTOR_v1,
) -> CUresult {
    let real = real_or_fail!(cuArrayCreate);
    // SAFETY: the caller's descriptor, or null (which the driver rejects).
    let Some(d) = (unsafe { desc.as_ref() }) else {
        return unsafe { real(array, desc) };
    };
    let bytes = array_bytes(
        [u64::from(d.width), u64::from(d.height), 1],
        d.num_channels,
        d.format,
        1,
    );
    charged(
        None,
        bytes,
        Kind::Array,
        || unsafe { real(array, desc) },
        || unsafe { *array as u64 },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuArray3DCreate(
    array: *mut CUarray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR_v1,
) -> CUresult {
    let real = real_or_fail!(cuArray3DCreate);
    let Some(d) = (unsafe { desc.as_ref() }) else {
        return unsafe { real(array, desc) };
    };
    let bytes = array_bytes(
        [u64::from(d.width), u64::from(d.height), u64::from(d.depth)],
        d.num_channels,
        d.format,
        1,
    );
    charged(
        None,
        bytes,
        Kind::Array,
        || unsafe { real(array, desc) },
        || unsafe { *array as u64 },
    )
}

/// As cuMemGetInfo_v2, in 32 bits.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemGetInfo(free: *mut c_uint, total: *mut c_uint) -> CUresult {
    let real = real_or_fail!(cuMemGetInfo);
    let rc = unsafe { real(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    if let Some((limit, used)) = state::current_device().and_then(slice_of) {
        // SAFETY: both pointers were checked and the driver just wrote them.
        unsafe {
            let limit = limit.min(u64::from(*total));
            *total = limit as c_uint;
            *free = (limit.saturating_sub(used)).min(u64::from(*free)) as c_uint;
        }
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuDeviceTotalMem(bytes: *mut c_uint, device: CUdevice) -> CUresult {
    let real = real_or_fail!(cuDeviceTotalMem);
    let rc = unsafe { real(bytes, device) };
    if rc == CUDA_SUCCESS
        && !bytes.is_null()
        && device >= 0
        && let Some((limit, _)) = slice_of(device as usize)
    {
        // SAFETY: checked non-null and just written by the driver.
        unsafe { *bytes = limit.min(u64::from(*bytes)) as c_uint };
    }
    rc
}
