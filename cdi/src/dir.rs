//! A CDI spec directory (normally `/var/run/cdi`) that runtimes watch.
//!
//! Runtimes reload spec files as soon as they appear, so a spec must never be
//! seen half-written: we write a temporary file whose name runtimes ignore
//! (leading `.`, no `.json`/`.yaml` suffix), fsync it, rename it over the
//! final name and fsync the directory. File names follow the Go library's
//! transient spec names, `<vendor>-<class>_<id>.json`; the id is checked so it
//! can never leave the directory.

use std::fs::{self, File, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, IdProblem};
use crate::name::Kind;
use crate::spec::Spec;

/// Longest accepted spec id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Mode of written spec files.
pub const SPEC_FILE_MODE: u32 = 0o644;
/// Longest file name most Linux filesystems allow.
const NAME_MAX: usize = 255;
const EXTENSION: &str = ".json";
const TEMP_SUFFIX: &str = ".tmp";
const TEMP_RAND_LEN: usize = 6;

/// Checks that `id` is usable as the transient part of a spec file name:
/// non-empty, at most [`MAX_ID_LEN`] bytes, only `A-Z a-z 0-9 - _ .`, not
/// starting with `.`, and without `..`. (The Go library maps `/` to `_`; we
/// refuse it instead, so two ids can never share a file.)
pub fn validate_spec_id(id: &str) -> Result<(), Error> {
    let problem = if id.is_empty() {
        Some(IdProblem::Empty)
    } else if id.contains('/') {
        Some(IdProblem::Slash)
    } else if id.contains('\0') {
        Some(IdProblem::Nul)
    } else if id.contains("..") {
        Some(IdProblem::DotDot)
    } else if id.starts_with('.') {
        Some(IdProblem::LeadingDot)
    } else if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        Some(IdProblem::InvalidChar(c))
    } else if id.len() > MAX_ID_LEN {
        Some(IdProblem::TooLong)
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::InvalidId {
            id: id.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// The Go library's `GenerateTransientSpecName(vendor, class, id)`:
/// `<vendor>-<class>_<id>`, without extension. The id is validated.
pub fn transient_spec_name(kind: &Kind, id: &str) -> Result<String, Error> {
    validate_spec_id(id)?;
    let stem = format!("{}_{id}", owned_prefix_stem(kind));
    // The temporary name is the longest: ".<stem>.XXXXXX.tmp".
    if stem.len() + 2 + TEMP_RAND_LEN + TEMP_SUFFIX.len() > NAME_MAX {
        return Err(Error::FileNameTooLong(format!("{stem}{EXTENSION}")));
    }
    Ok(stem)
}

fn owned_prefix_stem(kind: &Kind) -> String {
    format!("{}-{}", kind.vendor(), kind.class())
}

/// Reads, parses (rejecting unknown fields) and validates one spec file.
pub fn read_spec_file(path: impl AsRef<Path>) -> Result<Spec, Error> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
        path: path.to_owned(),
        source,
    })?;
    spec.validate().map_err(|source| Error::InvalidFile {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    Ok(spec)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// How far [`SpecDir::write_with`] goes before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The file and the directory are fsynced: the spec survives a machine crash.
    Durable,
    /// Atomic for readers (a temporary file renamed into place) but not flushed: after a
    /// machine crash the file may be missing, empty or hold an earlier version. For a writer
    /// that keeps its own durable record and rewrites the specs from it on start.
    Atomic,
}

/// One spec file found by [`SpecDir::list_owned`].
#[derive(Debug)]
pub struct OwnedSpec {
    /// The id the spec was written under.
    pub id: String,
    pub path: PathBuf,
    /// The parsed, validated spec, or why the file could not be loaded.
    pub spec: Result<Spec, Error>,
}

/// A directory of CDI spec files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecDir {
    root: PathBuf,
}

impl SpecDir {
    /// The dynamic CDI directory runtimes read by default.
    pub const DEFAULT_DYNAMIC: &'static str = "/var/run/cdi";

    /// A spec directory at `root`; it is created on the first write.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the spec of `kind` with `id` lives.
    pub fn path_for(&self, kind: &Kind, id: &str) -> Result<PathBuf, Error> {
        let stem = transient_spec_name(kind, id)?;
        Ok(self.root.join(format!("{stem}{EXTENSION}")))
    }

    /// Writes `spec` atomically as `<vendor>-<class>_<id>.json` (mode 0644),
    /// with `cdiVersion` set to the minimum version its content needs, after
    /// validating it. Replaces an existing spec with the same kind and id.
    /// Returns the final path.
    pub fn write(&self, spec: &Spec, id: &str) -> Result<PathBuf, Error> {
        self.write_with(spec, id, Durability::Durable)
    }

