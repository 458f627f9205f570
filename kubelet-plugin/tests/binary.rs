//! The binary itself: flags and help, a plain failure without NVML, and a full run with a
//! fake inventory against the fake API server that stops cleanly on SIGTERM.

mod common;

use common::*;
use fake_apiserver::DraVersions;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_kubelet-plugin");

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--driver-name", "DRIVER_NAME"),
        ("--node-name", "NODE_NAME"),
        ("--kubeconfig", "KUBECONFIG"),
        ("--fake-gpus", "FAKE_GPUS"),
        ("--cdi-root", "CDI_ROOT"),
        ("--plugin-dir", "PLUGIN_DIR"),
        ("--registrar-dir", "REGISTRAR_DIR"),
        ("--enforcement-library", "ENFORCEMENT_LIBRARY"),
        ("--metrics-addr", "METRICS_ADDR"),
        ("--log-format", "LOG_FORMAT"),
        ("--rolling-update-uid", "POD_UID"),
        ("--healthcheck-port", "HEALTHCHECK_PORT"),
        ("--daemonset-name", "DAEMONSET_NAME"),
        ("--namespace", "POD_NAMESPACE"),
    ] {
        let block = help
            .split("\n  -")
            .find(|b| b.contains(flag))
            .unwrap_or_else(|| panic!("{flag} missing from --help:\n{help}"));
        assert!(
            block.contains(&format!("[env: {env}")),
            "{flag}: no env fallback:\n{block}"
        );
        assert!(block.contains('.'), "{flag}: no explanation:\n{block}");
    }
    assert!(help.contains("[default: /var/run/cdi]"), "{help}");
    assert!(help.contains("[default: 51515]"), "{help}");
    assert!(
        help.contains("[default: /usr/local/vgpu/libvgpu.so]"),
        "{help}"
    );
}

