//! An in-memory Kubernetes API server for tests. No real API server runs on CI machines, so
//! the kubelet plugin and the controller test their Kubernetes code through kube-rs against
//! this one, over plain HTTP on 127.0.0.1, and assert on exactly what was written.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use fake_apiserver::{DraVersions, FakeApiServer, Gvr};
//! use k8s_openapi::api::core::v1::Node;
//! use kube::api::{Api, PostParams};
//!
//! let server = FakeApiServer::start_with_builtin(DraVersions::V1Only).await?;
//! let nodes: Api<Node> = Api::all(server.client());
//! let mut node = Node::default();
//! node.metadata.name = Some("n1".into());
//! nodes.create(&PostParams::default(), &node).await?;
//! assert_eq!(server.writes().len(), 1);
//! assert!(server.get(Gvr::of::<Node>(), "", "n1").is_some());
//! # Ok(()) }
//! ```
//!
//! # What behaves like the real server
//!
//! - **Storage**: objects are `serde_json::Value`s keyed by (group, version, plural,
//!   namespace, name). Each registered group version has its own store: a `resource.k8s.io/v1`
//!   and a `v1beta1` ResourceClaim with the same name are two unrelated objects (the real
//!   server converts between versions of one stored object; tests that need that register
//!   one version only). One global resourceVersion counts every write.
//! - **Discovery**: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>` and
//!   `/apis/<group>/<version>` list exactly what is registered (with `<plural>/status` where
//!   a resource has the status subresource; versions in Kubernetes priority order, the first
//!   preferred), and the aggregated `apidiscovery.k8s.io/v2` form when asked for it.
//!   Unregistered paths are 404, like a server without the API.
//! - **GET**, and **LIST** with `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`,
//!   `!key`), `fieldSelector` (`=`, `==`, `!=` on `metadata.name`, `metadata.namespace`, and
//!   per resource: pods `spec.nodeName`/`status.phase`, nodes `spec.unschedulable`, core
//!   events `involvedObject.*`/`reason`/`type`, resourceslices `spec.nodeName`/`spec.driver`;
//!   any other field is 400 `field label not supported`), `limit`/`continue` paging, and
//!   metadata-only responses (`Accept: ...;as=PartialObjectMetadata...`).
//! - **WATCH** (`?watch=true`): newline-delimited `{type, object}` events. Without a
//!   resourceVersion (or with "0") it starts with ADDED for the current state; with one it
//!   replays every change after it (410 Expired as an ERROR event when that history was
//!   [compacted](FakeApiServer::compact)); `sendInitialEvents=true` streams the state and then
//!   a BOOKMARK annotated `k8s.io/initial-events-end`. Selectors apply to events, and a change
//!   that moves an object into or out of a selector is ADDED or DELETED. With
//!   `allowWatchBookmarks` a BOOKMARK is sent when the watch reaches `timeoutSeconds` and on
//!   [`FakeApiServer::send_bookmarks`]. The watch ends at `timeoutSeconds`, on
//!   [`FakeApiServer::drop_watches`], or when it falls 16384 events behind.
//! - **CREATE**: `generateName` gets a random 5-character suffix; uid, resourceVersion,
//!   creationTimestamp and generation 1 are set; 409 AlreadyExists; 422 Invalid for a
//!   missing or non-DNS-subdomain name; 400 when apiVersion, kind or namespace in the body
//!   contradict the URL; 500 when a resourceVersion is sent, as the real storage does. Status
//!   is dropped on create where it is a subresource, except nodes (kubelets register with
//!   status); pods start `Pending` and namespaces `Active`.
//! - **UPDATE** (PUT): a non-empty stale `metadata.resourceVersion` is 409 Conflict (empty is
//!   unconditional); a different uid is 409; where the resource has a status subresource the
//!   main resource keeps the stored status and `/status` takes only `status`. uid, name,
//!   namespace, creationTimestamp, deletionTimestamp and generation are server-owned;
//!   generation goes up when anything outside metadata (and status) changes. A write that
//!   changes nothing keeps the resourceVersion and sends no event.
//! - **PATCH**: `application/merge-patch+json`; `application/strategic-merge-patch+json`
//!   applied as a merge patch (lists are replaced, not merged by key);
//!   `application/json-patch+json` (a patch that does not apply is 422; as on the real
//!   server, `test` of a missing path against null passes, which kube-runtime's finalizer
//!   helper relies on); and server-side apply
//!   `application/apply-patch+yaml`, applied as a merge patch that creates a missing object,
//!   requiring `fieldManager` but tracking no field ownership (no managedFields, no conflicts
//!   between managers, `force` ignored). A patch that carries a resourceVersion is a
//!   precondition (409 when stale). Status subresource rules as for UPDATE.
//! - **DELETE**: with `metadata.finalizers` the object gets a deletionTimestamp (and its
//!   generation goes up) instead of going away, and removing the last finalizer deletes it;
//!   no finalizers can be added once deleting (422). `preconditions` on uid and
//!   resourceVersion give 409. A finished deletion answers a Success Status (the object, for
//!   pods); a pending one the object. **DELETECOLLECTION** deletes what the selectors match.
//! - Errors are `metav1.Status` bodies with the real code and reason (NotFound 404,
//!   AlreadyExists 409, Conflict 409, BadRequest 400, Invalid 422, MethodNotAllowed 405,
//!   UnsupportedMediaType 415), so kube-rs reports `kube::Error::Api` as it would.
//!
//! # What is not supported
//!
//! Authentication, authorization and admission (nothing is ever forbidden); conversion
//! between versions; defaulting and schema validation (any JSON is stored as sent, beyond the
//! name and identity checks above); subresources other than `status` (no `pods/log`,
//! `eviction`, `binding`, `scale`); `dryRun` (400); list `resourceVersion`/
//! `resourceVersionMatch` (lists always serve the latest state, and pages after `continue`
//! see the state at that moment, not a snapshot); graceful deletion of pods
//! (`gracePeriodSeconds` is ignored: without finalizers a pod goes at once);
//! `propagationPolicy` and garbage collection of dependents; namespace lifecycle (objects may
//! be created in namespaces that do not exist, and deleting a namespace deletes nothing
//! else); the Table format, protobuf and CBOR; HTTP/2 and TLS; legacy `/watch/` paths.
//!
//! Writes made with the direct helpers ([`FakeApiServer::put_object`],
//! [`FakeApiServer::update_object`], [`FakeApiServer::delete_object`]) notify watches but are
//! not part of [`FakeApiServer::writes`], which records only what clients wrote, and they
//! bypass faults, latency and request counting.

