//! Splits a planned update into wire messages that stay far below gRPC's 4 MiB limit.

use crate::cache::PlannedUpdate;
use kpx_proto::v1 as pb;
use prost::Message;

/// Per-entry framing overhead on the wire: a field tag and a length prefix.
const FRAMING: usize = 6;

/// Splits an update into chunks of at most about `max_bytes` each. Every chunk carries the
/// update's nonce and versions; all but the last have `more` set. Causes ride on the last
/// chunk, the one the node acts on.
pub fn chunk_update(plan: PlannedUpdate, max_bytes: usize) -> Vec<pb::Update> {
    let header = |more: bool| pb::Update {
        nonce: plan.nonce,
        version: plan.version.to_version(),
        base_version: plan.base_version.map(|v| v.to_version()).unwrap_or_default(),
        full: plan.full,
        more,
        ..Default::default()
    };
    let mut chunks = Vec::new();
    let mut cur = header(true);
    let mut size = 0usize;
    let mut flush = |cur: &mut pb::Update, size: &mut usize, next: usize| {
        if *size > 0 && *size + next > max_bytes {
            chunks.push(std::mem::replace(cur, header(true)));
            *size = 0;
        }
        *size += next;
    };
    let c = plan.content;
    for r in c.services_removed {
        flush(&mut cur, &mut size, r.encoded_len() + FRAMING);
        cur.services_removed.push(r);
    }
    for r in c.endpoints_removed {
        flush(&mut cur, &mut size, r.encoded_len() + FRAMING);
        cur.endpoints_removed.push(r);
    }
    for s in c.services_upserted {
        flush(&mut cur, &mut size, s.encoded_len() + FRAMING);
        cur.services_upserted.push((*s).clone());
    }
    for e in c.endpoints_upserted {
        flush(&mut cur, &mut size, e.encoded_len() + FRAMING);
        cur.endpoints_upserted.push(e);
    }
    cur.more = false;
    cur.causes = c.causes;
    chunks.push(cur);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::log::UpdateContent;
    use kpx_proto::version::ContentHash;

    fn plan(endpoints: usize) -> PlannedUpdate {
        let mut content = UpdateContent::default();
        for i in 0..endpoints {
            content.endpoints_upserted.push(pb::Endpoint {
                service: "default/svc".into(),
                ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                ports: vec![pb::EndpointPort { name: "http".into(), port: 8080 }],
                for_cluster: true,
                for_local: false,
            });
        }
        content.causes.push(pb::TraceContext { traceparent: "00-1-2-01".into(), tracestate: String::new() });
        PlannedUpdate { nonce: 7, version: ContentHash(5), base_version: None, full: true, content }
    }

    #[test]
    fn big_snapshot_is_split_below_the_limit_and_keeps_every_entry() {
        let chunks = chunk_update(plan(100_000), 1 << 20);
        assert!(chunks.len() > 2, "100k endpoints must not fit one MiB");
        for c in &chunks {
            assert!(c.encoded_len() <= (1 << 20) + 1024, "chunk of {} bytes", c.encoded_len());
            assert_eq!((c.nonce, c.version.as_str(), c.full), (7, ContentHash(5).to_version().as_str(), true));
        }
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.more));
        assert!(!chunks.last().unwrap().more);
        assert_eq!(chunks.iter().map(|c| c.endpoints_upserted.len()).sum::<usize>(), 100_000);
        assert_eq!(chunks.last().unwrap().causes.len(), 1);
        assert!(chunks[0].causes.is_empty());
    }

    #[test]
    fn small_update_is_one_message() {
        let chunks = chunk_update(plan(3), 1 << 20);
        assert_eq!(chunks.len(), 1);
        assert!(!chunks[0].more);
    }
}
