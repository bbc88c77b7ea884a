//! Parameter counts computed here by hand from fla's layer definitions (design.md and fla's
//! `fla/layers/*.py`), for one 340M spec per mixer, compared with what `hlac inspect` reports.

use std::path::Path;

const VOCAB: u64 = 32000;
const D: u64 = 1024;
const LAYERS: u64 = 24;

/// fla's GatedMLP: gate, up and down projections of width int(d·r·2/3) rounded up to 256.
fn mlp(ratio: u64) -> u64 {
    let width = (D * ratio * 2 / 3).div_ceil(256) * 256;
    3 * D * width
}

/// Two RMSNorm scales per layer (attn_norm, mlp_norm).
const LAYER_NORMS: u64 = 2 * D;
/// Embeddings, untied head and final norm.
const OUTSIDE: u64 = 2 * VOCAB * D + D;

/// fla's Attention at hidden 1024: q, k, v, o all d×d when num_kv_heads = num_heads.
fn attention() -> u64 {
    4 * D * D
}

fn total(spec: &str) -> u64 {
    let c = hlac_tests::compile_rel(Path::new(spec));
    hlac::inspect::report(&c.model.unwrap_or_else(|| panic!("{spec} does not check"))).params_total
}

fn hybrid(mixer: u64, attn_layers: u64, ratio: u64) -> u64 {
    let linear_layers = LAYERS - attn_layers;
    linear_layers * (mixer + mlp(ratio) + LAYER_NORMS) + attn_layers * (attention() + mlp(ratio) + LAYER_NORMS) + OUTSIDE
}

#[test]
fn gla_matches_hand_count() {
    // 4 heads, expand_k 0.5, expand_v 1: q,k [512,d]; v,g,o [d,d]; gk low-rank 16 (+bias 512); g_norm per head (256).
    let key = D / 2;
    let mixer = 2 * key * D + 3 * D * D + (16 * D + key * 16 + key) + D / 4;
    assert_eq!(total("specs/gla-r3-340m.hla"), hybrid(mixer, 6, 4));
}

#[test]
fn hgrn_matches_hand_count() {
    // i, f, g, o projections d×d, g_norm over d, plus model.lower_bounds [layers, d].
    let mixer = 4 * D * D + D;
    assert_eq!(total("specs/hgrn-pure-340m.hla"), hybrid(mixer, 0, 4) + LAYERS * D);
}

#[test]
fn hgrn2_matches_hand_count() {
    // 8 heads × expand 128: q, f [1024, d]; i, o d×d; g_norm over d; lower bounds.
    let mixer = 4 * D * D + D;
    assert_eq!(total("specs/hgrn2-r3.hla"), hybrid(mixer, 6, 4) + LAYERS * D);
}

#[test]
fn retnet_matches_hand_count() {
    // 4 heads, expand_k 1, expand_v 2: q, k d×d; v, g [2d, d]; o [d, 2d]; g_norm per head (512); MLP ratio 2.
    let mixer = 2 * D * D + 3 * 2 * D * D + 2 * D / 4;
    assert_eq!(total("specs/retnet-r6-340m.hla"), hybrid(mixer, 4, 2));
}

#[test]
fn deltanet_matches_hand_count() {
    // 8 heads: q, k, v, o d×d; b_proj [8, d]; three convs [d, 1, 4]; o_norm per head (128).
    let mixer = 4 * D * D + 8 * D + 3 * 4 * D + D / 8;
    assert_eq!(total("specs/deltanet-r12-340m.hla"), hybrid(mixer, 2, 4));
}

#[test]
fn gdn_matches_hand_count() {
    // 4 heads × 256, expand_v 1: q, k, v, g, o d×d; a, b [4, d]; A_log, dt_bias [4]; convs; o_norm 256.
    let mixer = 5 * D * D + 2 * 4 * D + 2 * 4 + 3 * 4 * D + 256;
    assert_eq!(total("specs/gdn-r24-340m.hla"), hybrid(mixer, 1, 4));
}

#[test]
fn transformer_matches_hand_count() {
    assert_eq!(total("specs/transformer-340m.hla"), hybrid(0, 24, 4));
}
