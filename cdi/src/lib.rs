//! CDI (Container Device Interface) spec files for the vGPU DRA driver.
//!
//! Why this crate exists: with DRA, kubelet only hands the container runtime
//! CDI device IDs (`vendor/class=name`); everything a vGPU slice needs inside
//! the container (device nodes, the HAMi core library mounts, limits in env)
//! reaches the runtime only through a spec file the kubelet plugin writes
//! during Prepare. The runtime parses that file with its own vendored copy of
//! the Go CDI library, possibly an old one, and any mistake surfaces only
//! later as a failed `CreateContainer`. So this crate:
//!
//! * validates names and specs the way the Go library does, before writing;
//! * writes the *minimum* `cdiVersion` the content needs, so older runtimes
//!   still load it (claim-UID device names that start with a digit need 0.5.0);
//! * writes atomically and never lets a caller-supplied id escape the
//!   directory, because runtimes watch the directory and load files at once;
//! * lists and cleans up only the specs of the driver's own kind, so restarts
//!   can reconcile without touching other vendors' files.

mod dir;
mod error;
mod name;
mod spec;
mod validate;
mod version;

pub use dir::{
    Durability, MAX_ID_LEN, OwnedSpec, SPEC_FILE_MODE, SpecDir, read_spec_file,
    transient_spec_name, validate_spec_id,
};
pub use error::{
    Error, IdProblem, NameError, NameKind, ParseError, Problem, ValidationError, VersionError,
};
pub use name::{
    Kind, QualifiedDevice, is_qualified_name, validate_class_name, validate_device_name,
    validate_vendor_name,
};
pub use spec::{
    ContainerEdits, Device, DeviceNode, HOOK_NAMES, Hook, IntelRdt, Mount, NetDevice, Spec,
};
pub use validate::{MAX_ANNOTATIONS_SIZE, validate_spec};
pub use version::{Version, minimum_version};
