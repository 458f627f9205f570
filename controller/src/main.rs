//! `controller`: the vgpu allocator. `controller simulate` runs its engine without a cluster.

// jemalloc rather than glibc's malloc: the controller holds about a million small strings,
// vectors and maps in its views, and jemalloc's size classes carry no header per allocation. At
// 1,000 nodes × 8 GPUs with 20,000 claims its peak RSS is 199 MiB against 231 MiB
// (BENCHMARKS.md, memory model of `controller run`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Two arenas instead of four per CPU: one reconcile loop and a few watches allocate, and every
// arena keeps free memory of its own. `_RJEM_MALLOC_CONF` still overrides it at run time.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 10] = b"narenas:2\0";

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use controller::engine::{Mode, Policies};
use controller::run;
use controller::simulate::{self, default, input, report, svg};
use std::io::Write;
use vgpu_driver::config::{Policy, Topology};

#[derive(Parser)]
#[command(
    name = "controller",
    version,
    about = "Allocates GPU slices to ResourceClaims of the vgpu DeviceClasses"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Controller,
    Native,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Controller => Mode::Controller,
            ModeArg::Native => Mode::Native,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Binpack,
    Spread,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Policy {
        match p {
            PolicyArg::Binpack => Policy::Binpack,
            PolicyArg::Spread => Policy::Spread,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TopologyArg {
    Required,
    Preferred,
    None,
}

impl From<TopologyArg> for Topology {
    fn from(t: TopologyArg) -> Topology {
        match t {
            TopologyArg::Required => Topology::Required,
            TopologyArg::Preferred => Topology::Preferred,
            TopologyArg::None => Topology::None,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
    /// A picture of every GPU's memory and core fill (with --compare: two runs side by side).
    Svg,
}

/// The second run of `simulate --compare`: the first run's settings with these overrides.
#[derive(Clone, Default)]
struct Compare {
    node: Option<PolicyArg>,
    gpu: Option<PolicyArg>,
    topology: Option<TopologyArg>,
    mode: Option<ModeArg>,
}

/// `node=spread,gpu=binpack,topology=required,mode=native`, any subset, at least one.
fn parse_compare(value: &str) -> Result<Compare, String> {
    use clap::ValueEnum;
    fn one<T: ValueEnum>(key: &str, v: &str) -> Result<T, String> {
        T::from_str(v, true).map_err(|_| {
            let allowed: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|x| x.to_possible_value().map(|p| p.get_name().to_string()))
                .collect();
            format!("{key}={v}: expected one of {}", allowed.join(", "))
        })
    }
    let mut c = Compare::default();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected KEY=VALUE (node, gpu, topology or mode)"))?;
        match key {
            "node" => c.node = Some(one(key, v)?),
            "gpu" => c.gpu = Some(one(key, v)?),
            "topology" => c.topology = Some(one(key, v)?),
            "mode" => c.mode = Some(one(key, v)?),
            other => {
                return Err(format!(
                    "{other:?}: not a setting to compare (node, gpu, topology or mode)"
                ));
            }
        }
    }
    if c.node.is_none() && c.gpu.is_none() && c.topology.is_none() && c.mode.is_none() {
        return Err("nothing to compare: give node=, gpu=, topology= or mode=".into());
    }
    Ok(c)
}

#[derive(Subcommand)]
enum Command {
    /// Allocate pending ResourceClaims of the GPU-slice DeviceClasses in a cluster.
    Run {
        /// The driver whose devices are allocated.
        #[arg(long, env = "DRIVER_NAME", default_value = vgpu_driver::DEFAULT_DRIVER_NAME)]
        driver_name: String,
        /// Path of a kubeconfig; in-cluster configuration (or ~/.kube/config) without it.
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<std::path::PathBuf>,
        /// Prefer the most used node that fits (binpack) or the least used (spread).
        #[arg(long, env = "NODE_POLICY", value_enum, default_value = "binpack")]
        node_policy: PolicyArg,
        /// Prefer the most used GPU of the node (binpack) or the least used (spread).
        #[arg(long, env = "GPU_POLICY", value_enum, default_value = "spread")]
        gpu_policy: PolicyArg,
        /// How claims of several GPUs want them connected, unless a claim says otherwise.
        #[arg(long, env = "TOPOLOGY_POLICY", value_enum, default_value = "preferred")]
        topology: TopologyArg,
        /// Namespace of the leader-election Lease (the controller's own namespace).
        #[arg(long, env = "POD_NAMESPACE", default_value = "vgpu-system")]
        leader_election_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, env = "LEADER_ELECTION_ID", default_value = "vgpu-controller")]
        leader_election_id: String,
        /// How long a standby waits after the leader's last renewal before taking over
        /// (e.g. 15s, 1500ms).
        #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
        leader_election_lease_duration: std::time::Duration,
        /// How long the leader keeps allocating after its last successful renewal; shorter
        /// than the lease duration, so two replicas never write at once.
        #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
        leader_election_renew_deadline: std::time::Duration,
        /// How often replicas try to acquire or renew the Lease.
        #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
        leader_election_retry_period: std::time::Duration,
        /// Run without leader election (only ever one replica).
        #[arg(long, env = "DISABLE_LEADER_ELECTION")]
        disable_leader_election: bool,
        /// This replica's identity in the Lease and in Events.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Where to serve Prometheus metrics (/metrics), /healthz and /readyz (ready once the
        /// watch caches are synced).
        #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
        metrics_addr: std::net::SocketAddr,
        /// Log format: human-readable text or one JSON object per line (stderr; colour only
        /// on a terminal).
        #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
        log_format: dra::logging::LogFormat,
    },
    /// Run the allocator on a described cluster and workload, without an API server, and print
    /// where every claim would go.
    Simulate {
        /// Kubernetes YAML with Nodes, ResourceSlices, DeviceClasses, ResourceClaims,
        /// ResourceClaimTemplates and Pods (several documents), or the same as JSON (`kubectl
        /// get -o json`, read faster); the embedded default without it.
        #[arg(short = 'f', long = "filename")]
        file: Option<std::path::PathBuf>,
        /// table: usage per node and GPU; yaml or json: the claims with status.allocation;
        /// svg: a picture of every GPU's memory and core fill.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
        /// Run the same cluster and workload a second time with these settings changed
        /// (e.g. `node=spread,gpu=binpack`, `mode=native`) and show both: side by side with
        /// `-o svg`, as a second summary line with `-o table`.
        #[arg(long, value_parser = parse_compare)]
        compare: Option<Compare>,
        /// Prefer the most used node that fits (binpack) or the least used (spread).
        #[arg(long, env = "NODE_POLICY", value_enum, default_value = "binpack")]
        node_policy: PolicyArg,
        /// Prefer the most used GPU of the node (binpack) or the least used (spread).
        #[arg(long, env = "GPU_POLICY", value_enum, default_value = "spread")]
        gpu_policy: PolicyArg,
        /// How claims of several GPUs want them connected, unless a claim says otherwise.
        #[arg(long, env = "TOPOLOGY_POLICY", value_enum, default_value = "preferred")]
        topology: TopologyArg,
        /// The driver whose devices are allocated.
        #[arg(long, env = "DRIVER_NAME", default_value = vgpu_driver::DEFAULT_DRIVER_NAME)]
        driver_name: String,
        /// Who places the slices: this controller with its policies, or the kube-scheduler's
        /// own allocator (native DRA consumable capacity, 1.34+), to compare the two.
        #[arg(long, value_enum, default_value = "controller")]
        mode: ModeArg,
        /// Print the embedded default cluster and workload as YAML and exit.
        #[arg(long)]
        print_default: bool,
    },
}

