//! Backward kernels lowered from the declarations, on the CPU, against f64 central differences of
//! the sequential reference: every gradient (raw token inputs, per-head parameters, lower bound,
//! initial state) for loss ℓ = Σ W_o ⊙ o + Σ W_s ⊙ S_T with random weights, on packed
//! sequences spanning several chunks. Tolerance: relative L2 error ≤ 1e-4.

use hlac_tests::kernels::{check_stored, chunk_offsets, f32s, launch, mixer, rel_l2, stored, Buf};
use std::collections::HashMap;

use hlac::classify::Family;
use hlac::lower::{chunk_bwd, decay, delta, Recurrence, Tiling};
use hlac_runtime::kir::DType;
use hlac_tests::reference::grad::numeric_grad;
use hlac_tests::reference::linear::forward;
use hlac_tests::reference::rng::Rng;
use hlac_tests::reference::{mixers, T3};

/// The f64 reference of a test: (inputs by name, initial states, cu_seqlens) → (o, final states).
type Reference<'a> = dyn Fn(&HashMap<&str, Vec<f64>>, &[Vec<f64>], &[usize]) -> (T3, Vec<Vec<f64>>) + 'a;

/// One differentiable input of a test: its name, its values and its shape (for the reference).
struct Input {
    name: &'static str,
    values: Vec<f64>,
    /// (dim per head) for token inputs; None for per-head parameters and lower bounds.
    token_dim: Option<usize>,
}

/// Checks the backward kernel of a decay-class mixer against central differences of `reference`,
/// which maps (inputs by name, h0) to (o, S_T).
fn check_backward(spec: &str, inputs: Vec<Input>, lengths: &[usize], chunk: u32, seed: u64, reference: &Reference) {
    check_backward_as(DType::F32, spec, inputs, lengths, (chunk, 0, 0), seed, reference);
}

