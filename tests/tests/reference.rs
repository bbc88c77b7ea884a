//! Checks of the f64 reference implementations in `hlac_tests::reference` against independent
//! formulations: the sequential recurrence against the quadratic parallel form, special cases
//! of one mixer against another, decode against forward, packed against separate sequences,
//! analytic gradients against central differences, and finiteness under extreme gates.

use hlac_tests::reference::attention::{attention, attention_step, repeat_kv, AttnOpts, KvCache};
use hlac_tests::reference::grad::{numeric_grad, weighted_sum};
use hlac_tests::reference::linear::{self, forward, forward_parallel, forward_step, Gate, GateT3, HeadSeq, Prepared};
use hlac_tests::reference::mixers;
use hlac_tests::reference::ops::{self, ShortConv};
use hlac_tests::reference::rng::Rng;
use hlac_tests::reference::{positions, rel_err, T3};

const SIZES_T: [usize; 4] = [1, 3, 50, 65];
const SIZES_KV: [(usize, usize); 3] = [(3, 5), (5, 3), (8, 8)];
const TOL: f64 = 1e-12;

#[derive(Clone, Copy, Debug)]
enum Kind {
    None,
    Scalar,
    Vector,
}

const KINDS: [Kind; 3] = [Kind::None, Kind::Scalar, Kind::Vector];

/// A random generic problem; delta problems get L2-normalised keys so that I − βkkᵀ contracts.
fn random_problem(rng: &mut Rng, t: usize, h: usize, dk: usize, dv: usize, kind: Kind, delta: bool) -> Prepared {
    let q = rng.t3_normal(t, h, dk);
    let mut k = rng.t3_normal(t, h, dk);
    if delta {
        k = ops::l2_norm_t3(&k);
    }
    let v = rng.t3_normal(t, h, dv);
    let gate = match kind {
        Kind::None => GateT3::None,
        Kind::Scalar => GateT3::Scalar(rng.t3(t, h, 1, -0.5, 0.0)),
        Kind::Vector => GateT3::Vector(rng.t3(t, h, dk, -0.5, 0.0)),
    };
    let beta = delta.then(|| rng.t3(t, h, 1, 0.05, 0.95));
    Prepared { q, k, v, gate, beta, scale: 1.0 / (dk as f64).sqrt() }
}

fn random_states(rng: &mut Rng, n: usize, size: usize) -> Vec<Vec<f64>> {
    (0..n).map(|_| rng.normals(size)).collect()
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

fn assert_finite(what: &str, x: &[f64]) {
    assert!(x.iter().all(|v| v.is_finite()), "{what}: non-finite value");
}

/// Runs a prepared problem token by token with the decode step.
fn decode_all(p_at: impl Fn(usize) -> Prepared, t: usize, states: &mut [Vec<f64>]) -> T3 {
    let parts: Vec<T3> = (0..t).map(|i| forward_step(&p_at(i), states)).collect();
    T3::concat_t(&parts)
}

/// Tokens [a, b) of every tensor in a prepared problem.
fn slice(p: &Prepared, a: usize, b: usize) -> Prepared {
    Prepared {
        q: p.q.slice_t(a, b),
        k: p.k.slice_t(a, b),
        v: p.v.slice_t(a, b),
        gate: match &p.gate {
            GateT3::None => GateT3::None,
            GateT3::Scalar(g) => GateT3::Scalar(g.slice_t(a, b)),
            GateT3::Vector(g) => GateT3::Vector(g.slice_t(a, b)),
        },
        beta: p.beta.as_ref().map(|x| x.slice_t(a, b)),
        scale: p.scale,
    }
}

#[test]
fn sequential_equals_parallel_for_the_decay_classes() {
    let mut rng = Rng::new(1);
    for t in SIZES_T {
        for (dk, dv) in SIZES_KV {
            for kind in KINDS {
                let p = random_problem(&mut rng, t, 2, dk, dv, kind, false);
                let cu = [0, t];
                let s0 = random_states(&mut rng, 2, dk * dv);
                for init in [None, Some(s0.as_slice())] {
                    let (o, _) = forward(&p, init, &cu);
                    let op = forward_parallel(&p, init, &cu);
                    assert_close(&format!("T={t} K={dk} V={dv} {kind:?} s0={}", init.is_some()), &o.data, &op.data, TOL);
                }
            }
        }
    }
}

#[test]
fn retnet_gla_hgrn2_wrappers_equal_their_parallel_forms() {
    let mut rng = Rng::new(2);
    // Packed sequences of awkward lengths, so that RoPE positions restart per sequence.
    let cu = [0, 1, 4, 54, 119];
    let t = 119;
    for (dk, dv) in SIZES_KV {
        let h = 3;
        let (q, k, v) = (rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dv));
        let gk = rng.t3(t, h, dk, -4.0, 4.0);
        let lb = rng.vec(h * dk, 0.0, 0.9);
        let s0 = random_states(&mut rng, 4 * h, dk * dv);
        let problems = [
            ("retnet", mixers::retnet(&q, &k, &v, &positions(&cu))),
            ("gla", mixers::gla(&q, &k, &v, &gk)),
            ("hgrn2", mixers::hgrn2(&q, &gk, &v, Some(&lb))),
            ("hgrn2 layer 0", mixers::hgrn2(&q, &gk, &v, None)),
        ];
        for (name, p) in &problems {
            let (o, _) = forward(p, Some(&s0), &cu);
            let op = forward_parallel(p, Some(&s0), &cu);
            assert_close(&format!("{name} K={dk} V={dv}"), &o.data, &op.data, TOL);
        }
    }
}

