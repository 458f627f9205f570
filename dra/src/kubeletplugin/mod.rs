//! The kubelet side of a DRA driver, as `k8s.io/dynamic-resource-allocation/kubeletplugin` is
//! for Go drivers: it registers with the kubelet, serves both DRA gRPC versions on one socket,
//! reads each claim the kubelet names from the API server and checks it (the UID the kubelet
//! holds, allocated, allocated for this node), and hands the driver only what is left to do:
//! [`Driver::prepare`] the checked claims of a call, [`Driver::unprepare`] a reference.
//!
//! Every claim gets its own answer: one claim that cannot be read does not fail the others.
//!
//! The DRA socket also serves the standard `grpc.health.v1` service (`SERVING` while the
//! helper runs) and the kubelet's `v1alpha1.DRAResourceHealth` (device health, for kubelets
//! with the ResourceHealthStatus gate) from [`Driver::device_health`]; the same
//! `grpc.health.v1` statuses can be served over TCP ([`Options::healthcheck_addr`]) for the
//! kubelet's `grpc:` probes, which cannot dial a Unix socket.

mod claims;
mod registration;
mod service;
mod stale;

pub use claims::{ClaimError, ClaimRef};
pub use registration::{Registrar, Verdict};
pub use service::REGISTERED_SERVICE;
pub use stale::remove_stale_sockets;

use crate::client::DraApi;
use crate::version::ApiVersion;
use k8s_openapi::api::resource::v1::ResourceClaim;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use vgpu_proto::uds;
use vgpu_proto::uds::MAX_SOCKET_PATH;

/// Default kubelet plugin data directory root (`<root>/<driver>`).
pub const KUBELET_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
/// Default kubelet plugin registry directory.
pub const KUBELET_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";

/// A device in the kubelet's answer (`NodePrepareResourceResponse.devices[]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    /// Main request names (`/subrequest` stripped, as the kubelet wants them).
    pub request_names: Vec<String>,
    pub pool_name: String,
    pub device_name: String,
    pub cdi_device_ids: Vec<String>,
    /// The allocation result's share id (consumable capacity); only v1 kubelets receive it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
}

/// One device's health as the kubelet's resource health service reports it (KEP-4680: it
/// shows in the pod's `status.containerStatuses[].allocatedResourcesStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHealth {
    pub pool_name: String,
    pub device_name: String,
    /// `None`: unknown.
    pub healthy: Option<bool>,
    /// When this was last checked, seconds since the Unix epoch.
    pub last_updated: i64,
}

/// Where the time of one kubelet call went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// From the request to the answer, as the helper sees it.
    pub total: Duration,
    /// Of which reading claims from the API server: kept apart because it is the API server's
    /// latency, not the node's, and would otherwise hide what the driver itself costs.
    pub api_reads: Duration,
}

/// Which kubelet call an outcome belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Prepare,
    Unprepare,
}

/// What a driver does on the node. The helper calls it for one kubelet call at a time per
/// connection (the kubelet may call concurrently; a driver serializes what must not overlap).
pub trait Driver: Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// A claim prepared before (a repeated call, a kubelet or plugin restart): its devices,
    /// answered without reading the API server, which may be unreachable or already have
    /// forgotten the claim. `None` makes the helper read and check the claim, then call
    /// [`Driver::prepare`].
    fn prepared(
        &self,
        claim: &ClaimRef,
    ) -> impl Future<Output = Result<Option<Vec<Device>>, Self::Error>> + Send;

    /// Prepare claims that are allocated, for this node, with the UIDs the kubelet holds: those
    /// of one NodePrepareResources call (a pod's claims) that were not prepared before, once
    /// each, in the kubelet's order. All at once so that a driver can make the whole call
    /// durable with one write. One answer per claim, in the same order.
    fn prepare(
        &self,
        claims: Vec<ResourceClaim>,
    ) -> impl Future<Output = Vec<Result<Vec<Device>, Self::Error>>> + Send;

    /// Undo a preparation; the claim may be gone from the API server already.
    fn unprepare(&self, claim: &ClaimRef) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The health of every device, now and on each change; `None` when the driver does not
    /// track health (the kubelet is told the service is unimplemented).
    fn device_health(&self) -> Option<futures::stream::BoxStream<'static, Vec<DeviceHealth>>> {
        None
    }

    /// One kubelet call finished: each claim's outcome and where the time went (for metrics).
    fn observe(&self, call: Call, outcomes: &[(ClaimRef, bool)], timing: Timing) {
        let _ = (call, outcomes, timing);
    }
}

