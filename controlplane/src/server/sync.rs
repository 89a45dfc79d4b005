//! `kpx.v1.Sync`: one task per node stream sends what the cache plans, one update at a time.

use super::chunk::chunk_update;
use crate::cache::log::UpdateContent;
use crate::cache::{Cache, NodeDigest, Planned, PlannedUpdate};
use crate::model::ServiceKey;
use crate::trace_context::{from_wire, to_wire};
use futures::Stream;
use kpx_auth::{Access, Caller};
use kpx_proto::encoded::EncodedUpdate;
use kpx_proto::v1 as pb;
use kpx_proto::v1::node_message::Msg;
use kpx_proto::version::ContentHash;
use kpx_telemetry::span::{Attr, DistSpan, Start, W3c};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// How long a new stream may take to send Subscribe.
    pub subscribe_timeout: Duration,
    /// After a NACK, how long before the same version is offered again.
    pub nack_retry: Duration,
    pub max_chunk_bytes: usize,
    /// Snapshots in flight at once: the limit keeps a mass reconnect of thousands of nodes from
    /// buffering thousands of snapshots. A snapshot keeps its turn until the node acknowledges
    /// it (or `snapshot_hold` passes), not only until its last chunk is queued: the queued bytes
    /// wait in HTTP/2 and socket buffers until the node has read them, so releasing the turn
    /// earlier bounded nothing (5,000 full-size snapshots peaked at 1.5 GiB).
    pub max_concurrent_snapshots: usize,
    /// How long an unacknowledged snapshot keeps its turn (a node that never answers must not
    /// hold one for ever).
    pub snapshot_hold: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            subscribe_timeout: Duration::from_secs(10),
            nack_retry: Duration::from_secs(30),
            max_chunk_bytes: kpx_proto::MAX_CHUNK_BYTES,
            max_concurrent_snapshots: 64,
            snapshot_hold: Duration::from_secs(60),
        }
    }
}

pub struct SyncService {
    cache: Arc<Cache>,
    config: SyncConfig,
    shutdown: watch::Receiver<bool>,
    snapshot_permits: Arc<Semaphore>,
}

