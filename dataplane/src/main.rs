//! `kpx-dataplane`: flags (and kube-proxy's configuration file), logging, signals; everything
//! else is in the library.

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use kpx_auth::flags::{ClientFlags, ServerFlags};
use kpx_dataplane::agent::{self, AgentConfig, BackendKind};
use kpx_dataplane::backend::iptables::render::IpFamily;
use kpx_dataplane::backend::userspace::Settings as UserspaceSettings;
use kpx_dataplane::config::{self, Mode, Settings};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

// The agent holds one large, long-lived state and, for a moment at each full sync, a rendering
// of the same size. With glibc's allocator the memory of that moment stays fragmented in the
// heap: at 10k services / 100k endpoints the agent sat at 84 MiB after its first sync, against
// 56 MiB with mimalloc, which returns freed pages (measured with benches/agent_memory.rs;
// docs/performance.md). The price is a higher transient peak (196 MiB against 130 MiB). mimalloc
// returns freed pages after a delay and only at its next activity: the DaemonSet sets
// MIMALLOC_PURGE_DELAY=0 (read when the process starts), which brings the peak to 133 MiB and
// the RSS right after a full sync back to the state's size.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The kpx node agent: receives this node's proxy state from the controlplane and programs it
/// into the kernel.
#[derive(Parser, Debug)]
#[command(name = "kpx-dataplane", version)]
struct Flags {
    /// kube-proxy's configuration file (KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1,
    /// as in the kube-proxy ConfigMap); flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Remove every rule, chain, ipset, IPVS virtual server and the kube-ipvs0 interface that kpx
    /// or kube-proxy installed, then exit (to roll back).
    #[arg(long)]
    cleanup: bool,
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME", alias = "hostname-override")]
    node: Option<String>,
    /// The controlplane's gRPC address.
    #[arg(long, env = "KPX_CONTROLPLANE", value_name = "URL")]
    controlplane: Option<String>,
    /// How the rules reach the kernel; dry-run prints iptables-restore input instead; shadow
    /// runs beside a live kube-proxy, compares the rules it would write with the kernel's and
    /// reports the differences, writing nothing; userspace proxies connections in this process
    /// (iptables rules send service traffic to it); nftables programs kube-proxy's nftables
    /// layout through netlink.
    #[arg(long, default_value = "iptables", value_parser = ["iptables", "ipvs", "nftables", "dry-run", "shadow", "userspace"])]
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
    /// IPVS: answer ARP only for addresses of the receiving interface (arp_ignore=1,
    /// arp_announce=2), which VIPs on kube-ipvs0 need on a shared L2 network.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    ipvs_strict_arp: bool,
    /// IPVS idle timeout of TCP connections (0: the kernel's).
    #[arg(long, default_value = "0s", value_parser = kpx_telemetry::flags::parse_duration)]
    ipvs_tcp_timeout: Duration,
    /// IPVS timeout of TCP connections after a FIN (0: the kernel's).
    #[arg(long, default_value = "0s", value_parser = kpx_telemetry::flags::parse_duration)]
    ipvs_tcpfin_timeout: Duration,
    /// IPVS timeout of UDP flows (0: the kernel's).
    #[arg(long, default_value = "0s", value_parser = kpx_telemetry::flags::parse_duration)]
    ipvs_udp_timeout: Duration,
    /// IPVS virtual servers in these CIDRs are never deleted, even when no service wants them.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    ipvs_exclude_cidrs: Vec<String>,
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
    /// NodePorts on the node's addresses inside these CIDRs (kube-proxy's nodePortAddresses),
    /// read at startup; with --node-ip, both.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    nodeport_addresses: Vec<String>,
    /// Masquerade all traffic to services.
    #[arg(long)]
    masquerade_all: bool,
    /// Node ports also answer on 127.0.0.1 (iptables backend, IPv4; sets route_localnet=1),
    /// as kube-proxy's --iptables-localhost-nodeports.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    iptables_localhost_nodeports: bool,
    /// nf_conntrack_max is this times the CPUs (at least --conntrack-min); 0 leaves it.
    #[arg(long, default_value_t = 32768)]
    conntrack_max_per_core: u32,
    /// The least nf_conntrack_max --conntrack-max-per-core may set.
    #[arg(long, default_value_t = 131072)]
    conntrack_min: u32,
    /// Idle timeout of established TCP conntrack entries (0: the kernel's).
    #[arg(long, default_value = "24h", value_parser = kpx_telemetry::flags::parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Timeout of TCP conntrack entries in CLOSE_WAIT (0: the kernel's).
    #[arg(long, default_value = "1h", value_parser = kpx_telemetry::flags::parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
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
    /// Compare the whole ruleset with what kpx wants this often, and repair what differs.
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

/// Whether flag `id` was given (command line or environment), so that it overrides the file.
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// The file's settings, wherever the flag was not given.
fn merge(f: &mut Flags, m: &ArgMatches, s: Settings) {
    fn set<T>(m: &ArgMatches, id: &str, flag: &mut T, file: Option<T>) {
        if let Some(v) = file.filter(|_| !given(m, id)) {
            *flag = v;
        }
    }
    let backend = s.mode.map(|mode| match mode {
        Mode::Iptables => "iptables".to_string(),
        Mode::Ipvs => "ipvs".to_string(),
        Mode::Nftables => "nftables".to_string(),
    });
    set(m, "backend", &mut f.backend, backend);
    set(m, "node", &mut f.node, s.node_name.map(Some));
    set(m, "cluster_cidr", &mut f.cluster_cidr, s.cluster_cidr.map(Some));
    set(m, "nodeport_addresses", &mut f.nodeport_addresses, s.node_port_addresses);
    set(m, "healthz_bind_address", &mut f.healthz_bind_address, s.healthz_bind_address);
    set(m, "metrics_bind_address", &mut f.metrics_bind_address, s.metrics_bind_address);
    set(m, "masquerade_all", &mut f.masquerade_all, s.masquerade_all);
    set(m, "iptables_localhost_nodeports", &mut f.iptables_localhost_nodeports, s.localhost_node_ports);
    set(m, "sync_period", &mut f.sync_period, s.sync_period);
    set(m, "ipvs_scheduler", &mut f.ipvs_scheduler, s.ipvs_scheduler);
    set(m, "ipvs_strict_arp", &mut f.ipvs_strict_arp, s.ipvs_strict_arp);
    set(m, "ipvs_tcp_timeout", &mut f.ipvs_tcp_timeout, s.ipvs_tcp_timeout);
    set(m, "ipvs_tcpfin_timeout", &mut f.ipvs_tcpfin_timeout, s.ipvs_tcp_fin_timeout);
    set(m, "ipvs_udp_timeout", &mut f.ipvs_udp_timeout, s.ipvs_udp_timeout);
    set(m, "ipvs_exclude_cidrs", &mut f.ipvs_exclude_cidrs, s.ipvs_exclude_cidrs);
    set(m, "conntrack_max_per_core", &mut f.conntrack_max_per_core, s.conntrack.max_per_core);
    set(m, "conntrack_min", &mut f.conntrack_min, s.conntrack.min);
    set(
        m,
        "conntrack_tcp_timeout_established",
        &mut f.conntrack_tcp_timeout_established,
        s.conntrack.tcp_established_timeout,
    );
    set(
        m,
        "conntrack_tcp_timeout_close_wait",
        &mut f.conntrack_tcp_timeout_close_wait,
        s.conntrack.tcp_close_wait_timeout,
    );
    set(m, "log_format", &mut f.log_format, s.log_format);
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let matches = Flags::command().get_matches();
    let flags = Flags::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    kpx_telemetry::exit::code("kpx-dataplane", run(flags, matches).await)
}

async fn run(mut flags: Flags, matches: ArgMatches) -> anyhow::Result<()> {
    let mut not_applicable = Vec::new();
    let mut conntrack_extra = config::Conntrack::default();
    if let Some(path) = &flags.config {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        let settings = config::parse(&text).map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        not_applicable = settings.not_applicable.clone();
        conntrack_extra = settings.conntrack.clone();
        merge(&mut flags, &matches, settings);
    }
    // Flushes exported spans when main returns.
    let _telemetry = kpx_telemetry::init("kpx-dataplane", flags.log_format == "json")?;
    for note in &not_applicable {
        tracing::info!("--config: not applicable to kpx: {note}");
    }
    if flags.backend == "shadow" {
        // Beside kube-proxy, whose health and metrics servers hold the usual ports.
        if !given(&matches, "healthz_bind_address") {
            flags.healthz_bind_address = SocketAddr::from(([127, 0, 0, 1], 10267));
        }
        if !given(&matches, "metrics_bind_address") {
            flags.metrics_bind_address = SocketAddr::from(([127, 0, 0, 1], 10268));
        }
    }
    if flags.cleanup {
        let report = kpx_dataplane::cleanup::run(flags.netns.as_deref());
        return report.into_result().map_err(anyhow::Error::msg);
    }
    let node_name = flags.node.ok_or_else(|| {
        anyhow::anyhow!(
            "the node's name is needed: --node (or --hostname-override, NODE_NAME, hostnameOverride in --config)"
        )
    })?;
    let controlplane =
        flags.controlplane.ok_or_else(|| anyhow::anyhow!("--controlplane (or KPX_CONTROLPLANE) is needed"))?;
    let config = AgentConfig {
        node_name,
        controlplane,
        backend: match flags.backend.as_str() {
            "dry-run" => BackendKind::DryRun,
            "shadow" => BackendKind::Shadow,
            "ipvs" => BackendKind::Ipvs,
            "userspace" => BackendKind::Userspace,
            "nftables" => BackendKind::Nftables,
            _ => BackendKind::Iptables,
        },
        cluster_cidr: flags.cluster_cidr,
        node_ips: flags.node_ips,
        node_port_cidrs: flags.nodeport_addresses,
        masquerade_all: flags.masquerade_all,
        localhost_node_ports: flags.iptables_localhost_nodeports,
        healthz_bind_address: flags.healthz_bind_address,
        metrics_bind_address: flags.metrics_bind_address,
        ip_families: flags.ip_families,
        full_resync_period: flags.full_resync_period,
        sync_period: flags.sync_period,
        netns: flags.netns,
        ipvs_scheduler: flags.ipvs_scheduler,
        ipvs_fallback: !flags.no_ipvs_fallback,
        ipvs_strict_arp: flags.ipvs_strict_arp,
        ipvs_timeouts: [flags.ipvs_tcp_timeout, flags.ipvs_tcpfin_timeout, flags.ipvs_udp_timeout],
        ipvs_exclude_cidrs: flags.ipvs_exclude_cidrs,
        conntrack: config::Conntrack {
            max_per_core: Some(flags.conntrack_max_per_core),
            min: Some(flags.conntrack_min),
            tcp_established_timeout: Some(flags.conntrack_tcp_timeout_established),
            tcp_close_wait_timeout: Some(flags.conntrack_tcp_timeout_close_wait),
            // 1.29's settings, only from the file.
            ..conntrack_extra
        },
        nftables_fallback: flags.nftables_fallback,
        admin_listen: flags.admin_listen.0,
        admin_security: flags.admin_security,
        kubeconfig: flags.kubeconfig,
        credentials: flags.client.credentials(),
        userspace: UserspaceSettings {
            drain_timeout: flags.userspace_drain_timeout,
            tcp_idle_timeout: Some(flags.userspace_tcp_idle_timeout).filter(|d| !d.is_zero()),
            udp_timeout: flags.userspace_udp_timeout,
            max_udp_flows: flags.userspace_max_udp_flows,
            ..UserspaceSettings::default()
        },
        userspace_threads: flags.userspace_threads,
    };
    agent::run(config, kpx_telemetry::signal::shutdown()).await?;
    Ok(())
}
