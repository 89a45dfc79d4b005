//! Splits a planned update into wire messages that stay far below gRPC's 4 MiB limit.
//!
//! Chunks are produced lazily: the stream task sends one before the next is built, so a node
//! receiving a large snapshot holds at most a chunk or two in the controlplane, not a copy of
//! its whole state.

use crate::cache::PlannedUpdate;
use crate::cache::log::UpdateContent;
use kpx_proto::v1 as pb;
use prost::Message;

/// Per-entry framing overhead on the wire: a field tag and a length prefix.
const FRAMING: usize = 6;

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
    /// The view whose group the chunk being built ends with (its next endpoints join it).
    open_group: Option<usize>,
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
        open_group: None,
        finished: false,
    }
}

impl Chunks {
    /// Adds the next entry to `chunk` if it fits (or the chunk is empty); false when the
    /// chunk is full or every entry has been taken.
    fn take_one(&mut self, chunk: &mut pb::Update, size: &mut usize) -> bool {
        loop {
            let c = &self.content;
            let len = match self.section {
                Section::ServicesRemoved => c.services_removed.get(self.pos).map(|r| r.encoded_len()),
                Section::EndpointsRemoved => c.endpoints_removed.get(self.pos).map(|r| r.encoded_len()),
                Section::ServicesUpserted => c.services_upserted.get(self.pos).map(|s| s.encoded_len()),
                Section::EndpointsUpserted => c.endpoints_upserted.get(self.pos).map(|e| e.encoded_len()),
                Section::EndpointViews { view } => match c.endpoint_views.get(view) {
                    Some(v) => match v.endpoints.get(self.pos) {
                        Some(e) if self.open_group == Some(view) => Some(grouped_len(e)),
                        Some(e) => Some(grouped_len(e) + e.service.len() + FRAMING),
                        None => {
                            self.section = Section::EndpointViews { view: view + 1 };
                            self.pos = 0;
                            continue;
                        }
                    },
                    None => None,
                },
                Section::Done => return false,
            };
            let Some(len) = len else {
                self.section = match self.section {
                    Section::ServicesRemoved => Section::EndpointsRemoved,
                    Section::EndpointsRemoved => Section::ServicesUpserted,
                    Section::ServicesUpserted => Section::EndpointsUpserted,
                    Section::EndpointsUpserted => Section::EndpointViews { view: 0 },
                    _ => Section::Done,
                };
                self.pos = 0;
                continue;
            };
            if *size > 0 && *size + len + FRAMING > self.max_bytes {
                return false;
            }
            *size += len + FRAMING;
            let (c, i) = (&mut self.content, self.pos);
            match self.section {
                Section::ServicesRemoved => chunk.services_removed.push(std::mem::take(&mut c.services_removed[i])),
                Section::EndpointsRemoved => chunk.endpoints_removed.push(std::mem::take(&mut c.endpoints_removed[i])),
                Section::ServicesUpserted => chunk.services_upserted.push((*c.services_upserted[i]).clone()),
                Section::EndpointsUpserted => {
                    chunk.endpoints_upserted.push(std::mem::take(&mut c.endpoints_upserted[i]))
                }
                Section::EndpointViews { view } => {
                    let e = &c.endpoint_views[view].endpoints[i];
                    if self.open_group != Some(view) {
                        chunk
                            .endpoint_groups
                            .push(pb::ServiceEndpoints { service: e.service.clone(), endpoints: Vec::new() });
                        self.open_group = Some(view);
                    }
                    let group = chunk.endpoint_groups.last_mut().expect("opened above");
                    group.endpoints.push(grouped(e));
                }
                Section::Done => unreachable!("returned above"),
            }
            self.pos += 1;
            return true;
        }
    }
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
    }
}

/// The encoded length of [`grouped`]`(e)`, without building it.
fn grouped_len(e: &pb::Endpoint) -> usize {
    let service = e.service.len();
    let field = if service == 0 { 0 } else { 1 + prost::encoding::encoded_len_varint(service as u64) + service };
    e.encoded_len() - field
}

