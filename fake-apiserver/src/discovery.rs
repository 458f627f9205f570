//! Discovery documents built from what is registered, in both the per-group form and the
//! aggregated (apidiscovery.k8s.io/v2) form kube-rs asks for with `run_aggregated`.

use crate::error::ApiError;
use crate::resource::{ResourceKind, compare_versions};
use crate::server::{Body, json_response};
use crate::store::State;
use http::{HeaderMap, Response, StatusCode, header};
use serde_json::{Value, json};
use std::net::SocketAddr;

pub(crate) enum Request {
    Version,
    CoreVersions,
    GroupList,
    Group(String),
    Resources(String, String),
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];
const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

pub(crate) fn respond(
    state: &State,
    addr: SocketAddr,
    request: &Request,
    headers: &HeaderMap,
) -> Response<Body> {
    let aggregated = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=APIGroupDiscoveryList"));
    let result = match request {
        Request::Version => Ok(version(state)),
        Request::CoreVersions if aggregated => return aggregated_response(state, true),
        Request::GroupList if aggregated => return aggregated_response(state, false),
        Request::CoreVersions => Ok(core_versions(state, addr)),
        Request::GroupList => Ok(group_list(state)),
        Request::Group(group) => group_doc(state, group),
        Request::Resources(group, version) => resource_list(state, group, version),
    };
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(error) => json_response(
            StatusCode::from_u16(error.code).unwrap_or(StatusCode::NOT_FOUND),
            &error.to_status(),
        ),
    }
}

fn version(state: &State) -> Value {
    let (major, minor) = &state.version;
    json!({
        "major": major,
        "minor": minor,
        "gitVersion": format!("v{major}.{minor}.0-fake"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Versions of a group that have something registered, preferred (highest priority) first.
fn versions(state: &State, group: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for kind in state.kinds.iter().filter(|k| k.group == group) {
        if !versions.contains(&kind.version) {
            versions.push(kind.version.clone());
        }
    }
    versions.sort_by(|a, b| compare_versions(a, b));
    versions
}

/// Non-core groups in the order they were first registered.
fn groups(state: &State) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for kind in state.kinds.iter().filter(|k| !k.group.is_empty()) {
        if !groups.contains(&kind.group) {
            groups.push(kind.group.clone());
        }
    }
    groups
}

fn core_versions(state: &State, addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": versions(state, ""),
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
    })
}

fn group_value(state: &State, group: &str) -> Value {
    let versions: Vec<Value> = versions(state, group)
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "preferredVersion": versions.first().cloned().unwrap_or(Value::Null),
        "versions": versions,
    })
}

fn group_list(state: &State) -> Value {
    let groups: Vec<Value> = groups(state)
        .iter()
        .map(|g| group_value(state, g))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group_doc(state: &State, group: &str) -> Result<Value, ApiError> {
    if !state.kinds.iter().any(|k| k.group == group) {
        return Err(ApiError::no_such_path());
    }
    let mut doc = group_value(state, group);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Ok(doc)
}

fn kinds_at<'a>(
    state: &'a State,
    group: &'a str,
    version: &'a str,
) -> impl Iterator<Item = &'a ResourceKind> {
    state
        .kinds
        .iter()
        .filter(move |k| k.group == group && k.version == version)
}

fn resource_list(state: &State, group: &str, version: &str) -> Result<Value, ApiError> {
    let mut resources = Vec::new();
    for kind in kinds_at(state, group, version) {
        resources.push(json!({
            "name": kind.plural,
            "singularName": kind.kind.to_lowercase(),
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": VERBS,
        }));
        if kind.has_status {
            resources.push(json!({
                "name": format!("{}/status", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return Err(ApiError::no_such_path());
    }
    Ok(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": crate::resource::api_version(group, version),
        "resources": resources,
    }))
}

fn aggregated_response(state: &State, core: bool) -> Response<Body> {
    let groups = if core {
        vec![String::new()]
    } else {
        groups(state)
    };
    let items: Vec<Value> = groups
        .iter()
        .filter(|g| !versions(state, g).is_empty())
        .map(|group| {
            let versions: Vec<Value> = versions(state, group)
                .iter()
                .map(|version| {
                    let resources: Vec<Value> = kinds_at(state, group, version)
                        .map(|kind| {
                            let gvk = json!({"group": group, "version": version, "kind": kind.kind});
                            let subresources: Vec<Value> = if kind.has_status {
                                vec![json!({"subresource": "status", "responseKind": gvk, "verbs": STATUS_VERBS})]
                            } else {
                                Vec::new()
                            };
                            json!({
                                "resource": kind.plural,
                                "responseKind": gvk,
                                "scope": if kind.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": kind.kind.to_lowercase(),
                                "verbs": VERBS,
                                "subresources": subresources,
                            })
                        })
                        .collect();
                    json!({"version": version, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    let mut response = json_response(StatusCode::OK, &body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(AGGREGATED),
    );
    response
}
