//! `kpxctl watch NODE`: a node's state as the controlplane streams it (WatchNodeState), a
//! snapshot then deltas, applied to a small local copy so that each change can be described.
//!
//! Chunks of one update (same nonce, `more` set on all but the last) are merged before being
//! applied, in the protocol's order: a snapshot clears, then service removals (with their
//! endpoints), endpoint removals, service upserts, endpoint upserts.

use kpx_proto::v1::{Endpoint, Service, Update};
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone)]
pub struct LocalState {
    pub version: String,
    /// "namespace/name" -> the service and its endpoints by IP.
    pub services: BTreeMap<String, (Service, BTreeMap<String, Endpoint>)>,
}

/// What one update changed, for one line of output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub full: bool,
    pub version: String,
    pub base_version: String,
    pub services_added: Vec<String>,
    pub services_changed: Vec<String>,
    pub services_removed: Vec<String>,
    /// "namespace/name ip"
    pub endpoints_added: Vec<String>,
    pub endpoints_changed: Vec<String>,
    pub endpoints_removed: Vec<String>,
}

/// Joins the chunks of one update; `None` while more chunks are to come.
#[derive(Debug, Default)]
pub struct Chunks {
    pending: Option<Update>,
}

impl Chunks {
    pub fn push(&mut self, u: Update) -> Option<Update> {
        let merged = match self.pending.take() {
            Some(mut p) if p.nonce == u.nonce => {
                p.merge_chunk(u);
                p
            }
            // A new nonce abandons an unfinished update.
            _ => u,
        };
        if merged.more {
            self.pending = Some(merged);
            None
        } else {
            Some(merged)
        }
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl LocalState {
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|(_, e)| e.len()).sum()
    }

    /// Applies a whole update. A delta on another base than ours is an error (the stream
    /// missed something): its message says so.
    pub fn apply(&mut self, u: &Update) -> Result<Change, String> {
        if !u.full && u.base_version != self.version {
            return Err(format!(
                "the controlplane sent a delta based on version {:?}, but this watch has {:?}",
                u.base_version, self.version
            ));
        }
        let mut c = Change {
            full: u.full,
            version: u.version.clone(),
            base_version: u.base_version.clone(),
            ..Default::default()
        };
        if u.full {
            self.services.clear();
        }
        for r in &u.services_removed {
            let k = key(&r.namespace, &r.name);
            if let Some((_, eps)) = self.services.remove(&k) {
                c.endpoints_removed.extend(eps.keys().map(|ip| format!("{k} {ip}")));
                c.services_removed.push(k);
            }
        }
        for r in &u.endpoints_removed {
            if let Some((_, eps)) = self.services.get_mut(&r.service)
                && eps.remove(&r.ip).is_some()
            {
                c.endpoints_removed.push(format!("{} {}", r.service, r.ip));
            }
        }
        for s in &u.services_upserted {
            let k = key(&s.namespace, &s.name);
            match self.services.get_mut(&k) {
                Some((old, _)) => {
                    if old != s {
                        c.services_changed.push(k);
                    }
                    *old = s.clone();
                }
                None => {
                    self.services.insert(k.clone(), (s.clone(), BTreeMap::new()));
                    c.services_added.push(k);
                }
            }
        }
        for (service, e) in u.upserted_endpoints() {
            let Some((_, eps)) = self.services.get_mut(service) else {
                return Err(format!("endpoint {} refers to service {service}, which this watch does not have", e.ip));
            };
            let label = format!("{service} {}", e.ip);
            // Kept with its service named, however it travelled (snapshots group endpoints).
            let e = Endpoint { service: service.to_string(), ..e.clone() };
            match eps.insert(e.ip.clone(), e.clone()) {
                None => c.endpoints_added.push(label),
                Some(old) if old != e => c.endpoints_changed.push(label),
                Some(_) => {}
            }
        }
        self.version = u.version.clone();
        Ok(c)
    }
}

