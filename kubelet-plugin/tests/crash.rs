//! Crash safety of the plugin binary: SIGKILL at random points during start-up, prepare and
//! unprepare, restart on the same directories, and drive the same claims to completion, the
//! way the kubelet retries. After every restart: no CDI spec without a prepared claim and no
//! prepared claim without its spec; after every operation: the answer and every file under
//! the CDI and plugin directories (contents and modes; for the checkpoint, the claims its
//! snapshot and journal record) are those of a crash-free run.
//!
//! `CRASH_KILLS` sets the number of kills (30 by default, enough for `cargo test`);
//! RELIABILITY.md gives the command for the full run. `CRASH_SEED` replays a run.

mod common;

use common::*;
use fake_apiserver::DraVersions;
use kubelet_plugin::checkpoint::Checkpoint;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vgpu_proto::dra::v1;

const BIN: &str = env!("CARGO_BIN_EXE_kubelet-plugin");

/// One step of the script, as the kubelet would send it.
#[derive(Clone, Debug)]
enum Op {
    Prepare(Vec<&'static str>),
    Unprepare(Vec<&'static str>),
}

/// What the plugin answered, keyed by claim UID.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Prepare(BTreeMap<String, v1::NodePrepareResourceResponse>),
    Unprepare(BTreeMap<String, v1::NodeUnprepareResourceResponse>),
}

/// Every file under the CDI and plugin directories: path → (mode, bytes). Sockets are left
/// out (a killed process leaves its socket behind and the next one replaces it).
type DiskState = BTreeMap<String, (u32, Vec<u8>)>;

struct Rig {
    h: Harness,
    kubeconfig: PathBuf,
    log: PathBuf,
    uids: BTreeMap<&'static str, String>,
    /// `--rolling-update-uid`: the plugin directory locked per operation instead of for life.
    rolling_update_uid: Option<&'static str>,
}

impl Rig {
    async fn new(rolling_update_uid: Option<&'static str>) -> Rig {
        let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
        let kubeconfig = h.path("kubeconfig");
        std::fs::write(&kubeconfig, h.server.kubeconfig(None)).unwrap();
        let mut uids = BTreeMap::new();
        for (name, spec) in [
            ("a", ClaimSpec::sliced("a", &["gpu-0"], "4Gi", 30)),
            ("b", ClaimSpec::sliced("b", &["gpu-0", "gpu-1"], "8Gi", 20)),
            ("c", ClaimSpec::sliced("c", &["gpu-2"], "70Gi", 60)),
            // Over-commits gpu-2 while c holds it: an error answer, until c is gone.
            ("d", ClaimSpec::sliced("d", &["gpu-2"], "20Gi", 30)),
            // A device this node does not have: an error answer every time.
            ("e", ClaimSpec::sliced("e", &["gpu-99"], "1Gi", 10)),
            ("f", ClaimSpec::sliced("f", &["gpu-3"], "1Gi", 5)),
        ] {
            uids.insert(name, h.put_claim(&spec));
        }
        Rig {
            log: h.path("plugin.log"),
            kubeconfig,
            h,
            uids,
            rolling_update_uid,
        }
    }

    fn dra_socket(&self) -> PathBuf {
        match self.rolling_update_uid {
            Some(uid) => self.h.path(&format!("plugins/vgpu.hami.io/dra-{uid}.sock")),
            None => self.h.dra_socket(),
        }
    }

