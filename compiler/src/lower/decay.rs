//! The decay class (RetNet, GLA, HGRN-2 and any declared recurrence S ← Diag(α) S + k vᵀ): the
//! chunked forward of algorithms.md §1.1, per (sequence, head, block of value columns), over
//! packed variable-length sequences.
//!
//! Per chunk of C tokens, with g = log α (zero on rows past the sequence's end) and λ = cumsum g:
//!
//! ```text
//! O  = s (Q ⊙ e^λ) S + A V,        A_ij = s Σ_d q_id k_jd e^{λ_id − λ_jd}  (j ≤ i)
//! S ← e^Λ ⊙ S + (K ⊙ e^{Λ − λ})ᵀ V, Λ = λ at the chunk's last row
//! ```
//!
//! For vector gates the intra-chunk A is computed pairwise over channels, so every exponent is
//! ≤ 0 and no anchoring is needed (a C×C×K tile), or — with [`Tiling::sub_block`] — in sub-blocks
//! (§1.2, `intra_blocked`): pairwise only inside the diagonal blocks, anchored matrix products
//! between them. Scalar and fixed gates use one C×C decay matrix, and no decay skips the
//! exponentials. The gate activation, key, value, query and
//! scale are the declaration's own expressions, compiled in by [`super::expr`].

use hlac_runtime::kir::{Builder, CmpOp, Value};

pub use super::chunk::load_scalar;
use super::chunk::{chunk_qkv, chunked_forward, two_pass_forward, Chunk, Scaffold};
use super::expr;
use super::{Kernel, LowerError, Recurrence, Tiling};
use crate::classify::{Decay, Family};

/// The chunked forward kernel with optional initial and final states.
///
/// Parameters, in order: the token inputs the expressions use (`[tokens, heads, dim]`, in
/// declaration order), the per-head parameters (`[heads]`), `lower_bound` (`[heads * K]`, when
/// used), `o` (`[tokens, heads, V]`), `h0` and `ht` (`[sequences, heads, K, V]`), `cu_seqlens`
/// (`[sequences + 1]`), then the integers `use_h0` and `use_ht`. Grid: sequences × heads, V / block_v.
///
/// With `store_states` the kernel also stores the state entering every chunk (see
/// [`Scaffold::new`]), which the backward reads instead of keeping every state from the forward.
pub fn forward(r: &Recurrence<'_>, tiling: Tiling, store_states: bool) -> Result<Kernel, LowerError> {
    if r.class.family != Family::Decay {
        return Err(r.error(format!("the decay-class forward does not apply to the {:?} family", r.class.family)));
    }
    chunked_forward(r, tiling, store_states, &step)
}

/// The two passes of the chunk-parallel forward ([`super::chunk::two_pass_forward`]): the walk
/// storing the state entering every chunk (`chunk_states`), then every chunk's output at once
/// (`chunk_out`). Parameters as in [`forward`], split by [`super::chunk::Scaffold::new`].
pub fn two_pass(r: &Recurrence<'_>, tiling: Tiling) -> Result<(Kernel, Kernel), LowerError> {
    if r.class.family != Family::Decay {
        return Err(r.error(format!("the decay-class forward does not apply to the {:?} family", r.class.family)));
    }
    two_pass_forward(r, tiling, &step)
}

