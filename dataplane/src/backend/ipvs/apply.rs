//! The I/O half of the ipvs backend. The kernel's table is dumped once (adopting whatever a
//! previous run left, never flushing), then kept as a model that each successful operation
//! updates, so an update costs only the operations its plan needs. A delta (a `ChangeSet` that is
//! not full) recomputes only the services it names and plans, drains and rewrites ipset members for
//! their virtual servers alone ([`plan::update_desired`]); snapshots, the first sync, syncs after a
//! failure and reconciles compare the whole table. A fresh dump replaces the
//! model every reconcile period and after any failure, which repairs drift (a virtual server
//! deleted by hand comes back). Real servers that drain have their counters re-read on every
//! sync and tick until they can be deleted.
//!
//! Commands (`ip`, `ipset`, iptables-restore) run with argv and stdin only, never a shell.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kpx_ipvs_netlink::{Family, IpvsClient, IpvsError};

use super::companion;
use super::host::{self, node_addresses, set_sysctls, working_restore_cmd};
use super::plan::{self, Desired, Index, Key, Op, PlanConfig, Table, Update};
use crate::backend::iptables::exec::Runner;
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;
use kpx_telemetry::span::{Attr, DistSpan};

#[derive(Debug, Clone)]
pub struct IpvsConfig {
    pub node_name: String,
    /// rr (default), lc, dh, sh, sed, nq, wrr or mh.
    pub scheduler: String,
    /// Addresses that accept NodePorts.
    pub node_ips: Vec<IpAddr>,
    pub families: Vec<Family>,
    /// The pod CIDR(s): ClusterIP traffic from outside them is masqueraded.
    pub cluster_cidrs: Vec<String>,
    pub masquerade_all: bool,
    /// The dummy interface holding the VIPs.
    pub interface: String,
    /// A fresh dump (and rewrite of the companion rules) this often.
    pub reconcile_period: Duration,
    /// The IPv4 restore tool; the IPv6 one is derived ("iptables-legacy-restore" ->
    /// "ip6tables-legacy-restore").
    pub restore_cmd: String,
    /// Set the sysctls IPVS needs (vs.conntrack and friends); tests on a throwaway kernel only.
    pub sysctls: bool,
    /// arp_ignore=1/arp_announce=2 (kube-proxy's ipvs.strictARP, off by default as there).
    pub strict_arp: bool,
    /// IPVS timeouts set at startup: TCP, TCP after FIN, UDP; zero leaves the kernel's.
    pub timeouts: [Duration; 3],
    /// Virtual servers in these CIDRs are never deleted (kube-proxy's ipvs.excludeCIDRs).
    pub exclude_cidrs: Vec<String>,
}

impl IpvsConfig {
    pub fn new(node_name: &str) -> IpvsConfig {
        IpvsConfig {
            node_name: node_name.to_string(),
            scheduler: "rr".into(),
            node_ips: Vec::new(),
            families: vec![Family::Inet],
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            interface: "kube-ipvs0".into(),
            reconcile_period: Duration::from_secs(30),
            restore_cmd: "iptables-restore".into(),
            sysctls: true,
            strict_arp: false,
            timeouts: [Duration::ZERO; 3],
            exclude_cidrs: Vec::new(),
        }
    }

    pub fn plan_config(&self) -> PlanConfig {
        PlanConfig {
            scheduler: self.scheduler.clone(),
            node_ips: self.node_ips.clone(),
            families: self.families.clone(),
            node_tag: kpx_proto::node_tag(&self.node_name),
        }
    }

    fn restore_cmd(&self, family: Family) -> String {
        match family {
            Family::Inet => self.restore_cmd.clone(),
            Family::Inet6 => self.restore_cmd.replacen("iptables", "ip6tables", 1),
        }
    }
}

