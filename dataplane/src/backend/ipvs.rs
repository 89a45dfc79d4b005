//! The ipvs backend, modelled on kube-proxy's ipvs mode: virtual servers per service address
//! and NodePort, real servers in masquerade mode, the VIPs on the dummy interface kube-ipvs0,
//! and a few iptables rules and ipsets for what IPVS alone does not do (masquerading).
//! `plan` (desired state vs the kernel's table -> netlink operations) and `companion` (ipsets and
//! iptables rules as restore text) are pure; `apply` does the I/O through kpx-ipvs-netlink's
//! blocking client, `ip`, `ipset` and iptables-restore; `host` reads and sets the rest;
//! `dump` lists the kernel's table for the admin API.

pub mod apply;
pub mod companion;
pub mod dump;
pub mod host;
pub mod plan;

pub use apply::{IpvsBackend, IpvsConfig, IpvsStats};
