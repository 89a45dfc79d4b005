//! A kpx gRPC server's security, decided once at startup from its flags and listen address:
//! plaintext is served only on loopback (or with `--insecure`), and a server reachable from
//! elsewhere must have a way for callers to prove who they are.

use crate::apiserver::ApiServer;
use crate::flags::ServerFlags;
use crate::layer::AuthLayer;
use crate::listener::{Acceptor, Conn, Limits};
use crate::metrics::{AuthMetrics, SecurityLabels};
use crate::pem::PemError;
use crate::policy::Policy;
use crate::server_tls::{ReloadingTls, TlsFiles};
use crate::token::{TokenAuthenticator, TokenConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

/// Largest gRPC message a kpx server decodes from a caller unless a service says otherwise
/// (requests are names and acks; only Sync's acks may carry a long NACK error).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// HTTP/2 streams one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Largest header block (a bearer token is ~1 KiB, a long one a few).
pub const MAX_HEADER_LIST_BYTES: u32 = 32 * 1024;
/// HTTP/2 pings: a peer that does not answer within the timeout is dropped.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// 20 s as grpc-go: a process starved of CPU for a few seconds (a snapshot storm on a busy
/// node) must not look like a dead peer.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("--client-ca-file needs --tls-cert-file and --tls-private-key-file: client certificates are part of TLS")]
    ClientCaWithoutTls,
    #[error(
        "refusing to serve plaintext on {0}, which is not a loopback address: give --tls-cert-file and --tls-private-key-file (or --insecure to serve plaintext anyway)"
    )]
    PlaintextBeyondLoopback(SocketAddr),
    #[error(
        "refusing to serve on {0} without authenticating callers: give --client-ca-file (node and admin certificates) and/or --token-audience (ServiceAccount tokens), or --insecure to let anyone in"
    )]
    NoAuthenticationBeyondLoopback(SocketAddr),
    #[error("--token-audience needs the apiserver for TokenReviews: {0}")]
    NoApiserver(String),
}

/// What a server does with its connections and requests.
#[derive(Clone, Debug)]
pub struct ServerSecurity {
    pub policy: Arc<Policy>,
    pub acceptor: Acceptor,
}

/// Where the apiserver comes from, if the flags ask for the token path.
pub type ApiFor = Option<Arc<dyn ApiServer>>;

impl ServerSecurity {
    /// Plaintext, nobody authenticated: for tests and local runs on loopback.
    pub fn open(metrics: AuthMetrics) -> Self {
        ServerSecurity {
            policy: Arc::new(Policy::open(metrics.clone())),
            acceptor: Acceptor { tls: None, open: true, limits: Limits::default(), metrics },
        }
    }

    /// From the flags. `api` is the apiserver for the token path (required when
    /// `--token-audience` is given); `lookup_pods`: whether node tokens without the node-name
    /// extra may be resolved through their pod. `plane` names the server in log lines.
    /// The flag combinations a server refuses for `listen`, checked before anything binds.
    pub fn check(flags: &ServerFlags, listen: SocketAddr) -> Result<(), SecurityError> {
        let loopback = listen.ip().is_loopback();
        let tls = flags.tls_cert_file.is_some() && flags.tls_private_key_file.is_some();
        if flags.client_ca_file.is_some() && !tls {
            return Err(SecurityError::ClientCaWithoutTls);
        }
        if !tls && !loopback && !flags.insecure {
            return Err(SecurityError::PlaintextBeyondLoopback(listen));
        }
        let authenticates = flags.client_ca_file.is_some() || flags.token_audience.is_some();
        if !authenticates && !loopback && !flags.insecure {
            return Err(SecurityError::NoAuthenticationBeyondLoopback(listen));
        }
        Ok(())
    }

