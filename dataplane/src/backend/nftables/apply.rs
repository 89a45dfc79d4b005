//! The nftables backend's I/O: one netlink transaction per update, holding only what changed.
//!
//! - A **delta** (`delta.rs`) renders the changed services, diffs each against what the last
//!   sync installed for it and commits one transaction (for a one-endpoint change: its policy
//!   chain's ranges in an endpoint map, no rule, no chain). No dump, no process.
//! - A **full sync** (first sync, snapshot, after a failure, after foreign changes, every
//!   `full_resync_period`) dumps the table once and commits the difference between it and
//!   everything kpx wants: a restarted agent adopts the table it finds, and a table kpx would
//!   write identically is left alone. The periodic one is the agent's housekeeping's and is
//!   prepared outside the agent's lock (`apply/resync.rs`): updates never wait for its dump.
//! - **Foreign changes** are noticed cheaply: the ruleset generation id moves by exactly one per
//!   committed transaction, so after each of ours it must be the one before plus one; the agent's
//!   housekeeping calls [`NftBackend::check`] each sync period, which compares the generation
//!   and, only when it moved, dumps and repairs exactly what differs.
//! - A refused transaction changes nothing (nf_tables commits all or nothing): the update is
//!   retried once as a full sync, then NACKed, and the old rules keep working.
//! - After a change, stale UDP conntrack entries are deleted as the iptables backend does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use kpx_nft_netlink::consts::{NFPROTO_IPV4, NFPROTO_IPV6};
use kpx_nft_netlink::{NftClient, NftError};

mod delta;
mod resync;

pub use resync::{Finished, PreparedResync, ResyncJob};

use super::desired::{self, Pairs};
use super::endpoints::Slots;
use super::layout::{LElems, Lowered, Objects, TABLE, TABLE_COMMENT};
use super::owners::Owners;
use super::plan::{self, PlanStats};
use crate::backend::iptables::apply::{BackendStats, FullReason, RuleCounts};
use crate::backend::iptables::conntrack;
use crate::backend::iptables::exec::Runner;
use crate::backend::iptables::render::{IpFamily, RenderConfig};
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;
use kpx_telemetry::span::{Attr, DistSpan};

#[derive(Debug, Clone)]
pub struct NftConfig {
    pub family: IpFamily,
    pub cluster_cidr: Option<String>,
    pub masquerade_all: bool,
    pub node_ips: Vec<IpAddr>,
    pub node_name: String,
    pub full_resync_period: Duration,
    /// Tests only: program this network namespace (`ip netns` name).
    pub netns: Option<String>,
}

impl NftConfig {
    pub fn new(family: IpFamily, node_name: &str) -> NftConfig {
        NftConfig {
            family,
            cluster_cidr: None,
            masquerade_all: false,
            node_ips: Vec::new(),
            node_name: node_name.into(),
            full_resync_period: Duration::from_secs(3600),
            netns: None,
        }
    }

    pub fn render_config(&self) -> RenderConfig {
        RenderConfig {
            family: self.family,
            cluster_cidr: self.cluster_cidr.clone(),
            masquerade_all: self.masquerade_all,
            node_ips: self.node_ips.clone(),
            node_name: self.node_name.clone(),
            // kube-proxy's nftables mode has no localhost node ports (they need route_localnet,
            // which it leaves off); neither has this backend.
            localhost_node_ports: false,
        }
    }

    pub fn nfproto(&self) -> u8 {
        match self.family {
            IpFamily::V4 => NFPROTO_IPV4,
            IpFamily::V6 => NFPROTO_IPV6,
        }
    }

    /// A socket of its own (in the configured namespace).
    pub fn client(&self) -> Result<NftClient, NftError> {
        match &self.netns {
            Some(ns) => NftClient::in_netns(ns),
            None => NftClient::new(),
        }
    }
}

/// What the backend did.
#[derive(Debug, Clone, Default)]
pub struct NftStats {
    pub last_sync_duration: Option<Duration>,
    pub last_sync_full: bool,
    pub last_success: Option<SystemTime>,
    pub last_full_reason: Option<FullReason>,
    pub full_syncs: u64,
    pub partial_syncs: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// The last transaction: operations and bytes on the wire (0 when nothing differed).
    pub last_ops: usize,
    pub last_bytes: usize,
    pub last_plan: PlanStats,
    /// Objects kpx keeps in its table after the last successful sync.
    pub chains: usize,
    pub rules: usize,
    pub elements: usize,
    /// Checks that found the generation moved by someone else, and repairs they made.
    pub foreign_changes: u64,
    pub repairs: u64,
    pub conntrack_deletes: u64,
}

