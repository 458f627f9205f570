//! The Helm chart as an admin drives it: the `helm` hack/helm.sh builds from its Go module,
//! against the local cluster's admin kubeconfig.

use std::path::PathBuf;
use std::process::Command;

use crate::kubectl::Cluster;
use crate::local::repo;

/// `helm` for the local cluster.
pub struct Helm {
    binary: PathBuf,
    kubeconfig: PathBuf,
}

impl Helm {
    /// The binary named by `HELM` (hack/e2e.sh exports it), else the one hack/helm.sh builds
    /// (and caches). Panics when neither works: the chart's test needs it.
    pub fn new(cluster: &Cluster) -> Helm {
        let binary = match std::env::var_os("HELM") {
            Some(path) => PathBuf::from(path),
            None => {
                let out = Command::new(repo().join("hack/helm.sh"))
                    .output()
                    .expect("run hack/helm.sh");
                assert!(
                    out.status.success(),
                    "hack/helm.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        Helm {
            binary,
            kubeconfig: cluster.local.kubeconfig(),
        }
    }

    /// The chart in the repository.
    pub fn chart() -> String {
        repo().join("deploy/helm/vgpu-dra").display().to_string()
    }

    /// Runs helm; stdout on success, the command and its stderr on failure.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "helm {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }
}