    pub fn from_flags(
        flags: &ServerFlags,
        listen: SocketAddr,
        api: Result<ApiFor, String>,
        lookup_pods: bool,
        metrics: AuthMetrics,
        plane: &str,
    ) -> Result<Self, SecurityError> {
        Self::check(flags, listen)?;
        let loopback = listen.ip().is_loopback();
        let tls_files = flags.tls_cert_file.clone().zip(flags.tls_private_key_file.clone());
        let authenticates = flags.client_ca_file.is_some() || flags.token_audience.is_some();
        let tls = match tls_files {
            Some((cert, key)) => Some(Arc::new(ReloadingTls::load(
                TlsFiles { cert, key, client_ca: flags.client_ca_file.clone() },
                metrics.clone(),
            )?)),
            None => None,
        };
        let api = match (&flags.token_audience, api) {
            (None, _) => None,
            (Some(_), Ok(Some(api))) => Some(api),
            (Some(_), Ok(None)) => return Err(SecurityError::NoApiserver("no apiserver configured".into())),
            (Some(_), Err(e)) => return Err(SecurityError::NoApiserver(e)),
        };
        let tokens = flags.token_audience.as_ref().zip(api.clone()).map(|(audience, api)| {
            let mut config = TokenConfig::new(audience.clone(), flags.node_service_account.clone());
            config.lookup_pods = lookup_pods;
            TokenAuthenticator::new(api, config)
        });
        let policy = match authenticates {
            false => Policy::open(metrics.clone()),
            true => Policy::enforcing(flags.admin_groups.clone(), tokens, api, metrics.clone()),
        };
        let yes_no = |b: bool| if b { "true" } else { "false" }.to_string();
        metrics.set_info(SecurityLabels {
            tls: yes_no(tls.is_some()),
            client_certificates: yes_no(flags.client_ca_file.is_some()),
            tokens: yes_no(flags.token_audience.is_some()),
            insecure: yes_no(!loopback && (tls.is_none() || !authenticates)),
        });
        match (loopback, tls.is_some(), authenticates) {
            (false, false, _) => tracing::warn!(
                %listen,
                "INSECURE: {plane} serves PLAINTEXT beyond loopback (--insecure): credentials and every node's proxy state cross the network unencrypted"
            ),
            (false, true, false) => tracing::warn!(
                %listen,
                "INSECURE: {plane} authenticates NOBODY (--insecure): anyone who reaches {listen} can subscribe as any node and read the cluster's services"
            ),
            (true, _, false) => tracing::info!(%listen, "{plane} on loopback without authentication"),
            _ => tracing::info!(
                %listen,
                tls = tls.is_some(),
                client_certificates = flags.client_ca_file.is_some(),
                tokens = flags.token_audience.is_some(),
                "{plane} authenticates its callers"
            ),
        }
        let limits = Limits {
            max_unauthenticated: flags.max_unauthenticated_connections,
            max_unauthenticated_per_ip: flags.max_unauthenticated_connections_per_ip,
            ..Limits::default()
        };
        Ok(ServerSecurity {
            policy: Arc::new(policy),
            acceptor: Acceptor { tls, open: !authenticates, limits, metrics },
        })
    }

    pub fn layer(&self) -> AuthLayer {
        AuthLayer::new(self.policy.clone())
    }

    /// The connections to hand to tonic's `serve_with_incoming*`.
    pub fn incoming(&self, listener: TcpListener) -> ReceiverStream<Result<Conn, std::io::Error>> {
        self.acceptor.clone().incoming(listener)
    }

    pub fn metrics(&self) -> &AuthMetrics {
        &self.acceptor.metrics
    }

    pub fn is_tls(&self) -> bool {
        self.acceptor.tls.is_some()
    }
}

/// tonic's server builder with kpx's HTTP/2 limits for callers that may be hostile.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_max_pending_accept_reset_streams(Some(32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct F {
        #[command(flatten)]
        s: ServerFlags,
    }

    fn flags(args: &[&str]) -> ServerFlags {
        F::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().s
    }

    fn decide(args: &[&str], listen: &str) -> Result<ServerSecurity, SecurityError> {
        ServerSecurity::from_flags(
            &flags(args),
            listen.parse().unwrap(),
            Ok(None),
            false,
            AuthMetrics::default(),
            "test",
        )
    }

    #[test]
    fn plaintext_only_on_loopback_or_when_asked() {
        assert!(decide(&[], "127.0.0.1:1").unwrap().policy.is_open());
        assert!(decide(&[], "[::1]:1").unwrap().policy.is_open());
        let err = decide(&[], "0.0.0.0:10900").unwrap_err();
        assert!(err.to_string().starts_with("refusing to serve plaintext on 0.0.0.0:10900"), "{err}");
        let insecure = decide(&["--insecure"], "0.0.0.0:10900").unwrap();
        assert!(insecure.policy.is_open() && !insecure.is_tls());
    }

    #[test]
    fn unusable_combinations_are_refused_with_the_flag_named() {
        let err = decide(&["--client-ca-file", "ca.pem"], "127.0.0.1:1").unwrap_err();
        assert!(matches!(err, SecurityError::ClientCaWithoutTls), "{err}");
        let err = decide(&["--token-audience", "kpx"], "127.0.0.1:1").unwrap_err();
        assert_eq!(err.to_string(), "--token-audience needs the apiserver for TokenReviews: no apiserver configured");
        let err = decide(&["--tls-cert-file", "/nonexistent/c.pem", "--tls-private-key-file", "k"], "127.0.0.1:1")
            .unwrap_err();
        assert!(err.to_string().starts_with("cannot read certificate file /nonexistent/c.pem"), "{err}");
    }
}
