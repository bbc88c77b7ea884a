//! hlac, the compiler for hybrid linear-attention models. [`compile`] reads top to bottom as the
//! whole pipeline:
//!
//! ```text
//! .hla text ─load─▶ syntax trees ─collect─▶ declarations ─build─▶ model IR (classified mixers,
//!   (prelude + imports)                                              fla-named tensors)
//!                                                         ─artifact─▶ manifest.json
//! ```
//!
//! Later stages (kernel IR, the Cranelift and NVPTX back ends) hang off the model IR.
//! User errors are [`Diagnostic`]s; nothing here panics on user input.

pub mod artifact;
pub mod bench;
pub mod build;
pub mod classify;
pub mod hf;
pub mod inspect;
pub mod ir;
pub mod load;
pub mod lower;
pub mod mixer;
pub mod nvptx;
pub mod value;

use std::path::Path;

pub use hlac_grammar::{Diagnostic, SourceMap};

/// The result of checking a spec: the sources (to render diagnostics), every diagnostic, and the
/// model IR when there were no errors.
pub struct Compilation {
    /// Every file read, for rendering diagnostics.
    pub sources: SourceMap,
    /// Errors and warnings, in the order found.
    pub diagnostics: Vec<Diagnostic>,
    /// The model, when the spec has one and no errors were found.
    pub model: Option<ir::Model>,
}

impl Compilation {
    /// Whether any diagnostic is an error.
    pub fn failed(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }

    /// Renders every diagnostic.
    pub fn render(&self, color: bool) -> String {
        hlac_grammar::render(&self.diagnostics, &self.sources, color)
    }
}

/// Parses, resolves and checks a spec file.
pub fn compile(path: &Path) -> Compilation {
    compile_input(load::Input::Path(path))
}

/// Parses, resolves and checks spec text held in memory; imports are relative to `dir`.
pub fn compile_str(name: &str, text: &str, dir: &Path) -> Compilation {
    compile_input(load::Input::Text { name, text, dir })
}

fn compile_input(input: load::Input<'_>) -> Compilation {
    let mut sources = SourceMap::new();
    let (loaded, mut diagnostics) = load::load(input, &mut sources);
    let mut model = None;
    if let Some(loaded) = &loaded {
        let decls = build::Decls::collect(loaded, &mut diagnostics);
        model = build::build(loaded, &decls, &mut diagnostics);
    }
    if diagnostics.iter().any(Diagnostic::is_error) {
        model = None;
    }
    Compilation { sources, diagnostics, model }
}

/// Writes a file through a temporary file in the same directory and a rename, so readers never see
/// half of it.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
