//! A light simulated node: the real Sync protocol (Subscribe, chunked updates, Ack/NACK), every
//! version verified with the agent's content hash, but no endpoint kept beyond its 16-byte hash.
//!
//! Three things make thousands of them fit in one process at 100k endpoints (the agent's full
//! state is ~45 MiB per node): chunks are applied as they arrive, never merged into one update;
//! nodes that see a service the same way share one copy of its hashes (interned by content);
//! and a service entry or endpoint group whose wire bytes another node already hashed is not
//! decoded and hashed again (the hash is a function of those bytes, so the result is the same).
//! A view made of one group shares the group's endpoint list itself, so a snapshot costs a node
//! no per-endpoint work beyond summing the hashes, and the shared maps are locked once per chunk
//! rather than once per entry (the simulated nodes share the controlplane's cores: their cost
//! must stay well below its own).
//! Updates are decoded with a wire-compatible message whose upserted services and endpoint
//! groups stay raw bytes, to fingerprint them.

use bytes::Bytes;
use kpx_auth::client::AuthChannel;
use kpx_dataplane::stream::{ChangeCounts, SyncEvent};
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash, EntryHash};
use prost::Message;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use xxhash_rust::xxh3::xxh3_128;

/// `kpx.v1.Update` as it is on the wire, with the two large repeated fields left as bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawUpdate {
    #[prost(uint64, tag = "1")]
    nonce: u64,
    #[prost(string, tag = "2")]
    version: String,
    #[prost(string, tag = "3")]
    base_version: String,
    #[prost(bool, tag = "4")]
    full: bool,
    #[prost(bool, tag = "5")]
    more: bool,
    #[prost(bytes = "bytes", repeated, tag = "6")]
    services_upserted: Vec<Bytes>,
    #[prost(message, repeated, tag = "7")]
    services_removed: Vec<pb::ServiceRef>,
    #[prost(message, repeated, tag = "8")]
    endpoints_upserted: Vec<pb::Endpoint>,
    #[prost(message, repeated, tag = "9")]
    endpoints_removed: Vec<pb::EndpointRef>,
    /// Kept only so that the message's size is the size on the wire.
    #[prost(bytes = "bytes", repeated, tag = "10")]
    causes: Vec<Bytes>,
    #[prost(bytes = "bytes", repeated, tag = "11")]
    endpoint_groups: Vec<Bytes>,
    #[prost(bool, tag = "12")]
    send_digest: bool,
}

/// (IP as text, endpoint hash), sorted by IP; shared by every view and group that holds it.
type Endpoints = Arc<Vec<(Arc<str>, u128)>>;

/// One service as a node sees it: its entry's hash and its endpoints' (by IP).
#[derive(Debug, Clone, Eq)]
struct ServiceHashes {
    service: u128,
    endpoints: Endpoints,
}

impl PartialEq for ServiceHashes {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && (Arc::ptr_eq(&self.endpoints, &other.endpoints) || self.endpoints == other.endpoints)
    }
}

impl ServiceHashes {
    fn sum(&self) -> ContentHash {
        let mut sum = ContentHash(self.service);
        self.endpoints.iter().for_each(|(_, h)| sum.add(EntryHash(*h)));
        sum
    }
}

/// An endpoint group, hashed: its service and its endpoints' hashes.
type Group = (u32, Endpoints);

/// The maps here are keyed by small ids or by values that are hashes already: one multiply per
/// word is enough. (With std's SipHash they were 11% of a 1,000-node run, time the
/// controlplane's figures should not carry.)
#[derive(Default, Clone, Copy)]
struct IntHasher(u64);

impl std::hash::Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

type IntMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IntHasher>>;

/// What every node of the process shares: service names, service views, and the hashes of
/// service entries and endpoint groups by the fingerprint of their wire bytes.
#[derive(Debug, Default)]
pub struct Shared {
    names: Mutex<HashMap<Arc<str>, u32>>,
    /// Interned views by their content sum (then compared whole).
    views: Mutex<IntMap<u128, Vec<Weak<ServiceHashes>>>>,
    services: Mutex<IntMap<u128, (u32, u128)>>,
    groups: Mutex<IntMap<u128, Group>>,
}

