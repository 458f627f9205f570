//! The converting client: typed v1 objects in, typed v1 objects out, whichever version the
//! API server serves. On v1 it is kube's typed `Api`; on v1beta1 every object crosses
//! [`crate::convert`] on its way in and out, and nothing else in the workspace knows.

use crate::convert::{self, ConvertError, DraObject};
use crate::version::{ApiVersion, GROUP};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;

/// Why a request failed: the API server said no, or its answer could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("converting the API server's answer: {0}")]
    Convert(#[from] ConvertError),
}

impl ClientError {
    /// The HTTP status of an API error (404, 409, …).
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Kube(kube::Error::Api(s)) => Some(s.code),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// One resource.k8s.io resource, as v1, over the served version.
#[derive(Clone)]
pub struct DraApi<K> {
    version: ApiVersion,
    typed: Api<K>,
    /// Used when the wire speaks v1beta1.
    wire: Api<DynamicObject>,
}

fn api_resource<K: DraObject>(version: ApiVersion) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, version.version(), K::KIND),
        K::URL_PATH_SEGMENT,
    )
}

impl<K: DraObject> DraApi<K> {
    /// Every object of the resource (cluster-scoped ones, or all namespaces).
    pub fn all(client: Client, version: ApiVersion) -> Self {
        DraApi {
            version,
            wire: Api::all_with(client.clone(), &api_resource::<K>(version)),
            typed: Api::all(client),
        }
    }

    /// The objects of one namespace.
    pub fn namespaced(client: Client, namespace: &str, version: ApiVersion) -> Self
    where
        K: kube::Resource<Scope = NamespaceResourceScope>,
    {
        DraApi {
            version,
            wire: Api::namespaced_with(client.clone(), namespace, &api_resource::<K>(version)),
            typed: Api::namespaced(client, namespace),
        }
    }

    /// The version on the wire.
    pub fn version(&self) -> ApiVersion {
        self.version
    }

    fn is_v1(&self) -> bool {
        self.version == ApiVersion::V1
    }

    fn inbound(&self, object: DynamicObject) -> Result<K, ConvertError> {
        inbound(self.version, object)
    }

    fn outbound(&self, object: &K) -> DynamicObject {
        serde_json::from_value(convert::to_wire(object, self.version))
            .expect("a converted object is a valid dynamic object")
    }

