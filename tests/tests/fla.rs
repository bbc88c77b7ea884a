//! fla interoperability: importing each fla config and exporting it again gives the same config,
//! and the compiled model's tensors have exactly fla's names, shapes and order.

use std::collections::BTreeMap;

use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = hlac_tests::root().join("tests/fixtures/fla").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture readable")).expect("fixture is JSON")
}

/// Every stored config, plus the two pure models whose configs are derived from their hybrids.
fn configs() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = [
        "delta-pure",
        "delta-r3",
        "gdn-pure",
        "gdn-r3",
        "gla-pure",
        "gla-r3",
        "hgrn-pure",
        "hgrn-r3",
        "hgrn2-r3",
        "retnet-r3",
        "transformer",
    ]
    .iter()
    .map(|n| (n.to_string(), fixture(&format!("{n}.json"))))
    .collect();
    for (pure, hybrid) in [("hgrn2-pure", "hgrn2-r3"), ("retnet-pure", "retnet-r3")] {
        let mut c = fixture(&format!("{hybrid}.json"));
        c["attn"] = Value::Null;
        out.push((pure.to_string(), c));
    }
    out
}

fn compile_text(text: &str) -> hlac::Compilation {
    hlac::compile_str("<imported>", text, &hlac_tests::root())
}

#[test]
fn import_then_export_round_trips_every_config() {
    for (name, config) in configs() {
        let imported = hlac::hf::import_with_prelude(&config, &name.replace('-', "_")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(imported.warnings.is_empty(), "{name}: {:?}", imported.warnings);
        let c = compile_text(&imported.text);
        assert!(!c.failed(), "{name}: the imported spec does not check:\n{}\n{}", imported.text, c.render(false));
        let model = c.model.expect("model");
        let exported = hlac::hf::export(&model).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(exported, config, "{name}: export differs from the original config");
    }
}

#[test]
fn imported_specs_are_pinned() {
    for (name, config) in configs() {
        let imported = hlac::hf::import_with_prelude(&config, &name.replace('-', "_")).expect("imports");
        insta::with_settings!({ snapshot_suffix => name.clone(), prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("imported", imported.text);
        });
    }
}

#[test]
fn tensors_match_fla_state_dicts_in_name_shape_and_order() {
    let shapes: BTreeMap<String, serde_json::Map<String, Value>> =
        serde_json::from_value(fixture("state_dict_shapes.json")).expect("shapes");
    let configs = configs();
    assert_eq!(shapes.len(), configs.len(), "a config for every stored state dict");
    for (name, config) in configs {
        let imported = hlac::hf::import_with_prelude(&config, "m").expect("imports");
        let c = compile_text(&imported.text);
        let model = c.model.unwrap_or_else(|| panic!("{name} does not check"));
        let ours: Vec<(String, Vec<u64>)> = model.tensors.iter().map(|(_, t)| (t.name.clone(), t.shape.clone())).collect();
        let theirs: Vec<(String, Vec<u64>)> =
            shapes[&name].iter().map(|(k, v)| (k.clone(), serde_json::from_value(v.clone()).expect("shape"))).collect();
        assert_eq!(ours, theirs, "{name}");
    }
}

#[test]
fn hybrid_specs_export_their_attention_layers() {
    let c = hlac_tests::compile_rel(std::path::Path::new("specs/hgrn2-r3.hla"));
    let model = c.model.expect("checks");
    let config = hlac::hf::export(&model).expect("exports");
    assert_eq!(config["model_type"], "hgrn2");
    assert_eq!(config["attn"]["layers"], serde_json::json!([3, 7, 11, 15, 19, 23]));
    assert_eq!(config["attn"]["num_heads"], 16);
    assert_eq!(config["expand_ratio"], 128);
    // And the exported config imports back to a model with the same tensors.
    let again = compile_text(&hlac::hf::import_with_prelude(&config, "again").expect("imports").text);
    let again = again.model.expect("checks");
    let names = |m: &hlac::ir::Model| m.tensors.iter().map(|(_, t)| (t.name.clone(), t.shape.clone())).collect::<Vec<_>>();
    assert_eq!(names(&again), names(&model));
}

#[test]
fn import_rejects_what_it_cannot_represent() {
    let mut config = fixture("gla-r3.json");
    config["model_type"] = "mamba".into();
    let err = hlac::hf::import_with_prelude(&config, "m").err().expect("unknown model type");
    assert!(err.to_string().contains("mamba"), "{err}");
    let mut config = fixture("gla-r3.json");
    config["attn"]["layers"] = serde_json::json!([3, 99]);
    let err = hlac::hf::import_with_prelude(&config, "m").err().expect("bad layer index");
    assert!(err.to_string().contains("99"), "{err}");
    let err = hlac::hf::import_with_prelude(&serde_json::json!([1, 2]), "m").err().expect("not an object");
    assert!(err.to_string().contains("object"), "{err}");
}

#[test]
fn export_refuses_models_fla_cannot_express() {
    let text = "model m {\n  hidden_size = 256\n  pattern = GLA, GDN\n}\n";
    let c = compile_text(text);
    let model = c.model.expect("checks");
    let err = hlac::hf::export(&model).expect_err("two linear mixers");
    assert!(err.to_string().contains("one linear mixer"), "{err}");
}
