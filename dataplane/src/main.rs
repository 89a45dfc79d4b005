//! `kpx-dataplane`: flags, logging, signals; everything else is in the library.

use clap::Parser;
use kpx_auth::flags::{ClientFlags, ServerFlags};
use kpx_dataplane::agent::{self, AgentConfig, BackendKind};
use kpx_dataplane::backend::iptables::render::IpFamily;
use kpx_dataplane::backend::userspace::Settings;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The kpx node agent: receives this node's proxy state from the controlplane and programs it
/// into the kernel.
#[derive(Parser, Debug)]
#[command(name = "kpx-dataplane", version)]
struct Flags {
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The controlplane's gRPC address.
    #[arg(long, env = "KPX_CONTROLPLANE", value_name = "URL")]
    controlplane: String,
    /// How the rules reach the kernel; dry-run prints iptables-restore input instead; userspace
    /// proxies connections in this process (iptables rules send service traffic to it).
    #[arg(long, default_value = "iptables", value_parser = ["iptables", "ipvs", "dry-run", "userspace"])]
    backend: String,
    /// With --backend userspace: how long established connections to a removed endpoint may go
    /// on (0s closes them at once); unlimited when omitted.
    #[arg(long, value_name = "DURATION", value_parser = kpx_telemetry::flags::parse_duration)]
    userspace_drain_timeout: Option<Duration>,
    /// With --backend userspace: close a TCP connection idle this long in both directions (0s: never).
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = kpx_telemetry::flags::parse_duration)]
    userspace_tcp_idle_timeout: Duration,
    /// With --backend userspace: close a UDP flow without a datagram either way for this long.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = kpx_telemetry::flags::parse_duration)]
    userspace_udp_timeout: Duration,
    /// With --backend userspace: UDP flows per service port at most (datagrams of new clients
    /// beyond it are dropped and counted).
    #[arg(long, default_value_t = 16384, value_name = "N")]
    userspace_max_udp_flows: usize,
    /// With --backend userspace: proxy threads (0: one per CPU).
    #[arg(long, default_value_t = 0, value_name = "N")]
    userspace_threads: usize,
    /// The IPVS scheduler (with --backend ipvs).
    #[arg(long, default_value = "rr", value_parser = kpx_dataplane::backend::ipvs::plan::SCHEDULERS)]
    ipvs_scheduler: String,
    /// With --backend ipvs: exit if the kernel has no IPVS instead of falling back to iptables.
    #[arg(long)]
    no_ipvs_fallback: bool,
    /// The pod CIDR: traffic to a service from outside it is masqueraded.
    #[arg(long, value_name = "CIDR")]
    cluster_cidr: Option<String>,
    /// Addresses that accept NodePorts (repeat for several); every local address when omitted.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
    /// Masquerade all traffic to services.
    #[arg(long)]
    masquerade_all: bool,
    /// /healthz and /livez.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: SocketAddr,
    /// /metrics (Prometheus).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: SocketAddr,
    /// The admin gRPC API (kpx.v1.Admin: applied version and state, kernel rules; reflection
    /// and health on); empty disables it.
    #[arg(long, default_value = "127.0.0.1:10266", value_name = "ADDR", value_parser = parse_optional_addr)]
    admin_listen: OptionalAddr,
    /// IP families to proxy, comma separated.
    #[arg(long, default_value = "IPv4", value_delimiter = ',', value_parser = parse_family)]
    ip_families: Vec<IpFamily>,
    /// Rewrite every rule this often even when nothing went wrong.
    #[arg(long, default_value = "1h", value_parser = kpx_telemetry::flags::parse_duration)]
    full_resync_period: Duration,
    /// How often the canary is checked (tables flushed by someone?); /healthz allows 2 x this.
    #[arg(long, default_value = "30s", value_parser = kpx_telemetry::flags::parse_duration)]
    sync_period: Duration,
    /// Testing: program the named network namespace instead of this process's (with
    /// --backend userspace, the proxy's sockets live there too).
    #[arg(long, value_name = "NAME", hide = true)]
    netns: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// kubeconfig for the admin API's TokenReviews and SubjectAccessReviews (with
    /// --token-audience); in-cluster config when omitted.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// How this node proves who it is to the controlplane (https:// addresses).
    #[command(flatten, next_help_heading = "Connection to the controlplane")]
    client: ClientFlags,
    /// The admin API's TLS and callers.
    #[command(flatten, next_help_heading = "Admin API security")]
    admin_security: ServerFlags,
}

fn parse_family(s: &str) -> Result<IpFamily, String> {
    match s.to_ascii_lowercase().as_str() {
        "ipv4" => Ok(IpFamily::V4),
        "ipv6" => Ok(IpFamily::V6),
        _ => Err(format!("{s:?}: expected IPv4 or IPv6")),
    }
}

/// An address, or none (given as "").
#[derive(Debug, Clone, Copy)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.is_empty() {
        return Ok(OptionalAddr(None));
    }
    s.parse().map(|a| OptionalAddr(Some(a))).map_err(|_| format!("{s:?} is not an address like 127.0.0.1:10266"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    kpx_telemetry::exit::code("kpx-dataplane", run(flags).await)
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    // Flushes exported spans when main returns.
    let _telemetry = kpx_telemetry::init("kpx-dataplane", flags.log_format == "json")?;
    let config = AgentConfig {
        node_name: flags.node,
        controlplane: flags.controlplane,
        backend: match flags.backend.as_str() {
            "dry-run" => BackendKind::DryRun,
            "ipvs" => BackendKind::Ipvs,
            "userspace" => BackendKind::Userspace,
            _ => BackendKind::Iptables,
        },
        cluster_cidr: flags.cluster_cidr,
        node_ips: flags.node_ips,
        masquerade_all: flags.masquerade_all,
        healthz_bind_address: flags.healthz_bind_address,
        metrics_bind_address: flags.metrics_bind_address,
        ip_families: flags.ip_families,
        full_resync_period: flags.full_resync_period,
        sync_period: flags.sync_period,
        netns: flags.netns,
        ipvs_scheduler: flags.ipvs_scheduler,
        ipvs_fallback: !flags.no_ipvs_fallback,
        admin_listen: flags.admin_listen.0,
        admin_security: flags.admin_security,
        kubeconfig: flags.kubeconfig,
        credentials: flags.client.credentials(),
        userspace: Settings {
            drain_timeout: flags.userspace_drain_timeout,
            tcp_idle_timeout: Some(flags.userspace_tcp_idle_timeout).filter(|d| !d.is_zero()),
            udp_timeout: flags.userspace_udp_timeout,
            max_udp_flows: flags.userspace_max_udp_flows,
            ..Settings::default()
        },
        userspace_threads: flags.userspace_threads,
    };
    agent::run(config, kpx_telemetry::signal::shutdown()).await?;
    Ok(())
}
