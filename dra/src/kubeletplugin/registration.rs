//! The registration service the kubelet's plugin watcher finds in its registry directory: who
//! we are, which DRA versions we serve, and where the DRA socket is.

use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use vgpu_proto::pluginregistration as reg;

/// The kubelet's verdict on the registration socket now served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Served, not yet answered.
    Pending,
    Registered,
    /// The kubelet's error.
    Rejected(String),
}

/// Answers the kubelet's `GetInfo`, logs its verdict and keeps it for the readiness probe
/// and for re-announcing a registration the kubelet refused or never made.
#[derive(Clone, Debug)]
pub struct Registrar {
    driver: String,
    /// The DRA socket path as the kubelet sees it.
    endpoint: String,
    verdict: Arc<watch::Sender<Verdict>>,
}

impl Registrar {
    pub fn new(driver: &str, endpoint: &Path) -> Self {
        Registrar {
            driver: driver.to_string(),
            endpoint: endpoint.display().to_string(),
            verdict: Arc::new(watch::Sender::new(Verdict::Pending)),
        }
    }

    /// Follows the verdicts.
    pub fn verdicts(&self) -> watch::Receiver<Verdict> {
        self.verdict.subscribe()
    }

    /// A fresh announcement: the verdict on the previous one no longer counts.
    pub fn announced(&self) {
        self.verdict.send_replace(Verdict::Pending);
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
            self.verdict.send_replace(Verdict::Registered);
        } else {
            tracing::error!(
                driver = %self.driver,
                kubelet_error = %status.error,
                "the kubelet REJECTED this plugin's registration: no claims of this driver can be prepared on this node until this is fixed; the registration socket will be offered again"
            );
            self.verdict.send_replace(Verdict::Rejected(status.error));
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
