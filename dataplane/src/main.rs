//! `kpx-dataplane`: flags, logging, signals; everything else is in the library.

use clap::Parser;
use kpx_dataplane::agent::{self, AgentConfig, BackendKind};
use kpx_dataplane::backend::iptables::render::IpFamily;
use std::net::{IpAddr, SocketAddr};
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
    /// How the rules reach the kernel; dry-run prints iptables-restore input instead.
    #[arg(long, default_value = "iptables", value_parser = ["iptables", "ipvs", "nftables", "dry-run"])]
    backend: String,
    /// The IPVS scheduler (with --backend ipvs).
    #[arg(long, default_value = "rr", value_parser = kpx_dataplane::backend::ipvs::plan::SCHEDULERS)]
    ipvs_scheduler: String,
    /// With --backend ipvs: exit if the kernel has no IPVS instead of falling back to iptables.
    #[arg(long)]
    no_ipvs_fallback: bool,
    /// With --backend nftables: fall back to iptables when nf_tables is unusable (else exit).
    #[arg(long)]
    nftables_fallback: bool,
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
    /// Testing: program the named network namespace instead of this process's.
    #[arg(long, value_name = "NAME", hide = true)]
    netns: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
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
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    // Flushes exported spans when main returns.
    let _telemetry = kpx_telemetry::init("kpx-dataplane", flags.log_format == "json")?;
    let config = AgentConfig {
        node_name: flags.node,
        controlplane: flags.controlplane,
        backend: match flags.backend.as_str() {
            "dry-run" => BackendKind::DryRun,
            "ipvs" => BackendKind::Ipvs,
            "nftables" => BackendKind::Nftables,
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
        nftables_fallback: flags.nftables_fallback,
        admin_listen: flags.admin_listen.0,
    };
    agent::run(config, kpx_telemetry::signal::shutdown()).await?;
    Ok(())
}
