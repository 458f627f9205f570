//! Builds the simulated driver (tests/c/stub_cuda.c, stub_nvml.c) and the probe application
//! with the system C compiler, and runs the probe with libvgpu.so preloaded.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub struct Toolchain {
    pub dir: PathBuf,
    pub library: PathBuf,
}

fn cc(args: &[&str], dir: &Path) {
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&compiler)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{compiler} cannot run ({e}): a C compiler is needed"));
    assert!(
        out.status.success(),
        "{compiler} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// libvgpu.so as cargo built it for this run: beside the test binary in target/<profile>/deps
/// (cargo builds the package's library, cdylib included, before its tests and benches).
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let library = deps.join("libvgpu.so");
    assert!(
        library.is_file(),
        "{} is missing: the cdylib should have been built with the tests",
        library.display()
    );
    library
}

pub fn toolchain() -> &'static Toolchain {
    static TOOLCHAIN: OnceLock<Toolchain> = OnceLock::new();
    TOOLCHAIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("enforcement-c-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = |name: &str| src.join(name).display().to_string();
        let with = |extra: &[&str]| -> Vec<String> {
            ["-O2", "-Wall", "-Wextra", "-Werror", "-fPIC"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
        };
        let build = |a: Vec<String>| cc(&a.iter().map(String::as_str).collect::<Vec<_>>(), &dir);
        build(with(&[
            "-shared",
            "-Wl,-Bsymbolic",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            "libcuda.so.1",
            &s("stub_cuda.c"),
            "-lpthread",
        ]));
        build(with(&[
            "-shared",
            "-Wl,-Bsymbolic",
            "-Wl,-soname,libnvidia-ml.so.1",
            "-o",
            "libnvidia-ml.so.1",
            &s("stub_nvml.c"),
            "-L.",
            "-l:libcuda.so.1",
        ]));
        build(with(&[
            "-shared",
            "-Wl,-soname,libdeepbound.so",
            "-o",
            "libdeepbound.so",
            &s("deepbound.c"),
            "-L.",
            "-l:libcuda.so.1",
            "-ldl",
        ]));
        build(with(&[
            "-o",
            "probe",
            &s("probe.c"),
            "-L.",
            "-l:libcuda.so.1",
            "-ldl",
            "-lpthread",
        ]));
        Toolchain {
            dir,
            library: library(),
        }
    })
}

/// A probe run: `path` is direct, dlsym or procaddr.
pub struct Probe {
    command: Command,
}

impl Probe {
    /// With libvgpu.so preloaded.
    pub fn new(path: &str, args: &[&str]) -> Self {
        let mut probe = Self::bare(path, args);
        probe.command.env("LD_PRELOAD", &toolchain().library);
        probe
    }

    /// Without the library: what the application would get from the driver alone.
    pub fn bare(path: &str, args: &[&str]) -> Self {
        let tc = toolchain();
        let mut command = Command::new(tc.dir.join("probe"));
        // A temporary directory of its own: with no CUDA_DEVICE_MEMORY_SHARED_CACHE the library
        // counts in $TMPDIR/cudevshr.cache, which tests running at once must not share unless
        // they say so.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = tc.dir.join(format!("tmp-{n}"));
        std::fs::create_dir_all(&tmp).unwrap();
        command
            .arg(path)
            .args(args)
            .env_clear()
            .env("LD_LIBRARY_PATH", &tc.dir)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null());
        Probe { command }
    }

    pub fn env(
        mut self,
        key: impl AsRef<std::ffi::OsStr>,
        value: impl AsRef<std::ffi::OsStr>,
    ) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn output(mut self) -> Report {
        let out = self.command.output().expect("run probe");
        Report::from(out)
    }

    pub fn spawn(mut self) -> Child {
        self.command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn probe")
    }
}

pub struct Report {
    pub values: HashMap<String, String>,
    pub stdout: String,
    pub stderr: String,
    pub status: std::process::ExitStatus,
}

impl From<Output> for Report {
    fn from(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let values = stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Report {
            values,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
        }
    }
}

impl Report {
    pub fn get(&self, key: &str) -> &str {
        self.values.get(key).map(String::as_str).unwrap_or_else(|| {
            panic!(
                "the probe reported no {key} (status {}):\n{}\nstderr:\n{}",
                self.status, self.stdout, self.stderr
            )
        })
    }

    pub fn num(&self, key: &str) -> f64 {
        self.get(key).parse().expect("a number")
    }

    pub fn int(&self, key: &str) -> i64 {
        self.get(key).parse().expect("an integer")
    }
}

/// Reads the child's stdout until `line` appears.
pub fn wait_for_line(child: &mut Child, line: &str) {
    use std::io::{BufRead, BufReader};
    let stdout = child.stdout.take().expect("piped stdout");
    let mut reader = BufReader::new(stdout);
    let mut seen = String::new();
    loop {
        let mut buf = String::new();
        let n = reader.read_line(&mut buf).expect("read probe output");
        assert!(
            n > 0,
            "the probe exited before printing {line:?}; it printed:\n{seen}"
        );
        if buf.trim_end() == line {
            return;
        }
        seen.push_str(&buf);
    }
}