/// Where the helper serves and how it registers.
#[derive(Clone, Debug)]
pub struct Options {
    pub driver_name: String,
    pub node_name: String,
    /// The plugin data directory (the DRA socket goes here), as this process sees it.
    pub plugin_dir: PathBuf,
    /// The same directory as the kubelet sees it, for the registered endpoint.
    pub kubelet_plugin_dir: PathBuf,
    /// The kubelet's plugin registry directory.
    pub registrar_dir: PathBuf,
    /// Set to a value unique to this instance (the pod UID) to let two instances run side by
    /// side during a rolling update (kubelet 1.33+): each gets its own socket names.
    pub rolling_update_uid: Option<String>,
    /// Serve `grpc.health.v1` over TCP here too (port 0: any free port); `SERVING` only
    /// while both the DRA and the registration sockets are served, and for the service
    /// [`REGISTERED_SERVICE`] only while the kubelet has accepted the registration.
    pub healthcheck_addr: Option<SocketAddr>,
    /// How long to wait for the kubelet to register the plugin before the registration socket
    /// is offered again (doubling each time, up to 5 minutes); also after a rejection.
    pub registration_patience: Duration,
}

/// How many characters of the rolling-update UID name the sockets where the whole UID does
/// not fit (see [`Options::registration_socket`]).
pub(crate) const SHORT_UID_LEN: usize = 8;

/// The kubelet's plugin watcher registers a new socket within a second or two.
pub const DEFAULT_REGISTRATION_PATIENCE: Duration = Duration::from_secs(30);

impl Options {
    /// `-<uid>`, or `-<its first 8 characters>` where the whole UID would make a socket path
    /// longer than a Unix socket address allows (a kubelet root deeper than /var/lib/kubelet):
    /// the kubelet could not dial it. Eight hex digits of a random UUID still tell the two
    /// instances of a rolling update apart.
    fn uid_part(&self) -> String {
        let Some(uid) = self.rolling_update_uid.as_deref() else {
            return String::new();
        };
        let full = format!("-{uid}");
        if self
            .socket_paths(&full)
            .iter()
            .all(|p| p.as_os_str().len() <= MAX_SOCKET_PATH)
        {
            return full;
        }
        let short: String = uid
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(SHORT_UID_LEN)
            .collect();
        format!("-{short}")
    }

    /// The DRA socket as this process and as the kubelet see it, and the registration
    /// socket, for a given uid part.
    fn socket_paths(&self, uid_part: &str) -> [PathBuf; 3] {
        let dra = format!("dra{uid_part}.sock");
        [
            self.plugin_dir.join(&dra),
            self.kubelet_plugin_dir.join(&dra),
            self.registrar_dir
                .join(format!("{}{uid_part}-reg.sock", self.driver_name)),
        ]
    }

    /// `<plugin-dir>/dra[-<uid>].sock`.
    pub fn dra_socket(&self) -> PathBuf {
        let [own, _, _] = self.socket_paths(&self.uid_part());
        own
    }

    /// `<registrar-dir>/<driver>[-<uid>]-reg.sock`.
    pub fn registration_socket(&self) -> PathBuf {
        let [_, _, registration] = self.socket_paths(&self.uid_part());
        registration
    }

    /// The DRA socket's path as the kubelet sees it.
    pub fn kubelet_endpoint(&self) -> PathBuf {
        let [_, kubelet, _] = self.socket_paths(&self.uid_part());
        kubelet
    }
}

/// The claims the helper reads: the converting client, so drivers see v1 only.
pub(crate) struct ClaimReader {
    client: kube::Client,
    version: ApiVersion,
    node: String,
}

impl ClaimReader {
    fn api(&self, namespace: &str) -> DraApi<ResourceClaim> {
        DraApi::namespaced(self.client.clone(), namespace, self.version)
    }
}

