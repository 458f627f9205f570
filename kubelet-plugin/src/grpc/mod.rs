//! The kubelet-facing gRPC side: the DRA service in both served versions (v1beta1 for kubelets
//! 1.32+, v1 for 1.34+) on one socket, and the registration service the kubelet's plugin
//! watcher finds in its registry directory.

use crate::metrics::Metrics;
use crate::prepare::{KubeletDevice, PrepareError, Preparer};
use k8s_openapi::api::resource::{v1 as res_v1, v1beta1 as res_v1beta1};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use vgpu_driver::ClaimAllocation;
use vgpu_driver::slice::ApiVersion;
use vgpu_proto::dra::{v1, v1beta1};
use vgpu_proto::pluginregistration as reg;
use vgpu_proto::uds;

/// The claim identity the kubelet sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRef {
    pub namespace: String,
    pub uid: String,
    pub name: String,
}

/// Why reading a claim from the API server failed; reported for that claim alone.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("ResourceClaim {0} not found")]
    NotFound(String),
    #[error("reading ResourceClaim {claim}: {source}")]
    Kube {
        claim: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "ResourceClaim {claim} has UID {found}, the kubelet asked for {wanted}: the claim was replaced"
    )]
    UidMismatch {
        claim: String,
        found: String,
        wanted: String,
    },
    #[error(transparent)]
    Allocation(#[from] vgpu_driver::AllocationError),
    #[error("ResourceClaim {claim} is allocated for node {allocated}, not for this node {node}")]
    OtherNode {
        claim: String,
        allocated: String,
        node: String,
    },
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the kubelet's claim reference {field} {value:?} is not {rule}")]
    InvalidReference {
        field: &'static str,
        value: String,
        rule: &'static str,
    },
}

impl ClaimRef {
    /// The kubelet's fields become an API path (namespace, name) and file names (UID): a
    /// value that no API object can have is refused before it reaches either.
    pub fn validate(&self) -> Result<(), ClaimError> {
        use vgpu_driver::names::{is_dns_label, is_dns_subdomain};
        let invalid = |field, value: &str, rule| ClaimError::InvalidReference {
            field,
            value: value.to_string(),
            rule,
        };
        if !is_dns_label(&self.namespace) {
            return Err(invalid("namespace", &self.namespace, "a DNS label"));
        }
        if !is_dns_subdomain(&self.name) {
            return Err(invalid("name", &self.name, "a DNS subdomain"));
        }
        if vgpu_cdi::validate_spec_id(&self.uid).is_err() {
            return Err(invalid("uid", &self.uid, "a safe file name"));
        }
        Ok(())
    }
}

/// The version-independent DRA logic behind both gRPC services.
pub struct DraCore {
    client: kube::Client,
    api_version: ApiVersion,
    driver: String,
    node: String,
    preparer: Arc<Preparer>,
    metrics: Metrics,
}

impl DraCore {
    pub fn new(
        client: kube::Client,
        api_version: ApiVersion,
        driver: &str,
        node: &str,
        preparer: Arc<Preparer>,
        metrics: Metrics,
    ) -> Self {
        DraCore {
            client,
            api_version,
            driver: driver.into(),
            node: node.into(),
            preparer,
            metrics,
        }
    }

    async fn read_claim(&self, claim: &ClaimRef) -> Result<ClaimAllocation, ClaimError> {
        let key = format!("{}/{}", claim.namespace, claim.name);
        let kube_error = |e: kube::Error| match e {
            kube::Error::Api(s) if s.code == 404 => ClaimError::NotFound(key.clone()),
            source => ClaimError::Kube {
                claim: key.clone(),
                source,
            },
        };
        let (uid, alloc) = match self.api_version {
            ApiVersion::V1 => {
                let api: kube::Api<res_v1::ResourceClaim> =
                    kube::Api::namespaced(self.client.clone(), &claim.namespace);
                let c = api.get(&claim.name).await.map_err(kube_error)?;
                (c.metadata.uid.clone(), ClaimAllocation::from_v1(&c))
            }
            ApiVersion::V1beta1 => {
                let api: kube::Api<res_v1beta1::ResourceClaim> =
                    kube::Api::namespaced(self.client.clone(), &claim.namespace);
                let c = api.get(&claim.name).await.map_err(kube_error)?;
                (c.metadata.uid.clone(), ClaimAllocation::from_v1beta1(&c))
            }
        };
        let uid = uid.unwrap_or_default();
        if uid != claim.uid {
            return Err(ClaimError::UidMismatch {
                claim: key,
                found: uid,
                wanted: claim.uid.clone(),
            });
        }
        let alloc = alloc?;
        if let Some(allocated) = &alloc.node_name
            && *allocated != self.node
        {
            return Err(ClaimError::OtherNode {
                claim: key,
                allocated: allocated.clone(),
                node: self.node.clone(),
            });
        }
        Ok(alloc)
    }

