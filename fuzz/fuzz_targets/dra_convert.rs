//! libFuzzer entry for [`vgpu_fuzz_targets::dra_convert`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vgpu_fuzz_targets::dra_convert(data));