/// [`check_backward`] with the token tensors (inputs, `do` and the token gradients) stored as
/// `storage`: the token inputs and `do` are rounded to it first, so the reference differentiates
/// at the very point the kernels see, and the token gradients are judged by
/// [`hlac_tests::kernels::check_stored`] (the f32 per-head, lower-bound and initial-state gradients
/// as in f32). With `split` > 0 the backward runs over value blocks of `split` columns, and its
/// partial gradients are added up by `sum_blocks` (both on the CPU back end). Returns the largest
/// relative error of a token gradient.
fn check_backward_as(
    storage: DType,
    spec: &str,
    mut inputs: Vec<Input>,
    lengths: &[usize],
    (chunk, sub_block, split): (u32, u32, u32),
    seed: u64,
    reference: &Reference,
) -> f64 {
    for i in inputs.iter_mut().filter(|i| i.token_dim.is_some()) {
        i.values = stored(storage, &i.values);
    }
    let m = mixer(spec);
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage };
    let (k, v, h) = (math.key_axis.1 as usize, math.value_axis.1 as usize, m.instance.heads as usize);
    let tiling = Tiling { chunk, block_v: v as u32, sub_block };
    let mut cu = vec![0usize];
    for l in lengths {
        cu.push(cu.last().copied().unwrap_or(0) + l);
    }
    let total = *cu.last().unwrap_or(&0);
    let seqs = lengths.len();
    let cu64: Vec<i64> = cu.iter().map(|&x| x as i64).collect();
    let chunk_offsets = chunk_offsets(lengths.iter().copied(), chunk as usize);
    let chunks = *chunk_offsets.last().unwrap_or(&0) as usize;
    let mut rng = Rng::new(seed);
    let h0: Vec<f64> = rng.normals(seqs * h * k * v);
    let w_o: Vec<f64> = stored(storage, &rng.normals(total * h * v));
    let w_s: Vec<f64> = rng.normals(seqs * h * k * v);

    // The kernels: forward keeping states, then backward.
    let fwd =
        if class.family == Family::Delta { delta::forward(&r, tiling, true) } else { decay::forward(&r, tiling, true) }.expect("lowers");
    let blocks = if split > 0 { v / split as usize } else { 1 };
    let bwd_tiling = if split > 0 { Tiling { block_v: split, ..tiling } } else { tiling };
    let bwd = chunk_bwd::backward(&r, bwd_tiling).expect("lowers");
    let partial = |name: &str| bwd.program.param_index(&format!("d{name}_parts")).is_some();
    let mut bufs: HashMap<String, Buf> = HashMap::new();
    for i in &inputs {
        bufs.insert(i.name.into(), Buf::In(f32s(&i.values)));
    }
    bufs.insert("o".into(), Buf::Out(vec![f32::NAN; total * h * v]));
    bufs.insert("h0".into(), Buf::In(f32s(&h0)));
    bufs.insert("ht".into(), Buf::Out(vec![f32::NAN; seqs * h * k * v]));
    bufs.insert("cu_seqlens".into(), Buf::I64(cu64.clone()));
    bufs.insert("use_h0".into(), Buf::Int(1));
    bufs.insert("use_ht".into(), Buf::Int(1));
    bufs.insert("states".into(), Buf::Out(vec![f32::NAN; chunks * h * k * v]));
    bufs.insert("chunk_offsets".into(), Buf::I64(chunk_offsets.clone()));
    let outs = launch(&fwd.program, bufs, &[(seqs * h) as u64, 1]);
    let states = outs["states"].clone();

    let mut bufs: HashMap<String, Buf> = HashMap::new();
    for i in &inputs {
        bufs.insert(i.name.into(), Buf::In(f32s(&i.values)));
        let n = match i.token_dim {
            Some(_) => i.values.len(),
            None => seqs * i.values.len(),
        };
        if partial(i.name) {
            bufs.insert(format!("d{}_parts", i.name), Buf::Out(vec![f32::NAN; n * blocks]));
        } else {
            bufs.insert(format!("d{}", i.name), Buf::Out(vec![f32::NAN; n]));
        }
    }
    bufs.insert("do".into(), Buf::In(f32s(&w_o)));
    bufs.insert("states".into(), Buf::In(states));
    bufs.insert("dht".into(), Buf::In(f32s(&w_s)));
    bufs.insert("cu_seqlens".into(), Buf::I64(cu64));
    bufs.insert("chunk_offsets".into(), Buf::I64(chunk_offsets));
    bufs.insert("dh0".into(), Buf::Out(vec![f32::NAN; seqs * h * k * v]));
    bufs.insert("use_dht".into(), Buf::Int(1));
    let grid: Vec<u64> = if split > 0 { vec![(seqs * h) as u64, blocks as u64] } else { vec![(seqs * h) as u64] };
    let mut grads = launch(&bwd.program, bufs, &grid);
    // A split backward's partial gradients, `[rows, blocks, width]`, added up as on a GPU.
    for i in inputs.iter().filter(|i| partial(i.name)) {
        let (n, width) = match i.token_dim {
            Some(d) => (i.values.len(), d),
            None => (seqs * i.values.len(), i.values.len() / h),
        };
        let out_type = if i.token_dim.is_some() { storage } else { DType::F32 };
        let sum = hlac::lower::pieces::sum_blocks(out_type, 256).expect("lowers");
        let mut bufs: HashMap<String, Buf> = HashMap::new();
        bufs.insert("partials".into(), Buf::In(grads.remove(&format!("d{}_parts", i.name)).expect("partials")));
        bufs.insert("out".into(), Buf::Out(vec![f32::NAN; n]));
        bufs.insert("parts".into(), Buf::Int(blocks as i64));
        bufs.insert("width".into(), Buf::Int(width as i64));
        bufs.insert("cols".into(), Buf::Int(n as i64));
        let mut summed = launch(&sum.program, bufs, &[n.div_ceil(256) as u64]);
        grads.insert(format!("d{}", i.name), summed.remove("out").expect("out"));
    }

    // Central differences of the f64 reference.
    let values: HashMap<&str, Vec<f64>> = inputs.iter().map(|i| (i.name, i.values.clone())).collect();
    let h0s = |flat: &[f64]| flat.chunks(k * v).map(<[f64]>::to_vec).collect::<Vec<_>>();
    let loss = |vals: &HashMap<&str, Vec<f64>>, h0: &[f64]| {
        let (o, s) = reference(vals, &h0s(h0), &cu);
        let so: f64 = o.data.iter().zip(&w_o).map(|(a, b)| a * b).sum();
        let ss: f64 = s.iter().flatten().zip(&w_s).map(|(a, b)| a * b).sum();
        so + ss
    };
    let mut worst = 0.0f64;
    for i in &inputs {
        let want = numeric_grad(
            |x| {
                let mut vals = values.clone();
                vals.insert(i.name, x.to_vec());
                loss(&vals, &h0)
            },
            &i.values,
            1e-5,
        );
        let got = &grads[&format!("d{}", i.name)];
        // Per-head parameters come back per sequence: sum them.
        if i.token_dim.is_some() && storage != DType::F32 {
            let what = format!("d{} of {} ({} storage)", i.name, m.name, storage.name());
            worst = worst.max(check_stored(&what, storage, got, &want, 1e-4));
            continue;
        }
        let got: Vec<f32> = if i.token_dim.is_some() {
            got.clone()
        } else {
            let n = i.values.len();
            (0..n).map(|j| (0..seqs).map(|s| got[s * n + j]).sum()).collect()
        };
        let err = rel_l2(&got, &want);
        assert!(err <= 1e-4, "d{} of {}: relative error {err:.2e}", i.name, m.name);
    }
    let want = numeric_grad(|x| loss(&values, x), &h0, 1e-5);
    let err = rel_l2(&grads["dh0"], &want);
    assert!(err <= 1e-4, "dh0 of {}: relative error {err:.2e}", m.name);
    worst
}

