//! libvgpu.so preloaded into a real process that drives a simulated driver: the limits hold
//! whichever way the application reaches the driver.

mod support;

use support::{Probe, wait_for_line};

const PATHS: [&str; 3] = ["direct", "dlsym", "procaddr"];
const CUDA_ERROR_OUT_OF_MEMORY: i64 = 2;

#[test]
fn without_the_library_the_whole_device_is_available() {
    // The control for every test below: the simulated H100 has 81,559 MiB.
    for path in PATHS {
        let r = Probe::bare(path, &["fill", "1024"])
            .env("CUDA_DEVICE_MEMORY_LIMIT", "4g")
            .output();
        assert_eq!(r.int("allocated"), 79, "{path}");
        assert_eq!(r.int("total_mib"), 81559, "{path}");
    }
}

#[test]
fn allocations_past_the_limit_fail_with_out_of_memory_on_every_path() {
    for path in PATHS {
        let r = Probe::new(path, &["fill", "1024"])
            .env("CUDA_DEVICE_MEMORY_LIMIT", "4g")
            .output();
        assert_eq!(r.int("allocated"), 4, "{path}: {}", r.stdout);
        assert_eq!(r.int("error"), CUDA_ERROR_OUT_OF_MEMORY, "{path}");
        assert_eq!(
            r.int("total_mib"),
            4096,
            "{path}: cuMemGetInfo total is the limit"
        );
        assert_eq!(
            r.int("free_mib"),
            0,
            "{path}: cuMemGetInfo free is what is left"
        );
        assert_eq!(r.int("device_total_mib"), 4096, "{path}: cuDeviceTotalMem");
        assert!(
            r.stderr.contains(
                "device 0: out of memory: 1024 MiB requested, 4096 MiB of the limit 4096 MiB"
            ),
            "{path}: {}",
            r.stderr
        );
    }
}

#[test]
fn frees_give_the_memory_back() {
    let r = Probe::new("procaddr", &["refill", "256"])
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2000m")
        .output();
    assert_eq!(r.int("allocated"), 7);
    assert_eq!(r.int("free_mib"), 2000 - 7 * 256);
    assert_eq!(r.int("after_free_free_mib"), 2000);
    assert_eq!(r.int("reallocated"), 7);
}

#[test]
fn every_allocation_api_is_charged_and_refunded() {
    let apis = [
        "pitch", "managed", "async", "pool", "vmm", "array", "array3d", "mipmap",
    ];
    for path in PATHS {
        let fits = Probe::new(path, &["apis", "1024"])
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2g")
            .output();
        for api in apis {
            assert_eq!(fits.int(api), 0, "{path} {api}");
            assert_eq!(
                fits.int(&format!("{api}_free_mib")),
                1024,
                "{path} {api} is charged"
            );
        }
        assert_eq!(fits.int("free_mib"), 2048, "{path}: every free refunded");
        let too_big = Probe::new(path, &["apis", "4096"])
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2g")
            .output();
        for api in apis {
            assert_eq!(too_big.int(api), CUDA_ERROR_OUT_OF_MEMORY, "{path} {api}");
        }
    }
}

#[test]
fn the_legacy_entry_points_are_charged_on_every_path() {
    // cuMemAlloc, cuMemAllocPitch, cuArrayCreate, cuArray3DCreate, cuMemGetInfo and
    // cuDeviceTotalMem of CUDA 2.x (32-bit), which the driver still exports: linked, by dlsym of
    // the base name, and by cuGetProcAddress with version 2000.
    let control = Probe::bare("procaddr", &["legacy", "512"])
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2000m")
        .output();
    assert_eq!(
        control.int("allocated"),
        8,
        "the driver alone: {}",
        control.stdout
    );
    for path in PATHS {
        let r = Probe::new(path, &["legacy", "512"])
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2000m")
            .output();
        assert_eq!(r.int("allocated"), 3, "{path}: {}", r.stdout);
        assert_eq!(r.int("error"), CUDA_ERROR_OUT_OF_MEMORY, "{path}");
        assert_eq!(r.int("v1_total_mib"), 2000, "{path}: cuMemGetInfo (v1)");
        assert_eq!(r.int("v1_free_mib"), 2000 - 3 * 512, "{path}");
        assert_eq!(
            r.int("v1_device_total_mib"),
            2000,
            "{path}: cuDeviceTotalMem (v1)"
        );
        for api in ["pitch", "array", "array3d"] {
            assert_eq!(r.int(api), 0, "{path} {api}");
            assert_eq!(
                r.int(&format!("{api}_free_mib")),
                2000 - 512,
                "{path} {api} (v1) is charged"
            );
        }
        assert_eq!(r.int("end_free_mib"), 2000, "{path}: every free refunded");
    }
}

