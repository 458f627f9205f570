//! Our `dlopen`: a library opened with `RTLD_DEEPBIND` looks its symbols up in itself and its
//! own dependencies before the global scope, so its CUDA calls (and its `dlsym`) would bind
//! straight to libcuda and libc, past the preloaded hooks. The flag is dropped while the
//! library interposes: the library then binds through the global scope, where the hooks come
//! first, like every other library of the process. This is a deliberate change of the
//! caller's request, said once on stderr.
//!
//! glibc's dlopen resolves relative names with the *caller's* RPATH/RUNPATH, found from its
//! return address, so on x86-64 the entry is assembly that adjusts the flags and then jumps
//! (never calls) to the real dlopen. Elsewhere the library does not export dlopen at all: a
//! forwarder would break the caller's RPATH, and DEEPBIND stays a known hole there.

#[cfg(any(test, target_arch = "x86_64"))]
use std::ffi::c_int;
#[cfg(all(not(test), target_arch = "x86_64"))]
use std::ffi::{c_char, c_void};
#[cfg(any(test, target_arch = "x86_64"))]
use std::sync::atomic::Ordering;

#[cfg(any(test, target_arch = "x86_64"))]
use crate::real;

/// The flags to pass on for a `dlopen(_, flags)`; also resolves the real dlopen, which the
/// entry jumps through.
#[cfg(any(test, target_arch = "x86_64"))]
pub extern "C" fn adjust_flags(flags: c_int) -> c_int {
    if real::REAL_DLOPEN.load(Ordering::Acquire).is_null() {
        real::resolve_dlopen();
    }
    if flags & libc::RTLD_DEEPBIND == 0 || !crate::state::interposing() {
        return flags;
    }
    crate::report::once(
        "deepbind",
        "dlopen with RTLD_DEEPBIND: the flag is dropped so that the library's CUDA calls reach \
         the limits; its symbols bind through the global scope",
    );
    flags & !libc::RTLD_DEEPBIND
}

#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlopen(file: *const c_char, flags: c_int) -> *mut c_void {
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        // Entry leaves rsp 8 off 16-byte alignment; two pushes and this restore it for the call.
        "sub rsp, 8",
        "mov edi, esi",
        "call {adjust}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "mov esi, eax",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        // No dlopen to be found: fail as dlopen fails.
        "2:",
        "xor eax, eax",
        "ret",
        adjust = sym adjust_flags,
        real = sym real::REAL_DLOPEN,
    )
}

#[cfg(test)]
mod tests {
    use super::adjust_flags;

    #[test]
    fn only_deepbind_is_dropped() {
        let flags = libc::RTLD_NOW | libc::RTLD_GLOBAL;
        assert_eq!(adjust_flags(flags), flags);
        assert_eq!(adjust_flags(flags | libc::RTLD_DEEPBIND), flags);
        assert_eq!(adjust_flags(libc::RTLD_LAZY), libc::RTLD_LAZY);
        assert!(
            !crate::real::REAL_DLOPEN
                .load(std::sync::atomic::Ordering::Acquire)
                .is_null(),
            "the real dlopen is found"
        );
    }
}
