//! The DRA gRPC service in both versions the kubelet speaks (v1beta1 for 1.32+, v1 for
//! 1.34+) on one socket, over one [`Driver`], and the serving of both sockets.

use super::{
    Call, ClaimReader, ClaimRef, Device, DeviceHealth, Driver, Registrar, Timing, Verdict,
};
use futures::StreamExt;
use k8s_openapi::api::resource::v1::ResourceClaim;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use vgpu_proto::dra::{v1, v1beta1};
use vgpu_proto::health::v1alpha1 as health;
use vgpu_proto::pluginregistration as reg;
use vgpu_proto::uds;

/// What the helper knows of a claim before the driver prepares it.
enum Known {
    /// Prepared before: the recorded answer.
    Prepared(Vec<Device>),
    /// Read from the API server and checked; boxed, a claim is large.
    Read(Box<ResourceClaim>),
}

/// Both service versions over one driver.
pub(crate) struct DraService<D> {
    driver: Arc<D>,
    claims: Arc<ClaimReader>,
}

impl<D> Clone for DraService<D> {
    fn clone(&self) -> Self {
        DraService {
            driver: self.driver.clone(),
            claims: self.claims.clone(),
        }
    }
}

impl<D: Driver> DraService<D> {
    pub(crate) fn new(driver: Arc<D>, claims: ClaimReader) -> Self {
        DraService {
            driver,
            claims: Arc::new(claims),
        }
    }

    /// A claim's recorded devices, or the claim read and checked for [`Driver::prepare`].
    async fn known_or_read(
        &self,
        claim: &ClaimRef,
        api_reads: &mut Duration,
    ) -> Result<Known, String> {
        claim.validate().map_err(|e| e.to_string())?;
        if let Some(devices) = self
            .driver
            .prepared(claim)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(Known::Prepared(devices));
        }
        let reading = Instant::now();
        let object = self.claims.read(claim).await;
        *api_reads += reading.elapsed();
        Ok(Known::Read(Box::new(object.map_err(|e| e.to_string())?)))
    }

    /// Every claim gets an answer (devices or an error), keyed by its UID. The claims not
    /// prepared before go to the driver together, once each (the answer has one entry per UID).
    async fn prepare(
        &self,
        claims: Vec<ClaimRef>,
    ) -> BTreeMap<String, Result<Vec<Device>, String>> {
        let started = Instant::now();
        let mut out = BTreeMap::new();
        let mut api_reads = Duration::ZERO;
        let mut to_prepare = Vec::new();
        let mut order = Vec::with_capacity(claims.len());
        let mut seen = std::collections::BTreeSet::new();
        for claim in claims {
            if !seen.insert(claim.uid.clone()) {
                continue;
            }
            match self.known_or_read(&claim, &mut api_reads).await {
                Ok(Known::Prepared(devices)) => {
                    out.insert(claim.uid.clone(), Ok(devices));
                }
                Ok(Known::Read(object)) => to_prepare.push((claim.clone(), *object)),
                Err(e) => {
                    out.insert(claim.uid.clone(), Err(e));
                }
            }
            order.push(claim);
        }
        if !to_prepare.is_empty() {
            let (refs, objects): (Vec<ClaimRef>, Vec<_>) = to_prepare.into_iter().unzip();
            let asked = refs.len();
            let mut answers = self.driver.prepare(objects).await.into_iter();
            for claim in refs {
                let answer = match answers.next() {
                    Some(answer) => answer.map_err(|e| e.to_string()),
                    None => Err(format!(
                        "internal error: the driver answered fewer than the {asked} claims it was given"
                    )),
                };
                out.insert(claim.uid, answer);
            }
        }
        let mut outcomes = Vec::with_capacity(order.len());
        for claim in order {
            match out.get(&claim.uid) {
                Some(Ok(devices)) => {
                    tracing::info!(claim = %claim.key(), uid = %claim.uid, devices = devices.len(), "prepared");
                    outcomes.push((claim, true));
                }
                Some(Err(e)) => {
                    tracing::warn!(claim = %claim.key(), uid = %claim.uid, error = %e, "prepare failed");
                    outcomes.push((claim, false));
                }
                None => {}
            }
        }
        let timing = Timing {
            total: started.elapsed(),
            api_reads,
        };
        self.driver.observe(Call::Prepare, &outcomes, timing);
        out
    }

    /// Unprepare needs no API access: it works after the claim was deleted.
    async fn unprepare(&self, claims: Vec<ClaimRef>) -> BTreeMap<String, Result<(), String>> {
        let started = Instant::now();
        let mut out = BTreeMap::new();
        let mut outcomes = Vec::with_capacity(claims.len());
        for claim in claims {
            let result = self
                .driver
                .unprepare(&claim)
                .await
                .map_err(|e| e.to_string());
            match &result {
                Ok(()) => tracing::info!(uid = %claim.uid, "unprepared"),
                Err(e) => tracing::warn!(uid = %claim.uid, error = %e, "unprepare failed"),
            }
            outcomes.push((claim.clone(), result.is_ok()));
            out.insert(claim.uid, result);
        }
        let timing = Timing {
            total: started.elapsed(),
            api_reads: Duration::ZERO,
        };
        self.driver.observe(Call::Unprepare, &outcomes, timing);
        out
    }
}

