//! The client side, for the dataplane (to the controlplane) and kpxctl (to either plane):
//! `https://` with a CA, optionally a client certificate, optionally a bearer token.
//!
//! Credentials are read from their files on every connect, so that a rotated node certificate
//! or a kubelet-refreshed projected token is used from the next connection on without a
//! restart. A bearer token is never sent in plaintext beyond loopback.

use crate::io::MaybeTls;
use crate::pem::{self, PemError};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// PEM or token material: a file read at each connect, or bytes given inline (kubeconfig
/// `*-data` fields). Debug shows where it comes from, never its bytes.
#[derive(Clone)]
pub enum Material {
    File(PathBuf),
    Inline { origin: String, bytes: Vec<u8> },
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Material::File(p) => write!(f, "File({})", p.display()),
            Material::Inline { origin, .. } => write!(f, "Inline({origin})"),
        }
    }
}

impl Material {
    fn origin(&self) -> PathBuf {
        match self {
            Material::File(p) => p.clone(),
            Material::Inline { origin, .. } => PathBuf::from(origin),
        }
    }

    fn read(&self, what: &'static str) -> Result<Vec<u8>, PemError> {
        match self {
            Material::File(path) => {
                std::fs::read(path).map_err(|source| PemError::Read { what, path: path.clone(), source })
            }
            Material::Inline { bytes, .. } => Ok(bytes.clone()),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClientCredentials {
    /// The CA that signed the server's certificate (`--cacert`); required for https.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (`--cert`, `--key`).
    pub cert: Option<(Material, Material)>,
    /// A bearer token (`--token-file`).
    pub token: Option<Material>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("token file {path} is empty")]
    EmptyToken { path: PathBuf },
    #[error("token from {path} is not a valid HTTP header value")]
    BadToken { path: PathBuf },
    #[error("{what} needs an https:// address (the server's address is {url})")]
    NeedsHttps { what: &'static str, url: String },
    #[error("https:// needs --cacert: the CA that signed the server's certificate")]
    NeedsCa,
    #[error("refusing to send a bearer token in plaintext to {url}: use https://")]
    TokenInPlaintext { url: String },
    #[error("invalid address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("client certificate {cert} and key {key} do not belong together: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("{0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Adds `authorization: Bearer <token>` to every request of a channel.
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel whose requests carry the caller's token, if it has one.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of a URI without IPv6 brackets.
fn bare_host(uri: &Uri) -> Option<&str> {
    uri.host().map(|h| h.trim_start_matches('[').trim_end_matches(']'))
}

/// What one connection uses, read from the files now.
struct Loaded {
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    token: BearerToken,
}

impl ClientCredentials {
    /// Loads everything once for `url`, to report unusable flags at startup.
    pub fn check(&self, url: &str) -> Result<(), CredentialError> {
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| CredentialError::BadUrl { url: url.into(), reason: e.to_string() })?;
        self.load(url, &uri).map(|_| ())
    }

    fn load(&self, url: &str, uri: &Uri) -> Result<Loaded, CredentialError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(CredentialError::BadUrl { url: url.into(), reason: "expected http:// or https://".into() });
            }
        };
        let host = bare_host(uri)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CredentialError::BadUrl { url: url.into(), reason: "no host".into() })?;
        let token = match &self.token {
            None => BearerToken(None),
            Some(_) if !https && !is_loopback_host(host) => {
                return Err(CredentialError::TokenInPlaintext { url: url.into() });
            }
            Some(material) => BearerToken(Some(read_token(material)?)),
        };
        if !https {
            if self.cert.is_some() {
                return Err(CredentialError::NeedsHttps {
                    what: "a client certificate (--cert/--key)",
                    url: url.into(),
                });
            }
            if self.ca.is_some() {
                return Err(CredentialError::NeedsHttps { what: "--cacert", url: url.into() });
            }
            return Ok(Loaded { tls: None, token });
        }
        let ca = self.ca.as_ref().ok_or(CredentialError::NeedsCa)?;
        let roots = pem::read_roots("CA file", ca)?;
        let builder = ClientConfig::builder_with_provider(pem::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots);
        let mut config = match &self.cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = pem::certs_from("certificate file", &cert.origin(), &cert.read("certificate file")?)?;
                let key_der = pem::key_from(&key.origin(), &key.read("private key file")?)?;
                builder.with_client_auth_cert(certs, key_der).map_err(|e| CredentialError::Mismatch {
                    cert: cert.origin(),
                    key: key.origin(),
                    reason: pem::mismatch_reason(&e),
                })?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| CredentialError::BadUrl { url: url.into(), reason: e.to_string() })?;
        Ok(Loaded { tls: Some((Arc::new(config), name)), token })
    }
}

