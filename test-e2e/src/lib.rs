//! End-to-end tests against a real Kubernetes cluster: the one `hack/cluster/up.sh` runs on this
//! machine (real kube-apiserver, kube-scheduler, kube-controller-manager, kubelet and
//! containerd), with our kubelet plugin and controller running beside it as host processes under
//! their ServiceAccounts' credentials.
//!
//! `hack/e2e.sh 1.34` (or 1.32) brings the cluster up, runs this suite and tears it down. The
//! tests need the cluster: without one they fail, they never skip.

pub mod helm;
pub mod install;
pub mod kubectl;
pub mod local;

pub use helm::Helm;
pub use install::{Installation, SecondNode, SharingMode};
pub use kubectl::{Cluster, Namespace};
pub use local::LocalCluster;

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