fn device_v1(d: Device) -> v1::Device {
    v1::Device {
        request_names: d.request_names,
        pool_name: d.pool_name,
        device_name: d.device_name,
        cdi_device_ids: d.cdi_device_ids,
        share_id: d.share_id,
    }
}

fn device_v1beta1(d: Device) -> v1beta1::Device {
    // v1beta1 kubelets have no share ids (consumable capacity is 1.34+).
    v1beta1::Device {
        request_names: d.request_names,
        pool_name: d.pool_name,
        device_name: d.device_name,
        cdi_device_ids: d.cdi_device_ids,
    }
}

// The two versions' messages are distinct generated types with the same fields: one macro
// writes the glue for each, the logic above is written once.
macro_rules! dra_version {
    ($m:ident, $device:ident) => {
        impl From<$m::Claim> for ClaimRef {
            fn from(c: $m::Claim) -> Self {
                ClaimRef {
                    namespace: c.namespace,
                    uid: c.uid,
                    name: c.name,
                }
            }
        }

        #[tonic::async_trait]
        impl<D: Driver> $m::dra_plugin_server::DraPlugin for DraService<D> {
            async fn node_prepare_resources(
                &self,
                request: Request<$m::NodePrepareResourcesRequest>,
            ) -> Result<Response<$m::NodePrepareResourcesResponse>, Status> {
                let claims = request
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(ClaimRef::from)
                    .collect();
                let claims = self
                    .prepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, result)| {
                        let answer = match result {
                            Ok(devices) => $m::NodePrepareResourceResponse {
                                devices: devices.into_iter().map($device).collect(),
                                error: String::new(),
                            },
                            Err(error) => $m::NodePrepareResourceResponse {
                                devices: vec![],
                                error,
                            },
                        };
                        (uid, answer)
                    })
                    .collect();
                Ok(Response::new($m::NodePrepareResourcesResponse { claims }))
            }

            async fn node_unprepare_resources(
                &self,
                request: Request<$m::NodeUnprepareResourcesRequest>,
            ) -> Result<Response<$m::NodeUnprepareResourcesResponse>, Status> {
                let claims = request
                    .into_inner()
                    .claims
                    .into_iter()
                    .map(ClaimRef::from)
                    .collect();
                let claims = self
                    .unprepare(claims)
                    .await
                    .into_iter()
                    .map(|(uid, r)| {
                        (
                            uid,
                            $m::NodeUnprepareResourceResponse {
                                error: r.err().unwrap_or_default(),
                            },
                        )
                    })
                    .collect();
                Ok(Response::new($m::NodeUnprepareResourcesResponse { claims }))
            }
        }
    };
}

dra_version!(v1, device_v1);
dra_version!(v1beta1, device_v1beta1);

