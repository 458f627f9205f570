//! The real driver functions behind the hooks, found with the real `dlsym`.
//!
//! Our own `dlsym` export shadows libc's for every object in the process, this library
//! included, so the real one comes from `dlvsym`, which nothing overrides.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::ffi::*;
use crate::report;

pub type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// The real `dlsym`; the x86-64 entry in `dlsym.rs` jumps through it.
pub static REAL_DLSYM: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

pub fn dlsym_fn() -> Option<DlsymFn> {
    let mut ptr = REAL_DLSYM.load(Ordering::Acquire);
    if ptr.is_null() {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"] {
            // SAFETY: plain C strings; RTLD_NEXT from this object reaches libc.
            ptr = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !ptr.is_null() {
                break;
            }
        }
        REAL_DLSYM.store(ptr, Ordering::Release);
    }
    // SAFETY: null or glibc's dlsym, whose signature DlsymFn is.
    unsafe { std::mem::transmute::<*mut c_void, Option<DlsymFn>>(ptr) }
}

/// The real `dlopen`; the x86-64 entry in `dlopen.rs` jumps through it.
pub static REAL_DLOPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

pub fn resolve_dlopen() {
    for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.1"] {
        // SAFETY: plain C strings; RTLD_NEXT from this object reaches libc.
        let ptr = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlopen".as_ptr(), version.as_ptr()) };
        if !ptr.is_null() {
            REAL_DLOPEN.store(ptr, Ordering::Release);
            return;
        }
    }
}

/// Looks `name` up in `handle` with the real dlsym.
pub fn symbol(handle: *mut c_void, name: &CStr) -> *mut c_void {
    match dlsym_fn() {
        // SAFETY: a handle from dlopen (or a pseudo-handle) and a C string.
        Some(real) => unsafe { real(handle, name.as_ptr()) },
        None => std::ptr::null_mut(),
    }
}

fn open(names: &[&CStr]) -> *mut c_void {
    for name in names {
        // SAFETY: a C string; dlopen is thread-safe.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if !handle.is_null() {
            return handle;
        }
    }
    std::ptr::null_mut()
}

macro_rules! table {
    ($(#[$meta:meta])* pub struct $name:ident { $($f:ident: fn($($a:ty),*) -> $r:ty;)* }) => {
        $(#[$meta])*
        #[allow(non_snake_case)]
        pub struct $name {
            $(pub $f: Option<unsafe extern "C" fn($($a),*) -> $r>,)*
        }

        impl $name {
            fn load(handle: *mut c_void) -> Self {
                $name {
                    $($f: {
                        let name = concat!(stringify!($f), "\0");
                        let name = CStr::from_bytes_with_nul(name.as_bytes()).expect("literal");
                        let ptr = symbol(handle, name);
                        // SAFETY: the symbol, when present, has the signature cuda.h/nvml.h gives.
                        unsafe {
                            std::mem::transmute::<*mut c_void, Option<unsafe extern "C" fn($($a),*) -> $r>>(ptr)
                        }
                    },)*
                }
            }
        }
    };
}

type Params = *mut *mut c_void;

table! {
    /// libcuda's functions that the hooks call.
    pub struct Cuda {
        cuGetProcAddress: fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;
        cuGetProcAddress_v2: fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
        cuMemAlloc_v2: fn(*mut CUdeviceptr, usize) -> CUresult;
        cuMemAllocPitch_v2: fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
        cuMemAllocManaged: fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
        cuMemAllocAsync: fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocAsync_ptsz: fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync: fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync_ptsz: fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemFree_v2: fn(CUdeviceptr) -> CUresult;
        cuMemFreeAsync: fn(CUdeviceptr, CUstream) -> CUresult;
        cuMemFreeAsync_ptsz: fn(CUdeviceptr, CUstream) -> CUresult;
        cuMemCreate: fn(*mut CUmemGenericAllocationHandle, usize, *const CUmemAllocationPropHead, u64) -> CUresult;
        cuMemRelease: fn(CUmemGenericAllocationHandle) -> CUresult;
        cuMemMap: fn(CUdeviceptr, usize, usize, CUmemGenericAllocationHandle, u64) -> CUresult;
        cuMemUnmap: fn(CUdeviceptr, usize) -> CUresult;
        cuMemRetainAllocationHandle: fn(*mut CUmemGenericAllocationHandle, *mut c_void) -> CUresult;
        cuArrayCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR) -> CUresult;
        cuArray3DCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR) -> CUresult;
        cuArrayDestroy: fn(CUarray) -> CUresult;
        cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> CUresult;
        cuMemAlloc: fn(*mut CUdeviceptr_v1, c_uint) -> CUresult;
        cuMemAllocPitch: fn(*mut CUdeviceptr_v1, *mut c_uint, c_uint, c_uint, c_uint) -> CUresult;
        cuMemFree: fn(CUdeviceptr_v1) -> CUresult;
        cuArrayCreate: fn(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR_v1) -> CUresult;
        cuArray3DCreate: fn(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR_v1) -> CUresult;
        cuMemGetInfo: fn(*mut c_uint, *mut c_uint) -> CUresult;
        cuDeviceTotalMem: fn(*mut c_uint, CUdevice) -> CUresult;
        cuMipmappedArrayCreate: fn(*mut CUmipmappedArray, *const CUDA_ARRAY3D_DESCRIPTOR, c_uint) -> CUresult;
        cuMipmappedArrayDestroy: fn(CUmipmappedArray) -> CUresult;
        cuDeviceTotalMem_v2: fn(*mut usize, CUdevice) -> CUresult;
        cuLaunchKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, Params, Params) -> CUresult;
        cuLaunchKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, Params, Params) -> CUresult;
        cuLaunchKernelEx: fn(*const CUlaunchConfigHead, CUfunction, Params, Params) -> CUresult;
        cuLaunchKernelEx_ptsz: fn(*const CUlaunchConfigHead, CUfunction, Params, Params) -> CUresult;
        cuLaunchCooperativeKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, Params) -> CUresult;
        cuLaunchCooperativeKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, Params) -> CUresult;
        cuGraphLaunch: fn(CUgraphExec, CUstream) -> CUresult;
        cuGraphLaunch_ptsz: fn(CUgraphExec, CUstream) -> CUresult;
        cuDevicePrimaryCtxRetain: fn(*mut CUcontext, CUdevice) -> CUresult;
        cuCtxCreate_v2: fn(*mut CUcontext, c_uint, CUdevice) -> CUresult;
        cuCtxGetDevice: fn(*mut CUdevice) -> CUresult;
        cuEventCreate: fn(*mut CUevent, c_uint) -> CUresult;
        cuEventRecord: fn(CUevent, CUstream) -> CUresult;
        cuEventQuery: fn(CUevent) -> CUresult;
        cuEventElapsedTime: fn(*mut f32, CUevent, CUevent) -> CUresult;
        cuStreamIsCapturing: fn(CUstream, *mut c_int) -> CUresult;
        cuDeviceGetUuid: fn(*mut [u8; 16], CUdevice) -> CUresult;
    }
}

