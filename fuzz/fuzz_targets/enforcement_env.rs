//! libFuzzer entry for [`vgpu_fuzz_targets::enforcement_env`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vgpu_fuzz_targets::enforcement_env(data));
