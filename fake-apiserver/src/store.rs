//! The object store and the write semantics of the real API server: resourceVersion,
//! optimistic concurrency, the status subresource, generation, finalizers.
//!
//! All of it is synchronous and runs under one lock, so every write gets the next global
//! resourceVersion and its watch event is broadcast in resourceVersion order.

use crate::error::ApiError;
use crate::resource::{Gvr, ResourceKind};
use crate::{Fault, Verb, Write};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// (namespace, name); the namespace is "" for cluster-scoped objects.
pub(crate) type Key = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change, kept for watch replay and broadcast to open watches.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub gvr: Gvr,
    pub namespace: String,
    pub event: EventType,
    /// The object after the change (the last state, for a deletion).
    pub object: Value,
    /// The object before the change: a watch with a selector needs it to turn a change that
    /// moves an object into or out of the selector into ADDED or DELETED, as the real one does.
    pub previous: Option<Value>,
}

/// What open watches are told.
#[derive(Clone, Debug)]
pub(crate) enum Signal {
    Change(Arc<Change>),
    /// Send a BOOKMARK at this resourceVersion to watches that allow bookmarks.
    Bookmark(u64),
    /// Close every open watch.
    DropWatches,
}

/// The result of an update or patch.
pub(crate) struct Written {
    /// The object after the write; its last state if the write completed a deletion.
    pub object: Value,
}

/// The result of a delete.
pub(crate) enum Deleted {
    /// Removed now; the last state.
    Gone(Value),
    /// Finalizers remain: the object now carries a deletionTimestamp.
    Pending(Value),
}

#[derive(Default)]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// A parsed PATCH body.
pub(crate) enum PatchBody {
    /// RFC 7386 JSON merge patch (also used for strategic merge patches).
    Merge(Value),
    /// RFC 6902 JSON patch.
    Json(json_patch::Patch),
    /// Server-side apply, applied as a merge patch that creates a missing object.
    Apply(Value),
}

pub(crate) struct State {
    pub kinds: Vec<ResourceKind>,
    objects: HashMap<Gvr, BTreeMap<Key, Value>>,
    pub rv: u64,
    history: Vec<Arc<Change>>,
    /// Watches that start at or below this resourceVersion get 410 Expired.
    pub compacted: u64,
    pub writes: Vec<Write>,
    pub requests: BTreeMap<(Verb, String), u64>,
    pub faults: HashMap<Gvr, VecDeque<Fault>>,
    /// Resources every new request for is refused with 403, as when a caller's RBAC is gone.
    pub forbidden: std::collections::HashSet<Gvr>,
    /// Field paths dropped on every write, as with a feature gate off.
    pub dropped_fields: HashMap<Gvr, Vec<String>>,
    pub latency: Duration,
    /// (major, minor) served at /version.
    pub version: (String, String),
    rng: u64,
    signals: broadcast::Sender<Signal>,
}

fn meta_str<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn set_meta(object: &mut Value, field: &str, value: Value) {
    object["metadata"][field] = value;
}

fn remove_meta(object: &mut Value, field: &str) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove(field);
    }
}

fn finalizers(object: &Value) -> Vec<&str> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn deleting(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some()
}

fn set_status(object: &mut Value, status: Option<&Value>) {
    match (status, object.as_object_mut()) {
        (Some(status), Some(o)) => {
            o.insert("status".into(), status.clone());
        }
        (None, Some(o)) => {
            o.remove("status");
        }
        _ => {}
    }
}

/// The object without metadata (and without status where status is a subresource): what
/// `metadata.generation` counts changes of.
fn spec_part(object: &Value, has_status: bool) -> Value {
    let mut spec = object.clone();
    if let Some(o) = spec.as_object_mut() {
        o.remove("metadata");
        if has_status {
            o.remove("status");
        }
    }
    spec
}

