//! Loading domain images: validation against the ABI and the global rewrite.
//!
//! [`Image::load`] validates the module with wasmi, checks every import
//! against ABI v1 (module `metta`, one of [`abi::IMPORTS`], exact
//! signature), checks the exports [`abi::ACTIVATE`] `(i32) -> i32` and
//! [`abi::MEMORY`], and refuses what a snapshot could not capture: a start
//! function, mutable globals of reference or vector type, and instructions
//! that mutate tables.
//!
//! Then it **rewrites** the module so every mutable global is also exported
//! as `__metta_global_<index>`: wasmi (like every engine) only reaches
//! globals through exports, and compilers keep `__stack_pointer` private, so
//! without this a snapshot could not capture a Rust domain's stack pointer.
//! The rewrite is a section walk that copies every section byte for byte
//! except the export section, which is re-encoded with the extra entries
//! (wasmparser reads it; the encoding is a few LEB128s, so no encoder crate is
//! needed). The content hash stays the blake3 of the *original* bytes.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use metta_proto::abi;
use metta_proto::Contract;
use wasmi::{ExternType, ValType};
use wasmparser::{BinaryReader, ExternalKind, Operator};

use crate::merkle::Hash;

/// Export-name prefix reserved for the nucleus's global exports.
pub const GLOBAL_EXPORT_PREFIX: &str = "__metta_global_";

/// Bytes per wasm page.
pub const PAGE: u64 = 64 * 1024;

/// The value type of a mutable global a snapshot captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalKind {
    /// `i32`.
    I32,
    /// `i64`.
    I64,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
}

/// Why a module is not a valid domain image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// Not valid WebAssembly (or uses a disabled feature); wasmi's message.
    Malformed(String),
    /// An import outside ABI v1.
    UnknownImport {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// An ABI import with the wrong kind or signature.
    ImportSignature {
        /// The import name.
        name: String,
        /// The ABI signature.
        expected: &'static str,
        /// What the module declared.
        found: String,
    },
    /// A required export is absent.
    MissingExport(&'static str),
    /// A required export has the wrong kind or signature.
    ExportSignature {
        /// The export name.
        name: &'static str,
        /// What the ABI requires.
        expected: &'static str,
        /// What the module declared.
        found: String,
    },
    /// The module has a start function (initialisation belongs in the first
    /// activation, [`abi::REASON_START`], where it is fuelled and scheduled).
    StartFunction,
    /// An export uses the reserved prefix [`GLOBAL_EXPORT_PREFIX`].
    ReservedExport(String),
    /// A mutable global whose type a snapshot cannot hold (reference, v128).
    UnsupportedGlobal {
        /// Global index.
        index: u32,
        /// Its type.
        ty: String,
    },
    /// An instruction that mutates a table (`table.set/grow/fill/copy/init`,
    /// `elem.drop`): snapshots capture memory and globals, not tables.
    TableMutation {
        /// Function index (in the module's function space).
        func: u32,
        /// The instruction.
        op: String,
    },
    /// The initial memory is larger than the contract allows.
    MemoryTooLarge {
        /// Initial memory in bytes.
        initial: u64,
        /// Contract limit in bytes.
        limit: u64,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Malformed(m) => write!(f, "invalid wasm module: {m}"),
            LoadError::UnknownImport { module, name } => write!(
                f,
                "unknown import {module:?}.{name:?}: domains may only import ABI v1 functions from {:?} ({})",
                abi::MODULE,
                abi::IMPORTS.join(", ")
            ),
            LoadError::ImportSignature {
                name,
                expected,
                found,
            } => write!(
                f,
                "import \"metta\".{name:?} has type {found}, ABI v1 says {expected}"
            ),
            LoadError::MissingExport(name) => write!(f, "missing export {name:?}"),
            LoadError::ExportSignature {
                name,
                expected,
                found,
            } => write!(f, "export {name:?} is {found}, must be {expected}"),
            LoadError::StartFunction => f.write_str(
                "the module has a start function; initialise in metta_activate(REASON_START) instead",
            ),
            LoadError::ReservedExport(n) => write!(
                f,
                "export {n:?} uses the prefix {GLOBAL_EXPORT_PREFIX:?} reserved by the nucleus"
            ),
            LoadError::UnsupportedGlobal { index, ty } => write!(
                f,
                "mutable global {index} has type {ty}; snapshots support i32, i64, f32, f64"
            ),
            LoadError::TableMutation { func, op } => write!(
                f,
                "function {func} uses {op}; tables must be immutable (snapshots do not capture them)"
            ),
            LoadError::MemoryTooLarge { initial, limit } => write!(
                f,
                "initial memory {initial} bytes exceeds the contract's {limit} bytes"
            ),
        }
    }
}