    async fn prepare_one(&self, claim: &ClaimRef) -> Result<Vec<KubeletDevice>, ClaimError> {
        claim.validate()?;
        // A claim prepared before (repeated call, kubelet or plugin restart) is answered from
        // the checkpoint without asking the API server again.
        let preparer = self.preparer.clone();
        let uid = claim.uid.clone();
        let known = tokio::task::spawn_blocking(move || preparer.prepared_claim(&uid))
            .await
            .map_err(|e| ClaimError::Internal(e.to_string()))??;
        if let Some(prepared) = known {
            return Ok(prepared.devices);
        }
        let alloc = self.read_claim(claim).await?;
        let preparer = self.preparer.clone();
        let prepared = tokio::task::spawn_blocking(move || preparer.prepare(&alloc))
            .await
            .map_err(|e| ClaimError::Internal(e.to_string()))??;
        Ok(prepared.devices)
    }

    /// Prepare every claim; each gets an answer (devices or an error) keyed by its UID.
    pub async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<KubeletDevice>, String>> {
        let started = Instant::now();
        let mut out = BTreeMap::new();
        for claim in claims {
            let result = self.prepare_one(&claim).await;
            self.metrics.prepared(result.is_ok());
            let result = result.map_err(|e| {
                tracing::warn!(claim = %format!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, error = %e, "prepare failed");
                e.to_string()
            });
            if let Ok(devices) = &result {
                tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, devices = devices.len(), "prepared");
            }
            out.insert(claim.uid, result);
        }
        self.metrics
            .set_prepared_claims(self.preparer.prepared().len());
        self.metrics.observe_prepare(started.elapsed());
        out
    }

    /// Unprepare every claim (no API access: it works after the claim was deleted).
    pub async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        let started = Instant::now();
        let mut out = BTreeMap::new();
        for claim in claims {
            let preparer = self.preparer.clone();
            let uid = claim.uid.clone();
            let result = match tokio::task::spawn_blocking(move || preparer.unprepare(&uid)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("internal error: {e}")),
            };
            self.metrics.unprepared(result.is_ok());
            match &result {
                Ok(()) => tracing::info!(uid = %claim.uid, "unprepared"),
                Err(e) => tracing::warn!(uid = %claim.uid, error = %e, "unprepare failed"),
            }
            out.insert(claim.uid, result);
        }
        self.metrics
            .set_prepared_claims(self.preparer.prepared().len());
        self.metrics.observe_unprepare(started.elapsed());
        out
    }

    pub fn driver(&self) -> &str {
        &self.driver
    }
}

/// Both DRA service versions over one [`DraCore`].
#[derive(Clone)]
pub struct DraService(pub Arc<DraCore>);

/// The kubelet's device message of each version.
trait FromKubeletDevice {
    fn from_device(d: KubeletDevice) -> Self;
}

impl FromKubeletDevice for v1::Device {
    fn from_device(d: KubeletDevice) -> Self {
        v1::Device {
            request_names: d.request_names,
            pool_name: d.pool_name,
            device_name: d.device_name,
            cdi_device_ids: d.cdi_device_ids,
            // v1 answers carry the result's share id (consumable capacity).
            share_id: d.share_id,
        }
    }
}

impl FromKubeletDevice for v1beta1::Device {
    fn from_device(d: KubeletDevice) -> Self {
        v1beta1::Device {
            request_names: d.request_names,
            pool_name: d.pool_name,
            device_name: d.device_name,
            cdi_device_ids: d.cdi_device_ids,
        }
    }
}

fn claim_refs<C>(claims: Vec<C>, parts: impl Fn(C) -> (String, String, String)) -> Vec<ClaimRef> {
    claims
        .into_iter()
        .map(|c| {
            let (namespace, uid, name) = parts(c);
            ClaimRef {
                namespace,
                uid,
                name,
            }
        })
        .collect()
}