fn read_token(material: &Material) -> Result<MetadataValue<Ascii>, CredentialError> {
    let bytes = material.read("token file")?;
    let text = String::from_utf8_lossy(&bytes);
    let token = text.trim();
    if token.is_empty() {
        return Err(CredentialError::EmptyToken { path: material.origin() });
    }
    let mut value: MetadataValue<Ascii> =
        format!("Bearer {token}").parse().map_err(|_| CredentialError::BadToken { path: material.origin() })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Connects to `url` (http:// or https://) with `creds`, read from their files now. `tune`
/// sets the endpoint's timeouts and keepalive.
pub async fn connect(
    url: &str,
    creds: &ClientCredentials,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<AuthChannel, ConnectError> {
    let bad = |reason: String| CredentialError::BadUrl { url: url.into(), reason };
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?;
    let loaded = creds.load(url, &uri)?;
    let endpoint = tune(Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?);
    let tls = loaded.tls;
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = bare_host(&uri).unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let io = match tls {
                None => MaybeTls::Plain(tcp),
                Some((config, name)) => {
                    MaybeTls::Tls(Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?))
                }
            };
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(InterceptedService::new(channel, loaded.token))
}

impl ClientCredentials {
    /// From the common client flags.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>, token: Option<&Path>) -> Self {
        ClientCredentials {
            ca: ca.map(Path::to_path_buf),
            cert: cert.zip(key).map(|(c, k)| (Material::File(c.to_path_buf()), Material::File(k.to_path_buf()))),
            token: token.map(|t| Material::File(t.to_path_buf())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(url: &str, creds: &ClientCredentials) -> Result<Loaded, CredentialError> {
        creds.load(url, &url.parse().unwrap())
    }

    #[test]
    fn tokens_stay_off_plaintext_beyond_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").unwrap();
        let creds = ClientCredentials::from_files(None, None, None, Some(&token));
        let err = load("http://10.0.0.5:10900", &creds).err().unwrap();
        assert_eq!(
            err.to_string(),
            "refusing to send a bearer token in plaintext to http://10.0.0.5:10900: use https://"
        );
        for ok in ["http://127.0.0.1:10900", "http://[::1]:10900", "http://localhost:1"] {
            let loaded = load(ok, &creds).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(loaded.token.0.unwrap().to_str().unwrap(), "Bearer abc");
        }
        std::fs::write(&token, " \n").unwrap();
        let err = load("http://127.0.0.1:1", &creds).err().unwrap();
        assert_eq!(err.to_string(), format!("token file {} is empty", token.display()));
        std::fs::remove_file(&token).unwrap();
        let err = load("http://127.0.0.1:1", &creds).err().unwrap();
        assert!(err.to_string().starts_with(&format!("cannot read token file {}", token.display())), "{err}");
    }

    #[test]
    fn tls_flags_need_https_and_https_needs_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pem");
        let creds = ClientCredentials::from_files(None, Some(&p), Some(&p), None);
        let err = load("http://127.0.0.1:1", &creds).err().unwrap();
        assert!(err.to_string().starts_with("a client certificate (--cert/--key) needs an https:// address"), "{err}");
        let err = load("https://cp:1", &ClientCredentials::default()).err().unwrap();
        assert!(matches!(err, CredentialError::NeedsCa), "{err}");
        let err = load("ftp://cp:1", &ClientCredentials::default()).err().unwrap();
        assert!(matches!(err, CredentialError::BadUrl { .. }), "{err}");
    }

    #[test]
    fn debug_never_shows_inline_material() {
        let m = Material::Inline { origin: "kubeconfig user alice".into(), bytes: b"SECRET".to_vec() };
        assert_eq!(format!("{m:?}"), "Inline(kubeconfig user alice)");
        let mut v: MetadataValue<Ascii> = "Bearer SECRET".parse().unwrap();
        v.set_sensitive(true);
        assert!(!format!("{:?}", BearerToken(Some(v))).contains("SECRET"));
    }
}
