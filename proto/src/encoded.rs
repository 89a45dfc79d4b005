//! Updates the controlplane encodes itself, for `kpx.v1.Sync`'s server side.
//!
//! A node's snapshot is mostly entries that thousands of other nodes get too (every Service, the
//! endpoints of a zone). Encoded by prost per node, each of 5,000 nodes would cost a whole
//! encode (and, before it, a copy of every entry into its own `Update`). Here an update is
//! bytes: a small per-node header (nonce, versions, flags) encoded for each message, followed by
//! entry bytes that may have been encoded once and shared ([`bytes::Bytes`] is reference
//! counted). The bytes are exactly what prost would encode for the same `Update` (protobuf
//! fields may come in any order, and repeated entries keep theirs), so nodes decode them with
//! the generated `pb::Update` and see no difference (tested against prost in both directions).
//!
//! Why by hand: tonic's generated server takes a message type and encodes it per call; no
//! crate sends pre-encoded protobuf through it, but tonic lets a service name its own codec.

use std::sync::atomic::{AtomicI64, Ordering};

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};

use crate::v1 as pb;

/// The server of `kpx.v1.Sync` whose stream carries [`EncodedUpdate`]s.
#[allow(clippy::all, missing_docs)]
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/encoded/kpx.v1.Sync.rs"));
}

/// Field numbers of `kpx.v1.Update` (sync.proto) that carry shared entries.
pub mod field {
    pub const SERVICES_UPSERTED: u32 = 6;
    pub const ENDPOINT_GROUPS: u32 = 11;
}

/// One `kpx.v1.Update` message on the wire: its header's bytes, then entry segments.
#[derive(Debug, Clone, Default)]
pub struct EncodedUpdate {
    header: Vec<u8>,
    segments: Vec<Bytes>,
    len: usize,
}

impl EncodedUpdate {
    /// An update with HEADER's fields (its repeated entry fields are sent too, after it).
    pub fn new(header: &pb::Update) -> Self {
        let header = header.encode_to_vec();
        EncodedUpdate { len: header.len(), header, segments: Vec::new() }
    }

    /// Appends already encoded entries (whole fields: key, length, message).
    pub fn push(&mut self, segment: Bytes) {
        self.len += segment.len();
        self.segments.push(segment);
    }

    /// The appended segments (the shared ones keep their allocation: tests compare pointers).
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole message in one buffer (tests, and what a receiver sees).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        v.extend_from_slice(&self.header);
        for s in &self.segments {
            v.extend_from_slice(s);
        }
        v
    }
}

/// MESSAGE encoded as field TAG of its parent (key, length, message): a segment for
/// [`EncodedUpdate::push`].
pub fn field_bytes(tag: u32, message: &impl Message) -> Bytes {
    let mut buf = Vec::with_capacity(message.encoded_len() + 8);
    prost::encoding::message::encode(tag, message, &mut buf);
    buf.into()
}

/// Appends MESSAGE as field TAG to BUF (several entries in one segment).
pub fn append_field(tag: u32, message: &impl Message, buf: &mut Vec<u8>) {
    prost::encoding::message::encode(tag, message, buf);
}

/// The encoded size of MESSAGE as field TAG.
pub fn field_len(tag: u32, message: &impl Message) -> usize {
    prost::encoding::message::encoded_len(tag, message)
}

/// Bytes of encodings kept for sharing, in this process: what encode-once costs in memory
/// (the controlplane reports it as `kpx_controlplane_encoded_cache_bytes`). A process-wide
/// count rather than a walk of the cache at scrape time: the cache is 10k services and their
/// views behind a lock that the sync path needs.
static CACHED_BYTES: AtomicI64 = AtomicI64::new(0);

/// The bytes of encodings currently kept for sharing (see [`CacheAccount`]).
pub fn cached_bytes() -> i64 {
    CACHED_BYTES.load(Ordering::Relaxed)
}

/// Counts LEN bytes as cached for as long as it lives: held beside cached encodings. Bytes
/// already handed to a stream stay allocated until sent; this counts what the cache keeps.
#[derive(Debug)]
pub struct CacheAccount(usize);

impl CacheAccount {
    pub fn new(len: usize) -> Self {
        CACHED_BYTES.fetch_add(len as i64, Ordering::Relaxed);
        CacheAccount(len)
    }

