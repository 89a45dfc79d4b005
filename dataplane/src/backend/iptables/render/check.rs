//! Validation of every string that comes from the cluster before it reaches the restore text.
//! Addresses are parsed and printed back (so only canonical text lands in the output), ports
//! must be numbers in range, and free text only appears inside a sanitised quoted comment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::IpFamily;

/// Longest comment iptables accepts (xt_comment keeps 256 bytes including the NUL).
const MAX_COMMENT: usize = 255;

/// Parses an address of any family; `Err` carries the skip reason.
pub fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("invalid IP {:?}", printable(s)))
}

/// A CIDR, returned canonical ("10.0.0.0/8"): its network address (host bits cleared) and
/// prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid CIDR {:?}", printable(s));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > IpFamily::of(addr).bits() {
            return Err(bad());
        }
        // The network address, as the kernel stores it and iptables-save prints it back
        // ("10.1.2.3/24" is 10.1.2.0/24): written otherwise, the rule would never compare equal.
        let addr = match addr {
            IpAddr::V4(v) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(v) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)))
            }
            IpAddr::V6(v) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(v) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)))
            }
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v) => u128::from(u32::from(v)) << 96,
            IpAddr::V6(v) => u128::from(v),
        };
        if IpFamily::of(ip) != self.family() {
            return false;
        }
        let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
        bits(ip) & mask == bits(self.addr) & mask
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A port: 1..=65535.
pub fn port(p: u32, what: &str) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(format!("invalid {what} {p}")),
    }
}

/// ` -m comment --comment "..."` with the text made safe for iptables-restore: no quotes,
/// backslashes or control characters (a newline would end the rule and start another), and
/// short enough for the kernel.
pub fn comment(text: &str) -> String {
    // Fast path for the usual, already clean text: one allocation instead of three.
    if text.len() <= MAX_COMMENT && text.chars().all(is_printable) {
        return format!("-m comment --comment \"{text}\"");
    }
    let mut s = printable(text);
    if s.len() > MAX_COMMENT {
        let mut end = MAX_COMMENT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    format!("-m comment --comment \"{s}\"")
}

/// Keeps printable characters only, minus those iptables-restore's tokenizer treats specially.
pub fn printable(s: &str) -> String {
    s.chars().filter(|c| is_printable(*c)).collect()
}

fn is_printable(c: char) -> bool {
    !c.is_control() && c != '"' && c != '\\' && c != '\''
}
