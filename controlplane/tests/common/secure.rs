//! Security test plumbing: a PKI made in the test (rcgen), a controlplane on loopback with TLS
//! and/or tokens, and one-shot subscriptions that report how a node was answered.

use super::{Accept, ChannelSource};
use kpx_auth::certs::{CertAuthority, Issued, Leaf};
use kpx_auth::client::ClientCredentials;
use kpx_auth::flags::ServerFlags;
use kpx_controlplane::Security;
use kpx_controlplane::cache::CacheConfig;
use kpx_controlplane::model::{ClusterEvent, Skips};
use kpx_controlplane::server::SyncConfig;
use kpx_controlplane::source::ClusterSource;
use kpx_dataplane::stream::{NodeIdentity, Session, StreamError, SyncEvent};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A CA and the files issued from it, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertAuthority,
}

impl Pki {
    pub fn new() -> Pki {
        let pki = Pki { dir: tempfile::tempdir().unwrap(), ca: CertAuthority::new("kpx test CA", 1).unwrap() };
        std::fs::write(pki.ca_file(), pki.ca.cert_pem()).unwrap();
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `issued` as `<stem>.pem` / `<stem>-key.pem`.
    pub fn write(&self, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        let (c, k) = (self.dir.path().join(format!("{stem}.pem")), self.dir.path().join(format!("{stem}-key.pem")));
        std::fs::write(&c, &issued.cert_pem).unwrap();
        std::fs::write(&k, &issued.key_pem).unwrap();
        (c, k)
    }

    pub fn issue(&self, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        self.write(stem, &self.ca.issue(leaf).unwrap())
    }

    /// The serving certificate for 127.0.0.1 / localhost.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        let leaf = Leaf::server("kpx-controlplane", &["localhost".into()], &["127.0.0.1".parse().unwrap()], 1);
        self.issue("server", &leaf)
    }

    pub fn node(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue(&format!("node-{name}"), &Leaf::node(name, 1))
    }

    pub fn admin(&self) -> (PathBuf, PathBuf) {
        self.issue("admin", &Leaf::new("alice", 1).in_group("system:masters"))
    }

    /// Server flags: TLS with this PKI's serving certificate, client certificates from its CA.
    pub fn server_flags(&self) -> ServerFlags {
        let (cert, key) = self.server();
        ServerFlags {
            tls_cert_file: Some(cert),
            tls_private_key_file: Some(key),
            client_ca_file: Some(self.ca_file()),
            ..ServerFlags::default()
        }
    }

    /// A bare rustls client trusting this CA (for handshakes the tests look into).
    pub fn rustls_client(&self) -> Arc<rustls::ClientConfig> {
        let roots = kpx_auth::pem::read_roots("CA file", &self.ca_file()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(kpx_auth::pem::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Client credentials trusting this CA, with a certificate pair when given.
    pub fn client(&self, pair: Option<&(PathBuf, PathBuf)>) -> ClientCredentials {
        ClientCredentials::from_files(
            Some(&self.ca_file()),
            pair.map(|p| p.0.as_path()),
            pair.map(|p| p.1.as_path()),
            None,
        )
    }
}

/// A controlplane with `security`, fed from a channel (or `source`), with /metrics.
pub struct SecureControlplane {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub events: mpsc::UnboundedSender<ClusterEvent>,
    stop: Option<oneshot::Sender<()>>,
}

impl SecureControlplane {
    pub async fn start(security: Security, source: Option<Box<dyn ClusterSource>>) -> SecureControlplane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, metrics_addr) = (listener.local_addr().unwrap(), metrics.local_addr().unwrap());
        let (events, rx) = mpsc::unbounded_channel();
        let source = source.unwrap_or_else(|| Box::new(ChannelSource(rx)));
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let result = kpx_controlplane::serve_with_metrics(
                listener,
                Some(metrics),
                security,
                source,
                Arc::new(Skips::default()),
                CacheConfig::default(),
                SyncConfig::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            if let Err(e) = result {
                panic!("controlplane failed: {e}");
            }
        });
        SecureControlplane { addr, metrics_addr, events, stop: Some(stop) }
    }

    pub fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn send(&self, e: ClusterEvent) {
        self.events.send(e).unwrap();
    }

    /// The value of one sample line of /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = scrape(self.metrics_addr).await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for SecureControlplane {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub fn identity(node: &str) -> NodeIdentity {
    NodeIdentity {
        node_name: node.into(),
        backend: "sim".into(),
        ip_families: vec!["IPv4".into()],
        zone: String::new(),
    }
}

/// How a subscription went: the node got its first update, or the error the stream ended with.
#[derive(Debug)]
pub enum Outcome {
    Synced,
    Failed(StreamError),
}

impl Outcome {
    /// The gRPC code the controlplane answered with, if it answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Outcome::Failed(StreamError::Stream(s)) => Some(s.code()),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Outcome::Synced => "synced".into(),
            Outcome::Failed(StreamError::Stream(s)) => s.message().to_string(),
            Outcome::Failed(e) => e.to_string(),
        }
    }
}

/// Subscribes once as `node` and reports the outcome (the stream is then dropped).
pub async fn subscribe_once(url: &str, creds: &ClientCredentials, node: &str) -> Outcome {
    let channel = match kpx_dataplane::stream::connect_with(url, creds, Duration::from_secs(5)).await {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    let mut session = Session::new(identity(node), Box::new(Accept) as Box<dyn kpx_dataplane::stream::Apply>);
    let (tx, mut rx) = mpsc::unbounded_channel();
    session.events = Some(tx);
    let applied = async {
        while let Some(e) = rx.recv().await {
            if matches!(e, SyncEvent::Applied { .. }) {
                return;
            }
        }
        std::future::pending().await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            e = session.run(channel) => Outcome::Failed(e),
            () = applied => Outcome::Synced,
        }
    });
    outcome.await.expect("a subscription is answered within 10 s")
}
