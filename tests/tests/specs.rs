//! Every spec in specs/: it checks, its model IR and `inspect` table are pinned by snapshots, it is
//! in the paper's size class, and it is already in canonical layout.

use hlac_tests::{compile_rel, hla_files, rel, stem};

#[test]
fn every_spec_checks_and_its_ir_and_inspect_are_pinned() {
    let specs = hla_files("specs");
    assert!(specs.len() >= 63, "the paper's grid has 62 specs plus hgrn2-r3, found {}", specs.len());
    for path in &specs {
        let c = compile_rel(&rel(path));
        assert!(!c.failed(), "{} does not check:\n{}", path.display(), c.render(false));
        assert!(c.diagnostics.is_empty(), "{} has warnings:\n{}", path.display(), c.render(false));
        let model = c.model.as_ref().expect("a spec in specs/ declares a model");
        let report = hlac::inspect::report(model);
        let text = format!("{}\n{}", report.to_text(), model.print());
        insta::with_settings!({ snapshot_suffix => stem(path), prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("spec", text);
        });
    }
}

#[test]
fn specs_fall_in_the_papers_size_classes() {
    for path in hla_files("specs") {
        let c = compile_rel(&rel(&path));
        let model = c.model.expect("checks");
        let billions = hlac::inspect::report(&model).params_total as f64 / 1e9;
        let name = stem(&path);
        // The released models are 0.3–0.4B and about 1.3B (GDN with 256-wide heads is the largest).
        let (lo, hi) = if name.contains("1.3b") { (1.2, 1.5) } else { (0.3, 0.42) };
        assert!((lo..=hi).contains(&billions), "{name}: {billions:.3}B is outside [{lo}, {hi}]");
    }
}

#[test]
fn hybrid_specs_close_each_group_with_attention() {
    for (ratio, attention_layers) in
        [("r3", vec![3, 7, 11, 15, 19, 23]), ("r6", vec![6, 13, 20, 23]), ("r12", vec![12, 23]), ("r24", vec![23]), ("pure", vec![])]
    {
        for mixer in ["gla", "hgrn", "hgrn2", "retnet", "deltanet", "gdn"] {
            for size in ["340m", "1.3b"] {
                let path = std::path::PathBuf::from(format!("specs/{mixer}-{ratio}-{size}.hla"));
                let c = compile_rel(&path);
                let model = c.model.unwrap_or_else(|| panic!("{} does not check", path.display()));
                assert_eq!(model.config.num_hidden_layers, 24);
                let attn: Vec<u64> =
                    model.layers.iter().filter(|(_, l)| model.mixers[l.mixer].class.is_none()).map(|(_, l)| l.index).collect();
                assert_eq!(attn, attention_layers, "{}", path.display());
            }
        }
    }
}

#[test]
fn specs_are_canonically_formatted_and_formatting_is_idempotent() {
    let mut files = hla_files("specs");
    files.extend(hla_files("specs/errors"));
    files.extend(hla_files("specs/errors/lib"));
    files.extend(hla_files("examples"));
    files.extend(hla_files("examples/bench"));
    files.push(hlac_tests::root().join("compiler/prelude/prelude.hla"));
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable");
        let Ok(file) = hlac_grammar::parse(hlac_grammar::FileId(0), &text) else {
            assert!(stem(&path).contains("syntax"), "{} does not parse", path.display());
            continue;
        };
        let once = hlac_grammar::fmt::format_file(&file, &text);
        assert_eq!(once, text, "{} is not in canonical layout (run hlac fmt)", path.display());
        let again =
            hlac_grammar::fmt::format_file(&hlac_grammar::parse(hlac_grammar::FileId(0), &once).expect("formatted text parses"), &once);
        assert_eq!(again, once, "formatting {} twice changes it", path.display());
    }
}

#[test]
fn fmt_canonicalises_messy_layout_and_keeps_comments() {
    let messy = "// header\nmodel   m{hidden_size=1024 ;  pattern = [ GDN × 3 ,Attn*1 ]x 6 // trailing\n\n\n  mixer GDN{num_heads=4,head_dim = 256}\n}\ntarget{device=sm_90 dtype=bf16}";
    let file = hlac_grammar::parse(hlac_grammar::FileId(0), messy).expect("parses");
    let once = hlac_grammar::fmt::format_file(&file, messy);
    insta::assert_snapshot!(once);
    let again = hlac_grammar::fmt::format_file(&hlac_grammar::parse(hlac_grammar::FileId(0), &once).expect("parses"), &once);
    assert_eq!(again, once);
}

#[test]
fn examples_check() {
    let mut examples = hla_files("examples");
    examples.extend(hla_files("examples/bench"));
    assert!(!examples.is_empty());
    for path in examples {
        let c = compile_rel(&rel(&path));
        assert!(!c.failed(), "{} does not check:\n{}", path.display(), c.render(false));
    }
}