fn t3(vals: &HashMap<&str, Vec<f64>>, name: &str, total: usize, h: usize, d: usize) -> T3 {
    T3::new(total, h, d, vals[name].clone())
}

#[test]
fn gla_backward_matches_central_differences() {
    let spec = "model m {\n  hidden_size = 16\n  pattern = GLA\n  mixer GLA {\n    num_heads = 2\n  }\n}\n";
    let (k, v, h) = (4usize, 8usize, 2usize);
    // The whole chunk pairwise, and in sub-blocks (algorithms.md §1.2) of 2 rows, and of 4 for
    // the chunk of 8.
    let cases = [
        (1u64, vec![5usize], 4u32, 0u32),
        (2, vec![3, 9, 1], 4, 0),
        (3, vec![17], 8, 0),
        (1, vec![5], 4, 2),
        (2, vec![3, 9, 1], 4, 2),
        (3, vec![17], 8, 2),
        (3, vec![17], 8, 4),
    ];
    // Then split over value blocks of 4 and of 2 columns (V = 8), whole-chunk and sub-blocked.
    let split_cases = [(4, vec![3usize, 9, 1], 4u32, 0u32, 4u32), (5, vec![17], 8, 2, 2)];
    let cases = cases.into_iter().map(|(s, l, c, b)| (s, l, c, b, 0)).chain(split_cases);
    for (seed, lengths, chunk, sub_block, split) in cases {
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "gk", values: rng.normals(total * h * k).iter().map(|x| x * 4.0).collect(), token_dim: Some(k) },
        ];
        check_backward_as(DType::F32, spec, inputs, &lengths, (chunk, sub_block, split), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::gla(
                &t3(vals, "q", total, h, k),
                &t3(vals, "k", total, h, k),
                &t3(vals, "v", total, h, v),
                &t3(vals, "gk", total, h, k),
            );
            forward(&p, Some(h0), cu)
        });
    }
}

#[test]
fn hgrn2_backward_with_lower_bound_matches_central_differences() {
    let spec = "model m {\n  hidden_size = 16\n  pattern = HGRN2\n  mixer HGRN2 {\n    expand_ratio = 4\n  }\n}\n";
    let (k, v, h) = (4usize, 4usize, 4usize);
    // Whole, in sub-blocks, and split over value blocks of 2 (the lower bound's gradient, a
    // per-head row of K, then comes in partial sums too).
    for (sub_block, split) in [(0u32, 0u32), (2, 0), (2, 2)] {
        let (seed, lengths) = (11u64, vec![6usize, 11]);
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "f", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "i", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "lower_bound", values: rng.vec(h * k, 0.05, 0.8), token_dim: None },
        ];
        check_backward_as(DType::F32, spec, inputs, &lengths, (4, sub_block, split), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::hgrn2(
                &t3(vals, "q", total, h, k),
                &t3(vals, "f", total, h, k),
                &t3(vals, "i", total, h, v),
                Some(&vals["lower_bound"]),
            );
            forward(&p, Some(h0), cu)
        });
    }
}

