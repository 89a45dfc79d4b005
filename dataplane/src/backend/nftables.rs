//! The nftables backend, in kube-proxy's nftables layout (tables `ip kube-proxy` and
//! `ip6 kube-proxy`, verdict maps for service addresses and node ports, per-service and
//! per-endpoint chains named as kube-proxy names them, numgen load balancing, affinity in timed
//! dynamic sets), programmed through netlink transactions (kpx-nft-netlink), never the `nft`
//! binary. `render` (one service's objects), `layout` (the fixed objects) and `plan` (the
//! transaction between two states) are pure; `apply` does the I/O; `view` lists the kernel's
//! table for the admin API. docs/nftables.md describes the layout and where kpx differs.

pub mod apply;
pub mod desired;
pub mod endpoints;
pub mod layout;
pub mod names;
pub mod owners;
pub mod plan;
pub mod render;
pub mod stmt;
#[cfg(test)]
mod tests;
pub mod view;

pub use apply::{NftBackend, NftConfig, NftStats};
