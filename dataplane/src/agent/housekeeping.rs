//! The agent's housekeeping, every `--sync-period`: canary and generation checks, the ipvs
//! reconcile, and the full resyncs the backends want. The periodic resyncs of the iptables and
//! nftables backends do their slow reads without the agent's lock, so that updates do not wait
//! for them (each backend's `apply/resync.rs` says what it checks before it commits).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Core, family_name, lock};
use crate::admin::AdminStatus;
use crate::backend::iptables::BackendStats;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::state::{AppliedState, ChangeSet};
use crate::stream::Apply;

/// Every `period`: canary checks, then the full resyncs the backends want.
pub(super) async fn housekeeping(
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
            // The iptables canary checks read whole tables (0.7 s on iptables-legacy at 10k
            // services): run without the lock, recorded under it.
            let probes: Vec<_> = lock(&core).backends.iter().map(|b| b.canary_probe()).collect();
            let alive: Vec<bool> = probes.into_iter().map(|p| p.is_none_or(|p| p.run())).collect();
            // Bound first: the guard of a `for` expression would live through the loop.
            let outside = housekeep_locked(&mut lock(&core), &alive, &metrics, &health, &status);
            for resync in outside {
                match resync {
                    Outside::Iptables(i) => resync_iptables_outside_lock(&core, i, &metrics, &health),
                    Outside::Nftables(i) => resync_nft_outside_lock(&core, i, &metrics, &health),
                }
            }
        })
        .await;
        if let Err(error) = done {
            tracing::error!(%error, "housekeeping task failed");
        }
    }
}

/// A periodic resync left to the part of the housekeeping outside the lock: the backend's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outside {
    Iptables(usize),
    Nftables(usize),
}

