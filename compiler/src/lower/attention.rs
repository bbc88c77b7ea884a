//! Causal softmax attention (fla's Attention layer): the flash-attention forward over packed
//! variable-length sequences, its backward (dq, dk, dv; [`backward`]), and one decode step over a
//! KV cache, lowered to kernel IR.
//!
//! Both kernels keep the online softmax of flash attention per row of queries: a running maximum
//! m, a running normaliser l and an unnormalised output acc, updated per block of keys as
//!
//! ```text
//! s = (q · scale) Kᵀ, masked to the visible keys     m' = max(m, rowmax s)
//! p = e^{s − m'} (0 where not visible)               l' = e^{m − m'} l + rowsum p
//! acc' = e^{m − m'} acc + p V                        o = acc / l,  lse = m + ln l
//! ```
//!
//! so that no exponent is ever positive and the full score matrix never exists. Query head h reads
//! kv head h / (heads / kv_heads) (GQA). A sliding window w lets query i see keys j with
//! i − w < j ≤ i; key blocks wholly outside the window or past the diagonal are never visited.
//! RoPE (non-interleaved halves, base θ, position = index within the sequence) is applied to q
//! and k inside the kernels: the partner half is the same tensor loaded with its columns rotated
//! by d/2, and cos/sin come from position × θ^(−2i/d), so no table is passed in.
//!
//! The backward is flash attention 2's: it recomputes the probabilities from the forward's `lse`
//! rather than keeping them, and splits into a dq kernel (per query block) and a dk/dv kernel (per
//! key block, summing over the group's query heads), so that every gradient element has exactly
//! one writer.

use hlac_runtime::kir::build::Ptr;
use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, ReduceOp, UnOp, Value};

use super::chunk::load_scalar;
use super::{Kernel, LowerError};

/// The masked-off score: finite, so that `m − m'` stays a number (−∞ − −∞ would be NaN) while
/// e^{−1e30 − m} is still exactly 0 for any real score m.
const NEG: f64 = -1e30;

/// What an attention layer computes (everything the kernels specialise on).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnConfig {
    /// The layer's name (prefix of the kernel names).
    pub name: String,
    /// Query heads H.
    pub heads: u32,
    /// Key/value heads H_kv (divides H; H_kv < H is grouped-query attention).
    pub kv_heads: u32,
    /// Query/key size per head d (even when RoPE is used).
    pub head_dim: u32,
    /// Value size per head.
    pub value_dim: u32,
    /// Sliding window w ≥ 1: query i sees keys j with i − w < j ≤ i (None = full causal).
    pub window: Option<u32>,
    /// RoPE base θ (None = no rotary embedding).
    pub rope_theta: Option<f64>,
    /// Score scale (fla: 1/√d).
    pub scale: f64,
    /// Element type in memory of q, k, v, o, their gradients and the KV cache (`lse` stays f32;
    /// see [`super::storage`]).
    pub storage: DType,
}

/// Static block sizes of the forward kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnTiling {
    /// Queries per program instance.
    pub block_q: u32,
    /// Keys per step of the online softmax.
    pub block_k: u32,
}

impl AttnConfig {
    fn error(&self, reason: impl Into<String>) -> LowerError {
        LowerError { mixer: self.name.clone(), reason: reason.into() }
    }

    /// Query heads per kv head, after checking that the sizes make sense.
    fn check(&self) -> Result<u32, LowerError> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(self.error(format!("kv_heads = {} must be positive and divide heads = {}", self.kv_heads, self.heads)));
        }
        if self.head_dim == 0 || self.value_dim == 0 {
            return Err(self.error("head_dim and value_dim must be positive"));
        }
        if self.rope_theta.is_some() && !self.head_dim.is_multiple_of(2) {
            return Err(self.error(format!("RoPE rotates halves of the head, so head_dim = {} must be even", self.head_dim)));
        }
        if let Some(theta) = self.rope_theta {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(self.error(format!("rope_theta = {theta} must be a positive number")));
            }
        }
        if self.window == Some(0) {
            return Err(self.error("a sliding window must be at least 1 token"));
        }
        if !self.scale.is_finite() {
            return Err(self.error("the score scale must be finite"));
        }
        super::check_storage(&self.name, self.storage)?;
        Ok(self.heads / self.kv_heads)
    }
}

