//! The simulator: the embedded default, the shipped DeviceClasses and examples, bad input, and
//! the binary's command line.

use controller::engine::{Mode, Policies};
use controller::simulate::{self, Outcome, default, input, report};
use dra::ApiVersion;
use std::path::PathBuf;
use test_support::validate_k8s;
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{DEFAULT_DRIVER_NAME, Inventory, NodeRef, PoolOptions};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_default_places_everything_that_fits_and_outputs_valid_claims() {
    let sim = simulate::run(
        DEFAULT_DRIVER_NAME,
        input::parse(&default::yaml()).unwrap(),
        Policies::default(),
        Mode::Controller,
    );
    let refused: Vec<String> = sim
        .claims
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Refused(_)))
        .map(|(c, _)| c.view().unwrap().name)
        .collect();
    assert_eq!(
        refused,
        vec![
            "too-big-memory",
            "too-many-peers",
            "wrong-model",
            "eight-big-slices"
        ]
    );
    let s = report::summary(&sim);
    assert_eq!((s.placed, s.refused, s.gpus), (60, 4, 32));
    let table = report::table(&sim);
    assert!(
        table.contains("NODE gpu-node-4") && table.contains("SUMMARY claims placed 60"),
        "{table}"
    );
    for line in [
        "ml/too-big-memory: InsufficientCapacity: request gpu needs 1 GPU with 100Gi and 10% cores free",
        "ml/too-many-peers: NoMatchingGpu: request gpu wants 9 GPUs",
        "ml/wrong-model: NoMatchingGpu: request gpu: no GPU matches",
    ] {
        assert!(table.contains(line), "{line} missing from {table}");
    }
    let objects = sim.claim_objects();
    assert_eq!(objects.len(), 64);
    // yaml and json carry the reasons the table prints, word for word.
    let reasons: Vec<(String, String)> = objects
        .iter()
        .filter_map(|o| {
            let reason = o["metadata"]["annotations"][simulate::REFUSED_ANNOTATION].as_str()?;
            Some((
                o["metadata"]["name"].as_str()?.to_string(),
                reason.to_string(),
            ))
        })
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    for (name, reason) in &reasons {
        assert!(
            table.contains(&format!("ml/{name}: {reason}\n")),
            "{name}: {reason} is not the table's"
        );
    }
    assert!(
        objects
            .iter()
            .filter(|o| !o["status"]["allocation"].is_null())
            .count()
            == 60
    );
    validate_k8s(&objects, "1.34.0").unwrap();
}

#[test]
fn binpack_leaves_whole_gpus_free_where_spread_does_not() {
    use vgpu_driver::config::{Policy, Topology};
    let run = |gpu| {
        let sim = simulate::run(
            DEFAULT_DRIVER_NAME,
            input::parse(&default::yaml()).unwrap(),
            Policies {
                node: Policy::Binpack,
                gpu,
                topology: Topology::Preferred,
            },
            Mode::Controller,
        );
        report::summary(&sim)
    };
    let (binpack, spread) = (run(Policy::Binpack), run(Policy::Spread));
    assert!(
        binpack.gpus_untouched > spread.gpus_untouched,
        "{binpack:?} vs {spread:?}"
    );
    assert!(binpack.fragmentation < spread.fragmentation);
}

/// A cluster of 2 HGX nodes in the given API version, the shipped DeviceClasses and examples.
fn examples_workload(version: ApiVersion) -> String {
    let (dir, manifest) = match version {
        ApiVersion::V1 => ("v1", "vgpu-dra.yaml"),
        ApiVersion::V1beta1 => ("v1beta1", "vgpu-dra-1.32.yaml"),
    };
    let gpus = Inventory::from_yaml(include_str!("../../driver/testdata/hgx-h100.yaml"))
        .unwrap()
        .gpus;
    let devices = gpu_devices(&gpus).unwrap();
    let mut text = String::new();
    for n in 1..=2 {
        let name = format!("node-{n}");
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"
        ));
        for s in render_pool(
            &NodeRef {
                name: name.clone(),
                uid: format!("uid-{n}"),
            },
            &devices,
            &PoolOptions::new(DEFAULT_DRIVER_NAME),
        )
        .unwrap()
        {
            let mut json = dra::convert::to_wire(&s, version);
            json["metadata"]["name"] = serde_json::json!(format!("{name}-slice"));
            text.push_str(&format!(
                "---\n{}",
                serde_yaml_ng::to_string(&json).unwrap()
            ));
        }
    }
    text.push_str(&shipped_device_classes(manifest));
    text.push_str(&examples(dir, 6));
    text
}

/// The DeviceClasses of a shipped installation (deploy/manifests/<file>, the Helm chart
/// rendered), as multi-document YAML.
fn shipped_device_classes(file: &str) -> String {
    let text = std::fs::read_to_string(repo().join("deploy/manifests").join(file)).unwrap();
    let mut out = String::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] == "DeviceClass" {
            out.push_str(&format!("---\n{}", serde_yaml_ng::to_string(&doc).unwrap()));
        }
    }
    assert!(!out.is_empty(), "{file} has no DeviceClass");
    out
}

