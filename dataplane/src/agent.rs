//! The node agent: a Sync session with the controlplane, the backend(s) it drives (one iptables
//! backend per IP family, the IPVS backend, or the userspace proxy), and the small HTTP servers around them (health, metrics,
//! healthCheckNodePorts).
//!
//! The backends sit behind a mutex shared by the session (which applies updates) and a
//! housekeeping task that runs every sync period: it checks the canary and runs the full
//! resyncs the backends ask for (table flushed, `--full-resync-period` elapsed, an earlier
//! failure) even when no update arrives. For that it keeps its own map of the applied
//! services, updated per changed service, because the session owns the state while it runs.
//! The map shares the state's entries (`Arc`, copy on write): it costs a pointer per service,
//! not a second copy of every endpoint.
//!
//! Fail static: while the controlplane is unreachable the kernel keeps its rules and the
//! session reconnects with backoff (1 s doubling to 30 s, with jitter).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::admin::{AdminService, AdminStatus, CoreView, ViewFn};
use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::{BackendStats, IptablesBackend, IptablesConfig, apply};
use crate::backend::ipvs::{IpvsBackend, IpvsConfig};
use crate::backend::nftables::{NftBackend, NftConfig};
use crate::backend::shadow::{ShadowBackend, ShadowFamily};
use crate::backend::userspace::{self, UserspaceBackend, UserspaceConfig};
use crate::hcnp::HcnpServers;
use crate::health::Health;
use crate::metrics::{Metrics, NoLocalTracker};
use crate::state::{AppliedState, ChangeSet, Services};
use crate::stream::{self, Apply, Backoff, NodeIdentity, Session, SyncEvent};
use kpx_auth::client::ClientCredentials;
use kpx_auth::flags::ServerFlags;
use std::path::PathBuf;

