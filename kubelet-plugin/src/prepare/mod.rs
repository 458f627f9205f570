//! Claim preparation: from a claim's allocation to a CDI spec on disk, recorded in the
//! checkpoint before the kubelet gets its answer.
//!
//! This is the last line of defense: the API server never checks that two claims do not
//! over-commit a GPU, so prepare refuses a claim that would push the prepared slices of a GPU
//! past its memory or 100 % of its cores, share a GPU with an exclusive claim, use an
//! unhealthy GPU or a device that is not in this node's pool.
//!
//! Order of effects, for crash safety: the checkpoint entries of a whole kubelet call (one
//! durable append to its journal), then the specs, atomic but not fsynced (a crash in between
//! leaves entries whose specs are missing, which [`Preparer::reconcile`] rewrites at start;
//! RELIABILITY.md has the whole argument).
//! Unprepare: spec and claim directory, then the entry (a crash in between leaves an entry
//! that is re-prepared at start and unprepared again when the kubelet retries).

pub mod devnodes;

use crate::cdi_spec::{self, ClaimSpecParams, GpuLimit, RequestDevices};
use crate::checkpoint::{ChangeRef, Checkpoint, CheckpointError, Journal, Payload};
use crate::discovery::{GpuState, Snapshot};
use devnodes::DeviceNodes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vgpu_cdi::{Kind, Spec, SpecDir};
use vgpu_driver::ClaimAllocation;

/// A device in the kubelet's answer, as the checkpoint records it.
pub use dra::kubeletplugin::Device as KubeletDevice;

/// What a prepared claim holds of one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreparedGpu {
    /// Published device name, `gpu-<index>`.
    pub device: String,
    pub uuid: String,
    /// Main request name.
    pub request: String,
    pub memory_bytes: u64,
    pub cores: u8,
    pub exclusive: bool,
    /// Admin access neither takes nor is refused capacity.
    pub admin_access: bool,
}

/// A prepared claim, as recorded in the checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreparedClaim {
    pub namespace: String,
    pub name: String,
    pub devices: Vec<KubeletDevice>,
    pub gpus: Vec<PreparedGpu>,
    pub spec: Spec,
}

