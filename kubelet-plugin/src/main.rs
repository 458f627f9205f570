//! `kubelet-plugin`: the node agent (DaemonSet) of the vGPU DRA driver.

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kubelet_plugin::discovery::{GpuSource, fake::FakeSource, nvml::NvmlSource};
use kubelet_plugin::plugin::{self, PluginConfig};
use kubelet_plugin::publish::SharingMode;
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
        .context("connecting to the API server")?;
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
    };
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?;
    let running = plugin::start(cfg, client, source, Some(listener)).await?;

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    running.shutdown().await?;
    tracing::info!("stopped; sockets removed");
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    dra::logging::init(args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "kubelet-plugin failed");
            eprintln!("kubelet-plugin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
