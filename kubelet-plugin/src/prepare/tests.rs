use super::*;
use crate::checkpoint::Checkpoint;
use crate::discovery::tests::gpu;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::{AllocatedDevice, ConfigEntry, ConfigSource};

pub(crate) struct Env {
    pub dir: tempfile::TempDir,
    pub state: GpuState,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/dev")).unwrap();
        std::fs::write(dir.path().join("libvgpu.so"), b"not really a library").unwrap();
        Env {
            dir,
            state: GpuState::new(Snapshot {
                gpus: vec![gpu(0), gpu(1)],
                unhealthy: BTreeMap::new(),
            }),
        }
    }

    pub fn config(&self) -> PrepareConfig {
        PrepareConfig {
            driver: "vgpu.hami.io".into(),
            node: "node-a".into(),
            cdi_root: self.dir.path().join("cdi"),
            plugin_dir: self.dir.path().join("plugin"),
            enforcement_library: self.dir.path().join("libvgpu.so"),
            device_nodes: DeviceNodes::under_root(&self.dir.path().join("root")),
        }
    }

    pub fn open(&self) -> Preparer {
        Preparer::open(self.config(), self.state.clone()).unwrap().0
    }
}

fn result(request: &str, device: &str) -> AllocatedDevice {
    AllocatedDevice {
        request: request.into(),
        driver: "vgpu.hami.io".into(),
        pool: "node-a".into(),
        device: device.into(),
        admin_access: false,
        share_id: None,
        consumed_capacity: BTreeMap::new(),
    }
}

fn slice(uid: &str, devices: &[&str], memory: &str, cores: u32) -> ClaimAllocation {
    ClaimAllocation {
        namespace: "ml".into(),
        name: format!("claim-{uid}"),
        uid: uid.into(),
        results: devices.iter().map(|d| result("gpu", d)).collect(),
        config: vec![ConfigEntry {
            source: ConfigSource::FromClaim,
            requests: vec![],
            driver: "vgpu.hami.io".into(),
            parameters:
                json!({"apiVersion": API_VERSION, "kind": KIND, "memory": memory, "cores": cores})
                    .into(),
        }],
        node_name: Some("node-a".into()),
    }
}

#[test]
fn prepare_writes_spec_dir_and_checkpoint_and_is_idempotent() {
    let env = Env::new();
    let p = env.open();
    let claim = p
        .prepare(&slice("u1", &["gpu-0", "gpu-1"], "4Gi", 30))
        .unwrap();
    assert_eq!(claim.devices.len(), 2);
    assert_eq!(
        claim.devices[0].cdi_device_ids,
        vec!["k8s.vgpu.hami.io/claim=u1-gpu"]
    );
    assert!(claim.devices[1].cdi_device_ids.is_empty());
    assert_eq!(claim.spec.devices.len(), 1);
    let on_disk = SpecDir::new(env.dir.path().join("cdi"))
        .read(p.kind(), "u1")
        .unwrap();
    assert_eq!(on_disk, claim.spec);
    assert!(env.dir.path().join("plugin/claims/u1").is_dir());
    assert_eq!(
        std::fs::read_to_string(env.dir.path().join("plugin/ld.so.preload")).unwrap(),
        "/usr/local/vgpu/libvgpu.so\n"
    );
    let again = p
        .prepare(&slice("u1", &["gpu-0", "gpu-1"], "4Gi", 30))
        .unwrap();
    assert_eq!(again, claim);
    // A reopened preparer (a restart) answers from the checkpoint.
    drop(p);
    let p = env.open();
    assert_eq!(p.prepared_claim("u1").unwrap(), Some(claim));
    assert!(p.unprepare("u1").unwrap());
    assert!(!env.dir.path().join("plugin/claims/u1").exists());
    assert!(
        SpecDir::new(env.dir.path().join("cdi"))
            .read(p.kind(), "u1")
            .is_err()
    );
    assert!(!p.unprepare("u1").unwrap(), "second unprepare is a no-op");
    assert!(!p.unprepare("never-seen").unwrap());
    assert!(!p.unprepare("../../etc").unwrap());
}

