//! Stale UDP conntrack entries. UDP has no connection end, so a client that keeps sending to a
//! service keeps its conntrack entry (and with it the DNAT to an endpoint that is gone) alive
//! forever. After the rules changed, kpx deletes:
//!
//! - for every endpoint that left a UDP service port: the entries DNATed to it through each of
//!   the service's addresses and its node port (`--reply-src` is the endpoint after DNAT);
//! - for a UDP service port that had no endpoints and now has some: every entry to the
//!   service's addresses and node port, which were created without DNAT while the service
//!   could not answer (kube-proxy's "stale services").
//!
//! The computation is pure: (old, new) per service -> conntrack argv lists.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kpx_proto::v1 as pb;

use super::exec::{ExecError, Ran, Runner};
use super::render::IpFamily;
use crate::state::{AppliedState, ChangeSet, ServiceEntry};

/// The UDP service ports a backend has programmed, per service: what the next sync's cleanups
/// are computed against. Shared by the iptables and nftables backends.
#[derive(Debug, Default)]
pub struct UdpTracker(BTreeMap<String, Vec<UdpPort>>);

impl UdpTracker {
    /// The conntrack argv lists to run after a sync of CHANGES (every service on a FULL one) in
    /// FAMILY, and the new ports remembered. KNOWN_OLD: whether the old ports are what the kernel
    /// had (false on the first sync, when nothing was programmed by this process yet).
    pub fn after_sync(
        &mut self,
        family: IpFamily,
        state: &AppliedState,
        changes: &ChangeSet,
        full: bool,
        known_old: bool,
    ) -> Vec<Vec<String>> {
        let keys: Vec<String> = if full {
            self.0.keys().chain(state.services().keys()).cloned().collect()
        } else {
            changes.services.iter().cloned().collect()
        };
        let mut deletes = Vec::new();
        for k in keys {
            let new = state.services().get(&k).map(|e| udp_ports(family, e)).unwrap_or_default();
            let old = self.0.get(&k).map(Vec::as_slice).unwrap_or_default();
            deletes.extend(cleanups(family, old, &new, known_old));
            if new.is_empty() {
                self.0.remove(&k);
            } else {
                self.0.insert(k, new);
            }
        }
        deletes
    }
}

/// How often one deletion is tried. `conntrack -D` dumps the table, then deletes each match
/// by its tuple; an entry that goes away between the two (it expired, or IPVS dropped it with
/// its connection) can make it exit with "Operation failed" while other matches remain. A
/// second dump sees the table as it now is. (CI saw one such failure in the ipvs UML test; its
/// stderr was not kept, so the cause is the likeliest one, not a confirmed one.)
const DELETE_ATTEMPTS: usize = 3;

/// Runs `conntrack` with each of DELETES (argv, never a shell line); returns how many did their
/// job (an entry deleted, or none to delete). Failures are logged: stale entries stay, the
/// rules are right.
pub fn run_deletes(runner: &Runner, deletes: &[Vec<String>]) -> u64 {
    let mut done = 0;
    for args in deletes {
        let mut argv = vec!["conntrack"];
        argv.extend(args.iter().map(String::as_str));
        match delete_with_retries(|| runner.run(&argv, &[])) {
            Ok(()) => done += 1,
            Err(DeleteFailed::Exited(stderr)) => {
                tracing::warn!(args = ?args, stderr = %stderr.trim_end(), "conntrack cleanup failed")
            }
            Err(DeleteFailed::NotRun(error)) => tracing::warn!(%error, "cannot run conntrack; stale UDP entries stay"),
        }
    }
    done
}

/// Why a deletion did not do its job after its attempts.
#[derive(Debug)]
pub enum DeleteFailed {
    /// conntrack ran and failed: its last stderr.
    Exited(String),
    /// conntrack could not be started (missing binary, no netns): not retried.
    NotRun(ExecError),
}

