//! Every file in specs/errors/ produces its diagnostic, rendered without colour and pinned by a
//! snapshot. Files named E* fail; W* files only warn.

use hlac_tests::{compile_rel, hla_files, rel, stem};

#[test]
fn every_error_spec_renders_its_diagnostic() {
    let files = hla_files("specs/errors");
    assert!(files.len() >= 20, "expected one error spec per diagnostic, found {}", files.len());
    for path in files {
        let name = stem(&path);
        let c = compile_rel(&rel(&path));
        let rendered = c.render(false);
        assert!(!rendered.is_empty(), "{name} produced no diagnostic");
        if name.starts_with('W') {
            assert!(!c.failed(), "{name} should only warn:\n{rendered}");
        } else {
            assert!(c.failed(), "{name} should fail");
        }
        // The file's name starts with the code it demonstrates.
        let code = name.split('-').next().unwrap_or_default();
        if code.starts_with('E') || code.starts_with('W') {
            assert!(rendered.contains(&format!("[{code}]")), "{name} does not produce {code}:\n{rendered}");
        } else {
            assert!(c.diagnostics.iter().filter(|d| d.is_error()).count() >= 3, "{name} should report several errors at once");
        }
        insta::with_settings!({ snapshot_suffix => name.clone(), prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("error", rendered);
        });
    }
}

#[test]
fn diagnostics_say_file_line_and_column() {
    let c = compile_rel(std::path::Path::new("specs/errors/E0202-unknown-mixer.hla"));
    let text = c.render(false);
    assert!(text.contains("specs/errors/E0202-unknown-mixer.hla:5:23"), "{text}");
    assert!(text.contains("did you mean `Attn`?"), "{text}");
}
