//! The proxy on loopback in this process's namespace: no root needed. (The kernel tests in
//! tests/userspace.rs cover the rules and the real paths through a node.)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::userspace::plan::Class;

fn key(proto: Proto) -> PortalKey {
    PortalKey { service: "ns/svc".into(), port: "p".into(), proto, family: IpFamily::V4, class: Class::Cluster }
}

fn spec(endpoints: Vec<SocketAddr>) -> PortalSpec {
    PortalSpec { name: "ns/svc:p".into(), endpoints, affinity: None }
}

fn proxy() -> (Proxy, Arc<ProxyMetrics>) {
    let metrics = Arc::new(ProxyMetrics::default());
    (Proxy::new(1, None, Arc::new(Settings::default()), metrics.clone()).unwrap(), metrics)
}

/// A TCP server answering each connection with NAME, after reading to the client's end.
fn server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = c.read_to_end(&mut got);
                let _ = c.write_all(format!("{name} {}", got.len()).as_bytes());
            });
        }
    });
    addr
}

fn ask(port: u16, body: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(body).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn tcp_is_forwarded_with_half_close_and_balanced() {
    let (mut p, metrics) = proxy();
    let (a, b) = (server("a"), server("b"));
    let port = p.open(&key(Proto::Tcp), &spec(vec![a, b])).unwrap();
    let mut seen: Vec<String> = (0..4).map(|_| ask(port, b"hello")).collect();
    seen.sort();
    // The server answers only after the client's end of stream: half-close went through.
    assert_eq!(seen, ["a 5", "a 5", "b 5", "b 5"]);
    let (up, _) = metrics.bytes(Proto::Tcp);
    assert_eq!(up.get(), 20);
}
