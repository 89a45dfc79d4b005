//! Wire attributes of IPVS messages, one enum per nesting level, on netlink-packet-core's `Nla`.
//! Integers are host order except ports (network order) and the netmask (kept raw: its layout
//! depends on the family, see `convert`). Unknown attributes land in `Other` and are ignored.

use netlink_packet_core::{DefaultNla, Emitable, NLA_F_NESTED, Nla, NlasIterator};

use crate::consts::*;
use crate::error::DecodeError;
use crate::types::Stats;

/// Attributes at the top level of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdAttr {
    Service(Vec<SvcAttr>),
    Dest(Vec<DestAttr>),
    TimeoutTcp(u32),
    TimeoutTcpFin(u32),
    TimeoutUdp(u32),
    Other(DefaultNla),
}

/// Attributes inside IPVS_CMD_ATTR_SERVICE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvcAttr {
    Af(u16),
    Protocol(u16),
    /// 16 bytes (union nf_inet_addr); an IPv4 address in the first four.
    Addr([u8; 16]),
    Port(u16),
    Fwmark(u32),
    SchedName(String),
    /// struct ip_vs_flags: the kernel applies `flags` under `mask`.
    Flags {
        flags: u32,
        mask: u32,
    },
    Timeout(u32),
    Netmask([u8; 4]),
    Stats(Stats),
    Stats64(Stats),
    PeName(String),
    Other(DefaultNla),
}

/// Attributes inside IPVS_CMD_ATTR_DEST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAttr {
    Addr([u8; 16]),
    Port(u16),
    FwdMethod(u32),
    Weight(i32),
    UThresh(u32),
    LThresh(u32),
    ActiveConns(u32),
    InactConns(u32),
    PersistConns(u32),
    Stats(Stats),
    AddrFamily(u16),
    Stats64(Stats),
    TunType(u8),
    TunPort(u16),
    TunFlags(u16),
    Other(DefaultNla),
}