    /// The bytes this account counts.
    pub fn len(&self) -> usize {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

impl Drop for CacheAccount {
    fn drop(&mut self) {
        CACHED_BYTES.fetch_sub(self.0 as i64, Ordering::Relaxed);
    }
}

/// A message shared by many updates (a Service entry every node gets), with its encoding as
/// one field of `Update`, made on first use and kept.
#[derive(Debug, Default)]
pub struct Shared<M> {
    message: M,
    field: std::sync::OnceLock<(u32, Bytes, CacheAccount)>,
}

impl<M: Message> Shared<M> {
    pub fn new(message: M) -> Self {
        Shared { message, field: std::sync::OnceLock::new() }
    }

    /// The message as field TAG (cached for the first tag asked; another tag is encoded afresh).
    pub fn field(&self, tag: u32) -> Bytes {
        let (t, b, _) = self.field.get_or_init(|| {
            let b = field_bytes(tag, &self.message);
            let account = CacheAccount::new(b.len());
            (tag, b, account)
        });
        if *t == tag { b.clone() } else { field_bytes(tag, &self.message) }
    }

    pub fn message(&self) -> &M {
        &self.message
    }
}

impl<M> std::ops::Deref for Shared<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.message
    }
}

impl<M: PartialEq> PartialEq for Shared<M> {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message
    }
}

/// Encodes [`EncodedUpdate`]s by copying their bytes; decodes what nodes send with prost.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCodec;

impl Codec for SyncCodec {
    type Encode = EncodedUpdate;
    type Decode = pb::NodeMessage;
    type Encoder = CopyEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::NodeMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        CopyEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(BufferSettings::default())
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CopyEncoder;

impl Encoder for CopyEncoder {
    type Item = EncodedUpdate;
    type Error = Status;

    fn encode(&mut self, item: EncodedUpdate, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len);
        dst.put_slice(&item.header);
        for s in &item.segments {
            dst.put_slice(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> pb::Service {
        pb::Service {
            namespace: "ns".into(),
            name: name.into(),
            cluster_ips: vec!["10.96.0.1".into()],
            ports: vec![pb::ServicePort { name: "http".into(), protocol: 1, port: 80, node_port: 0 }],
            ..Default::default()
        }
    }

    fn group(service: &str, ips: &[&str]) -> pb::ServiceEndpoints {
        pb::ServiceEndpoints {
            service: service.into(),
            endpoints: ips
                .iter()
                .map(|ip| pb::Endpoint {
                    ip: (*ip).into(),
                    ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
                    for_cluster: true,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn header_and_segments_decode_as_the_update_prost_would_build() {
        let header = pb::Update {
            nonce: 9,
            version: "v2".into(),
            base_version: "v1".into(),
            full: true,
            more: true,
            causes: vec![pb::TraceContext { traceparent: "00-a-b-01".into(), ..Default::default() }],
            ..Default::default()
        };
        let mut u = EncodedUpdate::new(&header);
        u.push(field_bytes(field::SERVICES_UPSERTED, &service("a")));
        let mut two = Vec::new();
        append_field(field::SERVICES_UPSERTED, &service("b"), &mut two);
        append_field(field::ENDPOINT_GROUPS, &group("ns/a", &["10.0.0.1", "10.0.0.2"]), &mut two);
        u.push(two.into());
        u.push(field_bytes(field::ENDPOINT_GROUPS, &group("ns/b", &["10.0.0.3"])));

        let want = pb::Update {
            services_upserted: vec![service("a"), service("b")],
            endpoint_groups: vec![group("ns/a", &["10.0.0.1", "10.0.0.2"]), group("ns/b", &["10.0.0.3"])],
            ..header
        };
        let bytes = u.to_vec();
        assert_eq!(bytes.len(), u.len());
        assert_eq!(pb::Update::decode(bytes.as_slice()).unwrap(), want);
        // Same size as prost's own encoding (only the field order differs).
        assert_eq!(bytes.len(), want.encoded_len());
        assert_eq!(field_len(field::SERVICES_UPSERTED, &service("a")), field_bytes(6, &service("a")).len());
    }

    #[test]
    fn a_shared_message_is_encoded_once_per_tag() {
        let s = Shared::new(service("a"));
        let (one, two) = (s.field(field::SERVICES_UPSERTED), s.field(field::SERVICES_UPSERTED));
        assert_eq!(one.as_ptr(), two.as_ptr(), "the same bytes, not a second encode");
        assert_eq!(one, field_bytes(field::SERVICES_UPSERTED, &service("a")));
        assert_eq!(s.field(9), field_bytes(9, &service("a")), "another tag is encoded afresh");
        assert_eq!(s.name, "a");
    }

    #[test]
    fn a_header_alone_is_the_update_with_no_entries() {
        let header = pb::Update { nonce: 1, version: "v".into(), ..Default::default() };
        let u = EncodedUpdate::new(&header);
        assert_eq!(pb::Update::decode(u.to_vec().as_slice()).unwrap(), header);
        assert!(!u.is_empty());
    }
}