impl NftStats {
    /// The figures every backend reports (metrics, admin API), from this backend's.
    pub fn as_backend_stats(&self) -> BackendStats {
        let s = self;
        BackendStats {
            last_sync_duration: s.last_sync_duration,
            last_sync_full: s.last_sync_full,
            last_success: s.last_success,
            full_syncs: s.full_syncs,
            partial_syncs: s.partial_syncs,
            restore_failures: s.failures,
            last_error: s.last_error.clone(),
            last_rules_written: s.last_plan.rules_written,
            last_bytes_written: s.last_bytes,
            last_restores: usize::from(s.last_ops > 0),
            rules: RuleCounts { filter: 0, nat: s.rules },
            conntrack_deletes: s.conntrack_deletes,
            last_full_reason: s.last_full_reason,
            ..Default::default()
        }
    }
}

pub struct NftBackend {
    cfg: NftConfig,
    render: RenderConfig,
    client: NftClient,
    /// What the last successful sync installed, per service (hairpin pairs apart).
    services: BTreeMap<String, Lowered>,
    service_pairs: BTreeMap<String, LElems>,
    /// Which service a shared-map element belongs to (two services claiming one key: the
    /// first keeps it).
    owners: Owners,
    /// How many services want each hairpin pair.
    pairs: Pairs,
    /// Each policy chain's range in an endpoint map, and the endpoint maps the table has.
    slots: Slots,
    maps: BTreeSet<String>,
    /// The generation kpx's last transaction left, shared by the backends of one network
    /// namespace (IPv4 and IPv6 commit to the same ruleset); None: unknown.
    gen_id: SharedGen,
    synced_once: bool,
    failed: bool,
    foreign: bool,
    last_full: Option<Instant>,
    /// Syncs attempted (a prepared resync is stale once another ran), and periodic resyncs
    /// prepared in a row that went stale.
    applies: u64,
    stale_resyncs: u32,
    udp: conntrack::UdpTracker,
    runner: Runner,
    stats: NftStats,
}

impl std::fmt::Debug for NftBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftBackend").field("cfg", &self.cfg).field("stats", &self.stats).finish()
    }
}

impl NftBackend {
    /// Opens the netlink socket: [`NftError::Unavailable`] without nf_tables or permission.
    pub fn new(cfg: NftConfig) -> Result<NftBackend, NftError> {
        let client = cfg.client()?;
        let render = cfg.render_config();
        Ok(NftBackend {
            runner: Runner { netns: cfg.netns.clone() },
            cfg,
            render,
            client,
            services: BTreeMap::new(),
            service_pairs: BTreeMap::new(),
            owners: Owners::default(),
            pairs: Pairs::new(),
            slots: Slots::default(),
            maps: BTreeSet::new(),
            gen_id: SharedGen::default(),
            synced_once: false,
            failed: false,
            foreign: false,
            last_full: None,
            applies: 0,
            stale_resyncs: 0,
            udp: conntrack::UdpTracker::default(),
            stats: NftStats::default(),
        })
    }

    /// Shares the generation with another family's backend in the same namespace, so that
    /// neither takes the other's transactions for foreign changes.
    pub fn share_generation(&mut self, other: &NftBackend) {
        self.gen_id = other.gen_id.clone();
    }

