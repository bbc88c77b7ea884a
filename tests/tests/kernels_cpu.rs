//! Chunked recurrence kernels lowered from the prelude's declarations, compiled by the Cranelift
//! back end and run on the CPU, against the f64 sequential reference (`hlac_tests::reference`) on
//! fresh seeded inputs at awkward lengths, packed into variable-length batches, with and without
//! initial states. Tolerance: relative L2 error ≤ 1e-5 (f32 kernels against f64).

use hlac::classify::Family;
use hlac::lower::{chunk_forward, decay, delta, Recurrence, Tiling};
use hlac_runtime::cpu::{Arg, CpuModule};
use hlac_runtime::kir::DType;
use std::collections::HashMap;

use hlac_tests::kernels::{check_stored, chunk_offsets, f32s, launch, launch_compiled, mixer, packing, rel_l2, stored, Buf};
use hlac_tests::reference::linear::forward;
use hlac_tests::reference::mixers;
use hlac_tests::reference::rng::Rng;
use hlac_tests::reference::T3;

/// Runs a lowered forward kernel: `inputs` are bound to the program's parameters by name.
fn run_forward(m: &hlac::ir::Mixer, tiling: Tiling, inputs: &[(&str, Vec<f32>)], cu: &[i64], h0: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    run_forward_as(m, tiling, DType::F32, inputs, cu, h0)
}

/// [`run_forward`] with the token tensors stored as `storage` (inputs rounded to it on the way in,
/// `o` widened from it on the way out).
fn run_forward_as(
    m: &hlac::ir::Mixer,
    tiling: Tiling,
    storage: DType,
    inputs: &[(&str, Vec<f32>)],
    cu: &[i64],
    h0: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let math = m.instance.math.as_ref().expect("a recurrence");
    let class = m.class.as_ref().expect("classified");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage };
    let kernel = chunk_forward(&r, tiling).expect("lowers");
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    let total = *cu.last().unwrap_or(&0) as usize;
    let seqs = cu.len() - 1;
    let mut bufs = HashMap::new();
    for p in &kernel.program.params {
        let buf = match p.name.as_str() {
            "o" => Buf::Out(vec![f32::NAN; total * h * v]),
            "ht" => Buf::Out(vec![f32::NAN; seqs * h * k * v]),
            "h0" => Buf::In(h0.map(<[f32]>::to_vec).unwrap_or_default()),
            "cu_seqlens" => Buf::I64(cu.to_vec()),
            "use_h0" => Buf::Int(i64::from(h0.is_some())),
            "use_ht" => Buf::Int(1),
            name => Buf::In(inputs.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no input `{name}`")).1.clone()),
        };
        bufs.insert(p.name.clone(), buf);
    }
    let mut out = launch(&kernel.program, bufs, &[(seqs * h) as u64, (v as u32 / tiling.block_v) as u64]);
    let (o, ht) = (out.remove("o").unwrap_or_default(), out.remove("ht").unwrap_or_default());
    if matches!(class.family, Family::Decay | Family::Delta) {
        // The two-pass forward must give the fused one's o and ht (the callers check those
        // against the f64 reference): only the order of a few sums differs, and Δ's or the states'
        // trip through f32 memory; a rounding of o to the storage type may flip one ulp.
        let (o2, ht2) = run_two_pass(&r, tiling, inputs, cu, h0);
        let tol = if storage == DType::F32 { 1e-5 } else { 2.0 * hlac_tests::kernels::unit_roundoff(storage) };
        let widen = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<_>>();
        let (eo, es) = (rel_l2(&o2, &widen(&o)), rel_l2(&ht2, &widen(&ht)));
        assert!(
            eo <= tol && es <= tol,
            "{}: two-pass forward against the fused one: o {eo:.2e}, ht {es:.2e} (tolerance {tol:.0e})",
            m.name
        );
    }
    (o, ht)
}

