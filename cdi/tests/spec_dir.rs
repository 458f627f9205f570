//! `SpecDir` against a real (temporary) directory.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use common::{CLAIM_UID, assert_schema_valid, claim_kind, gpu_claim_spec, schemas};
use serde_json::Value;
use vgpu_cdi::{
    ContainerEdits, Device, Durability, Error, IdProblem, Kind, Mount, QualifiedDevice, Spec,
    SpecDir, Version,
};

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn assert_file_schema_valid(path: &Path) {
    let doc: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    assert_schema_valid(&schemas(), &path.display().to_string(), &doc);
}

#[test]
fn write_then_read_back_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path().join("cdi"));
    let mut spec = gpu_claim_spec(CLAIM_UID);
    // Whatever the caller declares, the minimum version is written.
    spec.cdi_version = Version::LATEST;

    let path = dir.write(&spec, CLAIM_UID).unwrap();
    assert_eq!(
        path,
        tmp.path()
            .join("cdi")
            .join(format!("k8s.vgpu.hami.io-claim_{CLAIM_UID}.json"))
    );
    assert_eq!(path, dir.path_for(&claim_kind(), CLAIM_UID).unwrap());
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "spec file mode is {mode:o}");
    assert_eq!(
        names_in(dir.root()),
        [format!("k8s.vgpu.hami.io-claim_{CLAIM_UID}.json")],
        "no temporary file may be left behind"
    );
    assert_file_schema_valid(&path);

    let back = dir.read(&claim_kind(), CLAIM_UID).unwrap();
    assert_eq!(back.cdi_version, Version::V0_5_0);
    spec.cdi_version = Version::V0_5_0;
    assert_eq!(back, spec);
    assert_eq!(vgpu_cdi::read_spec_file(&path).unwrap(), spec);

    // The device IDs kubelet will pass to the runtime.
    let id = QualifiedDevice::new("k8s.vgpu.hami.io", "claim", &back.devices[0].name).unwrap();
    assert_eq!(
        id.to_string(),
        format!("k8s.vgpu.hami.io/claim={CLAIM_UID}-gpu-0")
    );
}

#[test]
fn write_lowers_version_to_minimum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let mut spec = Spec::new(
        &claim_kind(),
        vec![Device::new(
            "abc-gpu-0",
            ContainerEdits {
                env: vec!["X=1".into()],
                ..Default::default()
            },
        )],
    );
    spec.cdi_version = Version::V1_0_0;
    let path = dir.write(&spec, "abc").unwrap();
    let doc: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(doc["cdiVersion"], "0.3.0");
    assert_file_schema_valid(&path);
}

#[test]
fn invalid_spec_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let mut spec = gpu_claim_spec(CLAIM_UID);
    spec.devices[1]
        .container_edits
        .mounts
        .push(Mount::read_only_bind("/usr/lib/libx.so", "relative/path"));
    let err = dir.write(&spec, CLAIM_UID).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid CDI spec: devices[1].containerEdits.mounts[0].containerPath: \
         path \"relative/path\" is not absolute"
    );
    spec.devices[1].container_edits.mounts.clear();
    spec.devices[1].name = spec.devices[0].name.clone();
    assert!(dir.write(&spec, CLAIM_UID).is_err());
    assert!(names_in(tmp.path()).is_empty());
}

#[test]
fn overwrite_is_atomic_for_concurrent_readers() {
    overwrite_is_atomic(Durability::Durable);
}

/// Without fsync the rename alone must still keep readers from seeing a partial file.
#[test]
fn overwrite_without_fsync_is_atomic_for_concurrent_readers_too() {
    overwrite_is_atomic(Durability::Atomic);
}

