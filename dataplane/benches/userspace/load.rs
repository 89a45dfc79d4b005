//! Load generators and servers for the userspace benchmark, run in this process on threads that
//! entered the namespaces of the topology (setns: only the calling thread moves).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Moves this thread into network namespace NAME.
pub fn enter(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap_or_else(|e| panic!("netns {name}: {e}"));
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {name}: {e}"));
}

/// Runs F on a new thread inside namespace NS.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

/// A tokio runtime whose threads live in namespace NS.
pub fn runtime_in(ns: &str, threads: usize) -> tokio::runtime::Runtime {
    let ns = ns.to_string();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .on_thread_start(move || enter(&ns))
        .build()
        .expect("tokio runtime")
}

/// The servers of the endpoint pod, on PORT (TCP and UDP), on RT's threads: what each
/// connection does depends on its first byte: 's' sink (reads to the end, counts), 'e' echo of
/// 64-byte requests, 'c' one byte and close, anything else idle until the client closes. UDP
/// echoes. They run until RT drops.
pub struct Servers {
    pub sunk: Arc<AtomicU64>,
}

impl Servers {
    pub fn start(rt: &tokio::runtime::Runtime, port: u16) -> Servers {
        let sunk = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = sunk.clone();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.expect("bind TCP");
            let u = tokio::net::UdpSocket::bind(("0.0.0.0", port)).await.expect("bind UDP");
            tx.send(()).unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 2048];
                while let Ok((n, from)) = u.recv_from(&mut b).await {
                    let _ = u.send_to(&b[..n], from).await;
                }
            });
            loop {
                let Ok((c, _)) = l.accept().await else { continue };
                tokio::spawn(serve(c, s.clone()));
            }
        });
        rx.recv().expect("servers bound");
        Servers { sunk }
    }
}

async fn serve(mut c: tokio::net::TcpStream, sunk: Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = c.set_nodelay(true);
    let mut kind = [0u8; 1];
    if c.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        b's' => {
            let mut b = vec![0u8; 1 << 20];
            while let Ok(n) = c.read(&mut b).await {
                if n == 0 {
                    break;
                }
                sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        b'e' => {
            let mut b = [0u8; 64];
            while c.read_exact(&mut b).await.is_ok() {
                if c.write_all(&b).await.is_err() {
                    break;
                }
            }
        }
        b'c' => {
            let _ = c.write_all(b"x").await;
        }
        _ => {
            let mut b = [0u8; 16];
            let _ = c.read(&mut b).await;
        }
    }
}

/// Bulk throughput: STREAMS connections writing for DURATION; bytes per second the server got.
pub fn throughput(client_ns: &str, sunk: &AtomicU64, addr: SocketAddr, streams: usize, duration: Duration) -> f64 {
    let before = sunk.load(Ordering::Relaxed);
    let started = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            in_ns(client_ns, move || {
                let mut c = TcpStream::connect(addr).expect("connect for throughput");
                c.write_all(b"s").unwrap();
                let buf = vec![0x5au8; 1 << 20];
                let t = Instant::now();
                while t.elapsed() < duration {
                    if c.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = c.shutdown(Shutdown::Write);
                let _ = c.read(&mut [0u8; 1]);
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    (sunk.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64()
}

/// Request/response latencies (64 B each way) at RATE per second for COUNT requests: on one
/// connection (`fresh` false) or a new connection each (`fresh` true, connect included).
pub fn latencies(client_ns: &str, addr: SocketAddr, rate: u32, count: usize, fresh: bool) -> Vec<Duration> {
    in_ns(client_ns, move || {
        let period = Duration::from_secs(1) / rate;
        let mut out = Vec::with_capacity(count);
        let connect = || {
            let c = TcpStream::connect(addr).expect("connect for latency");
            c.set_nodelay(true).unwrap();
            c
        };
        let mut conn = connect();
        conn.write_all(b"e").unwrap();
        let start = Instant::now();
        let mut buf = [7u8; 64];
        for i in 0..count {
            let due = start + period * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            if fresh {
                conn = connect();
                conn.write_all(b"e").unwrap();
            }
            conn.write_all(&buf).unwrap();
            conn.read_exact(&mut buf).unwrap();
            out.push(t.elapsed());
        }
        out
    })
    .join()
    .unwrap()
}

/// Connections per second: CONCURRENCY clients in a loop of connect, read one byte, close.
pub fn connection_rate(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> (f64, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (done, failed) = (done.clone(), failed.clone());
            tasks.spawn(async move {
                while started.elapsed() < duration {
                    let ok = async {
                        let mut c = tokio::net::TcpStream::connect(addr).await?;
                        c.write_all(b"c").await?;
                        let mut b = [0u8; 2];
                        let n = c.read(&mut b).await?;
                        Ok::<bool, std::io::Error>(n == 1)
                    }
                    .await;
                    match ok {
                        Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    (done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(), failed.load(Ordering::Relaxed))
}

/// Opens N idle TCP connections through ADDR (each confirmed end to end by an echo); they stay
/// open until the returned guard drops.
pub fn idle_connections(rt: &tokio::runtime::Runtime, addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let open = async move {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("idle connection");
            c.write_all(b"e").await.unwrap();
            let mut b = [1u8; 64];
            c.write_all(&b).await.unwrap();
            c.read_exact(&mut b).await.unwrap();
            out.push(c);
        }
        out
    };
    // Spawned: block_on would run it on this thread, which is not in the client's namespace.
    let opened = rt.spawn(async move { tokio::time::timeout(Duration::from_secs(120), open).await });
    rt.block_on(opened).expect("task").expect("idle connections opened")
}

/// Opens N UDP flows through ADDR (one socket each, one datagram answered); the sockets stay
/// open until dropped, the proxy's flows until its UDP timeout.
pub fn udp_flows(client_ns: &str, addr: SocketAddr, n: usize) -> Vec<UdpSocket> {
    in_ns(client_ns, move || {
        (0..n)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.connect(addr).unwrap();
                s.send(b"flow").unwrap();
                let mut b = [0u8; 16];
                s.recv(&mut b).expect("UDP flow answered");
                s
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// The `VmRSS` of process PID, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU time process PID has used (user + system), from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here; USER_HZ is 100 on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Raises this process's open-files limit to its hard limit (clients and servers of thousands
/// of connections live here).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Kernel slab memory in use (`Slab` of /proc/meminfo), in bytes.
pub fn slab() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    m.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