/// Every file of deploy/examples/<dir>, as one multi-document YAML.
fn examples(dir: &str, count: usize) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/examples").join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), count, "{dir}");
    let mut text = String::new();
    for f in files {
        text.push_str("\n---\n");
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    text
}

#[test]
fn every_shipped_example_is_allocatable_with_the_shipped_classes() {
    for (version, k8s) in [(ApiVersion::V1, "1.34.0"), (ApiVersion::V1beta1, "1.32.0")] {
        let workload = input::parse(&examples_workload(version)).unwrap();
        assert_eq!(workload.inputs.pods.len(), 6, "{version:?}");
        let sim = simulate::run(
            DEFAULT_DRIVER_NAME,
            workload,
            Policies::default(),
            Mode::Controller,
        );
        for (claim, outcome) in &sim.claims {
            let name = claim.view().unwrap().name;
            match outcome {
                Outcome::Placed(a) => assert!(!a.results.is_empty(), "{name}"),
                // The whole-GPU example is the kube-scheduler's to allocate.
                Outcome::NotOurs => assert_eq!(name, "whole-gpu-gpu", "{version:?}"),
                other => panic!("{version:?}: example claim {name} was not placed: {other:?}"),
            }
        }
        let placed = sim
            .claims
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Placed(_)))
            .count();
        assert_eq!(placed, 5, "{version:?}");
        let objects = sim.claim_objects();
        assert!(
            objects.iter().all(|o| o["apiVersion"] == version.as_str()),
            "{version:?}: claims are given back in the version they were read in"
        );
        validate_k8s(&objects, k8s).unwrap();
    }
}

#[test]
fn bad_input_names_the_document_and_field() {
    let err = input::parse(
        "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {unschedulable: maybe}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("document 0") && err.contains("Node n") && err.contains("spec.unschedulable"),
        "{err}"
    );
    let err = input::parse("---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\n: : :\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("document 1"), "{err}");
    let err = input::parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: ml}\nspec:\n  containers: []\n  resourceClaims: [{name: gpu, resourceClaimTemplateName: missing}]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ResourceClaimTemplate ml/missing is not in the input"),
        "{err}"
    );
    // A v1beta1 claim is converted as it is read; a bad field still names the document.
    let err = input::parse("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n---\napiVersion: resource.k8s.io/v1beta1\nkind: ResourceClaim\nmetadata: {name: c, namespace: ml}\nspec:\n  devices:\n    requests: [{name: gpu, deviceClassName: x, count: two}]\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 1 (ResourceClaim c)")
            && err.contains("spec.devices.requests[0]")
            && err.contains("count"),
        "{err}"
    );
    let w = input::parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: ml}\n").unwrap();
    assert_eq!(w.ignored, vec!["v1 Namespace ml".to_string()]);
    // `kubectl get -o yaml` output: a List whose items are the objects.
    let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: ml}\n";
    let w = input::parse(list).unwrap();
    assert_eq!(w.inputs.nodes.len(), 1);
    assert_eq!(w.ignored, vec!["v1 Namespace ml".to_string()]);
}

/// `controller simulate ... | head`: a reader that has gone ends the output quietly (exit 0,
/// nothing on stderr), in every output format.
#[test]
fn a_closed_stdout_ends_the_output_without_a_panic() {
    let bin = env!("CARGO_BIN_EXE_controller");
    for args in [
        &["simulate"][..],
        &["simulate", "-o", "yaml"],
        &["simulate", "-o", "json"],
        &["simulate", "--print-default"],
        &["simulate", "-o", "svg", "--compare", "node=spread"],
    ] {
        // The read end is closed before the binary starts: its first write meets EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(bin)
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn the_binary_runs_the_main_job() {
    let bin = env!("CARGO_BIN_EXE_controller");
    let out = std::process::Command::new(bin)
        .arg("simulate")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("SUMMARY claims placed 60, refused 4"),
        "{table}"
    );
    let out = std::process::Command::new(bin)
        .args(["simulate", "-o", "json", "--gpu-policy", "binpack"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 64);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, "apiVersion: v1\nkind: Node\nmetadata: {}\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["simulate", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metadata.name is required") && stderr.contains("broken.yaml"),
        "{stderr}"
    );
}