impl Shared {
    fn id(&self, name: &str) -> u32 {
        let mut names = self.names.lock().unwrap();
        if let Some(id) = names.get(name) {
            return *id;
        }
        let id = names.len() as u32;
        names.insert(Arc::from(name), id);
        id
    }

    /// The shared copy of each view (with its content sum), one lock for all of them.
    fn intern(&self, fresh: impl Iterator<Item = (ServiceHashes, u128)>) -> Vec<Arc<ServiceHashes>> {
        let mut views = self.views.lock().unwrap();
        let mut intern_one = |view: ServiceHashes, sum: u128| {
            let same = views.entry(sum).or_default();
            same.retain(|w| w.strong_count() > 0);
            if let Some(v) = same.iter().filter_map(Weak::upgrade).find(|v| **v == view) {
                return v;
            }
            let v = Arc::new(view);
            same.push(Arc::downgrade(&v));
            v
        };
        fresh.map(|(view, sum)| intern_one(view, sum)).collect()
    }

    /// (service id, entry hash) of each service entry's wire bytes, one lock for all of them.
    fn services(&self, raws: &[Bytes]) -> Result<Vec<(u32, u128)>, String> {
        let mut known = self.services.lock().unwrap();
        let mut one = |raw: &Bytes| {
            let key = xxh3_128(raw);
            if let Some(hit) = known.get(&key) {
                return Ok(*hit);
            }
            let s = pb::Service::decode(raw.as_ref()).map_err(|e| e.to_string())?;
            let found = (self.id(&format!("{}/{}", s.namespace, s.name)), version::service_hash(&s).0);
            known.insert(key, found);
            Ok(found)
        };
        raws.iter().map(&mut one).collect()
    }

    /// The hashes of each endpoint group's wire bytes, one lock for all of them.
    fn groups(&self, raws: &[Bytes]) -> Result<Vec<Group>, String> {
        let mut known = self.groups.lock().unwrap();
        let mut one = |raw: &Bytes| {
            let key = xxh3_128(raw);
            if let Some(hit) = known.get(&key) {
                return Ok(hit.clone());
            }
            let group = self.group(raw)?;
            known.insert(key, group.clone());
            Ok(group)
        };
        raws.iter().map(&mut one).collect()
    }

    /// The hashes of an endpoint group's wire bytes, each endpoint hashed with its service
    /// named (as the agent stores it).
    fn group(&self, raw: &Bytes) -> Result<Group, String> {
        let g = pb::ServiceEndpoints::decode(raw.as_ref()).map_err(|e| e.to_string())?;
        let mut hashes: Vec<(Arc<str>, u128)> = g
            .endpoints
            .into_iter()
            .map(|mut e| {
                if e.service.is_empty() {
                    e.service = g.service.clone();
                }
                (Arc::from(e.ip.as_str()), version::endpoint_hash(&e).0)
            })
            .collect();
        // Sorted by IP, the last of a repeated IP kept: what inserting them one by one into a
        // service's endpoints gives, so a group can become a view's endpoints as it is.
        hashes.reverse();
        hashes.sort_by(|a, b| a.0.cmp(&b.0));
        hashes.dedup_by(|later, earlier| later.0 == earlier.0);
        Ok((self.id(&g.service), Arc::new(hashes)))
    }

    /// Distinct service views held (for the report).
    pub fn views(&self) -> usize {
        let views = self.views.lock().unwrap();
        views.values().map(|same| same.iter().filter(|w| w.strong_count() > 0).count()).sum()
    }
}

/// An update being received: the services it touched so far, copied out of the shared views.
struct Pending {
    nonce: u64,
    open: IntMap<u32, ServiceHashes>,
    entries: usize,
    wire_bytes: usize,
    chunks: usize,
    started: Instant,
}

/// What a light node holds: per service, a pointer to a shared view.
#[derive(Default)]
struct LightState {
    services: IntMap<u32, Arc<ServiceHashes>>,
    total: ContentHash,
    version: Option<String>,
    pending: Option<Pending>,
}

