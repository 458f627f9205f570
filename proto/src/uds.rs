//! gRPC over Unix sockets, the only transport the kubelet speaks to plugins.

use hyper_util::rt::TokioIo;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri, server::Router};

/// What can go wrong with a socket.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("gRPC over {path}: {source}")]
    Transport {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UdsError + use<> {
    let path = path.to_path_buf();
    move |source| UdsError::Io { op, path, source }
}

/// A bound socket path; the file is removed when the guard drops, so a stopped plugin leaves
/// no socket for the kubelet to dial.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind a Unix socket at `path`: the parent directory is created, a stale socket left by a
/// crash is replaced (any other kind of file is refused), and the socket is made 0600 (the
/// kubelet connects as root).
pub fn bind(path: &Path) -> Result<(UnixListenerStream, SocketGuard), UdsError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(UdsError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("bind", path))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", path))?;
    Ok((UnixListenerStream::new(listener), guard))
}

/// Serve `router` on a Unix socket at `path` until `shutdown` completes, then remove the
/// socket. `ready` is called once the socket accepts connections, so callers can order
/// sockets (the kubelet wants the DRA socket up before the registration socket appears).
pub async fn serve<F>(
    router: Router,
    path: &Path,
    ready: impl FnOnce(),
    shutdown: F,
) -> Result<(), UdsError>
where
    F: Future<Output = ()> + Send,
{
    let (incoming, guard) = bind(path)?;
    ready();
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|source| UdsError::Transport {
            path: path.to_path_buf(),
            source,
        });
    drop(guard);
    result
}

/// A client channel over the Unix socket at `path`, as the kubelet dials plugins.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, UdsError> {
    let path = path.as_ref().to_path_buf();
    let dial = path.clone();
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let dial = dial.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?)) }
        }))
        .await
        .map_err(|source| UdsError::Transport { path, source })
}
