//! Errors: the API errors the server answers with, and the errors of the test-side helpers.

use crate::resource::Gvr;
use serde_json::{Value, json};

/// A failed request, answered as a `metav1.Status` body with the HTTP code of the real server
/// so that kube-rs turns it into `kube::Error::Api` with the same code and reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    /// The machine-readable reason: `NotFound`, `AlreadyExists`, `Conflict`, `BadRequest`,
    /// `Invalid`, `Expired`, `MethodNotAllowed`, `UnsupportedMediaType`, `InternalError`, ...
    pub reason: String,
    pub message: String,
    /// `details` of the Status (name, group, kind) where the real server sends them.
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.into(),
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// 404 for a path that names no registered resource: what a server without the API says.
    pub fn no_such_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn not_found(gvr: &Gvr, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", group_resource(gvr)),
        )
        .with_details(gvr, name)
    }

    pub fn already_exists(gvr: &Gvr, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", group_resource(gvr)),
        )
        .with_details(gvr, name)
    }

    /// The optimistic-concurrency failure, worded as the real server words it (controllers
    /// sometimes log or match on it).
    pub fn conflict(gvr: &Gvr, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                group_resource(gvr)
            ),
        )
        .with_details(gvr, name)
    }

    pub fn stale(gvr: &Gvr, name: &str) -> Self {
        Self::conflict(
            gvr,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn with_details(mut self, gvr: &Gvr, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": gvr.group, "kind": gvr.plural}));
        self
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// `plural.group` (or `plural` for core), as the real server names resources in messages.
fn group_resource(gvr: &Gvr) -> String {
    if gvr.group.is_empty() {
        gvr.plural.clone()
    } else {
        format!("{}.{}", gvr.plural, gvr.group)
    }
}

/// Errors of [`crate::FakeApiServer`]'s own methods (starting it, and the helpers tests call
/// directly to seed or inspect state).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the fake API server's listener: {0}")]
    Bind(#[source] std::io::Error),
    #[error("the server URL is invalid: {0}")]
    Url(String),
    #[error("building a kube client for the fake API server: {0}")]
    Client(#[source] kube::Error),
    #[error("{0} is not registered with the fake API server")]
    NotRegistered(Gvr),
    #[error("the fake API server refused the write: {0}")]
    Api(#[source] ApiError),
    #[error("converting between the object and JSON: {0}")]
    Json(#[source] serde_json::Error),
}

impl From<ApiError> for Error {
    fn from(error: ApiError) -> Self {
        Error::Api(error)
    }
}
