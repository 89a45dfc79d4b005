//! Compiles proto/kpx/v1/*.proto with protox (pure Rust, so no protoc on the build machine) and
//! keeps the encoded descriptor set for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["kpx/v1/state.proto", "kpx/v1/sync.proto", "kpx/v1/inspect.proto", "kpx/v1/admin.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("kpx_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().type_attribute(".kpx.v1", "#[derive(serde::Serialize)]").compile_fds(fds)?;
    // The controlplane's side of kpx.v1.Sync again, sending updates it encoded itself (one
    // node's snapshot is mostly bytes encoded once for many nodes: src/encoded.rs). Same route,
    // same wire format; clients keep the generated prost client above.
    let subscribe = tonic_build::manual::Method::builder()
        .name("sync")
        .route_name("Sync")
        .input_type("crate::v1::NodeMessage")
        .output_type("crate::encoded::EncodedUpdate")
        .codec_path("crate::encoded::SyncCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let sync = tonic_build::manual::Service::builder().name("Sync").package("kpx.v1").method(subscribe).build();
    let manual = out.join("encoded");
    std::fs::create_dir_all(&manual)?;
    tonic_build::manual::Builder::new().build_client(false).out_dir(&manual).compile(&[sync]);
    Ok(())
}
