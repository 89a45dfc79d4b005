//! The node's side of the Sync stream: subscribe, apply, ack or nack, reconnect.
//!
//! [`Session::run`] drives one stream; [`run_forever`] reconnects with exponential backoff and
//! jitter and keeps the applied state across streams, so a reconnect reports the version the
//! node runs and the controlplane answers with a delta (or nothing) instead of a snapshot.
//! While the controlplane is unreachable nothing is torn down: the kernel keeps its rules.

use crate::state::{AppliedState, ChangeSet};
use kpx_auth::client::{AuthChannel, ClientCredentials, ConnectError};
use kpx_proto::v1 as pb;
use kpx_proto::v1::sync_client::SyncClient;
use kpx_telemetry::span::{Attr, DistSpan, Start, W3c};
use prost::Message;
use rand::Rng;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Programs what the node's state says. Implemented by the kernel backends; tests and
/// benchmarks use in-memory ones.
pub trait Apply: Send {
    /// Called after `state` took in an update; `changes` names what changed. An error makes the
    /// node NACK the version.
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String>;
}

impl<T: Apply + ?Sized> Apply for Box<T> {
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        (**self).apply(state, changes)
    }
}

/// Does nothing: for nodes that only keep the state (simulations, dry runs).
#[derive(Debug, Default)]
pub struct NoBackend;

impl Apply for NoBackend {
    fn apply(&mut self, _: &AppliedState, _: &ChangeSet) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node_name: String,
    pub backend: String,
    pub ip_families: Vec<String>,
    pub zone: String,
}

/// How many changes an update carries, counted as kube-proxy counts them: one service change
/// per service added, changed or removed, one endpoints change per service whose endpoints
/// changed (kube-proxy counts EndpointSlice updates; kpx's updates are per service).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub services: usize,
    pub endpoints: usize,
}

impl ChangeCounts {
    pub fn of(update: &pb::Update) -> ChangeCounts {
        // A service may be both removed and upserted (replaced, in a delta from a digest):
        // one change.
        let upserted = update.services_upserted.iter().map(|s| (s.namespace.as_str(), s.name.as_str()));
        let removed = update.services_removed.iter().map(|r| (r.namespace.as_str(), r.name.as_str()));
        let services = upserted.chain(removed).collect::<std::collections::BTreeSet<_>>().len();
        let endpoints: std::collections::BTreeSet<&str> = update
            .upserted_endpoints()
            .map(|(service, _)| service)
            .chain(update.endpoints_removed.iter().map(|e| e.service.as_str()))
            .collect();
        ChangeCounts { services, endpoints: endpoints.len() }
    }
}

