//! The CEL evaluator's inputs: any selector expression a DeviceClass or claim may carry,
//! compiled and evaluated against a real published H100.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn device() -> &'static (String, cel::Value) {
    static DEVICE: OnceLock<(String, cel::Value)> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let inventory = vgpu_driver::Inventory::from_yaml(include_str!(
            "../../driver/testdata/hgx-h100.yaml"
        ))
        .unwrap();
        let devices = vgpu_driver::slice::gpu_devices(&inventory.gpus).unwrap();
        let value = controller::cel::device_value("vgpu.hami.io", &devices[0]);
        (devices[0].name.clone(), value)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(expression) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = controller::cel::Selector::compile(expression) {
        let (name, value) = device();
        let _ = selector.matches(name, value);
    }
});