#[test]
fn gate_conventions_match_fla() {
    assert!((mixers::retnet_log_gamma(0) - (1.0f64 - 1.0 / 32.0).ln()).abs() < 1e-15);
    assert!((mixers::retnet_log_gamma(3) - (1.0f64 - 1.0 / 256.0).ln()).abs() < 1e-15);
    assert!((mixers::gla_log_gate(0.0) - 0.5f64.ln() / 16.0).abs() < 1e-15);
    assert!((mixers::gdn_log_gate(0.0, 0.0, 0.0) + 2f64.ln()).abs() < 1e-15);
    assert!((mixers::gdn_log_gate(30.0, 1.0, 0.0) + 30.0 * 1f64.exp()).abs() < 1e-12, "softplus is linear above 20");
    assert!((mixers::lower_bound_log_gate(0.0, 0.5) - 0.75f64.ln()).abs() < 1e-15);
    assert!((mixers::lower_bound_log_gate(1.3, 0.0) - ops::logsigmoid(1.3)).abs() < 1e-15);
    assert!(ops::logsigmoid(-800.0).is_finite() && ops::sigmoid(-800.0) == 0.0 && ops::sigmoid(800.0) == 1.0);
}

#[test]
fn hgrn_equals_the_generic_recurrence_with_unit_dims() {
    let mut rng = Rng::new(3);
    for t in SIZES_T {
        let c = 5;
        let (i, f) = (rng.t3_normal(t, 1, c), rng.t3_normal(t, 1, c));
        let lb = rng.vec(c, 0.0, 0.9);
        let h0 = vec![rng.normals(c)];
        let (o, hn) = mixers::hgrn(&i, &f, Some(&lb), Some(&h0), &[0, t]);
        // Each channel as a head with K = V = 1: q = 1, k = 1 − α, v = silu(i), g = log α.
        let p = Prepared {
            q: T3::from_fn(t, c, 1, |_, _, _| 1.0),
            k: T3::from_fn(t, c, 1, |ti, ch, _| 1.0 - (lb[ch] + (1.0 - lb[ch]) * ops::sigmoid(f.get(ti, 0, ch)))),
            v: T3::from_fn(t, c, 1, |ti, ch, _| ops::silu(i.get(ti, 0, ch))),
            gate: GateT3::Scalar(T3::from_fn(t, c, 1, |ti, ch, _| mixers::lower_bound_log_gate(f.get(ti, 0, ch), lb[ch]))),
            beta: None,
            scale: 1.0,
        };
        let s0: Vec<Vec<f64>> = h0[0].iter().map(|x| vec![*x]).collect();
        let (og, sg) = forward(&p, Some(&s0), &[0, t]);
        assert_close(&format!("hgrn T={t}"), &o.data, &og.data, TOL);
        assert_close(&format!("hgrn final T={t}"), &hn[0], &sg.concat(), TOL);
    }
}

