//! The plugin's record of prepared claims, so that prepare answers the same after a restart,
//! unprepare works after the claim is gone from the API server, and CDI specs can be
//! reconciled at start.
//!
//! Two files in the plugin directory:
//! - `checkpoint.json`, the snapshot: versioned (`apiVersion`/`kind`), with a sha256 checksum
//!   of its canonical payload (compact JSON, fixed field order, sorted maps), written
//!   atomically (a temporary file in the same directory, fsync, rename over the old file,
//!   fsync of the directory), so a crash leaves either the old or the new file.
//! - `checkpoint.journal`, the changes since that snapshot, one line each with the sha256 of
//!   its bytes, appended and made durable with one `fdatasync` per kubelet call. A prepare
//!   costs one line and one flush whatever the number of claims already prepared; the
//!   snapshot is rewritten only when the journal has grown (compaction), and the journal
//!   emptied after it.
//!
//! Reading is the snapshot, then the journal's changes in order. Every change sets or
//! removes one claim, so replaying a journal over a snapshot that already has its changes
//! (a crash between the snapshot's rename and the journal's truncation) gives the same
//! claims. A crash during an append leaves a last line without its newline: no answer was
//! given for it, and it is ignored and cut off before the next append.

use crate::prepare::PreparedClaim;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `apiVersion` of the checkpoint file.
pub const API_VERSION: &str = "vgpu.hami.io/v1";
/// `kind` of the checkpoint file.
pub const KIND: &str = "KubeletPluginCheckpoint";
/// `kind` of the journal's first line.
pub const JOURNAL_KIND: &str = "KubeletPluginCheckpointJournal";
/// File name in the plugin directory.
pub const FILE_NAME: &str = "checkpoint.json";
/// The journal's file name in the plugin directory.
pub const JOURNAL_FILE_NAME: &str = "checkpoint.journal";
/// The journal is folded into the snapshot once it holds this many changes, or as many as
/// there are prepared claims if that is more: the snapshot's rewrite, whose cost grows with
/// the claims, is paid once per at least as many appends.
pub const COMPACT_AFTER: usize = 256;

/// What the checkpoint records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Payload {
    /// Claim UID → what was prepared.
    pub claims: BTreeMap<String, PreparedClaim>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope {
    api_version: String,
    kind: String,
    checksum: String,
    payload: Payload,
}

/// What [`Checkpoint::store`] writes: the payload borrowed, not copied.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeRef<'a> {
    api_version: &'a str,
    kind: &'a str,
    checksum: String,
    payload: &'a Payload,
}

/// One change of the journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Change {
    /// The claim is prepared with this answer.
    Put {
        uid: String,
        claim: Box<PreparedClaim>,
    },
    /// The claim is no longer prepared.
    Delete { uid: String },
}

/// A change to append, borrowing what it records; serialized as [`Change`].
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ChangeRef<'a> {
    Put {
        uid: &'a str,
        claim: &'a PreparedClaim,
    },
    Delete {
        uid: &'a str,
    },
}

/// The journal's first line.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JournalHeader {
    api_version: String,
    kind: String,
}

/// A line of the journal: the change as written and the sha256 of exactly those bytes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalLine<'a> {
    checksum: String,
    #[serde(borrow)]
    change: &'a serde_json::value::RawValue,
}

/// Where the journal stands, as read or last written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Journal {
    /// Bytes of complete lines; anything after them was torn by a crash during an append.
    pub len: u64,
    /// The file is longer than `len`: cut before the next append.
    pub torn: bool,
    /// Changes in it, since the snapshot.
    pub changes: usize,
}

impl Journal {
    /// Whether the journal should be folded into the snapshot now.
    pub fn compaction_due(&self, claims: usize) -> bool {
        self.changes >= COMPACT_AFTER.max(claims)
    }
}