/// The forward kernel over packed sequences.
///
/// Parameters, in order: `q` (`[tokens, heads, head_dim]`), `k` (`[tokens, kv_heads, head_dim]`),
/// `v` (`[tokens, kv_heads, value_dim]`), `o` (`[tokens, heads, value_dim]`), `lse`
/// (`[tokens, heads]`: ln Σ_j e^{s_ij} of the scaled scores, for the backward), `cu_seqlens`
/// (`[sequences + 1]`). Grid: sequences × heads, then ⌈max sequence length / block_q⌉ query
/// blocks; blocks past a sequence's end store nothing.
pub fn forward(cfg: &AttnConfig, tiling: AttnTiling) -> Result<Kernel, LowerError> {
    let group = cfg.check()?;
    let (d, dv, bq, bk) = (cfg.head_dim, cfg.value_dim, tiling.block_q, tiling.block_k);
    if bq == 0 || bk == 0 {
        return Err(cfg.error("block_q and block_k must be positive"));
    }
    let mut b = Builder::new(&format!("{}_flash_fwd", cfg.name), &["sequences * heads", "query blocks"]);
    let q_ptr = b.ptr("q", cfg.storage, false);
    let k_ptr = b.ptr("k", cfg.storage, false);
    let v_ptr = b.ptr("v", cfg.storage, false);
    let o_ptr = b.ptr("o", cfg.storage, true);
    let lse_ptr = b.ptr("lse", DType::F32, true);
    let cu_ptr = b.ptr("cu_seqlens", DType::I64, false);

    // Which (sequence, head, query block) this instance computes.
    let pid0 = b.program_id(0);
    let heads = b.i64(i64::from(cfg.heads));
    let seq = b.binary(BinOp::Div, pid0, heads);
    let head = b.binary(BinOp::Rem, pid0, heads);
    let group_v = b.i64(i64::from(group));
    let kv_head = b.binary(BinOp::Div, head, group_v);
    let one = b.i64(1);
    let seq_next = b.add(seq, one);
    let bos = load_scalar(&mut b, cu_ptr, seq);
    let eos = load_scalar(&mut b, cu_ptr, seq_next);
    let len = b.sub(eos, bos);
    let pid1 = b.program_id(1);
    let bq_v = b.i64(i64::from(bq));
    let q0 = b.mul(pid1, bq_v);

    // The query block: positions within the sequence, masked to the sequence.
    let iota_q = b.iota(bq);
    let rows = b.add(iota_q, q0);
    let row_valid = b.cmp(CmpOp::Lt, rows, len);
    let row_valid_c = b.col(row_valid);
    let q_tokens = b.add(rows, bos);
    let rope = cfg.rope_theta.map(|theta| Rope::new(&mut b, d, theta));
    let q = load_heads(&mut b, q_ptr, q_tokens, cfg.heads, head, d, Some(row_valid_c), rope.as_ref().map(|r| (r, rows)));
    let scale = b.f32(cfg.scale);
    let q = b.mul(q, scale);

    // Keys [lo, hi): from the window's start (or 0) up to the block's last query; an empty range
    // for blocks past the end.
    let bq_end = b.add(q0, bq_v);
    let hi = b.binary(BinOp::Min, bq_end, len);
    let zero_i = b.i64(0);
    let lo = match cfg.window {
        Some(w) => {
            let reach = b.i64(i64::from(w) - 1);
            let start = b.sub(q0, reach);
            b.max(start, zero_i)
        }
        None => zero_i,
    };
    let past_end = b.cmp(CmpOp::Ge, q0, len);
    let hi = b.select(past_end, lo, hi);

    let init = softmax_init(&mut b, bq, dv);
    let bk_v = b.i64(i64::from(bk));
    let out = b.for_loop(lo, hi, bk_v, &init, |b, j0, state| {
        let iota_k = b.iota(bk);
        let cols = b.add(iota_k, j0);
        let col_valid = b.cmp(CmpOp::Lt, cols, len);
        let col_valid_c = b.col(col_valid);
        let k_tokens = b.add(cols, bos);
        let k = load_heads(b, k_ptr, k_tokens, cfg.kv_heads, kv_head, d, Some(col_valid_c), rope.as_ref().map(|r| (r, cols)));
        let v = load_heads(b, v_ptr, k_tokens, cfg.kv_heads, kv_head, dv, Some(col_valid_c), None);
        let kt = b.transpose(k);
        let s = b.dot(q, kt);
        // Visible: an existing key, causal, and inside the window.
        let i = b.col(rows);
        let j = b.row(cols);
        let causal = b.cmp(CmpOp::Le, j, i);
        let exists = b.row(col_valid);
        let mut visible = b.binary(BinOp::And, causal, exists);
        if let Some(w) = cfg.window {
            let w_v = b.i64(i64::from(w));
            let first = b.sub(i, w_v);
            let inside = b.cmp(CmpOp::Gt, j, first);
            visible = b.binary(BinOp::And, visible, inside);
        }
        softmax_step(b, state, s, visible, v)
    });
    let (o, l) = softmax_finish(&mut b, &out);
    let log_l = b.unary(UnOp::Log, l);
    let lse = b.add(out[0], log_l);

    let o_off = head_offsets(&mut b, q_tokens, cfg.heads, head, dv);
    b.store(o_ptr, o_off, o, Some(row_valid_c));
    let lse_off = b.mul(q_tokens, heads);
    let lse_off = b.add(lse_off, head);
    b.store(lse_ptr, lse_off, lse, Some(row_valid));
    Ok(Kernel { program: b.finish(), grid: vec!["sequences * heads".into(), format!("ceil(max_len / {bq})")] })
}