#[test]
fn gated_deltanet_with_zero_log_gate_equals_deltanet() {
    let mut rng = Rng::new(4);
    for t in SIZES_T {
        for (dk, dv) in SIZES_KV {
            let h = 2;
            let (q, k, v) = (rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dv));
            let (a, b) = (rng.t3_normal(t, h, 1), rng.t3_normal(t, h, 1));
            let s0 = random_states(&mut rng, h, dk * dv);
            // exp(−∞) = 0, so log α = −0 · softplus(…) = 0 exactly.
            let gdn = mixers::gated_deltanet(&q, &k, &v, &a, &b, &[f64::NEG_INFINITY; 2], &[0.3, -0.2]);
            let dn = mixers::deltanet(&q, &k, &v, &b);
            let (o1, s1) = forward(&gdn, Some(&s0), &[0, t]);
            let (o2, s2) = forward(&dn, Some(&s0), &[0, t]);
            assert_close(&format!("T={t} K={dk} V={dv}"), &o1.data, &o2.data, TOL);
            assert_close("final state", &s1.concat(), &s2.concat(), TOL);
        }
    }
}

#[test]
fn beta_zero_in_the_delta_rule_only_decays_the_state() {
    let mut rng = Rng::new(5);
    for t in SIZES_T {
        let (dk, dv) = (5, 3);
        let q = rng.normals(t * dk);
        let k = ops::l2_norm(&rng.normals(t * dk), 1e-6);
        let v = rng.normals(t * dv);
        let g = rng.vec(t, -0.3, 0.0);
        let beta = vec![0.0; t];
        let s0 = rng.normals(dk * dv);
        let x = HeadSeq { q: &q, k: &k, v: &v, gate: Gate::Scalar(&g), beta: Some(&beta), dk, dv, scale: 0.7 };
        let (o, st) = linear::recurrent(&x, Some(&s0));
        let mut lam = 0.0;
        let mut expect = Vec::new();
        for ti in 0..t {
            lam += g[ti];
            for j in 0..dv {
                expect.push(0.7 * lam.exp() * (0..dk).map(|i| q[ti * dk + i] * s0[i * dv + j]).sum::<f64>());
            }
        }
        assert_close(&format!("outputs T={t}"), &o, &expect, TOL);
        let decayed: Vec<f64> = s0.iter().map(|s| s * lam.exp()).collect();
        assert_close(&format!("state T={t}"), &st, &decayed, TOL);
    }
}

#[test]
fn decode_steps_equal_the_forward_for_the_generic_classes() {
    let mut rng = Rng::new(6);
    for t in SIZES_T {
        for (dk, dv) in SIZES_KV {
            for kind in KINDS {
                for delta in [false, true] {
                    let p = random_problem(&mut rng, t, 2, dk, dv, kind, delta);
                    let s0 = random_states(&mut rng, 2, dk * dv);
                    let (o, sf) = forward(&p, Some(&s0), &[0, t]);
                    let mut st = s0.clone();
                    let od = decode_all(|i| slice(&p, i, i + 1), t, &mut st);
                    let what = format!("T={t} K={dk} V={dv} {kind:?} delta={delta}");
                    assert_close(&what, &od.data, &o.data, TOL);
                    assert_close(&what, &st.concat(), &sf.concat(), TOL);
                }
            }
        }
    }
}

