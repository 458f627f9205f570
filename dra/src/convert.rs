//! resource.k8s.io v1beta1 ⇄ v1, once, at the wire.
//!
//! The two versions carry the same fields (a 1.34 API server round-trips every object between
//! them) in two shapes: a v1beta1 ResourceSlice device keeps its fields under `basic`, and a
//! v1beta1 claim request has `deviceClassName`, `selectors`, `count`, … beside
//! `firstAvailable` where v1 puts them under `exactly`. Everything else is the same JSON. So the
//! conversion moves exactly those fields, rewrites `apiVersion`, and carries every other field
//! as it is, including ones this code has never heard of.
//!
//! Kubernetes converts the same way (`pkg/apis/resource/v1beta1/conversion.go`): a request's
//! class, selectors, count… go under `exactly`, and a device always gets a `basic`.

use crate::version::{ApiVersion, GROUP};
use k8s_openapi::api::resource::v1;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt::Debug;

/// The resource.k8s.io objects the workspace reads and writes, all in v1.
pub trait DraObject:
    kube::Resource<DynamicType = ()>
    + k8s_openapi::Resource
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl DraObject for v1::ResourceClaim {}
impl DraObject for v1::ResourceClaimTemplate {}
impl DraObject for v1::ResourceSlice {}
impl DraObject for v1::DeviceClass {}

/// A request's fields that v1 keeps under `exactly`.
const EXACT_REQUEST_FIELDS: [&str; 7] = [
    "deviceClassName",
    "selectors",
    "allocationMode",
    "count",
    "adminAccess",
    "tolerations",
    "capacity",
];

/// Why an object cannot be converted; names the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {field}: {message}")]
pub struct ConvertError {
    pub kind: String,
    /// `namespace/name`, or the name of a cluster-scoped object.
    pub name: String,
    pub field: String,
    pub message: String,
}

/// Who an object is, for its errors: taken before a conversion consumes or rewrites it.
struct Identity {
    kind: String,
    /// `namespace/name`, or the name of a cluster-scoped object.
    name: String,
}

impl Identity {
    fn of(object: &Value) -> Identity {
        let kind = object
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("object")
            .to_string();
        let meta = object.get("metadata");
        let get = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let name = match get("namespace") {
            "" => get("name").to_string(),
            ns => format!("{ns}/{}", get("name")),
        };
        Identity { kind, name }
    }

    fn error(&self, field: impl Into<String>, message: impl Into<String>) -> ConvertError {
        ConvertError {
            kind: self.kind.clone(),
            name: self.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Where a kind keeps what changes shape: the requests of a claim (template) or the devices of
/// a slice, as a JSON pointer to the array.
fn shaped_array(kind: &str) -> Option<(&'static str, Shape)> {
    match kind {
        "ResourceClaim" => Some(("/spec/devices/requests", Shape::Request)),
        "ResourceClaimTemplate" => Some(("/spec/spec/devices/requests", Shape::Request)),
        "ResourceSlice" => Some(("/spec/devices", Shape::Device)),
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Request,
    Device,
}

fn reshape(
    object: &mut Value,
    id: &Identity,
    to: ApiVersion,
    f: impl Fn(&mut Map<String, Value>, Shape, ApiVersion) -> Result<(), String>,
) -> Result<(), ConvertError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some((pointer, shape)) = shaped_array(&kind) else {
        return Ok(());
    };
    let Some(items) = object.pointer_mut(pointer) else {
        return Ok(());
    };
    let field = pointer.trim_start_matches('/').replace('/', ".");
    let items = match items {
        Value::Null => return Ok(()),
        Value::Array(items) => items,
        _ => return Err(id.error(field, "not a list")),
    };
    for (i, item) in items.iter_mut().enumerate() {
        let Value::Object(item) = item else {
            return Err(id.error(format!("{field}[{i}]"), "not an object"));
        };
        f(item, shape, to).map_err(|m| id.error(format!("{field}[{i}]"), m))?;
    }
    Ok(())
}

fn item_to_v1(item: &mut Map<String, Value>, shape: Shape, _: ApiVersion) -> Result<(), String> {
    match shape {
        Shape::Device => match item.remove("basic") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Object(basic)) => {
                for (k, v) in basic {
                    item.insert(k, v);
                }
                Ok(())
            }
            Some(_) => Err("basic: not an object".into()),
        },
        Shape::Request => {
            let mut exactly = Map::new();
            for k in EXACT_REQUEST_FIELDS {
                if let Some(v) = item.remove(k) {
                    exactly.insert(k.to_string(), v);
                }
            }
            // As Kubernetes does: an `exactly` only where one of its fields is set (v1beta1
            // writes `deviceClassName: ""` on every request without one).
            if sets_a_request_field(&exactly) {
                item.insert("exactly".into(), Value::Object(exactly));
            }
            Ok(())
        }
    }
}

/// Whether a request's class, selectors, count… (`exactly` in v1, beside `firstAvailable` in
/// v1beta1) set anything, by Kubernetes' rule (`hasAnyMainRequestFieldsSet`): Go's zero values
/// do not count. A request that sets nothing has no `exactly` in v1.
pub fn sets_a_request_field(fields: &Map<String, Value>) -> bool {
    fields.iter().any(|(field, value)| {
        EXACT_REQUEST_FIELDS.contains(&field.as_str())
            && match (field.as_str(), value) {
                (_, Value::Null) => false,
                ("deviceClassName" | "allocationMode", Value::String(s)) => !s.is_empty(),
                ("count", Value::Number(n)) => n.as_i64() != Some(0),
                _ => true,
            }
    })
}

fn item_to_v1beta1(
    item: &mut Map<String, Value>,
    shape: Shape,
    _: ApiVersion,
) -> Result<(), String> {
    match shape {
        Shape::Device => {
            let name = item.remove("name");
            let basic = std::mem::take(item);
            if let Some(name) = name {
                item.insert("name".into(), name);
            }
            item.insert("basic".into(), Value::Object(basic));
            Ok(())
        }
        Shape::Request => {
            match item.remove("exactly") {
                None | Some(Value::Null) => {}
                Some(Value::Object(exactly)) => {
                    for (k, v) in exactly {
                        item.insert(k, v);
                    }
                }
                Some(_) => return Err("exactly: not an object".into()),
            }
            // v1beta1's deviceClassName is a required string: the API server writes "" on a
            // request without one (firstAvailable only), and so do we.
            item.entry("deviceClassName")
                .or_insert_with(|| Value::String(String::new()));
            Ok(())
        }
    }
}

/// An object's JSON in `to`, from either version. Objects of other groups are refused.
pub fn convert_value(object: Value, to: ApiVersion) -> Result<Value, ConvertError> {
    let id = Identity::of(&object);
    convert_as(object, &id, to)
}

fn convert_as(mut object: Value, id: &Identity, to: ApiVersion) -> Result<Value, ConvertError> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let Some(from) = ApiVersion::of_api_version(api_version) else {
        return Err(id.error(
            "apiVersion",
            format!(
                "{api_version:?} is not {} or {}",
                ApiVersion::V1.as_str(),
                ApiVersion::V1beta1.as_str()
            ),
        ));
    };
    if from == to {
        return Ok(object);
    }
    match to {
        ApiVersion::V1 => reshape(&mut object, id, to, item_to_v1)?,
        ApiVersion::V1beta1 => reshape(&mut object, id, to, item_to_v1beta1)?,
    }
    object["apiVersion"] = Value::String(to.as_str().into());
    Ok(object)
}

