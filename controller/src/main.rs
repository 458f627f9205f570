//! `controller`: the vgpu allocator. `controller simulate` runs its engine without a cluster.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use controller::engine::Policies;
use controller::simulate::{self, default, input, report};
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
}

#[derive(Subcommand)]
enum Command {
    /// Run the allocator on a described cluster and workload, without an API server, and print
    /// where every claim would go.
    Simulate {
        /// Kubernetes YAML with Nodes, ResourceSlices, DeviceClasses, ResourceClaims,
        /// ResourceClaimTemplates and Pods (several documents); the embedded default without it.
        #[arg(short = 'f', long = "filename")]
        file: Option<std::path::PathBuf>,
        /// table: usage per node and GPU; yaml or json: the claims with status.allocation.
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
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
        /// Print the embedded default cluster and workload as YAML and exit.
        #[arg(long)]
        print_default: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            file,
            output,
            node_policy,
            gpu_policy,
            topology,
            driver_name,
            print_default,
        } => {
            if print_default {
                print!("{}", default::yaml());
                return Ok(());
            }
            let text = match &file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => default::yaml(),
            };
            let workload = input::parse(&text).with_context(|| match &file {
                Some(path) => format!("in {}", path.display()),
                None => "in the embedded default".into(),
            })?;
            let policies = Policies {
                node: node_policy.into(),
                gpu: gpu_policy.into(),
                topology: topology.into(),
            };
            let sim = simulate::run(&driver_name, workload, policies);
            match output {
                Output::Table => print!("{}", report::table(&sim)),
                Output::Yaml => {
                    for claim in sim.claim_objects() {
                        print!("---\n{}", serde_yaml_ng::to_string(&claim)?);
                    }
                }
                Output::Json => {
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": sim.claim_objects()});
                    println!("{}", serde_json::to_string_pretty(&list)?);
                }
            }
            Ok(())
        }
    }
}