/// One chunk: stores its output and returns the next state (each as the scaffold's part asks).
fn step(r: &Recurrence<'_>, sc: &Scaffold, b: &mut Builder, chunk: &Chunk, s: Value) -> Result<Value, String> {
    let ex = &r.class.exprs;
    let (kd, c, env, valid) = (sc.k, sc.c, &chunk.env, chunk.valid);
    let (output, state) = (sc.part.output(), sc.part.state());
    let zero = b.f32(0.0);
    let (q, k, v) = chunk_qkv(r, sc, b, chunk)?;
    let v = v.ok_or("the decay class reads its values")?;
    let causal = output.then(|| causal_mask(b, c));
    let never = output.then(|| b.f32(-1e30));
    let Some(decay) = ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None)) else {
        // No decay: plain chunked linear attention.
        let mut kt = None;
        if let (Some(q), Some(causal)) = (q, causal) {
            let o_inter = b.dot(q, s);
            let t = b.transpose(k);
            kt = Some(t);
            let qk = b.dot(q, t);
            let a = b.select(causal, qk, zero);
            let o_intra = b.dot(a, v);
            let o = b.add(o_inter, o_intra);
            sc.store_output(b, chunk, o);
        }
        if !state {
            return Ok(s);
        }
        let kt = kt.unwrap_or_else(|| b.transpose(k));
        let upd = b.dot(kt, v);
        return Ok(b.add(s, upd));
    };
    let vector = matches!(r.class.decay, Decay::DataVector(_) | Decay::FixedVector(_));
    let gw = if vector { kd } else { 1 };
    let g = expr::log_of(b, decay, env)?;
    let g = b.broadcast(g, &[c, gw]);
    let g = b.select(valid, g, zero);
    let lam = b.cumsum(g, 0, false);
    let lam_end = state.then(|| {
        let e = b.sum(g, 0);
        b.row(e)
    });
    if let (Some(q), Some(causal), Some(never)) = (q, causal, never) {
        let e_lam = b.exp(lam);
        let qg = b.mul(q, e_lam);
        let o_inter = b.dot(qg, s);
        let a = if let Some(w) = sub_blocks(vector, c, sc.sub_block) {
            intra_blocked(b, q, k, lam, c, kd, w)
        } else if vector {
            // A_ij = Σ_d q_id k_jd e^{λ_id − λ_jd}, exponents masked to j ≤ i before exponentiating.
            let li = b.reshape(lam, &[c, 1, kd]);
            let lj = b.reshape(lam, &[1, c, kd]);
            let diff = b.sub(li, lj);
            let causal3 = b.reshape(causal, &[c, c, 1]);
            let diff = b.select(causal3, diff, never);
            let decay3 = b.exp(diff);
            let qi = b.reshape(q, &[c, 1, kd]);
            let kj = b.reshape(k, &[1, c, kd]);
            let qk = b.mul(qi, kj);
            let w = b.mul(qk, decay3);
            b.sum(w, 2)
        } else {
            let kt = b.transpose(k);
            let qk = b.dot(q, kt);
            let gamma = decay_matrix(b, lam, causal);
            b.mul(qk, gamma)
        };
        let o_intra = b.dot(a, v);
        let o = b.add(o_inter, o_intra);
        sc.store_output(b, chunk, o);
    }
    let Some(lam_end) = lam_end else { return Ok(s) };
    let to_end = b.sub(lam_end, lam);
    let to_end = b.exp(to_end);
    let k_state = b.mul(k, to_end);
    let decay_rows = b.reshape(lam_end, &[gw, 1]);
    let decay_rows = b.exp(decay_rows);
    let s = b.mul(s, decay_rows);
    let kt = b.transpose(k_state);
    let upd = b.dot(kt, v);
    Ok(b.add(s, upd))
}

/// The sub-block width a chunk of `c` rows uses for a vector gate: `sub` when it is set, smaller
/// than the chunk and divides it; `None` computes the chunk pairwise.
pub(super) fn sub_blocks(vector: bool, c: u32, sub: u32) -> Option<u32> {
    (vector && sub > 0 && sub < c && c.is_multiple_of(sub)).then_some(sub)
}