#[test]
fn oversubscription_exclusivity_health_and_pool_are_enforced() {
    let env = Env::new();
    let p = env.open();
    p.prepare(&slice("a", &["gpu-0"], "60Gi", 50)).unwrap();
    let err = p.prepare(&slice("b", &["gpu-0"], "30Gi", 10)).unwrap_err();
    assert!(matches!(err, PrepareError::OverCommitted { .. }), "{err}");
    assert!(
        err.to_string().contains("gpu-0") && err.to_string().contains("memory"),
        "{err}"
    );
    let err = p.prepare(&slice("c", &["gpu-0"], "1Gi", 60)).unwrap_err();
    assert!(err.to_string().contains("cores"), "{err}");
    p.prepare(&slice("d", &["gpu-0"], "20Gi", 50)).unwrap();

    // Whole GPU (no slice config) is exclusive.
    let mut whole = slice("e", &["gpu-1"], "1Gi", 1);
    whole.config.clear();
    let claim = p.prepare(&whole).unwrap();
    assert!(claim.gpus[0].exclusive && claim.gpus[0].cores == 100);
    let err = p.prepare(&slice("f", &["gpu-1"], "1Gi", 1)).unwrap_err();
    assert!(matches!(err, PrepareError::Exclusive { .. }), "{err}");
    let mut whole0 = slice("g", &["gpu-0"], "1Gi", 1);
    whole0.config.clear();
    assert!(
        p.prepare(&whole0).is_err(),
        "an exclusive claim cannot join a shared GPU"
    );

    // Admin access neither takes nor is refused capacity.
    let mut admin = slice("h", &["gpu-1"], "1Gi", 1);
    admin.results[0].admin_access = true;
    let claim = p.prepare(&admin).unwrap();
    assert!(claim.spec.devices[0].container_edits.mounts.is_empty());

    let err = p.prepare(&slice("i", &["gpu-7"], "1Gi", 1)).unwrap_err();
    assert!(matches!(err, PrepareError::UnknownDevice { .. }), "{err}");
    env.state.mark_unhealthy(&gpu(1).uuid, "Xid 79");
    p.unprepare("e").unwrap();
    let err = p.prepare(&slice("j", &["gpu-1"], "1Gi", 1)).unwrap_err();
    assert!(
        matches!(err, PrepareError::Unhealthy { .. }) && err.to_string().contains("Xid 79"),
        "{err}"
    );
    let mut elsewhere = slice("k", &["gpu-0"], "1Gi", 1);
    elsewhere.results[0].pool = "node-b".into();
    assert!(matches!(
        p.prepare(&elsewhere).unwrap_err(),
        PrepareError::NoDevices { .. }
    ));
    let mut bad = slice("l", &["gpu-0"], "1Gi", 1);
    bad.config[0].parameters =
        json!({"apiVersion": API_VERSION, "kind": KIND, "cores": "lots"}).into();
    let err = p.prepare(&bad).unwrap_err();
    assert!(
        matches!(err, PrepareError::Config { .. }) && err.to_string().contains("cores"),
        "{err}"
    );
    // Refused claims left nothing behind.
    assert_eq!(
        p.prepared().keys().cloned().collect::<Vec<_>>(),
        vec!["a", "d", "h"]
    );
}

#[test]
fn missing_library_is_refused_for_sliced_claims_only() {
    let env = Env::new();
    std::fs::remove_file(env.dir.path().join("libvgpu.so")).unwrap();
    let p = env.open();
    let err = p.prepare(&slice("a", &["gpu-0"], "1Gi", 1)).unwrap_err();
    assert!(matches!(err, PrepareError::MissingLibrary { .. }), "{err}");
    let mut admin = slice("b", &["gpu-0"], "1Gi", 1);
    admin.results[0].admin_access = true;
    p.prepare(&admin).unwrap();
}

#[test]
fn reconcile_removes_orphans_and_restores_missing_specs() {
    let env = Env::new();
    let p = env.open();
    p.prepare(&slice("keep", &["gpu-0"], "1Gi", 1)).unwrap();
    let specs = SpecDir::new(env.dir.path().join("cdi"));
    let kind = p.kind().clone();
    drop(p);
    // An orphan of our kind (crash after unprepare removed the entry but not the file is
    // impossible by construction; a spec written by hand or by an older plugin is not).
    let mut orphan = specs.read(&kind, "keep").unwrap();
    orphan.devices[0].name = "orphan-gpu".into();
    specs.write(&orphan, "orphan").unwrap();
    std::fs::create_dir_all(env.dir.path().join("plugin/claims/orphan")).unwrap();
    // Another vendor's spec is left alone.
    let other: Kind = "example.com/gpu".parse().unwrap();
    let mut foreign = orphan.clone();
    foreign.kind = other.to_string();
    specs.write(&foreign, "x").unwrap();
    // The kept claim's spec disappears.
    specs.remove(&kind, "keep").unwrap();

    let (p, report) = Preparer::open(env.config(), env.state.clone()).unwrap();
    assert_eq!(report.removed, vec!["orphan"]);
    assert_eq!(report.rewritten, vec!["keep"]);
    assert!(specs.read(&kind, "keep").is_ok());
    assert!(specs.read(&other, "x").is_ok());
    assert!(!env.dir.path().join("plugin/claims/orphan").exists());
    assert!(env.dir.path().join("plugin/claims/keep").is_dir());
    drop(p);
    // A corrupt checkpoint stops the plugin with a clear error.
    std::fs::write(
        env.dir.path().join("plugin/checkpoint.json"),
        "{\"apiVersion\":",
    )
    .unwrap();
    let err = Preparer::open(env.config(), env.state.clone())
        .err()
        .unwrap();
    assert!(err.to_string().contains("checkpoint"), "{err}");
}

