//! The node's copy of its desired state, updated by snapshots and deltas.
//!
//! Applying follows the protocol's order (service removals, endpoint removals, service
//! upserts, endpoint upserts) and then checks the content hash of the result against the
//! update's version, so a node notices if it ever drifts from what the controlplane thinks
//! it runs.

use kpx_proto::v1 as pb;
use kpx_proto::version::{self, ContentHash};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    #[error("delta is based on version {base} but this node runs {current}")]
    WrongBase { base: String, current: String },
    #[error("endpoint {ip} refers to service {service}, which this node does not have")]
    OrphanEndpoint { service: String, ip: String },
    #[error("after applying, the state hashes to {actual} instead of version {expected}")]
    VersionMismatch { expected: String, actual: String },
    #[error("an endpoint group of service {group} holds an endpoint of service {service}")]
    MixedGroup { group: String, service: String },
    #[error("update carries an invalid version {0:?}")]
    BadVersion(String),
}

impl ApplyError {
    /// Only a snapshot can repair this node's state.
    pub fn needs_snapshot(&self) -> bool {
        true
    }
}

/// What one update changed: backends re-render only these services.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ChangeSet {
    pub full: bool,
    /// "namespace/name" of every service whose entry or endpoints changed (or that was removed).
    pub services: BTreeSet<String>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceEntry {
    pub service: pb::Service,
    /// By IP.
    pub endpoints: BTreeMap<String, pb::Endpoint>,
}

/// The applied services by "namespace/name". Entries are shared (copy on write), so the copies
/// the agent keeps beside the session's state (for housekeeping resyncs and the admin API) cost
/// a pointer per service, not a second copy of every endpoint.
pub type Services = BTreeMap<String, Arc<ServiceEntry>>;

#[derive(Debug, Default, Clone)]
pub struct AppliedState {
    services: Services,
    hash: ContentHash,
    version: Option<ContentHash>,
}

/// The content version of these services and their endpoints (O(entries)).
pub fn content_hash(services: &Services) -> ContentHash {
    let mut hash = ContentHash::EMPTY;
    for e in services.values() {
        hash.add(version::service_hash(&e.service));
        e.endpoints.values().for_each(|ep| hash.add(version::endpoint_hash(ep)));
    }
    hash
}

