//! The gRPC channel to the controlplane, and errors that say what to do about a failure.

use kpx_auth::client::{AuthChannel, ClientCredentials, ConnectError};
use kpx_proto::v1::inspect_client::InspectClient;
use std::error::Error as _;
use std::io;
use std::time::Duration;
use tonic::Code;

/// How long to wait for the controlplane to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one inspection RPC may take; the controlplane computes a node's state on demand,
/// which is fast, so waiting longer would only hide a stuck server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid controlplane address {addr:?}: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error("cannot reach the controlplane at {addr}: {reason} (is kpx-controlplane running?)")]
    Unreachable { addr: String, reason: String },
    #[error("cannot reach the dataplane admin API at {addr}: {reason} (is kpx-dataplane running with --admin-listen?)")]
    DataplaneUnreachable { addr: String, reason: String },
    #[error("the dataplane at {addr} is node {actual:?}, not {expected:?}")]
    WrongNode { addr: String, expected: String, actual: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{0}")]
    Credentials(#[from] kpx_auth::client::CredentialError),
    #[error("certificates: {reason}")]
    Certs { reason: String },
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error(
        "{addr} refused the credentials: {message} (kpxctl sends --cert/--key, --token-file or --kubeconfig's user)"
    )]
    Unauthenticated { addr: String, message: String },
    #[error("{addr} denied {rpc}: {message}")]
    Denied { addr: String, rpc: &'static str, message: String },
    /// Also what a plain HTTP server answers (404 maps to Unimplemented), hence the hint.
    #[error(
        "the server at {addr} does not serve kpx.v1.Inspect/{rpc} (is it kpx-controlplane, of this version?): {message}"
    )]
    Unimplemented { addr: String, rpc: &'static str, message: String },
    #[error("{rpc} failed: {code}: {message}")]
    Rpc { rpc: &'static str, code: Code, message: String },
    #[error("the watch stream broke: {message}")]
    Stream { message: String },
    #[error("encoding the output as {format}: {reason}")]
    Encode { format: &'static str, reason: String },
}

/// Accepts `host:port` as a shorthand for `http://host:port`.
pub fn normalize_address(addr: &str) -> Result<String, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidAddress { addr: addr.to_string(), reason: reason.to_string() };
    let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
    let Some(host) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return Err(invalid("expected http://HOST:PORT or https://HOST:PORT"));
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    Ok(url)
}

/// Opens a channel eagerly, so that an unreachable server is reported as such and not as the
/// failure of whichever RPC came first. `unreachable` words the error for the server asked.
pub async fn open(
    url: &str,
    creds: &ClientCredentials,
    timeout: Duration,
    unreachable: impl Fn(String) -> ClientError,
) -> Result<AuthChannel, ClientError> {
    let tune = |ep: tonic::transport::Endpoint| ep.connect_timeout(timeout).timeout(REQUEST_TIMEOUT);
    // The outer timeout also covers name resolution, which connect_timeout does not.
    match tokio::time::timeout(timeout, kpx_auth::client::connect(url, creds, tune)).await {
        Err(_) => Err(unreachable(format!("no answer within {}s", timeout.as_secs()))),
        Ok(Err(ConnectError::Credentials(e))) => Err(e.into()),
        Ok(Err(ConnectError::Transport(e))) => Err(unreachable(root_cause(&e))),
        Ok(Ok(channel)) => Ok(channel),
    }
}

pub async fn connect(
    url: &str,
    creds: &ClientCredentials,
    timeout: Duration,
) -> Result<InspectClient<AuthChannel>, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { addr: url.to_string(), reason };
    open(url, creds, timeout, unreachable).await.map(InspectClient::new)
}

/// tonic's transport errors display as "transport error"; the useful part is at the bottom of
/// the source chain, usually an io::Error.
pub(crate) fn root_cause(err: &tonic::transport::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    let mut current = err.source();
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return describe_io(io);
        }
        cause = e;
        current = e.source();
    }
    cause.to_string()
}

fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::TimedOut => "connection timed out".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset".to_string(),
        io::ErrorKind::HostUnreachable => "host unreachable".to_string(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => e.to_string(),
    }
}

/// Maps a failed RPC to an error. `subject` names what was asked for ("node \"a\""), for
/// NotFound.
pub fn status_error(addr: &str, rpc: &'static str, subject: Option<String>, status: tonic::Status) -> ClientError {
    match (status.code(), subject) {
        (Code::NotFound, Some(what)) => ClientError::NotFound { what },
        (Code::Unimplemented, _) => {
            ClientError::Unimplemented { addr: addr.to_string(), rpc, message: status.message().to_string() }
        }
        (Code::Unavailable, _) => {
            ClientError::Unreachable { addr: addr.to_string(), reason: status.message().to_string() }
        }
        (Code::Unauthenticated, _) => {
            ClientError::Unauthenticated { addr: addr.to_string(), message: status.message().to_string() }
        }
        (Code::PermissionDenied, _) => {
            ClientError::Denied { addr: addr.to_string(), rpc, message: status.message().to_string() }
        }
        (code, _) => ClientError::Rpc { rpc, code, message: status.message().to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(normalize_address("http://127.0.0.1:10900").unwrap(), "http://127.0.0.1:10900");
        assert_eq!(normalize_address("cp.kpx:10900").unwrap(), "http://cp.kpx:10900");
        assert_eq!(normalize_address("https://cp:1").unwrap(), "https://cp:1");
        for bad in ["ftp://cp", "http://", "https://"] {
            let err = normalize_address(bad).unwrap_err();
            assert!(matches!(err, ClientError::InvalidAddress { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn not_found_names_the_subject() {
        let err =
            status_error("http://cp:1", "GetNodeState", Some("node \"node-c\"".into()), tonic::Status::not_found("x"));
        assert_eq!(err.to_string(), "node \"node-c\" not found");
    }

    #[test]
    fn other_statuses() {
        let err = status_error("http://cp:1", "ListNodes", None, tonic::Status::unimplemented("404"));
        assert_eq!(
            err.to_string(),
            "the server at http://cp:1 does not serve kpx.v1.Inspect/ListNodes (is it kpx-controlplane, of this version?): 404"
        );
        let err = status_error("http://cp:1", "ListNodes", None, tonic::Status::internal("boom"));
        assert!(matches!(err, ClientError::Rpc { code: Code::Internal, .. }));
        assert!(err.to_string().contains("boom"), "{err}");
        let err = status_error("http://cp:1", "ListNodes", None, tonic::Status::unavailable("gone"));
        assert!(err.to_string().starts_with("cannot reach the controlplane at http://cp:1: gone"), "{err}");
    }

    #[tokio::test]
    async fn refused_connection_names_the_address() {
        // Bind then drop, so nothing listens on the port.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let err = connect(&url, &ClientCredentials::default(), CONNECT_TIMEOUT).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot reach the controlplane at {url}: connection refused (is kpx-controlplane running?)")
        );
    }
}
