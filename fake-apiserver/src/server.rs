//! The HTTP side: routing, discovery, the verbs, and watch streams.

use crate::error::ApiError;
use crate::resource::ResourceKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Change, Deleted, EventType, PatchBody, Preconditions, State};
use crate::{Fault, Verb, Write};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// State shared by the server task, its connections and the [`crate::FakeApiServer`] handle.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// How many watches are open now.
    pub watches: tokio::sync::watch::Sender<usize>,
    pub addr: SocketAddr,
}

impl Shared {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        // Large enough that a test's burst of writes does not overrun a watch; a watch that
        // does fall behind is closed, as the real server closes slow watchers.
        let (signals, _) = broadcast::channel(16 * 1024);
        Shared {
            state: Mutex::new(State::new(signals)),
            watches: tokio::sync::watch::Sender::new(0),
            addr,
        }
    }

    /// The state lock. A panic while holding it cannot leave the maps half-written in a way
    /// that matters to a test, so a poisoned lock is still used.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts connections until the task is aborted; aborting drops the JoinSet, which aborts
/// every connection with it.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(shared.clone(), request));
                        if let Err(error) = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!(%error, "fake API server connection ended");
                        }
                    });
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%error, "fake API server accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return Ok(error_response(&ApiError::bad_request(format!(
                "reading the request body: {error}"
            ))));
        }
    };
    let response = route(&shared, &parts.method, &parts.uri, &parts.headers, body)
        .unwrap_or_else(|error| error_response(&error));
    Ok(response)
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(error: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &error.to_status())
}

type Query = HashMap<String, String>;

fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("bad percent-encoding in {s:?}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("{s:?} is not UTF-8")))
}

fn parse_query(query: Option<&str>) -> Result<Query, ApiError> {
    let mut map = Query::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        map.insert(percent_decode(k, true)?, percent_decode(v, true)?);
    }
    Ok(map)
}

fn flag(query: &Query, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(String::as_str) {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name}: invalid boolean {other:?}"
        ))),
    }
}

fn number(query: &Query, name: &str) -> Result<Option<u64>, ApiError> {
    query
        .get(name)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name}: invalid number {v:?}")))
        })
        .transpose()
}

/// A resource request, resolved against what is registered.
struct Target {
    kind: ResourceKind,
    /// The request's namespace ("" for cluster-scoped resources and all-namespace lists).
    namespace: String,
    all_namespaces: bool,
    name: Option<String>,
    status: bool,
}

enum Route {
    Version,
    CoreVersions,
    GroupList,
    Group(String),
    Resources(String, String),
    Resource(Target),
}