#[test]
fn retnet_backward_through_rotary_embeddings_matches_central_differences() {
    let spec = "model m {\n  hidden_size = 16\n  pattern = RetNet\n  mixer RetNet {\n    num_heads = 2\n    expand_v = 1.0\n  }\n}\n";
    let (k, v, h) = (8usize, 8usize, 2usize);
    {
        let (seed, lengths) = (21u64, vec![7usize, 10]);
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
        ];
        check_backward(spec, inputs, &lengths, 4, seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let pos = hlac_tests::reference::positions(cu);
            let p = mixers::retnet(&t3(vals, "q", total, h, k), &t3(vals, "k", total, h, k), &t3(vals, "v", total, h, v), &pos);
            forward(&p, Some(h0), cu)
        });
    }
}

#[test]
fn deltanet_backward_matches_central_differences() {
    let spec = "model m {\n  hidden_size = 16\n  pattern = DeltaNet\n  mixer DeltaNet {\n    num_heads = 2\n  }\n}\n";
    let (k, v, h) = (8usize, 8usize, 2usize);
    // The last case splits over value blocks of 4 (K = V: the outputs must follow their inputs'
    // axes, not their widths).
    for (seed, lengths, chunk, split) in
        [(31u64, vec![5usize], 4u32, 0u32), (32, vec![3, 9, 1], 4, 0), (33, vec![17], 8, 0), (34, vec![3, 9, 1], 4, 4)]
    {
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "b", values: rng.normals(total * h), token_dim: Some(1) },
        ];
        check_backward_as(DType::F32, spec, inputs, &lengths, (chunk, 0, split), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::deltanet(
                &t3(vals, "q", total, h, k),
                &t3(vals, "k", total, h, k),
                &t3(vals, "v", total, h, v),
                &t3(vals, "b", total, h, 1),
            );
            forward(&p, Some(h0), cu)
        });
    }
}

#[test]
fn gdn_backward_matches_central_differences() {
    let spec = "model m {\n  hidden_size = 16\n  pattern = GDN\n  mixer GDN {\n    num_heads = 2\n    head_dim = 4\n  }\n}\n";
    let (k, v, h) = (4usize, 8usize, 2usize);
    // The last two split over value blocks of 4 and 2 (V = 8): the scalar inputs' and the
    // per-head parameters' gradients then come in partial sums.
    for (seed, lengths, chunk, split) in
        [(41u64, vec![6usize], 4u32, 0u32), (42, vec![2, 11], 4, 0), (43, vec![19], 8, 0), (44, vec![2, 11], 4, 4), (45, vec![19], 8, 2)]
    {
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "a", values: rng.normals(total * h), token_dim: Some(1) },
            Input { name: "b", values: rng.normals(total * h), token_dim: Some(1) },
            Input { name: "A_log", values: rng.vec(h, -1.0, 0.5), token_dim: None },
            Input { name: "dt_bias", values: rng.vec(h, -1.0, 1.0), token_dim: None },
        ];
        check_backward_as(DType::F32, spec, inputs, &lengths, (chunk, 0, split), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::gated_deltanet(
                &t3(vals, "q", total, h, k),
                &t3(vals, "k", total, h, k),
                &t3(vals, "v", total, h, v),
                &t3(vals, "a", total, h, 1),
                &t3(vals, "b", total, h, 1),
                &vals["A_log"],
                &vals["dt_bias"],
            );
            forward(&p, Some(h0), cu)
        });
    }
}

#[test]
fn hgrn_scan_backward_matches_central_differences() {
    check_scan_backward(DType::F32, 51, &[1, 6, 13]);
}

