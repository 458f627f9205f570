//! Allocation, free and memory-information hooks.

#![allow(non_snake_case)]

use std::ffi::c_uint;

use super::{charged, ledger, real_or_fail, refunded, unmapped};
use crate::ffi::*;
use crate::ledger::Kind;
use crate::state;

/// cuMemAllocPitch pads rows to the device's pitch alignment, at most this many bytes.
const PITCH_ALIGNMENT: usize = 512;

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    let real = real_or_fail!(cuMemAlloc_v2);
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        // SAFETY: the caller's arguments, passed on unchanged.
        || unsafe { real(dptr, bytesize) },
        // SAFETY: on success the driver wrote the pointer.
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_size: c_uint,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocPitch_v2);
    // Charged at the largest pitch the driver may choose, before it chooses.
    let bytes = width
        .div_ceil(PITCH_ALIGNMENT)
        .saturating_mul(PITCH_ALIGNMENT)
        .saturating_mul(height) as u64;
    charged(
        None,
        bytes,
        Kind::Pointer,
        || unsafe { real(dptr, pitch, width, height, element_size) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocManaged);
    // Managed memory can migrate to the host, but it may all be resident on the device: it
    // counts, as in HAMi-core.
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        || unsafe { real(dptr, bytesize, flags) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocAsync);
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        || unsafe { real(dptr, bytesize, stream) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocAsync_ptsz);
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        || unsafe { real(dptr, bytesize, stream) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocFromPoolAsync);
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        || unsafe { real(dptr, bytesize, pool, stream) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    let real = real_or_fail!(cuMemAllocFromPoolAsync_ptsz);
    charged(
        None,
        bytesize as u64,
        Kind::Pointer,
        || unsafe { real(dptr, bytesize, pool, stream) },
        || unsafe { *dptr },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    let real = real_or_fail!(cuMemFree_v2);
    refunded(Kind::Pointer, dptr, || unsafe { real(dptr) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuMemFreeAsync);
    refunded(Kind::Pointer, dptr, || unsafe { real(dptr, stream) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    let real = real_or_fail!(cuMemFreeAsync_ptsz);
    refunded(Kind::Pointer, dptr, || unsafe { real(dptr, stream) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationPropHead,
    flags: u64,
) -> CUresult {
    let real = real_or_fail!(cuMemCreate);
    // SAFETY: the caller passes a CUmemAllocationProp or null (which the driver rejects).
    let device = unsafe { prop.as_ref() }
        .filter(|p| p.location_type == CU_MEM_LOCATION_TYPE_DEVICE && p.location_id >= 0)
        .map(|p| p.location_id as usize);
    let Some(device) = device else {
        // Host or NUMA memory, or an invalid call: nothing of the device's to charge.
        return unsafe { real(handle, size, prop, flags) };
    };
    charged(
        Some(device),
        size as u64,
        Kind::Physical,
        || unsafe { real(handle, size, prop, flags) },
        || unsafe { *handle },
    )
}

/// The memory lives on while the handle is mapped or retained: the charge goes with the last
/// reference (here, or in cuMemUnmap).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    let real = real_or_fail!(cuMemRelease);
    refunded(Kind::Physical, handle, || unsafe { real(handle) })
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> CUresult {
    let real = real_or_fail!(cuMemMap);
    let rc = unsafe { real(ptr, size, offset, handle, flags) };
    if rc == CUDA_SUCCESS
        && let Some(ledger) = ledger()
    {
        ledger.map(ptr, size as u64, handle);
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    let real = real_or_fail!(cuMemUnmap);
    unmapped(ptr, size as u64, || unsafe { real(ptr, size) })
}

/// Hands out one more reference to the handle mapped at `addr`, which needs its own release.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemRetainAllocationHandle(
    handle: *mut CUmemGenericAllocationHandle,
    addr: *mut std::ffi::c_void,
) -> CUresult {
    let real = real_or_fail!(cuMemRetainAllocationHandle);
    let rc = unsafe { real(handle, addr) };
    if rc == CUDA_SUCCESS
        && !handle.is_null()
        && let Some(ledger) = ledger()
    {
        // SAFETY: checked non-null and just written by the driver.
        ledger.retain(unsafe { *handle });
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuArrayCreate_v2(
    array: *mut CUarray,
    desc: *const CUDA_ARRAY_DESCRIPTOR,
) -> CUresult {
    let real = real_or_fail!(cuArrayCreate_v2);
    // SAFETY: the caller's descriptor, or null (which the driver rejects).
    let Some(d) = (unsafe { desc.as_ref() }) else {
        return unsafe { real(array, desc) };
    };
    let bytes = array_bytes(
        [d.width as u64, d.height as u64, 1],
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
pub unsafe extern "C" fn cuArray3DCreate_v2(
    array: *mut CUarray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
) -> CUresult {
    let real = real_or_fail!(cuArray3DCreate_v2);
    let Some(d) = (unsafe { desc.as_ref() }) else {
        return unsafe { real(array, desc) };
    };
    let bytes = array_bytes(
        [d.width as u64, d.height as u64, d.depth as u64],
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
pub unsafe extern "C" fn cuArrayDestroy(array: CUarray) -> CUresult {
    let real = real_or_fail!(cuArrayDestroy);
    refunded(Kind::Array, array as u64, || unsafe { real(array) })
}

/// A mipmapped array holds every level: charged the sum of their sizes.
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    array: *mut CUmipmappedArray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
    levels: c_uint,
) -> CUresult {
    let real = real_or_fail!(cuMipmappedArrayCreate);
    let Some(d) = (unsafe { desc.as_ref() }) else {
        return unsafe { real(array, desc, levels) };
    };
    let bytes = array_bytes(
        [d.width as u64, d.height as u64, d.depth as u64],
        d.num_channels,
        d.format,
        levels,
    );
    charged(
        None,
        bytes,
        Kind::Mipmapped,
        || unsafe { real(array, desc, levels) },
        || unsafe { *array as u64 },
    )
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(array: CUmipmappedArray) -> CUresult {
    let real = real_or_fail!(cuMipmappedArrayDestroy);
    refunded(Kind::Mipmapped, array as u64, || unsafe { real(array) })
}

/// Bytes of an array of `extent` elements (0 counts as 1, as the driver reads it) with
/// `levels` mipmap levels, each half the previous one in every dimension (at least 1).
pub(crate) fn array_bytes(
    extent: [u64; 3],
    channels: c_uint,
    format: c_uint,
    levels: c_uint,
) -> u64 {
    let element = u64::from(channels.max(1)).saturating_mul(array_format_bytes(format));
    // Past 64 levels every dimension is 1: bounded, whatever the caller passes.
    (0..levels.clamp(1, 64)).fold(0u64, |total, level| {
        let cells = extent
            .iter()
            .map(|&n| (n >> level).max(1))
            .fold(1u64, u64::saturating_mul);
        total.saturating_add(cells.saturating_mul(element))
    })
}

/// The slice's view: total is the limit, free is what the claim has left of it (never more
/// than the device really has free).
#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let real = real_or_fail!(cuMemGetInfo_v2);
    let rc = unsafe { real(free, total) };
    if rc != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return rc;
    }
    if let Some((limit, used)) = state::current_device().and_then(slice_of) {
        // SAFETY: both pointers were checked and the driver just wrote them.
        unsafe {
            let limit = limit.min(*total as u64);
            *total = limit as usize;
            *free = (limit.saturating_sub(used) as usize).min(*free);
        }
    }
    rc
}

#[cfg_attr(not(test), unsafe(no_mangle))]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CUresult {
    let real = real_or_fail!(cuDeviceTotalMem_v2);
    let rc = unsafe { real(bytes, device) };
    if rc == CUDA_SUCCESS
        && !bytes.is_null()
        && device >= 0
        && let Some((limit, _)) = slice_of(device as usize)
    {
        // SAFETY: checked non-null and just written by the driver.
        unsafe { *bytes = (limit as usize).min(*bytes) };
    }
    rc
}

/// The limit of `device` and the claim's use of it, when it is limited.
pub(crate) fn slice_of(device: usize) -> Option<(u64, u64)> {
    let enforcer = state::enforcer()?;
    let limit = enforcer.config.memory_limit(device)?;
    let used = enforcer.accounting.as_ref().map_or(0, |a| a.used(device));
    Some((limit, used))
}
