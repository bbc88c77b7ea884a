//! Causal softmax attention kernels (`hlac::lower::attention`), compiled by the Cranelift back end
//! and run on the CPU against the f64 reference (`hlac_tests::reference::attention`) on fresh
//! seeded inputs: awkward lengths, packed variable-length batches, GQA, RoPE, sliding windows,
//! uneven blocks, the log-sum-exp the forward writes for the backward, and decode step by step
//! over a KV cache (against the reference decode and against the forward). Tolerance: relative L2
//! error ≤ 1e-5 (f32 kernels against f64).

use hlac::lower::attention::{self, AttnConfig, AttnTiling};
use hlac_runtime::cpu::{Arg, CpuModule};
use hlac_runtime::kir::DType;
use std::collections::HashMap;

use hlac_tests::kernels::{check_stored, f32s, f64s, launch, packing, rel_l2, stored, Buf};
use hlac_tests::reference::attention::{attention, attention_step, AttnOpts, KvCache};
use hlac_tests::reference::grad::{numeric_grad, weighted_sum};
use hlac_tests::reference::ops::rope_t3;
use hlac_tests::reference::rng::Rng;
use hlac_tests::reference::{positions, seq_ranges, T3};

const TOL: f64 = 1e-5;

/// One attention layer's shape: heads, kv heads, head dim, value dim, window, RoPE base, and the
/// element type q, k, v, o and their gradients are stored as.
#[derive(Clone, Copy, Debug)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    d: usize,
    dv: usize,
    window: Option<usize>,
    rope: Option<f64>,
    storage: DType,
}

impl Shape {
    fn config(&self) -> AttnConfig {
        AttnConfig {
            name: "Attn".into(),
            heads: self.heads as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.d as u32,
            value_dim: self.dv as u32,
            window: self.window.map(|w| w as u32),
            rope_theta: self.rope,
            scale: 1.0 / (self.d as f64).sqrt(),
            storage: self.storage,
        }
    }

    fn opts(&self) -> AttnOpts {
        AttnOpts { window: self.window, rope_theta: self.rope }
    }
}

/// Seeded q, k, v for `total` tokens, rounded to the shape's storage type (so that the reference
/// sees what the kernels load).
fn inputs(s: &Shape, total: usize, seed: u64) -> (T3, T3, T3) {
    let mut rng = Rng::new(seed);
    let round = |x: T3| T3::new(x.t, x.h, x.d, stored(s.storage, &x.data));
    (round(rng.t3_normal(total, s.heads, s.d)), round(rng.t3_normal(total, s.kv_heads, s.d)), round(rng.t3_normal(total, s.kv_heads, s.dv)))
}

/// Runs the forward kernel: (o, lse).
fn run_forward(s: &Shape, tiling: AttnTiling, q: &T3, k: &T3, v: &T3, cu: &[i64]) -> (Vec<f32>, Vec<f32>) {
    run_forward_with_spare_blocks(s, tiling, q, k, v, cu, 0)
}

/// Runs the forward kernel with `spare` more query blocks on grid axis 1 than any sequence needs.
fn run_forward_with_spare_blocks(s: &Shape, tiling: AttnTiling, q: &T3, k: &T3, v: &T3, cu: &[i64], spare: u64) -> (Vec<f32>, Vec<f32>) {
    let kernel = attention::forward(&s.config(), tiling).expect("lowers");
    let seqs = cu.len() - 1;
    let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as u64;
    let bufs = HashMap::from([
        ("q".to_string(), Buf::In(f32s(&q.data))),
        ("k".to_string(), Buf::In(f32s(&k.data))),
        ("v".to_string(), Buf::In(f32s(&v.data))),
        ("o".to_string(), Buf::Out(vec![f32::NAN; q.t * s.heads * s.dv])),
        ("lse".to_string(), Buf::Out(vec![f32::NAN; q.t * s.heads])),
        ("cu_seqlens".to_string(), Buf::I64(cu.to_vec())),
    ]);
    let grid = [(seqs * s.heads) as u64, max_len.div_ceil(u64::from(tiling.block_q)).max(1) + spare];
    let mut out = launch(&kernel.program, bufs, &grid);
    (out.remove("o").unwrap_or_default(), out.remove("lse").unwrap_or_default())
}

