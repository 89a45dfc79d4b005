//! A blocking IPVS client over a netlink-sys socket: one request at a time, each confirmed by
//! the kernel (ack, reply or end of dump) before the next. Callers on tokio use spawn_blocking.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use crate::consts::{GENL_ID_CTRL, MSG_TRUNC};
use crate::convert;
use crate::error::IpvsError;
use crate::message::{IpvsMessage, Request, decode_family_id, encode_get_family};
use crate::reply::{Exchange, Progress, ReplyError};
use crate::types::{Destination, DestinationInfo, Service, ServiceInfo, Timeouts};

/// Dump datagrams are at most 32 KiB (the kernel caps its dump skbs there); one message of any
/// kind is far smaller. A datagram that still does not fit is reported, never silently cut.
const RECV_BUF: usize = 256 * 1024;

const RESOLVE: &str = "resolve generic netlink family IPVS";

pub struct IpvsClient {
    socket: Socket,
    family_id: u16,
    seq: u32,
    buf: Vec<u8>,
    sent: u64,
}

impl std::fmt::Debug for IpvsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpvsClient").field("family_id", &self.family_id).field("sent", &self.sent).finish()
    }
}

fn io_err(request: &str) -> impl FnOnce(io::Error) -> IpvsError + '_ {
    move |source| IpvsError::Io { request: request.to_owned(), source }
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the "IPVS" family.
    /// [`IpvsError::Unavailable`] when the kernel has no IPVS (module not loaded).
    pub fn new() -> Result<IpvsClient, IpvsError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io_err(RESOLVE))?;
        socket.bind_auto().map_err(io_err(RESOLVE))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io_err(RESOLVE))?;
        let mut client = IpvsClient { socket, family_id: 0, seq: 0, buf: Vec::with_capacity(RECV_BUF), sent: 0 };
        let seq = client.next_seq();
        let ex = Exchange::new(seq, GENL_ID_CTRL, false, decode_family_id);
        let ids = client.exchange(&encode_get_family(seq), ex);
        client.family_id = match ids {
            Ok(ids) => *ids.first().ok_or_else(|| IpvsError::Protocol {
                request: RESOLVE.into(),
                detail: "acknowledged without a family".into(),
            })?,
            Err(Failure::Reply(ReplyError::Kernel(errno))) => match IpvsError::from_errno(errno, RESOLVE.into()) {
                IpvsError::NotFound { .. } => return Err(IpvsError::Unavailable),
                e => return Err(e),
            },
            Err(e) => return Err(reply_error(e, RESOLVE.into())),
        };
        Ok(client)
    }

    /// The IPVS generic netlink family id the kernel assigned.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// Netlink messages sent so far, family resolution included.
    pub fn messages_sent(&self) -> u64 {
        self.sent
    }

    /// Every virtual service with its counters (one dump, however many datagrams it takes).
    pub fn services(&mut self) -> Result<Vec<ServiceInfo>, IpvsError> {
        let req = Request::DumpServices;
        let msgs = self.execute(&req)?;
        msgs.iter().map(|m| decode_service(m, &req)).collect()
    }

    /// One service, `None` if the kernel has no such service.
    pub fn service(&mut self, service: &Service) -> Result<Option<ServiceInfo>, IpvsError> {
        let req = Request::GetService(service.clone());
        match self.execute(&req) {
            Ok(msgs) => msgs.first().map(|m| decode_service(m, &req)).transpose(),
            Err(IpvsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The real servers of `service` with their connection counts.
    pub fn destinations(&mut self, service: &Service) -> Result<Vec<DestinationInfo>, IpvsError> {
        let req = Request::DumpDests(service.clone());
        let msgs = self.execute(&req)?;
        msgs.iter()
            .map(|m| {
                let attrs = m.dest().ok_or_else(|| missing(&req, "destination"))?;
                convert::dest_from(attrs, service.family)
                    .map_err(|source| IpvsError::Decode { request: req.to_string(), source })
            })
            .collect()
    }

    pub fn add_service(&mut self, service: &Service) -> Result<(), IpvsError> {
        self.execute(&Request::NewService(service.clone())).map(drop)
    }

    pub fn update_service(&mut self, service: &Service) -> Result<(), IpvsError> {
        self.execute(&Request::SetService(service.clone())).map(drop)
    }

    /// Deletes the service and all its destinations.
    pub fn delete_service(&mut self, service: &Service) -> Result<(), IpvsError> {
        self.execute(&Request::DelService(service.clone())).map(drop)
    }

    pub fn add_destination(&mut self, service: &Service, dest: &Destination) -> Result<(), IpvsError> {
        self.execute(&Request::NewDest(service.clone(), dest.clone())).map(drop)
    }

    pub fn update_destination(&mut self, service: &Service, dest: &Destination) -> Result<(), IpvsError> {
        self.execute(&Request::SetDest(service.clone(), dest.clone())).map(drop)
    }

    pub fn delete_destination(&mut self, service: &Service, dest: &Destination) -> Result<(), IpvsError> {
        self.execute(&Request::DelDest(service.clone(), dest.clone())).map(drop)
    }

    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let req = Request::GetConfig;
        let msgs = self.execute(&req)?;
        msgs.first().map(IpvsMessage::timeouts).ok_or_else(|| missing(&req, "config reply"))
    }

    /// Sets the timeouts; a 0 leaves that one unchanged.
    pub fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        self.execute(&Request::SetConfig(*timeouts)).map(drop)
    }

    /// Deletes every service and destination.
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.execute(&Request::Flush).map(drop)
    }

    /// Sends one request and returns the IPVS messages of its reply once the kernel has
    /// confirmed it. The building block of the methods above, public for callers that keep
    /// their own [`Request`]s.
    pub fn execute(&mut self, req: &Request) -> Result<Vec<IpvsMessage>, IpvsError> {
        let seq = self.next_seq();
        let bytes = req.encode(self.family_id, seq);
        self.exchange(&bytes, Exchange::new(seq, self.family_id, req.is_dump(), IpvsMessage::decode))
            .map_err(|e| reply_error(e, req.to_string()))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `bytes`, then reads datagrams until `ex` is finished.
    fn exchange<T>(&mut self, bytes: &[u8], mut ex: Exchange<T>) -> Result<Vec<T>, Failure> {
        let n = self.socket.send(bytes, 0).map_err(Failure::Io)?;
        self.sent += 1;
        if n != bytes.len() {
            return Err(ReplyError::Unexpected(format!("sent {n} of {} bytes", bytes.len())).into());
        }
        loop {
            self.buf.clear();
            let n = match self.socket.recv(&mut self.buf, MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            };
            if n > self.buf.len() {
                let detail = format!("datagram of {n} bytes exceeds the {RECV_BUF}-byte buffer");
                return Err(ReplyError::Unexpected(detail).into());
            }
            if ex.feed(&self.buf[..n])? == Progress::Finished {
                return Ok(ex.into_messages());
            }
        }
    }
}

fn decode_service(m: &IpvsMessage, req: &Request) -> Result<ServiceInfo, IpvsError> {
    let attrs = m.service().ok_or_else(|| missing(req, "service"))?;
    convert::service_from(attrs).map_err(|source| IpvsError::Decode { request: req.to_string(), source })
}

fn missing(req: &Request, what: &str) -> IpvsError {
    IpvsError::Protocol { request: req.to_string(), detail: format!("reply without {what}") }
}

/// Why an exchange failed: the socket, or what came back.
enum Failure {
    Io(io::Error),
    Reply(ReplyError),
}

impl From<ReplyError> for Failure {
    fn from(e: ReplyError) -> Failure {
        Failure::Reply(e)
    }
}

fn reply_error(e: Failure, request: String) -> IpvsError {
    match e {
        Failure::Io(source) => IpvsError::Io { request, source },
        Failure::Reply(ReplyError::Kernel(errno)) => IpvsError::from_errno(errno, request),
        Failure::Reply(ReplyError::Decode(source)) => IpvsError::Decode { request, source },
        Failure::Reply(ReplyError::Unexpected(detail)) => IpvsError::Protocol { request, detail },
    }
}
