//! The accept loop of a kpx gRPC server: TCP, then TLS, then connections handed to tonic with
//! who is on the other end ([`ConnInfo`] in every request's extensions).
//!
//! It is also the first defence against callers that never prove who they are: at most
//! `max_unauthenticated` connections may be open without having authenticated, and at most
//! `max_unauthenticated_per_ip` from one address (more are closed at accept, and counted: one
//! hostile pod cannot use up the places real nodes reconnect through), a TLS handshake must
//! finish within `handshake_timeout`, and a
//! connection must carry an authenticated request within `auth_deadline` of its accept or be
//! closed. A verified client certificate authenticates the connection at the handshake; a
//! token does at the first request it authorizes. Established, authenticated connections (the
//! nodes' streams) are never affected by any of this.

use crate::identity::CertSubject;
use crate::io::MaybeTls;
use crate::metrics::AuthMetrics;
use crate::server_tls::{ReloadingTls, peer_subject};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// From accept to the first authenticated request.
    pub auth_deadline: Duration,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            auth_deadline: Duration::from_secs(10),
            max_unauthenticated: 256,
            max_unauthenticated_per_ip: 32,
        }
    }
}

/// Unauthenticated connections per peer address.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Per connection: whether it has authenticated, and its place among the unauthenticated ones.
#[derive(Debug)]
struct ConnState {
    authenticated: AtomicBool,
    slot: Mutex<Option<Slot>>,
    metrics: AuthMetrics,
}

impl ConnState {
    fn authenticate(&self) {
        if !self.authenticated.swap(true, Ordering::AcqRel) {
            self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// A place among the unauthenticated connections; freed when the connection authenticates or
/// closes.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: PerIp,
    metrics: AuthMetrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.unauthenticated().dec();
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Who is connected: tonic puts a clone into every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// The client certificate's subject, verified against the client CA.
    pub certificate: Option<Arc<CertSubject>>,
    pub tls: bool,
    state: Arc<ConnState>,
}

impl ConnInfo {
    /// Called when a request on this connection authenticated: the connection is no longer
    /// subject to the unauthenticated cap and deadline.
    pub fn mark_authenticated(&self) {
        self.state.authenticate();
    }
}

/// One accepted connection.
pub struct Conn {
    io: MaybeTls<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>,
    info: ConnInfo,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.info.state.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline {
            if this.info.state.authenticated.load(Ordering::Acquire) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.info.state.metrics.connection_rejected("no_authenticated_request");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no authenticated request in time")));
            }
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// How a server accepts connections.
#[derive(Clone, Debug)]
pub struct Acceptor {
    pub tls: Option<Arc<ReloadingTls>>,
    /// Nobody authenticates (loopback or `--insecure`): connections count as authenticated.
    pub open: bool,
    pub limits: Limits,
    pub metrics: AuthMetrics,
}

impl Acceptor {
    /// Accepts on `listener` until the returned stream is dropped (the server stopped).
    pub fn incoming(self, listener: TcpListener) -> ReceiverStream<Result<Conn, io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.accept_loop(listener, tx));
        ReceiverStream::new(rx)
    }

    async fn accept_loop(self, listener: TcpListener, tx: mpsc::Sender<Result<Conn, io::Error>>) {
        let slots = Arc::new(Semaphore::new(self.limits.max_unauthenticated.max(1)));
        let per_ip = PerIp::default();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let slot = match self.open {
                true => None,
                false => match self.take_slot(&slots, &per_ip, remote.ip()) {
                    Ok(slot) => Some(slot),
                    Err(reason) => {
                        self.metrics.connection_rejected(reason);
                        tracing::debug!(%remote, reason, "closing connection: too many unauthenticated connections");
                        continue;
                    }
                },
            };
            let state = Arc::new(ConnState {
                authenticated: AtomicBool::new(self.open),
                slot: Mutex::new(slot),
                metrics: self.metrics.clone(),
            });
            let (this, tx) = (self.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(conn) = this.handshake(tcp, remote, state).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    }

    /// A place among the unauthenticated connections, or the reason there is none.
    fn take_slot(&self, slots: &Arc<Semaphore>, per_ip: &PerIp, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut counts = per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= self.limits.max_unauthenticated_per_ip.max(1) {
            return Err("too_many_unauthenticated_from_address");
        }
        let permit = slots.clone().try_acquire_owned().map_err(|_| "too_many_unauthenticated")?;
        *count += 1;
        self.metrics.unauthenticated().inc();
        Ok(Slot { _permit: permit, ip, per_ip: per_ip.clone(), metrics: self.metrics.clone() })
    }

    async fn handshake(&self, tcp: TcpStream, remote: SocketAddr, state: Arc<ConnState>) -> Option<Conn> {
        let accepted_at = Instant::now();
        let (io, certificate) = match &self.tls {
            None => (MaybeTls::Plain(tcp), None),
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let stream = match tokio::time::timeout(self.limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(error)) => {
                        // Untrusted, expired, garbage: said to the peer by a TLS alert.
                        self.metrics.connection_rejected("handshake_failed");
                        tracing::debug!(%remote, %error, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        self.metrics.connection_rejected("handshake_timeout");
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return None;
                    }
                };
                let certificate = match peer_subject(stream.get_ref().1) {
                    None => None,
                    Some(Ok(subject)) => Some(Arc::new(subject)),
                    Some(Err(error)) => {
                        self.metrics.connection_rejected("bad_client_certificate");
                        tracing::warn!(%remote, %error, "closing connection: unusable client certificate");
                        return None;
                    }
                };
                (MaybeTls::Tls(Box::new(stream)), certificate)
            }
        };
        if certificate.is_some() {
            state.authenticate();
        }
        let deadline = match state.authenticated.load(Ordering::Acquire) {
            true => None,
            false => Some(Box::pin(tokio::time::sleep_until(accepted_at + self.limits.auth_deadline))),
        };
        let info = ConnInfo { remote: Some(remote), certificate, tls: self.tls.is_some(), state };
        Some(Conn { io, info, deadline })
    }
}
