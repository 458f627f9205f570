//! `kubelet-plugin`: the node agent (DaemonSet) of the vGPU DRA driver.

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kubelet_plugin::discovery::{GpuSource, fake::FakeSource, nvml::NvmlSource};
use kubelet_plugin::plugin::{self, PluginConfig};
use kubelet_plugin::publish::SharingMode;
use kubelet_plugin::uninstall;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SharingModeArg {
    Controller,
    Native,
}

/// Publishes this node's NVIDIA GPUs as DRA ResourceSlices, registers with the kubelet and
/// prepares claims of GPU slices as CDI specs enforced by HAMi-core.
#[derive(Debug, Parser)]
#[command(name = "kubelet-plugin", version)]
struct Args {
    /// DRA driver name: spec.driver of the published slices and results[].driver of the claims it prepares.
    #[arg(long, env = "DRIVER_NAME", default_value = vgpu_driver::DEFAULT_DRIVER_NAME)]
    driver_name: String,

    /// Name of the Node this plugin runs on (pool name and spec.nodeName of its slices), usually from the downward API.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// Kubeconfig file to reach the API server; the in-cluster service account is used when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Describe the node's GPUs with this YAML inventory instead of asking NVML (clusters without GPUs, demos, tests).
    #[arg(long, env = "FAKE_GPUS", value_name = "FILE")]
    fake_gpus: Option<PathBuf>,

    /// Directory the container runtime reads CDI specs from; one spec per prepared claim is written here.
    #[arg(long, env = "CDI_ROOT", default_value = "/var/run/cdi")]
    cdi_root: PathBuf,

    /// Plugin data directory (DRA socket, checkpoint, per-claim directories); default /var/lib/kubelet/plugins/<driver-name>.
    #[arg(long, env = "PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,

    /// The plugin data directory as the kubelet sees it, when it is mounted elsewhere in this container; default --plugin-dir.
    #[arg(long, env = "KUBELET_PLUGIN_DIR")]
    kubelet_plugin_dir: Option<PathBuf>,

    /// Kubelet plugin registry directory, where <driver-name>-reg.sock is created once the DRA socket is served.
    #[arg(long, env = "REGISTRAR_DIR", default_value = plugin::KUBELET_REGISTRY_DIR)]
    registrar_dir: PathBuf,

