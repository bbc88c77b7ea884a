//! The elementwise class (HGRN, and any declared recurrence whose state is one number per head):
//! h_t = α_t ⊙ h_{t−1} + k_t ⊙ v_t, o_t = h_t, with every head an independent channel
//! (algorithms.md §3). One program per (sequence, block of channels) walks the sequence in blocks
//! of `rows` tokens: it loads a `[rows, channels]` tile of every input at once (so the loads of a
//! whole block are in flight together instead of one token's at a time), evaluates the gate, key
//! and value on the whole tile, and runs the recurrence along the tile's rows with a linear
//! `scan` — the only sequential part, over data already in the workspace. No matrix products.
//! [`forward_chunks`], [`forward_carry`] and [`forward_out`] are the same forward in three passes
//! with a program per chunk (a GPU option, `HLAC_SCAN_PASSES=3`; measured slower, see there).

use hlac_runtime::kir::build::Ptr;
use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, UnOp, Value};

use super::chunk::{load_scalar, used_names};
use super::expr::{self, Env};
use super::{Kernel, LowerError, Recurrence};
use crate::classify::{Decay, Family};

/// The scan kernel. Parameters: the token inputs the expressions use (`[tokens, heads]`), the
/// per-head parameters and `lower_bound` (`[heads]`), `o` (`[tokens, heads]`), `h0`/`ht`
/// (`[sequences, heads]`), `cu_seqlens`, and the integers `use_h0`, `use_ht`.
/// Grid: sequences, ⌈heads / block⌉. Each loop step covers `rows` tokens.
pub fn forward(r: &Recurrence<'_>, block: u32, rows: u32) -> Result<Kernel, LowerError> {
    let (key, value, decay) = scan_exprs(r)?;
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

    let lanes = lanes(&mut b, heads, block, cu);
    let Lanes { seq, channels, h_count, inside, bos, eos, .. } = lanes;
    let zero = b.i64(0);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero);
    let state_base = b.mul(seq, h_count);
    let state_off = b.add(channels, state_base);
    let h0_mask = b.binary(BinOp::And, inside, has_h0);
    let h_init = b.load(h0, state_off, Some(h0_mask), 0.0);
    let env = head_env(&mut b, r, &per_head, channels, inside);
    let shape = [rows, block];
    let step = b.i64(i64::from(rows));
    let mut failure = None;
    let out = b.for_loop(bos, eos, step, &[h_init], |b, c0, carried| {
        let tile = Rows::new(b, &lanes, c0, rows);
        let env = tile.load_tokens(b, &tokens, env.clone());
        let body = (|| -> Result<_, String> {
            // Rows past the sequence's end hold the state (multiplier 1, input 0), so the last
            // row carries it to the next block; the carried state enters through the first row.
            let (kv, a) = tile.inputs(b, (key, value, decay), &env, shape)?;
            let h = tile.recur(b, kv, a, carried[0]);
            b.store(o, tile.off, h, Some(tile.mask));
            Ok(tile.pick(b, h, tile.last))
        })();
        match body {
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
    let ht_mask = b.binary(BinOp::And, inside, has_ht);
    b.store(ht, state_off, out[0], Some(ht_mask));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})")] })
}

