//! Object names as kube-proxy's nftables mode writes them: `service-ULMVA6XW-ns1/svc1/tcp/p80`,
//! `endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80`: a prefix, the first 8 characters of
//! base32(sha256(rest)), and the readable rest, so `nft list` shows what a chain is for and
//! names stay unique whatever the readable part.

use sha2::{Digest, Sha256};

use crate::backend::iptables::chains::base32;

fn hashed(prefix: &str, base: &str) -> String {
    let digest = Sha256::digest(base.as_bytes());
    let mut h = base32(&digest);
    h.truncate(8);
    format!("{prefix}-{h}-{base}")
}

/// The names of one service port's objects. `base` is "ns/name/proto/port" ("ns/name/tcp/"
/// for an unnamed port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortNames {
    base: String,
    pub service: String,
    pub local: String,
    pub external: String,
    pub firewall: String,
}

impl PortNames {
    pub fn new(namespace: &str, name: &str, proto: &str, port_name: &str) -> PortNames {
        let base = format!("{namespace}/{name}/{proto}/{port_name}");
        PortNames {
            service: hashed("service", &base),
            local: hashed("local", &base),
            external: hashed("external", &base),
            firewall: hashed("firewall", &base),
            base,
        }
    }

    /// (endpoint chain, affinity set) of the endpoint at ip:port; `ip` as printed.
    pub fn endpoint(&self, ip: &str, port: u16) -> (String, String) {
        let base = format!("{}__{ip}/{port}", self.base);
        (hashed("endpoint", &base), hashed("affinity", &base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_kube_proxy() {
        // From kube-proxy's nftables proxier tests.
        let p = PortNames::new("ns1", "svc1", "tcp", "p80");
        assert_eq!(p.service, "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(p.endpoint("10.180.0.1", 80).0, "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80");
        let p = PortNames::new("ns2", "svc2", "tcp", "p80");
        assert_eq!(p.external, "external-42NFTM6N-ns2/svc2/tcp/p80");
        let p = PortNames::new("ns5", "svc5", "tcp", "p80");
        assert_eq!(p.firewall, "firewall-HVFWP5L3-ns5/svc5/tcp/p80");
        assert_eq!(p.endpoint("10.180.0.3", 80).1, "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80");
    }
}
