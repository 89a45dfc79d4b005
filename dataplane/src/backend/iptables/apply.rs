//! The iptables backend's I/O: one `iptables-restore --noflush` per sync, fed from stdin
//! (a large full sync on iptables-nft takes several, see `split`).
//!
//! - A **full sync** reads `iptables-save -t nat` and lists the built-in filter chains kpx jumps
//!   from (`iptables -S CHAIN`: on nft, saving the filter table reads the whole ruleset),
//!   rewrites every top-level kpx chain and every per-service chain the kernel does not already
//!   hold exactly as rendered (see `unchanged`; `skip_unchanged_chains` off rewrites them all),
//!   deletes per-service chains nobody wants any more (including ones a previous agent or
//!   kube-proxy left), recreates the canary and adds any missing jump from the built-in chains,
//!   all in one restore. It never flushes a table, so a restarted agent adopts the rules in the kernel
//!   without a moment in which traffic meets no rules. On iptables-nft, whose `--noflush` restore
//!   slows down super-linearly with its size, a full sync that writes more than
//!   `full_sync_chunk_rules` per-service rules is split into restores of whole services, with
//!   KUBE-SERVICES and the stale-chain deletes in the last one (see `split`). What the partial
//!   syncs diff against afterwards and the rule counts are those of the whole rendered ruleset,
//!   whatever the restore had to write.
//! - A **partial sync** rewrites only the changed services' chains (see `render_partial`).
//! - Full syncs happen on the first sync, on a snapshot, after any failure, when the canary is
//!   gone (someone flushed the tables; the agent calls [`IptablesBackend::check_canary`]
//!   periodically) and after `full_resync_period`. A failed restore is retried once as a full
//!   sync before the update is NACKed.
//! - After the rules changed, stale UDP conntrack entries are deleted (see `conntrack`).

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use super::conntrack;
use super::exec::{ExecError, Runner};
use super::jumps;
use super::render::{self, IpFamily, PreviousRules, RenderConfig, ServiceRules};
use super::saved::{self, SavedTable};
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;
use kpx_telemetry::span::{Attr, DistSpan};

#[derive(Debug, Clone)]
pub struct IptablesConfig {
    pub family: IpFamily,
    pub cluster_cidr: Option<String>,
    pub masquerade_all: bool,
    pub node_ips: Vec<IpAddr>,
    pub node_name: String,
    /// kube-proxy's `localhostNodePorts` (default on): see `RenderConfig::localhost_node_ports`.
    pub localhost_node_ports: bool,
    /// "iptables-restore", "ip6tables-restore" or a variant ("iptables-nft-restore", ...).
    /// The matching iptables command is this name without "-restore".
    pub restore_cmd: String,
    pub save_cmd: String,
    pub full_resync_period: Duration,
    /// On iptables-nft, a full sync that writes more per-service rules than this is split into
    /// restores of whole services of at most this many rules each (see `split`); 0 never
    /// splits. Legacy always uses one restore.
    pub full_sync_chunk_rules: usize,
    /// A full sync leaves out the per-service chains that `iptables-save` shows with exactly
    /// the rules it would write (see `unchanged`); off, it rewrites every chain.
    pub skip_unchanged_chains: bool,
    /// Tests only: run every command inside this network namespace (`ip netns exec NAME`).
    pub netns: Option<String>,
    /// Print the restore input to stdout instead of touching the kernel.
    pub dry_run: bool,
}

impl IptablesConfig {
    /// The defaults for `family`: the distribution's iptables (or ip6tables) tools, a full
    /// resync every hour.
    pub fn new(family: IpFamily, node_name: &str) -> Self {
        let tool = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        IptablesConfig {
            family,
            cluster_cidr: None,
            masquerade_all: false,
            node_ips: Vec::new(),
            node_name: node_name.to_string(),
            localhost_node_ports: true,
            restore_cmd: format!("{tool}-restore"),
            save_cmd: format!("{tool}-save"),
            full_resync_period: Duration::from_secs(3600),
            full_sync_chunk_rules: 5000,
            skip_unchanged_chains: true,
            netns: None,
            dry_run: false,
        }
    }