/// One decode step: each sequence's new token attends over its cached keys and itself.
///
/// Parameters, in order: `q` (`[sequences, heads, head_dim]`), `k` (`[sequences, kv_heads,
/// head_dim]`) and `v` (`[sequences, kv_heads, value_dim]`), the new token of every sequence;
/// `k_cache` (`[sequences, max_len, kv_heads, head_dim]`, keys stored already rotated) and
/// `v_cache` (`[sequences, max_len, kv_heads, value_dim]`); `lengths` (`[sequences]`: tokens
/// cached so far, which is the new token's position); `o` (`[sequences, heads, value_dim]`); then
/// the integer `max_len`. Grid: sequences × heads.
///
/// The kernel writes the new token's (rotated) key and value into slot `lengths[n]` of the cache;
/// the caller then advances `lengths` by one. It never reads that slot (the new key is used from
/// registers), so the one instance per kv head that writes it races with no reader. The caller
/// keeps `lengths[n] < max_len`; a token at a full cache is attended to but not stored.
pub fn decode(cfg: &AttnConfig, block_k: u32) -> Result<Kernel, LowerError> {
    let group = cfg.check()?;
    let (d, dv, bk) = (cfg.head_dim, cfg.value_dim, block_k);
    if bk == 0 {
        return Err(cfg.error("block_k must be positive"));
    }
    let mut b = Builder::new(&format!("{}_decode", cfg.name), &["sequences * heads"]);
    let q_ptr = b.ptr("q", cfg.storage, false);
    let k_ptr = b.ptr("k", cfg.storage, false);
    let v_ptr = b.ptr("v", cfg.storage, false);
    let kc_ptr = b.ptr("k_cache", cfg.storage, true);
    let vc_ptr = b.ptr("v_cache", cfg.storage, true);
    let len_ptr = b.ptr("lengths", DType::I64, false);
    let o_ptr = b.ptr("o", cfg.storage, true);
    let max_len = b.int_param("max_len");

    let pid0 = b.program_id(0);
    let heads = b.i64(i64::from(cfg.heads));
    let seq = b.binary(BinOp::Div, pid0, heads);
    let head = b.binary(BinOp::Rem, pid0, heads);
    let group_v = b.i64(i64::from(group));
    let kv_head = b.binary(BinOp::Div, head, group_v);
    let pos = load_scalar(&mut b, len_ptr, seq);
    let pos_row = b.reshape(pos, &[1]);
    let seq_row = b.reshape(seq, &[1]);
    let rope = cfg.rope_theta.map(|theta| Rope::new(&mut b, d, theta));
    let rope = rope.as_ref().map(|r| (r, pos_row));

    // The new token, as one-row tiles; "token" here is the sequence's row in q, k, v.
    let q = load_heads(&mut b, q_ptr, seq_row, cfg.heads, head, d, None, rope);
    let scale = b.f32(cfg.scale);
    let q = b.mul(q, scale);
    let k_new = load_heads(&mut b, k_ptr, seq_row, cfg.kv_heads, kv_head, d, None, rope);
    let v_new = load_heads(&mut b, v_ptr, seq_row, cfg.kv_heads, kv_head, dv, None, None);

    // Cache slots are numbered seq · max_len + position, as if the cache were [slots, kv_heads, ·].
    let seq_base = b.mul(seq, max_len);
    let slot = b.add(pos_row, seq_base);
    let zero_i = b.i64(0);
    let head_in_group = b.binary(BinOp::Rem, head, group_v);
    let first_of_group = b.cmp(CmpOp::Eq, head_in_group, zero_i);
    let fits = b.cmp(CmpOp::Lt, pos, max_len);
    let writer = b.binary(BinOp::And, first_of_group, fits);
    let k_slot = head_offsets(&mut b, slot, cfg.kv_heads, kv_head, d);
    b.store(kc_ptr, k_slot, k_new, Some(writer));
    let v_slot = head_offsets(&mut b, slot, cfg.kv_heads, kv_head, dv);
    b.store(vc_ptr, v_slot, v_new, Some(writer));

    // Cached keys [lo, pos), then the new key itself.
    let lo = match cfg.window {
        Some(w) => {
            let reach = b.i64(i64::from(w) - 1);
            let start = b.sub(pos, reach);
            b.max(start, zero_i)
        }
        None => zero_i,
    };
    let init = softmax_init(&mut b, 1, dv);
    let bk_v = b.i64(i64::from(bk));
    let cached = b.for_loop(lo, pos, bk_v, &init, |b, j0, state| {
        let iota_k = b.iota(bk);
        let cols = b.add(iota_k, j0);
        let valid = b.cmp(CmpOp::Lt, cols, pos);
        let valid_c = b.col(valid);
        let slots = b.add(cols, seq_base);
        let k = load_heads(b, kc_ptr, slots, cfg.kv_heads, kv_head, d, Some(valid_c), None);
        let v = load_heads(b, vc_ptr, slots, cfg.kv_heads, kv_head, dv, Some(valid_c), None);
        let kt = b.transpose(k);
        let s = b.dot(q, kt);
        let visible = b.row(valid);
        softmax_step(b, state, s, visible, v)
    });
    let kt_new = b.transpose(k_new);
    let s_new = b.dot(q, kt_new);
    let always = b.bool(true);
    let all = b.broadcast(always, &[1, 1]);
    let last = softmax_step(&mut b, &cached, s_new, all, v_new);
    let (o, _) = softmax_finish(&mut b, &last);
    let o_off = head_offsets(&mut b, seq_row, cfg.heads, head, dv);
    b.store(o_ptr, o_off, o, None);
    Ok(Kernel { program: b.finish(), grid: vec!["sequences * heads".into()] })
}