/// Figures for logs, metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct IpvsStats {
    pub syncs: u64,
    /// Operations (add/update/delete service or destination) sent, all syncs.
    pub ops: u64,
    /// Operations of the last sync (the drain step included).
    pub last_ops: usize,
    pub dumps: u64,
    pub reconciles: u64,
    /// Netlink messages sent, dumps and family resolution included.
    pub messages: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Real servers at weight 0 waiting for their connections to end.
    pub draining: usize,
    /// `conntrack -D` runs for removed UDP real servers.
    pub conntrack_deletes: u64,
    /// Syncs that planned only the services a delta changed (the rest compared the whole table).
    pub partial_syncs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    #[error(transparent)]
    Exec(#[from] crate::backend::iptables::exec::ExecError),
}

pub struct IpvsBackend {
    cfg: IpvsConfig,
    client: IpvsClient,
    runner: Runner,
    table: Table,
    /// `table` came from a dump and every operation since succeeded.
    dumped: bool,
    desired: Option<Desired>,
    /// Which service produced which part of `desired`, for updates of a few services.
    index: Index,
    /// The virtual servers with real servers that drain.
    draining: BTreeSet<Key>,
    /// Every VIP kpx ever programmed or found on its interface: virtual servers on them are kpx's.
    owned: BTreeSet<IpAddr>,
    /// The interface's addresses (read at the first sync and each reconcile).
    addrs: Option<BTreeSet<IpAddr>>,
    /// The companion rules as last written, per family; empty means "write them all".
    companion: Vec<Written>,
    last_reconcile: Instant,
    stats: IpvsStats,
}

impl std::fmt::Debug for IpvsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsBackend").field("cfg", &self.cfg).field("stats", &self.stats).finish()
    }
}

impl IpvsBackend {
    /// Opens the IPVS netlink socket: [`IpvsError::Unavailable`] without IPVS in the kernel.
    /// Without configured node addresses, NodePorts go on every address the node has now
    /// (`ip -o addr`, less loopback, link-local and the VIP interface), read once here.
    pub fn new(mut cfg: IpvsConfig) -> Result<IpvsBackend, IpvsError> {
        let mut client = IpvsClient::new()?;
        if cfg.timeouts.iter().any(|t| !t.is_zero()) {
            // As kube-proxy at startup; 0 leaves that timeout as the kernel has it.
            let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
            let [tcp, tcp_fin, udp] = cfg.timeouts.map(secs);
            client.set_timeouts(&kpx_ipvs_netlink::Timeouts { tcp, tcp_fin, udp })?;
            tracing::info!(tcp, tcp_fin, udp, "ipvs timeouts set (seconds; 0: unchanged)");
        }
        if cfg.node_ips.is_empty() {
            let ran = Runner::default().run(&["ip", "-o", "addr", "show"], &[]);
            let out = ran.map(|r| r.stdout).unwrap_or_default();
            cfg.node_ips = node_addresses(&out, &cfg.interface)
                .into_iter()
                .filter(|ip| cfg.families.contains(&Family::of(*ip)))
                .collect();
            tracing::info!(node_ips = ?cfg.node_ips, "ipvs: NodePorts on the node's addresses");
        }
        cfg.restore_cmd = working_restore_cmd(&cfg.restore_cmd);
        Ok(IpvsBackend {
            cfg,
            client,
            runner: Runner::default(),
            table: Table::new(),
            dumped: false,
            desired: None,
            index: Index::default(),
            draining: BTreeSet::new(),
            owned: BTreeSet::new(),
            addrs: None,
            companion: Vec::new(),
            last_reconcile: Instant::now(),
            stats: IpvsStats::default(),
        })
    }

    pub fn config(&self) -> &IpvsConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &IpvsStats {
        &self.stats
    }

    /// The model of the kernel's table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Makes the kernel match `desired`, comparing the whole table.
    pub fn sync(&mut self, desired: Desired) -> Result<(), String> {
        self.stats.syncs += 1;
        let result = self.try_sync(&desired);
        self.desired = Some(desired);
        self.finish(result)
    }

