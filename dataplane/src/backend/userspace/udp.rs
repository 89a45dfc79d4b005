//! UDP portals: one flow per client (address and port, and the local address it reached), each
//! with its own socket connected to one endpoint, closed after [`Settings::udp_timeout`] without
//! a datagram either way.
//!
//! Replies leave from exactly the address the client's datagram was redirected to (IP_PKTINFO
//! on receive and send): conntrack undoes the REDIRECT or DNAT only for a reply from that
//! address, and the client's socket accepts only a reply from the service address. Replying
//! from whatever address routing picks breaks host traffic (DNATed to the loopback) and any
//! interface with more than one address.
//!
//! Backpressure: each flow has a small bounded queue towards its endpoint, and a reply the
//! client's socket cannot take is dropped; nothing buffers without bound, as datagrams may be
//! lost anyway. An endpoint that answers with ICMP port unreachable before it ever replied is
//! refused: the flow resends its last datagram to the next endpoint (the TCP dial's retry). A
//! flow whose endpoint is removed ends at once: the client's next datagram is balanced anew.
//!
//! [`Settings::udp_timeout`]: super::portal::Settings

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage, recvmsg, sendmsg,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::portal::{DIAL_TIMEOUTS, Portal};
use super::splice::Activity;

/// The largest datagram.
const MAX_DATAGRAM: usize = 65536;
/// Datagrams queued towards one flow's endpoint at most.
const FLOW_QUEUE: usize = 64;

/// A client as the proxy sees it: its address, and the local address its datagram reached.
type ClientKey = (SocketAddr, IpAddr);

#[derive(Default)]
struct Flows {
    by_client: HashMap<ClientKey, (u64, mpsc::Sender<Vec<u8>>)>,
    next_id: u64,
}

thread_local! {
    /// Receive buffer of the flows running on this thread, so that an idle flow holds none.
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// Receives one datagram: (length, client, local address it was sent to).
fn recv_with_dst(sock: &UdpSocket, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<(usize, SocketAddr, IpAddr)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::MSG_DONTWAIT)?;
    let mut local = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(pi) => {
                local = Some(IpAddr::V4(Ipv4Addr::from(pi.ipi_addr.s_addr.to_ne_bytes())))
            }
            ControlMessageOwned::Ipv6PacketInfo(pi) => local = Some(IpAddr::V6(Ipv6Addr::from(pi.ipi6_addr.s6_addr))),
            _ => {}
        }
    }
    let peer = msg.address.and_then(|a| {
        a.as_sockaddr_in().map(|s| SocketAddr::from(*s)).or_else(|| a.as_sockaddr_in6().map(|s| SocketAddr::from(*s)))
    });
    match (peer, local) {
        (Some(p), Some(l)) => Ok((msg.bytes, p, l)),
        _ => Err(io::Error::other("datagram without a source or packet info")),
    }
}

/// Sends `data` to `to` from local address `from`.
fn send_from(sock: &UdpSocket, data: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let fd = sock.as_raw_fd();
    let sent = match (to, from) {
        (SocketAddr::V4(to), IpAddr::V4(from)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr { s_addr: u32::from_ne_bytes(from.octets()) },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&SockaddrIn::from(to)))
        }
        (SocketAddr::V6(to), IpAddr::V6(from)) => {
            let info = libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: from.octets() }, ipi6_ifindex: 0 };
            let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::MSG_DONTWAIT, Some(&SockaddrIn6::from(to)))
        }
        _ => return Err(io::Error::other("reply across address families")),
    };
    Ok(sent?)
}

/// Serves a UDP portal on `sock` (packet info enabled) until `stop` turns true; the flows end
/// with it.
pub async fn serve(sock: UdpSocket, portal: Arc<Portal>, mut stop: watch::Receiver<bool>) {
    let sock = Arc::new(sock);
    let flows = Arc::new(Mutex::new(Flows::default()));
    let (closed_tx, closed_rx) = watch::channel(false);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    loop {
        let got = tokio::select! {
            r = sock.async_io(Interest::READABLE, || recv_with_dst(&sock, &mut buf, &mut cmsg)) => r,
            _ = stop.changed() => break,
        };
        let (n, client, local) = match got {
            Ok(g) => g,
            Err(error) => {
                // An ICMP error queued on the socket, or a datagram without packet info.
                tracing::debug!(portal = %portal.name, %error, "receive failed");
                continue;
            }
        };
        dispatch(&sock, &portal, &flows, &closed_rx, (client, local), &buf[..n]);
    }
    let _ = closed_tx.send(true);
    tracing::debug!(portal = %portal.name, "UDP listener closed");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands one datagram to its client's flow, opening the flow if it has none.
fn dispatch(
    sock: &Arc<UdpSocket>,
    portal: &Arc<Portal>,
    flows: &Arc<Mutex<Flows>>,
    closed: &watch::Receiver<bool>,
    key: ClientKey,
    data: &[u8],
) {
    let mut table = lock(flows);
    if let Some((_, tx)) = table.by_client.get(&key) {
        match tx.try_send(data.to_vec()) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                portal.metrics.udp_dropped.inc();
                return;
            }
            // The flow just ended: a new one takes the datagram.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                table.by_client.remove(&key);
            }
        }
    }
    if table.by_client.len() >= portal.settings.max_udp_flows {
        portal.metrics.udp_dropped.inc();
        return;
    }
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let _ = tx.try_send(data.to_vec());
    let id = table.next_id;
    table.next_id += 1;
    table.by_client.insert(key, (id, tx));
    drop(table);
    let f = Flow { key, portal: portal.clone(), sock: sock.clone(), flows: flows.clone(), id };
    tokio::spawn(f.run(rx, closed.clone()));
}

