fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/fedmesh/discovery/v1/discovery.proto",
            "proto/fedmesh/tunnel/v1/tunnel.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
