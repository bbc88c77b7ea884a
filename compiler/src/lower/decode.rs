//! One-step decode for the decay and delta classes (algorithms.md §4): one new token per sequence,
//! the fp32 state read once and written back in place.
//!
//! ```text
//! decay:  o = s ((α ⊙ q) S + v (k·q)),                S ← Diag(α) S + k vᵀ
//! delta:  u = α Sᵀk, o = s (α Sᵀq + β (k·q)(v − u)),  S ← α S + β k (v − u)ᵀ
//! ```
//!
//! Both read only the old state. The elementwise class decodes with its scan kernel on sequences
//! of length one ([`super::scan`]).

use hlac_runtime::kir::{BinOp, Builder, DType, Value};

use super::chunk::{used_names, Inputs, Rows};
use super::expr;
use super::{Kernel, LowerError, Recurrence};
use crate::classify::{Decay, Family};

/// The decode kernel. Parameters: the inputs as in [`super::decay::forward`] but one token per
/// sequence (`[batch, heads, dim]`), `o` (`[batch, heads, V]`) and `state` (`[batch, heads, K, V]`,
/// updated in place). Grid: batch × heads, V / block_v.
pub fn decode(r: &Recurrence<'_>, block_v: u32) -> Result<Kernel, LowerError> {
    if !matches!(r.class.family, Family::Decay | Family::Delta) {
        return Err(r.error("decode with the state in place applies to the decay and delta classes"));
    }
    let (kd, vd, heads) = (r.k(), r.v(), r.heads as i64);
    if block_v == 0 || vd % block_v != 0 {
        return Err(r.error(format!("block_v = {block_v} does not divide V = {vd}")));
    }
    let ex = &r.class.exprs;
    let (Some(key), Some(value), Some(query)) = (&ex.key, &ex.value, &ex.query) else {
        return Err(r.error("the class lacks a key, value or query expression"));
    };
    r.check_storage()?;
    let mut b = Builder::new(&format!("{}_decode", r.name), &["batch * heads", "value blocks"]);
    let inputs = Inputs::declare(&mut b, r, &used_names(r));
    let uses_rope = [key, query].iter().any(|e| expr::mentions_call(e, "rope"));
    let o_ptr = b.ptr("o", r.storage, true);
    let state_ptr = b.ptr("state", DType::F32, true);
    // The position of each sequence's new token, for rotary embeddings.
    let pos_ptr = uses_rope.then(|| b.ptr("positions", DType::I64, false));
    let pid0 = b.program_id(0);
    let h_count = b.i64(heads);
    let head = b.binary(BinOp::Rem, pid0, h_count);
    let pid1 = b.program_id(1);
    let bv = b.i64(i64::from(block_v));
    let v0 = b.mul(pid1, bv);
    let k_cols = b.iota(kd);
    let v_iota = b.iota(block_v);
    let v_cols = b.add(v_iota, v0);
    let mut env = inputs.bind_head(&mut b, r, head, k_cols);
    // pid0 = sequence·heads + head is exactly the row of this token in [batch, heads, …].
    let row = b.reshape(pid0, &[1, 1]);
    let yes = b.bool(true);
    let valid = b.reshape(yes, &[1, 1]);
    inputs.load_rows(&mut b, r, &mut env, Rows { row, valid }, k_cols, v_cols);
    if let Some(p) = pos_ptr {
        let seq = b.binary(BinOp::Div, pid0, h_count);
        let pos = super::chunk::load_scalar(&mut b, p, seq);
        let pos = b.cast(pos, DType::F32);
        let pos = b.reshape(pos, &[1, 1]);
        env.insert(expr::POSITION.into(), pos);
    }
    let kv = b.i64(i64::from(kd) * i64::from(vd));
    let s_base = b.mul(pid0, kv);
    let vd_v = b.i64(i64::from(vd));
    let kc = b.col(k_cols);
    let krow = b.mul(kc, vd_v);
    let vr = b.row(v_cols);
    let s_off = b.add(krow, vr);
    let s_off = b.add(s_off, s_base);
    let s = b.load(state_ptr, s_off, None, 0.0);

    let body = (|| -> Result<(Value, Value), String> {
        let mut q = expr::lower(&mut b, query, &env)?;
        if let Some(scale) = &ex.scale {
            let sc = expr::lower(&mut b, scale, &env)?;
            q = b.mul(q, sc);
        }
        let q = b.broadcast(q, &[1, kd]);
        let k = expr::lower(&mut b, key, &env)?;
        let k = b.broadcast(k, &[1, kd]);
        let v = expr::lower(&mut b, value, &env)?;
        let v = b.broadcast(v, &[1, block_v]);
        // α as a [1, K] row (a scalar decay is broadcast) and as a [K, 1] column.
        let alpha = match ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None)) {
            Some(d) => {
                let a = expr::lower(&mut b, d, &env)?;
                Some(b.broadcast(a, &[1, kd]))
            }
            None => None,
        };
        let kq = b.mul(k, q);
        let kq = b.sum(kq, 1);
        let kq = b.reshape(kq, &[1, 1]);
        let kt = b.transpose(k);
        let decayed = match alpha {
            Some(a) => {
                let at = b.transpose(a);
                b.mul(s, at)
            }
            None => s,
        };
        if r.class.family == Family::Decay {
            let qs = b.dot(q, decayed);
            let vkq = b.mul(v, kq);
            let o = b.add(qs, vkq);
            let upd = b.dot(kt, v);
            Ok((o, b.add(decayed, upd)))
        } else {
            let beta = match &ex.beta {
                Some(e) => expr::lower(&mut b, e, &env)?,
                None => b.f32(1.0),
            };
            let beta = b.broadcast(beta, &[1, 1]);
            // Scalar decay in the delta class: α S is `decayed` (α is constant over K).
            let u = b.dot(k, decayed);
            let resid = b.sub(v, u);
            let bres = b.mul(resid, beta);
            let qs = b.dot(q, decayed);
            let corr = b.mul(bres, kq);
            let o = b.add(qs, corr);
            let upd = b.dot(kt, bres);
            Ok((o, b.add(decayed, upd)))
        }
    })();
    let (o, s_next) = body.map_err(|e| r.error(e))?;
    let o_base = b.mul(row, vd_v);
    let vr = b.row(v_cols);
    let o_off = b.add(o_base, vr);
    b.store(o_ptr, o_off, o, None);
    b.store(state_ptr, s_off, s_next, None);
    Ok(Kernel { program: b.finish(), grid: vec!["batch * heads".into(), format!("{vd} / {block_v}")] })
}
