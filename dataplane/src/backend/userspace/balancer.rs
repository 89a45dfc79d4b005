//! Choosing an endpoint for a new connection: round-robin over the portal's endpoints, with
//! ClientIP session affinity (kube-proxy's userspace `LoadBalancerRR`): a client that came
//! within the timeout goes back to its endpoint while that endpoint is still there. A dial that
//! fails asks again with the failed endpoints excluded, and the affinity follows the endpoint
//! that answered.
//!
//! An endpoint whose dial just failed is skipped by new connections for [`FAILURE_BACKOFF`]
//! (unless every endpoint failed), so that until the controlplane removes it, one client pays
//! for the refusal instead of one in N. Pure apart from the clock, which callers pass in.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::endpoint::Endpoint;

/// Affinity entries kept per portal at most; past it, new clients are balanced without being
/// remembered until expired entries are swept (a bound on memory, not a behaviour anyone
/// should meet: it is one entry per client address).
const MAX_AFFINITY_ENTRIES: usize = 65536;

/// Expired entries are swept every this many picks (and when the table is full).
const SWEEP_EVERY: u32 = 4096;

/// How long new connections avoid an endpoint after a dial to it failed.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<Arc<Endpoint>>,
    next: usize,
    affinity: Option<Duration>,
    clients: HashMap<IpAddr, (SocketAddr, Instant)>,
    picks: u32,
    /// Endpoints whose last dial failed, and when.
    failed: HashMap<SocketAddr, Instant>,
}

impl Balancer {
    /// Starts the round robin at `start` (mod the count), so that nodes do not all send their
    /// first connections to the same endpoint.
    pub fn new(start: usize) -> Balancer {
        Balancer { next: start, ..Balancer::default() }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Replaces the endpoints and the affinity timeout. Clients whose endpoint left forget it;
    /// without affinity every client is forgotten.
    pub fn update(&mut self, endpoints: Vec<Arc<Endpoint>>, affinity: Option<Duration>) {
        self.endpoints = endpoints;
        self.affinity = affinity;
        let live: Vec<SocketAddr> = self.endpoints.iter().map(|e| e.addr).collect();
        self.failed.retain(|a, _| live.contains(a));
        if affinity.is_none() {
            self.clients.clear();
        } else {
            self.clients.retain(|_, (ep, _)| live.contains(ep));
        }
    }

    /// The endpoint for a new connection from `client`, none of `exclude` (endpoints that just
    /// failed for this connection). `None` when no endpoint is left.
    /// A dial to `addr` failed at `now`.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) {
        if self.endpoints.iter().any(|e| e.addr == addr) {
            self.failed.insert(addr, now);
        }
    }

    /// A dial to `addr` worked: it is in good standing again.
    pub fn answered(&mut self, addr: SocketAddr) {
        if !self.failed.is_empty() {
            self.failed.remove(&addr);
        }
    }

    pub fn pick(&mut self, client: IpAddr, exclude: &[SocketAddr], now: Instant) -> Option<Arc<Endpoint>> {
        self.failed.retain(|_, at| now.saturating_duration_since(*at) < FAILURE_BACKOFF);
        if !self.failed.is_empty() {
            let mut avoid: Vec<SocketAddr> = exclude.to_vec();
            avoid.extend(self.failed.keys());
            if let Some(ep) = self.pick_among(client, &avoid, now) {
                return Some(ep);
            }
        }
        self.pick_among(client, exclude, now)
    }