/// The first of the GPU's three forward passes, parallel over chunks of `rows` tokens: each
/// program runs the recurrence over its chunk from a zero state and stores the chunk's summary —
/// `chunk_gates` = Π α over the chunk and `chunk_ends` = the state it leaves from zero — so that
/// the state leaving it from any entering state h is `chunk_gates · h + chunk_ends`.
///
/// The serial [`forward`] runs ⌈len / rows⌉ dependent steps per program with only
/// sequences × ⌈heads / block⌉ programs (256 at B = 4, d = 2048). Split in three — summaries
/// (here), [`forward_carry`] over the summaries alone, [`forward_out`] — the token passes have a
/// program per chunk. On a GPU (`HLAC_SCAN_PASSES=3`) each token pass measured as slow as the
/// whole serial kernel (H200: 0.34 and 0.38 ms against 0.39), so the serial kernel is bound by
/// the work per tile, not by too few programs, and stays the default until that work is cheaper.
///
/// Parameters: the token inputs and per-head parameters as in [`forward`], `chunk_gates` and
/// `chunk_ends` (`[chunks, heads]`, written; chunk `chunk_offsets[s] + j` is chunk j of sequence
/// s), `cu_seqlens`, `chunk_offsets`. Grid: sequences, ⌈heads / block⌉, ⌈max_len / rows⌉.
pub fn forward_chunks(r: &Recurrence<'_>, block: u32, rows: u32) -> Result<Kernel, LowerError> {
    let (key, value, decay) = scan_exprs(r)?;
    let used = used_names(r);
    let mut b = Builder::new(&format!("{}_scan_fwd_chunks", r.name), &["sequences", "channel blocks", "chunks"]);
    let (tokens, per_head) = declare_inputs(&mut b, r, &used);
    let gates = b.ptr("chunk_gates", DType::F32, true);
    let ends = b.ptr("chunk_ends", DType::F32, true);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let offsets = b.ptr("chunk_offsets", DType::I64, false);
    let lanes = lanes(&mut b, r.heads as i64, block, cu);
    let env = head_env(&mut b, r, &per_head, lanes.channels, lanes.inside);
    let at = ChunkOf::new(&mut b, &lanes, offsets, rows);
    let tile = Rows::new(&mut b, &lanes, at.c0, rows);
    let env = tile.load_tokens(&mut b, &tokens, env);
    let zero = b.f32(0.0);
    let (x, a) = tile.inputs(&mut b, (key, value, decay), &env, [rows, block]).map_err(|e| r.error(e))?;
    let h = b.linear_scan(x, a, 0, false);
    let end = tile.pick(&mut b, h, tile.last);
    // Π α: the same recurrence with α₀ entering at the first row and nothing after it.
    let first = b.select(tile.first, a, zero);
    let prod = b.linear_scan(first, a, 0, false);
    let prod = tile.pick(&mut b, prod, tile.last);
    b.store(gates, at.summary, prod, Some(at.mask));
    b.store(ends, at.summary, end, Some(at.mask));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})"), format!("ceil(max_len / {rows})")] })
}