/// What happened on the stream, for observers (metrics, tests, benchmarks).
#[derive(Clone, Debug)]
pub enum SyncEvent {
    Connected,
    Applied {
        nonce: u64,
        version: String,
        full: bool,
        entries: usize,
        changes: ChangeCounts,
        wire_bytes: usize,
        chunks: usize,
        apply: Duration,
        /// When each change the update carries started (`TraceContext.change_time_unix_ms`,
        /// ms since the epoch; unknown ones left out).
        change_times_unix_ms: Vec<i64>,
        /// When the rules were in the kernel (the backend's apply returned successfully).
        programmed_at: SystemTime,
    },
    Rejected {
        nonce: u64,
        version: String,
        error: String,
        /// The changes this update carried, which are not programmed now.
        changes: ChangeCounts,
    },
    Disconnected {
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot connect to the controlplane at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("controlplane credentials: {0}")]
    Credentials(#[from] kpx_auth::client::CredentialError),
    #[error("controlplane stream failed: {0}")]
    Stream(#[from] tonic::Status),
    #[error("controlplane closed the stream")]
    Closed,
}

/// Connects without credentials (plaintext on loopback: tests and benchmarks).
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<AuthChannel, StreamError> {
    connect_with(endpoint, &ClientCredentials::default(), timeout).await
}

/// Connects with `creds`, read from their files now (a rotated certificate or token is picked
/// up at the next connect).
pub async fn connect_with(
    endpoint: &str,
    creds: &ClientCredentials,
    timeout: Duration,
) -> Result<AuthChannel, StreamError> {
    let tune = |ep: tonic::transport::Endpoint| {
        ep.connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
    };
    kpx_auth::client::connect(endpoint, creds, tune).await.map_err(|e| match e {
        ConnectError::Credentials(c) => StreamError::Credentials(c),
        ConnectError::Transport(t) => StreamError::Connect { endpoint: endpoint.to_string(), reason: root_cause(&t) },
    })
}

/// tonic's transport errors display as "transport error"; the useful part (refused, a TLS
/// alert, an untrusted certificate) is at the bottom of the source chain.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// One node's sync state, kept across streams.
pub struct Session<A: Apply> {
    pub identity: NodeIdentity,
    pub state: AppliedState,
    pub backend: A,
    pub events: Option<mpsc::UnboundedSender<SyncEvent>>,
}

impl<A: Apply> Session<A> {
    pub fn new(identity: NodeIdentity, backend: A) -> Self {
        Session { identity, state: AppliedState::default(), backend, events: None }
    }

    fn emit(&self, e: SyncEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    /// Runs one Sync stream until it ends. Returns the reason it ended.
    pub async fn run(&mut self, channel: AuthChannel) -> StreamError {
        self.run_until(channel, std::future::pending()).await
    }

    /// Like [`Session::run`], but hangs up when `stop` resolves (the state is kept).
    pub async fn run_until(
        &mut self,
        channel: AuthChannel,
        stop: impl std::future::Future<Output = ()>,
    ) -> StreamError {
        tokio::select! {
            r = self.run_inner(channel) => match r {
                Ok(()) => StreamError::Closed,
                Err(e) => e,
            },
            _ = stop => StreamError::Closed,
        }
    }

    async fn run_inner(&mut self, channel: AuthChannel) -> Result<(), StreamError> {
        let (tx, rx) = mpsc::channel::<pb::NodeMessage>(4);
        let subscribe = pb::Subscribe {
            node_name: self.identity.node_name.clone(),
            backend: self.identity.backend.clone(),
            ip_families: self.identity.ip_families.clone(),
            zone: self.identity.zone.clone(),
            applied_version: self.state.version().map(|v| v.to_version()).unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Subscribe(subscribe)) })
            .await
            .map_err(|_| StreamError::Closed)?;
        let mut client = SyncClient::new(channel).max_decoding_message_size(kpx_proto::MAX_MESSAGE_BYTES);
        let mut inbound = client.sync(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        self.emit(SyncEvent::Connected);
        let mut assembler = crate::state::ChunkAssembler::default();
        let (mut wire_bytes, mut chunks) = (0usize, 0usize);
        while let Some(chunk) = inbound.message().await? {
            wire_bytes += chunk.encoded_len();
            chunks += 1;
            let Some(update) = assembler.push(chunk) else { continue };
            if update.send_digest {
                // A controlplane that does not know our version: tell it what we run instead
                // of taking a snapshot; it answers with a delta.
                tracing::info!(version = %self.state.version().map(|v| v.to_version()).unwrap_or_default(), "controlplane asked for a digest of the applied state");
                for d in self.state.digest(update.nonce) {
                    tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Digest(d)) })
                        .await
                        .map_err(|_| StreamError::Closed)?;
                }
                (wire_bytes, chunks) = (0, 0);
                continue;
            }
            let ack = self.apply(update, std::mem::take(&mut wire_bytes), std::mem::take(&mut chunks));
            tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Ack(ack)) })
                .await
                .map_err(|_| StreamError::Closed)?;
        }
        Ok(())
    }

    /// Applies one whole update and builds the answer.
    pub fn apply(&mut self, mut update: pb::Update, wire_bytes: usize, chunks: usize) -> pb::Ack {
        let started = Instant::now();
        let entries = update.services_upserted.len()
            + update.services_removed.len()
            + update.upserted_endpoint_count()
            + update.endpoints_removed.len();
        let counts = ChangeCounts::of(&update);
        let before = self.state.version();
        let span = apply_span(&self.identity.node_name, &update, entries);
        let applied = self.state.apply(&update);
        // The entries are in the state now: a snapshot's are tens of MiB, freed before the
        // backend renders (the agent's peak memory is the state plus one rendering).
        let causes = std::mem::take(&mut update.causes);
        let head = header(&update);
        drop(update);
        let update = pb::Update { causes, ..head };
        let result = match applied {
            Ok(changes) => {
                let (backend, state) = (&mut self.backend, &self.state);
                span.set(Attr::new("services_changed", changes.services.len() as i64));
                if span.is_recording() {
                    span.set(kpx_telemetry::span::names("services", changes.services.iter().map(String::as_str)));
                }
                // The backend's steps (render, restore, netlink) become children of dp.apply.
                without_stalling_the_runtime(|| {
                    let _entered = span.enter();
                    backend.apply(state, &changes)
                })
                .map_err(|e| (e, false))
            }
            Err(e) => Err((e.to_string(), e.needs_snapshot())),
        };
        let apply = started.elapsed();
        let programmed_at = SystemTime::now();
        if let Err((error, _)) = &result {
            span.error(error.clone());
        }
        let trace = span.w3c().map(|w| pb::TraceContext {
            traceparent: w.traceparent,
            tracestate: w.tracestate,
            change_time_unix_ms: 0,
        });
        match result {
            Ok(()) => {
                tracing::debug!(version = %update.version, full = update.full, entries, "applied");
                self.emit(SyncEvent::Applied {
                    nonce: update.nonce,
                    version: update.version.clone(),
                    full: update.full,
                    entries,
                    changes: counts,
                    wire_bytes,
                    chunks,
                    apply,
                    change_times_unix_ms: update
                        .causes
                        .iter()
                        .map(|c| c.change_time_unix_ms)
                        .filter(|t| *t > 0)
                        .collect(),
                    programmed_at,
                });
                pb::Ack {
                    nonce: update.nonce,
                    version: update.version.clone(),
                    error: String::new(),
                    apply_micros: apply.as_micros() as u64,
                    need_snapshot: false,
                    trace,
                }
            }
            Err((error, need_snapshot)) => {
                tracing::warn!(version = %update.version, %error, "rejecting update");
                self.emit(SyncEvent::Rejected {
                    nonce: update.nonce,
                    version: update.version.clone(),
                    error: error.clone(),
                    changes: counts,
                });
                // A refused delta leaves the state as it was; anything else leaves it unknown.
                let still = if self.state.version().is_some() { self.state.version() } else { None };
                let version =
                    still.or(if need_snapshot { None } else { before }).map(|v| v.to_version()).unwrap_or_default();
                pb::Ack {
                    nonce: update.nonce,
                    version,
                    error,
                    apply_micros: apply.as_micros() as u64,
                    need_snapshot: need_snapshot || still.is_none(),
                    trace,
                }
            }
        }
    }
}