fn resolve(state: &State, path: &str) -> Result<Route, ApiError> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false))
        .collect::<Result<_, _>>()?;
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (group, version, rest) = match s.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreVersions),
        ["api", v] => return Ok(Route::Resources(String::new(), v.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis"] => return Ok(Route::GroupList),
        ["apis", g] => return Ok(Route::Group(g.to_string())),
        ["apis", g, v] => return Ok(Route::Resources(g.to_string(), v.to_string())),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_such_path()),
    };
    let find = |plural: &str| {
        state
            .kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
    };
    // `namespaces/<ns>/<plural>/...` unless that would not name a namespaced resource, in
    // which case it is the `namespaces` resource itself (e.g. `namespaces/<name>/status`).
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|k| k.namespaced) => {
            (Some(*ns), {
                let mut r = vec![*plural];
                r.extend_from_slice(tail);
                r
            })
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return Err(ApiError::no_such_path()),
    };
    let kind = find(plural).ok_or_else(ApiError::no_such_path)?.clone();
    // A namespaced object is only addressable inside its namespace.
    if kind.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::no_such_path());
    }
    let status = match sub {
        None => false,
        Some("status") if kind.has_status => true,
        Some(_) => return Err(ApiError::no_such_path()),
    };
    Ok(Route::Resource(Target {
        all_namespaces: kind.namespaced && namespace.is_none(),
        namespace: namespace.unwrap_or("").to_string(),
        name: name.map(str::to_string),
        status,
        kind,
    }))
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let path = uri.path();
    let query = parse_query(uri.query())?;
    let mut state = shared.lock();
    let route = resolve(&state, path);
    let target = match route {
        Ok(Route::Resource(target)) => target,
        Ok(discovery) => {
            *state
                .requests
                .entry((Verb::Get, path.to_string()))
                .or_default() += 1;
            if method != Method::GET {
                return Err(method_not_allowed(method));
            }
            return Ok(crate::discovery::respond(
                &state,
                shared.addr,
                &discovery_route(discovery),
                headers,
            ));
        }
        Err(error) => {
            // Still counted, so an unexpected call is visible in the request counts.
            let verb = if method == Method::GET {
                Verb::Get
            } else {
                write_verb(method, true).unwrap_or(Verb::Get)
            };
            *state.requests.entry((verb, path.to_string())).or_default() += 1;
            return Err(error);
        }
    };
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, true) => Verb::Get,
        (&Method::GET, false) if flag(&query, "watch")? => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (m, named) => write_verb(m, named).ok_or_else(|| method_not_allowed(method))?,
    };
    *state.requests.entry((verb, path.to_string())).or_default() += 1;
    if state.forbidden.contains(&target.kind.gvr()) {
        return Err(ApiError::new(
            403,
            "Forbidden",
            format!("{} is forbidden to this caller", target.kind.gvr()),
        ));
    }
    if target.status && !matches!(verb, Verb::Get | Verb::Update | Verb::Patch) {
        return Err(method_not_allowed(method));
    }
    // Collection writes of a namespaced resource are only served inside a namespace.
    if target.all_namespaces && matches!(verb, Verb::Create | Verb::DeleteCollection) {
        return Err(method_not_allowed(method));
    }
    if verb.is_write() {
        if !query.get("dryRun").is_none_or(String::is_empty) {
            return Err(ApiError::bad_request(
                "dryRun is not supported by the fake API server",
            ));
        }
        if let Some(fault) = state.take_fault(&target.kind.gvr()) {
            return Err(fault_error(fault, &target));
        }
    }
    let partial = wants_partial_metadata(headers);
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        &target.kind,
    )?;
    let filter = Filter {
        target: &target,
        labels,
        fields,
    };
    let name = target.name.clone().unwrap_or_default();
    let kind = &target.kind;
    let record = |state: &mut State, verb: Verb, object: &Value| {
        state.record_write(Write {
            verb,
            path: path.to_string(),
            gvr: kind.gvr(),
            namespace: kind.namespaced.then(|| target.namespace.clone()),
            name: object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or(&name)
                .to_string(),
            subresource: target.status.then(|| "status".to_string()),
            object: object.clone(),
        });
    };
    match verb {
        Verb::Get => {
            let object = state
                .get(&kind.gvr(), &target.namespace, &name)
                .ok_or_else(|| ApiError::not_found(&kind.gvr(), &name))?;
            Ok(json_response(StatusCode::OK, &present(object, partial)))
        }
        Verb::List => Ok(json_response(
            StatusCode::OK,
            &list(&state, &filter, &query, partial)?,
        )),
        Verb::Watch => {
            let watch = crate::watch::open(&state, &filter, &query, partial)?;
            drop(state);
            Ok(crate::watch::stream(shared.clone(), watch))
        }
        Verb::Create => {
            let object = state.create(kind, &target.namespace, parse_json(&body)?)?;
            record(&mut state, verb, &object);
            Ok(json_response(StatusCode::CREATED, &object))
        }
        Verb::Update => {
            let written = state.update(
                kind,
                &target.namespace,
                &name,
                parse_json(&body)?,
                target.status,
            )?;
            record(&mut state, verb, &written.object);
            Ok(json_response(StatusCode::OK, &written.object))
        }
        Verb::Patch => {
            let patch = parse_patch(headers, &query, &body)?;
            let (written, created) =
                state.patch(kind, &target.namespace, &name, &patch, target.status)?;
            record(&mut state, verb, &written.object);
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(code, &written.object))
        }
        Verb::Delete => {
            let preconditions = parse_delete_options(&body)?;
            let deleted = state.delete(kind, &target.namespace, &name, &preconditions)?;
            let response = match &deleted {
                Deleted::Pending(object) => {
                    record(&mut state, verb, object);
                    json_response(StatusCode::OK, object)
                }
                Deleted::Gone(object) => {
                    record(&mut state, verb, object);
                    json_response(StatusCode::OK, &deleted_response(kind, object))
                }
            };
            Ok(response)
        }
        Verb::DeleteCollection => {
            parse_delete_options(&body)?;
            let victims: Vec<(String, String)> = state
                .collection(&kind.gvr())
                .filter(|(_, object)| filter.matches(object))
                .map(|(key, _)| key.clone())
                .collect();
            let mut items = Vec::new();
            for (namespace, name) in victims {
                let deleted = state.delete(kind, &namespace, &name, &Preconditions::default())?;
                let (Deleted::Gone(object) | Deleted::Pending(object)) = deleted;
                record(&mut state, verb, &object);
                items.push(object);
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "apiVersion": kind.api_version(),
                    "kind": format!("{}List", kind.kind),
                    "metadata": {"resourceVersion": state.rv.to_string()},
                    "items": items,
                }),
            ))
        }
    }
}