#[test]
fn vmm_memory_is_charged_until_its_last_mapping_and_reference_go() {
    // cuMemRelease of a mapped handle frees nothing until cuMemUnmap (and a retained
    // reference until its own release): the charge follows the memory, not the handle.
    for path in PATHS {
        let r = Probe::new(path, &["vmm", "1536"])
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "2048m")
            .output();
        for step in ["create", "map", "release", "unmap", "retain"] {
            assert_eq!(r.int(step), 0, "{path} {step}: {}", r.stdout);
        }
        assert_eq!(
            r.int("mapped_device_used_mib"),
            1536,
            "{path}: the driver still holds it"
        );
        assert_eq!(r.int("mapped_free_mib"), 512, "{path}: so does the claim");
        assert_eq!(
            r.int("alloc_while_mapped"),
            CUDA_ERROR_OUT_OF_MEMORY,
            "{path}"
        );
        assert_eq!(r.int("unmapped_device_used_mib"), 0, "{path}");
        assert_eq!(r.int("unmapped_free_mib"), 2048, "{path}");
        assert_eq!(r.int("alloc_after_unmap"), 0, "{path}");
        assert_eq!(r.int("retained_device_used_mib"), 1536, "{path}");
        assert_eq!(r.int("retained_free_mib"), 512, "{path}");
        assert_eq!(
            r.int("alloc_while_retained"),
            CUDA_ERROR_OUT_OF_MEMORY,
            "{path}"
        );
        assert_eq!(r.int("released_free_mib"), 2048, "{path}");
        assert_eq!(r.int("alloc_after_release"), 0, "{path}");
    }
}

#[test]
fn a_library_opened_with_deepbind_is_held_to_the_limit() {
    for how in ["linked", "dlsym"] {
        let control = Probe::bare("direct", &["deepbind", "1024", how]).output();
        assert_eq!(control.int("allocated"), 79, "{how}: the driver alone");
        let r = Probe::new("direct", &["deepbind", "1024", how])
            .env("CUDA_DEVICE_MEMORY_LIMIT", "4g")
            .output();
        assert_eq!(r.int("allocated"), 4, "{how}: {}", r.stderr);
        assert!(
            r.stderr.contains("RTLD_DEEPBIND"),
            "{how}: said once: {}",
            r.stderr
        );
    }
}

#[test]
fn limits_are_per_device() {
    let limited = Probe::new("procaddr", &["fill", "512"])
        .env("CUDA_DEVICE_MEMORY_LIMIT_1", "1g")
        .env("PROBE_DEVICE", "1")
        .output();
    assert_eq!(limited.int("allocated"), 2);
    let other = Probe::new("procaddr", &["fill", "1024"])
        .env("CUDA_DEVICE_MEMORY_LIMIT_1", "1g")
        .output();
    assert_eq!(other.int("allocated"), 79, "device 0 has no limit");
}

#[test]
fn threads_allocating_at_once_never_pass_the_limit_and_leave_nothing_behind() {
    let r = Probe::new("procaddr", &["threads", "2000", "768"])
        .env("CUDA_DEVICE_MEMORY_LIMIT", "2g")
        .output();
    // 8 threads × 768 MiB against 2 GiB, all holding at once in the first
    // round: exactly two fit, so at least six are refused; none leaks.
    assert_eq!(r.int("free_mib"), 2048, "{}", r.stdout);
    assert!(r.int("refused") >= 6, "{}", r.stdout);
}

fn shared_env(probe: Probe, cache: &std::path::Path) -> Probe {
    probe
        .env("CUDA_DEVICE_MEMORY_LIMIT_0", "4096m")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", cache)
}

#[test]
fn two_processes_share_one_limit_and_nvml_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("claim.cache");
    let mut holder = shared_env(Probe::new("direct", &["hold", "3072"]), &cache).spawn();
    wait_for_line(&mut holder, "held=1");
    let second = shared_env(Probe::new("dlsym", &["fill", "512"]), &cache).output();
    assert_eq!(second.int("allocated"), 2, "only the 1 GiB the first left");
    assert_eq!(second.int("total_mib"), 4096);
    let nvml = shared_env(Probe::new("dlsym", &["nvml"]), &cache).output();
    assert_eq!(nvml.int("nvml_total_mib"), 4096);
    assert_eq!(
        nvml.int("nvml_used_mib"),
        3072,
        "NVML counts the whole claim"
    );
    assert_eq!(nvml.int("nvml_free_mib"), 1024);
    assert_eq!(nvml.int("nvml2_total_mib"), 4096);
    assert_eq!(nvml.int("nvml2_used_mib"), 3072);
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn without_a_named_file_the_processes_of_a_container_share_one_limit_as_in_hami_core() {
    // No CUDA_DEVICE_MEMORY_SHARED_CACHE: HAMi-core's default file (under $TMPDIR here).
    let dir = tempfile::tempdir().unwrap();
    let limited = |probe: Probe| {
        probe
            .env("CUDA_DEVICE_MEMORY_LIMIT_0", "4096m")
            .env("TMPDIR", dir.path())
    };
    let mut holder = limited(Probe::new("direct", &["hold", "3072"])).spawn();
    wait_for_line(&mut holder, "held=1");
    let second = limited(Probe::new("procaddr", &["fill", "512"])).output();
    assert_eq!(second.int("allocated"), 2, "only the 1 GiB the first left");
    assert!(dir.path().join("cudevshr.cache").is_file());
    holder.kill().unwrap();
    holder.wait().unwrap();
}

