//! Domain types <-> wire attributes, in one place (the only module that knows both).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::attr::{DestAttr, SvcAttr};
use crate::consts::IP_VS_SVC_F_HASHED;
use crate::error::DecodeError;
use crate::types::{Destination, DestinationInfo, Family, Forward, Protocol, Service, ServiceInfo, Stats, Tunnel};

fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

fn addr_from(family: Family, raw: [u8; 16]) -> IpAddr {
    match family {
        Family::Inet => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Inet6 => IpAddr::V6(Ipv6Addr::from(raw)),
    }
}

// The kernel keeps the netmask in a __be32: for IPv4 a real mask in network order, for IPv6 a
// prefix length it compares as a plain host-order integer (ip_vs_ctl.c checks 1..=128). Callers
// see a number in both cases.
fn netmask_bytes(family: Family, netmask: u32) -> [u8; 4] {
    match family {
        Family::Inet => netmask.to_be_bytes(),
        Family::Inet6 => netmask.to_ne_bytes(),
    }
}

fn netmask_from(family: Family, raw: [u8; 4]) -> u32 {
    match family {
        Family::Inet => u32::from_be_bytes(raw),
        Family::Inet6 => u32::from_ne_bytes(raw),
    }
}

fn family_from(af: u16, what: &'static str) -> Result<Family, DecodeError> {
    Family::from_af(af).ok_or(DecodeError::Value { what, value: af.into() })
}

/// The attributes that identify a service (enough for delete, get and destination commands).
pub fn service_key(s: &Service) -> Vec<SvcAttr> {
    let mut a = vec![SvcAttr::Af(s.family.to_af())];
    match s.fwmark {
        Some(mark) => a.push(SvcAttr::Fwmark(mark)),
        None => a.extend([
            SvcAttr::Protocol(s.protocol.to_number()),
            SvcAttr::Addr(addr_bytes(s.addr)),
            SvcAttr::Port(s.port),
        ]),
    }
    a
}

/// Key plus every setting; the kernel requires all of them for new and set.
pub fn service_full(s: &Service) -> Vec<SvcAttr> {
    let mut a = service_key(s);
    a.extend([
        SvcAttr::SchedName(s.scheduler.clone()),
        // Mask all ones: the service gets exactly these flags, nothing is inherited.
        SvcAttr::Flags { flags: s.flags, mask: u32::MAX },
        SvcAttr::Timeout(s.timeout),
        SvcAttr::Netmask(netmask_bytes(s.family, s.netmask)),
    ]);
    a
}

/// A service as the kernel reports it in a dump (for tests and fakes of the kernel).
pub fn service_reply(info: &ServiceInfo) -> Vec<SvcAttr> {
    let mut a = service_full(&info.service);
    for attr in &mut a {
        if let SvcAttr::Flags { flags, .. } = attr {
            *flags |= IP_VS_SVC_F_HASHED;
        }
    }
    a.extend([SvcAttr::Stats(info.stats), SvcAttr::Stats64(info.stats)]);
    a
}

pub fn service_from(attrs: &[SvcAttr]) -> Result<ServiceInfo, DecodeError> {
    let (mut af, mut protocol, mut addr, mut port, mut fwmark) = (None, None, None, None, None);
    let (mut scheduler, mut flags, mut timeout, mut netmask) = (String::new(), 0, 0, None);
    let (mut stats, mut stats64) = (None, None);
    for a in attrs {
        match a {
            SvcAttr::Af(v) => af = Some(*v),
            SvcAttr::Protocol(v) => protocol = Some(*v),
            SvcAttr::Addr(v) => addr = Some(*v),
            SvcAttr::Port(v) => port = Some(*v),
            SvcAttr::Fwmark(v) => fwmark = Some(*v),
            SvcAttr::SchedName(v) => scheduler.clone_from(v),
            SvcAttr::Flags { flags: f, mask } => flags = f & mask & !IP_VS_SVC_F_HASHED,
            SvcAttr::Timeout(v) => timeout = *v,
            SvcAttr::Netmask(v) => netmask = Some(*v),
            SvcAttr::Stats(v) => stats = Some(*v),
            SvcAttr::Stats64(v) => stats64 = Some(*v),
            SvcAttr::PeName(_) | SvcAttr::Other(_) => {}
        }
    }
    let family = family_from(af.ok_or(DecodeError::Missing("service af"))?, "service af")?;
    let netmask = netmask.map_or(family.full_netmask(), |m| netmask_from(family, m));
    let mut service = match fwmark {
        Some(mark) => Service::fwmark(family, mark, &scheduler),
        None => {
            let protocol = protocol.ok_or(DecodeError::Missing("service protocol"))?;
            let addr = addr.ok_or(DecodeError::Missing("service addr"))?;
            let port = port.ok_or(DecodeError::Missing("service port"))?;
            Service {
                family,
                protocol: Protocol::from_number(protocol),
                addr: addr_from(family, addr),
                port,
                fwmark: None,
                scheduler,
                flags: 0,
                timeout: 0,
                netmask: 0,
            }
        }
    };
    service.flags = flags;
    service.timeout = timeout;
    service.netmask = netmask;
    Ok(ServiceInfo { service, stats: stats64.or(stats).unwrap_or_default() })
}