mod discovery;
mod error;
pub mod rbac;
mod resource;
mod selector;
mod server;
mod store;
mod watch;

pub use error::{ApiError, Error};
pub use resource::{DraVersions, Gvr, ResourceKind};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use server::Shared;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{Deleted, Signal};

/// A Kubernetes API verb, as RBAC names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        }
    }

    pub fn is_write(self) -> bool {
        !matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One successful write by a client, in the order the server applied them.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    pub verb: Verb,
    /// The request path, without the query.
    pub path: String,
    pub gvr: Gvr,
    /// None for cluster-scoped resources.
    pub namespace: Option<String>,
    pub name: String,
    /// `Some("status")` for writes to the status subresource.
    pub subresource: Option<String>,
    /// The object after the write; for a deletion, its last state (with a deletionTimestamp
    /// when finalizers hold it).
    pub object: Value,
}

/// What an injected fault answers a write with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 409 Conflict, worded like a stale resourceVersion.
    Conflict,
    /// 500 InternalError.
    InternalError,
    /// 429 TooManyRequests (kube-rs retries these itself by default).
    TooManyRequests,
    /// 503 ServiceUnavailable (kube-rs retries these itself by default).
    ServiceUnavailable,
}

/// The running server. Dropping it stops the server and closes its connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    url: String,
    client: kube::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts a server with nothing registered on 127.0.0.1 and a random port.
    pub async fn start() -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(Error::Bind)?;
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let shared = Arc::new(Shared::new(addr));
        let url = format!("http://{addr}");
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        let client = match kube::Client::try_from(config_for(&url)?) {
            Ok(client) => client,
            Err(error) => {
                task.abort();
                return Err(Error::Client(error));
            }
        };
        Ok(FakeApiServer {
            shared,
            url,
            client,
            task,
        })
    }

    /// Starts a server with [`ResourceKind::builtin`] registered and `/version` set to match
    /// (1.32 for `V1beta1Only`, 1.34 otherwise).
    pub async fn start_with_builtin(dra: DraVersions) -> Result<Self, Error> {
        let server = Self::start().await?;
        server.register_builtin(dra);
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kube client for this server: no auth, default namespace "default". Clones share a
    /// connection pool.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A kubeconfig file's text for this server, for binaries under test: no auth, or a
    /// bearer token (the server accepts any).
    pub fn kubeconfig(&self, token: Option<&str>) -> String {
        let user = match token {
            Some(t) => format!("\n    token: {t}"),
            None => " {}".into(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: nobody\n  user:{user}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
             current-context: fake\n",
            self.url
        )
    }

    /// A kube config for this server, to build clients with other settings.
    pub fn config(&self) -> kube::Config {
        // The URL was parsed when the server started, so this cannot fail.
        config_for(&self.url).unwrap_or_else(|_| kube::Config::new(::http::Uri::default()))
    }

    /// Serves `kind` from now on (a no-op if it already is).
    pub fn register(&self, kind: ResourceKind) {
        let mut state = self.shared.lock();
        if !state.kinds.contains(&kind) {
            state.kinds.push(kind);
        }
    }

    /// Registers the resources our components use, with the chosen DRA versions, and sets
    /// `/version` to a release that serves them.
    pub fn register_builtin(&self, dra: DraVersions) {
        for kind in ResourceKind::builtin(dra) {
            self.register(kind);
        }
        let minor = match dra {
            DraVersions::V1beta1Only => "32",
            DraVersions::V1Only | DraVersions::Both => "34",
        };
        self.set_server_version("1", minor);
    }

    /// Stops serving a resource (its objects stay stored and come back if it is registered
    /// again), as when an API version is switched off.
    pub fn unregister(&self, gvr: impl Into<Gvr>) {
        let gvr = gvr.into();
        self.shared.lock().kinds.retain(|k| k.gvr() != gvr);
    }

    pub fn registered(&self) -> Vec<ResourceKind> {
        self.shared.lock().kinds.clone()
    }

    /// What `/version` reports.
    pub fn set_server_version(&self, major: &str, minor: &str) {
        self.shared.lock().version = (major.to_string(), minor.to_string());
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    fn kind(&self, gvr: &Gvr) -> Result<ResourceKind, Error> {
        self.shared
            .lock()
            .kind(gvr)
            .cloned()
            .ok_or_else(|| Error::NotRegistered(gvr.clone()))
    }

    /// The stored object. `namespace` is ignored for cluster-scoped resources.
    pub fn get(&self, gvr: impl Into<Gvr>, namespace: &str, name: &str) -> Option<Value> {
        let gvr = gvr.into();
        let state = self.shared.lock();
        let namespaced = state.kind(&gvr).is_none_or(|k| k.namespaced);
        let namespace = if namespaced { namespace } else { "" };
        state.get(&gvr, namespace, name).cloned()
    }

    /// The stored object as a typed resource.
    pub fn get_as<K>(&self, namespace: &str, name: &str) -> Result<Option<K>, Error>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.get(Gvr::of::<K>(), namespace, name)
            .map(serde_json::from_value)
            .transpose()
            .map_err(Error::Json)
    }

    /// Every stored object of a collection, in (namespace, name) order.
    pub fn list(&self, gvr: impl Into<Gvr>) -> Vec<Value> {
        let gvr = gvr.into();
        self.shared
            .lock()
            .collection(&gvr)
            .map(|(_, o)| o.clone())
            .collect()
    }

    pub fn list_as<K>(&self) -> Result<Vec<K>, Error>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.list(Gvr::of::<K>())
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(Error::Json)
    }

    /// Seeds an object as someone else would have written it: created or replaced
    /// unconditionally, status included, with uid, creationTimestamp and generation filled in
    /// where missing (a namespaced object without a namespace goes to "default"). Watches see
    /// ADDED or MODIFIED. Returns the stored object.
    pub fn put_object(&self, gvr: impl Into<Gvr>, object: Value) -> Result<Value, Error> {
        let kind = self.kind(&gvr.into())?;
        Ok(self.shared.lock().put(&kind, object)?)
    }

    /// [`Self::put_object`] for a typed resource.
    pub fn put<K>(&self, object: &K) -> Result<K, Error>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let value = serde_json::to_value(object).map_err(Error::Json)?;
        let stored = self.put_object(Gvr::of::<K>(), value)?;
        serde_json::from_value(stored).map_err(Error::Json)
    }

    /// Edits a stored object as someone else would: the closure may change anything (status
    /// and finalizers included; not its name or namespace), then the object gets a new
    /// resourceVersion and watches see MODIFIED, or DELETED if it was being deleted and has
    /// no finalizers left. Returns the object after the edit.
    pub fn update_object(
        &self,
        gvr: impl Into<Gvr>,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Result<Value, Error> {
        let kind = self.kind(&gvr.into())?;
        Ok(self
            .shared
            .lock()
            .edit(&kind, namespace, name, edit)?
            .object)
    }

    /// Deletes a stored object as someone else would, honouring finalizers like DELETE does:
    /// returns the last state, which carries a deletionTimestamp when finalizers keep it.
    pub fn delete_object(
        &self,
        gvr: impl Into<Gvr>,
        namespace: &str,
        name: &str,
    ) -> Result<Value, Error> {
        let kind = self.kind(&gvr.into())?;
        let deleted =
            self.shared
                .lock()
                .delete(&kind, namespace, name, &store::Preconditions::default())?;
        let (Deleted::Gone(object) | Deleted::Pending(object)) = deleted;
        Ok(object)
    }

    /// Every successful client write so far, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    pub fn clear_writes(&self) {
        self.shared.lock().writes.clear();
    }

    /// Requests per (verb, path without query), failed ones included. Discovery and other
    /// non-resource requests count as `get`.
    pub fn request_counts(&self) -> BTreeMap<(Verb, String), u64> {
        self.shared.lock().requests.clone()
    }

    pub fn request_count(&self, verb: Verb, path: &str) -> u64 {
        self.shared
            .lock()
            .requests
            .get(&(verb, path.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn reset_request_counts(&self) {
        self.shared.lock().requests.clear();
    }

    /// The next `count` writes (create, update, patch, delete, deletecollection, status
    /// included) to `gvr` fail with 409 Conflict without changing anything.
    pub fn inject_conflicts(&self, gvr: impl Into<Gvr>, count: usize) {
        self.inject_faults(gvr, count, Fault::Conflict);
    }

    /// Every request for `gvr` from now on is refused with 403 Forbidden, as after the caller's
    /// Role or ServiceAccount was deleted; watches already open go on, as on a real server
    /// (authorization happens when a request starts).
    pub fn forbid(&self, gvr: impl Into<Gvr>) {
        let gvr = gvr.into();
        self.shared.lock().forbidden.insert(gvr);
    }

    /// The next `count` writes to `gvr` fail with `fault`, after any already queued.
    pub fn inject_faults(&self, gvr: impl Into<Gvr>, count: usize, fault: Fault) {
        let gvr = gvr.into();
        self.shared
            .lock()
            .faults
            .entry(gvr)
            .or_default()
            .extend(std::iter::repeat_n(fault, count));
    }

    /// Every later write to `gvr` silently loses the fields at `paths`, as an API server does
    /// with the fields of an alpha feature whose gate is off. A path is dot-separated;
    /// `devices[]` walks every element of an array, `*` every value of a map, e.g.
    /// `spec.devices[].capacity.*.requestPolicy`.
    pub fn drop_fields(&self, gvr: impl Into<Gvr>, paths: &[&str]) {
        self.shared
            .lock()
            .dropped_fields
            .entry(gvr.into())
            .or_default()
            .extend(paths.iter().map(|p| p.to_string()));
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every request waits this long before it is handled.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Ends every open watch now, as an API server restart or a load balancer would.
    pub fn drop_watches(&self) {
        self.shared.lock().signal(Signal::DropWatches);
    }

    /// Forgets the change history, as etcd compaction does: a watch that resumes from an
    /// older resourceVersion then gets 410 Expired and must re-list.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allows them.
    pub fn send_bookmarks(&self) {
        let state = self.shared.lock();
        state.signal(Signal::Bookmark(state.rv));
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        *self.shared.watches.borrow()
    }

    /// Waits until at least `count` watches are open (a watch is open once it is certain to
    /// see every later change). Wrap it in a timeout.
    pub async fn wait_for_watches(&self, count: usize) {
        let mut watches = self.shared.watches.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = watches.wait_for(|open| *open >= count).await;
    }
}

fn config_for(url: &str) -> Result<kube::Config, Error> {
    let uri: ::http::Uri = url
        .parse()
        .map_err(|e: ::http::uri::InvalidUri| Error::Url(format!("{url}: {e}")))?;
    let mut config = kube::Config::new(uri);
    config.default_namespace = "default".into();
    Ok(config)
}