/// The two kernels of the backward; see [`backward`].
#[derive(Debug, Clone)]
pub struct AttnBackward {
    /// dq: one instance per (sequence, query head, query block). Grid: sequences × heads, then
    /// ⌈max sequence length / block_q⌉.
    pub dq: Kernel,
    /// dk and dv: one instance per (sequence, kv head, key block). Grid: sequences × kv_heads, then
    /// ⌈max sequence length / block_k⌉.
    pub dkv: Kernel,
}

/// The flash-attention-2 backward over packed sequences, as two kernels that each own what they
/// write, so that no instance ever adds into memory another one writes (no atomics, no races):
///
/// - [`AttnBackward::dq`] walks the visible key blocks of its query block, as the forward does, and
///   accumulates dQ in registers.
/// - [`AttnBackward::dkv`] holds one key block and walks the `heads / kv_heads` query heads of its
///   group and, for each, the query blocks that can see the key block, accumulating dK and dV in
///   registers: the GQA sum over the group happens inside one instance.
///
/// Both recompute P = e^{scale · q kᵀ − lse} from the forward's `lse`, and D_i = rowsum(dO_i ⊙ O_i)
/// from its `o` (a [block, value_dim] product per block, cheaper than a third kernel and a scratch
/// buffer); then dV = Σ Pᵀ dO, dP = dO vᵀ, dS = P ⊙ (dP − D), dQ = scale · Σ dS k, dK = scale · Σ dSᵀ q,
/// with q and k rotated; RoPE's gradient then rotates dQ and dK back by −angle.
///
/// The kernels read only the forward's inputs and outputs and write disjoint buffers, so the
/// launcher may run them in either order or concurrently (the reference launcher runs `dq`, then
/// `dkv`). Parameters of both, in order: `q`, `k`, `v` (as in the forward), `o`, `lse` (the
/// forward's outputs), `do` (`[tokens, heads, value_dim]`), `cu_seqlens`; then `dq`
/// (`[tokens, heads, head_dim]`) for the first kernel, or `dk` (`[tokens, kv_heads, head_dim]`) and
/// `dv` (`[tokens, kv_heads, value_dim]`) for the second. Blocks past a sequence's end store nothing.
pub fn backward(cfg: &AttnConfig, tiling: AttnTiling) -> Result<AttnBackward, LowerError> {
    let group = cfg.check()?;
    if tiling.block_q == 0 || tiling.block_k == 0 {
        return Err(cfg.error("block_q and block_k must be positive"));
    }
    Ok(AttnBackward { dq: backward_dq(cfg, tiling, group), dkv: backward_dkv(cfg, tiling, group) })
}

/// The pointers every backward kernel reads, declared in the documented order.
struct BwdInputs {
    q: Ptr,
    k: Ptr,
    v: Ptr,
    o: Ptr,
    lse: Ptr,
    d_o: Ptr,
    cu: Ptr,
}

impl BwdInputs {
    fn declare(b: &mut Builder, cfg: &AttnConfig) -> BwdInputs {
        BwdInputs {
            q: b.ptr("q", cfg.storage, false),
            k: b.ptr("k", cfg.storage, false),
            v: b.ptr("v", cfg.storage, false),
            o: b.ptr("o", cfg.storage, false),
            lse: b.ptr("lse", DType::F32, false),
            d_o: b.ptr("do", cfg.storage, false),
            cu: b.ptr("cu_seqlens", DType::I64, false),
        }
    }
}

/// A block of queries of one head, as the backward needs it.
struct QueryBlock {
    /// Positions within the sequence, `[bq]`.
    rows: Value,
    /// Rows inside the sequence, `[bq]`.
    valid: Value,
    /// scale · rotated q, `[bq, d]` (zero past the end).
    q: Value,
    /// dO, `[bq, dv]`.
    d_o: Value,
    /// The forward's lse as a column, `[bq, 1]`.
    lse: Value,
    /// D = rowsum(dO ⊙ O) as a column, `[bq, 1]`.
    delta: Value,
}

/// Loads query block `rows` of head `head` (tokens `rows + bos`, valid below `len`).
#[allow(clippy::too_many_arguments)]
fn load_query_block(
    b: &mut Builder,
    cfg: &AttnConfig,
    p: &BwdInputs,
    rope: Option<&Rope>,
    rows: Value,
    bos: Value,
    len: Value,
    head: Value,
) -> QueryBlock {
    let (d, dv) = (cfg.head_dim, cfg.value_dim);
    let valid = b.cmp(CmpOp::Lt, rows, len);
    let valid_c = b.col(valid);
    let tokens = b.add(rows, bos);
    let q = load_heads(b, p.q, tokens, cfg.heads, head, d, Some(valid_c), rope.map(|r| (r, rows)));
    let scale = b.f32(cfg.scale);
    let q = b.mul(q, scale);
    let d_o = load_heads(b, p.d_o, tokens, cfg.heads, head, dv, Some(valid_c), None);
    let o = load_heads(b, p.o, tokens, cfg.heads, head, dv, Some(valid_c), None);
    let od = b.mul(o, d_o);
    let delta = b.sum(od, 1);
    let delta = b.col(delta);
    let heads = b.i64(i64::from(cfg.heads));
    let lse_off = b.mul(tokens, heads);
    let lse_off = b.add(lse_off, head);
    let lse = b.load(p.lse, lse_off, Some(valid), 0.0);
    let lse = b.col(lse);
    QueryBlock { rows, valid, q, d_o, lse, delta }
}