#[test]
fn without_nvml_the_binary_says_so_and_fails() {
    let has_nvml = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libnvidia-ml.so.1"))
        .unwrap_or(false);
    let out = Command::new(BIN)
        .args(["--node-name", "n1", "--metrics-addr", "127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .env_remove("FAKE_GPUS")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "started without NVML and without a cluster"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !has_nvml {
        assert!(
            stderr.contains("NVML (libnvidia-ml.so.1) could not be loaded")
                && stderr.contains("--fake-gpus"),
            "{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_with_fake_gpus_and_stops_cleanly_on_sigterm() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let kubeconfig = h.path("kubeconfig");
    std::fs::write(&kubeconfig, h.server.kubeconfig(Some(SECRET))).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        // The most verbose logs, kube-rs and hyper included, still never show the token.
        .env("RUST_LOG", "trace")
        .args([
            "--node-name",
            NODE,
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(h.binary_args(&kubeconfig))
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drained while it runs: trace logs fill a pipe long before the plugin stops.
    let drain = |mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
        tokio::spawn(async move {
            let mut text = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut text)
                .await
                .unwrap();
            text
        })
    };
    let stderr_reader = drain(Box::new(child.stderr.take().unwrap()));
    let stdout_reader = drain(Box::new(child.stdout.take().unwrap()));
    h.eventually("the registration socket", || {
        h.registration_socket().exists()
    })
    .await;
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-0"], "1Gi", 10));
    let answer = h
        .v1()
        .await
        .node_prepare_resources(vgpu_proto::dra::v1::NodePrepareResourcesRequest {
            claims: vec![v1_claim(&uid, "train")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.claims[&uid].error, "");

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the plugin stops within 15 s of SIGTERM")
        .unwrap();
    let stderr = stderr_reader.await.unwrap();
    let stdout = stdout_reader.await.unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        !h.dra_socket().exists() && !h.registration_socket().exists(),
        "{stderr}"
    );
    // Structured logs: one JSON object per line.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    assert!(
        !stderr.contains(SECRET) && !stdout.contains(SECRET),
        "the bearer token is in the logs"
    );
    assert!(
        stderr.contains("NodePrepareResources") || stderr.len() > 10_000,
        "trace logs were on"
    );
}

/// A bearer token in the kubeconfig: it must never reach a log line.
const SECRET: &str = "SECRET-bearer-7f3a9c0d";

#[test]
fn install_library_copies_atomically_with_mode_0755() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("image/libvgpu.so");
    std::fs::create_dir_all(from.parent().unwrap()).unwrap();
    std::fs::write(&from, b"\x7fELF library bytes").unwrap();
    let to = dir.path().join("host/usr/local/vgpu/libvgpu.so");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_install-library"))
        .arg("--from")
        .arg(&from)
        .arg("--to")
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&to).unwrap(), b"\x7fELF library bytes");
    assert_eq!(
        std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let leftovers: Vec<_> = std::fs::read_dir(to.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    // A missing source is an error that names it, and nothing is installed.
    let other = dir.path().join("host/other.so");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_install-library"))
        .args(["--from", "/nonexistent/libvgpu.so", "--to"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/libvgpu.so"));
    assert!(!other.exists());
}

/// Run the binary with the harness's flags, `extra` (flag, value) pairs in place of those
/// flags, to its exit; its stderr.
async fn failing_start(h: &Harness, node: &str, extra: &[&std::ffi::OsStr]) -> String {
    let kubeconfig = h.path("kubeconfig");
    std::fs::write(&kubeconfig, h.server.kubeconfig(None)).unwrap();
    let base = h.binary_args(&kubeconfig);
    let replaced: Vec<&std::ffi::OsStr> = extra.iter().step_by(2).copied().collect();
    let kept = base
        .chunks(2)
        .filter(|pair| !replaced.contains(&pair[0].as_os_str()))
        .flatten();
    let out = tokio::process::Command::new(BIN)
        .args(["--node-name", node, "--metrics-addr", "127.0.0.1:0"])
        .args(kept)
        .args(extra)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("a start-up error ends the process")
        .unwrap();
    assert!(!out.status.success(), "started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_node_name_says_once_what_to_fix() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let stderr = failing_start(&h, "no-such-node", &[]).await;
    let hint =
        "Node \"no-such-node\" not found: --node-name/NODE_NAME must be the name of this node";
    assert_eq!(stderr.matches(hint).count(), 1, "{stderr}");
    assert!(stderr.contains("spec.nodeName"), "{stderr}");
    assert_eq!(stderr.matches("not found").count(), 1, "{stderr}");
    // Nothing was written on the host for a node that is not this one.
    assert!(!h.path("plugins").exists(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_plugin_and_registrar_directories_name_the_flag_and_the_mount() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // Below a regular file: no directory can be made there, even as root.
    let file = h.path("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let bad = file.join("plugins/vgpu.hami.io");
    let stderr = failing_start(&h, NODE, &["--plugin-dir".as_ref(), bad.as_os_str()]).await;
    assert_eq!(
        stderr.matches("--plugin-dir/PLUGIN_DIR").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains(&bad.display().to_string())
            && stderr.contains("the DaemonSet must mount the host's"),
        "{stderr}"
    );
    let bad = file.join("plugins_registry");
    let stderr = failing_start(&h, NODE, &["--registrar-dir".as_ref(), bad.as_os_str()]).await;
    assert_eq!(
        stderr.matches("--registrar-dir/REGISTRAR_DIR").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("mount the host's /var/lib/kubelet/plugins_registry there"),
        "{stderr}"
    );
}

#[test]
fn no_kubeconfig_outside_a_cluster_says_what_to_set() {
    let home = tempfile::tempdir().unwrap();
    let inventory = home.path().join("inventory.yaml");
    std::fs::write(&inventory, example("fake-gpus-hgx-h100.yaml")).unwrap();
    let out = Command::new(BIN)
        .args(["--node-name", "n1", "--metrics-addr", "127.0.0.1:0"])
        .arg("--fake-gpus")
        .arg(&inventory)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("--kubeconfig/KUBECONFIG").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("KUBERNETES_SERVICE_HOST"), "{stderr}");
}

/// One run of the binary told its DaemonSet: `during` runs while it serves, then SIGTERM;
/// its stderr once it has stopped.
async fn run_until_sigterm<F: std::future::Future<Output = ()>>(
    h: &Harness,
    during: impl FnOnce() -> F,
) -> String {
    let kubeconfig = h.path("kubeconfig");
    std::fs::write(&kubeconfig, h.server.kubeconfig(None)).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["--node-name", NODE, "--metrics-addr", "127.0.0.1:0"])
        .args(["--daemonset-name", "vgpu-kubelet-plugin"])
        .args(["--namespace", "vgpu-system"])
        .args(h.binary_args(&kubeconfig))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut text)
            .await
            .unwrap();
        text
    });
    h.eventually("the registration socket", || {
        h.registration_socket().exists()
    })
    .await;
    during().await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the plugin stops within 15 s of SIGTERM")
        .unwrap();
    let stderr = stderr.await.unwrap();
    assert!(status.success(), "{status}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uninstall_leaves_no_file_on_the_host_once_nothing_is_prepared() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    h.server.register(fake_apiserver::ResourceKind::new(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        true,
        true,
    ));
    let daemonsets = fake_apiserver::Gvr::new("apps", "v1", "daemonsets");
    h.server
        .put_object(
            daemonsets.clone(),
            serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": {"name": "vgpu-kubelet-plugin", "namespace": "vgpu-system"},
                   "spec": {"selector": {"matchLabels": {"app": "p"}},
                            "template": {"metadata": {"labels": {"app": "p"}},
                                         "spec": {"containers": [{"name": "p", "image": "p"}]}}}}),
        )
        .unwrap();
    let plugin_dir = h.config().plugin_dir;
    let library = h.config().enforcement_library;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-0"], "1Gi", 10));
    let prepare = || async {
        let answer = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
        assert_eq!(answer.claims[&uid].error, "");
    };

    // A restart or rolling update: the DaemonSet is there, everything stays.
    let stderr = run_until_sigterm(&h, prepare).await;
    assert!(stderr.contains("host files kept"), "{stderr}");
    assert!(plugin_dir.join("checkpoint.json").is_file() && library.is_file());

    // Uninstalled while a pod still uses its claim: nothing is removed, the claim is named.
    h.server
        .delete_object(daemonsets, "vgpu-system", "vgpu-kubelet-plugin")
        .unwrap();
    let stderr = run_until_sigterm(&h, || async {}).await;
    assert!(
        stderr.contains("claims still prepared") && stderr.contains(&uid),
        "{stderr}"
    );
    assert!(plugin_dir.join("checkpoint.json").is_file() && library.is_file());
    assert!(plugin_dir.join("claims").join(&uid).is_dir());

    // Once the claim is unprepared: nothing of the plugin's is left on the host, even when...
    let unprepare = || async {
        h.v1()
            .await
            .node_unprepare_resources(vgpu_proto::dra::v1::NodeUnprepareResourcesRequest {
                claims: vec![v1_claim(&uid, "train")],
            })
            .await
            .unwrap();
    };
    // ...and the uninstall took the plugin's RBAC before its pod got SIGTERM (helm deletes the
    // DaemonSet, then Roles and ServiceAccounts): the deletion its watch saw decides.
    let forbidden = || async {
        unprepare().await;
        h.server
            .forbid(fake_apiserver::Gvr::new("apps", "v1", "daemonsets"));
    };
    let stderr = run_until_sigterm(&h, forbidden).await;
    assert!(
        stderr.contains("uninstall: removed from the host"),
        "{stderr}"
    );
    assert!(!plugin_dir.exists(), "{stderr}");
    assert!(!library.exists(), "{stderr}");
    assert!(!h.registration_socket().exists(), "{stderr}");
    // Nothing of ours in the CDI directory either.
    let cdi: Vec<_> = std::fs::read_dir(h.config().cdi_root)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(cdi.is_empty(), "{cdi:?}");
}
