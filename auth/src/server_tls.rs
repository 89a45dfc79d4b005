//! The serving certificate, re-read when its files change (cert-manager renewing a Secret, a
//! kubelet-style rotation), without touching established connections: each new handshake takes
//! the config current at accept time, old connections keep the one they started with.
//!
//! tonic's own `ServerTlsConfig` reads the files once, hence this. The files are checked at
//! most once a second, on accept; a change that does not load (a certificate written before its
//! key, a key that does not match) keeps the previous config, is logged once and counted, and is
//! retried at the next change of the files.

use crate::identity::CertSubject;
use crate::metrics::AuthMetrics;
use crate::pem::{self, PemError};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates signed by these CAs prove who the caller is (`--client-ca-file`).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key].into_iter().chain(self.client_ca.as_ref())
    }

    /// Builds the rustls config: TLS 1.2 and 1.3, ALPN h2 (gRPC clients such as grpc-go
    /// require it), client certificates requested but not required (token callers and health
    /// checks have none; what a request may do without one is decided per request).
    pub fn server_config(&self) -> Result<ServerConfig, PemError> {
        let certs = pem::read_certs("certificate file", &self.cert)?;
        let key = pem::read_key(&self.key)?;
        let provider = pem::provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let builder = match &self.client_ca {
            Some(ca) => {
                let roots = pem::read_roots("CA file", ca)?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| PemError::BadCa { path: ca.clone(), index: 0, reason: e.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| PemError::Mismatch {
            cert: self.cert.clone(),
            key: self.key.clone(),
            reason: pem::mismatch_reason(&e),
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// What identifies the files' current contents: a Secret volume swaps a symlink, an
    /// in-place rewrite changes the modification time or size.
    fn stamp(&self) -> Vec<Option<(u64, u64, SystemTime, u64)>> {
        self.paths()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            })
            .collect()
    }
}

type Stamp = Vec<Option<(u64, u64, SystemTime, u64)>>;

#[derive(Debug)]
struct Current {
    config: Arc<ServerConfig>,
    stamp: Stamp,
    checked: Instant,
}

#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: Mutex<Current>,
    metrics: AuthMetrics,
}

const CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl ReloadingTls {
    /// Loads the files now: a server must not start with a certificate it cannot serve.
    pub fn load(files: TlsFiles, metrics: AuthMetrics) -> Result<Self, PemError> {
        let stamp = files.stamp();
        let config = Arc::new(files.server_config()?);
        Ok(ReloadingTls { files, current: Mutex::new(Current { config, stamp, checked: Instant::now() }), metrics })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config for a new connection (reloaded first if the files changed).
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.checked.elapsed() >= CHECK_INTERVAL {
            cur.checked = Instant::now();
            let stamp = self.files.stamp();
            if stamp != cur.stamp {
                cur.stamp = stamp;
                match self.files.server_config() {
                    Ok(config) => {
                        cur.config = Arc::new(config);
                        self.metrics.reloaded(true);
                        tracing::info!(cert = %self.files.cert.display(), "serving certificate reloaded");
                    }
                    Err(error) => {
                        self.metrics.reloaded(false);
                        tracing::error!(%error, "serving certificate files changed but do not load; keeping the previous certificate");
                    }
                }
            }
        }
        cur.config.clone()
    }
}

/// The verified client certificate of a finished handshake, read as an identity.
pub(crate) fn peer_subject(conn: &rustls::ServerConnection) -> Option<Result<CertSubject, String>> {
    conn.peer_certificates().and_then(|chain| chain.first()).map(CertSubject::of)
}
