//! Reads a spec and everything it imports: the prelude (always first), then the root file and its
//! `import`s, depth first, each file once. Reports missing files, import cycles, syntax errors and
//! models or targets in imported files. Stops at parsed files; meaning comes later.

use std::path::{Path, PathBuf};

use hlac_grammar::ast::{File, Item};
use hlac_grammar::{Diagnostic, FileId, SourceMap};

/// The prelude's text, shipped inside hlac.
pub const PRELUDE: &str = include_str!("../prelude/prelude.hla");
/// The name diagnostics use for the prelude.
pub const PRELUDE_NAME: &str = "<prelude>";

/// Every parsed file of one compilation.
pub struct Loaded {
    /// The prelude, then imported files in load order; the root file is last.
    pub files: Vec<(FileId, File)>,
    /// The root file.
    pub root: FileId,
}

impl Loaded {
    /// The root file's syntax tree.
    pub fn root_file(&self) -> &File {
        self.files.iter().find(|(id, _)| *id == self.root).map(|(_, f)| f).unwrap_or_else(|| unreachable!("the root file is always loaded"))
    }
}

/// Where the root's text comes from.
pub enum Input<'a> {
    /// A file on disk.
    Path(&'a Path),
    /// Text in memory, with a display name and the directory its imports are relative to.
    Text {
        /// Name shown in diagnostics.
        name: &'a str,
        /// The text.
        text: &'a str,
        /// Base directory for imports.
        dir: &'a Path,
    },
}

/// Loads the prelude, the root and its imports. Diagnostics are returned beside whatever loaded.
pub fn load(input: Input<'_>, sources: &mut SourceMap) -> (Option<Loaded>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let mut files = Vec::new();
    let prelude = sources.add(PRELUDE_NAME, PRELUDE);
    match hlac_grammar::parse(prelude, PRELUDE) {
        Ok(f) => files.push((prelude, f)),
        Err(d) => {
            diags.push(d.with_note("this is a bug in hlac: its prelude does not parse"));
            return (None, diags);
        }
    }
    let (root_name, root_text, dir, canonical) = match input {
        Input::Path(path) => match std::fs::read_to_string(path) {
            Ok(text) => (
                path.display().to_string(),
                text,
                path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                std::fs::canonicalize(path).ok(),
            ),
            Err(e) => {
                diags.push(Diagnostic::error_nowhere("E0101", format!("cannot read `{}`: {e}", path.display())));
                return (None, diags);
            }
        },
        Input::Text { name, text, dir } => (name.to_string(), text.to_string(), dir.to_path_buf(), None),
    };
    let root = sources.add(root_name.clone(), root_text.clone());
    let mut loader = Loader { sources, files: &mut files, diags: &mut diags, stack: Vec::new(), done: Vec::new() };
    let parsed = match hlac_grammar::parse(root, &root_text) {
        Ok(f) => f,
        Err(d) => {
            diags.push(d);
            return (None, diags);
        }
    };
    loader.stack.push(canonical.clone().unwrap_or_default());
    // Diagnostics show import paths relative to the root as the user named it, not the directory
    // the files were found in (which may be absolute).
    let shown = match Path::new(&root_name).parent() {
        Some(p) if !root_name.starts_with('<') => p.to_path_buf(),
        _ => dir.clone(),
    };
    loader.imports(&parsed, &dir, &shown);
    files.push((root, parsed));
    (Some(Loaded { files, root }), diags)
}

struct Loader<'a> {
    sources: &'a mut SourceMap,
    files: &'a mut Vec<(FileId, File)>,
    diags: &'a mut Vec<Diagnostic>,
    /// Canonical paths of the files being loaded, outermost first (for cycle detection).
    stack: Vec<PathBuf>,
    /// Canonical paths already loaded (a file imported twice is loaded once).
    done: Vec<PathBuf>,
}

impl Loader<'_> {
    /// Loads the imports of `file`. `dir` is where its imports are looked up; `shown` is the same
    /// directory as the user named it, so diagnostics show paths as written, not canonical ones.
    fn imports(&mut self, file: &File, dir: &Path, shown: &Path) {
        for item in &file.items {
            let Item::Import(import) = item else { continue };
            let path = dir.join(&import.path.value);
            let shown_path = shown.join(&import.path.value);
            let canonical = match std::fs::canonicalize(&path) {
                Ok(c) if c.is_file() => c,
                _ => {
                    self.diags.push(
                        Diagnostic::error(
                            "E0101",
                            format!("cannot import `{}`: no such file", import.path.value),
                            import.path.span,
                            format!("looked for {}", shown_path.display()),
                        )
                        .with_hint("import paths are relative to the importing file"),
                    );
                    continue;
                }
            };
            if let Some(pos) = self.stack.iter().position(|p| *p == canonical) {
                let chain: Vec<String> = self.stack[pos..]
                    .iter()
                    .chain(std::iter::once(&canonical))
                    .map(|p| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()))
                    .collect();
                self.diags.push(
                    Diagnostic::error(
                        "E0102",
                        format!("import cycle: `{}` imports itself", import.path.value),
                        import.span,
                        "this import closes the cycle",
                    )
                    .with_note(format!("cycle: {}", chain.join(" -> "))),
                );
                continue;
            }
            if self.done.contains(&canonical) {
                continue;
            }
            let text = match std::fs::read_to_string(&canonical) {
                Ok(t) => t,
                Err(e) => {
                    self.diags.push(Diagnostic::error(
                        "E0101",
                        format!("cannot read `{}`: {e}", import.path.value),
                        import.path.span,
                        "unreadable",
                    ));
                    continue;
                }
            };
            let id = self.sources.add(shown_path.display().to_string(), text.clone());
            let parsed = match hlac_grammar::parse(id, &text) {
                Ok(f) => f,
                Err(d) => {
                    self.diags.push(d);
                    continue;
                }
            };
            for item in &parsed.items {
                if let Item::Model(_) | Item::Target(_) = item {
                    self.diags.push(
                        Diagnostic::error(
                            "E0103",
                            "an imported file may only declare mixers",
                            item.span(),
                            "a `model` or `target` in an imported file",
                        )
                        .with_label(import.span, "imported here")
                        .with_hint("put the model and its target in the file you compile"),
                    );
                }
            }
            self.stack.push(canonical.clone());
            let sub_dir = canonical.parent().map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
            let sub_shown = shown_path.parent().map_or_else(|| shown.to_path_buf(), Path::to_path_buf);
            self.imports(&parsed, &sub_dir, &sub_shown);
            self.stack.pop();
            self.done.push(canonical);
            self.files.push((id, parsed));
        }
    }
}
