//! W3C trace context for changes. Every change the controlplane publishes gets a traceparent
//! so that the update carrying it to each node can be tied back to it (the observability work
//! exports these as OpenTelemetry spans).

use crate::model::ClusterEvent;
use kpx_proto::v1::TraceContext;
use kpx_telemetry::span::{Attr, DistSpan, Start, W3c};
use rand::Rng;
use std::time::SystemTime;

/// Starts the `cp.change` span of one event from the source: the root of the change's trace.
/// It starts at the EndpointSlice's last-change-trigger-time when there is one (the moment
/// Kubernetes saw the change), so the trace shows the whole programming latency. Returns the
/// span (end it once the cache has applied the event) and the cause to carry to the nodes: the
/// span's context, or a fresh root when spans are not recorded, so updates always name their
/// change.
pub fn change_span(event: &ClusterEvent) -> (DistSpan, TraceContext) {
    let (kind, object, trigger) = match event {
        ClusterEvent::Service(k, _) | ClusterEvent::NotProxied(k) => ("Service", k.to_string(), None),
        ClusterEvent::Slice(k, s) => {
            ("EndpointSlice", k.to_string(), s.as_ref().and_then(|s| s.trigger_time.as_deref()))
        }
        ClusterEvent::Node(n, _) => ("Node", n.clone(), None),
        ClusterEvent::Synced => ("Synced", String::new(), None),
    };
    let mut attributes = vec![Attr::new("kind", kind), Attr::new("object", object)];
    let deleted =
        matches!(event, ClusterEvent::Service(_, None) | ClusterEvent::Slice(_, None) | ClusterEvent::Node(_, None));
    attributes.push(Attr::new("deleted", deleted));
    if let Some(t) = trigger {
        attributes.push(Attr::new("trigger_time", t.to_string()));
    }
    let span = DistSpan::start(
        "cp.change",
        Start { start_time: trigger.and_then(parse_rfc3339), attributes, ..Start::default() },
    );
    let change_time = trigger.and_then(parse_rfc3339).map(unix_ms).unwrap_or_else(|| unix_ms(SystemTime::now()));
    let cause = span.w3c().map(to_wire).unwrap_or_else(new_root);
    (span, TraceContext { change_time_unix_ms: change_time, ..cause })
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(SystemTime::from(ts))
}

pub fn to_wire(w: W3c) -> TraceContext {
    TraceContext { traceparent: w.traceparent, tracestate: w.tracestate, change_time_unix_ms: 0 }
}

pub fn from_wire(t: &TraceContext) -> W3c {
    W3c { traceparent: t.traceparent.clone(), tracestate: t.tracestate.clone() }
}

/// A new sampled root context: `00-<trace id>-<span id>-01`.
pub fn new_root() -> TraceContext {
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    TraceContext {
        traceparent: format!("00-{trace:032x}-{span:016x}-01"),
        tracestate: String::new(),
        change_time_unix_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn traceparent_has_w3c_shape() {
        let tp = super::new_root().traceparent;
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3]), ("00", 32, 16, "01"));
        assert_ne!(parts[1], "0".repeat(32));
        assert_ne!(super::new_root().traceparent, tp);
    }

    #[test]
    fn trigger_times_parse() {
        let t = super::parse_rfc3339("2026-11-23T04:26:12Z").expect("parses");
        assert_eq!(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_795_407_972);
        assert!(super::parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn causes_carry_the_change_time() {
        use crate::model::{ClusterEvent, EndpointSlice, IpFamily, ServiceKey};
        let slice = |trigger: Option<&str>| {
            let key = ServiceKey::new("default", "web-abc");
            ClusterEvent::Slice(
                key.clone(),
                Some(EndpointSlice {
                    key,
                    service: ServiceKey::new("default", "web"),
                    family: IpFamily::V4,
                    ports: Vec::new(),
                    endpoints: Vec::new(),
                    trigger_time: trigger.map(str::to_string),
                }),
            )
        };
        let (_span, cause) = super::change_span(&slice(Some("2026-11-23T04:26:12Z")));
        assert_eq!(cause.change_time_unix_ms, 1_795_407_972_000);
        let before = super::unix_ms(std::time::SystemTime::now());
        let (_span, cause) = super::change_span(&slice(None));
        assert!(cause.change_time_unix_ms >= before, "receipt time when there is no trigger time");
        assert_eq!(super::new_root().change_time_unix_ms, 0);
    }
}
