//! How our DeviceClasses keep the kube-scheduler from allocating GPU slices on its own.
//!
//! A slice class carries, besides its real selectors, [`CONTROLLER_SELECTOR`]: a CEL selector
//! that cleanly evaluates to false on every published device (the attribute it tests is never
//! published). The kube-scheduler therefore never finds a device for such a claim and leaves it
//! pending; the controller, which recognises the marker and skips it, is its only allocator.
//! Once the controller writes `status.allocation`, the scheduler accepts it as-is.

/// The attribute that is never published; its absence is what the marker tests.
pub const CONTROLLER_ATTRIBUTE: &str = "allocatedByController";

/// The marker selector expression for driver `driver`.
pub fn controller_selector(driver: &str) -> String {
    format!("has(device.attributes[\"{driver}\"].{CONTROLLER_ATTRIBUTE})")
}

/// The scheduling gate that keeps the kube-scheduler off a pod until the controller has
/// allocated its claims of such classes, and that the controller then lifts. Without it the
/// scheduler tries the pod at once, finds its claim unallocated, and retries it only after
/// its back-off (1 s at first, doubling with each attempt), however soon the claim is
/// allocated.
pub fn scheduling_gate(driver: &str) -> String {
    format!("{driver}/allocation")
}

/// Whether a class selector expression is the controller marker (of any driver name),
/// ignoring white space.
pub fn is_controller_selector(expression: &str) -> bool {
    let compact: String = expression.chars().filter(|c| !c.is_whitespace()).collect();
    compact.starts_with("has(device.attributes[\"")
        && compact.ends_with(&format!("\"].{CONTROLLER_ATTRIBUTE})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip() {
        let m = controller_selector("vgpu.hami.io");
        assert_eq!(
            m,
            "has(device.attributes[\"vgpu.hami.io\"].allocatedByController)"
        );
        assert!(is_controller_selector(&m));
        assert!(is_controller_selector(
            " has( device.attributes[\"x.io\"].allocatedByController ) "
        ));
        assert!(!is_controller_selector("device.driver == \"vgpu.hami.io\""));
        assert!(!is_controller_selector(
            "has(device.attributes[\"x.io\"].productName)"
        ));
    }
}
