//! Splits a planned update into wire messages that stay below [`kpx_proto::MAX_CHUNK_BYTES`],
//! encoded here (see `kpx_proto::encoded`).
//!
//! Chunks are produced lazily: the stream task sends one before the next is built, so a node
//! receiving a large snapshot holds at most a chunk or two in the controlplane, not a copy of
//! its whole state. The endpoints of a shared view (most of a snapshot) are encoded once per
//! view and budget, kept on the view ([`ViewSegments`]), and every node of the view's class gets
//! the same bytes; only the small per-node entries and each message's header are encoded per
//! node.

use crate::cache::PlannedUpdate;
use crate::cache::log::UpdateContent;
use bytes::Bytes;
use kpx_proto::encoded::{EncodedUpdate, append_field, field, field_len};
use kpx_proto::v1 as pb;
use std::borrow::Cow;

/// Room kept in every chunk for its header (nonce, versions, flags): view segments are cut to
/// the chunk size minus this, so that one always fits a chunk.
const HEADER_ROOM: usize = 512;

/// Field numbers of `kpx.v1.Update` for the per-node entries.
const SERVICES_REMOVED: u32 = 7;
const ENDPOINTS_UPSERTED: u32 = 8;
const ENDPOINTS_REMOVED: u32 = 9;

/// A view's endpoints encoded as `endpoint_groups` entries of at most `budget` bytes each.
#[derive(Debug)]
pub struct ViewSegments {
    budget: usize,
    segments: Vec<Bytes>,
    /// Counts the segments in `kpx_controlplane_encoded_cache_bytes` while the view keeps them.
    account: kpx_proto::encoded::CacheAccount,
}

impl ViewSegments {
    fn new(budget: usize, segments: Vec<Bytes>) -> Self {
        let account = kpx_proto::encoded::CacheAccount::new(segments.iter().map(Bytes::len).sum());
        ViewSegments { budget, segments, account }
    }

    /// Cached bytes, as counted in the controlplane's memory accounting.
    pub fn bytes(&self) -> usize {
        self.account.len()
    }
}

/// Where the chunker is in the update's entries, in the order the node applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    ServicesRemoved,
    EndpointsRemoved,
    ServicesUpserted,
    EndpointsUpserted,
    EndpointViews { view: usize },
    Done,
}

/// An iterator over the wire chunks of one update. Every chunk carries the update's nonce and
/// versions; all but the last have `more` set. Causes ride on the last chunk, the one the node
/// acts on.
pub struct Chunks {
    nonce: u64,
    send_digest: bool,
    version: String,
    base_version: String,
    full: bool,
    max_bytes: usize,
    content: UpdateContent,
    section: Section,
    pos: usize,
    finished: bool,
}

pub fn chunk_update(plan: PlannedUpdate, max_bytes: usize) -> Chunks {
    Chunks {
        nonce: plan.nonce,
        send_digest: plan.send_digest,
        version: if plan.send_digest { String::new() } else { plan.version.to_version() },
        base_version: plan.base_version.map(|v| v.to_version()).unwrap_or_default(),
        full: plan.full,
        max_bytes,
        content: plan.content,
        section: Section::ServicesRemoved,
        pos: 0,
        finished: false,
    }
}

/// One chunk being filled: the node's own entries, encoded into one buffer, then shared view
/// segments.
#[derive(Default)]
struct Filling {
    own: Vec<u8>,
    shared: Vec<Bytes>,
    size: usize,
}

impl Filling {
    fn fits(&self, len: usize, max: usize) -> bool {
        self.size == 0 || self.size + len <= max
    }
}

