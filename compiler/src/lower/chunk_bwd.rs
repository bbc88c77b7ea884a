//! The backward of the chunked recurrences, per (sequence, head), walking the chunks in reverse.
//! The state entering each chunk comes from the `states` buffer that the forward variant
//! `chunk_fwd_states` fills (states are recomputed for the backward, not kept from the training
//! forward); everything else in the chunk is recomputed. The class's core gradients — with respect
//! to the effective q' = scale · query, k, v, log α and β — come from `decay_core`
//! (algorithms.md §1.3) or [`delta_core`] (§2.2), then flow through the declaration's own
//! expressions ([`super::grad`]) to the raw token inputs, per-head parameters and lower bound.
//!
//! Decay class, per chunk:
//!
//! ```text
//! dA  = (dO Vᵀ)_≤                      dV = Aᵀ dO + (K ⊙ e^{Λ−λ}) dS⁺
//! dq' = (dO Sᵀ) ⊙ e^λ + dQ°            dK = (V dS⁺ᵀ) ⊙ e^{Λ−λ} + dK°
//! dλ  = q' ⊙ dq' − k ⊙ dk              dg = revcumsum(dλ) + rowsum(S⁺ ⊙ dS⁺)
//! dS  = e^Λ ⊙ dS⁺ + (q' ⊙ e^λ)ᵀ dO     (carried to the previous chunk; dh0 at the end)
//! ```
//!
//! Delta class: the WY/UT form's reverse — dΔ = K̂ dS⁺ + Aᵀ dO and
//! dS = e^Λ dS⁺ + (Diag(γ) Q')ᵀ dO − Wᵀ dΔ sequentially, then the chunk-parallel terms through
//! Δ = U − W S, U = T Diag(β) V, W = T Diag(β γ) K and T = (I + L)⁻¹ (dL = −(Tᵀ dT Tᵀ)_<).

use hlac_grammar::ast::{Expr, ExprKind, Ident};
use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, Value};

use super::chunk::{load_scalar, used_names, Inputs, Rows};
use super::decay::{causal_mask, decay_matrix};
use super::delta_bwd::delta_core;
use super::expr::{self, POSITION};
use super::grad::{backprop, reduce_to, Grads};
use super::{Kernel, LowerError, Recurrence, Tiling};
use crate::classify::{Decay, Family};

