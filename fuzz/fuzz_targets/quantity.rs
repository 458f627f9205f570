//! Kubernetes quantity parsing: every string the API server could hand us.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vgpu_driver::quantity::Quantity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = Quantity::parse(text) {
        let _ = q.to_bytes();
        let _ = q.ceil_units();
        // What we print parses back to the same value.
        let again = Quantity::parse(&q.to_string()).expect("a printed quantity parses");
        assert_eq!(again.compare_to(&q), 0, "{text:?} -> {q} -> {again}");
        let _ = q.checked_add(&again);
        let _ = q.checked_sub(&again);
    }
});
