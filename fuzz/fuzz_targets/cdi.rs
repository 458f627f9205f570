//! CDI names and specs: device, vendor and class names, and whole spec files.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vgpu_cdi::validate_device_name(text);
        let _ = vgpu_cdi::validate_vendor_name(text);
        let _ = vgpu_cdi::validate_class_name(text);
        let _ = vgpu_cdi::is_qualified_name(text);
        let _ = vgpu_cdi::validate_spec_id(text);
    }
    if let Ok(spec) = vgpu_cdi::Spec::from_json(data) {
        let _ = vgpu_cdi::validate_spec(&spec);
        let _ = vgpu_cdi::minimum_version(&spec);
        let _ = spec.parsed_kind();
    }
});
