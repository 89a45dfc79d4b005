//! The periodic full resync, with its reads outside the agent's lock.
//!
//! A resync reads the kernel's nat table (`iptables-save -t nat`, the slow part on iptables-nft)
//! and the built-in filter chains, renders everything, compares, and restores what differs. The
//! agent takes a [`ResyncJob`] under its lock, lets it [`ResyncJob::prepare`] (the reads) without
//! the lock, and hands the tables back under the lock to [`IptablesBackend::finish_resync`],
//! which renders, compares and restores over them only if this backend applied nothing
//! meanwhile: then the tables read are what kpx left, give or take someone else's changes, which
//! a resync under the lock could meet as well. Otherwise they are dropped and the next
//! housekeeping tick reads again; after [`MAX_STALE_RESYNCS`] stale tries in a row the agent
//! resyncs under the lock. Render and restore stay under the lock: they use the backend's buffers.
//!
//! Only the periodic resync goes this way, as in the nftables backend (see its `resync.rs`).

use std::time::Instant;

use super::{FullReason, IptablesBackend, IptablesConfig, IptablesError, read_kernel};
use crate::backend::MAX_STALE_RESYNCS;
use crate::backend::iptables::exec::Runner;
use crate::backend::iptables::render::RenderConfig;
use crate::backend::iptables::saved::SavedTable;
use crate::state::{AppliedState, ChangeSet};

/// A periodic resync taken under the lock, to read the kernel's tables without it.
#[derive(Debug)]
pub struct ResyncJob {
    cfg: IptablesConfig,
    render: RenderConfig,
    runner: Runner,
    applies: u64,
    started: Instant,
}

/// The kernel's tables read for a resync, to finish under the lock.
#[derive(Debug)]
pub struct PreparedResync {
    applies: u64,
    started: Instant,
    filter: SavedTable,
    nat: SavedTable,
}

impl ResyncJob {
    /// Reads the kernel's tables. Slow on iptables-nft; holds no lock.
    pub fn prepare(self) -> Result<PreparedResync, IptablesError> {
        let (filter, nat) = read_kernel(&self.cfg, &self.render, &self.runner)?;
        Ok(PreparedResync { applies: self.applies, started: self.started, filter, nat })
    }
}

impl IptablesBackend {
    /// Whether the next sync is a periodic resync to read outside the lock; if not,
    /// [`IptablesBackend::sync_due`] does whatever full sync is due.
    pub fn resync_outside_lock_due(&self) -> bool {
        !self.cfg.dry_run
            && self.stale_resyncs < MAX_STALE_RESYNCS
            && super::full_reason(self.inputs(false)) == Some(FullReason::Periodic)
    }

    /// The periodic resync to read outside the lock, when [`Self::resync_outside_lock_due`].
    pub fn resync_job(&self) -> Option<ResyncJob> {
        self.resync_outside_lock_due().then(|| ResyncJob {
            cfg: self.cfg.clone(),
            render: self.render.clone(),
            runner: self.runner.clone(),
            applies: self.applies,
            started: Instant::now(),
        })
    }

    /// Renders, compares and restores over PREPARED if this backend applied nothing since its
    /// job was taken. Returns whether it did; false: stale and dropped (the next tick reads
    /// again).
    pub fn finish_resync(&mut self, state: &AppliedState, prepared: PreparedResync) -> Result<bool, String> {
        let PreparedResync { applies, started, filter, nat } = prepared;
        if applies != self.applies {
            self.stale_resyncs += 1;
            tracing::debug!(family = ?self.cfg.family, stale = self.stale_resyncs, "periodic iptables resync went stale while read; reading again");
            return Ok(false);
        }
        self.applies += 1;
        let result = self.sync_with(Some(FullReason::Periodic), started, |b| b.full_sync_over(state, filter, nat));
        if let Err(error) = result {
            // As `apply` does: a failed restore is retried as a full sync.
            tracing::warn!(family = ?self.cfg.family, %error, "iptables resync failed; retrying with a full sync");
            self.sync(state, &ChangeSet::default(), Some(FullReason::AfterFailure)).map_err(|e| e.to_string())?;
        }
        self.clean_conntrack(state, &ChangeSet::default(), true);
        Ok(true)
    }

    /// Periodic resyncs read in a row that went stale (tests).
    pub fn stale_resyncs(&self) -> u32 {
        self.stale_resyncs
    }
}