/// The second pass: per (sequence, block of channels), the recurrence over the chunk summaries of
/// [`forward_chunks`], `rows` chunks per step — h ← chunk_gates · h + chunk_ends from h0 — storing
/// the state entering every chunk in `chunk_starts` and the last in `ht`.
///
/// Parameters: `chunk_gates`, `chunk_ends`, `chunk_starts` (`[chunks, heads]`), `h0`, `ht`
/// (`[sequences, heads]`), `cu_seqlens`, `chunk_offsets`, then `use_h0`, `use_ht`.
/// Grid: sequences, ⌈heads / block⌉.
pub fn forward_carry(r: &Recurrence<'_>, block: u32, rows: u32) -> Result<Kernel, LowerError> {
    scan_exprs(r)?;
    let mut b = Builder::new(&format!("{}_scan_fwd_carry", r.name), &["sequences", "channel blocks"]);
    let gates = b.ptr("chunk_gates", DType::F32, false);
    let ends = b.ptr("chunk_ends", DType::F32, false);
    let starts = b.ptr("chunk_starts", DType::F32, true);
    let h0 = b.ptr("h0", DType::F32, false);
    let ht = b.ptr("ht", DType::F32, true);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let offsets = b.ptr("chunk_offsets", DType::I64, false);
    let use_h0 = b.int_param("use_h0");
    let use_ht = b.int_param("use_ht");
    let lanes = lanes(&mut b, r.heads as i64, block, cu);
    let Lanes { seq, channels, h_count, inside, one, bos, eos } = lanes;
    let zero_i = b.i64(0);
    let state_base = b.mul(seq, h_count);
    let state_off = b.add(channels, state_base);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero_i);
    let m = b.binary(BinOp::And, inside, has_h0);
    let h_init = b.load(h0, state_off, Some(m), 0.0);
    // This sequence's chunks: n = ⌈len / rows⌉ of them from chunk_offsets[seq].
    let len = b.sub(eos, bos);
    let rows_i = b.i64(i64::from(rows));
    let less = b.i64(i64::from(rows) - 1);
    let padded = b.add(len, less);
    let n = b.div(padded, rows_i);
    let first_chunk = load_scalar(&mut b, offsets, seq);
    let out = b.for_loop(zero_i, n, rows_i, &[h_init], |b, i0, carried| {
        let iota = b.iota(rows);
        let i = b.add(iota, i0);
        let i = b.col(i);
        let valid = b.cmp(CmpOp::Lt, i, n);
        let mask = b.binary(BinOp::And, valid, inside);
        let chunk = b.add(i, first_chunk);
        let row = b.mul(chunk, h_count);
        let off = b.add(row, channels);
        let one_f = b.f32(1.0);
        let zero = b.f32(0.0);
        // Past the last chunk: gate 1, end 0, so the last row carries the final state.
        let a = b.load(gates, off, Some(mask), 0.0);
        let a = b.select(mask, a, one_f);
        let e = b.load(ends, off, Some(mask), 0.0);
        let r0 = b.iota(rows);
        let r0 = b.col(r0);
        let is_first = b.cmp(CmpOp::Eq, r0, zero_i);
        let entering = b.mul(a, carried[0]);
        let entering = b.select(is_first, entering, zero);
        let x = b.add(e, entering);
        let h = b.linear_scan(x, a, 0, false);
        // The state leaving chunk i enters chunk i + 1 (slot i + 1, when there is one); the first
        // row's slot gets the carried state.
        let next = b.add(i, one);
        let has_next = b.cmp(CmpOp::Lt, next, n);
        let m_next = b.binary(BinOp::And, has_next, inside);
        let next_off = b.add(off, h_count);
        b.store(starts, next_off, h, Some(m_next));
        let m_first = b.binary(BinOp::And, is_first, mask);
        let carried_tile = b.broadcast(carried[0], &[rows, block]);
        b.store(starts, off, carried_tile, Some(m_first));
        let last = b.i64(i64::from(rows) - 1);
        let is_last = b.cmp(CmpOp::Eq, r0, last);
        let only = b.select(is_last, h, zero);
        vec![b.sum(only, 0)]
    });
    let has_ht = b.cmp(CmpOp::Ne, use_ht, zero_i);
    let ht_mask = b.binary(BinOp::And, inside, has_ht);
    b.store(ht, state_off, out[0], Some(ht_mask));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})")] })
}

/// The third pass, parallel over chunks like [`forward_chunks`]: each program runs the recurrence
/// over its chunk from the state [`forward_carry`] stored for it and stores the outputs.
///
/// Parameters: the token inputs and per-head parameters as in [`forward`], `o`, `chunk_starts`
/// (`[chunks, heads]`), `cu_seqlens`, `chunk_offsets`. Grid: sequences, ⌈heads / block⌉,
/// ⌈max_len / rows⌉.
pub fn forward_out(r: &Recurrence<'_>, block: u32, rows: u32) -> Result<Kernel, LowerError> {
    let (key, value, decay) = scan_exprs(r)?;
    let used = used_names(r);
    let mut b = Builder::new(&format!("{}_scan_fwd_out", r.name), &["sequences", "channel blocks", "chunks"]);
    let (tokens, per_head) = declare_inputs(&mut b, r, &used);
    let o = b.ptr("o", r.storage, true);
    let starts = b.ptr("chunk_starts", DType::F32, false);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let offsets = b.ptr("chunk_offsets", DType::I64, false);
    let lanes = lanes(&mut b, r.heads as i64, block, cu);
    let env = head_env(&mut b, r, &per_head, lanes.channels, lanes.inside);
    let at = ChunkOf::new(&mut b, &lanes, offsets, rows);
    let h_in = b.load(starts, at.summary, Some(at.mask), 0.0);
    let tile = Rows::new(&mut b, &lanes, at.c0, rows);
    let env = tile.load_tokens(&mut b, &tokens, env);
    let (x, a) = tile.inputs(&mut b, (key, value, decay), &env, [rows, block]).map_err(|e| r.error(e))?;
    let h = tile.recur(&mut b, x, a, h_in);
    b.store(o, tile.off, h, Some(tile.mask));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences".into(), format!("ceil(heads / {block})"), format!("ceil(max_len / {rows})")] })
}

