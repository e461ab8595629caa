//! Build script shared by the example domains: link with a 64 KiB wasm stack
//! instead of rustc's default 1 MiB, so a domain's initial memory (what its
//! QoS contract must cover, and what every snapshot and migration copies) is
//! a few wasm pages, not 18. The domains keep their stack frames small (no
//! large locals; big buffers are statics).
fn main() {
    println!("cargo::rerun-if-changed=../link.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo::rustc-link-arg-cdylib=-zstack-size=65536");
    }
}
