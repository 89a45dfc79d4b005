//! The proxy itself: its own tokio runtime (so that forwarding never waits behind the agent's
//! gRPC and housekeeping work, nor they behind it) and the open portals. Opening a portal binds
//! its socket on a port the kernel picks and starts its task; closing one stops accepting at
//! once and leaves established connections to drain.
//!
//! With `netns` (tests and benchmarks), every thread of the runtime enters that network
//! namespace when it starts, so listeners and connections to endpoints live there while the
//! agent itself stays where it is.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, sockopt};
use tokio::sync::watch;

use super::metrics::ProxyMetrics;
use super::plan::{PortalKey, PortalSpec, Proto};
use super::portal::{Portal, Settings};
use super::{tcp, udp};
use crate::backend::iptables::render::IpFamily;

/// Pending connections per TCP portal (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot start the proxy runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("cannot enter network namespace {name}: {source}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a {proto} listener for {name}: {source}")]
    Listen {
        proto: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

struct Open {
    port: u16,
    portal: Arc<Portal>,
    stop: watch::Sender<bool>,
}

pub struct Proxy {
    /// Always Some; taken by Drop.
    rt: Option<tokio::runtime::Runtime>,
    portals: BTreeMap<PortalKey, Open>,
    settings: Arc<Settings>,
    metrics: Arc<ProxyMetrics>,
}

/// Enters network namespace `name` (`ip netns` names it under /run/netns) on this thread.
fn enter(ns: &std::fs::File) -> nix::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
}

impl Proxy {
    pub fn new(
        threads: usize,
        netns: Option<&str>,
        settings: Arc<Settings>,
        metrics: Arc<ProxyMetrics>,
    ) -> Result<Proxy, ProxyError> {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads.max(1)).thread_name("kpx-proxy").enable_all();
        if let Some(name) = netns {
            let err = |source| ProxyError::Netns { name: name.to_string(), source };
            let file = Arc::new(std::fs::File::open(format!("/run/netns/{name}")).map_err(err)?);
            // Tried once on a throwaway thread, so that a namespace we cannot enter is an error
            // here rather than a panic in a runtime thread.
            let probe = file.clone();
            std::thread::spawn(move || enter(&probe))
                .join()
                .unwrap_or(Err(nix::errno::Errno::EINVAL))
                .map_err(|e| err(e.into()))?;
            b.on_thread_start(move || {
                if let Err(e) = enter(&file) {
                    panic!("kpx-proxy thread cannot enter its network namespace: {e}");
                }
            });
        }
        let rt = b.build().map_err(ProxyError::Runtime)?;
        Ok(Proxy { rt: Some(rt), portals: BTreeMap::new(), settings, metrics })
    }

    /// The port of every open portal.
    pub fn ports(&self) -> BTreeMap<PortalKey, u16> {
        self.portals.iter().map(|(k, o)| (k.clone(), o.port)).collect()
    }

    pub fn contains(&self, key: &PortalKey) -> bool {
        self.portals.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &PortalKey> {
        self.portals.keys()
    }

    /// Opens `key` (or, when open, updates its endpoints) and returns its port.
    pub fn open(&mut self, key: &PortalKey, spec: &PortalSpec) -> Result<u16, ProxyError> {
        if let Some(o) = self.portals.get(key) {
            o.portal.update(spec);
            return Ok(o.port);
        }
        let portal = Arc::new(Portal::new(key.clone(), spec, self.settings.clone(), self.metrics.clone()));
        let (stop, stopped) = watch::channel(false);
        let (tx, rx) = std::sync::mpsc::channel();
        let (proto, family, p) = (key.proto, key.family, portal.clone());
        let rt = self.rt.as_ref().expect("the runtime lives as long as the proxy");
        // Bound on a runtime thread (in the proxy's namespace), and served right there.
        rt.spawn(async move {
            match proto {
                Proto::Tcp => match listen_tcp(family) {
                    Ok((l, port)) => {
                        let _ = tx.send(Ok(port));
                        tcp::serve(l, p, stopped).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                },
                Proto::Udp => match bind_udp(family) {
                    Ok((s, port)) => {
                        let _ = tx.send(Ok(port));
                        udp::serve(s, p, stopped).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                },
            }
        });
        let err = |source| ProxyError::Listen { proto: proto.as_str(), name: spec.name.clone(), source };
        let port = rx.recv().map_err(|_| err(io::Error::other("listener task ended")))?.map_err(err)?;
        tracing::debug!(portal = %spec.name, class = ?key.class, family = ?key.family, proto = proto.as_str(), port, "portal open");
        self.portals.insert(key.clone(), Open { port, portal, stop });
        Ok(port)
    }

    /// Stops accepting on `key`; its connections drain (see [`Settings::drain_timeout`]).
    pub fn close(&mut self, key: &PortalKey) {
        if let Some(o) = self.portals.remove(key) {
            let _ = o.stop.send(true);
            o.portal.close();
            if !self.portals.values().any(|p| p.portal.name == o.portal.name) {
                self.metrics.forget(&o.portal.name);
            }
            tracing::debug!(portal = %o.portal.name, port = o.port, "portal closed");
        }
    }

    /// Endpoints of an open portal (tests).
    pub fn endpoint_count(&self, key: &PortalKey) -> Option<usize> {
        self.portals.get(key).map(|o| o.portal.endpoint_count())
    }
}

impl Drop for Proxy {
    /// Without waiting for the tasks: the agent drops its backend from async code, where a
    /// runtime may not block. Connections end with the process.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A non-blocking socket of `family`; IPv6 ones only IPv6 (the IPv4 portals are separate).
fn socket(family: IpFamily, ty: SockType) -> io::Result<OwnedFd> {
    let af = match family {
        IpFamily::V4 => AddressFamily::Inet,
        IpFamily::V6 => AddressFamily::Inet6,
    };
    let fd = socket::socket(af, ty, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    if family == IpFamily::V6 {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    Ok(fd)
}

fn any(family: IpFamily) -> SocketAddr {
    match family {
        IpFamily::V4 => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpFamily::V6 => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A TCP listener on every address of the namespace, on a port the kernel picks: REDIRECT
/// delivers to the incoming interface's primary address, DNAT from the node to the loopback.
fn listen_tcp(family: IpFamily) -> io::Result<(tokio::net::TcpListener, u16)> {
    let s = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket(family, SockType::Stream)?));
    s.set_reuseaddr(true)?;
    s.bind(any(family))?;
    let l = s.listen(BACKLOG)?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// A UDP socket on every address, with packet info on (see `udp`).
fn bind_udp(family: IpFamily) -> io::Result<(tokio::net::UdpSocket, u16)> {
    let fd = socket(family, SockType::Datagram)?;
    match family {
        IpFamily::V4 => socket::setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?,
        IpFamily::V6 => socket::setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?,
    }
    let addr = socket::SockaddrStorage::from(any(family));
    socket::bind(fd.as_raw_fd(), &addr)?;
    let s = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
    let port = s.local_addr()?.port();
    Ok((s, port))
}

#[cfg(test)]
mod tests;