fn write_verb(method: &Method, named: bool) -> Option<Verb> {
    match (method, named) {
        (&Method::POST, false) => Some(Verb::Create),
        (&Method::PUT, true) => Some(Verb::Update),
        (&Method::PATCH, true) => Some(Verb::Patch),
        (&Method::DELETE, true) => Some(Verb::Delete),
        (&Method::DELETE, false) => Some(Verb::DeleteCollection),
        _ => None,
    }
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource: {method}"),
    )
}

fn fault_error(fault: Fault, target: &Target) -> ApiError {
    let name = target.name.as_deref().unwrap_or("");
    match fault {
        Fault::Conflict => ApiError::stale(&target.kind.gvr(), name),
        Fault::InternalError => ApiError::internal("injected internal error"),
        Fault::TooManyRequests => ApiError::new(429, "TooManyRequests", "injected throttling"),
        Fault::ServiceUnavailable => {
            ApiError::new(503, "ServiceUnavailable", "injected unavailability")
        }
    }
}

fn discovery_route(route: Route) -> crate::discovery::Request {
    use crate::discovery::Request as D;
    match route {
        Route::Version => D::Version,
        Route::CoreVersions => D::CoreVersions,
        Route::GroupList => D::GroupList,
        Route::Group(g) => D::Group(g),
        Route::Resources(g, v) => D::Resources(g, v),
        Route::Resource(_) => D::GroupList,
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn parse_patch(headers: &HeaderMap, query: &Query, body: &Bytes) -> Result<PatchBody, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        // Strategic merge differs only for lists with merge keys, which we replace instead.
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            Ok(PatchBody::Merge(parse_json(body)?))
        }
        "application/json-patch+json" => serde_json::from_slice(body)
            .map(PatchBody::Json)
            .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}"))),
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
            if query.get("fieldManager").is_none_or(String::is_empty) {
                return Err(ApiError::bad_request(
                    "PATCH requests with an apply patch must specify fieldManager",
                ));
            }
            serde_yaml_ng::from_slice(body)
                .map(PatchBody::Apply)
                .map_err(|e| ApiError::bad_request(format!("the apply patch is not YAML: {e}")))
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {other:?}"
            ),
        )),
    }
}

fn parse_delete_options(body: &Bytes) -> Result<Preconditions, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Preconditions::default());
    }
    let options = parse_json(body)?;
    if options
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|d| !d.is_empty())
    {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the fake API server",
        ));
    }
    let field = |f: &str| {
        options
            .pointer(&format!("/preconditions/{f}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    Ok(Preconditions {
        uid: field("uid"),
        resource_version: field("resourceVersion"),
    })
}