    fn known_gen(&self) -> Option<u32> {
        *self.gen_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_gen(&self, g: Option<u32>) {
        *self.gen_id.lock().unwrap_or_else(|e| e.into_inner()) = g;
    }

    pub fn config(&self) -> &NftConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &NftStats {
        &self.stats
    }

    /// The stats in the iptables backend's shape, for the agent's metrics.
    pub fn backend_stats(&self) -> BackendStats {
        self.stats.as_backend_stats()
    }

    /// Everything kpx wants for `state`, as objects (for the admin API and tests).
    pub fn desired(&self, state: &AppliedState) -> Objects {
        desired::desired_objects(&self.render, state, &mut self.slots.clone()).0
    }

    fn full_reason(&self, snapshot: bool) -> Option<FullReason> {
        if !self.synced_once {
            Some(FullReason::FirstSync)
        } else if self.failed {
            Some(FullReason::AfterFailure)
        } else if self.foreign {
            Some(FullReason::CanaryLost)
        } else if snapshot {
            Some(FullReason::Snapshot)
        } else if self.last_full.is_none_or(|t| t.elapsed() >= self.cfg.full_resync_period) {
            Some(FullReason::Periodic)
        } else {
            None
        }
    }

    /// Whether the next sync will be full (for the agent's periodic resync).
    pub fn wants_full_sync(&self) -> bool {
        self.synced_once && self.full_reason(false).is_some()
    }

    /// The cheap foreign-change check: the generation id. When someone else committed since our
    /// last transaction, the next sync (the agent runs it at once) dumps and repairs. Returns
    /// whether the table is as kpx left it, as far as the generation tells.
    pub fn check(&mut self) -> bool {
        if !self.synced_once {
            return true;
        }
        match self.client.gen_id() {
            Ok(g) if Some(g) == self.known_gen() => true,
            Ok(g) => {
                tracing::debug!(family = ?self.cfg.family, was = ?self.known_gen(), now = g, "nftables ruleset changed by someone else; checking kpx's table");
                self.stats.foreign_changes += 1;
                self.foreign = true;
                false
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the nftables generation; next sync is full");
                self.foreign = true;
                false
            }
        }
    }

    /// After our commit: the generation must have moved by exactly one.
    fn record_gen(&mut self, before: Option<u32>, committed: bool) {
        match self.client.gen_id() {
            Ok(g) => {
                let expected = before.map(|b| if committed { b.wrapping_add(1) } else { b });
                if self.synced_once && expected.is_some_and(|e| e != g) {
                    self.foreign = true;
                }
                self.set_gen(Some(g));
            }
            Err(_) => self.set_gen(None),
        }
    }

    fn full_sync(&mut self, state: &AppliedState) -> Result<PlanStats, NftError> {
        let before = self.known_gen();
        let prepared = PreparedFull::new(&mut self.client, &self.cfg, &self.render, state)?;
        self.install_full(prepared, before).map(|(stats, _)| stats)
    }

    /// Commits a prepared full sync and keeps what it installed. BEFORE: the generation the
    /// transaction starts from. Returns the plan's figures and what the sync replaced, for the
    /// caller to free (see [`Leftovers`]).
    fn install_full(&mut self, p: PreparedFull, before: Option<u32>) -> Result<(PlanStats, Leftovers), NftError> {
        let PreparedFull { dumped, batch, stats, mut slots, rendered: mut r } = p;
        if dumped && self.synced_once && !stats.is_empty() {
            self.stats.repairs += 1;
            tracing::warn!(family = ?self.cfg.family, repaired = %stats.describe(), "nftables: kpx's table differed from what kpx wants; repaired");
        }
        let committed = !batch.is_empty();
        self.commit(batch)?;
        slots.settle();
        self.maps = slots.maps();
        self.slots = slots;
        let old = (
            std::mem::replace(&mut self.services, std::mem::take(&mut r.services)),
            std::mem::replace(&mut self.service_pairs, std::mem::take(&mut r.service_pairs)),
            std::mem::replace(&mut self.owners, std::mem::take(&mut r.owners)),
            std::mem::replace(&mut self.pairs, std::mem::take(&mut r.pairs)),
        );
        self.record_gen(before, committed);
        self.foreign = false;
        self.stale_resyncs = 0;
        self.count(&r.desired);
        Ok((stats, Leftovers(Box::new((old, r)))))
    }

    fn commit(&mut self, batch: kpx_nft_netlink::Batch) -> Result<(), NftError> {
        let ops = batch.ops;
        let span = DistSpan::child("dp.nftables.transaction", vec![Attr::new("ops", ops as i64)]);
        let result = self.client.commit(batch);
        self.stats.last_ops = ops;
        self.stats.last_bytes = if ops == 0 { 0 } else { self.client.stats.last_bytes };
        span.set(Attr::new("bytes", self.stats.last_bytes as i64));
        if let Err(e) = &result {
            span.error(e.to_string());
        }
        result
    }

    fn count(&mut self, desired: &Lowered) {
        self.stats.chains = desired.chains.len();
        self.stats.rules = desired.chains.values().map(|c| c.rules.len()).sum();
        self.stats.elements = desired.elements.values().map(|e| e.len()).sum();
    }

    fn sync(&mut self, state: &AppliedState, changes: &ChangeSet, full: Option<FullReason>) -> Result<(), NftError> {
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
        work: impl FnOnce(&mut Self) -> Result<PlanStats, NftError>,
    ) -> Result<(), NftError> {
        let mut attrs = vec![Attr::new("family", format!("{:?}", self.cfg.family)), Attr::new("full", full.is_some())];
        attrs.extend(full.map(|r| Attr::new("full_reason", format!("{r:?}"))));
        let span = DistSpan::child("dp.nftables.sync", attrs);
        let entered = span.enter();
        let result = work(self);
        drop(entered);
        self.stats.last_sync_duration = Some(started.elapsed());
        self.stats.last_sync_full = full.is_some();
        match result {
            Ok(st) => {
                self.stats.last_plan = st;
                if full.is_some() {
                    self.stats.full_syncs += 1;
                    self.stats.last_full_reason = full;
                    self.last_full = Some(started);
                } else {
                    self.stats.partial_syncs += 1;
                }
                self.failed = false;
                self.stats.last_success = Some(SystemTime::now());
                self.stats.last_error = None;
                Ok(())
            }
            Err(e) => {
                span.error(e.to_string());
                self.failed = true;
                self.stats.failures += 1;
                self.stats.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Deletes stale UDP conntrack entries for the services that changed (all on a full sync).
    fn clean_conntrack(&mut self, state: &AppliedState, changes: &ChangeSet, full: bool) {
        let deletes = self.udp.after_sync(self.cfg.family, state, changes, full, self.synced_once);
        self.stats.conntrack_deletes += conntrack::run_deletes(&self.runner, &deletes);
    }
}

impl Apply for NftBackend {
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        // The periodic resync is the agent's housekeeping's ([`NftBackend::sync_due`], or
        // prepared outside the lock): an update due at the same time is not held up by it.
        let full = self.full_reason(changes.full).filter(|r| *r != FullReason::Periodic);
        self.apply_as(state, changes, full)
    }
}

impl NftBackend {
    /// The full sync that is due, periodic included (the agent's housekeeping, under its lock).
    pub fn sync_due(&mut self, state: &AppliedState) -> Result<(), String> {
        let full = self.full_reason(false);
        self.apply_as(state, &ChangeSet::default(), full)
    }

    fn apply_as(&mut self, state: &AppliedState, changes: &ChangeSet, full: Option<FullReason>) -> Result<(), String> {
        let full = match self.sync(state, changes, full) {
            Ok(()) => full.is_some(),
            Err(error) => {
                tracing::warn!(family = ?self.cfg.family, %error, "nftables transaction refused; retrying as a full sync");
                self.sync(state, changes, Some(FullReason::AfterFailure)).map_err(|e| e.to_string())?;
                true
            }
        };
        self.clean_conntrack(state, changes, full);
        self.synced_once = true;
        tracing::debug!(family = ?self.cfg.family, full, ops = self.stats.last_ops, bytes = self.stats.last_bytes, "nftables synced");
        Ok(())
    }
}

/// What a full sync replaced and the whole table as rendered: at 44,000 services freeing it
/// takes 0.17 s (measured in benches/nftables.rs), which the periodic resync does after the
/// agent's lock.
pub struct Leftovers(#[allow(dead_code)] Box<dyn std::any::Any + Send>);

/// A full sync up to its transaction: the table dumped, everything rendered, the difference
/// planned. Made with any socket (the periodic resync makes it outside the agent's lock with
/// one of its own, see `resync.rs`); the transaction is not tied to the socket that numbered it.
struct PreparedFull {
    /// Whether the table existed (a difference then is a repair).
    dumped: bool,
    batch: kpx_nft_netlink::Batch,
    stats: PlanStats,
    slots: Slots,
    rendered: desired::Rendered,
}

impl PreparedFull {
    fn new(
        client: &mut NftClient,
        cfg: &NftConfig,
        render: &RenderConfig,
        state: &AppliedState,
    ) -> Result<PreparedFull, NftError> {
        let kernel = client.dump_table(cfg.nfproto(), TABLE)?;
        // The policy chains keep the ranges the table gives them: a restarted agent rewrites
        // nothing.
        let mut slots = kernel.as_ref().map(Slots::from_dump).unwrap_or_default();
        let rendered = desired::render_all(render, state, &mut slots);
        log_skipped(&rendered.skipped);
        let mut batch = client.batch(cfg.nfproto(), TABLE);
        let old = match &kernel {
            Some(d) => plan::from_dump(d),
            None => {
                batch.add_table(TABLE_COMMENT);
                Lowered::default()
            }
        };
        let stats = plan::plan(&old, &rendered.desired, &mut batch);
        Ok(PreparedFull { dumped: kernel.is_some(), batch, stats, slots, rendered })
    }
}

type SharedGen = std::sync::Arc<std::sync::Mutex<Option<u32>>>;

fn log_skipped(skipped: &[String]) {
    if !skipped.is_empty() {
        tracing::warn!(count = skipped.len(), first = ?&skipped[..skipped.len().min(5)], "parts of services left out of the nftables rules");
    }
}
