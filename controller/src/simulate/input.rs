//! Reading standard Kubernetes YAML for the simulator: Nodes, Pods, ResourceSlices,
//! DeviceClasses, ResourceClaims and ResourceClaimTemplates (resource.k8s.io v1 or v1beta1),
//! several documents per file. Pods that use templates get the claims the
//! kube-controller-manager would generate. v1beta1 objects are converted to v1 as they are
//! read; claims remember their version so that output gives them back as they came.

use crate::engine::Inputs;
use crate::model::{ClaimView, ClassView, NodeView, PodView};
use crate::slim::SlimPod;
use dra::convert::{self, DraObject};
use dra::{ApiVersion, ConvertError};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use vgpu_driver::SliceView;

/// A claim as read: v1, and the version it was written in.
#[derive(Clone, Debug)]
pub struct ClaimObject {
    pub claim: v1::ResourceClaim,
    pub version: ApiVersion,
}

impl ClaimObject {
    pub fn view(&self) -> Result<ClaimView, crate::model::ClaimError> {
        ClaimView::of(&self.claim)
    }

    pub fn uid(&self) -> String {
        self.claim.metadata.uid.clone().unwrap_or_default()
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        let meta = &self.claim.metadata;
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        )
    }

    /// The claim's JSON in the version it was read in.
    pub fn to_wire(&self) -> Value {
        convert::to_wire(&self.claim, self.version)
    }
}

/// Everything read from the input, in document order.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub inputs: Inputs,
    /// Claims in document order (generated ones right after their pod).
    pub claims: Vec<ClaimObject>,
    /// Kinds present but not used by the simulator (Namespaces, Services…).
    pub ignored: Vec<String>,
}

/// Why an input cannot be simulated.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index}: not JSON: {source}")]
    Json {
        index: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("document {index} ({kind} {name}): {message}")]
    Object {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

impl InputError {
    /// The same error at document `index` (documents read apart are numbered in the stream).
    fn at(self, index: usize) -> InputError {
        match self {
            InputError::Yaml { source, .. } => InputError::Yaml { index, source },
            InputError::Json { source, .. } => InputError::Json { index, source },
            InputError::Object {
                kind,
                name,
                message,
                ..
            } => InputError::Object {
                index,
                kind,
                name,
                message,
            },
        }
    }
}

fn decode<T: DeserializeOwned>(
    index: usize,
    kind: &str,
    name: &str,
    doc: Value,
) -> Result<T, InputError> {
    serde_path_to_error::deserialize(doc).map_err(|e| InputError::Object {
        index,
        kind: kind.to_string(),
        name: name.to_string(),
        message: format!("{}: {}", e.path(), e.inner()),
    })
}

/// A resource.k8s.io object, as v1, from either version.
fn decode_dra<K: DraObject>(
    index: usize,
    kind: &str,
    name: &str,
    doc: Value,
) -> Result<K, InputError> {
    convert::from_wire(doc).map_err(|e: ConvertError| InputError::Object {
        index,
        kind: kind.to_string(),
        name: name.to_string(),
        message: format!("{}: {}", e.field, e.message),
    })
}

/// A stable UID for objects written without one, so runs are reproducible.
fn ensure_uid(doc: &mut Value, kind: &str) {
    let meta = &mut doc["metadata"];
    if meta
        .get("uid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        meta["uid"] = Value::String(format!("sim-{}-{ns}-{name}", kind.to_lowercase()));
    }
    if kind != "Node"
        && kind != "ResourceSlice"
        && kind != "DeviceClass"
        && meta.get("namespace").is_none()
    {
        meta["namespace"] = Value::String("default".into());
    }
}

/// Parse a multi-document YAML stream. Each document is turned into what the simulator keeps
/// of it (views, claims, slim pods) as it is read, so memory follows what is kept rather than
/// the size of the text: a pod's images, environment, probes and volumes are dropped at once.
/// Documents are read in parallel where the stream can be cut into them safely (see
/// [`split_documents`]); the result is the same as reading them one after another.
pub fn parse(text: &str) -> Result<Workload, InputError> {
    parse_with(text, true)
}

fn parse_with(text: &str, parallel: bool) -> Result<Workload, InputError> {
    let documents: Vec<DocumentRead> = match split_documents(text) {
        // JSON (`kubectl get -o json`: one List, or objects one after another) is YAML too,
        // but a JSON parser reads it many times faster.
        _ if text.trim_start().starts_with('{') => read_json_stream(text),
        Some(chunks) if parallel => {
            use rayon::prelude::*;
            let read: Vec<Option<Vec<DocumentRead>>> = chunks
                .par_iter()
                .map(|chunk| {
                    // A chunk is one document, or none (blank text before the first marker).
                    let mut docs = read_stream(chunk);
                    match docs.len() {
                        0 | 1 => Some(docs.pop().into_iter().collect()),
                        _ => None,
                    }
                })
                .collect();
            match read.into_iter().collect::<Option<Vec<_>>>() {
                Some(read) => read.into_iter().flatten().collect(),
                // The cut disagrees with the parser somewhere: read the stream whole.
                None => read_stream(text),
            }
        }
        _ => read_stream(text),
    };
    let mut reader = Reader::default();
    for (index, document) in documents.into_iter().enumerate() {
        for parsed in document.map_err(|e| e.at(index))? {
            reader.add(index, parsed);
        }
    }
    reader.finish()
}

/// Read every document of a YAML stream, numbered from 0 in it. Stops after the first
/// document that cannot be read: only the first error is reported, and the parser cannot go
/// on past one that is not YAML.
fn read_stream(text: &str) -> Vec<DocumentRead> {
    let mut out = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let read = serde::Deserialize::deserialize(document)
            .map_err(|source| InputError::Yaml { index, source })
            .and_then(|doc| read_document(index, doc));
        let failed = read.is_err();
        out.push(read);
        if failed {
            break;
        }
    }
    out
}

