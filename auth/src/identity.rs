//! Who a caller is: the subject of a verified client certificate, or what the apiserver said of
//! a bearer token. Kubernetes reads certificates the same way (CN = user, O = groups), so a
//! kubelet's client certificate (`CN=system:node:<name>, O=system:nodes`) names its node here too.

use rustls_pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The user name prefix of node identities (kubelet client certificates, the Node authorizer).
pub const NODE_USER_PREFIX: &str = "system:node:";

/// The subject of a client certificate that rustls verified against `--client-ca-file`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSubject {
    /// The CommonName: the user.
    pub common_name: String,
    /// The Organizations: the groups.
    pub organizations: Vec<String>,
    /// The end of the certificate's validity: streams it opened end then.
    pub not_after: SystemTime,
}

impl CertSubject {
    /// Reads the leaf certificate's subject. Only called on certificates rustls verified.
    pub fn of(cert: &CertificateDer<'_>) -> Result<CertSubject, String> {
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("unreadable certificate: {e}"))?;
        let subject = parsed.subject();
        let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().map(str::to_string).ok();
        let common_name = subject
            .iter_common_name()
            .next()
            .and_then(text)
            .ok_or_else(|| "the certificate's subject has no CommonName".to_string())?;
        let organizations = subject.iter_organization().filter_map(text).collect();
        let secs = parsed.validity().not_after.timestamp();
        let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        Ok(CertSubject { common_name, organizations, not_after })
    }

    /// The node a kubelet-style certificate names.
    pub fn node_name(&self) -> Option<&str> {
        node_of_user(&self.common_name)
    }
}

/// `system:node:<name>` -> `<name>`.
pub fn node_of_user(user: &str) -> Option<&str> {
    user.strip_prefix(NODE_USER_PREFIX).filter(|n| !n.is_empty())
}

/// A user as the apiserver describes it (TokenReview status, SubjectAccessReview spec).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Certificate,
    Token,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Certificate => "client certificate",
            Via::Token => "token",
        }
    }
}

/// A caller's proven identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The server authenticates nobody (plaintext on loopback, or `--insecure`): every caller
    /// may do everything, as before kpx had authentication.
    Open,
    /// No credential: enough for gRPC health only.
    Anonymous,
    /// A node: reads and subscribes as itself only.
    Node { name: String, via: Via },
    /// A certificate in an admin group (`--admin-group`): may inspect everything.
    Admin { user: String, via: Via },
    /// Anyone else the apiserver vouches for: each inspection is a SubjectAccessReview.
    User { user: UserInfo, via: Via },
}

impl Identity {
    /// For logs: who, never the credential.
    pub fn describe(&self) -> String {
        match self {
            Identity::Open => "anyone (authentication off)".into(),
            Identity::Anonymous => "an anonymous caller".into(),
            Identity::Node { name, via } => format!("node {name:?} ({})", via.as_str()),
            Identity::Admin { user, via } => format!("admin {user:?} ({})", via.as_str()),
            Identity::User { user, via } => format!("user {:?} ({})", user.username, via.as_str()),
        }
    }

    /// One label per kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Open => "open",
            Identity::Anonymous => "anonymous",
            Identity::Node { .. } => "node",
            Identity::Admin { .. } => "admin",
            Identity::User { .. } => "user",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, orgs: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        for o in orgs {
            params.distinguished_name.push(rcgen::DnType::OrganizationName, *o);
        }
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn kubelet_certificates_name_their_node() {
        let s = CertSubject::of(&cert(Some("system:node:node-a"), &["system:nodes"])).unwrap();
        assert_eq!(s.node_name(), Some("node-a"));
        assert_eq!(s.organizations, vec!["system:nodes"]);
        let days = s.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() / 86_400;
        assert_eq!(days, 22_281, "2031-01-02 is day 22281 of the epoch");

        let admin = CertSubject::of(&cert(Some("alice"), &["system:masters"])).unwrap();
        assert_eq!(admin.node_name(), None);
        assert_eq!(admin.organizations, vec!["system:masters"]);
    }

    #[test]
    fn a_subject_without_common_name_is_refused() {
        let err = CertSubject::of(&cert(None, &["x"])).unwrap_err();
        assert!(err.contains("no CommonName"), "{err}");
        assert_eq!(node_of_user("system:node:"), None);
        assert_eq!(node_of_user("system:nodes:a"), None);
    }
}
