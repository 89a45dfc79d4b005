//! Content versions: a node's version is a hash of its whole desired state.
//!
//! The hash is an order-independent sum of per-entry hashes (a multiset hash), so the
//! controlplane can update a node's version in O(1) when one entry changes, and a node can
//! verify an update by hashing what it applied. Every replica and every restart computes the
//! same version for the same content, which is what lets a node reconnect to another replica
//! without a resend. Entries are hashed over their protobuf encoding, which prost produces
//! deterministically for messages without map fields (ours have none).
//!
//! A field added to `Service` or `Endpoint` changes the hash of every entry that sets it, and an
//! agent built before the field drops it when decoding: it would compute another version than
//! the controlplane and NACK every update during a rolling upgrade. So a new field is either left
//! out of the hash (as `Endpoint.node_tag` is, see [`endpoint_hash`]) or sent only to agents
//! that announce they know it.

use crate::v1::{Endpoint, Service};
use prost::Message;
use std::fmt;
use xxhash_rust::xxh3::Xxh3;

/// A multiset hash of a set of entries. Adding and removing entries commute.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub u128);

impl ContentHash {
    pub const EMPTY: ContentHash = ContentHash(0);

    pub fn add(&mut self, entry: EntryHash) {
        self.0 = self.0.wrapping_add(entry.0);
    }

    pub fn remove(&mut self, entry: EntryHash) {
        self.0 = self.0.wrapping_sub(entry.0);
    }

    /// Replaces the contribution `old` by `new`.
    pub fn apply(&mut self, old: ContentHash, new: ContentHash) {
        self.0 = self.0.wrapping_sub(old.0).wrapping_add(new.0);
    }

    /// The version string sent on the wire: 32 lowercase hex digits.
    pub fn to_version(self) -> String {
        format!("{:032x}", self.0)
    }

    pub fn parse_version(s: &str) -> Option<ContentHash> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(ContentHash)
    }

    /// The 16 bytes of a digest's `sum` (big-endian).
    pub fn to_bytes(self) -> Vec<u8> {
        self.0.to_be_bytes().to_vec()
    }

    pub fn from_bytes(b: &[u8]) -> Option<ContentHash> {
        <[u8; 16]>::try_from(b).ok().map(|a| ContentHash(u128::from_be_bytes(a)))
    }
}

/// One service's contribution to a node's version: its entry's hash plus its endpoints'. A
/// node's version is the sum of these over its services; a Digest lists them.
pub fn service_sum<'a>(service: &Service, endpoints: impl IntoIterator<Item = &'a Endpoint>) -> ContentHash {
    let mut sum = ContentHash::from(service_hash(service));
    endpoints.into_iter().for_each(|e| sum.add(endpoint_hash(e)));
    sum
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The hash of one entry of a node's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EntryHash(pub u128);

impl From<EntryHash> for ContentHash {
    fn from(e: EntryHash) -> Self {
        ContentHash(e.0)
    }
}

fn hash_tagged(tag: u8, msg: &impl Message) -> EntryHash {
    // Encoding into a reused buffer would save an allocation, but this is called once per
    // changed entry, not per node: the controlplane shares entry hashes between nodes.
    hash_bytes(tag, &msg.encode_to_vec())
}

fn hash_bytes(tag: u8, encoded: &[u8]) -> EntryHash {
    let mut h = Xxh3::new();
    h.update(&[tag]);
    h.update(encoded);
    EntryHash(h.digest128())
}

pub fn service_hash(s: &Service) -> EntryHash {
    hash_tagged(b'S', s)
}

/// An endpoint's hash, without its `node_tag`: an agent built before that field drops it when it
/// decodes an update, and must still compute the version the controlplane computes (a rolling
/// upgrade runs both). What that leaves uncovered: an endpoint whose tag alone changes (its
/// address reappearing on another node within one update) keeps its version, so the new tag
/// reaches a node with the service's next change or the node's next snapshot.
pub fn endpoint_hash(e: &Endpoint) -> EntryHash {
    let mut bytes = e.encode_to_vec();
    // prost writes fields in tag order, so a set `node_tag` (field 6, fixed32) is the last five
    // bytes: its key 0x35, then the value. Dropping them hashes what an older agent re-encodes,
    // without copying the endpoint (this runs for every endpoint of a snapshot, on both planes).
    const NODE_TAG_KEY: u8 = (6 << 3) | 5;
    let at = bytes.len().saturating_sub(5);
    if e.node_tag != 0 && bytes.get(at) == Some(&NODE_TAG_KEY) {
        bytes.truncate(at);
    }
    hash_bytes(b'E', &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str) -> Endpoint {
        Endpoint { service: "ns/a".into(), ip: ip.into(), for_cluster: true, ..Default::default() }
    }

    /// `Endpoint` as agents built before `node_tag` know it (fields 1 to 5).
    #[derive(Clone, PartialEq, prost::Message)]
    struct EndpointBeforeNodeTag {
        #[prost(string, tag = "1")]
        service: String,
        #[prost(string, tag = "2")]
        ip: String,
        #[prost(message, repeated, tag = "3")]
        ports: Vec<crate::v1::EndpointPort>,
        #[prost(bool, tag = "4")]
        for_cluster: bool,
        #[prost(bool, tag = "5")]
        for_local: bool,
    }

    #[test]
    fn an_agent_that_drops_the_node_tag_computes_the_same_version() {
        let port = crate::v1::EndpointPort { name: "http".into(), port: 8080 };
        let tagged = Endpoint { ports: vec![port], node_tag: crate::node_tag("node-a"), ..ep("10.0.0.1") };
        // What an older agent decodes from the controlplane's bytes, and hashes.
        let old = EndpointBeforeNodeTag::decode(tagged.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(endpoint_hash(&tagged), hash_tagged(b'E', &old));
        assert_eq!(endpoint_hash(&tagged), endpoint_hash(&Endpoint { node_tag: 0, ..tagged.clone() }));
        // Everything else still counts.
        assert_ne!(endpoint_hash(&tagged), endpoint_hash(&Endpoint { for_local: true, ..tagged.clone() }));
    }

    #[test]
    fn sum_is_order_independent_and_reversible() {
        let (a, b) = (endpoint_hash(&ep("10.0.0.1")), endpoint_hash(&ep("10.0.0.2")));
        let mut x = ContentHash::EMPTY;
        x.add(a);
        x.add(b);
        let mut y = ContentHash::EMPTY;
        y.add(b);
        y.add(a);
        assert_eq!(x, y);
        x.remove(a);
        x.remove(b);
        assert_eq!(x, ContentHash::EMPTY);
    }

    #[test]
    fn different_content_different_hash() {
        let mut changed = ep("10.0.0.1");
        changed.for_cluster = false;
        assert_ne!(endpoint_hash(&ep("10.0.0.1")), endpoint_hash(&changed));
        let s = Service { namespace: "ns".into(), name: "a".into(), ..Default::default() };
        let e = Endpoint { service: "ns".into(), ip: "a".into(), ..Default::default() };
        assert_ne!(service_hash(&s), endpoint_hash(&e), "entry kinds are tagged");
    }

    #[test]
    fn version_round_trips_and_rejects_garbage() {
        let v = ContentHash(0xdead_beef);
        assert_eq!(ContentHash::parse_version(&v.to_version()), Some(v));
        assert_eq!(ContentHash::parse_version("xyz"), None);
        assert_eq!(ContentHash::parse_version(&"g".repeat(32)), None);
        assert_eq!(ContentHash::from_bytes(&v.to_bytes()), Some(v));
        assert_eq!(ContentHash::from_bytes(&[1, 2, 3]), None);
    }
}