impl LightState {
    /// Removes a service from the committed state, returning its hashes to edit.
    fn take(&mut self, id: u32) -> Option<ServiceHashes> {
        let v = self.services.remove(&id).map(|a| (*a).clone());
        if let Some(v) = &v {
            self.total.remove(EntryHash(v.sum().0));
        }
        v
    }

    /// The open copy of a service, taken from the state the first time.
    fn open(&mut self, open: &mut IntMap<u32, ServiceHashes>, id: u32, create: bool) -> Result<(), String> {
        if let Entry::Vacant(slot) = open.entry(id) {
            match self.services.contains_key(&id) {
                true => {
                    let v = self.take(id).expect("present");
                    slot.insert(v);
                }
                false if create => {
                    slot.insert(ServiceHashes { service: 0, endpoints: Endpoints::default() });
                }
                false => return Err(format!("an endpoint of service #{id}, which this node does not have")),
            }
        }
        Ok(())
    }

    /// Applies one chunk (the agent's order: removals, then upserts); the last one checks the
    /// version. Some(result) once the update is complete.
    fn chunk(&mut self, shared: &Shared, c: &RawUpdate, size: usize) -> Option<Result<Pending, String>> {
        if self.pending.as_ref().is_none_or(|p| p.nonce != c.nonce) {
            if c.full {
                self.services.clear();
                self.total = ContentHash::EMPTY;
            } else if self.version.as_deref() != Some(c.base_version.as_str()) {
                return Some(Err(format!("delta on {} but this node runs {:?}", c.base_version, self.version)));
            }
            self.version = None;
            self.pending = Some(Pending {
                nonce: c.nonce,
                open: IntMap::default(),
                entries: 0,
                wire_bytes: 0,
                chunks: 0,
                started: Instant::now(),
            });
        }
        let mut p = self.pending.take().expect("started");
        let result = self.entries(shared, c, &mut p);
        p.wire_bytes += size;
        p.chunks += 1;
        match result {
            Err(e) => Some(Err(e)),
            Ok(()) if c.more => {
                self.pending = Some(p);
                None
            }
            Ok(()) => Some(self.finish(shared, p, &c.version)),
        }
    }

    fn entries(&mut self, shared: &Shared, c: &RawUpdate, p: &mut Pending) -> Result<(), String> {
        p.entries += c.services_upserted.len()
            + c.services_removed.len()
            + c.endpoints_upserted.len()
            + c.endpoints_removed.len();
        for r in &c.services_removed {
            let id = shared.id(&format!("{}/{}", r.namespace, r.name));
            self.take(id);
            p.open.remove(&id);
        }
        for r in &c.endpoints_removed {
            let id = shared.id(&r.service);
            if self.open(&mut p.open, id, false).is_ok()
                && let Some(v) = p.open.get_mut(&id)
            {
                Arc::make_mut(&mut v.endpoints).retain(|(ip, _)| **ip != *r.ip);
            }
        }
        for (id, hash) in shared.services(&c.services_upserted)? {
            self.open(&mut p.open, id, true)?;
            p.open.get_mut(&id).expect("opened").service = hash;
        }
        let listed = c.endpoints_upserted.iter().map(|e| {
            let hash = version::endpoint_hash(e).0;
            (shared.id(&e.service), Arc::<str>::from(e.ip.as_str()), hash)
        });
        let mut upserts: Vec<(u32, Arc<str>, u128)> = listed.collect();
        for g in shared.groups(&c.endpoint_groups)? {
            p.entries += g.1.len();
            self.open(&mut p.open, g.0, false)?;
            let v = p.open.get_mut(&g.0).expect("opened");
            if v.endpoints.is_empty() && c.endpoints_upserted.is_empty() {
                // (A snapshot's usual case: the group, sorted once for every node, is the view;
                // with listed endpoints in the same chunk, the order they come in decides.)
                v.endpoints = g.1.clone();
            } else {
                upserts.extend(g.1.iter().map(|(ip, h)| (g.0, ip.clone(), *h)));
            }
        }
        for (id, ip, hash) in upserts {
            self.open(&mut p.open, id, false)?;
            let v = p.open.get_mut(&id).expect("opened");
            let endpoints = Arc::make_mut(&mut v.endpoints);
            match endpoints.binary_search_by(|(e, _)| (**e).cmp(&*ip)) {
                Ok(i) => endpoints[i].1 = hash,
                Err(i) => endpoints.insert(i, (ip, hash)),
            }
        }
        Ok(())
    }

