//! A blocking nf_tables client over a netlink-sys socket: transactions (one datagram each),
//! table dumps and the ruleset generation id. Callers on tokio use spawn_blocking.

use std::collections::BTreeMap;
use std::io;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::consts::*;
use crate::error::NftError;
use crate::expr::{Expr, SetRef};
use crate::objects::{self, Batch, Chain, Element, Rule, Set};
use crate::reply::{Frame, frames};
use crate::wire::Writer;

/// Dump datagrams are at most a few pages; a datagram that does not fit is reported, never cut.
const RECV_BUF: usize = 256 * 1024;

/// Everything of one table, as one dump read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableDump {
    pub comment: Option<String>,
    pub chains: Vec<Chain>,
    /// Named sets and maps (anonymous ones are folded into the rules that use them).
    pub sets: Vec<Set>,
    pub elements: BTreeMap<String, Vec<Element>>,
    /// Rules in chain order; lookups of anonymous maps carry the map's entries.
    pub rules: Vec<Rule>,
}

/// What the socket has carried, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientStats {
    pub transactions: u64,
    /// Bytes of the last transaction's datagram.
    pub last_bytes: usize,
    pub last_ops: usize,
    pub dumps: u64,
}

pub struct NftClient {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    sndbuf: usize,
    pub stats: ClientStats,
}

impl std::fmt::Debug for NftClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftClient").field("stats", &self.stats).finish()
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> NftError + '_ {
    move |source| NftError::Io { what: what.to_string(), source }
}

impl NftClient {
    /// A socket in this process's network namespace, checked with a generation-id request:
    /// [`NftError::Unavailable`] without nf_tables or without CAP_NET_ADMIN.
    pub fn new() -> Result<NftClient, NftError> {
        let socket =
            Socket::new(NETLINK_NETFILTER).map_err(|e| NftError::Unavailable(format!("netlink socket: {e}")))?;
        NftClient::with_socket(socket)
    }

