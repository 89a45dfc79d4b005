//! IPVS generic netlink messages: the payload type (on netlink-packet-generic's `GenlFamily`),
//! the requests the client sends, and their encoding into complete netlink messages.

use std::fmt;

use netlink_packet_core::{Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use crate::attr::{CmdAttr, DestAttr, SvcAttr, parse_cmd_attrs};
use crate::consts::*;
use crate::convert;
use crate::error::DecodeError;
use crate::types::{Destination, Service, Timeouts};

/// The generic netlink payload of an IPVS message: a command and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: u8,
    pub attrs: Vec<CmdAttr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl IpvsMessage {
    /// Decodes a generic netlink payload (the 4-byte genl header, then attributes).
    pub fn decode(payload: &[u8]) -> Result<IpvsMessage, DecodeError> {
        let header = GenlHeader::parse(payload).map_err(|_| DecodeError::Truncated {
            what: "genl header",
            need: GENL_HDRLEN,
            have: payload.len(),
        })?;
        Ok(IpvsMessage { cmd: header.cmd, attrs: parse_cmd_attrs(&payload[GENL_HDRLEN..])? })
    }

    /// The nested service attributes, if any.
    pub fn service(&self) -> Option<&[SvcAttr]> {
        self.attrs.iter().find_map(|a| if let CmdAttr::Service(s) = a { Some(s.as_slice()) } else { None })
    }

    /// The nested destination attributes, if any.
    pub fn dest(&self) -> Option<&[DestAttr]> {
        self.attrs.iter().find_map(|a| if let CmdAttr::Dest(d) = a { Some(d.as_slice()) } else { None })
    }

    /// The timeouts in a GET_CONFIG reply or a SET_CONFIG request; absent ones are 0.
    pub fn timeouts(&self) -> Timeouts {
        let mut t = Timeouts::default();
        for a in &self.attrs {
            match a {
                CmdAttr::TimeoutTcp(v) => t.tcp = *v,
                CmdAttr::TimeoutTcpFin(v) => t.tcp_fin = *v,
                CmdAttr::TimeoutUdp(v) => t.udp = *v,
                _ => {}
            }
        }
        t
    }

    /// Encodes this payload as a complete netlink message for `family_id`.
    pub fn encode(&self, family_id: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(self.clone());
        genl.set_resolved_family_id(family_id);
        finish(NetlinkMessage::from(genl), flags, seq)
    }
}

pub(crate) const GENL_HDRLEN: usize = 4;

fn finish<T>(mut msg: NetlinkMessage<T>, flags: u16, seq: u32) -> Vec<u8>
where
    T: netlink_packet_core::NetlinkSerializable,
{
    msg.header.flags = flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// CTRL_CMD_GETFAMILY for "IPVS", to the generic netlink controller.
pub fn encode_get_family(seq: u32) -> Vec<u8> {
    let ctrl = GenlCtrl { cmd: GenlCtrlCmd::GetFamily, nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.into())] };
    finish(NetlinkMessage::from(GenlMessage::from_payload(ctrl)), NLM_F_REQUEST | NLM_F_ACK, seq)
}

/// The family id in a CTRL_CMD_NEWFAMILY reply. Parsed by hand rather than with
/// netlink-packet-generic's `GenlCtrl`, which rejects attributes it does not know.
pub fn decode_family_id(payload: &[u8]) -> Result<u16, DecodeError> {
    let attrs = payload.get(GENL_HDRLEN..).ok_or(DecodeError::Truncated {
        what: "genl header",
        need: GENL_HDRLEN,
        have: payload.len(),
    })?;
    let mut id = None;
    crate::attr::walk("ctrl reply", attrs, |kind, v| {
        if kind == CTRL_ATTR_FAMILY_ID {
            id = Some(crate::attr::u16_ne("ctrl family id", v)?);
        }
        Ok(())
    })?;
    id.ok_or(DecodeError::Missing("ctrl family id"))
}

/// Everything the client asks of IPVS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    NewService(Service),
    SetService(Service),
    DelService(Service),
    GetService(Service),
    DumpServices,
    NewDest(Service, Destination),
    SetDest(Service, Destination),
    DelDest(Service, Destination),
    DumpDests(Service),
    GetConfig,
    SetConfig(Timeouts),
    Flush,
}

impl Request {
    pub fn is_dump(&self) -> bool {
        matches!(self, Request::DumpServices | Request::DumpDests(_))
    }