impl Chunks {
    /// Adds the next entry (or view segment) to the chunk if it fits (or the chunk is empty);
    /// false when the chunk is full or every entry has been taken.
    fn take_one(&mut self, chunk: &mut Filling) -> bool {
        let max = self.max_bytes.saturating_sub(HEADER_ROOM).max(1);
        loop {
            let (c, i) = (&self.content, self.pos);
            let entry: Option<(u32, &dyn EncodeAs)> = match self.section {
                Section::ServicesRemoved => c.services_removed.get(i).map(|m| (SERVICES_REMOVED, m as _)),
                Section::EndpointsRemoved => c.endpoints_removed.get(i).map(|m| (ENDPOINTS_REMOVED, m as _)),
                Section::ServicesUpserted => {
                    // Encoded once per Service entry, shared by every node's update.
                    let Some(svc) = c.services_upserted.get(i) else {
                        self.section = Section::EndpointsUpserted;
                        self.pos = 0;
                        continue;
                    };
                    let bytes = svc.field(field::SERVICES_UPSERTED);
                    if !chunk.fits(bytes.len(), max) {
                        return false;
                    }
                    chunk.size += bytes.len();
                    chunk.shared.push(bytes);
                    self.pos += 1;
                    return true;
                }
                Section::EndpointsUpserted => c.endpoints_upserted.get(i).map(|m| (ENDPOINTS_UPSERTED, m as _)),
                Section::EndpointViews { view } => {
                    let Some(v) = c.endpoint_views.get(view) else {
                        self.section = Section::Done;
                        return false;
                    };
                    let segments = view_segments(v, max);
                    let Some(seg) = segments.get(i) else {
                        self.section = Section::EndpointViews { view: view + 1 };
                        self.pos = 0;
                        continue;
                    };
                    if !chunk.fits(seg.len(), max) {
                        return false;
                    }
                    chunk.size += seg.len();
                    chunk.shared.push(seg.clone());
                    self.pos += 1;
                    return true;
                }
                Section::Done => return false,
            };
            let Some((tag, m)) = entry else {
                self.section = match self.section {
                    Section::ServicesRemoved => Section::EndpointsRemoved,
                    Section::EndpointsRemoved => Section::ServicesUpserted,
                    Section::ServicesUpserted => Section::EndpointsUpserted,
                    _ => Section::EndpointViews { view: 0 },
                };
                self.pos = 0;
                continue;
            };
            let len = m.field_len(tag);
            if !chunk.fits(len, max) {
                return false;
            }
            chunk.size += len;
            m.append(tag, &mut chunk.own);
            self.pos += 1;
            return true;
        }
    }
}

/// The per-node entry kinds, encoded the same way.
trait EncodeAs {
    fn field_len(&self, tag: u32) -> usize;
    fn append(&self, tag: u32, buf: &mut Vec<u8>);
}

impl<M: prost::Message> EncodeAs for M {
    fn field_len(&self, tag: u32) -> usize {
        field_len(tag, self)
    }
    fn append(&self, tag: u32, buf: &mut Vec<u8>) {
        append_field(tag, self, buf)
    }
}

/// V's endpoints as `endpoint_groups` segments of at most BUDGET bytes: encoded on first use and
/// kept on the view for every other node (and snapshot) that sends it with the same budget.
fn view_segments(v: &crate::cache::ClassView, budget: usize) -> Cow<'_, [Bytes]> {
    let cached = v.wire.get_or_init(|| ViewSegments::new(budget, encode_view(&v.endpoints, budget)));
    if cached.budget == budget {
        Cow::Borrowed(&cached.segments)
    } else {
        Cow::Owned(encode_view(&v.endpoints, budget))
    }
}

/// ENDPOINTS (all of one service) as `endpoint_groups` entries, each one group of at most
/// BUDGET bytes (one endpoint per group at least) naming the service once.
fn encode_view(endpoints: &[pb::Endpoint], budget: usize) -> Vec<Bytes> {
    let Some(first) = endpoints.first() else { return Vec::new() };
    let mut out = Vec::new();
    let mut group = pb::ServiceEndpoints { service: first.service.clone(), endpoints: Vec::new() };
    let empty = field_len(field::ENDPOINT_GROUPS, &group);
    // The group's size without its outer length prefix's growth: exact enough with the slack
    // below (a length prefix grows by at most 2 bytes under 2 MiB).
    let mut inner = empty;
    for e in endpoints {
        let e = grouped(e);
        let len = field_len(2, &e);
        if !group.endpoints.is_empty() && inner + len + 2 > budget {
            out.push(kpx_proto::encoded::field_bytes(field::ENDPOINT_GROUPS, &group));
            group.endpoints.clear();
            inner = empty;
        }
        inner += len;
        group.endpoints.push(e);
    }
    out.push(kpx_proto::encoded::field_bytes(field::ENDPOINT_GROUPS, &group));
    out
}

/// An endpoint as it travels in its service's group: without its service name.
fn grouped(e: &pb::Endpoint) -> pb::Endpoint {
    // Every field listed (no `..`): a new field is a compile error here, not a silent drop.
    pb::Endpoint {
        service: String::new(),
        ip: e.ip.clone(),
        ports: e.ports.clone(),
        for_cluster: e.for_cluster,
        for_local: e.for_local,
        node_tag: e.node_tag,
    }
}

