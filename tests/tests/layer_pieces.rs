//! Which conv and norm kernels `model_kernels` emits for a model (`hlac::lower::layer_pieces`):
//! one per distinct configuration, following fla's layers — SiLU after the short convolutions of
//! GLA, DeltaNet and GDN but not HGRN's, the output norm gated by silu(g_proj) where the mixer has
//! an output gate, plain RMSNorms over the hidden size for the block, over each head for attention's
//! q/k norms — each recording every weight it applies and how many rows a token gives it. The
//! kernels' numerics are tested in `kernels_pieces.rs` (CPU) and by `hlac-gpu-check` (GPU).

use hlac::lower::ModelKernel;

fn model(mixer: &str, config: &str, target: &str) -> hlac::ir::Model {
    let spec = format!(
        "model m {{\n  hidden_size = 64\n  pattern = {mixer}, Attn\n  mixer {mixer} {{\n    {config}\n  }}\n  mixer Attn {{\n    num_heads = 4\n    qk_norm = true\n  }}\n}}\ntarget {{\n  {target}\n}}\n"
    );
    let c = hlac::compile_str("<pieces>", &spec, &hlac_tests::root());
    assert!(!c.failed(), "{}", c.render(false));
    c.model.expect("model")
}

/// One line per piece kernel: its name and role, then each weight it applies with the rows a token
/// gives it (layer-relative names, `L<i>.` for `model.layers.<i>.`).
fn describe(model: &hlac::ir::Model, kernels: &[ModelKernel]) -> String {
    let names: Vec<String> = model.tensors.iter().map(|(_, t)| t.name.replace("model.layers.", "L").replace(".weight", "")).collect();
    let mut out = String::new();
    for k in kernels.iter().filter(|k| k.mixer.is_none()) {
        out.push_str(&format!("{} {}", k.name, k.role));
        if let Some(p) = &k.piece {
            let uses: Vec<String> = p.uses.iter().map(|u| format!("{}×{}", names[u.tensor], u.rows_per_token)).collect();
            out.push_str(&format!(": {}", uses.join(" ")));
        }
        out.push('\n');
    }
    out
}

fn pieces(mixer: &str, config: &str, target: &str) -> String {
    let m = model(mixer, config, target);
    let kernels = hlac::lower::model_kernels(&m).expect("lowers");
    describe(&m, &kernels)
}

const TRAINING: &str = "device = sm_90\n  mode = training";
const BLOCK: &str = "L0.attn_norm×1 L0.mlp_norm×1 L1.attn_norm×1 L1.mlp_norm×1 model.norm×1";

#[test]
fn gdn_gets_silu_convs_a_gated_output_norm_and_the_block_norms() {
    // GDN's q/k convs are key_dim = 32 wide, its v conv value_dim = 64; its o_norm is gated by
    // g_proj (use_gate defaults to true) over each of its 2 heads of 32.
    let got = pieces("GDN", "num_heads = 2\n    head_dim = 16", TRAINING);
    let want = format!(
        "rms_norm_d64_fwd norm_fwd: {BLOCK}\n\
         rms_norm_d64_bwd norm_bwd: {BLOCK}\n\
         conv_c32_w4_silu_fwd conv_fwd: L0.attn.q_conv1d×1 L0.attn.k_conv1d×1\n\
         conv_c32_w4_silu_decode conv_decode: L0.attn.q_conv1d×1 L0.attn.k_conv1d×1\n\
         conv_c32_w4_silu_bwd conv_bwd: L0.attn.q_conv1d×1 L0.attn.k_conv1d×1\n\
         conv_c64_w4_silu_fwd conv_fwd: L0.attn.v_conv1d×1\n\
         conv_c64_w4_silu_decode conv_decode: L0.attn.v_conv1d×1\n\
         conv_c64_w4_silu_bwd conv_bwd: L0.attn.v_conv1d×1\n\
         rms_norm_gated_d32_fwd norm_fwd: L0.attn.o_norm×2\n\
         rms_norm_gated_d32_bwd norm_bwd: L0.attn.o_norm×2\n\
         rms_norm_d16_fwd norm_fwd: L1.attn.q_norm×4 L1.attn.k_norm×4\n\
         rms_norm_d16_bwd norm_bwd: L1.attn.q_norm×4 L1.attn.k_norm×4\n\
         sum_partials reduce_partials\n"
    );
    assert_eq!(got, want);
}

