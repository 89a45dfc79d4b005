//! The user-mode Linux harness: runs one command inside a UML kernel (Debian's
//! `user-mode-linux`, which has IPVS, ipset and iptables-legacy where the CI kernel has not) and
//! returns its exit code, output and the kernel's console. Shared by test files with `mod uml;`.
//!
//! UML boots with the host's filesystem as its root (hostfs), so the job sees the same binaries
//! as the test (target/, ipvsadm, iptables-legacy). PID 1 is `init.sh` beside this file: it
//! mounts a private /run, /tmp and /dev/shm, loads the job's kernel modules, brings lo up, runs
//! the job and powers off. The two sides talk through files in a per-run work directory under
//! target/tmp, named on the kernel command line (`kpx_work=`). A test starts with
//! `if !uml::require_uml() { return; }`.
//!
//! Every UML is started in a process group of its own, under `setpriv --pdeathsig KILL`, and the
//! whole group is killed when the job is over or its time is up, so a UML that hangs or panics
//! never hangs the test run nor outlives it. UMLs left by a killed test process are swept.
//! Every UML also runs with xstate_shim.c preloaded: without it, bookworm's UML 6.1 panics on
//! hosts with AVX-512 or AMX as soon as it starts init (see that file).

#![allow(dead_code)] // each test file uses a different part of the harness

mod process;

use process::{UmlProcess, sweep_stale, xstate_shim};

use std::fmt;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Loaded before every job (those a kernel lacks are reported, not fatal): IPVS with every
/// scheduler, the interfaces the backends create, conntrack and NAT, and the iptables tables,
/// matches and targets of kube-proxy-like rules, ipset with the set types kube-proxy's ipvs
/// mode uses.
pub const DEFAULT_MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_sh",
    "ip_vs_dh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_mh",
    "veth",
    "dummy",
    "bridge",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "iptable_nat",
    "iptable_filter",
    "iptable_mangle",
    "iptable_raw",
    "ip6table_nat",
    "ip6table_filter",
    "ip6table_mangle",
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "xt_conntrack",
    "xt_statistic",
    "xt_recent",
    "xt_MASQUERADE",
    "xt_set",
    "xt_multiport",
    "xt_nat",
    "xt_tcpudp",
    "xt_physdev",
    "ipt_REJECT",
    "ip6t_REJECT",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet",
    "ip_set_hash_net",
    "ip_set_bitmap_port",
];

/// Time a job gets, boot and module loading included, unless it says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

const INIT_SCRIPT: &str = include_str!("init.sh");
const UML_MODULES: &str = "/usr/lib/uml/modules";
const MEM: &str = "512M";

/// What to run inside UML: an argv (no shell unless asked for), extra environment, the kernel
/// modules to load first and a time limit. The job runs as root, in the work directory.
#[derive(Debug, Clone)]
pub struct UmlJob {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    modules: Vec<String>,
    timeout: Duration,
}