/// The GPU's three-pass scan forward (summaries per chunk, the carry over them, the outputs per
/// chunk), run on the CPU back end, against the sequential f64 recurrence: packed sequences that
/// end inside a chunk, fill one, span several or are empty, channel blocks that do not divide the
/// width, an initial state in, the final one out.
#[test]
fn hgrn_three_pass_scan_forward_matches_the_sequential_recurrence() {
    let m = mixer("model m {\n  hidden_size = 8\n  pattern = HGRN\n}\n");
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage: DType::F32 };
    let (d, block, rows) = (8usize, 3u32, 5usize);
    let lengths = [1usize, 6, 13, 0, 5, 11];
    let (cu, cu64) = hlac_tests::kernels::packing(&lengths);
    let chunk_offsets = chunk_offsets(lengths, rows);
    let (total, seqs, chunks) = (cu[lengths.len()], lengths.len(), chunk_offsets[lengths.len()] as usize);
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let mut rng = Rng::new(77);
    let i = rng.normals(total * d);
    let f: Vec<f64> = rng.normals(total * d).iter().map(|x| x * 2.0).collect();
    let lb = rng.vec(d, 0.05, 0.8);
    let h0 = rng.normals(seqs * d);
    let passes = |name: &str| match name {
        "chunks" => hlac::lower::scan::forward_chunks(&r, block, rows as u32).expect("lowers"),
        "carry" => hlac::lower::scan::forward_carry(&r, block, rows as u32).expect("lowers"),
        _ => hlac::lower::scan::forward_out(&r, block, rows as u32).expect("lowers"),
    };
    let blocks = (d as u64).div_ceil(u64::from(block));
    let per_chunk = [seqs as u64, blocks, max_len.div_ceil(rows) as u64];
    let tokens = |bufs: &mut HashMap<String, Buf>| {
        bufs.insert("i".into(), Buf::In(f32s(&i)));
        bufs.insert("f".into(), Buf::In(f32s(&f)));
        bufs.insert("lower_bound".into(), Buf::In(f32s(&lb)));
        bufs.insert("cu_seqlens".into(), Buf::I64(cu64.clone()));
        bufs.insert("chunk_offsets".into(), Buf::I64(chunk_offsets.clone()));
    };
    let mut bufs = HashMap::new();
    tokens(&mut bufs);
    bufs.insert("chunk_gates".into(), Buf::Out(vec![f32::NAN; chunks * d]));
    bufs.insert("chunk_ends".into(), Buf::Out(vec![f32::NAN; chunks * d]));
    let summaries = launch(&passes("chunks").program, bufs, &per_chunk);
    let mut bufs = HashMap::new();
    bufs.insert("chunk_gates".into(), Buf::In(summaries["chunk_gates"].clone()));
    bufs.insert("chunk_ends".into(), Buf::In(summaries["chunk_ends"].clone()));
    bufs.insert("chunk_starts".into(), Buf::Out(vec![f32::NAN; chunks * d]));
    bufs.insert("h0".into(), Buf::In(f32s(&h0)));
    bufs.insert("ht".into(), Buf::Out(vec![f32::NAN; seqs * d]));
    bufs.insert("cu_seqlens".into(), Buf::I64(cu64.clone()));
    bufs.insert("chunk_offsets".into(), Buf::I64(chunk_offsets.clone()));
    bufs.insert("use_h0".into(), Buf::Int(1));
    bufs.insert("use_ht".into(), Buf::Int(1));
    let carried = launch(&passes("carry").program, bufs, &[seqs as u64, blocks]);
    let mut bufs = HashMap::new();
    tokens(&mut bufs);
    bufs.insert("chunk_starts".into(), Buf::In(carried["chunk_starts"].clone()));
    bufs.insert("o".into(), Buf::Out(vec![f32::NAN; total * d]));
    let out = launch(&passes("out").program, bufs, &per_chunk);

    let h0s: Vec<Vec<f64>> = h0.chunks(d).map(<[f64]>::to_vec).collect();
    let (o, ht) = mixers::hgrn(&T3::new(total, d, 1, i.clone()), &T3::new(total, d, 1, f.clone()), Some(&lb), Some(&h0s), &cu);
    let want_ht: Vec<f64> = ht.into_iter().flatten().collect();
    for (name, got, want) in [("o", &out["o"], &o.data), ("ht", &carried["ht"], &want_ht)] {
        assert!(got.iter().all(|x| x.is_finite()), "{name}: an element is not written");
        let err = rel_l2(got, want);
        assert!(err <= 1e-5, "{name} of the three-pass scan: relative error {err:.2e}");
    }
}