/// Read every JSON value of `text` (one or more, separated by whitespace) as a document,
/// numbered from 0, stopping after the first that cannot be read, as [`read_stream`] does.
/// The text is first cut into its objects without building them (a List's items included:
/// `kubectl get -o json` gives one List of everything), then the objects are decoded in
/// parallel, so memory follows what is kept rather than the size of the text.
fn read_json_stream(text: &str) -> Vec<DocumentRead> {
    use rayon::prelude::*;
    use serde_json::value::RawValue;
    /// A document as far as cutting it needs: whether it is a List, and its items' texts.
    #[derive(serde::Deserialize)]
    struct Outline<'a> {
        #[serde(borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        items: Option<Vec<&'a RawValue>>,
    }
    let mut objects: Vec<(usize, &RawValue)> = Vec::new();
    let mut failed: Option<(usize, InputError)> = None;
    for (index, raw) in serde_json::Deserializer::from_str(text)
        .into_iter::<&RawValue>()
        .enumerate()
    {
        let raw = match raw {
            Ok(raw) => raw,
            Err(source) => {
                failed = Some((index, InputError::Json { index, source }));
                break;
            }
        };
        match serde_json::from_str::<Outline>(raw.get()) {
            Ok(Outline {
                kind: Some(kind),
                items: Some(items),
            }) if is_list(&kind) => objects.extend(items.into_iter().map(|item| (index, item))),
            // Anything else (an object, null, a number…) is one object, for `read_object`.
            _ => objects.push((index, raw)),
        }
    }
    let read: Vec<(usize, Result<Option<Parsed>, InputError>)> = objects
        .into_par_iter()
        .map(|(index, raw)| {
            let read = serde_json::from_str::<Value>(raw.get())
                .map_err(|source| InputError::Json { index, source })
                .and_then(|object| read_object(index, object));
            (index, read)
        })
        .collect();
    // Regrouped by document, in order (documents that held no object included); the first
    // error in order ends the stream.
    let mut out: Vec<DocumentRead> = Vec::new();
    for (index, object) in read {
        out.resize_with(index + 1, || Ok(Vec::new()));
        match object {
            Ok(parsed) => {
                if let Ok(document) = &mut out[index] {
                    document.extend(parsed);
                }
            }
            Err(e) => {
                out[index] = Err(e);
                return out;
            }
        }
    }
    if let Some((index, e)) = failed {
        out.resize_with(index, || Ok(Vec::new()));
        out.push(Err(e));
    }
    out
}

