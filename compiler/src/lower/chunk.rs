//! The scaffolding every chunked recurrence kernel shares: its parameters (the token inputs the
//! declaration's expressions use, per-head parameters, `lower_bound`, the output, initial and final
//! states, `cu_seqlens`), the decomposition of the grid into (sequence, head, value block), the
//! state tile's offsets, and per-chunk masked loads of the token inputs. The class-specific math
//! lives in [`super::decay`] and [`super::delta`].

use hlac_runtime::kir::build::Ptr;
use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, Value};

use super::expr::{self, Env};
use super::{LowerError, Recurrence, Tiling};

/// How an input's columns map onto the state: an input over V is read for this instance's value
/// block only.
#[derive(Clone, Copy)]
enum Axis {
    K,
    V,
    Scalar,
}

/// Which rows of `[tokens, heads, …]` tensors to read: `row` is token·heads + head ([R, 1]), `valid`
/// marks the rows inside the sequence.
#[derive(Clone, Copy)]
pub struct Rows {
    /// Row indices, [R, 1].
    pub row: Value,
    /// Rows to read, [R, 1] bool.
    pub valid: Value,
}

/// The inputs a recurrence's expressions read: token inputs, per-head parameters and
/// `lower_bound`, declared as kernel parameters in that order.
pub struct Inputs {
    tokens: Vec<(String, Ptr, Axis)>,
    head_params: Vec<(String, Ptr)>,
    lower_bound: Option<Ptr>,
}

impl Inputs {
    /// Declares a pointer parameter for every input `used` mentions.
    pub fn declare(b: &mut Builder, r: &Recurrence<'_>, used: &[String]) -> Inputs {
        let is_used = |n: &str| used.iter().any(|u| u == n);
        let mut tokens = Vec::new();
        for t in r.math.tokens.iter().filter(|t| is_used(&t.name.name)) {
            let axis = match &t.dim {
                None => Axis::Scalar,
                Some(d) if d.name == r.math.key_axis.0 => Axis::K,
                Some(_) => Axis::V,
            };
            tokens.push((t.name.name.clone(), b.ptr(&t.name.name, r.storage, false), axis));
        }
        let head_params =
            r.math.head_params.iter().filter(|p| is_used(&p.name)).map(|p| (p.name.clone(), b.ptr(&p.name, DType::F32, false))).collect();
        let lower_bound = is_used("lower_bound").then(|| b.ptr("lower_bound", DType::F32, false));
        Inputs { tokens, head_params, lower_bound }
    }

    /// Binds what is fixed for a head: the axis sizes, `head_index`, per-head parameters and the
    /// head's `lower_bound` row ([1, K]).
    pub fn bind_head(&self, b: &mut Builder, r: &Recurrence<'_>, head: Value, k_cols: Value) -> Env {
        let mut env = Env::new();
        let kf = b.f32(f64::from(r.k()));
        let vf = b.f32(f64::from(r.v()));
        env.insert(r.math.key_axis.0.clone(), kf);
        env.insert(r.math.value_axis.0.clone(), vf);
        let head_f = b.cast(head, DType::F32);
        env.insert("head_index".into(), head_f);
        for (name, p) in &self.head_params {
            let x = load_scalar(b, *p, head);
            env.insert(name.clone(), x);
        }
        if let Some(p) = self.lower_bound {
            let k_size = b.i64(i64::from(r.k()));
            let base = b.mul(head, k_size);
            let off = b.add(k_cols, base);
            let lb = b.load(p, off, None, 0.0);
            let lb = b.row(lb);
            env.insert("lower_bound".into(), lb);
        }
        env
    }