/// A block of keys of one kv head: positions, validity, rotated k `[bk, d]` and v `[bk, dv]`.
struct KeyBlock {
    cols: Value,
    valid: Value,
    k: Value,
    v: Value,
}

/// Loads key block `cols` of kv head `kv_head` (tokens `cols + bos`, valid below `len`).
#[allow(clippy::too_many_arguments)]
fn load_key_block(
    b: &mut Builder,
    cfg: &AttnConfig,
    p: &BwdInputs,
    rope: Option<&Rope>,
    cols: Value,
    bos: Value,
    len: Value,
    kv_head: Value,
) -> KeyBlock {
    let valid = b.cmp(CmpOp::Lt, cols, len);
    let valid_c = b.col(valid);
    let tokens = b.add(cols, bos);
    let k = load_heads(b, p.k, tokens, cfg.kv_heads, kv_head, cfg.head_dim, Some(valid_c), rope.map(|r| (r, cols)));
    let v = load_heads(b, p.v, tokens, cfg.kv_heads, kv_head, cfg.value_dim, Some(valid_c), None);
    KeyBlock { cols, valid, k, v }
}

/// P `[bq, bk]` and dS = P ⊙ (dO vᵀ − D) of a query block against a key block; both are exactly 0
/// where the key is not visible (past either end, after the query, or outside the window).
fn probs_and_ds(b: &mut Builder, cfg: &AttnConfig, qb: &QueryBlock, kb: &KeyBlock) -> (Value, Value) {
    let kt = b.transpose(kb.k);
    let s = b.dot(qb.q, kt);
    let i = b.col(qb.rows);
    let j = b.row(kb.cols);
    let causal = b.cmp(CmpOp::Le, j, i);
    let key_exists = b.row(kb.valid);
    let query_exists = b.col(qb.valid);
    let mut visible = b.binary(BinOp::And, causal, key_exists);
    // Rows past the end have dO = 0 and so contribute nothing anyway; masking them keeps e^{s − lse}
    // (with lse loaded as 0 there) from ever being evaluated on a score that is not a real one.
    visible = b.binary(BinOp::And, visible, query_exists);
    if let Some(w) = cfg.window {
        let w_v = b.i64(i64::from(w));
        let first = b.sub(i, w_v);
        let inside = b.cmp(CmpOp::Gt, j, first);
        visible = b.binary(BinOp::And, visible, inside);
    }
    // Masked before the exponential so that no infinity is ever formed: e^{NEG} is exactly 0, and a
    // visible s − lse is ≤ 0 up to rounding (lse is the log of a sum that includes e^s).
    let centred = b.sub(s, qb.lse);
    let neg = b.f32(NEG);
    let centred = b.select(visible, centred, neg);
    let p = b.exp(centred);
    let vt = b.transpose(kb.v);
    let dp = b.dot(qb.d_o, vt);
    let dp = b.sub(dp, qb.delta);
    let ds = b.mul(p, dp);
    (p, ds)
}

/// The sequence's start and length, from `cu_seqlens`.
fn sequence_bounds(b: &mut Builder, cu: Ptr, seq: Value) -> (Value, Value) {
    let one = b.i64(1);
    let seq_next = b.add(seq, one);
    let bos = load_scalar(b, cu, seq);
    let eos = load_scalar(b, cu, seq_next);
    let len = b.sub(eos, bos);
    (bos, len)
}

/// Rotates a gradient `[n, d]` with respect to rotated vectors back to the raw ones (identity
/// without RoPE).
fn unrotate_grad(b: &mut Builder, rope: Option<&(Rope, Value)>, grad: Value, positions: Value) -> Value {
    match rope {
        Some((rope, partner)) => {
            let partner_grad = b.dot(grad, *partner);
            rope.unrotate(b, grad, partner_grad, positions)
        }
        None => grad,
    }
}