/// The key, value and (when the class decays) decay expressions of an elementwise recurrence.
type ScanExprs<'e> = (&'e hlac_grammar::ast::Expr, &'e hlac_grammar::ast::Expr, Option<&'e hlac_grammar::ast::Expr>);

fn scan_exprs<'e>(r: &Recurrence<'e>) -> Result<ScanExprs<'e>, LowerError> {
    if r.class.family != Family::Scan {
        return Err(r.error(format!("the elementwise scan does not apply to the {:?} family", r.class.family)));
    }
    r.check_storage()?;
    let ex = &r.class.exprs;
    match (&ex.key, &ex.value) {
        (Some(k), Some(v)) => Ok((k, v, ex.decay.as_ref().filter(|_| !matches!(r.class.decay, Decay::None)))),
        _ => Err(r.error("the class has no key or value expression")),
    }
}

/// Which chunk of its sequence a program of the chunk-parallel passes covers (grid axis 2).
struct ChunkOf {
    /// The chunk's first token.
    c0: Value,
    /// `[channels]` offsets of its summaries in the `[chunks, heads]` buffers.
    summary: Value,
    /// `[channels]`: the chunk lies inside the sequence and the channel inside the heads.
    mask: Value,
}

impl ChunkOf {
    fn new(b: &mut Builder, lanes: &Lanes, offsets: Ptr, rows: u32) -> ChunkOf {
        let j = b.program_id(2);
        let rows_i = b.i64(i64::from(rows));
        let start = b.mul(j, rows_i);
        let c0 = b.add(lanes.bos, start);
        let inside_seq = b.cmp(CmpOp::Lt, c0, lanes.eos);
        let mask = b.binary(BinOp::And, lanes.inside, inside_seq);
        let first = load_scalar(b, offsets, lanes.seq);
        let chunk = b.add(first, j);
        let row = b.mul(chunk, lanes.h_count);
        let summary = b.add(row, lanes.channels);
        ChunkOf { c0, summary, mask }
    }
}

