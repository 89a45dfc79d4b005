//! Per-node bookkeeping: desired version, what is in flight, what was acknowledged, and the
//! connection that currently speaks for the node. The sync loop of a node is a small state
//! machine driven by three inputs (a new desired version, an ack, a (re)subscription); all of
//! it lives here so it can be tested without sockets.

use super::log::UpdateContent;
use super::{Cache, PlannedUpdate, State, now_ms};
use crate::node_view::NodeInfo;
use kpx_proto::v1 as pb;
use kpx_proto::version::ContentHash;
use tokio::sync::watch;

/// Identifies one Sync stream of a node; a newer stream of the same node supersedes it.
pub type ConnId = u64;

#[derive(Debug, Clone)]
pub(super) struct Conn {
    pub id: ConnId,
    pub since_ms: i64,
    pub backend: String,
    pub ip_families: Vec<String>,
    pub agent_version: String,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub nonce: u64,
    pub version: ContentHash,
    pub seq: u64,
    pub generation: u64,
    /// A request for the node's digest, not an update.
    pub digest_request: bool,
}

/// A version the node is known to run, and the change sequence number it corresponds to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Point {
    pub version: ContentHash,
    pub seq: u64,
    pub generation: u64,
}

#[derive(Debug)]
pub(super) struct NodeTrack {
    pub info: NodeInfo,
    pub known_node: bool,
    /// Desired version at the log head (meaningless before the cache has published).
    pub version: ContentHash,
    /// Counts desired-version changes, to tell how many versions a node is behind.
    pub generation: u64,
    pub conn: Option<Conn>,
    pub in_flight: Option<InFlight>,
    /// The last version the node acknowledged (or reported on subscribe and we recognised).
    pub acked: Option<Point>,
    /// The version a (re)subscribing node reported before the cache had published.
    pub reported: Option<ContentHash>,
    /// A version the node reported that this controlplane never produced (another replica's,
    /// or one from before a restart): the node is asked for its digest instead of being sent
    /// a snapshot.
    pub unknown_reported: Option<ContentHash>,
    /// The node's digest, the base of its next delta.
    pub digest: Option<super::NodeDigest>,
    pub force_snapshot: bool,
    /// The desired version the node last rejected: not resent until it changes or the retry
    /// timer of the stream clears it, so a node that cannot apply is not hammered.
    pub rejected: Option<ContentHash>,
    pub last_nack: String,
    pub last_apply_micros: u64,
    pub last_ack_ms: i64,
    pub wake: watch::Sender<u64>,
}

