//! Certificates, keys and CA bundles read from PEM files, with one-line errors that name the
//! file and say what is wrong with it: these are what an operator sees when a flag points at
//! the wrong file.

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not valid PEM: {reason}")]
    Malformed { what: &'static str, path: PathBuf, reason: String },
    #[error("private key file {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("CA file {path}: certificate {index} is not a usable CA certificate: {reason}")]
    BadCa { path: PathBuf, index: usize, reason: String },
    #[error("certificate {cert} and private key {key} do not belong together: {reason}")]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read { what, path: path.to_path_buf(), source })
}

/// Every certificate in the file, in order (a leaf first, then its intermediates).
pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    certs_from(what, path, &read(what, path)?)
}

/// The same, from bytes already read (kubeconfig `client-certificate-data`); `path` names the
/// origin in errors.
pub fn certs_from(what: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::Malformed { what, path: path.to_path_buf(), reason: e.to_string() })?;
    match certs.is_empty() {
        true => Err(PemError::NoCertificate { what, path: path.to_path_buf() }),
        false => Ok(certs),
    }
}

/// The first private key in the file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    key_from(path, &read("private key file", path)?)
}

pub fn key_from(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::NoKey { path: path.to_path_buf() },
        e => PemError::Malformed { what: "private key file", path: path.to_path_buf(), reason: e.to_string() },
    })
}

/// A CA bundle as trust anchors.
pub fn read_roots(what: &'static str, path: &Path) -> Result<Arc<RootCertStore>, PemError> {
    let mut roots = RootCertStore::empty();
    for (index, cert) in read_certs(what, path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| PemError::BadCa { path: path.to_path_buf(), index, reason: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

/// Words rustls's "keys may not be consistent: KeyMismatch" for people.
pub fn mismatch_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate's public key".into()
        }
        e => e.to_string(),
    }
}

/// The crypto provider of every kpx TLS config: ring, as kube's client already uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_certs("certificate file", &missing).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot read certificate file {}: ", missing.display())), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let err = read_roots("CA file", &empty).unwrap_err();
        assert_eq!(err.to_string(), format!("CA file {} holds no PEM certificate", empty.display()));
        let err = read_key(&empty).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("private key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", empty.display())
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n").unwrap();
        let err = read_certs("certificate file", &garbage).unwrap_err();
        assert!(matches!(err, PemError::Malformed { .. }), "{err}");
    }

    #[test]
    fn reads_what_rcgen_writes() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap().self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        assert_eq!(read_certs("certificate file", &c).unwrap().len(), 1);
        read_key(&k).unwrap();
        assert_eq!(read_roots("CA file", &c).unwrap().len(), 1);
    }
}
