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
    Ok(())
}
