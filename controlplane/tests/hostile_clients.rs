//! Callers that never authenticate, against the real `kpx-controlplane` binary serving TLS with
//! client certificates: 1,000 idle TCP connections from one address, garbage where a TLS
//! ClientHello belongs from another, and a slowloris handshake (a real ClientHello, one byte at
//! a time) from a third, while two real nodes keep syncing from 127.0.0.1. The nodes' changes
//! still land, a node reconnects in the middle of it, every hostile connection is closed and
//! counted, and the controlplane's memory stays bounded.

mod common;
mod process;

use common::secure::Pki;
use common::{Accept, SimNode};
use kpx_dataplane::stream::SyncEvent;
use process::{ControlplaneProcess, Secure, examples_dir};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const IDLE_CONNECTIONS: usize = 1000;
const GARBAGE_CONNECTIONS: usize = 50;

/// The process's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Room for the attacker's sockets: raise this process's soft descriptor limit to the hard one.
fn raise_fd_limit() {
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("prlimit").args(["--pid", &pid, "--nofile=unlimited:"]).output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        // Not every limit can be raised to unlimited; the hard limit then.
        let hard = std::fs::read_to_string("/proc/self/limits")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
            .unwrap();
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={hard}:")])
            .status()
            .expect("prlimit (util-linux)");
        assert!(status.success());
    }
}

/// A TCP connection to `to` from the loopback address `from` (all of 127/8 is local on Linux).
async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// Whether the server has closed `conn` (EOF or reset) within `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a TLS alert before the close
        }
    }
}

async fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A real ClientHello, as a TLS client would send it.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(pki.rustls_client(), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

async fn next_applied(node: &mut SimNode) -> bool {
    match node.next().await {
        SyncEvent::Applied { full, .. } => full,
        e => panic!("expected an applied update, got {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_real_nodes() {
    raise_fd_limit();
    let pki = Pki::new();
    let manifests = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, manifests.path().join(path.file_name().unwrap())).unwrap();
    }
    let flags = pki.server_flags();
    let file = |p: &Option<std::path::PathBuf>| p.as_ref().unwrap().display().to_string();
    let args = vec![
        "--tls-cert-file".into(),
        file(&flags.tls_cert_file),
        "--tls-private-key-file".into(),
        file(&flags.tls_private_key_file),
        "--client-ca-file".into(),
        file(&flags.client_ca_file),
    ];
    let secure = Secure { args, creds: pki.client(Some(&pki.admin())) };
    let dir = manifests.path().to_path_buf();
    let cp = tokio::task::spawn_blocking(move || {
        ControlplaneProcess::start_secure(std::path::Path::new(env!("CARGO_BIN_EXE_kpx-controlplane")), &dir, secure)
    })
    .await
    .unwrap();
    let url = cp.url();
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let mut node = SimNode::new(name, Box::new(Accept));
        node.connect_with(&url, &pki.client(Some(&pki.node(name)))).await;
        assert!(next_applied(&mut node).await, "{name}: snapshot");
        nodes.push(node);
    }
    let rss_before = rss_kib(cp.pid());

    // The slowloris: a real ClientHello, one byte every 200 ms (the whole would take minutes).
    let hello = client_hello(&pki);
    let addr = cp.addr;
    let slowloris = tokio::spawn(async move {
        let mut conn = connect_from("127.0.0.4", addr).await.unwrap();
        let started = Instant::now();
        for byte in hello {
            if conn.write_all(&[byte]).await.is_err() {
                break;
            }
            if closed_within(&mut conn, Duration::from_millis(200)).await {
                break;
            }
        }
        started.elapsed()
    });

    // 1,000 idle connections from one address: the per-address cap keeps them from taking the
    // places real nodes need.
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        match connect_from("127.0.0.2", cp.addr).await {
            Ok(c) => idle.push(c),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // Garbage instead of a ClientHello, from another address, ten at a time (under its cap).
    for batch in 0..GARBAGE_CONNECTIONS / 10 {
        let mut garbage = tokio::task::JoinSet::new();
        for i in 0..10 {
            garbage.spawn(async move {
                let mut conn = connect_from("127.0.0.3", addr).await.unwrap();
                let junk: Vec<u8> = (0..512).map(|b| (b * 7 + i + batch) as u8).collect();
                let _ = conn.write_all(&junk).await;
                closed_within(&mut conn, Duration::from_secs(10)).await
            });
        }
        while let Some(closed) = garbage.join_next().await {
            assert!(closed.unwrap(), "a garbage connection was left open");
        }
    }

    // Under attack: a change reaches both nodes, and a node reconnects (resuming its version).
    let web = manifests.path().join("web.yaml");
    let set_ready = |ready: bool| {
        let text = std::fs::read_to_string(&web).unwrap();
        let (from, to) = if ready { ("false", "true") } else { ("true", "false") };
        let at = |r: &str| format!("  - 10.244.1.3\n  conditions:\n    ready: {r}");
        let changed = text.replacen(&at(from), &at(to), 1);
        assert_ne!(changed, text);
        std::fs::write(manifests.path().join("web.yaml.new"), changed).unwrap();
        std::fs::rename(manifests.path().join("web.yaml.new"), &web).unwrap();
    };
    set_ready(false);
    for node in &mut nodes {
        assert!(!next_applied(node).await, "the change arrives as a delta");
    }
    nodes[1].disconnect().await;
    nodes[1].connect_with(&url, &pki.client(Some(&pki.node("node-b")))).await;
    nodes[1].expect_quiet(Duration::from_millis(500)).await;
    set_ready(true);
    for node in &mut nodes {
        assert!(!next_applied(node).await, "after the reconnect too, changes arrive as deltas");
    }

    let lasted = slowloris.await.unwrap();
    assert!(lasted < Duration::from_secs(20), "the slowloris handshake was cut off after {lasted:?}");
    let metrics = scrape(cp.metrics_addr).await;
    let rejected =
        |reason: &str| sample(&metrics, &format!("kpx_grpc_connections_rejected_total{{reason=\"{reason}\"}}"));
    assert_eq!(rejected("too_many_unauthenticated_from_address"), (IDLE_CONNECTIONS - 32) as f64, "{metrics}");
    assert!(rejected("handshake_failed") >= GARBAGE_CONNECTIONS as f64, "{metrics}");
    assert!(rejected("handshake_timeout") >= 1.0, "{metrics}");
    assert!(sample(&metrics, "kpx_grpc_unauthenticated_connections") <= 256.0, "{metrics}");
    let rss_after = rss_kib(cp.pid());
    eprintln!("controlplane RSS: {rss_before} KiB before, {rss_after} KiB under attack");
    assert!(rss_after < rss_before + 32 * 1024, "memory grew from {rss_before} to {rss_after} KiB");
    drop(idle);
}
