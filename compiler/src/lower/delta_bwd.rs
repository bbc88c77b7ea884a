//! The delta class's chunk gradients (algorithms.md §2.2), used by [`super::chunk_bwd`]: the
//! reverse of the WY/UT forward, with the scalar gate's λ = cumsum log α (all zeros without decay).
//! Every step below is one line of §2.2; rows past the sequence's end are zero throughout.

use hlac_runtime::kir::{Builder, CmpOp, Value};

use super::chunk_bwd::{gate_factors, Core, CoreGrads};
use super::decay::{causal_mask, decay_matrix};

/// Σ over axis 1 of a [C, C] tile as a [C, 1] column, and Σ over axis 0 as a [C, 1] column.
fn row_and_col_sums(b: &mut Builder, p: Value) -> (Value, Value) {
    let rows = b.sum(p, 1);
    let rows = b.col(rows);
    let cols = b.sum(p, 0);
    let cols = b.col(cols);
    (rows, cols)
}

/// Σ over axis 1 as a [C, 1] column.
fn rowsum(b: &mut Builder, x: Value) -> Value {
    let s = b.sum(x, 1);
    b.col(s)
}

/// The delta class's chunk gradients.
pub fn delta_core(b: &mut Builder, core: &Core) -> CoreGrads {
    let Core { q, k, v, s, ds_next, d_o, valid, c, .. } = *core;
    let zero = b.f32(0.0);
    let one = b.f32(1.0);
    let beta = match core.beta {
        Some(x) => x,
        None => b.broadcast(one, &[c, 1]),
    };
    let causal = causal_mask(b, c);
    let iota = b.iota(c);
    let ii = b.col(iota);
    let jj = b.row(iota);
    let strict = b.cmp(CmpOp::Lt, jj, ii);
    let (lam, _, e_lam, to_end, decay_rows) = gate_factors(b, core);
    let gamma_le = decay_matrix(b, lam, causal);
    let gamma_lt = decay_matrix(b, lam, strict);

    // Recompute the forward's UT transform, Δ and A.
    let kt = b.transpose(k);
    let kk = b.dot(k, kt);
    let bkk = b.mul(kk, beta);
    let l = b.mul(bkk, gamma_lt);
    let t = b.tri_inv(l);
    let bv = b.mul(v, beta);
    let u = b.dot(t, bv);
    let bg = b.mul(beta, e_lam);
    let bk = b.mul(k, bg);
    let w = b.dot(t, bk);
    let ws = b.dot(w, s);
    let delta = b.sub(u, ws);
    let qk = b.dot(q, kt);
    let a = b.mul(qk, gamma_le);
    let khat = b.mul(k, to_end);

    // Sequential part: dΔ, and dS for the previous chunk.
    let at = b.transpose(a);
    let khat_ds = b.dot(khat, ds_next);
    let at_do = b.dot(at, d_o);
    let d_delta = b.add(khat_ds, at_do);
    let ds_dec = b.mul(ds_next, decay_rows);
    let qg = b.mul(q, e_lam);
    let qgt = b.transpose(qg);
    let qg_do = b.dot(qgt, d_o);
    let wt = b.transpose(w);
    let wt_dd = b.dot(wt, d_delta);
    let ds_prev = b.add(ds_dec, qg_do);
    let ds_prev = b.sub(ds_prev, wt_dd);

    // 1. The state update: E = Δ dS⁺ᵀ.
    let dst = b.transpose(ds_next);
    let e = b.dot(delta, dst);
    let dk1 = b.mul(e, to_end);
    let khat_e = b.mul(khat, e);
    let rho = rowsum(b, khat_e);
    let mut dlam = b.sub(zero, rho);
    let s_ds = b.mul(s, ds_next);
    let s_ds = b.sum(s_ds, 1);
    let s_ds = b.sum(s_ds, 0);
    let e_total = b.reshape(decay_rows, &[]);
    let d_total = b.mul(s_ds, e_total);
    let rho_sum = b.sum(rho, 0);
    let rho_sum = b.sum(rho_sum, 0);
    let d_total = b.add(d_total, rho_sum);
    // 2. The output's state term.
    let st = b.transpose(s);
    let dos = b.dot(d_o, st);
    let dq_state = b.mul(dos, e_lam);
    let qdq = b.mul(q, dq_state);
    let qdq = rowsum(b, qdq);
    dlam = b.add(dlam, qdq);
    // 3. The output's intra-chunk term.
    let deltat = b.transpose(delta);
    let dod = b.dot(d_o, deltat);
    let d_a = b.select(causal, dod, zero);
    let dag = b.mul(d_a, gamma_le);
    let dq_intra = b.dot(dag, k);
    let dagt = b.transpose(dag);
    let dk3 = b.dot(dagt, q);
    let p = b.mul(d_a, a);
    let (pr, pc) = row_and_col_sums(b, p);
    dlam = b.add(dlam, pr);
    dlam = b.sub(dlam, pc);
    // 4–5. Through Δ = U − W S, U = T Diag(β) V and W = T Diag(β γ) K.
    let d_u = d_delta;
    let d_w = b.dot(d_delta, st);
    let d_w = b.sub(zero, d_w);
    let tt = b.transpose(t);
    let x = b.dot(tt, d_u);
    let dv = b.mul(x, beta);
    let vx = b.mul(v, x);
    let mut dbeta = rowsum(b, vx);
    let y = b.dot(tt, d_w);
    let dk5 = b.mul(y, bg);
    let ky = b.mul(k, y);
    let tau = rowsum(b, ky);
    let gtau = b.mul(tau, e_lam);
    dbeta = b.add(dbeta, gtau);
    let bgtau = b.mul(gtau, beta);
    dlam = b.add(dlam, bgtau);
    let bvt = b.transpose(bv);
    let du_bv = b.dot(d_u, bvt);
    let bkt = b.transpose(bk);
    let dw_bk = b.dot(d_w, bkt);
    let d_t = b.add(du_bv, dw_bk);
    // 6. Through the inverse: dL = −(Tᵀ dT Tᵀ)_<.
    let m1 = b.dot(tt, d_t);
    let m2 = b.dot(m1, tt);
    let neg = b.sub(zero, m2);
    let d_l = b.select(strict, neg, zero);
    // 7. Through L = (Diag(β) K Kᵀ ⊙ Γ)_<.
    let dlg = b.mul(d_l, gamma_lt);
    let dlkk = b.mul(dlg, kk);
    let db7 = rowsum(b, dlkk);
    dbeta = b.add(dbeta, db7);
    let g = b.mul(dlg, beta);
    let gk = b.dot(g, k);
    let gtm = b.transpose(g);
    let gtk = b.dot(gtm, k);
    let dk7 = b.add(gk, gtk);
    let pl = b.mul(d_l, l);
    let (plr, plc) = row_and_col_sums(b, pl);
    dlam = b.add(dlam, plr);
    dlam = b.sub(dlam, plc);

    let dq = b.add(dq_state, dq_intra);
    let dk = b.add(dk1, dk3);
    let dk = b.add(dk, dk5);
    let dk = b.add(dk, dk7);
    let dq = b.select(valid, dq, zero);
    let dk = b.select(valid, dk, zero);
    let dv = b.select(valid, dv, zero);
    let dbeta = b.select(valid, dbeta, zero);
    // 8. dg = revcumsum(dλ) with dΛ added at the last row, i.e. on every row before it.
    let dg = core.lam.map(|_| {
        let dg = b.cumsum(dlam, 0, true);
        let dg = b.add(dg, d_total);
        b.select(valid, dg, zero)
    });
    CoreGrads { dq, dk, dv, dg, dbeta: core.beta.map(|_| dbeta), ds_prev }
}