#[test]
fn decode_steps_equal_the_forward_for_each_mixer() {
    let mut rng = Rng::new(7);
    let (t, h, dk, dv) = (65, 2, 6, 5);
    let (q, k, v) = (rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dk), rng.t3_normal(t, h, dv));
    let (gk, a, b) = (rng.t3_normal(t, h, dk), rng.t3_normal(t, h, 1), rng.t3_normal(t, h, 1));
    let lb = rng.vec(h * dk, 0.0, 0.9);
    let (a_log, dt_bias) = (rng.vec(h, -1.0, 1.0), rng.vec(h, -1.0, 1.0));
    let s0 = random_states(&mut rng, h, dk * dv);
    let s = |x: &T3, i: usize| x.slice_t(i, i + 1);
    type Build<'a> = Box<dyn Fn(usize) -> Prepared + 'a>;
    let mixers: Vec<(&str, Prepared, Build)> = vec![
        ("retnet", mixers::retnet(&q, &k, &v, &positions(&[0, t])), Box::new(|i| mixers::retnet(&s(&q, i), &s(&k, i), &s(&v, i), &[i]))),
        ("gla", mixers::gla(&q, &k, &v, &gk), Box::new(|i| mixers::gla(&s(&q, i), &s(&k, i), &s(&v, i), &s(&gk, i)))),
        ("hgrn2", mixers::hgrn2(&q, &gk, &v, Some(&lb)), Box::new(|i| mixers::hgrn2(&s(&q, i), &s(&gk, i), &s(&v, i), Some(&lb)))),
        ("deltanet", mixers::deltanet(&q, &k, &v, &b), Box::new(|i| mixers::deltanet(&s(&q, i), &s(&k, i), &s(&v, i), &s(&b, i)))),
        (
            "gdn",
            mixers::gated_deltanet(&q, &k, &v, &a, &b, &a_log, &dt_bias),
            Box::new(|i| mixers::gated_deltanet(&s(&q, i), &s(&k, i), &s(&v, i), &s(&a, i), &s(&b, i), &a_log, &dt_bias)),
        ),
    ];
    for (name, full, at) in &mixers {
        let (o, sf) = forward(full, Some(&s0), &[0, t]);
        let mut st = s0.clone();
        let od = decode_all(at, t, &mut st);
        assert_close(name, &od.data, &o.data, TOL);
        assert_close(name, &st.concat(), &sf.concat(), TOL);
    }

    // HGRN's elementwise scan.
    let (i_in, f_in) = (rng.t3_normal(t, h, dv), rng.t3_normal(t, h, dv));
    let lb = rng.vec(h * dv, 0.0, 0.9);
    let h0 = vec![rng.normals(h * dv)];
    let (o, hn) = mixers::hgrn(&i_in, &f_in, Some(&lb), Some(&h0), &[0, t]);
    let mut hs = h0[0].clone();
    let parts: Vec<T3> = (0..t).map(|i| mixers::hgrn_step(&s(&i_in, i), &s(&f_in, i), Some(&lb), &mut hs)).collect();
    assert_close("hgrn", &T3::concat_t(&parts).data, &o.data, TOL);
    assert_close("hgrn state", &hs, &hn[0], TOL);
}