    /// A socket in the network namespace `ip netns` calls NAME (/run/netns/NAME): a helper
    /// thread enters it, opens the socket and ends; the socket stays in that namespace.
    pub fn in_netns(name: &str) -> Result<NftClient, NftError> {
        let path = format!("/run/netns/{name}");
        let socket = std::thread::spawn(move || -> Result<Socket, NftError> {
            let file = std::fs::File::open(&path).map_err(|e| NftError::Unavailable(format!("{path}: {e}")))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| NftError::Unavailable(format!("setns {path}: {e}")))?;
            Socket::new(NETLINK_NETFILTER).map_err(|e| NftError::Unavailable(format!("netlink socket: {e}")))
        })
        .join()
        .map_err(|_| NftError::Unavailable("netns helper thread panicked".into()))??;
        NftClient::with_socket(socket)
    }

    fn with_socket(mut socket: Socket) -> Result<NftClient, NftError> {
        socket.bind_auto().map_err(io_err("bind"))?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io_err("connect"))?;
        // Errors then echo only the failed message's header, not the whole message.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
        let mut c =
            NftClient { socket, seq: 0, buf: Vec::with_capacity(RECV_BUF), sndbuf: 0, stats: ClientStats::default() };
        match c.gen_id() {
            Ok(_) => Ok(c),
            Err(NftError::Kernel { errno, .. }) if errno == 1 || errno == 13 => {
                Err(NftError::Unavailable("permission denied (CAP_NET_ADMIN is needed)".into()))
            }
            Err(e) => Err(NftError::Unavailable(format!("nf_tables does not answer: {e}"))),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// A new transaction on `table` of `family`.
    pub fn batch(&mut self, family: u8, table: &str) -> Batch {
        let b = Batch::new(family, table, self.seq);
        // Reserve sequence numbers generously; the batch numbers its messages from here.
        self.seq = self.seq.wrapping_add(1 << 24);
        b
    }

    /// The ruleset generation: it changes with every committed transaction, anyone's.
    pub fn gen_id(&mut self) -> Result<u32, NftError> {
        let seq = self.next_seq();
        let mut w = Writer::new();
        w.begin_nft(NFT_MSG_GETGEN, NLM_F_REQUEST, seq, 0);
        w.end();
        let msgs = self.exchange(&w.buf, seq, false, "get generation")?;
        msgs.iter()
            .find_map(|(_, p)| objects::decode_gen_id(p))
            .ok_or_else(|| NftError::Decode("generation reply without an id".into()))
    }

    /// Sends one transaction. The kernel applies all of it or none of it; a refusal names the
    /// operation (its index in the batch) and the errno. Processing is synchronous within the
    /// send, so every reply is queued by the time it returns: they are read without blocking.
    pub fn commit(&mut self, batch: Batch) -> Result<(), NftError> {
        if batch.is_empty() {
            return Ok(());
        }
        let ops = batch.ops;
        let first = batch.first_seq;
        let (bytes, last) = batch.finish();
        if bytes.len() + 4096 > self.sndbuf {
            let want = (bytes.len() + 65536).max(256 * 1024);
            rustix::net::sockopt::set_socket_send_buffer_size_force(&self.socket, want)
                .map_err(|e| NftError::Io { what: "SO_SNDBUFFORCE".into(), source: e.into() })?;
            self.sndbuf = want;
        }
        self.stats.transactions += 1;
        self.stats.last_bytes = bytes.len();
        self.stats.last_ops = ops;
        let n = self.socket.send(&bytes, 0).map_err(io_err("send transaction"))?;
        if n != bytes.len() {
            return Err(NftError::Decode(format!("sent {n} of {} bytes", bytes.len())));
        }
        let mut done = false;
        let mut failure: Option<NftError> = None;
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, MSG_DONTWAIT | MSG_TRUNC) {
                Ok(n) if n > self.buf.capacity() => {
                    return Err(NftError::Decode(format!("reply of {n} bytes truncated")));
                }
                Ok(n) => {
                    for f in frames(&self.buf[..n]).map_err(NftError::Decode)? {
                        if let Frame::Error { seq, errno } = f {
                            if errno != 0 && failure.is_none() {
                                let op = seq.wrapping_sub(first) as usize;
                                failure = Some(NftError::Kernel {
                                    what: format!("transaction operation {op} of {ops}"),
                                    errno: -errno,
                                });
                            }
                            done |= seq == last;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NftError::Io { what: "read transaction replies".into(), source: e }),
            }
        }
        match (failure, done) {
            (Some(e), _) => Err(e),
            (None, true) => Ok(()),
            (None, false) => Err(NftError::Decode("the kernel did not confirm the transaction".into())),
        }
    }

    /// Dumps `table` of `family`: None when it does not exist.
    pub fn dump_table(&mut self, family: u8, table: &str) -> Result<Option<TableDump>, NftError> {
        self.stats.dumps += 1;
        let mut d = TableDump::default();
        let tables = self.dump(NFT_MSG_GETTABLE, family, None, "list tables")?;
        match tables.iter().find_map(|p| objects::decode_table_comment(p, table)) {
            Some(comment) => d.comment = comment,
            None => return Ok(None),
        }
        let chains = self.dump(NFT_MSG_GETCHAIN, family, None, "list chains")?;
        d.chains = chains.iter().filter_map(|p| objects::decode_chain(p, table)).collect();
        let sets = self.dump(NFT_MSG_GETSET, family, None, "list sets")?;
        let all_sets: Vec<Set> = sets.iter().filter_map(|p| objects::decode_set(p, table)).collect();
        let mut anon: BTreeMap<String, Vec<(u32, crate::Verdict)>> = BTreeMap::new();
        for s in &all_sets {
            let elems = self.dump(NFT_MSG_GETSETELEM, family, Some((table, &s.name)), "list set elements")?;
            let list: Vec<Element> =
                elems.iter().filter_map(|p| objects::decode_elements(p, table)).flat_map(|(_, e)| e).collect();
            if s.flags & NFT_SET_ANONYMOUS != 0 {
                let entries = list
                    .into_iter()
                    .filter_map(|e| Some((u32::from_ne_bytes(e.key.get(..4)?.try_into().ok()?), e.verdict?)))
                    .collect();
                anon.insert(s.name.clone(), entries);
            } else {
                d.elements.insert(s.name.clone(), list);
            }
        }
        d.sets = all_sets.into_iter().filter(|s| s.flags & NFT_SET_ANONYMOUS == 0).collect();
        let rules = self.dump(NFT_MSG_GETRULE, family, None, "list rules")?;
        d.rules = rules.iter().filter_map(|p| objects::decode_rule(p, table)).collect();
        for r in &mut d.rules {
            for e in &mut r.exprs {
                if let Expr::Lookup { set, .. } = e
                    && let SetRef::Named(name) = set
                    && name.starts_with("__")
                {
                    *set = match anon.get(name.as_str()) {
                        Some(entries) => {
                            let mut entries = entries.clone();
                            entries.sort();
                            SetRef::AnonVmap(entries)
                        }
                        None => SetRef::Unresolved(name.clone()),
                    };
                }
            }
        }
        Ok(Some(d))
    }

    /// One dump request; the nf_tables messages of its reply (payloads after the netlink header).
    fn dump(&mut self, msg: u16, family: u8, set: Option<(&str, &str)>, what: &str) -> Result<Vec<Vec<u8>>, NftError> {
        let seq = self.next_seq();
        let mut w = Writer::new();
        w.begin_nft(msg, NLM_F_REQUEST | NLM_F_DUMP, seq, family);
        if let Some((table, name)) = set {
            w.str(NFTA_SET_ELEM_LIST_TABLE, table);
            w.str(NFTA_SET_ELEM_LIST_SET, name);
        }
        w.end();
        Ok(self.exchange(&w.buf, seq, true, what)?.into_iter().map(|(_, p)| p).collect())
    }

    /// Sends `bytes` and reads until the request `seq` is answered (ack, error or end of dump).
    fn exchange(&mut self, bytes: &[u8], seq: u32, dump: bool, what: &str) -> Result<Vec<(u16, Vec<u8>)>, NftError> {
        self.socket.send(bytes, 0).map_err(io_err(what))?;
        let mut out = Vec::new();
        loop {
            self.buf.clear();
            let n = match self.socket.recv(&mut self.buf, MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(NftError::Io { what: what.to_string(), source }),
            };
            if n > self.buf.capacity() {
                return Err(NftError::Decode(format!("{what}: datagram of {n} bytes truncated")));
            }
            for f in frames(&self.buf[..n]).map_err(NftError::Decode)? {
                match f {
                    Frame::Message { seq: s, msg_type, payload } if s == seq => out.push((msg_type, payload.to_vec())),
                    Frame::Error { seq: s, errno } if s == seq => {
                        if errno != 0 {
                            return Err(NftError::Kernel { what: what.to_string(), errno: -errno });
                        }
                        if !dump {
                            return Ok(out);
                        }
                    }
                    Frame::Done { seq: s, code } if s == seq => {
                        if code < 0 {
                            return Err(NftError::Kernel { what: what.to_string(), errno: -code });
                        }
                        return Ok(out);
                    }
                    // GETGEN answers with a NEWGEN message and no ack.
                    _ if !dump && !out.is_empty() => return Ok(out),
                    _ => {}
                }
            }
            if !dump && !out.is_empty() {
                return Ok(out);
            }
        }
    }
}