/// The scan's backward (algorithms.md §3), per (sequence, block of channels), walking the blocks
/// of `rows` tokens from the last: H_t = dO_t + α_{t+1} H_{t+1} (H past the end is dh_T) — the
/// reverse linear scan with the forward's gates — then dx_t = H_t and ∂ℓ/∂α_t = H_t h_{t−1}, read
/// from the forward's output o_{t−1} (or h0 at the first token); x = k·v and α flow through the
/// declaration's expressions. dh0 = α_0 H_0, which is also what a block hands to the one before.
///
/// Parameters: the token inputs and `lower_bound` / per-head parameters as in [`forward`], `o`
/// (the forward's output), `do`, `h0`, `dht` (`[sequences, heads]`), `cu_seqlens`, then the
/// outputs `d<input>` (`[tokens, heads]`; per-head ones `[sequences, heads]`, summed over the
/// sequence) and `dh0`, then the integers `use_h0`, `use_dht`. Grid: sequences, ⌈heads / block⌉.
pub fn backward(r: &Recurrence<'_>, block: u32, rows: u32) -> Result<Kernel, LowerError> {
    use super::grad::{backprop, reduce_to, Grads};
    let (key, value, decay) = scan_exprs(r)?;
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

    let lanes = lanes(&mut b, heads, block, cu);
    let Lanes { seq, channels, h_count, inside, one, bos, eos } = lanes;
    let len = b.sub(eos, bos);
    let zero_i = b.i64(0);
    let state_base = b.mul(seq, h_count);
    let state_off = b.add(channels, state_base);
    let has_dht = b.cmp(CmpOp::Ne, use_dht, zero_i);
    let m = b.binary(BinOp::And, inside, has_dht);
    let carry0 = b.load(dht, state_off, Some(m), 0.0);
    let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero_i);
    let m = b.binary(BinOp::And, inside, has_h0);
    let h_init = b.load(h0, state_off, Some(m), 0.0);
    let env = head_env(&mut b, r, &per_head, channels, inside);
    let shape = [rows, block];
    let zero = b.f32(0.0);
    let zeros = b.broadcast(zero, &[block]);
    // Blocks from the last: block j of n starts at bos + (n − 1 − j)·rows.
    let rows_i = b.i64(i64::from(rows));
    let rows_less = b.i64(i64::from(rows) - 1);
    let padded = b.add(len, rows_less);
    let blocks = b.div(padded, rows_i);
    let mut init = vec![carry0];
    init.extend(per_head.iter().map(|_| zeros));
    let mut failure = None;
    let out = b.for_loop(zero_i, blocks, one, &init, |b, j, carried| {
        let back = b.sub(blocks, j);
        let back = b.sub(back, one);
        let start = b.mul(back, rows_i);
        let c0 = b.add(bos, start);
        let tile = Rows::new(b, &lanes, c0, rows);
        let env = tile.load_tokens(b, &tokens, env.clone());
        let body = (|| -> Result<Vec<Value>, String> {
            // The gates of this block (1 past the end, so the carried H passes through).
            let a = tile.gates(b, decay, &env)?;
            let dout = b.load(d_o, tile.off, Some(tile.mask), 0.0);
            // What the block after this one hands back enters at the last row.
            let last = b.select(tile.last, carried[0], zero);
            let x = b.add(dout, last);
            let h_big = b.linear_scan(x, a, 0, true);
            let h_big = b.select(tile.mask, h_big, zero);
            // h_{t−1}: the previous token's output, or h0 at the sequence's first token.
            let prev_off = b.sub(tile.off, h_count);
            let first = b.cmp(CmpOp::Eq, tile.t, bos);
            let not_first = b.unary(UnOp::Not, first);
            let m = b.binary(BinOp::And, tile.mask, not_first);
            let h_prev = b.load(o, prev_off, Some(m), 0.0);
            let h_prev = b.select(first, h_init, h_prev);
            let mut grads = Grads::new();
            let k = expr::lower(b, key, &env)?;
            let v = expr::lower(b, value, &env)?;
            let dk = b.mul(h_big, v);
            let dv = b.mul(h_big, k);
            backprop(b, key, &env, dk, &wrt, &mut grads)?;
            backprop(b, value, &env, dv, &wrt, &mut grads)?;
            if let Some(d) = decay {
                let da = b.mul(h_big, h_prev);
                backprop(b, d, &env, da, &wrt, &mut grads)?;
            }
            // α at the block's first token times its H: the next (earlier) block's carry, and
            // dh0 after the first block.
            let ah = b.mul(a, h_big);
            let carry = tile.pick(b, ah, tile.first);
            for ((name, _), ptr) in tokens.iter().zip(&d_tokens) {
                let g = match grads.get(name) {
                    Some(g) => reduce_to(b, *g, &shape),
                    None => b.broadcast(zero, &shape),
                };
                b.store(*ptr, tile.off, g, Some(tile.mask));
            }
            let mut next = vec![carry];
            for (k_idx, (name, _)) in per_head.iter().enumerate() {
                let acc = match grads.get(name) {
                    // Rows outside the sequence contribute nothing: their H is zero.
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
        match body {
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

/// The expressions' environment outside the token loop: K and V sizes of 1, the channel index as
/// `head_index`, and every per-head parameter loaded for this block of channels.
fn head_env(b: &mut Builder, r: &Recurrence<'_>, per_head: &Named, channels: Value, inside: Value) -> Env {
    let mut env = Env::new();
    let kf = b.f32(1.0);
    env.insert(r.math.key_axis.0.clone(), kf);
    env.insert(r.math.value_axis.0.clone(), kf);
    let head_f = b.cast(channels, DType::F32);
    env.insert("head_index".into(), head_f);
    for (name, p) in per_head {
        let x = b.load(*p, channels, Some(inside), 0.0);
        env.insert(name.clone(), x);
    }
    env
}

/// One block of `rows` tokens from `c0`: each row's token, the `[rows, channels]` element offsets,
/// which elements lie inside the sequence and the channels, and the first and last rows.
struct Rows {
    /// `[rows, 1]` token index.
    t: Value,
    off: Value,
    mask: Value,
    /// `[rows, 1]`: row 0, and row `rows − 1`.
    first: Value,
    last: Value,
}

impl Rows {
    fn new(b: &mut Builder, lanes: &Lanes, c0: Value, rows: u32) -> Rows {
        let r = b.iota(rows);
        let t = b.add(r, c0);
        let t = b.col(t);
        let valid = b.cmp(CmpOp::Lt, t, lanes.eos);
        let row = b.mul(t, lanes.h_count);
        let off = b.add(row, lanes.channels);
        let mask = b.binary(BinOp::And, valid, lanes.inside);
        let r = b.col(r);
        let zero = b.i64(0);
        let first = b.cmp(CmpOp::Eq, r, zero);
        let end = b.i64(i64::from(rows) - 1);
        let last = b.cmp(CmpOp::Eq, r, end);
        Rows { t, off, mask, first, last }
    }

    /// The gate α of every element as a `[rows, channels]` tile: the declaration's decay where
    /// the element is inside the sequence and the channels, 1 elsewhere (so the state passes
    /// through rows past the end unchanged), and 1 everywhere for a recurrence without decay.
    fn gates(&self, b: &mut Builder, decay: Option<&hlac_grammar::ast::Expr>, env: &Env) -> Result<Value, String> {
        let one = b.f32(1.0);
        let shape = b.shape(self.off);
        Ok(match decay {
            Some(d) => {
                let a = expr::lower(b, d, env)?;
                let a = b.broadcast(a, &shape);
                b.select(self.mask, a, one)
            }
            None => b.broadcast(one, &shape),
        })
    }

    /// `env` with every token input's `[rows, channels]` tile loaded (zero outside).
    fn load_tokens(&self, b: &mut Builder, tokens: &Named, mut env: Env) -> Env {
        for (name, p) in tokens {
            let x = b.load(*p, self.off, Some(self.mask), 0.0);
            env.insert(name.clone(), x);
        }
        env
    }

    /// The tile's recurrence inputs: x = k·v (zero outside) and the gates α ([`Rows::gates`]).
    fn inputs(&self, b: &mut Builder, exprs: ScanExprs<'_>, env: &Env, shape: [u32; 2]) -> Result<(Value, Value), String> {
        let (key, value, decay) = exprs;
        let k = expr::lower(b, key, env)?;
        let v = expr::lower(b, value, env)?;
        let zero = b.f32(0.0);
        let kv = b.mul(k, v);
        let kv = b.broadcast(kv, &shape);
        let x = b.select(self.mask, kv, zero);
        Ok((x, self.gates(b, decay, env)?))
    }

    /// The recurrence along the tile's rows from the state `h` (`[channels]`) entering its first
    /// row: h_t = α_t h_{t−1} + x_t.
    fn recur(&self, b: &mut Builder, x: Value, a: Value, h: Value) -> Value {
        let zero = b.f32(0.0);
        let entering = b.mul(a, h);
        let entering = b.select(self.first, entering, zero);
        let x = b.add(x, entering);
        b.linear_scan(x, a, 0, false)
    }

    /// The row of a `[rows, channels]` tile that `which` (`first` or `last`) selects, as
    /// `[channels]`.
    fn pick(&self, b: &mut Builder, x: Value, which: Value) -> Value {
        let zero = b.f32(0.0);
        let only = b.select(which, x, zero);
        b.sum(only, 0)
    }
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
