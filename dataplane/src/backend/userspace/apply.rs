//! The userspace backend's I/O: portals opened and updated in the proxy, then the rules that
//! send traffic to them, one `iptables-restore --noflush` per family (argv and stdin, never a
//! shell). Listeners open before any rule points at them and close only after the rules stopped
//! pointing at them, so no connection meets a redirect to a port nobody listens on.
//!
//! - Endpoint changes only update the portals: no rule changes unless a port gains its first
//!   endpoint or loses its last (REDIRECT <-> REJECT/DROP).
//! - A **partial sync** deletes the changed services' old lines and adds their new ones; a
//!   **full sync** (first sync, snapshot, after a failure, canary gone, every
//!   `full_resync_period`) declares the userspace chains (which flushes them) and refills
//!   them, adds the jumps from the built-in chains that are missing, and recreates the canary,
//!   in one restore per family. A failed restore is retried once as a full sync before the
//!   update is NACKed.
//! - After a UDP portal opened, conntrack entries to its service addresses are deleted: they
//!   may still redirect to a port of a previous portal (an agent restart) that nobody serves.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::metrics::ProxyMetrics;
use super::plan::{self, PlanConfig, PortPlan, PortalKey, Proto, ServicePlan};
use super::portal::Settings;
use super::proxy::{Proxy, ProxyError};
use super::render::{self, JUMPS, ServiceLines};
use crate::backend::iptables::apply::{BackendStats, FullReason, RuleCounts, SyncInputs, full_reason};
use crate::backend::iptables::exec::{ExecError, Runner};
use crate::backend::iptables::jumps;
use crate::backend::iptables::render::IpFamily;
use crate::backend::iptables::saved::SavedTable;
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;

#[derive(Debug, Clone)]
pub struct UserspaceConfig {
    pub families: Vec<IpFamily>,
    pub node_name: String,
    /// Pod CIDRs, comma separated (pod traffic under externalTrafficPolicy Local).
    pub cluster_cidr: Option<String>,
    /// Addresses that accept node ports; every local address when empty.
    pub node_ips: Vec<IpAddr>,
    pub settings: Settings,
    /// Threads of the proxy's runtime.
    pub threads: usize,
    pub full_resync_period: Duration,
    /// Tests only: the proxy's sockets and the iptables tools live in this network namespace.
    pub netns: Option<String>,
}

impl UserspaceConfig {
    pub fn new(node_name: &str) -> Self {
        UserspaceConfig {
            families: vec![IpFamily::V4],
            node_name: node_name.to_string(),
            cluster_cidr: None,
            node_ips: Vec::new(),
            settings: Settings::default(),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            full_resync_period: Duration::from_secs(3600),
            netns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("reading the built-in {table} chains: {source}")]
    Read {
        table: &'static str,
        #[source]
        source: ExecError,
    },
    #[error("{cmd}: {source}")]
    Restore {
        cmd: String,
        #[source]
        source: ExecError,
    },
}

/// One family's rules: what the last sync installed, and when to sync fully.
struct FamilyRules {
    family: IpFamily,
    restore_cmd: String,
    iptables_cmd: String,
    /// Per service key, the lines in the kernel after the last successful sync.
    previous: BTreeMap<String, ServiceLines>,
    synced_once: bool,
    failed: bool,
    canary_lost: bool,
    last_full: Option<Instant>,
    stats: BackendStats,
}

impl FamilyRules {
    fn new(family: IpFamily) -> FamilyRules {
        let tool = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        FamilyRules {
            family,
            restore_cmd: format!("{tool}-restore"),
            iptables_cmd: tool.to_string(),
            previous: BTreeMap::new(),
            synced_once: false,
            failed: false,
            canary_lost: false,
            last_full: None,
            stats: BackendStats::default(),
        }
    }

