//! The fused pieces around the mixers (`hlac::lower::pieces`): causal depthwise short conv over
//! packed variable-length batches (forward with initial and final state, backward, decode step),
//! RMSNorm and gated RMSNorm (forward and backward), compiled by the Cranelift back end and run on
//! the CPU. Forwards are checked against the f64 reference (`hlac_tests::reference::ops`) with
//! relative L2 error ≤ 1e-5; backwards against f64 central differences of that reference with
//! relative L2 error ≤ 1e-4 (weight gradients pass through the `sum_partials` kernel). Sizes are
//! awkward on purpose: partial token, channel and row blocks, one-token sequences, D not a power
//! of two.

use hlac::lower::pieces::{self, Conv, Norm};
use hlac::lower::Kernel;
use hlac_runtime::cpu::{Arg, CpuModule};
use hlac_runtime::kir::DType;
use hlac_tests::kernels::{f32s, f64s, packing, rel_l2_f64 as rel_l2};
use hlac_tests::reference::grad::numeric_grad;
use hlac_tests::reference::ops::{rms_norm, rms_norm_gated, short_conv, ShortConv};
use hlac_tests::reference::rng::Rng;
use hlac_tests::reference::T3;

const WIDTH: usize = 4;
const EPS: f64 = 1e-6;

