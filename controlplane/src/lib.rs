//! The kpx controlplane. It watches the cluster once (apiserver or a manifest directory),
//! reduces Services, EndpointSlices and Nodes to the proxy's model, computes each node's
//! desired proxy state (sharing every part that is the same on many nodes), and streams it to
//! the node agents over gRPC as a snapshot followed by content-versioned deltas.
//!
//! Data flow: `source`/`k8s` -> [`model::ClusterEvent`] -> `cache` (per-node views from
//! `node_view`, versions, coalescing) -> `server` (Sync and Inspect gRPC services).

pub mod cache;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod node_view;
pub mod server;
pub mod source;
pub mod trace_context;
pub mod wire;

use cache::{Cache, CacheConfig};
use model::Skips;
use server::{InspectService, SyncConfig, SyncService};
use source::{ClusterSource, SourceError};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Where the cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of Kubernetes manifests, polled for changes.
    Manifests { dir: PathBuf, poll_interval: Duration },
    /// The apiserver, from a kubeconfig file or (None) in-cluster config / the default
    /// kubeconfig.
    Kube { kubeconfig: Option<PathBuf> },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Prometheus `/metrics` and `/healthz`, `/livez`, `/readyz` (None: not served).
    pub metrics_listen: Option<SocketAddr>,
    pub source: SourceConfig,
    pub cache: CacheConfig,
    pub sync: SyncConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the controlplane until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| RunError::Listen { addr: config.listen, source })?;
    let skips = Arc::new(Skips::default());
    let source: Box<dyn ClusterSource> = match &config.source {
        SourceConfig::Manifests { dir, poll_interval } => {
            Box::new(source::files::FileSource::new(dir.clone(), skips.clone()).with_poll_interval(*poll_interval))
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = k8s::watch::client_from(kubeconfig.clone()).await?;
            Box::new(k8s::watch::KubeSource::new(client, skips.clone()))
        }
    };
    let metrics = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| RunError::Listen { addr, source })?),
        None => None,
    };
    serve_with_metrics(listener, metrics, source, skips, config.cache, config.sync, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0) from any source of cluster state.
pub async fn serve(
    listener: TcpListener,
    source: Box<dyn ClusterSource>,
    skips: Arc<Skips>,
    cache_config: CacheConfig,
    sync_config: SyncConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    serve_with_metrics(listener, None, source, skips, cache_config, sync_config, shutdown).await
}

/// [`serve`], also serving `/metrics`, `/healthz`, `/livez` and `/readyz` on `metrics` (see
/// [`metrics::reply`]).
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    source: Box<dyn ClusterSource>,
    skips: Arc<Skips>,
    cache_config: CacheConfig,
    sync_config: SyncConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = listener.local_addr().ok();
    let cache = Cache::new(skips, cache_config);
    let metrics_task = metrics.map(|l| {
        tracing::info!(addr = ?l.local_addr().ok(), "serving /metrics, /healthz, /livez, /readyz");
        let cache = cache.clone();
        tokio::spawn(kpx_telemetry::http::serve(l, Arc::new(move |p: &str| metrics::reply(&cache, p))))
    });
    let _metrics_task = AbortOnDrop(metrics_task);
    let (events_tx, mut events_rx) = mpsc::channel(4096);
    let mut source_task = tokio::spawn(source.run(events_tx));
    let apply_cache = cache.clone();
    tokio::spawn(async move {
        while let Some(event) = events_rx.recv().await {
            apply_cache.metrics().source_event(&event);
            // Before the first publish nothing reaches a node by itself (the initial listing
            // arrives in snapshots), so only changes after it get a trace.
            let (span, cause) = match apply_cache.is_synced() {
                true => {
                    let (span, cause) = trace_context::change_span(&event);
                    (Some(span), cause)
                }
                false => (None, trace_context::new_root()),
            };
            apply_cache.apply(event, Some(cause));
            drop(span);
        }
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<kpx_proto::v1::sync_server::SyncServer<SyncService>>().await;
    let health_cache = cache.clone();
    tokio::spawn(async move {
        health_cache.wait_synced().await;
        health_reporter.set_serving::<kpx_proto::v1::sync_server::SyncServer<SyncService>>().await;
        health_reporter.set_serving::<kpx_proto::v1::inspect_server::InspectServer<InspectService>>().await;
    });
    let (reflection_v1, reflection_v1alpha) = kpx_proto::reflection::services(&["kpx.v1.Sync", "kpx.v1.Inspect"]);

    let (stop_streams, streams_stop) = tokio::sync::watch::channel(false);
    let max = sync_config.max_chunk_bytes.max(kpx_proto::MAX_CHUNK_BYTES) * 2;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            kpx_proto::v1::sync_server::SyncServer::new(SyncService::new(cache.clone(), sync_config, streams_stop))
                .max_decoding_message_size(max),
        )
        .add_service(kpx_proto::v1::inspect_server::InspectServer::new(InspectService::new(cache.clone())));
    tracing::info!(addr = ?addr, "serving kpx.v1.Sync and kpx.v1.Inspect");
    // serve_with_incoming ignores the builder's tcp_nodelay: without it, Nagle plus the peer's
    // delayed ACK hold back every small response by ~40 ms.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown.await;
        let _ = stop_streams.send(true);
    });
    tokio::select! {
        result = server => {
            source_task.abort();
            result?;
            tracing::info!("controlplane stopped");
            Ok(())
        }
        result = &mut source_task => match result {
            Ok(Ok(())) => Err(SourceError::Closed.into()),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => Err(SourceError::Kube { context: "source task".into(), source: Box::new(join) }.into()),
        },
    }
}

/// Stops a background task when the server it belongs to returns.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}
