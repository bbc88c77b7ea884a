//! The generic linear recurrence that all six linear mixers belong to, per (sequence, head):
//!
//! S_t = Diag(a_t) (I − β_t k_t k_tᵀ)^δ S_{t−1} + β_t^δ k_t v_tᵀ,   o_t = scale · S_tᵀ q_t
//!
//! with the decay a_t = exp(g_t) given as a log-gate g_t that is absent, a scalar or a K-vector,
//! and the delta rule δ on exactly when β is given. Provided: the sequential forward (token by
//! token), an independent quadratic "parallel" form for the non-delta classes, a single-pass
//! decode step (algorithms.md §4, reading only the old state), reverse-mode backward, and the
//! multi-head / packed-sequence drivers over [`T3`] tensors.
//!
//! A state is row-major [K, V]: `s[i * V + j]`.

use super::tensor::{seq_ranges, T3};

/// The per-token log-decay of one (sequence, head).
#[derive(Clone, Copy, Debug)]
pub enum Gate<'a> {
    /// No decay (a_t = 1).
    None,
    /// One log-gate per token: [T].
    Scalar(&'a [f64]),
    /// A log-gate per token and key channel: row-major [T, K].
    Vector(&'a [f64]),
}

impl Gate<'_> {
    /// log a_t for key channel `i` (K = `dk`).
    pub fn log_alpha(&self, t: usize, i: usize, dk: usize) -> f64 {
        match self {
            Gate::None => 0.0,
            Gate::Scalar(g) => g[t],
            Gate::Vector(g) => g[t * dk + i],
        }
    }
}

/// The inputs of one (sequence, head): row-major [T, K] q and k, [T, V] v, the gate and an
/// optional β ([T]; present ⇔ delta rule).
#[derive(Clone, Copy, Debug)]
pub struct HeadSeq<'a> {
    /// Queries, [T, K].
    pub q: &'a [f64],
    /// Keys, [T, K].
    pub k: &'a [f64],
    /// Values, [T, V].
    pub v: &'a [f64],
    /// Log-decay.
    pub gate: Gate<'a>,
    /// Delta-rule strengths, [T]; `None` turns the delta rule off (and β^δ = 1).
    pub beta: Option<&'a [f64]>,
    /// Key dimension K.
    pub dk: usize,
    /// Value dimension V.
    pub dv: usize,
    /// Output scale (fla default K^(−1/2)).
    pub scale: f64,
}

impl HeadSeq<'_> {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.q.len() / self.dk.max(1)
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self) {
        let t = self.len();
        assert_eq!(self.q.len(), t * self.dk, "q is not [T, K]");
        assert_eq!(self.k.len(), t * self.dk, "k is not [T, K]");
        assert_eq!(self.v.len(), t * self.dv, "v is not [T, V]");
        match self.gate {
            Gate::None => {}
            Gate::Scalar(g) => assert_eq!(g.len(), t, "scalar gate is not [T]"),
            Gate::Vector(g) => assert_eq!(g.len(), t * self.dk, "vector gate is not [T, K]"),
        }
        if let Some(b) = self.beta {
            assert_eq!(b.len(), t, "beta is not [T]");
        }
    }

    fn qt(&self, t: usize) -> &[f64] {
        &self.q[t * self.dk..(t + 1) * self.dk]
    }

    fn kt(&self, t: usize) -> &[f64] {
        &self.k[t * self.dk..(t + 1) * self.dk]
    }

    fn vt(&self, t: usize) -> &[f64] {
        &self.v[t * self.dv..(t + 1) * self.dv]
    }

    /// The decay vector a_t = exp(g_t) over the K channels.
    fn alpha(&self, t: usize) -> Vec<f64> {
        (0..self.dk).map(|i| self.gate.log_alpha(t, i, self.dk).exp()).collect()
    }
}

/// Sᵀx for a [K, V] state: a V-vector.
fn st_times(s: &[f64], x: &[f64], dv: usize) -> Vec<f64> {
    let mut out = vec![0.0; dv];
    for (i, xi) in x.iter().enumerate() {
        for j in 0..dv {
            out[j] += s[i * dv + j] * xi;
        }
    }
    out
}

