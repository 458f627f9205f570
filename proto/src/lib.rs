//! The kubelet's plugin gRPC APIs, wire-compatible with the kubelet: DRA (`v1beta1`, `v1`),
//! plugin registration and device health. The .proto files under `proto/` keep the kubelet's
//! package names byte-exact because they are part of every method path.

/// The DRA plugin service in its two served versions.
#[allow(clippy::all)]
pub mod dra {
    /// Kubelet 1.32 and later (`v1beta1.DRAPlugin`).
    pub mod v1beta1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
    }
    /// Kubelet 1.34 and later (`v1.DRAPlugin`); `Device.share_id` is v1 only.
    pub mod v1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }
}

/// Plugin registration with the kubelet's plugin watcher.
#[allow(clippy::all)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

/// Device health streaming (KEP-4680).
#[allow(clippy::all)]
pub mod health {
    pub mod v1alpha1 {
        tonic::include_proto!("v1alpha1");
    }
}

pub mod authority;
pub mod uds;

/// `PluginInfo.type` of a DRA driver.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";
/// `PluginInfo.supported_versions` entry for the v1 DRA service (kubelet 1.34+).
pub const DRA_V1: &str = "v1.DRAPlugin";
/// `PluginInfo.supported_versions` entry for the v1beta1 DRA service (kubelet 1.32+).
pub const DRA_V1BETA1: &str = "v1beta1.DRAPlugin";
/// `PluginInfo.supported_versions` entry for the health service (kubelet 1.34+, alpha gate).
pub const DRA_HEALTH_V1ALPHA1: &str = "v1alpha1.DRAResourceHealth";
