//! The controlplane under test, in one of two places:
//!
//! - in this process, on a runtime of its own (`kpx-cp` threads, whose CPU time is its own);
//! - in a child process (`--controlplane-process`): this benchmark binary again, serving the
//!   same synthetic cluster (built from the same seed), driven by lines on its stdin. Its RSS,
//!   peak (VmHWM) and CPU time are then the controlplane's alone, measured throughout the run,
//!   with the simulated nodes in the parent.

use super::{Args, Cluster, build_cluster, node_name};
use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::{ClusterEvent, EndpointSlice, Node, Skips};
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::ChannelSource;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The name of the controlplane runtime's threads.
pub const CP_THREADS: &str = "kpx-cp";

/// The flag that makes this binary the child controlplane (with the address to serve on).
pub const SERVE_FLAG: &str = "--serve-controlplane";

/// A controlplane running in this process, on its own runtime (its threads' CPU time is the
/// controlplane's: see `cpu_of_threads`).
pub struct Controlplane {
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), String>>,
    runtime: tokio::runtime::Handle,
    addr: SocketAddr,
}

impl Controlplane {
    /// Serves on ADDR (bound on RUNTIME, with SO_REUSEADDR as tokio binds, so that a restart
    /// can take the address again, retrying for up to 10 s); returns once it listens.
    pub async fn start(runtime: &tokio::runtime::Handle, addr: SocketAddr) -> Result<Controlplane, String> {
        let (events, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound, listening) = oneshot::channel::<()>();
        let server = runtime.spawn(async move {
            let listener = rebind(addr).await?;
            let _ = bound.send(());
            kpx_controlplane::serve(
                listener,
                Box::new(ChannelSource(rx)),
                Arc::new(Skips::default()),
                CacheConfig::default(),
                SyncConfig::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .map_err(|e| e.to_string())
        });
        let cp = Controlplane { events, stop, server, runtime: runtime.clone(), addr };
        match listening.await {
            Ok(()) => Ok(cp),
            Err(_) => Err(match cp.server.await {
                Ok(Err(e)) => e,
                other => format!("controlplane task: {other:?}"),
            }),
        }
    }

    pub fn send(&self, e: ClusterEvent) -> Result<(), String> {
        self.events.send(e).map_err(|_| "controlplane gone".to_string())
    }

    /// Every service, slice and node of CLUSTER (not Synced).
    pub fn feed(&self, cluster: &Cluster, nodes: usize) -> Result<(), String> {
        for s in &cluster.services {
            self.send(ClusterEvent::Service(s.key.clone(), Some(s.clone())))?;
        }
        for s in &cluster.slices {
            self.send(ClusterEvent::Slice(s.key.clone(), Some(s.clone())))?;
        }
        for i in 0..nodes {
            let name = node_name(i);
            self.send(ClusterEvent::Node(name.clone(), Some(Node { name, zone: None, addresses: vec![] })))?;
        }
        Ok(())
    }

    /// Stops it (its node streams end) and waits until it has.
    pub async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("controlplane failed: {e}")),
            Ok(Err(e)) => Err(format!("controlplane task: {e}")),
            Err(_) => Err("controlplane did not stop within 10 s".into()),
        }
    }
}

/// A controlplane in a child process. The child builds the same cluster from the same seed and
/// replays the changes the parent already made, so a restarted child serves the same state.
pub struct ChildControlplane {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    pid: u32,
    addr: SocketAddr,
    /// How the child was started (the benchmark's own arguments, minus the mode flags).
    args: Vec<String>,
    /// Changes made so far (a restarted child replays them).
    changes: usize,
}

impl ChildControlplane {
    pub async fn spawn(args: &[String], addr: SocketAddr, replay: usize) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .args([SERVE_FLAG, &addr.to_string(), "--replay-changes", &replay.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting the controlplane process: {e}"))?;
        let pid = child.id().ok_or("the controlplane process is gone")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        // It says so once it listens and has taken in the cluster (not Synced).
        match tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await {
            Ok(Ok(Some(l))) if l == "listening" => {}
            other => return Err(format!("the controlplane process did not start: {other:?}")),
        }
        Ok(ChildControlplane { child, stdin, pid, addr, args: args.to_vec(), changes: replay })
    }

    async fn command(&mut self, line: &str) -> Result<(), String> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.map_err(|e| format!("controlplane process: {e}"))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops it and waits until it has exited.
    pub async fn stop(mut self) -> Result<(), String> {
        self.command("stop").await?;
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(s)) if s.success() => Ok(()),
            other => Err(format!("the controlplane process did not stop cleanly: {other:?}")),
        }
    }
}

/// The controlplane under test, wherever it runs.
pub enum Cp {
    InProcess(Controlplane),
    Child(Box<ChildControlplane>),
}