#[test]
fn packed_sequences_equal_separate_sequences() {
    let mut rng = Rng::new(8);
    let lens = [3, 1, 65, 50];
    let cu: Vec<usize> = std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, l| {
            *acc += l;
            Some(*acc)
        }))
        .collect();
    let t = cu[lens.len()];
    let (h, dk, dv) = (2, 5, 3);
    for kind in KINDS {
        for delta in [false, true] {
            let p = random_problem(&mut rng, t, h, dk, dv, kind, delta);
            let s0 = random_states(&mut rng, lens.len() * h, dk * dv);
            let (o, sf) = forward(&p, Some(&s0), &cu);
            for (n, w) in cu.windows(2).enumerate() {
                let (os, ss) = forward(&slice(&p, w[0], w[1]), Some(&s0[n * h..(n + 1) * h]), &[0, w[1] - w[0]]);
                let what = format!("{kind:?} delta={delta} seq {n}");
                assert_close(&what, &o.slice_t(w[0], w[1]).data, &os.data, TOL);
                assert_close(&what, &sf[n * h..(n + 1) * h].concat(), &ss.concat(), TOL);
            }
        }
    }

    // RetNet: RoPE positions restart at every sequence.
    let (q, k, v) = (rng.t3_normal(t, h, 4), rng.t3_normal(t, h, 4), rng.t3_normal(t, h, dv));
    let (o, _) = forward(&mixers::retnet(&q, &k, &v, &positions(&cu)), None, &cu);
    for w in cu.windows(2) {
        let sl = |x: &T3| x.slice_t(w[0], w[1]);
        let (os, _) = forward(&mixers::retnet(&sl(&q), &sl(&k), &sl(&v), &positions(&[0, w[1] - w[0]])), None, &[0, w[1] - w[0]]);
        assert_close("retnet", &o.slice_t(w[0], w[1]).data, &os.data, TOL);
    }

    // HGRN, attention and the short convolution.
    let (i_in, f_in) = (rng.t3_normal(t, h, dv), rng.t3_normal(t, h, dv));
    let h0 = random_states(&mut rng, lens.len(), h * dv);
    let (oh, hn) = mixers::hgrn(&i_in, &f_in, None, Some(&h0), &cu);
    let opts = AttnOpts { window: Some(7), rope_theta: Some(10000.0) };
    let kv = rng.t3_normal(t, 1, 4);
    let oa = attention(&q, &kv, &kv, opts, &cu);
    let weight = rng.normals(h * dv * 4);
    let bias = rng.normals(h * dv);
    let conv = ShortConv { weight: &weight, bias: Some(&bias), width: 4, silu: true };
    let cs0 = random_states(&mut rng, lens.len(), h * dv * 4);
    let (oc, cs) = ops::short_conv(&i_in, &conv, Some(&cs0), &cu);
    for (n, w) in cu.windows(2).enumerate() {
        let (a, b) = (w[0], w[1]);
        let one = [0, b - a];
        let (ohs, hns) = mixers::hgrn(&i_in.slice_t(a, b), &f_in.slice_t(a, b), None, Some(&h0[n..=n]), &one);
        assert_close("hgrn", &oh.slice_t(a, b).data, &ohs.data, TOL);
        assert_close("hgrn state", &hn[n], &hns[0], TOL);
        let oas = attention(&q.slice_t(a, b), &kv.slice_t(a, b), &kv.slice_t(a, b), opts, &one);
        assert_close("attention", &oa.slice_t(a, b).data, &oas.data, TOL);
        let (ocs, css) = ops::short_conv(&i_in.slice_t(a, b), &conv, Some(&cs0[n..=n]), &one);
        assert_close("conv", &oc.slice_t(a, b).data, &ocs.data, TOL);
        assert_close("conv state", &cs[n], &css[0], TOL);
    }
}

#[test]
fn attention_window_covering_the_sequence_equals_no_window() {
    let mut rng = Rng::new(9);
    for t in SIZES_T {
        let (q, k, v) = (rng.t3_normal(t, 4, 6), rng.t3_normal(t, 2, 6), rng.t3_normal(t, 2, 5));
        let full = attention(&q, &k, &v, AttnOpts { window: None, rope_theta: Some(10000.0) }, &[0, t]);
        for w in [t, t + 1, 1000] {
            let win = attention(&q, &k, &v, AttnOpts { window: Some(w), rope_theta: Some(10000.0) }, &[0, t]);
            assert_close(&format!("T={t} w={w}"), &win.data, &full.data, TOL);
        }
        // Window 1: every query sees only itself, so o_i = v_i of its kv head.
        let one = attention(&q, &k, &v, AttnOpts { window: Some(1), rope_theta: None }, &[0, t]);
        assert_close(&format!("T={t} w=1"), &one.data, &repeat_kv(&v, 2).data, TOL);
    }
}

#[test]
fn gqa_equals_repeating_the_kv_heads() {
    let mut rng = Rng::new(10);
    for t in SIZES_T {
        for (hkv, groups) in [(1, 3), (2, 2), (3, 1)] {
            let h = hkv * groups;
            let (q, k, v) = (rng.t3_normal(t, h, 8), rng.t3_normal(t, hkv, 8), rng.t3_normal(t, hkv, 3));
            for opts in [AttnOpts::default(), AttnOpts { window: Some(5), rope_theta: Some(500.0) }] {
                let gqa = attention(&q, &k, &v, opts, &[0, t]);
                let mha = attention(&q, &repeat_kv(&k, groups), &repeat_kv(&v, groups), opts, &[0, t]);
                assert_close(&format!("T={t} Hkv={hkv} groups={groups}"), &gqa.data, &mha.data, TOL);
            }
        }
    }
}