fn overwrite_is_atomic(durability: Durability) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let small = gpu_claim_spec(CLAIM_UID);
    let mut large = small.clone();
    large.devices[0].container_edits.env = (0..3000)
        .map(|i| format!("PADDING_{i}={}", "x".repeat(40)))
        .collect();
    let path = dir.write(&small, CLAIM_UID).unwrap();
    let expected = [fs::read(&path).unwrap(), {
        let mut l = large.clone();
        l.set_minimum_version();
        l.to_json_pretty().unwrap()
    }];
    assert!(expected[1].len() > 100_000);

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, path, expected) = (done.clone(), path.clone(), expected.clone());
        std::thread::spawn(move || {
            let mut seen = [0usize; 2];
            while !done.load(Ordering::Relaxed) {
                let bytes = fs::read(&path).expect("the spec file must always exist");
                let which = expected
                    .iter()
                    .position(|e| *e == bytes)
                    .unwrap_or_else(|| {
                        panic!("reader saw a partial spec of {} bytes", bytes.len())
                    });
                seen[which] += 1;
            }
            seen
        })
    };
    for i in 0..150 {
        let spec = if i % 2 == 0 { &large } else { &small };
        dir.write_with(spec, CLAIM_UID, durability).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().expect("reader thread failed");
    assert!(seen[0] + seen[1] > 0);
    assert_eq!(
        names_in(tmp.path()).len(),
        1,
        "temporary files left: {:?}",
        names_in(tmp.path())
    );
    assert_eq!(fs::read(&path).unwrap(), expected[0]);
}

#[test]
fn remove_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let kind = claim_kind();
    dir.write(&gpu_claim_spec(CLAIM_UID), CLAIM_UID).unwrap();
    assert!(dir.remove(&kind, CLAIM_UID).unwrap());
    assert!(names_in(tmp.path()).is_empty());
    assert!(!dir.remove(&kind, CLAIM_UID).unwrap());
    // A directory that does not exist yet is fine too.
    let missing = SpecDir::new(tmp.path().join("not-there"));
    assert!(!missing.remove(&kind, CLAIM_UID).unwrap());
    assert!(missing.list_owned(&kind).unwrap().is_empty());
    assert!(
        missing
            .cleanup_stale_temp_files(&kind, Duration::ZERO)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn list_owned_finds_only_our_specs_and_reports_corrupt_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let kind = claim_kind();
    let uid2 = "1c9d8e7f-0000-4000-8000-000000000002";
    dir.write(&gpu_claim_spec(CLAIM_UID), CLAIM_UID).unwrap();
    dir.write(&gpu_claim_spec(uid2), uid2).unwrap();

    // Another driver's spec, in the same directory.
    let other_kind: Kind = "nvidia.com/gpu".parse().unwrap();
    let other = Spec::new(
        &other_kind,
        vec![Device::new(
            "0",
            ContainerEdits {
                env: vec!["A=1".into()],
                ..Default::default()
            },
        )],
    );
    dir.write(&other, "x").unwrap();
    // A valid spec of another kind under a name with our prefix (as another
    // vendor/class pair joined by '-' could produce): not ours, skipped.
    fs::write(
        tmp.path().join("k8s.vgpu.hami.io-claim_foreign.json"),
        other.to_json_pretty().unwrap(),
    )
    .unwrap();
    // A corrupt file with our name, a YAML file, a hidden file, an invalid id.
    fs::write(
        tmp.path().join("k8s.vgpu.hami.io-claim_broken.json"),
        b"{\"cdiVer",
    )
    .unwrap();
    fs::write(
        tmp.path().join("k8s.vgpu.hami.io-claim_y.yaml"),
        b"cdiVersion: 0.3.0",
    )
    .unwrap();
    fs::write(tmp.path().join(".k8s.vgpu.hami.io-claim_z.json"), b"{}").unwrap();
    fs::write(tmp.path().join("k8s.vgpu.hami.io-claim_a b.json"), b"{}").unwrap();
    fs::write(tmp.path().join("unrelated.json"), b"{}").unwrap();

    let listed = dir.list_owned(&kind).unwrap();
    let ids: Vec<&str> = listed.iter().map(|o| o.id.as_str()).collect();
    let mut want = vec![CLAIM_UID, uid2, "broken"];
    want.sort();
    assert_eq!(ids, want);
    for owned in &listed {
        match owned.id.as_str() {
            "broken" => {
                let err = owned.spec.as_ref().unwrap_err();
                assert!(matches!(err, Error::Parse { .. }), "{err:?}");
                assert!(
                    err.to_string()
                        .contains("k8s.vgpu.hami.io-claim_broken.json")
                );
            }
            id => {
                let spec = owned.spec.as_ref().unwrap();
                assert_eq!(spec.kind, "k8s.vgpu.hami.io/claim");
                assert_eq!(spec.devices[0].name, format!("{id}-gpu-0"));
                assert_eq!(owned.path, dir.path_for(&kind, id).unwrap());
            }
        }
    }
    // Reading the foreign file through our kind is refused.
    assert!(matches!(
        dir.read(&kind, "foreign"),
        Err(Error::KindMismatch { .. })
    ));
    // A spec that parses but fails validation is reported too.
    let mut bad: Value =
        serde_json::from_slice(&gpu_claim_spec("9").to_json_pretty().unwrap()).unwrap();
    bad["cdiVersion"] = "0.3.0".into();
    fs::write(
        tmp.path().join("k8s.vgpu.hami.io-claim_9.json"),
        bad.to_string(),
    )
    .unwrap();
    let listed = dir.list_owned(&kind).unwrap();
    let nine = listed.iter().find(|o| o.id == "9").unwrap();
    let err = nine.spec.as_ref().unwrap_err();
    assert!(
        err.to_string()
            .contains("cdiVersion: spec version 0.3.0 is below the minimum 0.5.0"),
        "{err}"
    );
}