/// A duration flag: `15s`, `1500ms`, `1m`.
fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration (e.g. 15s, 1500ms): {e}"))
}

/// Writes a command's output to stdout. A reader that stops early (`| head`) closes the pipe:
/// that ends the output quietly, as it does for any Unix tool, instead of failing.
fn emit(write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            driver_name,
            kubeconfig,
            node_policy,
            gpu_policy,
            topology,
            leader_election_namespace,
            leader_election_id,
            leader_election_lease_duration,
            leader_election_renew_deadline,
            leader_election_retry_period,
            disable_leader_election,
            identity,
            metrics_addr,
            log_format,
        } => {
            dra::logging::init(log_format);
            let identity = match identity {
                Some(i) => i,
                None => std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| format!("vgpu-controller-{}", std::process::id())),
            };
            let mut options = run::Options::new(&driver_name, &identity);
            options.policies = Policies {
                node: node_policy.into(),
                gpu: gpu_policy.into(),
                topology: topology.into(),
            };
            let timing = run::leader::LeaseTiming {
                lease_duration: leader_election_lease_duration,
                renew_deadline: leader_election_renew_deadline,
                retry_period: leader_election_retry_period,
            };
            timing.validate().context("leader election timing")?;
            options.leader_election = (!disable_leader_election).then_some(run::LeaderElection {
                namespace: leader_election_namespace,
                lease_name: leader_election_id,
                timing,
            });
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                let client = dra::connect::client(kubeconfig.as_deref()).await?;
                let metrics = std::sync::Arc::new(run::metrics::Metrics::new());
                let controller = run::Controller::new(client, options, metrics.clone());
                let synced = controller.synced();
                let endpoint = dra::http::Endpoint::new(
                    move || metrics.render(),
                    move || synced.load(std::sync::atomic::Ordering::SeqCst),
                );
                let listener = tokio::net::TcpListener::bind(metrics_addr)
                    .await
                    .with_context(|| format!("serving metrics on {metrics_addr}"))?;
                tracing::info!(bound = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
                let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
                let server = tokio::spawn(endpoint.serve(listener, async {
                    let _ = server_stopped.await;
                }));
                // The kubelet stops a pod with SIGTERM; a terminal with SIGINT.
                let mut term = tokio::signal::unix::signal(
                    tokio::signal::unix::SignalKind::terminate(),
                )
                .context("installing the SIGTERM handler")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                    }
                };
                let result = controller.run(shutdown).await;
                let _ = stop_server.send(());
                // A scraper holding its connection open must not keep the process alive.
                let drained = tokio::time::timeout(std::time::Duration::from_secs(5), server);
                if let Ok(Ok(Err(e))) = drained.await {
                    tracing::warn!(error = %e, "the metrics endpoint failed");
                }
                result?;
                Ok::<(), anyhow::Error>(())
            })
        }
        Command::Simulate {
            file,
            output,
            node_policy,
            gpu_policy,
            topology,
            driver_name,
            mode,
            print_default,
            compare,
        } => {
            if print_default {
                return emit(|out| out.write_all(default::yaml().as_bytes()));
            }
            let text = match &file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => default::yaml(),
            };
            let parse = || {
                input::parse(&text).with_context(|| match &file {
                    Some(path) => format!("in {}", path.display()),
                    None => "in the embedded default".into(),
                })
            };
            let policies = Policies {
                node: node_policy.into(),
                gpu: gpu_policy.into(),
                topology: topology.into(),
            };
            let sim = simulate::run(&driver_name, parse()?, policies, mode.into());
            let other = match &compare {
                None => None,
                Some(_) if matches!(output, Output::Yaml | Output::Json) => {
                    anyhow::bail!(
                        "--compare shows two runs with -o table or -o svg, not -o yaml|json"
                    )
                }
                Some(c) => {
                    let policies = Policies {
                        node: c.node.unwrap_or(node_policy).into(),
                        gpu: c.gpu.unwrap_or(gpu_policy).into(),
                        topology: c.topology.unwrap_or(topology).into(),
                    };
                    let mode = c.mode.unwrap_or(mode).into();
                    Some(simulate::run(&driver_name, parse()?, policies, mode))
                }
            };
            if let (Output::Table, Some(other)) = (output, &other) {
                return emit(|out| {
                    out.write_all(report::table(&sim).as_bytes())?;
                    writeln!(
                        out,
                        "\nCOMPARED WITH {}\n{}",
                        svg::title(other),
                        report::summary_line(&report::summary(other))
                    )
                });
            }
            match output {
                Output::Table => emit(|out| out.write_all(report::table(&sim).as_bytes())),
                Output::Yaml => emit(|out| {
                    for claim in sim.claim_objects() {
                        let text =
                            serde_yaml_ng::to_string(&claim).map_err(std::io::Error::other)?;
                        write!(out, "---\n{text}")?;
                    }
                    Ok(())
                }),
                Output::Json => emit(|out| {
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": sim.claim_objects()});
                    serde_json::to_writer_pretty(&mut *out, &list)?;
                    writeln!(out)
                }),
                Output::Svg => {
                    let runs: Vec<&simulate::Simulation> =
                        std::iter::once(&sim).chain(other.as_ref()).collect();
                    emit(|out| out.write_all(svg::render(&runs).as_bytes()))
                }
            }
        }
    }
}