/// ln Σ_j e^{s_ij} over the visible keys of every (token, head), in f64.
fn reference_lse(s: &Shape, q: &T3, k: &T3, cu: &[usize]) -> Vec<f64> {
    let (q, k) = match s.rope {
        Some(theta) => (rope_t3(q, &positions(cu), theta), rope_t3(k, &positions(cu), theta)),
        None => (q.clone(), k.clone()),
    };
    let scale = 1.0 / (s.d as f64).sqrt();
    let mut lse = vec![0.0; q.t * s.heads];
    for (a, b) in seq_ranges(cu) {
        for i in a..b {
            let first = s.window.map_or(a, |w| (i + 1).saturating_sub(w).max(a));
            for h in 0..s.heads {
                let kh = h / (s.heads / s.kv_heads);
                let scores: Vec<f64> =
                    (first..=i).map(|j| scale * q.vec(i, h).iter().zip(k.vec(j, kh)).map(|(x, y)| x * y).sum::<f64>()).collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                lse[i * s.heads + h] = m + scores.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            }
        }
    }
    lse
}

/// The forward on `lengths` against the reference output and log-sum-exp.
fn check_forward(s: Shape, lengths: &[usize], tiling: AttnTiling, seed: u64) {
    let (cu, cu64) = packing(lengths);
    let total = *cu.last().unwrap_or(&0);
    let (q, k, v) = inputs(&s, total, seed);
    let want = attention(&q, &k, &v, s.opts(), &cu);
    let want_lse = reference_lse(&s, &q, &k, &cu);
    let (o, lse) = run_forward(&s, tiling, &q, &k, &v, &cu64);
    assert!(o.iter().chain(&lse).all(|x| x.is_finite()), "non-finite output for {s:?} {lengths:?}");
    let (eo, el) = (rel_l2(&o, &want.data), rel_l2(&lse, &want_lse));
    assert!(eo <= TOL && el <= TOL, "{s:?} lengths {lengths:?} {tiling:?}: output error {eo:.2e}, lse error {el:.2e}");
}

const TILE: AttnTiling = AttnTiling { block_q: 64, block_k: 64 };

fn mha(d: usize) -> Shape {
    Shape { heads: 4, kv_heads: 4, d, dv: d, window: None, rope: None, storage: DType::F32 }
}

#[test]
fn forward_matches_reference_at_awkward_lengths() {
    for (i, t) in [1usize, 3, 50, 63, 64, 65, 783].into_iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        check_forward(mha(16), &[t], TILE, seed);
        check_forward(Shape { kv_heads: 1, rope: Some(10000.0), ..mha(32) }, &[t], TILE, seed + 1);
        check_forward(Shape { kv_heads: 2, window: Some(16), ..mha(16) }, &[t], TILE, seed + 2);
    }
}

#[test]
fn forward_on_packed_varlen_batches() {
    let lengths = [3usize, 1, 65, 50, 64, 63, 130];
    check_forward(mha(16), &lengths, TILE, 201);
    check_forward(Shape { kv_heads: 2, rope: Some(10000.0), ..mha(32) }, &lengths, TILE, 202);
    check_forward(Shape { kv_heads: 1, rope: Some(500.0), window: Some(16), ..mha(16) }, &lengths, TILE, 203);
    check_forward(Shape { kv_heads: 2, rope: Some(10000.0), window: Some(1), ..mha(16) }, &[783, 17, 1], TILE, 204);
}

#[test]
fn forward_with_gqa_rope_and_every_window() {
    for (i, kv_heads) in [1usize, 2, 4].into_iter().enumerate() {
        for (j, window) in [None, Some(1), Some(16), Some(65), Some(1000)].into_iter().enumerate() {
            for (r, rope) in [None, Some(10000.0)].into_iter().enumerate() {
                let s = Shape { kv_heads, window, rope, ..mha(16) };
                check_forward(s, &[65, 3, 64], TILE, 300 + 100 * i as u64 + 10 * j as u64 + r as u64);
            }
        }
    }
}

#[test]
fn forward_with_uneven_blocks_and_a_wider_value_head() {
    let s = Shape { kv_heads: 2, dv: 32, window: Some(20), rope: Some(10000.0), ..mha(16) };
    for (i, tiling) in [(16, 64), (64, 16), (32, 32), (8, 24), (1, 7)].into_iter().enumerate() {
        let tiling = AttnTiling { block_q: tiling.0, block_k: tiling.1 };
        check_forward(s, &[50, 1, 97], tiling, 400 + i as u64);
        check_forward(Shape { window: None, ..s }, &[50, 1, 97], tiling, 410 + i as u64);
    }
}

