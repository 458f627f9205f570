//! Our driver installed on the local cluster the way the shipped manifests install it, except
//! that the two binaries run as host processes (no image registry here): the shipped Namespace,
//! ServiceAccounts, RBAC, admission policy and DeviceClasses are applied, and the plugin and
//! the controller reach the API server with tokens of their ServiceAccounts, so the shipped RBAC
//! and the admission policy are what is checked.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kubectl::Cluster;
use crate::local::repo;

pub const DRIVER: &str = "vgpu.hami.io";
pub const NAMESPACE: &str = "vgpu-system";
pub const PLUGIN: &str = "vgpu-kubelet-plugin";
/// The plugin of the second node, when a test runs one.
pub const PLUGIN_B: &str = "vgpu-kubelet-plugin-b";
pub const CONTROLLER: &str = "vgpu-controller";

/// Who allocates GPU slices (the plugin's --sharing-mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingMode {
    Controller,
    Native,
}

impl SharingMode {
    fn flag(self) -> &'static str {
        match self {
            SharingMode::Controller => "controller",
            SharingMode::Native => "native",
        }
    }
}

/// The installation on the local cluster.
pub struct Installation {
    pub cluster: Cluster,
    /// Kubeconfig of the plugin's ServiceAccount, its token bound to this node.
    pub plugin_kubeconfig: PathBuf,
    /// Kubeconfig of the controller's ServiceAccount.
    pub controller_kubeconfig: PathBuf,
}

impl Installation {
    /// Installs (idempotently) and makes sure the plugin runs in `mode`, registered with the
    /// kubelet and its slices published, and the controller runs.
    pub fn ensure(mode: SharingMode) -> Installation {
        let cluster = Cluster::connect();
        let local = &cluster.local;
        apply_shipped_manifests(&cluster);
        let dir = local.dir().join("vgpu");
        std::fs::create_dir_all(&dir).unwrap();
        let plugin_kubeconfig = dir.join("plugin.kubeconfig");
        let controller_kubeconfig = dir.join("controller.kubeconfig");
        let install = Installation {
            plugin_kubeconfig,
            controller_kubeconfig,
            cluster: cluster.clone(),
        };
        // A running process is reused only in the same mode and from the same build.
        let plugin_build = format!("{} {}", mode.flag(), build_id("kubelet-plugin"));
        let plugin_file = dir.join("plugin.build");
        if local.pid(PLUGIN).is_none()
            || std::fs::read_to_string(&plugin_file).unwrap_or_default() != plugin_build
        {
            local.stop(PLUGIN);
            install.write_plugin_launcher(mode);
            std::fs::write(&plugin_file, plugin_build).unwrap();
            install.start_plugin();
        }
        let controller_build = build_id("controller");
        let controller_file = dir.join("controller.build");
        if local.pid(CONTROLLER).is_none()
            || std::fs::read_to_string(&controller_file).unwrap_or_default() != controller_build
        {
            local.stop(CONTROLLER);
            install.write_controller_launcher();
            std::fs::write(&controller_file, controller_build).unwrap();
            local.start(CONTROLLER);
        }
        install
    }

    /// Starts the plugin and waits until the kubelet has registered it and its slices are
    /// published.
    pub fn start_plugin(&self) {
        self.start_plugin_named(PLUGIN, self.cluster.local.node());
    }

    fn start_plugin_named(&self, name: &str, node: &str) {
        let local = &self.cluster.local;
        let before = self.registrations(name);
        local.start(name);
        self.cluster.wait_for(
            &format!("the kubelet of {node} to register {name} (its log: \"registered with the kubelet\")"),
            Duration::from_secs(60),
            || (self.registrations(name) > before).then_some(()),
        );
        self.cluster.wait_for(
            &format!("the ResourceSlices of {node}"),
            Duration::from_secs(60),
            || (!self.slices_of(node).is_empty()).then_some(()),
        );
    }

    /// How often plugin process `name` has been told by its kubelet that it is registered
    /// (NotifyRegistrationStatus, which the plugin logs).
    pub fn registrations(&self, name: &str) -> usize {
        self.cluster
            .local
            .log(name)
            .matches("registered with the kubelet")
            .count()
    }