#[test]
fn a_forked_child_counts_in_a_slot_of_its_own_and_its_charges_go_when_it_dies() {
    // The parent uses the library before fork; the child allocates 3 GiB of the 4 GiB and dies
    // without freeing, by _exit or SIGKILL, while the parent lives on.
    for how in ["exit", "kill"] {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("claim.cache");
        let r = shared_env(Probe::new("procaddr", &["forkdie", "3072", how]), &cache).output();
        assert_eq!(r.int("child_alloc"), 0, "{how}: {}", r.stdout);
        assert_eq!(
            r.int("parent_free_mib"),
            4096,
            "{how}: the child's charge is gone"
        );
        assert_eq!(r.int("parent_alloc"), 0, "{how}: {}", r.stderr);
    }
}

#[test]
fn a_killed_processs_memory_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("claim.cache");
    let mut holder = shared_env(Probe::new("procaddr", &["hold", "4096"]), &cache).spawn();
    wait_for_line(&mut holder, "held=1");
    let blocked = shared_env(Probe::new("procaddr", &["try", "1024"]), &cache).output();
    assert_eq!(blocked.int("rc"), CUDA_ERROR_OUT_OF_MEMORY);
    // SIGKILL: no destructor, no atexit; only the kernel's release of the file locks.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let after = shared_env(Probe::new("procaddr", &["fill", "1024"]), &cache).output();
    assert_eq!(after.int("allocated"), 4);
}

#[test]
fn a_foreign_accounting_file_falls_back_to_counting_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hami.cache");
    std::fs::write(&cache, b"not ours").unwrap();
    let r = shared_env(Probe::new("direct", &["fill", "1024"]), &cache).output();
    assert_eq!(r.int("allocated"), 4);
    assert!(
        r.stderr.contains("not a vgpu accounting file"),
        "{}",
        r.stderr
    );
}

/// Tests that measure the simulated timeline run one at a time: its clock is the wall clock,
/// and two of them at once on 2 cores would measure each other.
static TIMELINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn timeline() -> std::sync::MutexGuard<'static, ()> {
    TIMELINE.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_long_graph_pays_for_its_whole_run() {
    let _timeline = timeline();
    // Graphs of 20 and 80 ms against a 30 % share: one launch used to cost one token.
    for graph_ms in [20, 80] {
        let r = Probe::new("procaddr", &["graphs", "5"])
            .env("CUDA_DEVICE_SM_LIMIT", "30")
            .env("STUB_GRAPH_NS", (graph_ms * 1_000_000).to_string())
            .output();
        let busy = r.num("busy");
        assert!(
            (busy - 0.30).abs() <= 0.07,
            "{graph_ms} ms graphs: busy {busy:.3}\n{}\n{}",
            r.stdout,
            r.stderr
        );
    }
}

#[test]
fn without_per_process_utilization_the_throttle_runs_open_loop_and_says_so() {
    let _timeline = timeline();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("claim.cache");
    let r = Probe::new("procaddr", &["launch", "4", "64"])
        .env("CUDA_DEVICE_SM_LIMIT", "30")
        .env("STUB_NVML_NO_PROCESS_UTIL", "1")
        .env("CUDA_DEVICE_MEMORY_LIMIT", "80g")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", &cache)
        .output();
    let busy = r.num("busy");
    assert!((busy - 0.30).abs() <= 0.07, "busy {busy:.3}\n{}", r.stderr);
    assert!(
        r.stderr
            .contains("WARNING: device 0: NVML cannot report the claim's utilization"),
        "{}",
        r.stderr
    );
    // The metric: the flag in the process's slot of the accounting file (the first slot: the
    // slots start at 4096, the flags are the slot's fourth u32).
    let file = std::fs::read(&cache).unwrap();
    let flags = u32::from_le_bytes(file[4096 + 12..4096 + 16].try_into().unwrap());
    assert_eq!(flags & 1, 1, "open-loop flag set");
}

