//! The fake-GPU inventory (YAML from a ConfigMap) and the inventory format of the domain model.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(snapshot) =
        kubelet_plugin::discovery::fake::parse(std::path::Path::new("fake-gpus.yaml"), text)
    {
        let _ = snapshot.published_devices();
    }
    let _ = vgpu_driver::Inventory::from_yaml(text);
});
