//! Netlink framing, by hand: a writer that appends messages and (nested) attributes to one
//! reusable buffer, and a reader of attributes. nf_tables messages are plain netlink messages
//! with a 4-byte `nfgenmsg` header; their integers are big-endian. A batch of thousands of
//! messages is written into one `Vec<u8>` without an allocation per message or attribute, which
//! is why this is not built from netlink-packet-core's `Nla` values (they allocate per
//! attribute); replies are split with netlink-packet-core (see `reply`).

use netlink_packet_core::NLA_F_NESTED;

use crate::consts::NFNL_SUBSYS_NFTABLES;

pub const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages to one buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    pub buf: Vec<u8>,
    msg_start: Option<usize>,
    /// Messages written since the last [`Writer::clear`].
    pub messages: usize,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.msg_start = None;
        self.messages = 0;
    }

    /// Starts a message of the nf_tables subsystem (`msg` is an NFT_MSG_*), or a control message
    /// (batch begin/end) when `subsys_msg` is false.
    pub fn begin(&mut self, msg_type: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        debug_assert!(self.msg_start.is_none(), "message not ended");
        self.msg_start = Some(self.buf.len());
        self.buf.extend_from_slice(&[0; 4]); // length, patched by end()
        self.buf.extend_from_slice(&msg_type.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    /// An nf_tables message: type (NFNL_SUBSYS_NFTABLES << 8) | msg.
    pub fn begin_nft(&mut self, msg: u16, flags: u16, seq: u32, family: u8) {
        self.begin((NFNL_SUBSYS_NFTABLES << 8) | msg, flags, seq, family, 0);
    }

    pub fn end(&mut self) {
        let start = self.msg_start.take().expect("end() without begin()");
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.messages += 1;
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + align4(len) - len, 0);
    }

    pub fn u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_be_bytes());
    }

    pub fn u64(&mut self, ty: u16, v: u64) {
        self.attr(ty, &v.to_be_bytes());
    }

    /// A NUL-terminated string.
    pub fn str(&mut self, ty: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.buf.resize(self.buf.len() + align4(len) - len, 0);
    }

    /// Opens a nested attribute; close it with [`Writer::nest_end`] with the returned offset.
    pub fn nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// The attributes of `data`, in order: (type without the nested/byte-order flags, payload).
/// Stops at the first malformed one (a decoder then misses attributes, which it reports).
pub fn attrs(data: &[u8]) -> Attrs<'_> {
    Attrs { rest: data }
}

#[derive(Debug, Clone)]
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
        let ty = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & 0x3fff;
        if len < 4 || len > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let payload = &self.rest[4..len];
        self.rest = &self.rest[align4(len).min(self.rest.len())..];
        Some((ty, payload))
    }
}

pub fn be32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

pub fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// A NUL-terminated (or not) string attribute.
pub fn string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The payload of an nf_tables message after its nfgenmsg header: (family, attributes).
pub fn nft_payload(payload: &[u8]) -> Option<(u8, &[u8])> {
    (payload.len() >= NFGEN_HDRLEN).then(|| (payload[0], &payload[NFGEN_HDRLEN..]))
}
