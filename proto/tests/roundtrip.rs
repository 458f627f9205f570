//! Every service over a real Unix socket, tonic server to tonic client, with the kubelet's
//! method paths checked byte for byte.

use prost::Message;
use std::sync::{Arc, Mutex};
use tokio_stream::StreamExt;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use vgpu_proto::dra::{v1, v1beta1};
use vgpu_proto::health::v1alpha1 as health;
use vgpu_proto::pluginregistration as reg;
use vgpu_proto::uds;

mod common;
use common::start;

/// A DRA service answering each claim with one device named after the claim, in both versions.
#[derive(Default, Clone)]
struct Dra {
    unprepared: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl v1beta1::dra_plugin_server::DraPlugin for Dra {
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let claims = request
            .into_inner()
            .claims
            .into_iter()
            .map(|c| {
                let answer = if c.name == "broken" {
                    v1beta1::NodePrepareResourceResponse {
                        devices: vec![],
                        error: "bad config".into(),
                    }
                } else {
                    v1beta1::NodePrepareResourceResponse {
                        devices: vec![v1beta1::Device {
                            request_names: vec!["gpu".into()],
                            pool_name: "node-a".into(),
                            device_name: "gpu-0".into(),
                            cdi_device_ids: vec![format!("k8s.vgpu.hami.io/claim={}-gpu", c.uid)],
                        }],
                        error: String::new(),
                    }
                };
                (c.uid, answer)
            })
            .collect();
        Ok(Response::new(v1beta1::NodePrepareResourcesResponse {
            claims,
        }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let mut claims = std::collections::HashMap::new();
        for c in request.into_inner().claims {
            self.unprepared
                .lock()
                .unwrap()
                .push(format!("v1beta1:{}", c.uid));
            claims.insert(
                c.uid,
                v1beta1::NodeUnprepareResourceResponse {
                    error: String::new(),
                },
            );
        }
        Ok(Response::new(v1beta1::NodeUnprepareResourcesResponse {
            claims,
        }))
    }
}

#[tonic::async_trait]
impl v1::dra_plugin_server::DraPlugin for Dra {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        let claims = request
            .into_inner()
            .claims
            .into_iter()
            .map(|c| {
                let device = v1::Device {
                    request_names: vec!["gpu".into()],
                    pool_name: "node-a".into(),
                    device_name: "gpu-1".into(),
                    cdi_device_ids: vec![format!("k8s.vgpu.hami.io/claim={}-gpu", c.uid)],
                    share_id: Some(format!("share-of-{}", c.uid)),
                };
                (
                    c.uid,
                    v1::NodePrepareResourceResponse {
                        devices: vec![device],
                        error: String::new(),
                    },
                )
            })
            .collect();
        Ok(Response::new(v1::NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        let mut claims = std::collections::HashMap::new();
        for c in request.into_inner().claims {
            self.unprepared
                .lock()
                .unwrap()
                .push(format!("v1:{}", c.uid));
            claims.insert(
                c.uid,
                v1::NodeUnprepareResourceResponse {
                    error: String::new(),
                },
            );
        }
        Ok(Response::new(v1::NodeUnprepareResourcesResponse { claims }))
    }
}

#[derive(Default, Clone)]
struct Registrar {
    statuses: Arc<Mutex<Vec<reg::RegistrationStatus>>>,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: vgpu_proto::DRA_PLUGIN_TYPE.into(),
            name: "vgpu.hami.io".into(),
            endpoint: "/var/lib/kubelet/plugins/vgpu.hami.io/dra.sock".into(),
            supported_versions: vec![vgpu_proto::DRA_V1.into(), vgpu_proto::DRA_V1BETA1.into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        self.statuses.lock().unwrap().push(request.into_inner());
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

struct Health;

#[tonic::async_trait]
impl health::dra_resource_health_server::DraResourceHealth for Health {
    type NodeWatchResourcesStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<health::NodeWatchResourcesResponse, Status>>
                + Send,
        >,
    >;

    async fn node_watch_resources(
        &self,
        _: Request<health::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let update = |status: health::HealthStatus, at: i64| {
            Ok(health::NodeWatchResourcesResponse {
                devices: vec![health::DeviceHealth {
                    device: Some(health::DeviceIdentifier {
                        pool_name: "node-a".into(),
                        device_name: "gpu-0".into(),
                    }),
                    health: status as i32,
                    last_updated_time: at,
                    health_check_timeout_seconds: 30,
                }],
            })
        };
        let updates = vec![
            update(health::HealthStatus::Healthy, 100),
            update(health::HealthStatus::Unhealthy, 200),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(updates))))
    }
}

fn claim(uid: &str, name: &str) -> v1::Claim {
    v1::Claim {
        namespace: "ml".into(),
        uid: uid.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn v1_and_v1beta1_are_served_on_one_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugins/vgpu.hami.io/dra.sock");
    let dra = Dra::default();
    let router = Server::builder()
        .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
            dra.clone(),
        ))
        .add_service(v1::dra_plugin_server::DraPluginServer::new(dra.clone()));
    let (stop, task) = start(router, &socket).await;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let channel = uds::connect(&socket).await.unwrap();
    let mut beta = v1beta1::dra_plugin_client::DraPluginClient::new(channel.clone());
    let answer = beta
        .node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
            claims: vec![
                v1beta1::Claim {
                    namespace: "ml".into(),
                    uid: "uid-1".into(),
                    name: "ok".into(),
                },
                v1beta1::Claim {
                    namespace: "ml".into(),
                    uid: "uid-2".into(),
                    name: "broken".into(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.claims.len(), 2);
    assert_eq!(
        answer.claims["uid-1"].devices[0].cdi_device_ids,
        vec!["k8s.vgpu.hami.io/claim=uid-1-gpu".to_string()]
    );
    assert_eq!(answer.claims["uid-2"].error, "bad config");

    let mut ga = v1::dra_plugin_client::DraPluginClient::new(channel);
    let answer = ga
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![claim("uid-3", "shared")],
        })
        .await
        .unwrap()
        .into_inner();
    let device = &answer.claims["uid-3"].devices[0];
    assert_eq!(device.share_id.as_deref(), Some("share-of-uid-3"));
    assert_eq!(device.device_name, "gpu-1");
    ga.node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
        claims: vec![claim("uid-3", "shared")],
    })
    .await
    .unwrap();
    beta.node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest {
        claims: vec![v1beta1::Claim {
            namespace: "ml".into(),
            uid: "uid-1".into(),
            name: "ok".into(),
        }],
    })
    .await
    .unwrap();
    assert_eq!(
        *dra.unprepared.lock().unwrap(),
        vec!["v1:uid-3".to_string(), "v1beta1:uid-1".to_string()]
    );

    stop.send(()).unwrap();
    task.await.unwrap();
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