/// The dq kernel: like the forward, one query block against its visible key blocks.
fn backward_dq(cfg: &AttnConfig, tiling: AttnTiling, group: u32) -> Kernel {
    let (d, bq, bk) = (cfg.head_dim, tiling.block_q, tiling.block_k);
    let mut b = Builder::new(&format!("{}_flash_bwd_dq", cfg.name), &["sequences * heads", "query blocks"]);
    let p = BwdInputs::declare(&mut b, cfg);
    let dq_ptr = b.ptr("dq", cfg.storage, true);

    let pid0 = b.program_id(0);
    let heads = b.i64(i64::from(cfg.heads));
    let seq = b.binary(BinOp::Div, pid0, heads);
    let head = b.binary(BinOp::Rem, pid0, heads);
    let group_v = b.i64(i64::from(group));
    let kv_head = b.binary(BinOp::Div, head, group_v);
    let (bos, len) = sequence_bounds(&mut b, p.cu, seq);
    let pid1 = b.program_id(1);
    let bq_v = b.i64(i64::from(bq));
    let q0 = b.mul(pid1, bq_v);
    let rope = cfg.rope_theta.map(|theta| {
        let r = Rope::new(&mut b, d, theta);
        let m = r.partner_matrix(&mut b, d);
        (r, m)
    });
    let iota_q = b.iota(bq);
    let rows = b.add(iota_q, q0);
    let qb = load_query_block(&mut b, cfg, &p, rope.as_ref().map(|r| &r.0), rows, bos, len, head);

    // The same key range as the forward: [window start or 0, the block's last query], empty past
    // the end.
    let bq_end = b.add(q0, bq_v);
    let hi = b.binary(BinOp::Min, bq_end, len);
    let zero_i = b.i64(0);
    let lo = match cfg.window {
        Some(w) => {
            let reach = b.i64(i64::from(w) - 1);
            let start = b.sub(q0, reach);
            b.max(start, zero_i)
        }
        None => zero_i,
    };
    let past_end = b.cmp(CmpOp::Ge, q0, len);
    let hi = b.select(past_end, lo, hi);
    let zero = b.f32(0.0);
    let init = b.broadcast(zero, &[bq, d]);
    let bk_v = b.i64(i64::from(bk));
    let out = b.for_loop(lo, hi, bk_v, &[init], |b, j0, state| {
        let iota_k = b.iota(bk);
        let cols = b.add(iota_k, j0);
        let kb = load_key_block(b, cfg, &p, rope.as_ref().map(|r| &r.0), cols, bos, len, kv_head);
        let (_, ds) = probs_and_ds(b, cfg, &qb, &kb);
        let dsk = b.dot(ds, kb.k);
        vec![b.add(state[0], dsk)]
    });
    let scale = b.f32(cfg.scale);
    let dq = b.mul(out[0], scale);
    let dq = unrotate_grad(&mut b, rope.as_ref(), dq, rows);
    let tokens = b.add(rows, bos);
    let off = head_offsets(&mut b, tokens, cfg.heads, head, d);
    let valid_c = b.col(qb.valid);
    b.store(dq_ptr, off, dq, Some(valid_c));
    Kernel { program: b.finish(), grid: vec!["sequences * heads".into(), format!("ceil(max_len / {bq})")] }
}

/// The dk/dv kernel: one key block against every query of its group that can see it.
fn backward_dkv(cfg: &AttnConfig, tiling: AttnTiling, group: u32) -> Kernel {
    let (d, dv, bq, bk) = (cfg.head_dim, cfg.value_dim, tiling.block_q, tiling.block_k);
    let mut b = Builder::new(&format!("{}_flash_bwd_dkv", cfg.name), &["sequences * kv_heads", "key blocks"]);
    let p = BwdInputs::declare(&mut b, cfg);
    let dk_ptr = b.ptr("dk", cfg.storage, true);
    let dv_ptr = b.ptr("dv", cfg.storage, true);

    let pid0 = b.program_id(0);
    let kv_heads = b.i64(i64::from(cfg.kv_heads));
    let seq = b.binary(BinOp::Div, pid0, kv_heads);
    let kv_head = b.binary(BinOp::Rem, pid0, kv_heads);
    let group_v = b.i64(i64::from(group));
    let first_head = b.mul(kv_head, group_v);
    let (bos, len) = sequence_bounds(&mut b, p.cu, seq);
    let pid1 = b.program_id(1);
    let bk_v = b.i64(i64::from(bk));
    let j0 = b.mul(pid1, bk_v);
    let rope = cfg.rope_theta.map(|theta| {
        let r = Rope::new(&mut b, d, theta);
        let m = r.partner_matrix(&mut b, d);
        (r, m)
    });
    let iota_k = b.iota(bk);
    let cols = b.add(iota_k, j0);
    let kb = load_key_block(&mut b, cfg, &p, rope.as_ref().map(|r| &r.0), cols, bos, len, kv_head);

    // Queries that see some key of [j0, j0 + bk): from j0 (causality) to the last key's window end,
    // i < j0 + bk − 1 + w, capped at the sequence's end; empty past the end.
    let lo = j0;
    let hi = match cfg.window {
        Some(w) => {
            let reach = b.i64(i64::from(bk) + i64::from(w) - 1);
            let end = b.add(j0, reach);
            b.binary(BinOp::Min, end, len)
        }
        None => len,
    };
    let past_end = b.cmp(CmpOp::Ge, j0, len);
    let hi = b.select(past_end, lo, hi);
    let zero = b.f32(0.0);
    let dk_init = b.broadcast(zero, &[bk, d]);
    let dv_init = b.broadcast(zero, &[bk, dv]);
    let zero_i = b.i64(0);
    let one_i = b.i64(1);
    let bq_v = b.i64(i64::from(bq));
    // The group's query heads, one after another, all adding into the same registers: the GQA sum.
    let out = b.for_loop(zero_i, group_v, one_i, &[dk_init, dv_init], |b, g, acc| {
        let head = b.add(first_head, g);
        b.for_loop(lo, hi, bq_v, acc, |b, i0, acc| {
            let iota_q = b.iota(bq);
            let rows = b.add(iota_q, i0);
            let qb = load_query_block(b, cfg, &p, rope.as_ref().map(|r| &r.0), rows, bos, len, head);
            let (pr, ds) = probs_and_ds(b, cfg, &qb, &kb);
            // Each product straight before the add that takes it, so the back end computes it
            // into the accumulator (no [bk, d] tile of its own).
            let pt = b.transpose(pr);
            let pdo = b.dot(pt, qb.d_o);
            let dv = b.add(acc[1], pdo);
            let dst = b.transpose(ds);
            // q is already scaled, so this is scale · dSᵀ q.
            let dsq = b.dot(dst, qb.q);
            let dk = b.add(acc[0], dsq);
            vec![dk, dv]
        })
    });
    let dk = unrotate_grad(&mut b, rope.as_ref(), out[0], cols);
    let tokens = b.add(cols, bos);
    let valid_c = b.col(kb.valid);
    let dk_off = head_offsets(&mut b, tokens, cfg.kv_heads, kv_head, d);
    b.store(dk_ptr, dk_off, dk, Some(valid_c));
    let dv_off = head_offsets(&mut b, tokens, cfg.kv_heads, kv_head, dv);
    b.store(dv_ptr, dv_off, out[1], Some(valid_c));
    Kernel { program: b.finish(), grid: vec!["sequences * kv_heads".into(), format!("ceil(max_len / {bk})")] }
}

