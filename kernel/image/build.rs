//! Relink when the linker script changes (it is passed by `.cargo/config.toml`),
//! and compile the test domains in `domains/*.wat` to wasm in `OUT_DIR`, where
//! `src/testdomains.rs` includes them.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=domains");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let mut names = Vec::new();
    for entry in std::fs::read_dir("domains").expect("kernel/image/domains") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "wat") {
            println!("cargo:rerun-if-changed={}", path.display());
            let wasm = wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let stem = path.file_stem().expect("a file name").to_owned();
            std::fs::write(Path::new(&out).join(&stem).with_extension("wasm"), wasm)
                .expect("write to OUT_DIR");
            names.push(stem);
        }
    }
    assert!(!names.is_empty(), "no domains/*.wat");
}
