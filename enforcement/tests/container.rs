//! The whole chain on a real container runtime: the kubelet plugin prepares a claim (a 4 GiB,
//! 30 % slice of two GPUs) and writes its CDI spec; podman (runc) injects it into a container
//! whose image holds only glibc, the simulated driver and the probe; the dynamic loader
//! preloads libvgpu.so through the spec's /etc/ld.so.preload; and the limits hold inside, for
//! one process and for two sharing the claim's file.
//!
//! Needs root, `podman`, `runc` and `busybox-static` (`apt-get install -y podman runc
//! busybox-static`). Without them this test FAILS; set `VGPU_SKIP_PODMAN=1` to skip it
//! explicitly where no container runtime can run.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use kubelet_plugin::discovery::{GpuState, fake};
use kubelet_plugin::prepare::devnodes::DeviceNodes;
use kubelet_plugin::prepare::{PrepareConfig, Preparer};
use serde_json::json;
use vgpu_driver::{AllocatedDevice, ClaimAllocation, ConfigEntry, ConfigSource};

const IMAGE: &str = "localhost/vgpu-enforcement-glibc:test";

fn skip_or_fail(why: &str) -> bool {
    if std::env::var("VGPU_SKIP_PODMAN").as_deref() == Ok("1") {
        eprintln!("skipping the container test (VGPU_SKIP_PODMAN=1): {why}");
        return true;
    }
    panic!(
        "{why}. This test proves the library is preloaded and enforces inside a real container: \
         install podman, runc and busybox-static and run as root, or set VGPU_SKIP_PODMAN=1"
    );
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman runs")
}

/// The shared objects `binary` loads, as ldd resolves them on this machine.
fn shared_objects(binary: &Path, extra_path: &Path) -> BTreeSet<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .env("LD_LIBRARY_PATH", extra_path)
        .output()
        .expect("ldd runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .filter(|p| !p.starts_with(extra_path))
        .collect()
}

/// An image with glibc (copied from this machine), busybox, the simulated driver and the probe.
fn build_image(dir: &Path) {
    let tc = support::toolchain();
    let rootfs = dir.join("rootfs");
    let stub = rootfs.join("opt/stub");
    std::fs::create_dir_all(&stub).unwrap();
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    for name in ["probe", "libcuda.so.1", "libnvidia-ml.so.1"] {
        std::fs::copy(tc.dir.join(name), stub.join(name)).unwrap();
    }
    let mut libs = BTreeSet::new();
    for binary in [
        tc.dir.join("probe"),
        tc.dir.join("libcuda.so.1"),
        tc.dir.join("libnvidia-ml.so.1"),
        tc.library.clone(),
    ] {
        libs.extend(shared_objects(&binary, &tc.dir));
    }
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "ldd found no libc: {libs:?}"
    );
    for lib in libs {
        let target = rootfs.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&lib, &target).unwrap();
    }
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
fn the_plugins_spec_preloads_the_library_and_the_limits_hold_inside_a_container() {
    if Command::new("podman").arg("--version").output().is_err()
        && skip_or_fail("podman is not installed")
    {
        return;
    }
    if !Path::new("/bin/busybox").is_file() && skip_or_fail("/bin/busybox is missing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_image(dir.path());

    let driver = format!("t{}.enforcement-test.vgpu.hami.io", std::process::id());
    let inventory = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kubelet-plugin/examples/fake-gpus-hgx-h100.yaml"),
    )
    .unwrap();
    let gpus = GpuState::new(fake::parse(Path::new("hgx"), &inventory).unwrap());
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
        cdi_root: vgpu_cdi_root(),
        plugin_dir: dir.path().join("plugin"),
        enforcement_library: support::toolchain().library.clone(),
        device_nodes: DeviceNodes::under_root(&dir.path().join("host")),
    };
    let (preparer, _) = Preparer::open(cfg, gpus).unwrap();
    let uid = "0b9f3c1e-5a7d-4e2b-9c8f-1a2b3c4d5e6f";
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

    // No LD_PRELOAD anywhere: only the spec's /etc/ld.so.preload can load the library.
    let script = "cat /etc/ld.so.preload; echo ---; \
                  /opt/stub/probe direct fill 1024; echo ---; \
                  /opt/stub/probe procaddr hold 3072 & sleep 1; \
                  /opt/stub/probe dlsym fill 512; echo ---; \
                  PROBE_DEVICE=1 /opt/stub/probe procaddr fill 1024; kill $!";
    let out = podman(&[
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--env",
        "LD_LIBRARY_PATH=/opt/stub",
        "--device",
        &device,
        IMAGE,
        "/bin/sh",
        "-c",
        script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "podman run failed:\n{stdout}\n{stderr}"
    );
    let sections: Vec<&str> = stdout.split("---\n").collect();
    assert_eq!(sections.len(), 4, "{stdout}\n{stderr}");
    assert_eq!(sections[0], "/usr/local/vgpu/libvgpu.so\n");
    let value = |section: &str, key: &str| -> String {
        section
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in:\n{section}\nstderr:\n{stderr}"))
            .to_string()
    };
    // The simulated device has 79 GiB; the claim's 4 GiB limit holds, on both GPUs.
    assert_eq!(value(sections[1], "allocated"), "4", "{stderr}");
    assert_eq!(value(sections[1], "total_mib"), "4096");
    assert_eq!(value(sections[2], "held"), "1");
    assert_eq!(
        value(sections[2], "allocated"),
        "2",
        "a second process gets only what the first left: {stderr}"
    );
    assert_eq!(
        value(sections[3], "allocated"),
        "4",
        "GPU 1's limit: {stderr}"
    );
    assert!(
        stderr.contains("[vgpu] device 0: out of memory"),
        "the library explains the refusal: {stderr}"
    );
}

fn vgpu_cdi_root() -> PathBuf {
    PathBuf::from("/var/run/cdi")
}
