//! The runtime refuses artifacts it cannot trust, with an error that names the problem.

use hlac_runtime::{Artifact, ArtifactError};
use serde_json::json;

fn valid() -> serde_json::Value {
    json!({
        "format": 1,
        "hlac_version": "0.1.0",
        "model": {"name": "m", "vocab_size": 16, "hidden_size": 4, "num_layers": 1, "intermediate_size": 256,
                  "norm_eps": 1e-6, "tie_word_embeddings": false, "initializer_range": 0.02},
        "target": {"device": "cpu", "dtype": "f32", "chunk_size": 64, "mode": "inference"},
        "mixers": [{"name": "Attn", "kind": "Attn", "family": "attention", "heads": 2, "key_dim": 0, "value_dim": 0, "params": {}}],
        "layers": [{"index": 0, "mixer": 0, "tensors": [2]}],
        "tensors": [
            {"name": "model.embeddings.weight", "shape": [16, 4], "dtype": "f32", "role": "embedding"},
            {"name": "model.norm.weight", "shape": [4], "dtype": "f32", "role": "norm"},
            {"name": "model.layers.0.attn.q_proj.weight", "shape": [4, 4], "dtype": "f32", "role": "linear"},
            {"name": "lm_head.weight", "shape": [16, 4], "dtype": "f32", "role": "linear"}
        ]
    })
}

/// A kernel entry with `extra`'s fields added (its program file is never reached: validation fails
/// first).
fn kernel(extra: serde_json::Value) -> serde_json::Value {
    let mut k = json!({"name": "rms_norm_d4_fwd", "role": "norm_fwd", "file": "kernels/rms_norm_d4_fwd.kir.json", "grid": ["rows"]});
    if let (Some(k), Some(extra)) = (k.as_object_mut(), extra.as_object()) {
        k.extend(extra.clone());
    }
    k
}

/// A norm piece of width 4 applying tensor `tensor`.
fn piece(tensor: usize) -> serde_json::Value {
    json!({"kind": "norm", "width": 4, "eps": 1e-6, "uses": [{"tensor": tensor, "rows_per_token": 1}]})
}

fn open(manifest: &serde_json::Value) -> Result<Artifact, ArtifactError> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).expect("write");
    Artifact::open(dir.path())
}

#[test]
fn a_valid_manifest_opens() {
    let a = open(&valid()).expect("valid");
    assert_eq!(a.manifest.tensors.len(), 4);
}

#[test]
fn broken_manifests_are_refused_with_the_reason() {
    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|m| m["format"] = json!(99)), "format 99"),
        (Box::new(|m| m["layers"][0]["mixer"] = json!(5)), "mixer 5"),
        (Box::new(|m| m["layers"][0]["tensors"] = json!([9])), "tensor 9"),
        (Box::new(|m| m["tensors"][2]["name"] = json!("model.norm.weight")), "appears twice"),
        (Box::new(|m| m["tensors"][2]["shape"] = json!([4, 0])), "empty shape"),
        (Box::new(|m| m["target"]["device"] = json!("sm_75")), "unknown device"),
        (Box::new(|m| m["model"]["num_layers"] = json!(3)), "1 layers listed"),
        (Box::new(|m| m["tensors"].as_array_mut().map(|t| t.pop()).map_or((), |_| ())), "lm_head"),
        (Box::new(|m| m["model"] = json!("nope")), "not a valid hlac manifest"),
        (Box::new(|m| m["kernels"] = json!([kernel(json!({"mixer": 3}))])), "refers to mixer 3"),
        (Box::new(|m| m["kernels"] = json!([kernel(json!({"piece": piece(9)}))])), "applies tensor 9 of 4"),
        (Box::new(|m| m["kernels"] = json!([kernel(json!({"piece": {"kind": "norm", "width": 4, "uses": []}}))])), "with 0 uses"),
    ];
    for (mutate, expect) in cases {
        let mut m = valid();
        mutate(&mut m);
        let err = open(&m).expect_err("refused");
        assert!(err.to_string().contains(expect), "expected `{expect}` in: {err}");
    }
}

#[test]
fn a_missing_artifact_names_the_file() {
    let err = Artifact::open(std::path::Path::new("/no/such/artifact")).expect_err("missing");
    assert!(err.to_string().contains("/no/such/artifact/manifest.json"), "{err}");
}
