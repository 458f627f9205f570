//! Error types. Every error names the object or field it is about, so a
//! message in a kubelet log is enough to find the offending input.

use std::path::PathBuf;

use thiserror::Error;

use crate::version::Version;

/// Which kind of CDI name a [`NameError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// The vendor part of a kind (`vendor/class`).
    Vendor,
    /// The class part of a kind (`vendor/class`).
    Class,
    /// An unqualified device name.
    Device,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Vendor => "vendor name",
            NameKind::Class => "class name",
            NameKind::Device => "device name",
        })
    }
}

/// A vendor, class or device name that the CDI parser would refuse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    #[error("invalid {kind}: empty name")]
    Empty { kind: NameKind },
    #[error("invalid {kind} {name:?}: must start with {expected}")]
    InvalidStart {
        kind: NameKind,
        name: String,
        expected: &'static str,
    },
    #[error("invalid {kind} {name:?}: invalid character {ch:?} at byte {index}")]
    InvalidChar {
        kind: NameKind,
        name: String,
        ch: char,
        index: usize,
    },
    #[error("invalid {kind} {name:?}: must end with a letter or digit")]
    InvalidEnd { kind: NameKind, name: String },
}

/// A kind (`vendor/class`) or qualified device (`vendor/class=name`) that
/// does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("invalid kind {input:?}: expected \"vendor/class\"")]
    MalformedKind { input: String },
    #[error("invalid qualified device {input:?}: expected \"vendor/class=name\"")]
    MalformedDevice { input: String },
    #[error("invalid {what} {input:?}: {source}")]
    Name {
        what: &'static str,
        input: String,
        #[source]
        source: NameError,
    },
}

/// A `cdiVersion` string that is not a released CDI spec version this crate
/// supports (0.3.0 ..= 1.1.0).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unsupported CDI spec version {0:?} (supported: 0.3.0 to 1.1.0)")]
pub struct VersionError(pub String);

/// What is wrong with one field of a spec (see [`ValidationError`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error(transparent)]
    Kind(#[from] ParseError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error("spec version {declared} is below the minimum {required} its content needs")]
    VersionTooLow {
        declared: Version,
        required: Version,
    },
    #[error("field is not valid in spec version {declared} (removed in {removed_in})")]
    RemovedInVersion {
        declared: Version,
        removed_in: Version,
    },
    #[error("spec has no devices")]
    NoDevices,
    #[error("duplicate device name {0:?}")]
    DuplicateDevice(String),
    #[error("device has no container edits")]
    EmptyDeviceEdits,
    #[error("invalid environment entry {0:?}: expected KEY=VALUE with a non-empty KEY")]
    InvalidEnv(String),
    #[error("must not be empty")]
    Empty,
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} contains a NUL byte")]
    NulInPath(String),
    #[error("invalid hook name {0:?}: expected one of {1}")]
    InvalidHookName(String, &'static str),
    #[error("invalid hook timeout 0: must be greater than zero")]
    ZeroTimeout,
    #[error("invalid device type {0:?}: expected one of \"b\", \"c\", \"u\", \"p\"")]
    InvalidDeviceType(String),
    #[error("invalid permissions {0:?}: expected letters from \"rwm\" or \"none\"")]
    InvalidPermissions(String),
    #[error("invalid closID {0:?}: must be \"/\" or a file name")]
    InvalidClosId(String),
    #[error("duplicate value {0:?}")]
    Duplicate(String),
    #[error("invalid annotation key {key:?}: {reason}")]
    InvalidAnnotationKey { key: String, reason: &'static str },
    #[error("annotations total {size} bytes, more than the limit of {limit}")]
    AnnotationsTooLarge { size: usize, limit: usize },
}

/// A spec that fails validation: `field` is a path such as
/// `devices[2].containerEdits.mounts[0].containerPath`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    pub field: String,
    #[source]
    pub problem: Problem,
}

impl ValidationError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<Problem>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Why a spec id (the transient part of a spec file name) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdProblem {
    Empty,
    TooLong,
    Slash,
    Nul,
    DotDot,
    LeadingDot,
    InvalidChar(char),
}

impl std::fmt::Display for IdProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdProblem::Empty => f.write_str("empty id"),
            IdProblem::TooLong => write!(f, "longer than {} bytes", crate::dir::MAX_ID_LEN),
            IdProblem::Slash => f.write_str("contains '/' (path separator)"),
            IdProblem::Nul => f.write_str("contains a NUL byte"),
            IdProblem::DotDot => f.write_str("contains \"..\" (path traversal)"),
            IdProblem::LeadingDot => f.write_str("starts with '.' (hidden/temporary file name)"),
            IdProblem::InvalidChar(c) => {
                write!(f, "invalid character {c:?} (allowed: A-Z a-z 0-9 - _ .)")
            }
        }
    }
}

/// Errors from reading, writing, listing and removing spec files.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid spec id {id:?}: {problem}")]
    InvalidId { id: String, problem: IdProblem },
    #[error("spec file name {0:?} is longer than 255 bytes")]
    FileNameTooLong(String),
    #[error(transparent)]
    Kind(Box<ParseError>),
    #[error("invalid CDI spec: {0}")]
    Invalid(Box<ValidationError>),
    #[error("{path}: kind {found:?} does not match the expected kind {expected:?}")]
    KindMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: cannot parse CDI spec: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: invalid CDI spec: {source}")]
    InvalidFile {
        path: PathBuf,
        #[source]
        source: Box<ValidationError>,
    },
    #[error("cannot encode CDI spec: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        Error::Kind(Box::new(e))
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Error::Invalid(Box::new(e))
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
