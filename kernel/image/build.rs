//! Relink when the linker script changes (it is passed by `.cargo/config.toml`).
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
}