#[test]
fn a_window_at_least_the_sequence_is_full_causal_attention() {
    let t = 65;
    let (cu, cu64) = packing(&[t]);
    let s = Shape { kv_heads: 2, rope: Some(10000.0), ..mha(16) };
    let (q, k, v) = inputs(&s, cu[1], 501);
    let (full, full_lse) = run_forward(&s, TILE, &q, &k, &v, &cu64);
    for window in [t, t + 1, 10 * t] {
        let (o, lse) = run_forward(&Shape { window: Some(window), ..s }, TILE, &q, &k, &v, &cu64);
        assert_eq!((&o, &lse), (&full, &full_lse), "window {window}");
    }
}

#[test]
fn query_blocks_past_every_sequence_store_nothing() {
    let (_, cu64) = packing(&[5, 70, 1]);
    let s = Shape { kv_heads: 2, window: Some(16), rope: Some(10000.0), ..mha(16) };
    let (q, k, v) = inputs(&s, 76, 502);
    let tiling = AttnTiling { block_q: 16, block_k: 32 };
    let exact = run_forward(&s, tiling, &q, &k, &v, &cu64);
    let spare = run_forward_with_spare_blocks(&s, tiling, &q, &k, &v, &cu64, 7);
    assert_eq!(exact, spare);
}

#[test]
fn forward_on_a_long_rotated_sequence() {
    // Positions up to 2047: the rotation angles (position × θ^(−2i/d)) must be formed accurately for 1e-5.
    check_forward(Shape { kv_heads: 1, rope: Some(10000.0), ..mha(32) }, &[2048], TILE, 601);
}

/// A KV cache on the host: the buffers the decode kernel reads and writes.
struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
    lengths: Vec<i64>,
    max_len: usize,
}

/// One decode launch for every sequence: q, k, v are `[sequences, heads, ·]`; returns o.
fn run_decode(
    module: &CpuModule,
    id: hlac_runtime::cpu::KernelId,
    s: &Shape,
    cache: &mut Cache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let seqs = cache.lengths.len();
    let mut o = vec![f32::NAN; seqs * s.heads * s.dv];
    let mut args = [
        Arg::F32(q),
        Arg::F32(k),
        Arg::F32(v),
        Arg::F32Mut(&mut cache.k),
        Arg::F32Mut(&mut cache.v),
        Arg::I64(&cache.lengths),
        Arg::F32Mut(&mut o),
        Arg::Int(cache.max_len as i64),
    ];
    module.launch(id, &mut args, &[(seqs * s.heads) as u64]).expect("launches");
    o
}

