//! `--backend shadow`, for a safe migration: kpx runs beside a live kube-proxy (iptables mode),
//! receives this node's desired state, renders the rules its iptables backend would write, reads
//! the rules in the kernel (kube-proxy's) and reports every difference: a metric per kind, log
//! lines, the admin API's `GetStatus` and `kpxctl diff`. It never writes a rule, a sysctl or
//! anything else into the kernel.
//!
//! The comparison is the conformance test's (`iptables::ruleset::compare`: kube-proxy's own
//! chains, canonical rules, the per-service-port chains as sets). It runs on every update and
//! on every `--sync-period` tick, since kube-proxy programs its rules on its own schedule: a
//! difference right after a change is normal until kube-proxy's next sync; one that stays is
//! real.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::iptables::exec::Runner;
use super::iptables::render::RenderConfig;
use super::iptables::ruleset::{self, Difference, DifferenceKind, Ruleset};
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;

/// What shadow mode compares in one IP family.
#[derive(Debug, Clone)]
pub struct ShadowFamily {
    pub render: RenderConfig,
    /// "iptables-save" or "ip6tables-save"; the other variant ("-legacy"/"-nft") is read when
    /// this one holds no kube-proxy rules.
    pub save_cmd: String,
}

/// The last comparison, shared with the admin API and the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowResult {
    /// Unix ms of the last comparison; 0 before the first.
    pub compared_unix_ms: i64,
    pub differences: Vec<String>,
    pub by_kind: BTreeMap<DifferenceKind, u64>,
    /// Why the kernel could not be read, if it could not.
    pub error: Option<String>,
}

pub type SharedResult = Arc<Mutex<ShadowResult>>;

#[derive(Debug)]
pub struct ShadowBackend {
    families: Vec<ShadowFamily>,
    runner: Runner,
    result: SharedResult,
}

impl ShadowBackend {
    pub fn new(families: Vec<ShadowFamily>, netns: Option<String>) -> Self {
        ShadowBackend { families, runner: Runner { netns }, result: SharedResult::default() }
    }

    pub fn result(&self) -> SharedResult {
        self.result.clone()
    }

    /// Reads the kernel and compares; records and logs the result (the log only when it
    /// changed, so that a steady difference is not repeated every tick).
    pub fn compare(&mut self, state: &AppliedState) {
        let mut diffs: Vec<Difference> = Vec::new();
        let mut errors = Vec::new();
        for f in &self.families {
            match self.kernel(f) {
                Ok(kernel) => {
                    let (kpx, _) = ruleset::of_kpx(&f.render, state);
                    diffs.extend(ruleset::compare(&kpx, &kernel));
                }
                Err(e) => errors.push(e),
            }
        }
        let lines: Vec<String> = diffs.iter().map(ToString::to_string).collect();
        let mut by_kind: BTreeMap<DifferenceKind, u64> = DifferenceKind::ALL.iter().map(|k| (*k, 0)).collect();
        for d in &diffs {
            *by_kind.entry(d.kind).or_default() += 1;
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        let mut r = self.result.lock().unwrap_or_else(|e| e.into_inner());
        let changed = r.differences != lines || r.error != error;
        *r = ShadowResult { compared_unix_ms: unix_ms(), differences: lines, by_kind, error };
        if changed {
            log(&r);
        }
    }

    /// The kernel's tables of one family, from the save tool that holds kube-proxy's rules.
    fn kernel(&self, f: &ShadowFamily) -> Result<Ruleset, String> {
        let other = if f.save_cmd.contains("-legacy") {
            f.save_cmd.replacen("-legacy", "-nft", 1)
        } else {
            f.save_cmd.replacen("-save", "-legacy-save", 1)
        };
        let mut first = None;
        for cmd in [&f.save_cmd, &other] {
            match self.runner.run_ok(&[cmd], &[]) {
                Ok(ran) if ran.stdout.contains(":KUBE-SERVICES") => return Ok(Ruleset::parse(&ran.stdout)),
                Ok(ran) => {
                    first.get_or_insert(Ok(ran.stdout));
                }
                Err(e) => {
                    first.get_or_insert(Err(format!("{cmd}: {e}")));
                }
            }
        }
        first.unwrap_or_else(|| Err("no iptables-save".into())).map(|text| Ruleset::parse(&text))
    }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// At most this many difference lines per comparison in the log (all of them are in the admin
/// API and `kpxctl diff`).
const MAX_LOGGED: usize = 50;

fn log(r: &ShadowResult) {
    if let Some(error) = &r.error {
        tracing::warn!(%error, "shadow: cannot read the kernel's rules");
    }
    if r.differences.is_empty() {
        tracing::info!("shadow: kpx's rules and the kernel's are the same");
        return;
    }
    let kinds: Vec<String> =
        r.by_kind.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{}={n}", k.as_str())).collect();
    tracing::warn!(differences = r.differences.len(), kinds = %kinds.join(","), "shadow: kpx's rules differ from the kernel's");
    for line in r.differences.iter().take(MAX_LOGGED) {
        tracing::info!("shadow: {line}");
    }
    if r.differences.len() > MAX_LOGGED {
        tracing::info!("shadow: ... {} more (kpxctl diff lists all)", r.differences.len() - MAX_LOGGED);
    }
}

impl Apply for ShadowBackend {
    /// Compares; never fails an update: nothing was to be written.
    fn apply(&mut self, state: &AppliedState, _changes: &ChangeSet) -> Result<(), String> {
        self.compare(state);
        Ok(())
    }
}