    /// [`SpecDir::write`], flushed to disk only as far as `durability` asks.
    pub fn write_with(
        &self,
        spec: &Spec,
        id: &str,
        durability: Durability,
    ) -> Result<PathBuf, Error> {
        let kind = spec.parsed_kind()?;
        let stem = transient_spec_name(&kind, id)?;
        let target = self.root.join(format!("{stem}{EXTENSION}"));

        let mut spec = spec.clone();
        spec.set_minimum_version();
        spec.validate()?;
        let bytes = spec.to_json_pretty()?;

        fs::create_dir_all(&self.root).map_err(|e| Error::io("create", &self.root, e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{stem}."))
            .suffix(TEMP_SUFFIX)
            .rand_bytes(TEMP_RAND_LEN)
            .tempfile_in(&self.root)
            .map_err(|e| Error::io("create temporary file in", &self.root, e))?;
        let tmp_path = tmp.path().to_owned();
        tmp.as_file()
            .set_permissions(Permissions::from_mode(SPEC_FILE_MODE))
            .map_err(|e| Error::io("chmod", &tmp_path, e))?;
        tmp.write_all(&bytes)
            .map_err(|e| Error::io("write", &tmp_path, e))?;
        if durability == Durability::Durable {
            tmp.as_file()
                .sync_all()
                .map_err(|e| Error::io("fsync", &tmp_path, e))?;
        }
        // On failure the temporary file is removed when `tmp` is dropped.
        tmp.persist(&target)
            .map_err(|e| Error::io("rename into place", &target, e.error))?;
        if durability == Durability::Durable {
            sync_dir(&self.root)?;
        }
        Ok(target)
    }

    /// Reads back the spec of `kind` with `id`, checking its kind.
    pub fn read(&self, kind: &Kind, id: &str) -> Result<Spec, Error> {
        let path = self.path_for(kind, id)?;
        let spec = read_spec_file(&path)?;
        if spec.kind != kind.to_string() {
            return Err(Error::KindMismatch {
                path,
                expected: kind.to_string(),
                found: spec.kind,
            });
        }
        Ok(spec)
    }

    /// Removes the spec of `kind` with `id`. Idempotent: returns `Ok(false)`
    /// if it did not exist.
    pub fn remove(&self, kind: &Kind, id: &str) -> Result<bool, Error> {
        let path = self.path_for(kind, id)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.root)?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove", &path, e)),
        }
    }

    /// The specs of `kind` in this directory (files `<vendor>-<class>_<id>.json`
    /// with a valid id), sorted by id. A file that cannot be read, parsed or
    /// validated is returned with its error; a valid spec of another kind
    /// whose file name happens to share the prefix is skipped. A missing
    /// directory is an empty list.
    pub fn list_owned(&self, kind: &Kind) -> Result<Vec<OwnedSpec>, Error> {
        let prefix = format!("{}_", owned_prefix_stem(kind));
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read directory", &self.root, e)),
        };
        let kind_str = kind.to_string();
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &self.root, e))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            let Some(id) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(EXTENSION))
            else {
                continue;
            };
            if validate_spec_id(id).is_err() {
                continue;
            }
            let path = entry.path();
            let spec = match read_spec_file(&path) {
                Ok(spec) if spec.kind != kind_str => continue,
                other => other,
            };
            out.push(OwnedSpec {
                id: id.to_owned(),
                path,
                spec,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Removes temporary files of `kind` left by an interrupted [`write`]
    /// (`.<vendor>-<class>_<id>.XXXXXX.tmp`) that were last modified at least
    /// `older_than` ago; pass `Duration::ZERO` at startup, before any write.
    /// Returns the removed paths.
    ///
    /// [`write`]: SpecDir::write
    pub fn cleanup_stale_temp_files(
        &self,
        kind: &Kind,
        older_than: Duration,
    ) -> Result<Vec<PathBuf>, Error> {
        let prefix = format!(".{}_", owned_prefix_stem(kind));
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("read directory", &self.root, e)),
        };
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &self.root, e))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if !(name.starts_with(&prefix) && name.ends_with(TEMP_SUFFIX)) {
                continue;
            }
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", &path, e)),
            };
            if !meta.is_file() {
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            if age < older_than {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &path, e)),
            }
        }
        if !removed.is_empty() {
            sync_dir(&self.root)?;
        }
        removed.sort();
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["3f2a0c1e-1b2c-4d5e-8f90-0123456789ab", "a", "a.b_c-D9"] {
            validate_spec_id(ok).unwrap();
        }
        let problem = |id: &str| match validate_spec_id(id) {
            Err(Error::InvalidId { problem, .. }) => problem,
            other => panic!("{id:?}: {other:?}"),
        };
        assert_eq!(problem(""), IdProblem::Empty);
        assert_eq!(problem("../etc"), IdProblem::Slash);
        assert_eq!(problem("a/b"), IdProblem::Slash);
        assert_eq!(problem(".."), IdProblem::DotDot);
        assert_eq!(problem("a..b"), IdProblem::DotDot);
        assert_eq!(problem("a\0b"), IdProblem::Nul);
        assert_eq!(problem(".hidden"), IdProblem::LeadingDot);
        assert_eq!(problem("a b"), IdProblem::InvalidChar(' '));
        assert_eq!(problem("a\\b"), IdProblem::InvalidChar('\\'));
        assert_eq!(problem(&"a".repeat(MAX_ID_LEN + 1)), IdProblem::TooLong);
        validate_spec_id(&"a".repeat(MAX_ID_LEN)).unwrap();
        assert_eq!(
            validate_spec_id("../x").unwrap_err().to_string(),
            "invalid spec id \"../x\": contains '/' (path separator)"
        );
    }

    #[test]
    fn transient_names_match_go_library() {
        let kind: Kind = "k8s.vgpu.hami.io/claim".parse().unwrap();
        assert_eq!(
            transient_spec_name(&kind, "uid-1").unwrap(),
            "k8s.vgpu.hami.io-claim_uid-1"
        );
        let long: Kind = format!("{}/c", "v".repeat(200)).parse().unwrap();
        assert!(matches!(
            transient_spec_name(&long, &"i".repeat(60)),
            Err(Error::FileNameTooLong(_))
        ));
    }
}
