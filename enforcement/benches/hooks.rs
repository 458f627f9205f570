//! Per-call cost of the hooks: the probe application times alloc+free pairs, kernel launches
//! and cuMemGetInfo against the simulated driver, without the library and with it under each
//! configuration. The difference is what the library adds to every call.
//!
//!     cargo bench -p libvgpu --bench hooks

#[path = "../tests/support/mod.rs"]
mod support;

use support::Probe;

const ITERATIONS: &str = "200000";

fn run(label: &str, probe: Probe) {
    let r = probe.env("STUB_NS_PER_BLOCK", "0").output();
    println!(
        "{label:<48} alloc+free {:>8.1} ns   launch {:>7.1} ns   cuMemGetInfo {:>8.1} ns",
        r.num("alloc_free_ns"),
        r.num("launch_ns"),
        r.num("meminfo_ns")
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("claim.cache");
    for path in ["direct", "procaddr"] {
        println!("-- {path}");
        run("no library", Probe::bare(path, &["bench", ITERATIONS]));
        run(
            "library, no limits",
            Probe::new(path, &["bench", ITERATIONS]),
        );
        run(
            "library, memory limit, default file",
            // No CUDA_DEVICE_MEMORY_SHARED_CACHE: HAMi-core's default file, in the probe's own
            // $TMPDIR.
            Probe::new(path, &["bench", ITERATIONS]).env("CUDA_DEVICE_MEMORY_LIMIT", "80g"),
        );
        run(
            "library, memory limit, shared file",
            Probe::new(path, &["bench", ITERATIONS])
                .env("CUDA_DEVICE_MEMORY_LIMIT", "80g")
                .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &cache),
        );
        run(
            "library, CUDA_DEVICE_SM_LIMIT=50, tokens left",
            // Kernels take no time on the simulated device, so the bucket never runs dry: this
            // is the throttle's bookkeeping alone, timing events on one launch in 16 included.
            Probe::new(path, &["bench", ITERATIONS]).env("CUDA_DEVICE_SM_LIMIT", "50"),
        );
        run(
            "library, memory limit + CUDA_DEVICE_SM_LIMIT=100",
            Probe::new(path, &["bench", ITERATIONS])
                .env("CUDA_DEVICE_MEMORY_LIMIT", "80g")
                .env("CUDA_DEVICE_SM_LIMIT", "100"),
        );
    }
}
