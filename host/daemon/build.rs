//! Generates the gRPC code from `proto/` with protox: no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/containerd/services/leases/v1/leases.proto",
        "proto/wasnap/v1/admin.proto",
    ];
    for f in files.iter().chain(&["proto/containerd/types/mount.proto"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