/// A raw gRPC call on a hand-written path: a wrong proto package on the server side would
/// answer Unimplemented here.
async fn raw_unary<Req, Resp>(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: Req,
) -> Result<Resp, Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        Request::new(request),
        PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(Response::into_inner)
}

#[tokio::test]
async fn method_paths_are_the_kubelets() {
    assert_eq!(
        <v1beta1::dra_plugin_server::DraPluginServer<Dra> as NamedService>::NAME,
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
    );
    assert_eq!(
        <v1::dra_plugin_server::DraPluginServer<Dra> as NamedService>::NAME,
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin"
    );
    assert_eq!(
        <reg::registration_server::RegistrationServer<Registrar> as NamedService>::NAME,
        "pluginregistration.Registration"
    );
    assert_eq!(
        <health::dra_resource_health_server::DraResourceHealthServer<Health> as NamedService>::NAME,
        "v1alpha1.DRAResourceHealth"
    );

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("all.sock");
    let router = Server::builder()
        .add_service(v1beta1::dra_plugin_server::DraPluginServer::new(
            Dra::default(),
        ))
        .add_service(v1::dra_plugin_server::DraPluginServer::new(Dra::default()))
        .add_service(reg::registration_server::RegistrationServer::new(
            Registrar::default(),
        ))
        .add_service(health::dra_resource_health_server::DraResourceHealthServer::new(Health));
    let (stop, task) = start(router, &socket).await;
    let channel = uds::connect(&socket).await.unwrap();

    let beta: v1beta1::NodePrepareResourcesResponse = raw_unary(
        channel.clone(),
        "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/NodePrepareResources",
        v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1::Claim {
                namespace: "n".into(),
                uid: "u".into(),
                name: "c".into(),
            }],
        },
    )
    .await
    .unwrap();
    assert!(beta.claims.contains_key("u"));
    let ga: v1::NodeUnprepareResourcesResponse = raw_unary(
        channel.clone(),
        "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources",
        v1::NodeUnprepareResourcesRequest {
            claims: vec![claim("u", "c")],
        },
    )
    .await
    .unwrap();
    assert!(ga.claims.contains_key("u"));
    let info: reg::PluginInfo = raw_unary(
        channel.clone(),
        "/pluginregistration.Registration/GetInfo",
        reg::InfoRequest {},
    )
    .await
    .unwrap();
    assert_eq!(info.r#type, "DRAPlugin");
    // The negative control: a path with another package is not served.
    let wrong: Result<v1::NodePrepareResourcesResponse, Status> = raw_unary(
        channel.clone(),
        "/k8s.io.kubelet.pkg.apis.dra.v1beta2.DRAPlugin/NodePrepareResources",
        v1::NodePrepareResourcesRequest::default(),
    )
    .await;
    assert_eq!(wrong.unwrap_err().code(), tonic::Code::Unimplemented);

    // The streaming method by its full path, through the generated client.
    let mut client = health::dra_resource_health_client::DraResourceHealthClient::new(channel);
    let stream = client
        .node_watch_resources(health::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let updates: Vec<_> = stream
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(updates.len(), 2);
    assert_eq!(
        updates[0].devices[0].health,
        health::HealthStatus::Healthy as i32
    );
    assert_eq!(
        updates[1].devices[0].health,
        health::HealthStatus::Unhealthy as i32
    );
    assert_eq!(updates[1].devices[0].last_updated_time, 200);
    assert_eq!(
        updates[1].devices[0].device.as_ref().unwrap().device_name,
        "gpu-0"
    );

    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn registration_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugins_registry/vgpu.hami.io-reg.sock");
    let registrar = Registrar::default();
    let router = Server::builder().add_service(reg::registration_server::RegistrationServer::new(
        registrar.clone(),
    ));
    let (stop, task) = start(router, &socket).await;
    let mut client =
        reg::registration_client::RegistrationClient::new(uds::connect(&socket).await.unwrap());
    let info = client
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "vgpu.hami.io");
    assert_eq!(
        info.supported_versions,
        vec!["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    );
    client
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: false,
            error: "version mismatch".into(),
        })
        .await
        .unwrap();
    let statuses = registrar.statuses.lock().unwrap().clone();
    assert_eq!(statuses.len(), 1);
    assert!(!statuses[0].plugin_registered);
    assert_eq!(statuses[0].error, "version mismatch");
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn stale_sockets_are_replaced_and_other_files_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dra.sock");
    // A socket left behind by a killed process.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (stop, task) = start(
        Server::builder().add_service(reg::registration_server::RegistrationServer::new(
            Registrar::default(),
        )),
        &socket,
    )
    .await;
    let mut client =
        reg::registration_client::RegistrationClient::new(uds::connect(&socket).await.unwrap());
    client.get_info(reg::InfoRequest {}).await.unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        uds::bind(&file),
        Err(uds::UdsError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(uds::connect(dir.path().join("missing.sock")).await.is_err());
}