    /// The rule-editing command that goes with `restore_cmd` ("iptables-nft-restore" ->
    /// "iptables-nft").
    pub fn iptables_cmd(&self) -> String {
        self.restore_cmd.replacen("-restore", "", 1)
    }

    pub fn render_config(&self) -> RenderConfig {
        RenderConfig {
            family: self.family,
            cluster_cidr: self.cluster_cidr.clone(),
            masquerade_all: self.masquerade_all,
            node_ips: self.node_ips.clone(),
            node_name: self.node_name.clone(),
            localhost_node_ports: self.localhost_node_ports,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("reading the {table} table: {source}")]
    Save {
        table: &'static str,
        #[source]
        source: ExecError,
    },
    #[error("iptables-restore: {0}")]
    Restore(#[source] ExecError),
    #[error("the rendered restore input is malformed: {0}")]
    Render(&'static str),
}

/// Checks that the restore tool exists and runs (`RESTORE --version`); returns its version line.
pub fn probe(cfg: &IptablesConfig) -> Result<String, ExecError> {
    let runner = Runner { netns: cfg.netns.clone() };
    let ran = runner.run_ok(&[&cfg.restore_cmd, "--version"], &[])?;
    Ok(ran.stdout.trim().to_string())
}

/// Where `route_localnet` lives under /proc/sys (and its `sysctl` name).
const ROUTE_LOCALNET: (&str, &str) = ("net/ipv4/conf/all/route_localnet", "net.ipv4.conf.all.route_localnet");

/// Sets `net.ipv4.conf.all.route_localnet=1` when the config serves node ports on 127.0.0.1
/// (as kube-proxy does at startup; it stays set afterwards, as with kube-proxy). Returns
/// whether it was needed. In a test namespace (`netns`) it runs `sysctl -w` there, since
/// /proc/sys/net shows the namespace of the process that reads it.
pub fn ensure_route_localnet(cfg: &IptablesConfig) -> Result<bool, ExecError> {
    if !cfg.render_config().localnet_firewall() || cfg.dry_run {
        return Ok(false);
    }
    let (path, name) = ROUTE_LOCALNET;
    if cfg.netns.is_some() {
        let runner = Runner { netns: cfg.netns.clone() };
        runner.run_ok(&["sysctl", "-q", "-w", &format!("{name}=1")], &[])?;
        return Ok(true);
    }
    let path = format!("/proc/sys/{path}");
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return Ok(true);
    }
    std::fs::write(&path, "1").map_err(|source| ExecError::Spawn { cmd: format!("write 1 to {path}"), source })?;
    Ok(true)
}

/// Rules per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub filter: usize,
    pub nat: usize,
}

/// What the backend did, for metrics and logs.
#[derive(Debug, Clone, Default)]
pub struct BackendStats {
    /// Duration of the last sync (restore included, conntrack cleanup excluded).
    pub last_sync_duration: Option<Duration>,
    pub last_sync_full: bool,
    /// When the last sync succeeded.
    pub last_success: Option<SystemTime>,
    pub full_syncs: u64,
    pub partial_syncs: u64,
    pub restore_failures: u64,
    pub last_error: Option<String>,
    /// Rule lines (`-A`/`-I`/`-D`) and bytes of the last sync's restore input(s).
    pub last_rules_written: usize,
    pub last_bytes_written: usize,
    /// Restores the last sync ran (more than one for a split full sync on iptables-nft).
    pub last_restores: usize,
    /// Per-service chains the last full sync found in the kernel exactly as rendered and left
    /// alone (0 after a partial sync, or with `skip_unchanged_chains` off).
    pub last_unchanged_chains: usize,
    /// The rules kpx keeps in each table after the last successful sync.
    pub rules: RuleCounts,
    pub conntrack_deletes: u64,
    /// Why the last full sync was full.
    pub last_full_reason: Option<FullReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    FirstSync,
    Snapshot,
    AfterFailure,
    CanaryLost,
    Periodic,
}

/// What decides between a full and a partial sync (pure, for tests).
#[derive(Debug, Clone, Copy)]
pub struct SyncInputs {
    pub snapshot: bool,
    pub synced_once: bool,
    pub failed_before: bool,
    pub canary_lost: bool,
    pub since_full: Option<Duration>,
    pub period: Duration,
}

/// `Some(reason)` when the next sync must be full.
pub fn full_reason(i: SyncInputs) -> Option<FullReason> {
    if !i.synced_once {
        Some(FullReason::FirstSync)
    } else if i.failed_before {
        Some(FullReason::AfterFailure)
    } else if i.canary_lost {
        Some(FullReason::CanaryLost)
    } else if i.snapshot {
        Some(FullReason::Snapshot)
    } else if i.since_full.is_none_or(|d| d >= i.period) {
        Some(FullReason::Periodic)
    } else {
        None
    }
}

pub struct IptablesBackend {
    cfg: IptablesConfig,
    render: RenderConfig,
    runner: Runner,
    previous: PreviousRules,
    udp: conntrack::UdpTracker,
    synced_once: bool,
    failed: bool,
    canary_lost: bool,
    last_full: Option<Instant>,
    // Reused between syncs: a large ruleset is tens of MB of text.
    buf: String,
    filter_extra: String,
    nat_extra: String,
    /// How the last full sync's `buf` is written out (None after a partial one).
    splits: Option<Layout>,
    /// Restores that run before `buf` in a split full sync (empty otherwise).
    chunks: Vec<String>,
    /// Whether the restore command is iptables-nft, once known.
    nft: Option<bool>,
    /// Syncs attempted (a resync read before another is stale), and periodic resyncs read in
    /// a row that went stale.
    applies: u64,
    stale_resyncs: u32,
    stats: BackendStats,
}

impl IptablesBackend {
    pub fn new(cfg: IptablesConfig) -> Self {
        IptablesBackend {
            render: cfg.render_config(),
            runner: Runner { netns: cfg.netns.clone() },
            cfg,
            previous: PreviousRules::default(),
            udp: conntrack::UdpTracker::default(),
            synced_once: false,
            failed: false,
            canary_lost: false,
            last_full: None,
            buf: String::new(),
            filter_extra: String::new(),
            nat_extra: String::new(),
            splits: None,
            chunks: Vec::new(),
            nft: None,
            applies: 0,
            stale_resyncs: 0,
            stats: BackendStats::default(),
        }
    }

