//! Sockets of instances that are gone. With rolling updates every instance has its own
//! socket names, so a killed instance's sockets are never replaced by the next one's bind:
//! left alone they pile up, and the kubelet's plugin watcher keeps trying to register each
//! dead registration socket.

use super::Options;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Whether `name` in the plugin directory is a DRA socket of some instance of this driver:
/// `dra.sock` or `dra-<uid>.sock` (the directory is the driver's own).
fn is_dra_socket_name(name: &str) -> bool {
    name == "dra.sock"
        || name
            .strip_prefix("dra-")
            .and_then(|rest| rest.strip_suffix(".sock"))
            .is_some_and(|uid| !uid.is_empty())
}

/// Whether `s` has the shape of a Kubernetes UID (a UUID), as the rolling-update UID is the
/// pod's. The registry directory is shared by every driver: `<driver>-<anything>-reg.sock`
/// could be another driver's socket (driver `<driver>-<anything>`), a UUID tail cannot.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The shortened UID of a socket name under a deep kubelet root: its first hex digits.
fn is_short_uid(s: &str) -> bool {
    s.len() == super::SHORT_UID_LEN && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `name` in the registry directory is a registration socket of some instance of
/// `driver`: `<driver>-reg.sock`, `<driver>-<pod uid>-reg.sock` or, under a deep kubelet
/// root, `<driver>-<first 8 hex digits of the uid>-reg.sock`.
fn is_registration_socket_name(name: &str, driver: &str) -> bool {
    let Some(rest) = name.strip_prefix(driver) else {
        return false;
    };
    rest == "-reg.sock"
        || rest
            .strip_prefix('-')
            .and_then(|r| r.strip_suffix("-reg.sock"))
            .is_some_and(|u| is_uid(u) || is_short_uid(u))
}

/// Remove `path` if it is a socket nothing listens on (connecting is refused). A socket
/// someone listens on, a file of another kind, or one that cannot be checked is kept.
fn remove_if_dead(path: &Path) -> bool {
    let Ok(before) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !before.file_type().is_socket() {
        return false;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        _ => return false,
    }
    // A restarted instance with the same name may have bound afresh since the check: only
    // the very file that refused is removed.
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.dev() == before.dev() && now.ino() == before.ino() => {
            std::fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

/// Which names in a directory are sockets of this driver's instances.
type NameFilter<'a> = &'a dyn Fn(&str) -> bool;

/// Remove the DRA and registration sockets of this driver's instances that are gone (no
/// process listens on them) from the plugin and registry directories; live ones, this
/// instance's own names and everything else are left alone. Returns what was removed.
pub fn remove_stale_sockets(options: &Options) -> Vec<PathBuf> {
    let own = [options.dra_socket(), options.registration_socket()];
    let mut removed = Vec::new();
    let registration = |n: &str| is_registration_socket_name(n, &options.driver_name);
    let dirs: [(&Path, NameFilter<'_>); 2] = [
        (&options.plugin_dir, &is_dra_socket_name),
        (&options.registrar_dir, &registration),
    ];
    for (dir, ours) in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // This instance's own names are replaced by its bind, dead or not.
            if !ours(name) || own.contains(&path) {
                continue;
            }
            if remove_if_dead(&path) {
                removed.push(path);
            }
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const UID_OLD: &str = "0b6f3c1e-5d2a-4c7b-9e8f-1a2b3c4d5e6f";
    const UID_LIVE: &str = "7c9d2e4f-1a3b-4c5d-8e6f-a0b1c2d3e4f5";
    const UID_NEW: &str = "11111111-2222-4333-8444-555555555555";

    fn dead_socket(path: &Path) {
        drop(UnixListener::bind(path).unwrap());
        assert!(path.exists(), "a closed listener leaves its file");
    }

    #[test]
    fn names() {
        assert!(is_dra_socket_name("dra.sock"));
        assert!(is_dra_socket_name("dra-abc.sock"));
        assert!(!is_dra_socket_name("dra-.sock"));
        assert!(!is_dra_socket_name("metrics.sock"));
        assert!(is_registration_socket_name(
            "vgpu.hami.io-reg.sock",
            "vgpu.hami.io"
        ));
        assert!(is_registration_socket_name(
            &format!("vgpu.hami.io-{UID_OLD}-reg.sock"),
            "vgpu.hami.io"
        ));
        // The shortened form a deep kubelet root gets.
        assert!(is_registration_socket_name(
            "vgpu.hami.io-0b6f3c1e-reg.sock",
            "vgpu.hami.io"
        ));
        assert!(!is_registration_socket_name(
            "vgpu.hami.io-0b6f3c1-reg.sock",
            "vgpu.hami.io"
        ));
        // Another driver whose name starts with ours.
        assert!(!is_registration_socket_name(
            "vgpu.hami.io-test-reg.sock",
            "vgpu.hami.io"
        ));
        assert!(!is_registration_socket_name(
            "gpu.nvidia.com-reg.sock",
            "vgpu.hami.io"
        ));
        assert!(!is_uid("0b6f3c1e-5d2a-4c7b-9e8f-1a2b3c4d5e6"));
        assert!(!is_uid("0b6f3c1e_5d2a-4c7b-9e8f-1a2b3c4d5e6f"));
    }

    #[test]
    fn dead_instances_sockets_are_removed_live_and_foreign_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins/vgpu.hami.io");
        let registry = dir.path().join("plugins_registry");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(&registry).unwrap();
        let options = Options {
            driver_name: "vgpu.hami.io".into(),
            node_name: "n1".into(),
            plugin_dir: plugins.clone(),
            kubelet_plugin_dir: plugins.clone(),
            registrar_dir: registry.clone(),
            rolling_update_uid: Some(UID_NEW.into()),
            healthcheck_addr: None,
            registration_patience: crate::kubeletplugin::DEFAULT_REGISTRATION_PATIENCE,
        };
        // A killed instance, and one from before rolling updates.
        let dead = [
            plugins.join(format!("dra-{UID_OLD}.sock")),
            registry.join(format!("vgpu.hami.io-{UID_OLD}-reg.sock")),
            plugins.join("dra.sock"),
            registry.join("vgpu.hami.io-reg.sock"),
        ];
        for path in &dead {
            dead_socket(path);
        }
        // The instance being replaced, still serving.
        let live = [
            plugins.join(format!("dra-{UID_LIVE}.sock")),
            registry.join(format!("vgpu.hami.io-{UID_LIVE}-reg.sock")),
        ];
        let _listeners: Vec<UnixListener> = live
            .iter()
            .map(|p| UnixListener::bind(p).unwrap())
            .collect();
        // Not ours: another driver's dead socket, a file that is no socket.
        let foreign = [
            registry.join("vgpu.hami.io-test-reg.sock"),
            registry.join("gpu.nvidia.com-reg.sock"),
        ];
        for path in &foreign {
            dead_socket(path);
        }
        let not_a_socket = plugins.join(format!("dra-{UID_OLD}x.sock"));
        std::fs::write(&not_a_socket, b"").unwrap();
        // This instance's own names (a previous run of the same pod) are its bind's business.
        let own = [options.dra_socket(), options.registration_socket()];
        for path in &own {
            dead_socket(path);
        }

        let mut want: Vec<PathBuf> = dead.to_vec();
        want.sort();
        assert_eq!(remove_stale_sockets(&options), want);
        for path in &dead {
            assert!(!path.exists(), "{} left", path.display());
        }
        for path in live
            .iter()
            .chain(&foreign)
            .chain(&own)
            .chain([&not_a_socket])
        {
            assert!(path.exists(), "{} removed", path.display());
        }
        // Nothing left to do the second time.
        assert_eq!(remove_stale_sockets(&options), Vec::<PathBuf>::new());
    }
}
