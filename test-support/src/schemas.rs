//! Strict validation of objects against the official Kubernetes JSON schemas, as the PyPI
//! package `kubernetes-validate` carries them.
//!
//! Install it with `python3 -m pip install -r hack/requirements-test.txt`; without it the
//! validation fails loudly rather than passing.

use std::path::Path;
use std::process::Command;

/// Validate `objects` (full objects with apiVersion and kind) strictly against the schemas of
/// Kubernetes `k8s_version` (e.g. `1.32.0`). Returns the validator's report on failure.
pub fn validate_k8s(objects: &[serde_json::Value], k8s_version: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut files = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = dir.path().join(format!("object-{i:04}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(object).expect("JSON values serialize"),
        )
        .map_err(|e| format!("write {}: {e}", path.display()))?;
        files.push(path);
    }
    validate_files(&files, k8s_version)
}

/// Validate YAML or JSON files (several documents each allowed) strictly.
pub fn validate_files<P: AsRef<Path>>(files: &[P], k8s_version: &str) -> Result<(), String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--no-warn",
            "-k",
            k8s_version,
        ])
        .args(files.iter().map(|f| f.as_ref().as_os_str()))
        .output()
        .map_err(|e| format!("cannot run {python} -m kubernetes_validate: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named kubernetes_validate") {
        panic!(
            "kubernetes-validate is not installed: run `python3 -m pip install -r hack/requirements-test.txt`"
        );
    }
    if !output.status.success() {
        return Err(format!("{stdout}{stderr}"));
    }
    // Every file must have been checked, not skipped.
    for file in files {
        let name = file.as_ref().display().to_string();
        if !stdout
            .lines()
            .any(|l| l.contains(&name) && l.contains("passed"))
        {
            return Err(format!("{name} was not validated:\n{stdout}{stderr}"));
        }
    }
    Ok(())
}