table! {
    /// libnvidia-ml's functions that the hooks and the throttle call.
    pub struct Nvml {
        nvmlInit_v2: fn() -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo: fn(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo_v2: fn(nvmlDevice_t, *mut nvmlMemory_v2_t) -> nvmlReturn_t;
        nvmlDeviceGetUUID: fn(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t;
        nvmlDeviceGetIndex: fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;
        nvmlDeviceGetHandleByUUID: fn(*const c_char, *mut nvmlDevice_t) -> nvmlReturn_t;
        nvmlDeviceGetProcessUtilization: fn(nvmlDevice_t, *mut nvmlProcessUtilizationSample_t, *mut c_uint, u64) -> nvmlReturn_t;
        nvmlDeviceGetUtilizationRates: fn(nvmlDevice_t, *mut nvmlUtilization_t) -> nvmlReturn_t;
        nvmlDeviceGetComputeRunningProcesses_v3: fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t;
    }
}

pub struct Loaded<T> {
    pub api: T,
    /// (real function, its hook) for every hooked name the library exports, so that a pointer
    /// handed out by cuGetProcAddress, whichever version it resolved to, can be swapped.
    swaps: Vec<(usize, usize)>,
}

impl<T> Loaded<T> {
    pub fn hook_for_real(&self, real: *mut c_void) -> Option<*mut c_void> {
        self.swaps
            .iter()
            .find(|(r, _)| *r == real as usize)
            .map(|(_, h)| *h as *mut c_void)
    }
}

fn swaps(handle: *mut c_void) -> Vec<(usize, usize)> {
    crate::hooks::HOOKED
        .iter()
        .filter_map(|name| {
            let real = symbol(handle, name);
            let hook = crate::hooks::hook_for(name.to_bytes())?;
            (!real.is_null()).then_some((real as usize, hook as usize))
        })
        .collect()
}

static CUDA: OnceLock<Option<Loaded<Cuda>>> = OnceLock::new();
static NVML: OnceLock<Option<Loaded<Nvml>>> = OnceLock::new();

pub fn cuda() -> Option<&'static Loaded<Cuda>> {
    CUDA.get_or_init(|| {
        let handle = open(&[c"libcuda.so.1", c"libcuda.so"]);
        if handle.is_null() {
            report::once(
                "no-libcuda",
                "libcuda.so.1 cannot be loaded; CUDA calls fail as they would without the library",
            );
            return None;
        }
        Some(Loaded {
            api: Cuda::load(handle),
            swaps: swaps(handle),
        })
    })
    .as_ref()
}

pub fn nvml() -> Option<&'static Loaded<Nvml>> {
    NVML.get_or_init(|| {
        let handle = open(&[c"libnvidia-ml.so.1", c"libnvidia-ml.so"]);
        if handle.is_null() {
            return None;
        }
        Some(Loaded {
            api: Nvml::load(handle),
            swaps: swaps(handle),
        })
    })
    .as_ref()
}