/// Decodes packed sequences token by token, all sequences in every launch but starting at
/// different steps (so positions differ within a launch; idle sequences get zero tokens whose
/// outputs are ignored and whose cache writes land in a slot that is rewritten or never read).
/// Checks every token's output against the reference decode and the forward kernel, and the cache
/// against the reference's rotated keys and values.
fn check_decode(s: Shape, lengths: &[usize], block_k: u32, seed: u64) {
    let (cu, cu64) = packing(lengths);
    let total = *cu.last().unwrap_or(&0);
    let (q, k, v) = inputs(&s, total, seed);
    let (fwd, _) = run_forward(&s, TILE, &q, &k, &v, &cu64);
    let kernel = attention::decode(&s.config(), block_k).expect("lowers");
    let mut module = CpuModule::new().expect("jit");
    let id = module.add(kernel.program).expect("compiles");

    let n = lengths.len();
    let starts: Vec<usize> = (0..n).map(|i| 2 * i).collect();
    let steps = (0..n).map(|i| starts[i] + lengths[i]).max().unwrap_or(0);
    let max_len = lengths.iter().copied().max().unwrap_or(0) + 1;
    let mut cache = Cache {
        k: vec![f32::NAN; n * max_len * s.kv_heads * s.d],
        v: vec![f32::NAN; n * max_len * s.kv_heads * s.dv],
        lengths: vec![0; n],
        max_len,
    };
    let mut ref_caches = vec![KvCache::default(); n];
    let mut got = vec![0.0f32; total * s.heads * s.dv];
    let mut want = vec![0.0f64; total * s.heads * s.dv];
    let (hd, hkd, hkdv, hdv) = (s.heads * s.d, s.kv_heads * s.d, s.kv_heads * s.dv, s.heads * s.dv);
    for step in 0..steps {
        let token = |i: usize| (step >= starts[i] && step < starts[i] + lengths[i]).then(|| cu[i] + step - starts[i]);
        let (mut qs, mut ks, mut vs) = (vec![0.0; n * hd], vec![0.0; n * hkd], vec![0.0; n * hkdv]);
        for i in 0..n {
            if let Some(t) = token(i) {
                qs[i * hd..(i + 1) * hd].copy_from_slice(q.row(t));
                ks[i * hkd..(i + 1) * hkd].copy_from_slice(k.row(t));
                vs[i * hkdv..(i + 1) * hkdv].copy_from_slice(v.row(t));
            }
        }
        let o = run_decode(&module, id, &s, &mut cache, &f32s(&qs), &f32s(&ks), &f32s(&vs));
        for i in 0..n {
            let Some(t) = token(i) else { continue };
            let one = |x: &T3| T3::new(1, x.h, x.d, x.row(t).to_vec());
            let r = attention_step(&one(&q), &one(&k), &one(&v), s.opts(), &mut ref_caches[i]);
            want[t * hdv..(t + 1) * hdv].copy_from_slice(&r.data);
            got[t * hdv..(t + 1) * hdv].copy_from_slice(&o[i * hdv..(i + 1) * hdv]);
            cache.lengths[i] += 1;
        }
    }
    let e_ref = rel_l2(&got, &want);
    let e_fwd = rel_l2(&got, &f64s(&fwd));
    assert!(e_ref <= TOL && e_fwd <= TOL, "{s:?} {lengths:?}: decode vs reference {e_ref:.2e}, vs forward {e_fwd:.2e}");

    // The cache holds every token's rotated key and value at [sequence, position, kv head].
    let (mut got_c, mut want_c) = (Vec::new(), Vec::new());
    for i in 0..n {
        for p in 0..lengths[i] {
            for h in 0..s.kv_heads {
                let kb = ((i * max_len + p) * s.kv_heads + h) * s.d;
                got_c.extend_from_slice(&cache.k[kb..kb + s.d]);
                want_c.extend_from_slice(&ref_caches[i].keys[h][p]);
                let vb = ((i * max_len + p) * s.kv_heads + h) * s.dv;
                got_c.extend_from_slice(&cache.v[vb..vb + s.dv]);
                want_c.extend_from_slice(&ref_caches[i].values[h][p]);
            }
        }
    }
    let e_cache = rel_l2(&got_c, &want_c);
    assert!(e_cache <= TOL, "{s:?} {lengths:?}: cache error {e_cache:.2e}");
}

#[test]
fn decode_step_by_step_matches_reference_and_forward() {
    check_decode(mha(16), &[1, 3, 50], 16, 701);
    check_decode(Shape { kv_heads: 1, rope: Some(10000.0), ..mha(32) }, &[65, 3, 1, 64], 64, 702);
    check_decode(Shape { kv_heads: 2, rope: Some(10000.0), window: Some(16), dv: 32, ..mha(16) }, &[63, 5, 40], 16, 703);
    check_decode(Shape { kv_heads: 2, window: Some(1), ..mha(16) }, &[20, 7], 8, 704);
    check_decode(Shape { kv_heads: 4, rope: Some(10000.0), window: Some(100), ..mha(16) }, &[70], 32, 705);
}

#[test]
fn decode_on_a_long_sequence() {
    check_decode(Shape { kv_heads: 2, rope: Some(10000.0), ..mha(16) }, &[783], 64, 801);
}

#[test]
fn bad_configurations_are_errors_not_panics() {
    let good = Shape { kv_heads: 2, rope: Some(10000.0), ..mha(16) }.config();
    let bad = [
        AttnConfig { kv_heads: 3, ..good.clone() },
        AttnConfig { kv_heads: 0, ..good.clone() },
        AttnConfig { head_dim: 15, ..good.clone() },
        AttnConfig { window: Some(0), ..good.clone() },
        AttnConfig { rope_theta: Some(-1.0), ..good.clone() },
    ];
    for cfg in &bad {
        assert!(attention::forward(cfg, TILE).is_err(), "{cfg:?}");
        assert!(attention::decode(cfg, 64).is_err(), "{cfg:?}");
    }
    assert!(attention::forward(&good, AttnTiling { block_q: 0, block_k: 64 }).is_err());
    assert!(attention::decode(&good, 0).is_err());
    // An odd head without RoPE is fine.
    assert!(attention::forward(&AttnConfig { head_dim: 15, rope_theta: None, ..good }, TILE).is_ok());
}

