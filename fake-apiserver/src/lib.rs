//! An in-memory Kubernetes API server for tests: kube-rs clients talk to it through a tower
//! service (no sockets), and tests assert on exactly what was written.
//!
//! It keeps the semantics our components depend on: resourceVersion and optimistic concurrency
//! (409 Conflict on a stale update), the status subresource (the main resource ignores status,
//! `/status` takes only status), finalizers and deletionTimestamp, generateName, list and
//! watch with resourceVersion replay, label and field selectors, merge patches, discovery of
//! the registered group versions, and fault injection (conflicts, dropped watches).
//! Not supported: strategic merge semantics beyond a JSON merge patch, JSON patch,
//! server-side apply field ownership (apply is a merge that creates when missing),
//! pagination (`limit`/`continue` are ignored: lists are complete), and admission.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// A registered resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceKind {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    pub has_status: bool,
}

impl ResourceKind {
    pub fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        has_status: bool,
    ) -> Self {
        ResourceKind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            has_status,
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Which resource.k8s.io versions the fake serves, like a cluster of that release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// 1.32/1.33: resource.k8s.io/v1beta1 only.
    K8s132,
    /// 1.34+: resource.k8s.io/v1 only (v1beta1 is off by default).
    K8s134,
}

/// One recorded write.
#[derive(Clone, Debug)]
pub struct Write {
    pub verb: &'static str,
    pub path: String,
    /// The object after the write (the deleted object for a delete).
    pub object: Value,
}

#[derive(Clone, Debug)]
struct WatchEvent {
    key: (String, String),
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    kinds: Vec<ResourceKind>,
    /// (apiVersion, plural) -> (namespace, name) -> object
    objects: HashMap<(String, String), BTreeMap<(String, String), Value>>,
    events: Vec<WatchEvent>,
    rv: u64,
    uid: u64,
    writes: Vec<Write>,
    conflicts: HashMap<String, usize>,
    requests: BTreeMap<String, usize>,
}

/// The fake API server. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct FakeApiServer {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<WatchEvent>,
    drops: broadcast::Sender<()>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("static response parts are valid")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The parts of a request path.
