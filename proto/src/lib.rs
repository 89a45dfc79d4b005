//! kpx's wire API: the generated protobuf/gRPC types for the node sync stream and the
//! inspection service, the encoded descriptor set for server reflection, and the
//! content-version hash that both planes compute the same way.

pub mod encoded;
#[cfg(feature = "reflection")]
pub mod reflection;
mod update;
pub mod version;

/// Generated types of package `kpx.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kpx.v1");
}

/// Encoded `FileDescriptorSet` of kpx.v1, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kpx_descriptor.bin"));

/// Largest update chunk kpx sends. Small on purpose: tonic keeps each stream's encode buffer (on
/// the controlplane) and decode buffer (on the node) at the size of the largest message it
/// carried, for the stream's life. With 1 MiB chunks a 1,500-node fan-out kept ~0.8 MiB per
/// node stream after the snapshots; 64 KiB chunks cost more messages per snapshot (about 60 at
/// 100k endpoints) and keep that to 64 KiB.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Largest message a kpx client or server decodes: gRPC's default. A chunk holds at least one
/// entry, and one entry (a Service with thousands of source ranges) may exceed a chunk.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// `Endpoint.node_tag` of a node name: the low 32 bits of its XXH3-64 hash, 1 for the one name
/// whose bits are 0 (0 means "no node named").
pub fn node_tag(node_name: &str) -> u32 {
    match xxhash_rust::xxh3::xxh3_64(node_name.as_bytes()) as u32 {
        0 => 1,
        t => t,
    }
}

#[cfg(test)]
mod node_tag_tests {
    #[test]
    fn tags_are_stable_and_never_zero() {
        // Both planes and every replica must agree: a pinned value, not just self-consistency.
        assert_ne!(super::node_tag("node-a"), super::node_tag("node-b"));
        assert_ne!(super::node_tag(""), 0);
        // The low bits of XXH3-64("kind-worker"), 0xbba8_7969: another hash would split the planes.
        assert_eq!(super::node_tag("kind-worker"), 3_148_380_521);
    }
}