impl core::error::Error for LoadError {}

/// A validated, rewritten domain image. Cheap to clone; independent of any
/// engine (each [`Runtime`](crate::Runtime) compiles it once, cached by hash).
#[derive(Clone)]
pub struct Image {
    hash: Hash,
    original_len: usize,
    code: Arc<[u8]>,
    globals: Arc<[(u32, GlobalKind)]>,
    memory_min_pages: u64,
    memory_max_pages: Option<u64>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("hash", &HexHash(&self.hash))
            .field("bytes", &self.original_len)
            .field("mutable_globals", &self.globals.len())
            .field("memory_min_pages", &self.memory_min_pages)
            .field("memory_max_pages", &self.memory_max_pages)
            .finish()
    }
}

struct HexHash<'a>(&'a Hash);

impl fmt::Debug for HexHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The wasmi configuration every engine of the nucleus uses.
pub(crate) fn engine_config(mode: wasmi::CompilationMode) -> wasmi::Config {
    let mut c = wasmi::Config::default();
    c.consume_fuel(true)
        .compilation_mode(mode)
        .wasm_multi_memory(false)
        .wasm_custom_page_sizes(false);
    c
}

impl Image {
    /// Validates `wasm` as an ABI v1 domain and prepares it for
    /// instantiation and snapshots.
    pub fn load(wasm: &[u8]) -> Result<Image, LoadError> {
        // Validate only (eager validation, lazy translation): the runtime that
        // instantiates the image compiles it with its own engine.
        if !wasm.starts_with(b"\0asm") {
            return Err(LoadError::Malformed(
                "not a wasm module (it does not start with \\0asm)".to_string(),
            ));
        }
        let engine = wasmi::Engine::new(&engine_config(wasmi::CompilationMode::LazyTranslation));
        // wasmi's messages may span lines: one line each.
        let module = wasmi::Module::new(&engine, wasm).map_err(|e| {
            LoadError::Malformed(
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })?;
        for import in module.imports() {
            check_import(import.module(), import.name(), import.ty())?;
        }
        match module.get_export(abi::ACTIVATE) {
            None => return Err(LoadError::MissingExport(abi::ACTIVATE)),
            Some(ExternType::Func(ft))
                if ft.params() == [ValType::I32] && ft.results() == [ValType::I32] => {}
            Some(other) => {
                return Err(LoadError::ExportSignature {
                    name: abi::ACTIVATE,
                    expected: "func (i32) -> i32",
                    found: extern_desc(&other),
                })
            }
        }
        let (memory_min_pages, memory_max_pages) = match module.get_export(abi::MEMORY) {
            None => return Err(LoadError::MissingExport(abi::MEMORY)),
            Some(ExternType::Memory(mt)) => (mt.minimum(), mt.maximum()),
            Some(other) => {
                return Err(LoadError::ExportSignature {
                    name: abi::MEMORY,
                    expected: "a memory",
                    found: extern_desc(&other),
                })
            }
        };
        let (code, globals) = rewrite(wasm)?;
        Ok(Image {
            hash: *blake3::hash(wasm).as_bytes(),
            original_len: wasm.len(),
            code: code.into(),
            globals: globals.into(),
            memory_min_pages,
            memory_max_pages,
        })
    }

    /// blake3 of the original module bytes (the content address).
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// Size of the original module in bytes.
    pub fn len(&self) -> usize {
        self.original_len
    }

    /// Whether the original module is empty (never true for a loaded image).
    pub fn is_empty(&self) -> bool {
        self.original_len == 0
    }

    /// Initial memory in bytes.
    pub fn memory_initial(&self) -> u64 {
        self.memory_min_pages * PAGE
    }

    /// Declared memory maximum in bytes, if any. A maximum above the
    /// contract is accepted: growth stops at the contract's limit anyway
    /// (`memory.grow` returns -1), and toolchains often declare 4 GiB.
    pub fn memory_maximum(&self) -> Option<u64> {
        self.memory_max_pages.map(|p| p * PAGE)
    }

    /// The mutable globals a snapshot captures, `(index, type)`.
    pub fn mutable_globals(&self) -> &[(u32, GlobalKind)] {
        &self.globals
    }

    /// Checks the image fits `contract` (its initial memory).
    pub fn check_contract(&self, contract: &Contract) -> Result<(), LoadError> {
        if self.memory_initial() > contract.memory {
            return Err(LoadError::MemoryTooLarge {
                initial: self.memory_initial(),
                limit: contract.memory,
            });
        }
        Ok(())
    }

    /// The rewritten module the runtime compiles.
    pub(crate) fn code(&self) -> &[u8] {
        &self.code
    }
}

/// The ABI v1 signature of each import.
fn abi_signature(name: &str) -> Option<(&'static [ValType], &'static [ValType], &'static str)> {
    use ValType::{I32, I64};
    Some(match name {
        abi::LOG => (&[I32, I32], &[], "func (i32, i32)"),
        abi::NOW => (&[], &[I64], "func () -> i64"),
        abi::TIMER => (&[I64], &[], "func (i64)"),
        abi::OPEN => (&[I32, I32], &[I32], "func (i32, i32) -> i32"),
        abi::SEND | abi::RECV => (&[I32, I32, I32], &[I32], "func (i32, i32, i32) -> i32"),
        abi::PEEK | abi::REPLY => (&[I32], &[I32], "func (i32) -> i32"),
        _ => return None,
    })
}

fn check_import(module: &str, name: &str, ty: &ExternType) -> Result<(), LoadError> {
    let sig = (module == abi::MODULE)
        .then(|| abi_signature(name))
        .flatten()
        .ok_or_else(|| LoadError::UnknownImport {
            module: module.to_string(),
            name: name.to_string(),
        })?;
    match ty {
        ExternType::Func(ft) if ft.params() == sig.0 && ft.results() == sig.1 => Ok(()),
        other => Err(LoadError::ImportSignature {
            name: name.to_string(),
            expected: sig.2,
            found: extern_desc(other),
        }),
    }
}

fn extern_desc(ty: &ExternType) -> String {
    match ty {
        ExternType::Func(ft) => format!("func {:?} -> {:?}", ft.params(), ft.results()),
        ExternType::Memory(_) => "a memory".to_string(),
        ExternType::Table(_) => "a table".to_string(),
        ExternType::Global(_) => "a global".to_string(),
    }
}

// ---- section walk -------------------------------------------------------

const SEC_GLOBAL: u8 = 6;
const SEC_EXPORT: u8 = 7;
const SEC_START: u8 = 8;
const SEC_CODE: u8 = 10;
const SEC_IMPORT: u8 = 2;

struct Section {
    id: u8,
    /// Header + content, in the original bytes.
    whole: core::ops::Range<usize>,
    /// Content only.
    content: core::ops::Range<usize>,
}

fn read_leb_u32(bytes: &[u8], pos: &mut usize) -> Option<u32> {
    let mut result: u64 = 0;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        result |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(result).ok();
        }
    }
    None
}