#[test]
fn attention_decode_over_a_kv_cache_equals_the_forward() {
    let mut rng = Rng::new(11);
    for t in SIZES_T {
        let (q, k, v) = (rng.t3_normal(t, 4, 6), rng.t3_normal(t, 2, 6), rng.t3_normal(t, 2, 5));
        for opts in [AttnOpts::default(), AttnOpts { window: Some(4), rope_theta: Some(10000.0) }] {
            let full = attention(&q, &k, &v, opts, &[0, t]);
            let mut cache = KvCache::default();
            let parts: Vec<T3> = (0..t)
                .map(|i| attention_step(&q.slice_t(i, i + 1), &k.slice_t(i, i + 1), &v.slice_t(i, i + 1), opts, &mut cache))
                .collect();
            assert_eq!(cache.len(), t);
            assert_close(&format!("T={t} {opts:?}"), &T3::concat_t(&parts).data, &full.data, TOL);
        }
    }
}

#[test]
fn short_convolution_shifts_decodes_and_restarts() {
    let mut rng = Rng::new(12);
    let (t, h, d, w) = (50, 2, 3, 4);
    let c = h * d;
    let x = rng.t3_normal(t, h, d);
    // One-hot weights: w_3 = 1 is the identity, w_0 = 1 a delay of 3 tokens with zero history.
    for tap in 0..w {
        let weight: Vec<f64> = (0..c * w).map(|n| if n % w == tap { 1.0 } else { 0.0 }).collect();
        let conv = ShortConv { weight: &weight, bias: None, width: w, silu: false };
        let (y, _) = ops::short_conv(&x, &conv, None, &[0, t]);
        let delay = w - 1 - tap;
        let expect: Vec<f64> = (0..t * c).map(|n| if n / c >= delay { x.data[n - delay * c] } else { 0.0 }).collect();
        assert_close(&format!("tap {tap}"), &y.data, &expect, 0.0);
    }
    // Decode equals the forward, starting from a prefilled cache.
    let weight = rng.normals(c * w);
    let bias = rng.normals(c);
    let conv = ShortConv { weight: &weight, bias: Some(&bias), width: w, silu: true };
    let (y, st) = ops::short_conv(&x, &conv, None, &[0, t]);
    let (y1, st1) = ops::short_conv(&x.slice_t(0, 20), &conv, None, &[0, 20]);
    let mut state = st1[0].clone();
    let parts: Vec<T3> = (20..t).map(|i| ops::short_conv_step(&x.slice_t(i, i + 1), &conv, &mut state)).collect();
    let decoded = T3::concat_t(&[y1, T3::concat_t(&parts)]);
    assert_close("conv decode", &decoded.data, &y.data, TOL);
    assert_close("conv state", &state, &st[0], TOL);
    // Prefill in two halves through the initial state equals one pass.
    let (y2, _) = ops::short_conv(&x.slice_t(20, t), &conv, Some(&st1), &[0, t - 20]);
    assert_close("conv prefill", &y2.data, &y.slice_t(20, t).data, TOL);
}