macro_rules! dra_version {
    ($m:ident) => {
        #[tonic::async_trait]
        impl $m::dra_plugin_server::DraPlugin for DraService {
            async fn node_prepare_resources(
                &self,
                request: Request<$m::NodePrepareResourcesRequest>,
            ) -> Result<Response<$m::NodePrepareResourcesResponse>, Status> {
                let claims = claim_refs(request.into_inner().claims, |c| {
                    (c.namespace, c.uid, c.name)
                });
                let claims = self
                    .0
                    .prepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, result)| {
                        let answer = match result {
                            Ok(devices) => $m::NodePrepareResourceResponse {
                                devices: devices
                                    .into_iter()
                                    .map(<$m::Device as FromKubeletDevice>::from_device)
                                    .collect(),
                                error: String::new(),
                            },
                            Err(error) => $m::NodePrepareResourceResponse {
                                devices: vec![],
                                error,
                            },
                        };
                        (uid, answer)
                    })
                    .collect();
                Ok(Response::new($m::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$m::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$m::NodeUnprepareResourcesResponse>, Status> {
                let claims = claim_refs(request.into_inner().claims, |c| {
                    (c.namespace, c.uid, c.name)
                });
                let claims = self
                    .0
                    .unprepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, r)| {
                        (
                            uid,
                            $m::NodeUnprepareResourceResponse {
                                error: r.err().unwrap_or_default(),
                            },
                        )
                    })
                    .collect();
                Ok(Response::new($m::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
}

dra_version!(v1);
dra_version!(v1beta1);

/// The registration service: tells the kubelet who we are and where the DRA socket is.
#[derive(Clone, Debug)]
pub struct Registrar {
    pub driver: String,
    /// The DRA socket path as the kubelet sees it.
    pub endpoint: String,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _request: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: vgpu_proto::DRA_PLUGIN_TYPE.into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec![vgpu_proto::DRA_V1.into(), vgpu_proto::DRA_V1BETA1.into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
        } else {
            tracing::error!(
                driver = %self.driver,
                kubelet_error = %status.error,
                "the kubelet REJECTED this plugin's registration: no claims of this driver can be prepared on this node until this is fixed"
            );
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

/// Where the sockets go.
#[derive(Clone, Debug)]
pub struct SocketPaths {
    /// `<plugin-dir>/dra.sock`.
    pub dra: PathBuf,
    /// `<registrar-dir>/<driver>-reg.sock`.
    pub registration: PathBuf,
}

/// Serve the DRA socket, then (only once it accepts connections) the registration socket,
/// until `stop` fires; both socket files are removed on the way out (registration first, so
/// the kubelet deregisters before the DRA socket goes). `ready` is called once both are up.
pub async fn serve(
    paths: &SocketPaths,
    dra: DraService,
    registrar: Registrar,
    ready: impl FnOnce(),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), uds::UdsError> {
    let (dra_incoming, dra_guard) = uds::bind(&paths.dra)?;
    let router = tonic::transport::Server::builder()
        .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
            dra.clone(),
        ))
        .add_service(v1::dra_plugin_server::DraPluginServer::new(dra));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    };
    let dra_path = paths.dra.clone();
    let dra_task =
        tokio::spawn(router.serve_with_incoming_shutdown(dra_incoming, stopped(stop.clone())));
    let (reg_incoming, reg_guard) = uds::bind(&paths.registration)?;
    let reg_router = tonic::transport::Server::builder()
        .add_service(reg::registration_server::RegistrationServer::new(registrar));
    let reg_task =
        tokio::spawn(reg_router.serve_with_incoming_shutdown(reg_incoming, stopped(stop.clone())));
    tracing::info!(dra = %paths.dra.display(), registration = %paths.registration.display(), "serving the kubelet");
    ready();
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    drop(reg_guard);
    drop(dra_guard);
    // Connections the kubelet keeps open must not hold the shutdown forever.
    for (task, path) in [(reg_task, &paths.registration), (dra_task, &dra_path)] {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(source))) => {
                return Err(uds::UdsError::Transport {
                    path: path.clone(),
                    source,
                });
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(socket = %path.display(), "gRPC server did not stop within 5 s")
            }
        }
    }
    Ok(())
}

/// `<registrar-dir>/<driver>-reg.sock`.
pub fn registration_socket(registrar_dir: &Path, driver: &str) -> PathBuf {
    registrar_dir.join(format!("{driver}-reg.sock"))
}