pub(crate) fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Object names must be DNS subdomains (lowercase alphanumerics, '-' and '.', at most 253,
/// alphanumeric at both ends), as the real server validates them for all our resources.
fn valid_name(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| ok_char(c) || c == '-' || c == '.')
        && name.starts_with(ok_char)
        && name.ends_with(ok_char)
}

/// Checks what the body says it is, and makes sure it has a metadata object to work on.
fn prepare_body(kind: &ResourceKind, body: &mut Value) -> Result<(), ApiError> {
    let Some(object) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body is not a JSON object",
        ));
    };
    let api_version = kind.api_version();
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(v) if !v.is_empty() && v != api_version => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
        _ => {}
    }
    match object.get("kind").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k != kind.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                kind.kind
            )));
        }
        _ => {}
    }
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind.kind));
    match object.get("metadata") {
        None | Some(Value::Null) => {
            object.insert("metadata".into(), json!({}));
        }
        Some(Value::Object(_)) => {}
        Some(_) => return Err(ApiError::bad_request("metadata is not a JSON object")),
    }
    Ok(())
}

impl State {
    pub(crate) fn new(signals: broadcast::Sender<Signal>) -> Self {
        State {
            kinds: Vec::new(),
            objects: HashMap::new(),
            rv: 0,
            history: Vec::new(),
            compacted: 0,
            writes: Vec::new(),
            requests: BTreeMap::new(),
            faults: HashMap::new(),
            forbidden: Default::default(),
            dropped_fields: HashMap::new(),
            latency: Duration::ZERO,
            version: ("1".into(), "34".into()),
            rng: RandomState::new().hash_one(std::time::SystemTime::now()) | 1,
            signals,
        }
    }

    pub(crate) fn kind(&self, gvr: &Gvr) -> Option<&ResourceKind> {
        self.kinds.iter().find(|k| k.gvr() == *gvr)
    }

    pub(crate) fn get(&self, gvr: &Gvr, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(gvr)?
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// Objects of a collection in (namespace, name) order, like etcd's key order.
    pub(crate) fn collection(&self, gvr: &Gvr) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects.get(gvr).into_iter().flatten()
    }

    /// Changes after `rv`, or None when history at `rv` has been compacted away.
    pub(crate) fn history_after(&self, rv: u64) -> Option<Vec<Arc<Change>>> {
        if rv < self.compacted {
            return None;
        }
        // History is in resourceVersion order.
        let start = self.history.partition_point(|c| c.rv <= rv);
        Some(self.history[start..].to_vec())
    }

    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    pub(crate) fn signal(&self, signal: Signal) {
        // No receivers just means no open watches.
        let _ = self.signals.send(signal);
    }

    pub(crate) fn take_fault(&mut self, gvr: &Gvr) -> Option<Fault> {
        let queue = self.faults.get_mut(gvr)?;
        let fault = queue.pop_front();
        if queue.is_empty() {
            self.faults.remove(gvr);
        }
        fault
    }