#[test]
fn throttling_brings_a_launch_loop_to_the_target_share() {
    let _timeline = timeline();
    let tolerance = 0.07;
    let free = Probe::new("procaddr", &["launch", "3", "64"]).output();
    assert!(free.num("busy") > 0.9, "unthrottled: {}", free.stdout);
    // HAMi-core's switch, in either of the cases it accepts.
    for policy in ["disable", "DISABLE"] {
        let off = Probe::new("procaddr", &["launch", "3", "64"])
            .env("CUDA_DEVICE_SM_LIMIT", "30")
            .env("GPU_CORE_UTILIZATION_POLICY", policy)
            .output();
        assert!(off.num("busy") > 0.9, "{policy}: {}", off.stdout);
    }
    for (variable, target, path, pid_offset) in [
        ("CUDA_DEVICE_SM_LIMIT", 30, "procaddr", "0"),
        ("CUDA_DEVICE_SM_LIMIT", 60, "direct", "0"),
        // HAMi-core's per-device variable (the probe runs on device 0).
        ("CUDA_DEVICE_SM_LIMIT_0", 30, "direct", "0"),
        // NVML reporting host PIDs the process cannot see, as in a container.
        ("CUDA_DEVICE_SM_LIMIT", 30, "dlsym", "100000"),
    ] {
        let r = Probe::new(path, &["launch", "4", "64"])
            .env(variable, target.to_string())
            .env("STUB_NVML_PID_OFFSET", pid_offset)
            .output();
        let busy = r.num("busy");
        let want = f64::from(target) / 100.0;
        assert!(
            (busy - want).abs() <= tolerance,
            "{variable}={target} via {path} (pid offset {pid_offset}): busy {busy:.3}\n{}",
            r.stderr
        );
    }
}

#[test]
fn the_switch_turns_everything_off() {
    let r = Probe::new("procaddr", &["fill", "1024"])
        .env("CUDA_DISABLE_CONTROL", "true")
        .env("CUDA_DEVICE_MEMORY_LIMIT", "4g")
        .output();
    assert_eq!(r.int("allocated"), 79);
    assert!(
        r.stderr.contains("CUDA_DISABLE_CONTROL is set"),
        "{}",
        r.stderr
    );
}

#[test]
fn malformed_variables_are_reported_once_and_never_crash_the_process() {
    use std::os::unix::ffi::OsStrExt;
    let garbage: &[&[u8]] = &[
        b"",
        b"m",
        b"-1",
        b"4gg",
        b"1e9",
        b"99999999999999999999999g",
        b"\xff\xfe",
        b" 4 g",
        b"0x10",
        b"%s%n",
        b"4096m\n1",
    ];
    for value in garbage {
        let value = std::ffi::OsStr::from_bytes(value);
        let r = Probe::new("procaddr", &["fill", "1024"])
            .env("CUDA_DEVICE_MEMORY_LIMIT", value)
            .env("CUDA_DEVICE_SM_LIMIT", value)
            .env("CUDA_DISABLE_CONTROL", value)
            .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", value)
            .output();
        assert!(r.status.success(), "{value:?}: {}\n{}", r.status, r.stderr);
        assert!(r.int("allocated") > 0, "{value:?}");
        if !value.is_empty() {
            assert_eq!(
                r.stderr.matches("CUDA_DEVICE_MEMORY_LIMIT=").count(),
                1,
                "{value:?}: {}",
                r.stderr
            );
        }
    }
}

#[test]
fn the_plugins_reader_sees_a_real_claims_use_refusals_and_processes() {
    // The contract between the library and the kubelet plugin, across processes: what the
    // preloaded library writes, vgpu-accounting reads as the plugin's metrics do.
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("claim.cache");
    let mut holder = shared_env(Probe::new("direct", &["hold", "3072"]), &cache).spawn();
    wait_for_line(&mut holder, "held=1");
    let refused = shared_env(Probe::new("procaddr", &["try", "2048"]), &cache).output();
    assert_eq!(refused.int("rc"), CUDA_ERROR_OUT_OF_MEMORY);
    let usage = vgpu_accounting::read(&cache).unwrap();
    let gpu = usage.devices[0];
    assert_eq!(gpu.used_bytes, 3 << 30);
    assert_eq!(gpu.peak_bytes, 3 << 30);
    assert_eq!(gpu.cap_failures, 1);
    assert_eq!(usage.processes.len(), 1, "the refused process is gone");
    assert_eq!(usage.processes[0].pid, holder.id());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(usage.processes[0].host_name, host.trim());
    holder.kill().unwrap();
    holder.wait().unwrap();
    let usage = vgpu_accounting::read(&cache).unwrap();
    assert_eq!(
        usage.devices[0].used_bytes, 0,
        "a killed process holds nothing"
    );
    assert_eq!(
        usage.devices[0].peak_bytes,
        3 << 30,
        "the claim's peak stays"
    );
}