impl Iterator for Chunks {
    type Item = pb::Update;

    fn next(&mut self) -> Option<pb::Update> {
        if self.finished {
            return None;
        }
        let mut chunk = pb::Update {
            nonce: self.nonce,
            version: self.version.clone(),
            base_version: self.base_version.clone(),
            full: self.full,
            more: true,
            send_digest: self.send_digest,
            ..Default::default()
        };
        let mut size = 0;
        self.open_group = None;
        while self.take_one(&mut chunk, &mut size) {}
        if self.section == Section::Done {
            self.finished = true;
            chunk.more = false;
            chunk.causes = std::mem::take(&mut self.content.causes);
        }
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ClassView;
    use kpx_proto::version::ContentHash;
    use std::sync::Arc;

    fn endpoint(i: usize) -> pb::Endpoint {
        pb::Endpoint {
            service: "default/svc".into(),
            ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
            for_cluster: true,
            for_local: false,
        }
    }

    fn plan(listed: usize, in_views: usize) -> PlannedUpdate {
        let mut content =
            UpdateContent { endpoints_upserted: (0..listed).map(endpoint).collect(), ..Default::default() };
        for chunk in (0..in_views).collect::<Vec<_>>().chunks(1000) {
            let endpoints = chunk.iter().map(|i| endpoint(listed + i)).collect();
            content.endpoint_views.push(Arc::new(ClassView { endpoints, sum: ContentHash::EMPTY }));
        }
        content.services_removed.push(pb::ServiceRef { namespace: "a".into(), name: "b".into() });
        content.causes.push(pb::TraceContext { traceparent: "00-1-2-01".into(), ..Default::default() });
        PlannedUpdate { nonce: 7, version: ContentHash(5), base_version: None, full: true, content, send_digest: false }
    }

    #[test]
    fn big_snapshot_is_split_below_the_limit_and_keeps_every_entry_in_order() {
        let chunks: Vec<_> = chunk_update(plan(50_000, 50_000), 1 << 20).collect();
        assert!(chunks.len() > 2, "100k endpoints must not fit one MiB");
        for c in &chunks {
            assert!(c.encoded_len() <= (1 << 20) + 1024, "chunk of {} bytes", c.encoded_len());
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
        let chunks: Vec<_> = chunk_update(plan(3, 2), 1 << 20).collect();
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
        let chunks: Vec<_> = chunk_update(plan(0, 3000), 20_000).collect();
        assert!(chunks.len() > 3);
        for c in &chunks {
            assert!(c.encoded_len() <= 20_000 + 1024, "chunk of {} bytes", c.encoded_len());
            assert!(c.endpoint_groups.iter().all(|g| g.service == "default/svc" && !g.endpoints.is_empty()));
        }
        // Three views of 1000: each chunk holds at most one group per view it touches.
        let groups: usize = chunks.iter().map(|c| c.endpoint_groups.len()).sum();
        assert!(groups <= chunks.len() + 2, "{groups} groups in {} chunks", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.upserted_endpoint_count()).sum::<usize>(), 3000);
    }

    #[test]
    fn grouped_length_is_exact() {
        for e in [endpoint(1), endpoint(70_000), pb::Endpoint { service: String::new(), ..endpoint(2) }] {
            assert_eq!(grouped_len(&e), grouped(&e).encoded_len());
        }
        let long = pb::Endpoint { service: "n".repeat(300), ..endpoint(3) };
        assert_eq!(grouped_len(&long), grouped(&long).encoded_len());
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
        let chunks: Vec<_> = chunk_update(p, 1 << 20).collect();
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
        let chunks: Vec<_> = chunk_update(p, 1 << 20).collect();
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert!(c.send_digest && !c.more && !c.full);
        assert_eq!((c.nonce, c.version.as_str(), c.base_version.as_str()), (9, "", ""));
    }
}
