//! The elementwise class (HGRN, and any declared recurrence whose state is one number per head):
//! h_t = α_t ⊙ h_{t−1} + k_t ⊙ v_t, o_t = h_t, with every head an independent channel
//! (algorithms.md §3). One program per (sequence, block of channels) walks the tokens in order
//! with the gate activation, key and value fused in — a single memory-bound pass. The channel
//! block is the vector width; no matrix products are involved.

use hlac_runtime::kir::build::Ptr;
use hlac_runtime::kir::{Builder, CmpOp, DType, Value};

use super::chunk::{load_scalar, used_names};
use super::expr::{self, Env};
use super::{Kernel, LowerError, Recurrence};
use crate::classify::{Decay, Family};

/// The scan kernel. Parameters: the token inputs the expressions use (`[tokens, heads]`), the
/// per-head parameters and `lower_bound` (`[heads]`), `o` (`[tokens, heads]`), `h0`/`ht`
/// (`[sequences, heads]`), `cu_seqlens`, and the integers `use_h0`, `use_ht`.
/// Grid: sequences, ⌈heads / block⌉.
pub fn forward(r: &Recurrence<'_>, block: u32) -> Result<Kernel, LowerError> {
    if r.class.family != Family::Scan {
        return Err(r.error(format!("the elementwise scan does not apply to the {:?} family", r.class.family)));
    }
    let ex = &r.class.exprs;
    let (key, value) = match (&ex.key, &ex.value) {
        (Some(k), Some(v)) => (k, v),
        _ => return Err(r.error("the class has no key or value expression")),
    };
    r.check_storage()?;
    let used = used_names(r);
    let heads = r.heads as i64;
    let mut b = Builder::new(&format!("{}_scan_fwd", r.name), &["sequences", "channel blocks"]);
    let (tokens, per_head) = declare_inputs(&mut b, r, &used);
    let o = b.ptr("o", r.storage, true);
    let h0 = b.ptr("h0", DType::F32, false);
    let ht = b.ptr("ht", DType::F32, true);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let use_h0 = b.int_param("use_h0");
    let use_ht = b.int_param("use_ht");

    let Lanes { seq, channels, h_count, inside, one, bos, eos } = lanes(&mut b, heads, block, cu);
    let zero = b.i64(0);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero);
    let state_base = b.mul(seq, h_count);
    let state_off = b.add(channels, state_base);
    let h0_mask = b.binary(hlac_runtime::kir::BinOp::And, inside, has_h0);
    let h_init = b.load(h0, state_off, Some(h0_mask), 0.0);

    let mut env = Env::new();
    let kf = b.f32(1.0);
    env.insert(r.math.key_axis.0.clone(), kf);
    env.insert(r.math.value_axis.0.clone(), kf);
    let head_f = b.cast(channels, DType::F32);
    env.insert("head_index".into(), head_f);
    for (name, p) in &per_head {
        let x = b.load(*p, channels, Some(inside), 0.0);
        env.insert(name.clone(), x);
    }
    let mut failure = None;
    let out = b.for_loop(bos, eos, one, &[h_init], |b, t, carried| {
        let row = b.mul(t, h_count);
        let off = b.add(channels, row);
        let mut env = env.clone();
        for (name, p) in &tokens {
            let x = b.load(*p, off, Some(inside), 0.0);
            env.insert(name.clone(), x);
        }
        let step = (|| -> Result<_, String> {
            let k = expr::lower(b, key, &env)?;
            let v = expr::lower(b, value, &env)?;
            let x = b.mul(k, v);
            let h = match ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None)) {
                Some(d) => {
                    let a = expr::lower(b, d, &env)?;
                    let ah = b.mul(a, carried[0]);
                    b.add(ah, x)
                }
                None => b.add(carried[0], x),
            };
            let h = b.broadcast(h, &[block]);
            b.store(o, off, h, Some(inside));
            Ok(h)
        })();
        match step {
            Ok(h) => vec![h],
            Err(e) => {
                failure = Some(e);
                vec![carried[0]]
            }
        }
    });
    if let Some(e) = failure {
        return Err(r.error(e));
    }
    let has_ht = b.cmp(CmpOp::Ne, use_ht, zero);
    let ht_mask = b.binary(hlac_runtime::kir::BinOp::And, inside, has_ht);
    b.store(ht, state_off, out[0], Some(ht_mask));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})")] })
}

