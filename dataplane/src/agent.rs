//! The node agent: a Sync session with the controlplane, the backend(s) it drives (one iptables
//! backend per IP family), and the small HTTP servers around them (health, metrics,
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
use crate::hcnp::HcnpServers;
use crate::health::Health;
use crate::metrics::{Metrics, NoLocalTracker};
use crate::state::{AppliedState, ChangeSet, Services};
use crate::stream::{self, Apply, Backoff, NodeIdentity, Session, SyncEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Iptables,
    /// IPVS virtual servers (kube-proxy's ipvs mode); falls back to iptables without IPVS.
    Ipvs,
    /// nftables through netlink (kube-proxy's nftables layout); see `nftables_fallback`.
    Nftables,
    /// Renders iptables rules and prints them instead of applying them.
    DryRun,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub controlplane: String,
    pub backend: BackendKind,
    pub cluster_cidr: Option<String>,
    pub node_ips: Vec<IpAddr>,
    pub masquerade_all: bool,
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
    /// With `--backend nftables`: use iptables when nf_tables is unusable (else startup fails).
    pub nftables_fallback: bool,
    /// The admin gRPC API (`kpx.v1.Admin`); None: not served.
    pub admin_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "backend {backend} is not usable on this node: {reason} (is iptables installed, and does this process have NET_ADMIN?)"
    )]
    BackendUnavailable { backend: String, reason: String },
    #[error("backend ipvs is not usable on this node and --no-ipvs-fallback is set: {0}")]
    IpvsUnavailable(#[source] kpx_ipvs_netlink::IpvsError),
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
        cfg.full_resync_period = config.full_resync_period;
        cfg.netns = config.netns.clone();
        cfg.dry_run = config.backend == BackendKind::DryRun;
        if config.backend == BackendKind::Iptables {
            let version = apply::probe(&cfg).map_err(|e| AgentError::BackendUnavailable {
                backend: format!("iptables ({})", family_name(*family)),
                reason: e.to_string(),
            })?;
            tracing::info!(family = family_name(*family), %version, "iptables backend");
        }
        out.push(IptablesBackend::new(cfg));
    }
    Ok(out)
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
    nft: Vec<NftBackend>,
    /// The applied services, kept in step with the session's state after each apply.
    mirror: Services,
    has_state: bool,
}

impl Core {
    fn stats(&self) -> Vec<BackendStats> {
        self.backends.iter().map(|b| b.stats().clone()).chain(self.nft.iter().map(NftBackend::backend_stats)).collect()
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
        self.hcnp.reconcile(state);
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

/// Every `period`: canary check, then the full resyncs the backends want.
async fn housekeeping(
    core: Arc<Mutex<Core>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    status: Arc<AdminStatus>,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let (core, metrics, health, status) = (core.clone(), metrics.clone(), health.clone(), status.clone());
        let done = tokio::task::spawn_blocking(move || {
            let mut core = lock(&core);
            if !core.has_state {
                return;
            }
            let mut drift: Vec<String> = core
                .backends
                .iter_mut()
                .filter_map(|b| {
                    let lost = !b.check_canary();
                    lost.then(|| format!("iptables {}: canary gone (table flushed?)", family_name(b.config().family)))
                })
                .collect();
            if let Some(ipvs) = core.ipvs.as_mut() {
                match ipvs.tick() {
                    Ok(()) => health.succeeded(),
                    Err(error) => {
                        tracing::warn!(%error, "ipvs reconcile failed");
                        drift.push(format!("ipvs reconcile failed: {error}"));
                        health.failed();
                    }
                }
            }
            for b in core.nft.iter_mut() {
                if !b.check() {
                    drift.push(format!("nftables {}: ruleset changed by someone else", family_name(b.config().family)));
                }
            }
            status.checked(drift.join("; "));
            if !core.backends.iter().any(|b| b.wants_full_sync()) && !core.nft.iter().any(|b| b.wants_full_sync()) {
                return;
            }
            let state = core.rebuild_state();
            let before = core.stats();
            let changes = ChangeSet { full: false, services: Default::default() };
            let mut ok = true;
            for b in core.backends.iter_mut().filter(|b| b.wants_full_sync()) {
                if let Err(error) = b.apply(&state, &changes) {
                    tracing::warn!(%error, "periodic full resync failed");
                    ok = false;
                }
            }
            for b in core.nft.iter_mut().filter(|b| b.wants_full_sync()) {
                if let Err(error) = b.apply(&state, &changes) {
                    tracing::warn!(%error, "nftables resync failed");
                    ok = false;
                }
            }
            metrics.record_sync(&before, &core.stats());
            if ok { health.succeeded() } else { health.failed() }
        })
        .await;
        if let Err(error) = done {
            tracing::error!(%error, "housekeeping task failed");
        }
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
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let ipvs = if config.backend == BackendKind::Ipvs { build_ipvs(&config)? } else { None };
    let nft = if config.backend == BackendKind::Nftables { build_nftables(&config)? } else { None };
    let iptables = AgentConfig { backend: BackendKind::Iptables, ..config.clone() };
    let backends = match config.backend {
        BackendKind::Ipvs if ipvs.is_some() => Vec::new(),
        BackendKind::Nftables if nft.is_some() => Vec::new(),
        BackendKind::Ipvs | BackendKind::Nftables => build_backends(&iptables)?,
        _ => build_backends(&config)?,
    };
    let nft_used = nft.is_some();
    let nft = nft.unwrap_or_default();
    let health = Arc::new(Health::new(&config.node_name, config.sync_period * 2));
    let metrics = Arc::new(Metrics::new());
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
    };
    let core = Arc::new(Mutex::new(Core { backends, ipvs, nft, mirror: BTreeMap::new(), has_state: false }));
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
    // The admin API is a debugging aid: a taken port (several agents on one host, or
    // another program's port on a control-plane node) does not stop the proxy.
    let admin = match config.admin_listen {
        Some(addr) => listen("admin gRPC", addr)
            .await
            .inspect_err(|error| tracing::warn!(%error, "admin gRPC API not served (set --admin-listen)"))
            .ok(),
        None => None,
    };
    if let Some(listener) = admin {
        let view_core = core.clone();
        let view: ViewFn = Arc::new(move || {
            let c = lock(&view_core);
            CoreView {
                services: c.mirror.clone(),
                iptables: c.backends.iter().map(|b| (b.config().clone(), b.stats().clone())).collect(),
                ipvs: c.ipvs.as_ref().map(|b| b.config().clone()),
                nftables: c.nft.iter().map(|b| (b.config().clone(), b.stats().clone())).collect(),
            }
        });
        let service = AdminService::new(&config.node_name, backend_name, status.clone(), view);
        tasks.push(tokio::spawn(crate::admin::serve(listener, service)));
    }
    let mut session = Session::new(identity, backend);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    session.events = Some(tx);
    tasks.push(tokio::spawn(observe(rx, metrics.clone(), health.clone(), status.clone())));
    tasks.push(tokio::spawn(housekeeping(core, metrics, health, status, config.sync_period)));

    let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    stream::run_forever(&mut session, &config.controlplane, backoff, shutdown).await;
    tasks.iter().for_each(|t| t.abort());
    tracing::info!("stopped; the kernel keeps the current rules");
    Ok(())
}