    pub(crate) fn record_write(&mut self, write: Write) {
        self.writes.push(write);
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: enough for names and uids that only need to differ.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn new_uid(&mut self) -> String {
        let (a, b) = (self.random(), self.random());
        // Shaped like a version-4 UUID, as real uids are.
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// The 5-character suffix the real server appends to `generateName`, from its alphabet.
    fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        (0..5)
            .map(|_| ALPHABET[(self.random() % ALPHABET.len() as u64) as usize] as char)
            .collect()
    }

    /// Stores (or removes, for a deletion) the object under the next resourceVersion, and
    /// tells watches.
    fn commit(
        &mut self,
        gvr: &Gvr,
        key: Key,
        event: EventType,
        mut object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        set_meta(&mut object, "resourceVersion", json!(self.rv.to_string()));
        let collection = self.objects.entry(gvr.clone()).or_default();
        if event == EventType::Deleted {
            collection.remove(&key);
        } else {
            collection.insert(key.clone(), object.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            gvr: gvr.clone(),
            namespace: key.0,
            event,
            object: object.clone(),
            previous,
        });
        self.history.push(change.clone());
        self.signal(Signal::Change(change));
        object
    }

    fn drop_gated_fields(&self, gvr: &Gvr, body: &mut Value) {
        for path in self.dropped_fields.get(gvr).into_iter().flatten() {
            let segments: Vec<&str> = path.split('.').collect();
            drop_path(body, &segments);
        }
    }

    fn key(kind: &ResourceKind, namespace: &str, name: &str) -> Key {
        let namespace = if kind.namespaced { namespace } else { "" };
        (namespace.to_string(), name.to_string())
    }

    /// POST. `namespace` is the request's ("" for cluster-scoped resources).
    pub(crate) fn create(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        mut body: Value,
    ) -> Result<Value, ApiError> {
        prepare_body(kind, &mut body)?;
        let gvr = kind.gvr();
        self.drop_gated_fields(&gvr, &mut body);
        if kind.namespaced {
            let sent = meta_str(&body, "namespace");
            if !sent.is_empty() && sent != namespace {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            set_meta(&mut body, "namespace", json!(namespace));
        } else {
            remove_meta(&mut body, "namespace");
        }
        if !meta_str(&body, "resourceVersion").is_empty() {
            // The real storage layer refuses this as an internal error, not a 4xx.
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let mut name = meta_str(&body, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&body, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} is invalid: metadata.name: Required value: name or generateName is required",
                    kind.kind
                )));
            }
            name = format!("{prefix}{}", self.name_suffix());
            set_meta(&mut body, "name", json!(name));
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(format!(
                "{} \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                kind.kind
            )));
        }
        let key = Self::key(kind, namespace, &name);
        if self.get(&gvr, &key.0, &name).is_some() {
            return Err(ApiError::already_exists(&gvr, &name));
        }
        // Server-owned metadata: whatever the client sent is replaced.
        let uid = self.new_uid();
        set_meta(&mut body, "uid", json!(uid));
        set_meta(&mut body, "creationTimestamp", json!(now()));
        set_meta(&mut body, "generation", json!(1));
        remove_meta(&mut body, "deletionTimestamp");
        remove_meta(&mut body, "deletionGracePeriodSeconds");
        if kind.has_status {
            // Status is reset on create (kubelets do register nodes with their status, and
            // pods and namespaces start in their first phase).
            match (kind.group.as_str(), kind.kind.as_str()) {
                ("", "Node") => {}
                ("", "Pod") => set_status(&mut body, Some(&json!({"phase": "Pending"}))),
                ("", "Namespace") => set_status(&mut body, Some(&json!({"phase": "Active"}))),
                _ => set_status(&mut body, None),
            }
        }
        Ok(self.commit(&gvr, key, EventType::Added, body, None))
    }

    /// PUT on the resource or its `status` subresource.
    pub(crate) fn update(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
        mut body: Value,
        status_only: bool,
    ) -> Result<Written, ApiError> {
        prepare_body(kind, &mut body)?;
        let gvr = kind.gvr();
        let existing = self
            .get(&gvr, &Self::key(kind, namespace, name).0, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gvr, name))?;
        check_identity(kind, &existing, &body, name)?;
        let sent_rv = meta_str(&body, "resourceVersion");
        // An empty resourceVersion is an unconditional update, as on the real server.
        if !sent_rv.is_empty() && sent_rv != meta_str(&existing, "resourceVersion") {
            return Err(ApiError::stale(&gvr, name));
        }
        self.apply_update(kind, &existing, body, status_only)
    }

    /// PATCH on the resource or its `status` subresource. Returns whether apply created it.
    pub(crate) fn patch(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
        patch: &PatchBody,
        status_only: bool,
    ) -> Result<(Written, bool), ApiError> {
        let gvr = kind.gvr();
        let key = Self::key(kind, namespace, name);
        let Some(existing) = self.get(&gvr, &key.0, name).cloned() else {
            return match patch {
                PatchBody::Apply(body) if !status_only => {
                    let mut body = body.clone();
                    prepare_body(kind, &mut body)?;
                    let sent = meta_str(&body, "name");
                    if !sent.is_empty() && sent != name {
                        return Err(name_mismatch(sent, name));
                    }
                    set_meta(&mut body, "name", json!(name));
                    let object = self.create(kind, &key.0, body)?;
                    Ok((Written { object }, true))
                }
                _ => Err(ApiError::not_found(&gvr, name)),
            };
        };
        let mut patched = existing.clone();
        match patch {
            PatchBody::Merge(p) | PatchBody::Apply(p) => {
                if !p.is_object() {
                    return Err(ApiError::bad_request("the patch is not a JSON object"));
                }
                json_patch::merge(&mut patched, p);
            }
            PatchBody::Json(ops) => {
                // Like the real server: a patch that does not apply (a failed `test`, a
                // missing path) is 422, not 400.
                apply_json_patch(&mut patched, ops)?;
            }
        }
        prepare_body(kind, &mut patched)?;
        check_identity(kind, &existing, &patched, name)?;
        // A patch that carries a resourceVersion is an optimistic-concurrency precondition.
        if meta_str(&patched, "resourceVersion") != meta_str(&existing, "resourceVersion")
            && !meta_str(&patched, "resourceVersion").is_empty()
        {
            return Err(ApiError::stale(&gvr, name));
        }
        Ok((
            self.apply_update(kind, &existing, patched, status_only)?,
            false,
        ))
    }

    /// The shared tail of update and patch: `new` is the whole object the client asked for.
    fn apply_update(
        &mut self,
        kind: &ResourceKind,
        existing: &Value,
        mut new: Value,
        status_only: bool,
    ) -> Result<Written, ApiError> {
        let gvr = kind.gvr();
        self.drop_gated_fields(&gvr, &mut new);
        let name = meta_str(existing, "name").to_string();
        let key = (
            meta_str(existing, "namespace").to_string(),
            name.to_string(),
        );
        let mut object;
        if status_only {
            // The status subresource takes only status; metadata and spec stay as stored.
            object = existing.clone();
            set_status(&mut object, new.get("status"));
        } else {
            object = new;
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "name",
                "namespace",
            ] {
                match existing["metadata"].get(field) {
                    Some(v) => set_meta(&mut object, field, v.clone()),
                    None => remove_meta(&mut object, field),
                }
            }
            if kind.has_status {
                // The main resource ignores status changes where status is a subresource.
                set_status(&mut object, existing.get("status"));
            }
            if deleting(existing) {
                let before = finalizers(existing);
                if let Some(added) = finalizers(&object).iter().find(|f| !before.contains(f)) {
                    return Err(ApiError::invalid(format!(
                        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]",
                        kind.kind
                    )));
                }
            }
            if spec_part(existing, kind.has_status) != spec_part(&object, kind.has_status) {
                let generation = existing
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                set_meta(&mut object, "generation", json!(generation + 1));
            }
        }
        set_meta(
            &mut object,
            "resourceVersion",
            json!(meta_str(existing, "resourceVersion")),
        );
        if object == *existing {
            // A no-op write: the real server neither bumps the resourceVersion nor emits an
            // event.
            return Ok(Written { object });
        }
        if deleting(&object) && finalizers(&object).is_empty() {
            // The last finalizer of a deleting object is gone: the deletion completes.
            let object = self.commit(
                &gvr,
                key,
                EventType::Deleted,
                object,
                Some(existing.clone()),
            );
            return Ok(Written { object });
        }
        let object = self.commit(
            &gvr,
            key,
            EventType::Modified,
            object,
            Some(existing.clone()),
        );
        Ok(Written { object })
    }

    /// DELETE of one object: removed at once, or marked for deletion while finalizers remain.
    pub(crate) fn delete(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
        preconditions: &Preconditions,
    ) -> Result<Deleted, ApiError> {
        let gvr = kind.gvr();
        let key = Self::key(kind, namespace, name);
        let existing = self
            .get(&gvr, &key.0, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gvr, name))?;
        for (field, label, want) in [
            ("uid", "UID", &preconditions.uid),
            (
                "resourceVersion",
                "ResourceVersion",
                &preconditions.resource_version,
            ),
        ] {
            if let Some(want) = want
                && want != meta_str(&existing, field)
            {
                return Err(ApiError::conflict(
                    &gvr,
                    name,
                    &format!(
                        "Precondition failed: {label} in precondition: {want}, {label} in object meta: {}",
                        meta_str(&existing, field)
                    ),
                ));
            }
        }
        if finalizers(&existing).is_empty() {
            let object = self.commit(
                &gvr,
                key,
                EventType::Deleted,
                existing.clone(),
                Some(existing),
            );
            return Ok(Deleted::Gone(object));
        }
        if deleting(&existing) {
            // Already waiting for its finalizers: nothing changes.
            return Ok(Deleted::Pending(existing));
        }
        let mut object = existing.clone();
        set_meta(&mut object, "deletionTimestamp", json!(now()));
        set_meta(&mut object, "deletionGracePeriodSeconds", json!(0));
        let generation = existing
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        set_meta(&mut object, "generation", json!(generation + 1));
        let object = self.commit(&gvr, key, EventType::Modified, object, Some(existing));
        Ok(Deleted::Pending(object))
    }

    /// Seeds an object as-is (status included), creating or replacing it unconditionally.
    pub(crate) fn put(
        &mut self,
        kind: &ResourceKind,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        prepare_body(kind, &mut object)?;
        let gvr = kind.gvr();
        let name = meta_str(&object, "name").to_string();
        if name.is_empty() {
            return Err(ApiError::invalid("metadata.name is required"));
        }
        let namespace = if kind.namespaced {
            let ns = meta_str(&object, "namespace");
            let ns = if ns.is_empty() { "default" } else { ns }.to_string();
            set_meta(&mut object, "namespace", json!(ns));
            ns
        } else {
            remove_meta(&mut object, "namespace");
            String::new()
        };
        let key = (namespace, name);
        let existing = self.get(&gvr, &key.0, &key.1).cloned();
        // Keep identity across a replacement, and fill what a stored object always has.
        let defaults = [
            (
                "uid",
                existing
                    .as_ref()
                    .map(|e| e["metadata"]["uid"].clone())
                    .unwrap_or_else(|| json!(self.new_uid())),
            ),
            (
                "creationTimestamp",
                existing
                    .as_ref()
                    .map(|e| e["metadata"]["creationTimestamp"].clone())
                    .unwrap_or_else(|| json!(now())),
            ),
            ("generation", json!(1)),
        ];
        for (field, value) in defaults {
            if object["metadata"].get(field).is_none_or(Value::is_null) {
                set_meta(&mut object, field, value);
            }
        }
        let event = if existing.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        Ok(self.commit(&gvr, key, event, object, existing))
    }

    /// Edits a stored object in place: always a new resourceVersion and a watch event; a
    /// deleting object left without finalizers is removed.
    pub(crate) fn edit(
        &mut self,
        kind: &ResourceKind,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Written, ApiError> {
        let gvr = kind.gvr();
        let key = Self::key(kind, namespace, name);
        let existing = self
            .get(&gvr, &key.0, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&gvr, name))?;
        let mut object = existing.clone();
        edit(&mut object);
        // The store key is the identity; an edit cannot move the object.
        prepare_body(kind, &mut object)?;
        set_meta(&mut object, "name", json!(name));
        if kind.namespaced {
            set_meta(&mut object, "namespace", json!(key.0));
        }
        let event = if deleting(&object) && finalizers(&object).is_empty() {
            EventType::Deleted
        } else {
            EventType::Modified
        };
        let object = self.commit(&gvr, key, event, object, Some(existing));
        Ok(Written { object })
    }
}