    /// Host path of the HAMi-core enforcement library that is mounted read-only and preloaded into every sliced container.
    #[arg(
        long,
        env = "ENFORCEMENT_LIBRARY",
        default_value = "/usr/local/vgpu/libvgpu.so"
    )]
    enforcement_library: PathBuf,

    /// Host root below which dev/nvidia* and proc/devices are read for device-node numbers (set when the host is mounted elsewhere).
    #[arg(long, env = "DEV_ROOT", default_value = "/")]
    dev_root: PathBuf,

    /// Address of the Prometheus /metrics endpoint (prepare/unprepare counts and latency, published devices, GPU health).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9402")]
    metrics_addr: SocketAddr,

    /// Publish unhealthy GPUs with a NoSchedule device taint instead of removing them (needs the DRADeviceTaints feature gate).
    #[arg(long, env = "TAINT_UNHEALTHY", default_value_t = false)]
    taint_unhealthy: bool,

    /// Who allocates GPU slices: the vgpu controller (any 1.32+ cluster) or the kube-scheduler
    /// itself with DRA consumable capacity (1.34+ with the DRAConsumableCapacity gate; falls
    /// back to controller, with a Warning Event on the Node, where the cluster drops its fields).
    #[arg(long, env = "SHARING_MODE", value_enum, default_value = "controller")]
    sharing_mode: SharingModeArg,

    /// This instance's unique id, the pod UID from the downward API (metadata.uid): lets a new
    /// instance start beside the old one during a rolling update (maxSurge; kubelet 1.33+),
    /// each with its own socket names. Without it the plugin must be alone on the node.
    #[arg(long, env = "POD_UID")]
    rolling_update_uid: Option<String>,

    /// TCP port of the gRPC health service (grpc.health.v1) for the kubelet's grpc probes;
    /// SERVING while the DRA and registration sockets are served (liveness), and for the
    /// service "kubelet-registration" only while the kubelet has registered the plugin
    /// (readiness). 0 turns it off.
    #[arg(long, env = "HEALTHCHECK_PORT", default_value_t = 51515)]
    healthcheck_port: u16,

    /// Seconds to wait for the kubelet to register the plugin before its registration socket
    /// is offered again (the wait doubles each time, up to 300 s); also after a rejection.
    #[arg(long, env = "REGISTRATION_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    registration_timeout: u64,

    /// Name of this plugin's DaemonSet: on SIGTERM, a DaemonSet that is gone or being deleted
    /// means an uninstall, and the plugin removes its files from the host (needs --namespace).
    #[arg(long, env = "DAEMONSET_NAME", requires = "namespace")]
    daemonset_name: Option<String>,

    /// Namespace of this plugin's pod and DaemonSet, usually from the downward API.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,

    /// Log format: human-readable text or one JSON object per line (stderr; colour only on a terminal).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    log_format: dra::logging::LogFormat,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let source = match &args.fake_gpus {
        Some(path) => GpuSource::Fake(FakeSource::new(path, Duration::from_secs(2))),
        None => GpuSource::Nvml(NvmlSource::init()?),
    };
    let client = dra::connect::client(args.kubeconfig.as_deref())
        .await
        .map_err(connect_hint)?;
    let plugin_dir = args
        .plugin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(plugin::KUBELET_PLUGINS_DIR).join(&args.driver_name));
    let cfg = PluginConfig {
        driver: args.driver_name.clone(),
        node: args.node_name.clone(),
        cdi_root: args.cdi_root.clone(),
        kubelet_plugin_dir: args
            .kubelet_plugin_dir
            .clone()
            .unwrap_or_else(|| plugin_dir.clone()),
        plugin_dir,
        registrar_dir: args.registrar_dir.clone(),
        enforcement_library: args.enforcement_library.clone(),
        dev_root: args.dev_root.clone(),
        taint_unhealthy: args.taint_unhealthy,
        sharing_mode: match args.sharing_mode {
            SharingModeArg::Controller => SharingMode::Controller,
            SharingModeArg::Native => SharingMode::Native,
        },
        resync: Duration::from_secs(300),
        rolling_update_uid: args.rolling_update_uid.clone(),
        registration_patience: Duration::from_secs(args.registration_timeout),
        healthcheck_addr: (args.healthcheck_port != 0)
            .then(|| SocketAddr::from(([0, 0, 0, 0], args.healthcheck_port))),
    };
    let host_files = uninstall::HostFiles {
        plugin_dir: cfg.plugin_dir.clone(),
        registration_socket: dra::kubeletplugin::Options {
            driver_name: cfg.driver.clone(),
            node_name: cfg.node.clone(),
            plugin_dir: cfg.plugin_dir.clone(),
            kubelet_plugin_dir: cfg.kubelet_plugin_dir.clone(),
            registrar_dir: cfg.registrar_dir.clone(),
            rolling_update_uid: cfg.rolling_update_uid.clone(),
            healthcheck_addr: None,
            registration_patience: cfg.registration_patience,
        }
        .registration_socket(),
        enforcement_library: cfg.enforcement_library.clone(),
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?;
    // Installed before the sockets appear: a SIGTERM while starting (the kubelet can see the
    // plugin, so the pod may be deleted) is then handled after the start, with the uninstall
    // check, instead of killing the process.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let daemonset = match (&args.daemonset_name, &args.namespace) {
        (Some(name), Some(namespace)) => Some(uninstall::DaemonSetWatch::start(
            client.clone(),
            namespace,
            name,
        )),
        _ => None,
    };
    let running = plugin::start(cfg, client.clone(), source, Some(listener)).await?;
    let preparer = running.preparer.clone();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    running.shutdown().await?;
    tracing::info!("stopped; sockets removed");
    if let (Some(name), Some(namespace), Some(watch)) =
        (&args.daemonset_name, &args.namespace, &daemonset)
    {
        let fresh = uninstall::daemonset_state(client, namespace, name).await;
        let state = uninstall::decide(&watch.last(), &fresh);
        // Waits for the directory lock: off the async workers.
        let (plan, removal) =
            tokio::task::spawn_blocking(move || uninstall::run(&preparer, &state, &host_files))
                .await
                .context("the uninstall check panicked")?
                .context("deciding whether this stop is an uninstall")?;
        match plan {
            uninstall::Plan::Keep(uninstall::KeepReason::DaemonSetPresent) => {
                tracing::info!(daemonset = %name, "the DaemonSet remains: host files kept for the next instance")
            }
            uninstall::Plan::Keep(uninstall::KeepReason::Unknown(why)) => {
                tracing::warn!(daemonset = %name, error = %why, "cannot tell whether this is an uninstall: host files kept")
            }
            uninstall::Plan::Keep(uninstall::KeepReason::ClaimsPrepared(claims)) => {
                tracing::warn!(daemonset = %name, ?claims, "uninstall with claims still prepared on this node: host files kept, since their pods still use the enforcement library; remove them by hand once those pods are gone")
            }
            uninstall::Plan::Remove(_) => {
                for path in &removal.removed {
                    tracing::info!(path = %path.display(), "uninstall: removed from the host");
                }
                for (path, error) in &removal.failed {
                    tracing::warn!(path = %path.display(), %error, "uninstall: could not remove");
                }
            }
        }
    }
    Ok(())
}

/// The API-server connection error once, with what to set; without duplicating the chain.
fn connect_hint(e: dra::connect::ConnectError) -> anyhow::Error {
    match e {
        dra::connect::ConnectError::Infer(inner) => anyhow::anyhow!(
            "no Kubernetes API configuration: {inner}. In a pod, the service account token \
             must be mounted (automountServiceAccountToken) and KUBERNETES_SERVICE_HOST/\
             KUBERNETES_SERVICE_PORT set; elsewhere pass --kubeconfig/KUBECONFIG"
        ),
        dra::connect::ConnectError::Kubeconfig { path, source } => {
            anyhow::anyhow!("--kubeconfig/KUBECONFIG {path} cannot be used: {source}")
        }
        e => anyhow::anyhow!("connecting to the API server: {e}"),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    dra::logging::init(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Once, as the message: a field would escape its quotes in text logs.
            tracing::error!("kubelet-plugin failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
