//! The kernel-test harness: network namespaces as RAII guards, a small cluster built from them
//! (topology.rs), backend pods and their clients (traffic.rs). Shared by kernel test files
//! with `mod netns;`.
//!
//! Everything happens in namespaces named `kpxt-ROLE-PID-SEQ` that this process creates and
//! removes; nothing touches the host's own interfaces, routes or rules. Commands run with argv
//! (`ip -n NAME ...`, `ip netns exec NAME ...`), never through a shell. A test starts with
//! `if !netns::require_root_and_netns() { return; }`.

#![allow(dead_code, unused_imports)] // each test file uses a different part of the harness

mod topology;
mod traffic;

pub use topology::{Client, Node, Pod, Topology, TopologyBuilder};
pub use traffic::{Backend, Outcome, Proto, Reply, eventually};

use std::io::Write;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The helper binary: backend pod, client, sysctl writer (dataplane/src/bin/kpx-testpod.rs).
pub const TESTPOD: &str = env!("CARGO_BIN_EXE_kpx-testpod");

/// Whether kernel tests can run here: root, and `ip netns` + veth + bridge work. When they
/// cannot, under CI=true this panics naming what is missing (a skipped kernel tier in CI would
/// be a test that cannot fail); otherwise it prints a loud skip and returns false.
pub fn require_root_and_netns() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(check_capabilities) {
        Ok(()) => true,
        Err(missing) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and kernel tests cannot run: {missing}");
            }
            // Straight to stderr: the test harness captures eprintln!, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n**********\nSKIPPED (needs root + network namespaces): {missing}\n**********"
            );
            false
        }
    }
}

fn check_capabilities() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("read /proc/self/status: {e}"))?;
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Err("not root (CAP_SYS_ADMIN and CAP_NET_ADMIN are needed to create network namespaces)".into());
    }
    let name = unique_name("probe");
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("ip").args(args).stdin(Stdio::null()).output();
        match out {
            Err(e) => Err(format!("cannot run `ip` (install iproute2): {e}")),
            Ok(o) if !o.status.success() => {
                Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
            }
            Ok(_) => Ok(()),
        }
    };
    ip(&["netns", "add", &name]).map_err(|e| format!("network namespaces unavailable: {e}"))?;
    let veth = ip(&["-n", &name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"]);
    let result = match veth {
        Err(e) => Err(format!("veth unavailable: {e}")),
        Ok(()) => {
            ip(&["-n", &name, "link", "add", "b0", "type", "bridge"]).map_err(|e| format!("bridge unavailable: {e}"))
        }
    };
    let _ = ip(&["netns", "del", &name]);
    sweep_stale();
    result
}

/// Removes `kpxt-` namespaces left by test processes that no longer exist (a killed run
/// cannot run its destructors). Namespaces of live processes, other test binaries included,
/// are left alone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).stdin(Stdio::null()).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with("kpxt-")) else { continue };
        let Some(pid) = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).stdin(Stdio::null()).output();
        }
    }
}

/// `kpxt-ROLE-PID-SEQ`: unique across the threads of this process and across processes.
pub fn unique_name(role: &str) -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    assert!(!role.is_empty() && !role.contains('-'), "namespace role {role:?} must be non-empty, without '-'");
    format!("kpxt-{role}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command to completion; panics with its stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with `stdin` as its input; it must succeed. Its stdout.
pub fn feed(cmd: &mut Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    child.stdin.take().expect("piped").write_all(stdin.as_bytes()).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that exists as long as this guard (like aya's NetNsGuard): created with
/// loopback up, deleted on drop. Processes still inside keep the kernel object alive, so
/// spawned children are guarded too ([`NsChild`]) and dropped before their namespace.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new namespace `kpxt-ROLE-...`; ROLE is for humans reading `ip netns list`.
    pub fn new(role: &str) -> NetNs {
        let name = unique_name(role);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No duplicate address detection on the interfaces made here later: while an
        // interface's link-local address is tentative (~1-2 s) the kernel sends no neighbour
        // solicitation for packets it forwards, so routed IPv6 would stall at first.
        ns.sysctl(&[("net.ipv6.conf.default.accept_dad", "0"), ("net.ipv6.conf.all.accept_dad", "0")]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME ARGV...`, not yet run.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv).stdin(Stdio::null());
        cmd
    }

    /// Runs ARGV inside the namespace to completion, whatever its exit status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap_or_else(|e| panic!("ip netns exec {} {argv:?}: {e}", self.name))
    }

    /// Runs ARGV inside the namespace; it must succeed. Its stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        run(&mut self.command(argv))
    }

    /// `ip -n NAME ARGS...` (iproute2 enters the namespace itself: cheaper than `exec`); must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Writes per-namespace sysctls (`net.ipv4.ip_forward`, ...) without procps or a shell.
    pub fn sysctl(&self, pairs: &[(&str, &str)]) {
        let mut argv = vec![TESTPOD, "sysctl"];
        argv.extend(pairs.iter().flat_map(|&(k, v)| [k, v]));
        self.run(&argv);
    }

    /// Starts ARGV inside the namespace (stdin null, stdout piped, stderr inherited so that
    /// failures show in the test output); killed when the guard drops.
    pub fn spawn(&self, argv: &[&str]) -> NsChild {
        let mut cmd = self.command(argv);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        self.spawn_command(cmd)
    }

    /// Starts a prepared [`NetNs::command`] (for other stdio or environment).
    pub fn spawn_command(&self, mut cmd: Command) -> NsChild {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        NsChild { child, what: format!("{cmd:?}") }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("ip netns del {}: {}", self.name, String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// A process started in a namespace, killed (SIGKILL) and reaped when dropped.
/// (`ip netns exec` execs the program, so the child's pid is the program's.)
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    what: String,
}

impl NsChild {
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The std child, for its stdout and the like.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (through procps' `kill`: workspace lints forbid unsafe, so no libc here), then
    /// SIGKILL if it has not exited within `grace`. Its exit status.
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).stdin(Stdio::null()).output();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} ignored SIGTERM for {grace:?}; killing it", self.what);
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Namespaces named `kpxt-...` that exist now (all test processes).
pub fn list_test_namespaces() -> Vec<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("kpxt-"))
        .map(str::to_string)
        .collect()
}
