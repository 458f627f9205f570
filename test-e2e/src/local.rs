//! The cluster `hack/cluster/up.sh` started: where its files are (from `cluster.env`) and its
//! processes, which the tests stop and restart the way an operator or a crash would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The local cluster, as described by the `cluster.env` that up.sh wrote.
#[derive(Debug, Clone)]
pub struct LocalCluster {
    env: BTreeMap<String, String>,
}

impl LocalCluster {
    /// The cluster named by `VGPU_CLUSTER_ENV` (a cluster.env path), else the one in the
    /// repository's `.cluster/` (or /tmp/vgpu-dra-cluster, where up.sh puts it when the
    /// repository's path is too long for sockets). Panics, with what to run, when there is none: these tests need
    /// a cluster and never skip.
    pub fn get() -> LocalCluster {
        // up.sh's default places (hack/cluster/versions.sh, cluster_dir).
        let path = std::env::var_os("VGPU_CLUSTER_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let in_repo = repo().join(".cluster/cluster.env");
                let short = PathBuf::from("/tmp/vgpu-dra-cluster/cluster.env");
                if !in_repo.exists() && short.exists() {
                    short
                } else {
                    in_repo
                }
            });
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "no local cluster ({}: {e}); run `hack/e2e.sh 1.34`, or `hack/cluster/up.sh 1.34` \
                 before `cargo test -p test-e2e -- --test-threads=1`",
                path.display()
            )
        });
        let env = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LocalCluster { env }
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("cluster.env has no {key}"))
    }

    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.var(key))
    }

    /// "1.32" or "1.34".
    pub fn release(&self) -> &str {
        self.var("K8S_RELEASE")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.path("KUBECONFIG")
    }
    pub fn kubectl(&self) -> PathBuf {
        self.path("KUBECTL")
    }
    pub fn node(&self) -> &str {
        self.var("NODE_NAME")
    }
    /// The second node (a kubelet with its own containerd), where a plugin runs only in the
    /// tests that need a second GPU node.
    pub fn node_b(&self) -> &str {
        self.var("NODE_B_NAME")
    }
    pub fn kubelet_root_b(&self) -> PathBuf {
        self.path("KUBELET_ROOT_B")
    }
    pub fn cdi_root_b(&self) -> PathBuf {
        self.path("CDI_ROOT_B")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.path("KUBELET_ROOT")
    }
    pub fn cdi_root(&self) -> PathBuf {
        self.path("CDI_ROOT")
    }
    /// Where pods reach the API server (`host:port`): there is no kube-proxy to route the
    /// kubernetes Service, so in-cluster clients are pointed here.
    pub fn api_server_pod_address(&self) -> &str {
        self.var("API_SERVER_POD_ADDRESS")
    }
    pub fn dir(&self) -> PathBuf {
        self.path("CLUSTER_DIR")
    }
    pub fn log_file(&self, name: &str) -> PathBuf {
        self.path("LOG_DIR").join(format!("{name}.log"))
    }
    fn launcher(&self, name: &str) -> PathBuf {
        self.path("LAUNCH_DIR").join(name)
    }
    fn pid_file(&self, name: &str) -> PathBuf {
        self.path("PID_DIR").join(name)
    }

    /// Whether containerd runs the task of container `id` (a pod status's containerID without
    /// its `containerd://`): what the node runs, asked without the kubelet.
    pub fn container_running(&self, id: &str) -> bool {
        let out = Command::new(self.var("CTR"))
            .args([
                "--address",
                self.var("CONTAINERD_SOCKET"),
                "-n",
                "k8s.io",
                "tasks",
                "ls",
            ])
            .output()
            .expect("ctr runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
    }

    /// The text `name` has logged so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_file(name)).unwrap_or_default()
    }

    /// The pid of process `name` (a cluster component or one of ours), if it runs.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // A zombie or a reused pid is not the process: its state must not be Z and it must be
        // the session leader up.sh or we started.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
        (fields.first() != Some(&"Z") && fields.get(3) == Some(&pid.to_string().as_str()))
            .then_some(pid)
    }

    /// Writes the launcher of one of our processes: `program args...` with `env`, logging to
    /// logs/NAME.log, in a session of its own whose leader's pid goes to pids/NAME (so that
    /// `hack/cluster/down.sh` stops it too).
    pub fn write_launcher(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) {
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let mut script = format!("#!/bin/sh\n# Starts {name} as the end-to-end tests do.\n");
        for (k, v) in env {
            script += &format!("export {k}={}\n", quote(v));
        }
        script += "setsid ";
        script += &quote(&program.display().to_string());
        for a in args {
            script += " ";
            script += &quote(a);
        }
        script += &format!(
            " >>{} 2>&1 </dev/null &\necho $! > {}\n",
            quote(&self.log_file(name).display().to_string()),
            quote(&self.pid_file(name).display().to_string())
        );
        let path = self.launcher(name);
        std::fs::write(&path, script).expect("write launcher");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Starts `name` with its launcher (written by up.sh or [`Self::write_launcher`]).
    pub fn start(&self, name: &str) {
        let status = Command::new(self.launcher(name))
            .status()
            .unwrap_or_else(|e| panic!("cannot run the launcher of {name}: {e}"));
        assert!(status.success(), "launcher of {name} failed: {status}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pid(name).is_none() {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs `name` and everything in its session, as a crash or an OOM kill would, and
    /// waits until it is gone.
    pub fn kill(&self, name: &str) {
        let Some(pid) = self.pid(name) else {
            panic!("{name} is not running");
        };
        // The negative pid names the process group, which the session leader leads.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pid(name).is_some() {
            assert!(
                Instant::now() < deadline,
                "{name} (pid {pid}) survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to `name` and waits for it to exit (a graceful stop, as for an upgrade).
    pub fn stop(&self, name: &str) {
        let Some(pid) = self.pid(name) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.pid(name).is_some() {
            if Instant::now() > deadline {
                self.kill(name);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-e2e lives in the repository")
        .to_path_buf()
}