    /// Loads every token input for the rows `row` ([R, 1] token·heads + head) where `valid`; an
    /// input over V reads the columns `v_cols` only.
    pub fn load_rows(&self, b: &mut Builder, r: &Recurrence<'_>, env: &mut Env, rows: Rows, k_cols: Value, v_cols: Value) {
        let Rows { row, valid } = rows;
        for (name, p, axis) in &self.tokens {
            let (cols, width) = match axis {
                Axis::K => (k_cols, r.k()),
                Axis::V => (v_cols, r.v()),
                Axis::Scalar => (b.iota(1), 1),
            };
            let w = b.i64(i64::from(width));
            let base = b.mul(row, w);
            let cr = b.row(cols);
            let off = b.add(base, cr);
            let x = b.load(*p, off, Some(valid), 0.0);
            env.insert(name.clone(), x);
        }
    }
}

/// What every chunked recurrence kernel shares, built into a [`Builder`] by [`Scaffold::new`].
pub struct Scaffold {
    /// Names bound for the whole program (sizes, head parameters, `head_index`, `lower_bound`).
    pub env: Env,
    inputs: Inputs,
    /// The output pointer.
    pub o: Ptr,
    ht: Ptr,
    use_ht: Value,
    /// Heads as an i64 scalar.
    pub h_count: Value,
    /// This instance's head.
    pub head: Value,
    /// First token of this instance's sequence.
    pub bos: Value,
    /// Its length.
    pub len: Value,
    /// 0..K.
    pub k_cols: Value,
    /// This instance's value columns.
    pub v_cols: Value,
    /// Offsets of this instance's [K, block_v] state tile in `h0`/`ht`.
    pub s_off: Value,
    /// The initial state tile (zeros unless `use_h0`).
    pub s0: Value,
    /// Sizes.
    pub k: u32,
    /// Value size.
    pub v: u32,
    /// Chunk length.
    pub c: u32,
    /// Value block.
    pub bv: u32,
    /// Vector gates' sub-block rows ([`Tiling::sub_block`]).
    pub sub_block: u32,
    /// Whether the expressions use token positions (`rope`).
    needs_position: bool,
    /// Offsets of an element of the state tile relative to the tile's start.
    s_tile: Value,
    /// `states` (the state entering every chunk, for the backward) and the first chunk of this
    /// instance's sequence in it, when the kernel stores them.
    states: Option<(Ptr, Value)>,
}

/// One chunk's inputs.
pub struct Chunk {
    /// Names bound for this chunk: the static ones plus every token input ([C, D] tiles).
    pub env: Env,
    /// [C, 1] rows inside the sequence.
    pub valid: Value,
    /// [C, 1] token·heads + head, the row index into [tokens, heads, …] tensors.
    pub row: Value,
}

impl Scaffold {
    /// Declares the parameters and computes everything that does not change across chunks.
    /// `used` lists the names the class's expressions mention.
    /// With `store_states`, the kernel also takes `states` (`[chunks, heads, K, V]`, written) and
    /// `chunk_offsets` (`[sequences + 1]`, the first chunk of each sequence) and stores the state
    /// entering every chunk.
    pub fn new(
        r: &Recurrence<'_>,
        tiling: Tiling,
        kernel: &str,
        used: &[String],
        store_states: bool,
    ) -> Result<(Builder, Scaffold), LowerError> {
        let (k, v, c, bv, heads) = (r.k(), r.v(), tiling.chunk, tiling.block_v, r.heads as i64);
        if bv == 0 || v % bv != 0 {
            return Err(r.error(format!("block_v = {bv} does not divide V = {v}")));
        }
        r.check_storage()?;
        let mut b = Builder::new(&format!("{}_{kernel}", r.name), &["sequences * heads", "value blocks"]);
        let inputs = Inputs::declare(&mut b, r, used);
        let o = b.ptr("o", r.storage, true);
        let h0 = b.ptr("h0", DType::F32, false);
        let ht = b.ptr("ht", DType::F32, true);
        let cu = b.ptr("cu_seqlens", DType::I64, false);
        let use_h0 = b.int_param("use_h0");
        let use_ht = b.int_param("use_ht");
        let states_ptrs = store_states.then(|| (b.ptr("states", DType::F32, true), b.ptr("chunk_offsets", DType::I64, false)));

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
        let bos = load_scalar(&mut b, cu, seq);
        let eos = load_scalar(&mut b, cu, seq_next);
        let len = b.sub(eos, bos);

        let k_cols = b.iota(k);
        let v_iota = b.iota(bv);
        let v_cols = b.add(v_iota, v0);
        let kv = b.i64(i64::from(k) * i64::from(v));
        let sh = b.mul(seq, h_count);
        let sh = b.add(sh, head);
        let s_base = b.mul(sh, kv);
        let v_size = b.i64(i64::from(v));
        let kc = b.col(k_cols);
        let krow = b.mul(kc, v_size);
        let vr = b.row(v_cols);
        let s_tile = b.add(krow, vr);
        let s_off = b.add(s_tile, s_base);
        let zero = b.i64(0);
        let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero);
        let s0 = b.load(h0, s_off, Some(has_h0), 0.0);