#[test]
fn attention_kernel_ir_is_pinned() {
    let s = Shape { kv_heads: 2, window: Some(128), rope: Some(10000.0), ..mha(16) };
    let fwd = attention::forward(&s.config(), TILE).expect("lowers");
    hlac_runtime::kir::verify(&fwd.program).expect("verifies");
    insta::assert_snapshot!("attn_fwd", fwd.program.to_string());
    let dec = attention::decode(&s.config(), 64).expect("lowers");
    hlac_runtime::kir::verify(&dec.program).expect("verifies");
    insta::assert_snapshot!("attn_decode", dec.program.to_string());
}

/// The backward's gradients (dq, dk, dv) for upstream gradient `d_o`, given the forward's o and lse;
/// `spare` more blocks than needed on both kernels' grid axis 1.
#[allow(clippy::too_many_arguments)]
fn run_backward(
    s: &Shape,
    tiling: AttnTiling,
    q: &T3,
    k: &T3,
    v: &T3,
    cu: &[i64],
    fwd: &(Vec<f32>, Vec<f32>),
    d_o: &[f32],
    spare: u64,
) -> [Vec<f32>; 3] {
    let kernels = attention::backward(&s.config(), tiling).expect("lowers");
    let seqs = cu.len() - 1;
    let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as u64;
    let (o, lse) = fwd;
    let inputs = || {
        HashMap::from([
            ("q".to_string(), Buf::In(f32s(&q.data))),
            ("k".to_string(), Buf::In(f32s(&k.data))),
            ("v".to_string(), Buf::In(f32s(&v.data))),
            ("o".to_string(), Buf::In(o.clone())),
            ("lse".to_string(), Buf::In(lse.clone())),
            ("do".to_string(), Buf::In(d_o.to_vec())),
            ("cu_seqlens".to_string(), Buf::I64(cu.to_vec())),
        ])
    };
    let blocks = |block: u32| max_len.div_ceil(u64::from(block)).max(1) + spare;
    // NaN-filled, so that an element no instance writes fails the comparison.
    let mut bufs = inputs();
    bufs.insert("dq".into(), Buf::Out(vec![f32::NAN; q.data.len()]));
    let mut dq = launch(&kernels.dq.program, bufs, &[(seqs * s.heads) as u64, blocks(tiling.block_q)]);
    let mut bufs = inputs();
    bufs.insert("dk".into(), Buf::Out(vec![f32::NAN; k.data.len()]));
    bufs.insert("dv".into(), Buf::Out(vec![f32::NAN; v.data.len()]));
    let mut dkv = launch(&kernels.dkv.program, bufs, &[(seqs * s.kv_heads) as u64, blocks(tiling.block_k)]);
    let take = |m: &mut HashMap<String, Vec<f32>>, name: &str| m.remove(name).unwrap_or_default();
    [take(&mut dq, "dq"), take(&mut dkv, "dk"), take(&mut dkv, "dv")]
}

/// Backward tolerance: f32 kernels against f64 central differences.
const GRAD_TOL: f64 = 1e-4;