    fn full_reason(&self, snapshot: bool, period: Duration) -> Option<FullReason> {
        full_reason(SyncInputs {
            snapshot,
            synced_once: self.synced_once,
            failed_before: self.failed,
            canary_lost: self.canary_lost,
            since_full: self.last_full.map(|t| t.elapsed()),
            period,
        })
    }
}

pub struct UserspaceBackend {
    cfg: UserspaceConfig,
    plan_cfg: PlanConfig,
    runner: Runner,
    proxy: Proxy,
    metrics: Arc<ProxyMetrics>,
    families: Vec<FamilyRules>,
    /// Portals no rule should point at any more, closed after the next successful sync.
    doomed: BTreeSet<PortalKey>,
}

/// Checks that the restore tool of `family` runs; its version line.
pub fn probe(cfg: &UserspaceConfig, family: IpFamily) -> Result<String, ExecError> {
    let rules = FamilyRules::new(family);
    let runner = Runner { netns: cfg.netns.clone() };
    Ok(runner.run_ok(&[&rules.restore_cmd, "--version"], &[])?.stdout.trim().to_string())
}

impl UserspaceBackend {
    pub fn new(cfg: UserspaceConfig) -> Result<UserspaceBackend, UserspaceError> {
        raise_fd_limit();
        let metrics = Arc::new(ProxyMetrics::default());
        let proxy = Proxy::new(cfg.threads, cfg.netns.as_deref(), Arc::new(cfg.settings.clone()), metrics.clone())?;
        let plan_cfg = PlanConfig {
            cluster_cidrs: cfg.cluster_cidr.iter().flat_map(|c| c.split(',')).map(str::to_string).collect(),
            node_ips: cfg.node_ips.clone(),
        };
        Ok(UserspaceBackend {
            runner: Runner { netns: cfg.netns.clone() },
            families: cfg.families.iter().map(|f| FamilyRules::new(*f)).collect(),
            proxy,
            metrics,
            plan_cfg,
            cfg,
            doomed: BTreeSet::new(),
        })
    }

    pub fn config(&self) -> &UserspaceConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    /// Rule-sync statistics, one per family (kube-proxy's sync metrics).
    pub fn stats(&self) -> Vec<BackendStats> {
        self.families.iter().map(|f| f.stats.clone()).collect()
    }

    /// The port each open portal listens on.
    pub fn ports(&self) -> BTreeMap<PortalKey, u16> {
        self.proxy.ports()
    }

    /// Whether the next sync of some family will be full (for the agent's periodic resync).
    pub fn wants_full_sync(&self) -> bool {
        self.families.iter().any(|f| f.full_reason(false, self.cfg.full_resync_period).is_some())
    }

    /// Whether the canary is still in every table of every family; when one is gone (a table
    /// was flushed), that family's next sync is full.
    pub fn check_canary(&mut self) -> bool {
        let mut ok = true;
        for f in self.families.iter_mut().filter(|f| f.synced_once) {
            for table in jumps::TABLES {
                let args = jumps::canary_check_args(table);
                let mut argv: Vec<&str> = vec![&f.iptables_cmd];
                argv.extend(args.iter().map(String::as_str));
                if !self.runner.run(&argv, &[]).is_ok_and(|r| r.success) {
                    tracing::warn!(family = ?f.family, table, "kpx canary is gone (table flushed?); next sync is full");
                    f.canary_lost = true;
                    ok = false;
                    break;
                }
            }
        }
        ok
    }

    fn plan(&self, family: IpFamily, state: &AppliedState, key: &str) -> ServicePlan {
        state.services().get(key).map(|e| plan::plan_service(&self.plan_cfg, family, e)).unwrap_or_default()
    }

