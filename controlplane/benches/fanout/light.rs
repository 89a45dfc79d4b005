//! A light simulated node: the real Sync protocol (Subscribe, chunked updates, Ack/NACK), every
//! version verified with the agent's content hash, but no endpoint kept beyond its 16-byte hash.
//! Nodes that see a service the same way share one copy of its hashes (interned by content), so
//! thousands of them fit in one process at 100k endpoints, where the agent's full state costs
//! ~45 MiB per node.

use kpx_auth::client::AuthChannel;
use kpx_dataplane::state::ChunkAssembler;
use kpx_dataplane::stream::{ChangeCounts, SyncEvent};
use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};
use prost::Message;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime};
use tokio::sync::mpsc;

/// One service as a node sees it: its entry's hash and its endpoints' (by IP), and their sum.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ServiceHashes {
    service: u128,
    /// (IP as text, endpoint hash), sorted by IP.
    endpoints: Vec<(Box<str>, u128)>,
}

impl ServiceHashes {
    fn sum(&self) -> ContentHash {
        let mut sum = ContentHash(self.service);
        self.endpoints.iter().for_each(|(_, h)| sum.add(version::EntryHash(*h)));
        sum
    }
}

/// Service names and service views shared by every node of the process.
#[derive(Debug, Default)]
pub struct Shared {
    names: Mutex<HashMap<Arc<str>, u32>>,
    views: Mutex<HashMap<ServiceHashes, Weak<ServiceHashes>>>,
}

impl Shared {
    fn id(&self, name: &str) -> u32 {
        let mut names = self.names.lock().unwrap();
        let next = names.len() as u32;
        *names.entry(Arc::from(name)).or_insert(next)
    }

    fn intern(&self, view: ServiceHashes) -> Arc<ServiceHashes> {
        let mut views = self.views.lock().unwrap();
        if let Some(v) = views.get(&view).and_then(Weak::upgrade) {
            return v;
        }
        let v = Arc::new(view.clone());
        views.insert(view, Arc::downgrade(&v));
        v
    }

    /// Distinct service views held (for the report).
    pub fn views(&self) -> usize {
        let mut views = self.views.lock().unwrap();
        views.retain(|_, w| w.strong_count() > 0);
        views.len()
    }
}

/// What a light node holds: per service, a pointer to a shared view.
#[derive(Default)]
struct LightState {
    services: HashMap<u32, Arc<ServiceHashes>>,
    total: ContentHash,
    version: Option<String>,
}

fn ip_key(ip: &str) -> Box<str> {
    ip.into()
}

