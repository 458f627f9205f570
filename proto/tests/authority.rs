//! Whatever `:authority` a kubelet sends, a served socket answers: the socket path itself
//! (older grpc-go), its percent-encoding (grpc-go 1.65 and 1.72, the plugin watcher's dial),
//! `localhost` (grpc-go's `unix:` resolver) and none at all. Raw HTTP/2 against the real tonic
//! server; the kubelets' own grpc-go clients are run by kubelet-plugin/tests/grpc_go_client.rs.

use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::{Request, Response, Status};
use vgpu_proto::pluginregistration as reg;

mod common;
use common::start;

struct Registrar;

#[tonic::async_trait]
impl reg::registration_server::Registration for Registrar {
    async fn get_info(
        &self,
        _: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        Ok(Response::new(reg::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: "vgpu.hami.io".into(),
            endpoint: "/var/lib/kubelet/plugins/vgpu.hami.io/dra.sock".into(),
            supported_versions: vec!["v1.DRAPlugin".into()],
        }))
    }

    async fn notify_registration_status(
        &self,
        _: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A header block of raw "literal without indexing, new name" fields.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        for s in [name, value] {
            assert!(s.len() < 127);
            b.push(s.len() as u8);
            b.extend_from_slice(s.as_bytes());
        }
    }
    b
}

/// How stream 1 ended: its response headers and trailers, or the RST_STREAM code.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answered(Vec<(String, String)>),
    Reset(u32),
}

/// One GetInfo on a fresh connection, `authority` as `:authority` (None: no such field).
async fn get_info(socket: &Path, authority: Option<&str>) -> Outcome {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/pluginregistration.Registration/GetInfo"),
    ];
    if let Some(a) = authority {
        fields.push((":authority", a));
    }
    fields.extend([("content-type", "application/grpc"), ("te", "trailers")]);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block(&fields)));
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // an empty InfoRequest
    conn.write_all(&out).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut headers = Vec::new();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        match kind {
            // SETTINGS, not an ACK: acknowledge.
            0x4 if flags & 0x1 == 0 => conn.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
            0x1 if stream == 1 => {
                assert_eq!(flags & 0x4, 0x4, "a CONTINUATION in a small answer");
                for (n, v) in decoder.decode(&payload).unwrap() {
                    headers.push((String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()));
                }
                if flags & 0x1 != 0 {
                    return Outcome::Answered(headers);
                }
            }
            0x3 if stream == 1 => {
                return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
            }
            0x7 => panic!("GOAWAY: {payload:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn any_authority_a_kubelet_sends_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.hami.io-reg.sock");
    let router = tonic::transport::Server::builder()
        .add_service(reg::registration_server::RegistrationServer::new(Registrar));
    let (stop, server) = start(router, &socket).await;

    let path = socket.to_str().unwrap().to_string();
    let encoded = path.replace('/', "%2F");
    for authority in [
        Some(path.as_str()),
        Some(encoded.as_str()),
        Some("localhost"),
        None,
    ] {
        match get_info(&socket, authority).await {
            Outcome::Answered(headers) => {
                let get = |name: &str| {
                    headers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.as_str())
                };
                assert_eq!(get(":status"), Some("200"), "{authority:?}: {headers:?}");
                assert_eq!(get("grpc-status"), Some("0"), "{authority:?}: {headers:?}");
            }
            reset => panic!("{authority:?}: {reset:?} (1 is PROTOCOL_ERROR)"),
        }
    }
    stop.send(()).unwrap();
    server.await.unwrap();
}
