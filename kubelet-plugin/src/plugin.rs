//! Wiring: discovery → state → publisher, preparer → the kubelet helper's sockets, metrics;
//! and an orderly stop that removes the sockets.

use crate::discovery::{DiscoveryError, GpuSource, GpuState};
use crate::driver::VgpuDriver;
use crate::metrics::Metrics;
use crate::prepare::devnodes::DeviceNodes;
use crate::prepare::{PrepareConfig, PrepareError, Preparer};
use crate::publish::{self, PublishError, Publisher};
use dra::ApiVersion;
use dra::kubeletplugin::{Helper, HelperError, Options};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub use dra::kubeletplugin::{KUBELET_PLUGINS_DIR, KUBELET_REGISTRY_DIR};

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
    /// This instance's unique id (the pod UID) when instances may overlap during a rolling
    /// update: per-instance socket names and a plugin directory locked per operation.
    /// `None`: the only instance, which locks the plugin directory for its whole life.
    pub rolling_update_uid: Option<String>,
    /// Where the kubelet's `grpc:` probes reach the health service (TCP); `None`: not served.
    pub healthcheck_addr: Option<std::net::SocketAddr>,
    /// How long to wait for the kubelet's registration before offering the socket again.
    pub registration_patience: Duration,
}

/// Why the plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Gpus(#[from] DiscoveryError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Kubelet(#[from] HelperError),
    #[error(transparent)]
    Discovery(#[from] dra::DiscoveryError),
    // No #[source] here nor below: the cause is in the message once, with what to do about it.
    #[error(
        "Node {node:?} not found: --node-name/NODE_NAME must be the name of this node as the API \
         server knows it (the chart sets it from spec.nodeName)"
    )]
    NodeNotFound { node: String },
    #[error(
        "{flag} {path}: {error}: it must be a directory this plugin can write; the DaemonSet \
         must mount the host's {host} there (hostPath)"
    )]
    Directory {
        flag: &'static str,
        path: PathBuf,
        host: PathBuf,
        error: std::io::Error,
    },
}

/// Fail at start, naming the flag and the host path to mount, when a directory the plugin
/// writes cannot be created or written (not mounted, read-only, permission denied), instead
/// of a bare I/O error from deep inside whatever touches it first.
fn check_directory(flag: &'static str, path: &Path, host: &Path) -> Result<(), PluginError> {
    let err = |error| PluginError::Directory {
        flag,
        path: path.to_path_buf(),
        host: host.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    // An unnamed temporary file: writable or not, and nothing is left even if killed here.
    tempfile::tempfile_in(path).map_err(err)?;
    Ok(())
}

/// A started plugin.
pub struct Running {
    stop: watch::Sender<bool>,
    kubelet: Helper,
    publisher: tokio::task::JoinHandle<()>,
    metrics_server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub gpus: GpuState,
    pub preparer: Arc<Preparer>,
    pub metrics: Metrics,
    pub api_version: ApiVersion,
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

    let api_version = dra::version::discover(&client).await?;
    tracing::info!(api = api_version.as_str(), "resource.k8s.io version chosen");
    // Before anything is written on the host: a wrong node name is the likeliest mistake.
    let publisher = Publisher::new(
        client.clone(),
        &cfg.driver,
        &cfg.node,
        api_version,
        cfg.taint_unhealthy,
        cfg.sharing_mode,
    )
    .await
    .map_err(|e| match e {
        PublishError::Api { source, .. } if source.is_not_found() => PluginError::NodeNotFound {
            node: cfg.node.clone(),
        },
        e => PluginError::Publish(e),
    })?;
    check_directory(
        "--plugin-dir/PLUGIN_DIR",
        &cfg.plugin_dir,
        &cfg.kubelet_plugin_dir,
    )?;
    check_directory(
        "--registrar-dir/REGISTRAR_DIR",
        &cfg.registrar_dir,
        Path::new(KUBELET_REGISTRY_DIR),
    )?;
    check_directory("--cdi-root/CDI_ROOT", &cfg.cdi_root, &cfg.cdi_root)?;

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
        let shared = cfg.rolling_update_uid.is_some();
        tokio::task::spawn_blocking(move || {
            if shared {
                Preparer::open_shared(prepare_cfg, gpus)
            } else {
                Preparer::open(prepare_cfg, gpus)
            }
        })
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
    let metrics = {
        let preparer = preparer.clone();
        Metrics::with_usage(crate::usage::UsageCollector::new(move || {
            preparer.watched()
        }))
    };
    metrics.set_prepared_claims(preparer.prepared_count());
    metrics.set_gpu_health(&gpus.current());

    let publisher = tokio::spawn(publish::run(
        publisher,
        gpus.clone(),
        metrics.clone(),
        cfg.resync,
        stop_rx.clone(),
    ));

    let kubelet = Helper::start(
        Arc::new(VgpuDriver::new(
            preparer.clone(),
            metrics.clone(),
            gpus.clone(),
            &cfg.node,
        )),
        client,
        api_version,
        Options {
            driver_name: cfg.driver.clone(),
            node_name: cfg.node.clone(),
            plugin_dir: cfg.plugin_dir.clone(),
            kubelet_plugin_dir: cfg.kubelet_plugin_dir.clone(),
            registrar_dir: cfg.registrar_dir.clone(),
            rolling_update_uid: cfg.rolling_update_uid.clone(),
            healthcheck_addr: cfg.healthcheck_addr,
            registration_patience: cfg.registration_patience,
        },
    )
    .await;
    let kubelet = match kubelet {
        Ok(k) => k,
        Err(e) => {
            let _ = stop.send(true);
            return Err(e.into());
        }
    };
    // The registration gauge follows the kubelet's verdicts until the plugin stops.
    let mut verdicts = kubelet.registration();
    let registered = metrics.clone();
    let mut registration_stop = stop_rx.clone();
    tokio::spawn(async move {
        loop {
            let now = *verdicts.borrow_and_update() == dra::kubeletplugin::Verdict::Registered;
            registered.set_registered(now);
            tokio::select! {
                changed = verdicts.changed() => if changed.is_err() { break },
                _ = registration_stop.wait_for(|stopped| *stopped) => break,
            }
        }
        registered.set_registered(false);
    });
    let metrics_server = metrics_listener.map(|listener| {
        let rendered = metrics.clone();
        // Ready once serving the kubelet, which is when start returns.
        let endpoint = dra::http::Endpoint::new(move || rendered.encode(), || true);
        let mut stop_rx = stop_rx;
        tokio::spawn(endpoint.serve(listener, async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
        }))
    });
    Ok(Running {
        stop,
        kubelet,
        publisher,
        metrics_server,
        gpus,
        preparer,
        metrics,
        api_version,
    })
}

impl Running {
    /// The plugin's metrics, as its endpoint renders them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where the TCP gRPC health endpoint listens, if it is served.
    pub fn healthcheck_addr(&self) -> Option<std::net::SocketAddr> {
        self.kubelet.healthcheck_addr()
    }

    /// Stop serving and remove the sockets.
    pub async fn shutdown(self) -> Result<(), PluginError> {
        let _ = self.stop.send(true);
        let kubelet = self.kubelet.shutdown().await;
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
        Ok(kubelet?)
    }
}
