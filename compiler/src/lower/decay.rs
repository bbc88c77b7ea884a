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
//! The intra-chunk A is computed pairwise over channels, so every exponent is ≤ 0 and no anchoring
//! is needed (a C×C×K tile; the GPU back end will block it). Scalar and fixed gates use one C×C
//! decay matrix, and no decay skips the exponentials. The gate activation, key, value, query and
//! scale are the declaration's own expressions, compiled in by [`super::expr`].

use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, Value};

use super::expr::{self, Env};
use super::{Kernel, LowerError, Recurrence, Tiling};
use crate::classify::{Decay, Family};

/// How the state's columns map onto an input: an input over V is read for this instance's value
/// block only.
enum Axis {
    K,
    V,
    Scalar,
}

/// The chunked forward kernel with optional initial and final states.
///
/// Parameters, in order: the token inputs the expressions use (`[tokens, heads, dim]`, in
/// declaration order), the per-head parameters (`[heads]`), `lower_bound` (`[heads * K]`, when
/// used), `o` (`[tokens, heads, V]`), `h0` and `ht` (`[sequences, heads, K, V]`), `cu_seqlens`
/// (`[sequences + 1]`), then the integers `use_h0` and `use_ht`. Grid: sequences × heads, V / block_v.
pub fn forward(r: &Recurrence<'_>, tiling: Tiling) -> Result<Kernel, LowerError> {
    if r.class.family != Family::Decay {
        return Err(r.error(format!("the decay-class forward does not apply to the {:?} family", r.class.family)));
    }
    let (kd, vd, c, bv, heads) = (r.k(), r.v(), tiling.chunk, tiling.block_v, r.heads as i64);
    if bv == 0 || vd % bv != 0 {
        return Err(r.error(format!("block_v = {bv} does not divide V = {vd}")));
    }
    let ex = &r.class.exprs;
    let (Some(key), Some(value)) = (&ex.key, &ex.value) else {
        return Err(r.error("the class has no key or value expression"));
    };
    let query = ex.query.as_ref().ok_or_else(|| r.error("the read-out has no query"))?;
    let mut used = Vec::new();
    for e in [ex.decay.as_ref(), Some(key), Some(value), Some(query), ex.scale.as_ref()].into_iter().flatten() {
        expr::names(e, &mut used);
    }
    let is_used = |n: &str| used.iter().any(|u| u == n);

    let mut b = Builder::new(&format!("{}_chunk_fwd", r.name), &["sequences * heads", "value blocks"]);
    let mut token_ptrs = Vec::new();
    for t in r.math.tokens.iter().filter(|t| is_used(&t.name.name)) {
        let axis = match &t.dim {
            None => Axis::Scalar,
            Some(d) if d.name == r.math.key_axis.0 => Axis::K,
            Some(_) => Axis::V,
        };
        token_ptrs.push((t.name.name.clone(), b.ptr(&t.name.name, DType::F32, false), axis));
    }
    let head_ptrs: Vec<_> =
        r.math.head_params.iter().filter(|p| is_used(&p.name)).map(|p| (p.name.clone(), b.ptr(&p.name, DType::F32, false))).collect();
    let lb_ptr = is_used("lower_bound").then(|| b.ptr("lower_bound", DType::F32, false));
    let o_ptr = b.ptr("o", DType::F32, true);
    let h0_ptr = b.ptr("h0", DType::F32, false);
    let ht_ptr = b.ptr("ht", DType::F32, true);
    let cu_ptr = b.ptr("cu_seqlens", DType::I64, false);
    let use_h0 = b.int_param("use_h0");
    let use_ht = b.int_param("use_ht");

    // Which (sequence, head, value block) this instance computes.
    let pid0 = b.program_id(0);
    let h_count = b.i64(heads);
    let seq = b.binary(BinOp::Div, pid0, h_count);
    let head = b.binary(BinOp::Rem, pid0, h_count);
    let pid1 = b.program_id(1);
    let bv_v = b.i64(i64::from(bv));
    let v0 = b.mul(pid1, bv_v);
    let one = b.i64(1);
    let seq_next = b.add(seq, one);
    let bos = load_scalar(&mut b, cu_ptr, seq);
    let eos = load_scalar(&mut b, cu_ptr, seq_next);
    let len = b.sub(eos, bos);

    let k_cols = b.iota(kd);
    let v_iota = b.iota(bv);
    let v_cols = b.add(v_iota, v0);
    // The state tile [K, block_v] of this (sequence, head).
    let kv = b.i64(i64::from(kd) * i64::from(vd));
    let sh = b.mul(seq, h_count);
    let sh = b.add(sh, head);
    let s_base = b.mul(sh, kv);
    let vd_v = b.i64(i64::from(vd));
    let kc = b.col(k_cols);
    let krow = b.mul(kc, vd_v);
    let vr = b.row(v_cols);
    let s_off = b.add(krow, vr);
    let s_off = b.add(s_off, s_base);
    let zero_i = b.i64(0);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero_i);
    let s0 = b.load(h0_ptr, s_off, Some(has_h0), 0.0);

    // Values that do not change across chunks.
    let mut env = Env::new();
    let k_size = b.f32(f64::from(kd));
    let v_size = b.f32(f64::from(vd));
    env.insert(r.math.key_axis.0.clone(), k_size);
    env.insert(r.math.value_axis.0.clone(), v_size);
    let head_f = b.cast(head, DType::F32);
    env.insert("head_index".into(), head_f);
    for (name, p) in &head_ptrs {
        let x = load_scalar(&mut b, *p, head);
        env.insert(name.clone(), x);
    }
    if let Some(p) = lb_ptr {
        let kd_v = b.i64(i64::from(kd));
        let base = b.mul(head, kd_v);
        let off = b.add(k_cols, base);
        let lb = b.load(p, off, None, 0.0);
        let lb = b.row(lb);
        env.insert("lower_bound".into(), lb);
    }
    let gated = !matches!(r.class.decay, Decay::None);
    let vector_gate = matches!(r.class.decay, Decay::DataVector(_) | Decay::FixedVector(_));

    let chunk = b.i64(i64::from(c));
    let mut failure = None;
    let out = b.for_loop(zero_i, len, chunk, &[s0], |b, t0, carried| {
        let s = carried[0];
        let iota_c = b.iota(c);
        let rows = b.add(iota_c, t0);
        let valid = b.cmp(CmpOp::Lt, rows, len);
        let valid_c = b.col(valid);
        let tok = b.add(rows, bos);
        let tok_c = b.col(tok);
        let tok_h = b.mul(tok_c, h_count);
        let tok_h = b.add(tok_h, head);
        let mut env = env.clone();
        for (name, p, axis) in &token_ptrs {
            let (cols, width) = match axis {
                Axis::K => (k_cols, kd),
                Axis::V => (v_cols, vd),
                Axis::Scalar => (b.iota(1), 1),
            };
            let w = b.i64(i64::from(width));
            let base = b.mul(tok_h, w);
            let cr = b.row(cols);
            let off = b.add(base, cr);
            let x = b.load(*p, off, Some(valid_c), 0.0);
            env.insert(name.clone(), x);
        }
        let result = (|| -> Result<Vec<Value>, String> {
            let zero = b.f32(0.0);
            let mut q = expr::lower(b, query, &env)?;
            if let Some(scale) = &ex.scale {
                let s = expr::lower(b, scale, &env)?;
                q = b.mul(q, s);
            }
            let q = b.broadcast(q, &[c, kd]);
            let k = expr::lower(b, key, &env)?;
            let k = b.broadcast(k, &[c, kd]);
            let k = b.select(valid_c, k, zero);
            let v = expr::lower(b, value, &env)?;
            let v = b.broadcast(v, &[c, bv]);
            let v = b.select(valid_c, v, zero);
            let iota_i = b.iota(c);
            let ii = b.col(iota_i);
            let jj = b.row(iota_i);
            let causal = b.cmp(CmpOp::Le, jj, ii);
            let never = b.f32(-1e30);
            let (o, k_state, decay_rows) = if gated {
                let decay = ex.decay.as_ref().ok_or("a gated class without a decay expression")?;
                let g = expr::log_of(b, decay, &env)?;
                let gw = if vector_gate { kd } else { 1 };
                let g = b.broadcast(g, &[c, gw]);
                let g = b.select(valid_c, g, zero);
                let lam = b.cumsum(g, 0, false);
                let lam_end = b.sum(g, 0);
                let lam_end = b.row(lam_end);
                let e_lam = b.exp(lam);
                let qg = b.mul(q, e_lam);
                let o_inter = b.dot(qg, s);
                let a = if vector_gate {
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
                    let lt = b.transpose(lam);
                    let diff = b.sub(lam, lt);
                    let diff = b.select(causal, diff, never);
                    let dm = b.exp(diff);
                    b.mul(qk, dm)
                };
                let o_intra = b.dot(a, v);
                let o = b.add(o_inter, o_intra);
                let to_end = b.sub(lam_end, lam);
                let to_end = b.exp(to_end);
                let k_state = b.mul(k, to_end);
                let decay_rows = b.reshape(lam_end, &[gw, 1]);
                let decay_rows = b.exp(decay_rows);
                (o, k_state, Some(decay_rows))
            } else {
                let o_inter = b.dot(q, s);
                let kt = b.transpose(k);
                let qk = b.dot(q, kt);
                let a = b.select(causal, qk, zero);
                let o_intra = b.dot(a, v);
                (b.add(o_inter, o_intra), k, None)
            };
            let vd_v = b.i64(i64::from(vd));
            let o_base = b.mul(tok_h, vd_v);
            let vr = b.row(v_cols);
            let o_off = b.add(o_base, vr);
            b.store(o_ptr, o_off, o, Some(valid_c));
            let s = match decay_rows {
                Some(d) => b.mul(s, d),
                None => s,
            };
            let kt = b.transpose(k_state);
            let upd = b.dot(kt, v);
            Ok(vec![b.add(s, upd)])
        })();
        match result {
            Ok(next) => next,
            Err(e) => {
                failure = Some(e);
                vec![s]
            }
        }
    });
    if let Some(e) = failure {
        return Err(r.error(e));
    }
    let has_ht = b.cmp(CmpOp::Ne, use_ht, zero_i);
    b.store(ht_ptr, s_off, out[0], Some(has_ht));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences * heads".into(), format!("{} / {bv}", vd)] })
}

/// Loads one element at a scalar offset.
pub fn load_scalar(b: &mut Builder, ptr: hlac_runtime::kir::build::Ptr, offset: Value) -> Value {
    let off = b.reshape(offset, &[1]);
    let x = b.load(ptr, off, None, 0.0);
    b.reshape(x, &[])
}