    /// Opens or updates the portals of `keys` (every service on a full sync) and marks the ones
    /// they no longer have for closing. Returns each family's port plans, by service.
    fn portals(
        &mut self,
        state: &AppliedState,
        keys: &BTreeSet<String>,
        full: bool,
        errors: &mut Vec<String>,
        opened_udp: &mut Vec<(IpFamily, PortPlan)>,
    ) -> BTreeMap<IpFamily, BTreeMap<String, Vec<PortPlan>>> {
        let mut wanted = BTreeSet::new();
        let mut out: BTreeMap<IpFamily, BTreeMap<String, Vec<PortPlan>>> = BTreeMap::new();
        let families: Vec<IpFamily> = self.families.iter().map(|f| f.family).collect();
        for family in families {
            for key in keys {
                let plan = self.plan(family, state, key);
                if !plan.skipped.is_empty() {
                    tracing::warn!(service = %key, family = ?family, skipped = ?plan.skipped, "parts of a service left out");
                }
                for (pk, spec) in &plan.portals {
                    let new = !self.proxy.contains(pk);
                    match self.proxy.open(pk, spec) {
                        Ok(_) => {
                            wanted.insert(pk.clone());
                            if new && pk.proto == Proto::Udp {
                                let port = plan.ports.iter().find(|p| p.port_name == pk.port && p.proto == Proto::Udp);
                                opened_udp.extend(port.map(|p| (family, p.clone())));
                            }
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                out.entry(family).or_default().insert(key.clone(), plan.ports);
            }
        }
        let gone: Vec<PortalKey> = self
            .proxy
            .keys()
            .filter(|k| !wanted.contains(*k) && (full || keys.contains(&k.service)))
            .cloned()
            .collect();
        self.doomed.extend(gone);
        // A portal wanted again before it was closed stays.
        self.doomed.retain(|k| !wanted.contains(k));
        out
    }

    /// Syncs the rules of family index `i`: partial over `changed` unless a full sync is due.
    fn sync_family(
        &mut self,
        i: usize,
        state: &AppliedState,
        plans: &BTreeMap<String, Vec<PortPlan>>,
        changes: &ChangeSet,
    ) -> Result<(), String> {
        let ports = self.proxy.ports();
        let lines: BTreeMap<String, ServiceLines> =
            plans.iter().map(|(k, p)| (k.clone(), render::render_service(p, &ports))).collect();
        let reason = self.families[i].full_reason(changes.full, self.cfg.full_resync_period);
        let first = self.sync_once(i, state, &lines, reason);
        let result = match first {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::warn!(family = ?self.families[i].family, %error, "userspace sync failed; retrying with a full sync");
                self.sync_once(i, state, &lines, Some(FullReason::AfterFailure)).map_err(|e| e.to_string())
            }
        };
        let f = &mut self.families[i];
        if result.is_err() {
            f.failed = true;
        }
        result
    }

    fn sync_once(
        &mut self,
        i: usize,
        state: &AppliedState,
        changed: &BTreeMap<String, ServiceLines>,
        full: Option<FullReason>,
    ) -> Result<(), UserspaceError> {
        let started = Instant::now();
        let family = self.families[i].family;
        let (input, next) = match full {
            Some(_) => {
                // Every service, not only the changed ones: the rest from a fresh plan.
                let ports = self.proxy.ports();
                let mut all: BTreeMap<String, ServiceLines> = BTreeMap::new();
                for key in state.services().keys() {
                    let lines = match changed.get(key) {
                        Some(l) => l.clone(),
                        None => render::render_service(&self.plan(family, state, key).ports, &ports),
                    };
                    all.insert(key.clone(), lines);
                }
                let (filter_extra, nat_extra) = self.extras(i)?;
                let input = render::render_full(family, &self.cfg.node_ips, all.values(), &filter_extra, &nat_extra);
                (input, all)
            }
            None => {
                let f = &self.families[i];
                let empty = ServiceLines::default();
                let pairs: Vec<(&ServiceLines, &ServiceLines)> =
                    changed.iter().map(|(k, new)| (f.previous.get(k).unwrap_or(&empty), new)).collect();
                let input = render::render_partial(pairs.into_iter());
                let mut next = f.previous.clone();
                for (k, l) in changed {
                    if state.services().contains_key(k) {
                        next.insert(k.clone(), l.clone());
                    } else {
                        next.remove(k);
                    }
                }
                (input, next)
            }
        };
        let f = &self.families[i];
        let result = if input.is_empty() {
            Ok(())
        } else {
            let argv = [f.restore_cmd.as_str(), "--noflush", "--wait=5"];
            self.runner
                .run_ok(&argv, &[&input])
                .map(|_| ())
                .map_err(|source| UserspaceError::Restore { cmd: f.restore_cmd.clone(), source })
        };
        let node_ips = self.cfg.node_ips.iter().filter(|ip| family.matches(**ip)).count().max(1);
        let f = &mut self.families[i];
        f.stats.last_sync_duration = Some(started.elapsed());
        f.stats.last_sync_full = full.is_some();
        f.stats.last_bytes_written = input.len();
        f.stats.last_rules_written =
            input.lines().filter(|l| l.starts_with("-A ") || l.starts_with("-I ") || l.starts_with("-D ")).count();
        f.stats.last_restores = usize::from(!input.is_empty());
        if let Err(e) = &result {
            f.stats.restore_failures += 1;
            f.stats.last_error = Some(e.to_string());
            return result;
        }
        f.previous = next;
        let (filter, nat) = f.previous.values().fold((0, 0), |(a, b), l| (a + l.filter.len(), b + l.nat.len()));
        // Plus the canaries and the node-port jumps at the end of the portal chains.
        f.stats.rules = RuleCounts { filter: filter + 1, nat: nat + 1 + 2 * node_ips };
        f.stats.last_success = Some(SystemTime::now());
        f.stats.last_error = None;
        f.failed = false;
        f.synced_once = true;
        if full.is_some() {
            f.stats.full_syncs += 1;
            f.stats.last_full_reason = full;
            f.last_full = Some(started);
            f.canary_lost = false;
        } else {
            f.stats.partial_syncs += 1;
        }
        Ok(())
    }

    /// The canary and the missing jumps from the built-in chains (filter, nat) of family `i`.
    fn extras(&self, i: usize) -> Result<(String, String), UserspaceError> {
        let f = &self.families[i];
        let mut out = (String::new(), String::new());
        for (table, extra) in [("filter", &mut out.0), ("nat", &mut out.1)] {
            jumps::canary_lines(extra);
            let mut text = String::new();
            let mut listed = Vec::new();
            for j in JUMPS.iter().filter(|j| j.table == table) {
                if listed.contains(&j.chain) {
                    continue;
                }
                listed.push(j.chain);
                let ran = self
                    .runner
                    .run_ok(&[&f.iptables_cmd, "-w", "5", "-t", table, "-S", j.chain], &[])
                    .map_err(|source| UserspaceError::Read { table, source })?;
                text.push_str(&ran.stdout);
            }
            let saved = SavedTable::parse(&text);
            for j in JUMPS.iter().rev().filter(|j| j.table == table) {
                if !saved.has_jump(j.chain, j.comment, j.target) {
                    extra.push_str(&format!("-I {} {}\n", j.chain, j.rule()));
                }
            }
        }
        Ok(out)
    }

    /// Deletes the conntrack entries of newly opened UDP portals' addresses (see the module
    /// doc); failures are logged, the rules are right either way.
    fn clean_conntrack(&self, opened: &[(IpFamily, PortPlan)]) {
        for (family, p) in opened {
            let fam = if *family == IpFamily::V4 { "ipv4" } else { "ipv6" };
            let delete = |extra: &[String]| -> Vec<String> {
                ["-D", "-f", fam, "-p", "udp"].into_iter().map(String::from).chain(extra.iter().cloned()).collect()
            };
            let mut deletes: Vec<Vec<String>> = std::iter::once(p.cluster_ip)
                .chain(p.external_ips.iter().copied())
                .chain(p.lb_ips.iter().copied())
                .map(|a| delete(&["--orig-dst".into(), a.to_string(), "--dport".into(), p.port.to_string()]))
                .collect();
            deletes.extend(p.node_port.map(|np| delete(&["--dport".into(), np.to_string()])));
            crate::backend::iptables::conntrack::run_deletes(&self.runner, &deletes);
        }
    }

    fn apply_inner(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        let full = changes.full
            || self.families.iter().any(|f| f.full_reason(changes.full, self.cfg.full_resync_period).is_some());
        let keys: BTreeSet<String> = if full {
            state.services().keys().chain(self.proxy.keys().map(|k| &k.service)).cloned().collect()
        } else {
            changes.services.clone()
        };
        let mut errors = Vec::new();
        let mut opened_udp = Vec::new();
        let plans = self.portals(state, &keys, full, &mut errors, &mut opened_udp);
        let mut synced = true;
        for i in 0..self.families.len() {
            let family = self.families[i].family;
            let empty = BTreeMap::new();
            let plans = plans.get(&family).unwrap_or(&empty);
            if let Err(e) = self.sync_family(i, state, plans, changes) {
                errors.push(e);
                synced = false;
            }
        }
        if synced {
            for k in std::mem::take(&mut self.doomed) {
                self.proxy.close(&k);
            }
            self.clean_conntrack(&opened_udp);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

impl Apply for UserspaceBackend {
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        self.apply_inner(state, changes)
    }
}

/// Each proxied TCP connection holds six descriptors (two sockets, two pipes) and each UDP flow
/// one: the soft limit goes up to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open files limit"),
            Err(error) => tracing::warn!(%error, soft, "cannot raise the open files limit"),
        }
    }
}
