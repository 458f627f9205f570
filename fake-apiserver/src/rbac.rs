//! RBAC as the requests recorded by the server need it, to test that a component's shipped
//! ClusterRoles and Roles grant exactly what its code calls: map every
//! [`FakeApiServer::request_counts`](crate::FakeApiServer::request_counts) entry with
//! [`permission`] and compare with [`granted`] of the manifest.

use crate::Verb;
use serde_json::Value;
use std::collections::BTreeSet;

/// (apiGroup, resource[/subresource], verb), as RBAC rules name them.
pub type Permission = (String, String, String);

/// The permission a request needs; `None` for discovery, which every authenticated user
/// may read (system:discovery).
pub fn permission(verb: Verb, path: &str) -> Option<Permission> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let resource = match rest {
        [resource] | [resource, _] => resource.to_string(),
        [resource, _, sub] => format!("{resource}/{sub}"),
        _ => return None,
    };
    Some((group.to_string(), resource, verb.as_str().to_string()))
}

/// Every permission the requests `server` recorded needed.
pub fn used(server: &crate::FakeApiServer) -> BTreeSet<Permission> {
    server
        .request_counts()
        .keys()
        .filter_map(|(verb, path)| permission(*verb, path))
        .collect()
}

/// Why a manifest's rules cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("RBAC manifest: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("RBAC manifest: {kind} {name}: {field} is not a list of strings")]
    Field {
        kind: String,
        name: String,
        field: &'static str,
    },
}

/// Every permission the ClusterRoles and Roles of a multi-document YAML manifest grant.
pub fn granted(manifest: &str) -> Result<BTreeSet<Permission>, RbacError> {
    let docs = documents(manifest)?;
    let mut out = BTreeSet::new();
    for doc in docs.iter().filter(|d| is_role(d)) {
        rules_of(doc, &mut out)?;
    }
    Ok(out)
}

/// What a whole installation manifest grants ServiceAccount `account` (of any namespace):
/// the rules of the Roles and ClusterRoles its RoleBindings and ClusterRoleBindings bind it to.
pub fn granted_to(manifest: &str, account: &str) -> Result<BTreeSet<Permission>, RbacError> {
    let docs = documents(manifest)?;
    let bound: BTreeSet<(String, String)> = docs
        .iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("RoleBinding" | "ClusterRoleBinding")
            )
        })
        .filter(|d| {
            d["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["kind"] == "ServiceAccount" && s["name"].as_str() == Some(account))
        })
        .map(|d| {
            let r = &d["roleRef"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (s(&r["kind"]), s(&r["name"]))
        })
        .collect();
    let mut out = BTreeSet::new();
    for doc in docs.iter().filter(|d| is_role(d)) {
        let key = (
            doc["kind"].as_str().unwrap_or_default().to_string(),
            doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        if bound.contains(&key) {
            rules_of(doc, &mut out)?;
        }
    }
    Ok(out)
}

fn documents(manifest: &str) -> Result<Vec<Value>, RbacError> {
    serde_yaml_ng::Deserializer::from_str(manifest)
        .map(|doc| Ok(serde::Deserialize::deserialize(doc)?))
        .filter(|d: &Result<Value, RbacError>| !matches!(d, Ok(Value::Null)))
        .collect()
}

fn is_role(doc: &Value) -> bool {
    matches!(doc["kind"].as_str(), Some("ClusterRole" | "Role"))
}

fn rules_of(doc: &Value, out: &mut BTreeSet<Permission>) -> Result<(), RbacError> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let strings = |rule: &Value, field: &'static str| -> Result<Vec<String>, RbacError> {
        rule[field]
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect())
            .ok_or_else(|| RbacError::Field {
                kind: kind.into(),
                name: name.into(),
                field,
            })
    };
    for rule in doc["rules"].as_array().into_iter().flatten() {
        for group in strings(rule, "apiGroups")? {
            for resource in strings(rule, "resources")? {
                for verb in strings(rule, "verbs")? {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_rbac_permissions() {
        let p = |v, path| permission(v, path);
        assert_eq!(
            p(Verb::Get, "/api/v1/nodes/n1"),
            Some(("".into(), "nodes".into(), "get".into()))
        );
        assert_eq!(
            p(
                Verb::Update,
                "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/c/status"
            ),
            Some((
                "resource.k8s.io".into(),
                "resourceclaims/status".into(),
                "update".into()
            ))
        );
        assert_eq!(
            p(Verb::List, "/apis/resource.k8s.io/v1/resourceslices"),
            Some((
                "resource.k8s.io".into(),
                "resourceslices".into(),
                "list".into()
            ))
        );
        assert_eq!(p(Verb::Get, "/apis/resource.k8s.io/v1"), None);
        assert_eq!(p(Verb::Get, "/apis"), None);
    }

    #[test]
    fn roles_and_cluster_roles_are_read_and_bindings_ignored() {
        let manifest = "kind: ClusterRole\nmetadata: {name: a}\nrules:\n- apiGroups: [\"\"]\n  resources: [nodes, pods]\n  verbs: [list]\n---\n\
                        kind: ClusterRoleBinding\nmetadata: {name: a}\n---\n\
                        kind: Role\nmetadata: {name: b}\nrules:\n- apiGroups: [coordination.k8s.io]\n  resources: [leases]\n  verbs: [get]\n";
        let g = granted(manifest).unwrap();
        assert_eq!(g.len(), 3);
        assert!(g.contains(&("coordination.k8s.io".into(), "leases".into(), "get".into())));
        let bad = "kind: Role\nmetadata: {name: b}\nrules:\n- apiGroups: core\n  resources: [x]\n  verbs: [get]\n";
        let err = granted(bad).unwrap_err().to_string();
        assert!(err.contains("Role b") && err.contains("apiGroups"), "{err}");
    }

    #[test]
    fn an_account_gets_the_rules_of_the_roles_it_is_bound_to_and_no_others() {
        let manifest = "kind: ClusterRole\nmetadata: {name: a}\nrules:\n- apiGroups: [\"\"]\n  resources: [nodes]\n  verbs: [get]\n---\n\
                        kind: ClusterRoleBinding\nmetadata: {name: a}\nroleRef: {kind: ClusterRole, name: a}\nsubjects: [{kind: ServiceAccount, name: sa, namespace: x}]\n---\n\
                        kind: Role\nmetadata: {name: a}\nrules:\n- apiGroups: [apps]\n  resources: [daemonsets]\n  verbs: [get]\n---\n\
                        kind: RoleBinding\nmetadata: {name: b}\nroleRef: {kind: Role, name: a}\nsubjects: [{kind: ServiceAccount, name: sa, namespace: x}]\n---\n\
                        kind: ClusterRole\nmetadata: {name: other}\nrules:\n- apiGroups: [\"\"]\n  resources: [pods]\n  verbs: [list]\n---\n\
                        kind: ClusterRoleBinding\nmetadata: {name: other}\nroleRef: {kind: ClusterRole, name: other}\nsubjects: [{kind: ServiceAccount, name: someone-else, namespace: x}]\n";
        let g = granted_to(manifest, "sa").unwrap();
        let want: BTreeSet<Permission> = [
            ("".into(), "nodes".into(), "get".into()),
            ("apps".into(), "daemonsets".into(), "get".into()),
        ]
        .into();
        assert_eq!(g, want);
        assert!(granted_to(manifest, "nobody").unwrap().is_empty());
    }
}