struct Flow {
    key: ClientKey,
    portal: Arc<Portal>,
    /// The portal's socket, which replies go out of.
    sock: Arc<UdpSocket>,
    flows: Arc<Mutex<Flows>>,
    id: u64,
}

/// Why a flow's socket stopped serving it.
enum Next {
    /// The endpoint refused before it ever replied: try the next one.
    Refused,
    End,
}

impl Flow {
    async fn run(self, mut rx: mpsc::Receiver<Vec<u8>>, mut closed: watch::Receiver<bool>) {
        let c = &self.portal.counters;
        c.opened.inc();
        c.active.inc();
        let (to_endpoint, to_client) = (&c.to_endpoint, &c.to_client);
        let activity = Activity::default();
        let mut failed = Vec::new();
        // The last datagram sent before the endpoint replied, to resend if it refuses.
        let mut unanswered: Option<Vec<u8>> = None;
        'endpoints: while failed.len() < DIAL_TIMEOUTS.len() {
            let Some(ep) = self.portal.pick(self.key.0.ip(), &failed) else {
                c.no_endpoint.inc();
                break;
            };
            let upstream = match connect(ep.addr).await {
                Ok(s) => s,
                Err(_) => {
                    self.portal.dial_failed(ep.addr);
                    failed.push(ep.addr);
                    continue;
                }
            };
            if let Some(d) = &unanswered {
                let _ = upstream.send(d).await;
            }
            let mut replied = false;
            let next = loop {
                tokio::select! {
                    d = rx.recv() => {
                        let Some(d) = d else { break Next::End };
                        activity.touch();
                        match upstream.send(&d).await {
                            Ok(n) => {
                                to_endpoint.inc_by(n as u64);
                            }
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !replied => break Next::Refused,
                            Err(_) => break Next::End,
                        }
                        if !replied {
                            unanswered = Some(d);
                        }
                    }
                    r = upstream.ready(Interest::READABLE | Interest::ERROR) => {
                        let Ok(ready) = r else { break Next::End };
                        // An ICMP error (port unreachable: refused) is only an error event.
                        if ready.is_error() {
                            match upstream.take_error() {
                                Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused && !replied => break Next::Refused,
                                Ok(Some(_)) | Err(_) => break Next::End,
                                Ok(None) => {
                                    let _ = upstream.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                                }
                            }
                        }
                        if !ready.is_readable() {
                            continue;
                        }
                        match self.relay(&upstream).await {
                            Ok(Some(n)) => {
                                if !replied {
                                    self.portal.dial_answered(ep.addr);
                                }
                                replied = true;
                                unanswered = None;
                                activity.touch();
                                to_client.inc_by(n as u64);
                            }
                            Ok(None) => {}
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !replied => break Next::Refused,
                            Err(_) => break Next::End,
                        }
                    }
                    _ = activity.idle_for(self.portal.settings.udp_timeout) => break Next::End,
                    _ = ep.retired() => break Next::End,
                    _ = closed.changed() => break Next::End,
                }
            };
            match next {
                Next::Refused => {
                    self.portal.dial_failed(ep.addr);
                    failed.push(ep.addr);
                    continue 'endpoints;
                }
                Next::End => break,
            }
        }
        c.active.dec();
        let mut table = lock(&self.flows);
        if table.by_client.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            table.by_client.remove(&self.key);
        }
    }

    /// Passes one datagram from the endpoint to the client; `None` when there was none after
    /// all (readiness was stale).
    async fn relay(&self, upstream: &UdpSocket) -> io::Result<Option<usize>> {
        let (client, local) = self.key;
        let got = BUF.with(|b| -> io::Result<Relayed> {
            let mut b = b.borrow_mut();
            let n = match upstream.try_recv(&mut b) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Relayed::Nothing),
                Err(e) => return Err(e),
            };
            match self.sock.try_io(Interest::WRITABLE, || send_from(&self.sock, &b[..n], client, local)) {
                // Rare: keep this one datagram to send once the socket can take it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Relayed::Pending(b[..n].to_vec())),
                // Other send errors lose the datagram, as the network may.
                _ => Ok(Relayed::Sent(n)),
            }
        })?;
        match got {
            Relayed::Nothing => Ok(None),
            Relayed::Sent(n) => Ok(Some(n)),
            Relayed::Pending(data) => {
                let _ = self.sock.async_io(Interest::WRITABLE, || send_from(&self.sock, &data, client, local)).await;
                Ok(Some(data.len()))
            }
        }
    }
}

/// What [`Flow::relay`] did with the endpoint's socket.
enum Relayed {
    /// Nothing to read after all (stale readiness).
    Nothing,
    Sent(usize),
    /// Read, but the portal's socket was full: to send when it can take it.
    Pending(Vec<u8>),
}

/// A socket connected to the endpoint (no packet leaves until the first datagram).
async fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = UdpSocket::bind(any).await?;
    s.connect(addr).await?;
    Ok(s)
}
