//! The plugin's sockets as the real kubelet's grpc-go clients dial them: the Go program in
//! `proto/tests/grpc-go-client` uses the grpc-go release and the dial code of each kubelet we
//! support (1.32.13: grpc-go 1.65.0; 1.34.4: grpc-go 1.72.1). The plugin watcher dials the
//! registration socket by its bare path, so grpc-go sends a percent-encoded path as
//! `:authority`, which the `h2` crate refuses with RST_STREAM(PROTOCOL_ERROR) unless the
//! socket layer in `vgpu_proto::authority` repairs it: without it the plugin never registers.
//!
//! Needs the Go toolchain (every machine of this project has it); the client binaries are
//! built once per source version into `~/.cache/vgpu-dra` (`VGPU_DRA_CACHE_DIR` overrides).

mod common;

use common::*;
use fake_apiserver::DraVersions;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A kubelet release the Go client stands for.
#[derive(Clone, Copy, Debug)]
enum Kubelet {
    V1_32,
    V1_34,
}

impl Kubelet {
    fn grpc_go(self) -> &'static str {
        match self {
            Kubelet::V1_32 => "1.65.0",
            Kubelet::V1_34 => "1.72.1",
        }
    }

    /// The extra `go build` arguments: the go.mod and build tag of this release.
    fn build_args(self) -> &'static [&'static str] {
        match self {
            Kubelet::V1_32 => &["-modfile=kubelet-1.32.mod", "-tags=kubelet132"],
            Kubelet::V1_34 => &[],
        }
    }
}

fn client_sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/tests/grpc-go-client")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VGPU_DRA_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("vgpu-dra")
}

/// The Go client for `kubelet`, built into the cache unless this version of its sources
/// already is there.
fn go_client(kubelet: Kubelet) -> PathBuf {
    let src = client_sources();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("{}: {e}", src.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut hash = Sha256::new();
    for file in &files {
        hash.update(file.file_name().unwrap().as_encoded_bytes());
        hash.update(std::fs::read(file).unwrap());
    }
    hash.update(format!("{kubelet:?}"));
    let digest: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix = format!("grpc-go-client-{}-", kubelet.grpc_go());
    let dir = cache_dir();
    let binary = dir.join(format!("{prefix}{digest}"));
    if binary.is_file() {
        return binary;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let partial = dir.join(format!(".{prefix}{digest}.{}", std::process::id()));
    let out = std::process::Command::new("go")
        .arg("build")
        .args(kubelet.build_args())
        .arg("-trimpath")
        .arg("-o")
        .arg(&partial)
        .arg(".")
        .current_dir(&src)
        // The go.mod files pin every module; never switch toolchains or edit them.
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `go` ({e}): this test needs the Go toolchain (1.24 or later) on PATH \
                 to build the kubelet's grpc-go client in {}",
                src.display()
            )
        });
    assert!(
        out.status.success(),
        "building the grpc-go client for {kubelet:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &binary).unwrap();
    // Binaries of older versions of the sources are of no further use.
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && entry.path() != binary {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    binary
}

/// Run the client; its JSON lines, or a panic with its error (the kubelet's own wording).
async fn run_client(binary: &Path, args: &[String]) -> Vec<Value> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the grpc-go client did not finish within 60 s")
    .expect("run the grpc-go client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the grpc-go client failed ({}):\n{}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn calls<'a>(lines: &'a [Value], call: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["call"] == call).collect()
}

fn check_registration(lines: &[Value], versions: &[&str]) {
    let info = calls(lines, "GetInfo");
    assert_eq!(info.len(), 1, "{lines:#?}");
    let info = &info[0]["response"];
    assert_eq!(info["type"], "DRAPlugin", "{info}");
    assert_eq!(info["name"], DRIVER, "{info}");
    assert_eq!(
        info["endpoint"], "/var/lib/kubelet/plugins/vgpu.hami.io/dra.sock",
        "{info}"
    );
    assert_eq!(info["supported_versions"], serde_json::json!(versions));
    assert_eq!(calls(lines, "NotifyRegistrationStatus").len(), 1);
}

/// Each prepare answered the claim with its CDI device, each unprepare without error, on
/// every `(service, dial)` given.
fn check_dra(lines: &[Value], uid: &str, expected: &[(&str, &str)]) {
    for (service, dial) in expected {
        let of = |call: &str| -> Vec<&Value> {
            calls(lines, &format!("{service}.{call}"))
                .into_iter()
                .filter(|l| l["dial"] == *dial)
                .collect()
        };
        let prepared = of("NodePrepareResources");
        assert_eq!(
            prepared.len(),
            1,
            "{service} over the {dial} dial: {lines:#?}"
        );
        let claim = &prepared[0]["response"]["claims"][uid];
        assert!(claim.get("error").is_none(), "{claim}");
        assert_eq!(
            claim["devices"][0]["cdi_device_ids"],
            serde_json::json!([format!("k8s.vgpu.hami.io/claim={uid}-gpu")]),
            "{service} over the {dial} dial: {claim}"
        );
        let unprepared = of("NodeUnprepareResources");
        assert_eq!(unprepared.len(), 1, "{service} over the {dial} dial");
        // An empty answer arrives as a nil message (prost leaves default map values out);
        // the kubelet reads it with the nil-safe GetError.
        let claim = unprepared[0]["response"]["claims"]
            .get(uid)
            .unwrap_or_else(|| panic!("{service} over the {dial} dial: {}", unprepared[0]));
        assert!(claim.get("error").is_none(), "{claim}");
    }
}

fn args(h: &Harness, uid: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("-registration={}", h.registration_socket().display()),
        format!("-dra={}", h.dra_socket().display()),
        format!("-claim=ml/gpu-claim/{uid}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_1_34_grpc_go_registers_and_prepares_over_v1_and_v1beta1() {
    let client = tokio::task::spawn_blocking(|| go_client(Kubelet::V1_34))
        .await
        .unwrap();
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("gpu-claim", &["gpu-2"], "4Gi", 30));

    // As the kubelet dials: the registration socket by its bare path (a percent-encoded
    // `:authority`), the DRA socket as `unix:<path>` (`localhost`) and by its bare path.
    let lines = run_client(&client, &args(&h, &uid, &[])).await;
    check_registration(&lines, &["v1.DRAPlugin", "v1beta1.DRAPlugin"]);
    let every_dial = [
        ("v1", "manager"),
        ("v1", "legacy"),
        ("v1beta1", "manager"),
        ("v1beta1", "legacy"),
    ];
    check_dra(&lines, &uid, &every_dial);

    // grpc-go releases before the percent-encoding sent the socket path itself.
    let path = format!("-authority={}", h.registration_socket().display());
    let lines = run_client(&client, &args(&h, &uid, &[&path])).await;
    check_registration(&lines, &["v1.DRAPlugin", "v1beta1.DRAPlugin"]);
    check_dra(&lines, &uid, &every_dial);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_1_32_grpc_go_registers_and_prepares_over_v1beta1() {
    let client = tokio::task::spawn_blocking(|| go_client(Kubelet::V1_32))
        .await
        .unwrap();
    let h = Harness::new(
        DraVersions::V1beta1Only,
        &example("fake-gpus-hgx-h100.yaml"),
    )
    .await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("gpu-claim", &["gpu-2"], "4Gi", 30));

    // 1.32 dials both sockets by their bare paths.
    let lines = run_client(&client, &args(&h, &uid, &[])).await;
    check_registration(&lines, &["v1.DRAPlugin", "v1beta1.DRAPlugin"]);
    check_dra(&lines, &uid, &[("v1beta1", "legacy")]);
    running.shutdown().await.unwrap();
}