/// Why the checkpoint cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a checkpoint file: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error(
        "checkpoint {path} has apiVersion {api_version:?} kind {kind:?}; this plugin reads only \
         {API_VERSION} {expected}"
    )]
    Version {
        path: PathBuf,
        api_version: String,
        kind: String,
        /// The kind this file must have: the snapshot's or the journal's.
        expected: &'static str,
    },
    #[error(
        "checkpoint {path} is corrupt: checksum {found} does not match its content ({computed}); \
         inspect it, then remove it to start over (prepared claims will have to be prepared again)"
    )]
    Checksum {
        path: PathBuf,
        found: String,
        computed: String,
    },
    #[error(
        "checkpoint journal {path} line {line} is corrupt: {message}; inspect it, then remove \
         it and {FILE_NAME} to start over (prepared claims will have to be prepared again)"
    )]
    Journal {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("checkpoint: cannot encode: {0}")]
    Encode(serde_json::Error),
}

fn hex_sha256(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn checksum(payload: &Payload) -> Result<String, CheckpointError> {
    let bytes = serde_json::to_vec(payload).map_err(CheckpointError::Encode)?;
    Ok(hex_sha256(&bytes))
}

/// The keys become file and directory names (CDI spec ids, claim directories): a crafted
/// file must not steer a write or a removal outside the plugin's directories, even with a
/// recomputed checksum.
fn check_uid(uid: &str) -> Result<(), String> {
    vgpu_cdi::validate_spec_id(uid).map_err(|e| format!("{uid:?}: {e}"))
}

/// Apply the journal read from `path` (named in errors) to `payload`, the snapshot it
/// follows. An unterminated last line is a crash's torn append and is left out; any other
/// line that does not verify is an error, since a change that was answered would be lost.
/// Never panics.
pub fn decode_journal(
    path: &Path,
    bytes: &[u8],
    payload: &mut Payload,
) -> Result<Journal, CheckpointError> {
    let complete = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |last| last + 1);
    let mut journal = Journal {
        len: complete as u64,
        torn: complete < bytes.len(),
        changes: 0,
    };
    let corrupt = |line: usize, message: String| CheckpointError::Journal {
        path: path.to_path_buf(),
        line,
        message,
    };
    let lines = match bytes[..complete].strip_suffix(b"\n") {
        Some(lines) => lines.split(|&b| b == b'\n'),
        None => return Ok(journal),
    };
    for (index, line) in lines.enumerate() {
        let number = index + 1;
        if index == 0 {
            let header: JournalHeader =
                serde_json::from_slice(line).map_err(|e| corrupt(number, e.to_string()))?;
            if header.api_version != API_VERSION || header.kind != JOURNAL_KIND {
                return Err(CheckpointError::Version {
                    path: path.to_path_buf(),
                    api_version: header.api_version,
                    kind: header.kind,
                    expected: JOURNAL_KIND,
                });
            }
            continue;
        }
        let entry: JournalLine =
            serde_json::from_slice(line).map_err(|e| corrupt(number, e.to_string()))?;
        let computed = hex_sha256(entry.change.get().as_bytes());
        if computed != entry.checksum {
            return Err(corrupt(
                number,
                format!(
                    "checksum {} does not match its change ({computed})",
                    entry.checksum
                ),
            ));
        }
        let change: Change =
            serde_json::from_str(entry.change.get()).map_err(|e| corrupt(number, e.to_string()))?;
        match change {
            Change::Put { uid, claim } => {
                check_uid(&uid).map_err(|m| corrupt(number, format!("claim key {m}")))?;
                payload.claims.insert(uid, *claim);
            }
            Change::Delete { uid } => {
                check_uid(&uid).map_err(|m| corrupt(number, format!("claim key {m}")))?;
                payload.claims.remove(&uid);
            }
        }
        journal.changes += 1;
    }
    Ok(journal)
}

/// The checkpoint file at `<dir>/checkpoint.json`.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    path: PathBuf,
    journal: PathBuf,
}

