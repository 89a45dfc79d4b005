//! Spans with remote parents, for a change's trace across the controlplane and the nodes.
//!
//! Trace context crosses processes as W3C `traceparent`/`tracestate` strings (the wire types
//! live in kpx-proto; this crate does not depend on them). Without an exporter the global
//! tracer is a no-op: spans cost almost nothing and have no context of their own.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, Tracer as _};
use opentelemetry::{Context, ContextGuard, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use std::time::SystemTime;

/// A W3C trace context: `traceparent` and (possibly empty) `tracestate`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct W3c {
    pub traceparent: String,
    pub tracestate: String,
}

impl W3c {
    /// The context it names; `None` when it does not parse.
    pub fn span_context(&self) -> Option<SpanContext> {
        let mut carrier = HashMap::new();
        carrier.insert("traceparent".to_string(), self.traceparent.clone());
        if !self.tracestate.is_empty() {
            carrier.insert("tracestate".to_string(), self.tracestate.clone());
        }
        let cx = TraceContextPropagator::new().extract(&carrier);
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    fn of(cx: &Context) -> Option<W3c> {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(cx, &mut carrier);
        let traceparent = carrier.remove("traceparent")?;
        Some(W3c { traceparent, tracestate: carrier.remove("tracestate").unwrap_or_default() })
    }
}

/// One span with an explicit (usually remote) parent; ends when dropped.
#[derive(Debug)]
pub struct DistSpan {
    cx: Context,
}

/// How to start a [`DistSpan`].
#[derive(Debug, Default)]
pub struct Start<'a> {
    /// Its parent; a new trace when `None` or invalid.
    pub parent: Option<&'a W3c>,
    /// Other traces this span continues (coalesced changes).
    pub links: &'a [W3c],
    /// When the work really began (an event's trigger time), if earlier than now.
    pub start_time: Option<SystemTime>,
    pub attributes: Vec<KeyValue>,
}

impl DistSpan {
    pub fn start(name: &'static str, how: Start<'_>) -> DistSpan {
        let tracer = global::tracer("kpx");
        let parent = match how.parent.and_then(W3c::span_context) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let links = how
            .links
            .iter()
            .filter_map(W3c::span_context)
            .map(opentelemetry::trace::Link::with_context)
            .collect::<Vec<_>>();
        let mut builder = tracer.span_builder(name).with_attributes(how.attributes).with_links(links);
        if let Some(t) = how.start_time.filter(|t| *t <= SystemTime::now()) {
            builder = builder.with_start_time(t);
        }
        let span = builder.start_with_context(&tracer, &parent);
        DistSpan { cx: Context::new().with_span(span) }
    }

    /// A child of the span entered on this thread (see [`DistSpan::enter`]): the steps of a
    /// node's apply (render, restore, netlink) that run deep in a backend, which has no span
    /// handed to it. Without an entered, recorded span it records nothing: a resync that no
    /// change caused does not start a trace of its own.
    pub fn child(name: &'static str, attributes: Vec<KeyValue>) -> DistSpan {
        let parent = Context::current();
        if !parent.span().span_context().is_valid() {
            return DistSpan { cx: Context::new() };
        }
        let tracer = global::tracer("kpx");
        let span = tracer.span_builder(name).with_attributes(attributes).start_with_context(&tracer, &parent);
        DistSpan { cx: parent.with_span(span) }
    }

    /// Makes this span the parent of [`DistSpan::child`] spans started on this thread until the
    /// guard drops. Only for synchronous work: the guard must not live across an `.await`.
    #[must_use = "the span is entered only while the guard lives"]
    pub fn enter(&self) -> ContextGuard {
        self.cx.clone().attach()
    }

    /// The context to hand to the next hop; `None` when spans are not recorded (no exporter).
    pub fn w3c(&self) -> Option<W3c> {
        self.cx.span().span_context().is_valid().then(|| W3c::of(&self.cx)).flatten()
    }

    /// Whether the span is recorded (an exporter is set and the sampler kept it): attributes
    /// that cost something to compute are only worth it then.
    pub fn is_recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    pub fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Marks the span failed with `message`.
    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        self.cx.span().set_attribute(KeyValue::new("error.message", message.clone()));
        self.cx.span().set_status(opentelemetry::trace::Status::error(message));
    }
}

impl Drop for DistSpan {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// Attributes, re-exported so callers need not depend on opentelemetry.
pub use opentelemetry::KeyValue as Attr;

/// How many names a list attribute shows; a snapshot names thousands of services, and span
/// attributes are not the place for them (the count says how many there were).
pub const MAX_LISTED: usize = 10;

/// An attribute listing names, comma separated, at most [`MAX_LISTED`] of them, then
/// "(+N more)": "demo/web,demo/db (+3 more)". Duplicates count once (first-seen order kept).
pub fn names<'a>(key: &'static str, names: impl IntoIterator<Item = &'a str>) -> Attr {
    let mut seen = std::collections::HashSet::new();
    let mut listed = Vec::new();
    let mut more = 0usize;
    for n in names.into_iter().filter(|n| seen.insert(*n)) {
        if listed.len() < MAX_LISTED {
            listed.push(n);
        } else {
            more += 1;
        }
    }
    let mut value = listed.join(",");
    if more > 0 {
        value.push_str(&format!(" (+{more} more)"));
    }
    Attr::new(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_through_the_propagator() {
        let w = W3c { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(), ..W3c::default() };
        let sc = w.span_context().expect("valid");
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(W3c::of(&Context::new().with_remote_span_context(sc)), Some(w));
        assert!(W3c { traceparent: "garbage".into(), ..W3c::default() }.span_context().is_none());
    }

    #[test]
    fn without_an_exporter_spans_have_no_context() {
        let span = DistSpan::start("t", Start::default());
        assert_eq!(span.w3c(), None);
    }

    #[test]
    fn names_are_deduplicated_and_bounded() {
        assert_eq!(names("s", ["a", "b", "a"]).value.as_str(), "a,b");
        let many: Vec<String> = (0..13).map(|i| format!("n{i}")).collect();
        let attr = names("s", many.iter().map(String::as_str));
        assert_eq!(attr.value.as_str(), "n0,n1,n2,n3,n4,n5,n6,n7,n8,n9 (+3 more)");
        assert_eq!(names("s", []).value.as_str(), "");
    }

    #[test]
    fn a_child_without_an_entered_span_records_nothing() {
        assert_eq!(DistSpan::child("orphan", Vec::new()).w3c(), None);
    }
}