fn health_message(devices: Vec<DeviceHealth>) -> health::NodeWatchResourcesResponse {
    health::NodeWatchResourcesResponse {
        devices: devices
            .into_iter()
            .map(|d| health::DeviceHealth {
                device: Some(health::DeviceIdentifier {
                    pool_name: d.pool_name,
                    device_name: d.device_name,
                }),
                health: match d.healthy {
                    Some(true) => health::HealthStatus::Healthy,
                    Some(false) => health::HealthStatus::Unhealthy,
                    None => health::HealthStatus::Unknown,
                } as i32,
                last_updated_time: d.last_updated,
                // 0: the kubelet's default timeout.
                health_check_timeout_seconds: 0,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl<D: Driver> health::dra_resource_health_server::DraResourceHealth for DraService<D> {
    type NodeWatchResourcesStream =
        futures::stream::BoxStream<'static, Result<health::NodeWatchResourcesResponse, Status>>;

    async fn node_watch_resources(
        &self,
        _request: Request<health::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let Some(updates) = self.driver.device_health() else {
            return Err(Status::unimplemented(
                "this driver does not report device health",
            ));
        };
        Ok(Response::new(
            updates.map(|devices| Ok(health_message(devices))).boxed(),
        ))
    }
}

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            break;
        }
    }
}

/// Where [`serve`] serves.
pub(crate) struct Sockets<'a> {
    pub dra: &'a Path,
    pub registration: &'a Path,
    /// The TCP health endpoint, already bound.
    pub healthcheck: Option<tokio::net::TcpListener>,
}

/// Every service name the liveness statuses are kept for: the whole server ("") and each DRA
/// version, as a client may ask for either. `SERVING` while both sockets are served.
fn health_names<D: Driver>() -> [&'static str; 3] {
    use tonic::server::NamedService;
    [
        "",
        <v1::dra_plugin_server::DraPluginServer<DraService<D>> as NamedService>::NAME,
        <v1beta1::dra_plugin_server::DraPluginServer<DraService<D>> as NamedService>::NAME,
    ]
}

/// The `grpc.health.v1` service name for readiness: `SERVING` only while the kubelet has
/// accepted the registration now served, so a rolling update does not retire the old pod
/// before the kubelet can call the new one.
pub const REGISTERED_SERVICE: &str = "kubelet-registration";

async fn set_health<D: Driver>(
    reporter: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for name in health_names::<D>() {
        reporter.set_service_status(name, status).await;
    }
}