/// Why a claim cannot be prepared or unprepared. Each is reported for that claim alone.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("claim UID {uid:?} cannot name a CDI spec: {message}")]
    BadUid { uid: String, message: String },
    #[error("claim {claim}: no devices of driver {driver} on this node's pool {pool}")]
    NoDevices {
        claim: String,
        driver: String,
        pool: String,
    },
    #[error("claim {claim}: device {device} is not in this node's pool {pool}")]
    UnknownDevice {
        claim: String,
        device: String,
        pool: String,
    },
    #[error("claim {claim}: {device} ({uuid}) is unhealthy: {reason}")]
    Unhealthy {
        claim: String,
        device: String,
        uuid: String,
        reason: String,
    },
    #[error("claim {claim}: invalid configuration: {source}")]
    Config {
        claim: String,
        #[source]
        source: vgpu_driver::AllocationError,
    },
    #[error("claim {claim}: {device} would be over-committed: {message}")]
    OverCommitted {
        claim: String,
        device: String,
        message: String,
    },
    #[error("claim {claim}: {device} is held exclusively by claim {holder}")]
    Exclusive {
        claim: String,
        device: String,
        holder: String,
    },
    #[error(
        "claim {claim}: the enforcement library {path} does not exist on this node; install it \
         (or set --enforcement-library) so that slice limits can be enforced"
    )]
    MissingLibrary { claim: String, path: PathBuf },
    #[error("claim {claim}: {source}")]
    Spec {
        claim: String,
        #[source]
        source: Box<cdi_spec::CdiSpecError>,
    },
    // Boxed: CDI errors are large and every Result of this module carries the type.
    #[error("CDI: {0}")]
    Cdi(Box<vgpu_cdi::Error>),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// One failure that is every claim's answer in a call (the checkpoint write they share).
    #[error(transparent)]
    Shared(Arc<PrepareError>),
    #[error(
        "{path} is locked by another kubelet-plugin on this node; without --rolling-update-uid \
         only one may run on a node (two would replace each other's sockets and undo each \
         other's preparations)"
    )]
    Locked { path: PathBuf },
    #[error(
        "{path} stayed locked for {waited:?}: another kubelet-plugin on this node holds it for \
         its whole life (one without --rolling-update-uid, or a version before rolling updates); \
         it must stop before this one can prepare or unprepare"
    )]
    Busy { path: PathBuf, waited: Duration },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<vgpu_cdi::Error> for PrepareError {
    fn from(e: vgpu_cdi::Error) -> Self {
        PrepareError::Cdi(Box::new(e))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + use<> {
    let path = path.to_path_buf();
    move |source| PrepareError::Io { op, path, source }
}

/// Where prepare reads and writes.
#[derive(Clone, Debug)]
pub struct PrepareConfig {
    pub driver: String,
    /// Node name = pool name.
    pub node: String,
    pub cdi_root: PathBuf,
    /// Checkpoint, per-claim directories and the preload file live here.
    pub plugin_dir: PathBuf,
    /// Host path of the enforcement library.
    pub enforcement_library: PathBuf,
    pub device_nodes: DeviceNodes,
}

/// What start-up reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Spec ids (claim UIDs) removed because no checkpoint entry owns them.
    pub removed: Vec<String>,
    /// Claim UIDs whose spec was missing or different and was written again.
    pub rewritten: Vec<String>,
}

/// The host's side of a spec: the enforcement library and the device nodes.
struct HostFacts {
    library_installed: bool,
    control_nodes: Vec<vgpu_cdi::DeviceNode>,
    /// By GPU minor number.
    gpu_nodes: BTreeMap<u32, vgpu_cdi::DeviceNode>,
}

/// Prepares and unprepares claims; one at a time (the kubelet may call concurrently).
pub struct Preparer {
    cfg: PrepareConfig,
    kind: Kind,
    specs: SpecDir,
    checkpoint: Checkpoint,
    gpus: GpuState,
    /// The checkpoint as of the last operation; in shared mode it is read again from disk
    /// inside the directory lock before every change, since the other instance may have
    /// written since.
    state: Mutex<Recorded>,
    dir_lock: DirLock,
}

/// The prepared claims and where the checkpoint's journal stands.
#[derive(Debug, Default)]
struct Recorded {
    payload: Payload,
    journal: Journal,
}

impl Recorded {
    fn compaction_due(&self) -> bool {
        self.journal.compaction_due(self.payload.claims.len())
    }
}

/// How the plugin directory is kept to one writer at a time.
enum DirLock {
    /// Held for the Preparer's life: the kernel drops it when the process dies, however it
    /// dies, so a restarted plugin never waits for a crashed one. A second instance is
    /// refused, which is what an instance serving the un-suffixed socket names needs: two of
    /// them would replace each other's sockets.
    Lifetime(#[allow(dead_code)] std::fs::File),
    /// Taken around each operation, so two instances (a rolling update with maxSurge) can
    /// share the directory and take turns.
    PerOperation,
}

/// The lock file in the plugin directory.
pub const LOCK_FILE: &str = "plugin.lock";

/// How long an operation waits for the directory lock before it fails. Operations take
/// milliseconds; a lock held longer is held for life, by an instance without a rolling-update
/// UID (or a version before rolling updates), and waiting would only hang the kubelet's call.
pub const LOCK_WAIT: Duration = Duration::from_secs(20);

fn open_lock_file(dir: &Path) -> Result<(std::fs::File, PathBuf), PrepareError> {
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("open", &path))?;
    Ok((file, path))
}

/// Take the plugin directory's exclusive lock for life, or say who holds it.
fn lock_plugin_dir(dir: &Path) -> Result<std::fs::File, PrepareError> {
    let (file, path) = open_lock_file(dir)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(PrepareError::Locked { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
    }
}

/// Take the plugin directory's lock for one operation, waiting up to `wait` for the other
/// instance to finish its own. Polled rather than blocking so that a lifetime holder gives a
/// clear error instead of a hang.
fn lock_for_operation(dir: &Path, wait: Duration) -> Result<std::fs::File, PrepareError> {
    use std::os::unix::fs::MetadataExt;
    let deadline = std::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(1);
    loop {
        let (file, path) = open_lock_file(dir)?;
        match file.try_lock() {
            Ok(()) => {
                // An uninstalling instance unlinks the lock file while holding it: a lock on
                // an unlinked file excludes no one who opens the path afresh, so start over.
                let held = file.metadata().map_err(io_err("inspect", &path))?;
                match std::fs::metadata(&path) {
                    Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                        return Ok(file);
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("inspect", &path)(e)),
                }
                continue;
            }
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
        }
        if std::time::Instant::now() >= deadline {
            return Err(PrepareError::Busy { path, waited: wait });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// One operation's hold on the state: in shared mode the directory lock, and the in-process
/// mutex. Fields drop in order: the directory lock goes first, so a thread of this process
/// that gets the mutex next finds the directory free.
struct Held<'a> {
    _flock: Option<std::fs::File>,
    state: std::sync::MutexGuard<'a, Recorded>,
}

impl Preparer {
    /// Open as the only instance on the plugin directory (it stays locked until the
    /// Preparer is dropped): load the checkpoint (a corrupt one is an error: without it we
    /// cannot know what is in use) and reconcile the CDI directory with it.
    pub fn open(
        cfg: PrepareConfig,
        gpus: GpuState,
    ) -> Result<(Self, ReconcileReport), PrepareError> {
        let lock = lock_plugin_dir(&cfg.plugin_dir)?;
        Self::open_with(cfg, gpus, DirLock::Lifetime(lock))
    }

    /// Open as one of several instances sharing the plugin directory (rolling updates):
    /// every operation, start-up reconciliation included, locks the directory and reads the
    /// checkpoint again, so neither instance overwrites what the other wrote.
    pub fn open_shared(
        cfg: PrepareConfig,
        gpus: GpuState,
    ) -> Result<(Self, ReconcileReport), PrepareError> {
        Self::open_with(cfg, gpus, DirLock::PerOperation)
    }

    fn open_with(
        cfg: PrepareConfig,
        gpus: GpuState,
        dir_lock: DirLock,
    ) -> Result<(Self, ReconcileReport), PrepareError> {
        let kind = cdi_spec::claim_kind(&cfg.driver).map_err(vgpu_cdi::Error::from)?;
        let checkpoint = Checkpoint::in_dir(&cfg.plugin_dir);
        let preparer = Preparer {
            specs: SpecDir::new(&cfg.cdi_root),
            kind,
            checkpoint,
            gpus,
            state: Mutex::new(Recorded::default()),
            cfg,
            dir_lock,
        };
        if matches!(preparer.dir_lock, DirLock::Lifetime(_)) {
            *preparer.lock() = preparer.read_checkpoint()?;
        }
        let report = preparer.reconcile()?;
        Ok((preparer, report))
    }

    /// Start an operation: in shared mode, lock the directory, remove what a crashed write
    /// of either instance left (no write is in progress while we hold the lock) and read the
    /// checkpoint the other instance may have changed.
    fn begin(&self) -> Result<Held<'_>, PrepareError> {
        let mut state = self.lock();
        let flock = match self.dir_lock {
            DirLock::Lifetime(_) => None,
            DirLock::PerOperation => {
                let flock = lock_for_operation(&self.cfg.plugin_dir, LOCK_WAIT)?;
                self.remove_stale_temp_files()?;
                *state = self.read_checkpoint()?;
                Some(flock)
            }
        };
        Ok(Held {
            _flock: flock,
            state,
        })
    }

    fn read_checkpoint(&self) -> Result<Recorded, PrepareError> {
        let (payload, journal) = self.checkpoint.load_with_journal()?;
        Ok(Recorded { payload, journal })
    }

    /// Fold the checkpoint's journal into its snapshot if it has grown enough
    /// ([`Journal::compaction_due`]); the driver calls it after answering, off the kubelet's
    /// wait. Returns whether it did.
    pub fn compact_if_due(&self) -> Result<bool, PrepareError> {
        let mut held = self.begin()?;
        let recorded = &mut *held.state;
        if !recorded.compaction_due() {
            return Ok(false);
        }
        self.compact(recorded)?;
        Ok(true)
    }

    /// Whether the journal had grown enough for compaction as of the last operation: a
    /// cheap hint, checked again under the lock by [`Preparer::compact_if_due`].
    pub fn compaction_due(&self) -> bool {
        self.lock().compaction_due()
    }

    fn compact(&self, recorded: &mut Recorded) -> Result<(), PrepareError> {
        self.checkpoint.store(&recorded.payload)?;
        recorded.journal = Journal::default();
        Ok(())
    }

    fn remove_stale_temp_files(&self) -> Result<(), PrepareError> {
        for path in self.checkpoint.remove_stale_temp_files()? {
            tracing::info!(path = %path.display(), "removed a temporary file a crash left behind");
        }
        self.specs
            .cleanup_stale_temp_files(&self.kind, Duration::ZERO)?;
        Ok(())
    }

    /// Run `f` on the prepared claims as they are on disk, with the directory locked (no
    /// instance prepares or unprepares meanwhile): for decisions that must not race one.
    pub fn with_locked_state<R>(&self, f: impl FnOnce(&Payload) -> R) -> Result<R, PrepareError> {
        let held = self.begin()?;
        Ok(f(&held.state.payload))
    }

    /// The configuration this Preparer was opened with.
    pub fn config(&self) -> &PrepareConfig {
        &self.cfg
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A panic while holding the lock cannot leave the payload half-updated (it is only
        // changed after the checkpoint was written), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The prepared claims now.
    pub fn prepared(&self) -> BTreeMap<String, PreparedClaim> {
        self.lock().payload.claims.clone()
    }

    /// How many claims are prepared now.
    pub fn prepared_count(&self) -> usize {
        self.lock().payload.claims.len()
    }

    /// The recorded answer for a claim, if it is prepared (its spec is restored if missing).
    pub fn prepared_claim(&self, uid: &str) -> Result<Option<PreparedClaim>, PrepareError> {
        let held = self.begin()?;
        match held.state.payload.claims.get(uid) {
            Some(claim) => {
                self.ensure_on_disk(uid, claim)?;
                Ok(Some(claim.clone()))
            }
            None => Ok(None),
        }
    }

    /// The requests of prepared claims whose containers keep an accounting file, and where.
    pub fn watched(&self) -> Vec<crate::usage::Watched> {
        let state = self.lock();
        crate::usage::watched(&state.payload.claims, |uid, request| {
            self.claim_dir(uid)
                .join(cdi_spec::accounting_file_name(request))
        })
    }

    fn claims_dir(&self) -> PathBuf {
        self.cfg.plugin_dir.join("claims")
    }

    fn claim_dir(&self, uid: &str) -> PathBuf {
        self.claims_dir().join(uid)
    }

    fn preload_file(&self) -> PathBuf {
        self.cfg.plugin_dir.join("ld.so.preload")
    }

    /// The preload file holds only the library's container path; rewritten atomically when
    /// it is missing or differs.
    fn ensure_preload_file(&self) -> Result<(), PrepareError> {
        let path = self.preload_file();
        let want = cdi_spec::preload_file_content();
        if std::fs::read_to_string(&path).ok().as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.plugin_dir)
            .map_err(io_err("create directory", &self.cfg.plugin_dir))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".ld.so.preload.")
            .tempfile_in(&self.cfg.plugin_dir)
            .map_err(io_err("create temporary file in", &self.cfg.plugin_dir))?;
        std::io::Write::write_all(&mut tmp, want.as_bytes()).map_err(io_err("write", &path))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &path))?;
        tmp.as_file().sync_all().map_err(io_err("fsync", &path))?;
        tmp.persist(&path)
            .map_err(|e| io_err("rename into place", &path)(e.error))?;
        Ok(())
    }

    /// The per-claim shared directory; world-writable like HAMi's cache directories because
    /// container processes may run as any user.
    fn ensure_claim_dir(&self, uid: &str) -> Result<PathBuf, PrepareError> {
        let dir = self.claim_dir(uid);
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(io_err("chmod", &dir))?;
        Ok(dir)
    }

    fn ensure_on_disk(&self, uid: &str, claim: &PreparedClaim) -> Result<bool, PrepareError> {
        if claim.gpus.iter().any(|g| !g.admin_access) {
            self.ensure_claim_dir(uid)?;
            self.ensure_preload_file()?;
        }
        match self.specs.read(&self.kind, uid) {
            Ok(spec) if spec == claim.spec => Ok(false),
            _ => {
                self.specs
                    .write_with(&claim.spec, uid, vgpu_cdi::Durability::Atomic)?;
                Ok(true)
            }
        }
    }

    /// Prepare a claim; repeated calls return the recorded answer.
    pub fn prepare(&self, alloc: &ClaimAllocation) -> Result<PreparedClaim, PrepareError> {
        match self.prepare_all(std::slice::from_ref(alloc)).pop() {
            Some(result) => result,
            None => Err(PrepareError::Io {
                op: "prepare",
                path: self.checkpoint.path().to_path_buf(),
                source: std::io::Error::other("no answer for the claim"),
            }),
        }
    }

    /// Prepare the claims of one kubelet call, one answer each in the same order; claims
    /// prepared before get their recorded answer. Each claim is admitted against the prepared
    /// claims and those before it in the call, the new entries are made durable with one
    /// append to the checkpoint's journal, then their specs are written (see RELIABILITY.md for
    /// why the specs need no fsync of their own).
    pub fn prepare_all(
        &self,
        allocs: &[ClaimAllocation],
    ) -> Vec<Result<PreparedClaim, PrepareError>> {
        let mut held = match self.begin() {
            Ok(held) => held,
            Err(e) => return shared_error(e, allocs.len()),
        };
        let recorded = &mut *held.state;
        let mut results: Vec<Result<PreparedClaim, PrepareError>> =
            Vec::with_capacity(allocs.len());
        // The claims this call prepares; recorded once their entries are durable.
        let mut added: BTreeMap<String, PreparedClaim> = BTreeMap::new();
        // (index in results, UID) of the claims this call records.
        let mut fresh: Vec<(usize, String)> = Vec::new();
        let snapshot = self.gpus.current();
        let host = self.host_facts(&snapshot, allocs);
        for (i, alloc) in allocs.iter().enumerate() {
            let uid = alloc.uid.as_str();
            if let Some(claim) = recorded.payload.claims.get(uid) {
                results.push(self.ensure_on_disk(uid, claim).map(|_| claim.clone()));
                continue;
            }
            if let Some(claim) = added.get(uid) {
                // Listed twice in this call: the same answer, written once below.
                results.push(Ok(claim.clone()));
                fresh.push((i, uid.to_string()));
                continue;
            }
            let prepared = [&recorded.payload.claims, &added];
            let planned = self
                .plan(alloc, &snapshot, prepared, &host)
                .and_then(|claim| {
                    if claim.gpus.iter().any(|g| !g.admin_access) {
                        self.ensure_claim_dir(uid)?;
                        self.ensure_preload_file()?;
                    }
                    Ok(claim)
                });
            match planned {
                Ok(claim) => {
                    added.insert(uid.to_string(), claim.clone());
                    fresh.push((i, uid.to_string()));
                    results.push(Ok(claim));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if added.is_empty() {
            return results;
        }
        // The reply must not promise what a crash could take back: the entries are durable
        // before any spec exists (a crash in between leaves entries whose specs the next start
        // writes, and the kubelet has no answer yet).
        let puts: Vec<ChangeRef<'_>> = added
            .iter()
            .map(|(uid, claim)| ChangeRef::Put { uid, claim })
            .collect();
        if let Err(e) = self.checkpoint.append(&mut recorded.journal, &puts) {
            let e = Arc::new(PrepareError::from(e));
            for (i, _) in &fresh {
                results[*i] = Err(PrepareError::Shared(e.clone()));
            }
            return results;
        }
        let mut failed: BTreeMap<String, Arc<PrepareError>> = BTreeMap::new();
        for (uid, claim) in &added {
            if let Err(e) = self
                .specs
                .write_with(&claim.spec, uid, vgpu_cdi::Durability::Atomic)
            {
                failed.insert(uid.clone(), Arc::new(e.into()));
            }
        }
        if !failed.is_empty() {
            // Undo those entries so no claim is recorded as prepared without its spec; if
            // that cannot be written they stay recorded, as on disk, and a restart writes
            // their specs.
            let deletes: Vec<ChangeRef<'_>> =
                failed.keys().map(|uid| ChangeRef::Delete { uid }).collect();
            if self
                .checkpoint
                .append(&mut recorded.journal, &deletes)
                .is_ok()
            {
                added.retain(|uid, _| !failed.contains_key(uid));
            }
            for (i, uid) in &fresh {
                if let Some(e) = failed.get(uid) {
                    results[*i] = Err(PrepareError::Shared(e.clone()));
                }
            }
        }
        recorded.payload.claims.extend(added);
        results
    }

    /// What the host has that a spec refers to, read once before planning.
    /// Only the GPUs the call's claims name are looked at: a stat each, not one per GPU of
    /// the node, on the kubelet's critical path.
    fn host_facts(&self, snapshot: &Snapshot, allocs: &[ClaimAllocation]) -> HostFacts {
        let (driver, pool) = (self.cfg.driver.as_str(), self.cfg.node.as_str());
        let minors: BTreeSet<u32> = allocs
            .iter()
            .flat_map(|a| a.results_for(driver, pool))
            .filter_map(|r| snapshot.gpu_by_device(&r.device))
            .map(|g| g.minor)
            .collect();
        HostFacts {
            library_installed: self.cfg.enforcement_library.is_file(),
            control_nodes: self.cfg.device_nodes.control(),
            gpu_nodes: minors
                .into_iter()
                .map(|minor| (minor, self.cfg.device_nodes.gpu(minor)))
                .collect(),
        }
    }

    /// Decide what a claim gets from the allocation, the GPUs, the prepared claims and the
    /// host facts: no I/O, no side effects.
    fn plan(
        &self,
        alloc: &ClaimAllocation,
        snapshot: &Snapshot,
        prepared: [&BTreeMap<String, PreparedClaim>; 2],
        host: &HostFacts,
    ) -> Result<PreparedClaim, PrepareError> {
        let key = alloc.key();
        let uid = alloc.uid.as_str();
        vgpu_cdi::validate_spec_id(uid).map_err(|e| PrepareError::BadUid {
            uid: uid.to_string(),
            message: e.to_string(),
        })?;
        let driver = self.cfg.driver.as_str();
        let pool = self.cfg.node.as_str();
        let results: Vec<_> = alloc.results_for(driver, pool).collect();
        if results.is_empty() {
            return Err(PrepareError::NoDevices {
                claim: key,
                driver: driver.into(),
                pool: pool.into(),
            });
        }
        let mut gpus = Vec::new();
        let mut requests: Vec<RequestDevices> = Vec::new();
        let mut devices = Vec::new();
        for result in &results {
            let gpu = snapshot.gpu_by_device(&result.device).ok_or_else(|| {
                PrepareError::UnknownDevice {
                    claim: key.clone(),
                    device: result.device.clone(),
                    pool: pool.into(),
                }
            })?;
            if let Some(reason) = snapshot.unhealthy_reason(&gpu.uuid) {
                return Err(PrepareError::Unhealthy {
                    claim: key.clone(),
                    device: result.device.clone(),
                    uuid: gpu.uuid.clone(),
                    reason: reason.into(),
                });
            }
            let main = result.main_request().to_string();
            let (memory_bytes, cores, exclusive) = if result.admin_access {
                (gpu.memory_bytes, 100, false)
            } else {
                let limits = alloc
                    .slice_limits(result, gpu.memory_bytes)
                    .map_err(|source| PrepareError::Config {
                        claim: key.clone(),
                        source,
                    })?;
                (limits.memory_bytes, limits.cores, limits.exclusive)
            };
            gpus.push(PreparedGpu {
                device: result.device.clone(),
                uuid: gpu.uuid.clone(),
                request: main.clone(),
                memory_bytes,
                cores,
                exclusive,
                admin_access: result.admin_access,
            });
            let limit = GpuLimit {
                uuid: gpu.uuid.clone(),
                node: host.gpu_nodes.get(&gpu.minor).cloned().ok_or_else(|| {
                    PrepareError::UnknownDevice {
                        claim: key.clone(),
                        device: result.device.clone(),
                        pool: pool.into(),
                    }
                })?,
                memory_bytes,
                cores,
            };
            let share_id = requests
                .iter()
                .find(|r| r.request == main)
                .map_or(result.share_id.clone(), |r| r.share_id.clone());
            let cdi_id = self
                .kind
                .device(&cdi_spec::device_name(uid, &main, share_id.as_deref()))
                .map_err(vgpu_cdi::Error::from)?
                .to_string();
            // The CDI id goes on the first device of each request only: the kubelet gives a
            // container the ids of every device of the requests it uses, and one request is
            // one CDI device, so repeating it would apply the same edits twice.
            let first_of_request = match requests.iter_mut().find(|r| r.request == main) {
                Some(r) => {
                    r.gpus.push(limit);
                    false
                }
                None => {
                    requests.push(RequestDevices {
                        request: main.clone(),
                        share_id: share_id.clone(),
                        admin_access: result.admin_access,
                        gpus: vec![limit],
                    });
                    true
                }
            };
            devices.push(KubeletDevice {
                request_names: vec![main],
                pool_name: result.pool.clone(),
                device_name: result.device.clone(),
                cdi_device_ids: if first_of_request {
                    vec![cdi_id]
                } else {
                    vec![]
                },
                share_id: result.share_id.clone(),
            });
        }
        admit(&key, &gpus, snapshot, prepared)?;
        if gpus.iter().any(|g| !g.admin_access) && !host.library_installed {
            return Err(PrepareError::MissingLibrary {
                claim: key,
                path: self.cfg.enforcement_library.clone(),
            });
        }
        let control = &host.control_nodes;
        let shared_dir = self.claim_dir(uid);
        let preload = self.preload_file();
        let params = ClaimSpecParams {
            kind: &self.kind,
            claim_uid: uid,
            enforcement_library: &self.cfg.enforcement_library,
            preload_file: &preload,
            shared_dir: &shared_dir,
            control_nodes: control,
        };
        let mut spec = cdi_spec::build_claim_spec(&params, &requests).map_err(|source| {
            PrepareError::Spec {
                claim: key.clone(),
                source: Box::new(source),
            }
        })?;
        spec.set_minimum_version();
        Ok(PreparedClaim {
            namespace: alloc.namespace.clone(),
            name: alloc.name.clone(),
            devices,
            gpus,
            spec,
        })
    }

    /// Unprepare a claim: remove its spec, its directory and its entry. Unknown claims
    /// succeed (the kubelet retries until it hears success, also after a claim is deleted).
    pub fn unprepare(&self, uid: &str) -> Result<bool, PrepareError> {
        let mut held = self.begin()?;
        let recorded = &mut *held.state;
        if vgpu_cdi::validate_spec_id(uid).is_err() {
            // No spec or directory could ever have been created for it.
            return Ok(false);
        }
        self.specs.remove(&self.kind, uid)?;
        let dir = self.claim_dir(uid);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &dir)(e)),
        }
        if !recorded.payload.claims.contains_key(uid) {
            return Ok(false);
        }
        self.checkpoint
            .append(&mut recorded.journal, &[ChangeRef::Delete { uid }])?;
        recorded.payload.claims.remove(uid);
        Ok(true)
    }

    /// Make the CDI directory and the claim directories agree with the checkpoint: specs of
    /// our kind that no entry owns are removed, entries whose spec is missing or altered are
    /// written again, claim directories without an entry are removed.
    pub fn reconcile(&self) -> Result<ReconcileReport, PrepareError> {
        let mut held = self.begin()?;
        let recorded = &mut *held.state;
        let mut report = ReconcileReport::default();
        // Under the lock no write is in progress: any temporary file is a crashed write's.
        self.remove_stale_temp_files()?;
        // Start from a snapshot alone, on disk from the first start: the journal is replayed
        // once, not at every start, and what a crash tore off its end is gone.
        if recorded.journal != Journal::default() || !self.checkpoint.path().exists() {
            self.compact(recorded)?;
        }
        let state = &recorded.payload;
        for owned in self.specs.list_owned(&self.kind)? {
            if !state.claims.contains_key(&owned.id) {
                std::fs::remove_file(&owned.path).map_err(io_err("remove", &owned.path))?;
                tracing::info!(claim_uid = %owned.id, "removed a CDI spec no prepared claim owns");
                report.removed.push(owned.id);
            }
        }
        for (uid, claim) in &state.claims {
            if self.ensure_on_disk(uid, claim)? {
                tracing::info!(claim_uid = %uid, "rewrote the CDI spec of a prepared claim");
                report.rewritten.push(uid.clone());
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.claims_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !state.claims.contains_key(&name) {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
                }
            }
        }
        Ok(report)
    }
}

