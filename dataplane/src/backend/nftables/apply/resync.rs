//! The periodic full resync, with its slow part outside the agent's lock.
//!
//! A resync dumps kpx's table, renders everything and plans the difference: 5 s at 44k
//! services, nearly all of it dump and render. Under the agent's lock every update would wait
//! that long once per `full_resync_period`. So the agent takes a [`ResyncJob`] under the lock,
//! lets it [`ResyncJob::prepare`] without the lock (its own netlink socket, a copy of the
//! state), and hands the result back under the lock to [`NftBackend::finish_resync`], which
//! commits it only if the table cannot have changed since the job was taken: the ruleset
//! generation is the job's (no transaction by anyone, ours included) and this backend applied
//! nothing. Otherwise the work is dropped and the next housekeeping tick prepares again; after
//! [`MAX_STALE_RESYNCS`] stale attempts in a row the agent runs the resync under the lock, so a steady
//! stream of updates cannot put it off forever.
//!
//! Only the periodic resync goes this way. The other full syncs (first, after a failure, after
//! someone else changed the table) repair something, and updates should wait for them.

use std::time::Instant;

use kpx_nft_netlink::NftError;

use super::{Leftovers, NftBackend, NftConfig, PreparedFull};
use crate::backend::MAX_STALE_RESYNCS;
use crate::backend::iptables::apply::FullReason;
use crate::backend::iptables::render::RenderConfig;
use crate::state::{AppliedState, ChangeSet};

/// A periodic resync taken under the lock, to prepare without it.
#[derive(Debug)]
pub struct ResyncJob {
    cfg: NftConfig,
    render: RenderConfig,
    generation: u32,
    applies: u64,
    started: Instant,
}

/// How [`NftBackend::finish_resync`] ended, with what is left to free (after the lock).
pub enum Finished {
    /// Committed (the leftovers are None when the transaction was refused and retried).
    Done(Option<Leftovers>),
    /// Dropped: the table may have changed while it was prepared.
    Stale(Leftovers),
}

impl Finished {
    pub fn committed(&self) -> bool {
        matches!(self, Finished::Done(_))
    }
}

/// A prepared resync, to finish under the lock.
pub struct PreparedResync {
    job: ResyncJob,
    full: PreparedFull,
}

impl ResyncJob {
    /// Dumps, renders and plans with a socket of its own. Slow; holds no lock.
    pub fn prepare(self, state: &AppliedState) -> Result<PreparedResync, NftError> {
        let mut client = self.cfg.client()?;
        let full = PreparedFull::new(&mut client, &self.cfg, &self.render, state)?;
        Ok(PreparedResync { job: self, full })
    }
}

impl NftBackend {
    /// Whether the next sync is a periodic resync to prepare outside the lock (the generation
    /// must be known); if not, [`NftBackend::sync_due`] does whatever full sync is due.
    pub fn resync_outside_lock_due(&self) -> bool {
        self.synced_once
            && self.stale_resyncs < MAX_STALE_RESYNCS
            && self.full_reason(false) == Some(FullReason::Periodic)
            && self.known_gen().is_some()
    }

    /// The periodic resync to prepare outside the lock, when [`Self::resync_outside_lock_due`].
    pub fn resync_job(&self) -> Option<ResyncJob> {
        if !self.resync_outside_lock_due() {
            return None;
        }
        Some(ResyncJob {
            cfg: self.cfg.clone(),
            render: self.render.clone(),
            generation: self.known_gen()?,
            applies: self.applies,
            started: Instant::now(),
        })
    }

    /// Commits PREPARED if nothing changed the table since its job was taken, else drops it
    /// (the next tick prepares again). Either way what is left to free is the caller's, to free
    /// after the lock.
    pub fn finish_resync(&mut self, state: &AppliedState, prepared: PreparedResync) -> Result<Finished, String> {
        let PreparedResync { job, full } = prepared;
        let generation = self.client.gen_id().map_err(|e| e.to_string())?;
        if job.applies != self.applies || generation != job.generation || Some(generation) != self.known_gen() {
            self.stale_resyncs += 1;
            tracing::debug!(family = ?self.cfg.family, stale = self.stale_resyncs, "periodic nftables resync went stale while prepared; preparing again");
            return Ok(Finished::Stale(Leftovers(Box::new(full))));
        }
        self.applies += 1;
        let mut left = None;
        let result = self.sync_with(Some(FullReason::Periodic), job.started, |b| {
            b.install_full(full, Some(generation)).map(|(stats, leftovers)| {
                left = Some(leftovers);
                stats
            })
        });
        if let Err(error) = result {
            // As `apply` does: a refused transaction is retried as a full sync.
            tracing::warn!(family = ?self.cfg.family, %error, "nftables resync refused; retrying as a full sync");
            self.sync(state, &ChangeSet::default(), Some(FullReason::AfterFailure)).map_err(|e| e.to_string())?;
        }
        self.clean_conntrack(state, &ChangeSet::default(), true);
        Ok(Finished::Done(left))
    }

    /// Periodic resyncs prepared in a row that went stale (tests).
    pub fn stale_resyncs(&self) -> u32 {
        self.stale_resyncs
    }
}