/// Element offsets `[n, 1]` of column 0 of head `head` of the given rows of a `[rows, heads, width]`
/// tensor; adding a `[1, width]` row of column indices gives the tile's offsets.
fn head_base(b: &mut Builder, rows: Value, heads: u32, head: Value, width: u32) -> Value {
    let heads_v = b.i64(i64::from(heads));
    let width_v = b.i64(i64::from(width));
    let r = b.col(rows);
    let rh = b.mul(r, heads_v);
    let rh = b.add(rh, head);
    b.mul(rh, width_v)
}

/// Element offsets `[n, width]` of head `head` of the given rows of a `[rows, heads, width]` tensor.
fn head_offsets(b: &mut Builder, rows: Value, heads: u32, head: Value, width: u32) -> Value {
    let base = head_base(b, rows, heads, head, width);
    let cols = b.iota(width);
    let cols = b.row(cols);
    b.add(base, cols)
}

/// Loads head `head` of the given rows (`[n, width]`, zero where a `mask` is off), rotated by `rope`
/// at `positions` when given.
#[allow(clippy::too_many_arguments)]
fn load_heads(
    b: &mut Builder,
    ptr: Ptr,
    rows: Value,
    heads: u32,
    head: Value,
    width: u32,
    mask: Option<Value>,
    rope: Option<(&Rope, Value)>,
) -> Value {
    let base = head_base(b, rows, heads, head, width);
    let cols = b.iota(width);
    let cols = b.row(cols);
    let off = b.add(base, cols);
    let x = b.load(ptr, off, mask, 0.0);
    let Some((rope, positions)) = rope else {
        return x;
    };
    let partner_off = b.add(base, rope.partner_cols);
    let partner = b.load(ptr, partner_off, mask, 0.0);
    rope.rotate(b, x, partner, positions)
}

/// RoPE on non-interleaved halves: for pair i (columns i and i + d/2) at angle a = pos · θ^(−2i/d),
/// x_i ← x_i cos a − x_{i+d/2} sin a and x_{i+d/2} ← x_{i+d/2} cos a + x_i sin a. Holds the
/// position-independent rows, built once per kernel outside its loops.
///
/// The angle is formed in f32 as fla forms it (position × an f32 inverse frequency), so its
/// rounding grows with the position: against f64, the output's relative error is about 1e-6 at
/// position 783 and 3e-6 at 2048 (tests/tests/kernels_attention.rs); far longer contexts would
/// want the angle reduced in extended precision.
struct Rope {
    /// −1 on the first half, +1 on the second, `[1, d]`.
    sign: Value,
    /// (c + d/2) mod d: the partner column of each column, `[1, d]`.
    partner_cols: Value,
    /// The inverse frequencies ([`super::expr::rope_frequencies`]), built with the rest: two
    /// tables rebuilt at every key block were 10 % of the forward's time in the profile build.
    freqs: (Value, Value),
}