#[test]
fn norms_and_rope() {
    let mut rng = Rng::new(13);
    let x = rng.normals(7);
    let y = ops::l2_norm(&x, 0.0);
    assert!((y.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-14);
    let w = rng.normals(7);
    let r = ops::rms_norm(&x, &[1.0; 7], 0.0);
    assert!((r.iter().map(|v| v * v).sum::<f64>() / 7.0 - 1.0).abs() < 1e-14);
    let g = rng.normals(7);
    let gated = ops::rms_norm_gated(&x, &g, &w, 1e-5);
    let plain = ops::rms_norm(&x, &w, 1e-5);
    for i in 0..7 {
        assert!((gated[i] - plain[i] * g[i] / (1.0 + (-g[i]).exp())).abs() < 1e-14);
    }
    // RoPE is a rotation, position 0 is the identity, and scores depend only on m − n.
    let (q, k) = (rng.normals(8), rng.normals(8));
    assert_close("rope at 0", &ops::rope(&q, 0, 10000.0), &q, 0.0);
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert!((norm(&ops::rope(&q, 37, 10000.0)) - norm(&q)).abs() < 1e-13);
    let score = |m: usize, n: usize| -> f64 { ops::rope(&q, m, 10000.0).iter().zip(ops::rope(&k, n, 10000.0)).map(|(a, b)| a * b).sum() };
    assert!((score(10, 3) - score(107, 100)).abs() < 1e-12);
    // Non-interleaved: the first pair is (x_0, x_{D/2}), rotated by pos · θ⁰ = pos radians.
    let e0 = [1.0, 0.0, 0.0, 0.0];
    let r0 = ops::rope(&e0, 1, 10000.0);
    assert_close("rope pair", &r0, &[1f64.cos(), 0.0, 1f64.sin(), 0.0], 1e-15);
}

/// Flattens a generic problem's inputs into one parameter vector so that central differences can
/// perturb any of them; returns (q, k, v, g, β, s0) slices of `theta` via offsets.
struct Layout {
    t: usize,
    dk: usize,
    dv: usize,
    kind: Kind,
    delta: bool,
}

impl Layout {
    fn glen(&self) -> usize {
        match self.kind {
            Kind::None => 0,
            Kind::Scalar => self.t,
            Kind::Vector => self.t * self.dk,
        }
    }

    fn sizes(&self) -> [usize; 6] {
        let (t, dk, dv) = (self.t, self.dk, self.dv);
        [t * dk, t * dk, t * dv, self.glen(), if self.delta { t } else { 0 }, dk * dv]
    }

    fn parts<'a>(&self, theta: &'a [f64]) -> Vec<&'a [f64]> {
        let mut out = Vec::new();
        let mut at = 0;
        for n in self.sizes() {
            out.push(&theta[at..at + n]);
            at += n;
        }
        out
    }

    fn seq<'a>(&self, p: &[&'a [f64]]) -> HeadSeq<'a> {
        let gate = match self.kind {
            Kind::None => Gate::None,
            Kind::Scalar => Gate::Scalar(p[3]),
            Kind::Vector => Gate::Vector(p[3]),
        };
        HeadSeq { q: p[0], k: p[1], v: p[2], gate, beta: self.delta.then_some(p[4]), dk: self.dk, dv: self.dv, scale: 0.6 }
    }
}

