//! Image loading: what is refused, and why.

mod common;

use common::*;
use metta_nucleus::{GlobalKind, Image, LoadError, SpawnError};

fn load(wat: &str) -> Result<Image, LoadError> {
    Image::load(&wat::parse_str(wat).unwrap())
}

#[test]
fn malformed_wasm_is_refused() {
    for bytes in [
        &b""[..],
        b"\0asm",
        b"\0asm\x01\0\0\0\x01\xff\xff",
        b"not wasm at all",
    ] {
        let e = Image::load(bytes).unwrap_err();
        assert!(matches!(e, LoadError::Malformed(_)), "{e:?}");
    }
    // Well-formed binary, invalid module: a type error in the body.
    let e = load(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i64.const 0))"#,
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::Malformed(_)), "{e:?}");
}

#[test]
fn unknown_imports_are_named() {
    let e = load(
        r#"(module (import "metta" "exec" (func (param i32)))
            (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert_eq!(
        e,
        LoadError::UnknownImport {
            module: "metta".into(),
            name: "exec".into()
        }
    );
    assert!(e.to_string().contains("\"exec\""), "{e}");

    let e = load(
        r#"(module (import "env" "log" (func (param i32 i32)))
            (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::UnknownImport { ref module, .. } if module == "env"));

    // Importing memory is not part of the ABI either.
    let e = load(
        r#"(module (import "metta" "memory" (memory 1))
            (export "memory" (memory 0))
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::UnknownImport { .. }), "{e:?}");
}

#[test]
fn import_signatures_are_checked() {
    let e = load(
        r#"(module (import "metta" "log" (func (param i32)))
            (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(
        matches!(e, LoadError::ImportSignature { ref name, expected: "func (i32, i32)", .. } if name == "log"),
        "{e:?}"
    );
    // Every ABI import with its right signature loads.
    load(
        r#"(module
            (import "metta" "log" (func (param i32 i32)))
            (import "metta" "now" (func (result i64)))
            (import "metta" "timer" (func (param i64)))
            (import "metta" "open" (func (param i32 i32) (result i32)))
            (import "metta" "send" (func (param i32 i32 i32) (result i32)))
            (import "metta" "recv" (func (param i32 i32 i32) (result i32)))
            (import "metta" "peek" (func (param i32) (result i32)))
            (import "metta" "reply_to" (func (param i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap();
}

#[test]
fn missing_or_wrong_exports_are_refused() {
    let e =
        load(r#"(module (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#)
            .unwrap_err();
    assert_eq!(e, LoadError::MissingExport("memory"));
    let e = load(r#"(module (memory (export "memory") 1))"#).unwrap_err();
    assert_eq!(e, LoadError::MissingExport("metta_activate"));
    let e = load(
        r#"(module (memory (export "memory") 1)
            (func (export "metta_activate") (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::ExportSignature {
                name: "metta_activate",
                ..
            }
        ),
        "{e:?}"
    );
    let e = load(
        r#"(module (memory 1) (global (export "memory") i32 (i32.const 0))
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(
        matches!(e, LoadError::ExportSignature { name: "memory", .. }),
        "{e:?}"
    );
}

#[test]
fn what_snapshots_cannot_capture_is_refused() {
    let e = load(
        r#"(module (memory (export "memory") 1)
            (func $init)
            (start $init)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert_eq!(e, LoadError::StartFunction);

    let e = load(
        r#"(module (memory (export "memory") 1)
            (global (export "__metta_global_0") (mut i32) (i32.const 0))
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(matches!(e, LoadError::ReservedExport(_)), "{e:?}");

    let e = load(
        r#"(module (memory (export "memory") 1)
            (global (mut funcref) (ref.null func))
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap_err();
    assert!(
        matches!(e, LoadError::UnsupportedGlobal { index: 0, .. }),
        "{e:?}"
    );

    let e = load(
        r#"(module (memory (export "memory") 1)
            (table 1 funcref)
            (func (export "metta_activate") (param i32) (result i32)
              (table.set (i32.const 0) (ref.null func))
              i32.const 0))"#,
    )
    .unwrap_err();
    assert!(
        matches!(e, LoadError::TableMutation { func: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn private_mutable_globals_are_exported_for_snapshots() {
    let img = load(
        r#"(module (memory (export "memory") 1)
            (global $sp (mut i32) (i32.const 65536))
            (global $k i32 (i32.const 7))
            (global $t (mut i64) (i64.const 0))
            (global $f (mut f64) (f64.const 0.5))
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap();
    assert_eq!(
        img.mutable_globals(),
        &[
            (0, GlobalKind::I32),
            (2, GlobalKind::I64),
            (3, GlobalKind::F64)
        ]
    );
    // The content address is the hash of the original bytes.
    let bytes = wat::parse_str(EMPTY).unwrap();
    assert_eq!(
        Image::load(&bytes).unwrap().hash(),
        *blake3::hash(&bytes).as_bytes()
    );
}

#[test]
fn initial_memory_beyond_the_contract_is_refused_at_spawn() {
    let img = load(
        r#"(module (memory (export "memory") 32)
            (func (export "metta_activate") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap();
    let mut n = nucleus();
    let mut c = contract(MS, 10 * MS, false);
    c.memory = 16 * 65536;
    let e = n.spawn("big", &img, c, all_caps(), 0).unwrap_err();
    assert_eq!(
        e,
        SpawnError::Image(LoadError::MemoryTooLarge {
            initial: 32 * 65536,
            limit: 16 * 65536
        })
    );
    c.memory = 32 * 65536;
    n.spawn("fits", &img, c, all_caps(), 0).unwrap();
}