    pub fn config(&self) -> &IptablesConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }

    /// The argv of every restore.
    pub fn restore_argv(&self) -> [&str; 3] {
        [&self.cfg.restore_cmd, "--noflush", "--wait=5"]
    }

    /// The input of the last sync, assembled (for diagnostics and tests); the restores of a
    /// split full sync one after the other.
    pub fn last_restore_input(&self) -> String {
        self.restore_inputs().concat()
    }

    /// The input of every restore of the last sync, in order.
    pub fn restore_inputs(&self) -> Vec<String> {
        let mut out = self.chunks.clone();
        out.push(self.pieces().concat());
        out
    }

    /// Whether the restore command is iptables-nft: from its name, else from `--version`
    /// (remembered once it answered).
    fn is_nft(&mut self) -> bool {
        if let Some(nft) = self.nft {
            return nft;
        }
        if let Some(nft) = split::nft_by_name(&self.cfg.restore_cmd) {
            self.nft = Some(nft);
            return nft;
        }
        if self.cfg.dry_run {
            return false;
        }
        match probe(&self.cfg) {
            Ok(version) => {
                let nft = split::version_is_nft(&version);
                self.nft = Some(nft);
                nft
            }
            Err(error) => {
                tracing::warn!(%error, "cannot tell the iptables variant; full sync in one restore");
                false
            }
        }
    }