/// The backward kernel. Parameters: the inputs as in the forward, `do` (`[tokens, heads, V]`),
/// `states` (`[chunks, heads, K, V]`), `dht` (`[sequences, heads, K, V]`), `cu_seqlens`,
/// `chunk_offsets`, then the outputs `d<input>` for every token input (`[tokens, heads, dim]`),
/// per-head parameter (`[sequences, heads]`, summed over the sequence's tokens) and `lower_bound`
/// (`[sequences, heads * K]`), and `dh0` (`[sequences, heads, K, V]`); then the integer `use_dht`.
/// Grid: sequences × heads.
///
/// With `tiling.block_v` below V the backward is split over value blocks (grid: sequences × heads
/// × V / block_v). The state's columns evolve independently, so the instance of block j computes
/// exactly block j's share of every gradient: its columns of `dv`-like outputs (token inputs over
/// V) and of `dh0` are complete, while the gradients of the other token inputs, the per-head
/// parameters and `lower_bound` are partial sums, written in f32 as `d<input>_parts`
/// (`[rows, blocks, width]`: row-major over the output's rows, then the value block) for
/// [`super::pieces::sum_blocks`] to add up.
pub fn backward(r: &Recurrence<'_>, tiling: Tiling) -> Result<Kernel, LowerError> {
    if !matches!(r.class.family, Family::Decay | Family::Delta) {
        return Err(r.error(format!("the chunked backward does not apply to the {:?} family", r.class.family)));
    }
    let ex = &r.class.exprs;
    let (Some(key), Some(value), Some(query)) = (&ex.key, &ex.value, &ex.query) else {
        return Err(r.error("the class lacks a key, value or query expression"));
    };
    let (kd, vd, c, heads) = (r.k(), r.v(), tiling.chunk, r.heads as i64);
    let bv = tiling.block_v;
    if bv == 0 || !vd.is_multiple_of(bv) {
        return Err(r.error(format!("block_v = {bv} does not divide V = {vd}")));
    }
    let blocks = vd / bv;
    let split = blocks > 1;
    let used = used_names(r);
    r.check_storage()?;
    let grid: Vec<String> = if split { vec!["sequences * heads".into(), format!("{vd} / {bv}")] } else { vec!["sequences * heads".into()] };
    let axes: Vec<&str> = grid.iter().map(String::as_str).collect();
    let mut b = Builder::new(&format!("{}_chunk_bwd", r.name), &axes);
    let inputs = Inputs::declare(&mut b, r, &used);
    let do_ptr = b.ptr("do", r.storage, false);
    let states = b.ptr("states", DType::F32, false);
    let dht = b.ptr("dht", DType::F32, false);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let chunk_offsets = b.ptr("chunk_offsets", DType::I64, false);
    // Gradient outputs, one per differentiable input the expressions read.
    // (name, width, over V)
    let tokens: Vec<(String, u32, bool)> = r
        .math
        .tokens
        .iter()
        .filter(|t| used.contains(&t.name.name))
        .map(|t| {
            let (w, over_v) = match &t.dim {
                None => (1, false),
                Some(d) if d.name == r.math.key_axis.0 => (kd, false),
                Some(_) => (vd, true),
            };
            (t.name.name.clone(), w, over_v)
        })
        .collect();
    let params: Vec<(String, u32)> = r
        .math
        .head_params
        .iter()
        .filter(|p| used.contains(&p.name))
        .map(|p| (p.name.clone(), 1))
        .chain(used.contains(&"lower_bound".to_string()).then(|| ("lower_bound".to_string(), kd)))
        .collect();
    // A partial sum (split over value blocks) is an f32 `d<name>_parts`.
    let grad_ptr = |b: &mut Builder, n: &str, partial: bool, dtype: DType| {
        if partial {
            b.ptr(&format!("d{n}_parts"), DType::F32, true)
        } else {
            b.ptr(&format!("d{n}"), dtype, true)
        }
    };
    let d_tokens: Vec<_> = tokens.iter().map(|(n, _, over_v)| grad_ptr(&mut b, n, split && !over_v, r.storage)).collect();
    let d_params: Vec<_> = params.iter().map(|(n, _)| grad_ptr(&mut b, n, split, DType::F32)).collect();
    let dh0 = b.ptr("dh0", DType::F32, true);
    let use_dht = b.int_param("use_dht");
    let wrt: Vec<String> = tokens.iter().map(|(n, ..)| n.clone()).chain(params.iter().map(|(n, _)| n.clone())).collect();

    let pid = b.program_id(0);
    // When split: the value block's index, and the number of blocks (a partial output's row of
    // `[rows, blocks, w]` is row · blocks + block).
    let vblock = split.then(|| (b.program_id(1), b.i64(i64::from(blocks))));
    let h_count = b.i64(heads);
    let seq = b.binary(BinOp::Div, pid, h_count);
    let head = b.binary(BinOp::Rem, pid, h_count);
    let one_i = b.i64(1);
    let seq_next = b.add(seq, one_i);
    let bos = load_scalar(&mut b, cu, seq);
    let eos = load_scalar(&mut b, cu, seq_next);
    let len = b.sub(eos, bos);
    let c_i = b.i64(i64::from(c));
    let c_minus = b.i64(i64::from(c) - 1);
    let padded = b.add(len, c_minus);
    let n_chunks = b.binary(BinOp::Div, padded, c_i);
    let chunk_base = load_scalar(&mut b, chunk_offsets, seq);
    let k_cols = b.iota(kd);
    let v_cols = b.iota(bv);
    let v_cols = match vblock {
        Some((j, _)) => {
            let bv_i = b.i64(i64::from(bv));
            let v0 = b.mul(j, bv_i);
            b.add(v_cols, v0)
        }
        None => v_cols,
    };
    let kv = b.i64(i64::from(kd) * i64::from(vd));
    let vd_i = b.i64(i64::from(vd));
    let kc = b.col(k_cols);
    let krow = b.mul(kc, vd_i);
    let vr = b.row(v_cols);
    let s_tile = b.add(krow, vr);
    let sh = b.mul(seq, h_count);
    let sh = b.add(sh, head);
    let s_base = b.mul(sh, kv);
    let s_off = b.add(s_tile, s_base);
    let zero_i = b.i64(0);
    let has_dht = b.cmp(CmpOp::Ne, use_dht, zero_i);
    let ds_init = b.load(dht, s_off, Some(has_dht), 0.0);
    let env = inputs.bind_head(&mut b, r, head, k_cols);
    let zero = b.f32(0.0);
    let mut init = vec![ds_init];
    for (_, w) in &params {
        let z = if *w == 1 { zero } else { b.broadcast(zero, &[1, *w]) };
        init.push(z);
    }
    // The g expression: log α, as the forward computes it.
    let gated = !matches!(r.class.decay, Decay::None);
    let vector = matches!(r.class.decay, Decay::DataVector(_) | Decay::FixedVector(_));
    let delta = r.class.family == Family::Delta;
    let g_expr = ex.decay.as_ref().filter(|_| gated).map(log_expr);
    let needs_position = [key, query].iter().any(|e| expr::mentions_call(e, "rope"));

    let mut failure = None;
    let out = b.for_loop(zero_i, n_chunks, one_i, &init, |b, i, carried| {
        let result = (|| -> Result<Vec<Value>, String> {
            // Chunk n = N − 1 − i: the reverse order.
            let last = b.sub(n_chunks, one_i);
            let n = b.sub(last, i);
            let t0 = b.mul(n, c_i);
            let iota_c = b.iota(c);
            let rows = b.add(iota_c, t0);
            let valid = b.cmp(CmpOp::Lt, rows, len);
            let valid = b.col(valid);
            let tok = b.add(rows, bos);
            let tok = b.col(tok);
            let row = b.mul(tok, h_count);
            let row = b.add(row, head);
            let mut env = env.clone();
            if needs_position {
                let pos = b.col(rows);
                let pos = b.cast(pos, DType::F32);
                env.insert(POSITION.into(), pos);
            }
            inputs.load_rows(b, r, &mut env, Rows { row, valid }, k_cols, v_cols);
            let cn = b.add(n, chunk_base);
            let st = b.mul(cn, h_count);
            let st = b.add(st, head);
            let st = b.mul(st, kv);
            let st_off = b.add(s_tile, st);
            let s = b.load(states, st_off, None, 0.0);
            let do_base = b.mul(row, vd_i);
            let do_off = b.add(do_base, vr);
            let d_o = b.load(do_ptr, do_off, Some(valid), 0.0);
            let ds_next = carried[0];

            // Recompute the chunk's forward quantities.
            let mut q = expr::lower(b, query, &env)?;
            let scale = match &ex.scale {
                Some(e) => Some(expr::lower(b, e, &env)?),
                None => None,
            };
            if let Some(sc) = scale {
                q = b.mul(q, sc);
            }
            let q = b.broadcast(q, &[c, kd]);
            let q = b.select(valid, q, zero);
            let k = expr::lower(b, key, &env)?;
            let k = b.broadcast(k, &[c, kd]);
            let k = b.select(valid, k, zero);
            let v = expr::lower(b, value, &env)?;
            let v = b.broadcast(v, &[c, bv]);
            let v = b.select(valid, v, zero);
            let beta = match (&ex.beta, delta) {
                (Some(e), true) => {
                    let x = expr::lower(b, e, &env)?;
                    let x = b.broadcast(x, &[c, 1]);
                    Some(b.select(valid, x, zero))
                }
                (None, true) => {
                    let ones = valid_f(b, valid);
                    Some(b.broadcast(ones, &[c, 1]))
                }
                _ => None,
            };
            let gw = if vector { kd } else { 1 };
            let lam = match &g_expr {
                Some(ge) => {
                    let g = expr::lower(b, ge, &env)?;
                    let g = b.broadcast(g, &[c, gw]);
                    let g = b.select(valid, g, zero);
                    Some(b.cumsum(g, 0, false))
                }
                None => None,
            };
            let core = Core { q, k, v, beta, lam, s, ds_next, d_o, valid, c, kd, vd: bv, gw, sub_block: tiling.sub_block };
            let grads_core = if delta { delta_core(b, &core) } else { decay_core(b, &core, vector) };
            let mut grads = Grads::new();
            if let (Some(ge), Some(dg)) = (&g_expr, grads_core.dg) {
                backprop(b, ge, &env, dg, &wrt, &mut grads)?;
            }
            if let (Some(be), Some(db)) = (&ex.beta, grads_core.dbeta) {
                backprop(b, be, &env, db, &wrt, &mut grads)?;
            }
            let (dq, dk, dv) = (grads_core.dq, grads_core.dk, grads_core.dv);
            let dq_raw = match scale {
                Some(sc) => b.mul(dq, sc),
                None => dq,
            };
            backprop(b, query, &env, dq_raw, &wrt, &mut grads)?;
            backprop(b, key, &env, dk, &wrt, &mut grads)?;
            backprop(b, value, &env, dv, &wrt, &mut grads)?;
            for ((name, w, over_v), ptr) in tokens.iter().zip(&d_tokens) {
                // An input over V: this block's columns; else all of its width.
                let (cols, width) = match (over_v, *w == kd) {
                    (true, _) => (v_cols, bv),
                    (false, true) => (k_cols, kd),
                    (false, false) => (b.iota(1), 1),
                };
                let g = match grads.get(name) {
                    Some(g) => b.broadcast(*g, &[c, width]),
                    None => b.broadcast(zero, &[c, width]),
                };
                let wv = b.i64(i64::from(*w));
                let out_row = if *over_v { row } else { block_row(b, row, vblock) };
                let base = b.mul(out_row, wv);
                let cr = b.row(cols);
                let off = b.add(base, cr);
                b.store(*ptr, off, g, Some(valid));
            }
            let mut next = vec![grads_core.ds_prev];
            for (k_idx, (name, w)) in params.iter().enumerate() {
                let prev = carried[k_idx + 1];
                let add = match grads.get(name) {
                    Some(g) => {
                        let shape = if *w == 1 { vec![] } else { vec![1, *w] };
                        reduce_to(b, *g, &shape)
                    }
                    None => prev,
                };
                next.push(if grads.contains_key(name) { b.add(prev, add) } else { prev });
            }
            Ok(next)
        })();
        match result {
            Ok(next) => next,
            Err(e) => {
                failure = Some(e);
                carried.to_vec()
            }
        }
    });
    if let Some(e) = failure {
        return Err(r.error(e));
    }
    b.store(dh0, s_off, out[0], None);
    for (k_idx, ((_, w), ptr)) in params.iter().zip(&d_params).enumerate() {
        let width = b.i64(i64::from(*w));
        let out_row = block_row(&mut b, pid, vblock);
        let base = b.mul(out_row, width);
        let cols = b.iota(*w);
        let off = b.add(cols, base);
        let g = b.reshape(out[k_idx + 1], &[*w]);
        b.store(*ptr, off, g, None);
    }
    Ok(Kernel { program: b.finish(), grid })
}