#[test]
fn each_mixers_convs_and_output_norm_follow_fla() {
    let fwd = |mixer: &str, config: &str| -> Vec<String> {
        pieces(mixer, config, TRAINING)
            .lines()
            .filter(|l| {
                (l.contains("_fwd ") || l.contains("_decode ")) && !l.starts_with("rms_norm_d64_") && !l.starts_with("rms_norm_d16_")
            })
            .map(String::from)
            .collect()
    };
    // HGRN convolves without an activation (fla: `activation=None`); its g_norm is gated by g_proj
    // over the whole input width.
    assert_eq!(
        fwd("HGRN", "expand_ratio = 1\n    use_short_conv = true"),
        [
            "conv_c64_w4_fwd conv_fwd: L0.attn.i_conv1d×1 L0.attn.f_conv1d×1",
            "conv_c64_w4_decode conv_decode: L0.attn.i_conv1d×1 L0.attn.f_conv1d×1",
            "rms_norm_gated_d64_fwd norm_fwd: L0.attn.g_norm×1",
        ]
    );
    // HGRN-2's g_norm is a plain RMSNorm over the hidden size: the block norms' kernel serves it.
    let hgrn2 = pieces("HGRN2", "expand_ratio = 16", TRAINING);
    assert!(hgrn2.starts_with("rms_norm_d64_fwd norm_fwd: L0.attn_norm×1 L0.attn.g_norm×1 L0.mlp_norm×1 L1.attn_norm×1"), "{hgrn2}");
    // GLA's and RetNet's output gate is fused into g_norm_swish_gate, per head.
    assert_eq!(fwd("GLA", "num_heads = 2"), ["rms_norm_gated_d32_fwd norm_fwd: L0.attn.g_norm_swish_gate×2"]);
    assert_eq!(fwd("RetNet", "num_heads = 4"), ["rms_norm_gated_d32_fwd norm_fwd: L0.attn.g_norm_swish_gate×4"]);
    // Without an output gate, a plain per-head norm.
    assert_eq!(fwd("GLA", "num_heads = 2\n    use_output_gate = false"), ["rms_norm_d32_fwd norm_fwd: L0.attn.g_norm×2"]);
    // DeltaNet: SiLU convs (q, k, v all 64 wide); o_norm gated only with use_gate (default off).
    assert_eq!(
        fwd("DeltaNet", "num_heads = 2"),
        [
            "conv_c64_w4_silu_fwd conv_fwd: L0.attn.q_conv1d×1 L0.attn.k_conv1d×1 L0.attn.v_conv1d×1",
            "conv_c64_w4_silu_decode conv_decode: L0.attn.q_conv1d×1 L0.attn.k_conv1d×1 L0.attn.v_conv1d×1",
            "rms_norm_d32_fwd norm_fwd: L0.attn.o_norm×2",
        ]
    );
    assert_eq!(fwd("DeltaNet", "num_heads = 2\n    use_gate = true")[2], "rms_norm_gated_d32_fwd norm_fwd: L0.attn.o_norm×2");
    // The kernel size comes from the config.
    assert!(fwd("DeltaNet", "num_heads = 2\n    conv_size = 2")[0].starts_with("conv_c64_w2_silu_fwd"));
}

#[test]
fn inference_and_cpu_targets_carry_the_forward_pieces() {
    for target in ["device = sm_90\n  mode = inference", "device = cpu\n  mode = inference"] {
        let got = pieces("GDN", "num_heads = 2\n    head_dim = 16", target);
        let roles: Vec<&str> = got.lines().filter_map(|l| l.split([' ', ':']).nth(1)).collect();
        assert_eq!(roles, ["norm_fwd", "conv_fwd", "conv_decode", "conv_fwd", "conv_decode", "norm_fwd", "norm_fwd"], "{target}: {got}");
    }
}

#[test]
fn names_stay_unique_and_oversized_convs_are_refused() {
    // A mixer named like a piece's configuration: the piece gets a suffix.
    let spec = "model m {\n  hidden_size = 64\n  pattern = conv_c64_w4_silu\n  mixer conv_c64_w4_silu = DeltaNet {\n    num_heads = 2\n  }\n}\ntarget {\n  mode = inference\n}\n";
    let c = hlac::compile_str("<pieces>", spec, &hlac_tests::root());
    assert!(!c.failed(), "{}", c.render(false));
    let kernels = hlac::lower::model_kernels(&c.model.expect("model")).expect("lowers");
    let mut names: Vec<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
    assert!(names.contains(&"conv_c64_w4_silu_decode") && names.contains(&"conv_c64_w4_silu_decode_2"), "{names:?}");
    let n = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), n, "unique names");
    assert!(kernels.iter().all(|k| k.kernel.program.name == k.name), "programs named as their kernels");

    let m = model("DeltaNet", "num_heads = 2\n    conv_size = 64", TRAINING);
    let err = hlac::lower::model_kernels(&m).expect_err("refused");
    assert!(err.to_string().contains("kernel size 64"), "{err}");
}