impl UmlJob {
    pub fn new<S: AsRef<str>>(argv: &[S]) -> UmlJob {
        assert!(!argv.is_empty(), "a UML job needs a command");
        UmlJob {
            argv: argv.iter().map(|a| a.as_ref().to_string()).collect(),
            env: Vec::new(),
            modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `bash -c SCRIPT`: for constant test scripts; pass data as arguments or environment.
    pub fn shell(script: &str) -> UmlJob {
        UmlJob::new(&["bash", "-c", script])
    }

    pub fn env(mut self, key: &str, value: &str) -> UmlJob {
        assert!(!key.is_empty() && !key.contains(['=', '\0']), "bad environment name {key:?}");
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// One more module to load before the job (on top of [`DEFAULT_MODULES`]).
    pub fn module(mut self, name: &str) -> UmlJob {
        self.modules.push(name.to_string());
        self
    }

    /// Exactly these modules instead of [`DEFAULT_MODULES`].
    pub fn modules(mut self, names: &[&str]) -> UmlJob {
        self.modules = names.iter().map(|m| m.to_string()).collect();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> UmlJob {
        self.timeout = timeout;
        self
    }
}

/// A job that ran to completion inside UML (whatever its exit code).
#[derive(Debug, Clone)]
pub struct UmlResult {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The kernel's console: boot messages, init's own lines, oopses.
    pub console: String,
    pub modules_loaded: Vec<String>,
    /// `(module, modprobe's error)` for each requested module that did not load.
    pub modules_failed: Vec<(String, String)>,
    /// Kernel uptime when the job started: boot, mounts and module loading.
    pub boot: Duration,
    /// The job's own run time, by the UML kernel's clock.
    pub job: Duration,
    /// Host wall-clock time from starting UML to its exit.
    pub total: Duration,
}

impl UmlResult {
    /// Panics with everything known about the run unless the job exited 0.
    #[track_caller]
    pub fn assert_success(&self) -> &UmlResult {
        assert_eq!(self.exit_code, 0, "UML job failed:\n{self}");
        self
    }

    /// One line of figures for the test output.
    pub fn timings(&self) -> String {
        format!(
            "boot+modules {:.2}s, job {:.2}s, total {:.2}s (host clock)",
            self.boot.as_secs_f64(),
            self.job.as_secs_f64(),
            self.total.as_secs_f64()
        )
    }
}

impl fmt::Display for UmlResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exit code {} ({})", self.exit_code, self.timings())?;
        writeln!(f, "--- stdout\n{}", self.stdout)?;
        writeln!(f, "--- stderr\n{}", self.stderr)?;
        writeln!(f, "--- modules not loaded: {:?}", self.modules_failed)?;
        write!(f, "--- console\n{}", tail(&self.console, 60))
    }
}

/// Why a job has no result. Each carries the console, the place to look first.
#[derive(Debug, thiserror::Error)]
pub enum UmlError {
    #[error(
        "UML job {argv:?} still running after {after:?}: killed (work dir {work})\n--- console (tail)\n{}",
        tail(console, 80)
    )]
    Timeout { argv: Vec<String>, after: Duration, work: String, console: String },
    #[error(
        "UML exited ({status}) before job {argv:?} finished (work dir {work})\n--- console (tail)\n{}",
        tail(console, 80)
    )]
    NoResult { argv: Vec<String>, status: ExitStatus, work: String, console: String },
    #[error("UML harness: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UmlError {
    let what = what.into();
    move |source| UmlError::Io { what, source }
}

/// The UML kernel binary, if installed: $KPX_LINUX_UML, else Debian's /usr/bin/linux.uml.
pub fn linux_uml() -> Option<PathBuf> {
    let candidates = [std::env::var_os("KPX_LINUX_UML").map(PathBuf::from), Some("/usr/bin/linux.uml".into())];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Whether UML tests can run here: linux.uml, its modules, a C compiler for the XSAVE shim
/// and setpriv. When they cannot, under CI=true this panics naming what is missing (a skipped
/// kernel tier in CI would be a test that cannot fail); otherwise it prints a loud skip and
/// returns false.
pub fn require_uml() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    match CHECK.get_or_init(check_uml) {
        Ok(()) => true,
        Err(missing) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and UML tests cannot run: {missing} (install user-mode-linux: .ci/run does)");
            }
            // Straight to stderr: the test harness captures eprintln!, and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "\n**********\nSKIPPED (needs user-mode Linux): {missing}\n**********");
            false
        }
    }
}

fn check_uml() -> Result<(), String> {
    linux_uml().ok_or("no /usr/bin/linux.uml (Debian package user-mode-linux)")?;
    let has_modules = std::fs::read_dir(UML_MODULES).map(|mut d| d.next().is_some()).unwrap_or(false);
    if !has_modules {
        return Err(format!("no UML kernel modules in {UML_MODULES} (Debian package user-mode-linux)"));
    }
    for tool in ["setpriv", "kill", "cc", "modprobe"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
            || Path::new("/usr/sbin").join(tool).is_file()
            || Path::new("/sbin").join(tool).is_file();
        if !found {
            return Err(format!("`{tool}` not found (util-linux, procps, a C compiler, kmod)"));
        }
    }
    xstate_shim().map(|_| ()).map_err(|e| format!("cannot build the XSAVE shim: {e}"))
}

