//! The test harness: the plugin running in-process against the fake API server, with its
//! own temporary plugin, registry and CDI directories, and the kubelet's side as tonic
//! clients over the real Unix sockets.
#![allow(dead_code)]

use fake_apiserver::{DraVersions, FakeApiServer, Gvr};
use k8s_openapi::api::core::v1::Node;
use kubelet_plugin::discovery::GpuSource;
use kubelet_plugin::discovery::fake::FakeSource;
use kubelet_plugin::plugin::{self, PluginConfig, Running};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vgpu_proto::dra::{v1, v1beta1};
use vgpu_proto::uds;

pub const DRIVER: &str = "vgpu.hami.io";
pub const NODE: &str = "node-a";
/// The nvidia-uvm major the tests' /proc/devices announces.
pub const UVM_MAJOR: i64 = 511;

pub fn example(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name),
    )
    .unwrap()
}

pub struct Harness {
    pub server: FakeApiServer,
    pub dir: tempfile::TempDir,
    pub dra: DraVersions,
    pub node_uid: String,
}

impl Harness {
    /// A node `node-a` on a server of the given DRA versions, with `inventory` as fake GPUs.
    pub async fn new(dra: DraVersions, inventory: &str) -> Harness {
        let server = FakeApiServer::start_with_builtin(dra).await.unwrap();
        let mut node = Node::default();
        node.metadata.name = Some(NODE.into());
        let node = server.put(&node).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inventory.yaml"), inventory).unwrap();
        std::fs::write(dir.path().join("libvgpu.so"), b"fake enforcement library\n").unwrap();
        std::fs::create_dir_all(dir.path().join("host/dev")).unwrap();
        std::fs::create_dir_all(dir.path().join("host/proc")).unwrap();
        std::fs::write(
            dir.path().join("host/proc/devices"),
            format!("Character devices:\n195 nvidia-frontend\n{UVM_MAJOR} nvidia-uvm\n\nBlock devices:\n"),
        )
        .unwrap();
        Harness {
            server,
            node_uid: node.metadata.uid.unwrap(),
            dir,
            dra,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PluginConfig {
        PluginConfig {
            driver: DRIVER.into(),
            node: NODE.into(),
            cdi_root: self.path("cdi"),
            plugin_dir: self.path("plugins/vgpu.hami.io"),
            kubelet_plugin_dir: PathBuf::from("/var/lib/kubelet/plugins/vgpu.hami.io"),
            registrar_dir: self.path("plugins_registry"),
            enforcement_library: self.path("libvgpu.so"),
            dev_root: self.path("host"),
            taint_unhealthy: false,
            sharing_mode: kubelet_plugin::publish::SharingMode::Controller,
            resync: Duration::from_secs(600),
            rolling_update_uid: None,
            healthcheck_addr: None,
            registration_patience: dra::kubeletplugin::DEFAULT_REGISTRATION_PATIENCE,
        }
    }

    /// The `kubelet-plugin` binary's flags for this harness's directories and fake GPUs.
    pub fn binary_args(&self, kubeconfig: &Path) -> Vec<std::ffi::OsString> {
        let cfg = self.config();
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        for (flag, value) in [
            ("--kubeconfig", kubeconfig.to_path_buf()),
            ("--fake-gpus", self.path("inventory.yaml")),
            ("--cdi-root", cfg.cdi_root),
            ("--plugin-dir", cfg.plugin_dir),
            ("--registrar-dir", cfg.registrar_dir),
            ("--enforcement-library", cfg.enforcement_library),
            ("--dev-root", cfg.dev_root),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        // Not the default port: tests run in parallel, on machines that may run other plugins.
        args.extend(["--healthcheck-port".into(), "0".into()]);
        args
    }

    pub async fn start(&self) -> Running {
        self.start_with(self.config()).await
    }

    pub async fn start_with(&self, cfg: PluginConfig) -> Running {
        let source = GpuSource::Fake(FakeSource::new(
            self.path("inventory.yaml"),
            Duration::from_millis(25),
        ));
        plugin::start(cfg, self.server.client(), source, None)
            .await
            .unwrap()
    }

    pub fn dra_socket(&self) -> PathBuf {
        self.path("plugins/vgpu.hami.io/dra.sock")
    }

    pub fn registration_socket(&self) -> PathBuf {
        self.path("plugins_registry/vgpu.hami.io-reg.sock")
    }

    pub async fn v1(&self) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
        v1::dra_plugin_client::DraPluginClient::new(uds::connect(self.dra_socket()).await.unwrap())
    }

    /// NodePrepareResources over v1 on a new connection, as the kubelet sends it.
    pub async fn prepare_v1(&self, claims: Vec<v1::Claim>) -> v1::NodePrepareResourcesResponse {
        self.v1()
            .await
            .node_prepare_resources(v1::NodePrepareResourcesRequest { claims })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn v1beta1(
        &self,
    ) -> v1beta1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
        v1beta1::dra_plugin_client::DraPluginClient::new(
            uds::connect(self.dra_socket()).await.unwrap(),
        )
    }

    fn resource_version(&self) -> &'static str {
        match self.dra {
            DraVersions::V1beta1Only => "v1beta1",
            _ => "v1",
        }
    }

    pub fn claims_gvr(&self) -> Gvr {
        Gvr::new("resource.k8s.io", self.resource_version(), "resourceclaims")
    }

    pub fn slices_gvr(&self) -> Gvr {
        Gvr::new("resource.k8s.io", self.resource_version(), "resourceslices")
    }

    /// Store an allocated claim as the scheduler would leave it; returns its UID.
    pub fn put_claim(&self, claim: &ClaimSpec) -> String {
        let stored = self
            .server
            .put_object(self.claims_gvr(), claim.to_json(self.resource_version()))
            .unwrap();
        stored["metadata"]["uid"].as_str().unwrap().to_string()
    }

    pub fn delete_claim(&self, name: &str) {
        self.server
            .delete_object(self.claims_gvr(), "ml", name)
            .unwrap();
    }

    /// Our slices as stored.
    pub fn slices(&self) -> Vec<Value> {
        self.server.list(self.slices_gvr())
    }

    /// Poll `cond` every 20 ms for up to 10 s.
    pub async fn eventually(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rewrite the inventory file (the plugin polls it).
    pub fn write_inventory(&self, text: &str) {
        std::fs::write(self.path("inventory.yaml"), text).unwrap();
    }
}

/// One allocation result.
#[derive(Clone, Debug)]
pub struct Result_ {
    pub request: String,
    pub device: String,
    pub pool: String,
    pub admin: bool,
    pub share_id: Option<String>,
    /// consumedCapacity (memory, cores) of a native share.
    pub consumed: Option<(String, String)>,
}

/// A claim as allocated by the scheduler.
#[derive(Clone, Debug)]
pub struct ClaimSpec {
    pub name: String,
    pub requests: Vec<String>,
    pub results: Vec<Result_>,
    /// (source, requests, parameters) of this driver's configs.
    pub config: Vec<(String, Vec<String>, Value)>,
    pub node: String,
    pub allocated: bool,
}

pub fn slice_params(memory: &str, cores: u32) -> Value {
    json!({"apiVersion": "vgpu.hami.io/v1alpha1", "kind": "GpuSliceConfig", "memory": memory, "cores": cores})
}

impl ClaimSpec {
    /// A claim `name` with request `gpu` allocated `devices` on node-a, sliced by a class
    /// config of `memory`/`cores`.
    pub fn sliced(name: &str, devices: &[&str], memory: &str, cores: u32) -> ClaimSpec {
        ClaimSpec {
            name: name.into(),
            requests: vec!["gpu".into()],
            results: devices
                .iter()
                .map(|d| Result_ {
                    request: "gpu".into(),
                    device: d.to_string(),
                    pool: NODE.into(),
                    admin: false,
                    share_id: None,
                    consumed: None,
                })
                .collect(),
            config: vec![("FromClass".into(), vec![], slice_params(memory, cores))],
            node: NODE.into(),
            allocated: true,
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        let requests: Vec<Value> = self
            .requests
            .iter()
            .map(|r| {
                if version == "v1" {
                    json!({"name": r, "exactly": {"deviceClassName": "vgpu-slice"}})
                } else {
                    json!({"name": r, "deviceClassName": "vgpu-slice"})
                }
            })
            .collect();
        let results: Vec<Value> = self
            .results
            .iter()
            .map(|r| {
                let mut v = json!({"request": r.request, "driver": DRIVER, "pool": r.pool, "device": r.device});
                if r.admin {
                    v["adminAccess"] = json!(true);
                }
                if let Some(s) = &r.share_id {
                    v["shareID"] = json!(s);
                }
                if let Some((memory, cores)) = &r.consumed {
                    v["consumedCapacity"] = json!({"memory": memory, "cores": cores});
                }
                v
            })
            .collect();
        let mut config: Vec<Value> = self
            .config
            .iter()
            .map(|(source, requests, parameters)| {
                json!({"source": source, "requests": requests, "opaque": {"driver": DRIVER, "parameters": parameters}})
            })
            .collect();
        // Another driver's parameters ride along and must be ignored.
        config.push(json!({"source": "FromClass", "opaque": {"driver": "net.example.com", "parameters": {"anything": true}}}));
        let mut claim = json!({
            "apiVersion": format!("resource.k8s.io/{version}"),
            "kind": "ResourceClaim",
            "metadata": {"name": self.name, "namespace": "ml"},
            "spec": {"devices": {"requests": requests}},
        });
        if self.allocated {
            claim["status"] = json!({"allocation": {
                "devices": {"results": results, "config": config},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [self.node]}
                ]}]}
            }});
        }
        claim
    }
}