impl NodeTrack {
    pub fn new(info: NodeInfo) -> Self {
        NodeTrack {
            info,
            known_node: false,
            version: ContentHash::EMPTY,
            generation: 0,
            conn: None,
            in_flight: None,
            acked: None,
            reported: None,
            unknown_reported: None,
            digest: None,
            force_snapshot: false,
            rejected: None,
            last_nack: String::new(),
            last_apply_micros: 0,
            last_ack_ms: 0,
            wake: watch::channel(0).0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The cache published (or the node appeared after it did): its version is now known.
    pub fn published(&mut self, version: ContentHash, head: u64) {
        self.version = version;
        if let Some(r) = self.reported.take()
            && r == version
        {
            self.acked = Some(Point { version, seq: head, generation: self.generation });
            self.unknown_reported = None;
        }
        self.wake();
    }

    pub fn version_changed(&mut self, old: ContentHash, new: ContentHash) {
        self.version.apply(old, new);
        self.generation += 1;
        self.wake();
    }

    /// The node moved zone: its classes changed wholesale, so it gets a snapshot.
    pub fn zone_changed(&mut self, version: ContentHash) {
        self.version = version;
        self.generation += 1;
        self.force_snapshot = true;
        self.wake();
    }

    pub fn versions_behind(&self) -> u64 {
        match &self.acked {
            Some(a) if a.version == self.version => 0,
            Some(a) => self.generation.saturating_sub(a.generation).max(1),
            None => self.generation.max(1),
        }
    }
}

/// What a stream should do next (`Cache::plan_update`).
#[derive(Debug)]
pub enum Planned {
    Update(Box<PlannedUpdate>),
    /// The node needs a snapshot: take a snapshot turn, then plan again.
    SnapshotNeedsTurn,
    Nothing,
}

/// What a Sync stream holds on to: its identity and a signal that something changed.
#[derive(Debug)]
pub struct Subscription {
    pub conn: ConnId,
    pub wake: watch::Receiver<u64>,
}

impl Cache {
    /// Registers a node's Sync stream. A previous stream of the same node is superseded.
    pub fn subscribe(&self, sub: &pb::Subscribe) -> Subscription {
        let conn = self.conn_ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut st = self.lock();
        let st = &mut *st;
        let head = st.head;
        let synced = st.synced;
        if !st.nodes.contains_key(&sub.node_name) {
            let zone = st.k8s_nodes.get(&sub.node_name).and_then(|n| n.zone.clone()).or_else(|| non_empty(&sub.zone));
            let mut track = NodeTrack::new(NodeInfo { name: sub.node_name.clone(), zone });
            if synced {
                let v = st.full_version(&track.info);
                track.published(v, head);
            }
            st.nodes.insert(sub.node_name.clone(), track);
        }
        let track = st.nodes.get_mut(&sub.node_name).expect("inserted");
        track.conn = Some(Conn {
            id: conn,
            since_ms: now_ms(),
            backend: sub.backend.clone(),
            ip_families: sub.ip_families.clone(),
            agent_version: sub.agent_version.clone(),
        });
        let reported = ContentHash::parse_version(&sub.applied_version);
        // Work out where the node stands. The in-flight update of a previous stream may have
        // been applied even though its ack never arrived.
        let lost_ack = track.in_flight.take().filter(|f| !f.digest_request);
        track.rejected = None;
        track.digest = None;
        track.unknown_reported = None;
        track.acked = match reported {
            None => None,
            Some(v) if synced && v == track.version => {
                Some(Point { version: v, seq: head, generation: track.generation })
            }
            Some(v) if track.acked.is_some_and(|a| a.version == v) => track.acked,
            Some(v) if lost_ack.is_some_and(|f| f.version == v) => {
                lost_ack.map(|f| Point { version: f.version, seq: f.seq, generation: f.generation })
            }
            Some(v) => {
                if !synced {
                    track.reported = Some(v);
                }
                track.unknown_reported = Some(v);
                None
            }
        };
        if reported.is_none() {
            track.force_snapshot = true;
        }
        tracing::info!(node = %sub.node_name, conn, backend = %sub.backend, reported = %sub.applied_version, recognised = track.acked.is_some(), "node subscribed");
        track.wake();
        Subscription { conn, wake: track.wake.subscribe() }
    }

    /// Allows a rejected version to be sent again (the stream's retry timer calls this).
    pub fn retry_rejected(&self, node: &str, conn: ConnId) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(node)
            && t.conn.as_ref().is_some_and(|c| c.id == conn)
            && t.rejected.take().is_some()
        {
            t.wake();
        }
    }

    /// Whether the node's last answer was a NACK of its current desired version.
    pub fn is_rejected(&self, node: &str) -> bool {
        self.lock().nodes.get(node).is_some_and(|t| t.rejected.is_some_and(|r| r == t.version))
    }

    /// The stream ended. The node's record stays, so a reconnect can resume with a delta.
    pub fn disconnect(&self, node: &str, conn: ConnId) {
        let mut st = self.lock();
        if let Some(t) = st.nodes.get_mut(node)
            && t.conn.as_ref().is_some_and(|c| c.id == conn)
        {
            t.conn = None;
            // The record stays even without a Node object (file source, tests): a reconnect
            // then still gets a delta. It is small, and forgotten when the Node is deleted.
            tracing::info!(node, conn, "node disconnected");
        }
    }

    /// Whether `conn` still speaks for `node`.
    pub fn is_current(&self, node: &str, conn: ConnId) -> bool {
        self.lock().nodes.get(node).and_then(|t| t.conn.as_ref()).is_some_and(|c| c.id == conn)
    }

    /// The next update to send on this stream, if any: None while the cache has not
    /// published, while an update is in flight (flow control: changes coalesce meanwhile), or
    /// when the node already runs its desired version.
    pub fn next_update(&self, node: &str, conn: ConnId) -> Option<PlannedUpdate> {
        match self.plan_update(node, conn, true) {
            Planned::Update(plan) => Some(*plan),
            Planned::Nothing | Planned::SnapshotNeedsTurn => None,
        }
    }

    /// As `next_update`, but a snapshot is only built when the stream holds a snapshot turn
    /// (`have_turn`); without one the answer is `SnapshotNeedsTurn`, and nothing is built or
    /// marked in flight. A snapshot's content (a reference per service) is built when it is
    /// about to be sent, not while thousands of streams queue for their turn.
    pub fn plan_update(&self, node: &str, conn: ConnId, have_turn: bool) -> Planned {
        self.plan_update_inner(node, conn, have_turn).unwrap_or(Planned::Nothing)
    }

    fn plan_update_inner(&self, node: &str, conn: ConnId, have_turn: bool) -> Option<Planned> {
        let mut st = self.lock();
        if !st.synced {
            return None;
        }
        let st = &mut *st;
        let head = st.head;
        let track = st.nodes.get_mut(node)?;
        if track.conn.as_ref().is_none_or(|c| c.id != conn) || track.in_flight.is_some() {
            return None;
        }
        if track.rejected == Some(track.version) {
            return None;
        }
        if !track.force_snapshot && track.acked.is_none() {
            if let Some(digest) = track.digest.take() {
                return self.delta_from_digest(st, node, digest, head).map(|p| Planned::Update(Box::new(p)));
            }
            if let Some(reported) = track.unknown_reported {
                let nonce = self.next_nonce();
                let generation = track.generation;
                track.in_flight =
                    Some(InFlight { nonce, version: reported, seq: head, generation, digest_request: true });
                tracing::info!(node, %reported, "node runs a version this controlplane does not know: asking for its digest");
                return Some(Planned::Update(Box::new(PlannedUpdate {
                    nonce,
                    version: reported,
                    base_version: None,
                    full: false,
                    content: UpdateContent::default(),
                    send_digest: true,
                })));
            }
        }
        let delta = match (track.force_snapshot, track.acked) {
            (false, Some(a)) if a.version == track.version => {
                // Changes since cancelled out; move the node's point forward so later deltas
                // start from here.
                track.acked = Some(Point { seq: head, ..a });
                return None;
            }
            (false, Some(a)) => {
                st.log.as_ref().expect("log").delta_since(a.seq, &track.info).filter(|d| !d.is_empty()).map(|d| (a, d))
            }
            _ => None,
        };
        if delta.is_none() && !have_turn {
            return Some(Planned::SnapshotNeedsTurn);
        }
        let nonce = self.next_nonce();
        let (base_version, full, content) = match delta {
            Some((a, d)) => (Some(a.version), false, d.into_content()),
            None => (None, true, snapshot_content(st, &track_info(st, node))),
        };
        let track = st.nodes.get_mut(node).expect("tracked");
        track.force_snapshot = false;
        track.unknown_reported = None;
        let generation = track.generation;
        track.in_flight =
            Some(InFlight { nonce, version: track.version, seq: head, generation, digest_request: false });
        Some(Planned::Update(Box::new(PlannedUpdate {
            nonce,
            version: track.version,
            base_version,
            full,
            content,
            send_digest: false,
        })))
    }

    /// The delta that brings a node from what its digest says to its desired state: every
    /// service whose sum differs is replaced whole (removed and upserted in one update), those
    /// it should not have are removed. Nothing when they agree: the node is current.
    fn delta_from_digest(
        &self,
        st: &mut State,
        node: &str,
        digest: super::NodeDigest,
        head: u64,
    ) -> Option<PlannedUpdate> {
        let info = track_info(st, node);
        let content = digest_delta(st, &info, &digest);
        let nonce = self.next_nonce();
        let track = st.nodes.get_mut(node).expect("tracked");
        if content.entry_count() == 0 {
            tracing::info!(node, version = %digest.version, "node's digest matches its desired state");
            track.acked = Some(Point { version: track.version, seq: head, generation: track.generation });
            track.wake();
            return None;
        }
        tracing::info!(node, base = %digest.version, services = content.services_upserted.len() + content.services_removed.len(), "delta from the node's digest");
        let generation = track.generation;
        track.in_flight =
            Some(InFlight { nonce, version: track.version, seq: head, generation, digest_request: false });
        Some(PlannedUpdate {
            nonce,
            version: track.version,
            base_version: Some(digest.version),
            full: false,
            content,
            send_digest: false,
        })
    }

    /// The node's digest answering the request in flight. An inconsistent digest (its sums do
    /// not add up to its version) gets the node a snapshot.
    pub fn on_digest(&self, node: &str, conn: ConnId, nonce: u64, digest: super::NodeDigest) {
        let mut st = self.lock();
        let Some(track) = st.nodes.get_mut(node) else { return };
        if track.conn.as_ref().is_none_or(|c| c.id != conn) {
            return;
        }
        if track.in_flight.is_none_or(|f| !f.digest_request || f.nonce != nonce) {
            tracing::warn!(node, nonce, "digest that was not asked for; ignored");
            return;
        }
        track.in_flight = None;
        track.unknown_reported = None;
        if digest.is_consistent() {
            track.digest = Some(digest);
        } else {
            tracing::warn!(node, version = %digest.version, "the node's digest does not add up to its version; sending a snapshot");
            track.force_snapshot = true;
        }
        track.wake();
    }

    /// Handles an ACK or NACK from the node's current stream.
    pub fn on_ack(&self, node: &str, conn: ConnId, ack: &pb::Ack) {
        let mut st = self.lock();
        let Some(track) = st.nodes.get_mut(node) else { return };
        if track.conn.as_ref().is_none_or(|c| c.id != conn) {
            return;
        }
        let Some(sent) = track.in_flight.filter(|f| f.nonce == ack.nonce) else {
            tracing::warn!(node, nonce = ack.nonce, "ack for an update that is not in flight; ignored");
            return;
        };
        track.in_flight = None;
        if sent.digest_request {
            // An agent that does not know digests: a snapshot, as before digests existed.
            track.unknown_reported = None;
            track.force_snapshot = true;
            track.wake();
            return;
        }
        track.last_apply_micros = ack.apply_micros;
        track.last_ack_ms = now_ms();
        let reported = ContentHash::parse_version(&ack.version);
        if ack.error.is_empty() {
            if reported == Some(sent.version) {
                track.acked = Some(Point { version: sent.version, seq: sent.seq, generation: sent.generation });
                track.last_nack.clear();
            } else {
                tracing::warn!(node, expected = %sent.version, reported = %ack.version, "node acked a different version; resyncing it");
                track.force_snapshot = true;
            }
        } else {
            tracing::warn!(node, version = %sent.version, error = %ack.error, "node rejected an update");
            track.last_nack = ack.error.clone();
            track.rejected = Some(sent.version);
            // The node keeps running what it had. If that is not the last good version we know
            // (or it says its state diverged), only a snapshot is safe.
            let still_on_last_good = track.acked.is_some_and(|a| Some(a.version) == reported);
            if ack.need_snapshot || !still_on_last_good {
                track.force_snapshot = true;
            }
        }
        track.wake();
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn track_info(st: &State, node: &str) -> NodeInfo {
    st.nodes[node].info.clone()
}

/// What differs between a node's digest and its desired state (see `delta_from_digest`).
fn digest_delta(st: &State, node: &NodeInfo, digest: &super::NodeDigest) -> UpdateContent {
    let mut c = UpdateContent::default();
    let ref_of = |k: &crate::model::ServiceKey| pb::ServiceRef { namespace: k.namespace.clone(), name: k.name.clone() };
    for (key, entry) in &st.entries {
        let view = entry.view(&entry.prepared.class_of(node));
        match digest.services.get(key) {
            Some(sum) if *sum == view.sum => continue,
            Some(_) => c.services_removed.push(ref_of(key)),
            None => {}
        }
        c.services_upserted.push(entry.prepared.wire.clone());
        if !view.endpoints.is_empty() {
            c.endpoint_views.push(view);
        }
    }
    c.services_removed.extend(digest.services.keys().filter(|k| !st.entries.contains_key(*k)).map(ref_of));
    c
}

/// Every entry of a node's desired state.
pub(super) fn snapshot_content(st: &State, node: &NodeInfo) -> UpdateContent {
    let mut c = UpdateContent::default();
    for entry in st.entries.values() {
        let view = entry.view(&entry.prepared.class_of(node));
        c.services_upserted.push(entry.prepared.wire.clone());
        if !view.endpoints.is_empty() {
            c.endpoint_views.push(view);
        }
    }
    c
}