/// The scan's backward (algorithms.md §3), per (sequence, block of channels), walking the tokens
/// in reverse: H_t = dO_t + α_{t+1} H_{t+1} (H past the end is dh_T), dx_t = H_t and
/// ∂ℓ/∂α_t = H_t h_{t−1}, read from the forward's output o_{t−1} (or h0 at the first token); then
/// x = k·v and α flow through the declaration's expressions. dh0 = α_0 H_0.
///
/// Parameters: the token inputs and `lower_bound` / per-head parameters as in [`forward`], `o`
/// (the forward's output), `do`, `h0`, `dht` (`[sequences, heads]`), `cu_seqlens`, then the
/// outputs `d<input>` (`[tokens, heads]`; per-head ones `[sequences, heads]`, summed over the
/// sequence) and `dh0`, then the integers `use_h0`, `use_dht`. Grid: sequences, ⌈heads / block⌉.
pub fn backward(r: &Recurrence<'_>, block: u32) -> Result<Kernel, LowerError> {
    use super::grad::{backprop, reduce_to, Grads};
    if r.class.family != Family::Scan {
        return Err(r.error(format!("the elementwise scan does not apply to the {:?} family", r.class.family)));
    }
    let ex = &r.class.exprs;
    let (key, value) = match (&ex.key, &ex.value) {
        (Some(k), Some(v)) => (k, v),
        _ => return Err(r.error("the class has no key or value expression")),
    };
    let decay = ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None));
    r.check_storage()?;
    let used = used_names(r);
    let heads = r.heads as i64;
    let mut b = Builder::new(&format!("{}_scan_bwd", r.name), &["sequences", "channel blocks"]);
    let (tokens, per_head) = declare_inputs(&mut b, r, &used);
    let o = b.ptr("o", r.storage, false);
    let d_o = b.ptr("do", r.storage, false);
    let h0 = b.ptr("h0", DType::F32, false);
    let dht = b.ptr("dht", DType::F32, false);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let d_tokens: Vec<_> = tokens.iter().map(|(n, _)| b.ptr(&format!("d{n}"), r.storage, true)).collect();
    let d_heads: Vec<_> = per_head.iter().map(|(n, _)| b.ptr(&format!("d{n}"), DType::F32, true)).collect();
    let dh0 = b.ptr("dh0", DType::F32, true);
    let use_h0 = b.int_param("use_h0");
    let use_dht = b.int_param("use_dht");
    let wrt: Vec<String> = tokens.iter().map(|(n, _)| n.clone()).chain(per_head.iter().map(|(n, _)| n.clone())).collect();

    let Lanes { seq, channels, h_count, inside, one, bos, eos } = lanes(&mut b, heads, block, cu);
    let len = b.sub(eos, bos);
    let zero_i = b.i64(0);
    let state_base = b.mul(seq, h_count);
    let state_off = b.add(channels, state_base);
    let has_dht = b.cmp(CmpOp::Ne, use_dht, zero_i);
    let m = b.binary(hlac_runtime::kir::BinOp::And, inside, has_dht);
    let carry0 = b.load(dht, state_off, Some(m), 0.0);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero_i);
    let m = b.binary(hlac_runtime::kir::BinOp::And, inside, has_h0);
    let h_init = b.load(h0, state_off, Some(m), 0.0);
    let mut env = Env::new();
    let kf = b.f32(1.0);
    env.insert(r.math.key_axis.0.clone(), kf);
    env.insert(r.math.value_axis.0.clone(), kf);
    let head_f = b.cast(channels, DType::F32);
    env.insert("head_index".into(), head_f);
    for (name, p) in &per_head {
        let x = b.load(*p, channels, Some(inside), 0.0);
        env.insert(name.clone(), x);
    }
    let zero = b.f32(0.0);
    let zeros = b.broadcast(zero, &[block]);
    let mut init = vec![carry0];
    init.extend(per_head.iter().map(|_| zeros));
    let mut failure = None;
    let out = b.for_loop(zero_i, len, one, &init, |b, i, carried| {
        let last = b.sub(eos, one);
        let t = b.sub(last, i);
        let row = b.mul(t, h_count);
        let off = b.add(channels, row);
        let mut env = env.clone();
        for (name, p) in &tokens {
            let x = b.load(*p, off, Some(inside), 0.0);
            env.insert(name.clone(), x);
        }
        let step = (|| -> Result<Vec<Value>, String> {
            let dout = b.load(d_o, off, Some(inside), 0.0);
            let h_big = b.add(dout, carried[0]);
            // h_{t−1}: the previous token's output, or h0 at the sequence's first token.
            let first = b.cmp(CmpOp::Eq, t, bos);
            let prev_row = b.sub(row, h_count);
            let prev_off = b.add(channels, prev_row);
            let not_first = b.unary(hlac_runtime::kir::UnOp::Not, first);
            let m = b.binary(hlac_runtime::kir::BinOp::And, inside, not_first);
            let h_prev = b.load(o, prev_off, Some(m), 0.0);
            let h_prev = b.select(first, h_init, h_prev);
            let mut grads = Grads::new();
            let k = expr::lower(b, key, &env)?;
            let v = expr::lower(b, value, &env)?;
            let dk = b.mul(h_big, v);
            let dv = b.mul(h_big, k);
            backprop(b, key, &env, dk, &wrt, &mut grads)?;
            backprop(b, value, &env, dv, &wrt, &mut grads)?;
            let carry = match decay {
                Some(d) => {
                    let a = expr::lower(b, d, &env)?;
                    let da = b.mul(h_big, h_prev);
                    backprop(b, d, &env, da, &wrt, &mut grads)?;
                    b.mul(a, h_big)
                }
                None => h_big,
            };
            let carry = b.broadcast(carry, &[block]);
            for ((name, _), ptr) in tokens.iter().zip(&d_tokens) {
                let g = match grads.get(name) {
                    Some(g) => reduce_to(b, *g, &[block]),
                    None => zeros,
                };
                b.store(*ptr, off, g, Some(inside));
            }
            let mut next = vec![carry];
            for (k_idx, (name, _)) in per_head.iter().enumerate() {
                let acc = match grads.get(name) {
                    Some(g) => {
                        let g = reduce_to(b, *g, &[block]);
                        b.add(carried[k_idx + 1], g)
                    }
                    None => carried[k_idx + 1],
                };
                next.push(acc);
            }
            Ok(next)
        })();
        match step {
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
    b.store(dh0, state_off, out[0], Some(inside));
    for (k_idx, ptr) in d_heads.iter().enumerate() {
        b.store(*ptr, state_off, out[k_idx + 1], Some(inside));
    }
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})")] })
}

