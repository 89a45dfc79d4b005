//! A test helper, not part of kpx: the "pod" and the "client" of the kernel tests.
//!
//! ```text
//! kpx-testpod serve NAME ADDR:PORT...                 TCP and UDP on every address; each reply is
//!                                                     "NAME PEER LOCAL" (who answered, the source
//!                                                     address it saw, the address it was reached on)
//! kpx-testpod get tcp|udp ADDR:PORT [--from IP|IP:PORT] [--timeout-ms N]
//!                                                     one request; prints "answered NAME PEER LOCAL",
//!                                                     "refused", "unreachable", "reset" or "timeout"
//! kpx-testpod sysctl KEY VALUE [KEY VALUE]...        writes /proc/sys/KEY (dots as slashes)
//! kpx-testpod echo-serve NAME ADDR:PORT...            TCP echo with a trailer (see bulk.rs)
//! kpx-testpod transfer ADDR:PORT --bytes N [--pause-after M]
//!                                                     a checksummed bulk transfer (see bulk.rs)
//! ```
//!
//! `serve` prints `ready` once every socket is bound and exits 0 on SIGTERM. The peer address
//! in a reply tells a test whether the proxy SNATed (the node's address) or kept the client's.
//! `sysctl` exists because net.* sysctls are per network namespace: run under `ip netns exec`,
//! it changes the namespace's value without needing procps or a shell. Every outcome of `get`
//! exits 0; only usage and local errors exit non-zero.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

#[path = "kpx-testpod/bulk.rs"]
mod bulk;

const USAGE: &str = "usage: kpx-testpod serve NAME ADDR:PORT... | get tcp|udp ADDR:PORT [--from IP] [--timeout-ms N] \
                     | sysctl KEY VALUE [KEY VALUE]... | echo-serve NAME ADDR:PORT... \
                     | transfer ADDR:PORT --bytes N [--pause-after M]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = match args.first().map(String::as_str) {
        Some("serve") => runtime.block_on(serve(&args[1..])),
        Some("get") => runtime.block_on(get(&args[1..])),
        Some("sysctl") => sysctl(&args[1..]),
        Some("echo-serve") => runtime.block_on(bulk::echo_serve(&args[1..])),
        Some("transfer") => runtime.block_on(bulk::transfer(&args[1..])),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kpx-testpod: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address {s:?}: {e}"))
}

/// `--from IP` (any port) or `--from IP:PORT` (a fixed source port, as a long-lived client).
fn parse_from(value: &str) -> Result<SocketAddr, String> {
    match value.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, 0)),
        Err(_) => value.parse().map_err(|e| format!("bad --from {value:?}: {e}")),
    }
}

fn reply(name: &str, peer: SocketAddr, local: SocketAddr) -> String {
    format!("{name} {peer} {local}\n")
}

async fn serve(args: &[String]) -> Result<(), String> {
    let [name, addrs @ ..] = args else { return Err(USAGE.to_string()) };
    if addrs.is_empty() || name.contains(char::is_whitespace) {
        return Err(USAGE.to_string());
    }
    let mut tasks = tokio::task::JoinSet::new();
    for addr in addrs {
        let addr = parse_addr(addr)?;
        let tcp = TcpListener::bind(addr).await.map_err(|e| format!("tcp bind {addr}: {e}"))?;
        let udp = UdpSocket::bind(addr).await.map_err(|e| format!("udp bind {addr}: {e}"))?;
        let n = name.clone();
        tasks.spawn(async move {
            loop {
                let Ok((mut conn, peer)) = tcp.accept().await else { continue };
                let local = conn.local_addr().unwrap_or(addr);
                let text = reply(&n, peer, local);
                tokio::spawn(async move {
                    let _ = conn.write_all(text.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        let n = name.clone();
        tasks.spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((_, peer)) = udp.recv_from(&mut buf).await else { continue };
                // Bound to one address, so that address is the one the datagram reached.
                let _ = udp.send_to(reply(&n, peer, addr).as_bytes(), peer).await;
            }
        });
    }
    println!("ready");
    until_signalled().await?;
    tasks.abort_all();
    Ok(())
}

/// Returns on SIGTERM or SIGINT.
async fn until_signalled() -> Result<(), String> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// What one request came to; printed as one line.
enum Outcome {
    Answered(String),
    Refused,
    Unreachable,
    Reset,
    Timeout,
}

impl Outcome {
    fn from_error(e: &std::io::Error) -> Option<Outcome> {
        match e.kind() {
            ErrorKind::ConnectionRefused => Some(Outcome::Refused),
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Some(Outcome::Unreachable),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => Some(Outcome::Reset),
            ErrorKind::TimedOut => Some(Outcome::Timeout),
            _ => None,
        }
    }
}

async fn get(args: &[String]) -> Result<(), String> {
    let [proto, addr, rest @ ..] = args else { return Err(USAGE.to_string()) };
    let addr = parse_addr(addr)?;
    let mut from: Option<SocketAddr> = None;
    let mut timeout = Duration::from_secs(2);
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--from" => from = Some(parse_from(value)?),
            "--timeout-ms" => {
                timeout = Duration::from_millis(value.parse().map_err(|e| format!("bad --timeout-ms: {e}"))?)
            }
            _ => return Err(USAGE.to_string()),
        }
    }
    let any: IpAddr = if addr.is_ipv4() { [0u8; 4].into() } else { [0u16; 8].into() };
    let source = from.unwrap_or(SocketAddr::new(any, 0));
    let attempt = async {
        match proto.as_str() {
            "tcp" => tcp_get(source, addr).await,
            "udp" => udp_get(source, addr).await,
            _ => Err(std::io::Error::other(USAGE)),
        }
    };
    let outcome = match tokio::time::timeout(timeout, attempt).await {
        Err(_elapsed) => Outcome::Timeout,
        Ok(Ok(text)) => Outcome::Answered(text),
        Ok(Err(e)) => Outcome::from_error(&e).ok_or_else(|| format!("{proto} {addr}: {e}"))?,
    };
    match outcome {
        Outcome::Answered(text) => println!("answered {}", text.trim_end()),
        Outcome::Refused => println!("refused"),
        Outcome::Unreachable => println!("unreachable"),
        Outcome::Reset => println!("reset"),
        Outcome::Timeout => println!("timeout"),
    }
    Ok(())
}

async fn tcp_get(source: SocketAddr, addr: SocketAddr) -> std::io::Result<String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(source)?;
    let mut conn = socket.connect(addr).await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    if text.is_empty() {
        // Accepted and closed without a word: not one of our pods.
        return Err(std::io::Error::new(ErrorKind::ConnectionReset, "closed without a reply"));
    }
    Ok(text)
}

async fn udp_get(source: SocketAddr, addr: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind(source).await?;
    // Connected, so an ICMP port unreachable comes back as ECONNREFUSED on recv.
    socket.connect(addr).await?;
    socket.send(b"?").await?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn sysctl(args: &[String]) -> Result<(), String> {
    if args.is_empty() || !args.len().is_multiple_of(2) {
        return Err(USAGE.to_string());
    }
    for pair in args.chunks(2) {
        let (key, value) = (&pair[0], &pair[1]);
        if key.contains("..") || key.contains('/') {
            return Err(format!("bad sysctl key {key:?}"));
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| format!("write {path}: {e}"))?;
    }
    Ok(())
}
