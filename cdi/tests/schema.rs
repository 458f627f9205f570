//! Every spec this crate produces must satisfy the official CDI JSON schemas
//! (1.1.0 and 0.8.0), and the schema check itself must be able to fail.

mod common;

use common::{assert_schema_valid, feature_specs, schemas};
use serde_json::{Value, json};
use vgpu_cdi::{Spec, minimum_version};

#[test]
fn schema_dir_is_present() {
    let dir = common::schema_dir();
    for version in common::SCHEMA_VERSIONS {
        for file in ["schema.json", "defs.json"] {
            let path = dir.join(version).join(file);
            assert!(
                path.is_file(),
                "{} is missing; set CDI_SCHEMA_DIR to the directory holding the official CDI \
                 schemas (<version>/schema.json, <version>/defs.json)",
                path.display()
            );
        }
    }
}

#[test]
fn every_produced_spec_satisfies_both_schemas() {
    let schemas = schemas();
    let fixtures = feature_specs();
    assert!(fixtures.len() >= 12);
    for (what, spec, expected) in fixtures {
        assert_eq!(minimum_version(&spec), expected, "{what}");
        assert_eq!(spec.cdi_version, expected, "{what}");
        spec.validate()
            .unwrap_or_else(|e| panic!("{what} fails validation: {e}"));
        let doc: Value = serde_json::from_slice(&spec.to_json_pretty().unwrap()).unwrap();
        assert_eq!(doc["cdiVersion"], expected.to_string(), "{what}");
        assert_schema_valid(&schemas, what, &doc);
        // And it reads back to the same value.
        let back = Spec::from_json(doc.to_string().as_bytes()).unwrap();
        assert_eq!(back, spec, "{what}");
    }
}

#[test]
fn gpu_claim_spec_has_the_expected_shape() {
    let spec = common::gpu_claim_spec(common::CLAIM_UID);
    let doc = serde_json::to_value(&spec).unwrap();
    assert_eq!(doc["kind"], "k8s.vgpu.hami.io/claim");
    assert_eq!(
        doc["devices"][0]["name"],
        format!("{}-gpu-0", common::CLAIM_UID)
    );
    let node = &doc["devices"][0]["containerEdits"]["deviceNodes"][0];
    assert_eq!(node["major"], 195);
    assert_eq!(node["minor"], 0);
    assert_eq!(node["type"], "c");
    let mount = &doc["containerEdits"]["mounts"][0];
    assert!(mount["options"].as_array().unwrap().contains(&json!("ro")));
    assert_eq!(
        doc["containerEdits"]["hooks"][0]["hookName"],
        "createContainer"
    );
    assert!(
        doc.get("annotations").is_none(),
        "empty annotations must be omitted"
    );
}

fn valid_doc() -> Value {
    json!({
        "cdiVersion": "0.5.0",
        "kind": "k8s.vgpu.hami.io/claim",
        "devices": [{
            "name": "0b7e-gpu-0",
            "containerEdits": {
                "deviceNodes": [{"path": "/dev/nvidia0", "major": 195, "minor": 0}],
                "mounts": [{"hostPath": "/a", "containerPath": "/a", "options": ["ro", "bind"]}],
                "hooks": [{"hookName": "createContainer", "path": "/bin/true", "timeout": 5}]
            }
        }]
    })
}

#[test]
fn deliberately_invalid_specs_are_rejected_by_both_schemas() {
    let schemas = schemas();
    assert_schema_valid(&schemas, "reference document", &valid_doc());

    type Mutation = (&'static str, Box<dyn Fn(&mut Value)>);
    let mutations: Vec<Mutation> = vec![
        (
            "missing devices",
            Box::new(|d| {
                d.as_object_mut().unwrap().remove("devices");
            }),
        ),
        (
            "missing cdiVersion",
            Box::new(|d| {
                d.as_object_mut().unwrap().remove("cdiVersion");
            }),
        ),
        ("kind not a string", Box::new(|d| d["kind"] = json!(7))),
        (
            "device without containerEdits",
            Box::new(|d| {
                d["devices"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("containerEdits");
            }),
        ),
        (
            "major as a string",
            Box::new(|d| {
                d["devices"][0]["containerEdits"]["deviceNodes"][0]["major"] = json!("195")
            }),
        ),
        (
            "device node without path",
            Box::new(|d| {
                d["devices"][0]["containerEdits"]["deviceNodes"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("path");
            }),
        ),
        (
            "mount without hostPath",
            Box::new(|d| {
                d["devices"][0]["containerEdits"]["mounts"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("hostPath");
            }),
        ),
        (
            "hook without path",
            Box::new(|d| {
                d["devices"][0]["containerEdits"]["hooks"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("path");
            }),
        ),
        (
            "negative hook timeout",
            Box::new(|d| d["devices"][0]["containerEdits"]["hooks"][0]["timeout"] = json!(-1)),
        ),
        (
            "uid above uint32",
            Box::new(|d| {
                d["devices"][0]["containerEdits"]["deviceNodes"][0]["uid"] = json!(4294967296u64)
            }),
        ),
        (
            "annotation value not a string",
            Box::new(|d| d["annotations"] = json!({"a": 1})),
        ),
    ];
    for (what, mutate) in mutations {
        let mut doc = valid_doc();
        mutate(&mut doc);
        for schema in &schemas {
            assert!(
                !schema.errors(&doc).is_empty(),
                "schema {} accepted a spec with {what}",
                schema.version
            );
        }
        // Our reader refuses them as well.
        assert!(
            Spec::from_json(doc.to_string().as_bytes()).is_err(),
            "Spec::from_json accepted a spec with {what}"
        );
    }
}

#[test]
fn reads_what_the_go_library_writes() {
    // Go always writes the spec-level "containerEdits" object, even empty.
    let doc = json!({
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}],
        "containerEdits": {}
    });
    let spec = Spec::from_json(doc.to_string().as_bytes()).unwrap();
    assert!(spec.container_edits.is_empty());
    let out = serde_json::to_value(&spec).unwrap();
    assert!(out.get("containerEdits").is_none());
    assert_schema_valid(&schemas(), "re-serialized Go spec", &out);
}