/// Runs the forward kernel, then the backward with dO = W (random), and compares dq, dk, dv with
/// f64 central differences of ℓ(q, k, v) = Σ W ⊙ attention(q, k, v). ℓ is a sum over the packed
/// sequences, and the reference attends within each sequence only, so the differences are taken one
/// sequence at a time on that sequence's term (the same numbers, a fraction of the work); a kernel
/// that leaked across sequences would still show up as a wrong gradient.
///
/// With bf16 or f16 storage, q, k, v and dO are rounded to it first and the gradients are judged
/// by [`check_stored`]; returns the largest relative error of the three.
fn check_backward(s: Shape, lengths: &[usize], tiling: AttnTiling, seed: u64) -> f64 {
    let (cu, cu64) = packing(lengths);
    let total = *cu.last().unwrap_or(&0);
    let (q, k, v) = inputs(&s, total, seed);
    let w = stored(s.storage, &Rng::new(seed ^ 0x5eed).normals(total * s.heads * s.dv));
    let fwd = run_forward(&s, tiling, &q, &k, &v, &cu64);
    let got = run_backward(&s, tiling, &q, &k, &v, &cu64, &fwd, &f32s(&w), 0);
    let mut want = [Vec::new(), Vec::new(), Vec::new()];
    for (a, b) in seq_ranges(&cu) {
        let (qs, ks, vs) = (q.slice_t(a, b), k.slice_t(a, b), v.slice_t(a, b));
        let ws = &w[a * s.heads * s.dv..b * s.heads * s.dv];
        let one = [0, b - a];
        let loss = |q: &T3, k: &T3, v: &T3| weighted_sum(&attention(q, k, v, s.opts(), &one).data, ws);
        let with = |x: &T3, data: &[f64]| T3::new(x.t, x.h, x.d, data.to_vec());
        want[0].extend(numeric_grad(|x| loss(&with(&qs, x), &ks, &vs), &qs.data, 1e-5));
        want[1].extend(numeric_grad(|x| loss(&qs, &with(&ks, x), &vs), &ks.data, 1e-5));
        want[2].extend(numeric_grad(|x| loss(&qs, &ks, &with(&vs, x)), &vs.data, 1e-5));
    }
    // dq and dk vanish exactly where every query sees a single key (a one-token sequence): there,
    // measure the f32 rounding the kernel leaves against the size of dv, the loss's other gradient.
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut worst = 0.0f64;
    for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
        if s.storage != DType::F32 && norm(w) > 0.0 {
            // The backward reads the forward's o, rounded to the storage type on its store, for
            // D_i = Σ dO ⊙ O: an intermediate perturbed by up to u relative that dq and dk inherit
            // (fla's backward reads its bf16 o alike).
            let compute = hlac_tests::kernels::unit_roundoff(s.storage);
            worst = worst.max(check_stored(&format!("{name} of {s:?} lengths {lengths:?}"), s.storage, g, w, compute));
            continue;
        }
        let err = if norm(w) > 0.0 { rel_l2(g, w) } else { norm(&f64s(g)) / norm(&want[2]) };
        assert!(err <= GRAD_TOL, "{name} of {s:?} lengths {lengths:?} {tiling:?}: relative error {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

/// Small blocks, so that even 40 tokens span several query and key blocks (and unequal ones).
const BWD_TILINGS: [AttnTiling; 4] = [
    AttnTiling { block_q: 8, block_k: 4 },
    AttnTiling { block_q: 4, block_k: 8 },
    AttnTiling { block_q: 16, block_k: 16 },
    AttnTiling { block_q: 3, block_k: 5 },
];

fn small(kv_heads: usize, window: Option<usize>, rope: Option<f64>) -> Shape {
    Shape { heads: 4, kv_heads, d: 8, dv: 8, window, rope, storage: DType::F32 }
}

#[test]
fn backward_matches_central_differences_on_single_sequences() {
    let mut n = 0u64;
    for t in [1usize, 5, 17] {
        for kv_heads in [1usize, 2, 4] {
            for window in [None, Some(3), Some(t)] {
                for rope in [None, Some(10000.0)] {
                    check_backward(small(kv_heads, window, rope), &[t], BWD_TILINGS[n as usize % 4], 900 + n);
                    n += 1;
                }
            }
        }
    }
}

#[test]
fn backward_matches_central_differences_on_a_longer_sequence() {
    // 40 tokens: five to ten blocks per axis, so the loops' bounds and the windowed query range of
    // the dk/dv kernel are exercised away from the sequence's edges. (Kept to three shapes: central
    // differences cost O(T³) here.)
    let shapes = [small(1, None, Some(10000.0)), small(2, Some(3), None), small(4, Some(40), Some(500.0))];
    for (i, s) in shapes.into_iter().enumerate() {
        check_backward(s, &[40], BWD_TILINGS[i], 1000 + i as u64);
    }
}

#[test]
fn backward_matches_central_differences_on_packed_batches() {
    let mut n = 0u64;
    for kv_heads in [1usize, 2, 4] {
        for window in [None, Some(3), Some(17)] {
            for rope in [None, Some(10000.0)] {
                check_backward(small(kv_heads, window, rope), &[17, 1, 5, 17, 3], BWD_TILINGS[n as usize % 4], 1100 + n);
                n += 1;
            }
        }
    }
    check_backward(small(2, Some(3), Some(10000.0)), &[5, 40, 1, 17], BWD_TILINGS[0], 1200);
    check_backward(small(1, None, None), &[40, 1, 5], BWD_TILINGS[3], 1201);
}

#[test]
fn backward_blocks_past_every_sequence_store_nothing() {
    let s = small(2, Some(3), Some(10000.0));
    let (cu, cu64) = packing(&[5, 17, 1]);
    let (q, k, v) = inputs(&s, cu[3], 1300);
    let d_o = f32s(&Rng::new(1301).normals(cu[3] * s.heads * s.dv));
    let tiling = BWD_TILINGS[1];
    let fwd = run_forward(&s, tiling, &q, &k, &v, &cu64);
    let exact = run_backward(&s, tiling, &q, &k, &v, &cu64, &fwd, &d_o, 0);
    let spare = run_backward(&s, tiling, &q, &k, &v, &cu64, &fwd, &d_o, 5);
    assert_eq!(exact, spare);
}

#[test]
fn backward_rejects_what_the_forward_rejects() {
    let good = small(2, None, Some(10000.0)).config();
    for cfg in [
        AttnConfig { kv_heads: 3, ..good.clone() },
        AttnConfig { head_dim: 7, ..good.clone() },
        AttnConfig { window: Some(0), ..good.clone() },
    ] {
        assert!(attention::backward(&cfg, TILE).is_err(), "{cfg:?}");
    }
    assert!(attention::backward(&good, AttnTiling { block_q: 64, block_k: 0 }).is_err());
}

#[test]
fn attention_backward_kernel_ir_is_pinned() {
    let s = Shape { kv_heads: 2, window: Some(128), rope: Some(10000.0), ..mha(16) };
    let bwd = attention::backward(&s.config(), TILE).expect("lowers");
    for (name, kernel) in [("attn_bwd_dq", &bwd.dq), ("attn_bwd_dkv", &bwd.dkv)] {
        hlac_runtime::kir::verify(&kernel.program).expect("verifies");
        insta::assert_snapshot!(name, kernel.program.to_string());
    }
}

/// bf16 storage of q, k, v and o: the forward at awkward lengths and on a packed batch, with GQA,
/// RoPE and a sliding window, against the reference on the rounded inputs (o by
/// [`check_stored`], the f32 lse as in f32).
#[test]
fn forward_with_bf16_storage_matches_reference() {
    let bf16 = |s: Shape| Shape { storage: DType::Bf16, ..s };
    let mut worst = 0.0f64;
    for (i, (s, lengths)) in [
        (bf16(mha(16)), vec![65usize]),
        (bf16(Shape { kv_heads: 1, rope: Some(10000.0), ..mha(32) }), vec![65]),
        (bf16(Shape { kv_heads: 2, window: Some(16), rope: Some(10000.0), ..mha(16) }), vec![3, 1, 65, 50, 64, 130]),
        (bf16(Shape { kv_heads: 2, dv: 32, ..mha(16) }), vec![1, 783]),
    ]
    .into_iter()
    .enumerate()
    {
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let (q, k, v) = inputs(&s, total, 1400 + i as u64);
        let want = attention(&q, &k, &v, s.opts(), &cu);
        let want_lse = reference_lse(&s, &q, &k, &cu);
        let (o, lse) = run_forward(&s, TILE, &q, &k, &v, &cu64);
        worst = worst.max(check_stored(&format!("o of {s:?} {lengths:?}"), DType::Bf16, &o, &want.data, TOL));
        let el = rel_l2(&lse, &want_lse);
        assert!(el <= TOL, "{s:?} {lengths:?}: lse error {el:.2e}");
    }
    println!("bf16 attention forward, largest relative L2 error of o: {worst:.2e}");
}

/// bf16 storage: the backward (dq, dk, dv in bf16) from the bf16 forward's o, on a packed batch
/// with a 65-token sequence, GQA, RoPE and a window.
#[test]
fn backward_with_bf16_storage_matches_central_differences() {
    let s = Shape { storage: DType::Bf16, ..small(2, Some(17), Some(10000.0)) };
    let mut worst = check_backward(s, &[5, 65, 1], BWD_TILINGS[2], 1500);
    worst = worst.max(check_backward(Shape { window: None, kv_heads: 1, ..s }, &[17, 3], BWD_TILINGS[3], 1501));
    println!("bf16 attention backward, largest relative L2 error of dq, dk, dv: {worst:.2e}");
}
