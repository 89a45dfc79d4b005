//! TCP portals: accept, pick an endpoint, dial it (the next one when it refuses or does not
//! answer in time, within the same client connection), then forward both directions with
//! [`splice::pump`] until both have ended.
//!
//! A connection ends when both directions reached their end (each end is passed on as a
//! half-close), when either side resets (the other is reset too), when nothing moved for the
//! idle timeout, or when its endpoint was removed and the drain timeout passed. Ending early
//! resets both sides (SO_LINGER 0), so neither takes a truncated stream for a complete one.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::portal::{DIAL_TIMEOUTS, Portal};
use super::splice::{Activity, pump};

/// Accepts until `stop` turns true; established connections are left to their own end.
pub async fn serve(listener: TcpListener, portal: Arc<Portal>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    tokio::spawn(handle(client, peer, portal.clone()));
                }
                Err(error) => {
                    // Out of file descriptors or memory: wait instead of spinning; the backlog
                    // holds the clients meanwhile.
                    tracing::warn!(portal = %portal.name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    tracing::debug!(portal = %portal.name, "listener closed");
}

/// A socket that will be closed with a reset rather than a FIN.
fn abort(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

async fn dial(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// The endpoint connection for `client`: endpoints in turn, each failure counted, until one
/// answers or the attempts are used up.
async fn connect(portal: &Portal, client: SocketAddr) -> Option<(TcpStream, Arc<super::endpoint::Endpoint>)> {
    let mut failed = Vec::new();
    for timeout in DIAL_TIMEOUTS {
        let ep = portal.pick(client.ip(), &failed)?;
        match dial(ep.addr, timeout).await {
            Ok(s) => {
                portal.dial_answered(ep.addr);
                return Some((s, ep));
            }
            Err(error) => {
                portal.dial_failed(ep.addr);
                tracing::debug!(portal = %portal.name, endpoint = %ep.addr, %error, "dial failed; trying the next endpoint");
                failed.push(ep.addr);
            }
        }
    }
    None
}

async fn handle(client: TcpStream, peer: SocketAddr, portal: Arc<Portal>) {
    let c = &portal.counters;
    c.opened.inc();
    let Some((upstream, ep)) = connect(&portal, peer).await else {
        c.no_endpoint.inc();
        tracing::debug!(portal = %portal.name, client = %peer, "no endpoint answered");
        abort(&client);
        return;
    };
    c.active.inc();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(error) = forward(&client, &upstream, &portal, &ep).await {
        tracing::debug!(portal = %portal.name, client = %peer, endpoint = %ep.addr, %error, "connection aborted");
        abort(&client);
        abort(&upstream);
    }
    c.active.dec();
}

/// Forwards until both directions ended; an error means the connection must be reset.
async fn forward(
    client: &TcpStream,
    upstream: &TcpStream,
    portal: &Portal,
    ep: &super::endpoint::Endpoint,
) -> io::Result<()> {
    let settings = &portal.settings;
    let c = &portal.counters;
    let activity = Activity::default();
    let size = settings.pipe_size;
    let both = async {
        tokio::try_join!(
            pump(client, upstream, size, &c.to_endpoint, &activity),
            pump(upstream, client, size, &c.to_client, &activity),
        )
        .map(|_| ())
    };
    let idle = async {
        match settings.tcp_idle_timeout {
            Some(t) => activity.idle_for(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = both => r,
        _ = idle => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
        _ = ep.closing() => Err(io::Error::other("endpoint removed and drain timeout passed")),
    }
}
