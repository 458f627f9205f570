//! End-to-end tests against the cluster in `KUBECONFIG`, driven through `kubectl` the way an
//! admin would. Every test first asks [`Cluster::connect`]; without a reachable cluster it
//! prints why and returns, so `cargo test --workspace` stays green on machines without one.
//!
//! Set up a cluster with `hack/kind/cluster.sh 1.34` (or 1.32), then run
//! `cargo test -p test-e2e -- --test-threads=1`.

use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A reachable cluster.
pub struct Cluster {
    kubectl: String,
}

impl Cluster {
    /// The cluster in `KUBECONFIG`, or `None` (with the reason printed) when there is none.
    pub fn connect() -> Option<Cluster> {
        if std::env::var_os("KUBECONFIG").is_none() {
            eprintln!(
                "skipping end-to-end test: KUBECONFIG is not set (create a cluster with hack/kind/cluster.sh)"
            );
            return None;
        }
        let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
        let cluster = Cluster { kubectl };
        match cluster.run(&["version", "-o", "json", "--request-timeout=5s"]) {
            Ok(_) => Some(cluster),
            Err(e) => {
                eprintln!(
                    "skipping end-to-end test: the cluster in KUBECONFIG does not answer: {e}"
                );
                None
            }
        }
    }

    fn output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl));
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("kubectl runs")
    }

    /// Run kubectl; stdout on success, stderr on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        self.finish(args, self.output(args, None))
    }

    /// Run kubectl with `input` on stdin.
    pub fn run_with_input(&self, args: &[&str], input: &str) -> Result<String, String> {
        self.finish(args, self.output(args, Some(input)))
    }

    fn finish(&self, args: &[&str], out: Output) -> Result<String, String> {
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.run(&all)?;
        serde_json::from_str(&text)
            .map_err(|e| format!("kubectl get {}: not JSON: {e}", args.join(" ")))
    }

    /// Poll `check` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// A fresh namespace, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Namespace<'_> {
        let name = format!("{prefix}-{}", std::process::id());
        self.run(&["create", "namespace", &name])
            .expect("create namespace");
        Namespace {
            cluster: self,
            name,
        }
    }
}

/// A test namespace; deleted (without waiting) on drop.
pub struct Namespace<'a> {
    cluster: &'a Cluster,
    pub name: String,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .run(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// The environment of a running container, as `env` prints it.
pub fn parse_env(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_parsing() {
        let env = super::parse_env("A=1\nCUDA_DEVICE_SM_LIMIT=30\nnoise\nB=x=y\n");
        assert_eq!(env["CUDA_DEVICE_SM_LIMIT"], "30");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env.len(), 3);
    }
}
