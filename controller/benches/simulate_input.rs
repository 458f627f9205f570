//! Writes the mixed cluster-scale workload of the engine bench (`cluster/mod.rs`) as a
//! `controller simulate -f` input, to time the simulator end to end:
//!
//! ```sh
//! cargo bench -p controller --bench simulate_input -- /tmp/mixed.yaml [nodes] [claims]
//! /usr/bin/time -v target/release/controller simulate -f /tmp/mixed.yaml
//! # the same objects as one JSON List (`kubectl get -o json`):
//! cargo bench -p controller --bench simulate_input -- /tmp/mixed.json [nodes] [claims]
//! ```

mod cluster;

use std::process::ExitCode;

fn main() -> ExitCode {
    // cargo bench passes `--bench` ahead of the arguments given after `--`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(path) = args.first() else {
        eprintln!("usage: simulate_input PATH [NODES] [CLAIMS]");
        return ExitCode::FAILURE;
    };
    let number = |i: usize, default: usize| {
        args.get(i)
            .map_or(Ok(default), |a| a.parse::<usize>())
            .map_err(|e| format!("{}: {e}", args[i]))
    };
    let (nodes, claims) = match (number(1, 1000), number(2, 20_000)) {
        (Ok(n), Ok(c)) => (n, c),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // A `.json` path gets one List, as `kubectl get -o json` writes it.
    let text = if path.ends_with(".json") {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List",
            "items": cluster::objects(nodes, claims)});
        list.to_string()
    } else {
        cluster::yaml(nodes, claims)
    };
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("writing {path}: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!("wrote {nodes} nodes and {claims} claims with their pods to {path}");
    ExitCode::SUCCESS
}