#[test]
fn analytic_gradients_equal_central_differences() {
    let mut rng = Rng::new(14);
    for (t, dk, dv) in [(1, 3, 2), (3, 3, 5), (7, 5, 3)] {
        for kind in KINDS {
            for delta in [false, true] {
                let lay = Layout { t, dk, dv, kind, delta };
                let [nq, nk, nv, ng, nb, ns] = lay.sizes();
                let mut theta = Vec::new();
                theta.extend(rng.normals(nq));
                // Keys of norm about 1 keep the delta rule contracting; the gradient is checked
                // with respect to the raw keys, so no normalisation appears in the derivative.
                theta.extend(rng.normals(nk).into_iter().map(|x| x / (dk as f64).sqrt()));
                theta.extend(rng.normals(nv));
                theta.extend(rng.vec(ng, -0.6, -0.01));
                theta.extend(rng.vec(nb, 0.1, 0.9));
                theta.extend(rng.normals(ns));
                let w_o = rng.normals(t * dv);
                let w_s = rng.normals(dk * dv);
                let loss = |th: &[f64]| {
                    let p = lay.parts(th);
                    let (o, s) = linear::recurrent(&lay.seq(&p), Some(p[5]));
                    weighted_sum(&w_o, &o) + weighted_sum(&w_s, &s)
                };
                let num = numeric_grad(loss, &theta, 1e-5);
                let p = lay.parts(&theta);
                let gr = linear::recurrent_backward(&lay.seq(&p), Some(p[5]), &w_o, Some(&w_s));
                let mut ana = Vec::new();
                ana.extend(&gr.dq);
                ana.extend(&gr.dk);
                ana.extend(&gr.dv);
                ana.extend(gr.dg.clone().unwrap_or_default());
                ana.extend(gr.dbeta.clone().unwrap_or_default());
                ana.extend(&gr.ds0);
                assert_eq!(ana.len(), theta.len());
                let names = ["dq", "dk", "dv", "dg", "dbeta", "ds0"];
                let (na, nn) = (lay.parts(&ana), lay.parts(&num));
                for (i, name) in names.iter().enumerate() {
                    if !nn[i].is_empty() {
                        assert_close(&format!("{name} T={t} K={dk} V={dv} {kind:?} delta={delta}"), na[i], nn[i], 1e-6);
                    }
                }
                // Without dS_T the backward still matches (only the output term of the loss).
                let loss_o = |th: &[f64]| {
                    let p = lay.parts(th);
                    weighted_sum(&w_o, &linear::recurrent(&lay.seq(&p), Some(p[5])).0)
                };
                let num_o = numeric_grad(loss_o, &theta, 1e-5);
                let g_o = linear::recurrent_backward(&lay.seq(&p), Some(p[5]), &w_o, None);
                assert_close("dq without dS_T", &g_o.dq, lay.parts(&num_o)[0], 1e-6);
                assert_close("ds0 without dS_T", &g_o.ds0, lay.parts(&num_o)[5], 1e-6);
            }
        }
    }
}

#[test]
fn extreme_gates_stay_finite() {
    let mut rng = Rng::new(15);
    let (t, h, dk, dv) = (2000, 1, 8, 8);
    for kind in KINDS {
        for beta in [None, Some(0.0), Some(1.0)] {
            let mut p = random_problem(&mut rng, t, h, dk, dv, kind, beta.is_some());
            p.gate = match kind {
                Kind::None => GateT3::None,
                Kind::Scalar => GateT3::Scalar(T3::from_fn(t, h, 1, |_, _, _| -30.0)),
                Kind::Vector => GateT3::Vector(T3::from_fn(t, h, dk, |_, _, _| -30.0)),
            };
            p.beta = beta.map(|b| T3::from_fn(t, h, 1, |_, _, _| b));
            let s0 = random_states(&mut rng, h, dk * dv);
            let (o, s) = forward(&p, Some(&s0), &[0, t]);
            let what = format!("{kind:?} beta={beta:?}");
            assert_finite(&what, &o.data);
            assert_finite(&what, &s.concat());
            let mut st = s0.clone();
            let od = decode_all(|i| slice(&p, i, i + 1), t, &mut st);
            assert_close(&what, &od.data, &o.data, 1e-12);
            if beta.is_none() {
                let op = forward_parallel(&p, Some(&s0), &[0, t]);
                assert_finite(&what, &op.data);
                assert_close(&what, &op.data, &o.data, 1e-12);
            }
        }
    }
    // The same extremes through the mixers' own gates: GDN with a huge decay, GLA with very
    // negative gate logits, HGRN with saturated forget gates.
    let (q, k, v) = (rng.t3_normal(t, 2, dk), rng.t3_normal(t, 2, dk), rng.t3_normal(t, 2, dv));
    let a = T3::from_fn(t, 2, 1, |_, _, _| 50.0);
    let b = T3::from_fn(t, 2, 1, |ti, _, _| if ti % 2 == 0 { 40.0 } else { -40.0 });
    let (o, _) = forward(&mixers::gated_deltanet(&q, &k, &v, &a, &b, &[3.0, 0.0], &[0.0, 0.0]), None, &[0, t]);
    assert_finite("gdn", &o.data);
    let (o, _) = forward(&mixers::gla(&q, &k, &v, &q.map(|x| x * 1000.0)), None, &[0, t]);
    assert_finite("gla", &o.data);
    let (o, _) = mixers::hgrn(&q, &k.map(|x| x * 1000.0), None, None, &[0, t]);
    assert_finite("hgrn", &o.data);
}