/// S y for a [K, V] state: a K-vector.
fn s_times(s: &[f64], y: &[f64], dk: usize) -> Vec<f64> {
    (0..dk).map(|i| y.iter().enumerate().map(|(j, yj)| s[i * y.len() + j] * yj).sum()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// X_t = (I − β_t k_t k_tᵀ)^δ S_{t−1}: the state after the delta correction, before decay.
fn delta_part(x: &HeadSeq, t: usize, s_prev: &[f64]) -> Vec<f64> {
    let mut xm = s_prev.to_vec();
    if let Some(beta) = x.beta {
        let k = x.kt(t);
        let u = st_times(s_prev, k, x.dv);
        for i in 0..x.dk {
            for j in 0..x.dv {
                xm[i * x.dv + j] -= beta[t] * k[i] * u[j];
            }
        }
    }
    xm
}

/// One transition S_{t−1} → S_t straight from the equation.
fn transition(x: &HeadSeq, t: usize, s_prev: &[f64]) -> Vec<f64> {
    let mut s = delta_part(x, t, s_prev);
    let a = x.alpha(t);
    let bw = x.beta.map_or(1.0, |b| b[t]);
    let (k, v) = (x.kt(t), x.vt(t));
    for i in 0..x.dk {
        for j in 0..x.dv {
            s[i * x.dv + j] = a[i] * s[i * x.dv + j] + bw * k[i] * v[j];
        }
    }
    s
}

/// All states S_0 … S_T (S_0 = the initial state or zeros).
pub fn states(x: &HeadSeq, s0: Option<&[f64]>) -> Vec<Vec<f64>> {
    x.check();
    let mut all = vec![s0.map_or_else(|| vec![0.0; x.dk * x.dv], <[f64]>::to_vec)];
    assert_eq!(all[0].len(), x.dk * x.dv, "initial state is not [K, V]");
    for t in 0..x.len() {
        let next = transition(x, t, &all[t]);
        all.push(next);
    }
    all
}

/// Sequential forward: returns (o as [T, V], final state S_T as [K, V]).
pub fn recurrent(x: &HeadSeq, s0: Option<&[f64]>) -> (Vec<f64>, Vec<f64>) {
    let all = states(x, s0);
    let mut o = Vec::with_capacity(x.len() * x.dv);
    for t in 0..x.len() {
        o.extend(st_times(&all[t + 1], x.qt(t), x.dv).into_iter().map(|y| y * x.scale));
    }
    let last = all.into_iter().next_back().unwrap_or_default();
    (o, last)
}

/// The quadratic "parallel" form of the non-delta classes, computed independently of the
/// recurrence: with λ_t = Σ_{u≤t} g_u (per key channel),
/// o_t = scale · [ Σ_{s≤t} Σ_i q_ti k_si e^{λ_ti − λ_si} v_s + Σ_i q_ti e^{λ_ti} S_0[i, :] ].
/// Exponents are differences of cumulative sums, so long sequences with strong decay stay finite.
pub fn parallel(x: &HeadSeq, s0: Option<&[f64]>) -> Vec<f64> {
    x.check();
    assert!(x.beta.is_none(), "the parallel form covers only the non-delta classes");
    let (t_len, dk, dv) = (x.len(), x.dk, x.dv);
    let mut lam = vec![0.0; t_len * dk];
    for t in 0..t_len {
        for i in 0..dk {
            let prev = if t == 0 { 0.0 } else { lam[(t - 1) * dk + i] };
            lam[t * dk + i] = prev + x.gate.log_alpha(t, i, dk);
        }
    }
    let mut o = vec![0.0; t_len * dv];
    for t in 0..t_len {
        let q = x.qt(t);
        for s in 0..=t {
            let k = x.kt(s);
            let score: f64 = (0..dk).map(|i| q[i] * k[i] * (lam[t * dk + i] - lam[s * dk + i]).exp()).sum();
            for (j, vj) in x.vt(s).iter().enumerate() {
                o[t * dv + j] += x.scale * score * vj;
            }
        }
        if let Some(s0) = s0 {
            for i in 0..dk {
                let w = x.scale * q[i] * lam[t * dk + i].exp();
                for j in 0..dv {
                    o[t * dv + j] += w * s0[i * dv + j];
                }
            }
        }
    }
    o
}

/// One decode step for one head (algorithms.md §4): every reduction reads the old state, then
/// the state is updated in place. With a = e^g, u = Sᵀk, w = Sᵀ(a ⊙ q):
/// o = scale · (w − β u (k·(a⊙q)) + β^δ v (k·q)),  S ← Diag(a)(S − β k uᵀ) + β^δ k vᵀ.
/// `g` is `[]` (no decay), `[g]` (scalar) or a K-vector.
#[allow(clippy::too_many_arguments)]
pub fn step(s: &mut [f64], q: &[f64], k: &[f64], v: &[f64], g: &[f64], beta: Option<f64>, scale: f64) -> Vec<f64> {
    let (dk, dv) = (k.len(), v.len());
    assert_eq!(s.len(), dk * dv, "step: state is not [K, V]");
    let a: Vec<f64> = (0..dk)
        .map(|i| {
            if g.is_empty() {
                1.0
            } else if g.len() == 1 {
                g[0].exp()
            } else {
                g[i].exp()
            }
        })
        .collect();
    let aq: Vec<f64> = a.iter().zip(q).map(|(ai, qi)| ai * qi).collect();
    let u = st_times(s, k, dv);
    let w = st_times(s, &aq, dv);
    let (kaq, kq) = (dot(k, &aq), dot(k, q));
    let bd = beta.unwrap_or(0.0);
    let bw = beta.unwrap_or(1.0);
    let o = (0..dv).map(|j| scale * (w[j] - bd * u[j] * kaq + bw * v[j] * kq)).collect();
    for i in 0..dk {
        for j in 0..dv {
            s[i * dv + j] = a[i] * (s[i * dv + j] - bd * k[i] * u[j]) + bw * k[i] * v[j];
        }
    }
    o
}

/// Gradients of one head's inputs; `dg` has the gate's shape ([T] or [T, K]) and is `None`
/// without a gate, `dbeta` is `None` without the delta rule.
#[derive(Clone, Debug, Default)]
pub struct HeadGrads {
    /// ∂ℓ/∂q, [T, K].
    pub dq: Vec<f64>,
    /// ∂ℓ/∂k, [T, K].
    pub dk: Vec<f64>,
    /// ∂ℓ/∂v, [T, V].
    pub dv: Vec<f64>,
    /// ∂ℓ/∂g (the log-gate).
    pub dg: Option<Vec<f64>>,
    /// ∂ℓ/∂β, [T].
    pub dbeta: Option<Vec<f64>>,
    /// ∂ℓ/∂S_0, [K, V].
    pub ds0: Vec<f64>,
}

/// Reverse-mode backward of [`recurrent`] straight from the recurrence, given dO ([T, V]) and
/// dS_T ([K, V], zero when None). The running dS is the total gradient of the state after token
/// t; walking t backwards:
/// - o_t = s S_tᵀq_t: dS += s q_t doᵀ, dq_t = s S_t do_t;
/// - S_t = Diag(a) X + β k vᵀ, X = S_{t−1} − β k uᵀ, u = S_{t−1}ᵀk:
///   da_i = Σ_j dS_ij X_ij (dg = a ⊙ da), dβ = kᵀ dS v − kᵀ dX u, dv = β dSᵀk,
///   dk = β dS v − β (dX u + S_{t−1} dXᵀk), with dX = Diag(a) dS;
/// - dS_{t−1} = dX − β k (kᵀ dX).
pub fn recurrent_backward(x: &HeadSeq, s0: Option<&[f64]>, d_o: &[f64], d_st: Option<&[f64]>) -> HeadGrads {
    let all = states(x, s0);
    let (t_len, dk, dv, sc) = (x.len(), x.dk, x.dv, x.scale);
    assert_eq!(d_o.len(), t_len * dv, "dO is not [T, V]");
    let mut ds = d_st.map_or_else(|| vec![0.0; dk * dv], <[f64]>::to_vec);
    let mut g = HeadGrads {
        dq: vec![0.0; t_len * dk],
        dk: vec![0.0; t_len * dk],
        dv: vec![0.0; t_len * dv],
        dg: match x.gate {
            Gate::None => None,
            Gate::Scalar(_) => Some(vec![0.0; t_len]),
            Gate::Vector(_) => Some(vec![0.0; t_len * dk]),
        },
        dbeta: x.beta.map(|_| vec![0.0; t_len]),
        ds0: Vec::new(),
    };
    for t in (0..t_len).rev() {
        let (q, k, v) = (x.qt(t), x.kt(t), x.vt(t));
        let dot_t = &d_o[t * dv..(t + 1) * dv];
        // Output read of S_t.
        let dq = s_times(&all[t + 1], dot_t, dk);
        for i in 0..dk {
            g.dq[t * dk + i] = sc * dq[i];
            for j in 0..dv {
                ds[i * dv + j] += sc * q[i] * dot_t[j];
            }
        }
        // S_t = Diag(a) X + β^δ k vᵀ.
        let s_prev = &all[t];
        let xm = delta_part(x, t, s_prev);
        let a = x.alpha(t);
        let bw = x.beta.map_or(1.0, |b| b[t]);
        if let Some(dg) = g.dg.as_mut() {
            for i in 0..dk {
                let da: f64 = (0..dv).map(|j| ds[i * dv + j] * xm[i * dv + j]).sum();
                match x.gate {
                    Gate::Vector(_) => dg[t * dk + i] = a[i] * da,
                    _ => dg[t] += a[i] * da,
                }
            }
        }
        let ds_v = s_times(&ds, v, dk);
        let dst_k = st_times(&ds, k, dv);
        for i in 0..dk {
            g.dk[t * dk + i] = bw * ds_v[i];
        }
        for j in 0..dv {
            g.dv[t * dv + j] = bw * dst_k[j];
        }
        let mut dx: Vec<f64> = (0..dk * dv).map(|n| a[n / dv] * ds[n]).collect();
        if let (Some(beta), Some(db)) = (x.beta, g.dbeta.as_mut()) {
            let b = beta[t];
            let u = st_times(s_prev, k, dv);
            let dx_u = s_times(&dx, &u, dk);
            let dxt_k = st_times(&dx, k, dv);
            let s_dxt_k = s_times(s_prev, &dxt_k, dk);
            db[t] = dot(k, &ds_v) - dot(k, &dx_u);
            for i in 0..dk {
                g.dk[t * dk + i] -= b * (dx_u[i] + s_dxt_k[i]);
            }
            // dS_{t−1} = dX − β k (kᵀ dX).
            for i in 0..dk {
                for j in 0..dv {
                    dx[i * dv + j] -= b * k[i] * dxt_k[j];
                }
            }
        }
        ds = dx;
    }
    g.ds0 = ds;
    g
}

/// Owned per-token log-gates for all heads.
#[derive(Clone, Debug)]
pub enum GateT3 {
    /// No decay.
    None,
    /// [T, H, 1].
    Scalar(T3),
    /// [T, H, K].
    Vector(T3),
}

/// A multi-head, packed-sequence problem in the generic form: what every mixer wrapper in
/// `mixers` produces after applying its gate conventions.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Queries, [T, H, K].
    pub q: T3,
    /// Keys, [T, H, K].
    pub k: T3,
    /// Values, [T, H, V].
    pub v: T3,
    /// Log-decay.
    pub gate: GateT3,
    /// Delta-rule strengths, [T, H, 1]; None = no delta rule.
    pub beta: Option<T3>,
    /// Output scale.
    pub scale: f64,
}

/// Owned per-head copies of one (sequence, head) slice, so that [`HeadSeq`] can borrow them.
struct HeadData {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Option<Vec<f64>>,
    beta: Option<Vec<f64>>,
    vector: bool,
}

impl Prepared {
    fn head_data(&self, h: usize, a: usize, b: usize) -> HeadData {
        let (g, vector) = match &self.gate {
            GateT3::None => (None, false),
            GateT3::Scalar(g) => (Some(g.head(h, a, b)), false),
            GateT3::Vector(g) => (Some(g.head(h, a, b)), true),
        };
        HeadData {
            q: self.q.head(h, a, b),
            k: self.k.head(h, a, b),
            v: self.v.head(h, a, b),
            g,
            beta: self.beta.as_ref().map(|x| x.head(h, a, b)),
            vector,
        }
    }

    fn seq<'a>(&self, d: &'a HeadData) -> HeadSeq<'a> {
        let gate = match (&d.g, d.vector) {
            (None, _) => Gate::None,
            (Some(g), false) => Gate::Scalar(g),
            (Some(g), true) => Gate::Vector(g),
        };
        HeadSeq { q: &d.q, k: &d.k, v: &d.v, gate, beta: d.beta.as_deref(), dk: self.q.d, dv: self.v.d, scale: self.scale }
    }

    fn check(&self) {
        assert_eq!((self.k.t, self.k.h, self.k.d), (self.q.t, self.q.h, self.q.d), "k shape differs from q");
        assert_eq!((self.v.t, self.v.h), (self.q.t, self.q.h), "v shape differs from q");
    }
}

