//! The cluster as an admin drives it: through `kubectl` (the one built with the cluster).

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::local::LocalCluster;

/// A reachable cluster and the kubeconfig to reach it with.
#[derive(Clone)]
pub struct Cluster {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    pub local: LocalCluster,
}

impl Cluster {
    /// The local cluster, as its admin. Panics when it does not answer: these tests need it.
    pub fn connect() -> Cluster {
        let local = LocalCluster::get();
        let cluster = Cluster {
            kubectl: local.kubectl(),
            kubeconfig: local.kubeconfig(),
            local,
        };
        if let Err(e) = cluster.run(&["version", "-o", "json", "--request-timeout=10s"]) {
            panic!("the local cluster does not answer: {e}");
        }
        cluster
    }

    /// The same cluster as another user (a ServiceAccount's kubeconfig).
    pub fn as_user(&self, kubeconfig: PathBuf) -> Cluster {
        Cluster {
            kubeconfig,
            ..self.clone()
        }
    }

    fn output(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl.display()));
        let mut pipe = child.stdin.take().expect("piped");
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        child.wait_with_output().expect("kubectl runs")
    }

    /// Run kubectl; stdout on success, stderr on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        finish(args, self.output(args, None))
    }

    /// Run kubectl with `input` on stdin.
    pub fn run_with_input(&self, args: &[&str], input: &str) -> Result<String, String> {
        finish(args, self.output(args, Some(input)))
    }

    /// `kubectl apply -f -` of `manifest` in `namespace`.
    pub fn apply(&self, namespace: &str, manifest: &str) {
        self.run_with_input(&["apply", "-n", namespace, "-f", "-"], manifest)
            .unwrap_or_else(|e| panic!("{e}\nmanifest:\n{manifest}"));
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

    /// Poll `check` until it returns `Some`; panic naming `what` once `timeout` passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Option<T>,
    ) -> T {
        self.wait_or_explain(what, timeout, check, String::new)
    }

    /// [`Cluster::wait_for`], with what `explain` gathers (logs, object states) in the panic.
    pub fn wait_or_explain<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Option<T>,
        explain: impl FnOnce() -> String,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check() {
                return value;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    explain()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A fresh namespace, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Namespace<'_> {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = self.run(&[
            "delete",
            "namespace",
            &name,
            "--wait=true",
            "--timeout=120s",
        ]);
        self.run(&["create", "namespace", &name])
            .expect("create namespace");
        // Pods need the namespace's default ServiceAccount, which the controller-manager adds.
        self.wait_for(
            "the namespace's default ServiceAccount",
            Duration::from_secs(60),
            || {
                self.run(&["get", "serviceaccount", "default", "-n", &name])
                    .ok()
            },
        );
        Namespace {
            cluster: self,
            name,
        }
    }
}

fn finish(args: &[&str], out: Output) -> Result<String, String> {
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

/// A test namespace; deleted, with everything in it, when dropped (waiting, so that the next
/// test starts from freed capacity).
pub struct Namespace<'a> {
    cluster: &'a Cluster,
    pub name: String,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        // The examples' shells ignore SIGTERM: do not wait out their 30 s grace period.
        let _ = self.cluster.run(&[
            "delete",
            "pods",
            "--all",
            "-n",
            &self.name,
            "--grace-period=1",
            "--wait=false",
        ]);
        let _ = self.cluster.run(&[
            "delete",
            "namespace",
            &self.name,
            "--wait=true",
            "--timeout=120s",
        ]);
    }
}