/// A typed v1 object from its JSON in either version (a watch event, a GET, a YAML file).
/// Errors name the field as it is written in the object's own version.
pub fn from_wire<K: DraObject>(object: Value) -> Result<K, ConvertError> {
    let id = Identity::of(&object);
    let v1beta1 =
        object.get("apiVersion").and_then(Value::as_str) == Some(ApiVersion::V1beta1.as_str());
    let v1 = convert_as(object, &id, ApiVersion::V1)?;
    serde_path_to_error::deserialize(v1).map_err(|e| {
        let mut field = e.path().to_string();
        if v1beta1 {
            field = v1beta1_path(&field);
        }
        id.error(field, e.inner().to_string())
    })
}

/// A v1 field path as v1beta1 writes it: requests without `exactly`, devices with `basic`.
fn v1beta1_path(path: &str) -> String {
    let segments: Vec<&str> = path.split('.').collect();
    let mut out: Vec<String> = Vec::with_capacity(segments.len() + 1);
    for (i, segment) in segments.iter().enumerate() {
        let parent = out.last().map(String::as_str).unwrap_or("");
        if *segment == "exactly" && parent.starts_with("requests[") {
            continue;
        }
        out.push(segment.to_string());
        let device_of_slice = segment.starts_with("devices[")
            && i == 1
            && segments.first() == Some(&"spec")
            && segments.get(2).is_some_and(|next| *next != "name");
        if device_of_slice {
            out.push("basic".into());
        }
    }
    out.join(".")
}