/// Runs the two-pass forward (`chunk_states`, then `chunk_out` with one instance per chunk) on
/// the same inputs as [`run_forward_as`]; returns o and ht.
fn run_two_pass(r: &Recurrence<'_>, tiling: Tiling, inputs: &[(&str, Vec<f32>)], cu: &[i64], h0: Option<&[f32]>) -> (Vec<f32>, Vec<f32>) {
    let (states_k, out_k) = match r.class.family {
        Family::Delta => delta::two_pass(r, tiling),
        _ => decay::two_pass(r, tiling),
    }
    .expect("lowers in two passes");
    let (k, v, h) = (r.k() as usize, r.v() as usize, r.heads as usize);
    let c = tiling.chunk as usize;
    let total = *cu.last().unwrap_or(&0) as usize;
    let seqs = cu.len() - 1;
    let lengths: Vec<usize> = cu.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let chunk_offsets = chunk_offsets(lengths, c);
    let chunks = *chunk_offsets.last().unwrap_or(&0) as usize;
    let bind = |program: &hlac_runtime::kir::Program, carried: &HashMap<String, Vec<f32>>| {
        let mut bufs = HashMap::new();
        for p in &program.params {
            let writable = matches!(p.kind, hlac_runtime::kir::ParamKind::Ptr { writable: true, .. });
            let buf = match p.name.as_str() {
                "o" | "v_new" if writable => Buf::Out(vec![f32::NAN; total * h * v]),
                "states" if writable => Buf::Out(vec![f32::NAN; chunks * h * k * v]),
                "ht" => Buf::Out(vec![f32::NAN; seqs * h * k * v]),
                "h0" => Buf::In(h0.map(<[f32]>::to_vec).unwrap_or_default()),
                "cu_seqlens" => Buf::I64(cu.to_vec()),
                "chunk_offsets" => Buf::I64(chunk_offsets.clone()),
                "use_h0" => Buf::Int(i64::from(h0.is_some())),
                "use_ht" => Buf::Int(1),
                name => match carried.get(name) {
                    Some(x) => Buf::In(x.clone()),
                    None => Buf::In(inputs.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no input `{name}`")).1.clone()),
                },
            };
            bufs.insert(p.name.clone(), buf);
        }
        bufs
    };
    let blocks = (v as u32 / tiling.block_v) as u64;
    let mut walked = launch(&states_k.program, bind(&states_k.program, &HashMap::new()), &[(seqs * h) as u64, blocks]);
    let ht = walked.remove("ht").unwrap_or_default();
    let mut out = launch(&out_k.program, bind(&out_k.program, &walked), &[(seqs * h) as u64, blocks, max_len.div_ceil(c) as u64]);
    (out.remove("o").unwrap_or_default(), ht)
}

fn states_flat(states: &[Vec<f64>]) -> Vec<f64> {
    states.iter().flatten().copied().collect()
}

const GLA: &str = "model m {\n  hidden_size = 64\n  pattern = GLA\n  mixer GLA {\n    num_heads = 2\n  }\n}\n";
const RETNET: &str = "model m {\n  hidden_size = 64\n  pattern = RetNet\n  mixer RetNet {\n    num_heads = 4\n  }\n}\n";
const HGRN2: &str = "model m {\n  hidden_size = 64\n  pattern = HGRN2\n  mixer HGRN2 {\n    expand_ratio = 16\n  }\n}\n";

fn check_gla(lengths: &[usize], chunk: u32, with_h0: bool, gate_scale: f64, seed: u64) {
    let m = mixer(GLA);
    let (k, v, h) = (16, 32, 2);
    let (cu, cu64) = packing(lengths);
    let total = *cu.last().unwrap_or(&0);
    let mut rng = Rng::new(seed);
    let q = rng.t3_normal(total, h, k);
    let kk = rng.t3_normal(total, h, k);
    let vv = rng.t3_normal(total, h, v);
    let gk = rng.t3_normal(total, h, k).map(|x| x * gate_scale);
    let h0: Option<Vec<Vec<f64>>> = with_h0.then(|| (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect());
    let (want_o, want_s) = forward(&mixers::gla(&q, &kk, &vv, &gk), h0.as_deref(), &cu);
    let h0_flat = h0.as_ref().map(|s| f32s(&states_flat(s)));
    let inputs = [("q", f32s(&q.data)), ("k", f32s(&kk.data)), ("v", f32s(&vv.data)), ("gk", f32s(&gk.data))];
    // The whole chunk pairwise, and sub-blocks of 16 and 8 rows (algorithms.md §1.2; the
    // lowering falls back to pairwise where a width does not divide the chunk).
    for sub_block in [0, 16, 8] {
        let (o, ht) = run_forward(&m, Tiling { chunk, block_v: 16, sub_block }, &inputs, &cu64, h0_flat.as_deref());
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
        assert!(o.iter().chain(&ht).all(|x| x.is_finite()), "non-finite output (sub-blocks of {sub_block})");
        assert!(
            eo <= 1e-5 && es <= 1e-5,
            "GLA lengths {lengths:?} chunk {chunk} h0 {with_h0} sub-blocks {sub_block}: output error {eo:.2e}, state error {es:.2e}"
        );
    }
}

#[test]
fn gla_forward_matches_reference_at_awkward_lengths() {
    for (i, t) in [1usize, 3, 50, 63, 64, 65].into_iter().enumerate() {
        check_gla(&[t], 64, false, 1.0, 10 + i as u64);
        check_gla(&[t], 64, true, 1.0, 20 + i as u64);
    }
}

#[test]
fn gla_forward_on_packed_varlen_batches_with_initial_states() {
    check_gla(&[3, 1, 65, 50, 64], 16, true, 1.0, 31);
    check_gla(&[783], 64, true, 1.0, 32);
}

#[test]
fn gla_forward_on_a_long_sequence() {
    check_gla(&[4096], 64, true, 1.0, 33);
}

#[test]
fn gla_forward_with_strong_gates_stays_finite_and_exact() {
    // logsigmoid(x)/16 with x ~ N(0, 400²) reaches log α ≈ −30 and below.
    check_gla(&[130, 7], 64, true, 400.0, 41);
}

#[test]
fn hgrn2_forward_with_lower_bound_matches_reference() {
    let m = mixer(HGRN2);
    let math = m.instance.math.as_ref().expect("math");
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    assert_eq!((k, v, h), (16, 16, 4));
    for (seed, lengths) in [(51u64, vec![1usize]), (52, vec![65, 3, 64]), (53, vec![783])] {
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(seed);
        let q = rng.t3_normal(total, h, k);
        let f = rng.t3_normal(total, h, k);
        let i = rng.t3_normal(total, h, v);
        let lb = rng.vec(h * k, 0.0, 0.9);
        let h0: Vec<Vec<f64>> = (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect();
        let (want_o, want_s) = forward(&mixers::hgrn2(&q, &f, &i, Some(&lb)), Some(&h0), &cu);
        let inputs = [("q", f32s(&q.data)), ("f", f32s(&f.data)), ("i", f32s(&i.data)), ("lower_bound", f32s(&lb))];
        let (o, ht) = run_forward(&m, Tiling { chunk: 64, block_v: 16, sub_block: 0 }, &inputs, &cu64, Some(&f32s(&states_flat(&h0))));
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
        assert!(eo <= 1e-5 && es <= 1e-5, "HGRN2 {lengths:?}: output error {eo:.2e}, state error {es:.2e}");
    }
}

#[test]
fn decay_forward_kernel_ir_is_pinned() {
    let m = mixer(GLA);
    let r = Recurrence {
        name: &m.name,
        class: m.class.as_ref().expect("class"),
        math: m.instance.math.as_ref().expect("math"),
        heads: m.instance.heads,
        storage: DType::F32,
    };
    let kernel = decay::forward(&r, Tiling { chunk: 64, block_v: 16, sub_block: 0 }, false).expect("lowers");
    hlac_runtime::kir::verify(&kernel.program).expect("verifies");
    insta::assert_snapshot!("gla_chunk_fwd", kernel.program.to_string());
    let _ = T3::zeros(1, 1, 1);
}

const DELTANET: &str = "model m {\n  hidden_size = 64\n  pattern = DeltaNet\n  mixer DeltaNet {\n    num_heads = 4\n  }\n}\n";
const GDN: &str = "model m {\n  hidden_size = 64\n  pattern = GDN\n  mixer GDN {\n    num_heads = 2\n    head_dim = 16\n  }\n}\n";

fn check_delta(gated: bool, lengths: &[usize], chunk: u32, with_h0: bool, gate_scale: f64, seed: u64) {
    let m = mixer(if gated { GDN } else { DELTANET });
    let math = m.instance.math.as_ref().expect("math");
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    let (cu, cu64) = packing(lengths);
    let total = *cu.last().unwrap_or(&0);
    let mut rng = Rng::new(seed);
    let q = rng.t3_normal(total, h, k);
    let kk = rng.t3_normal(total, h, k);
    let vv = rng.t3_normal(total, h, v);
    let bb = rng.t3_normal(total, h, 1);
    let a = rng.t3_normal(total, h, 1).map(|x| x * gate_scale);
    let a_log = rng.vec(h, -1.0, 1.0);
    let dt_bias = rng.vec(h, -1.0, 1.0);
    let h0: Option<Vec<Vec<f64>>> = with_h0.then(|| (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect());
    let prepared =
        if gated { mixers::gated_deltanet(&q, &kk, &vv, &a, &bb, &a_log, &dt_bias) } else { mixers::deltanet(&q, &kk, &vv, &bb) };
    let (want_o, want_s) = forward(&prepared, h0.as_deref(), &cu);
    let mut inputs = vec![("q", f32s(&q.data)), ("k", f32s(&kk.data)), ("v", f32s(&vv.data)), ("b", f32s(&bb.data))];
    if gated {
        inputs.extend([("a", f32s(&a.data)), ("A_log", f32s(&a_log)), ("dt_bias", f32s(&dt_bias))]);
    }
    let h0_flat = h0.as_ref().map(|s| f32s(&states_flat(s)));
    let (o, ht) = run_forward(&m, Tiling { chunk, block_v: 16, sub_block: 0 }, &inputs, &cu64, h0_flat.as_deref());
    assert!(o.iter().chain(&ht).all(|x| x.is_finite()), "non-finite output");
    let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
    let what = if gated { "GDN" } else { "DeltaNet" };
    assert!(eo <= 1e-5 && es <= 1e-5, "{what} lengths {lengths:?} chunk {chunk} h0 {with_h0}: output error {eo:.2e}, state error {es:.2e}");
}

#[test]
fn deltanet_and_gdn_forward_match_reference_at_awkward_lengths() {
    for gated in [false, true] {
        for (i, t) in [1usize, 3, 50, 63, 64, 65].into_iter().enumerate() {
            check_delta(gated, &[t], 64, i % 2 == 0, 1.0, 60 + i as u64);
        }
    }
}

#[test]
fn deltanet_and_gdn_forward_on_packed_and_long_sequences() {
    for gated in [false, true] {
        check_delta(gated, &[3, 1, 65, 50, 64], 16, true, 1.0, 71);
        check_delta(gated, &[783], 64, true, 1.0, 72);
    }
    check_delta(true, &[4096], 64, true, 1.0, 73);
}

#[test]
fn gdn_forward_with_strong_gates_stays_finite() {
    check_delta(true, &[130, 9], 64, true, 30.0, 74);
}

/// A recurrence fla does not have: RetNet's fixed per-head decay combined with the delta rule.
const DECAYED_DELTA: &str = r#"
recurrence DecayedDelta {
  param num_heads: int = 2
  heads = num_heads
  state S[K = 16, V = 16]
  token q[K], k[K], v[V], b
  def gamma = 1 - pow(2, -5 - head_index)
  def beta = sigmoid(b)
  def kn = l2norm(k)
  update S = gamma * (I - beta * kn * kn^T) * S + beta * kn * v^T
  output o = S^T * l2norm(q) / sqrt(K)
  linear q_proj [num_heads * 16, hidden_size]
  linear k_proj [num_heads * 16, hidden_size]
  linear v_proj [num_heads * 16, hidden_size]
  linear b_proj [num_heads, hidden_size]
}

model m {
  hidden_size = 64
  pattern = DecayedDelta
}
"#;

#[test]
fn a_user_declared_recurrence_gets_kernels_that_match_the_reference() {
    use hlac_tests::reference::linear::{GateT3, Prepared};
    use hlac_tests::reference::ops::{l2_norm_t3, sigmoid};
    let m = mixer(DECAYED_DELTA);
    let (k, v, h) = (16, 16, 2);
    for (seed, lengths) in [(81u64, vec![1usize, 64, 65]), (82, vec![783])] {
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(seed);
        let q = rng.t3_normal(total, h, k);
        let kk = rng.t3_normal(total, h, k);
        let vv = rng.t3_normal(total, h, v);
        let bb = rng.t3_normal(total, h, 1);
        let h0: Vec<Vec<f64>> = (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect();
        let prepared = Prepared {
            q: l2_norm_t3(&q),
            k: l2_norm_t3(&kk),
            v: vv.clone(),
            gate: GateT3::Scalar(T3::from_fn(total, h, 1, |_, head, _| mixers::retnet_log_gamma(head))),
            beta: Some(bb.map(sigmoid)),
            scale: 1.0 / (k as f64).sqrt(),
        };
        let (want_o, want_s) = forward(&prepared, Some(&h0), &cu);
        let inputs = [("q", f32s(&q.data)), ("k", f32s(&kk.data)), ("v", f32s(&vv.data)), ("b", f32s(&bb.data))];
        let (o, ht) = run_forward(&m, Tiling { chunk: 64, block_v: 16, sub_block: 0 }, &inputs, &cu64, Some(&f32s(&states_flat(&h0))));
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
        assert!(eo <= 1e-5 && es <= 1e-5, "DecayedDelta {lengths:?}: output error {eo:.2e}, state error {es:.2e}");
    }
}

#[test]
fn hgrn_scan_matches_reference() {
    let m = mixer("model m {\n  hidden_size = 48\n  pattern = HGRN\n}\n");
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage: DType::F32 };
    let d = 48usize;
    // Blocks of 64 tokens and of 7 (sequences shorter than a block, ending inside one, and filling
    // whole ones).
    for (seed, lengths, block, chunk) in
        [(91u64, vec![1usize, 3, 50], 16u32, 64u32), (92, vec![783, 64], 32, 64), (93, vec![5, 130, 1, 14], 16, 7)]
    {
        let kernel = chunk_forward(&r, Tiling { chunk, block_v: block, sub_block: 0 }).expect("lowers");
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(seed);
        let i = rng.t3_normal(total, d, 1);
        let f = rng.t3_normal(total, d, 1).map(|x| x * 3.0);
        let lb = rng.vec(d, 0.0, 0.9);
        let h0: Vec<Vec<f64>> = (0..lengths.len()).map(|_| rng.normals(d)).collect();
        let (want_o, want_s) = mixers::hgrn(&i, &f, Some(&lb), Some(&h0), &cu);
        let mut o = vec![f32::NAN; total * d];
        let mut ht = vec![f32::NAN; lengths.len() * d];
        let (i32s, f32s_, lb32, h032) = (f32s(&i.data), f32s(&f.data), f32s(&lb), f32s(&states_flat(&h0)));
        let mut module = CpuModule::new().expect("jit");
        let program = kernel.program.clone();
        let id = module.add(kernel.program).unwrap_or_else(|e| panic!("{e}\n{program}"));
        let mut args: Vec<Arg<'_>> = Vec::new();
        let (mut o_slot, mut ht_slot) = (Some(&mut o[..]), Some(&mut ht[..]));
        for p in &program.params {
            args.push(match p.name.as_str() {
                "i" => Arg::F32(&i32s),
                "f" => Arg::F32(&f32s_),
                "lower_bound" => Arg::F32(&lb32),
                "o" => Arg::F32Mut(o_slot.take().expect("once")),
                "ht" => Arg::F32Mut(ht_slot.take().expect("once")),
                "h0" => Arg::F32(&h032),
                "cu_seqlens" => Arg::I64(&cu64),
                "use_h0" | "use_ht" => Arg::Int(1),
                other => panic!("unexpected parameter {other}"),
            });
        }
        module.launch(id, &mut args, &[lengths.len() as u64, (d as u64).div_ceil(u64::from(block))]).expect("runs");
        drop(args);
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
        assert!(eo <= 1e-5 && es <= 1e-5, "HGRN {lengths:?}: output error {eo:.2e}, state error {es:.2e}");
    }
}

/// An input of a decode test: per token (packed [tokens, heads, dim]) or per head.
enum Input {
    Token(T3),
    Head(Vec<f64>),
}

/// Runs the decode kernel token by token over `batch` sequences of `len` tokens each (packed
/// sequence-major), starting from `h0`; returns the outputs in packed order and the final states.
fn decode_steps(m: &hlac::ir::Mixer, inputs: &[(&str, Input)], batch: usize, len: usize, h0: &[f64]) -> (Vec<f32>, Vec<f32>) {
    decode_steps_as(m, DType::F32, inputs, batch, len, h0)
}

/// [`decode_steps`] with the token tensors stored as `storage` (the state stays f32).
fn decode_steps_as(
    m: &hlac::ir::Mixer,
    storage: DType,
    inputs: &[(&str, Input)],
    batch: usize,
    len: usize,
    h0: &[f64],
) -> (Vec<f32>, Vec<f32>) {
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage };
    let kernel = hlac::lower::decode::decode(&r, 16).expect("lowers");
    let (v, h) = (math.value_axis.1 as usize, m.instance.heads as usize);
    let mut module = CpuModule::new().expect("jit");
    let program = kernel.program.clone();
    let id = module.add(kernel.program).unwrap_or_else(|e| panic!("{e}\n{program}"));
    let mut state = f32s(h0);
    let mut out = vec![f32::NAN; batch * len * h * v];
    for t in 0..len {
        let mut bufs = HashMap::new();
        for p in &program.params {
            let buf = match p.name.as_str() {
                "o" => Buf::Out(vec![f32::NAN; batch * h * v]),
                "state" => Buf::Out(state.clone()),
                "positions" => Buf::I64(vec![t as i64; batch]),
                name => match inputs.iter().find(|(n, _)| *n == name).map(|(_, x)| x) {
                    Some(Input::Token(x)) => Buf::In(f32s(&(0..batch).flat_map(|s| x.row(s * len + t).to_vec()).collect::<Vec<_>>())),
                    Some(Input::Head(p)) => Buf::In(f32s(p)),
                    None => panic!("no input `{name}`"),
                },
            };
            bufs.insert(p.name.clone(), buf);
        }
        let mut written = launch_compiled(&module, id, bufs, &[(batch * h) as u64, (v / 16) as u64]);
        state = written.remove("state").unwrap_or_default();
        let o = written.remove("o").unwrap_or_default();
        for s in 0..batch {
            let dst = (s * len + t) * h * v;
            out[dst..dst + h * v].copy_from_slice(&o[s * h * v..(s + 1) * h * v]);
        }
    }
    (out, state)
}

#[test]
fn decode_step_by_step_equals_the_reference_and_the_chunked_forward() {
    let (batch, len) = (3usize, 9usize);
    let cu: Vec<usize> = (0..=batch).map(|s| s * len).collect();
    let cu64: Vec<i64> = cu.iter().map(|&x| x as i64).collect();
    for (spec, what) in
        [(GLA, "GLA"), (HGRN2, "HGRN2"), (RETNET, "RetNet"), (DELTANET, "DeltaNet"), (GDN, "GDN"), (DECAYED_DELTA, "DecayedDelta")]
    {
        let m = mixer(spec);
        let math = m.instance.math.as_ref().expect("math");
        let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
        let total = batch * len;
        let mut rng = Rng::new(100 + k as u64 + v as u64 + h as u64);
        let mut tensors: Vec<(&str, Input)> = Vec::new();
        for t in &math.tokens {
            let dim = match &t.dim {
                None => 1,
                Some(d) if d.name == math.key_axis.0 => k,
                Some(_) => v,
            };
            tensors.push((Box::leak(t.name.name.clone().into_boxed_str()), Input::Token(rng.t3_normal(total, h, dim))));
        }
        for p in &math.head_params {
            tensors.push((Box::leak(p.name.clone().into_boxed_str()), Input::Head(rng.vec(h, -1.0, 1.0))));
        }
        if what == "HGRN2" {
            tensors.push(("lower_bound", Input::Head(rng.vec(h * k, 0.0, 0.9))));
        }
        let h0: Vec<f64> = rng.normals(batch * h * k * v);
        let (o, s) = decode_steps(&m, &tensors, batch, len, &h0);
        // The chunked forward on the same packed sequences.
        let flat: Vec<(&str, Vec<f32>)> = tensors
            .iter()
            .map(|(n, x)| match x {
                Input::Token(t) => (*n, f32s(&t.data)),
                Input::Head(p) => (*n, f32s(p)),
            })
            .collect();
        let (fo, fs) = run_forward(&m, Tiling { chunk: 16, block_v: 16, sub_block: 0 }, &flat, &cu64, Some(&f32s(&h0)));
        let as_f64 = |x: &[f32]| x.iter().map(|v| f64::from(*v)).collect::<Vec<f64>>();
        let (eo, es) = (rel_l2(&o, &as_f64(&fo)), rel_l2(&s, &as_f64(&fs)));
        assert!(eo <= 1e-5 && es <= 1e-5, "{what}: decode vs forward: output error {eo:.2e}, state error {es:.2e}");
        // And the reference, for the mixers it models directly.
        let get = |name: &str| match tensors.iter().find(|(n, _)| *n == name).map(|(_, x)| x) {
            Some(Input::Token(t)) => t.clone(),
            _ => panic!("no token input {name}"),
        };
        let head = |name: &str| match tensors.iter().find(|(n, _)| *n == name).map(|(_, x)| x) {
            Some(Input::Head(p)) => p.clone(),
            _ => panic!("no head input {name}"),
        };
        let prepared = match what {
            "GLA" => mixers::gla(&get("q"), &get("k"), &get("v"), &get("gk")),
            "RetNet" => mixers::retnet(&get("q"), &get("k"), &get("v"), &hlac_tests::reference::positions(&cu)),
            "HGRN2" => mixers::hgrn2(&get("q"), &get("f"), &get("i"), Some(&head("lower_bound"))),
            "DeltaNet" => mixers::deltanet(&get("q"), &get("k"), &get("v"), &get("b")),
            "GDN" => mixers::gated_deltanet(&get("q"), &get("k"), &get("v"), &get("a"), &get("b"), &head("A_log"), &head("dt_bias")),
            _ => continue,
        };
        let h0s: Vec<Vec<f64>> = h0.chunks(k * v).map(<[f64]>::to_vec).collect();
        let (want_o, want_s) = forward(&prepared, Some(&h0s), &cu);
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&s, &states_flat(&want_s)));
        assert!(eo <= 1e-5 && es <= 1e-5, "{what}: decode vs reference: output error {eo:.2e}, state error {es:.2e}");
    }
}

#[test]
fn retnet_forward_with_rotary_embeddings_matches_reference() {
    let m = mixer(RETNET);
    let math = m.instance.math.as_ref().expect("math");
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    assert_eq!((k, v, h), (16, 32, 4));
    for (seed, lengths) in [(111u64, vec![1usize, 3, 64, 65]), (112, vec![783])] {
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(seed);
        let q = rng.t3_normal(total, h, k);
        let kk = rng.t3_normal(total, h, k);
        let vv = rng.t3_normal(total, h, v);
        let h0: Vec<Vec<f64>> = (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect();
        let (want_o, want_s) = forward(&mixers::retnet(&q, &kk, &vv, &hlac_tests::reference::positions(&cu)), Some(&h0), &cu);
        let inputs = [("q", f32s(&q.data)), ("k", f32s(&kk.data)), ("v", f32s(&vv.data))];
        let (o, ht) = run_forward(&m, Tiling { chunk: 64, block_v: 16, sub_block: 0 }, &inputs, &cu64, Some(&f32s(&states_flat(&h0))));
        let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
        assert!(eo <= 1e-5 && es <= 1e-5, "RetNet {lengths:?}: output error {eo:.2e}, state error {es:.2e}");
    }
}

#[test]
fn every_prelude_mixers_kernels_are_pinned_and_compile() {
    for (mixer_spec, name) in [
        ("GLA {\n    num_heads = 2\n  }", "gla"),
        ("HGRN {\n    expand_ratio = 1\n  }", "hgrn"),
        ("HGRN2 {\n    expand_ratio = 16\n  }", "hgrn2"),
        ("RetNet {\n    num_heads = 4\n  }", "retnet"),
        ("DeltaNet {\n    num_heads = 4\n  }", "deltanet"),
        ("GDN {\n    num_heads = 2\n    head_dim = 16\n  }", "gdn"),
    ] {
        let kind = mixer_spec.split_whitespace().next().unwrap_or_default();
        // Training targets carry every kernel: forward, decode, the state-keeping forward and
        // the backward.
        let spec =
            format!("model m {{\n  hidden_size = 64\n  pattern = {kind}\n  mixer {mixer_spec}\n}}\ntarget {{\n  mode = training\n}}\n");
        let c = hlac::compile_str("<kernels>", &spec, &hlac_tests::root());
        assert!(!c.failed(), "{name}: {}", c.render(false));
        let model = c.model.expect("model");
        let kernels = hlac::lower::model_kernels(&model).expect("lowers");
        let mut module = CpuModule::new().expect("jit");
        let mut text = String::new();
        for k in kernels {
            text.push_str(&format!("// {} ({}), grid [{}]\n{}\n", k.name, k.role, k.kernel.grid.join(", "), k.kernel.program));
            module.add(k.kernel.program).expect("compiles");
        }
        insta::with_settings!({ snapshot_suffix => name, prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!("kir", text);
        });
    }
}

/// Random inputs for every token input and per-head parameter of a mixer.
fn random_inputs(m: &hlac::ir::Mixer, total: usize, rng: &mut Rng, gate_scale: f64) -> Vec<(&'static str, Input)> {
    let math = m.instance.math.as_ref().expect("math");
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    let mut tensors: Vec<(&'static str, Input)> = Vec::new();
    for t in &math.tokens {
        let dim = match &t.dim {
            None => 1,
            Some(d) if d.name == math.key_axis.0 => k,
            Some(_) => v,
        };
        let name: &'static str = Box::leak(t.name.name.clone().into_boxed_str());
        let scale = if ["gk", "f", "a", "b"].contains(&name) { gate_scale } else { 1.0 };
        tensors.push((name, Input::Token(rng.t3_normal(total, h, dim).map(|x| x * scale))));
    }
    for p in &math.head_params {
        tensors.push((Box::leak(p.name.clone().into_boxed_str()), Input::Head(rng.vec(h, -1.0, 1.0))));
    }
    if math.tokens.iter().any(|t| t.name.name == "f") && m.instance.decl_name == "HGRN2" {
        tensors.push(("lower_bound", Input::Head(rng.vec(h * k, 0.0, 0.9))));
    }
    tensors
}

/// The reference's prepared recurrence for a prelude mixer.
fn reference_for(what: &str, tensors: &[(&'static str, Input)], cu: &[usize]) -> hlac_tests::reference::linear::Prepared {
    let get = |name: &str| match tensors.iter().find(|(n, _)| *n == name).map(|(_, x)| x) {
        Some(Input::Token(t)) => t.clone(),
        _ => panic!("no token input {name}"),
    };
    let head = |name: &str| match tensors.iter().find(|(n, _)| *n == name).map(|(_, x)| x) {
        Some(Input::Head(p)) => p.clone(),
        _ => panic!("no head input {name}"),
    };
    match what {
        "GLA" => mixers::gla(&get("q"), &get("k"), &get("v"), &get("gk")),
        "HGRN2" => mixers::hgrn2(&get("q"), &get("f"), &get("i"), Some(&head("lower_bound"))),
        "RetNet" => mixers::retnet(&get("q"), &get("k"), &get("v"), &hlac_tests::reference::positions(cu)),
        "DeltaNet" => mixers::deltanet(&get("q"), &get("k"), &get("v"), &get("b")),
        "GDN" => mixers::gated_deltanet(&get("q"), &get("k"), &get("v"), &get("a"), &get("b"), &head("A_log"), &head("dt_bias")),
        other => panic!("no reference for {other}"),
    }
}

fn flat_inputs(tensors: &[(&'static str, Input)]) -> Vec<(&'static str, Vec<f32>)> {
    tensors
        .iter()
        .map(|(n, x)| match x {
            Input::Token(t) => (*n, f32s(&t.data)),
            Input::Head(p) => (*n, f32s(p)),
        })
        .collect()
}

#[test]
fn every_chunked_mixer_matches_the_reference_at_every_awkward_length() {
    for (spec, what) in [(GLA, "GLA"), (HGRN2, "HGRN2"), (RETNET, "RetNet"), (DELTANET, "DeltaNet"), (GDN, "GDN")] {
        let m = mixer(spec);
        let math = m.instance.math.as_ref().expect("math");
        let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
        for (i, t) in [1usize, 3, 50, 63, 64, 65, 783, 4096].into_iter().enumerate() {
            let lengths = if t == 50 { vec![50, 1, 64] } else { vec![t] };
            let (cu, cu64) = packing(&lengths);
            let total = *cu.last().unwrap_or(&0);
            let mut rng = Rng::new(1000 + i as u64);
            let tensors = random_inputs(&m, total, &mut rng, 1.0);
            let with_h0 = i % 2 == 1;
            let h0: Option<Vec<Vec<f64>>> = with_h0.then(|| (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect());
            let (want_o, want_s) = forward(&reference_for(what, &tensors, &cu), h0.as_deref(), &cu);
            let h0_flat = h0.as_ref().map(|s| f32s(&states_flat(s)));
            // Vector gates also in sub-blocks of 16 rows (the others ignore the setting).
            let subs: &[u32] = if matches!(what, "GLA" | "HGRN2") { &[0, 16] } else { &[0] };
            for &sub_block in subs {
                let (o, ht) =
                    run_forward(&m, Tiling { chunk: 64, block_v: 16, sub_block }, &flat_inputs(&tensors), &cu64, h0_flat.as_deref());
                let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
                assert!(
                    eo <= 1e-5 && es <= 1e-5,
                    "{what} T={t} h0={with_h0} sub-blocks {sub_block}: output error {eo:.2e}, state error {es:.2e}"
                );
            }
        }
    }
}

#[test]
fn extreme_gates_give_finite_outputs() {
    // Gate pre-activations scaled by 1000 drive log α to about −60 (GLA: logsigmoid/16) or far
    // below, and β = σ(b) to exactly 0 and 1 in f32.
    for (spec, what) in [(GLA, "GLA"), (HGRN2, "HGRN2"), (DELTANET, "DeltaNet"), (GDN, "GDN")] {
        let m = mixer(spec);
        let math = m.instance.math.as_ref().expect("math");
        let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
        let lengths = vec![2000usize, 65];
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(77);
        let tensors = random_inputs(&m, total, &mut rng, 1000.0);
        let h0: Vec<Vec<f64>> = (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect();
        let (want_o, want_s) = forward(&reference_for(what, &tensors, &cu), Some(&h0), &cu);
        // Sub-blocks matter most here: their anchored factors must not overflow (algorithms.md §1.2).
        for sub_block in [0, 16] {
            let tiling = Tiling { chunk: 64, block_v: 16, sub_block };
            let (o, ht) = run_forward(&m, tiling, &flat_inputs(&tensors), &cu64, Some(&f32s(&states_flat(&h0))));
            assert!(o.iter().chain(&ht).all(|x| x.is_finite()), "{what}: non-finite output with extreme gates (sub-blocks {sub_block})");
            let (eo, es) = (rel_l2(&o, &want_o.data), rel_l2(&ht, &states_flat(&want_s)));
            assert!(
                eo <= 1e-4 && es <= 1e-4,
                "{what} with extreme gates, sub-blocks {sub_block}: output error {eo:.2e}, state error {es:.2e}"
            );
        }
    }
}

#[test]
fn hgrn_decode_is_the_scan_on_one_token_sequences() {
    let m = mixer("model m {\n  hidden_size = 32\n  pattern = HGRN\n}\n");
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage: DType::F32 };
    let (d, batch, len) = (32usize, 3usize, 7usize);
    let kernel = chunk_forward(&r, Tiling { chunk: 64, block_v: 16, sub_block: 0 }).expect("lowers");
    let mut module = CpuModule::new().expect("jit");
    let id = module.add(kernel.program.clone()).expect("compiles");
    let mut rng = Rng::new(5);
    let i = rng.t3_normal(batch * len, d, 1);
    let f = rng.t3_normal(batch * len, d, 1);
    let lb = f32s(&rng.vec(d, 0.0, 0.9));
    let h0 = rng.normals(batch * d);
    let cu: Vec<usize> = (0..=batch).map(|s| s * len).collect();
    let h0s: Vec<Vec<f64>> = h0.chunks(d).map(<[f64]>::to_vec).collect();
    let (want_o, want_s) = mixers::hgrn(&i, &f, Some(&rng_free(&lb)), Some(&h0s), &cu);
    let mut state = f32s(&h0);
    let one_each: Vec<i64> = (0..=batch as i64).collect();
    for t in 0..len {
        let rows = |x: &T3| f32s(&(0..batch).flat_map(|s| x.row(s * len + t).to_vec()).collect::<Vec<_>>());
        let (it, ft) = (rows(&i), rows(&f));
        let mut o = vec![f32::NAN; batch * d];
        let mut next = vec![f32::NAN; batch * d];
        let mut args: Vec<Arg<'_>> = Vec::new();
        let (mut o_slot, mut n_slot) = (Some(&mut o[..]), Some(&mut next[..]));
        for p in &kernel.program.params {
            args.push(match p.name.as_str() {
                "i" => Arg::F32(&it),
                "f" => Arg::F32(&ft),
                "lower_bound" => Arg::F32(&lb),
                "o" => Arg::F32Mut(o_slot.take().expect("once")),
                "ht" => Arg::F32Mut(n_slot.take().expect("once")),
                "h0" => Arg::F32(&state),
                "cu_seqlens" => Arg::I64(&one_each),
                "use_h0" | "use_ht" => Arg::Int(1),
                other => panic!("unexpected {other}"),
            });
        }
        module.launch(id, &mut args, &[batch as u64, 2]).expect("runs");
        drop(args);
        for s in 0..batch {
            let want = &want_o.data[(s * len + t) * d..(s * len + t + 1) * d];
            assert!(rel_l2(&o[s * d..(s + 1) * d], want) <= 1e-5, "HGRN decode step {t}");
        }
        state = next;
    }
    assert!(rel_l2(&state, &states_flat(&want_s)) <= 1e-5);
}

fn rng_free(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| f64::from(*v)).collect()
}

/// Token inputs rounded to `storage`; per-head parameters and `lower_bound` are stored in f32 and
/// stay as they are.
fn rounded(tensors: &[(&'static str, Input)], storage: DType) -> Vec<(&'static str, Input)> {
    tensors
        .iter()
        .map(|(n, x)| match x {
            Input::Token(t) => (*n, Input::Token(T3::new(t.t, t.h, t.d, stored(storage, &t.data)))),
            Input::Head(p) => (*n, Input::Head(p.clone())),
        })
        .collect()
}

/// The chunked forward of every mixer with its token tensors stored as `storage` (inputs rounded
/// to it, `o` rounded on the store; states in f32), against the reference on the rounded inputs:
/// `o` by [`check_stored`], the final state as in f32. Returns the largest error of `o` per mixer.
fn check_forward_storage(storage: DType, seed: u64) -> Vec<String> {
    let mut report = Vec::new();
    for (spec, what) in [(GLA, "GLA"), (HGRN2, "HGRN2"), (RETNET, "RetNet"), (DELTANET, "DeltaNet"), (GDN, "GDN")] {
        let m = mixer(spec);
        let math = m.instance.math.as_ref().expect("math");
        let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
        let mut worst = 0.0f64;
        for (i, lengths) in [vec![65usize], vec![3, 1, 65, 50, 64], vec![1], vec![130, 7]].into_iter().enumerate() {
            let (cu, cu64) = packing(&lengths);
            let total = *cu.last().unwrap_or(&0);
            let mut rng = Rng::new(seed + i as u64);
            let tensors = rounded(&random_inputs(&m, total, &mut rng, 1.0), storage);
            let with_h0 = i != 2;
            let h0: Option<Vec<Vec<f64>>> = with_h0.then(|| (0..lengths.len() * h).map(|_| rng.normals(k * v)).collect());
            let (want_o, want_s) = forward(&reference_for(what, &tensors, &cu), h0.as_deref(), &cu);
            let h0_flat = h0.as_ref().map(|s| f32s(&states_flat(s)));
            let (o, ht) = run_forward_as(
                &m,
                Tiling { chunk: 64, block_v: 16, sub_block: 0 },
                storage,
                &flat_inputs(&tensors),
                &cu64,
                h0_flat.as_deref(),
            );
            let label = format!("{what} {} {lengths:?}", storage.name());
            worst = worst.max(check_stored(&format!("o of {label}"), storage, &o, &want_o.data, 1e-5));
            let es = rel_l2(&ht, &states_flat(&want_s));
            assert!(es <= 1e-5, "{label}: state error {es:.2e}");
        }
        report.push(format!("{what} {worst:.2e}"));
    }
    report
}

#[test]
fn every_chunked_mixer_with_bf16_storage_matches_the_reference() {
    let report = check_forward_storage(DType::Bf16, 2000);
    println!("bf16 chunked forward, largest relative L2 error of o: {}", report.join(", "));
}

#[test]
fn every_chunked_mixer_with_f16_storage_matches_the_reference() {
    let report = check_forward_storage(DType::F16, 2100);
    println!("f16 chunked forward, largest relative L2 error of o: {}", report.join(", "));
}

#[test]
fn hgrn_scan_with_bf16_storage_matches_reference() {
    let m = mixer("model m {\n  hidden_size = 48\n  pattern = HGRN\n}\n");
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage: DType::Bf16 };
    let d = 48usize;
    let mut worst = 0.0f64;
    for (seed, lengths, block) in [(2201u64, vec![65usize], 16u32), (2202, vec![1, 65, 3, 130], 32)] {
        let kernel = chunk_forward(&r, Tiling { chunk: 64, block_v: block, sub_block: 0 }).expect("lowers");
        let (cu, cu64) = packing(&lengths);
        let total = *cu.last().unwrap_or(&0);
        let mut rng = Rng::new(seed);
        let i = stored(DType::Bf16, &rng.normals(total * d));
        let f = stored(DType::Bf16, &rng.normals(total * d).iter().map(|x| x * 3.0).collect::<Vec<_>>());
        let lb = rng.vec(d, 0.0, 0.9);
        let h0: Vec<Vec<f64>> = (0..lengths.len()).map(|_| rng.normals(d)).collect();
        let (want_o, want_s) = mixers::hgrn(&T3::new(total, d, 1, i.clone()), &T3::new(total, d, 1, f.clone()), Some(&lb), Some(&h0), &cu);
        let bufs = HashMap::from([
            ("i".to_string(), Buf::In(f32s(&i))),
            ("f".to_string(), Buf::In(f32s(&f))),
            ("lower_bound".to_string(), Buf::In(f32s(&lb))),
            ("o".to_string(), Buf::Out(vec![f32::NAN; total * d])),
            ("ht".to_string(), Buf::Out(vec![f32::NAN; lengths.len() * d])),
            ("h0".to_string(), Buf::In(f32s(&states_flat(&h0)))),
            ("cu_seqlens".to_string(), Buf::I64(cu64)),
            ("use_h0".to_string(), Buf::Int(1)),
            ("use_ht".to_string(), Buf::Int(1)),
        ]);
        let out = launch(&kernel.program, bufs, &[lengths.len() as u64, (d as u64).div_ceil(u64::from(block))]);
        worst = worst.max(check_stored(&format!("o of HGRN bf16 {lengths:?}"), DType::Bf16, &out["o"], &want_o.data, 1e-5));
        let es = rel_l2(&out["ht"], &states_flat(&want_s));
        assert!(es <= 1e-5, "HGRN bf16 {lengths:?}: state error {es:.2e}");
    }
    println!("bf16 HGRN scan, largest relative L2 error of o: {worst:.2e}");
}

#[test]
fn decode_with_bf16_storage_matches_the_reference() {
    let (batch, len) = (3usize, 9usize);
    let cu: Vec<usize> = (0..=batch).map(|s| s * len).collect();
    let mut report = Vec::new();
    for (spec, what) in [(GLA, "GLA"), (HGRN2, "HGRN2"), (RETNET, "RetNet"), (DELTANET, "DeltaNet"), (GDN, "GDN")] {
        let m = mixer(spec);
        let math = m.instance.math.as_ref().expect("math");
        let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
        let mut rng = Rng::new(2300 + k as u64 + v as u64 + h as u64);
        let tensors = rounded(&random_inputs(&m, batch * len, &mut rng, 1.0), DType::Bf16);
        let h0: Vec<f64> = rng.normals(batch * h * k * v);
        let (o, s) = decode_steps_as(&m, DType::Bf16, &tensors, batch, len, &h0);
        let h0s: Vec<Vec<f64>> = h0.chunks(k * v).map(<[f64]>::to_vec).collect();
        let (want_o, want_s) = forward(&reference_for(what, &tensors, &cu), Some(&h0s), &cu);
        let eo = check_stored(&format!("o of {what} decode (bf16)"), DType::Bf16, &o, &want_o.data, 1e-5);
        let es = rel_l2(&s, &states_flat(&want_s));
        assert!(es <= 1e-5, "{what} decode (bf16): state error {es:.2e}");
        report.push(format!("{what} {eo:.2e}"));
    }
    println!("bf16 decode, relative L2 error of o: {}", report.join(", "));
}
