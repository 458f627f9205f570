//! The plugin's record of prepared claims, so that prepare answers the same after a restart,
//! unprepare works after the claim is gone from the API server, and CDI specs can be
//! reconciled at start.
//!
//! The file is versioned (`apiVersion`/`kind`) and carries a sha256 checksum of its canonical
//! payload (the payload serialized as compact JSON with a fixed field order and sorted maps).
//! It is written atomically: a temporary file in the same directory, fsync, rename over the
//! old file, fsync of the directory, so a crash leaves either the old or the new file.

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
/// File name in the plugin directory.
pub const FILE_NAME: &str = "checkpoint.json";

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
         {API_VERSION} {KIND}"
    )]
    Version {
        path: PathBuf,
        api_version: String,
        kind: String,
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
    #[error("checkpoint: cannot encode: {0}")]
    Encode(serde_json::Error),
}

fn checksum(payload: &Payload) -> Result<String, CheckpointError> {
    let bytes = serde_json::to_vec(payload).map_err(CheckpointError::Encode)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// The checkpoint file at `<dir>/checkpoint.json`.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    path: PathBuf,
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
    // The keys become file and directory names (CDI spec ids, claim directories): a crafted
    // file must not steer a write or a removal outside the plugin's directories, even with
    // a recomputed checksum.
    for uid in envelope.payload.claims.keys() {
        vgpu_cdi::validate_spec_id(uid)
            .map_err(|e| malformed(format!("payload.claims key {uid:?}: {e}")))?;
    }
    Ok(envelope.payload)
}

impl Checkpoint {
    pub fn in_dir(dir: &Path) -> Self {
        Checkpoint {
            path: dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read and verify the file; a missing file is an empty payload.
    pub fn load(&self) -> Result<Payload, CheckpointError> {
        let path = &self.path;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Payload::default()),
            Err(source) => {
                return Err(CheckpointError::Io {
                    op: "read",
                    path: path.clone(),
                    source,
                });
            }
        };
        decode(path, &bytes)
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

    /// Write the payload atomically.
    pub fn store(&self, payload: &Payload) -> Result<(), CheckpointError> {
        let envelope = Envelope {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            checksum: checksum(payload)?,
            payload: payload.clone(),
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