/// Declares the token inputs and per-head inputs (`lower_bound` included) the expressions use.
/// Named pointer parameters.
type Named = Vec<(String, Ptr)>;

fn declare_inputs(b: &mut Builder, r: &Recurrence<'_>, used: &[String]) -> (Named, Named) {
    let is_used = |n: &str| used.iter().any(|u| u == n);
    let tokens = r
        .math
        .tokens
        .iter()
        .filter(|t| is_used(&t.name.name))
        .map(|t| (t.name.name.clone(), b.ptr(&t.name.name, r.storage, false)))
        .collect();
    let per_head = r
        .math
        .head_params
        .iter()
        .map(|p| p.name.clone())
        .chain(is_used("lower_bound").then(|| "lower_bound".to_string()))
        .filter(|n| is_used(n))
        .map(|n| {
            let p = b.ptr(&n, DType::F32, false);
            (n, p)
        })
        .collect();
    (tokens, per_head)
}

/// Which sequence and channels this instance handles.
struct Lanes {
    seq: Value,
    channels: Value,
    h_count: Value,
    inside: Value,
    one: Value,
    bos: Value,
    eos: Value,
}

fn lanes(b: &mut Builder, heads: i64, block: u32, cu: Ptr) -> Lanes {
    let seq = b.program_id(0);
    let blk = b.program_id(1);
    let bw = b.i64(i64::from(block));
    let c0 = b.mul(blk, bw);
    let iota = b.iota(block);
    let channels = b.add(iota, c0);
    let h_count = b.i64(heads);
    let inside = b.cmp(CmpOp::Lt, channels, h_count);
    let one = b.i64(1);
    let next = b.add(seq, one);
    let bos = load_scalar(b, cu, seq);
    let eos = load_scalar(b, cu, next);
    Lanes { seq, channels, h_count, inside, one, bos, eos }
}