/// Sequential forward over a packed batch: returns o [T, H, V] and the final state of every
/// (sequence, head), indexed `n * H + h`. `s0` uses the same indexing.
pub fn forward(p: &Prepared, s0: Option<&[Vec<f64>]>, cu_seqlens: &[usize]) -> (T3, Vec<Vec<f64>>) {
    p.check();
    let h_count = p.q.h;
    let mut o = T3::zeros(p.q.t, h_count, p.v.d);
    let mut finals = Vec::new();
    for (n, (a, b)) in seq_ranges(cu_seqlens).into_iter().enumerate() {
        for h in 0..h_count {
            let d = p.head_data(h, a, b);
            let (oh, sh) = recurrent(&p.seq(&d), s0.map(|s| s[n * h_count + h].as_slice()));
            o.set_head(h, a, &oh);
            finals.push(sh);
        }
    }
    (o, finals)
}

/// The quadratic parallel form ([`parallel`]) over a packed batch (non-delta problems only).
pub fn forward_parallel(p: &Prepared, s0: Option<&[Vec<f64>]>, cu_seqlens: &[usize]) -> T3 {
    p.check();
    let h_count = p.q.h;
    let mut o = T3::zeros(p.q.t, h_count, p.v.d);
    for (n, (a, b)) in seq_ranges(cu_seqlens).into_iter().enumerate() {
        for h in 0..h_count {
            let d = p.head_data(h, a, b);
            o.set_head(h, a, &parallel(&p.seq(&d), s0.map(|s| s[n * h_count + h].as_slice())));
        }
    }
    o
}

/// One decode step for every head of one token (`p.q.t == 1`); `states[h]` is updated in place.
pub fn forward_step(p: &Prepared, states: &mut [Vec<f64>]) -> T3 {
    p.check();
    assert_eq!(p.q.t, 1, "forward_step: one token");
    assert_eq!(states.len(), p.q.h, "forward_step: one state per head");
    let mut o = T3::zeros(1, p.q.h, p.v.d);
    for (h, s) in states.iter_mut().enumerate() {
        let g: Vec<f64> = match &p.gate {
            GateT3::None => Vec::new(),
            GateT3::Scalar(g) | GateT3::Vector(g) => g.vec(0, h).to_vec(),
        };
        let beta = p.beta.as_ref().map(|b| b.get(0, h, 0));
        let oh = step(s, p.q.vec(0, h), p.k.vec(0, h), p.v.vec(0, h), &g, beta, p.scale);
        o.vec_mut(0, h).copy_from_slice(&oh);
    }
    o
}
