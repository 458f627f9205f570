//! Leaving no file on the host when the driver is uninstalled.
//!
//! A stopping plugin cannot tell an uninstall from a rolling update or a node drain by the
//! SIGTERM alone; its DaemonSet can: gone (or being deleted) means no instance will follow to
//! use the checkpoint, the claim directories or the enforcement library, so they are removed.
//! Anything else (the DaemonSet exists, or its state cannot be read) keeps them, since a
//! successor needs them. Prepared claims always keep them: their pods still run with the
//! library mounted and their claims must still be unprepared.
//!
//! The DaemonSet is watched from the start ([`DaemonSetWatch`]), not only read at SIGTERM: an
//! uninstall (`helm uninstall`, which deletes DaemonSets before RoleBindings, Roles and
//! ServiceAccounts) can take the plugin's RBAC and ServiceAccount away before the garbage
//! collector deletes its pod, so by SIGTERM its token may be refused; the watch has seen the
//! deletion by then.

use crate::checkpoint::{FILE_NAME as CHECKPOINT_FILE, JOURNAL_FILE_NAME as CHECKPOINT_JOURNAL};
use crate::prepare::{LOCK_FILE, PrepareError, Preparer};
use k8s_openapi::api::apps::v1::DaemonSet;
use std::path::PathBuf;

/// What the API server says of the plugin's DaemonSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DaemonSetState {
    /// It exists and is not being deleted: a restart or a rolling update.
    Present,
    /// It has a deletionTimestamp (foreground deletion): an uninstall.
    Deleting,
    /// NotFound: an uninstall (background deletion removes it before its pods).
    Gone,
    /// It could not be read (or the plugin was not told its name): assume a successor.
    Unknown(String),
}

/// The host paths the plugin creates.
#[derive(Clone, Debug)]
pub struct HostFiles {
    pub plugin_dir: PathBuf,
    /// This instance's registration socket (normally removed already by the orderly stop).
    pub registration_socket: PathBuf,
    pub enforcement_library: PathBuf,
}

/// What a stopping plugin does with its host files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Keep everything; why, for the log.
    Keep(KeepReason),
    /// Remove these, in this order (files before the directory that holds them).
    Remove(Vec<PathBuf>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// The DaemonSet exists: another instance follows and needs the files.
    DaemonSetPresent,
    /// The DaemonSet's state is unknown: keeping is the safe side.
    Unknown(String),
    /// An uninstall, but these claims (namespace/name (uid)) are still prepared here.
    ClaimsPrepared(Vec<String>),
}

/// The decision: DaemonSet state × prepared claims → what to remove. No I/O.
pub fn plan(state: &DaemonSetState, prepared: &[String], files: &HostFiles) -> Plan {
    match state {
        DaemonSetState::Present => return Plan::Keep(KeepReason::DaemonSetPresent),
        DaemonSetState::Unknown(why) => return Plan::Keep(KeepReason::Unknown(why.clone())),
        DaemonSetState::Deleting | DaemonSetState::Gone => {}
    }
    if !prepared.is_empty() {
        return Plan::Keep(KeepReason::ClaimsPrepared(prepared.to_vec()));
    }
    let dir = &files.plugin_dir;
    Plan::Remove(vec![
        dir.join(CHECKPOINT_FILE),
        dir.join(CHECKPOINT_JOURNAL),
        dir.join("claims"),
        dir.join("ld.so.preload"),
        // Last in the directory: removed while still held, so no operation of another
        // instance can start on the old file (see prepare::lock_for_operation).
        dir.join(LOCK_FILE),
        files.registration_socket.clone(),
        files.enforcement_library.clone(),
        dir.clone(),
    ])
}

/// What [`remove`] did.
#[derive(Debug, Default)]
pub struct Removal {
    pub removed: Vec<PathBuf>,
    /// Paths that exist but could not be removed (a non-empty plugin directory holding another
    /// instance's socket, for one).
    pub failed: Vec<(PathBuf, std::io::Error)>,
}

/// Remove `paths`: files, directory trees, and the last one, the plugin directory, only if
/// nothing else is left in it (it is not ours alone to empty: another instance's socket may
/// still be there). Missing paths are skipped; a failure does not stop the rest.
pub fn remove(paths: &[PathBuf]) -> Removal {
    let mut out = Removal::default();
    let last = paths.len().saturating_sub(1);
    for (i, path) in paths.iter().enumerate() {
        let result = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e),
            Ok(meta) if meta.is_dir() && i == last => std::fs::remove_dir(path),
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
        };
        match result {
            Ok(()) => out.removed.push(path.clone()),
            Err(e) => out.failed.push((path.clone(), e)),
        }
    }
    out
}

