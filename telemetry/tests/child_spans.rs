//! Children of an entered span join its trace; outside it they record nothing. Its own test
//! binary because it installs a global tracer provider (sampling every span, exporting nowhere).

use kpx_telemetry::span::{DistSpan, Start, W3c};

fn trace_id(w: &W3c) -> &str {
    w.traceparent.split('-').nth(1).expect("traceparent has a trace id")
}

fn span_id(w: &W3c) -> &str {
    w.traceparent.split('-').nth(2).expect("traceparent has a span id")
}

#[test]
fn children_of_an_entered_span_share_its_trace() {
    opentelemetry::global::set_tracer_provider(opentelemetry_sdk::trace::SdkTracerProvider::builder().build());
    let parent =
        W3c { traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(), ..W3c::default() };
    let apply = DistSpan::start("dp.apply", Start { parent: Some(&parent), ..Start::default() });
    let apply_w3c = apply.w3c().expect("sampled");
    assert_eq!(trace_id(&apply_w3c), "0af7651916cd43dd8448eb211c80319c");

    let (render, restore) = {
        let _entered = apply.enter();
        let render = DistSpan::child("dp.render", Vec::new()).w3c().expect("a child records");
        let restore = DistSpan::child("dp.restore", Vec::new()).w3c().expect("a child records");
        (render, restore)
    };
    for child in [&render, &restore] {
        assert_eq!(trace_id(child), trace_id(&apply_w3c));
        assert_ne!(span_id(child), span_id(&apply_w3c));
    }
    assert_ne!(span_id(&render), span_id(&restore));
    // The guard dropped: nothing is entered any more.
    assert_eq!(DistSpan::child("after", Vec::new()).w3c(), None);
}
