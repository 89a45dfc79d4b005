//! `kpx-controlplane`: flags, logging, signals; everything else is in the library.

use clap::Parser;
use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::{Config, SourceConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

// Snapshots copy shared, pre-encoded bytes into thousands of streams from two threads: with
// glibc's allocator, 1,000 full-size snapshots took 6.8–8.9 s of the controlplane's CPU and left
// it at 375 MiB; with mimalloc 4.4 s and 286 MiB (controlplane/benches/fanout.rs
// --controlplane-process, docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Watches Services, EndpointSlices and Nodes once and streams each node's desired proxy state
/// to the kpx dataplanes.
#[derive(Parser, Debug)]
#[command(name = "kpx-controlplane", version)]
struct Flags {
    /// gRPC listen address (Sync, Inspect, health, reflection).
    #[arg(long, env = "KPX_LISTEN", default_value = "127.0.0.1:10900")]
    listen: SocketAddr,
    /// Prometheus /metrics and /healthz, /livez, /readyz (HTTP); empty to disable.
    #[arg(long, env = "KPX_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10251")]
    metrics_bind_address: String,
    /// Read cluster state from a directory of Kubernetes manifests instead of the apiserver.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// How often the manifest directory is checked for changes.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = kpx_telemetry::flags::parse_duration)]
    manifests_poll_interval: Duration,
    /// kubeconfig for the apiserver; in-cluster config (or $KUBECONFIG / ~/.kube/config) when
    /// omitted. With --manifests it is used only for --token-audience's reviews.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Changes kept for catching nodes up with deltas instead of snapshots.
    #[arg(long, default_value_t = CacheConfig::default().log_capacity)]
    change_log_capacity: usize,
    /// After a node rejects (NACKs) a version, wait this long before offering it again.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = kpx_telemetry::flags::parse_duration)]
    nack_retry_interval: Duration,
    /// Snapshots in flight at once, each until its node acknowledges it (at most 60 s); more
    /// nodes needing one wait their turn (bounds memory when thousands of nodes connect together).
    #[arg(long, default_value_t = SyncConfig::default().max_concurrent_snapshots)]
    max_concurrent_snapshots: usize,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(flatten)]
    security: kpx_auth::flags::ServerFlags,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    kpx_telemetry::exit::code("kpx-controlplane", run(flags).await)
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    // Flushes exported spans when main returns.
    let _telemetry = kpx_telemetry::init("kpx-controlplane", flags.log_format == "json")?;
    let (source, auth_kubeconfig) = match flags.manifests {
        Some(dir) => (SourceConfig::Manifests { dir, poll_interval: flags.manifests_poll_interval }, flags.kubeconfig),
        None => (SourceConfig::Kube { kubeconfig: flags.kubeconfig }, None),
    };
    let metrics_listen = match flags.metrics_bind_address.as_str() {
        "" => None,
        a => Some(a.parse::<SocketAddr>().map_err(|e| anyhow::anyhow!("--metrics-bind-address {a:?}: {e}"))?),
    };
    let config = Config {
        listen: flags.listen,
        metrics_listen,
        source,
        cache: CacheConfig { log_capacity: flags.change_log_capacity },
        sync: SyncConfig {
            nack_retry: flags.nack_retry_interval,
            max_concurrent_snapshots: flags.max_concurrent_snapshots,
            ..SyncConfig::default()
        },
        security: flags.security,
        auth_kubeconfig,
    };
    kpx_controlplane::run(config, kpx_telemetry::signal::shutdown()).await?;
    Ok(())
}