/// A finished deletion answers with a Success Status naming the object, so kube-rs's
/// `delete` returns `Either::Right`; pods answer with the object, as their registry does.
fn deleted_response(kind: &ResourceKind, object: &Value) -> Value {
    if kind.group.is_empty() && kind.kind == "Pod" {
        return object.clone();
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": object.pointer("/metadata/name"),
            "group": kind.group,
            "kind": kind.plural,
            "uid": object.pointer("/metadata/uid"),
        },
    })
}

/// Clients that want only metadata (kube-rs `metadata_watcher`, `get_metadata`) ask for it
/// in the Accept header.
fn wants_partial_metadata(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"))
}

pub(crate) fn present(object: &Value, partial: bool) -> Value {
    if partial {
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
        })
    } else {
        object.clone()
    }
}

/// Which objects a list, watch or deletecollection sees.
pub(crate) struct Filter<'a> {
    target: &'a Target,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter<'_> {
    pub(crate) fn kind(&self) -> &ResourceKind {
        &self.target.kind
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        (self.target.all_namespaces || namespace == self.target.namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    pub(crate) fn owned(&self) -> OwnedFilter {
        OwnedFilter {
            gvr: self.target.kind.gvr(),
            kind: self.target.kind.clone(),
            namespace: (!self.target.all_namespaces).then(|| self.target.namespace.clone()),
            labels: self.labels.clone(),
            fields: self.fields.clone(),
        }
    }
}

/// A filter a watch task can keep.
pub(crate) struct OwnedFilter {
    pub gvr: crate::Gvr,
    pub kind: ResourceKind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl OwnedFilter {
    pub(crate) fn namespace_matches(&self, namespace: &str) -> bool {
        self.namespace.as_ref().is_none_or(|ns| ns == namespace)
    }

    fn in_scope(&self, change: &Change) -> bool {
        change.gvr == self.gvr && self.namespace_matches(&change.namespace)
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// What a watch with this filter reports for a change, if anything: a change that moves
    /// an object into the selection is ADDED and one that moves it out is DELETED.
    pub(crate) fn event(&self, change: &Change) -> Option<&'static str> {
        if !self.in_scope(change) {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        match change.event {
            EventType::Added => now.then_some("ADDED"),
            EventType::Deleted => (now || before).then_some("DELETED"),
            EventType::Modified => match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }
    }
}

/// LIST, with `limit`/`continue` paging over the current state.
fn list(state: &State, filter: &Filter, query: &Query, partial: bool) -> Result<Value, ApiError> {
    let kind = filter.kind();
    let limit = number(query, "limit")?.filter(|l| *l > 0);
    // The continue token is the (namespace, name) key of the last item returned.
    let after = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => Some(
            token
                .split_once('/')
                .map(|(ns, name)| (ns.to_string(), name.to_string()))
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?,
        ),
    };
    let matching: Vec<(&(String, String), &Value)> = state
        .collection(&kind.gvr())
        .filter(|(key, _)| after.as_ref().is_none_or(|a| *key > a))
        .filter(|(_, object)| filter.matches(object))
        .collect();
    let total = matching.len();
    let page: Vec<_> = match limit {
        Some(limit) => matching.into_iter().take(limit as usize).collect(),
        None => matching,
    };
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if page.len() < total
        && let Some(((ns, name), _)) = page.last()
    {
        metadata["continue"] = json!(format!("{ns}/{name}"));
        metadata["remainingItemCount"] = json!(total - page.len());
    }
    // Like the real server, items carry no apiVersion or kind: the list does.
    let items: Vec<Value> = page
        .iter()
        .map(|(_, o)| {
            let mut item = present(o, partial);
            if !partial && let Some(fields) = item.as_object_mut() {
                fields.remove("apiVersion");
                fields.remove("kind");
            }
            item
        })
        .collect();
    let (api_version, list_kind) = if partial {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (kind.api_version(), format!("{}List", kind.kind))
    };
    Ok(json!({
        "apiVersion": api_version,
        "kind": list_kind,
        "metadata": metadata,
        "items": items,
    }))
}

/// A streaming body fed by a channel of lines.
pub(crate) fn channel_body(receiver: mpsc::Receiver<Bytes>) -> Body {
    let frames = futures::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(line)), receiver))
    });
    StreamBody::new(frames).boxed()
}
