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

/// A port nothing listens on (bound, then closed).
fn dead_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn a_refused_endpoint_is_retried_on_the_next_within_the_connection() {
    let (mut p, metrics) = proxy();
    let live = server("live");
    let port = p.open(&key(Proto::Tcp), &spec(vec![dead_port(), live])).unwrap();
    for _ in 0..6 {
        assert_eq!(ask(port, b""), "live 0");
    }
    // One connection met the refusing endpoint; the next ones avoid it (see the balancer).
    assert_eq!(metrics.dial_errors("ns/svc:p").get(), 1);
}

#[test]
fn no_endpoint_resets_the_client() {
    let (mut p, metrics) = proxy();
    let port = p.open(&key(Proto::Tcp), &spec(vec![dead_port()])).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = c.read(&mut [0u8; 16]).expect_err("reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(metrics.no_endpoint(Proto::Tcp).get(), 1);
}

/// A connection through the proxy that stays open: a server that holds it and echoes.
fn held_connection(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
    c
}

fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
            });
        }
    });
    addr
}

#[test]
fn removed_endpoints_drain_or_are_cut_at_the_drain_timeout() {
    for (drain, cut) in [(None, false), (Some(Duration::ZERO), true)] {
        let metrics = Arc::new(ProxyMetrics::default());
        let settings = Settings { drain_timeout: drain, ..Settings::default() };
        let mut p = Proxy::new(1, None, Arc::new(settings), metrics).unwrap();
        let (old, new) = (echo_server(), server("new"));
        let port = p.open(&key(Proto::Tcp), &spec(vec![old])).unwrap();
        let mut held = held_connection(port);
        p.open(&key(Proto::Tcp), &spec(vec![new])).unwrap();
        // New connections go to the remaining endpoint either way.
        assert_eq!(ask(port, b""), "new 0");
        let mut round_trip = || held.write_all(b"y").and_then(|()| held.read_exact(&mut [0u8; 1]));
        if cut {
            // Reset soon after the removal (the proxy's task sees it asynchronously).
            until("the connection to be cut", || round_trip().is_err());
        } else {
            round_trip().expect("still forwarded while it drains");
        }
    }
}

#[test]
fn udp_replies_come_from_the_address_the_client_sent_to() {
    let (mut p, metrics) = proxy();
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, from)) = backend.recv_from(&mut b) {
            let _ = backend.send_to(&[b"pong:".as_slice(), &b[..n]].concat(), from);
        }
    });
    let port = p.open(&key(Proto::Udp), &spec(vec![dead_udp(), backend_addr])).unwrap();
    for target in ["127.0.0.1", "127.0.0.2"] {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Connected: a reply from any other address than the one sent to is not delivered.
        c.connect((target, port)).unwrap();
        for i in 0..3 {
            c.send(format!("{i}").as_bytes()).unwrap();
            let mut b = [0u8; 64];
            let n = c.recv(&mut b).unwrap();
            assert_eq!(&b[..n], format!("pong:{i}").as_bytes(), "to {target}");
        }
    }
    // The refusing endpoint was tried by one flow, which resent its datagram to the other.
    assert_eq!(metrics.dial_errors("ns/svc:p").get(), 1);
    assert_eq!(metrics.opened(Proto::Udp).get(), 2);
}

/// A UDP port nothing listens on: datagrams there get ICMP port unreachable.
fn dead_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn proxy_with(settings: Settings) -> (Proxy, Arc<ProxyMetrics>) {
    let metrics = Arc::new(ProxyMetrics::default());
    (Proxy::new(1, None, Arc::new(settings), metrics.clone()).unwrap(), metrics)
}

/// Polls F until true (or panics after 10 s naming WHAT): waits for an effect, asserts no time.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn idle_tcp_connections_are_reset_and_udp_flows_end() {
    let idle = Duration::from_millis(200);
    let settings = Settings { tcp_idle_timeout: Some(idle), udp_timeout: idle, ..Settings::default() };
    let (mut p, metrics) = proxy_with(settings);
    let port = p.open(&key(Proto::Tcp), &spec(vec![echo_server()])).unwrap();
    let mut held = held_connection(port);
    // Nothing moves: the proxy resets both sides (the read fails rather than ending cleanly).
    let err = held.read(&mut [0u8; 1]).expect_err("reset after the idle timeout");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(metrics.active(Proto::Tcp).get(), 0);

    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok((n, from)) = backend.recv_from(&mut b) {
            let _ = backend.send_to(&b[..n], from);
        }
    });
    let port = p.open(&key(Proto::Udp), &spec(vec![backend_addr])).unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.connect(("127.0.0.1", port)).unwrap();
    c.send(b"x").unwrap();
    c.recv(&mut [0u8; 8]).unwrap();
    assert_eq!(metrics.active(Proto::Udp).get(), 1);
    until("the idle flow to end", || metrics.active(Proto::Udp).get() == 0);
    // The client's next datagram opens a new flow.
    c.send(b"y").unwrap();
    c.recv(&mut [0u8; 8]).unwrap();
    assert_eq!(metrics.opened(Proto::Udp).get(), 2);
}

#[test]
fn a_closed_portal_stops_accepting_and_its_connections_drain() {
    let (mut p, metrics) = proxy();
    let port = p.open(&key(Proto::Tcp), &spec(vec![echo_server()])).unwrap();
    let mut held = held_connection(port);
    p.close(&key(Proto::Tcp));
    until("the listener to close", || TcpStream::connect(("127.0.0.1", port)).is_err());
    // Established: still forwarded (no drain timeout by default).
    held.write_all(b"z").unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"z");
    assert_eq!(metrics.active(Proto::Tcp).get(), 1);
}

#[test]
fn a_reader_that_does_not_read_stops_the_writer() {
    // The endpoint accepts and never reads.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = std::thread::spawn(move || l.accept().map(|(c, _)| c));
    let (mut p, _) = proxy();
    let port = p.open(&key(Proto::Tcp), &spec(vec![addr])).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _server_side = held.join().unwrap().unwrap();
    c.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let (mut written, mut stalls) = (0usize, 0);
    // Until the writes have stopped for a while: every buffer on the way is full.
    while stalls < 20 {
        match c.write(&chunk) {
            Ok(n) => {
                written += n;
                stalls = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("write: {e}"),
        }
        // Socket buffers (a few MiB each way) and one pipe, not a buffer that grows.
        assert!(written < 64 << 20, "the proxy took {written} bytes from a client whose reader does not read");
    }
    assert!(written > 0);
}