impl Cp {
    /// Starts a controlplane at ADDR and gives it CLUSTER (not Synced).
    pub async fn start(
        a: &Args,
        runtime: &tokio::runtime::Handle,
        addr: SocketAddr,
        cluster: &Cluster,
    ) -> Result<Cp, String> {
        match a.controlplane_process {
            true => Ok(Cp::Child(Box::new(ChildControlplane::spawn(&a.child_args(), addr, 0).await?))),
            false => {
                let cp = Controlplane::start(runtime, addr).await?;
                cp.feed(cluster, a.nodes)?;
                Ok(Cp::InProcess(cp))
            }
        }
    }

    pub async fn synced(&mut self) -> Result<(), String> {
        match self {
            Cp::InProcess(cp) => cp.send(ClusterEvent::Synced),
            Cp::Child(cp) => cp.command("synced").await,
        }
    }

    /// The parent's cluster had its next change (`Cluster::change`); SLICE is the changed
    /// slice. The child makes the same change to its own copy (same seed, same sequence).
    pub async fn changed(&mut self, slice: EndpointSlice) -> Result<(), String> {
        match self {
            Cp::InProcess(cp) => cp.send(ClusterEvent::Slice(slice.key.clone(), Some(slice))),
            Cp::Child(cp) => {
                cp.changes += 1;
                cp.command("change").await
            }
        }
    }

    /// CPU time the controlplane has used so far.
    pub fn cpu(&self) -> Duration {
        match self {
            Cp::InProcess(_) => cpu_of_threads(CP_THREADS),
            Cp::Child(cp) => cpu_of_process(cp.pid()),
        }
    }

    /// The controlplane's own (RSS, peak RSS) in bytes, when it has a process of its own.
    pub fn memory(&self) -> Option<(u64, u64)> {
        match self {
            Cp::InProcess(_) => None,
            Cp::Child(cp) => Some(super::memory_of(&format!("/proc/{}/status", cp.pid()))),
        }
    }

    /// Stops it and starts a new one on the same address with CLUSTER (as it is now; not Synced).
    pub async fn restart(self, cluster: &Cluster, nodes: usize) -> Result<Cp, String> {
        match self {
            Cp::InProcess(cp) => {
                let runtime = cp.runtime.clone();
                let addr = cp.addr;
                cp.stop().await?;
                let cp = Controlplane::start(&runtime, addr).await?;
                cp.feed(cluster, nodes)?;
                Ok(Cp::InProcess(cp))
            }
            Cp::Child(cp) => {
                let (args, addr, replay) = (cp.args.clone(), cp.addr, cp.changes);
                (*cp).stop().await?;
                Ok(Cp::Child(Box::new(ChildControlplane::spawn(&args, addr, replay).await?)))
            }
        }
    }

    pub async fn stop(self) -> Result<(), String> {
        match self {
            Cp::InProcess(cp) => cp.stop().await,
            Cp::Child(cp) => (*cp).stop().await,
        }
    }
}

/// The child's side: serve the cluster on ADDR, then follow the parent's commands (`synced`,
/// `change`, `stop`), one per line on stdin.
pub fn child_main(a: Args, addr: SocketAddr, replay: usize) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CP_THREADS)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut cluster = build_cluster(&a);
        let mut rng = StdRng::seed_from_u64(a.seed);
        for _ in 0..replay {
            cluster.change(&mut rng, a.nodes);
        }
        let cp = Controlplane::start(&tokio::runtime::Handle::current(), addr).await?;
        cp.feed(&cluster, a.nodes)?;
        // The commands, read on a thread of their own (the parent gone: end of input, stop).
        let (tx, mut commands) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening").and_then(|()| out.flush()).map_err(|e| e.to_string())?;
        }
        while let Some(line) = commands.recv().await {
            match line.as_str() {
                "synced" => cp.send(ClusterEvent::Synced)?,
                "change" => {
                    let (i, _) = cluster.change(&mut rng, a.nodes);
                    let slice = cluster.slices[i].clone();
                    cp.send(ClusterEvent::Slice(slice.key.clone(), Some(slice)))?;
                }
                "stop" => break,
                other => return Err(format!("unknown command {other:?}")),
            }
        }
        cp.stop().await
    })
}

/// The old listener's address again (its socket may take a moment to be released).
async fn rebind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => return Err(format!("rebinding {addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// CPU time (user + system) used so far by this process's threads whose name starts with PREFIX
/// (tokio names its worker threads), from /proc/self/task/*/stat.
pub fn cpu_of_threads(prefix: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            total += cpu_of_stat(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        }
    }
    total
}

/// CPU time (user + system) of a whole process so far.
pub fn cpu_of_process(pid: u32) -> Duration {
    cpu_of_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// utime + stime of a /proc stat line.
fn cpu_of_stat(stat: &str) -> Duration {
    // Fields after the command (which may hold spaces) in parentheses: utime and stime are the
    // 12th and 13th of them.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok())).sum();
    // USER_HZ: 100 on Linux for every architecture kpx runs on.
    Duration::from_millis(ticks * 10)
}