/// "12:34:56Z" from Unix milliseconds (UTC).
pub fn clock(unix_ms: i64) -> String {
    let s = unix_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The snapshot: a summary line, then one line per service with its endpoint count.
pub fn snapshot_text(node: &str, state: &LocalState, unix_ms: i64) -> String {
    let mut out = format!(
        "{}  snapshot  node {node}, version {}, {} services, {} endpoints\n",
        clock(unix_ms),
        short(&state.version),
        state.services.len(),
        state.endpoint_count()
    );
    for (k, (svc, eps)) in &state.services {
        let ips = if svc.cluster_ips.is_empty() { "-".to_string() } else { svc.cluster_ips.join(",") };
        out.push_str(&format!("  {k}  {ips}  {} endpoints\n", eps.len()));
    }
    out
}

fn short(v: &str) -> String {
    if v.is_empty() { "-".to_string() } else { v.chars().take(12).collect() }
}

/// One line per delta: time, version, base, then what changed.
pub fn change_line(c: &Change, unix_ms: i64) -> String {
    let mut parts =
        vec![clock(unix_ms), format!("version {}", short(&c.version)), format!("base {}", short(&c.base_version))];
    let groups: [(&str, &Vec<String>); 6] = [
        ("+svc", &c.services_added),
        ("~svc", &c.services_changed),
        ("-svc", &c.services_removed),
        ("+ep", &c.endpoints_added),
        ("~ep", &c.endpoints_changed),
        ("-ep", &c.endpoints_removed),
    ];
    let mut any = false;
    for (sign, items) in groups {
        for item in items {
            any = true;
            parts.push(format!("{sign} {item}"));
        }
    }
    if !any {
        parts.push("(no change)".to_string());
    }
    parts.join("  ") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpx_proto::v1::{EndpointRef, ServiceRef};

    fn svc(name: &str, ip: &str) -> Service {
        Service { namespace: "demo".into(), name: name.into(), cluster_ips: vec![ip.into()], ..Default::default() }
    }

    fn ep(service: &str, ip: &str) -> Endpoint {
        Endpoint { service: format!("demo/{service}"), ip: ip.into(), for_cluster: true, ..Default::default() }
    }

    fn snapshot() -> Update {
        Update {
            nonce: 1,
            version: "v1".into(),
            full: true,
            services_upserted: vec![svc("web", "10.96.0.10"), svc("empty", "10.96.0.30")],
            endpoints_upserted: vec![ep("web", "10.244.1.2"), ep("web", "10.244.1.3")],
            ..Default::default()
        }
    }

    #[test]
    fn grouped_snapshot_reads_like_a_listed_one() {
        let mut listed = LocalState::default();
        listed.apply(&snapshot()).unwrap();
        let bare = |ip: &str| Endpoint { service: String::new(), ..ep("web", ip) };
        let grouped = Update {
            endpoints_upserted: Vec::new(),
            endpoint_groups: vec![kpx_proto::v1::ServiceEndpoints {
                service: "demo/web".into(),
                endpoints: vec![bare("10.244.1.2"), bare("10.244.1.3")],
            }],
            ..snapshot()
        };
        let mut st = LocalState::default();
        st.apply(&grouped).unwrap();
        assert_eq!(st.services, listed.services, "endpoints are kept with their service named");
        // The same endpoint sent listed later is not a change.
        let delta = Update { nonce: 2, version: "v2".into(), base_version: "v1".into(), full: false, ..snapshot() };
        let c = st.apply(&delta).unwrap();
        assert!(c.endpoints_changed.is_empty() && c.endpoints_added.is_empty(), "{c:?}");
    }

    #[test]
    fn snapshot_then_delta() {
        let mut st = LocalState::default();
        let c = st.apply(&snapshot()).unwrap();
        assert!(c.full);
        assert_eq!(c.services_added, ["demo/web", "demo/empty"]);
        let text = snapshot_text("node-a", &st, 3_600_000 + 61_000);
        assert_eq!(
            text,
            "01:01:01Z  snapshot  node node-a, version v1, 2 services, 2 endpoints\n  \
             demo/empty  10.96.0.30  0 endpoints\n  demo/web  10.96.0.10  2 endpoints\n"
        );

        let mut changed = ep("web", "10.244.1.2");
        changed.for_cluster = false;
        let delta = Update {
            nonce: 2,
            version: "v2".into(),
            base_version: "v1".into(),
            services_removed: vec![ServiceRef { namespace: "demo".into(), name: "empty".into() }],
            endpoints_removed: vec![EndpointRef { service: "demo/web".into(), ip: "10.244.1.3".into() }],
            endpoints_upserted: vec![changed, ep("web", "10.244.2.2")],
            ..Default::default()
        };
        let c = st.apply(&delta).unwrap();
        assert_eq!(
            change_line(&c, 0),
            "00:00:00Z  version v2  base v1  -svc demo/empty  +ep demo/web 10.244.2.2  ~ep demo/web 10.244.1.2  \
             -ep demo/web 10.244.1.3\n"
        );
        assert_eq!(st.version, "v2");
        assert_eq!(st.endpoint_count(), 2);

        // A delta on another base is refused.
        let err = st.apply(&Update { version: "v3".into(), base_version: "v1".into(), ..Default::default() });
        assert!(err.unwrap_err().contains("based on version \"v1\""));
        // An empty delta says so.
        let c = st.apply(&Update { version: "v2".into(), base_version: "v2".into(), ..Default::default() }).unwrap();
        assert!(change_line(&c, 0).ends_with("(no change)\n"));
    }

    #[test]
    fn chunks_merge_by_nonce() {
        let mut chunks = Chunks::default();
        let mut first = snapshot();
        first.more = true;
        first.endpoints_upserted.truncate(1);
        assert!(chunks.push(first).is_none());
        let last = Update {
            nonce: 1,
            version: "v1".into(),
            endpoints_upserted: vec![ep("web", "10.244.1.3")],
            ..Default::default()
        };
        let whole = chunks.push(last).unwrap();
        assert!(whole.full && !whole.more);
        assert_eq!(whole.endpoints_upserted.len(), 2);
        let mut st = LocalState::default();
        st.apply(&whole).unwrap();
        assert_eq!(st.endpoint_count(), 2);
    }

    #[test]
    fn orphan_endpoints_are_errors() {
        let mut st = LocalState::default();
        let u = Update {
            version: "v".into(),
            full: true,
            endpoints_upserted: vec![ep("x", "1.2.3.4")],
            ..Default::default()
        };
        assert!(st.apply(&u).unwrap_err().contains("demo/x"));
    }
}