impl SyncService {
    /// `shutdown` turning true ends every node stream, so that a graceful server shutdown is
    /// not held up by streams that never end on their own; nodes reconnect to another replica.
    pub fn new(cache: Arc<Cache>, config: SyncConfig, shutdown: watch::Receiver<bool>) -> Self {
        let snapshot_permits = Arc::new(Semaphore::new(config.max_concurrent_snapshots.max(1)));
        SyncService { cache, config, shutdown, snapshot_permits }
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<EncodedUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl kpx_proto::encoded::server::sync_server::Sync for SyncService {
    type SyncStream = UpdateStream;

    async fn sync(&self, request: Request<Streaming<pb::NodeMessage>>) -> Result<Response<UpdateStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.config.subscribe_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Subscribe received"))??;
        let sub = match first.and_then(|m| m.msg) {
            Some(Msg::Subscribe(s)) => s,
            _ => return Err(Status::invalid_argument("the first message on a Sync stream must be Subscribe")),
        };
        if sub.node_name.is_empty() {
            return Err(Status::invalid_argument("Subscribe.node_name is empty"));
        }
        // Before the cache hears of the node: a refused Subscribe disturbs no stream.
        caller.authorize(Access::Subscribe { node: &sub.node_name }).await?;
        let subscription = self.cache.subscribe(&sub);
        // Two messages of buffer: flow control is the ack, not this channel.
        let (tx, rx) = mpsc::channel(2);
        let span = tracing::info_span!("node_stream", node = %sub.node_name, conn = subscription.conn);
        let driver = NodeStream {
            cache: self.cache.clone(),
            config: self.config.clone(),
            node: sub.node_name,
            conn: subscription.conn,
            shutdown: self.shutdown.clone(),
            snapshot_permits: self.snapshot_permits.clone(),
            credential_expires: caller.expires,
        };
        tokio::spawn(driver.run(subscription.wake, inbound, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct NodeStream {
    cache: Arc<Cache>,
    config: SyncConfig,
    node: String,
    conn: u64,
    shutdown: watch::Receiver<bool>,
    snapshot_permits: Arc<Semaphore>,
    /// The stream ends when the node's credential does; the node reconnects with its renewed
    /// one and resumes from its applied version (no snapshot).
    credential_expires: Option<SystemTime>,
}

impl NodeStream {
    async fn run(
        mut self,
        mut wake: tokio::sync::watch::Receiver<u64>,
        mut inbound: Streaming<pb::NodeMessage>,
        tx: mpsc::Sender<Result<EncodedUpdate, Status>>,
    ) {
        // The last update's send span: the parent of its ack span when the node sends no trace.
        let mut last_send: Option<W3c> = None;
        // The in-flight delta's nonce and when the oldest change it carries was published.
        let mut carried: Option<(u64, std::time::Instant)> = None;
        let expiry = credential_expiry(self.credential_expires);
        tokio::pin!(expiry);
        // A digest being received (it may span several messages).
        let mut digest: Option<(u64, NodeDigest)> = None;
        // A snapshot turn taken, for the snapshot about to be planned.
        let mut turn: Option<tokio::sync::OwnedSemaphorePermit> = None;
        // The turn of the snapshot in flight, kept until its ack or the deadline.
        let mut snapshot_turn: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)> = None;
        let end = loop {
            wake.borrow_and_update();
            if !self.cache.is_current(&self.node, self.conn) {
                break "superseded by a newer stream";
            }
            // A snapshot is planned (its content built) only once the stream has its turn.
            let planned = match self.cache.plan_update(&self.node, self.conn, turn.is_some()) {
                Planned::SnapshotNeedsTurn => {
                    turn = Some(self.snapshot_permits.clone().acquire_owned().await.expect("never closed"));
                    continue;
                }
                Planned::Update(plan) => Some(*plan),
                Planned::Nothing => {
                    turn = None; // (the node no longer needs the snapshot it waited for)
                    None
                }
            };
            if let Some(mut plan) = planned {
                // Held until the node acknowledges the snapshot (below).
                let permit = if plan.full { turn.take() } else { None };
                turn = None;
                tracing::debug!(version = %plan.version, full = plan.full, entries = plan.content.entry_count(), "sending update");
                carried = plan.content.oldest_change.map(|t| (plan.nonce, t));
                let kind = match (plan.full, plan.send_digest) {
                    (true, _) => "snapshot",
                    (false, true) => "digest_request",
                    (false, false) => "delta",
                };
                let send = send_span(&self.node, &mut plan);
                last_send = send.w3c();
                let (mut closed, mut bytes) = (false, 0usize);
                for chunk in chunk_update(plan, self.config.max_chunk_bytes) {
                    bytes += chunk.len();
                    if tx.send(Ok(chunk)).await.is_err() {
                        closed = true;
                        break;
                    }
                }
                send.set(Attr::new("bytes", bytes as i64));
                drop(send);
                if closed {
                    break "stream closed";
                }
                self.cache.metrics().sent(kind, bytes);
                snapshot_turn = permit.map(|p| (p, tokio::time::Instant::now() + self.config.snapshot_hold));
            }
            let rejected = self.cache.is_rejected(&self.node);
            let turn_ends = snapshot_turn.as_ref().map(|(_, deadline)| *deadline);
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { break "node record removed" },
                msg = inbound.message() => match msg {
                    Ok(Some(pb::NodeMessage { msg: Some(Msg::Ack(ack)) })) => {
                        // One update in flight at a time: this answers the snapshot, if one is.
                        snapshot_turn = None;
                        let _span = ack_span(&self.node, &ack, last_send.take());
                        self.cache.on_ack(&self.node, self.conn, &ack);
                        let oldest = carried.take().filter(|(n, _)| *n == ack.nonce).map(|(_, t)| t);
                        self.cache.metrics().ack(!ack.error.is_empty(), oldest);
                    }
                    Ok(Some(pb::NodeMessage { msg: Some(Msg::Digest(d)) })) => match collect_digest(&mut digest, d) {
                        Ok(None) => {}
                        Ok(Some((nonce, complete))) => self.cache.on_digest(&self.node, self.conn, nonce, complete),
                        Err(e) => {
                            let _ = tx.send(Err(Status::invalid_argument(e))).await;
                            break "protocol error";
                        }
                    },
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("only Ack or Digest may follow Subscribe on a Sync stream"))).await;
                        break "protocol error";
                    }
                    Ok(None) => break "node closed the stream",
                    Err(status) => {
                        tracing::debug!(%status, "stream error");
                        break "stream error";
                    }
                },
                _ = tokio::time::sleep(self.config.nack_retry), if rejected => self.cache.retry_rejected(&self.node, self.conn),
                _ = tokio::time::sleep_until(turn_ends.unwrap_or_else(tokio::time::Instant::now)), if turn_ends.is_some() => {
                    tracing::debug!("snapshot not acknowledged in time; its turn goes to the next node");
                    snapshot_turn = None;
                }
                _ = tx.closed() => break "stream closed",
                _ = shutting_down(&mut self.shutdown) => break "controlplane shutting down",
                _ = &mut expiry => {
                    let _ = tx.send(Err(Status::unauthenticated("the credential of this stream expired: reconnect with the renewed one"))).await;
                    break "credential expired";
                }
            }
        };
        tracing::debug!(reason = end, "node stream ended");
        self.cache.disconnect(&self.node, self.conn);
    }
}

