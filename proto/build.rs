//! Generates the Rust code of `tessera/v1/*.proto` (messages, clients, servers) and the file
//! descriptor set that server reflection serves. `protoc` comes from `PROTOC` or, when unset, the
//! vendored binary of `protoc-bin-vendored`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY-free: build scripts are single-threaded; setting the variable for this process only.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        .compile_protos(&["tessera/v1/generate.proto", "tessera/v1/worker.proto", "tessera/v1/state.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tessera");
    Ok(())
}
