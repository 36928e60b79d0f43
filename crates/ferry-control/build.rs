//! Generates the gRPC types from `proto/ferry/v1` with protox, a protobuf
//! compiler in Rust: building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{root}/ferry/v1/control.proto");
    println!("cargo:rerun-if-changed={root}");
    let descriptors = protox::compile([file], [root])?;
    tonic_prost_build::configure()
        // Config texts are `Bytes`: every Watch stream shares one buffer.
        .bytes(".ferry.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