/// `cp.send`: one update to one node, a child of its primary cause and linked to the changes
/// coalesced into it. It takes the primary cause's place in the update, so the node's apply
/// span becomes its child (same trace); a snapshot without causes starts a trace of its own.
fn send_span(node: &str, plan: &mut PlannedUpdate) -> DistSpan {
    let causes: Vec<W3c> = plan.content.causes.iter().map(from_wire).collect();
    let span = DistSpan::start(
        "cp.send",
        Start {
            parent: causes.first(),
            links: causes.get(1..).unwrap_or_default(),
            attributes: vec![
                Attr::new("node", node.to_string()),
                Attr::new("version", plan.version.to_version()),
                Attr::new("full", plan.full),
                Attr::new("entries", plan.content.entry_count() as i64),
                Attr::new("causes", causes.len() as i64),
            ],
            ..Start::default()
        },
    );
    // Only for recorded spans: naming a snapshot's services costs a pass over all of them.
    if span.is_recording() {
        span.set(services_attr(&plan.content));
    }
    if let Some(w) = span.w3c() {
        match plan.content.causes.first_mut() {
            // Keep the change's start time: nodes measure programming latency from it.
            Some(first) => *first = pb::TraceContext { change_time_unix_ms: first.change_time_unix_ms, ..to_wire(w) },
            None => plan.content.causes.push(to_wire(w)),
        }
    }
    span
}

/// The services an update touches (a few named, the rest counted; see `span::names`).
fn services_attr(content: &UpdateContent) -> Attr {
    let refs = content.services_removed.iter().map(|r| (r.namespace.as_str(), r.name.as_str()));
    let upserted = content.services_upserted.iter().map(|s| (s.namespace.as_str(), s.name.as_str()));
    let services: Vec<String> = upserted.chain(refs).map(|(ns, n)| format!("{ns}/{n}")).collect();
    let endpoints = content.upserted_endpoints().map(|e| e.service.as_str());
    let names = services
        .iter()
        .map(String::as_str)
        .chain(endpoints)
        .chain(content.endpoints_removed.iter().map(|e| e.service.as_str()));
    kpx_telemetry::span::names("services", names)
}

/// `cp.ack`: the node's answer arriving, a child of the node's apply span.
fn ack_span(node: &str, ack: &pb::Ack, sent: Option<W3c>) -> DistSpan {
    let parent = ack.trace.as_ref().map(from_wire).filter(|w| w.span_context().is_some()).or(sent);
    let span = DistSpan::start(
        "cp.ack",
        Start {
            parent: parent.as_ref(),
            attributes: vec![
                Attr::new("node", node.to_string()),
                Attr::new("version", ack.version.clone()),
                Attr::new("nack", !ack.error.is_empty()),
                Attr::new("apply_micros", ack.apply_micros as i64),
            ],
            ..Start::default()
        },
    );
    if !ack.error.is_empty() {
        span.error(ack.error.clone());
    }
    span
}

/// The most services a digest may list (a node never has more than the cluster's services;
/// this bounds what a broken or hostile node can make the controlplane hold).
const MAX_DIGEST_SERVICES: usize = 1_000_000;

/// Adds one Digest message to the one being received; the whole digest once its last message
/// arrived. Errors are protocol violations (the stream ends).
fn collect_digest(pending: &mut Option<(u64, NodeDigest)>, d: pb::Digest) -> Result<Option<(u64, NodeDigest)>, String> {
    let version =
        ContentHash::parse_version(&d.version).ok_or_else(|| format!("digest version {:?} is invalid", d.version))?;
    let (nonce, acc) = pending.get_or_insert_with(|| (d.nonce, NodeDigest { version, ..NodeDigest::default() }));
    if *nonce != d.nonce || acc.version != version {
        return Err("the messages of one digest disagree on nonce or version".into());
    }
    for s in d.services {
        let sum = ContentHash::from_bytes(&s.sum)
            .ok_or_else(|| format!("digest of {}/{}: sum is not 16 bytes", s.namespace, s.name))?;
        acc.services.insert(ServiceKey::new(s.namespace, s.name), sum);
    }
    if acc.services.len() > MAX_DIGEST_SERVICES {
        return Err(format!("a digest may list at most {MAX_DIGEST_SERVICES} services"));
    }
    Ok(if d.more { None } else { pending.take() })
}

/// Resolves when the credential expires (never for credentials without an end).
async fn credential_expiry(expires: Option<SystemTime>) {
    match expires {
        Some(at) => tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send; drop it before the select sees it.
    let _ = rx.wait_for(|s| *s).await.is_ok();
}