impl Nla for CmdAttr {
    fn value_len(&self) -> usize {
        match self {
            CmdAttr::Service(a) => a.as_slice().buffer_len(),
            CmdAttr::Dest(a) => a.as_slice().buffer_len(),
            CmdAttr::TimeoutTcp(_) | CmdAttr::TimeoutTcpFin(_) | CmdAttr::TimeoutUdp(_) => 4,
            CmdAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            CmdAttr::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            CmdAttr::Dest(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            CmdAttr::TimeoutTcp(_) => IPVS_CMD_ATTR_TIMEOUT_TCP,
            CmdAttr::TimeoutTcpFin(_) => IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
            CmdAttr::TimeoutUdp(_) => IPVS_CMD_ATTR_TIMEOUT_UDP,
            CmdAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            CmdAttr::Service(a) => a.as_slice().emit(buf),
            CmdAttr::Dest(a) => a.as_slice().emit(buf),
            CmdAttr::TimeoutTcp(v) | CmdAttr::TimeoutTcpFin(v) | CmdAttr::TimeoutUdp(v) => {
                buf.copy_from_slice(&v.to_ne_bytes())
            }
            CmdAttr::Other(o) => o.emit_value(buf),
        }
    }
}

impl Nla for SvcAttr {
    fn value_len(&self) -> usize {
        match self {
            SvcAttr::Af(_) | SvcAttr::Protocol(_) | SvcAttr::Port(_) => 2,
            SvcAttr::Addr(_) => 16,
            SvcAttr::Fwmark(_) | SvcAttr::Timeout(_) | SvcAttr::Netmask(_) => 4,
            SvcAttr::SchedName(s) | SvcAttr::PeName(s) => s.len() + 1,
            SvcAttr::Flags { .. } => 8,
            SvcAttr::Stats(s) => stats_attrs(s, false).as_slice().buffer_len(),
            SvcAttr::Stats64(s) => stats_attrs(s, true).as_slice().buffer_len(),
            SvcAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            SvcAttr::Af(_) => IPVS_SVC_ATTR_AF,
            SvcAttr::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            SvcAttr::Addr(_) => IPVS_SVC_ATTR_ADDR,
            SvcAttr::Port(_) => IPVS_SVC_ATTR_PORT,
            SvcAttr::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            SvcAttr::SchedName(_) => IPVS_SVC_ATTR_SCHED_NAME,
            SvcAttr::Flags { .. } => IPVS_SVC_ATTR_FLAGS,
            SvcAttr::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            SvcAttr::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            SvcAttr::Stats(_) => IPVS_SVC_ATTR_STATS | NLA_F_NESTED,
            SvcAttr::PeName(_) => IPVS_SVC_ATTR_PE_NAME,
            SvcAttr::Stats64(_) => IPVS_SVC_ATTR_STATS64 | NLA_F_NESTED,
            SvcAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            SvcAttr::Af(v) | SvcAttr::Protocol(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Port(v) => buf.copy_from_slice(&v.to_be_bytes()),
            SvcAttr::Addr(a) => buf.copy_from_slice(a),
            SvcAttr::Fwmark(v) | SvcAttr::Timeout(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            SvcAttr::Netmask(m) => buf.copy_from_slice(m),
            SvcAttr::SchedName(s) | SvcAttr::PeName(s) => emit_cstr(s, buf),
            SvcAttr::Flags { flags, mask } => {
                buf[..4].copy_from_slice(&flags.to_ne_bytes());
                buf[4..8].copy_from_slice(&mask.to_ne_bytes());
            }
            SvcAttr::Stats(s) => stats_attrs(s, false).as_slice().emit(buf),
            SvcAttr::Stats64(s) => stats_attrs(s, true).as_slice().emit(buf),
            SvcAttr::Other(o) => o.emit_value(buf),
        }
    }
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            DestAttr::Addr(_) => 16,
            DestAttr::Port(_) | DestAttr::AddrFamily(_) | DestAttr::TunPort(_) | DestAttr::TunFlags(_) => 2,
            DestAttr::TunType(_) => 1,
            DestAttr::FwdMethod(_)
            | DestAttr::Weight(_)
            | DestAttr::UThresh(_)
            | DestAttr::LThresh(_)
            | DestAttr::ActiveConns(_)
            | DestAttr::InactConns(_)
            | DestAttr::PersistConns(_) => 4,
            DestAttr::Stats(s) => stats_attrs(s, false).as_slice().buffer_len(),
            DestAttr::Stats64(s) => stats_attrs(s, true).as_slice().buffer_len(),
            DestAttr::Other(o) => o.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestAttr::Addr(_) => IPVS_DEST_ATTR_ADDR,
            DestAttr::Port(_) => IPVS_DEST_ATTR_PORT,
            DestAttr::FwdMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            DestAttr::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            DestAttr::UThresh(_) => IPVS_DEST_ATTR_U_THRESH,
            DestAttr::LThresh(_) => IPVS_DEST_ATTR_L_THRESH,
            DestAttr::ActiveConns(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            DestAttr::InactConns(_) => IPVS_DEST_ATTR_INACT_CONNS,
            DestAttr::PersistConns(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            DestAttr::Stats(_) => IPVS_DEST_ATTR_STATS | NLA_F_NESTED,
            DestAttr::AddrFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            DestAttr::Stats64(_) => IPVS_DEST_ATTR_STATS64 | NLA_F_NESTED,
            DestAttr::TunType(_) => IPVS_DEST_ATTR_TUN_TYPE,
            DestAttr::TunPort(_) => IPVS_DEST_ATTR_TUN_PORT,
            DestAttr::TunFlags(_) => IPVS_DEST_ATTR_TUN_FLAGS,
            DestAttr::Other(o) => o.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            DestAttr::Addr(a) => buf.copy_from_slice(a),
            DestAttr::Port(v) | DestAttr::TunPort(v) => buf.copy_from_slice(&v.to_be_bytes()),
            DestAttr::AddrFamily(v) | DestAttr::TunFlags(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            DestAttr::TunType(v) => buf[0] = *v,
            DestAttr::Weight(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            DestAttr::FwdMethod(v)
            | DestAttr::UThresh(v)
            | DestAttr::LThresh(v)
            | DestAttr::ActiveConns(v)
            | DestAttr::InactConns(v)
            | DestAttr::PersistConns(v) => buf.copy_from_slice(&v.to_ne_bytes()),
            DestAttr::Stats(s) => stats_attrs(s, false).as_slice().emit(buf),
            DestAttr::Stats64(s) => stats_attrs(s, true).as_slice().emit(buf),
            DestAttr::Other(o) => o.emit_value(buf),
        }
    }
}

/// One counter inside a stats nest: 4 or 8 bytes wide.
struct StatsAttr {
    kind: u16,
    value: u64,
    wide: bool,
}

impl Nla for StatsAttr {
    fn value_len(&self) -> usize {
        if self.wide { 8 } else { 4 }
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buf: &mut [u8]) {
        if self.wide {
            buf.copy_from_slice(&self.value.to_ne_bytes())
        } else {
            // The 32-bit nest carries u32 counters; truncation is the kernel's own semantics.
            buf.copy_from_slice(&(self.value as u32).to_ne_bytes())
        }
    }
}

/// The kernel's stats layouts: in IPVS_*_ATTR_STATS the byte counters are u64 and the rest
/// u32; in IPVS_*_ATTR_STATS64 all are u64.
fn stats_attrs(s: &Stats, all_wide: bool) -> Vec<StatsAttr> {
    let a = |kind, value, wide| StatsAttr { kind, value, wide: wide || all_wide };
    vec![
        a(IPVS_STATS_ATTR_CONNS, s.conns, false),
        a(IPVS_STATS_ATTR_INPKTS, s.inpkts, false),
        a(IPVS_STATS_ATTR_OUTPKTS, s.outpkts, false),
        a(IPVS_STATS_ATTR_INBYTES, s.inbytes, true),
        a(IPVS_STATS_ATTR_OUTBYTES, s.outbytes, true),
        a(IPVS_STATS_ATTR_CPS, s.cps, false),
        a(IPVS_STATS_ATTR_INPPS, s.inpps, false),
        a(IPVS_STATS_ATTR_OUTPPS, s.outpps, false),
        a(IPVS_STATS_ATTR_INBPS, s.inbps, false),
        a(IPVS_STATS_ATTR_OUTBPS, s.outbps, false),
    ]
}

fn emit_cstr(s: &str, buf: &mut [u8]) {
    buf[..s.len()].copy_from_slice(s.as_bytes());
    buf[s.len()] = 0;
}

// ---- decoding ----

/// Walks the attributes in `buf`, handing each (kind without flags, value) to `f`.
pub(crate) fn walk(
    what: &'static str,
    buf: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    for nla in NlasIterator::new(buf) {
        let nla = nla.map_err(|e| DecodeError::Attribute { what, detail: e.to_string() })?;
        f(nla.kind(), nla.value())?;
    }
    Ok(())
}

pub(crate) fn fixed<const N: usize>(what: &'static str, v: &[u8]) -> Result<[u8; N], DecodeError> {
    v.try_into().map_err(|_| DecodeError::Length { what, expected: N, got: v.len() })
}

pub(crate) fn u16_ne(what: &'static str, v: &[u8]) -> Result<u16, DecodeError> {
    fixed(what, v).map(u16::from_ne_bytes)
}

pub(crate) fn u16_be(what: &'static str, v: &[u8]) -> Result<u16, DecodeError> {
    fixed(what, v).map(u16::from_be_bytes)
}

pub(crate) fn u32_ne(what: &'static str, v: &[u8]) -> Result<u32, DecodeError> {
    fixed(what, v).map(u32::from_ne_bytes)
}

/// IPv4 addresses may come as 4 bytes (some userspace tools send that); the kernel sends 16.
fn addr16(what: &'static str, v: &[u8]) -> Result<[u8; 16], DecodeError> {
    let mut a = [0u8; 16];
    match v.len() {
        4 | 16 => a[..v.len()].copy_from_slice(v),
        got => return Err(DecodeError::Length { what, expected: 16, got }),
    }
    Ok(a)
}

fn cstr(what: &'static str, v: &[u8]) -> Result<String, DecodeError> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec()).map_err(|_| DecodeError::Utf8 { what })
}

fn stats(what: &'static str, buf: &[u8]) -> Result<Stats, DecodeError> {
    let mut s = Stats::default();
    walk(what, buf, |kind, v| {
        // Kind first: the kernel pads u64 counters with zero-length IPVS_STATS_ATTR_PAD
        // attributes, which must be skipped before any length check.
        let field = match kind {
            IPVS_STATS_ATTR_CONNS => &mut s.conns,
            IPVS_STATS_ATTR_INPKTS => &mut s.inpkts,
            IPVS_STATS_ATTR_OUTPKTS => &mut s.outpkts,
            IPVS_STATS_ATTR_INBYTES => &mut s.inbytes,
            IPVS_STATS_ATTR_OUTBYTES => &mut s.outbytes,
            IPVS_STATS_ATTR_CPS => &mut s.cps,
            IPVS_STATS_ATTR_INPPS => &mut s.inpps,
            IPVS_STATS_ATTR_OUTPPS => &mut s.outpps,
            IPVS_STATS_ATTR_INBPS => &mut s.inbps,
            IPVS_STATS_ATTR_OUTBPS => &mut s.outbps,
            _ => return Ok(()), // IPVS_STATS_ATTR_PAD and anything newer
        };
        *field = match v.len() {
            4 => u64::from(u32_ne(what, v)?),
            8 => u64::from_ne_bytes(fixed(what, v)?),
            got => return Err(DecodeError::Length { what, expected: 8, got }),
        };
        Ok(())
    })?;
    Ok(s)
}

pub(crate) fn parse_cmd_attrs(buf: &[u8]) -> Result<Vec<CmdAttr>, DecodeError> {
    let mut out = Vec::new();
    walk("message", buf, |kind, v| {
        out.push(match kind {
            IPVS_CMD_ATTR_SERVICE => CmdAttr::Service(parse_svc_attrs(v)?),
            IPVS_CMD_ATTR_DEST => CmdAttr::Dest(parse_dest_attrs(v)?),
            IPVS_CMD_ATTR_TIMEOUT_TCP => CmdAttr::TimeoutTcp(u32_ne("timeout tcp", v)?),
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => CmdAttr::TimeoutTcpFin(u32_ne("timeout tcp fin", v)?),
            IPVS_CMD_ATTR_TIMEOUT_UDP => CmdAttr::TimeoutUdp(u32_ne("timeout udp", v)?),
            k => CmdAttr::Other(DefaultNla::new(k, v.to_vec())),
        });
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn parse_svc_attrs(buf: &[u8]) -> Result<Vec<SvcAttr>, DecodeError> {
    let mut out = Vec::new();
    walk("service", buf, |kind, v| {
        out.push(match kind {
            IPVS_SVC_ATTR_AF => SvcAttr::Af(u16_ne("service af", v)?),
            IPVS_SVC_ATTR_PROTOCOL => SvcAttr::Protocol(u16_ne("service protocol", v)?),
            IPVS_SVC_ATTR_ADDR => SvcAttr::Addr(addr16("service addr", v)?),
            IPVS_SVC_ATTR_PORT => SvcAttr::Port(u16_be("service port", v)?),
            IPVS_SVC_ATTR_FWMARK => SvcAttr::Fwmark(u32_ne("service fwmark", v)?),
            IPVS_SVC_ATTR_SCHED_NAME => SvcAttr::SchedName(cstr("service scheduler", v)?),
            IPVS_SVC_ATTR_FLAGS => {
                let raw: [u8; 8] = fixed("service flags", v)?;
                let (flags, mask) = raw.split_at(4);
                SvcAttr::Flags { flags: u32_ne("service flags", flags)?, mask: u32_ne("service flags", mask)? }
            }
            IPVS_SVC_ATTR_TIMEOUT => SvcAttr::Timeout(u32_ne("service timeout", v)?),
            IPVS_SVC_ATTR_NETMASK => SvcAttr::Netmask(fixed("service netmask", v)?),
            IPVS_SVC_ATTR_STATS => SvcAttr::Stats(stats("service stats", v)?),
            IPVS_SVC_ATTR_PE_NAME => SvcAttr::PeName(cstr("service pe name", v)?),
            IPVS_SVC_ATTR_STATS64 => SvcAttr::Stats64(stats("service stats64", v)?),
            k => SvcAttr::Other(DefaultNla::new(k, v.to_vec())),
        });
        Ok(())
    })?;
    Ok(out)
}

pub(crate) fn parse_dest_attrs(buf: &[u8]) -> Result<Vec<DestAttr>, DecodeError> {
    let mut out = Vec::new();
    walk("destination", buf, |kind, v| {
        out.push(match kind {
            IPVS_DEST_ATTR_ADDR => DestAttr::Addr(addr16("dest addr", v)?),
            IPVS_DEST_ATTR_PORT => DestAttr::Port(u16_be("dest port", v)?),
            IPVS_DEST_ATTR_FWD_METHOD => DestAttr::FwdMethod(u32_ne("dest fwd method", v)?),
            IPVS_DEST_ATTR_WEIGHT => DestAttr::Weight(i32::from_ne_bytes(fixed("dest weight", v)?)),
            IPVS_DEST_ATTR_U_THRESH => DestAttr::UThresh(u32_ne("dest upper threshold", v)?),
            IPVS_DEST_ATTR_L_THRESH => DestAttr::LThresh(u32_ne("dest lower threshold", v)?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => DestAttr::ActiveConns(u32_ne("dest active conns", v)?),
            IPVS_DEST_ATTR_INACT_CONNS => DestAttr::InactConns(u32_ne("dest inactive conns", v)?),
            IPVS_DEST_ATTR_PERSIST_CONNS => DestAttr::PersistConns(u32_ne("dest persistent conns", v)?),
            IPVS_DEST_ATTR_STATS => DestAttr::Stats(stats("dest stats", v)?),
            IPVS_DEST_ATTR_ADDR_FAMILY => DestAttr::AddrFamily(u16_ne("dest addr family", v)?),
            IPVS_DEST_ATTR_STATS64 => DestAttr::Stats64(stats("dest stats64", v)?),
            IPVS_DEST_ATTR_TUN_TYPE => DestAttr::TunType(fixed::<1>("dest tunnel type", v)?[0]),
            IPVS_DEST_ATTR_TUN_PORT => DestAttr::TunPort(u16_be("dest tunnel port", v)?),
            IPVS_DEST_ATTR_TUN_FLAGS => DestAttr::TunFlags(u16_ne("dest tunnel flags", v)?),
            k => DestAttr::Other(DefaultNla::new(k, v.to_vec())),
        });
        Ok(())
    })?;
    Ok(out)
}