/// Serve the DRA socket, then (only once it accepts connections) the registration socket,
/// until `stop` fires; both socket files are removed on the way out (registration first, so
/// the kubelet deregisters before the DRA socket goes). `ready` fires once both are up, which
/// is also when the health statuses turn `SERVING`; they turn `NOT_SERVING` as soon as `stop`
/// fires, before the sockets go.
pub(crate) async fn serve<D: Driver>(
    sockets: Sockets<'_>,
    dra: DraService<D>,
    registrar: Registrar,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: tokio::sync::watch::Receiver<bool>,
    patience: Duration,
) -> Result<(), uds::UdsError> {
    let (dra_path, registration_path) = (sockets.dra, sockets.registration);
    let (reporter, grpc_health) = tonic_health::server::health_reporter();
    // The reporter starts with "" SERVING; nothing is served yet.
    set_health::<D>(&reporter, tonic_health::ServingStatus::NotServing).await;
    reporter
        .set_service_status(REGISTERED_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let healthcheck_task = sockets.healthcheck.map(|listener| {
        let service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    stopped(stop.clone()),
                ),
        )
    });
    let (dra_incoming, dra_guard) = uds::bind(dra_path)?;
    let router = tonic::transport::Server::builder()
        .add_service(grpc_health)
        .add_service(health::dra_resource_health_server::DraResourceHealthServer::new(dra.clone()))
        .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
            dra.clone(),
        ))
        .add_service(v1::dra_plugin_server::DraPluginServer::new(dra));
    let dra_task =
        tokio::spawn(router.serve_with_incoming_shutdown(dra_incoming, stopped(stop.clone())));
    let mut verdicts = registrar.verdicts();
    let mut announcement = Some(Announcement::serve(registration_path, registrar.clone())?);
    set_health::<D>(&reporter, tonic_health::ServingStatus::Serving).await;
    tracing::info!(dra = %dra_path.display(), registration = %registration_path.display(), "serving the kubelet");
    let _ = ready.send(());
    let mut wait = patience;
    loop {
        // The kubelet's verdict on this announcement, if it comes in time.
        let verdict = tokio::select! {
            _ = stopped(stop.clone()) => break,
            v = tokio::time::timeout(wait, verdicts.wait_for(|v| *v != Verdict::Pending)) => {
                v.ok().and_then(Result::ok).map(|v| v.clone())
            }
        };
        let why = match verdict {
            Some(Verdict::Registered) => {
                reporter
                    .set_service_status(REGISTERED_SERVICE, tonic_health::ServingStatus::Serving)
                    .await;
                wait = patience;
                // Until the kubelet (restarted, say) rejects a later registration.
                tokio::select! {
                    _ = stopped(stop.clone()) => break,
                    _ = verdicts.wait_for(|v| *v != Verdict::Registered) => {}
                }
                reporter
                    .set_service_status(REGISTERED_SERVICE, tonic_health::ServingStatus::NotServing)
                    .await;
                continue;
            }
            Some(Verdict::Rejected(error)) => format!("the kubelet rejected it: {error}"),
            Some(Verdict::Pending) | None => format!(
                "the kubelet has not registered it within {wait:?} (is {} the kubelet's plugin registry directory?)",
                registration_path
                    .parent()
                    .unwrap_or(registration_path)
                    .display()
            ),
        };
        tracing::warn!(registration = %registration_path.display(), "offering the registration socket again: {why}");
        // Removed, then created anew: the kubelet's plugin watcher sees a new plugin.
        if let Some(old) = announcement.take() {
            old.withdraw().await;
        }
        registrar.announced();
        announcement = Some(Announcement::serve(registration_path, registrar.clone())?);
        wait = (wait * 2).min(MAX_PATIENCE);
    }
    set_health::<D>(&reporter, tonic_health::ServingStatus::NotServing).await;
    reporter
        .set_service_status(REGISTERED_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    if let Some(announcement) = announcement {
        announcement.withdraw().await;
    }
    drop(dra_guard);
    // Connections the kubelet keeps open must not hold the shutdown forever.
    match tokio::time::timeout(Duration::from_secs(5), dra_task).await {
        Ok(Ok(Err(source))) => {
            return Err(uds::UdsError::Transport {
                path: dra_path.to_path_buf(),
                source,
            });
        }
        Ok(_) => {}
        Err(_) => {
            tracing::warn!(socket = %dra_path.display(), "gRPC server did not stop within 5 s")
        }
    }
    if let Some(task) = healthcheck_task {
        // A probe's failure to stop is not worth failing the shutdown over.
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the TCP health endpoint failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("the TCP health endpoint did not stop within 5 s"),
        }
    }
    Ok(())
}

/// The longest wait for the kubelet's verdict before the registration socket is offered again.
const MAX_PATIENCE: Duration = Duration::from_secs(300);

/// The registration socket, served.
struct Announcement {
    guard: uds::SocketGuard,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Announcement {
    fn serve(path: &Path, registrar: Registrar) -> Result<Announcement, uds::UdsError> {
        let (incoming, guard) = uds::bind(path)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(reg::registration_server::RegistrationServer::new(registrar));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        Ok(Announcement { guard, stop, task })
    }

    /// The socket file goes first, so the kubelet deregisters; then the server stops.
    async fn withdraw(self) {
        let path = self.guard.path().to_path_buf();
        drop(self.guard);
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Err(e))) => {
                tracing::warn!(socket = %path.display(), error = %e, "the registration server failed")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(socket = %path.display(), "gRPC server did not stop within 5 s")
            }
        }
    }
}
