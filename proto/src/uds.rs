//! gRPC over Unix sockets, the only transport the kubelet speaks to plugins.

use crate::authority::LenientAuthority;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::Stream;
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
    #[error(
        "socket path {path} is {len} bytes; a Unix socket path may have at most {max}: \
         choose a shorter directory (e.g. the kubelet's --root-dir or the plugin's --plugin-dir)"
    )]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
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

/// The connections accepted on a bound socket, each behind [`LenientAuthority`] so that the
/// kubelet's grpc-go clients, which send the socket path as `:authority`, are not refused
/// by h2 (see [`crate::authority`]). Pass it to tonic's `serve_with_incoming*`.
#[derive(Debug)]
pub struct Incoming {
    listener: UnixListenerStream,
}

impl Stream for Incoming {
    type Item = std::io::Result<LenientAuthority<UnixStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.listener)
            .poll_next(cx)
            .map(|next| next.map(|conn| conn.map(LenientAuthority::new)))
    }
}

/// Bind a Unix socket at `path`: the parent directory is created, a stale socket left by a
/// crash is replaced (any other kind of file is refused), and the socket is 0600 (the
/// kubelet connects as root) from the moment it appears at `path`: it is bound in a private
/// 0700 directory beside it, made 0600 there and renamed into place, so no one can connect
/// while it has the umask's looser mode.
pub fn bind(path: &Path) -> Result<(Incoming, SocketGuard), UdsError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(UdsError::PathTooLong {
            path: path.to_path_buf(),
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(UdsError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    remove_stale_staging(parent);
    let staging = parent.join(format!("{STAGING_PREFIX}{}", staging_token()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io("create directory", &staging))?;
    let bound = (|| {
        let tmp = staging.join("s");
        let listener = bind_in(&staging, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod", &tmp))?;
        // Atomically replaces a stale socket of a crashed run.
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    let listener = bound?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
    };
    let incoming = Incoming {
        listener: UnixListenerStream::new(listener),
    };
    Ok((incoming, guard))
}

/// The longest Unix socket path: `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Bind `tmp` inside the directory `staging`. The staging path is longer than the final one,
/// and the final one may itself be close to the limit (the kubelet's directory under a long
/// root), so the bind goes through the directory's descriptor, `/proc/self/fd/N/s`, whose
/// length does not depend on where the directory is. Without /proc the direct path is used.
fn bind_in(staging: &Path, tmp: &Path) -> Result<UnixListener, UdsError> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(staging).map_err(io("open directory", staging))?;
    let via_fd = PathBuf::from(format!("/proc/self/fd/{}/s", dir.as_raw_fd()));
    let target = if Path::new("/proc/self/fd").is_dir() {
        via_fd.as_path()
    } else {
        tmp
    };
    let listener = UnixListener::bind(target).map_err(io("bind", tmp))?;
    drop(dir);
    Ok(listener)
}

const STAGING_PREFIX: &str = ".uds-bind-";

/// A bind's staging directory lives a few microseconds; one older than this was left by a
/// process killed mid-bind.
const STAGING_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// A staging name no other process will pick: the plugin directories are shared by every
/// plugin container on the host, and each of those is pid 1 in its own PID namespace, so
/// neither the pid nor a pid check in /proc tells processes apart.
fn staging_token() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut random = [0u8; 8];
    // Without the random part the name is still unique within this process.
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random));
    format!(
        "{}-{nanos:x}-{:x}-{}",
        std::process::id(),
        u64::from_ne_bytes(random),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Staging directories of binds a crash interrupted: removed once old enough that no live
/// bind can still be using them, whichever process (or container) made them.
fn remove_stale_staging(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX)) {
            continue;
        }
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > STAGING_STALE_AFTER) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_socket_appears_0600_replaces_a_stale_one_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dra.sock");
        // A stale socket of a killed run, the staging directory of a bind that a crash
        // interrupted two minutes ago, and one of a bind in flight in another container (its
        // pid, 1, means nothing here).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let crashed = dir.path().join(format!("{STAGING_PREFIX}1-abc-def-0"));
        std::fs::create_dir(&crashed).unwrap();
        std::fs::File::open(&crashed)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
            .unwrap();
        let in_flight = format!("{STAGING_PREFIX}1-123-456-0");
        std::fs::create_dir(dir.path().join(&in_flight)).unwrap();
        let (_incoming, guard) = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            names(dir.path()),
            vec![in_flight.clone(), "dra.sock".into()]
        );
        std::fs::remove_dir(dir.path().join(&in_flight)).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("the renamed socket accepts");
        drop(guard);
        assert!(names(dir.path()).is_empty());
    }

    /// A directory of `len` bytes under `base`, made of nested components.
    fn deep_dir(base: &Path, len: usize) -> PathBuf {
        let mut dir = base.to_path_buf();
        while dir.as_os_str().len() < len {
            // Each component costs its name plus a separator; never leave a gap of one.
            let room = len - dir.as_os_str().len() - 1;
            let take = if room > 40 && room - 40 == 1 {
                39
            } else {
                room.min(40)
            };
            dir.push("d".repeat(take));
        }
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(dir.as_os_str().len(), len);
        dir
    }

    #[tokio::test]
    async fn a_socket_path_near_the_limit_binds_although_its_staging_path_is_longer() {
        // CI clones into a deeper directory than a developer's; the kubelet's plugin
        // directory under it left room for the socket but not for the staging path beside it.
        let base = tempfile::tempdir().unwrap();
        let dir = deep_dir(base.path(), MAX_SOCKET_PATH - "/dra.sock".len());
        let path = dir.join("dra.sock");
        assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH);
        let (_incoming, guard) = bind(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("the socket accepts");
        assert_eq!(names(&dir), vec!["dra.sock".to_string()]);
        drop(guard);
    }

    #[tokio::test]
    async fn a_socket_path_over_the_limit_is_refused_with_its_length() {
        let base = tempfile::tempdir().unwrap();
        let dir = deep_dir(base.path(), MAX_SOCKET_PATH + 1 - "/dra.sock".len());
        let path = dir.join("dra.sock");
        let err = bind(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, UdsError::PathTooLong { len: 108, .. }),
            "{text}"
        );
        assert!(
            text.contains(&path.display().to_string()) && text.contains("at most 107"),
            "{text}"
        );
        assert!(
            names(&dir).is_empty(),
            "nothing was created: {:?}",
            names(&dir)
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dra.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(matches!(err, UdsError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