#[test]
fn native_mode_places_first_fit_shares_like_the_scheduler() {
    let workload = || input::parse(&default::yaml()).unwrap();
    let native = simulate::run(
        DEFAULT_DRIVER_NAME,
        workload(),
        Policies::default(),
        Mode::Native,
    );
    let controller = simulate::run(
        DEFAULT_DRIVER_NAME,
        workload(),
        Policies::default(),
        Mode::Controller,
    );
    let step = vgpu_driver::capacity::NATIVE_MEMORY_STEP;
    let mut shares = std::collections::BTreeSet::new();
    let mut first = None;
    for (object, outcome) in &native.claims {
        let Outcome::Placed(allocation) = outcome else {
            continue;
        };
        for result in &allocation.results {
            let share = result
                .share_id
                .clone()
                .expect("a native result has a shareID");
            assert!(shares.insert(share), "shareIDs are unique");
            let memory = result.consumed_capacity["memory"].to_bytes().unwrap();
            assert!(
                memory % step == 0 || memory == 81559 << 20,
                "{}: {memory} is rounded up to the step (or is the whole GPU)",
                object.view().unwrap().name
            );
            assert!(result.consumed_capacity.contains_key("cores"));
        }
        first.get_or_insert_with(|| {
            (
                allocation.node_name.clone(),
                allocation.results[0].device.clone(),
            )
        });
        // What prepare reads back from the allocation: the consumed share.
        for result in &allocation.results {
            let limits = allocation.slice_limits(result, 81559 << 20).unwrap();
            assert!(
                limits.exclusive || limits.memory_bytes % step == 0,
                "{limits:?}"
            );
        }
    }
    // First fit: the first claim goes to the first GPU of the first node by name.
    assert_eq!(
        first,
        Some((Some("gpu-node-1".to_string()), "gpu-0".to_string()))
    );
    // The controller's results carry neither field.
    for (_, outcome) in &controller.claims {
        if let Outcome::Placed(a) = outcome {
            assert!(
                a.results
                    .iter()
                    .all(|r| r.share_id.is_none() && r.consumed_capacity.is_empty())
            );
        }
    }
    let table = report::table(&native);
    assert!(table.starts_with("Mode native"), "{table}");
    // The claims with shareID and consumedCapacity are valid 1.34 objects.
    validate_k8s(&native.claim_objects(), "1.34.0").unwrap();
}

#[test]
fn every_native_example_is_allocatable_by_the_schedulers_rules() {
    // The native installation's share class beside the base classes, the native examples.
    let mut text = examples_workload(ApiVersion::V1);
    let classes = shipped_device_classes("vgpu-dra-native.yaml");
    let share = classes
        .split("---\n")
        .find(|doc| doc.contains("gpu-share.vgpu.hami.io"))
        .expect("the native installation has the share class");
    text.push_str("\n---\n");
    text.push_str(share);
    text.push_str(&examples("native", 2));
    let workload = input::parse(&text).unwrap();
    let sim = simulate::run(
        DEFAULT_DRIVER_NAME,
        workload,
        Policies::default(),
        Mode::Native,
    );
    let placed = |name: &str| {
        sim.claims
            .iter()
            .find(|(c, _)| c.view().unwrap().name == name)
            .and_then(|(_, o)| match o {
                Outcome::Placed(a) => Some(a.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name} was not placed"))
    };
    let share = placed("share-2gi-30pct-gpu");
    let consumed = &share.results[0].consumed_capacity;
    assert_eq!(consumed["memory"].to_bytes(), Some(2 << 30));
    assert_eq!(consumed["cores"].ceil_units(), 30);
    let two = placed("two-shares-gpus");
    assert_eq!(two.results.len(), 2);
    assert_ne!(
        two.results[0].device, two.results[1].device,
        "distinctAttribute keeps the shares on different GPUs"
    );
    assert!(
        two.results
            .iter()
            .all(|r| r.consumed_capacity["memory"].to_bytes() == Some(8 << 30))
    );
    validate_k8s(&sim.claim_objects(), "1.34.0").unwrap();
}

/// The `controller` binary, run to the end.
fn controller(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(args)
        .output()
        .unwrap()
}

/// The picture in the README is what the command draws today.
#[test]
fn the_readmes_picture_is_the_commands_output() {
    let out = controller(&["simulate", "-o", "svg", "--compare", "node=spread"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/simulate-binpack-vs-spread.svg");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(&committed).unwrap(),
        "regenerate it: cargo run -q -p controller -- simulate -o svg --compare node=spread > docs/simulate-binpack-vs-spread.svg"
    );
}

#[test]
fn compare_names_what_it_cannot_do() {
    let out = controller(&["simulate", "--compare", "colour=blue"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"colour\": not a setting to compare"));
    let out = controller(&["simulate", "--compare", "node=diagonal"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("node=diagonal: expected one of binpack, spread")
    );
    let out = controller(&["simulate", "-o", "yaml", "--compare", "node=spread"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not -o yaml|json"));
    let out = controller(&["simulate", "--compare", "node=spread"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("COMPARED WITH controller: node Spread, GPU Spread, topology Preferred"),
        "{text}"
    );
    assert_eq!(text.matches("SUMMARY").count(), 2, "{text}");
}
