//! WATCH: newline-delimited JSON events, started from a resourceVersion or from the current
//! state, live until a timeout, a dropped-watches signal, or the client going away.

use crate::error::ApiError;
use crate::server::{Body, Filter, OwnedFilter, Shared, channel_body, present};
use crate::store::{Signal, State};
use bytes::Bytes;
use http::{Response, StatusCode, header};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// A watch whose start has been worked out under the state lock.
pub(crate) struct Watch {
    filter: OwnedFilter,
    partial: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// The watch ends after its initial events (a 410 Expired start).
    expired: bool,
    /// Events to send before the live ones: the current state or the replayed history.
    initial: Vec<Value>,
    /// The resourceVersion the initial events bring the client up to.
    start_rv: u64,
    /// Subscribed under the same lock the initial events were read under, so nothing is lost
    /// or repeated between them and the live ones.
    signals: broadcast::Receiver<Signal>,
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(filter: &OwnedFilter, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event(
        "BOOKMARK",
        json!({"apiVersion": filter.kind.api_version(), "kind": filter.kind.kind, "metadata": metadata}),
    )
}

pub(crate) fn open(
    state: &State,
    filter: &Filter,
    query: &HashMap<String, String>,
    partial: bool,
) -> Result<Watch, ApiError> {
    let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1");
    let bookmarks = flag("allowWatchBookmarks");
    let send_initial = flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => {
            let seconds: u64 = v.parse().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds: invalid number {v:?}"))
            })?;
            // 0 leaves the choice to the server; this one then never times out.
            (seconds > 0).then(|| Duration::from_secs(seconds))
        }
    };
    let filter = filter.owned();
    let signals = state.subscribe();
    let snapshot = |initial: &mut Vec<Value>| {
        for (_, object) in state.collection(&filter.gvr) {
            let namespace = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if filter.namespace_matches(namespace) && filter.matches(object) {
                initial.push(event("ADDED", present(object, partial)));
            }
        }
    };
    let mut initial = Vec::new();
    let rv = query.get("resourceVersion").map_or("", String::as_str);
    if send_initial {
        // A streaming list: the current state, then a bookmark marking its end.
        if !bookmarks {
            return Err(ApiError::invalid(
                "sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
        snapshot(&mut initial);
        initial.push(bookmark(&filter, state.rv, true));
    } else if rv.is_empty() || rv == "0" {
        // "Get state and start at most recent": synthetic ADDED events for what exists.
        snapshot(&mut initial);
    } else {
        let from: u64 = rv
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
        match state.history_after(from) {
            Some(changes) => {
                for change in changes {
                    if let Some(kind) = filter.event(&change) {
                        initial.push(event(kind, present(&change.object, partial)));
                    }
                }
            }
            None => {
                // Like the real server: the watch is accepted and its first event is an
                // ERROR carrying 410 Expired, which makes kube-runtime's watcher re-list.
                let status = ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", state.compacted),
                )
                .to_status();
                initial.push(event("ERROR", status));
                return Ok(Watch {
                    filter,
                    partial,
                    bookmarks,
                    timeout: None,
                    expired: true,
                    initial,
                    start_rv: state.rv,
                    signals,
                });
            }
        }
    }
    Ok(Watch {
        filter,
        partial,
        bookmarks,
        timeout,
        expired: false,
        initial,
        start_rv: state.rv,
        signals,
    })
}

/// Counts the watch as open for as long as its task runs.
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: Arc<Shared>) -> Self {
        shared.watches.send_modify(|n| *n += 1);
        OpenWatch(shared)
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches.send_modify(|n| *n = n.saturating_sub(1));
    }
}

pub(crate) fn stream(shared: Arc<Shared>, watch: Watch) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let open = OpenWatch::new(shared);
    tokio::spawn(run(open, watch, tx));
    let mut response = Response::new(channel_body(rx));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn line(value: &Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

async fn run(_open: OpenWatch, mut watch: Watch, tx: mpsc::Sender<Bytes>) {
    for value in std::mem::take(&mut watch.initial) {
        if tx.send(line(&value)).await.is_err() {
            return;
        }
    }
    if watch.expired {
        return;
    }
    let deadline = watch.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last_rv = watch.start_rv;
    loop {
        let expiry = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let out = tokio::select! {
            _ = tx.closed() => return,
            _ = expiry => {
                // The real server sends a last bookmark as a watch times out, so the client
                // resumes from it instead of from an older resourceVersion.
                if watch.bookmarks {
                    let _ = tx.send(line(&bookmark(&watch.filter, last_rv, false))).await;
                }
                return;
            }
            signal = watch.signals.recv() => match signal {
                Ok(Signal::Change(change)) => {
                    last_rv = change.rv;
                    watch
                        .filter
                        .event(&change)
                        .map(|kind| event(kind, present(&change.object, watch.partial)))
                }
                Ok(Signal::Bookmark(rv)) => {
                    last_rv = last_rv.max(rv);
                    watch.bookmarks.then(|| bookmark(&watch.filter, last_rv, false))
                }
                // Dropped on purpose, or fell too far behind: either way the client re-watches.
                Ok(Signal::DropWatches) | Err(_) => return,
            },
        };
        if let Some(value) = out
            && tx.send(line(&value)).await.is_err()
        {
            return;
        }
    }
}
