//! Our `dlsym`: a process that opens libcuda itself and looks functions up by name (the CUDA
//! runtime does this for cuGetProcAddress) gets the hooks.
//!
//! Every other lookup must behave exactly as glibc's, including `dlsym(RTLD_NEXT, ...)`, whose
//! answer depends on which object called it. So on x86-64 the entry is a few instructions of
//! assembly: it asks `lookup` for a hook and, when there is none, jumps (not calls) to the real
//! dlsym, which then sees the original caller's return address.

use std::ffi::{CStr, c_char, c_void};

use crate::hooks;
use crate::real;
use crate::state;

/// The hook to hand out for `name`, or null to let the real dlsym answer.
pub extern "C" fn lookup(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let none = std::ptr::null_mut();
    // Resolves the real dlsym too, which the entry jumps through.
    if real::dlsym_fn().is_none() || name.is_null() || handle == libc::RTLD_NEXT {
        return none;
    }
    // SAFETY: dlsym's contract: a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(name) };
    let bytes = name.to_bytes();
    // Cheap filter first: std itself calls dlsym for its weak symbols, maybe before the
    // configuration can be read.
    if !(bytes.starts_with(b"cu") || bytes.starts_with(b"nvml")) {
        return none;
    }
    let Some(hook) = hooks::hook_for(bytes) else {
        return none;
    };
    if !state::interposing() || real::symbol(handle, name).is_null() {
        return none;
    }
    hook
}

#[cfg(test)]
mod tests {
    use super::lookup;

    #[test]
    fn only_hooked_names_in_a_library_that_has_them_are_answered() {
        let default = std::ptr::null_mut();
        // Not ours: the real dlsym answers.
        assert!(lookup(default, c"malloc".as_ptr()).is_null());
        assert!(lookup(default, c"statx".as_ptr()).is_null());
        assert!(lookup(default, std::ptr::null()).is_null());
        // Ours, but nothing in this process defines it (no libcuda here): still not found.
        assert!(lookup(default, c"cuMemAlloc_v2".as_ptr()).is_null());
        // RTLD_NEXT always goes to the real dlsym, which needs the caller's address.
        assert!(lookup(libc::RTLD_NEXT, c"cuMemAlloc_v2".as_ptr()).is_null());
        assert!(crate::real::dlsym_fn().is_some(), "the real dlsym is found");
    }
}

#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        // Entry leaves rsp 8 off 16-byte alignment; two pushes and this restore it for the call.
        "sub rsp, 8",
        "call {lookup}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz 2f",
        "ret",
        "2:",
        "jmp qword ptr [rip + {real}]",
        lookup = sym lookup,
        real = sym real::REAL_DLSYM,
    )
}

/// Elsewhere a plain forwarder: right for every handle but RTLD_NEXT.
#[cfg(all(not(test), not(target_arch = "x86_64")))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let hook = lookup(handle, name);
    if !hook.is_null() {
        return hook;
    }
    match real::dlsym_fn() {
        Some(real) => unsafe { real(handle, name) },
        None => std::ptr::null_mut(),
    }
}