/// The elementwise scan's forward then backward against central differences of the reference; the
/// token tensors (i, f, o, do, di, df) stored as `storage`, with i, f and do rounded to it first
/// (the `o` the backward reads is the forward's, rounded on its store as in training). Returns the
/// largest relative error of a token gradient.
fn check_scan_backward(storage: DType, seed: u64, lengths: &[usize]) -> f64 {
    let m = mixer("model m {\n  hidden_size = 8\n  pattern = HGRN\n}\n");
    let math = m.instance.math.as_ref().expect("math");
    let class = m.class.as_ref().expect("class");
    let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage };
    let d = 8usize;
    let block = 4u32;
    let mut worst = 0.0f64;
    {
        let mut cu = vec![0usize];
        for l in lengths {
            cu.push(cu.last().copied().unwrap_or(0) + l);
        }
        let cu64: Vec<i64> = cu.iter().map(|&x| x as i64).collect();
        let total = *cu.last().unwrap_or(&0);
        let seqs = lengths.len();
        let mut rng = Rng::new(seed);
        let i = stored(storage, &rng.normals(total * d));
        let f = stored(storage, &rng.normals(total * d).iter().map(|x| x * 2.0).collect::<Vec<_>>());
        let lb = rng.vec(d, 0.05, 0.8);
        let h0 = rng.normals(seqs * d);
        let w_o = stored(storage, &rng.normals(total * d));
        let w_s = rng.normals(seqs * d);
        // Blocks of 5 tokens: sequences that end inside a block, span several, or fill one.
        let rows = 5;
        let fwd = hlac::lower::scan::forward(&r, block, rows).expect("lowers");
        let bwd = hlac::lower::scan::backward(&r, block, rows).expect("lowers");
        let grid = [seqs as u64, (d as u64).div_ceil(u64::from(block))];
        let mut bufs: HashMap<String, Buf> = HashMap::new();
        bufs.insert("i".into(), Buf::In(f32s(&i)));
        bufs.insert("f".into(), Buf::In(f32s(&f)));
        bufs.insert("lower_bound".into(), Buf::In(f32s(&lb)));
        bufs.insert("o".into(), Buf::Out(vec![f32::NAN; total * d]));
        bufs.insert("h0".into(), Buf::In(f32s(&h0)));
        bufs.insert("ht".into(), Buf::Out(vec![f32::NAN; seqs * d]));
        bufs.insert("cu_seqlens".into(), Buf::I64(cu64.clone()));
        bufs.insert("use_h0".into(), Buf::Int(1));
        bufs.insert("use_ht".into(), Buf::Int(1));
        let outs = launch(&fwd.program, bufs, &grid);
        let mut bufs: HashMap<String, Buf> = HashMap::new();
        bufs.insert("i".into(), Buf::In(f32s(&i)));
        bufs.insert("f".into(), Buf::In(f32s(&f)));
        bufs.insert("lower_bound".into(), Buf::In(f32s(&lb)));
        bufs.insert("o".into(), Buf::In(outs["o"].clone()));
        bufs.insert("do".into(), Buf::In(f32s(&w_o)));
        bufs.insert("h0".into(), Buf::In(f32s(&h0)));
        bufs.insert("dht".into(), Buf::In(f32s(&w_s)));
        bufs.insert("cu_seqlens".into(), Buf::I64(cu64));
        bufs.insert("di".into(), Buf::Out(vec![f32::NAN; total * d]));
        bufs.insert("df".into(), Buf::Out(vec![f32::NAN; total * d]));
        bufs.insert("dlower_bound".into(), Buf::Out(vec![f32::NAN; seqs * d]));
        bufs.insert("dh0".into(), Buf::Out(vec![f32::NAN; seqs * d]));
        bufs.insert("use_h0".into(), Buf::Int(1));
        bufs.insert("use_dht".into(), Buf::Int(1));
        let grads = launch(&bwd.program, bufs, &grid);
        let loss = |i: &[f64], f: &[f64], lb: &[f64], h0: &[f64]| {
            let h0s: Vec<Vec<f64>> = h0.chunks(d).map(<[f64]>::to_vec).collect();
            let (o, s) = mixers::hgrn(&T3::new(total, d, 1, i.to_vec()), &T3::new(total, d, 1, f.to_vec()), Some(lb), Some(&h0s), &cu);
            let so: f64 = o.data.iter().zip(&w_o).map(|(a, b)| a * b).sum();
            let ss: f64 = s.iter().flatten().zip(&w_s).map(|(a, b)| a * b).sum();
            so + ss
        };
        let checks: [(&str, Vec<f64>); 4] = [
            ("di", numeric_grad(|x| loss(x, &f, &lb, &h0), &i, 1e-5)),
            ("df", numeric_grad(|x| loss(&i, x, &lb, &h0), &f, 1e-5)),
            ("dlower_bound", numeric_grad(|x| loss(&i, &f, x, &h0), &lb, 1e-5)),
            ("dh0", numeric_grad(|x| loss(&i, &f, &lb, x), &h0, 1e-5)),
        ];
        for (name, want) in checks {
            let got = &grads[name];
            if storage != DType::F32 && ["di", "df"].contains(&name) {
                // The backward reads h_{t−1} from the forward's `o`, rounded to the storage type:
                // an intermediate perturbed by up to u relative, which the gradients inherit on
                // top of their own rounding (fla's HGRN backward reads its bf16 `o` alike).
                let compute = hlac_tests::kernels::unit_roundoff(storage);
                worst = worst.max(check_stored(&format!("{name} of HGRN ({} storage)", storage.name()), storage, got, &want, compute));
                continue;
            }
            let got: Vec<f32> =
                if name == "dlower_bound" { (0..d).map(|j| (0..seqs).map(|s| got[s * d + j]).sum()).collect() } else { got.clone() };
            // The f32 gradients inherit the rounded `o` too (by at most u relative per term).
            let tol = if storage == DType::F32 { 1e-4 } else { 1e-4 + hlac_tests::kernels::unit_roundoff(storage) };
            let err = rel_l2(&got, &want);
            assert!(err <= tol, "{name} of HGRN: relative error {err:.2e}");
            if storage != DType::F32 {
                println!("{name} of HGRN ({} storage, stored in f32): relative error {err:.2e}", storage.name());
            }
        }
    }
    worst
}

