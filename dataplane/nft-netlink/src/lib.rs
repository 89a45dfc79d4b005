//! The nf_tables netlink codec and a small blocking client, for kpx's nftables backend.
//!
//! Layers, bottom up: `consts` (uapi numbers), `wire` (messages and attributes written into one
//! reusable buffer, attributes read back), `expr` (rule expressions both ways), `objects`
//! (tables, chains, sets, elements, rules: a transaction [`Batch`] and dump decoders), `reply`
//! (datagrams split into messages) and `client` (netlink-sys I/O, network namespaces). All but
//! `client` is pure and unit-tested on bytes. Decoding never panics: what it does not know
//! becomes [`Expr::Unknown`] or is skipped.
//!
//! Why our own codec: the `nftnl` crate (libnftnl bindings) creates only anonymous constant sets
//! with keys, so it cannot write kube-proxy's verdict maps, timed dynamic sets or dynset
//! updates, and it has no dumps and no generation id; covering that would mean raw libnftnl
//! calls, i.e. `unsafe` FFI in kpx plus a C library on every node. `rustables` is GPL. The
//! whole codec here is a few hundred lines of safe Rust on netlink-packet-core/netlink-sys, as
//! for IPVS, and a one-endpoint transaction is about 1.3 KB on the wire (docs/performance.md
//! has the measured figures).

mod client;
pub mod consts;
mod error;
pub mod expr;
pub mod objects;
pub mod reply;
pub mod wire;

pub use client::{ClientStats, NftClient, TableDump};
pub use error::NftError;
pub use expr::{Expr, SetRef, Verdict};
pub use objects::{Batch, Chain, Element, Hook, Rule, Set};

#[cfg(test)]
mod tests;
