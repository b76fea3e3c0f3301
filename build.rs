//! Generates the containerd snapshots v1 *server* (and message types) from `proto/`.
//! `protox` parses the protos in pure Rust, so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
