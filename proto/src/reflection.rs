//! Server reflection for kpx's gRPC servers, so that grpcurl works without .proto files.

use tonic_reflection::server::{Builder, v1, v1alpha};

/// Both reflection protocols (grpcurl 1.8 speaks only v1alpha) listing `services`, gRPC health
/// and reflection itself. Only what a server really serves is listed: the descriptor set holds
/// every kpx service (Sync, Inspect and the dataplane's Admin), and a listed service that
/// answers Unimplemented would mislead whoever inspects the server.
pub fn services(
    services: &[&str],
) -> (
    v1::ServerReflectionServer<impl v1::ServerReflection>,
    v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
) {
    let builder = |reflection: &str| {
        let builder = Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name(reflection);
        services.iter().fold(builder, |b, s| b.with_service_name(*s))
    };
    // Both descriptor sets are compiled in (kpx's by build.rs, health's by tonic-health): a
    // failure here is a build defect, not a runtime condition.
    let v1 = builder("grpc.reflection.v1.ServerReflection").build_v1().expect("kpx descriptors are valid");
    let v1alpha =
        builder("grpc.reflection.v1alpha.ServerReflection").build_v1alpha().expect("kpx descriptors are valid");
    (v1, v1alpha)
}