/// Digest messages stay near this size, as update chunks do (see kpx_proto::MAX_CHUNK_BYTES).
const DIGEST_CHUNK_BYTES: usize = 64 * 1024;

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl AppliedState {
    /// A state holding exactly `services`, a copy of another state's [`AppliedState::services`]
    /// (keyed "namespace/name"), at the version they hash to: for the backends' periodic full
    /// resync and the admin API, which keep the services but not the state.
    pub fn from_services(services: &Services) -> AppliedState {
        let hash = content_hash(services);
        AppliedState { services: services.clone(), hash, version: Some(hash) }
    }

    /// The state a snapshot of these entries leaves (tests, benchmarks, tools); an error for
    /// an endpoint of a service not among them.
    pub fn with(services: Vec<pb::Service>, endpoints: Vec<pb::Endpoint>) -> Result<AppliedState, ApplyError> {
        let mut st = AppliedState::default();
        st.apply(&pb::Update::snapshot(services, endpoints))?;
        Ok(st)
    }

    /// The version this state was last confirmed to be, if any.
    pub fn version(&self) -> Option<ContentHash> {
        self.version
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The answer to a digest request: one sum per service, split into messages of about
    /// 64 KiB. O(entries): the sums are computed here, not kept (a digest is asked for only
    /// when a node reconnects to a controlplane that does not know its version).
    pub fn digest(&self, nonce: u64) -> Vec<pb::Digest> {
        let version = self.version.map(|v| v.to_version()).unwrap_or_default();
        let mut out = vec![pb::Digest { nonce, version: version.clone(), ..Default::default() }];
        let mut size = 0;
        for entry in self.services.values() {
            let sum = version::service_sum(&entry.service, entry.endpoints.values());
            let d = pb::ServiceDigest {
                namespace: entry.service.namespace.clone(),
                name: entry.service.name.clone(),
                sum: sum.to_bytes(),
            };
            size += d.encoded_len() + 4;
            if size > DIGEST_CHUNK_BYTES {
                out.last_mut().expect("one").more = true;
                out.push(pb::Digest { nonce, version: version.clone(), ..Default::default() });
                size = d.encoded_len() + 4;
            }
            out.last_mut().expect("one").services.push(d);
        }
        out
    }

    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }

    /// Applies one whole update (all chunks merged). On error the state may be partly
    /// changed and its version is cleared: the node must ask for a snapshot.
    pub fn apply(&mut self, u: &pb::Update) -> Result<ChangeSet, ApplyError> {
        let target = ContentHash::parse_version(&u.version).ok_or_else(|| ApplyError::BadVersion(u.version.clone()))?;
        let mut changes = ChangeSet { full: u.full, ..Default::default() };
        if u.full {
            changes.services.extend(self.services.keys().cloned());
            self.services.clear();
            self.hash = ContentHash::EMPTY;
        } else {
            let current = self.version.map(|v| v.to_version()).unwrap_or_default();
            if u.base_version != current {
                return Err(ApplyError::WrongBase { base: u.base_version.clone(), current });
            }
        }
        let result = self.apply_entries(u, &mut changes);
        self.version = None;
        result?;
        if self.hash != target {
            return Err(ApplyError::VersionMismatch { expected: u.version.clone(), actual: self.hash.to_version() });
        }
        self.version = Some(target);
        Ok(changes)
    }

    fn apply_entries(&mut self, u: &pb::Update, changes: &mut ChangeSet) -> Result<(), ApplyError> {
        for r in &u.services_removed {
            let k = key(&r.namespace, &r.name);
            if let Some(old) = self.services.remove(&k) {
                self.hash.remove(version::service_hash(&old.service));
                for e in old.endpoints.values() {
                    self.hash.remove(version::endpoint_hash(e));
                }
                changes.services.insert(k);
            }
        }
        for r in &u.endpoints_removed {
            if let Some(s) = self.services.get_mut(&r.service)
                && s.endpoints.contains_key(&r.ip)
                && let Some(old) = Arc::make_mut(s).endpoints.remove(&r.ip)
            {
                self.hash.remove(version::endpoint_hash(&old));
                changes.services.insert(r.service.clone());
            }
        }
        for s in &u.services_upserted {
            let k = key(&s.namespace, &s.name);
            // Whether it replaces a service (an all-empty one included): entries only come
            // from upserts.
            let replaces = self.services.contains_key(&k);
            let entry = Arc::make_mut(self.services.entry(k.clone()).or_default());
            if replaces {
                self.hash.remove(version::service_hash(&entry.service));
            }
            self.hash.add(version::service_hash(s));
            entry.service = s.clone();
            changes.services.insert(k);
        }
        for g in &u.endpoint_groups {
            if let Some(e) = g.endpoints.iter().find(|e| !e.service.is_empty() && e.service != g.service) {
                return Err(ApplyError::MixedGroup { group: g.service.clone(), service: e.service.clone() });
            }
        }
        for (service, e) in u.upserted_endpoints() {
            let Some(s) = self.services.get_mut(service) else {
                return Err(ApplyError::OrphanEndpoint { service: service.to_string(), ip: e.ip.clone() });
            };
            // Stored (and hashed) with its service named, however it travelled.
            let mut e = e.clone();
            if e.service.is_empty() {
                e.service = service.to_string();
            }
            self.hash.add(version::endpoint_hash(&e));
            if let Some(old) = Arc::make_mut(s).endpoints.insert(e.ip.clone(), e) {
                self.hash.remove(version::endpoint_hash(&old));
            }
            if !changes.services.contains(service) {
                changes.services.insert(service.to_string());
            }
        }
        Ok(())
    }
}

/// Collects the chunks of one update (same nonce, `more` set on all but the last).
#[derive(Debug, Default)]
pub struct ChunkAssembler {
    pending: Option<pb::Update>,
}

impl ChunkAssembler {
    /// Returns the whole update once its last chunk arrived. A chunk with a new nonce drops an
    /// unfinished update (the controlplane only abandons one when the stream restarts).
    pub fn push(&mut self, chunk: pb::Update) -> Option<pb::Update> {
        let merged = match self.pending.take() {
            Some(mut p) if p.nonce == chunk.nonce => {
                p.merge_chunk(chunk);
                p
            }
            _ => chunk,
        };
        if merged.more {
            self.pending = Some(merged);
            None
        } else {
            Some(merged)
        }
    }
}

#[cfg(test)]
mod tests;
