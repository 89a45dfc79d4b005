//! The security flags both binaries share, named as Kubernetes components name them.

use crate::client::ClientCredentials;
use std::path::PathBuf;

/// A gRPC server's TLS and authentication.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerFlags {
    /// Serving certificate (PEM, intermediates after it). Re-read when the file changes.
    #[arg(long, value_name = "FILE", requires = "tls_private_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The serving certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle for client certificates: CN=system:node:<name> proves a node (kubelet client
    /// certificates do), an O listed in --admin-group an admin.
    #[arg(long, value_name = "FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// Accept Kubernetes bearer tokens, checked with TokenReview; node (dataplane) tokens must be
    /// issued for this audience. Other users' tokens are authorized with SubjectAccessReview.
    #[arg(long, value_name = "AUDIENCE")]
    pub token_audience: Option<String>,
    /// The ServiceAccount whose tokens prove a node.
    #[arg(long, value_name = "NAMESPACE/NAME", default_value = "kpx-system/kpx-dataplane", value_parser = parse_service_account)]
    pub node_service_account: (String, String),
    /// Certificate organizations (groups) that may inspect every node (repeat for several).
    #[arg(long = "admin-group", value_name = "GROUP", default_value = "system:masters")]
    pub admin_groups: Vec<String>,
    /// Serve plaintext or unauthenticated on a non-loopback address anyway (development only:
    /// anyone who reaches the port can then subscribe as any node).
    #[arg(long)]
    pub insecure: bool,
    /// Connections that have not authenticated yet, at most; more are closed at accept.
    #[arg(long, value_name = "N", default_value_t = crate::listener::Limits::default().max_unauthenticated)]
    pub max_unauthenticated_connections: usize,
    /// Of those, at most this many from one address.
    #[arg(long, value_name = "N", default_value_t = crate::listener::Limits::default().max_unauthenticated_per_ip)]
    pub max_unauthenticated_connections_per_ip: usize,
}

/// The flags' defaults (plaintext, no authentication), for servers built in code.
impl Default for ServerFlags {
    fn default() -> Self {
        let limits = crate::listener::Limits::default();
        ServerFlags {
            tls_cert_file: None,
            tls_private_key_file: None,
            client_ca_file: None,
            token_audience: None,
            node_service_account: ("kpx-system".into(), "kpx-dataplane".into()),
            admin_groups: vec!["system:masters".into()],
            insecure: false,
            max_unauthenticated_connections: limits.max_unauthenticated,
            max_unauthenticated_connections_per_ip: limits.max_unauthenticated_per_ip,
        }
    }
}

fn parse_service_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
    }
}

/// How a client proves who it is and checks whom it talks to.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientFlags {
    /// CA bundle that signed the server's certificate (for https:// addresses).
    #[arg(long, value_name = "FILE", env = "KPX_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to the server.
    #[arg(long, value_name = "FILE", env = "KPX_CERT", requires = "key", global = true)]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", env = "KPX_KEY", requires = "cert", global = true)]
    pub key: Option<PathBuf>,
    /// Bearer token file, read at every connect (a projected ServiceAccount token is rotated by
    /// the kubelet).
    #[arg(long, value_name = "FILE", env = "KPX_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
}

impl ClientFlags {
    pub fn credentials(&self) -> ClientCredentials {
        ClientCredentials::from_files(
            self.cacert.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
            self.token_file.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Both {
        #[command(flatten)]
        server: ServerFlags,
        #[command(flatten)]
        client: ClientFlags,
    }

    #[test]
    fn defaults_and_pairs() {
        let f = Both::try_parse_from(["x"]).unwrap();
        let d = ServerFlags::default();
        assert_eq!(
            (&f.server.node_service_account, &f.server.admin_groups, f.server.max_unauthenticated_connections_per_ip),
            (&d.node_service_account, &d.admin_groups, d.max_unauthenticated_connections_per_ip),
            "Default agrees with the flags' defaults"
        );
        assert_eq!(f.server.node_service_account, ("kpx-system".into(), "kpx-dataplane".into()));
        assert_eq!(f.server.admin_groups, vec!["system:masters"]);
        assert_eq!(f.server.max_unauthenticated_connections, 256);
        assert!(!f.server.insecure);
        assert!(Both::try_parse_from(["x", "--tls-cert-file", "c"]).is_err(), "a certificate needs its key");
        assert!(Both::try_parse_from(["x", "--cert", "c"]).is_err(), "a client certificate needs its key");
        let err = Both::try_parse_from(["x", "--node-service-account", "nope"]).unwrap_err();
        assert!(err.to_string().contains("expected NAMESPACE/NAME"), "{err}");
    }
}
