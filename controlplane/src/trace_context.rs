//! W3C trace context for changes. Every change the controlplane publishes gets a traceparent
//! so that the update carrying it to each node can be tied back to it (the observability work
//! exports these as OpenTelemetry spans).

use kpx_proto::v1::TraceContext;
use rand::Rng;

/// A new sampled root context: `00-<trace id>-<span id>-01`.
pub fn new_root() -> TraceContext {
    let mut rng = rand::rng();
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    TraceContext { traceparent: format!("00-{trace:032x}-{span:016x}-01"), tracestate: String::new() }
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
}
