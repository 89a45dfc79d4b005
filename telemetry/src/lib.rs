//! Logging and trace export shared by both kpx binaries.
//!
//! [`init`] installs the log formatter (text or JSON, filtered by `RUST_LOG`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, an
//! OpenTelemetry tracer provider exporting over OTLP gRPC with a batch processor. The SDK reads
//! the standard `OTEL_*` variables itself: service name, resource attributes, headers, timeout,
//! sampler (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`).
//!
//! The spans that follow one change across both planes (`cp.change`, `cp.send`, `dp.apply`,
//! `cp.ack`) are made with [`span::DistSpan`]: they have explicit remote parents carried in
//! W3C traceparent strings, start times from Kubernetes annotations, and links to coalesced
//! changes, which tracing's span macros cannot express.

pub mod exit;
pub mod flags;
pub mod http;
pub mod signal;
pub mod span;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Library internals (h2, hyper, tower, tonic) make hundreds of spans per second that say
/// nothing about kpx; they stay out of logs and exported traces unless `RUST_LOG` asks.
pub const DEFAULT_FILTER: &str = "info,h2=off,hyper=off,tower=off,tonic=off";

/// Flushes and shuts the exporter down when dropped; keep it alive in `main`.
#[must_use = "dropping the guard shuts trace export down"]
#[derive(Debug)]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(error) = p.force_flush() {
                eprintln!("trace export: flush failed: {error}");
            }
            if let Err(error) = p.shutdown() {
                eprintln!("trace export: shutdown failed: {error}");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Whether the environment asks for trace export.
pub fn otlp_configured() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Installs logging (`json` selects JSON lines) and, when configured, trace export.
/// `service_name` is the default `service.name`; `OTEL_SERVICE_NAME` overrides it.
/// Must be called inside a Tokio runtime (the gRPC exporter runs on it).
pub fn init(service_name: &str, json: bool) -> Result<Guard, InitError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json { fmt.json().boxed() } else { fmt.boxed() };
    let provider = if otlp_configured() { Some(provider(service_name)?) } else { None };
    let otel = provider.as_ref().map(|p| {
        // Spans of our own code only: the filter keeps library spans out of the export.
        tracing_opentelemetry::layer().with_tracer(p.tracer("kpx")).with_filter(filter())
    });
    tracing_subscriber::registry().with(fmt.with_filter(filter())).with(otel).try_init()?;
    if let Some(p) = &provider {
        opentelemetry::global::set_tracer_provider(p.clone());
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        tracing::info!(service = service_name, "exporting traces over OTLP");
    }
    Ok(Guard { provider })
}

fn provider(service_name: &str) -> Result<SdkTracerProvider, InitError> {
    // Endpoint, headers, timeout and compression come from OTEL_EXPORTER_OTLP_* (read by the
    // exporter); the sampler from OTEL_TRACES_SAMPLER{,_ARG} (read by the SDK's default config).
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}