        let env = inputs.bind_head(&mut b, r, head, k_cols);
        let needs_position =
            [&r.class.exprs.key, &r.class.exprs.query].iter().any(|e| e.as_ref().is_some_and(|e| super::expr::mentions_call(e, "rope")));
        let states = states_ptrs.map(|(p, offsets)| (p, load_scalar(&mut b, offsets, seq)));
        Ok((
            b,
            Scaffold {
                s_tile,
                states,
                needs_position,
                env,
                inputs,
                o,
                ht,
                use_ht,
                h_count,
                head,
                bos,
                len,
                k_cols,
                v_cols,
                s_off,
                s0,
                k,
                v,
                c,
                bv,
                sub_block: tiling.sub_block,
            },
        ))
    }

    /// Loads the token inputs of the chunk starting at `t0` (zero past the sequence's end).
    pub fn chunk(&self, b: &mut Builder, r: &Recurrence<'_>, t0: Value) -> Chunk {
        let iota_c = b.iota(self.c);
        let rows = b.add(iota_c, t0);
        let valid = b.cmp(CmpOp::Lt, rows, self.len);
        let valid = b.col(valid);
        let tok = b.add(rows, self.bos);
        let tok = b.col(tok);
        let row = b.mul(tok, self.h_count);
        let row = b.add(row, self.head);
        let mut env = self.env.clone();
        if self.needs_position {
            let pos = b.col(rows);
            let pos = b.cast(pos, DType::F32);
            env.insert(super::expr::POSITION.into(), pos);
        }
        self.inputs.load_rows(b, r, &mut env, Rows { row, valid }, self.k_cols, self.v_cols);
        Chunk { env, valid, row }
    }

    /// Stores the state entering the chunk that starts at token `t0`, when the kernel keeps states.
    pub fn store_state(&self, b: &mut Builder, t0: Value, s: Value) {
        let Some((p, chunk_base)) = self.states else { return };
        let c = b.i64(i64::from(self.c));
        let n = b.binary(BinOp::Div, t0, c);
        let n = b.add(n, chunk_base);
        let base = b.mul(n, self.h_count);
        let base = b.add(base, self.head);
        let kv = b.i64(i64::from(self.k) * i64::from(self.v));
        let base = b.mul(base, kv);
        let off = b.add(self.s_tile, base);
        b.store(p, off, s, None);
    }

    /// Stores a [C, block_v] output tile for the chunk's valid rows.
    pub fn store_output(&self, b: &mut Builder, chunk: &Chunk, o: Value) {
        let v_size = b.i64(i64::from(self.v));
        let base = b.mul(chunk.row, v_size);
        let vr = b.row(self.v_cols);
        let off = b.add(base, vr);
        b.store(self.o, off, o, Some(chunk.valid));
    }

    /// Stores the final state (when `use_ht`) and returns the finished program.
    pub fn finish(&self, mut b: Builder, s: Value) -> hlac_runtime::kir::Program {
        let zero = b.i64(0);
        let has_ht = b.cmp(CmpOp::Ne, self.use_ht, zero);
        b.store(self.ht, self.s_off, s, Some(has_ht));
        b.finish()
    }
}

