//! Domain types: what a caller reads and writes, free of netlink details.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::consts::*;

/// Address family of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Inet,
    Inet6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() { Family::Inet } else { Family::Inet6 }
    }

    /// The kernel's AF_* number.
    pub fn to_af(self) -> u16 {
        match self {
            Family::Inet => AF_INET,
            Family::Inet6 => AF_INET6,
        }
    }

    pub fn from_af(af: u16) -> Option<Family> {
        match af {
            AF_INET => Some(Family::Inet),
            AF_INET6 => Some(Family::Inet6),
            _ => None,
        }
    }

    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    /// The netmask that makes persistence per client address: 255.255.255.255 or /128.
    pub fn full_netmask(self) -> u32 {
        match self {
            Family::Inet => u32::MAX,
            Family::Inet6 => 128,
        }
    }
}

/// Transport protocol of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Other(u16),
}

impl Protocol {
    pub fn to_number(self) -> u16 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
            Protocol::Other(n) => n,
        }
    }

    pub fn from_number(n: u16) -> Protocol {
        match n {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            IPPROTO_SCTP => Protocol::Sctp,
            n => Protocol::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("TCP"),
            Protocol::Udp => f.write_str("UDP"),
            Protocol::Sctp => f.write_str("SCTP"),
            Protocol::Other(n) => write!(f, "proto {n}"),
        }
    }
}

/// A virtual service. A firewall-mark service (`fwmark: Some`) is keyed by family and mark
/// only; the kernel then stores protocol TCP, the unspecified address and port 0, which is what
/// [`Service::fwmark`] sets and what decoding yields.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Service {
    pub family: Family,
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
    pub fwmark: Option<u32>,
    /// Scheduler name: rr, wrr, lc, wlc, sh, dh, sed, nq, mh, ...
    pub scheduler: String,
    /// IP_VS_SVC_F_* bits. IP_VS_SVC_F_HASHED, which the kernel sets on every service it holds,
    /// is dropped when decoding so that a decoded service equals the one that was added.
    pub flags: u32,
    /// Persistence timeout in seconds (used with IP_VS_SVC_F_PERSISTENT).
    pub timeout: u32,
    /// Persistence granularity: for IPv4 a mask as a number (0xffff_ff00 is /24), for IPv6 a
    /// prefix length. The codec handles the kernel's differing byte layouts of the two.
    pub netmask: u32,
}

impl Service {
    /// A service on `addr` with no persistence and the family's full netmask.
    pub fn new(protocol: Protocol, addr: SocketAddr, scheduler: &str) -> Service {
        let family = Family::of(addr.ip());
        Service {
            family,
            protocol,
            addr: addr.ip(),
            port: addr.port(),
            fwmark: None,
            scheduler: scheduler.to_owned(),
            flags: 0,
            timeout: 0,
            netmask: family.full_netmask(),
        }
    }

    /// A firewall-mark service.
    pub fn fwmark(family: Family, mark: u32, scheduler: &str) -> Service {
        Service {
            family,
            protocol: Protocol::Tcp,
            addr: family.unspecified(),
            port: 0,
            fwmark: Some(mark),
            scheduler: scheduler.to_owned(),
            flags: 0,
            timeout: 0,
            netmask: family.full_netmask(),
        }
    }

    /// Sticky sessions: client affinity for `timeout` seconds (sessionAffinity: ClientIP).
    pub fn with_persistence(mut self, timeout: u32) -> Service {
        self.flags |= IP_VS_SVC_F_PERSISTENT;
        self.timeout = timeout;
        self
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fwmark {
            Some(mark) => {
                let v = if self.family == Family::Inet { "IPv4" } else { "IPv6" };
                write!(f, "FWM {mark} {v}")
            }
            None => write!(f, "{} {}", self.protocol, self.socket_addr()),
        }
    }
}

/// How IPVS forwards to a real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Forward {
    /// NAT (what kube-proxy uses).
    Masq,
    Local,
    Tunnel,
    /// Direct routing.
    Route,
    Bypass,
}

impl Forward {
    pub fn to_conn_flags(self) -> u32 {
        match self {
            Forward::Masq => IP_VS_CONN_F_MASQ,
            Forward::Local => IP_VS_CONN_F_LOCALNODE,
            Forward::Tunnel => IP_VS_CONN_F_TUNNEL,
            Forward::Route => IP_VS_CONN_F_DROUTE,
            Forward::Bypass => IP_VS_CONN_F_BYPASS,
        }
    }

    pub fn from_conn_flags(flags: u32) -> Option<Forward> {
        match flags & IP_VS_CONN_F_FWD_MASK {
            IP_VS_CONN_F_MASQ => Some(Forward::Masq),
            IP_VS_CONN_F_LOCALNODE => Some(Forward::Local),
            IP_VS_CONN_F_TUNNEL => Some(Forward::Tunnel),
            IP_VS_CONN_F_DROUTE => Some(Forward::Route),
            IP_VS_CONN_F_BYPASS => Some(Forward::Bypass),
            _ => None,
        }
    }
}

/// Encapsulation of a tunnel-mode destination (kernel 5.2+).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tunnel {
    /// IP_VS_CONN_F_TUNNEL_TYPE_*: IPIP, GUE or GRE.
    pub kind: u8,
    /// GUE destination port.
    pub port: u16,
    /// IP_VS_TUNNEL_ENCAP_FLAG_*.
    pub flags: u16,
}

/// A real server of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub forward: Forward,
    pub weight: i32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// Only meaningful with [`Forward::Tunnel`]; `None` is plain IPIP, the kernel's default.
    pub tunnel: Option<Tunnel>,
}

impl Destination {
    /// A masquerading (NAT) real server, as kube-proxy adds them.
    pub fn new(addr: SocketAddr, weight: i32) -> Destination {
        Destination {
            family: Family::of(addr.ip()),
            addr: addr.ip(),
            port: addr.port(),
            forward: Forward::Masq,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: None,
        }
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.socket_addr().fmt(f)
    }
}

/// Counters and rates of a service or destination (the 64-bit set when the kernel sends it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub conns: u64,
    pub inpkts: u64,
    pub outpkts: u64,
    pub inbytes: u64,
    pub outbytes: u64,
    pub cps: u64,
    pub inpps: u64,
    pub outpps: u64,
    pub inbps: u64,
    pub outbps: u64,
}

/// A service as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub service: Service,
    pub stats: Stats,
}

/// A destination as the kernel reports it; the connection counts drive graceful termination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationInfo {
    pub dest: Destination,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persist_conns: u32,
    pub stats: Stats,
}

/// IPVS connection timeouts in seconds. When setting, 0 leaves that timeout unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}