    fn finish(&mut self, shared: &Shared, mut p: Pending, version: &str) -> Result<Pending, String> {
        let (ids, fresh): (Vec<u32>, Vec<(ServiceHashes, u128)>) = p
            .open
            .drain()
            .map(|(id, v)| {
                let sum = v.sum().0;
                (id, (v, sum))
            })
            .unzip();
        fresh.iter().for_each(|(_, sum)| self.total.add(EntryHash(*sum)));
        self.services.extend(ids.into_iter().zip(shared.intern(fresh.into_iter())));
        if self.total.to_version() != version {
            return Err(format!("state hashes to {} instead of {version}", self.total.to_version()));
        }
        self.version = Some(version.to_string());
        Ok(p)
    }
}

/// Runs one light node's Sync stream until it ends, reporting like the agent's session.
pub async fn run(
    name: String,
    channel: AuthChannel,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<SyncEvent>,
) -> Result<(), String> {
    let mut state = LightState::default();
    // As the agent: after the stream ends (a controlplane restart), resubscribe with the version
    // applied, after a pause with jitter (1 to 1.5 s, the agent's first backoff step).
    let mut backoff = kpx_dataplane::stream::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let ended = stream_once(&name, channel.clone(), &shared, &events, &mut state).await;
        if state.version.is_none() {
            return ended;
        }
        state.pending = None;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// One Sync stream: subscribes with the applied version and applies what comes until it ends.
async fn stream_once(
    name: &str,
    channel: AuthChannel,
    shared: &Arc<Shared>,
    events: &mpsc::UnboundedSender<SyncEvent>,
    state: &mut LightState,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<pb::NodeMessage>(4);
    let subscribe = pb::Subscribe {
        node_name: name.to_string(),
        backend: "light".into(),
        ip_families: vec!["IPv4".into()],
        applied_version: state.version.clone().unwrap_or_default(),
        ..Default::default()
    };
    tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Subscribe(subscribe)) })
        .await
        .map_err(|e| e.to_string())?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(kpx_proto::MAX_MESSAGE_BYTES);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<pb::NodeMessage, RawUpdate>::default();
    let path = http::uri::PathAndQuery::from_static("/kpx.v1.Sync/Sync");
    let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut inbound = grpc.streaming(request, path, codec).await.map_err(|e| e.to_string())?.into_inner();
    let _ = events.send(SyncEvent::Connected);
    while let Some(chunk) = inbound.message().await.map_err(|e| e.to_string())? {
        if chunk.send_digest {
            return Err("asked for a digest: light nodes never reconnect".into());
        }
        let size = chunk.encoded_len();
        let Some(result) = state.chunk(shared, &chunk, size) else { continue };
        let ack = match result {
            Ok(p) => {
                let _ = events.send(SyncEvent::Applied {
                    nonce: chunk.nonce,
                    version: chunk.version.clone(),
                    full: chunk.full,
                    entries: p.entries,
                    // Not counted per service here (the benchmark does not read them).
                    changes: ChangeCounts::default(),
                    wire_bytes: p.wire_bytes,
                    chunks: p.chunks,
                    apply: p.started.elapsed(),
                    change_times_unix_ms: Vec::new(),
                    programmed_at: SystemTime::now(),
                });
                pb::Ack { nonce: chunk.nonce, version: chunk.version.clone(), ..Default::default() }
            }
            Err(error) => {
                state.pending = None;
                let _ = events.send(SyncEvent::Rejected {
                    nonce: chunk.nonce,
                    version: chunk.version.clone(),
                    error: error.clone(),
                    changes: ChangeCounts::default(),
                });
                pb::Ack { nonce: chunk.nonce, error, need_snapshot: true, ..Default::default() }
            }
        };
        tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Ack(ack)) }).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