/// Every name the class's expressions mention.
pub fn used_names(r: &Recurrence<'_>) -> Vec<String> {
    let ex = &r.class.exprs;
    let mut used = Vec::new();
    for e in [ex.decay.as_ref(), ex.beta.as_ref(), ex.key.as_ref(), ex.value.as_ref(), ex.query.as_ref(), ex.scale.as_ref()]
        .into_iter()
        .flatten()
    {
        expr::names(e, &mut used);
    }
    used
}

/// Loads one element at a scalar offset.
pub fn load_scalar(b: &mut Builder, ptr: Ptr, offset: Value) -> Value {
    let off = b.reshape(offset, &[1]);
    let x = b.load(ptr, off, None, 0.0);
    b.reshape(x, &[])
}

/// The per-chunk step of a chunked forward: stores the chunk's output, returns the next state.
pub type ChunkStep<'s> = dyn Fn(&Recurrence<'_>, &Scaffold, &mut Builder, &Chunk, Value) -> Result<Value, String> + 's;

/// Builds a chunked forward kernel: the scaffold, the loop over chunks carrying the state (storing
/// it first when `store_states`), `step` for each chunk, and the final state.
pub fn chunked_forward(r: &Recurrence<'_>, tiling: Tiling, store_states: bool, step: &ChunkStep<'_>) -> Result<super::Kernel, LowerError> {
    let name = if store_states { "chunk_fwd_states" } else { "chunk_fwd" };
    let (mut b, sc) = Scaffold::new(r, tiling, name, &used_names(r), store_states)?;
    let zero = b.i64(0);
    let chunk_len = b.i64(i64::from(sc.c));
    let mut failure = None;
    let out = b.for_loop(zero, sc.len, chunk_len, &[sc.s0], |b, t0, carried| {
        sc.store_state(b, t0, carried[0]);
        let chunk = sc.chunk(b, r, t0);
        match step(r, &sc, b, &chunk, carried[0]) {
            Ok(next) => vec![next],
            Err(e) => {
                failure = Some(e);
                vec![carried[0]]
            }
        }
    });
    if let Some(e) = failure {
        return Err(r.error(e));
    }
    let grid = vec!["sequences * heads".into(), format!("{} / {}", r.v(), sc.bv)];
    Ok(super::Kernel { program: sc.finish(b, out[0]), grid })
}

/// A chunk's effective q' = scale · query, key and value as [C, K], [C, K] and [C, block_v] tiles,
/// with k and v zero on rows past the sequence's end.
pub fn chunk_qkv(r: &Recurrence<'_>, sc: &Scaffold, b: &mut Builder, chunk: &Chunk) -> Result<(Value, Value, Value), String> {
    let ex = &r.class.exprs;
    let key = ex.key.as_ref().ok_or("no key expression")?;
    let value = ex.value.as_ref().ok_or("no value expression")?;
    let query = ex.query.as_ref().ok_or("the read-out has no query")?;
    let (env, valid) = (&chunk.env, chunk.valid);
    let zero = b.f32(0.0);
    let mut q = super::expr::lower(b, query, env)?;
    if let Some(scale) = &ex.scale {
        let s = super::expr::lower(b, scale, env)?;
        q = b.mul(q, s);
    }
    let q = b.broadcast(q, &[sc.c, sc.k]);
    let k = super::expr::lower(b, key, env)?;
    let k = b.broadcast(k, &[sc.c, sc.k]);
    let k = b.select(valid, k, zero);
    let v = super::expr::lower(b, value, env)?;
    let v = b.broadcast(v, &[sc.c, sc.bv]);
    let v = b.select(valid, v, zero);
    Ok((q, k, v))
}