/// An update's identity without its entries.
fn header(u: &pb::Update) -> pb::Update {
    pb::Update {
        nonce: u.nonce,
        version: u.version.clone(),
        base_version: u.base_version.clone(),
        full: u.full,
        ..Default::default()
    }
}

/// `dp.apply`: a child of the update's first cause (the controlplane's send of it), linked to
/// the changes coalesced into it. It covers checking, rendering and programming the update.
fn apply_span(node: &str, update: &pb::Update, entries: usize) -> DistSpan {
    let causes: Vec<W3c> = update
        .causes
        .iter()
        .map(|c| W3c { traceparent: c.traceparent.clone(), tracestate: c.tracestate.clone() })
        .collect();
    DistSpan::start(
        "dp.apply",
        Start {
            parent: causes.first(),
            links: causes.get(1..).unwrap_or_default(),
            attributes: vec![
                Attr::new("node", node.to_string()),
                Attr::new("version", update.version.clone()),
                Attr::new("full", update.full),
                Attr::new("entries", entries as i64),
                Attr::new("services_upserted", update.services_upserted.len() as i64),
                Attr::new("endpoints_upserted", update.upserted_endpoint_count() as i64),
            ],
            ..Start::default()
        },
    )
}

/// Runs blocking backend work (an iptables-restore can take seconds at scale) without stalling
/// the other tasks queued on this runtime worker: on a multi-thread runtime the worker hands
/// its queue to another thread first. A current-thread runtime has nothing to hand over to.
fn without_stalling_the_runtime<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Reconnect backoff: exponential from `initial` to `max`, with up to 50% jitter so that
/// thousands of nodes do not reconnect in lockstep after a controlplane restart.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, current: initial }
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::rng().random_range(0.0..0.5);
        base.mul_f64(1.0 + jitter).min(self.max.mul_f64(1.5))
    }
}