/// The intra-chunk A_ij = Σ_d q_id k_jd e^{λ_id − λ_jd} (j ≤ i) for vector gates, in sub-blocks
/// of `w` rows (algorithms.md §1.2). Inside a diagonal block the exponentials are pairwise, as in
/// the unblocked form but over w instead of C columns (a `[C/w, w, w, K]` tile). Between row block
/// I and the blocks before it, with the anchor r = λ at I's first row, A = (Q ⊙ e^{λ − r})
/// (K ⊙ e^{r − λ})ᵀ: rows of I lie at or after the anchor and columns before it, so both factors
/// are at most 1 and the product is one matrix product per row block. Rows and columns outside a
/// factor's range are selected away before exponentiating (never multiplied by a mask).
fn intra_blocked(b: &mut Builder, q: Value, k: Value, lam: Value, c: u32, kd: u32, w: u32) -> Value {
    let d = Diagonal::new(b, q, k, lam, c, kd, w);
    let mut a = d.a;
    for blk in 1..c / w {
        let f = Anchored::new(b, q, k, lam, c, w, blk);
        a = b.add(a, f.part);
    }
    a
}

/// The backward's intra-chunk terms for vector gates in sub-blocks of `w` rows, from
/// dA = causal(dO Vᵀ): A as [`intra_blocked`] computes it, dQ_i = Σ_j dA_ij e^{λ_i − λ_j} k_j and
/// dK_j = Σ_i dA_ij e^{λ_i − λ_j} q_i — pairwise inside the diagonal blocks, and between a row
/// block and the ones before it e^{λ − r} ⊙ (dA (K ⊙ e^{r − λ})) and e^{r − λ} ⊙ (dAᵀ (Q ⊙ e^{λ − r})).
pub(super) fn intra_blocked_grads(
    b: &mut Builder,
    (q, k, lam, d_a): (Value, Value, Value, Value),
    c: u32,
    kd: u32,
    w: u32,
) -> (Value, Value, Value) {
    let nb = c / w;
    let zero = b.f32(0.0);
    let d = Diagonal::new(b, q, k, lam, c, kd, w);
    // dA's diagonal blocks as [nb, w, w, 1]: element (I, i, I, j) of its [nb, w, nb, w] view.
    let da4 = b.reshape(d_a, &[nb, w, nb, w]);
    let blocks = b.iota(nb);
    let bi = b.reshape(blocks, &[nb, 1, 1, 1]);
    let bj = b.reshape(blocks, &[1, 1, nb, 1]);
    let same = b.cmp(CmpOp::Eq, bi, bj);
    let da4 = b.select(same, da4, zero);
    let da_diag = b.sum(da4, 2);
    let da_diag = b.reshape(da_diag, &[nb, w, w, 1]);
    let dae = b.mul(da_diag, d.decay);
    let t = b.mul(dae, d.kj);
    let dq = b.sum(t, 2);
    let mut dq = b.reshape(dq, &[c, kd]);
    let t = b.mul(dae, d.qi);
    let dk = b.sum(t, 1);
    let mut dk = b.reshape(dk, &[c, kd]);
    let mut a = d.a;
    let d_at = b.transpose(d_a);
    for blk in 1..nb {
        let f = Anchored::new(b, q, k, lam, c, w, blk);
        a = b.add(a, f.part);
        let dqa = b.dot(d_a, f.ka);
        let dqa = b.mul(dqa, f.ex);
        dq = b.add(dq, dqa);
        let dka = b.dot(d_at, f.qa);
        let dka = b.mul(dka, f.ek);
        dk = b.add(dk, dka);
    }
    (a, dq, dk)
}

/// The diagonal sub-blocks of the intra-chunk product: their pairwise exponentials, the operands
/// in the blocked view, and A's diagonal blocks placed in a `[C, C]` matrix (zero elsewhere).
struct Diagonal {
    /// `[nb, w, w, K]`: e^{λ_i − λ_j} for j ≤ i within a block, 0 above its diagonal.
    decay: Value,
    /// q as `[nb, w, 1, K]` and k as `[nb, 1, w, K]`.
    qi: Value,
    kj: Value,
    a: Value,
}

