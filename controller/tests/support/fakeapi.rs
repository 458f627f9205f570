//! An in-memory Kubernetes API server, as a tower service given to `kube::Client::new`: enough
//! of the API for the controller (discovery, list, watch, get, create, replace, status
//! replace, merge patch, delete) with real resourceVersion conflicts, the claim-status rule
//! that `status.allocation` is immutable once set, and a record of every write.
#![allow(dead_code)]

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// One write the server answered.
#[derive(Clone, Debug)]
pub struct Write {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Value,
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    /// (collection, namespace, name) -> object; collection = "<group>/<version>/<plural>".
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    writes: Vec<Write>,
    resource_versions: Vec<String>,
    /// Claim names whose next status write meets a concurrent change first.
    conflict_on_status: HashSet<String>,
    uid: u64,
}

/// The fake API server; clones share state.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn once(value: &Value) -> Body {
    let bytes = Bytes::from(serde_json::to_vec(value).unwrap());
    StreamBody::new(stream::once(async move { Ok(Frame::data(bytes)) }).boxed())
}

fn respond(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(once(value))
        .unwrap()
}

/// Plural and namespacing of the kinds the fake knows.
pub fn plural(kind: &str) -> (&'static str, bool) {
    match kind {
        "Node" => ("nodes", false),
        "Pod" => ("pods", true),
        "ResourceClaim" => ("resourceclaims", true),
        "DeviceClass" => ("deviceclasses", false),
        "ResourceSlice" => ("resourceslices", false),
        "Lease" => ("leases", true),
        "Event" => ("events", true),
        other => panic!("the fake API server does not know kind {other}"),
    }
}

fn kind_of(plural: &str) -> &'static str {
    match plural {
        "nodes" => "Node",
        "pods" => "Pod",
        "resourceclaims" => "ResourceClaim",
        "deviceclasses" => "DeviceClass",
        "resourceslices" => "ResourceSlice",
        "leases" => "Lease",
        "events" => "Event",
        _ => "Unknown",
    }
}

fn has_status_subresource(plural: &str) -> bool {
    matches!(plural, "nodes" | "pods" | "resourceclaims")
}

/// RFC 7386 JSON merge patch.
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

struct Route {
    collection: String,
    plural: String,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (plural, name, subresource) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Route {
        collection: format!("{group}/{version}/{plural}"),
        plural: plural.to_string(),
        namespace,
        name,
        subresource,
    })
}