/// The housekeeping done under the lock: canary and generation checks, ipvs reconcile, the
/// full resyncs due. Returns the periodic resyncs left to [`resync_iptables_outside_lock`] and
/// [`resync_nft_outside_lock`].
fn housekeep_locked(
    core: &mut Core,
    canaries_alive: &[bool],
    metrics: &Metrics,
    health: &Health,
    status: &AdminStatus,
) -> Vec<Outside> {
    if !core.has_state {
        return Vec::new();
    }
    let mut drift: Vec<String> = core
        .backends
        .iter_mut()
        .zip(canaries_alive)
        .filter_map(|(b, &alive)| {
            let lost = !b.canary_checked(alive);
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
    if let Some(u) = core.userspace.as_mut()
        && !u.check_canary()
    {
        drift.push("userspace: canary gone (table flushed?)".to_string());
    }
    for b in core.nft.iter_mut() {
        if !b.check() {
            drift.push(format!("nftables {}: ruleset changed by someone else", family_name(b.config().family)));
        }
    }
    status.checked(drift.join("; "));
    if core.shadow.is_some() {
        // kube-proxy changes its rules on its own schedule: compare again.
        let state = core.rebuild_state();
        if let Some(shadow) = core.shadow.as_mut() {
            shadow.compare(&state);
            metrics.shadow(&shadow.result().lock().unwrap_or_else(|e| e.into_inner()));
        }
    }
    let userspace_wants = core.userspace.as_ref().is_some_and(|u| u.wants_full_sync());
    let ipt_outside: Vec<usize> =
        (0..core.backends.len()).filter(|&i| core.backends[i].resync_outside_lock_due()).collect();
    let nft_outside: Vec<usize> = (0..core.nft.len()).filter(|&i| core.nft[i].resync_outside_lock_due()).collect();
    let outside: Vec<Outside> = ipt_outside
        .iter()
        .map(|&i| Outside::Iptables(i))
        .chain(nft_outside.iter().map(|&i| Outside::Nftables(i)))
        .collect();
    let ipt_wants = (0..core.backends.len()).any(|i| core.backends[i].wants_full_sync() && !ipt_outside.contains(&i));
    let nft_wants = (0..core.nft.len()).any(|i| core.nft[i].wants_full_sync() && !nft_outside.contains(&i));
    if !ipt_wants && !userspace_wants && !nft_wants {
        return outside;
    }
    let state = core.rebuild_state();
    let before = core.stats();
    let changes = ChangeSet { full: false, services: Default::default() };
    let mut ok = true;
    for (i, b) in core.backends.iter_mut().enumerate() {
        if b.wants_full_sync()
            && !ipt_outside.contains(&i)
            && let Err(error) = b.sync_due(&state)
        {
            tracing::warn!(%error, "periodic full resync failed");
            ok = false;
        }
    }
    if let Some(u) = core.userspace.as_mut().filter(|_| userspace_wants)
        && let Err(error) = u.apply(&state, &changes)
    {
        tracing::warn!(%error, "periodic full resync failed");
        ok = false;
    }
    for (i, b) in core.nft.iter_mut().enumerate() {
        if b.wants_full_sync()
            && !nft_outside.contains(&i)
            && let Err(error) = b.sync_due(&state)
        {
            tracing::warn!(%error, "nftables resync failed");
            ok = false;
        }
    }
    metrics.record_sync(&before, &core.stats());
    if ok {
        health.succeeded()
    } else {
        health.failed()
    }
    outside
}

/// The periodic resync of nftables backend I: taken under the lock, prepared (dump, render,
/// plan) without it, so that updates do not wait for it, then finished under the lock (see
/// `backend/nftables/apply/resync.rs`).
fn resync_nft_outside_lock(core: &Mutex<Core>, i: usize, metrics: &Metrics, health: &Health) {
    let Some((job, services)) = ({
        let core = lock(core);
        core.nft[i].resync_job().map(|job| (job, core.mirror.clone()))
    }) else {
        return;
    };
    let started = Instant::now();
    // Built here: its content hash walks every endpoint (tens of ms at 44k services).
    let state = AppliedState::from_services(&services);
    let prepared = match job.prepare(&state) {
        Ok(p) => p,
        Err(error) => {
            tracing::warn!(%error, "nftables resync: cannot read the table; trying again next period");
            return;
        }
    };
    let prepared_in = started.elapsed();
    let mut core = lock(core);
    let locked = Instant::now();
    let before = core.stats();
    let finished = core.nft[i].finish_resync(&state, prepared);
    let locked_for = locked.elapsed();
    let committed = matches!(&finished, Ok(f) if f.committed());
    record_resync(&core, &before, finished.as_ref().map(|_| committed), metrics, health);
    let family = family_name(core.nft[i].config().family);
    drop(core);
    // The old and the new table's objects are freed here, not under the lock.
    let freeing = Instant::now();
    drop(finished);
    let freed_in = freeing.elapsed();
    if committed {
        tracing::info!(
            family,
            prepared_ms = prepared_in.as_millis() as u64,
            locked_ms = locked_for.as_millis() as u64,
            freed_ms = freed_in.as_millis() as u64,
            "periodic nftables resync done"
        );
    }
}

/// The periodic resync of iptables backend I: taken under the lock, the kernel's tables read
/// without it (iptables-save, the slow part), then rendered, compared and restored under the
/// lock (see `backend/iptables/apply/resync.rs`).
fn resync_iptables_outside_lock(core: &Mutex<Core>, i: usize, metrics: &Metrics, health: &Health) {
    let Some(job) = lock(core).backends[i].resync_job() else {
        return;
    };
    let started = Instant::now();
    let prepared = match job.prepare() {
        Ok(p) => p,
        Err(error) => {
            tracing::warn!(%error, "iptables resync: cannot read the tables; trying again next period");
            return;
        }
    };
    let read_in = started.elapsed();
    let mut core = lock(core);
    let locked = Instant::now();
    let state = core.rebuild_state();
    let before = core.stats();
    let finished = core.backends[i].finish_resync(&state, prepared);
    record_resync(&core, &before, finished.as_ref().copied(), metrics, health);
    let family = family_name(core.backends[i].config().family);
    drop(core);
    if finished == Ok(true) {
        tracing::info!(
            family,
            read_ms = read_in.as_millis() as u64,
            locked_ms = locked.elapsed().as_millis() as u64,
            "periodic iptables resync done"
        );
    }
}

/// Metrics and health after a resync finished under the lock: committed (true), dropped as
/// stale (false, nothing to record) or failed.
fn record_resync(
    core: &Core,
    before: &[BackendStats],
    result: Result<bool, &String>,
    metrics: &Metrics,
    health: &Health,
) {
    match result {
        Ok(false) => return,
        Ok(true) => health.succeeded(),
        Err(error) => {
            tracing::warn!(%error, "periodic full resync failed");
            health.failed();
        }
    }
    metrics.record_sync(before, &core.stats());
}
