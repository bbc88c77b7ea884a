//! The `.hla` language: its pest grammar (`hla.pest`), a typed syntax tree with spans, the parser
//! that builds it, a formatter that prints it back in canonical layout, and diagnostics.
//!
//! **Architecture invariant:** this crate knows nothing of LLVM, CUDA, models or kernels. It turns
//! text into trees and trees back into text; meaning is the compiler's business.

pub mod ast;
mod diag;
pub mod fmt;
mod parse;

pub use diag::{render, Diagnostic, FileId, Label, Severity, SourceMap, Span};
pub use parse::{parse, parse_expr};
