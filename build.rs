//! Generates the protobuf types from `proto/` with protox (a protobuf compiler in Rust), so no
//! system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/docarray.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        // Keep `bytes` fields as `bytes::Bytes`: request payloads are sliced, not copied.
        .bytes(["."])
        .compile_fds(fds)?;
    Ok(())
}
