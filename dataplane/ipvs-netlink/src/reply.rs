//! Reading replies: split a received datagram into netlink messages, and follow one request's
//! replies (over as many datagrams as it takes) until its ack, error or NLMSG_DONE. No sockets
//! here, so dumps of any size are testable on bytes.

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer};

use crate::error::DecodeError;

const NLMSG_HDRLEN: usize = 16;

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A message of a netlink family (IPVS or the controller); `payload` starts at the genl header.
    Message { msg_type: u16, flags: u16, seq: u32, payload: &'a [u8] },
    /// NLMSG_ERROR: `errno` 0 is an ack, negative a refusal.
    Error { seq: u32, errno: i32 },
    /// NLMSG_DONE, closing a dump; a negative `code` means the dump failed.
    Done { seq: u32, code: i32 },
    /// NLMSG_NOOP, NLMSG_OVERRUN or anything else below the first family id.
    Control { msg_type: u16, seq: u32 },
}

/// Splits a datagram into its netlink messages.
pub fn frames(datagram: &[u8]) -> Result<Vec<Frame<'_>>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let have = rest.len();
        let buf = NetlinkBuffer::new_checked(rest).map_err(|_| {
            let need = if have < NLMSG_HDRLEN {
                NLMSG_HDRLEN
            } else {
                u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize
            };
            DecodeError::Truncated { what: "netlink message", need: need.max(NLMSG_HDRLEN), have }
        })?;
        let len = buf.length() as usize;
        let seq = buf.sequence_number();
        let payload = &rest[NLMSG_HDRLEN..len];
        out.push(match buf.message_type() {
            NLMSG_ERROR => Frame::Error { seq, errno: leading_i32("NLMSG_ERROR", payload)? },
            // The kernel may send DONE with no payload at all (old kernels); that is success.
            NLMSG_DONE if payload.is_empty() => Frame::Done { seq, code: 0 },
            NLMSG_DONE => Frame::Done { seq, code: leading_i32("NLMSG_DONE", payload)? },
            t if t < 16 => Frame::Control { msg_type: t, seq },
            t => Frame::Message { msg_type: t, flags: buf.flags(), seq, payload },
        });
        // Messages are 4-byte aligned; the last one may lack its padding.
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    Ok(out)
}

fn leading_i32(what: &'static str, payload: &[u8]) -> Result<i32, DecodeError> {
    match payload.get(..4) {
        Some(b) => Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(DecodeError::Truncated { what, need: 4, have: payload.len() }),
    }
}

/// Why a request's replies did not end well.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// The kernel refused: NLMSG_ERROR or NLMSG_DONE with this (positive) errno.
    Kernel(i32),
    Decode(DecodeError),
    /// A reply for this request of a family or kind it cannot have.
    Unexpected(String),
}

/// Where an exchange stands after a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More datagrams to read.
    More,
    /// The request is answered; its messages are in [`Exchange::into_messages`].
    Finished,
}

/// The replies of one request, gathered as datagrams arrive. A dump ends at NLMSG_DONE; any
/// other request at its ack (NLMSG_ERROR 0). Messages of other sequence numbers (late replies to
/// an abandoned request) are skipped.
#[derive(Debug)]
pub struct Exchange<T> {
    seq: u32,
    family_id: u16,
    dump: bool,
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    messages: Vec<T>,
}

impl<T> Exchange<T> {
    pub fn new(seq: u32, family_id: u16, dump: bool, decode: fn(&[u8]) -> Result<T, DecodeError>) -> Self {
        Exchange { seq, family_id, dump, decode, messages: Vec::new() }
    }

    /// Feeds one received datagram.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Progress, ReplyError> {
        for frame in frames(datagram).map_err(ReplyError::Decode)? {
            match frame {
                Frame::Message { seq, .. }
                | Frame::Error { seq, .. }
                | Frame::Done { seq, .. }
                | Frame::Control { seq, .. }
                    if seq != self.seq => {}
                Frame::Message { msg_type, payload, .. } => {
                    if msg_type != self.family_id {
                        return Err(ReplyError::Unexpected(format!("message of family {msg_type}")));
                    }
                    self.messages.push((self.decode)(payload).map_err(ReplyError::Decode)?);
                }
                Frame::Error { errno: 0, .. } if !self.dump => return Ok(Progress::Finished),
                Frame::Error { errno: 0, .. } => {
                    return Err(ReplyError::Unexpected("ack before the end of a dump".into()));
                }
                Frame::Error { errno, .. } => return Err(ReplyError::Kernel(errno.saturating_abs())),
                Frame::Done { code, .. } if code < 0 => return Err(ReplyError::Kernel(code.saturating_abs())),
                Frame::Done { .. } if self.dump => return Ok(Progress::Finished),
                Frame::Done { .. } => return Err(ReplyError::Unexpected("NLMSG_DONE for a non-dump request".into())),
                Frame::Control { .. } => {}
            }
        }
        Ok(Progress::More)
    }

    pub fn into_messages(self) -> Vec<T> {
        self.messages
    }
}
