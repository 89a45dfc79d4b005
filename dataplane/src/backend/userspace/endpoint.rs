//! One endpoint of a portal, shared by the balancer and the connections to it, so that removing
//! it can tell those connections (`--userspace-drain-timeout`).

use std::net::SocketAddr;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    /// Removed; established connections end at the deadline (none: when they end).
    Retired(Option<Instant>),
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    state: watch::Sender<State>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint { addr, state: watch::Sender::new(State::Serving) }
    }

    /// Taken out of service; its TCP connections must end by `deadline` (none: they drain).
    pub fn retire(&self, deadline: Option<Instant>) {
        self.state.send_replace(State::Retired(deadline));
    }

    /// Resolves when the endpoint is retired, with the deadline of its connections.
    pub async fn retired(&self) -> Option<Instant> {
        let mut rx = self.state.subscribe();
        loop {
            if let State::Retired(deadline) = *rx.borrow_and_update() {
                return deadline;
            }
            // The sender lives as long as `self`: changed() fails only if it is gone.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when connections to this endpoint must end: never while it serves, nor after
    /// a retirement without a deadline.
    pub async fn closing(&self) {
        match self.retired().await {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}
