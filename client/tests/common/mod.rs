//! Helpers shared by the client's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::SystemTime;

/// The controlplane binary, rebuilt when its sources changed.
pub fn controlplane_bin() -> PathBuf {
    workspace_bin("kpx-controlplane", "kpx-controlplane", &["controlplane", "proto", "telemetry", "auth", "Cargo.lock"])
}

/// The dataplane binary, rebuilt when its sources changed.
pub fn dataplane_bin() -> PathBuf {
    workspace_bin("kpx-dataplane", "kpx-dataplane", &["dataplane", "proto", "telemetry", "auth", "Cargo.lock"])
}

/// A running `kpx-dataplane --backend dry-run`; killed on drop, its log printed when the test
/// panics.
pub struct Dataplane {
    child: Child,
    log: PathBuf,
}

impl Dataplane {
    /// Starts `bin --backend dry-run` with `args`, health and metrics on free ports.
    pub fn start(bin: &Path, args: &[&str]) -> Dataplane {
        let log = std::env::temp_dir().join(format!(
            "kpx-e2e-dataplane-{}-{}.log",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let child = Command::new(bin)
            .args(["--backend", "dry-run"])
            .args(["--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn kpx-dataplane");
        Dataplane { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- kpx-dataplane log:\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `target/<profile>/BIN`, next to this test, built when missing or older than its sources.
pub fn workspace_bin(package: &str, bin: &str, sources: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).expect("test executable in target/<profile>/deps");
    let path = profile_dir.join(bin);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = path.metadata().and_then(|m| m.modified()).ok();
    if built.is_some_and(|b| sources.iter().all(|s| newest_mtime(&workspace.join(s)) <= b)) {
        return path;
    }
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "-p", package, "--bin", bin]);
    match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let status = cargo
        .env("CARGO_TARGET_DIR", profile_dir.parent().expect("target/<profile>"))
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build -p {package}: {status}");
    assert!(path.is_file(), "cargo built {bin}, but not at {}", path.display());
    path
}

fn newest_mtime(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut newest = meta.modified().unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            newest = newest.max(newest_mtime(&entry.unwrap().path()));
        }
    }
    newest
}
