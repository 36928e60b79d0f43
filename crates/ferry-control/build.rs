//! Generates the gRPC types from `proto/ferry/v1` with protox, a protobuf
//! compiler in Rust: building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: a build script
    // compiled in another checkout must still read this one's files.
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = format!("{manifest}/../../proto");
    let file = format!("{root}/ferry/v1/control.proto");
    println!("cargo:rerun-if-changed={root}");
    let descriptors = protox::compile([file], [root.as_str()])?;
    tonic_prost_build::configure()
        // Config texts are `Bytes`: every Watch stream shares one buffer.
        .bytes(".ferry.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
