//! The six linear mixers as thin wrappers over the generic recurrence: each takes fla's raw
//! per-token quantities (projections before activation), applies fla's gate conventions and
//! returns a [`Prepared`] problem for [`linear::forward`], [`linear::forward_parallel`] or
//! [`linear::forward_step`]. HGRN, whose state is elementwise, has its own scan.
//!
//! The output norms and projections around each mixer are not applied here (see `ops`).

use super::linear::{self, GateT3, Prepared};
use super::ops::{l2_norm_t3, logaddexp, logsigmoid, rope_t3, sigmoid, silu, softplus};
use super::tensor::{seq_ranges, T3};

/// fla's GLA gate_logit_normalizer.
pub const GLA_GATE_NORMALIZER: f64 = 16.0;

/// RoPE base of RetNet's rotary embedding.
pub const RETNET_ROPE_THETA: f64 = 10000.0;

/// RetNet's fixed log-decay of head h: ln(1 − 2^(−5−h)).
pub fn retnet_log_gamma(h: usize) -> f64 {
    (-(2f64.powi(-5 - h as i32))).ln_1p()
}

/// GLA's log-gate: logsigmoid(x) / 16.
pub fn gla_log_gate(x: f64) -> f64 {
    logsigmoid(x) / GLA_GATE_NORMALIZER
}

/// GatedDeltaNet's log-gate: −exp(A_log) · softplus(a + dt_bias).
pub fn gdn_log_gate(a: f64, a_log: f64, dt_bias: f64) -> f64 {
    -a_log.exp() * softplus(a + dt_bias)
}

/// The HGRN/HGRN2 log forget gate with lower bound lb: log(lb + (1 − lb) σ(f)), computed as
/// logaddexp(log lb, log1p(−lb) + logsigmoid(f)); lb = 0 (no bound, layer 0) gives logsigmoid(f).
pub fn lower_bound_log_gate(f: f64, lb: f64) -> f64 {
    logaddexp(lb.ln(), (-lb).ln_1p() + logsigmoid(f))
}

fn default_scale(dk: usize) -> f64 {
    1.0 / (dk as f64).sqrt()
}

/// RetNet: S_t = γ_h S_{t−1} + k_t v_tᵀ with RoPE (base 10000, non-interleaved, over K) on q and
/// k. `positions[t]` is token t's position in its sequence ([`super::positions`] of cu_seqlens;
/// `[pos]` for decode).
pub fn retnet(q: &T3, k: &T3, v: &T3, positions: &[usize]) -> Prepared {
    let g = T3::from_fn(q.t, q.h, 1, |_, h, _| retnet_log_gamma(h));
    Prepared {
        q: rope_t3(q, positions, RETNET_ROPE_THETA),
        k: rope_t3(k, positions, RETNET_ROPE_THETA),
        v: v.clone(),
        gate: GateT3::Scalar(g),
        beta: None,
        scale: default_scale(q.d),
    }
}

/// GLA: S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ with log α = logsigmoid(gk)/16; `gk` is [T, H, K].
pub fn gla(q: &T3, k: &T3, v: &T3, gk: &T3) -> Prepared {
    Prepared { q: q.clone(), k: k.clone(), v: v.clone(), gate: GateT3::Vector(gk.map(gla_log_gate)), beta: None, scale: default_scale(q.d) }
}

/// HGRN2: GLA with log α = log(lb + (1 − lb) σ(f)), k = 1 − α, q = silu(q), v = i and scale
/// K^(−1/2). `f` is [T, H, K]; `lb` is per forget channel (length H·K) or None (layer 0).
pub fn hgrn2(q: &T3, f: &T3, i: &T3, lb: Option<&[f64]>) -> Prepared {
    let g = T3::from_fn(f.t, f.h, f.d, |t, h, c| lower_bound_log_gate(f.get(t, h, c), lb.map_or(0.0, |l| l[h * f.d + c])));
    Prepared { q: q.map(silu), k: g.map(|x| 1.0 - x.exp()), v: i.clone(), gate: GateT3::Vector(g), beta: None, scale: default_scale(q.d) }
}