    /// Makes the kernel match `desired`, which differs from the last synced state only in what
    /// `up` names (see [`plan::update_desired`]): plans, drains and rewrites ipset members for
    /// those virtual servers (and the draining ones) alone.
    fn sync_update(&mut self, desired: Desired, up: Update) -> Result<(), String> {
        self.stats.syncs += 1;
        self.stats.partial_syncs += 1;
        let result = self.try_sync_update(&desired, &up);
        self.desired = Some(desired);
        self.finish(result)
    }

    /// The last sync left an exact model of the kernel (table, addresses, companion sets), so
    /// an update can be planned against it alone.
    fn can_update(&self) -> bool {
        self.desired.is_some()
            && self.dumped
            && self.addrs.is_some()
            && self.stats.last_error.is_none()
            && self.companion.len() == self.cfg.families.len()
    }

    fn finish(&mut self, result: Result<(), SyncError>) -> Result<(), String> {
        self.stats.messages = self.client.messages_sent();
        match result {
            Ok(()) => {
                self.stats.last_error = None;
                Ok(())
            }
            Err(e) => {
                // The model may be wrong now: dump again next time, rewrite the rules.
                self.dumped = false;
                self.companion.clear();
                self.stats.failures += 1;
                let msg = e.to_string();
                tracing::warn!(node = %self.cfg.node_name, error = %msg, "ipvs sync failed");
                self.stats.last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// A fresh dump of the table and the interface, the rules rewritten, and the last desired
    /// state applied again: repairs whatever someone changed behind kpx's back.
    pub fn reconcile(&mut self) -> Result<(), String> {
        self.stats.reconciles += 1;
        self.dumped = false;
        self.addrs = None;
        self.companion.clear();
        self.last_reconcile = Instant::now();
        match self.desired.take() {
            Some(d) => self.sync(d),
            None => Ok(()),
        }
    }

    /// Periodic work: the reconcile when it is due, else the drain check when something drains.
    pub fn tick(&mut self) -> Result<(), String> {
        if self.desired.is_none() {
            return Ok(());
        }
        if self.last_reconcile.elapsed() >= self.cfg.reconcile_period {
            return self.reconcile();
        }
        if self.stats.draining > 0 {
            let partial = self.can_update();
            let d = self.desired.take().unwrap_or_default();
            return if partial { self.sync_update(d, Update::default()) } else { self.sync(d) };
        }
        Ok(())
    }

    fn try_sync(&mut self, desired: &Desired) -> Result<(), SyncError> {
        if self.addrs.is_none() {
            self.setup_interface()?;
        }
        if !self.dumped {
            self.dump()?;
        }
        self.owned.extend(desired.vips.iter().copied());
        let addrs = self.addrs.clone().unwrap_or_default();
        self.set_addresses(desired.vips.difference(&addrs).copied().collect(), "add")?;

        let mut ops = self.plan(desired);
        self.execute(&ops)?;
        let draining = plan::draining(desired, &self.table);
        self.drain(desired, draining, &mut ops)?;
        self.clear_udp_conntrack(&ops);

        let stale: Vec<IpAddr> = addrs.difference(&desired.vips).copied().collect();
        self.set_addresses(stale, "del")?;
        self.addrs = Some(desired.vips.clone());
        self.write_companion(desired)?;
        if !ops.is_empty() {
            tracing::debug!(node = %self.cfg.node_name, ops = ops.len(), "ipvs synced");
        }
        Ok(())
    }

    fn try_sync_update(&mut self, desired: &Desired, up: &Update) -> Result<(), SyncError> {
        self.owned.extend(up.vips_added.iter().copied());
        let mut addrs = self.addrs.take().unwrap_or_default();
        self.set_addresses(up.vips_added.iter().filter(|ip| !addrs.contains(ip)).copied().collect(), "add")?;
        addrs.extend(up.vips_added.iter().copied());
        self.addrs = Some(addrs);

        let keys: BTreeSet<Key> = up.touched.union(&self.draining).copied().collect();
        let (owned, cfg) = (&self.owned, &self.cfg);
        let mut ops = plan::plan_keys(desired, &self.table, &keys, |k: &Key| owns(owned, cfg, k));
        self.execute(&ops)?;
        let draining = plan::draining_among(desired, &self.table, &keys);
        self.drain(desired, draining, &mut ops)?;
        self.clear_udp_conntrack(&ops);

        let mut addrs = self.addrs.take().unwrap_or_default();
        let stale: Vec<IpAddr> = up.vips_removed.iter().filter(|ip| addrs.contains(ip)).copied().collect();
        self.set_addresses(stale, "del")?;
        up.vips_removed.iter().for_each(|ip| {
            addrs.remove(ip);
        });
        self.addrs = Some(addrs);

        for i in 0..self.companion.len() {
            let w = &mut self.companion[i];
            let old = up.old.iter().map(|(k, s)| (k, s));
            let new = up.touched.iter().filter_map(|k| desired.services.get_key_value(k));
            let delta = companion::update_members(w.family, &mut w.members, old, new);
            if !delta.is_empty() {
                self.runner.run_ok(&["ipset", "restore"], &[&delta])?;
            }
            // kube-proxy writes a set's rule only while the set has members: a set that filled
            // or emptied changes the rules.
            let nat = self.companion_rules(self.companion[i].family, &self.companion[i].members);
            if nat != self.companion[i].nat {
                self.runner
                    .run_ok(&[&self.cfg.restore_cmd(self.companion[i].family), "--noflush", "-w", "5"], &[&nat])?;
                self.companion[i].nat = nat;
            }
        }
        if !ops.is_empty() {
            tracing::debug!(node = %self.cfg.node_name, ops = ops.len(), services = up.touched.len(), "ipvs updated");
        }
        Ok(())
    }

    /// Draining real servers among `draining`'s virtual servers: fresh counters, then the
    /// drained ones deleted; records what still drains and the sync's operation count.
    fn drain(&mut self, desired: &Desired, draining: Vec<Key>, ops: &mut Vec<Op>) -> Result<(), SyncError> {
        let keys: BTreeSet<Key> = draining.into_iter().collect();
        if !keys.is_empty() {
            self.refresh(&keys)?;
            let (owned, cfg) = (&self.owned, &self.cfg);
            let more: Vec<Op> = plan::plan_keys(desired, &self.table, &keys, |k: &Key| owns(owned, cfg, k))
                .into_iter()
                .filter(|op| matches!(op, Op::DeleteDest(..)))
                .collect();
            self.execute(&more)?;
            ops.extend(more);
        }
        self.draining = plan::draining_among(desired, &self.table, &keys).into_iter().collect();
        self.stats.draining = self
            .draining
            .iter()
            .map(|k| self.table[k].dests.keys().filter(|a| !desired.services[k].dests.contains_key(a)).count())
            .sum();
        self.stats.last_ops = ops.len();
        Ok(())
    }

    fn plan(&self, desired: &Desired) -> Vec<Op> {
        let (owned, cfg) = (&self.owned, &self.cfg);
        plan::plan(desired, &self.table, |k: &Key| owns(owned, cfg, k))
    }

    fn execute(&mut self, ops: &[Op]) -> Result<(), SyncError> {
        if ops.is_empty() {
            return Ok(());
        }
        let span = DistSpan::child("dp.ipvs.netlink", vec![Attr::new("ops", ops.len() as i64)]);
        let result = self.execute_ops(ops);
        if let Err(e) = &result {
            span.error(e.to_string());
        }
        result
    }

    fn execute_ops(&mut self, ops: &[Op]) -> Result<(), SyncError> {
        for op in ops {
            let c = &mut self.client;
            match op {
                Op::AddService(s) => c.add_service(s),
                Op::UpdateService(s) => c.update_service(s),
                Op::DeleteService(s) => c.delete_service(s),
                Op::AddDest(s, d) => c.add_destination(s, d),
                Op::UpdateDest(s, d) => c.update_destination(s, d),
                Op::DeleteDest(s, d) => c.delete_destination(s, d),
            }?;
            plan::record(&mut self.table, op);
            self.stats.ops += 1;
        }
        Ok(())
    }

    /// Best effort: a missing conntrack tool or a failed deletion is logged, not a failed sync.
    fn clear_udp_conntrack(&mut self, ops: &[Op]) {
        let deletes = plan::udp_conntrack_cleanups(ops);
        self.stats.conntrack_deletes += crate::backend::iptables::conntrack::run_deletes(&self.runner, &deletes);
    }

    fn dump(&mut self) -> Result<(), SyncError> {
        let services = self.client.services()?;
        let mut dump = Vec::with_capacity(services.len());
        for s in services {
            let dests = if s.service.fwmark.is_none() { self.client.destinations(&s.service)? } else { Vec::new() };
            dump.push((s, dests));
        }
        self.table = plan::table_from(dump);
        self.dumped = true;
        self.stats.dumps += 1;
        Ok(())
    }

    fn refresh(&mut self, keys: &BTreeSet<Key>) -> Result<(), SyncError> {
        for key in keys {
            let Some(k) = self.table.get(key) else { continue };
            let dests = self.client.destinations(&k.service.clone())?;
            if let Some(k) = self.table.get_mut(key) {
                k.dests = dests.into_iter().map(|d| (d.dest.socket_addr(), d)).collect();
            }
        }
        Ok(())
    }

    /// Creates the dummy interface if needed, reads its addresses (all of them are kpx's) and
    /// sets the sysctls.
    fn setup_interface(&mut self) -> Result<(), SyncError> {
        let dev = self.cfg.interface.as_str();
        if !self.runner.run(&["ip", "link", "show", "dev", dev], &[])?.success {
            self.runner.run_ok(&["ip", "link", "add", dev, "type", "dummy"], &[])?;
        }
        self.runner.run_ok(&["ip", "link", "set", dev, "up"], &[])?;
        let out = self.runner.run_ok(&["ip", "-o", "addr", "show", "dev", dev], &[])?.stdout;
        let addrs: BTreeSet<IpAddr> = out
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace().skip_while(|w| *w != "inet" && *w != "inet6");
                words.next()?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .filter(|ip: &IpAddr| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
            .collect();
        self.owned.extend(addrs.iter().copied());
        self.addrs = Some(addrs);
        if self.cfg.sysctls {
            set_sysctls(self.cfg.strict_arp);
        }
        Ok(())
    }

    /// `ip addr add|del` for each address, in one `ip -batch -`.
    fn set_addresses(&self, addrs: Vec<IpAddr>, verb: &str) -> Result<(), SyncError> {
        if addrs.is_empty() {
            return Ok(());
        }
        let dev = &self.cfg.interface;
        let lines: Vec<String> = addrs
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(_) => format!("addr {verb} {ip}/32 dev {dev}\n"),
                IpAddr::V6(_) if verb == "add" => format!("addr {verb} {ip}/128 dev {dev} nodad\n"),
                IpAddr::V6(_) => format!("addr {verb} {ip}/128 dev {dev}\n"),
            })
            .collect();
        let stdin: Vec<&str> = lines.iter().map(String::as_str).collect();
        self.runner.run_ok(&["ip", "-force", "-batch", "-"], &stdin)?;
        Ok(())
    }

    /// The companion rules of `family` for these set members.
    fn companion_rules(&self, family: Family, members: &companion::Members) -> String {
        let cidr = self.cfg.cluster_cidrs.iter().find(|c| {
            c.split('/').next().and_then(|ip| ip.parse::<IpAddr>().ok()).is_some_and(|ip| Family::of(ip) == family)
        });
        companion::render_rules(family, cidr.map(String::as_str), self.cfg.masquerade_all, members)
    }

    /// ipsets then rules, per family: the first time (and after a failure or reconcile) all of
    /// them with the jumps ensured, afterwards only the ipset members that changed.
    fn write_companion(&mut self, desired: &Desired) -> Result<(), SyncError> {
        for family in self.cfg.families.clone() {
            let members = companion::members(family, desired);
            let nat = self.companion_rules(family, &members);
            let before = self.companion.iter().position(|c| c.family == family).map(|i| self.companion.remove(i));
            if let Some(before) = before.filter(|b| b.nat == nat) {
                let delta = companion::render_ipset_delta(&before.members, &members);
                if !delta.is_empty() {
                    self.runner.run_ok(&["ipset", "restore"], &[&delta])?;
                }
                self.companion.push(Written { family, members, nat });
                continue;
            }
            self.runner.run_ok(&["ipset", "restore"], &[&companion::render_ipsets(family, &members)])?;
            let restore = self.cfg.restore_cmd(family);
            self.runner.run_ok(&[&restore, "--noflush", "-w", "5"], &[&nat])?;
            let iptables = restore.replacen("-restore", "", 1);
            // Each missing jump goes first in its chain: inserted last to first, they keep the
            // list's order.
            for (table, chain, comment, target) in companion::JUMPS.iter().rev().copied() {
                let rule = ["-t", table, "-m", "comment", "--comment", comment, "-j", target];
                let check: Vec<&str> = [iptables.as_str(), "-w", "5", "-C", chain].into_iter().chain(rule).collect();
                if !self.runner.run(&check, &[])?.success {
                    let insert: Vec<&str> =
                        [iptables.as_str(), "-w", "5", "-I", chain].into_iter().chain(rule).collect();
                    self.runner.run_ok(&insert, &[])?;
                }
            }
            self.companion.push(Written { family, members, nat });
        }
        Ok(())
    }
}

/// Virtual servers on a VIP kpx owns, or on a node address with a port in the NodePort range,
/// are kpx's, unless their address is in `exclude_cidrs` (kube-proxy's ipvs.excludeCIDRs:
/// someone else's, never deleted).
fn owns(owned: &BTreeSet<IpAddr>, cfg: &IpvsConfig, k: &Key) -> bool {
    let ip = k.addr.ip();
    let ours = owned.contains(&ip) || (cfg.node_ips.contains(&ip) && plan::NODE_PORT_RANGE.contains(&k.addr.port()));
    ours && !host::in_cidrs(ip, &cfg.exclude_cidrs)
}

/// The companion rules of one family as last written.
struct Written {
    family: Family,
    members: companion::Members,
    nat: String,
}

impl Apply for IpvsBackend {
    /// A snapshot (`changes.full`), the first sync and any sync after a failure compute the whole
    /// desired table and compare it with the kernel's; a delta recomputes only the services it
    /// changed and plans only their virtual servers.
    fn apply(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        let (messages, partial_syncs) = (self.client.messages_sent(), self.stats.partial_syncs);
        let span = DistSpan::child("dp.ipvs.sync", vec![Attr::new("services_changed", changes.services.len() as i64)]);
        let entered = span.enter();
        let result = self.apply_planned(state, changes);
        drop(entered);
        span.set(Attr::new("partial", self.stats.partial_syncs > partial_syncs));
        span.set(Attr::new("ops", self.stats.last_ops as i64));
        span.set(Attr::new("messages", self.client.messages_sent().saturating_sub(messages) as i64));
        if let Err(e) = &result {
            span.error(e.clone());
        }
        result
    }
}

impl IpvsBackend {
    fn apply_planned(&mut self, state: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
        let cfg = self.cfg.plan_config();
        if !changes.full && self.can_update() {
            let mut d = self.desired.take().unwrap_or_default();
            if let Some(up) = plan::update_desired(&cfg, state, &changes.services, &mut d, &mut self.index) {
                for s in &up.skipped {
                    tracing::warn!(node = %self.cfg.node_name, "ipvs: skipped {s}");
                }
                return self.sync_update(d, up);
            }
            tracing::debug!(node = %self.cfg.node_name, "ipvs: a virtual server of two services; full sync");
        }
        let span = DistSpan::child("dp.ipvs.plan", vec![Attr::new("full", true)]);
        let (desired, index) = plan::desired_indexed(&cfg, state);
        span.set(Attr::new("virtual_servers", desired.services.len() as i64));
        drop(span);
        self.index = index;
        for s in &desired.skipped {
            tracing::warn!(node = %self.cfg.node_name, "ipvs: skipped {s}");
        }
        self.sync(desired)
    }
}