mod housekeeping;
use housekeeping::housekeeping;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Iptables,
    /// IPVS virtual servers (kube-proxy's ipvs mode); falls back to iptables without IPVS.
    Ipvs,
    /// nftables through netlink (kube-proxy's nftables layout); see `nftables_fallback`.
    Nftables,
    /// Renders iptables rules and prints them instead of applying them.
    DryRun,
    /// Beside a live kube-proxy: renders, compares with the kernel's rules, reports; writes
    /// nothing (see `backend::shadow`).
    Shadow,
    /// kpx proxies the connections itself; iptables rules send service traffic to its ports.
    Userspace,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub controlplane: String,
    pub backend: BackendKind,
    pub cluster_cidr: Option<String>,
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's nodePortAddresses: the node's addresses in these CIDRs, read at startup,
    /// are added to `node_ips`.
    pub node_port_cidrs: Vec<String>,
    pub masquerade_all: bool,
    /// Node ports also on 127.0.0.1 (kube-proxy's `localhostNodePorts`; iptables, IPv4).
    pub localhost_node_ports: bool,
    pub healthz_bind_address: SocketAddr,
    pub metrics_bind_address: SocketAddr,
    pub ip_families: Vec<IpFamily>,
    pub full_resync_period: Duration,
    /// How often the canary is checked and pending full resyncs run; health allows 2 × this.
    pub sync_period: Duration,
    /// Tests only: program this network namespace instead of the agent's own.
    pub netns: Option<String>,
    /// The IPVS scheduler of `--backend ipvs`.
    pub ipvs_scheduler: String,
    /// Use iptables when the kernel has no IPVS (else startup fails).
    pub ipvs_fallback: bool,
    /// arp_ignore/arp_announce for the VIPs on kube-ipvs0 (kube-proxy's ipvs.strictARP).
    pub ipvs_strict_arp: bool,
    /// IPVS timeouts: TCP, TCP after FIN, UDP; zero leaves the kernel's.
    pub ipvs_timeouts: [Duration; 3],
    /// IPVS virtual servers in these CIDRs are never deleted (kube-proxy's ipvs.excludeCIDRs).
    pub ipvs_exclude_cidrs: Vec<String>,
    /// conntrack settings applied at startup, as kube-proxy does (iptables and ipvs backends).
    pub conntrack: crate::config::Conntrack,
    /// With `--backend nftables`: use iptables when nf_tables is unusable (else startup fails).
    pub nftables_fallback: bool,
    /// The admin gRPC API (`kpx.v1.Admin`); None: not served.
    pub admin_listen: Option<SocketAddr>,
    /// How the admin API authenticates its callers.
    pub admin_security: ServerFlags,
    /// The apiserver for the admin API's token reviews (`--token-audience`); in-cluster config
    /// when None.
    pub kubeconfig: Option<PathBuf>,
    /// How this node proves who it is to the controlplane, and checks the controlplane's
    /// certificate.
    pub credentials: ClientCredentials,
    /// Timeouts and limits of `--backend userspace`.
    pub userspace: userspace::Settings,
    /// Threads of the userspace proxy (0: one per CPU).
    pub userspace_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "backend {backend} is not usable on this node: {reason} (is iptables installed, and does this process have NET_ADMIN?)"
    )]
    BackendUnavailable { backend: String, reason: String },
    #[error("backend ipvs is not usable on this node and --no-ipvs-fallback is set: {0}")]
    IpvsUnavailable(#[source] kpx_ipvs_netlink::IpvsError),
    #[error("backend userspace cannot start: {0}")]
    Userspace(#[from] userspace::UserspaceError),
    #[error("admin API: {0}")]
    AdminSecurity(#[from] kpx_auth::server::SecurityError),
    #[error("controlplane credentials: {0}")]
    Credentials(#[from] kpx_auth::client::CredentialError),
    #[error(
        "localhost node ports need net.ipv4.conf.all.route_localnet=1, which cannot be set: {0} (turn them off with --iptables-localhost-nodeports=false or iptables.localhostNodePorts: false)"
    )]
    RouteLocalnet(#[source] crate::backend::iptables::exec::ExecError),
    #[error("no address of this node is in nodePortAddresses ({0}): node ports would be served nowhere")]
    NoNodePortAddress(String),
    #[error("backend nftables is not usable on this node (and --nftables-fallback is not set): {0}")]
    NftablesUnavailable(#[source] kpx_nft_netlink::NftError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn family_name(f: IpFamily) -> &'static str {
    match f {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// One backend per IP family, probed: an iptables backend whose tools do not run is an error.
pub fn build_backends(config: &AgentConfig) -> Result<Vec<IptablesBackend>, AgentError> {
    let mut out = Vec::new();
    for family in &config.ip_families {
        let mut cfg = IptablesConfig::new(*family, &config.node_name);
        cfg.cluster_cidr = config.cluster_cidr.clone();
        cfg.masquerade_all = config.masquerade_all;
        cfg.node_ips = config.node_ips.clone();
        cfg.localhost_node_ports = config.localhost_node_ports;
        cfg.full_resync_period = config.full_resync_period;
        cfg.netns = config.netns.clone();
        cfg.dry_run = config.backend == BackendKind::DryRun;
        if config.backend == BackendKind::Iptables {
            let version = apply::probe(&cfg).map_err(|e| AgentError::BackendUnavailable {
                backend: format!("iptables ({})", family_name(*family)),
                reason: e.to_string(),
            })?;
            tracing::info!(family = family_name(*family), %version, "iptables backend");
            if apply::ensure_route_localnet(&cfg).map_err(AgentError::RouteLocalnet)? {
                tracing::info!("route_localnet=1: node ports answer on 127.0.0.1 too (localhost node ports)");
            }
        }
        out.push(IptablesBackend::new(cfg));
    }
    Ok(out)
}

/// `--backend shadow`: the iptables backend's render settings per family, without its writer.
pub fn build_shadow(config: &AgentConfig) -> ShadowBackend {
    let families = config
        .ip_families
        .iter()
        .map(|family| {
            let mut cfg = IptablesConfig::new(*family, &config.node_name);
            cfg.cluster_cidr = config.cluster_cidr.clone();
            cfg.masquerade_all = config.masquerade_all;
            cfg.node_ips = config.node_ips.clone();
            cfg.localhost_node_ports = config.localhost_node_ports;
            ShadowFamily { render: cfg.render_config(), save_cmd: cfg.save_cmd.clone() }
        })
        .collect();
    tracing::info!("shadow backend: comparing with the kernel's rules, writing nothing");
    ShadowBackend::new(families, config.netns.clone())
}

/// `--backend ipvs`: the IPVS backend, or `None` after falling back to iptables (logged) when
/// the kernel has no IPVS, as kube-proxy does; an error instead with `--no-ipvs-fallback`.
pub fn build_ipvs(config: &AgentConfig) -> Result<Option<IpvsBackend>, AgentError> {
    let mut cfg = IpvsConfig::new(&config.node_name);
    cfg.scheduler = config.ipvs_scheduler.clone();
    cfg.node_ips = config.node_ips.clone();
    cfg.families = config
        .ip_families
        .iter()
        .map(|f| match f {
            IpFamily::V4 => kpx_ipvs_netlink::Family::Inet,
            IpFamily::V6 => kpx_ipvs_netlink::Family::Inet6,
        })
        .collect();
    cfg.cluster_cidrs = config.cluster_cidr.iter().flat_map(|c| c.split(',')).map(str::to_string).collect();
    cfg.masquerade_all = config.masquerade_all;
    cfg.reconcile_period = config.sync_period;
    cfg.strict_arp = config.ipvs_strict_arp;
    cfg.timeouts = config.ipvs_timeouts;
    cfg.exclude_cidrs = config.ipvs_exclude_cidrs.clone();
    match IpvsBackend::new(cfg) {
        Ok(b) => {
            tracing::info!(scheduler = %config.ipvs_scheduler, "ipvs backend");
            Ok(Some(b))
        }
        Err(e) if !config.ipvs_fallback => Err(AgentError::IpvsUnavailable(e)),
        Err(error) => {
            tracing::warn!(%error, "ipvs backend unavailable: falling back to the iptables backend");
            Ok(None)
        }
    }
}

/// `--backend userspace`: the proxy and its rules, probed like the iptables backend.
pub fn build_userspace(config: &AgentConfig) -> Result<UserspaceBackend, AgentError> {
    let mut cfg = UserspaceConfig::new(&config.node_name);
    cfg.families = config.ip_families.clone();
    cfg.cluster_cidr = config.cluster_cidr.clone();
    cfg.node_ips = config.node_ips.clone();
    cfg.settings = config.userspace.clone();
    if config.userspace_threads > 0 {
        cfg.threads = config.userspace_threads;
    }
    cfg.full_resync_period = config.full_resync_period;
    cfg.netns = config.netns.clone();
    for family in &cfg.families {
        let version = userspace::apply::probe(&cfg, *family).map_err(|e| AgentError::BackendUnavailable {
            backend: format!("userspace ({})", family_name(*family)),
            reason: e.to_string(),
        })?;
        tracing::info!(family = family_name(*family), %version, "userspace backend");
    }
    Ok(UserspaceBackend::new(cfg)?)
}

/// `--backend nftables`: one backend per family, or `None` after falling back to iptables
/// (logged) when nf_tables is unusable and `nftables_fallback` is set; an error otherwise.
pub fn build_nftables(config: &AgentConfig) -> Result<Option<Vec<NftBackend>>, AgentError> {
    let mut out = Vec::new();
    for family in &config.ip_families {
        let mut cfg = NftConfig::new(*family, &config.node_name);
        cfg.cluster_cidr = config.cluster_cidr.clone();
        cfg.masquerade_all = config.masquerade_all;
        cfg.node_ips = config.node_ips.clone();
        cfg.full_resync_period = config.full_resync_period;
        cfg.netns = config.netns.clone();
        match NftBackend::new(cfg) {
            Ok(mut b) => {
                if let Some(first) = out.first() {
                    b.share_generation(first);
                }
                out.push(b)
            }
            Err(e) if !config.nftables_fallback => return Err(AgentError::NftablesUnavailable(e)),
            Err(error) => {
                tracing::warn!(%error, "nftables backend unavailable: falling back to the iptables backend");
                return Ok(None);
            }
        }
        tracing::info!(family = family_name(*family), "nftables backend");
    }
    Ok(Some(out))
}

/// The backends and what the housekeeping task needs to resync them.
struct Core {
    backends: Vec<IptablesBackend>,
    ipvs: Option<IpvsBackend>,
    shadow: Option<ShadowBackend>,
    userspace: Option<UserspaceBackend>,
    nft: Vec<NftBackend>,
    /// The applied services, kept in step with the session's state after each apply.
    mirror: Services,
    has_state: bool,
}

impl Core {
    fn stats(&self) -> Vec<BackendStats> {
        let mut stats: Vec<BackendStats> = self.backends.iter().map(|b| b.stats().clone()).collect();
        stats.extend(self.userspace.iter().flat_map(|u| u.stats()));
        stats.extend(self.nft.iter().map(NftBackend::backend_stats));
        stats
    }

    /// The mirror as an AppliedState (only for resyncs without an update: O(state)).
    fn rebuild_state(&self) -> AppliedState {
        AppliedState::from_services(&self.mirror)
    }
}

/// The session's backend: applies to every family, then updates metrics, the mirror and the
/// healthCheckNodePort servers.
struct NodeBackend {
    core: Arc<Mutex<Core>>,
    metrics: Arc<Metrics>,
    hcnp: HcnpServers,
    no_local: NoLocalTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Apply for NodeBackend {
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        let mut core = lock(&self.core);
        let before = core.stats();
        let mut errors: Vec<String> = core.backends.iter_mut().filter_map(|b| b.apply(state, changes).err()).collect();
        errors.extend(core.ipvs.as_mut().and_then(|b| b.apply(state, changes).err()));
        errors.extend(core.nft.iter_mut().filter_map(|b| b.apply(state, changes).err()));
        errors.extend(core.userspace.as_mut().and_then(|b| b.apply(state, changes).err()));
        if let Some(shadow) = core.shadow.as_mut() {
            shadow.compare(state);
            self.metrics.shadow(&shadow.result().lock().unwrap_or_else(|e| e.into_inner()));
        }
        let shadow = core.shadow.is_some();
        self.metrics.record_sync(&before, &core.stats());
        if changes.full {
            core.mirror = state.services().clone();
        } else {
            for k in &changes.services {
                match state.services().get(k) {
                    Some(e) => core.mirror.insert(k.clone(), e.clone()),
                    None => core.mirror.remove(k),
                };
            }
        }
        core.has_state = true;
        drop(core);
        self.metrics.no_local(self.no_local.update(state, changes));
        if !shadow {
            // Beside kube-proxy, its healthCheckNodePort servers hold those ports.
            self.hcnp.reconcile(state);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

/// Feeds session events into metrics and health.
async fn observe(
    mut events: tokio::sync::mpsc::UnboundedReceiver<SyncEvent>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Arc<AdminStatus>,
) {
    while let Some(e) = events.recv().await {
        status.event(&e);
        match e {
            SyncEvent::Connected => {
                metrics.connected.set(1);
            }
            SyncEvent::Disconnected { .. } => {
                metrics.connected.set(0);
            }
            SyncEvent::Applied { change_times_unix_ms, programmed_at, changes, apply, .. } => {
                metrics.queued(programmed_at.checked_sub(apply).unwrap_or(programmed_at));
                metrics.changes(changes, true);
                metrics.update(true);
                metrics.programmed(&change_times_unix_ms, programmed_at);
                health.succeeded();
                health.applied();
            }
            SyncEvent::Rejected { changes, .. } => {
                metrics.changes(changes, false);
                metrics.update(false);
                health.failed();
            }
        }
    }
}

async fn listen(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, AgentError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { what, addr, source })
}

/// Runs the agent until `shutdown` resolves. Errors only at startup (backend unusable, a port
/// taken); afterwards problems are retried and reported through health and metrics.
/// The admin API's security from its flags; the apiserver (for `--token-audience`) from
/// `--kubeconfig` or in-cluster config. Node tokens are accepted only with the node-name extra
/// here: the agent has no right to read pods.
async fn admin_security(
    config: &AgentConfig,
    addr: SocketAddr,
    metrics: kpx_auth::AuthMetrics,
) -> Result<kpx_auth::ServerSecurity, AgentError> {
    let api = match &config.admin_security.token_audience {
        None => Ok(None),
        Some(_) => kpx_auth::apiserver::KubeApi::connect(config.kubeconfig.as_deref())
            .await
            .map(|a| Some(Arc::new(a) as Arc<dyn kpx_auth::apiserver::ApiServer>))
            .map_err(|e| e.to_string()),
    };
    let plane = "kpx-dataplane admin API";
    Ok(kpx_auth::ServerSecurity::from_flags(&config.admin_security, addr, api, false, metrics, plane)?)
}

/// The settings kube-proxy makes at startup besides its rules: node ports on the addresses of
/// `node_port_cidrs`, and the conntrack sysctls (not for dry-run).
fn prepare_host(config: &mut AgentConfig) -> Result<(), AgentError> {
    if !config.node_port_cidrs.is_empty() {
        let runner = crate::backend::iptables::exec::Runner { netns: config.netns.clone() };
        let out = runner.run(&["ip", "-o", "addr", "show"], &[]).map(|r| r.stdout).unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot list the node's addresses for nodePortAddresses");
            String::new()
        });
        let found = crate::backend::ipvs::host::addresses_in(&out, &config.node_port_cidrs);
        tracing::info!(cidrs = ?config.node_port_cidrs, addresses = ?found, "node ports on the node's addresses in nodePortAddresses");
        if found.is_empty() {
            // An empty list would mean every address: refuse rather than widen.
            return Err(AgentError::NoNodePortAddress(config.node_port_cidrs.join(",")));
        }
        config.node_ips.extend(found);
    }
    if !matches!(config.backend, BackendKind::DryRun | BackendKind::Shadow) {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let failed =
            crate::sysctl::apply(&crate::sysctl::conntrack_writes(&config.conntrack, cpus), config.netns.as_deref());
        if !failed.is_empty() {
            tracing::warn!(failed = ?failed, "some conntrack settings could not be applied; the proxy runs without them");
        }
    }
    Ok(())
}

pub async fn run(mut config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Credentials that cannot work are a configuration error, said once at startup; later
    // failures to read them (a rotation in progress) are retried with the connection.
    config.credentials.check(&config.controlplane)?;
    let mut metrics = Metrics::new();
    let admin_security = match config.admin_listen {
        Some(addr) => Some(admin_security(&config, addr, metrics.auth.clone()).await?),
        None => None,
    };
    prepare_host(&mut config)?;
    let ipvs = if config.backend == BackendKind::Ipvs { build_ipvs(&config)? } else { None };
    let shadow = (config.backend == BackendKind::Shadow).then(|| build_shadow(&config));
    let userspace = if config.backend == BackendKind::Userspace { Some(build_userspace(&config)?) } else { None };
    if let Some(u) = &userspace {
        metrics.register_userspace(u.metrics());
    }
    let metrics = Arc::new(metrics);
    let nft = if config.backend == BackendKind::Nftables { build_nftables(&config)? } else { None };
    let iptables = AgentConfig { backend: BackendKind::Iptables, ..config.clone() };
    let backends = match config.backend {
        BackendKind::Shadow | BackendKind::Userspace => Vec::new(),
        BackendKind::Ipvs if ipvs.is_some() => Vec::new(),
        BackendKind::Nftables if nft.is_some() => Vec::new(),
        BackendKind::Ipvs | BackendKind::Nftables => build_backends(&iptables)?,
        _ => build_backends(&config)?,
    };
    let nft_used = nft.is_some();
    let nft = nft.unwrap_or_default();
    let health = Arc::new(Health::new(&config.node_name, config.sync_period * 2));
    let healthz = listen("/healthz", config.healthz_bind_address).await?;
    let scrape = listen("/metrics", config.metrics_bind_address).await?;
    let h = health.clone();
    let m = metrics.clone();
    let mut tasks = vec![
        tokio::spawn(crate::http::serve(healthz, Arc::new(move |p: &str| h.reply(p)))),
        tokio::spawn(crate::http::serve(scrape, Arc::new(move |p: &str| m.reply(p)))),
    ];
    tracing::info!(healthz = %config.healthz_bind_address, metrics = %config.metrics_bind_address, "serving");

    let backend_name = match config.backend {
        BackendKind::Ipvs if ipvs.is_some() => "ipvs",
        BackendKind::Nftables if nft_used => "nftables",
        BackendKind::Iptables | BackendKind::Ipvs | BackendKind::Nftables => "iptables",
        BackendKind::DryRun => "dry-run",
        BackendKind::Shadow => "shadow",
        BackendKind::Userspace => "userspace",
    };
    let core = Arc::new(Mutex::new(Core {
        backends,
        ipvs,
        nft,
        shadow,
        userspace,
        mirror: BTreeMap::new(),
        has_state: false,
    }));
    let backend = NodeBackend {
        core: core.clone(),
        metrics: metrics.clone(),
        hcnp: HcnpServers::new(health.clone()),
        no_local: NoLocalTracker::default(),
    };
    let identity = NodeIdentity {
        node_name: config.node_name.clone(),
        backend: backend_name.into(),
        ip_families: config.ip_families.iter().map(|f| family_name(*f).to_string()).collect(),
        zone: String::new(),
    };
    let status = Arc::new(AdminStatus::default());
    // A misconfigured admin API (plaintext beyond loopback, unreadable certificate) stopped the
    // agent above with a clear error; a taken port does not: the admin API is a debugging aid,
    // and several agents on one host, or another program's port on a control-plane node, must
    // not stop the proxy.
    let admin = match config.admin_listen {
        Some(addr) => listen("admin gRPC", addr)
            .await
            .inspect_err(|error| tracing::warn!(%error, "admin gRPC API not served (set --admin-listen)"))
            .ok(),
        None => None,
    };
    if let (Some(listener), Some(security)) = (admin, admin_security) {
        let view_core = core.clone();
        let view: ViewFn = Arc::new(move || {
            let c = lock(&view_core);
            CoreView {
                services: c.mirror.clone(),
                iptables: c.backends.iter().map(|b| (b.config().clone(), b.stats().clone())).collect(),
                ipvs: c.ipvs.as_ref().map(|b| b.config().clone()),
                shadow: c.shadow.as_ref().map(|b| b.result().lock().unwrap_or_else(|e| e.into_inner()).clone()),
                userspace: c.userspace.as_ref().map(|u| crate::admin::UserspaceView {
                    netns: u.config().netns.clone(),
                    stats: u.config().families.iter().copied().zip(u.stats()).collect(),
                }),
                nftables: c.nft.iter().map(|b| (b.config().clone(), b.stats().clone())).collect(),
            }
        });
        let service = AdminService::new(&config.node_name, backend_name, status.clone(), view);
        tasks.push(tokio::spawn(crate::admin::serve(listener, security, service)));
    }
    let mut session = Session::new(identity, backend);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    session.events = Some(tx);
    tasks.push(tokio::spawn(observe(rx, metrics.clone(), health.clone(), status.clone())));
    tasks.push(tokio::spawn(housekeeping(core, metrics, health, status, config.sync_period)));

    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    stream::run_forever(&mut session, &config.controlplane, &config.credentials, backoff, shutdown).await;
    tasks.iter().for_each(|t| t.abort());
    tracing::info!("stopped; the kernel keeps the current rules");
    Ok(())
}
