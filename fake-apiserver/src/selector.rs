//! Label and field selectors, parsed up front so a malformed one is a 400 before anything
//! is read, as on the real server.

use crate::error::ApiError;
use crate::resource::ResourceKind;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas outside parentheses, so `a in (x,y),b` is two requirements.
fn split_top_level(selector: &str) -> Result<Vec<&str>, ApiError> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(unparsable(selector));
                }
            }
            ',' if depth == 0 => {
                parts.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(unparsable(selector));
    }
    parts.push(&selector[start..]);
    Ok(parts)
}

fn unparsable(selector: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {selector:?}"))
}

/// Label keys: an optional DNS prefix and a name, restricted to the characters Kubernetes
/// allows. Strictness here keeps a typo'd selector from silently matching nothing.
fn valid_key(key: &str) -> bool {
    let name = key.rsplit_once('/').map_or(key, |(_, n)| n);
    !name.is_empty()
        && key.len() <= 316
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub(crate) fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in split_top_level(selector)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(Self::requirement(part).ok_or_else(|| unparsable(part))?);
        }
        Ok(LabelSelector(requirements))
    }

    fn requirement(part: &str) -> Option<LabelRequirement> {
        let key_value = |k: &str, v: &str| {
            let (k, v) = (k.trim(), v.trim());
            (valid_key(k) && valid_value(v)).then(|| (k.to_string(), v.to_string()))
        };
        if let Some(key) = part.strip_prefix('!') {
            let key = key.trim();
            return valid_key(key).then(|| LabelRequirement::DoesNotExist(key.into()));
        }
        if let Some((k, v)) = part.split_once("!=") {
            let (k, v) = key_value(k, v)?;
            return Some(LabelRequirement::NotEquals(k, v));
        }
        if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            let (k, v) = key_value(k, v)?;
            return Some(LabelRequirement::Equals(k, v));
        }
        if let Some(open) = part.find('(') {
            let (head, set) = part.split_at(open);
            let set = set.strip_prefix('(')?.strip_suffix(')')?;
            let mut words = head.split_whitespace();
            let (key, op) = (words.next()?, words.next()?);
            if words.next().is_some() || !valid_key(key) {
                return None;
            }
            let values: Vec<String> = set.split(',').map(|v| v.trim().to_string()).collect();
            if values.iter().any(|v| !valid_value(v)) {
                return None;
            }
            return match op {
                "in" => Some(LabelRequirement::In(key.into(), values)),
                "notin" => Some(LabelRequirement::NotIn(key.into(), values)),
                _ => None,
            };
        }
        valid_key(part).then(|| LabelRequirement::Exists(part.into()))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelRequirement::Equals(k, v) => get(k) == Some(v),
            // As in Kubernetes, `!=` and `notin` also match objects without the label.
            LabelRequirement::NotEquals(k, v) => get(k) != Some(v),
            LabelRequirement::In(k, vs) => get(k).is_some_and(|have| vs.iter().any(|v| v == have)),
            LabelRequirement::NotIn(k, vs) => {
                get(k).is_none_or(|have| vs.iter().all(|v| v != have))
            }
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: `field=value`, `field==value` or `field!=value`, comma-joined.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// Only the fields the real server indexes for `kind` are accepted; others are the same
    /// 400 `field label not supported` the real server returns.
    pub(crate) fn parse(selector: &str, kind: &ResourceKind) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for part in selector.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, v, false)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{selector}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            let supported = matches!(field, "metadata.name" | "metadata.namespace")
                || kind.extra_field_selectors().contains(&field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            requirements.push((field.to_string(), value.trim().to_string(), negate));
        }
        Ok(FieldSelector(requirements))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, want, negate)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            // A missing field compares as "", as the real server's field sets do.
            let have = match object.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (have == *want) != *negate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn label_selector_forms() {
        let o = labelled(json!({"app": "gpu", "tier": "node"}));
        let yes = [
            "app=gpu",
            "app==gpu",
            "app!=cpu",
            "app in (gpu, cpu)",
            "app notin (cpu)",
            "app",
            "!missing",
            "app=gpu,tier in (node)",
            "",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
        let no = [
            "app=cpu",
            "app!=gpu",
            "app in (cpu)",
            "app notin (gpu)",
            "missing",
            "!app",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&o), "{s}");
        }
    }

    #[test]
    fn malformed_label_selectors_are_rejected() {
        for s in [
            "app in (a",
            "app) in",
            "app in a",
            "a b c",
            "app=x y",
            "app ~ (a)",
        ] {
            let err = LabelSelector::parse(s).unwrap_err();
            assert_eq!(err.code, 400, "{s}");
        }
    }

    #[test]
    fn field_selectors_are_per_resource() {
        let slices = ResourceKind::new(
            "resource.k8s.io",
            "v1",
            "ResourceSlice",
            "resourceslices",
            false,
            false,
        );
        let claims = ResourceKind::new(
            "resource.k8s.io",
            "v1",
            "ResourceClaim",
            "resourceclaims",
            true,
            true,
        );
        let o = json!({"metadata": {"name": "a"}, "spec": {"nodeName": "n1", "driver": "d"}});
        let s = FieldSelector::parse("spec.nodeName=n1,spec.driver!=x", &slices).unwrap();
        assert!(s.matches(&o));
        let s = FieldSelector::parse("metadata.name=b", &slices).unwrap();
        assert!(!s.matches(&o));
        assert_eq!(
            FieldSelector::parse("spec.nodeName=n1", &claims)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            FieldSelector::parse("nonsense", &slices).unwrap_err().code,
            400
        );
    }
}