#[test]
fn path_traversal_ids_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cdi");
    let dir = SpecDir::new(&root);
    let kind = claim_kind();
    let spec = gpu_claim_spec(CLAIM_UID);
    for (id, problem) in [
        ("../escape", IdProblem::Slash),
        ("..", IdProblem::DotDot),
        ("a/../../b", IdProblem::Slash),
        ("/etc/passwd", IdProblem::Slash),
        ("a\0b", IdProblem::Nul),
        ("", IdProblem::Empty),
        (".hidden", IdProblem::LeadingDot),
        ("x..y", IdProblem::DotDot),
        ("tab\tid", IdProblem::InvalidChar('\t')),
    ] {
        for result in [
            dir.write(&spec, id).map(|_| ()),
            dir.remove(&kind, id).map(|_| ()),
            dir.read(&kind, id).map(|_| ()),
        ] {
            match result {
                Err(Error::InvalidId {
                    id: got,
                    problem: p,
                }) => {
                    assert_eq!(got, id);
                    assert_eq!(p, problem, "{id:?}");
                }
                other => panic!("id {id:?} was not rejected: {other:?}"),
            }
        }
    }
    assert!(!root.exists(), "nothing may be created for a rejected id");
    assert_eq!(names_in(tmp.path()), Vec::<String>::new());
    let msg = dir.write(&spec, "../escape").unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid spec id \"../escape\": contains '/' (path separator)"
    );
}

#[test]
fn stale_temp_files_are_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = SpecDir::new(tmp.path());
    let kind = claim_kind();
    let spec_path = dir.write(&gpu_claim_spec(CLAIM_UID), CLAIM_UID).unwrap();

    let old = SystemTime::now() - Duration::from_secs(3600);
    let make = |name: &str, mtime: SystemTime| {
        let p = tmp.path().join(name);
        let f = fs::File::create(&p).unwrap();
        f.set_modified(mtime).unwrap();
        p
    };
    // Left by a crash mid-write (same pattern as SpecDir::write).
    let stale = make(
        &format!(".k8s.vgpu.hami.io-claim_{CLAIM_UID}.AbC123.tmp"),
        old,
    );
    // Recent: may belong to a write in progress.
    let fresh = make(
        ".k8s.vgpu.hami.io-claim_other.XyZ789.tmp",
        SystemTime::now(),
    );
    // Another driver's temp file and an unrelated dotfile.
    let foreign = make(".nvidia.com-gpu_x.AAAAAA.tmp", old);
    let dotfile = make(".k8s.vgpu.hami.io-claim_keep.json", old);

    let removed = dir
        .cleanup_stale_temp_files(&kind, Duration::from_secs(60))
        .unwrap();
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!stale.exists());
    for kept in [&fresh, &foreign, &dotfile, &spec_path] {
        assert!(kept.exists(), "{} must be kept", kept.display());
    }
    // At startup (threshold zero) the recent one goes too.
    let removed = dir.cleanup_stale_temp_files(&kind, Duration::ZERO).unwrap();
    assert_eq!(removed, vec![fresh.clone()]);
    assert!(foreign.exists() && dotfile.exists() && spec_path.exists());
    // The spec is still listed and intact.
    let listed = dir.list_owned(&kind).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].spec.is_ok());
}
