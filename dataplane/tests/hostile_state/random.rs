//! Part 2 of the test: random states and deltas through the real parser, and the IPVS planner.
//! Each case is built, rendered and checked without the kernel, then run through the kernel per
//! variant and family.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};

use kpx_dataplane::backend::iptables::IptablesBackend;
use kpx_dataplane::backend::iptables::render::{self, IpFamily, PreviousRules, RenderConfig};
use kpx_dataplane::backend::ipvs::{IpvsConfig, companion, plan};
use kpx_dataplane::state::{AppliedState, ApplyError, ChangeSet};
use kpx_dataplane::stream::Apply;
use kpx_ipvs_netlink::Family;
use kpx_proto::v1 as pb;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::checks::{check_kernel, check_text, is_service_chain, is_service_line, same_ruleset};
use crate::generator::Gen;
use crate::iptables::{Tools, backend_cfg, restore, save};
use crate::model::render_cfg;
use crate::netns::NetNs;

/// One random case, rendered: the full restore input of the snapshot and of the state after
/// the delta, and the partial sync between them, per family.
pub(crate) struct Case {
    pub(crate) id: String,
    pub(crate) index: usize,
    /// The snapshot's state, the delta's changes and the state after the delta.
    pub(crate) before: AppliedState,
    pub(crate) changes: ChangeSet,
    pub(crate) after: AppliedState,
    /// Per family (V4, V6): full before, partial, full after.
    pub(crate) inputs: [[String; 3]; 2],
}

pub(crate) const FAMS: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

fn fam_index(f: IpFamily) -> usize {
    match f {
        IpFamily::V4 => 0,
        IpFamily::V6 => 1,
    }
}

/// The render config of case `i`: node IPs, pod CIDR and masquerading vary from case to case.
pub(crate) fn random_cfg(family: IpFamily, i: usize) -> RenderConfig {
    let mut cfg = render_cfg(family);
    match i % 4 {
        0 => {}
        1 => {
            cfg.node_ips =
                vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap(), "203.0.113.7".parse().unwrap()]
        }
        2 => cfg.cluster_cidr = None,
        _ => {
            cfg.masquerade_all = true;
            cfg.cluster_cidr = Some("10.0.0.0/33".into());
        }
    }
    cfg
}

/// Everything but the kernel for one state transition: each rendering is well formed and the
/// IPVS planner copes. Returns the restore inputs.
fn render_case(
    id: &str,
    i: usize,
    s1: &AppliedState,
    s2: &AppliedState,
    changes: &ChangeSet,
) -> Result<[[String; 3]; 2], String> {
    let mut inputs: [[String; 3]; 2] = Default::default();
    for family in FAMS {
        let cfg = random_cfg(family, i);
        let [full1, partial, full2] = &mut inputs[fam_index(family)];
        render::render_full(&cfg, s1, full1);
        let previous = PreviousRules::from_state(s1);
        render::render_partial(&cfg, s2, changes, &previous, partial);
        render::render_full(&cfg, s2, full2);
        for (what, text) in [("full", &*full1), ("partial", &*partial), ("full after the delta", &*full2)] {
            check_text(text).map_err(|e| format!("{id} {family:?} {what}: {e}"))?;
        }
    }
    check_ipvs(s1, s2, changes).map_err(|e| format!("{id}: ipvs: {e}"))?;
    Ok(inputs)
}

fn check_ipvs(s1: &AppliedState, s2: &AppliedState, changes: &ChangeSet) -> Result<(), String> {
    let _ = plan::desired(&IpvsConfig::new("n").plan_config(), s1);
    let mut cfg = IpvsConfig::new("n");
    cfg.families = vec![Family::Inet, Family::Inet6];
    cfg.node_ips = vec!["192.168.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
    let pc = cfg.plan_config();
    let (mut d, mut index) = plan::desired_indexed(&pc, s1);
    let _ = plan::plan(&d, &plan::Table::new(), |_| true);
    if plan::update_desired(&pc, s2, &changes.services, &mut d, &mut index).is_some() {
        let want = plan::desired(&pc, s2);
        if d.services != want.services || d.vips != want.vips {
            return Err("update_desired differs from desired of the new state".into());
        }
    }
    for f in [Family::Inet, Family::Inet6] {
        let _ = companion::render_ipsets(f, &companion::members(f, &d));
    }
    Ok(())
}

/// Builds case `i` of the run with seed `seed`.
pub(crate) fn build_case(seed: u64, i: usize) -> Result<Case, String> {
    let id = format!("seed {seed} case {i} (rerun with KPX_HOSTILE_SEED={seed} KPX_HOSTILE_CASE={i})");
    let mut g = Gen { rng: StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) };
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Case, String> {
        if i % 5 == 4 {
            // Garbage on the wire: whatever decodes is applied as a snapshot (at the version it
            // turns out to hash to) and rendered like any other state.
            let valid = g.snapshot().snapshot().encode_to_vec();
            let bytes = g.garbage(&valid);
            let Ok(mut u) = pb::Update::decode(bytes.as_slice()) else {
                return Ok(Case {
                    id: id.clone(),
                    index: i,
                    before: AppliedState::default(),
                    changes: ChangeSet::default(),
                    after: AppliedState::default(),
                    inputs: Default::default(),
                });
            };
            u.full = true;
            let mut st = AppliedState::default();
            if let Err(ApplyError::VersionMismatch { actual, .. }) = st.apply(&u) {
                u.version = actual;
                st = AppliedState::default();
                st.apply(&u).map_err(|e| format!("{id}: a decoded snapshot at its own version: {e}"))?;
            }
            let inputs = render_case(&id, i, &st, &st, &ChangeSet::default())?;
            return Ok(Case {
                id: id.clone(),
                index: i,
                before: st.clone(),
                changes: ChangeSet::default(),
                after: st,
                inputs,
            });
        }
        let m1 = g.snapshot();
        let snap = m1.snapshot();
        let mut s1 = AppliedState::default();
        s1.apply(&snap).map_err(|e| format!("{id}: snapshot: {e}"))?;
        let (_, delta) = m1.after(g.delta(&m1));
        let mut s2 = s1.clone();
        let changes = s2.apply(&delta).map_err(|e| format!("{id}: delta: {e}"))?;
        let inputs = render_case(&id, i, &s1, &s2, &changes)?;
        Ok(Case { id: id.clone(), index: i, before: s1, changes, after: s2, inputs })
    }));
    match result {
        Ok(r) => r,
        Err(panic) => {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("{id}: panicked: {}", msg.unwrap_or_default()))
        }
    }
}