/// `error` as the answer of each of `n` claims.
fn shared_error(error: PrepareError, n: usize) -> Vec<Result<PreparedClaim, PrepareError>> {
    let error = Arc::new(error);
    (0..n)
        .map(|_| Err(PrepareError::Shared(error.clone())))
        .collect()
}

/// The capacity check across every prepared claim (those recorded and those of the call so
/// far) and this one.
fn admit(
    claim: &str,
    new: &[PreparedGpu],
    snapshot: &Snapshot,
    prepared: [&BTreeMap<String, PreparedClaim>; 2],
) -> Result<(), PrepareError> {
    let holder =
        |(uid, c): (&String, &PreparedClaim)| format!("{}/{} ({uid})", c.namespace, c.name);
    for gpu in snapshot.gpus.iter() {
        let mine: Vec<&PreparedGpu> = new
            .iter()
            .filter(|g| g.uuid == gpu.uuid && !g.admin_access)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let device = gpu.device_name();
        // Named in an error only: formatted then.
        let others: Vec<((&String, &PreparedClaim), &PreparedGpu)> = prepared
            .iter()
            .flat_map(|claims| claims.iter())
            .flat_map(|(uid, c)| {
                c.gpus
                    .iter()
                    .filter(|g| g.uuid == gpu.uuid && !g.admin_access)
                    .map(move |g| ((uid, c), g))
            })
            .collect();
        if let Some((who, _)) = others.iter().find(|(_, g)| g.exclusive) {
            return Err(PrepareError::Exclusive {
                claim: claim.into(),
                device,
                holder: holder(*who),
            });
        }
        if mine.len() > 1 && mine.iter().any(|g| g.exclusive) {
            return Err(PrepareError::OverCommitted {
                claim: claim.into(),
                device,
                message: "the claim holds it exclusively and also for another request".into(),
            });
        }
        if let Some((who, _)) = others.first()
            && mine.iter().any(|g| g.exclusive)
        {
            return Err(PrepareError::OverCommitted {
                claim: claim.into(),
                device,
                message: format!(
                    "it asks for the GPU exclusively but claim {} already uses it",
                    holder(*who)
                ),
            });
        }
        let used_memory: u64 = others.iter().map(|(_, g)| g.memory_bytes).sum();
        let used_cores: u32 = others.iter().map(|(_, g)| u32::from(g.cores)).sum();
        let want_memory: u64 = mine.iter().map(|g| g.memory_bytes).sum();
        let want_cores: u32 = mine.iter().map(|g| u32::from(g.cores)).sum();
        if used_memory.saturating_add(want_memory) > gpu.memory_bytes {
            return Err(PrepareError::OverCommitted {
                claim: claim.into(),
                device,
                message: format!(
                    "memory: {want_memory} bytes requested, {used_memory} of {} bytes already prepared for other claims",
                    gpu.memory_bytes
                ),
            });
        }
        if used_cores + want_cores > 100 {
            return Err(PrepareError::OverCommitted {
                claim: claim.into(),
                device,
                message: format!(
                    "cores: {want_cores} % requested, {used_cores} % already prepared for other claims"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
