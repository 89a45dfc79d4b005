//! Chain names. Top-level chains have fixed names; per-service-port and per-endpoint chains
//! carry a hash suffix computed exactly like kube-proxy's, so a node switched between
//! kube-proxy and kpx ends up with the same chain names for the same services.

use sha2::{Digest, Sha256};

pub const SERVICES: &str = "KUBE-SERVICES";
pub const NODEPORTS: &str = "KUBE-NODEPORTS";
pub const POSTROUTING: &str = "KUBE-POSTROUTING";
pub const MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const FORWARD: &str = "KUBE-FORWARD";
pub const PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// Shared with kubelet: "block incoming localnet connections" (localhost node ports).
pub const FIREWALL: &str = "KUBE-FIREWALL";

/// The packet mark that KUBE-MARK-MASQ sets and KUBE-POSTROUTING masquerades on.
pub const MASQ_MARK: &str = "0x4000";

/// The per-port chains of one service port, all sharing one hash suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChains {
    /// Cluster policy: all endpoints usable for cluster traffic.
    pub svc: String,
    /// Local policy: only this node's endpoints.
    pub svl: String,
    /// External destinations (external IPs, load-balancer IPs, NodePorts).
    pub ext: String,
    /// Load-balancer source ranges.
    pub fw: String,
}

impl PortChains {
    /// `port_name` is kube-proxy's ServicePortName string ("ns/name:port", or "ns/name" for an
    /// unnamed port); `protocol` is lower case ("tcp", "udp", "sctp").
    pub fn new(port_name: &str, protocol: &str) -> Self {
        let h = hash16(&[port_name, protocol]);
        PortChains {
            svc: format!("KUBE-SVC-{h}"),
            svl: format!("KUBE-SVL-{h}"),
            ext: format!("KUBE-EXT-{h}"),
            fw: format!("KUBE-FW-{h}"),
        }
    }
}

/// The KUBE-SEP chain of one endpoint; `endpoint` is "ip:port" or "[ipv6]:port".
pub fn endpoint_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!("KUBE-SEP-{}", hash16(&[port_name, protocol, endpoint]))
}

/// The first 16 characters of base32(sha256(concatenated parts)).
fn hash16(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut out = base32(&digest);
    out.truncate(16);
    out
}

/// RFC 4648 base32 (upper case, padded). Hand-written rather than a dependency: the chain
/// names need only the encoding of one 32-byte digest, which is ten lines.
pub(crate) fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = buf.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let symbols = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < symbols {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        let cases =
            [("", ""), ("f", "MY======"), ("fo", "MZXQ===="), ("foo", "MZXW6==="), ("foobar", "MZXW6YTBOI======")];
        for (input, want) in cases {
            assert_eq!(base32(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn names_match_kube_proxy() {
        // Chain names seen on real kube-proxy nodes (the classic "hostnames" debugging example,
        // whose kube-proxy version still wrote a trailing ':' for unnamed ports) and in
        // kube-proxy's own tests.
        assert_eq!(PortChains::new("default/hostnames:", "tcp").svc, "KUBE-SVC-NWV5X2332I4OT4T3");
        assert_eq!(endpoint_chain("default/hostnames:", "tcp", "10.244.3.6:9376"), "KUBE-SEP-57KPRZ3JQVENLNBR");
        let c = PortChains::new("ns1/svc1:p80", "tcp");
        assert_eq!(c.svc, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(c.ext, "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ");
    }
}
