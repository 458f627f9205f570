//! A real container runtime consumes the spec the plugin writes: podman (with runc) resolves
//! the CDI device id the kubelet would pass and injects env, mounts and device nodes.
//!
//! Needs root, `podman`, `runc` and `busybox-static` (`apt-get install -y podman runc
//! busybox-static`). Without them this test FAILS; set `VGPU_SKIP_PODMAN=1` to skip it
//! explicitly where no container runtime can run.

use kubelet_plugin::discovery::{GpuState, fake};
use kubelet_plugin::prepare::devnodes::DeviceNodes;
use kubelet_plugin::prepare::{PrepareConfig, Preparer};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use vgpu_driver::{AllocatedDevice, ClaimAllocation, ConfigEntry, ConfigSource};

const IMAGE: &str = "localhost/vgpu-kubelet-plugin-busybox:test";

fn skip_or_fail(why: &str) -> bool {
    if std::env::var("VGPU_SKIP_PODMAN").as_deref() == Ok("1") {
        eprintln!("skipping the podman test (VGPU_SKIP_PODMAN=1): {why}");
        return true;
    }
    panic!(
        "{why}. This test proves a real runtime consumes our CDI specs: install podman, runc and \
         busybox-static and run as root, or set VGPU_SKIP_PODMAN=1 to skip it explicitly"
    );
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman runs")
}

/// A tiny image: a static busybox.
fn ensure_image(dir: &Path) {
    if podman(&["image", "exists", IMAGE]).status.success() {
        return;
    }
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let out = podman(&["import", tar.to_str().unwrap(), IMAGE]);
    assert!(
        out.status.success(),
        "podman import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(device: &str, script: &str) -> std::process::Output {
    podman(&[
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--device",
        device,
        IMAGE,
        "/bin/sh",
        "-c",
        script,
    ])
}

/// Unprepares on drop so /var/run/cdi is left clean even when an assertion fails.
struct Prepared<'a> {
    preparer: &'a Preparer,
    uid: String,
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        let _ = self.preparer.unprepare(&self.uid);
    }
}

