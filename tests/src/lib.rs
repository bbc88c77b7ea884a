//! Helpers shared by the integration and snapshot tests in `tests/tests/`: where the repository's
//! specs and fixtures are, and how to compile a spec into the text forms the snapshots pin.

pub mod kernels;
pub mod reference;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Every `.hla` file directly inside `dir` (relative to the root), sorted.
pub fn hla_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "hla")).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// A file's name without its extension.
pub fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Compiles a spec given by its path relative to the repository root, so that diagnostics show
/// stable relative paths.
pub fn compile_rel(rel: &Path) -> hlac::Compilation {
    let abs = root().join(rel);
    let text = std::fs::read_to_string(&abs).unwrap_or_default();
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    hlac::compile_str(&rel.display().to_string(), &text, &dir)
}

/// `path` relative to the repository root.
pub fn rel(path: &Path) -> PathBuf {
    path.strip_prefix(root()).map(Path::to_path_buf).unwrap_or_else(|_| path.to_path_buf())
}
