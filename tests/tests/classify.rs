//! The six prelude recurrences land in the classes design.md gives them, and recurrences a user
//! declares are classified the same way, with no new code.

use hlac::classify::{Decay, Family, KeySource, RecurrenceClass};

fn class_of(spec: &str, mixer: &str) -> RecurrenceClass {
    let c = hlac::compile_str("<test>", spec, &hlac_tests::root());
    assert!(!c.failed(), "{}", c.render(false));
    let model = c.model.expect("model");
    let found = model.mixers.iter().find(|(_, m)| m.name == mixer).map(|(_, m)| m.class.clone());
    found.flatten().expect("a classified recurrence")
}

fn prelude(mixer: &str) -> RecurrenceClass {
    class_of(&format!("model m {{\n  hidden_size = 1024\n  pattern = {mixer} x 2\n}}\n"), mixer)
}

#[test]
fn the_six_mixers_classify_as_design_md_says() {
    let gla = prelude("GLA");
    assert!(matches!(gla.decay, Decay::DataVector(_)));
    assert!(!gla.delta_rule);
    assert_eq!(gla.family, Family::Decay);
    assert!(matches!(&gla.key, KeySource::Input { inputs, .. } if inputs == &["k"]));

    let retnet = prelude("RetNet");
    assert!(matches!(&retnet.decay, Decay::FixedScalar(e) if e.contains("head_index")));
    assert!(matches!(&retnet.key, KeySource::Input { expr, .. } if expr == "rope(k)"));
    assert_eq!(retnet.query.as_deref(), Some("rope(q)"));

    let hgrn = prelude("HGRN");
    assert!(matches!(hgrn.decay, Decay::DataScalar(_)));
    assert_eq!(hgrn.key, KeySource::OneMinusDecay);
    assert_eq!(hgrn.family, Family::Scan);
    assert!(hgrn.elementwise);
    assert_eq!(hgrn.query, None);

    let hgrn2 = prelude("HGRN2");
    assert!(matches!(hgrn2.decay, Decay::DataVector(_)));
    assert_eq!(hgrn2.key, KeySource::OneMinusDecay);
    assert_eq!(hgrn2.query.as_deref(), Some("silu(q)"));

    let delta = prelude("DeltaNet");
    assert_eq!(delta.decay, Decay::None);
    assert!(delta.delta_rule);
    assert_eq!(delta.family, Family::Delta);
    assert_eq!(delta.beta.as_deref(), Some("sigmoid(b)"));

    let gdn = prelude("GDN");
    assert!(matches!(&gdn.decay, Decay::DataScalar(e) if e.contains("softplus")));
    assert!(gdn.delta_rule);
    assert!(matches!(&gdn.key, KeySource::Input { expr, .. } if expr.contains("l2norm(k)")));
}

#[test]
fn parameters_change_the_class_where_the_math_says_so() {
    // DeltaNet without beta writes with strength 1, and allow_neg_eigval doubles beta.
    let spec =
        "model m {\n  hidden_size = 256\n  pattern = DeltaNet\n  mixer DeltaNet {\n    num_heads = 4\n    use_beta = false\n  }\n}\n";
    let c = class_of(spec, "DeltaNet");
    assert!(c.delta_rule);
    assert_eq!(c.beta.as_deref(), Some("1"));
    let spec = "model m {\n  hidden_size = 256\n  pattern = GDN\n  mixer GDN {\n    num_heads = 2\n    head_dim = 64\n    allow_neg_eigval = true\n  }\n}\n";
    let c = class_of(spec, "GDN");
    assert_eq!(c.beta.as_deref(), Some("2 * sigmoid(b)"));
}

#[test]
fn a_user_recurrence_with_fixed_decay_and_the_delta_rule_is_in_the_algebra() {
    let spec = r#"
recurrence DecayedDelta {
  param num_heads: int = 4
  heads = num_heads
  state S[K = 64, V = 64]
  token q[K], k[K], v[V], b
  def gamma = 1 - pow(2, -5 - head_index)
  def beta = sigmoid(b)
  def kn = l2norm(k)
  update S = gamma * (I - beta * kn * kn^T) * S + beta * kn * v^T
  output o = S^T * l2norm(q) / sqrt(K)
  linear q_proj [num_heads * 64, hidden_size]
  linear k_proj [num_heads * 64, hidden_size]
  linear v_proj [num_heads * 64, hidden_size]
  linear b_proj [num_heads, hidden_size]
  norm o_norm [64]
  linear o_proj [hidden_size, num_heads * 64]
}

model m {
  hidden_size = 512
  pattern = [DecayedDelta x 3, Attn] x 2
  mixer Attn {
    num_heads = 8
  }
}
"#;
    let c = class_of(spec, "DecayedDelta");
    assert!(matches!(c.decay, Decay::FixedScalar(_)), "{c}");
    assert!(c.delta_rule);
    assert_eq!(c.family, Family::Delta);
    assert_eq!(c.scale.as_deref(), Some("1 / sqrt(K)"));
    // Its weights are laid out under fla's naming scheme like any prelude mixer's.
    let compiled = hlac::compile_str("<test>", spec, &hlac_tests::root());
    let model = compiled.model.expect("model");
    assert!(model.tensors.iter().any(|(_, t)| t.name == "model.layers.0.attn.b_proj.weight" && t.shape == [4, 512]));
}

#[test]
fn classes_outside_the_algebra_name_the_term() {
    let cases = [
        ("S * S + k * v^T", "product of the state with itself"),
        ("diag(sigmoid(g)) * S * diag(sigmoid(h)) + k * v^T", "on the right"),
        ("S * diag(sigmoid(g)) + k * v^T", "cannot multiply"),
        ("S + k * v^T + v * k^T", "cannot"),
        ("S - k * v^T", "subtracted"),
        ("S + k * v^T + k * v^T", "only one write term"),
        ("(I - sigmoid(g) * k * q^T) * S + k * v^T", "same k"),
        ("k * v^T", "does not carry"),
        ("S + v * k^T", "cannot"),
        ("mystery(S) + k * v^T", "unknown function"),
    ];
    for (update, expect) in cases {
        let spec = format!(
            "recurrence R {{\n  heads = 2\n  state S[K = 8, V = 16]\n  token q[K], k[K], v[V], g[K], h[V]\n  update S = {update}\n  output o = S^T * q\n  linear q_proj [16, hidden_size]\n  linear k_proj [16, hidden_size]\n  linear v_proj [32, hidden_size]\n  linear g_proj [16, hidden_size]\n  linear h_proj [32, hidden_size]\n}}\nmodel m {{\n  hidden_size = 64\n  pattern = R\n}}\n"
        );
        let c = hlac::compile_str("<test>", &spec, &hlac_tests::root());
        let text = c.render(false);
        assert!(c.failed(), "`{update}` should be rejected");
        assert!(text.contains(expect), "`{update}`: expected the message to mention `{expect}`:\n{text}");
    }
}