/// A v1 object's JSON as `version` carries it, apiVersion and kind included.
pub fn to_wire<K: DraObject>(object: &K, version: ApiVersion) -> Value {
    let mut value = serde_json::to_value(object).expect("k8s-openapi objects always serialize");
    // k8s-openapi writes apiVersion and kind; a value built by hand might not.
    value["apiVersion"] = Value::String(format!("{GROUP}/v1"));
    value["kind"] = Value::String(K::KIND.into());
    convert_value(value, version).expect("a v1 object of our own kinds always converts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slice_devices_move_under_basic_and_back() {
        let v1 = json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": "n1-vgpu"},
            "spec": {"driver": "vgpu.hami.io", "nodeName": "n1",
                     "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1},
                     "devices": [{"name": "gpu-0", "attributes": {"index": {"int": 0}},
                                  "capacity": {"memory": {"value": "80Gi"}},
                                  "allowMultipleAllocations": true}]}
        });
        let beta = convert_value(v1.clone(), ApiVersion::V1beta1).unwrap();
        assert_eq!(beta["apiVersion"], "resource.k8s.io/v1beta1");
        assert_eq!(beta["spec"]["devices"][0]["name"], "gpu-0");
        assert_eq!(
            beta["spec"]["devices"][0]["basic"]["capacity"]["memory"]["value"],
            "80Gi"
        );
        assert_eq!(
            beta["spec"]["devices"][0]["basic"]["allowMultipleAllocations"],
            true
        );
        assert_eq!(convert_value(beta, ApiVersion::V1).unwrap(), v1);
        let typed: v1::ResourceSlice = from_wire(v1.clone()).unwrap();
        assert_eq!(to_wire(&typed, ApiVersion::V1), v1);
    }

    #[test]
    fn claim_requests_move_under_exactly_unless_first_available() {
        let beta = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ml"},
            "spec": {"devices": {"requests": [
                {"name": "gpu", "deviceClassName": "vgpu", "count": 2,
                 "selectors": [{"cel": {"expression": "true"}}]},
                {"name": "alt", "firstAvailable": [{"name": "big", "deviceClassName": "vgpu"}]}
            ]}}
        });
        let v1 = convert_value(beta.clone(), ApiVersion::V1).unwrap();
        let requests = &v1["spec"]["devices"]["requests"];
        assert_eq!(requests[0]["exactly"]["deviceClassName"], "vgpu");
        assert_eq!(requests[0]["exactly"]["count"], 2);
        assert!(requests[0].get("deviceClassName").is_none());
        assert!(requests[1].get("exactly").is_none());
        assert_eq!(requests[1]["firstAvailable"][0]["name"], "big");
        // Back in v1beta1 the request without a class has `deviceClassName: ""`, as the API
        // server writes it (a 1.34 server showed it); that converts to no `exactly` again.
        let back = convert_value(v1.clone(), ApiVersion::V1beta1).unwrap();
        let mut expected = beta.clone();
        expected["spec"]["devices"]["requests"][1]["deviceClassName"] = json!("");
        assert_eq!(back, expected);
        assert_eq!(convert_value(back, ApiVersion::V1).unwrap(), v1);
        // Go's zero values are not "set": no `exactly` for them either.
        let zero = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceClaim",
            "metadata": {"name": "z"},
            "spec": {"devices": {"requests": [{"name": "alt", "deviceClassName": "", "count": 0,
                "allocationMode": "", "firstAvailable": [{"name": "a", "deviceClassName": "c"}]}]}}
        });
        let z = convert_value(zero, ApiVersion::V1).unwrap();
        assert!(
            z["spec"]["devices"]["requests"][0].get("exactly").is_none(),
            "{z}"
        );
        let template = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": "t", "namespace": "ml"},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "deviceClassName": "vgpu"}]}}}
        });
        let t: v1::ResourceClaimTemplate = from_wire(template).unwrap();
        let r = &t
            .spec
            .spec
            .devices
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()[0];
        assert_eq!(r.exactly.as_ref().unwrap().device_class_name, "vgpu");
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let bad = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceClaim",
            "metadata": {"name": "c", "namespace": "ml"},
            "spec": {"devices": {"requests": [{"name": "gpu", "count": "two"}]}}
        });
        // Named as the user wrote it in v1beta1: no `exactly`.
        let e = from_wire::<v1::ResourceClaim>(bad).unwrap_err().to_string();
        assert!(
            e.starts_with("ResourceClaim ml/c: spec.devices.requests[0].count: invalid type"),
            "{e}"
        );
        let bad_slice = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceSlice",
            "metadata": {"name": "s"},
            "spec": {"driver": "d", "pool": {"name": "p", "generation": 0, "resourceSliceCount": 1},
                     "devices": [{"name": "gpu-0", "basic": {"attributes": {"index": {"int": "0"}}}}]}
        });
        let e = from_wire::<v1::ResourceSlice>(bad_slice).unwrap_err();
        assert_eq!(e.field, "spec.devices[0].basic.attributes.index.int");
        let other = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        let e = from_wire::<v1::ResourceClaim>(other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Pod p: apiVersion"), "{e}");
        let bad_basic = json!({
            "apiVersion": "resource.k8s.io/v1beta1", "kind": "ResourceSlice",
            "metadata": {"name": "s"},
            "spec": {"devices": [{"name": "gpu-0", "basic": 3}]}
        });
        let e = convert_value(bad_basic, ApiVersion::V1).unwrap_err();
        assert_eq!(e.field, "spec.devices[0]");
        assert_eq!(e.message, "basic: not an object");
    }

    #[test]
    fn device_classes_only_change_api_version() {
        let class = json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": {"name": "vgpu"},
            "spec": {"selectors": [{"cel": {"expression": "device.driver == 'vgpu.hami.io'"}}]}
        });
        let beta = convert_value(class.clone(), ApiVersion::V1beta1).unwrap();
        assert_eq!(beta["spec"], class["spec"]);
        assert_eq!(convert_value(beta, ApiVersion::V1).unwrap(), class);
    }
}
