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
use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// Empty pipes kept per thread for the next transfers: making one is three system calls
/// (pipe2, F_SETPIPE_SZ, and a close for each end later).
const POOL: usize = 256;

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

    /// A non-blocking pipe of (at least) `size` bytes; a size the kernel refuses (above
    /// /proc/sys/fs/pipe-max-size for an unprivileged process) leaves its default 64 KiB.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if size > 65536 {
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(i32::try_from(size).unwrap_or(i32::MAX)));
        }
        Ok(Pipe { read, write })
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