/// The row of a partial output `[rows, blocks, w]` that output row `row` of value block `j` of
/// `n` writes, `row · n + j` (`vblock` = (j, n)); `row` itself when the backward is not split.
fn block_row(b: &mut Builder, row: Value, vblock: Option<(Value, Value)>) -> Value {
    match vblock {
        Some((j, n)) => {
            let r_n = b.mul(row, n);
            b.add(r_n, j)
        }
        None => row,
    }
}

/// log α as an expression: the argument of a top-level `exp` (or of `diag`), else `log(α)`.
fn log_expr(decay: &Expr) -> Expr {
    match &decay.kind {
        ExprKind::Paren(x) => log_expr(x),
        ExprKind::Call { func, args } if func.name == "exp" || func.name == "diag" => {
            if func.name == "exp" {
                args[0].clone()
            } else {
                log_expr(&args[0])
            }
        }
        _ => Expr {
            kind: ExprKind::Call { func: Ident { name: "log".into(), span: decay.span }, args: vec![decay.clone()] },
            span: decay.span,
        },
    }
}

/// 1.0 where `valid`, else 0.0 ([C, 1]).
fn valid_f(b: &mut Builder, valid: Value) -> Value {
    let one = b.f32(1.0);
    let zero = b.f32(0.0);
    b.select(valid, one, zero)
}