/// RFC 6902 as the real server's library applies it: one difference matters to kube-runtime's
/// finalizer helper, which adds the first finalizer behind `test /metadata/finalizers null`:
/// there, testing a missing path against null succeeds. All or nothing, like the real one.
fn apply_json_patch(object: &mut Value, ops: &json_patch::Patch) -> Result<(), ApiError> {
    let mut working = object.clone();
    for (i, op) in ops.0.iter().enumerate() {
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null()
            && working.pointer(test.path.as_str()).is_none()
        {
            continue;
        }
        json_patch::patch(&mut working, std::slice::from_ref(op)).map_err(|e| {
            ApiError::invalid(format!("the JSON patch did not apply: operation {i}: {e}"))
        })?;
    }
    *object = working;
    Ok(())
}

fn name_mismatch(sent: &str, name: &str) -> ApiError {
    ApiError::bad_request(format!(
        "the name of the object ({sent}) does not match the name on the URL ({name})"
    ))
}

/// The body of an update must be the object the URL names.
fn check_identity(
    kind: &ResourceKind,
    existing: &Value,
    body: &Value,
    name: &str,
) -> Result<(), ApiError> {
    let sent = meta_str(body, "name");
    if !sent.is_empty() && sent != name {
        return Err(name_mismatch(sent, name));
    }
    let sent_ns = meta_str(body, "namespace");
    if kind.namespaced && !sent_ns.is_empty() && sent_ns != meta_str(existing, "namespace") {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let sent_uid = meta_str(body, "uid");
    let uid = meta_str(existing, "uid");
    if !sent_uid.is_empty() && sent_uid != uid {
        return Err(ApiError::conflict(
            &kind.gvr(),
            name,
            &format!(
                "Precondition failed: UID in precondition: {sent_uid}, UID in object meta: {uid}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_subdomains() {
        for good in ["a", "node-1", "gpu.example.com", "n2-vgpu.hami.io-bc2d4"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "A", "-a", "a-", "a_b", "a/b", &"x".repeat(254)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn uids_look_like_uuids() {
        let (tx, _) = broadcast::channel(1);
        let mut state = State::new(tx);
        let uid = state.new_uid();
        let groups: Vec<usize> = uid.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_ne!(uid, state.new_uid());
    }
}

/// Removes the field at `path` (dot-separated; `name[]` walks every element of an array,
/// `*` every value of a map).
fn drop_path(value: &mut Value, path: &[&str]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some(map) = value.as_object_mut() else {
        return;
    };
    if *first == "*" {
        for v in map.values_mut() {
            drop_path(v, rest);
        }
        return;
    }
    if let Some(array_field) = first.strip_suffix("[]") {
        if let Some(Value::Array(items)) = map.get_mut(array_field) {
            for item in items {
                drop_path(item, rest);
            }
        }
        return;
    }
    if rest.is_empty() {
        map.remove(*first);
    } else if let Some(v) = map.get_mut(*first) {
        drop_path(v, rest);
    }
}

#[cfg(test)]
mod drop_path_tests {
    use super::drop_path;
    use serde_json::json;

    #[test]
    fn drops_through_arrays_and_maps() {
        let mut v = json!({"spec": {"devices": [
            {"name": "a", "allowMultipleAllocations": true,
             "capacity": {"memory": {"value": "1", "requestPolicy": {}}, "cores": {"value": "2"}}},
            {"name": "b"}
        ]}});
        drop_path(&mut v, &["spec", "devices[]", "allowMultipleAllocations"]);
        drop_path(
            &mut v,
            &["spec", "devices[]", "capacity", "*", "requestPolicy"],
        );
        assert_eq!(
            v,
            json!({"spec": {"devices": [
                {"name": "a", "capacity": {"memory": {"value": "1"}, "cores": {"value": "2"}}},
                {"name": "b"}
            ]}})
        );
    }
}