/// A launch argument, bound to a kernel parameter by name.
enum Bind<'a> {
    In(&'a [f32]),
    Out(&'a mut [f32]),
    Idx(&'a [i64]),
    Int(i64),
}

/// Compiles `kernel` and launches it over `grid` with the arguments bound by parameter name.
fn launch(kernel: &Kernel, binds: Vec<(&str, Bind<'_>)>, grid: &[u64]) {
    let program = kernel.program.clone();
    hlac_runtime::kir::verify(&program).unwrap_or_else(|e| panic!("{e}\n{program}"));
    let mut module = CpuModule::new().expect("jit");
    let id = module.add(program.clone()).unwrap_or_else(|e| panic!("{e}\n{program}"));
    let mut binds: Vec<(&str, Option<Bind<'_>>)> = binds.into_iter().map(|(n, b)| (n, Some(b))).collect();
    let mut args: Vec<Arg<'_>> = Vec::new();
    for p in &program.params {
        let slot =
            binds.iter_mut().find(|(n, _)| *n == p.name).unwrap_or_else(|| panic!("`{}`: no argument for `{}`", program.name, p.name));
        args.push(match slot.1.take().expect("each argument bound once") {
            Bind::In(s) => Arg::F32(s),
            Bind::Out(s) => Arg::F32Mut(s),
            Bind::Idx(s) => Arg::I64(s),
            Bind::Int(v) => Arg::Int(v),
        });
    }
    module.launch(id, &mut args, grid).unwrap_or_else(|e| panic!("{e}"));
}

/// Sums partials `[parts, cols]` with the `sum_partials` kernel.
fn finish_partials(partials: &[f32], parts: usize, cols: usize) -> Vec<f32> {
    let k = pieces::sum_partials(32).expect("lowers");
    let mut out = vec![f32::NAN; cols];
    launch(
        &k,
        vec![
            ("partials", Bind::In(partials)),
            ("out", Bind::Out(&mut out)),
            ("parts", Bind::Int(parts as i64)),
            ("cols", Bind::Int(cols as i64)),
        ],
        &[cols.div_ceil(32) as u64],
    );
    out
}

fn conv_spec(channels: usize, silu: bool) -> Conv {
    Conv { channels: channels as u32, width: WIDTH as u32, silu, block_t: 64, block_c: 16, storage: DType::F32 }
}

/// Runs the conv forward kernel: (y, final states).
fn conv_fwd(c: &Conv, x: &[f32], w: &[f32], h0: Option<&[f32]>, cu: &[i64]) -> (Vec<f32>, Vec<f32>) {
    let k = pieces::conv_forward(c).expect("lowers");
    let seqs = cu.len() - 1;
    let tokens = *cu.last().unwrap_or(&0) as usize;
    let ch = c.channels as usize;
    let mut y = vec![f32::NAN; tokens * ch];
    let mut ht = vec![f32::NAN; seqs * ch * WIDTH];
    launch(
        &k,
        vec![
            ("x", Bind::In(x)),
            ("weight", Bind::In(w)),
            ("h0", Bind::In(h0.unwrap_or(&[]))),
            ("y", Bind::Out(&mut y)),
            ("ht", Bind::Out(&mut ht)),
            ("cu_seqlens", Bind::Idx(cu)),
            ("use_h0", Bind::Int(i64::from(h0.is_some()))),
            ("use_ht", Bind::Int(1)),
        ],
        &[seqs as u64, u64::from(c.channel_blocks())],
    );
    (y, ht)
}

/// Gradients the conv backward kernel produces: dx, dweight (summed), dh0.
struct ConvGrads {
    dx: Vec<f32>,
    dw: Vec<f32>,
    dh0: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn conv_bwd(c: &Conv, x: &[f32], w: &[f32], h0: Option<&[f32]>, dy: &[f32], dht: Option<&[f32]>, cu: &[i64]) -> ConvGrads {
    let k = pieces::conv_backward(c).expect("lowers");
    let seqs = cu.len() - 1;
    let tokens = *cu.last().unwrap_or(&0) as usize;
    let ch = c.channels as usize;
    let mut dx = vec![f32::NAN; tokens * ch];
    let mut dh0 = vec![f32::NAN; if h0.is_some() { seqs * ch * WIDTH } else { 0 }];
    let mut partial = vec![f32::NAN; seqs * ch * WIDTH];
    launch(
        &k,
        vec![
            ("x", Bind::In(x)),
            ("weight", Bind::In(w)),
            ("h0", Bind::In(h0.unwrap_or(&[]))),
            ("dy", Bind::In(dy)),
            ("dht", Bind::In(dht.unwrap_or(&[]))),
            ("dx", Bind::Out(&mut dx)),
            ("dh0", Bind::Out(&mut dh0)),
            ("dweight", Bind::Out(&mut partial)),
            ("cu_seqlens", Bind::Idx(cu)),
            ("use_h0", Bind::Int(i64::from(h0.is_some()))),
            ("use_dht", Bind::Int(i64::from(dht.is_some()))),
        ],
        &[seqs as u64, u64::from(c.channel_blocks())],
    );
    let dw = finish_partials(&partial, seqs, ch * WIDTH);
    ConvGrads { dx, dw, dh0 }
}

/// Random conv inputs: x [tokens, C], weight [C, W], initial caches [sequences][C·W].
struct ConvInputs {
    x: Vec<f64>,
    w: Vec<f64>,
    h0: Vec<Vec<f64>>,
}

fn conv_inputs(rng: &mut Rng, tokens: usize, channels: usize, seqs: usize) -> ConvInputs {
    ConvInputs {
        x: rng.normals(tokens * channels),
        w: rng.vec(channels * WIDTH, -0.8, 0.8),
        h0: (0..seqs).map(|_| rng.normals(channels * WIDTH)).collect(),
    }
}

fn reference_conv(inp: &ConvInputs, channels: usize, silu: bool, with_h0: bool, cu: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let tokens = *cu.last().unwrap_or(&0);
    let x = T3::new(tokens, 1, channels, inp.x.clone());
    let conv = ShortConv { weight: &inp.w, bias: None, width: WIDTH, silu };
    let (y, states) = short_conv(&x, &conv, with_h0.then_some(&inp.h0[..]), cu);
    (y.data, states.into_iter().flatten().collect())
}

fn check_conv_forward(lengths: &[usize], channels: usize, silu: bool, with_h0: bool, seed: u64) {
    let (cu, cu64) = packing(lengths);
    let tokens = *cu.last().unwrap_or(&0);
    let mut rng = Rng::new(seed);
    let inp = conv_inputs(&mut rng, tokens, channels, lengths.len());
    let (want_y, want_s) = reference_conv(&inp, channels, silu, with_h0, &cu);
    let h0 = f32s(&inp.h0.concat());
    let (y, ht) = conv_fwd(&conv_spec(channels, silu), &f32s(&inp.x), &f32s(&inp.w), with_h0.then_some(&h0[..]), &cu64);
    let (ey, es) = (rel_l2(&f64s(&y), &want_y), rel_l2(&f64s(&ht), &want_s));
    assert!(
        ey <= 1e-5 && es <= 1e-5,
        "conv forward {lengths:?} C={channels} silu={silu} h0={with_h0}: output error {ey:.2e}, state error {es:.2e}"
    );
}

#[test]
fn conv_forward_matches_reference_at_awkward_sizes() {
    let mut seed = 100;
    for channels in [5, 16, 64, 96] {
        for silu in [false, true] {
            for with_h0 in [false, true] {
                for lengths in [&[1usize][..], &[3], &[50], &[63], &[64], &[65], &[783]] {
                    seed += 1;
                    check_conv_forward(lengths, channels, silu, with_h0, seed);
                }
            }
        }
    }
}

#[test]
fn conv_forward_on_packed_varlen_batches() {
    check_conv_forward(&[1, 3, 50, 63, 64, 65, 783], 96, true, true, 201);
    check_conv_forward(&[65, 1, 2, 64, 3], 5, false, true, 202);
    // An empty sequence in the batch: its final state is its initial history (or zero).
    check_conv_forward(&[7, 0, 2], 16, true, true, 203);
    check_conv_forward(&[7, 0, 2], 16, true, false, 204);
}

#[test]
fn conv_packed_varlen_equals_per_sequence_conv() {
    let lengths = [3usize, 1, 65, 50, 64, 783, 63];
    let channels = 96;
    let c = conv_spec(channels, true);
    let (cu, cu64) = packing(&lengths);
    let mut rng = Rng::new(301);
    let inp = conv_inputs(&mut rng, cu[lengths.len()], channels, lengths.len());
    let (x, w, h0) = (f32s(&inp.x), f32s(&inp.w), f32s(&inp.h0.concat()));
    let (y, ht) = conv_fwd(&c, &x, &w, Some(&h0), &cu64);
    let state = channels * WIDTH;
    for (n, len) in lengths.iter().enumerate() {
        let (a, b) = (cu[n] * channels, cu[n + 1] * channels);
        let (ys, hs) = conv_fwd(&c, &x[a..b], &w, Some(&h0[n * state..(n + 1) * state]), &[0, *len as i64]);
        // The same instructions run on the same values: the results must be identical.
        assert_eq!(ys, y[a..b], "sequence {n}: packed output differs from the sequence alone");
        assert_eq!(hs, ht[n * state..(n + 1) * state], "sequence {n}: packed final state differs");
    }
}

/// Runs one decode step over all sequences, updating `state` in place.
fn conv_step(c: &Conv, x: &[f32], w: &[f32], state: &mut [f32], seqs: usize) -> Vec<f32> {
    let k = pieces::conv_step(c).expect("lowers");
    let mut y = vec![f32::NAN; seqs * c.channels as usize];
    launch(
        &k,
        vec![("x", Bind::In(x)), ("weight", Bind::In(w)), ("state", Bind::Out(state)), ("y", Bind::Out(&mut y))],
        &[seqs as u64, u64::from(c.channel_blocks())],
    );
    y
}

#[test]
fn conv_decode_step_by_step_equals_forward() {
    for (channels, silu, seed) in [(5usize, true, 401u64), (96, true, 402), (16, false, 403)] {
        let (seqs, len) = (3usize, 20usize);
        let c = conv_spec(channels, silu);
        let (_, cu64) = packing(&vec![len; seqs]);
        let mut rng = Rng::new(seed);
        let inp = conv_inputs(&mut rng, seqs * len, channels, seqs);
        let (x, w, h0) = (f32s(&inp.x), f32s(&inp.w), f32s(&inp.h0.concat()));
        let (y_full, ht_full) = conv_fwd(&c, &x, &w, Some(&h0), &cu64);
        // Prefill `prefix` tokens (none: the initial cache itself is the decode state), then decode.
        for prefix in [0usize, 1, 7] {
            let mut state = if prefix == 0 {
                h0.clone()
            } else {
                let xs: Vec<f32> = (0..seqs).flat_map(|n| x[n * len * channels..(n * len + prefix) * channels].to_vec()).collect();
                let (_, cu_p) = packing(&vec![prefix; seqs]);
                conv_fwd(&c, &xs, &w, Some(&h0), &cu_p).1
            };
            for t in prefix..len {
                let xt: Vec<f32> = (0..seqs).flat_map(|n| x[(n * len + t) * channels..(n * len + t + 1) * channels].to_vec()).collect();
                let yt = conv_step(&c, &xt, &w, &mut state, seqs);
                let want: Vec<f64> =
                    (0..seqs).flat_map(|n| f64s(&y_full[(n * len + t) * channels..(n * len + t + 1) * channels])).collect();
                let e = rel_l2(&f64s(&yt), &want);
                assert!(e <= 1e-6, "decode C={channels} prefix {prefix} token {t}: error {e:.2e} against the forward");
            }
            let e = rel_l2(&f64s(&state), &f64s(&ht_full));
            assert!(e == 0.0, "decode C={channels} prefix {prefix}: final cache differs from the forward's ({e:.2e})");
        }
    }
}

/// Checks the conv backward against central differences of the f64 reference under the loss
/// L = ⟨a, y⟩ + ⟨b, ht⟩. Channels are independent, so the numeric gradient is taken one channel
/// at a time (over that channel's x, weights and initial history) for the channels in `check`.
fn check_conv_backward(lengths: &[usize], channels: usize, silu: bool, with_h0: bool, with_dht: bool, check: &[usize], seed: u64) {
    let (cu, cu64) = packing(lengths);
    let tokens = *cu.last().unwrap_or(&0);
    let seqs = lengths.len();
    let mut rng = Rng::new(seed);
    let inp = conv_inputs(&mut rng, tokens, channels, seqs);
    let a = rng.normals(tokens * channels);
    let bw: Vec<f64> = if with_dht { rng.normals(seqs * channels * WIDTH) } else { vec![0.0; seqs * channels * WIDTH] };
    let c = conv_spec(channels, silu);
    let h0 = f32s(&inp.h0.concat());
    let (a32, b32) = (f32s(&a), f32s(&bw));
    let got = conv_bwd(&c, &f32s(&inp.x), &f32s(&inp.w), with_h0.then_some(&h0[..]), &a32, with_dht.then_some(&b32[..]), &cu64);
    // The reference works in f64 on exactly the f32 inputs the kernel saw.
    let round = |v: &[f64]| f64s(&f32s(v));
    let (x, w, a, bw) = (round(&inp.x), round(&inp.w), round(&a), round(&bw));
    let h0: Vec<Vec<f64>> = inp.h0.iter().map(|s| round(s)).collect();

    let (mut want, mut have) = ([Vec::new(), Vec::new(), Vec::new()], [Vec::new(), Vec::new(), Vec::new()]);
    for &ch in check {
        // Parameters of one channel: x[:, ch], then w[ch, :], then history columns 1..W per sequence.
        let mut params: Vec<f64> = (0..tokens).map(|t| x[t * channels + ch]).collect();
        params.extend_from_slice(&w[ch * WIDTH..(ch + 1) * WIDTH]);
        for s in &h0 {
            params.extend_from_slice(&s[ch * WIDTH + 1..(ch + 1) * WIDTH]);
        }
        let loss = |p: &[f64]| -> f64 {
            let xc = T3::new(tokens, 1, 1, p[..tokens].to_vec());
            let wc = &p[tokens..tokens + WIDTH];
            let init: Vec<Vec<f64>> = (0..seqs)
                .map(|n| {
                    let mut s = vec![0.0; WIDTH];
                    s[1..].copy_from_slice(&p[tokens + WIDTH + n * (WIDTH - 1)..tokens + WIDTH + (n + 1) * (WIDTH - 1)]);
                    s
                })
                .collect();
            let conv = ShortConv { weight: wc, bias: None, width: WIDTH, silu };
            let (y, states) = short_conv(&xc, &conv, with_h0.then_some(&init[..]), &cu);
            let mut l: f64 = (0..tokens).map(|t| a[t * channels + ch] * y.data[t]).sum();
            for (n, s) in states.iter().enumerate() {
                l += (0..WIDTH).map(|j| bw[(n * channels + ch) * WIDTH + j] * s[j]).sum::<f64>();
            }
            l
        };
        let g = numeric_grad(loss, &params, 1e-5);
        want[0].extend_from_slice(&g[..tokens]);
        have[0].extend((0..tokens).map(|t| f64::from(got.dx[t * channels + ch])));
        want[1].extend_from_slice(&g[tokens..tokens + WIDTH]);
        have[1].extend(f64s(&got.dw[ch * WIDTH..(ch + 1) * WIDTH]));
        if with_h0 {
            want[2].extend_from_slice(&g[tokens + WIDTH..]);
            for n in 0..seqs {
                let row = &got.dh0[(n * channels + ch) * WIDTH..(n * channels + ch + 1) * WIDTH];
                assert_eq!(row[0], 0.0, "dh0 column 0 is not history and must be zero");
                have[2].extend(f64s(&row[1..]));
            }
        }
    }
    for (i, what) in ["dx", "dweight", "dh0"].iter().enumerate() {
        let e = rel_l2(&have[i], &want[i]);
        assert!(e <= 1e-4, "conv backward {lengths:?} C={channels} silu={silu} h0={with_h0} dht={with_dht}: {what} error {e:.2e}");
    }
    if !with_h0 {
        assert!(got.dh0.is_empty());
    }
}

#[test]
fn conv_backward_matches_central_differences() {
    let all = |c: usize| (0..c).collect::<Vec<_>>();
    check_conv_backward(&[1], 5, true, true, true, &all(5), 501);
    check_conv_backward(&[3], 5, false, true, true, &all(5), 502);
    check_conv_backward(&[3, 1, 50], 16, true, true, true, &all(16), 503);
    check_conv_backward(&[63, 64, 65], 96, true, false, false, &[0, 15, 16, 47, 95], 504);
    check_conv_backward(&[65, 2, 64], 64, false, true, false, &[0, 31, 32, 63], 505);
    check_conv_backward(&[783], 96, true, true, true, &[0, 17, 95], 506);
    check_conv_backward(&[1, 3, 50, 63, 64, 65, 0], 5, true, true, true, &all(5), 507);
}

fn norm_spec(dim: usize, gated: bool) -> Norm {
    Norm { dim: dim as u32, eps: EPS, gated, block_rows: 16, storage: DType::F32 }
}

/// Random norm inputs: x, g [rows, D], w [D] — already rounded to f32 so that the f64
/// reference sees exactly what the kernel sees.
fn norm_inputs(rng: &mut Rng, rows: usize, dim: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let round = |v: Vec<f64>| f64s(&f32s(&v));
    let x = round(rng.normals(rows * dim).into_iter().map(|v| 2.0 * v + 0.3).collect());
    let g = round(rng.normals(rows * dim).into_iter().map(|v| 2.0 * v).collect());
    let w = round(rng.vec(dim, 0.5, 1.5));
    (x, g, w)
}

fn norm_reference(x: &[f64], g: &[f64], w: &[f64], gated: bool) -> Vec<f64> {
    let d = w.len();
    x.chunks(d).zip(g.chunks(d)).flat_map(|(xr, gr)| if gated { rms_norm_gated(xr, gr, w, EPS) } else { rms_norm(xr, w, EPS) }).collect()
}

#[test]
fn norm_forward_matches_reference_at_awkward_sizes() {
    let mut seed = 600;
    for gated in [false, true] {
        for dim in [5usize, 16, 64, 96] {
            for rows in [1usize, 3, 50, 63, 64, 65, 783] {
                seed += 1;
                let mut rng = Rng::new(seed);
                let (x, g, w) = norm_inputs(&mut rng, rows, dim);
                let n = norm_spec(dim, gated);
                let k = pieces::norm_forward(&n).expect("lowers");
                let mut y = vec![f32::NAN; rows * dim];
                let (x32, g32, w32) = (f32s(&x), f32s(&g), f32s(&w));
                let mut binds =
                    vec![("x", Bind::In(&x32)), ("w", Bind::In(&w32)), ("y", Bind::Out(&mut y)), ("rows", Bind::Int(rows as i64))];
                if gated {
                    binds.push(("g", Bind::In(&g32)));
                }
                launch(&k, binds, &[rows.div_ceil(16) as u64]);
                let e = rel_l2(&f64s(&y), &norm_reference(&x, &g, &w, gated));
                assert!(e <= 1e-5, "norm forward rows={rows} D={dim} gated={gated}: error {e:.2e}");
            }
        }
    }
}

/// Checks the norm backward against central differences under L = ⟨a, y⟩: dx and dg row by row
/// (rows are independent), dw over the whole batch.
fn check_norm_backward(rows: usize, dim: usize, gated: bool, programs: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let (x, g, w) = norm_inputs(&mut rng, rows, dim);
    let a = f64s(&f32s(&rng.normals(rows * dim)));
    let n = norm_spec(dim, gated);
    let k = pieces::norm_backward(&n).expect("lowers");
    let (x32, g32, w32, a32) = (f32s(&x), f32s(&g), f32s(&w), f32s(&a));
    let mut dx = vec![f32::NAN; rows * dim];
    let mut dg = vec![f32::NAN; rows * dim];
    let mut partial = vec![f32::NAN; programs * dim];
    let mut binds = vec![
        ("x", Bind::In(&x32)),
        ("w", Bind::In(&w32)),
        ("dy", Bind::In(&a32)),
        ("dx", Bind::Out(&mut dx)),
        ("dw", Bind::Out(&mut partial)),
        ("rows", Bind::Int(rows as i64)),
        ("programs", Bind::Int(programs as i64)),
    ];
    if gated {
        binds.push(("g", Bind::In(&g32)));
        binds.push(("dg", Bind::Out(&mut dg)));
    }
    launch(&k, binds, &[programs as u64]);
    let dw = finish_partials(&partial, programs, dim);

    let (mut want_dx, mut want_dg) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let (xr, gr, ar) = (&x[r * dim..(r + 1) * dim], &g[r * dim..(r + 1) * dim], &a[r * dim..(r + 1) * dim]);
        let dot = |y: Vec<f64>| -> f64 { y.iter().zip(ar).map(|(u, v)| u * v).sum() };
        let f_x = |p: &[f64]| dot(if gated { rms_norm_gated(p, gr, &w, EPS) } else { rms_norm(p, &w, EPS) });
        want_dx.extend(numeric_grad(f_x, xr, 1e-5));
        if gated {
            want_dg.extend(numeric_grad(|p: &[f64]| dot(rms_norm_gated(xr, p, &w, EPS)), gr, 1e-5));
        }
    }
    let f_w = |p: &[f64]| -> f64 { norm_reference(&x, &g, p, gated).iter().zip(&a).map(|(u, v)| u * v).sum() };
    let want_dw = numeric_grad(f_w, &w, 1e-5);
    let ex = rel_l2(&f64s(&dx), &want_dx);
    let ew = rel_l2(&f64s(&dw), &want_dw);
    let eg = if gated { rel_l2(&f64s(&dg), &want_dg) } else { 0.0 };
    assert!(
        ex <= 1e-4 && ew <= 1e-4 && eg <= 1e-4,
        "norm backward rows={rows} D={dim} gated={gated} programs={programs}: dx {ex:.2e}, dw {ew:.2e}, dg {eg:.2e}"
    );
}

#[test]
fn norm_backward_matches_central_differences() {
    let mut seed = 700;
    for gated in [false, true] {
        for dim in [5usize, 16, 64, 96] {
            for rows in [1usize, 3, 50, 63, 64, 65, 783] {
                seed += 1;
                // A few programs that each stride over several row blocks, and more programs than
                // blocks (idle programs must still write zero partials).
                let programs = if rows > 100 { 7 } else { 5 };
                check_norm_backward(rows, dim, gated, programs, seed);
            }
        }
    }
}

#[test]
fn sum_partials_adds_in_order() {
    let (parts, cols) = (9usize, 70usize);
    let mut rng = Rng::new(800);
    let p = f32s(&rng.normals(parts * cols));
    let got = finish_partials(&p, parts, cols);
    for c in 0..cols {
        let want = (0..parts).fold(0.0f32, |s, i| s + p[i * cols + c]);
        assert_eq!(got[c], want, "column {c}");
    }
}

#[test]
fn invalid_shapes_are_reported() {
    let bad = Conv { block_c: 0, ..Conv::fla(8) };
    assert!(pieces::conv_forward(&bad).is_err());
    let bad = Norm { eps: 0.0, ..norm_spec(8, true) };
    assert!(pieces::norm_backward(&bad).is_err());
    assert!(pieces::sum_partials(0).is_err());
}

#[test]
fn short_conv_forward_kernel_ir_is_pinned() {
    let k = pieces::conv_forward(&Conv::fla(96)).expect("lowers");
    hlac_runtime::kir::verify(&k.program).expect("verifies");
    assert_eq!(k.grid, ["sequences", "6"]);
    insta::assert_snapshot!("short_conv_fwd", k.program.to_string());
}
