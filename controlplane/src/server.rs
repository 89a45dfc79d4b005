//! The gRPC services: `kpx.v1.Sync` (node streams) and `kpx.v1.Inspect` (people, kpxctl,
//! grpcurl). Both only talk to the [`Cache`]; this module owns the stream plumbing: the first
//! message, chunking, flow control (one update in flight per node) and NACK retry timing.

mod chunk;
mod inspect;
mod sync;

pub use chunk::{ViewSegments, chunk_update};
pub use inspect::InspectService;
pub use sync::{SyncConfig, SyncService};