    /// Runs a plugin (controller mode) on the second node too, as the DaemonSet would on a
    /// second GPU node, until the guard drops; then stops it and removes that node's slices.
    pub fn second_gpu_node(&self) -> SecondNode<'_> {
        let local = &self.cluster.local;
        let node = local.node_b().to_string();
        let kubeconfig = local.dir().join("vgpu/plugin-b.kubeconfig");
        let token = self.token(
            PLUGIN,
            &["--bound-object-kind", "Node", "--bound-object-name", &node],
        );
        write_kubeconfig(&self.cluster, &kubeconfig, &token);
        self.write_plugin_launcher_for(
            PLUGIN_B,
            &node,
            &kubeconfig,
            &local.kubelet_root_b(),
            &local.cdi_root_b(),
            "127.0.0.1:19403",
            SharingMode::Controller,
        );
        self.start_plugin_named(PLUGIN_B, &node);
        SecondNode {
            install: self,
            node,
        }
    }

    /// This node's ResourceSlices of our driver.
    pub fn slices(&self) -> Vec<Value> {
        self.slices_of(self.cluster.local.node())
    }

    /// The ResourceSlices of our driver on `node`.
    pub fn slices_of(&self, node: &str) -> Vec<Value> {
        self.cluster
            .get_json(&["resourceslices"])
            .map(|l| l["items"].as_array().cloned().unwrap_or_default())
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s["spec"]["driver"] == DRIVER && s["spec"]["nodeName"] == node)
            .collect()
    }

    fn binary(name: &str) -> PathBuf {
        // Where cargo put them: CI keeps its target directory outside the work tree.
        let dir = std::env::var_os("VGPU_BIN_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(|t| repo().join(t).join("debug")))
            .unwrap_or_else(|| repo().join("target/debug"));
        let path = dir.join(name);
        assert!(
            path.is_file(),
            "{} is missing: build it first (cargo build -p kubelet-plugin -p controller -p libvgpu), \
             or set VGPU_BIN_DIR",
            path.display()
        );
        path
    }

    fn write_plugin_launcher(&self, mode: SharingMode) {
        let local = &self.cluster.local;
        let token = self.token(
            PLUGIN,
            &[
                "--bound-object-kind",
                "Node",
                "--bound-object-name",
                local.node(),
            ],
        );
        write_kubeconfig(&self.cluster, &self.plugin_kubeconfig, &token);
        self.write_plugin_launcher_for(
            PLUGIN,
            local.node(),
            &self.plugin_kubeconfig,
            &local.kubelet_root(),
            &local.cdi_root(),
            "127.0.0.1:19402",
            mode,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn write_plugin_launcher_for(
        &self,
        name: &str,
        node: &str,
        kubeconfig: &Path,
        kubelet_root: &Path,
        cdi_root: &Path,
        metrics: &str,
        mode: SharingMode,
    ) {
        let local = &self.cluster.local;
        // The library goes where a node's installer puts it; containers mount it from there.
        let library = local.dir().join("vgpu/libvgpu.so");
        std::fs::copy(Self::binary("libvgpu.so"), &library).expect("copy libvgpu.so");
        let fake_gpus = repo().join("deploy/helm/vgpu-dra/files/fake-gpus.yaml");
        let s = |p: &Path| p.display().to_string();
        local.write_launcher(
            name,
            &Self::binary("kubelet-plugin"),
            &[],
            &[
                ("NODE_NAME", node),
                ("KUBECONFIG", &s(kubeconfig)),
                ("FAKE_GPUS", &s(&fake_gpus)),
                ("CDI_ROOT", &s(cdi_root)),
                ("PLUGIN_DIR", &s(&kubelet_root.join("plugins").join(DRIVER))),
                ("REGISTRAR_DIR", &s(&kubelet_root.join("plugins_registry"))),
                ("ENFORCEMENT_LIBRARY", &s(&library)),
                ("METRICS_ADDR", metrics),
                // Both nodes' plugins run on this one host: each its own health port.
                ("HEALTHCHECK_PORT", &health_port(metrics)),
                ("SHARING_MODE", mode.flag()),
                ("RUST_LOG", "info"),
            ],
        );
    }

    fn write_controller_launcher(&self) {
        let local = &self.cluster.local;
        let token = self.token(CONTROLLER, &[]);
        write_kubeconfig(&self.cluster, &self.controller_kubeconfig, &token);
        local.write_launcher(
            CONTROLLER,
            &Self::binary("controller"),
            &["run".to_string()],
            &[
                (
                    "KUBECONFIG",
                    &self.controller_kubeconfig.display().to_string(),
                ),
                ("POD_NAMESPACE", NAMESPACE),
                ("POD_NAME", "vgpu-controller-e2e"),
                ("METRICS_ADDR", "127.0.0.1:18080"),
                // Short leases so a killed controller's successor takes over within seconds.
                ("LEADER_ELECTION_LEASE_DURATION", "4s"),
                ("LEADER_ELECTION_RENEW_DEADLINE", "3s"),
                ("LEADER_ELECTION_RETRY_PERIOD", "1s"),
                ("RUST_LOG", "info"),
            ],
        );
    }

    /// A token of ServiceAccount `name` in vgpu-system (12 h).
    pub fn token(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["create", "token", name, "-n", NAMESPACE, "--duration=12h"];
        args.extend_from_slice(extra);
        self.cluster
            .run(&args)
            .unwrap_or_else(|e| panic!("token for {name}: {e}"))
            .trim()
            .to_string()
    }
}

/// The gRPC health port of a host-process plugin: ten above its metrics port.
fn health_port(metrics: &str) -> String {
    let port: u16 = metrics
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("metrics address {metrics} has no port"));
    (port + 10).to_string()
}

/// Identifies a build of binary `name`: its size and modification time.
fn build_id(name: &str) -> String {
    let meta = std::fs::metadata(Installation::binary(name)).expect("binary metadata");
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {modified}", meta.len())
}

/// A plugin running on the second node; stopped, and its slices removed, when dropped.
pub struct SecondNode<'a> {
    install: &'a Installation,
    pub node: String,
}