impl Iterator for Chunks {
    type Item = EncodedUpdate;

    fn next(&mut self) -> Option<EncodedUpdate> {
        if self.finished {
            return None;
        }
        let mut chunk = Filling::default();
        while self.take_one(&mut chunk) {}
        let last = self.section == Section::Done;
        let header = pb::Update {
            nonce: self.nonce,
            version: self.version.clone(),
            base_version: self.base_version.clone(),
            full: self.full,
            more: !last,
            send_digest: self.send_digest,
            causes: if last { std::mem::take(&mut self.content.causes) } else { Vec::new() },
            ..Default::default()
        };
        self.finished = last;
        let mut out = EncodedUpdate::new(&header);
        if !chunk.own.is_empty() {
            out.push(chunk.own.into());
        }
        for s in chunk.shared {
            out.push(s);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ClassView;
    use kpx_proto::version::ContentHash;
    use prost::Message;
    use std::sync::Arc;

    /// The chunks as a node decodes them, with their encoded sizes.
    fn decoded(p: PlannedUpdate, max: usize) -> Vec<(pb::Update, usize)> {
        chunk_update(p, max)
            .map(|c| {
                let bytes = c.to_vec();
                assert_eq!(bytes.len(), c.len());
                (pb::Update::decode(bytes.as_slice()).expect("a chunk decodes as an Update"), bytes.len())
            })
            .collect()
    }

    fn endpoint(i: usize) -> pb::Endpoint {
        pb::Endpoint {
            service: "default/svc".into(),
            ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
            for_cluster: true,
            for_local: false,
            node_tag: 0,
        }
    }

    fn plan(listed: usize, in_views: usize) -> PlannedUpdate {
        let mut content =
            UpdateContent { endpoints_upserted: (0..listed).map(endpoint).collect(), ..Default::default() };
        for chunk in (0..in_views).collect::<Vec<_>>().chunks(1000) {
            let endpoints = chunk.iter().map(|i| endpoint(listed + i)).collect();
            content.endpoint_views.push(Arc::new(ClassView::new(endpoints, ContentHash::EMPTY)));
        }
        content.services_removed.push(pb::ServiceRef { namespace: "a".into(), name: "b".into() });
        content.causes.push(pb::TraceContext { traceparent: "00-1-2-01".into(), ..Default::default() });
        PlannedUpdate { nonce: 7, version: ContentHash(5), base_version: None, full: true, content, send_digest: false }
    }

    #[test]
    fn big_snapshot_is_split_below_the_limit_and_keeps_every_entry_in_order() {
        let (chunks, sizes): (Vec<_>, Vec<_>) = decoded(plan(50_000, 50_000), 1 << 20).into_iter().unzip();
        assert!(chunks.len() > 2, "100k endpoints must not fit one MiB");
        assert!(sizes.iter().all(|s| *s <= 1 << 20), "{sizes:?}");
        for c in &chunks {
            assert_eq!((c.nonce, c.version.as_str(), c.full), (7, ContentHash(5).to_version().as_str(), true));
        }
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.more));
        assert!(!chunks.last().unwrap().more);
        let ips: Vec<&str> = chunks.iter().flat_map(|c| c.upserted_endpoints().map(|(_, e)| e.ip.as_str())).collect();
        assert_eq!(ips.len(), 100_000);
        assert_eq!(ips[0], endpoint(0).ip);
        assert_eq!(ips[99_999], endpoint(99_999).ip);
        assert_eq!(chunks[0].services_removed.len(), 1, "removals come first");
        assert_eq!(chunks.last().unwrap().causes.len(), 1);
        assert!(chunks[0].causes.is_empty());
    }