pub fn v1_claim(uid: &str, name: &str) -> v1::Claim {
    v1::Claim {
        namespace: "ml".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

pub fn v1beta1_claim(uid: &str, name: &str) -> v1beta1::Claim {
    v1beta1::Claim {
        namespace: "ml".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

/// The official CDI JSON schemas (`../shared/cdi-schema/<version>`), compiled once per call.
pub fn cdi_schema_errors(version: &str, doc: &Value) -> Vec<String> {
    let dir = match std::env::var_os("CDI_SCHEMA_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cdi-schema"),
    }
    .join(version);
    let read = |f: &str| -> Value {
        let path = dir.join(f);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "CDI schema {} is missing ({e}); set CDI_SCHEMA_DIR",
                path.display()
            )
        }))
        .unwrap()
    };
    let base = format!("file:///cdi-schema/{version}/");
    let registry = jsonschema::Registry::new()
        .add(format!("{base}defs.json"), read("defs.json"))
        .unwrap()
        .prepare()
        .unwrap();
    let validator = jsonschema::options()
        .with_base_uri(format!("{base}schema.json"))
        .with_registry(&registry)
        .build(&read("schema.json"))
        .unwrap();
    validator
        .iter_errors(doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

/// Check a written spec file: parsed and validated by vgpu_cdi, and valid under both schemas.
pub fn check_spec_file(path: &Path) -> Value {
    let spec = vgpu_cdi::read_spec_file(path).unwrap();
    spec.validate().unwrap();
    assert_eq!(
        spec.cdi_version,
        vgpu_cdi::minimum_version(&spec),
        "cdiVersion is not the minimum"
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for version in ["1.1.0", "0.8.0"] {
        let errors = cdi_schema_errors(version, &doc);
        assert!(errors.is_empty(), "schema {version}: {errors:#?}");
    }
    doc
}
