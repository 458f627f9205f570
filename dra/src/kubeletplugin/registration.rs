//! The registration service the kubelet's plugin watcher finds in its registry directory: who
//! we are, which DRA versions we serve, and where the DRA socket is.

use std::path::Path;
use tonic::{Request, Response, Status};
use vgpu_proto::pluginregistration as reg;

/// Answers the kubelet's `GetInfo` and logs its verdict.
#[derive(Clone, Debug)]
pub struct Registrar {
    driver: String,
    /// The DRA socket path as the kubelet sees it.
    endpoint: String,
}

impl Registrar {
    pub fn new(driver: &str, endpoint: &Path) -> Self {
        Registrar {
            driver: driver.to_string(),
            endpoint: endpoint.display().to_string(),
        }
    }
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _request: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: vgpu_proto::DRA_PLUGIN_TYPE.into(),
            name: self.driver.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: vec![vgpu_proto::DRA_V1.into(), vgpu_proto::DRA_V1BETA1.into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.driver, "registered with the kubelet");
        } else {
            tracing::error!(
                driver = %self.driver,
                kubelet_error = %status.error,
                "the kubelet REJECTED this plugin's registration: no claims of this driver can be prepared on this node until this is fixed"
            );
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