/// Cut a YAML stream into its documents' texts at the lines that start a document (`---` at
/// the start of a line, alone or followed by a space or tab): YAML forbids such a line inside
/// a document, so no document is cut in two. `None` when the stream uses directives (`%`) or
/// document end markers (`...`), whose effect spans documents: it is then read whole.
fn split_documents(text: &str) -> Option<Vec<&str>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare.starts_with('%') || bare == "..." || bare.starts_with("... ") {
            return None;
        }
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && offset > start {
            chunks.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    if offset > start {
        chunks.push(&text[start..]);
    }
    // Blank lines and comments before the first marker are no document of the stream (the
    // parser reads them alone as an empty one).
    let blank = |chunk: &str| {
        chunk
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    };
    if chunks.len() > 1 && chunks.first().is_some_and(|c| blank(c)) {
        chunks.remove(0);
    }
    Some(chunks)
}

/// The objects of one document, or why it cannot be read.
type DocumentRead = Result<Vec<Parsed>, InputError>;

/// What one object of the input becomes.
enum Parsed {
    Node(NodeView),
    /// Decoded as the controller's watch cache decodes it.
    Pod(SlimPod),
    Slice(SliceView),
    Class(ClassView),
    Claim(ClaimObject),
    Template {
        namespace: String,
        name: String,
        template: Box<ClaimTemplate>,
    },
    Ignored(String),
}

/// Whether a kind wraps objects in `items` (`List`, `PodList`…), as `kubectl get` writes them.
fn is_list(kind: &str) -> bool {
    kind.ends_with("List")
}

/// The objects of one document: the document itself, or a List's items (`kubectl get -o yaml`
/// wraps objects in one).
fn read_document(index: usize, mut doc: Value) -> Result<Vec<Parsed>, InputError> {
    let listed = doc.get("kind").and_then(Value::as_str).is_some_and(is_list);
    let objects = match doc.get_mut("items").and_then(Value::as_array_mut) {
        Some(items) if listed => std::mem::take(items),
        _ => vec![doc],
    };
    // A List's items are decoded in parallel: `kubectl get -o json` gives one List of
    // everything. The first error in item order is the one reported.
    use rayon::prelude::*;
    let read: Vec<Result<Option<Parsed>, InputError>> = objects
        .into_par_iter()
        .map(|object| read_object(index, object))
        .collect();
    let mut parsed = Vec::with_capacity(read.len());
    for object in read {
        parsed.extend(object?);
    }
    Ok(parsed)
}