    fn pieces(&self) -> Vec<&str> {
        match &self.splits {
            Some(l) => {
                let mut pieces = Vec::with_capacity(l.filter.len() + l.nat.len() + 3);
                pieces.extend(l.filter.iter().map(|r| &self.buf[r.clone()]));
                pieces.push(self.filter_extra.as_str());
                pieces.extend(l.nat.iter().map(|r| &self.buf[r.clone()]));
                pieces.push(self.nat_extra.as_str());
                pieces.push(&self.buf[l.nat_commit..]);
                pieces
            }
            None => vec![&self.buf],
        }
    }

    /// Whether kpx's rules are still in the kernel: the canary rule in every table kpx
    /// programs. When one is gone (a table was flushed), the next sync is full. Nothing to check
    /// before the first sync or in a dry run.
    pub fn check_canary(&mut self) -> bool {
        let alive = self.canary_probe().is_none_or(|p| p.run());
        self.canary_checked(alive)
    }

    /// The canary check, to run without the agent's lock: `iptables -C` reads the whole table
    /// (0.7 s on iptables-legacy at 10k services). None when there is nothing to check.
    pub fn canary_probe(&self) -> Option<CanaryProbe> {
        (!self.cfg.dry_run && self.synced_once).then(|| CanaryProbe {
            cmd: self.cfg.iptables_cmd(),
            family: self.cfg.family,
            runner: self.runner.clone(),
        })
    }

    /// Records what a [`CanaryProbe`] found (the next sync is full when the canary is gone);
    /// returns ALIVE.
    pub fn canary_checked(&mut self, alive: bool) -> bool {
        if !alive {
            self.canary_lost = true;
        }
        alive
    }

    /// Whether the next sync will be full (for the agent's periodic resync).
    pub fn wants_full_sync(&self) -> bool {
        full_reason(self.inputs(false)).is_some()
    }

    fn inputs(&self, snapshot: bool) -> SyncInputs {
        SyncInputs {
            snapshot,
            synced_once: self.synced_once,
            failed_before: self.failed,
            canary_lost: self.canary_lost,
            since_full: self.last_full.map(|t| t.elapsed()),
            period: self.cfg.full_resync_period,
        }
    }