/// The kernel half for one variant and family, in its own namespace: every full input passes
/// `--test` (in batches); for every `stride`-th case the snapshot is applied, the partial sync
/// passes `--test --noflush`, is applied, and leaves what a full sync of the new state leaves.
pub(crate) fn kernel_cases(tools: Tools, cases: &[Case], stride: usize) -> Vec<String> {
    let ns = NetNs::new("random");
    let f = fam_index(tools.family);
    let mut failures = Vec::new();
    let ctx = tools.name();
    for batch in cases.chunks(25) {
        let text: String = batch.iter().flat_map(|c| [&c.inputs[f][0], &c.inputs[f][2]]).map(String::as_str).collect();
        if restore(&ns, tools, &["--test"], &text).is_ok() {
            continue;
        }
        for c in batch {
            for input in [&c.inputs[f][0], &c.inputs[f][2]] {
                if let Err(e) = restore(&ns, tools, &["--test"], input) {
                    failures.push(format!("{}: {ctx} --test of a full sync: {e}", c.id));
                }
            }
        }
    }
    for c in cases.iter().step_by(stride) {
        let [full1, partial, full2] = &c.inputs[f];
        if full1.is_empty() {
            continue;
        }
        let steps = || -> Result<(), String> {
            restore(&ns, tools, &[], full1).map_err(|e| format!("applying the snapshot: {e}"))?;
            if !partial.is_empty() {
                restore(&ns, tools, &["--test", "--noflush"], partial)
                    .map_err(|e| format!("--test of the partial sync: {e}\n{partial}"))?;
                restore(&ns, tools, &["--noflush"], partial)
                    .map_err(|e| format!("applying the partial sync: {e}\n{partial}"))?;
            }
            let (_, after_partial) = save(&ns, tools)?;
            check_kernel(&after_partial, false, false)?;
            restore(&ns, tools, &[], full2).map_err(|e| format!("applying the full sync after the delta: {e}"))?;
            let (_, after_full) = save(&ns, tools)?;
            same_ruleset(&after_partial, &after_full)?;
            // A restarted agent adopting these rules finds every per-service chain as it
            // would write it (else each resync would rewrite it forever).
            let mut b = IptablesBackend::new(backend_cfg(&ns, tools, random_cfg(tools.family, c.index)));
            b.apply(&c.after, &ChangeSet { full: true, services: BTreeSet::new() })
                .map_err(|e| format!("the backend's full sync over the rules: {e}"))?;
            let chains = after_full.get("nat").map_or(0, |t| t.keys().filter(|c| is_service_chain(c)).count());
            if b.stats().restore_failures > 0 || b.stats().last_unchanged_chains != chains {
                let written: Vec<&str> =
                    full2.lines().filter(|l| l.starts_with(":KUBE-") || l.starts_with("-A KUBE-")).collect();
                let kernel: Vec<String> =
                    b.last_restore_input().lines().filter(|l| is_service_line(l)).map(String::from).collect();
                return Err(format!(
                    "adopting the rules left {} of {chains} per-service chains unchanged (failures {}): rewrote {kernel:#?}\nkernel: {:#?}\nrendered: {written:#?}",
                    b.stats().last_unchanged_chains,
                    b.stats().restore_failures,
                    after_full.get("nat")
                ));
            }
            Ok(())
        };
        if let Err(e) = steps() {
            failures.push(format!("{}: {ctx}: {e}", c.id));
        }
    }
    failures
}