/// Keeps a session subscribed until `shutdown` resolves, reconnecting with backoff.
pub async fn run_forever<A: Apply>(
    session: &mut Session<A>,
    endpoint: &str,
    creds: &ClientCredentials,
    mut backoff: Backoff,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let started = Instant::now();
        let attempt = async {
            match connect_with(endpoint, creds, Duration::from_secs(5)).await {
                Ok(channel) => session.run(channel).await,
                Err(e) => e,
            }
        };
        let error = tokio::select! {
            _ = &mut shutdown => return,
            e = attempt => e,
        };
        // A stream that worked for a while starts the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        session.emit(SyncEvent::Disconnected { error: error.to_string() });
        let delay = backoff.next_delay();
        match &error {
            StreamError::Stream(s)
                if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) =>
            {
                tracing::error!(%error, retry_in = ?delay, "the controlplane refused this node's credentials; keeping current rules")
            }
            StreamError::Credentials(_) => {
                tracing::error!(%error, retry_in = ?delay, "cannot load the credentials for the controlplane; keeping current rules")
            }
            _ => tracing::warn!(%error, retry_in = ?delay, "controlplane stream ended; keeping current rules"),
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_counted_per_service() {
        let ep = |svc: &str, ip: &str| pb::Endpoint { service: svc.into(), ip: ip.into(), ..Default::default() };
        let update = pb::Update {
            services_upserted: vec![pb::Service { namespace: "a".into(), name: "x".into(), ..Default::default() }],
            services_removed: vec![pb::ServiceRef { namespace: "a".into(), name: "gone".into() }],
            endpoints_upserted: vec![ep("a/x", "10.0.0.1"), ep("a/x", "10.0.0.2"), ep("a/y", "10.0.0.3")],
            endpoints_removed: vec![pb::EndpointRef { service: "a/z".into(), ip: "10.0.0.4".into() }],
            ..Default::default()
        };
        assert_eq!(ChangeCounts::of(&update), ChangeCounts { services: 2, endpoints: 3 });
        // Replaced (removed and upserted in one update, as a delta from a digest): one change.
        let replaced = pb::Update {
            services_upserted: vec![pb::Service { namespace: "a".into(), name: "x".into(), ..Default::default() }],
            services_removed: vec![pb::ServiceRef { namespace: "a".into(), name: "x".into() }],
            ..Default::default()
        };
        assert_eq!(ChangeCounts::of(&replaced).services, 1);
        assert_eq!(ChangeCounts::of(&pb::Update::default()), ChangeCounts::default());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(150));
        assert!(d[3] >= Duration::from_millis(800));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(3)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }
}