    #[test]
    fn small_update_is_one_message() {
        let chunks: Vec<_> = decoded(plan(3, 2), 1 << 20).into_iter().map(|(c, _)| c).collect();
        assert_eq!(chunks.len(), 1);
        assert!(!chunks[0].more);
        assert_eq!(chunks[0].upserted_endpoint_count(), 5);
        assert_eq!(chunks[0].endpoints_upserted.len(), 3, "delta entries stay listed");
        // A view travels as one group naming its service once.
        let groups = &chunks[0].endpoint_groups;
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].service, "default/svc");
        assert!(groups[0].endpoints.iter().all(|e| e.service.is_empty()));
    }

    #[test]
    fn groups_are_cut_at_chunk_boundaries_and_reopened() {
        let (chunks, sizes): (Vec<_>, Vec<_>) = decoded(plan(0, 3000), 20_000).into_iter().unzip();
        assert!(chunks.len() > 3);
        assert!(sizes.iter().all(|s| *s <= 20_000), "{sizes:?}");
        for c in &chunks {
            assert!(c.endpoint_groups.iter().all(|g| g.service == "default/svc" && !g.endpoints.is_empty()));
        }
        // Three views of 1000: each chunk holds at most one group per view it touches.
        let groups: usize = chunks.iter().map(|c| c.endpoint_groups.len()).sum();
        assert!(groups <= chunks.len() + 2, "{groups} groups in {} chunks", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.upserted_endpoint_count()).sum::<usize>(), 3000);
    }

    #[test]
    fn views_and_services_are_encoded_once_and_their_bytes_shared_by_every_node() {
        let mut p = plan(0, 2000);
        let svc = Arc::new(crate::node_view::SharedService::new(pb::Service {
            namespace: "default".into(),
            name: "svc".into(),
            ..Default::default()
        }));
        p.content.services_upserted.push(svc.clone());
        let views = p.content.endpoint_views.clone();
        let again = || PlannedUpdate {
            content: UpdateContent {
                endpoint_views: views.clone(),
                services_upserted: vec![svc.clone()],
                ..Default::default()
            },
            ..plan(0, 0)
        };
        let first: Vec<EncodedUpdate> = chunk_update(p, 20_000).collect();
        let cached = views[0].wire.get().expect("encoded on first use");
        assert!(cached.bytes() > 0);
        let second: Vec<EncodedUpdate> = chunk_update(again(), 20_000).collect();
        let shared =
            |u: &[EncodedUpdate]| u.iter().flat_map(|c| c.segments().iter().map(|b| b.as_ptr())).collect::<Vec<_>>();
        let (a, b) = (shared(&first), shared(&second));
        assert!(!a.is_empty());
        assert!(b.iter().all(|p| a.contains(p)), "the second node's view bytes are the first's");
        let service_bytes = svc.field(kpx_proto::encoded::field::SERVICES_UPSERTED).as_ptr();
        assert!(a.contains(&service_bytes) && b.contains(&service_bytes), "one encoding of the Service entry");
        // Another chunk size encodes afresh (and still decodes to every endpoint).
        let other: usize = decoded(again(), 9_000).iter().map(|(c, _)| c.upserted_endpoint_count()).sum();
        assert_eq!(other, 2000);
        let resized = shared(&chunk_update(again(), 9_000).collect::<Vec<_>>());
        assert!(resized.iter().all(|p| *p == service_bytes || !a.contains(p)), "views cut afresh");
    }

    #[test]
    fn an_endpoint_bigger_than_a_chunk_still_travels() {
        let mut content = UpdateContent::default();
        let huge = pb::Endpoint {
            ports: (0..500).map(|i| pb::EndpointPort { name: format!("p{i}"), port: i }).collect(),
            ..endpoint(1)
        };
        content.endpoint_views.push(Arc::new(ClassView::new(vec![huge.clone(), endpoint(2)], ContentHash::EMPTY)));
        let p = PlannedUpdate { content, ..plan(0, 0) };
        let chunks = decoded(p, 1024);
        let ips: Vec<String> = chunks
            .iter()
            .flat_map(|(c, _)| c.upserted_endpoints().map(|(_, e)| e.ip.clone()).collect::<Vec<_>>())
            .collect();
        assert_eq!(ips, [huge.ip, endpoint(2).ip]);
    }

    #[test]
    fn empty_update_is_still_one_message() {
        let p = PlannedUpdate {
            nonce: 1,
            version: ContentHash(1),
            base_version: Some(ContentHash(1)),
            full: false,
            content: UpdateContent::default(),
            send_digest: false,
        };
        let chunks: Vec<_> = decoded(p, 1 << 20).into_iter().map(|(c, _)| c).collect();
        assert_eq!(chunks.len(), 1);
        assert!(!chunks[0].more);
    }

    #[test]
    fn a_digest_request_is_one_empty_message_without_version() {
        let p = PlannedUpdate {
            nonce: 9,
            version: ContentHash(1),
            base_version: None,
            full: false,
            content: UpdateContent::default(),
            send_digest: true,
        };
        let chunks: Vec<_> = decoded(p, 1 << 20).into_iter().map(|(c, _)| c).collect();
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert!(c.send_digest && !c.more && !c.full);
        assert_eq!((c.nonce, c.version.as_str(), c.base_version.as_str()), (9, "", ""));
    }
}
