//! The IPVS generic-netlink codec and a small blocking client, for kpx's ipvs backend.
//!
//! Layers, bottom up: `consts` (uapi numbers), `attr` (wire attributes on netlink-packet-core's
//! `Nla`), `convert` (wire <-> the domain types in `types`), `message` (requests as generic netlink
//! messages), `reply` (splitting received datagrams into netlink messages and following one
//! request's replies to its end, without sockets) and `client` (netlink-sys I/O). Everything but
//! `client` is pure and unit-tested on bytes. Decoding never panics: unknown attributes are
//! skipped and malformed input is a [`DecodeError`].

pub mod attr;
mod client;
pub mod consts;
pub mod convert;
mod error;
pub mod message;
pub mod reply;
mod types;

pub use client::IpvsClient;
pub use error::{DecodeError, IpvsError};
pub use message::{IpvsMessage, Request};
pub use types::{
    Destination, DestinationInfo, Family, Forward, Protocol, Service, ServiceInfo, Stats, Timeouts, Tunnel,
};

#[cfg(test)]
mod tests;