/// The attributes that identify a destination within its service.
pub fn dest_key(d: &Destination) -> Vec<DestAttr> {
    vec![DestAttr::Addr(addr_bytes(d.addr)), DestAttr::Port(d.port), DestAttr::AddrFamily(d.family.to_af())]
}

/// Key plus every setting; the kernel requires forwarding, weight and thresholds for new and set.
pub fn dest_full(d: &Destination) -> Vec<DestAttr> {
    let mut a = dest_key(d);
    a.extend([
        DestAttr::FwdMethod(d.forward.to_conn_flags()),
        DestAttr::Weight(d.weight),
        DestAttr::UThresh(d.upper_threshold),
        DestAttr::LThresh(d.lower_threshold),
    ]);
    if let Some(t) = d.tunnel {
        a.extend([DestAttr::TunType(t.kind), DestAttr::TunPort(t.port), DestAttr::TunFlags(t.flags)]);
    }
    a
}

/// A destination as the kernel reports it in a dump (for tests and fakes of the kernel).
pub fn dest_reply(info: &DestinationInfo) -> Vec<DestAttr> {
    let mut a = dest_full(&info.dest);
    a.extend([
        DestAttr::ActiveConns(info.active_conns),
        DestAttr::InactConns(info.inactive_conns),
        DestAttr::PersistConns(info.persist_conns),
        DestAttr::Stats(info.stats),
        DestAttr::Stats64(info.stats),
    ]);
    a
}

/// `fallback` is the family used when the message has no IPVS_DEST_ATTR_ADDR_FAMILY (kernels
/// before 4.x send none): the service's.
pub fn dest_from(attrs: &[DestAttr], fallback: Family) -> Result<DestinationInfo, DecodeError> {
    let (mut addr, mut port, mut af, mut fwd) = (None, None, None, 0);
    let (mut weight, mut upper, mut lower) = (0, 0, 0);
    let (mut active, mut inactive, mut persist) = (0, 0, 0);
    let (mut stats, mut stats64): (Option<Stats>, Option<Stats>) = (None, None);
    let mut tunnel = Tunnel::default();
    for a in attrs {
        match a {
            DestAttr::Addr(v) => addr = Some(*v),
            DestAttr::Port(v) => port = Some(*v),
            DestAttr::FwdMethod(v) => fwd = *v,
            DestAttr::Weight(v) => weight = *v,
            DestAttr::UThresh(v) => upper = *v,
            DestAttr::LThresh(v) => lower = *v,
            DestAttr::ActiveConns(v) => active = *v,
            DestAttr::InactConns(v) => inactive = *v,
            DestAttr::PersistConns(v) => persist = *v,
            DestAttr::Stats(v) => stats = Some(*v),
            DestAttr::AddrFamily(v) => af = Some(*v),
            DestAttr::Stats64(v) => stats64 = Some(*v),
            DestAttr::TunType(v) => tunnel.kind = *v,
            DestAttr::TunPort(v) => tunnel.port = *v,
            DestAttr::TunFlags(v) => tunnel.flags = *v,
            DestAttr::Other(_) => {}
        }
    }
    let family = match af {
        Some(af) => family_from(af, "dest addr family")?,
        None => fallback,
    };
    let forward =
        Forward::from_conn_flags(fwd).ok_or(DecodeError::Value { what: "dest fwd method", value: fwd.into() })?;
    let dest = Destination {
        family,
        addr: addr_from(family, addr.ok_or(DecodeError::Missing("dest addr"))?),
        port: port.ok_or(DecodeError::Missing("dest port"))?,
        forward,
        weight,
        upper_threshold: upper,
        lower_threshold: lower,
        // IPIP with no port and no flags is what `None` means (the kernel's default).
        tunnel: (forward == Forward::Tunnel && tunnel != Tunnel::default()).then_some(tunnel),
    };
    Ok(DestinationInfo {
        dest,
        active_conns: active,
        inactive_conns: inactive,
        persist_conns: persist,
        stats: stats64.or(stats).unwrap_or_default(),
    })
}