/// `Ok(None)` for a missing file.
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, CheckpointError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Verify and decode a checkpoint read from `path` (named in errors). Never panics: the file
/// may have been truncated by a crash or edited by hand.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Payload, CheckpointError> {
    let path = &path.to_path_buf();
    let malformed = |message: String| CheckpointError::Malformed {
        path: path.clone(),
        message,
    };
    // The version is checked before the payload is decoded, so a file from another
    // version is reported as such rather than as a decoding error.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
    if api_version != API_VERSION || kind != KIND {
        return Err(CheckpointError::Version {
            path: path.clone(),
            api_version: api_version.to_string(),
            kind: kind.to_string(),
            expected: KIND,
        });
    }
    let envelope: Envelope = serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
    let computed = checksum(&envelope.payload)?;
    if computed != envelope.checksum {
        return Err(CheckpointError::Checksum {
            path: path.clone(),
            found: envelope.checksum,
            computed,
        });
    }
    for uid in envelope.payload.claims.keys() {
        check_uid(uid).map_err(|m| malformed(format!("payload.claims key {m}")))?;
    }
    Ok(envelope.payload)
}

impl Checkpoint {
    pub fn in_dir(dir: &Path) -> Self {
        Checkpoint {
            path: dir.join(FILE_NAME),
            journal: dir.join(JOURNAL_FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn journal_path(&self) -> &Path {
        &self.journal
    }

    /// The prepared claims: the snapshot with the journal's changes applied. Missing files
    /// are empty.
    pub fn load(&self) -> Result<Payload, CheckpointError> {
        self.load_with_journal().map(|(payload, _)| payload)
    }

    /// [`Checkpoint::load`], and where the journal stands for the next append.
    pub fn load_with_journal(&self) -> Result<(Payload, Journal), CheckpointError> {
        let mut payload = match read_if_present(&self.path)? {
            Some(bytes) => decode(&self.path, &bytes)?,
            None => Payload::default(),
        };
        let journal = match read_if_present(&self.journal)? {
            Some(bytes) => decode_journal(&self.journal, &bytes, &mut payload)?,
            None => Journal::default(),
        };
        Ok((payload, journal))
    }

    /// Append `changes` to the journal in one write and make them durable (one
    /// `fdatasync`; the directory too when the file is new). `journal` is where the file
    /// stands and is moved past them. On failure the file is cut back to where it stood, so
    /// a change that was not answered as written is not read later either.
    pub fn append(
        &self,
        journal: &mut Journal,
        changes: &[ChangeRef<'_>],
    ) -> Result<(), CheckpointError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = &self.journal;
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| CheckpointError::Io { op, path, source }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // Opened as it is; created (and its directory flushed below) only the first time.
        let (mut file, created) = match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => (file, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io("create directory"))?;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io("create"))?;
                *journal = Journal::default();
                (file, true)
            }
            Err(source) => return Err(io("open")(source)),
        };
        let mut bytes = Vec::new();
        if journal.len == 0 {
            serde_json::to_writer(
                &mut bytes,
                &JournalHeader {
                    api_version: API_VERSION.into(),
                    kind: JOURNAL_KIND.into(),
                },
            )
            .map_err(CheckpointError::Encode)?;
            bytes.push(b'\n');
        }
        for change in changes {
            let body = serde_json::to_vec(change).map_err(CheckpointError::Encode)?;
            bytes.extend_from_slice(b"{\"checksum\":\"");
            bytes.extend_from_slice(hex_sha256(&body).as_bytes());
            bytes.extend_from_slice(b"\",\"change\":");
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(b"}\n");
        }
        if journal.torn {
            // What a crash tore off an append (never answered) goes before anything follows.
            file.set_len(journal.len).map_err(io("truncate"))?;
            journal.torn = false;
        }
        let written = std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(journal.len))
            .map_err(io("seek"))
            .and_then(|_| file.write_all(&bytes).map_err(io("write")))
            .and_then(|()| file.sync_data().map_err(io("fdatasync")))
            .and_then(|()| {
                if created {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io("fsync directory"))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            if file.set_len(journal.len).is_err() {
                journal.torn = true;
            }
            return Err(e);
        }
        journal.len += bytes.len() as u64;
        journal.changes += changes.len();
        Ok(())
    }