struct Target {
    kind: ResourceKind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value`, `key!=value`, `key`, `!key`, `key in (a,b)` label selectors, comma-joined.
fn labels_match(selector: &str, labels: &serde_json::Map<String, Value>) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&selector[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .all(|p| {
            if let Some((k, v)) = p.split_once("!=") {
                get(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                get(k.trim()) == Some(v.trim())
            } else if let Some((k, set)) = p.split_once(" notin ") {
                let set: Vec<&str> = set
                    .trim()
                    .trim_matches(['(', ')'])
                    .split(',')
                    .map(str::trim)
                    .collect();
                get(k.trim()).is_none_or(|v| !set.contains(&v))
            } else if let Some((k, set)) = p.split_once(" in ") {
                let set: Vec<&str> = set
                    .trim()
                    .trim_matches(['(', ')'])
                    .split(',')
                    .map(str::trim)
                    .collect();
                get(k.trim()).is_some_and(|v| set.contains(&v))
            } else if let Some(k) = p.strip_prefix('!') {
                get(k.trim()).is_none()
            } else {
                get(p).is_some()
            }
        })
}

const FIELD_SELECTORS: [&str; 4] = [
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.driver",
];

fn field_value<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    let pointer = format!("/{}", field.replace('.', "/"));
    object.pointer(&pointer).and_then(Value::as_str)
}

fn fields_match(selector: &str, object: &Value) -> Result<bool, String> {
    for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, want, negate) = if let Some((f, v)) = part.split_once("!=") {
            (f, v, true)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, v, false)
        } else {
            return Err(format!("invalid field selector {part:?}"));
        };
        let field = field.trim();
        if !FIELD_SELECTORS.contains(&field) {
            return Err(format!("field label not supported: {field}"));
        }
        let have = field_value(object, field).unwrap_or("");
        if (have == want.trim()) == negate {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApiServer {
    /// An empty server with nothing registered.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        let (drops, _) = broadcast::channel(16);
        FakeApiServer {
            store: Arc::new(Mutex::new(Store::default())),
            events,
            drops,
        }
    }

    /// A server of `release` with the resources the driver uses registered.
    pub fn for_release(release: Release) -> Self {
        let server = Self::new();
        for kind in [
            ResourceKind::new("", "v1", "Node", "nodes", false, true),
            ResourceKind::new("", "v1", "Pod", "pods", true, true),
            ResourceKind::new("", "v1", "Event", "events", true, false),
            ResourceKind::new("", "v1", "Namespace", "namespaces", false, true),
            ResourceKind::new("events.k8s.io", "v1", "Event", "events", true, false),
            ResourceKind::new("coordination.k8s.io", "v1", "Lease", "leases", true, false),
        ] {
            server.register(kind);
        }
        let version = match release {
            Release::K8s132 => "v1beta1",
            Release::K8s134 => "v1",
        };
        for (kind, plural, namespaced, has_status) in [
            ("ResourceSlice", "resourceslices", false, false),
            ("ResourceClaim", "resourceclaims", true, true),
            ("DeviceClass", "deviceclasses", false, false),
            (
                "ResourceClaimTemplate",
                "resourceclaimtemplates",
                true,
                false,
            ),
        ] {
            server.register(ResourceKind::new(
                "resource.k8s.io",
                version,
                kind,
                plural,
                namespaced,
                has_status,
            ));
        }
        server
    }

    pub fn register(&self, kind: ResourceKind) {
        let mut store = self.store.lock().expect("store lock");
        if !store.kinds.contains(&kind) {
            store.kinds.push(kind);
        }
    }

    /// A kube-rs client talking to this server.
    pub fn client(&self) -> kube::Client {
        let server = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let server = server.clone();
            async move { Ok::<_, Infallible>(server.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Every write so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.store.lock().expect("store lock").writes.clone()
    }

    /// Requests served so far, keyed by `VERB path-without-query`.
    pub fn requests(&self) -> BTreeMap<String, usize> {
        self.store.lock().expect("store lock").requests.clone()
    }

    /// The stored object, if any.
    pub fn get(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let store = self.store.lock().expect("store lock");
        store
            .objects
            .get(&(api_version.to_string(), plural.to_string()))?
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// All stored objects of a resource.
    pub fn list(&self, api_version: &str, plural: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store lock");
        store
            .objects
            .get(&(api_version.to_string(), plural.to_string()))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Store an object as someone else would (created or replaced), notifying watchers.
    pub fn put_object(&self, plural: &str, mut object: Value) -> Value {
        let api_version = object["apiVersion"].as_str().unwrap_or("").to_string();
        let ns = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut store = self.store.lock().expect("store lock");
        let key = (ns, name);
        let existed = store
            .objects
            .get(&(api_version.clone(), plural.to_string()))
            .is_some_and(|m| m.contains_key(&key));
        store.stamp(&mut object, !existed);
        store
            .objects
            .entry((api_version, plural.to_string()))
            .or_default()
            .insert(key.clone(), object.clone());
        let event = store.record(key, if existed { "MODIFIED" } else { "ADDED" }, &object);
        drop(store);
        let _ = self.events.send(event);
        object
    }

    /// Delete an object as someone else would (no finalizer handling), notifying watchers.
    pub fn delete_object(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let mut store = self.store.lock().expect("store lock");
        let key = (namespace.to_string(), name.to_string());
        let mut object = store
            .objects
            .get_mut(&(api_version.to_string(), plural.to_string()))?
            .remove(&key)?;
        store.rv += 1;
        object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        let event = store.record(key, "DELETED", &object);
        drop(store);
        let _ = self.events.send(event);
        Some(object)
    }

    /// The next `count` writes (updates, patches, creates) to paths containing `path_part`
    /// fail with 409 Conflict.
    pub fn inject_conflicts(&self, path_part: &str, count: usize) {
        self.store
            .lock()
            .expect("store lock")
            .conflicts
            .insert(path_part.to_string(), count);
    }

    /// Close every open watch now, as an API server restart or a network blip does.
    pub fn drop_watches(&self) {
        let _ = self.drops.send(());
    }

    // The error is the response to send: handlers return it as is.
    #[allow(clippy::result_large_err)]
    fn target(&self, path: &str) -> Result<Target, Response<Body>> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segments.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => {
                return Err(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("the server could not find the requested resource {path}"),
                ));
            }
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            rest => (None, rest),
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some(name.to_string()), None),
            [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
            _ => {
                return Err(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("the server could not find the requested resource {path}"),
                ));
            }
        };
        let store = self.store.lock().expect("store lock");
        let kind = store
            .kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
            .ok_or_else(|| status(StatusCode::NOT_FOUND, "NotFound", format!("the server could not find the requested resource ({group}/{version} {plural})")))?;
        Ok(Target {
            kind,
            namespace,
            name,
            subresource,
        })
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let query = query_map(parts.uri.query());
        *self
            .store
            .lock()
            .expect("store lock")
            .requests
            .entry(format!("{} {}", parts.method, path))
            .or_default() += 1;
        if let Some(discovery) = self.discovery(&path) {
            return discovery;
        }
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("reading the body: {e}"),
                );
            }
        };
        let target = match self.target(&path) {
            Ok(t) => t,
            Err(response) => return response,
        };
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        match (parts.method.clone(), &target.name) {
            (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                self.watch(&target, &query)
            }
            (Method::GET, None) => self.list_response(&target, &query),
            (Method::GET, Some(name)) => self.get_response(&target, name),
            (Method::POST, None) => self.write(&target, "create", &path, body, &content_type),
            (Method::PUT, Some(_)) => self.write(&target, "update", &path, body, &content_type),
            (Method::PATCH, Some(_)) => self.write(&target, "patch", &path, body, &content_type),
            (Method::DELETE, Some(name)) => self.delete_response(&target, name, &path, body),
            (Method::DELETE, None) => self.delete_collection(&target, &query, &path),
            (method, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on {path}"),
            ),
        }
    }

    fn discovery(&self, path: &str) -> Option<Response<Body>> {
        let store = self.store.lock().expect("store lock");
        let resources = |group: &str, version: &str| -> Vec<Value> {
            store
                .kinds
                .iter()
                .filter(|k| k.group == group && k.version == version)
                .flat_map(|k| {
                    let mut list = vec![json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind,
                        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]})];
                    if k.has_status {
                        list.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
                    }
                    list
                })
                .collect()
        };
        let groups: BTreeMap<String, Vec<String>> = store
            .kinds
            .iter()
            .filter(|k| !k.group.is_empty())
            .fold(BTreeMap::new(), |mut m, k| {
                let versions: &mut Vec<String> = m.entry(k.group.clone()).or_default();
                if !versions.contains(&k.version) {
                    versions.push(k.version.clone());
                }
                m
            });
        let group_json = |name: &str, versions: &[String]| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
                .collect();
            json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
        };
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let body = match segments.as_slice() {
            ["api"] => {
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
            }
            ["api", "v1"] => {
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": resources("", "v1")})
            }
            ["apis"] => {
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups.iter().map(|(g, v)| group_json(g, v)).collect::<Vec<_>>()})
            }
            ["apis", group] => match groups.get(*group) {
                Some(versions) => {
                    let mut g = group_json(group, versions);
                    g["kind"] = json!("APIGroup");
                    g["apiVersion"] = json!("v1");
                    g
                }
                None => {
                    return Some(status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("group {group} not served"),
                    ));
                }
            },
            ["apis", group, version] => {
                if !groups
                    .get(*group)
                    .is_some_and(|v| v.iter().any(|x| x == version))
                {
                    return Some(status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{group}/{version} not served"),
                    ));
                }
                json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{group}/{version}"), "resources": resources(group, version)})
            }
            _ => return None,
        };
        Some(full(StatusCode::OK, &body))
    }

    #[allow(clippy::result_large_err)]
    fn matching(
        &self,
        target: &Target,
        query: &HashMap<String, String>,
    ) -> Result<(Vec<Value>, u64), Response<Body>> {
        let store = self.store.lock().expect("store lock");
        let key = (target.kind.api_version(), target.kind.plural.clone());
        let mut items = Vec::new();
        for ((ns, _), object) in store.objects.get(&key).into_iter().flatten() {
            if target.namespace.as_ref().is_some_and(|want| want != ns) {
                continue;
            }
            if let Some(selector) = query.get("labelSelector") {
                let empty = serde_json::Map::new();
                let labels = object
                    .pointer("/metadata/labels")
                    .and_then(Value::as_object)
                    .unwrap_or(&empty);
                if !labels_match(selector, labels) {
                    continue;
                }
            }
            if let Some(selector) = query.get("fieldSelector") {
                match fields_match(selector, object) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => return Err(status(StatusCode::BAD_REQUEST, "BadRequest", e)),
                }
            }
            items.push(object.clone());
        }
        Ok((items, store.rv))
    }

    fn list_response(&self, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
        match self.matching(target, query) {
            Ok((items, rv)) => full(
                StatusCode::OK,
                &json!({"apiVersion": target.kind.api_version(), "kind": format!("{}List", target.kind.kind), "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
            ),
            Err(response) => response,
        }
    }

    fn get_response(&self, target: &Target, name: &str) -> Response<Body> {
        let store = self.store.lock().expect("store lock");
        let key = (target.kind.api_version(), target.kind.plural.clone());
        let ns = target.namespace.clone().unwrap_or_default();
        match store
            .objects
            .get(&key)
            .and_then(|m| m.get(&(ns, name.to_string())))
        {
            Some(object) => full(StatusCode::OK, object),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", target.kind.plural),
            ),
        }
    }

    fn watch(&self, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
        let since: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(300);
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let api_version = target.kind.api_version();
        let plural = target.kind.plural.clone();
        let namespace = target.namespace.clone();
        let label = query.get("labelSelector").cloned();
        let field = query.get("fieldSelector").cloned();
        if let Some(f) = &field
            && let Err(e) = fields_match(f, &json!({}))
        {
            return status(StatusCode::BAD_REQUEST, "BadRequest", e);
        }
        let wanted = move |e: &WatchEvent| -> bool {
            e.object["apiVersion"] == api_version.as_str()
                && e.object.get("kind").is_some()
                && namespace.as_ref().is_none_or(|ns| &e.key.0 == ns)
                && label.as_ref().is_none_or(|l| {
                    let empty = serde_json::Map::new();
                    labels_match(
                        l,
                        e.object
                            .pointer("/metadata/labels")
                            .and_then(Value::as_object)
                            .unwrap_or(&empty),
                    )
                })
                && field
                    .as_ref()
                    .is_none_or(|f| fields_match(f, &e.object).unwrap_or(false))
        };
        let mut live = self.events.subscribe();
        let mut drops = self.drops.subscribe();
        let (backlog, current_rv) = {
            let store = self.store.lock().expect("store lock");
            let backlog: Vec<WatchEvent> = store
                .events
                .iter()
                .filter(|e| e.rv > since)
                .cloned()
                .collect();
            (backlog, store.rv)
        };
        let plural_for_events = plural;
        let store = self.store.clone();
        let stream = async_stream(move |tx| async move {
            let belongs = |e: &WatchEvent| -> bool {
                let s = store.lock().expect("store lock");
                s.kinds.iter().any(|k| {
                    k.api_version() == e.object["apiVersion"].as_str().unwrap_or("")
                        && k.plural == plural_for_events
                        && e.object["kind"] == k.kind.as_str()
                })
            };
            for e in backlog.iter().filter(|e| wanted(e) && belongs(e)) {
                if tx
                    .send(json!({"type": e.kind, "object": e.object}))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if bookmarks {
                let _ = tx.send(json!({"type": "BOOKMARK", "object": {"kind": "Bookmark", "apiVersion": "v1", "metadata": {"resourceVersion": current_rv.to_string()}}})).await;
            }
            let deadline = tokio::time::sleep(std::time::Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = drops.recv() => return,
                    event = live.recv() => match event {
                        Ok(e) if e.rv > since && wanted(&e) && belongs(&e) => {
                            if tx.send(json!({"type": e.kind, "object": e.object})).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // A watcher that fell behind is closed, as the API server does.
                        Err(_) => return,
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(stream)
            .expect("static response parts are valid")
    }

    fn take_conflict(&self, path: &str) -> bool {
        let mut store = self.store.lock().expect("store lock");
        for (part, left) in store.conflicts.iter_mut() {
            if *left > 0 && path.contains(part.as_str()) {
                *left -= 1;
                return true;
            }
        }
        false
    }

    fn write(
        &self,
        target: &Target,
        verb: &'static str,
        path: &str,
        body: Bytes,
        content_type: &str,
    ) -> Response<Body> {
        if self.take_conflict(path) {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} (injected conflict): the object has been modified; please apply your changes to the latest version and try again",
                    target.kind.plural
                ),
            );
        }
        let input: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("the body is not JSON: {e}"),
                );
            }
        };
        if content_type.contains("json-patch") {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "JSON patch is not supported by the fake API server".into(),
            );
        }
        let api_version = target.kind.api_version();
        let key = (api_version.clone(), target.kind.plural.clone());
        let ns = if target.kind.namespaced {
            target.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        let mut store = self.store.lock().expect("store lock");
        let (result, event_kind) = match verb {
            "create" => {
                let mut object = input;
                object["apiVersion"] = json!(api_version);
                object["kind"] = json!(target.kind.kind);
                let mut name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if name.is_empty() {
                    let Some(prefix) = object
                        .pointer("/metadata/generateName")
                        .and_then(Value::as_str)
                        .map(String::from)
                    else {
                        return status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "metadata.name or metadata.generateName is required".into(),
                        );
                    };
                    store.uid += 1;
                    name = format!("{prefix}{:05x}", store.uid);
                    object["metadata"]["name"] = json!(name);
                }
                if target.kind.namespaced {
                    object["metadata"]["namespace"] = json!(ns);
                }
                if store
                    .objects
                    .get(&key)
                    .is_some_and(|m| m.contains_key(&(ns.clone(), name.clone())))
                {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", target.kind.plural),
                    );
                }
                store.stamp(&mut object, true);
                store
                    .objects
                    .entry(key.clone())
                    .or_default()
                    .insert((ns.clone(), name.clone()), object.clone());
                ((ns, name, object), "ADDED")
            }
            _ => {
                let name = target.name.clone().unwrap_or_default();
                let existing = store
                    .objects
                    .get(&key)
                    .and_then(|m| m.get(&(ns.clone(), name.clone())))
                    .cloned();
                let apply = content_type.contains("apply-patch");
                let Some(existing) = existing.or_else(|| apply.then(|| json!({"apiVersion": api_version, "kind": target.kind.kind, "metadata": {"name": name, "namespace": ns}}))) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", format!("{} \"{name}\" not found", target.kind.plural));
                };
                let mut object = if verb == "update" {
                    let sent_rv = input
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    let have_rv = existing
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if !sent_rv.is_empty() && sent_rv != have_rv {
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            format!(
                                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                                target.kind.plural
                            ),
                        );
                    }
                    input
                } else {
                    let mut merged = existing.clone();
                    merge(&mut merged, &input);
                    merged
                };
                // The status subresource: the main resource keeps the stored status and
                // /status keeps everything but status.
                if target.kind.has_status {
                    match target.subresource.as_deref() {
                        Some("status") => {
                            let new_status = object.get("status").cloned();
                            object = existing.clone();
                            match new_status {
                                Some(s) => object["status"] = s,
                                None => {
                                    if let Some(o) = object.as_object_mut() {
                                        o.remove("status");
                                    }
                                }
                            }
                        }
                        _ => match existing.get("status") {
                            Some(s) => object["status"] = s.clone(),
                            None => {
                                if let Some(o) = object.as_object_mut() {
                                    o.remove("status");
                                }
                            }
                        },
                    }
                }
                object["apiVersion"] = json!(api_version);
                object["kind"] = json!(target.kind.kind);
                // Identity and server-owned fields do not change on update.
                for field in [
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "name",
                    "namespace",
                ] {
                    match existing["metadata"].get(field) {
                        Some(v) => object["metadata"][field] = v.clone(),
                        None => {
                            if let Some(m) = object["metadata"].as_object_mut() {
                                m.remove(field);
                            }
                        }
                    }
                }
                store.stamp(&mut object, false);
                let deleting = object.pointer("/metadata/deletionTimestamp").is_some();
                let no_finalizers = object
                    .pointer("/metadata/finalizers")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
                if deleting && no_finalizers {
                    store
                        .objects
                        .get_mut(&key)
                        .map(|m| m.remove(&(ns.clone(), name.clone())));
                    ((ns, name, object), "DELETED")
                } else {
                    store
                        .objects
                        .entry(key.clone())
                        .or_default()
                        .insert((ns.clone(), name.clone()), object.clone());
                    ((ns, name, object), "MODIFIED")
                }
            }
        };
        let (ns, name, object) = result;
        store.writes.push(Write {
            verb,
            path: path.to_string(),
            object: object.clone(),
        });
        let event = store.record((ns, name), event_kind, &object);
        drop(store);
        let _ = self.events.send(event);
        full(
            if verb == "create" {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &object,
        )
    }

    fn delete_response(
        &self,
        target: &Target,
        name: &str,
        path: &str,
        body: Bytes,
    ) -> Response<Body> {
        if self.take_conflict(path) {
            return status(StatusCode::CONFLICT, "Conflict", "injected conflict".into());
        }
        let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let key = (target.kind.api_version(), target.kind.plural.clone());
        let ns = target.namespace.clone().unwrap_or_default();
        let mut store = self.store.lock().expect("store lock");
        let Some(mut object) = store
            .objects
            .get(&key)
            .and_then(|m| m.get(&(ns.clone(), name.to_string())))
            .cloned()
        else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", target.kind.plural),
            );
        };
        for (field, pointer) in [
            ("uid", "/preconditions/uid"),
            ("resourceVersion", "/preconditions/resourceVersion"),
        ] {
            if let Some(want) = options.pointer(pointer).and_then(Value::as_str)
                && object["metadata"][field].as_str() != Some(want)
            {
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Precondition failed: {field} in precondition: {want}, {field} in object meta: {}",
                            object["metadata"][field]
                        ),
                    );
                }
            }
        }
        let has_finalizers = object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        let event_kind = if has_finalizers {
            if object.pointer("/metadata/deletionTimestamp").is_none() {
                object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            store.stamp(&mut object, false);
            store
                .objects
                .entry(key)
                .or_default()
                .insert((ns.clone(), name.to_string()), object.clone());
            "MODIFIED"
        } else {
            store
                .objects
                .get_mut(&key)
                .map(|m| m.remove(&(ns.clone(), name.to_string())));
            store.rv += 1;
            let rv = store.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            "DELETED"
        };
        store.writes.push(Write {
            verb: "delete",
            path: path.to_string(),
            object: object.clone(),
        });
        let event = store.record((ns, name.to_string()), event_kind, &object);
        drop(store);
        let _ = self.events.send(event);
        full(StatusCode::OK, &object)
    }

    fn delete_collection(
        &self,
        target: &Target,
        query: &HashMap<String, String>,
        path: &str,
    ) -> Response<Body> {
        let items = match self.matching(target, query) {
            Ok((items, _)) => items,
            Err(response) => return response,
        };
        let mut deleted = Vec::new();
        for item in items {
            let ns = item
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let name = item
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let t = Target {
                kind: target.kind.clone(),
                namespace: Some(ns).filter(|n| !n.is_empty()),
                name: Some(name.clone()),
                subresource: None,
            };
            let response = self.delete_response(&t, &name, path, Bytes::new());
            if response.status() == StatusCode::OK {
                deleted.push(item);
            }
        }
        full(
            StatusCode::OK,
            &json!({"apiVersion": target.kind.api_version(), "kind": format!("{}List", target.kind.kind), "metadata": {}, "items": deleted}),
        )
    }
}

impl Store {
    fn stamp(&mut self, object: &mut Value, created: bool) {
        self.rv += 1;
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if created {
            if object
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                self.uid += 1;
                object["metadata"]["uid"] =
                    json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
            }
            object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            object["metadata"]["generation"] = json!(1);
        }
    }

    fn record(&mut self, key: (String, String), kind: &'static str, object: &Value) -> WatchEvent {
        let event = WatchEvent {
            key,
            rv: self.rv,
            kind,
            object: object.clone(),
        };
        self.events.push(event.clone());
        event
    }
}

/// A body streaming one JSON value per line from a producer task.
fn async_stream<F, Fut>(producer: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Value>(256);
    tokio::spawn(producer(tx));
    let frames =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |v| {
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(format!("{v}\n"))))
        });
    StreamBody::new(frames).boxed()
}