/// DeltaNet: S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ with β = σ(b) (`b` is [T, H, 1])
/// and L2-normalised q, k.
pub fn deltanet(q: &T3, k: &T3, v: &T3, b: &T3) -> Prepared {
    Prepared { q: l2_norm_t3(q), k: l2_norm_t3(k), v: v.clone(), gate: GateT3::None, beta: Some(b.map(sigmoid)), scale: default_scale(q.d) }
}

/// GatedDeltaNet: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ with
/// log α = −exp(A_log_h)·softplus(a + dt_bias_h), β = σ(b), L2-normalised q, k; `a` and `b` are
/// [T, H, 1], `a_log` and `dt_bias` per head.
pub fn gated_deltanet(q: &T3, k: &T3, v: &T3, a: &T3, b: &T3, a_log: &[f64], dt_bias: &[f64]) -> Prepared {
    let g = T3::from_fn(a.t, a.h, 1, |t, h, _| gdn_log_gate(a.get(t, h, 0), a_log[h], dt_bias[h]));
    Prepared {
        q: l2_norm_t3(q),
        k: l2_norm_t3(k),
        v: v.clone(),
        gate: GateT3::Scalar(g),
        beta: Some(b.map(sigmoid)),
        scale: default_scale(q.d),
    }
}

/// The forget gate α and input x = (1 − α) ⊙ silu(i) of HGRN for one channel.
fn hgrn_gate(i: f64, f: f64, lb: f64) -> (f64, f64) {
    let alpha = lb + (1.0 - lb) * sigmoid(f);
    (alpha, (1.0 - alpha) * silu(i))
}

/// HGRN: h_t = α_t ⊙ h_{t−1} + (1 − α_t) ⊙ silu(i_t), α = lb + (1 − lb) σ(f), o_t = h_t, every
/// channel independent. `i` and `f` are [T, H, D] (all H·D values are channels), `lb` has one
/// value per channel or is None, `h0` and the returned final states are per sequence (H·D each).
pub fn hgrn(i: &T3, f: &T3, lb: Option<&[f64]>, h0: Option<&[Vec<f64>]>, cu_seqlens: &[usize]) -> (T3, Vec<Vec<f64>>) {
    let c_count = i.h * i.d;
    let mut o = T3::zeros(i.t, i.h, i.d);
    let mut finals = Vec::new();
    for (n, (a, b)) in seq_ranges(cu_seqlens).into_iter().enumerate() {
        let mut h = h0.map_or_else(|| vec![0.0; c_count], |s| s[n].clone());
        for t in a..b {
            for c in 0..c_count {
                let (alpha, x) = hgrn_gate(i.row(t)[c], f.row(t)[c], lb.map_or(0.0, |l| l[c]));
                h[c] = alpha * h[c] + x;
                o.data[t * c_count + c] = h[c];
            }
        }
        finals.push(h);
    }
    (o, finals)
}

/// One HGRN decode step for one token (`i.t == 1`), updating `h` (H·D channels) in place.
pub fn hgrn_step(i: &T3, f: &T3, lb: Option<&[f64]>, h: &mut [f64]) -> T3 {
    assert_eq!(i.t, 1, "hgrn_step: one token");
    let mut o = T3::zeros(1, i.h, i.d);
    for (c, hc) in h.iter_mut().enumerate() {
        let (alpha, x) = hgrn_gate(i.data[c], f.data[c], lb.map_or(0.0, |l| l[c]));
        *hc = alpha * *hc + x;
        o.data[c] = *hc;
    }
    o
}

/// Convenience: run a prepared problem sequentially (see [`linear::forward`]).
pub fn run(p: &Prepared, s0: Option<&[Vec<f64>]>, cu_seqlens: &[usize]) -> (T3, Vec<Vec<f64>>) {
    linear::forward(p, s0, cu_seqlens)
}