/// Boots UML, runs the job, powers off; blocks until then or until the job's timeout, after
/// which UML is killed. Nothing of the run is left running either way; the work directory is
/// removed when the job completed, kept (and named in the error) when it did not.
pub fn run_in_uml(job: &UmlJob) -> Result<UmlResult, UmlError> {
    let kernel = linux_uml().ok_or_else(|| UmlError::Io {
        what: "find linux.uml".into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "install user-mode-linux: .ci/run does"),
    })?;
    let shim = xstate_shim()?;
    sweep_stale();
    let work = WorkDir::create()?;
    work.prepare(job)?;

    let console_path = work.path.join("console");
    let console = File::create(&console_path).map_err(io_err("create console log"))?;
    let console2 = console.try_clone().map_err(io_err("dup console log"))?;
    let umid = work.umid();
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig=KILL")
        .arg(&kernel)
        .arg(format!("mem={MEM}"))
        .args(["rootfstype=hostfs", "rootflags=/", "rw"])
        .arg(format!("init={}", work.path.join("init.sh").display()))
        .args(["con=null", "con0=fd:0,fd:1"])
        .arg(format!("umid={umid}"))
        .arg(format!("uml_dir={}", work.path.display()))
        .arg(format!("kpx_work={}", work.path.display()))
        .env("LD_PRELOAD", &shim)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console2)
        .process_group(0);
    let started = Instant::now();
    let child = cmd.spawn().map_err(io_err(format!("spawn {cmd:?}")))?;
    let mut uml = UmlProcess::new(child);
    let status = uml.wait_until(started + job.timeout).map_err(io_err("wait for UML"))?;
    let total = started.elapsed();
    drop(uml);
    let console = read_lossy(&console_path);

    let Some(status) = status else {
        let work = work.keep();
        return Err(UmlError::Timeout { argv: job.argv.clone(), after: job.timeout, work, console });
    };
    let Some(exit_code) = work.read("exit_code").and_then(|s| s.trim().parse().ok()) else {
        let work = work.keep();
        return Err(UmlError::NoResult { argv: job.argv.clone(), status, work, console });
    };
    let times: Vec<f64> =
        work.read("times").unwrap_or_default().split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let (boot, job_time) = match times[..] {
        [start, end] => (Duration::from_secs_f64(start), Duration::from_secs_f64((end - start).max(0.0))),
        _ => (Duration::ZERO, Duration::ZERO),
    };
    let modules_failed = work
        .read("modules.failed")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_once(": ").map_or((l.to_string(), String::new()), |(m, e)| (m.to_string(), e.to_string())))
        .collect();
    Ok(UmlResult {
        exit_code,
        stdout: work.read("stdout").unwrap_or_default(),
        stderr: work.read("stderr").unwrap_or_default(),
        console,
        modules_loaded: work.read("modules.loaded").unwrap_or_default().lines().map(str::to_string).collect(),
        modules_failed,
        boot,
        job: job_time,
        total,
    })
}

/// target/tmp/uml/PID-SEQ: the job's files, the init script, UML's own runtime files.
struct WorkDir {
    path: PathBuf,
    name: String,
    keep: bool,
}

impl WorkDir {
    fn create() -> Result<WorkDir, UmlError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!("{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let path = harness_dir().join(&name);
        // Kernel command-line words are split on spaces.
        assert!(!path.to_string_lossy().contains(char::is_whitespace), "UML work dir {path:?} has whitespace");
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(io_err(format!("create {}", path.display())))?;
        Ok(WorkDir { path, name, keep: false })
    }

    fn umid(&self) -> String {
        format!("kpx-{}", self.name)
    }

    fn prepare(&self, job: &UmlJob) -> Result<(), UmlError> {
        let write = |name: &str, contents: &[u8]| {
            let path = self.path.join(name);
            std::fs::write(&path, contents).map_err(io_err(format!("write {}", path.display())))
        };
        write("init.sh", INIT_SCRIPT.as_bytes())?;
        let init = self.path.join("init.sh");
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("chmod {}", init.display())))?;
        write("argv", &nul_separated(job.argv.iter().map(String::as_str)))?;
        let env: Vec<String> = job.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write("env", &nul_separated(env.iter().map(String::as_str)))?;
        write("modules", job.modules.iter().map(|m| format!("{m}\n")).collect::<String>().as_bytes())
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read(self.path.join(name)).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Leaves the directory for a human to look at; its path.
    fn keep(mut self) -> String {
        self.keep = true;
        self.path.display().to_string()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn harness_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("uml")
}

fn nul_separated<'a>(items: impl Iterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        assert!(!item.contains('\0'), "NUL in UML job argument {item:?}");
        out.extend_from_slice(item.as_bytes());
        out.push(0);
    }
    out
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// The last N lines of TEXT.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
