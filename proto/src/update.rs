//! Helpers on [`Update`] that both receivers need (the dataplane's session and `kpxctl watch`):
//! joining an update's chunks and reading its upserted endpoints whichever way they were sent.

use crate::v1::{Endpoint, Service, Update};
use crate::version::{self, ContentHash};

impl Update {
    /// A snapshot of exactly these entries, at the version they hash to (for tests, benchmarks
    /// and tools that build a node's state by hand; the controlplane keeps its hashes
    /// incrementally instead).
    pub fn snapshot(services: Vec<Service>, endpoints: Vec<Endpoint>) -> Update {
        let mut hash = ContentHash::EMPTY;
        services.iter().for_each(|s| hash.add(version::service_hash(s)));
        endpoints.iter().for_each(|e| hash.add(version::endpoint_hash(e)));
        Update {
            version: hash.to_version(),
            full: true,
            services_upserted: services,
            endpoints_upserted: endpoints,
            ..Default::default()
        }
    }

    /// Every upserted endpoint with the service it belongs to, in the order a node applies
    /// them: the listed ones, then the grouped ones (whose own `service` is empty on the wire;
    /// a grouped endpoint naming another service is returned with that name, for the receiver
    /// to reject).
    pub fn upserted_endpoints(&self) -> impl Iterator<Item = (&str, &Endpoint)> {
        let listed = self.endpoints_upserted.iter().map(|e| (e.service.as_str(), e));
        let grouped = self.endpoint_groups.iter().flat_map(|g| {
            g.endpoints
                .iter()
                .map(move |e| (if e.service.is_empty() { g.service.as_str() } else { e.service.as_str() }, e))
        });
        listed.chain(grouped)
    }

    /// How many endpoints the update upserts.
    pub fn upserted_endpoint_count(&self) -> usize {
        self.endpoints_upserted.len() + self.endpoint_groups.iter().map(|g| g.endpoints.len()).sum::<usize>()
    }

    /// Appends the next chunk of the same update (same nonce): its entries, its `more` flag
    /// and, on the last chunk, its causes.
    pub fn merge_chunk(&mut self, chunk: Update) {
        self.more = chunk.more;
        self.services_removed.extend(chunk.services_removed);
        self.endpoints_removed.extend(chunk.endpoints_removed);
        self.services_upserted.extend(chunk.services_upserted);
        self.endpoints_upserted.extend(chunk.endpoints_upserted);
        self.endpoint_groups.extend(chunk.endpoint_groups);
        self.causes.extend(chunk.causes);
    }
}

#[cfg(test)]
mod tests {
    use crate::v1::{Endpoint, ServiceEndpoints, Update};

    fn ep(service: &str, ip: &str) -> Endpoint {
        Endpoint { service: service.into(), ip: ip.into(), ..Default::default() }
    }

    #[test]
    fn grouped_endpoints_take_their_group_s_service() {
        let u = Update {
            endpoints_upserted: vec![ep("a/x", "10.0.0.1")],
            endpoint_groups: vec![ServiceEndpoints {
                service: "a/y".into(),
                endpoints: vec![ep("", "10.0.0.2"), ep("a/y", "10.0.0.3"), ep("a/z", "10.0.0.4")],
            }],
            ..Default::default()
        };
        let got: Vec<(&str, &str)> = u.upserted_endpoints().map(|(s, e)| (s, e.ip.as_str())).collect();
        assert_eq!(got, [("a/x", "10.0.0.1"), ("a/y", "10.0.0.2"), ("a/y", "10.0.0.3"), ("a/z", "10.0.0.4")]);
        assert_eq!(u.upserted_endpoint_count(), 4);
    }

    #[test]
    fn a_snapshot_carries_the_version_of_its_entries() {
        let e = ep("a/x", "10.0.0.1");
        let u = Update::snapshot(Vec::new(), vec![e.clone()]);
        let mut want = crate::version::ContentHash::EMPTY;
        want.add(crate::version::endpoint_hash(&e));
        assert_eq!((u.full, u.version), (true, want.to_version()));
        assert_ne!(Update::snapshot(Vec::new(), Vec::new()).version, want.to_version());
    }

    #[test]
    fn chunks_merge_in_order() {
        let group = |ip: &str| ServiceEndpoints { service: "a/y".into(), endpoints: vec![ep("", ip)] };
        let mut whole = Update { more: true, endpoint_groups: vec![group("10.0.0.1")], ..Default::default() };
        whole.merge_chunk(Update { more: false, endpoint_groups: vec![group("10.0.0.2")], ..Default::default() });
        assert!(!whole.more);
        let ips: Vec<&str> = whole.upserted_endpoints().map(|(_, e)| e.ip.as_str()).collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
    }
}
