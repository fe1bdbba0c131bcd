//! Generates the protobuf types and gRPC services from `proto/` with protox (a protobuf compiler
//! in Rust), so no system `protoc` is needed. The compiled descriptor set is also written out:
//! server reflection (which the Jina gateway requires) serves it. With the `cuda` feature it also
//! compiles the CUDA kernels (`src/model/kernels/cuda/*.cu`) to PTX with nvcc.

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
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_ptx(&out)?;
    }
    Ok(())
}

/// `<name>.cu` -> `$OUT_DIR/<name>.ptx` for each kernel file, for `CUDA_COMPUTE_CAP` (as candle's kernels;
/// default 90), with nvcc from `CUDA_HOME`/`CUDA_PATH` or `PATH`. PTX for the virtual
/// architecture: the driver compiles it for the GPU it runs on at first load.
fn cuda_ptx(out: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    // Opening a GPU compares its capability with this (model::device).
    println!("cargo:rustc-env=CLIPFT_CUDA_CAP={cap}");
    let nvcc = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|home| std::path::PathBuf::from(home).join("bin").join("nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "nvcc".into());
    // Every `.cu` file of the folder (a new kernel file needs no entry here); the folder's
    // listing reruns this when a file is added.
    let dir = std::path::Path::new("src/model/kernels/cuda");
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-changed=src/model/kernels/cuda/common.cuh");
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    names.sort();
    for name in names {
        let src = format!("src/model/kernels/cuda/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = std::process::Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.ptx")))
            .status()
            .map_err(|e| {
                format!(
                    "{}: {e} (set CUDA_HOME or put nvcc on PATH)",
                    nvcc.display()
                )
            })?;
        if !status.success() {
            return Err(format!("nvcc failed on {src} ({status})").into());
        }
    }
    Ok(())
}
