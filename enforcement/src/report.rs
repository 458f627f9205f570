//! What the library has to say goes to stderr, once per kind, prefixed so it can be grepped:
//! a library inside someone else's process has no logger of its own.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

static SAID: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// Writes `message` unless something was already said under `key`.
pub fn once(key: &'static str, message: &str) {
    let first = {
        let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
        said.get_or_insert_with(HashSet::new).insert(key)
    };
    if first {
        say(message);
    }
}

/// Writes `message` now. Errors writing to stderr are ignored: the host process comes first.
pub fn say(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "[vgpu] {message}");
}
