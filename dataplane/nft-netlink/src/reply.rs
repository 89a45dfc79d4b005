//! Splitting a received datagram into netlink messages (no sockets: testable on bytes).

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer};

use crate::wire::NLMSG_HDRLEN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// An nf_tables message; `payload` starts at its nfgenmsg header.
    Message {
        msg_type: u16,
        seq: u32,
        payload: &'a [u8],
    },
    /// NLMSG_ERROR: `errno` 0 is an ack, negative a refusal.
    Error {
        seq: u32,
        errno: i32,
    },
    /// NLMSG_DONE, closing a dump; a negative `code` means the dump failed.
    Done {
        seq: u32,
        code: i32,
    },
    Control {
        seq: u32,
    },
}

/// The messages of one datagram.
pub fn frames(datagram: &[u8]) -> Result<Vec<Frame<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let buf = NetlinkBuffer::new_checked(rest).map_err(|e| format!("malformed netlink message: {e}"))?;
        let len = buf.length() as usize;
        let seq = buf.sequence_number();
        let payload = &rest[NLMSG_HDRLEN..len];
        let lead = || -> Result<i32, String> {
            let b = payload.get(..4).ok_or("short NLMSG_ERROR/NLMSG_DONE")?;
            Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        out.push(match buf.message_type() {
            NLMSG_ERROR => Frame::Error { seq, errno: lead()? },
            NLMSG_DONE if payload.is_empty() => Frame::Done { seq, code: 0 },
            NLMSG_DONE => Frame::Done { seq, code: lead()? },
            t if t < 16 => Frame::Control { seq },
            t => Frame::Message { msg_type: t, seq, payload },
        });
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    Ok(out)
}