impl Rope {
    fn new(b: &mut Builder, d: u32, theta: f64) -> Rope {
        let cols = b.iota(d);
        let half = b.i64(i64::from(d / 2));
        let d_v = b.i64(i64::from(d));
        let shifted = b.add(cols, half);
        let partner_cols = b.binary(BinOp::Rem, shifted, d_v);
        let partner_cols = b.row(partner_cols);
        let first_half = b.cmp(CmpOp::Lt, cols, half);
        let minus = b.f32(-1.0);
        let plus = b.f32(1.0);
        let sign = b.select(first_half, minus, plus);
        let sign = b.row(sign);
        let freqs = super::expr::rope_frequencies(b, d, theta);
        Rope { sign, partner_cols, freqs }
    }

    /// Rotates `x` `[n, d]`, whose partner-column tile is `partner`, at `positions` (`[n]`, i64).
    fn rotate(&self, b: &mut Builder, x: Value, partner: Value, positions: Value) -> Value {
        self.turn(b, x, partner, positions, BinOp::Add)
    }

    /// The gradient through [`Rope::rotate`]: given dy `[n, d]` and its partner-column tile, returns
    /// dx. Since y_c = x_c cos a_c + sign_c x_{p(c)} sin a_c, with p an involution that keeps the
    /// pair's angle and flips its sign, dx_c = dy_c cos a_c − sign_c dy_{p(c)} sin a_c: the rotation
    /// by −a (grad.rs's dy·cos + (dy·sin)·Pᵀ, written with the forward's own angles).
    fn unrotate(&self, b: &mut Builder, dy: Value, partner: Value, positions: Value) -> Value {
        self.turn(b, dy, partner, positions, BinOp::Sub)
    }

    /// x cos a ± sign · partner · sin a (`Add` rotates by a, `Sub` by −a).
    fn turn(&self, b: &mut Builder, x: Value, partner: Value, positions: Value, op: BinOp) -> Value {
        let pos = b.cast(positions, DType::F32);
        let pos = b.col(pos);
        // The same accurate angles as the recurrences' RoPE (f64 frequencies, reduced mod 2π).
        let (cos, sin) = super::expr::rope_angles_at(b, self.freqs, pos);
        let xc = b.mul(x, cos);
        let ps = b.mul(partner, sin);
        let ps = b.mul(ps, self.sign);
        b.binary(op, xc, ps)
    }

    /// The 0/1 matrix `[d, d]` with M[j, c] = 1 where j = p(c), so that y · M is y with its columns
    /// permuted to their partners. Gradients live in registers, not memory, so the backward cannot
    /// reload them rotated the way the forward reloads q and k; a product with a permutation is
    /// exact in f32 (one nonzero term per output).
    fn partner_matrix(&self, b: &mut Builder, d: u32) -> Value {
        let iota = b.iota(d);
        let j = b.col(iota);
        let is_partner = b.cmp(CmpOp::Eq, j, self.partner_cols);
        let one = b.f32(1.0);
        let zero = b.f32(0.0);
        b.select(is_partner, one, zero)
    }
}

/// The online softmax's initial state for `rows` queries: m = NEG, l = 0, acc = 0.
fn softmax_init(b: &mut Builder, rows: u32, dv: u32) -> Vec<Value> {
    let neg = b.f32(NEG);
    let zero = b.f32(0.0);
    let m = b.broadcast(neg, &[rows]);
    let l = b.broadcast(zero, &[rows]);
    let acc = b.broadcast(zero, &[rows, dv]);
    vec![m, l, acc]
}

/// One block of keys: scores `s` `[rows, keys]` (already scaled), `visible` (bool, broadcastable to
/// `s`), values `v` `[keys, dv]`; returns the next (m, l, acc).
fn softmax_step(b: &mut Builder, state: &[Value], s: Value, visible: Value, v: Value) -> Vec<Value> {
    let (m, l, acc) = (state[0], state[1], state[2]);
    let neg = b.f32(NEG);
    let zero = b.f32(0.0);
    let s = b.select(visible, s, neg);
    let block_max = b.reduce(ReduceOp::Max, s, 1);
    let m_new = b.max(m, block_max);
    let shift = b.sub(m, m_new);
    let alpha = b.exp(shift);
    let m_col = b.col(m_new);
    let centred = b.sub(s, m_col);
    let p = b.exp(centred);
    // Explicitly zero, not e^{NEG − m'}: while no key has been visible yet m' is NEG too.
    let p = b.select(visible, p, zero);
    let l_scaled = b.mul(l, alpha);
    let p_sum = b.sum(p, 1);
    let l_new = b.add(l_scaled, p_sum);
    let alpha_col = b.col(alpha);
    let acc_scaled = b.mul(acc, alpha_col);
    let pv = b.dot(p, v);
    let acc_new = b.add(acc_scaled, pv);
    vec![m_new, l_new, acc_new]
}

/// o = acc / l, and the l it divided by (for lse = m + ln l); rows that saw no key (only past a
/// sequence's end) divide by 1.
fn softmax_finish(b: &mut Builder, state: &[Value]) -> (Value, Value) {
    let (l, acc) = (state[1], state[2]);
    let zero = b.f32(0.0);
    let one = b.f32(1.0);
    let seen = b.cmp(CmpOp::Gt, l, zero);
    let l = b.select(seen, l, one);
    let l_col = b.col(l);
    let o = b.div(acc, l_col);
    (o, l)
}