#[test]
fn field_numbers_match_the_kubelets() {
    let device = v1::Device {
        request_names: vec!["a".into()],
        pool_name: "p".into(),
        device_name: "d".into(),
        cdi_device_ids: vec!["c".into()],
        share_id: Some("s".into()),
    };
    // Tag bytes are (field << 3) | 2 for length-delimited fields 1 to 5.
    let expected = [
        0x0a, 1, b'a', 0x12, 1, b'p', 0x1a, 1, b'd', 0x22, 1, b'c', 0x2a, 1, b's',
    ];
    assert_eq!(device.encode_to_vec(), expected);
    // v1beta1 reads a v1 device, ignoring share_id.
    let beta = v1beta1::Device::decode(expected.as_slice()).unwrap();
    assert_eq!(beta.request_names, vec!["a".to_string()]);
    assert_eq!(
        (beta.pool_name.as_str(), beta.device_name.as_str()),
        ("p", "d")
    );
    assert_eq!(beta.cdi_device_ids, vec!["c".to_string()]);
    assert_eq!(beta.encode_to_vec(), &expected[..12]);

    let claim = v1::Claim {
        namespace: "n".into(),
        uid: "u".into(),
        name: "c".into(),
    };
    assert_eq!(
        claim.encode_to_vec(),
        [0x0a, 1, b'n', 0x12, 1, b'u', 0x1a, 1, b'c']
    );
    let answer = v1::NodePrepareResourceResponse {
        devices: vec![],
        error: "e".into(),
    };
    assert_eq!(answer.encode_to_vec(), [0x12, 1, b'e']);
    let unprepare = v1::NodeUnprepareResourceResponse { error: "e".into() };
    assert_eq!(unprepare.encode_to_vec(), [0x0a, 1, b'e']);
    let info = reg::PluginInfo {
        r#type: "t".into(),
        name: "n".into(),
        endpoint: "e".into(),
        supported_versions: vec!["v".into()],
    };
    assert_eq!(
        info.encode_to_vec(),
        [0x0a, 1, b't', 0x12, 1, b'n', 0x1a, 1, b'e', 0x22, 1, b'v']
    );
    let status = reg::RegistrationStatus {
        plugin_registered: true,
        error: "x".into(),
    };
    assert_eq!(status.encode_to_vec(), [0x08, 1, 0x12, 1, b'x']);
    let health = health::DeviceHealth {
        device: Some(health::DeviceIdentifier {
            pool_name: "p".into(),
            device_name: "d".into(),
        }),
        health: health::HealthStatus::Unhealthy as i32,
        last_updated_time: 7,
        health_check_timeout_seconds: 9,
    };
    assert_eq!(
        health.encode_to_vec(),
        [
            0x0a, 6, 0x0a, 1, b'p', 0x12, 1, b'd', 0x10, 2, 0x18, 7, 0x20, 9
        ]
    );
}