impl Diagonal {
    fn new(b: &mut Builder, q: Value, k: Value, lam: Value, c: u32, kd: u32, w: u32) -> Diagonal {
        let nb = c / w;
        let zero = b.f32(0.0);
        let never = b.f32(-1e30);
        let li = b.reshape(lam, &[nb, w, 1, kd]);
        let lj = b.reshape(lam, &[nb, 1, w, kd]);
        let diff = b.sub(li, lj);
        let inner = causal_mask(b, w);
        let inner = b.reshape(inner, &[1, w, w, 1]);
        let diff = b.select(inner, diff, never);
        let decay = b.exp(diff);
        let qi = b.reshape(q, &[nb, w, 1, kd]);
        let kj = b.reshape(k, &[nb, 1, w, kd]);
        let qk = b.mul(qi, kj);
        let prod = b.mul(qk, decay);
        let diag = b.sum(prod, 3);
        // Element (I, i, J, j) of the [nb, w, nb, w] view is block I's (i, j) where I = J.
        let diag = b.reshape(diag, &[nb, w, 1, w]);
        let diag = b.broadcast(diag, &[nb, w, nb, w]);
        let diag = b.reshape(diag, &[c, c]);
        let rows = b.iota(c);
        let width = b.i64(i64::from(w));
        let block_of = b.div(rows, width);
        let bi = b.col(block_of);
        let bj = b.row(block_of);
        let same = b.cmp(CmpOp::Eq, bi, bj);
        let a = b.select(same, diag, zero);
        Diagonal { decay, qi, kj, a }
    }
}

/// Row block `blk`'s anchored factors, `[C, K]` each: `ex` = e^{λ − r} on the block's rows and 0
/// elsewhere, `ek` = e^{r − λ} on the rows before the block and 0 elsewhere, with r = λ at the
/// block's first row (both at most 1 where they are not 0); the scaled operands `qa` = Q ⊙ ex and
/// `ka` = K ⊙ ek, and the block's part of A, `qa kaᵀ`.
struct Anchored {
    ex: Value,
    ek: Value,
    qa: Value,
    ka: Value,
    part: Value,
}

impl Anchored {
    fn new(b: &mut Builder, q: Value, k: Value, lam: Value, c: u32, w: u32, blk: u32) -> Anchored {
        let zero = b.f32(0.0);
        let never = b.f32(-1e30);
        let rows = b.iota(c);
        let rows = b.col(rows);
        let first = b.i64(i64::from(blk * w));
        let end = b.i64(i64::from((blk + 1) * w));
        let is_first = b.cmp(CmpOp::Eq, rows, first);
        let anchor = b.select(is_first, lam, zero);
        let anchor = b.sum(anchor, 0);
        let anchor = b.row(anchor);
        let from = b.cmp(CmpOp::Ge, rows, first);
        let upto = b.cmp(CmpOp::Lt, rows, end);
        let in_block = b.binary(hlac_runtime::kir::BinOp::And, from, upto);
        let before = b.cmp(CmpOp::Lt, rows, first);
        let ex = b.sub(lam, anchor);
        let ex = b.select(in_block, ex, never);
        let ex = b.exp(ex);
        let ek = b.sub(anchor, lam);
        let ek = b.select(before, ek, never);
        let ek = b.exp(ek);
        let qa = b.mul(q, ex);
        let ka = b.mul(k, ek);
        let kt = b.transpose(ka);
        let part = b.dot(qa, kt);
        Anchored { ex, ek, qa, ka, part }
    }
}

/// [C, C] bool: j ≤ i.
pub fn causal_mask(b: &mut Builder, c: u32) -> Value {
    let iota = b.iota(c);
    let ii = b.col(iota);
    let jj = b.row(iota);
    b.cmp(CmpOp::Le, jj, ii)
}

/// Γ_ij = e^{λ_i − λ_j} for j ≤ i and 0 above the diagonal, from a [C, 1] cumulative log-gate;
/// the exponent is masked before exponentiating so it is never positive.
pub fn decay_matrix(b: &mut Builder, lam: Value, mask: Value) -> Value {
    let never = b.f32(-1e30);
    let lt = b.transpose(lam);
    let diff = b.sub(lam, lt);
    let diff = b.select(mask, diff, never);
    b.exp(diff)
}
