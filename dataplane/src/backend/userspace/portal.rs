//! A portal's shared state: its endpoints and balancer, the proxy's settings and counters.
//! The listener task and every connection task hold it; the backend updates it in place, so
//! an endpoint change never touches the listener.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::balancer::Balancer;
use super::endpoint::Endpoint;
use super::metrics::ProxyMetrics;
use super::plan::{PortalKey, PortalSpec, Proto};

/// How the proxy treats connections; from the agent's flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long established connections to a removed endpoint may go on; `None`: until they
    /// end (or go idle).
    pub drain_timeout: Option<Duration>,
    /// A TCP connection with no byte in either direction for this long is closed.
    pub tcp_idle_timeout: Option<Duration>,
    /// A UDP flow with no datagram in either direction for this long is closed.
    pub udp_timeout: Duration,
    /// UDP flows per portal at most; datagrams of new clients beyond it are dropped.
    pub max_udp_flows: usize,
    /// Bytes each splice pipe may hold (one pipe per direction and connection, only while bytes
    /// are on their way). 1 MiB, the kernel's default `pipe-max-size`: one stream moved 15%
    /// more than with 256 KiB (docs/performance.md, "Userspace backend"), as each splice pair
    /// moves four times the bytes for the same wake-ups and system calls. Pipes past a budget
    /// keep the kernel's default size (`splice::Pipe::new`).
    pub pipe_size: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            drain_timeout: None,
            tcp_idle_timeout: Some(Duration::from_secs(3600)),
            udp_timeout: Duration::from_secs(30),
            max_udp_flows: 16384,
            pipe_size: 1024 * 1024,
        }
    }
}

/// How long each dial of one client connection may take, attempt by attempt (kube-proxy's
/// userspace schedule); each attempt goes to another endpoint.
pub const DIAL_TIMEOUTS: [Duration; 4] =
    [Duration::from_millis(250), Duration::from_millis(500), Duration::from_secs(1), Duration::from_secs(2)];

#[derive(Debug)]
pub struct Portal {
    pub key: PortalKey,
    /// kube-proxy's ServicePortName, for logs and metrics.
    pub name: String,
    balancer: Mutex<Balancer>,
    pub settings: Arc<Settings>,
    pub metrics: Arc<ProxyMetrics>,
    pub counters: Counters,
}

/// The portal's series, looked up once rather than on every connection.
#[derive(Debug)]
pub struct Counters {
    pub opened: Counter,
    pub active: Gauge,
    pub no_endpoint: Counter,
    pub to_endpoint: Counter,
    pub to_client: Counter,
    pub dial_errors: Counter,
}

impl Counters {
    fn new(m: &ProxyMetrics, proto: Proto, name: &str) -> Counters {
        let (to_endpoint, to_client) = m.bytes(proto);
        Counters {
            opened: m.opened(proto),
            active: m.active(proto),
            no_endpoint: m.no_endpoint(proto),
            to_endpoint,
            to_client,
            dial_errors: m.dial_errors(name),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Portal {
    pub fn new(key: PortalKey, spec: &PortalSpec, settings: Arc<Settings>, metrics: Arc<ProxyMetrics>) -> Portal {
        // Each node starts its rotation somewhere else.
        let start = rand::random::<u32>() as usize;
        let portal = Portal {
            counters: Counters::new(&metrics, key.proto, &spec.name),
            name: spec.name.clone(),
            key,
            balancer: Mutex::new(Balancer::new(start)),
            settings,
            metrics,
        };
        portal.update(spec);
        portal
    }

    /// Takes in a new endpoint list: kept endpoints keep their connections, new ones join the
    /// rotation, removed ones stop getting connections and are retired (their established
    /// connections drain, see [`Settings::drain_timeout`]).
    pub fn update(&self, spec: &PortalSpec) {
        let mut b = lock(&self.balancer);
        let mut old: HashMap<SocketAddr, Arc<Endpoint>> = b.endpoints().iter().map(|e| (e.addr, e.clone())).collect();
        let endpoints: Vec<Arc<Endpoint>> =
            spec.endpoints.iter().map(|a| old.remove(a).unwrap_or_else(|| Arc::new(Endpoint::new(*a)))).collect();
        b.update(endpoints, spec.affinity);
        drop(b);
        self.retire(old.into_values());
    }

    fn retire(&self, gone: impl Iterator<Item = Arc<Endpoint>>) {
        let deadline = self.settings.drain_timeout.map(|d| tokio::time::Instant::now() + d);
        for e in gone {
            tracing::debug!(portal = %self.name, endpoint = %e.addr, "endpoint retired");
            e.retire(deadline);
        }
    }

    /// The portal is closed: every endpoint is retired.
    pub fn close(&self) {
        let all: Vec<Arc<Endpoint>> = {
            let mut b = lock(&self.balancer);
            let all = b.endpoints().to_vec();
            b.update(Vec::new(), None);
            all
        };
        self.retire(all.into_iter());
    }

    pub fn pick(&self, client: IpAddr, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        lock(&self.balancer).pick(client, exclude, Instant::now())
    }

    /// A dial to `addr` failed (refused, unreachable, timed out): counted, and new connections
    /// avoid it for a while.
    pub fn dial_failed(&self, addr: SocketAddr) {
        self.counters.dial_errors.inc();
        lock(&self.balancer).failed(addr, Instant::now());
    }

    /// A dial to `addr` worked.
    pub fn dial_answered(&self, addr: SocketAddr) {
        lock(&self.balancer).answered(addr);
    }

    pub fn endpoint_count(&self) -> usize {
        lock(&self.balancer).endpoints().len()
    }
}