    pub async fn get(&self, name: &str) -> Result<K, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.get(name).await?);
        }
        Ok(self.inbound(self.wire.get(name).await?)?)
    }

    pub async fn get_opt(&self, name: &str) -> Result<Option<K>, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.get_opt(name).await?);
        }
        Ok(match self.wire.get_opt(name).await? {
            Some(o) => Some(self.inbound(o)?),
            None => None,
        })
    }

    pub async fn list(&self, params: &ListParams) -> Result<Vec<K>, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.list(params).await?.items);
        }
        self.wire
            .list(params)
            .await?
            .items
            .into_iter()
            .map(|o| self.inbound(o).map_err(ClientError::from))
            .collect()
    }

    pub async fn create(&self, params: &PostParams, object: &K) -> Result<K, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.create(params, object).await?);
        }
        Ok(self.inbound(self.wire.create(params, &self.outbound(object)).await?)?)
    }

    pub async fn replace(
        &self,
        name: &str,
        params: &PostParams,
        object: &K,
    ) -> Result<K, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.replace(name, params, object).await?);
        }
        Ok(self.inbound(
            self.wire
                .replace(name, params, &self.outbound(object))
                .await?,
        )?)
    }

    pub async fn replace_status(
        &self,
        name: &str,
        params: &PostParams,
        object: &K,
    ) -> Result<K, ClientError> {
        if self.is_v1() {
            return Ok(self.typed.replace_status(name, params, object).await?);
        }
        Ok(self.inbound(
            self.wire
                .replace_status(name, params, &self.outbound(object))
                .await?,
        )?)
    }

    /// Merge-patch the object's metadata: `patch` is `{"metadata": {...}}`, the same in
    /// every version. A `resourceVersion` in it is a precondition (409 when stale).
    pub async fn patch_metadata(
        &self,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<K, ClientError> {
        let params = PatchParams::default();
        if self.is_v1() {
            return Ok(self
                .typed
                .patch(name, &params, &Patch::Merge(patch))
                .await?);
        }
        Ok(self.inbound(self.wire.patch(name, &params, &Patch::Merge(patch)).await?)?)
    }

    /// Merge-patch the status subresource with the status of `object` (v1, sent in the served
    /// version; the rest of `object` is not sent), on condition that the object is still at
    /// `resource_version` when one is given. Only the fields set are sent, so the caller needs
    /// no copy of the whole object.
    pub async fn patch_status(
        &self,
        name: &str,
        resource_version: Option<&str>,
        object: &K,
    ) -> Result<K, ClientError> {
        let wire = convert::to_wire(object, self.version);
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": resource_version},
            "status": wire.get("status"),
        });
        let params = PatchParams::default();
        if self.is_v1() {
            return Ok(self
                .typed
                .patch_status(name, &params, &Patch::Merge(&patch))
                .await?);
        }
        Ok(self.inbound(
            self.wire
                .patch_status(name, &params, &Patch::Merge(&patch))
                .await?,
        )?)
    }

    /// Delete; a 404 is an error for the caller to judge.
    pub async fn delete(&self, name: &str, params: &DeleteParams) -> Result<(), ClientError> {
        if self.is_v1() {
            self.typed.delete(name, params).await?;
        } else {
            self.wire.delete(name, params).await?;
        }
        Ok(())
    }

    /// A watch of the resource as kube-runtime's `watcher` gives it, in v1. An object that
    /// cannot be converted (the API server validated it, so only a bug here can cause that) is
    /// logged and left out rather than ending the watch.
    pub fn watch(
        &self,
        config: watcher::Config,
    ) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static {
        if self.is_v1() {
            return watcher::watcher(self.typed.clone(), config).boxed();
        }
        let version = self.version;
        watcher::watcher(self.wire.clone(), config)
            .map_ok(move |event| convert_event::<K>(version, event))
            .try_filter_map(|e| futures::future::ready(Ok(e)))
            .boxed()
    }
}

/// An object as the server sent it, in `version`, as v1. A real API server leaves apiVersion
/// and kind out of the items of a list (the list carries them), so they come from the request.
fn inbound<K: DraObject>(version: ApiVersion, object: DynamicObject) -> Result<K, ConvertError> {
    let mut value = serde_json::to_value(object).expect("dynamic objects always serialize");
    for (key, default) in [("apiVersion", version.as_str()), ("kind", K::KIND)] {
        if value
            .get(key)
            .and_then(serde_json::Value::as_str)
            .is_none_or(str::is_empty)
        {
            value[key] = serde_json::Value::String(default.into());
        }
    }
    convert::from_wire(value)
}

fn convert_event<K: DraObject>(
    version: ApiVersion,
    event: watcher::Event<DynamicObject>,
) -> Option<watcher::Event<K>> {
    let convert = |o: DynamicObject| match inbound::<K>(version, o) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(error = %e, "left out of the watch: cannot convert");
            None
        }
    };
    use watcher::Event;
    Some(match event {
        Event::Apply(o) => Event::Apply(convert(o)?),
        Event::Delete(o) => Event::Delete(convert(o)?),
        Event::InitApply(o) => Event::InitApply(convert(o)?),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1;

    /// List items of a real API server: no apiVersion, no kind (found by the e2e suite on a
    /// real 1.32 server, where every LIST failed to convert).
    #[test]
    fn list_items_without_type_meta_take_the_requests() {
        let item: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1-vgpu"},
            "spec": {"driver": "vgpu.hami.io", "nodeName": "n1",
                     "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1},
                     "devices": [{"name": "gpu-0", "basic": {"attributes": {"index": {"int": 0}}}}]}
        }))
        .unwrap();
        assert!(item.types.is_none());
        let slice: v1::ResourceSlice = inbound(ApiVersion::V1beta1, item).unwrap();
        let devices = slice.spec.devices.unwrap();
        assert_eq!(devices[0].name, "gpu-0");
        assert!(
            devices[0]
                .attributes
                .as_ref()
                .unwrap()
                .contains_key("index")
        );
    }
}