impl LightState {
    /// Applies an update as the agent does (removals, then upserts) and checks the version.
    fn apply(&mut self, shared: &Shared, u: &pb::Update) -> Result<(), String> {
        if u.full {
            self.services.clear();
            self.total = ContentHash::EMPTY;
        } else if self.version.as_deref() != Some(u.base_version.as_str()) {
            return Err(format!("delta on {} but this node runs {:?}", u.base_version, self.version));
        }
        self.version = None;
        // Services touched by this update, copied out of the shared views until the end.
        let mut open: HashMap<u32, ServiceHashes> = HashMap::new();
        let take = |services: &mut HashMap<u32, Arc<ServiceHashes>>, total: &mut ContentHash, id: u32| {
            let v = services.remove(&id).map(|a| (*a).clone());
            if let Some(v) = &v {
                total.remove(version::EntryHash(v.sum().0));
            }
            v
        };
        for r in &u.services_removed {
            let id = shared.id(&format!("{}/{}", r.namespace, r.name));
            take(&mut self.services, &mut self.total, id);
            open.remove(&id);
        }
        for r in &u.endpoints_removed {
            let id = shared.id(&r.service);
            if !open.contains_key(&id)
                && let Some(v) = take(&mut self.services, &mut self.total, id)
            {
                open.insert(id, v);
            }
            if let Some(v) = open.get_mut(&id) {
                v.endpoints.retain(|(ip, _)| **ip != *r.ip);
            }
        }
        for s in &u.services_upserted {
            let id = shared.id(&format!("{}/{}", s.namespace, s.name));
            let v = match open.entry(id) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(slot) => slot.insert(
                    take(&mut self.services, &mut self.total, id)
                        .unwrap_or(ServiceHashes { service: 0, endpoints: Vec::new() }),
                ),
            };
            v.service = version::service_hash(s).0;
        }
        for (service, e) in u.upserted_endpoints() {
            let id = shared.id(service);
            if let Entry::Vacant(slot) = open.entry(id) {
                let v = take(&mut self.services, &mut self.total, id)
                    .ok_or_else(|| format!("endpoint {} of unknown service {service}", e.ip))?;
                slot.insert(v);
            }
            // Hashed with its service named, as the agent stores it.
            let hash = if e.service.is_empty() {
                version::endpoint_hash(&pb::Endpoint { service: service.to_string(), ..e.clone() }).0
            } else {
                version::endpoint_hash(e).0
            };
            let v = open.get_mut(&id).expect("opened");
            match v.endpoints.binary_search_by(|(ip, _)| (**ip).cmp(e.ip.as_str())) {
                Ok(i) => v.endpoints[i].1 = hash,
                Err(i) => v.endpoints.insert(i, (ip_key(&e.ip), hash)),
            }
        }
        for (id, mut v) in open {
            v.endpoints.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            self.total.add(version::EntryHash(v.sum().0));
            self.services.insert(id, shared.intern(v));
        }
        if self.total.to_version() != u.version {
            return Err(format!("state hashes to {} instead of {}", self.total.to_version(), u.version));
        }
        self.version = Some(u.version.clone());
        Ok(())
    }
}

/// Runs one light node's Sync stream until it ends, reporting like the agent's session.
pub async fn run(
    name: String,
    channel: AuthChannel,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<SyncEvent>,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<pb::NodeMessage>(4);
    let subscribe = pb::Subscribe {
        node_name: name,
        backend: "light".into(),
        ip_families: vec!["IPv4".into()],
        ..Default::default()
    };
    tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Subscribe(subscribe)) })
        .await
        .map_err(|e| e.to_string())?;
    let mut client =
        pb::sync_client::SyncClient::new(channel).max_decoding_message_size(4 * kpx_proto::MAX_CHUNK_BYTES);
    let mut inbound =
        client.sync(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|e| e.to_string())?.into_inner();
    let _ = events.send(SyncEvent::Connected);
    let (mut state, mut assembler) = (LightState::default(), ChunkAssembler::default());
    let (mut wire_bytes, mut chunks) = (0usize, 0usize);
    while let Some(chunk) = inbound.message().await.map_err(|e| e.to_string())? {
        wire_bytes += chunk.encoded_len();
        chunks += 1;
        let Some(update) = assembler.push(chunk) else { continue };
        let started = Instant::now();
        let result = state.apply(&shared, &update);
        let entries = update.services_upserted.len()
            + update.services_removed.len()
            + update.upserted_endpoint_count()
            + update.endpoints_removed.len();
        let ack = match &result {
            Ok(()) => {
                let _ = events.send(SyncEvent::Applied {
                    nonce: update.nonce,
                    version: update.version.clone(),
                    full: update.full,
                    entries,
                    changes: ChangeCounts::of(&update),
                    wire_bytes: std::mem::take(&mut wire_bytes),
                    chunks: std::mem::take(&mut chunks),
                    apply: started.elapsed(),
                    change_times_unix_ms: Vec::new(),
                    programmed_at: SystemTime::now(),
                });
                pb::Ack { nonce: update.nonce, version: update.version.clone(), ..Default::default() }
            }
            Err(error) => {
                let _ = events.send(SyncEvent::Rejected {
                    nonce: update.nonce,
                    version: update.version.clone(),
                    error: error.clone(),
                    changes: ChangeCounts::of(&update),
                });
                pb::Ack { nonce: update.nonce, error: error.clone(), need_snapshot: true, ..Default::default() }
            }
        };
        tx.send(pb::NodeMessage { msg: Some(pb::node_message::Msg::Ack(ack)) }).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
