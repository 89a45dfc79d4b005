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
use kpx_auth::ServerSecurity;
use kpx_auth::apiserver::ApiServer;
use kpx_auth::flags::ServerFlags;
use kpx_auth::server::SecurityError;
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
    /// TLS and caller authentication of the gRPC server.
    pub security: ServerFlags,
    /// With the manifest source: the apiserver to send TokenReviews and SubjectAccessReviews to
    /// when `--token-audience` is set (the apiserver source uses its own client).
    pub auth_kubeconfig: Option<PathBuf>,
}

/// How the gRPC server authenticates its callers.
#[derive(Clone, Debug)]
pub enum Security {
    /// Plaintext, nobody authenticated: loopback test servers.
    Open,
    /// From the flags; `api` is the apiserver for the token path.
    Flags { flags: Box<ServerFlags>, api: Option<Arc<dyn ApiServer>> },
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
    #[error(transparent)]
    Security(#[from] SecurityError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the controlplane until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), RunError> {
    ServerSecurity::check(&config.security, config.listen)?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| RunError::Listen { addr: config.listen, source })?;
    let skips = Arc::new(Skips::default());
    let wants_api = config.security.token_audience.is_some();
    let (source, api): (Box<dyn ClusterSource>, Option<kube::Client>) = match &config.source {
        SourceConfig::Manifests { dir, poll_interval } => {
            let files = source::files::FileSource::new(dir.clone(), skips.clone()).with_poll_interval(*poll_interval);
            let api = match wants_api {
                true => Some(k8s::watch::client_from(config.auth_kubeconfig.clone()).await?),
                false => None,
            };
            (Box::new(files), api)
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = k8s::watch::client_from(kubeconfig.clone()).await?;
            (Box::new(k8s::watch::KubeSource::new(client.clone(), skips.clone())), Some(client))
        }
    };
    let metrics = match config.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| RunError::Listen { addr, source })?),
        None => None,
    };
    let api = api.map(|c| Arc::new(kpx_auth::apiserver::KubeApi::new(c)) as Arc<dyn ApiServer>);
    let security = Security::Flags { flags: Box::new(config.security), api };
    serve_with_metrics(listener, metrics, security, source, skips, config.cache, config.sync, shutdown).await
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
    serve_with_metrics(listener, None, Security::Open, source, skips, cache_config, sync_config, shutdown).await
}

/// [`serve`] with `security`, also serving `/metrics`, `/healthz`, `/livez` and `/readyz` on
/// `metrics` (see [`metrics::reply`]).
#[allow(clippy::too_many_arguments)]
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    security: Security,
    source: Box<dyn ClusterSource>,
    skips: Arc<Skips>,
    cache_config: CacheConfig,
    sync_config: SyncConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let addr = listener.local_addr().map_err(|source| RunError::Listen { addr: ([0, 0, 0, 0], 0).into(), source })?;
    let cache = Cache::new(skips, cache_config);
    let auth_metrics = cache.metrics().auth().clone();
    let security = match security {
        Security::Open => ServerSecurity::open(auth_metrics),
        Security::Flags { flags, api } => {
            // Node tokens without the node-name extra are resolved through their pod here.
            ServerSecurity::from_flags(&flags, addr, Ok(api), true, auth_metrics, "kpx-controlplane")?
        }
    };
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
    health_reporter.set_not_serving::<kpx_proto::encoded::server::sync_server::SyncServer<SyncService>>().await;
    let health_cache = cache.clone();
    tokio::spawn(async move {
        health_cache.wait_synced().await;
        health_reporter.set_serving::<kpx_proto::encoded::server::sync_server::SyncServer<SyncService>>().await;
        health_reporter.set_serving::<kpx_proto::v1::inspect_server::InspectServer<InspectService>>().await;
    });
    let (reflection_v1, reflection_v1alpha) = kpx_proto::reflection::services(&["kpx.v1.Sync", "kpx.v1.Inspect"]);

    let (stop_streams, streams_stop) = tokio::sync::watch::channel(false);
    // Acks (a NACK carries the backend error text) and digests (sent in 64 KiB messages).
    let max = 2 * 1024 * 1024;
    let router = kpx_auth::server_builder()
        .layer(security.layer())
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            kpx_proto::encoded::server::sync_server::SyncServer::new(SyncService::new(
                cache.clone(),
                sync_config,
                streams_stop,
            ))
            .max_decoding_message_size(max),
        )
        .add_service(
            kpx_proto::v1::inspect_server::InspectServer::new(InspectService::new(cache.clone()))
                .max_decoding_message_size(kpx_auth::server::MAX_REQUEST_BYTES),
        );
    tracing::info!(%addr, tls = security.is_tls(), "serving kpx.v1.Sync and kpx.v1.Inspect");
    // The accept loop sets TCP_NODELAY (without it, Nagle plus the peer's delayed ACK hold back
    // every small response by ~40 ms), does TLS and caps connections that never authenticate.
    let incoming = security.incoming(listener);
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
