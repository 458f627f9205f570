//! Shared by the proto crate's integration tests.

use std::path::Path;
use tokio::sync::oneshot;
use vgpu_proto::uds;

/// Serve `router` at `path` in the background; returns the shutdown trigger and the task.
pub async fn start(
    router: tonic::transport::server::Router,
    path: &Path,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let path = path.to_path_buf();
    let task = tokio::spawn(async move {
        uds::serve(
            router,
            &path,
            move || {
                let _ = ready_tx.send(());
            },
            async {
                let _ = stopped.await;
            },
        )
        .await
        .expect("serve");
    });
    ready_rx.await.expect("server became ready");
    (stop, task)
}