/// Decide with the plugin directory locked (no instance prepares meanwhile) and, if this is an
/// uninstall with nothing prepared, remove the host files before the lock is let go.
pub fn run(
    preparer: &Preparer,
    state: &DaemonSetState,
    files: &HostFiles,
) -> Result<(Plan, Removal), PrepareError> {
    preparer.with_locked_state(|payload| {
        let prepared: Vec<String> = payload
            .claims
            .iter()
            .map(|(uid, c)| format!("{}/{} ({uid})", c.namespace, c.name))
            .collect();
        let plan = plan(state, &prepared, files);
        let removal = match &plan {
            Plan::Remove(paths) => remove(paths),
            Plan::Keep(_) => Removal::default(),
        };
        (plan, removal)
    })
}

/// Which observation of the DaemonSet to act on at SIGTERM: what the API server says then, when
/// it answers (a DaemonSet of the same name created since the watch saw a deletion is a new
/// installation, whose files these are); when it does not (the uninstall took this plugin's
/// RBAC or ServiceAccount first), a deletion the watch saw.
pub fn decide(watched: &DaemonSetState, fresh: &DaemonSetState) -> DaemonSetState {
    match fresh {
        DaemonSetState::Unknown(why) => match watched {
            DaemonSetState::Gone | DaemonSetState::Deleting => watched.clone(),
            _ => DaemonSetState::Unknown(why.clone()),
        },
        _ => fresh.clone(),
    }
}

/// The plugin's DaemonSet as a watch last saw it (a watch of one object, by field selector).
pub struct DaemonSetWatch {
    state: tokio::sync::watch::Receiver<DaemonSetState>,
    task: tokio::task::JoinHandle<()>,
}

impl DaemonSetWatch {
    pub fn start(client: kube::Client, namespace: &str, name: &str) -> DaemonSetWatch {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};
        let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (tx, state) = tokio::sync::watch::channel(DaemonSetState::Unknown(format!(
            "DaemonSet {namespace}/{name} not listed yet"
        )));
        let what = format!("{namespace}/{name}");
        let task = tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            // Whether the current (re)list has shown the object: a list without it means gone.
            let mut listed = false;
            while let Some(event) = events.next().await {
                let next = match event {
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        continue;
                    }
                    Ok(watcher::Event::InitApply(ds) | watcher::Event::Apply(ds)) => {
                        listed = true;
                        if ds.metadata.deletion_timestamp.is_some() {
                            DaemonSetState::Deleting
                        } else {
                            DaemonSetState::Present
                        }
                    }
                    Ok(watcher::Event::InitDone) if listed => continue,
                    Ok(watcher::Event::InitDone | watcher::Event::Delete(_)) => {
                        DaemonSetState::Gone
                    }
                    Err(e) => {
                        tracing::debug!(daemonset = %what, error = %e, "watching the DaemonSet");
                        continue;
                    }
                };
                if matches!(next, DaemonSetState::Gone | DaemonSetState::Deleting) {
                    tracing::info!(daemonset = %what, state = ?next, "the DaemonSet is being removed: an uninstall, once this plugin stops");
                }
                tx.send_replace(next);
            }
        });
        DaemonSetWatch { state, task }
    }

    /// The last state seen.
    pub fn last(&self) -> DaemonSetState {
        self.state.borrow().clone()
    }
}

