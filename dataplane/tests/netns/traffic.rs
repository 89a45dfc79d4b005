//! Real traffic: backend pods that answer with their name and the source address they saw,
//! and one-shot TCP/UDP requests from any namespace, classified by outcome. Both sides are the
//! kpx-testpod helper binary run under `ip netns exec`.

use super::{NetNs, NsChild, Pod, TESTPOD};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How long a backend may take to bind and answer.
const READY_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What a backend said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The pod's name.
    pub pod: String,
    /// The source address the pod saw: the client's when the proxy kept it, a node's after SNAT.
    pub peer: SocketAddr,
    /// The address the pod was reached on (after DNAT: the pod's own).
    pub local: SocketAddr,
}

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answered(Reply),
    /// TCP RST, or ICMP port unreachable (what iptables REJECT sends by default).
    Refused,
    /// ICMP host/network unreachable or prohibited.
    Unreachable,
    /// Connected, then reset or closed without a reply.
    Reset,
    /// Nothing came back in time (dropped somewhere).
    TimedOut,
}

impl Outcome {
    /// The answering pod's name, if it was answered.
    pub fn pod(&self) -> Option<&str> {
        match self {
            Outcome::Answered(r) => Some(&r.pod),
            _ => None,
        }
    }

    /// The reply; panics naming the outcome otherwise.
    pub fn expect_answer(self, what: &str) -> Reply {
        match self {
            Outcome::Answered(r) => r,
            other => panic!("{what}: expected an answer, got {other:?}"),
        }
    }

    fn parse(line: &str) -> Outcome {
        match line.trim() {
            "refused" => Outcome::Refused,
            "unreachable" => Outcome::Unreachable,
            "reset" => Outcome::Reset,
            "timeout" => Outcome::TimedOut,
            other => {
                let fields: Vec<&str> = other.strip_prefix("answered ").unwrap_or("").split(' ').collect();
                let [pod, peer, local] = fields[..] else { panic!("kpx-testpod get printed {other:?}") };
                Outcome::Answered(Reply {
                    pod: pod.to_string(),
                    peer: peer.parse().unwrap_or_else(|e| panic!("peer in {other:?}: {e}")),
                    local: local.parse().unwrap_or_else(|e| panic!("local in {other:?}: {e}")),
                })
            }
        }
    }
}

impl NetNs {
    /// One request from this namespace to ADDR, from FROM (one of this namespace's addresses)
    /// or the routing's choice. Panics only when the helper itself fails.
    pub fn request(&self, proto: Proto, addr: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> Outcome {
        self.request_with(proto, addr, from.map(|f| f.to_string()), timeout)
    }

    /// Like [`NetNs::request`], from a fixed source address and port (a client that keeps its
    /// port, as UDP clients of one flow do).
    pub fn request_from_port(&self, proto: Proto, addr: SocketAddr, from: SocketAddr, timeout: Duration) -> Outcome {
        self.request_with(proto, addr, Some(from.to_string()), timeout)
    }

    fn request_with(&self, proto: Proto, addr: SocketAddr, from: Option<String>, timeout: Duration) -> Outcome {
        let addr = addr.to_string();
        let ms = timeout.as_millis().to_string();
        let mut argv = vec![TESTPOD, "get", proto.as_str(), &addr, "--timeout-ms", &ms];
        if let Some(f) = &from {
            argv.extend(["--from", f]);
        }
        let out = self.exec(&argv);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!("{argv:?} in {}: {}{}", self.name(), String::from_utf8_lossy(&out.stderr).trim(), stdout.trim());
        }
        Outcome::parse(&stdout)
    }

    pub fn tcp_request(&self, addr: SocketAddr, timeout: Duration) -> Outcome {
        self.request(Proto::Tcp, addr, None, timeout)
    }

    pub fn udp_request(&self, addr: SocketAddr, timeout: Duration) -> Outcome {
        self.request(Proto::Udp, addr, None, timeout)
    }

    /// N requests; how many each outcome got, keyed by pod name or by outcome
    /// ("refused", "timedout", ...). For load-balancing and "traffic stopped going there" checks.
    pub fn tally(&self, proto: Proto, addr: SocketAddr, n: usize, timeout: Duration) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let key = match self.request(proto, addr, None, timeout) {
                Outcome::Answered(r) => r.pod,
                other => format!("{other:?}").to_lowercase(),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }
}

/// A pod's server process (kpx-testpod serve): TCP and UDP on each port at the pod's IPv4
/// and IPv6 addresses, killed when dropped.
#[derive(Debug)]
pub struct Backend {
    pub pod: String,
    pub addrs: Vec<SocketAddr>,
    child: NsChild,
}

impl Backend {
    /// Starts it and waits until it is bound and answers a TCP and a UDP request from inside
    /// its own namespace on every address.
    pub fn start(pod: &Pod, ports: &[u16]) -> Backend {
        let addrs: Vec<SocketAddr> =
            ports.iter().flat_map(|&port| pod.ips().map(|ip| SocketAddr::new(ip, port))).collect();
        let addr_args: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        let mut argv = vec![TESTPOD, "serve", pod.name.as_str()];
        argv.extend(addr_args.iter().map(String::as_str));
        let mut child = pod.ns.spawn(&argv);
        let stdout = child.child_mut().stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(READY_WAIT) {
            Ok(line) if line.trim() == "ready" => {}
            other => panic!("backend {} did not start ({other:?}); its stderr is above", pod.name),
        }
        let backend = Backend { pod: pod.name.clone(), addrs, child };
        for &addr in &backend.addrs {
            for proto in [Proto::Tcp, Proto::Udp] {
                let got = pod.ns.request(proto, addr, None, Duration::from_secs(2));
                assert_eq!(got.pod(), Some(pod.name.as_str()), "backend {} on {proto:?} {addr}", pod.name);
            }
        }
        backend
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Polls F until it returns Some (then that value), or panics after TIMEOUT naming WHAT.
/// For waiting on rules to appear; never for asserting how long something took.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