#[test]
fn a_second_preparer_on_the_same_directory_is_refused_until_the_first_is_gone() {
    let env = Env::new();
    let first = env.open();
    let err = Preparer::open(env.config(), env.state.clone())
        .err()
        .expect("a second owner of the plugin directory is refused");
    assert!(matches!(err, PrepareError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("plugin.lock"), "{err}");
    // A shared instance cannot take its turn while a lifetime owner runs: it says why
    // instead of waiting forever.
    let err = lock_for_operation(&env.dir.path().join("plugin"), Duration::from_millis(50))
        .expect_err("the directory is held for life");
    assert!(matches!(err, PrepareError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("--rolling-update-uid"), "{err}");
    drop(first);
    env.open();
}

#[test]
fn shared_instances_take_turns_and_a_replaced_lock_file_is_not_trusted() {
    let env = Env::new();
    let dir = env.dir.path().join("plugin");
    let held = lock_for_operation(&dir, Duration::from_millis(50)).unwrap();
    assert!(matches!(
        lock_for_operation(&dir, Duration::from_millis(50)),
        Err(PrepareError::Busy { .. })
    ));
    // An uninstalling instance unlinks the file it holds: the next one must lock the new
    // file, not be fooled by the old, still-locked inode.
    std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
    let next = lock_for_operation(&dir, Duration::from_millis(50)).unwrap();
    assert!(matches!(
        lock_for_operation(&dir, Duration::from_millis(50)),
        Err(PrepareError::Busy { .. })
    ));
    drop((held, next));
    lock_for_operation(&dir, Duration::from_millis(50)).unwrap();
}

/// A small deterministic generator, so a failing interleaving can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn two_shared_instances_interleaving_lose_nothing_and_never_over_commit() {
    let env = Env::new();
    let a = Arc::new(
        Preparer::open_shared(env.config(), env.state.clone())
            .unwrap()
            .0,
    );
    let b = Arc::new(
        Preparer::open_shared(env.config(), env.state.clone())
            .unwrap()
            .0,
    );
    // Two kubelet call streams, each with its own claims, each sent to either instance: the
    // claims compete for the same GPUs (30 % of the cores each, so at most three per GPU).
    let threads: Vec<_> = ["x", "y"]
        .into_iter()
        .enumerate()
        .map(|(t, prefix)| {
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut rng = Lcg(0x5eed + t as u64);
                let mut prepared = BTreeSet::new();
                for _ in 0..150 {
                    let p = if rng.next(2) == 0 { &a } else { &b };
                    let uid = format!("{prefix}{}", rng.next(6));
                    if rng.next(3) == 0 {
                        p.unprepare(&uid).unwrap();
                        prepared.remove(&uid);
                    } else {
                        let gpu = format!("gpu-{}", rng.next(2));
                        match p.prepare(&slice(&uid, &[gpu.as_str()], "1Gi", 30)) {
                            Ok(_) => {
                                prepared.insert(uid);
                            }
                            Err(PrepareError::OverCommitted { .. }) => {}
                            Err(e) => panic!("{uid}: {e}"),
                        }
                    }
                }
                prepared
            })
        })
        .collect();
    let mut want = BTreeSet::new();
    for t in threads {
        want.extend(t.join().unwrap());
    }
    let on_disk = Checkpoint::in_dir(&env.dir.path().join("plugin"))
        .load()
        .unwrap();
    let got: BTreeSet<String> = on_disk.claims.keys().cloned().collect();
    assert_eq!(got, want, "the checkpoint lost or kept a claim");
    let mut cores: BTreeMap<String, u32> = BTreeMap::new();
    for claim in on_disk.claims.values() {
        for g in &claim.gpus {
            *cores.entry(g.uuid.clone()).or_default() += u32::from(g.cores);
        }
    }
    assert!(
        cores.values().all(|c| *c <= 100),
        "over-committed: {cores:?}"
    );
    let specs: BTreeSet<String> = SpecDir::new(env.dir.path().join("cdi"))
        .list_owned(a.kind())
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(specs, want, "CDI specs differ from the prepared claims");
    // Each instance answers for claims the other prepared.
    for uid in &want {
        assert!(a.prepared_claim(uid).unwrap().is_some(), "{uid}");
        assert!(b.prepared_claim(uid).unwrap().is_some(), "{uid}");
    }
}