/// A chunk's recomputed forward quantities (rows past the sequence's end are zero).
pub struct Core {
    /// q' = scale · query, [C, K].
    pub q: Value,
    /// Keys, [C, K].
    pub k: Value,
    /// Values, [C, V].
    pub v: Value,
    /// β, [C, 1] (delta class).
    pub beta: Option<Value>,
    /// λ = cumsum log α, [C, gw]; `None` without decay.
    pub lam: Option<Value>,
    /// The state entering the chunk, [K, V].
    pub s: Value,
    /// ∂ℓ/∂(state leaving the chunk), [K, V].
    pub ds_next: Value,
    /// ∂ℓ/∂o, [C, V] (zero past the end).
    pub d_o: Value,
    /// [C, 1] rows inside the sequence.
    pub valid: Value,
    /// Chunk length.
    pub c: u32,
    /// K.
    pub kd: u32,
    /// V.
    pub vd: u32,
    /// Gate width: K for a vector gate, else 1.
    pub gw: u32,
    /// Vector gates' sub-block rows ([`Tiling::sub_block`]; 0: the whole chunk pairwise).
    pub sub_block: u32,
}

/// The core gradients of a chunk.
pub struct CoreGrads {
    /// ∂ℓ/∂q', [C, K].
    pub dq: Value,
    /// ∂ℓ/∂k, [C, K].
    pub dk: Value,
    /// ∂ℓ/∂v, [C, V].
    pub dv: Value,
    /// ∂ℓ/∂log α, [C, gw] (when there is a decay).
    pub dg: Option<Value>,
    /// ∂ℓ/∂β, [C, 1] (delta class).
    pub dbeta: Option<Value>,
    /// ∂ℓ/∂(state entering the chunk).
    pub ds_prev: Value,
}

