//! Wiring: discovery → state → publisher, preparer → gRPC sockets, metrics; and an orderly
//! stop that removes the sockets.

use crate::discovery::{DiscoveryError, GpuSource, GpuState};
use crate::grpc::{self, DraCore, DraService, Registrar, SocketPaths};
use crate::metrics::Metrics;
use crate::prepare::devnodes::DeviceNodes;
use crate::prepare::{PrepareConfig, PrepareError, Preparer};
use crate::publish::{self, PublishError, Publisher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use vgpu_driver::slice::ApiVersion;

/// Default kubelet plugin data directory root (`<root>/<driver>`).
pub const KUBELET_PLUGINS_DIR: &str = "/var/lib/kubelet/plugins";
/// Default kubelet plugin registry directory.
pub const KUBELET_REGISTRY_DIR: &str = "/var/lib/kubelet/plugins_registry";
/// File name of the DRA socket in the plugin directory.
pub const DRA_SOCKET: &str = "dra.sock";

/// Everything the plugin needs to know; the binary fills it from flags.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    pub driver: String,
    pub node: String,
    pub cdi_root: PathBuf,
    /// Checkpoint, claim directories and the DRA socket live here.
    pub plugin_dir: PathBuf,
    /// The same directory as the kubelet sees it (for the registered endpoint).
    pub kubelet_plugin_dir: PathBuf,
    pub registrar_dir: PathBuf,
    pub enforcement_library: PathBuf,
    /// Host root for /dev and /proc/devices.
    pub dev_root: PathBuf,
    pub taint_unhealthy: bool,
    /// Who allocates slices: the vgpu controller, or the kube-scheduler natively (1.34+).
    pub sharing_mode: crate::publish::SharingMode,
    /// Safety-net republish interval.
    pub resync: Duration,
}

/// Why the plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Socket(#[from] vgpu_proto::uds::UdsError),
    #[error("the gRPC server stopped before it was ready")]
    NotReady,
}

/// A started plugin.
pub struct Running {
    stop: watch::Sender<bool>,
    grpc: tokio::task::JoinHandle<Result<(), vgpu_proto::uds::UdsError>>,
    publisher: tokio::task::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
    pub gpus: GpuState,
    pub preparer: Arc<Preparer>,
    pub metrics: Metrics,
    pub api_version: ApiVersion,
    pub sockets: SocketPaths,
}

/// Start the plugin. Returns once both sockets are served and the first publish was started.
pub async fn start(
    cfg: PluginConfig,
    client: kube::Client,
    source: GpuSource,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<Running, PluginError> {
    let (stop, stop_rx) = watch::channel(false);
    let snapshot = source.discover()?;
    tracing::info!(
        gpus = snapshot.gpus.len(),
        unhealthy = snapshot.unhealthy.len(),
        "discovered GPUs"
    );
    let gpus = GpuState::new(snapshot);
    source.spawn_health_watcher(gpus.clone(), stop_rx.clone());

    let api_version = publish::discover_api_version(&client).await?;
    tracing::info!(api = api_version.as_str(), "resource.k8s.io version chosen");

    let prepare_cfg = PrepareConfig {
        driver: cfg.driver.clone(),
        node: cfg.node.clone(),
        cdi_root: cfg.cdi_root.clone(),
        plugin_dir: cfg.plugin_dir.clone(),
        enforcement_library: cfg.enforcement_library.clone(),
        device_nodes: DeviceNodes::under_root(&cfg.dev_root),
    };
    if !cfg.enforcement_library.is_file() {
        tracing::warn!(
            path = %cfg.enforcement_library.display(),
            "the enforcement library is missing: sliced claims will be refused until it is installed"
        );
    }
    let preparer = {
        let gpus = gpus.clone();
        tokio::task::spawn_blocking(move || Preparer::open(prepare_cfg, gpus))
            .await
            .map_err(|e| {
                PluginError::Prepare(PrepareError::Io {
                    op: "reconcile",
                    path: cfg.plugin_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            })??
    };
    let (preparer, report) = preparer;
    tracing::info!(removed = ?report.removed, rewritten = ?report.rewritten, "reconciled CDI specs with the checkpoint");
    let preparer = Arc::new(preparer);
    let metrics = Metrics::new();
    metrics.set_prepared_claims(preparer.prepared().len());
    metrics.set_gpu_health(&gpus.current());

    let publisher = Publisher::new(
        client.clone(),
        &cfg.driver,
        &cfg.node,
        api_version,
        cfg.taint_unhealthy,
        cfg.sharing_mode,
    )
    .await?;
    let publisher = tokio::spawn(publish::run(
        publisher,
        gpus.clone(),
        metrics.clone(),
        cfg.resync,
        stop_rx.clone(),
    ));

    let sockets = SocketPaths {
        dra: cfg.plugin_dir.join(DRA_SOCKET),
        registration: grpc::registration_socket(&cfg.registrar_dir, &cfg.driver),
    };
    let registrar = Registrar {
        driver: cfg.driver.clone(),
        endpoint: cfg
            .kubelet_plugin_dir
            .join(DRA_SOCKET)
            .display()
            .to_string(),
    };
    let core = DraCore::new(
        client,
        api_version,
        &cfg.driver,
        &cfg.node,
        preparer.clone(),
        metrics.clone(),
    );
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let grpc = {
        let sockets = sockets.clone();
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            grpc::serve(
                &sockets,
                DraService(Arc::new(core)),
                registrar,
                move || {
                    let _ = ready_tx.send(());
                },
                stop_rx,
            )
            .await
        })
    };
    if ready_rx.await.is_err() {
        let _ = stop.send(true);
        return match grpc.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(PluginError::NotReady),
        };
    }
    let metrics_server = metrics_listener.map(|l| tokio::spawn(metrics.clone().serve(l, stop_rx)));
    Ok(Running {
        stop,
        grpc,
        publisher,
        metrics_server,
        gpus,
        preparer,
        metrics,
        api_version,
        sockets,
    })
}

impl Running {
    /// Stop serving and remove the sockets.
    pub async fn shutdown(self) -> Result<(), PluginError> {
        let _ = self.stop.send(true);
        let grpc = self.grpc.await;
        // A sync stuck on an unresponsive API server must not hold the stop; syncs are
        // idempotent, so cutting one short is harmless.
        let mut publisher = self.publisher;
        if tokio::time::timeout(Duration::from_secs(5), &mut publisher)
            .await
            .is_err()
        {
            publisher.abort();
        }
        if let Some(m) = self.metrics_server {
            let _ = m.await;
        }
        match grpc {
            Ok(r) => r.map_err(PluginError::from),
            Err(_) => Err(PluginError::NotReady),
        }
    }
}