fn read_object(index: usize, mut doc: Value) -> Result<Option<Parsed>, InputError> {
    if doc.is_null() {
        return Ok(None);
    }
    let text = |doc: &Value, pointer: &str| {
        doc.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let api_version = text(&doc, "/apiVersion");
    let kind = text(&doc, "/kind");
    let name = text(&doc, "/metadata/name");
    if name.is_empty() && !is_list(&kind) {
        return Err(InputError::Object {
            index,
            kind,
            name,
            message: "metadata.name is required".into(),
        });
    }
    ensure_uid(&mut doc, &kind);
    let dra_version = ApiVersion::of_api_version(&api_version);
    Ok(Some(
        match (api_version.as_str(), dra_version, kind.as_str()) {
            ("v1", _, "Node") => Parsed::Node(NodeView::from_node(&decode::<Node>(
                index, &kind, &name, doc,
            )?)),
            ("v1", _, "Pod") => Parsed::Pod(decode(index, &kind, &name, doc)?),
            (_, Some(_), "ResourceSlice") => {
                Parsed::Slice(SliceView::of(&decode_dra(index, &kind, &name, doc)?))
            }
            (_, Some(_), "DeviceClass") => {
                Parsed::Class(ClassView::of(&decode_dra(index, &kind, &name, doc)?))
            }
            (_, Some(version), "ResourceClaim") => Parsed::Claim(ClaimObject {
                claim: decode_dra(index, &kind, &name, doc)?,
                version,
            }),
            (_, Some(version), "ResourceClaimTemplate") => {
                let template: v1::ResourceClaimTemplate = decode_dra(index, &kind, &name, doc)?;
                Parsed::Template {
                    namespace: template.metadata.namespace.clone().unwrap_or_default(),
                    name,
                    template: Box::new(ClaimTemplate { template, version }),
                }
            }
            _ => Parsed::Ignored(format!("{api_version} {kind} {name}")),
        },
    ))
}

/// What has been read so far.
#[derive(Default)]
struct Reader {
    workload: Workload,
    /// By namespace and name; the first of a name wins.
    templates: HashMap<(String, String), ClaimTemplate>,
    /// Slim pods with their document index: their template claims are generated once every
    /// template has been read.
    pods: Vec<(usize, SlimPod)>,
}

impl Reader {
    fn add(&mut self, index: usize, parsed: Parsed) {
        let inputs = &mut self.workload.inputs;
        match parsed {
            Parsed::Node(node) => inputs.nodes.push(node),
            Parsed::Pod(pod) => self.pods.push((index, pod)),
            Parsed::Slice(slice) => inputs.slices.push(slice),
            Parsed::Class(class) => inputs.classes.push(class),
            Parsed::Claim(claim) => self.workload.claims.push(claim),
            Parsed::Template {
                namespace,
                name,
                template,
            } => {
                self.templates.entry((namespace, name)).or_insert(*template);
            }
            Parsed::Ignored(what) => self.workload.ignored.push(what),
        }
    }

    /// Pods that use templates get the claims the kube-controller-manager would generate.
    fn finish(mut self) -> Result<Workload, InputError> {
        for (index, mut pod) in std::mem::take(&mut self.pods) {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let pod_name = pod.metadata.name.clone().unwrap_or_default();
            let mut statuses = Vec::new();
            for rc in pod
                .spec
                .iter()
                .flat_map(|s| s.resource_claims.iter().flatten())
            {
                let Some(template_name) = &rc.resource_claim_template_name else {
                    continue;
                };
                let template = self
                    .templates
                    .get(&(ns.clone(), template_name.clone()))
                    .ok_or_else(|| InputError::Object {
                        index,
                        kind: "Pod".into(),
                        name: pod_name.clone(),
                        message: format!("spec.resourceClaims[{}]: ResourceClaimTemplate {ns}/{template_name} is not in the input", rc.name),
                    })?;
                // The kube-controller-manager names generated claims <pod>-<claim>-<random>; the
                // simulator leaves out the random part.
                let claim_name = format!("{pod_name}-{}", rc.name);
                self.workload
                    .claims
                    .push(template.instantiate(&ns, &claim_name, &pod_name));
                statuses.push(k8s_openapi::api::core::v1::PodResourceClaimStatus {
                    name: rc.name.clone(),
                    resource_claim_name: Some(claim_name),
                });
            }
            if !statuses.is_empty() {
                pod.status
                    .get_or_insert_with(Default::default)
                    .resource_claim_statuses = Some(statuses);
            }
            self.workload.inputs.pods.push(PodView::of(&pod));
        }
        Ok(self.workload)
    }
}

/// A template as read, and the version it was written in (its claims are given back in it).
#[derive(Clone, Debug)]
struct ClaimTemplate {
    template: v1::ResourceClaimTemplate,
    version: ApiVersion,
}

impl ClaimTemplate {
    fn instantiate(&self, ns: &str, name: &str, pod: &str) -> ClaimObject {
        let metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            uid: Some(format!("sim-resourceclaim-{ns}-{name}")),
            annotations: Some(
                [(
                    "resource.kubernetes.io/pod-claim-name".to_string(),
                    name.trim_start_matches(&format!("{pod}-")).to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        };
        ClaimObject {
            claim: v1::ResourceClaim {
                metadata,
                spec: self.template.spec.spec.clone(),
                status: None,
            },
            version: self.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_cut_only_at_lines_that_start_one() {
        let text = "# leading comment\n---\na: 1\nb: |\n  --- not a marker\n---x: 2\n--- # c\nc: 3\n---\n\n---\td: 4\n";
        assert_eq!(
            split_documents(text).unwrap(),
            vec![
                "---\na: 1\nb: |\n  --- not a marker\n---x: 2\n",
                "--- # c\nc: 3\n",
                "---\n\n",
                "---\td: 4\n",
            ]
        );
        assert_eq!(split_documents("a: 1\r\n---\r\nb: 2").unwrap().len(), 2);
        // Directives and end markers reach across documents: such a stream is read whole.
        assert_eq!(split_documents("%YAML 1.2\n---\na: 1\n"), None);
        assert_eq!(split_documents("a: 1\n...\nb: 2\n"), None);
    }

    /// Documents read apart give what reading them in order gives: same objects in the same
    /// order, same document numbers, in errors too.
    #[test]
    fn reading_in_parallel_equals_reading_in_order() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Node\n  metadata: {name: listed}\n";
        // The pod comes before the template its claim is made from.
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: trainer, namespace: ml}\nspec:\n  containers: [{name: main, image: x, env: [{name: A, value: b}]}]\n  resourceClaims: [{name: gpu, resourceClaimTemplateName: slice}]\n";
        let template = "apiVersion: resource.k8s.io/v1\nkind: ResourceClaimTemplate\nmetadata: {name: slice, namespace: ml}\nspec:\n  spec:\n    devices:\n      requests: [{name: gpu, exactly: {deviceClassName: gpu-slice}}]\n";
        let text = format!(
            "# a comment before the first document\n{}\n---\n---\n{list}---\n{pod}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: b}}\n---\n{template}",
            super::super::default::yaml()
        );
        let parallel = parse_with(&text, true).unwrap();
        let in_order = parse_with(&text, false).unwrap();
        assert!(parallel.inputs.nodes.iter().any(|n| n.name == "listed"));
        assert_eq!(
            parallel.inputs.pods[0].claims,
            vec!["trainer-gpu".to_string()]
        );
        assert!(parallel.claims.iter().any(|c| c.key() == "ml/trainer-gpu"));
        assert_eq!(format!("{parallel:?}"), format!("{in_order:?}"));

        let bad = format!(
            "{text}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: 7}}\n---\n: : :\n"
        );
        let parallel = parse_with(&bad, true).unwrap_err().to_string();
        let in_order = parse_with(&bad, false).unwrap_err().to_string();
        assert_eq!(parallel, in_order);
        let documents = serde_yaml_ng::Deserializer::from_str(&text).count();
        assert!(
            parallel.starts_with(&format!("document {documents} (Pod p): spec.containers")),
            "{parallel}"
        );
    }

    /// `kubectl get -o json` output (one List) and a stream of JSON objects read as the same
    /// objects in YAML do; errors name the document and the first bad item in order.
    #[test]
    fn json_reads_as_the_same_yaml_does() {
        let yaml = super::super::default::yaml();
        let objects: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &Value| !v.is_null())
            .collect();
        let from_yaml = format!("{:?}", parse(&yaml).unwrap());
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let listed = parse(&serde_json::to_string_pretty(&list).unwrap()).unwrap();
        assert_eq!(format!("{listed:?}"), from_yaml);
        let stream: String = objects
            .iter()
            .map(|o| serde_json::to_string(o).unwrap() + "\n")
            .collect();
        assert_eq!(format!("{:?}", parse(&stream).unwrap()), from_yaml);

        let bad_pod = |name: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name}, "spec": {"containers": 7}})
        };
        let mut items = objects.clone();
        items.push(bad_pod("first"));
        items.push(bad_pod("second"));
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let e = parse(&list.to_string()).unwrap_err().to_string();
        assert!(
            e.starts_with("document 0 (Pod first): spec.containers"),
            "{e}"
        );
        let e = parse(&format!("{stream}{{\"kind\": "))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("document {}: not JSON", objects.len())),
            "{e}"
        );
        // An empty List is a document too.
        let e = parse("{\"kind\": \"List\", \"items\": []}\nnull\n{\"kind\": ")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("document 2: not JSON"), "{e}");
    }
}