/// λ (or zeros), its last row Λ as [1, gw], e^λ, e^{Λ−λ} and e^Λ as [gw, 1].
pub fn gate_factors(b: &mut Builder, core: &Core) -> (Value, Value, Value, Value, Value) {
    let zero = b.f32(0.0);
    let (c, gw) = (core.c, core.gw);
    let lam = match core.lam {
        Some(l) => l,
        None => b.broadcast(zero, &[c, gw]),
    };
    // λ is constant past the end (g = 0 there), so its last row is Λ.
    let last = b.i64(i64::from(c) - 1);
    let rows = b.iota(c);
    let is_last = b.cmp(CmpOp::Eq, rows, last);
    let is_last = b.col(is_last);
    let picked = b.select(is_last, lam, zero);
    let lam_end = b.sum(picked, 0);
    let lam_end = b.row(lam_end);
    let e_lam = b.exp(lam);
    let rest = b.sub(lam_end, lam);
    let to_end = b.exp(rest);
    let decay_rows = b.reshape(lam_end, &[gw, 1]);
    let decay_rows = b.exp(decay_rows);
    (lam, lam_end, e_lam, to_end, decay_rows)
}

/// The decay class's chunk gradients (algorithms.md §1.3).
fn decay_core(b: &mut Builder, core: &Core, vector: bool) -> CoreGrads {
    let Core { q, k, v, s, ds_next, d_o, valid, c, kd, gw, .. } = *core;
    let zero = b.f32(0.0);
    let causal = causal_mask(b, c);
    let (lam, _, e_lam, to_end, decay_rows) = gate_factors(b, core);
    let qg = b.mul(q, e_lam);
    let kd_t = b.mul(k, to_end);
    let vt = b.transpose(v);
    let dov = b.dot(d_o, vt);
    let d_a = b.select(causal, dov, zero);
    let (a, dq_intra, dk_intra) = if let Some(w) = super::decay::sub_blocks(vector, c, core.sub_block) {
        super::decay::intra_blocked_grads(b, (q, k, lam, d_a), c, kd, w)
    } else if vector {
        let never = b.f32(-1e30);
        let li = b.reshape(lam, &[c, 1, kd]);
        let lj = b.reshape(lam, &[1, c, kd]);
        let diff = b.sub(li, lj);
        let causal3 = b.reshape(causal, &[c, c, 1]);
        let diff = b.select(causal3, diff, never);
        let e3 = b.exp(diff);
        let qi = b.reshape(q, &[c, 1, kd]);
        let kj = b.reshape(k, &[1, c, kd]);
        let qk = b.mul(qi, kj);
        let w = b.mul(qk, e3);
        let a = b.sum(w, 2);
        let da3 = b.reshape(d_a, &[c, c, 1]);
        let dae = b.mul(da3, e3);
        let t = b.mul(dae, kj);
        let dq_i = b.sum(t, 1);
        let t = b.mul(dae, qi);
        let dk_i = b.sum(t, 0);
        (a, dq_i, dk_i)
    } else {
        let kt = b.transpose(k);
        let qk = b.dot(q, kt);
        let gamma = decay_matrix(b, lam, causal);
        let a = b.mul(qk, gamma);
        let dag = b.mul(d_a, gamma);
        let dq_i = b.dot(dag, k);
        let dagt = b.transpose(dag);
        let dk_i = b.dot(dagt, q);
        (a, dq_i, dk_i)
    };
    let at = b.transpose(a);
    let dv_a = b.dot(at, d_o);
    let dv_s = b.dot(kd_t, ds_next);
    let dv = b.add(dv_a, dv_s);
    let st_t = b.transpose(s);
    let dos = b.dot(d_o, st_t);
    let dq_state = b.mul(dos, e_lam);
    let dq = b.add(dq_state, dq_intra);
    let dst = b.transpose(ds_next);
    let vds = b.dot(v, dst);
    let dk_state = b.mul(vds, to_end);
    let dk = b.add(dk_state, dk_intra);
    let dq = b.select(valid, dq, zero);
    let dk = b.select(valid, dk, zero);
    let dv = b.select(valid, dv, zero);
    let dg = core.lam.map(|_| {
        let qdq = b.mul(q, dq);
        let kdk = b.mul(k, dk);
        let dlam = b.sub(qdq, kdk);
        let dlam = reduce_to(b, dlam, &[c, gw]);
        let dg = b.cumsum(dlam, 0, true);
        // Λ also scales the carried state: + rowsum(S⁺ ⊙ dS⁺) on every row.
        let s_dec = b.mul(s, decay_rows);
        let kdt = b.transpose(kd_t);
        let upd = b.dot(kdt, v);
        let s_next = b.add(s_dec, upd);
        let sds = b.mul(s_next, ds_next);
        let term = b.sum(sds, 1);
        let term = b.reshape(term, &[1, kd]);
        let term = reduce_to(b, term, &[1, gw]);
        let dg = b.add(dg, term);
        b.select(valid, dg, zero)
    });
    let ds_dec = b.mul(ds_next, decay_rows);
    let qgt = b.transpose(qg);
    let dsq = b.dot(qgt, d_o);
    let ds_prev = b.add(ds_dec, dsq);
    CoreGrads { dq, dk, dv, dg, dbeta: None, ds_prev }
}