#[test]
fn temporary_files_of_interrupted_writes_are_removed_on_open() {
    let env = Env::new();
    let plugin_dir = env.dir.path().join("plugin");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    for name in [".checkpoint.Ab12Cd.tmp", ".ld.so.preload.Xy9"] {
        std::fs::write(plugin_dir.join(name), b"half written").unwrap();
    }
    std::fs::write(plugin_dir.join("notes.txt"), b"not ours to remove").unwrap();
    let _p = env.open();
    let mut left: Vec<String> = std::fs::read_dir(&plugin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // The checkpoint's snapshot is written at the first start.
    assert_eq!(left, vec!["checkpoint.json", "notes.txt", "plugin.lock"]);
}

#[test]
fn one_call_admits_each_claim_against_the_ones_before_it_and_records_them_together() {
    let env = Env::new();
    let p = env.open();
    let a = slice("a", &["gpu-0"], "50Gi", 60);
    // Fits gpu-0 alone, not together with a of the same call.
    let b = slice("b", &["gpu-0"], "40Gi", 30);
    let c = slice("c", &["gpu-1"], "1Gi", 10);
    // Its spec path is taken by a directory: the rename of its spec fails.
    let d = slice("d", &["gpu-1"], "1Gi", 10);
    let cdi = SpecDir::new(env.dir.path().join("cdi"));
    let kind = p.kind().clone();
    std::fs::create_dir_all(cdi.path_for(&kind, "d").unwrap()).unwrap();
    let results = p.prepare_all(&[a.clone(), b, c, a.clone(), d]);
    assert_eq!(results.len(), 5);
    let first = results[0].as_ref().unwrap();
    assert!(
        matches!(results[1], Err(PrepareError::OverCommitted { .. })),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok());
    assert_eq!(
        results[3].as_ref().unwrap(),
        first,
        "listed twice: one answer"
    );
    let err = results[4].as_ref().unwrap_err().to_string();
    assert!(err.contains("k8s.vgpu.hami.io-claim_d.json"), "{err}");
    let recorded: Vec<String> = Checkpoint::in_dir(&env.config().plugin_dir)
        .load()
        .unwrap()
        .claims
        .into_keys()
        .collect();
    assert_eq!(
        recorded,
        ["a", "c"],
        "d's entry is undone with its failed spec"
    );
    assert_eq!(cdi.read(p.kind(), "a").unwrap(), first.spec);
    assert!(cdi.read(p.kind(), "c").is_ok());
    assert!(cdi.read(p.kind(), "b").is_err());
    // What the call recorded is what a restart knows.
    drop(p);
    std::fs::remove_dir(cdi.path_for(&kind, "d").unwrap()).unwrap();
    let p = env.open();
    assert_eq!(p.prepared_claim("a").unwrap().as_ref(), Some(first));
    assert_eq!(p.prepared_claim("d").unwrap(), None);
}

#[test]
fn prepares_append_to_the_journal_and_compaction_folds_it_into_the_snapshot() {
    let env = Env::new();
    let p = env.open();
    let cp = Checkpoint::in_dir(&env.config().plugin_dir);
    // Written at the first start, empty.
    let snapshot = std::fs::read(cp.path()).unwrap();
    p.prepare(&slice("kept", &["gpu-0"], "1Gi", 1)).unwrap();
    let mut ops = 1;
    while !p.compaction_due() {
        let uid = format!("u{ops}");
        p.prepare(&slice(&uid, &["gpu-1"], "1Gi", 1)).unwrap();
        assert!(p.unprepare(&uid).unwrap());
        ops += 2;
        // Appends only: the snapshot is not rewritten while the journal is short.
        assert_eq!(std::fs::read(cp.path()).unwrap(), snapshot);
    }
    assert_eq!(ops, crate::checkpoint::COMPACT_AFTER + 1);
    let (recorded, journal) = cp.load_with_journal().unwrap();
    assert_eq!(journal.changes, ops);
    assert_eq!(recorded.claims.keys().collect::<Vec<_>>(), ["kept"]);
    assert!(p.compact_if_due().unwrap());
    assert_eq!(std::fs::metadata(cp.journal_path()).unwrap().len(), 0);
    assert_eq!(cp.load().unwrap(), recorded);
    assert!(!p.compact_if_due().unwrap(), "done once");
    // What a restart knows is the same.
    drop(p);
    let p = env.open();
    assert_eq!(p.prepared(), recorded.claims);
}