    pub fn to_message(&self) -> IpvsMessage {
        let svc = |attrs| CmdAttr::Service(attrs);
        let (cmd, attrs) = match self {
            Request::NewService(s) => (IPVS_CMD_NEW_SERVICE, vec![svc(convert::service_full(s))]),
            Request::SetService(s) => (IPVS_CMD_SET_SERVICE, vec![svc(convert::service_full(s))]),
            Request::DelService(s) => (IPVS_CMD_DEL_SERVICE, vec![svc(convert::service_key(s))]),
            Request::GetService(s) => (IPVS_CMD_GET_SERVICE, vec![svc(convert::service_key(s))]),
            Request::DumpServices => (IPVS_CMD_GET_SERVICE, vec![]),
            Request::NewDest(s, d) => {
                (IPVS_CMD_NEW_DEST, vec![svc(convert::service_key(s)), CmdAttr::Dest(convert::dest_full(d))])
            }
            Request::SetDest(s, d) => {
                (IPVS_CMD_SET_DEST, vec![svc(convert::service_key(s)), CmdAttr::Dest(convert::dest_full(d))])
            }
            Request::DelDest(s, d) => {
                (IPVS_CMD_DEL_DEST, vec![svc(convert::service_key(s)), CmdAttr::Dest(convert::dest_key(d))])
            }
            Request::DumpDests(s) => (IPVS_CMD_GET_DEST, vec![svc(convert::service_key(s))]),
            Request::GetConfig => (IPVS_CMD_GET_CONFIG, vec![]),
            Request::SetConfig(t) => (
                IPVS_CMD_SET_CONFIG,
                vec![CmdAttr::TimeoutTcp(t.tcp), CmdAttr::TimeoutTcpFin(t.tcp_fin), CmdAttr::TimeoutUdp(t.udp)],
            ),
            Request::Flush => (IPVS_CMD_FLUSH, vec![]),
        };
        IpvsMessage { cmd, attrs }
    }

    /// Netlink flags: dumps end with NLMSG_DONE; everything else asks for an ack so that
    /// success is confirmed, not assumed.
    pub fn flags(&self) -> u16 {
        if self.is_dump() { NLM_F_REQUEST | NLM_F_DUMP } else { NLM_F_REQUEST | NLM_F_ACK }
    }

    /// The complete netlink message.
    pub fn encode(&self, family_id: u16, seq: u32) -> Vec<u8> {
        self.to_message().encode(family_id, self.flags(), seq)
    }

    /// The request a message carries (what the kernel would see); for tests and fakes.
    pub fn from_message(msg: &IpvsMessage, dump: bool) -> Result<Request, DecodeError> {
        let svc = || -> Result<Service, DecodeError> {
            Ok(convert::service_from(msg.service().ok_or(DecodeError::Missing("service"))?)?.service)
        };
        let dest = |s: &Service| -> Result<Destination, DecodeError> {
            Ok(convert::dest_from(msg.dest().ok_or(DecodeError::Missing("destination"))?, s.family)?.dest)
        };
        Ok(match msg.cmd {
            IPVS_CMD_NEW_SERVICE => Request::NewService(svc()?),
            IPVS_CMD_SET_SERVICE => Request::SetService(svc()?),
            IPVS_CMD_DEL_SERVICE => Request::DelService(svc()?),
            IPVS_CMD_GET_SERVICE if dump => Request::DumpServices,
            IPVS_CMD_GET_SERVICE => Request::GetService(svc()?),
            IPVS_CMD_NEW_DEST => svc().and_then(|s| Ok(Request::NewDest(s.clone(), dest(&s)?)))?,
            IPVS_CMD_SET_DEST => svc().and_then(|s| Ok(Request::SetDest(s.clone(), dest(&s)?)))?,
            IPVS_CMD_DEL_DEST => svc().and_then(|s| Ok(Request::DelDest(s.clone(), dest(&s)?)))?,
            IPVS_CMD_GET_DEST => Request::DumpDests(svc()?),
            IPVS_CMD_GET_CONFIG => Request::GetConfig,
            IPVS_CMD_SET_CONFIG => Request::SetConfig(msg.timeouts()),
            IPVS_CMD_FLUSH => Request::Flush,
            cmd => return Err(DecodeError::Value { what: "command", value: cmd.into() }),
        })
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::NewService(s) => write!(f, "add service {s}"),
            Request::SetService(s) => write!(f, "update service {s}"),
            Request::DelService(s) => write!(f, "delete service {s}"),
            Request::GetService(s) => write!(f, "get service {s}"),
            Request::DumpServices => f.write_str("list services"),
            Request::NewDest(s, d) => write!(f, "add destination {d} to {s}"),
            Request::SetDest(s, d) => write!(f, "update destination {d} of {s}"),
            Request::DelDest(s, d) => write!(f, "delete destination {d} from {s}"),
            Request::DumpDests(s) => write!(f, "list destinations of {s}"),
            Request::GetConfig => f.write_str("get timeouts"),
            Request::SetConfig(t) => write!(f, "set timeouts (tcp {}s, tcp_fin {}s, udp {}s)", t.tcp, t.tcp_fin, t.udp),
            Request::Flush => f.write_str("flush"),
        }
    }
}
