//! kpx's wire API: the generated protobuf/gRPC types for the node sync stream and the
//! inspection service, the encoded descriptor set for server reflection, and the
//! content-version hash that both planes compute the same way.

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

/// Largest message kpx sends; gRPC's default limit is 4 MiB and we stay far below it.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