#[test]
fn podman_injects_the_claim_spec() {
    let podman_missing = Command::new("podman").arg("--version").output().is_err();
    if podman_missing && skip_or_fail("podman is not installed") {
        return;
    }
    if !Path::new("/bin/busybox").is_file()
        && skip_or_fail("/bin/busybox (busybox-static) is missing")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ensure_image(dir.path());

    // A driver name of our own so the spec in the runtime's directory cannot clash.
    let driver = format!("t{}.podman-test.vgpu.hami.io", std::process::id());
    let inventory = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fake-gpus-hgx-h100.yaml"),
    )
    .unwrap();
    let gpus = GpuState::new(fake::parse(Path::new("hgx"), &inventory).unwrap());
    let library = dir.path().join("libvgpu.so");
    std::fs::write(&library, "fake HAMi-core\n").unwrap();
    std::fs::create_dir_all(dir.path().join("host/dev")).unwrap();
    std::fs::create_dir_all(dir.path().join("host/proc")).unwrap();
    std::fs::write(
        dir.path().join("host/proc/devices"),
        "Character devices:\n511 nvidia-uvm\n",
    )
    .unwrap();
    let cfg = PrepareConfig {
        driver: driver.clone(),
        node: "node-a".into(),
        cdi_root: vgpu_cdi::SpecDir::DEFAULT_DYNAMIC.into(),
        plugin_dir: dir.path().join("plugin"),
        enforcement_library: library,
        device_nodes: DeviceNodes::under_root(&dir.path().join("host")),
    };
    let (preparer, _) = Preparer::open(cfg, gpus).unwrap();
    let uid = "6a0e7c2b-94d1-4f3e-8a55-0c1d2e3f4a5b";
    let result = |device: &str| AllocatedDevice {
        request: "gpu".into(),
        driver: driver.clone(),
        pool: "node-a".into(),
        device: device.into(),
        admin_access: false,
        share_id: None,
        consumed_capacity: BTreeMap::new(),
    };
    let alloc = ClaimAllocation {
        namespace: "ml".into(),
        name: "train".into(),
        uid: uid.into(),
        results: vec![result("gpu-0"), result("gpu-3")],
        config: vec![ConfigEntry {
            source: ConfigSource::FromClass,
            requests: vec![],
            driver: driver.clone(),
            parameters: json!({"apiVersion": "vgpu.hami.io/v1alpha1", "kind": "GpuSliceConfig", "memory": "4Gi", "cores": 30}).into(),
        }],
        node_name: Some("node-a".into()),
    };
    let claim = preparer.prepare(&alloc).unwrap();
    let _cleanup = Prepared {
        preparer: &preparer,
        uid: uid.into(),
    };
    let device = claim.devices[0].cdi_device_ids[0].clone();
    assert_eq!(device, format!("k8s.{driver}/claim={uid}-gpu"));

    let out = run(
        &device,
        "env; echo ---; cat /etc/ld.so.preload; echo ---; cat /usr/local/vgpu/libvgpu.so; echo ---; \
         ls -ln /dev; echo ---; echo written-inside > /usr/local/vgpu/shared/probe && echo shared-rw",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "podman run failed:\n{stdout}\n{stderr}"
    );
    let sections: Vec<&str> = stdout.split("---\n").collect();
    assert_eq!(sections.len(), 5, "{stdout}");
    let env: Vec<&str> = sections[0].lines().collect();
    for line in [
        "NVIDIA_VISIBLE_DEVICES=GPU-5f2c9a1e-0000-4a8b-9c3d-7e6f5a4b3c2d,GPU-5f2c9a1e-0003-4a8b-9c3d-7e6f5a4b3c2d",
        "CUDA_VISIBLE_DEVICES=GPU-5f2c9a1e-0000-4a8b-9c3d-7e6f5a4b3c2d,GPU-5f2c9a1e-0003-4a8b-9c3d-7e6f5a4b3c2d",
        "CUDA_DEVICE_MEMORY_LIMIT_0=4096m",
        "CUDA_DEVICE_MEMORY_LIMIT_1=4096m",
        "CUDA_DEVICE_SM_LIMIT=30",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/shared/gpu.cache",
    ] {
        assert!(
            env.contains(&line),
            "{line} missing from the container's env:\n{}",
            sections[0]
        );
    }
    assert_eq!(sections[1], "/usr/local/vgpu/libvgpu.so\n");
    assert_eq!(sections[2], "fake HAMi-core\n");
    // Device nodes created by the runtime with the spec's numbers.
    let node = |name: &str| {
        sections[3]
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("/dev/{name} missing:\n{}", sections[3]))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    for (name, major, minor) in [
        ("nvidia0", "195,", "0"),
        ("nvidia3", "195,", "3"),
        ("nvidiactl", "195,", "255"),
        ("nvidia-uvm", "511,", "0"),
        ("nvidia-uvm-tools", "511,", "1"),
    ] {
        let fields = node(name);
        assert!(fields[0].starts_with('c'), "{fields:?}");
        assert_eq!((fields[4], fields[5]), (major, minor), "{fields:?}");
    }
    assert_eq!(sections[4], "shared-rw\n");
    // What the container wrote is in the claim's host directory.
    assert_eq!(
        std::fs::read_to_string(dir.path().join(format!("plugin/claims/{uid}/probe"))).unwrap(),
        "written-inside\n"
    );

    // An id the spec does not define is refused by the runtime, as CreateContainer would be.
    let out = run(&format!("k8s.{driver}/claim={uid}-nope"), "true");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unresolvable CDI devices"));

    // Unprepare removes the spec; the runtime no longer resolves the device.
    assert!(preparer.unprepare(uid).unwrap());
    let out = run(&device, "true");
    assert!(
        !out.status.success(),
        "the device still resolves after unprepare"
    );
}