impl Drop for DaemonSetWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Read the DaemonSet's state; every failure is [`DaemonSetState::Unknown`].
pub async fn daemonset_state(client: kube::Client, namespace: &str, name: &str) -> DaemonSetState {
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
    match api.get_opt(name).await {
        Ok(None) => DaemonSetState::Gone,
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => DaemonSetState::Deleting,
        Ok(Some(_)) => DaemonSetState::Present,
        Err(e) => DaemonSetState::Unknown(format!("reading DaemonSet {namespace}/{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn files(root: &Path) -> HostFiles {
        HostFiles {
            plugin_dir: root.join("plugins/vgpu.hami.io"),
            registration_socket: root.join("plugins_registry/vgpu.hami.io-u1-reg.sock"),
            enforcement_library: root.join("usr/local/vgpu/libvgpu.so"),
        }
    }

    #[test]
    fn a_deletion_the_watch_saw_counts_when_the_daemonset_cannot_be_read_any_more() {
        use DaemonSetState::*;
        let refused = Unknown("403 forbidden".into());
        assert_eq!(decide(&Gone, &refused), Gone);
        assert_eq!(decide(&Deleting, &refused), Deleting);
        assert_eq!(decide(&Present, &refused), refused);
        assert_eq!(decide(&Unknown("not listed".into()), &refused), refused);
        // What the API server says at SIGTERM wins when it answers.
        assert_eq!(decide(&Gone, &Present), Present);
        assert_eq!(decide(&Present, &Gone), Gone);
        assert_eq!(decide(&Present, &Deleting), Deleting);
    }

    #[test]
    fn only_an_uninstall_with_nothing_prepared_removes() {
        let f = files(Path::new("/h"));
        let none: Vec<String> = vec![];
        let some = vec!["ml/train (u1)".to_string()];
        assert_eq!(
            plan(&DaemonSetState::Present, &none, &f),
            Plan::Keep(KeepReason::DaemonSetPresent)
        );
        assert_eq!(
            plan(&DaemonSetState::Present, &some, &f),
            Plan::Keep(KeepReason::DaemonSetPresent)
        );
        assert_eq!(
            plan(&DaemonSetState::Unknown("forbidden".into()), &none, &f),
            Plan::Keep(KeepReason::Unknown("forbidden".into()))
        );
        for state in [DaemonSetState::Gone, DaemonSetState::Deleting] {
            assert_eq!(
                plan(&state, &some, &f),
                Plan::Keep(KeepReason::ClaimsPrepared(some.clone()))
            );
            let Plan::Remove(paths) = plan(&state, &none, &f) else {
                panic!("{state:?} with nothing prepared keeps the files");
            };
            assert_eq!(
                paths,
                [
                    "/h/plugins/vgpu.hami.io/checkpoint.json",
                    "/h/plugins/vgpu.hami.io/checkpoint.journal",
                    "/h/plugins/vgpu.hami.io/claims",
                    "/h/plugins/vgpu.hami.io/ld.so.preload",
                    "/h/plugins/vgpu.hami.io/plugin.lock",
                    "/h/plugins_registry/vgpu.hami.io-u1-reg.sock",
                    "/h/usr/local/vgpu/libvgpu.so",
                    "/h/plugins/vgpu.hami.io",
                ]
                .map(PathBuf::from)
            );
        }
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn removal_leaves_nothing_of_ours_and_keeps_what_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let plugin = &f.plugin_dir;
        std::fs::create_dir_all(plugin.join("claims/u1")).unwrap();
        std::fs::write(plugin.join("claims/u1/vgpu.cache"), b"x").unwrap();
        std::fs::write(plugin.join("checkpoint.json"), b"{}").unwrap();
        std::fs::write(plugin.join("checkpoint.journal"), b"").unwrap();
        std::fs::write(plugin.join("plugin.lock"), b"").unwrap();
        std::fs::create_dir_all(f.registration_socket.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&f.registration_socket).unwrap());
        // Another driver's registration and the library directory's other files stay.
        std::fs::write(dir.path().join("plugins_registry/other-reg.sock"), b"").unwrap();
        std::fs::create_dir_all(f.enforcement_library.parent().unwrap()).unwrap();
        std::fs::write(&f.enforcement_library, b"lib").unwrap();
        std::fs::write(dir.path().join("usr/local/vgpu/README"), b"not ours").unwrap();

        let Plan::Remove(paths) = plan(&DaemonSetState::Gone, &[], &f) else {
            panic!("an uninstall with nothing prepared removes");
        };
        let removal = remove(&paths);
        assert!(removal.failed.is_empty(), "{:?}", removal.failed);
        // ld.so.preload never existed: skipped, not reported.
        assert_eq!(removal.removed.len(), paths.len() - 1);
        assert_eq!(
            tree(dir.path()),
            [
                "plugins",
                "plugins_registry",
                "plugins_registry/other-reg.sock",
                "usr",
                "usr/local",
                "usr/local/vgpu",
                "usr/local/vgpu/README",
            ]
        );
        // Again: nothing left to do, nothing fails.
        let again = remove(&paths);
        assert!(again.removed.is_empty() && again.failed.is_empty());
    }

    #[test]
    fn a_plugin_directory_still_holding_another_instances_socket_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::create_dir_all(&f.plugin_dir).unwrap();
        std::fs::write(f.plugin_dir.join("checkpoint.json"), b"{}").unwrap();
        let other = f.plugin_dir.join("dra-u2.sock");
        let _live = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let Plan::Remove(paths) = plan(&DaemonSetState::Deleting, &[], &f) else {
            panic!("an uninstall with nothing prepared removes");
        };
        let removal = remove(&paths);
        assert_eq!(removal.removed, vec![f.plugin_dir.join("checkpoint.json")]);
        assert_eq!(removal.failed.len(), 1, "{:?}", removal.failed);
        assert_eq!(removal.failed[0].0, f.plugin_dir);
        assert!(other.exists());
    }
}