impl Drop for SecondNode<'_> {
    fn drop(&mut self) {
        self.install.cluster.local.stop(PLUGIN_B);
        // A stopped plugin leaves its slices (the GPUs stay usable for running pods); this
        // node stops being a GPU node for the tests that follow: remove them.
        let _ = self.install.cluster.run(&[
            "delete",
            "resourceslices",
            "--field-selector",
            &format!("spec.nodeName={}", self.node),
        ]);
    }
}

/// A kubeconfig for `token` against the local cluster's API server.
pub fn write_kubeconfig(cluster: &Cluster, path: &Path, token: &str) {
    let dir = cluster.local.dir();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa}}\ncurrent-context: local\n",
        dir.join("pki/ca.crt").display()
    );
    std::fs::write(path, text).expect("write kubeconfig");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The shipped manifests for this release (deploy/manifests, the Helm chart rendered), without
/// the objects that need our images (the DaemonSet and Deployment, whose processes run on the
/// host here, their Services and the controller's PodDisruptionBudget).
fn apply_shipped_manifests(cluster: &Cluster) {
    let manifest = match cluster.local.release() {
        "1.32" => "deploy/manifests/vgpu-dra-1.32.yaml",
        _ => "deploy/manifests/vgpu-dra-native.yaml",
    };
    let rendered = std::fs::read_to_string(repo().join(manifest))
        .unwrap_or_else(|e| panic!("{manifest}: {e}"));
    let list = cluster
        .run_with_input(
            &["create", "--dry-run=client", "-o", "json", "-f", "-"],
            &rendered,
        )
        .expect("parse the shipped manifests");
    // One JSON object per manifest, one after the other.
    let items: Vec<Value> = serde_json::Deserializer::from_str(&list)
        .into_iter::<Value>()
        .map(|o| o.expect("kubectl prints JSON objects"))
        .collect::<Vec<_>>()
        .into_iter()
        .filter(|o| {
            !matches!(
                o["kind"].as_str(),
                Some("DaemonSet" | "Deployment" | "Service" | "PodDisruptionBudget")
            )
        })
        .collect();
    assert!(
        items
            .iter()
            .any(|o| o["kind"] == "ValidatingAdmissionPolicy")
            && items.iter().any(|o| o["kind"] == "DeviceClass")
            && items.iter().any(|o| o["kind"] == "ClusterRole"),
        "{manifest} lost its RBAC, admission policy or DeviceClasses"
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    cluster
        .run_with_input(&["apply", "-f", "-"], &list.to_string())
        .expect("apply the shipped manifests");
}