/// Why the helper could not serve.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error(transparent)]
    Socket(#[from] uds::UdsError),
    #[error("the gRPC server stopped before it was ready")]
    NotReady,
    #[error("the gRPC server task failed: {0}")]
    Task(String),
    #[error("binding the gRPC health endpoint {addr}: {source}")]
    Healthcheck {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A serving helper; [`Helper::shutdown`] removes its sockets.
pub struct Helper {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), uds::UdsError>>,
    healthcheck_addr: Option<SocketAddr>,
    verdicts: watch::Receiver<Verdict>,
}

impl Helper {
    /// Serve `driver` for the kubelet: the DRA socket first, then (once it accepts
    /// connections) the registration socket. Returns once both are served.
    pub async fn start<D: Driver>(
        driver: Arc<D>,
        client: kube::Client,
        version: ApiVersion,
        options: Options,
    ) -> Result<Helper, HelperError> {
        let (stop, stop_rx) = watch::channel(false);
        // Bound before anything is served, so a taken port fails the start instead of
        // leaving the probe to fail later.
        let healthcheck = match options.healthcheck_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| HelperError::Healthcheck { addr, source })?,
            ),
            None => None,
        };
        let healthcheck_addr = healthcheck
            .as_ref()
            .and_then(|l: &tokio::net::TcpListener| l.local_addr().ok());
        for path in remove_stale_sockets(&options) {
            tracing::info!(socket = %path.display(), "removed the socket of an instance that is gone");
        }
        let reader = ClaimReader {
            client,
            version,
            node: options.node_name.clone(),
        };
        let service = service::DraService::new(driver, reader);
        let registrar = Registrar::new(&options.driver_name, &options.kubelet_endpoint());
        let verdicts = registrar.verdicts();
        let (dra, reg) = (options.dra_socket(), options.registration_socket());
        let patience = options.registration_patience;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            service::serve(
                service::Sockets {
                    dra: &dra,
                    registration: &reg,
                    healthcheck,
                },
                service,
                registrar,
                ready_tx,
                stop_rx,
                patience,
            )
            .await
        });
        if ready_rx.await.is_err() {
            return match task.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(HelperError::NotReady),
            };
        }
        Ok(Helper {
            stop,
            task,
            healthcheck_addr,
            verdicts,
        })
    }

    /// The kubelet's verdicts on the registration, as they come.
    pub fn registration(&self) -> watch::Receiver<Verdict> {
        self.verdicts.clone()
    }

    /// Where the TCP health endpoint listens (the port chosen, when asked for port 0).
    pub fn healthcheck_addr(&self) -> Option<SocketAddr> {
        self.healthcheck_addr
    }

    /// Stop serving; the registration socket goes first, so the kubelet deregisters before
    /// the DRA socket disappears.
    pub async fn shutdown(self) -> Result<(), HelperError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(HelperError::Task(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_updates_give_each_instance_its_own_sockets() {
        let mut options = Options {
            driver_name: "vgpu.hami.io".into(),
            node_name: "n1".into(),
            plugin_dir: "/plugins/vgpu.hami.io".into(),
            kubelet_plugin_dir: "/var/lib/kubelet/plugins/vgpu.hami.io".into(),
            registrar_dir: "/var/lib/kubelet/plugins_registry".into(),
            rolling_update_uid: None,
            healthcheck_addr: None,
            registration_patience: DEFAULT_REGISTRATION_PATIENCE,
        };
        assert_eq!(
            options.dra_socket(),
            PathBuf::from("/plugins/vgpu.hami.io/dra.sock")
        );
        assert_eq!(
            options.registration_socket(),
            PathBuf::from("/var/lib/kubelet/plugins_registry/vgpu.hami.io-reg.sock")
        );
        options.rolling_update_uid = Some("6f1c".into());
        assert_eq!(
            options.dra_socket(),
            PathBuf::from("/plugins/vgpu.hami.io/dra-6f1c.sock")
        );
        assert_eq!(
            options.registration_socket(),
            PathBuf::from("/var/lib/kubelet/plugins_registry/vgpu.hami.io-6f1c-reg.sock")
        );
        // The kubelet dials the socket by its own view of the directory.
        assert_eq!(
            options.kubelet_endpoint(),
            PathBuf::from("/var/lib/kubelet/plugins/vgpu.hami.io/dra-6f1c.sock")
        );
    }

    #[test]
    fn a_deep_kubelet_root_gets_socket_names_with_a_shortened_uid() {
        // CI's kubelet root: the whole pod UID made the registration socket 109 bytes, which
        // the kubelet cannot dial, and the chart's plugin was never registered.
        let root = "/check/work/main/.cluster/kubelet";
        let uid = "81fd30db-3502-4222-b415-bbb942aa06f5";
        let options = Options {
            driver_name: "vgpu.hami.io".into(),
            node_name: "n1".into(),
            plugin_dir: format!("{root}/plugins/vgpu.hami.io").into(),
            kubelet_plugin_dir: format!("{root}/plugins/vgpu.hami.io").into(),
            registrar_dir: format!("{root}/plugins_registry").into(),
            rolling_update_uid: Some(uid.into()),
            healthcheck_addr: None,
            registration_patience: DEFAULT_REGISTRATION_PATIENCE,
        };
        assert!(
            format!("{root}/plugins_registry/vgpu.hami.io-{uid}-reg.sock").len() > MAX_SOCKET_PATH
        );
        assert_eq!(
            options.registration_socket(),
            PathBuf::from(format!(
                "{root}/plugins_registry/vgpu.hami.io-81fd30db-reg.sock"
            ))
        );
        assert_eq!(
            options.dra_socket(),
            PathBuf::from(format!("{root}/plugins/vgpu.hami.io/dra-81fd30db.sock"))
        );
        assert_eq!(options.kubelet_endpoint(), options.dra_socket());
        // Under /var/lib/kubelet the whole UID fits and is kept.
        let shallow = Options {
            plugin_dir: "/var/lib/kubelet/plugins/vgpu.hami.io".into(),
            kubelet_plugin_dir: "/var/lib/kubelet/plugins/vgpu.hami.io".into(),
            registrar_dir: "/var/lib/kubelet/plugins_registry".into(),
            ..options
        };
        assert_eq!(
            shallow.registration_socket(),
            PathBuf::from(format!(
                "/var/lib/kubelet/plugins_registry/vgpu.hami.io-{uid}-reg.sock"
            ))
        );
    }
}
