//! Compiles the kubelet's plugin APIs with protox (pure Rust: no protoc on the build machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/dra/v1beta1/api.proto",
        "proto/dra/v1/api.proto",
        "proto/pluginregistration/api.proto",
        "proto/health/v1alpha1/api.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
