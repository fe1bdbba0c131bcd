//! Generates the protobuf types and gRPC services from `proto/` with protox (a protobuf compiler
//! in Rust), so no system `protoc` is needed. The compiled descriptor set is also written out:
//! server reflection (which the Jina gateway requires) serves it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/docarray.proto",
        "proto/jina.proto",
        "proto/trainer.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    let mut config = prost_build::Config::new();
    // Keep `bytes` fields as `bytes::Bytes`: request payloads are sliced, not copied.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec plus `decode` / `encode` spans when traces are exported.
        .codec_path("crate::telemetry::grpc::TracedCodec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
