//! The delta class (DeltaNet, Gated DeltaNet and any declared S ← α (I − β k kᵀ) S + β k vᵀ): the
//! chunked WY/UT forward of algorithms.md §2.1, per (sequence, head, block of value columns), over
//! packed variable-length sequences. Per chunk, with λ = cumsum log α (α scalar; zero past the
//! sequence's end, as are k, v and β there, so those rows change nothing):
//!
//! ```text
//! L  = (Diag(β) K Kᵀ ⊙ Γ)_<      T = (I + L)⁻¹      (tri_inv)
//! U  = T Diag(β) V               W = T Diag(β ⊙ e^λ) K
//! Δ  = U − W S                   A = s (Q Kᵀ ⊙ Γ)_≤
//! O  = s Diag(e^λ) Q S + A Δ     S ← e^Λ S + (Diag(e^{Λ−λ}) K)ᵀ Δ
//! ```
//!
//! Every exponent inside the masks is ≤ 0. DeltaNet (no decay) drops the exponentials.

use hlac_runtime::kir::{Builder, CmpOp, Value};

use super::chunk::{chunk_qkv, chunked_forward, two_pass_forward, Chunk, Scaffold};
use super::decay::{causal_mask, decay_matrix};
use super::expr;
use super::{Kernel, LowerError, Recurrence, Tiling};
use crate::classify::{Decay, Family};

/// The chunked forward kernel; parameters, layout and grid as in [`super::decay::forward`].
///
/// With `store_states` the kernel also stores the state entering every chunk (see
/// [`Scaffold::new`]), which the backward reads instead of keeping every state from the forward.
pub fn forward(r: &Recurrence<'_>, tiling: Tiling, store_states: bool) -> Result<Kernel, LowerError> {
    if r.class.family != Family::Delta {
        return Err(r.error(format!("the delta-class forward does not apply to the {:?} family", r.class.family)));
    }
    chunked_forward(r, tiling, store_states, &step)
}

/// The two passes of the chunk-parallel forward ([`super::chunk::two_pass_forward`]): the walk
/// storing the state entering every chunk and every chunk's Δ (`v_new`, `[tokens, heads, V]`,
/// f32), then every chunk's output O = s Diag(e^λ) Q S + A Δ at once.
pub fn two_pass(r: &Recurrence<'_>, tiling: Tiling) -> Result<(Kernel, Kernel), LowerError> {
    if r.class.family != Family::Delta {
        return Err(r.error(format!("the delta-class forward does not apply to the {:?} family", r.class.family)));
    }
    two_pass_forward(r, tiling, &step)
}

/// One chunk: stores its output and returns the next state (each as the scaffold's part asks; the
/// state's walk of the two-pass forward stores Δ for the output's pass, which loads it).
fn step(r: &Recurrence<'_>, sc: &Scaffold, b: &mut Builder, chunk: &Chunk, s: Value) -> Result<Value, String> {
    let ex = &r.class.exprs;
    let (c, env, valid) = (sc.c, &chunk.env, chunk.valid);
    let (output, state) = (sc.part.output(), sc.part.state());
    let zero = b.f32(0.0);
    let (q, k, v) = chunk_qkv(r, sc, b, chunk)?;
    let beta = if state {
        let beta = match &ex.beta {
            Some(e) => expr::lower(b, e, env)?,
            None => b.f32(1.0),
        };
        let beta = b.broadcast(beta, &[c, 1]);
        Some(b.select(valid, beta, zero))
    } else {
        None
    };

    let causal = output.then(|| causal_mask(b, c));
    let iota = b.iota(c);
    let ii = b.col(iota);
    let jj = b.row(iota);
    let strict = state.then(|| b.cmp(CmpOp::Lt, jj, ii));
    // Γ and the row factors e^λ, e^{Λ−λ}, e^Λ (all ones without decay).
    let decay = ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None));
    let (gamma_le, gamma_lt, e_lam, to_end, e_total) = match decay {
        Some(d) => {
            let g = expr::log_of(b, d, env)?;
            let g = b.broadcast(g, &[c, 1]);
            let g = b.select(valid, g, zero);
            let lam = b.cumsum(g, 0, false);
            let total = state.then(|| {
                let total = b.sum(g, 0);
                b.reshape(total, &[1, 1])
            });
            let gamma_le = causal.map(|causal| decay_matrix(b, lam, causal));
            let gamma_lt = strict.map(|strict| decay_matrix(b, lam, strict));
            let e_lam = b.exp(lam);
            let (to_end, e_total) = match total {
                Some(total) => {
                    let rest = b.sub(total, lam);
                    (Some(b.exp(rest)), Some(b.exp(total)))
                }
                None => (None, None),
            };
            (gamma_le, gamma_lt, Some(e_lam), to_end, e_total)
        }
        None => {
            let one = b.f32(1.0);
            let gamma_le = causal.map(|causal| b.select(causal, one, zero));
            let gamma_lt = strict.map(|strict| b.select(strict, one, zero));
            (gamma_le, gamma_lt, None, None, None)
        }
    };
    let kt = b.transpose(k);
    let delta = match (v, beta, gamma_lt) {
        (Some(v), Some(beta), Some(gamma_lt)) => {
            // The UT transform of the chunk.
            let kk = b.dot(k, kt);
            let bkk = b.mul(kk, beta);
            let l = b.mul(bkk, gamma_lt);
            let t = b.tri_inv(l);
            let bv_rows = b.mul(v, beta);
            let u = b.dot(t, bv_rows);
            let bk = b.mul(k, beta);
            let bk = match e_lam {
                Some(e) => b.mul(bk, e),
                None => bk,
            };
            let w = b.dot(t, bk);
            let ws = b.dot(w, s);
            let delta = b.sub(u, ws);
            // Only the state's walk of the two-pass forward has `v_new` to hand Δ on in.
            if let Some(p) = sc.v_new {
                sc.store_rows(b, p, chunk, delta);
            }
            delta
        }
        _ => {
            let p = sc.v_new.ok_or("the output pass reads Δ")?;
            sc.load_rows(b, p, chunk)
        }
    };
    // Output: inter-chunk from the old state, intra-chunk through Δ.
    if let (Some(q), Some(gamma_le)) = (q, gamma_le) {
        let qg = match e_lam {
            Some(e) => b.mul(q, e),
            None => q,
        };
        let o_inter = b.dot(qg, s);
        let qk = b.dot(q, kt);
        let a = b.mul(qk, gamma_le);
        let o_intra = b.dot(a, delta);
        let o = b.add(o_inter, o_intra);
        sc.store_output(b, chunk, o);
    }
    if !state {
        return Ok(s);
    }
    // State update.
    let (s, k_state) = match (e_total, to_end) {
        (Some(total), Some(rest)) => (b.mul(s, total), b.mul(k, rest)),
        _ => (s, k),
    };
    let kst = b.transpose(k_state);
    let upd = b.dot(kst, delta);
    Ok(b.add(s, upd))
}