fn write_leb_u32(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn sections(wasm: &[u8]) -> Result<Vec<Section>, LoadError> {
    let bad = || LoadError::Malformed("truncated section".to_string());
    let mut out = Vec::new();
    let mut pos = 8;
    while pos < wasm.len() {
        let start = pos;
        let id = wasm[pos];
        pos += 1;
        let size = read_leb_u32(wasm, &mut pos).ok_or_else(bad)? as usize;
        let end = pos
            .checked_add(size)
            .filter(|&e| e <= wasm.len())
            .ok_or_else(bad)?;
        out.push(Section {
            id,
            whole: start..end,
            content: pos..end,
        });
        pos = end;
    }
    Ok(out)
}

fn parse_err(e: wasmparser::BinaryReaderError) -> LoadError {
    LoadError::Malformed(e.to_string())
}

/// The rewritten module and the mutable globals it exports.
type Rewritten = (Vec<u8>, Vec<(u32, GlobalKind)>);

/// Exports every mutable global under `__metta_global_<index>`; returns the
/// new module bytes and the captured globals.
fn rewrite(wasm: &[u8]) -> Result<Rewritten, LoadError> {
    let secs = sections(wasm)?;
    let mut imported_funcs = 0u32;
    let mut globals = Vec::new();
    let mut export_section = None;
    for s in &secs {
        let reader = BinaryReader::new(&wasm[s.content.clone()], s.content.start);
        match s.id {
            SEC_START => return Err(LoadError::StartFunction),
            // Only function imports pass `check_import`, so the global index
            // space starts at 0 with the global section.
            SEC_IMPORT => {
                imported_funcs = wasmparser::ImportSectionReader::new(reader)
                    .map_err(parse_err)?
                    .count();
            }
            SEC_GLOBAL => {
                let reader = wasmparser::GlobalSectionReader::new(reader).map_err(parse_err)?;
                for (index, g) in reader.into_iter().enumerate() {
                    let g = g.map_err(parse_err)?;
                    if !g.ty.mutable {
                        continue;
                    }
                    let index = index as u32;
                    let kind = match g.ty.content_type {
                        wasmparser::ValType::I32 => GlobalKind::I32,
                        wasmparser::ValType::I64 => GlobalKind::I64,
                        wasmparser::ValType::F32 => GlobalKind::F32,
                        wasmparser::ValType::F64 => GlobalKind::F64,
                        other => {
                            return Err(LoadError::UnsupportedGlobal {
                                index,
                                ty: format!("{other:?}"),
                            })
                        }
                    };
                    globals.push((index, kind));
                }
            }
            SEC_EXPORT => export_section = Some(s),
            SEC_CODE => {
                let reader = wasmparser::CodeSectionReader::new(reader).map_err(parse_err)?;
                for (i, body) in reader.into_iter().enumerate() {
                    let body = body.map_err(parse_err)?;
                    let mut ops = body.get_operators_reader().map_err(parse_err)?;
                    while !ops.eof() {
                        let op = ops.read().map_err(parse_err)?;
                        if matches!(
                            op,
                            Operator::TableSet { .. }
                                | Operator::TableGrow { .. }
                                | Operator::TableFill { .. }
                                | Operator::TableCopy { .. }
                                | Operator::TableInit { .. }
                                | Operator::ElemDrop { .. }
                        ) {
                            return Err(LoadError::TableMutation {
                                func: imported_funcs + i as u32,
                                op: format!("{op:?}"),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    // The required exports were checked, so the export section exists.
    let export_section = export_section.ok_or(LoadError::MissingExport(abi::ACTIVATE))?;
    let reader = wasmparser::ExportSectionReader::new(BinaryReader::new(
        &wasm[export_section.content.clone()],
        export_section.content.start,
    ))
    .map_err(parse_err)?;
    let mut entries = Vec::new();
    let mut count = 0u32;
    for e in reader {
        let e = e.map_err(parse_err)?;
        if e.name.starts_with(GLOBAL_EXPORT_PREFIX) {
            return Err(LoadError::ReservedExport(e.name.to_string()));
        }
        let kind = match e.kind {
            ExternalKind::Func => 0,
            ExternalKind::Table => 1,
            ExternalKind::Memory => 2,
            ExternalKind::Global => 3,
            ExternalKind::Tag => 4,
        };
        push_export(&mut entries, e.name, kind, e.index);
        count += 1;
    }
    for &(index, _) in &globals {
        push_export(&mut entries, &global_export_name(index), 3, index);
        count += 1;
    }
    let mut content = Vec::with_capacity(entries.len() + 5);
    write_leb_u32(&mut content, count);
    content.extend_from_slice(&entries);

    let mut out = Vec::with_capacity(wasm.len() + content.len());
    out.extend_from_slice(&wasm[..8]);
    for s in &secs {
        if s.id == SEC_EXPORT {
            out.push(SEC_EXPORT);
            write_leb_u32(&mut out, content.len() as u32);
            out.extend_from_slice(&content);
        } else {
            out.extend_from_slice(&wasm[s.whole.clone()]);
        }
    }
    Ok((out, globals))
}

fn push_export(out: &mut Vec<u8>, name: &str, kind: u8, index: u32) {
    write_leb_u32(out, name.len() as u32);
    out.extend_from_slice(name.as_bytes());
    out.push(kind);
    write_leb_u32(out, index);
}

/// The reserved export name of mutable global `index`.
pub fn global_export_name(index: u32) -> String {
    format!("{GLOBAL_EXPORT_PREFIX}{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb_round_trip() {
        for v in [0u32, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            write_leb_u32(&mut out, v);
            let mut pos = 0;
            assert_eq!(read_leb_u32(&out, &mut pos), Some(v));
            assert_eq!(pos, out.len());
        }
        // Non-minimal encodings (allowed by wasm) read too.
        let mut pos = 0;
        assert_eq!(read_leb_u32(&[0x85, 0x80, 0x00], &mut pos), Some(5));
    }
}
