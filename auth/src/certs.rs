//! Making certificates for development, the demo and tests (`kpxctl certs`): a CA, a serving
//! certificate, node certificates shaped like a kubelet's (`CN=system:node:<name>,
//! O=system:nodes`) and admin certificates. Production clusters get theirs from cert-manager or
//! the cluster CA (deploy/kustomize/).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

pub use rcgen::Error;

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued { .. }")
    }
}

/// What to put in a leaf certificate.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub common_name: String,
    /// The group (O). rcgen writes one value per attribute type, so one group at most.
    pub organization: Option<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Leaf {
    /// Valid from an hour ago (clock skew) for `days`.
    pub fn new(common_name: &str, days: u64) -> Self {
        let now = SystemTime::now();
        Leaf {
            common_name: common_name.to_string(),
            organization: None,
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(days * 86_400),
        }
    }

    /// A kubelet-style node certificate.
    pub fn node(name: &str, days: u64) -> Self {
        Leaf::new(&format!("system:node:{name}"), days).in_group("system:nodes")
    }

    /// A serving certificate for these names and addresses.
    pub fn server(common_name: &str, dns_names: &[String], ips: &[IpAddr], days: u64) -> Self {
        Leaf { dns_names: dns_names.to_vec(), ips: ips.to_vec(), ..Leaf::new(common_name, days) }
    }

    pub fn in_group(mut self, group: &str) -> Self {
        self.organization = Some(group.to_string());
        self
    }
}

pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertAuthority { .. }")
    }
}

impl CertAuthority {
    /// A new self-signed CA valid for `days`.
    pub fn new(common_name: &str, days: u64) -> Result<Self, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(days * 86_400)).into();
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(CertAuthority { issuer: Issuer::new(params, key), cert_pem })
    }

    /// A CA made earlier (its certificate and key, PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(CertAuthority { issuer: Issuer::from_ca_cert_pem(cert_pem, key)?, cert_pem: cert_pem.to_string() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for both server and client use, signed by this CA.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(leaf.dns_names.clone())?;
        params.subject_alt_names.extend(leaf.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name = name(&leaf.common_name, leaf.organization.as_deref());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = leaf.not_before.into();
        params.not_after = leaf.not_after.into();
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::CertSubject;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn node_certificates_read_back_as_their_node() {
        let ca = CertAuthority::new("kpx test CA", 1).unwrap();
        let issued = ca.issue(&Leaf::node("node-a", 1)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let subject = CertSubject::of(&der).unwrap();
        assert_eq!(subject.node_name(), Some("node-a"));
        assert_eq!(subject.organizations, vec!["system:nodes"]);

        // A CA written out and read back still issues certificates the same roots accept.
        let again = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let admin = again.issue(&Leaf::new("alice", 1).in_group("system:masters")).unwrap();
        let der = CertificateDer::from_pem_slice(admin.cert_pem.as_bytes()).unwrap();
        assert_eq!(CertSubject::of(&der).unwrap().organizations, vec!["system:masters"]);
    }
}