    fn script() -> Vec<Op> {
        use Op::*;
        vec![
            Prepare(vec!["a", "b"]),
            Prepare(vec!["c", "e"]),
            Prepare(vec!["d"]),
            Unprepare(vec!["a"]),
            Prepare(vec!["f", "a"]),
            Unprepare(vec!["c"]),
            Prepare(vec!["d"]),
            Unprepare(vec!["a", "b", "d", "f", "e"]),
        ]
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(BIN)
            .args(["--node-name", NODE, "--metrics-addr", "127.0.0.1:0"])
            .args(self.h.binary_args(&self.kubeconfig))
            .args(
                self.rolling_update_uid
                    .map(|uid| ["--rolling-update-uid", uid])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Wait until the DRA socket answers; how long that took.
    async fn wait_ready(&self, child: &mut Child) -> Duration {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the plugin exited ({status}):\n{}", self.log_tail());
            }
            if let Ok(channel) = vgpu_proto::uds::connect(self.dra_socket()).await {
                let mut client = v1::dra_plugin_client::DraPluginClient::new(channel);
                let probe = v1::NodePrepareResourcesRequest { claims: vec![] };
                if client.node_prepare_resources(probe).await.is_ok() {
                    return started.elapsed();
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the plugin did not serve within 30 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn claims(&self, names: &[&str]) -> Vec<v1::Claim> {
        names.iter().map(|n| v1_claim(&self.uids[n], n)).collect()
    }

    async fn send(&self, op: &Op) -> Result<Answer, tonic::Status> {
        let channel = vgpu_proto::uds::connect(self.dra_socket())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut client = v1::dra_plugin_client::DraPluginClient::new(channel);
        Ok(match op {
            Op::Prepare(names) => {
                let claims = self.claims(names);
                let r = client
                    .node_prepare_resources(v1::NodePrepareResourcesRequest { claims })
                    .await?
                    .into_inner();
                Answer::Prepare(r.claims.into_iter().collect())
            }
            Op::Unprepare(names) => {
                let claims = self.claims(names);
                let r = client
                    .node_unprepare_resources(v1::NodeUnprepareResourcesRequest { claims })
                    .await?
                    .into_inner();
                Answer::Unprepare(r.claims.into_iter().collect())
            }
        })
    }

    fn disk(&self) -> DiskState {
        let cfg = self.h.config();
        let mut state = DiskState::new();
        for (label, root) in [("cdi", &cfg.cdi_root), ("plugin", &cfg.plugin_dir)] {
            walk(root, &mut |path, meta| {
                if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                    return;
                }
                let rel = format!("{label}/{}", path.strip_prefix(root).unwrap().display());
                // A socket's bind staging directory (`vgpu_proto::uds`) that a kill interrupted
                // stays until it is a minute old, since a live bind of another container may
                // own it; the next bind after that removes it (its unit test checks both).
                if rel.split('/').any(|c| c.starts_with(".uds-bind-")) {
                    return;
                }
                let name = path.file_name().and_then(|n| n.to_str());
                // The checkpoint's bytes depend on when its journal was last folded into its
                // snapshot (at every start, so after a crash sooner than without one): it is
                // compared as what it records, below.
                let recorded = matches!(name, Some("checkpoint.json" | "checkpoint.journal"));
                let bytes = if meta.is_file() && !recorded {
                    std::fs::read(path).unwrap()
                } else {
                    Vec::new()
                };
                state.insert(rel, (meta.permissions().mode(), bytes));
            });
        }
        let recorded = Checkpoint::in_dir(&cfg.plugin_dir)
            .load()
            .unwrap_or_else(|e| panic!("the checkpoint cannot be read: {e}"));
        state.insert(
            "checkpoint as read".into(),
            (0, serde_json::to_vec(&recorded).unwrap()),
        );
        state
    }

    /// The invariant that must hold whenever the plugin serves: the CDI specs on disk are
    /// exactly those of the claims the checkpoint records as prepared.
    fn check_specs_match_checkpoint(&self, when: &str) {
        let cfg = self.h.config();
        let prepared: BTreeSet<String> = Checkpoint::in_dir(&cfg.plugin_dir)
            .load()
            .unwrap_or_else(|e| panic!("{when}: {e}"))
            .claims
            .into_keys()
            .collect();
        let kind = kubelet_plugin::cdi_spec::claim_kind(DRIVER).unwrap();
        let specs: BTreeSet<String> = vgpu_cdi::SpecDir::new(&cfg.cdi_root)
            .list_owned(&kind)
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(
            prepared, specs,
            "{when}: prepared claims (left) and CDI specs (right) differ"
        );
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        f(&path, &meta);
        if meta.is_dir() {
            walk(&path, f);
        }
    }
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().max(1) as u64;
        Duration::from_nanos(self.next() % nanos)
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_loses_and_leaks_nothing() {
    sigkill_anywhere(None).await;
}

/// The same with the plugin directory locked per operation (rolling-update mode), where the
/// checkpoint is read again inside the lock before every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_anywhere_loses_and_leaks_nothing_in_rolling_update_mode() {
    sigkill_anywhere(Some("0b6f3c1e-5d2a-4c7b-9e8f-1a2b3c4d5e6f")).await;
}

async fn sigkill_anywhere(rolling_update_uid: Option<&'static str>) {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("CRASH_SEED={seed} CRASH_KILLS={kills}");
    let mut rng = Rng(seed);
    let rig = Rig::new(rolling_update_uid).await;
    let script = Rig::script();

    // The crash-free run: the answers, the files after each step and the time each takes.
    let mut child = rig.spawn();
    let startup = rig.wait_ready(&mut child).await;
    let mut reference = Vec::new();
    for op in &script {
        let started = Instant::now();
        let answer = rig.send(op).await.unwrap();
        reference.push((answer, rig.disk(), started.elapsed()));
    }
    assert!(
        reference.iter().any(
            |(a, _, _)| matches!(a, Answer::Prepare(m) if m.values().any(|r| !r.error.is_empty()))
        ),
        "the script exercises error answers too"
    );
    let (_, empty, _) = reference.last().unwrap();
    assert!(
        !empty
            .keys()
            .any(|k| k.starts_with("cdi/") || k.contains("claims/")),
        "the script ends with nothing prepared: {:?}",
        empty.keys()
    );

    let mut kills_during_op = 0;
    let mut kills_during_startup = 0;
    let mut ops_completed_before_kill = 0;
    let mut restarts = Vec::new();
    let started = Instant::now();
    for i in 0..kills {
        let step = i % script.len();
        let op = &script[step];
        let (want_answer, want_disk, took) = &reference[step];
        if rng.next().is_multiple_of(5) {
            // Killed while starting: reading the checkpoint, reconciling, publishing.
            kill(&mut child);
            child = rig.spawn();
            tokio::time::sleep(rng.below(startup + startup / 5)).await;
            kill(&mut child);
            kills_during_startup += 1;
        } else {
            let delay = rng.below(*took);
            let (answer, ()) = tokio::join!(rig.send(op), async {
                tokio::time::sleep(delay).await;
                kill(&mut child);
            });
            if let Ok(answer) = answer {
                // Finished before the kill: still the crash-free answer.
                assert_eq!(&answer, want_answer, "kill {i}: step {step} {op:?}");
                ops_completed_before_kill += 1;
            }
            kills_during_op += 1;
        }
        child = rig.spawn();
        restarts.push(rig.wait_ready(&mut child).await);
        rig.check_specs_match_checkpoint(&format!("kill {i} (seed {seed}), step {step} {op:?}"));
        // The kubelet retries until it gets an answer.
        let answer = rig.send(op).await.unwrap();
        assert_eq!(
            &answer, want_answer,
            "kill {i} (seed {seed}): step {step} {op:?}"
        );
        let disk = rig.disk();
        if &disk != want_disk {
            let have: BTreeSet<_> = disk.keys().collect();
            let want: BTreeSet<_> = want_disk.keys().collect();
            panic!(
                "kill {i} (seed {seed}), after step {step} {op:?}: files differ from the crash-free run\n\
                 extra: {:?}\nmissing: {:?}\nchanged: {:?}",
                have.difference(&want).collect::<Vec<_>>(),
                want.difference(&have).collect::<Vec<_>>(),
                have.intersection(&want)
                    .filter(|k| disk[**k] != want_disk[**k])
                    .collect::<Vec<_>>()
            );
        }
    }
    kill(&mut child);
    restarts.sort();
    eprintln!(
        "kills={kills} during_op={kills_during_op} during_startup={kills_during_startup} \
         op_finished_before_kill={ops_completed_before_kill} elapsed={:.1?} \
         restart_to_serving: median={:.1?} p99={:.1?} max={:.1?} (crash-free start {startup:.1?})",
        started.elapsed(),
        restarts[restarts.len() / 2],
        restarts[restarts.len() * 99 / 100],
        restarts[restarts.len() - 1],
    );
    assert_eq!(kills_during_op + kills_during_startup, kills);
}