/// bf16 storage, one backward per class: GLA (decay), GDN (delta, with per-head parameters; split
/// over value blocks of 4, its partial sums added in f32 and rounded once) and the HGRN scan, on packed sequences spanning several chunks (a 65-token sequence among them),
/// against central differences at the bf16-rounded inputs.
#[test]
fn backward_with_bf16_storage_matches_central_differences() {
    let mut report = Vec::new();
    {
        let spec = "model m {\n  hidden_size = 16\n  pattern = GLA\n  mixer GLA {\n    num_heads = 2\n  }\n}\n";
        let (k, v, h) = (4usize, 8usize, 2usize);
        let (seed, lengths) = (61u64, vec![3usize, 65, 1]);
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "gk", values: rng.normals(total * h * k).iter().map(|x| x * 4.0).collect(), token_dim: Some(k) },
        ];
        let err = check_backward_as(DType::Bf16, spec, inputs, &lengths, (16, 0, 0), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::gla(
                &t3(vals, "q", total, h, k),
                &t3(vals, "k", total, h, k),
                &t3(vals, "v", total, h, v),
                &t3(vals, "gk", total, h, k),
            );
            forward(&p, Some(h0), cu)
        });
        report.push(format!("GLA chunk_bwd {err:.2e}"));
    }
    {
        let spec = "model m {\n  hidden_size = 16\n  pattern = GDN\n  mixer GDN {\n    num_heads = 2\n    head_dim = 4\n  }\n}\n";
        let (k, v, h) = (4usize, 8usize, 2usize);
        let (seed, lengths) = (62u64, vec![65usize, 2, 11]);
        let total: usize = lengths.iter().sum();
        let mut rng = Rng::new(seed);
        let inputs = vec![
            Input { name: "q", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "k", values: rng.normals(total * h * k), token_dim: Some(k) },
            Input { name: "v", values: rng.normals(total * h * v), token_dim: Some(v) },
            Input { name: "a", values: rng.normals(total * h), token_dim: Some(1) },
            Input { name: "b", values: rng.normals(total * h), token_dim: Some(1) },
            Input { name: "A_log", values: rng.vec(h, -1.0, 0.5), token_dim: None },
            Input { name: "dt_bias", values: rng.vec(h, -1.0, 1.0), token_dim: None },
        ];
        let err = check_backward_as(DType::Bf16, spec, inputs, &lengths, (16, 0, 4), seed, &|vals, h0, cu| {
            let total = *cu.last().unwrap_or(&0);
            let p = mixers::gated_deltanet(
                &t3(vals, "q", total, h, k),
                &t3(vals, "k", total, h, k),
                &t3(vals, "v", total, h, v),
                &t3(vals, "a", total, h, 1),
                &t3(vals, "b", total, h, 1),
                &vals["A_log"],
                &vals["dt_bias"],
            );
            forward(&p, Some(h0), cu)
        });
        report.push(format!("GDN chunk_bwd {err:.2e}"));
    }
    let err = check_scan_backward(DType::Bf16, 63, &[1, 65, 13]);
    report.push(format!("HGRN scan_bwd {err:.2e}"));
    println!("bf16 backward, largest relative L2 error of a token gradient: {}", report.join(", "));
}