    fn pick_among(&mut self, client: IpAddr, exclude: &[SocketAddr], now: Instant) -> Option<Arc<Endpoint>> {
        self.picks = self.picks.wrapping_add(1);
        if let Some(ttl) = self.affinity {
            if self.picks.is_multiple_of(SWEEP_EVERY) || self.clients.len() >= MAX_AFFINITY_ENTRIES {
                self.clients.retain(|_, (_, used)| now.saturating_duration_since(*used) < ttl);
            }
            if let Some((addr, used)) = self.clients.get_mut(&client)
                && now.saturating_duration_since(*used) < ttl
                && !exclude.contains(addr)
                && let Some(ep) = self.endpoints.iter().find(|e| e.addr == *addr)
            {
                *used = now;
                return Some(ep.clone());
            }
        }
        let n = self.endpoints.len();
        let ep = (0..n).map(|i| &self.endpoints[(self.next + i) % n]).find(|e| !exclude.contains(&e.addr))?.clone();
        let index = self.endpoints.iter().position(|e| Arc::ptr_eq(e, &ep)).unwrap_or(0);
        self.next = (index + 1) % n;
        if self.affinity.is_some() && (self.clients.len() < MAX_AFFINITY_ENTRIES || self.clients.contains_key(&client))
        {
            self.clients.insert(client, (ep.addr, now));
        }
        Some(ep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(addrs: &[&str]) -> Vec<Arc<Endpoint>> {
        addrs.iter().map(|a| Arc::new(Endpoint::new(a.parse().unwrap()))).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn picks(b: &mut Balancer, client: &str, n: usize, now: Instant) -> Vec<String> {
        (0..n).map(|_| b.pick(ip(client), &[], now).map(|e| e.addr.to_string()).unwrap_or_default()).collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let mut b = Balancer::new(1);
        b.update(eps(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]), None);
        let now = Instant::now();
        assert_eq!(picks(&mut b, "10.1.0.1", 4, now), ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"]);
        // An endpoint leaving does not break the rotation.
        b.update(eps(&["10.0.0.1:80", "10.0.0.3:80"]), None);
        let got = picks(&mut b, "10.1.0.1", 4, now);
        assert_eq!(got.iter().filter(|a| *a == "10.0.0.1:80").count(), 2, "{got:?}");
        assert_eq!(got.iter().filter(|a| *a == "10.0.0.3:80").count(), 2, "{got:?}");
    }

    #[test]
    fn excluded_endpoints_are_skipped_and_none_left_is_none() {
        let mut b = Balancer::new(0);
        let now = Instant::now();
        assert!(b.pick(ip("10.1.0.1"), &[], now).is_none(), "no endpoints");
        b.update(eps(&["10.0.0.1:80", "10.0.0.2:80"]), None);
        let refused: SocketAddr = "10.0.0.1:80".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(b.pick(ip("10.1.0.1"), &[refused], now).unwrap().addr.to_string(), "10.0.0.2:80");
        }
        let all = ["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()];
        assert!(b.pick(ip("10.1.0.1"), &all, now).is_none());
    }

    #[test]
    fn affinity_sticks_until_the_timeout_then_rebalances() {
        let mut b = Balancer::new(0);
        b.update(eps(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]), Some(Duration::from_secs(10)));
        let t0 = Instant::now();
        let first = picks(&mut b, "10.1.0.1", 5, t0);
        assert!(first.iter().all(|a| *a == first[0]), "{first:?}");
        // Another client gets the next endpoint, and sticks to it too.
        let other = picks(&mut b, "10.1.0.2", 3, t0);
        assert!(other.iter().all(|a| *a == other[0]) && other[0] != first[0], "{other:?}");
        // Used 9 s later: still there, and the use renews it.
        assert_eq!(picks(&mut b, "10.1.0.1", 1, t0 + Duration::from_secs(9)), [first[0].clone()]);
        assert_eq!(picks(&mut b, "10.1.0.1", 1, t0 + Duration::from_secs(18)), [first[0].clone()]);
        // Idle for the whole timeout: balanced again (the next endpoint in turn).
        let later = picks(&mut b, "10.1.0.1", 1, t0 + Duration::from_secs(28));
        assert_ne!(later, [first[0].clone()]);
    }

    #[test]
    fn a_failed_endpoint_is_avoided_for_the_backoff_unless_nothing_else_is_left() {
        let mut b = Balancer::new(0);
        b.update(eps(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]), None);
        let t0 = Instant::now();
        let bad: SocketAddr = "10.0.0.2:80".parse().unwrap();
        b.failed(bad, t0);
        let during = picks(&mut b, "10.1.0.1", 6, t0 + Duration::from_secs(1));
        assert!(!during.contains(&bad.to_string()), "{during:?}");
        assert_eq!(during.iter().filter(|a| *a == "10.0.0.1:80").count(), 3, "the others share evenly: {during:?}");
        // Every endpoint failed: they are all tried again rather than none.
        b.failed("10.0.0.1:80".parse().unwrap(), t0);
        b.failed("10.0.0.3:80".parse().unwrap(), t0);
        assert!(b.pick(ip("10.1.0.1"), &[], t0).is_some());
        // After the backoff, or once it answered, it is back in the rotation.
        let after = picks(&mut b, "10.1.0.1", 3, t0 + FAILURE_BACKOFF);
        assert!(after.contains(&bad.to_string()), "{after:?}");
        b.failed(bad, t0 + FAILURE_BACKOFF);
        b.answered(bad);
        let answered = picks(&mut b, "10.1.0.1", 3, t0 + FAILURE_BACKOFF);
        assert!(answered.contains(&bad.to_string()), "{answered:?}");
    }

    #[test]
    fn affinity_follows_a_failed_dial_and_forgets_removed_endpoints() {
        let mut b = Balancer::new(0);
        b.update(eps(&["10.0.0.1:80", "10.0.0.2:80"]), Some(Duration::from_secs(60)));
        let now = Instant::now();
        let first = b.pick(ip("10.1.0.1"), &[], now).unwrap().addr;
        // Its endpoint refused: the retry goes elsewhere and the client now sticks there.
        let second = b.pick(ip("10.1.0.1"), &[first], now).unwrap().addr;
        assert_ne!(first, second);
        assert_eq!(b.pick(ip("10.1.0.1"), &[], now).unwrap().addr, second);
        // Its endpoint removed: balanced among the rest.
        b.update(eps(&["10.0.0.1:80"]), Some(Duration::from_secs(60)));
        assert_eq!(b.pick(ip("10.1.0.1"), &[], now).unwrap().addr.to_string(), "10.0.0.1:80");
    }
}
