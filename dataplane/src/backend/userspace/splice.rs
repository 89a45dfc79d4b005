//! Zero-copy forwarding of one direction of a TCP connection: `splice(2)` moves the bytes from
//! the source socket into a pipe and from the pipe into the destination socket, so they never
//! enter user space (the kernel moves page references). The pipe is the only buffer: nothing
//! more is read from the source until the pipe has been emptied into the destination, so a slow
//! reader holds its writer back through TCP's own flow control, and each direction buffers at
//! most one pipe's worth.
//!
//! A direction holds a pipe only while bytes are on their way: it takes one from its thread's
//! pool when the source has data and gives it back once empty, so an idle connection holds
//! none (two descriptors instead of six, and no pipe in the kernel).
//!
//! The sockets are tokio's (non-blocking, registered with the reactor): each splice runs inside
//! `try_io`, which clears the socket's readiness when the kernel says EAGAIN.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// A pipe used as the splice buffer of one direction.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes of capacity above the kernel's default this pipe holds, counted in `held`.
    enlarged: usize,
    held: &'static AtomicUsize,
}

/// Empty pipes kept per thread for the next transfers: making one is three system calls
/// (pipe2, F_SETPIPE_SZ, and a close for each end later).
const POOL: usize = 64;

/// What a pipe holds unless resized: 16 pages.
const DEFAULT_PIPE: usize = 64 * 1024;

/// Capacity above [`DEFAULT_PIPE`] that this process's pipes (pooled or in use) may hold
/// together. The kernel counts pipe pages per user (`fs.pipe-user-pages-soft`, 64 MiB by
/// default) and an agent without CAP_SYS_RESOURCE shares that count with every other process of
/// uid 0 on the node (kubelet, the container runtime): past it, their new pipes too get 8 KiB.
/// Pipes made beyond the budget keep the default size.
const ENLARGED_BUDGET: usize = 16 << 20;

static ENLARGED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one.
    pub fn take(size: usize) -> io::Result<Pipe> {
        match PIPES.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => Pipe::new(size),
        }
    }

    /// Returns a pipe known to be empty to this thread's pool (closed when the pool is full).
    /// Only for pipes whose every byte was spliced out: a leftover byte would reach the next
    /// connection.
    pub fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL {
                p.push(self);
            }
        });
    }

    /// A non-blocking pipe of (at least) `size` bytes while [`ENLARGED_BUDGET`] allows, else of
    /// the kernel's default 64 KiB (as when the kernel refuses the size: above
    /// /proc/sys/fs/pipe-max-size, or past the user's pipe pages).
    pub fn new(size: usize) -> io::Result<Pipe> {
        Pipe::within(size, &ENLARGED, ENLARGED_BUDGET)
    }

    fn within(size: usize, held: &'static AtomicUsize, budget: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let mut pipe = Pipe { read, write, enlarged: 0, held };
        let extra = size.saturating_sub(DEFAULT_PIPE);
        if extra == 0 {
            return Ok(pipe);
        }
        // Reserved first, so that two threads cannot both take the budget's last share.
        let reserved = held.fetch_add(extra, Ordering::Relaxed) + extra <= budget;
        let wanted = i32::try_from(size).unwrap_or(i32::MAX);
        if reserved && fcntl(&pipe.write, FcntlArg::F_SETPIPE_SZ(wanted)).is_ok() {
            pipe.enlarged = extra;
        } else {
            held.fetch_sub(extra, Ordering::Relaxed);
        }
        Ok(pipe)
    }

    /// The pipe's capacity in bytes, as the kernel reports it.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        fcntl(&self.write, FcntlArg::F_GETPIPE_SZ).map_or(0, |n| n as usize)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.held.fetch_sub(self.enlarged, Ordering::Relaxed);
    }
}

/// Activity clock shared by both directions of a connection (for the idle timeout): the time
/// of the last transfer, in ms since `epoch`.
#[derive(Debug)]
pub struct Activity {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { epoch: tokio::time::Instant::now(), last_ms: AtomicU64::new(0) }
    }
}

impl Activity {
    pub fn touch(&self) {
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn last(&self) -> tokio::time::Instant {
        self.epoch + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing moved for `idle`.
    pub async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let deadline = self.last() + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// Forwards `src` to `dst` through pipes of `pipe_size` until `src` ends, then shuts down
/// `dst`'s write side (half-close: the other direction goes on). Errors (a reset) end it early;
/// a pipe that may still hold bytes is then closed, never pooled.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipe_size: usize,
    bytes: &Counter,
    activity: &Activity,
) -> io::Result<()> {
    loop {
        let (n, pipe) = loop {
            src.readable().await?;
            let pipe = Pipe::take(pipe_size)?;
            match src.try_io(Interest::READABLE, || Ok(splice(src, None, &pipe.write, None, pipe_size, FLAGS)?)) {
                Ok(n) => break (n, pipe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.give_back(),
                Err(e) => {
                    pipe.give_back();
                    return Err(e);
                }
            }
        };
        if n == 0 {
            pipe.give_back();
            // ENOTCONN: the peer already reset; the other direction reports it.
            return match shutdown(dst.as_raw_fd(), Shutdown::Write) {
                Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || Ok(splice(&pipe.read, None, dst, None, left, FLAGS)?)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
        bytes.inc_by(n as u64);
        activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_past_the_budget_keep_the_default_size_until_one_is_closed() {
        static HELD: AtomicUsize = AtomicUsize::new(0);
        let mib = 1 << 20;
        let budget = 2 * (mib - DEFAULT_PIPE);
        let first = Pipe::within(mib, &HELD, budget).unwrap();
        let second = Pipe::within(mib, &HELD, budget).unwrap();
        let third = Pipe::within(mib, &HELD, budget).unwrap();
        assert_eq!((first.capacity(), second.capacity()), (mib, mib));
        assert_eq!(third.capacity(), DEFAULT_PIPE, "the budget is spent");
        assert_eq!(HELD.load(Ordering::Relaxed), budget);

        drop(third);
        assert_eq!(HELD.load(Ordering::Relaxed), budget, "a default-size pipe held nothing");
        drop(first);
        assert_eq!(HELD.load(Ordering::Relaxed), mib - DEFAULT_PIPE);
        let again = Pipe::within(mib, &HELD, budget).unwrap();
        assert_eq!(again.capacity(), mib, "a closed pipe gives its share back");
    }

    #[test]
    fn a_size_the_kernel_refuses_leaves_the_default_and_holds_nothing() {
        static HELD: AtomicUsize = AtomicUsize::new(0);
        // i32::MAX bytes: EPERM for an unprivileged process (above fs.pipe-max-size), ENOMEM for
        // root (a ring of half a million slots is past what the kernel allocates in one piece).
        let pipe = Pipe::within(usize::MAX / 2, &HELD, usize::MAX).unwrap();
        assert_eq!(pipe.capacity(), DEFAULT_PIPE);
        assert_eq!(HELD.load(Ordering::Relaxed), 0);
    }
}