impl FakeApi {
    /// A server that serves resource.k8s.io in `versions` (e.g. `["v1"]`, `["v1beta1"]`).
    pub fn new(versions: &[&str]) -> FakeApi {
        let (changes, _) = broadcast::channel(100_000);
        FakeApi {
            state: Arc::new(Mutex::new(State {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                writes: Vec::new(),
                resource_versions: versions.iter().map(|v| v.to_string()).collect(),
                conflict_on_status: HashSet::new(),
                uid: 0,
            })),
            changes,
        }
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                Ok::<_, Infallible>(fake.handle(parts.method, parts.uri, body))
            }
        });
        kube::Client::new(service, "default")
    }

    fn collection_of(object: &Value) -> (String, String, String) {
        let api_version = object["apiVersion"].as_str().expect("apiVersion");
        let kind = object["kind"].as_str().expect("kind");
        let (plural, namespaced) = plural(kind);
        let namespace = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let group_version = if api_version.contains('/') {
            api_version.to_string()
        } else {
            format!("/{api_version}")
        };
        (
            format!("{group_version}/{plural}"),
            namespace,
            object["metadata"]["name"]
                .as_str()
                .expect("name")
                .to_string(),
        )
    }

    fn record(
        state: &mut State,
        changes: &broadcast::Sender<Change>,
        collection: &str,
        namespace: &str,
        kind: &'static str,
        object: Value,
    ) {
        let change = Change {
            rv: state.rv,
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            kind,
            object,
        };
        state.history.push(change.clone());
        let _ = changes.send(change);
    }

    /// Store `object` as a client would create it (uid, resourceVersion, timestamps added).
    pub fn create(&self, mut object: Value) -> Value {
        let (collection, namespace, name) = Self::collection_of(&object);
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        state.uid += 1;
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(state.rv.to_string()));
        if !meta.contains_key("uid") {
            meta.insert(
                "uid".into(),
                json!(format!("00000000-0000-4000-8000-{:012}", state.uid)),
            );
        }
        if !namespace.is_empty() {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.entry("creationTimestamp")
            .or_insert(json!(format!("2025-01-01T00:00:{:02}Z", state.uid % 60)));
        state.objects.insert(
            (collection.clone(), namespace.clone(), name),
            object.clone(),
        );
        Self::record(
            &mut state,
            &self.changes,
            &collection,
            &namespace,
            "ADDED",
            object.clone(),
        );
        object
    }

    /// Replace a stored object with `f(object)` as another client would (new resourceVersion).
    pub fn modify(&self, kind_object: &Value, f: impl FnOnce(&mut Value)) -> Value {
        let (collection, namespace, name) = Self::collection_of(kind_object);
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let rv = state.rv;
        let object = state
            .objects
            .get_mut(&(collection.clone(), namespace.clone(), name))
            .expect("object to modify");
        f(object);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = object.clone();
        Self::record(
            &mut state,
            &self.changes,
            &collection,
            &namespace,
            "MODIFIED",
            object.clone(),
        );
        object
    }

    /// Remove an object (finalizers ignored), as after kube-controller-manager cleaned up.
    pub fn remove(&self, kind_object: &Value) {
        let (collection, namespace, name) = Self::collection_of(kind_object);
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        if let Some(mut object) =
            state
                .objects
                .remove(&(collection.clone(), namespace.clone(), name))
        {
            object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            Self::record(
                &mut state,
                &self.changes,
                &collection,
                &namespace,
                "DELETED",
                object,
            );
        }
    }

    pub fn get(&self, kind_object: &Value) -> Option<Value> {
        let key = Self::collection_of(kind_object);
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// All stored objects of a collection (e.g. "events.k8s.io/v1/events").
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|((c, _, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn writes(&self) -> Vec<Write> {
        self.state.lock().unwrap().writes.clone()
    }

    /// Make the next status write of claim `name` meet a concurrent change (another client
    /// updates the claim's labels just before), so that it fails with 409 Conflict.
    pub fn conflict_on_next_status_write(&self, name: &str) {
        self.state
            .lock()
            .unwrap()
            .conflict_on_status
            .insert(name.to_string());
    }

    fn handle(&self, method: Method, uri: http::Uri, body: Bytes) -> Response<Body> {
        let path = uri.path().to_string();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if method == Method::GET && path == "/apis" {
            let versions = self.state.lock().unwrap().resource_versions.clone();
            return respond(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": "resource.k8s.io",
                     "versions": versions.iter().map(|v| json!({"groupVersion": format!("resource.k8s.io/{v}"), "version": v})).collect::<Vec<_>>(),
                     "preferredVersion": {"groupVersion": format!("resource.k8s.io/{}", versions[0]), "version": versions[0]}},
                    {"name": "coordination.k8s.io", "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
                     "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}},
                    {"name": "events.k8s.io", "versions": [{"groupVersion": "events.k8s.io/v1", "version": "v1"}],
                     "preferredVersion": {"groupVersion": "events.k8s.io/v1", "version": "v1"}}
                ]}),
            );
        }
        let Some(route) = route(&path) else {
            return respond(404, &status(404, "NotFound", &format!("no route {path}")));
        };
        if route.collection.starts_with("resource.k8s.io/") {
            let version = route.collection.split('/').nth(1).unwrap_or("");
            if !self
                .state
                .lock()
                .unwrap()
                .resource_versions
                .iter()
                .any(|v| v == version)
            {
                return respond(
                    404,
                    &status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                );
            }
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        let response = match (&method, &route.name) {
            (&Method::GET, None) => {
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    return self.watch(&route, &query);
                }
                self.list_route(&route)
            }
            (&Method::GET, Some(name)) => {
                let state = self.state.lock().unwrap();
                match state.objects.get(&(
                    route.collection.clone(),
                    route.namespace.clone(),
                    name.clone(),
                )) {
                    Some(o) => (200, o.clone()),
                    None => (404, status(404, "NotFound", &format!("{name} not found"))),
                }
            }
            (&Method::POST, None) => self.post(&route, body.clone()),
            (&Method::PUT, Some(name)) => self.put(&route, name, body.clone()),
            (&Method::PATCH, Some(name)) => self.patch(&route, name, &body),
            (&Method::DELETE, Some(name)) => self.delete(&route, name),
            _ => (405, status(405, "MethodNotAllowed", "not supported")),
        };
        if method != Method::GET {
            self.state.lock().unwrap().writes.push(Write {
                method: method.to_string(),
                path: path.clone(),
                status: response.0,
                body,
            });
        }
        respond(response.0, &response.1)
    }

    fn list_route(&self, route: &Route) -> (u16, Value) {
        let state = self.state.lock().unwrap();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((c, ns, _), _)| {
                *c == route.collection && (route.namespace.is_empty() || *ns == route.namespace)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (
            200,
            json!({"kind": format!("{}List", kind_of(&route.plural)), "apiVersion": "v1",
                   "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
        )
    }

    fn watch(&self, route: &Route, query: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Subscribe and read the history under one lock: no change is missed or doubled.
        let (backlog, receiver) = {
            let state = self.state.lock().unwrap();
            let receiver = self.changes.subscribe();
            let backlog: Vec<Change> = state
                .history
                .iter()
                .filter(|c| c.rv > from)
                .cloned()
                .collect();
            (backlog, receiver)
        };
        let collection = route.collection.clone();
        let namespace = route.namespace.clone();
        let wanted = move |c: &Change| {
            c.collection == collection && (namespace.is_empty() || c.namespace == namespace)
        };
        let last = backlog.iter().map(|c| c.rv).max().unwrap_or(from);
        let encode = |c: Change| -> Result<Frame<Bytes>, Infallible> {
            let mut line =
                serde_json::to_vec(&json!({"type": c.kind, "object": c.object})).unwrap();
            line.push(b'\n');
            Ok(Frame::data(Bytes::from(line)))
        };
        let wanted_backlog = wanted.clone();
        let first = stream::iter(
            backlog
                .into_iter()
                .filter(move |c| wanted_backlog(c))
                .map(encode),
        );
        let live = stream::unfold((receiver, last), move |(mut rx, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(c) if c.rv > last => return Some((c.clone(), (rx, c.rv))),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .filter(move |c| futures::future::ready(wanted(c)))
        .map(encode);
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(first.chain(live).boxed()))
            .unwrap()
    }

    fn post(&self, route: &Route, mut body: Value) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        if body["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            let prefix = body["metadata"]["generateName"]
                .as_str()
                .unwrap_or("x-")
                .to_string();
            body["metadata"]["name"] = json!(format!("{prefix}{}", state.rv));
        }
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        let key = (
            route.collection.clone(),
            route.namespace.clone(),
            name.clone(),
        );
        if state.objects.contains_key(&key) {
            return (
                409,
                status(409, "AlreadyExists", &format!("{name} already exists")),
            );
        }
        state.rv += 1;
        state.uid += 1;
        body["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        body["metadata"]["uid"] = json!(format!("00000000-0000-4000-9000-{:012}", state.uid));
        if !route.namespace.is_empty() {
            body["metadata"]["namespace"] = json!(route.namespace);
        }
        state.objects.insert(key, body.clone());
        Self::record(
            &mut state,
            &self.changes,
            &route.collection,
            &route.namespace,
            "ADDED",
            body.clone(),
        );
        (201, body)
    }

    fn put(&self, route: &Route, name: &str, body: Value) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        let key = (
            route.collection.clone(),
            route.namespace.clone(),
            name.to_string(),
        );
        if route.subresource.as_deref() == Some("status")
            && state.conflict_on_status.remove(name)
            && let Some(stored) = state.objects.get(&key).cloned()
        {
            // Another client changes the claim's labels first.
            state.rv += 1;
            let mut changed = stored;
            changed["metadata"]["labels"]["touched-by"] = json!("another-client");
            changed["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            state.objects.insert(key.clone(), changed.clone());
            Self::record(
                &mut state,
                &self.changes,
                &route.collection,
                &route.namespace,
                "MODIFIED",
                changed,
            );
        }
        let Some(stored) = state.objects.get(&key).cloned() else {
            return (404, status(404, "NotFound", &format!("{name} not found")));
        };
        let sent_rv = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent_rv.is_empty() && sent_rv != stored["metadata"]["resourceVersion"] {
            return (
                409,
                status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        route.plural
                    ),
                ),
            );
        }
        let mut new = match route.subresource.as_deref() {
            Some("status") => {
                if route.plural == "resourceclaims" {
                    let old = &stored["status"]["allocation"];
                    let new = &body["status"]["allocation"];
                    if !old.is_null() && !new.is_null() && old != new {
                        return (
                            422,
                            status(
                                422,
                                "Invalid",
                                "status.allocation: Invalid value: field is immutable",
                            ),
                        );
                    }
                }
                let mut new = stored.clone();
                new["status"] = body["status"].clone();
                new
            }
            Some(other) => return (404, status(404, "NotFound", other)),
            None => {
                let mut new = body.clone();
                if has_status_subresource(&route.plural) {
                    new["status"] = stored["status"].clone();
                }
                for field in ["uid", "creationTimestamp", "namespace"] {
                    new["metadata"][field] = stored["metadata"][field].clone();
                }
                new
            }
        };
        if new["status"].is_null()
            && let Some(o) = new.as_object_mut()
        {
            o.remove("status");
        }
        state.rv += 1;
        new["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key, new.clone());
        Self::record(
            &mut state,
            &self.changes,
            &route.collection,
            &route.namespace,
            "MODIFIED",
            new.clone(),
        );
        (200, new)
    }

    fn patch(&self, route: &Route, name: &str, patch: &Value) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        let key = (
            route.collection.clone(),
            route.namespace.clone(),
            name.to_string(),
        );
        let Some(mut object) = state.objects.get(&key).cloned() else {
            return (404, status(404, "NotFound", &format!("{name} not found")));
        };
        merge(&mut object, patch);
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key, object.clone());
        Self::record(
            &mut state,
            &self.changes,
            &route.collection,
            &route.namespace,
            "MODIFIED",
            object.clone(),
        );
        (200, object)
    }

    fn delete(&self, route: &Route, name: &str) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        let key = (
            route.collection.clone(),
            route.namespace.clone(),
            name.to_string(),
        );
        let Some(mut object) = state.objects.remove(&key) else {
            return (404, status(404, "NotFound", &format!("{name} not found")));
        };
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        Self::record(
            &mut state,
            &self.changes,
            &route.collection,
            &route.namespace,
            "DELETED",
            object.clone(),
        );
        (200, object)
    }
}