    /// Remove the temporary files of writes that a crash interrupted (`.checkpoint.*.tmp`
    /// and the preload file's `.ld.so.preload.*` beside it). Only safe while no other
    /// process writes in the directory, which the plugin directory's lock ensures.
    pub fn remove_stale_temp_files(&self) -> Result<Vec<PathBuf>, CheckpointError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "list",
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = (name.starts_with(".checkpoint.") && name.ends_with(".tmp"))
                || name.starts_with(".ld.so.preload.");
            if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|source| CheckpointError::Io {
                    op: "remove",
                    path: path.clone(),
                    source,
                })?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Write the payload as the snapshot, atomically, then empty the journal (its changes
    /// are in the snapshot; a crash in between replays them over it, to the same claims).
    /// The journal then stands at [`Journal::default`].
    pub fn store(&self, payload: &Payload) -> Result<(), CheckpointError> {
        let envelope = EnvelopeRef {
            api_version: API_VERSION,
            kind: KIND,
            checksum: checksum(payload)?,
            payload,
        };
        let mut bytes = serde_json::to_vec_pretty(&envelope).map_err(CheckpointError::Encode)?;
        bytes.push(b'\n');
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CheckpointError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".checkpoint.")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io("create temporary file", dir))?;
        tmp.write_all(&bytes).map_err(io("write", tmp.path()))?;
        tmp.as_file().sync_all().map_err(io("fsync", &self.path))?;
        tmp.persist(&self.path)
            .map_err(|e| io("rename into place", &self.path)(e.error))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync directory", dir))?;
        match std::fs::OpenOptions::new().write(true).open(&self.journal) {
            Ok(journal) => {
                journal.set_len(0).map_err(io("truncate", &self.journal))?;
                journal
                    .sync_data()
                    .map_err(io("fdatasync", &self.journal))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "open",
                    path: self.journal.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::{KubeletDevice, PreparedClaim, PreparedGpu};

    fn payload() -> Payload {
        let kind = crate::cdi_spec::claim_kind("vgpu.hami.io").unwrap();
        let spec = vgpu_cdi::Spec::new(
            &kind,
            vec![vgpu_cdi::Device::new(
                "u1-gpu",
                vgpu_cdi::ContainerEdits {
                    env: vec!["A=1".into()],
                    ..Default::default()
                },
            )],
        );
        let claim = PreparedClaim {
            namespace: "ml".into(),
            name: "train".into(),
            devices: vec![KubeletDevice {
                request_names: vec!["gpu".into()],
                pool_name: "node-a".into(),
                device_name: "gpu-0".into(),
                cdi_device_ids: vec!["k8s.vgpu.hami.io/claim=u1-gpu".into()],
                share_id: None,
            }],
            gpus: vec![PreparedGpu {
                device: "gpu-0".into(),
                uuid: "GPU-a".into(),
                request: "gpu".into(),
                memory_bytes: 4 << 30,
                cores: 30,
                exclusive: false,
                admin_access: false,
            }],
            spec,
        };
        Payload {
            claims: [("u1".to_string(), claim)].into(),
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        assert_eq!(cp.load().unwrap(), Payload::default());
        cp.store(&payload()).unwrap();
        assert_eq!(cp.load().unwrap(), payload());
        let text = std::fs::read_to_string(cp.path()).unwrap();
        assert!(
            text.contains("\"apiVersion\": \"vgpu.hami.io/v1\""),
            "{text}"
        );
        assert!(
            text.contains("\"kind\": \"KubeletPluginCheckpoint\""),
            "{text}"
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)]);
    }

    fn claim_of(p: &Payload) -> PreparedClaim {
        p.claims.values().next().unwrap().clone()
    }

    #[test]
    fn the_journal_records_changes_after_the_snapshot_until_the_next_store() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        cp.store(&payload()).unwrap();
        let snapshot = std::fs::read(cp.path()).unwrap();
        let (mut want, mut journal) = cp.load_with_journal().unwrap();
        assert_eq!(journal, Journal::default());
        let claim = claim_of(&want);
        cp.append(
            &mut journal,
            &[
                ChangeRef::Put {
                    uid: "u2",
                    claim: &claim,
                },
                ChangeRef::Put {
                    uid: "u3",
                    claim: &claim,
                },
            ],
        )
        .unwrap();
        cp.append(&mut journal, &[ChangeRef::Delete { uid: "u1" }])
            .unwrap();
        want.claims.insert("u2".into(), claim.clone());
        want.claims.insert("u3".into(), claim.clone());
        want.claims.remove("u1");
        // An append leaves the snapshot as it was: its cost does not grow with the claims.
        assert_eq!(std::fs::read(cp.path()).unwrap(), snapshot);
        let (read, read_journal) = cp.load_with_journal().unwrap();
        assert_eq!(read, want);
        assert_eq!(read_journal, journal);
        assert_eq!(journal.changes, 3);
        let text = std::fs::read_to_string(cp.journal_path()).unwrap();
        assert_eq!(
            text.lines().count(),
            4,
            "a header and one line per change: {text}"
        );
        assert!(text.starts_with(
            "{\"apiVersion\":\"vgpu.hami.io/v1\",\"kind\":\"KubeletPluginCheckpointJournal\"}\n"
        ));

        // A store folds it in and empties it.
        cp.store(&read).unwrap();
        assert_eq!(std::fs::metadata(cp.journal_path()).unwrap().len(), 0);
        assert_eq!(
            cp.load_with_journal().unwrap(),
            (want.clone(), Journal::default())
        );
        // Replaying the old journal over the new snapshot (a crash between the snapshot's
        // rename and the journal's truncation) reads the same claims.
        std::fs::write(cp.journal_path(), &text).unwrap();
        assert_eq!(cp.load().unwrap(), want);
        assert!(!journal.compaction_due(0), "3 changes are not enough");
        assert!(
            Journal {
                changes: 300,
                ..journal
            }
            .compaction_due(299)
        );
        assert!(
            !Journal {
                changes: 300,
                ..journal
            }
            .compaction_due(301)
        );
    }

    #[test]
    fn a_torn_append_is_ignored_and_cut_off_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        let p = payload();
        let claim = claim_of(&p);
        let mut journal = Journal::default();
        cp.append(
            &mut journal,
            &[ChangeRef::Put {
                uid: "u1",
                claim: &claim,
            }],
        )
        .unwrap();
        let whole = std::fs::read(cp.journal_path()).unwrap();
        // Every cut of a second append that a crash can leave.
        let mut second = Journal::default();
        let mut with_second = journal;
        cp.append(&mut with_second, &[ChangeRef::Delete { uid: "u1" }])
            .unwrap();
        let longer = std::fs::read(cp.journal_path()).unwrap();
        for cut in whole.len()..longer.len() {
            std::fs::write(cp.journal_path(), &longer[..cut]).unwrap();
            let (read, torn) = cp.load_with_journal().unwrap();
            assert_eq!(read, p, "cut at {cut}");
            assert_eq!(torn.len, whole.len() as u64);
            assert_eq!(torn.torn, cut > whole.len());
            second = torn;
        }
        // The next append starts where the last whole line ended.
        cp.append(&mut second, &[ChangeRef::Delete { uid: "u1" }])
            .unwrap();
        assert_eq!(std::fs::read(cp.journal_path()).unwrap(), longer);
        assert_eq!(cp.load().unwrap(), Payload::default());
        // A header torn before its newline: nothing was ever answered from this file.
        std::fs::write(cp.journal_path(), b"{\"apiVersion\":\"vgpu.ha").unwrap();
        let (read, torn) = cp.load_with_journal().unwrap();
        assert_eq!(read, Payload::default());
        assert_eq!((torn.len, torn.torn, torn.changes), (0, true, 0));
    }

    #[test]
    fn a_journal_line_that_does_not_verify_is_an_error_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        let claim = claim_of(&payload());
        let mut journal = Journal::default();
        cp.append(
            &mut journal,
            &[
                ChangeRef::Put {
                    uid: "u1",
                    claim: &claim,
                },
                ChangeRef::Delete { uid: "u9" },
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(cp.journal_path()).unwrap();
        let cases = [
            // A changed byte in a change: its checksum no longer matches.
            (
                text.replace("\"cores\":30", "\"cores\":31"),
                "line 2",
                "checksum",
            ),
            // A key that is not a safe file name, even with a matching checksum.
            {
                let body = "{\"delete\":{\"uid\":\"../../etc\"}}";
                let line = format!(
                    "{{\"checksum\":\"{}\",\"change\":{body}}}\n",
                    hex_sha256(body.as_bytes())
                );
                (format!("{text}{line}"), "line 4", "../../etc")
            },
            (format!("{text}garbage\n"), "line 4", "checkpoint journal"),
            (
                text.replace("KubeletPluginCheckpointJournal", "Other"),
                "Other",
                // The kind it wants is the journal's, not the snapshot's.
                "reads only vgpu.hami.io/v1 KubeletPluginCheckpointJournal",
            ),
        ];
        for (bytes, line, what) in cases {
            std::fs::write(cp.journal_path(), &bytes).unwrap();
            let err = cp.load().unwrap_err().to_string();
            assert!(
                err.contains(line) && err.contains(what) && err.contains("checkpoint.journal"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_claim_uid_that_is_not_a_safe_file_name_is_refused_even_with_a_valid_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        let mut p = payload();
        let claim = p.claims.values().next().unwrap().clone();
        p.claims.insert("../../etc".into(), claim);
        // What store() would write, checksum included, bypassing nothing but the key check.
        let envelope = Envelope {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            checksum: checksum(&p).unwrap(),
            payload: p,
        };
        std::fs::write(cp.path(), serde_json::to_vec(&envelope).unwrap()).unwrap();
        let err = cp.load().unwrap_err().to_string();
        assert!(
            err.contains("payload.claims key \"../../etc\"") && err.contains("checkpoint.json"),
            "{err}"
        );
    }

    #[test]
    fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        cp.store(&payload()).unwrap();
        let text = std::fs::read_to_string(cp.path()).unwrap();
        std::fs::write(cp.path(), text.replace("\"cores\": 30", "\"cores\": 31")).unwrap();
        let err = cp.load().unwrap_err();
        assert!(matches!(err, CheckpointError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn other_versions_and_garbage_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Checkpoint::in_dir(dir.path());
        cp.store(&payload()).unwrap();
        let text = std::fs::read_to_string(cp.path()).unwrap();
        std::fs::write(
            cp.path(),
            text.replace("vgpu.hami.io/v1\"", "vgpu.hami.io/v2\""),
        )
        .unwrap();
        let err = cp.load().unwrap_err();
        assert!(matches!(err, CheckpointError::Version { .. }), "{err}");
        assert!(err.to_string().contains("vgpu.hami.io/v2"), "{err}");
        for garbage in ["", "{", "[]", "{\"apiVersion\": 3}", "\u{0}\u{1}"] {
            std::fs::write(cp.path(), garbage).unwrap();
            assert!(cp.load().is_err(), "{garbage:?} was accepted");
        }
        std::fs::write(
            cp.path(),
            format!("{{\"apiVersion\":\"{API_VERSION}\",\"kind\":\"{KIND}\",\"checksum\":\"x\",\"payload\":{{\"claims\":{{\"u\":{{}}}}}}}}"),
        )
        .unwrap();
        assert!(matches!(
            cp.load().unwrap_err(),
            CheckpointError::Malformed { .. }
        ));
    }
}