    /// Runs the chunks (if any), then the main input, stopping at the first failure.
    fn restore(&mut self, full: bool) -> Result<(), IptablesError> {
        let mut inputs: Vec<Vec<&str>> = self.chunks.iter().map(|c| vec![c.as_str()]).collect();
        inputs.push(self.pieces());
        inputs.retain(|pieces| pieces.iter().any(|p| !p.is_empty()));
        let bytes: usize = inputs.iter().flatten().map(|p| p.len()).sum();
        let rules: usize = inputs
            .iter()
            .flatten()
            .map(|p| p.lines().filter(|l| l.starts_with("-A ") || l.starts_with("-I ") || l.starts_with("-D ")).count())
            .sum();
        let restores = inputs.len();
        let span = DistSpan::child(
            "dp.iptables.restore",
            vec![
                Attr::new("restores", restores as i64),
                Attr::new("rules", rules as i64),
                Attr::new("bytes", bytes as i64),
                Attr::new("dry_run", self.cfg.dry_run),
            ],
        );
        let result = if self.cfg.dry_run {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let kind = if full { "full" } else { "partial" };
            for (i, pieces) in inputs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "# kpx dry-run: {:?} {kind} sync for {}, restore {} of {restores}",
                    self.cfg.family,
                    self.cfg.node_name,
                    i + 1
                );
                pieces.iter().for_each(|p| {
                    let _ = out.write_all(p.as_bytes());
                });
            }
            let _ = out.flush();
            Ok(())
        } else {
            let argv = self.restore_argv();
            inputs
                .iter()
                .try_for_each(|pieces| self.runner.run_ok(&argv, pieces).map(|_| ()).map_err(IptablesError::Restore))
        };
        if let Err(e) = &result {
            span.error(e.to_string());
        }
        self.stats.last_rules_written = rules;
        self.stats.last_bytes_written = bytes;
        self.stats.last_restores = restores;
        result
    }

    fn full_sync(&mut self, state: &AppliedState) -> Result<(), IptablesError> {
        let (saved_filter, saved_nat) = read_kernel(&self.cfg, &self.render, &self.runner)?;
        self.full_sync_over(state, saved_filter, saved_nat)
    }

    /// A full sync over the kernel's tables as read by [`read_kernel`].
    fn full_sync_over(
        &mut self,
        state: &AppliedState,
        saved_filter: SavedTable,
        saved_nat: SavedTable,
    ) -> Result<(), IptablesError> {
        let plan = self.prepare_full(state, &saved_filter, &saved_nat)?;
        // The kernel's tables as text, parsed: tens of MiB at 10k services, not needed now.
        drop((saved_filter, saved_nat));
        self.restore(true)?;
        self.release_large_inputs();
        let (filter, nat) = plan.rendered;
        self.stats.rules = RuleCounts { filter: filter + 1, nat: nat + 1 };
        self.previous = PreviousRules::from_state(state);
        self.stats.last_unchanged_chains = plan.unchanged;
        tracing::debug!(family = ?self.cfg.family, split = plan.split, unchanged = plan.unchanged, "full sync done");
        Ok(())
    }

    /// A full sync's input is tens of MiB at 10k services: once restored it is only kept when
    /// small (for `last_restore_input`, diagnostics and tests), so that the agent's memory
    /// follows the state, not the ruleset's text.
    fn release_large_inputs(&mut self) {
        const KEEP: usize = 8 << 20;
        if self.buf.capacity() + self.chunks.iter().map(String::capacity).sum::<usize>() > KEEP {
            self.buf = String::new();
            self.chunks = Vec::new();
            self.splits = None;
        }
    }

    /// The restore input(s) of a full sync over the tables `saved_filter` and `saved_nat`
    /// (pure: no I/O besides, on the first split, asking the restore tool its variant).
    fn prepare_full(
        &mut self,
        state: &AppliedState,
        saved_filter: &SavedTable,
        saved_nat: &SavedTable,
    ) -> Result<FullPlan, IptablesError> {
        let span = DistSpan::child("dp.iptables.render", vec![Attr::new("full", true)]);
        let skipped = render::render_full(&self.render, state, &mut self.buf);
        log_skipped(&skipped);
        let (filter, nat) = saved::count_rules(&self.buf);
        span.set(Attr::new("rules", (filter + nat) as i64));
        span.set(Attr::new("skipped", skipped.len() as i64));
        drop(span);
        let (f, _) = commits(&self.buf)?;
        let stale: Vec<String> = {
            let wanted = saved::declared_chains(&self.buf[f..], "nat");
            saved_nat.stale_service_chains(&wanted).into_iter().map(String::from).collect()
        };
        let nothing = SavedTable::default();
        let against = if self.cfg.skip_unchanged_chains { saved_nat } else { &nothing };
        let unchanged = unchanged::unchanged_chains(&self.buf[f..], against);
        self.chunks.clear();
        // Only the per-service chains can go in chunks; the top-level chains go in the main
        // restore whatever the split.
        let max = self.cfg.full_sync_chunk_rules;
        let to_write = unchanged.rendered_rules - unchanged.rules;
        let split = max > 0 && to_write > max && self.is_nft();
        if split {
            let mut first = String::new();
            split::first_restore(&self.buf, saved_nat, &mut first);
            self.chunks.push(first);
            // The whole rendering goes before the chunks are made: both are the size of the
            // ruleset (45 MiB at 10k services), and the agent's peak should hold only one.
            self.buf = split::keep_top_level(&self.buf);
            split::service_chunks(&self.render, state, max, &unchanged.chains, &mut self.chunks);
            tracing::debug!(family = ?self.cfg.family, restores = self.chunks.len() + 1, "full sync split");
        } else if !unchanged.chains.is_empty() {
            // Copied back to keep the buffer's capacity for the next render.
            let kept = unchanged::without_chains(&self.buf, &unchanged.chains);
            self.buf.clear();
            self.buf.push_str(&kept);
        }
        tracing::debug!(
            family = ?self.cfg.family,
            unchanged_chains = unchanged.chains.len(),
            unchanged_rules = unchanged.rules,
            "full sync leaves the chains the kernel already holds as rendered"
        );
        let (f, n) = commits(&self.buf)?;
        self.filter_extra.clear();
        jumps::canary_lines(&mut self.filter_extra);
        let added_filter =
            jumps::missing_jumps("filter", self.render.localnet_firewall(), saved_filter, &mut self.filter_extra);
        self.nat_extra.clear();
        jumps::canary_lines(&mut self.nat_extra);
        // Declaring a stale chain flushes it; once KUBE-SERVICES (rewritten above) and the
        // other stale chains no longer jump to it, it can go.
        for c in &stale {
            self.nat_extra.push_str(&format!(":{c} - [0:0]\n"));
        }
        let added_nat = jumps::missing_jumps("nat", self.render.localnet_firewall(), saved_nat, &mut self.nat_extra);
        for c in &stale {
            self.nat_extra.push_str(&format!("-X {c}\n"));
        }
        // One restore (legacy): its lines go out in iptables-save's order, which libiptc
        // restores faster (apply/order.rs); written from `buf` as it is, range by range.
        let (filter_order, nat_order) = match split {
            true => (std::iter::once(0..f).collect(), std::iter::once(f..n).collect()),
            false => (order::in_chain_order(&self.buf[..f], 0), order::in_chain_order(&self.buf[f..n], f)),
        };
        self.splits = Some(Layout { filter: filter_order, nat: nat_order, nat_commit: n });
        if added_filter + added_nat > 0 || !stale.is_empty() {
            tracing::info!(family = ?self.cfg.family, jumps_added = added_filter + added_nat, stale_chains = stale.len(), "full sync adopts the kernel's rules");
        }
        Ok(FullPlan { rendered: (filter, nat), split, unchanged: unchanged.chains.len() })
    }

    fn partial_sync(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), IptablesError> {
        let span = DistSpan::child(
            "dp.iptables.render",
            vec![Attr::new("full", false), Attr::new("services", changes.services.len() as i64)],
        );
        let skipped = render::render_partial(&self.render, state, changes, &self.previous, &mut self.buf);
        log_skipped(&skipped);
        span.set(Attr::new("bytes", self.buf.len() as i64));
        span.set(Attr::new("skipped", skipped.len() as i64));
        drop(span);
        self.splits = None;
        self.chunks.clear();
        self.stats.last_unchanged_chains = 0;
        self.restore(false)?;
        let mut rules = self.stats.rules;
        for k in &changes.services {
            rules = sub(rules, counts(&self.previous.rules_of(&self.render, k)));
        }
        self.previous.update(state, changes);
        for k in &changes.services {
            rules = add(rules, counts(&self.previous.rules_of(&self.render, k)));
        }
        self.stats.rules = rules;
        Ok(())
    }

    fn sync(
        &mut self,
        state: &AppliedState,
        changes: &ChangeSet,
        full: Option<FullReason>,
    ) -> Result<(), IptablesError> {
        self.applies += 1;
        self.sync_with(full, Instant::now(), |b| match full {
            Some(_) => b.full_sync(state),
            None => b.partial_sync(state, changes),
        })
    }

    /// Runs WORK, a sync (full when FULL names why) that started at STARTED, in a span, and
    /// records its outcome.
    fn sync_with(
        &mut self,
        full: Option<FullReason>,
        started: Instant,
        work: impl FnOnce(&mut Self) -> Result<(), IptablesError>,
    ) -> Result<(), IptablesError> {
        let mut attributes =
            vec![Attr::new("family", format!("{:?}", self.cfg.family)), Attr::new("full", full.is_some())];
        attributes.extend(full.map(|r| Attr::new("full_reason", format!("{r:?}"))));
        let span = DistSpan::child("dp.iptables.sync", attributes);
        let entered = span.enter();
        let result = work(self);
        drop(entered);
        if let Err(e) = &result {
            span.error(e.to_string());
        }
        span.set(Attr::new("rules_total", (self.stats.rules.filter + self.stats.rules.nat) as i64));
        drop(span);
        self.stats.last_sync_duration = Some(started.elapsed());
        self.stats.last_sync_full = full.is_some();
        match &result {
            Ok(()) => {
                if full.is_some() {
                    self.stats.full_syncs += 1;
                    self.stats.last_full_reason = full;
                    self.last_full = Some(started);
                    self.canary_lost = false;
                    self.stale_resyncs = 0;
                } else {
                    self.stats.partial_syncs += 1;
                }
                self.failed = false;
                self.stats.last_success = Some(SystemTime::now());
                self.stats.last_error = None;
            }
            Err(e) => {
                self.failed = true;
                self.stats.restore_failures += 1;
                self.stats.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// Deletes stale UDP conntrack entries for the services that changed (all on a full sync).
    fn clean_conntrack(&mut self, state: &AppliedState, changes: &ChangeSet, full: bool) {
        let deletes = self.udp.after_sync(self.cfg.family, state, changes, full, self.synced_once);
        if self.cfg.dry_run || deletes.is_empty() {
            return;
        }
        let _span = DistSpan::child("dp.conntrack", vec![Attr::new("deletes", deletes.len() as i64)]);
        self.stats.conntrack_deletes += conntrack::run_deletes(&self.runner, &deletes);
    }

    /// The full sync that is due, periodic included (the agent's housekeeping, under its lock).
    pub fn sync_due(&mut self, state: &AppliedState) -> Result<(), String> {
        let full = full_reason(self.inputs(false));
        self.apply_as(state, &ChangeSet::default(), full)
    }

    /// Syncs, retrying once as a full sync when the restore fails. The periodic resync is the
    /// agent's housekeeping's ([`IptablesBackend::sync_due`], or read outside the lock): an
    /// update due at the same time is not held up by it.
    fn apply_inner(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        let full = full_reason(self.inputs(changes.full)).filter(|r| *r != FullReason::Periodic);
        self.apply_as(state, changes, full)
    }

    fn apply_as(&mut self, state: &AppliedState, changes: &ChangeSet, full: Option<FullReason>) -> Result<(), String> {
        let result = match self.sync(state, changes, full) {
            Ok(()) => Ok(full.is_some()),
            Err(error) => {
                tracing::warn!(family = ?self.cfg.family, %error, "sync failed; retrying with a full sync");
                match self.sync(state, changes, Some(FullReason::AfterFailure)) {
                    Ok(()) => Ok(true),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let full = result?;
        self.clean_conntrack(state, changes, full);
        self.synced_once = true;
        tracing::debug!(
            family = ?self.cfg.family,
            full,
            duration = ?self.stats.last_sync_duration,
            bytes = self.stats.last_bytes_written,
            "iptables synced"
        );
        Ok(())
    }
}

impl Apply for IptablesBackend {
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        self.apply_inner(state, changes)
    }
}

/// A canary check taken from a backend (see [`IptablesBackend::canary_probe`]).
#[derive(Debug)]
pub struct CanaryProbe {
    cmd: String,
    family: IpFamily,
    runner: Runner,
}

impl CanaryProbe {
    /// Whether the canary rule is in every table kpx programs. A check that cannot run counts
    /// as gone: the next sync is then full, which finds out.
    pub fn run(&self) -> bool {
        for table in jumps::TABLES {
            let args = jumps::canary_check_args(table);
            let mut argv: Vec<&str> = vec![&self.cmd];
            argv.extend(args.iter().map(String::as_str));
            match self.runner.run(&argv, &[]) {
                Ok(r) if r.success => {}
                Ok(_) => {
                    tracing::warn!(family = ?self.family, table, "kpx canary is gone (table flushed?); next sync is full");
                    return false;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot check the kpx canary; next sync is full");
                    return false;
                }
            }
        }
        true
    }
}

/// What a full sync reads of the kernel: the built-in filter chains kpx jumps from and the
/// whole nat table (nothing in a dry run). Only reads: the periodic resync runs it without the
/// agent's lock (`apply/resync.rs`).
fn read_kernel(
    cfg: &IptablesConfig,
    render: &RenderConfig,
    runner: &Runner,
) -> Result<(SavedTable, SavedTable), IptablesError> {
    if cfg.dry_run {
        return Ok((SavedTable::default(), SavedTable::default()));
    }
    Ok((builtin_chains(cfg, render, runner, "filter")?, save(cfg, runner, "nat")?))
}

fn save(cfg: &IptablesConfig, runner: &Runner, table: &'static str) -> Result<SavedTable, IptablesError> {
    let ran =
        runner.run_ok(&[&cfg.save_cmd, "-t", table], &[]).map_err(|source| IptablesError::Save { table, source })?;
    Ok(SavedTable::parse(&ran.stdout))
}

/// The built-in chains of `table` that kpx jumps from (`iptables -S CHAIN` each): all a full
/// sync needs of the filter table, which holds no per-service chains. On iptables-nft,
/// `iptables-save -t filter` reads the whole ruleset, nat included (1.5 s at 10k services),
/// while listing one chain is immediate.
fn builtin_chains(
    cfg: &IptablesConfig,
    render: &RenderConfig,
    runner: &Runner,
    table: &'static str,
) -> Result<SavedTable, IptablesError> {
    let iptables = cfg.iptables_cmd();
    let mut text = String::new();
    let mut listed = Vec::new();
    for chain in jumps::jumps(render.localnet_firewall()).filter(|j| j.table == table).map(|j| j.chain) {
        if listed.contains(&chain) {
            continue;
        }
        listed.push(chain);
        let ran = runner
            .run_ok(&[&iptables, "-w", "5", "-t", table, "-S", chain], &[])
            .map_err(|source| IptablesError::Save { table, source })?;
        text.push_str(&ran.stdout);
    }
    Ok(SavedTable::parse(&text))
}

/// How a full sync's rendering is written to the restore: `filter` (ranges of `buf`, in write
/// order), the filter extras, `nat`, the nat extras, then `buf[nat_commit..]` (its COMMIT).
#[derive(Debug)]
struct Layout {
    filter: Vec<std::ops::Range<usize>>,
    nat: Vec<std::ops::Range<usize>>,
    nat_commit: usize,
}

/// What `prepare_full` decided, for the bookkeeping after the restore.
struct FullPlan {
    /// Rule lines of the whole rendered ruleset (filter, nat), whatever the restore writes.
    rendered: (usize, usize),
    /// Whether the per-service chains went in chunks of their own (iptables-nft).
    split: bool,
    /// Per-service chains left as they are.
    unchanged: usize,
}

/// Where the filter section ends (just after its COMMIT line) and where the nat COMMIT starts.
fn commits(buf: &str) -> Result<(usize, usize), IptablesError> {
    let f = buf.find("\nCOMMIT\n*nat\n").map(|i| i + 1).ok_or(IptablesError::Render("no filter COMMIT"))?;
    let n = buf.rfind("COMMIT\n").filter(|n| *n > f).ok_or(IptablesError::Render("no nat COMMIT"))?;
    Ok((f, n))
}

fn counts(r: &ServiceRules) -> RuleCounts {
    RuleCounts {
        filter: r.filter_lines.len(),
        nat: r.chains.iter().map(|(_, l)| l.len()).sum::<usize>() + r.services_lines.len() + r.nodeports_lines.len(),
    }
}

fn add(a: RuleCounts, b: RuleCounts) -> RuleCounts {
    RuleCounts { filter: a.filter + b.filter, nat: a.nat + b.nat }
}

fn sub(a: RuleCounts, b: RuleCounts) -> RuleCounts {
    RuleCounts { filter: a.filter.saturating_sub(b.filter), nat: a.nat.saturating_sub(b.nat) }
}

fn log_skipped(skipped: &[String]) {
    if !skipped.is_empty() {
        tracing::warn!(count = skipped.len(), first = ?&skipped[..skipped.len().min(5)], "parts of services left out of the rules");
    }
}

mod order;
mod resync;
pub use resync::{PreparedResync, ResyncJob};
mod split;
#[cfg(test)]
mod tests;
mod unchanged;