/// Runs one deletion through ATTEMPT until it succeeds or finds nothing to delete, at most
/// [`DELETE_ATTEMPTS`] times.
pub fn delete_with_retries(mut attempt: impl FnMut() -> Result<Ran, ExecError>) -> Result<(), DeleteFailed> {
    let mut stderr = String::new();
    for _ in 0..DELETE_ATTEMPTS {
        let ran = attempt().map_err(DeleteFailed::NotRun)?;
        if ran.success || nothing_matched(&ran.stderr) {
            return Ok(());
        }
        tracing::debug!(stderr = %ran.stderr.trim_end(), "conntrack deletion failed; trying again");
        stderr = ran.stderr;
    }
    Err(DeleteFailed::Exited(stderr))
}

/// What conntrack cleanup needs to know of one UDP service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPort {
    pub name: String,
    /// Cluster, external and load-balancer IPs of the rendered family.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoints traffic can be DNATed to.
    pub endpoints: BTreeSet<IpAddr>,
}

/// The UDP ports of a service in `family` (empty when it has none).
pub fn udp_ports(family: IpFamily, entry: &ServiceEntry) -> Vec<UdpPort> {
    let s = &entry.service;
    let addresses: Vec<IpAddr> = s
        .cluster_ips
        .iter()
        .chain(&s.external_ips)
        .chain(&s.load_balancer_ips)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|ip| family.matches(*ip))
        .collect();
    if addresses.is_empty() {
        return Vec::new();
    }
    s.ports
        .iter()
        .filter(|p| p.protocol() == pb::Protocol::Udp)
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
            let endpoints = entry
                .endpoints
                .values()
                .filter(|e| (e.for_cluster || e.for_local) && e.ports.iter().any(|ep| ep.name == p.name))
                .filter_map(|e| e.ip.parse::<IpAddr>().ok())
                .filter(|ip| family.matches(*ip))
                .collect();
            Some(UdpPort {
                name: p.name.clone(),
                addresses: addresses.clone(),
                port,
                node_port: u16::try_from(p.node_port).ok().filter(|p| *p != 0),
                endpoints,
            })
        })
        .collect()
}

/// The conntrack deletions (argv after `conntrack`) that `old` -> `new` calls for, for one
/// service. `gained` cleanups (a port that had no endpoints) are left out when `known_old` is
/// false: after a restart kpx does not know what the kernel saw before.
pub fn cleanups(family: IpFamily, old: &[UdpPort], new: &[UdpPort], known_old: bool) -> Vec<Vec<String>> {
    let fam = match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    let base = |extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> = ["-D", "-f", fam, "-p", "udp"].map(String::from).to_vec();
        v.extend_from_slice(extra);
        v
    };
    let mut out = Vec::new();
    let new_by_name: BTreeMap<&str, &UdpPort> = new.iter().map(|p| (p.name.as_str(), p)).collect();
    for o in old {
        let n = new_by_name.get(o.name.as_str());
        let kept = |ip: &IpAddr| n.is_some_and(|n| n.endpoints.contains(ip));
        for ep in o.endpoints.iter().filter(|ip| !kept(ip)) {
            for a in &o.addresses {
                out.push(base(&[
                    "--orig-dst".into(),
                    a.to_string(),
                    "--dport".into(),
                    o.port.to_string(),
                    "--reply-src".into(),
                    ep.to_string(),
                ]));
            }
            if let Some(np) = o.node_port {
                out.push(base(&["--dport".into(), np.to_string(), "--reply-src".into(), ep.to_string()]));
            }
        }
    }
    if known_old {
        let old_by_name: BTreeMap<&str, &UdpPort> = old.iter().map(|p| (p.name.as_str(), p)).collect();
        for n in new.iter().filter(|n| !n.endpoints.is_empty()) {
            if old_by_name.get(n.name.as_str()).is_some_and(|o| !o.endpoints.is_empty()) {
                continue;
            }
            for a in &n.addresses {
                out.push(base(&["--orig-dst".into(), a.to_string(), "--dport".into(), n.port.to_string()]));
            }
            if let Some(np) = n.node_port {
                out.push(base(&["--dport".into(), np.to_string()]));
            }
        }
    }
    out
}

/// conntrack exits 1 when nothing matched; that is success for a cleanup.
pub fn nothing_matched(stderr: &str) -> bool {
    stderr.contains("0 flow entries")
}
