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

/// Which share of a chunk's work a forward kernel does.
///
/// The fused forward ([`Part::Whole`]) walks a sequence's chunks in one instance, computing each
/// chunk's output from the carried state and then the next state. The two-pass forward splits
/// that walk: a sequential pass ([`Part::State`]) carries only the state, storing the state
/// entering every chunk (and, for the delta class, Δ = U − W S, which the output reads), and a
/// pass with one instance per chunk ([`Part::Output`]) computes every chunk's output at once from
/// the stored states, so the intra-chunk products no longer wait on the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Output and next state, in one walk over the chunks.
    Whole,
    /// The next state only (and Δ for the delta class): the sequential pass.
    State,
    /// The output only, from the stored state entering the chunk: the chunk-parallel pass.
    Output,
}

impl Part {
    /// Whether the kernel computes outputs.
    pub fn output(self) -> bool {
        self != Part::State
    }

    /// Whether the kernel carries the state.
    pub fn state(self) -> bool {
        self != Part::Output
    }
}

/// What every chunked recurrence kernel shares, built into a [`Builder`] by [`Scaffold::new`].
pub struct Scaffold {
    /// Names bound for the whole program (sizes, head parameters, `head_index`, `lower_bound`).
    pub env: Env,
    inputs: Inputs,
    /// Which share of the work this kernel does.
    pub part: Part,
    /// The output pointer (not in [`Part::State`]).
    o: Option<Ptr>,
    /// `ht` and `use_ht` (not in [`Part::Output`]).
    ht: Option<(Ptr, Value)>,
    /// The delta class's Δ (`[tokens, heads, V]`, f32) that the two-pass forward's passes hand
    /// on: written by [`Part::State`], read by [`Part::Output`].
    pub v_new: Option<Ptr>,
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
    /// The state the instance starts from: zeros unless `use_h0` in a walk over the chunks; in
    /// [`Part::Output`], the stored state entering its chunk.
    pub s0: Value,
    /// [`Part::Output`]: the first token of its chunk within the sequence.
    pub t0: Option<Value>,
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
    /// `states` (the state entering every chunk, for the backward or the output pass) and the
    /// first chunk of this instance's sequence in it, when the kernel stores them (read in
    /// [`Part::Output`]).
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
    /// entering every chunk; [`Part::State`] always does, and [`Part::Output`] reads them.
    ///
    /// Parameters by part, after the token inputs, per-head parameters and `lower_bound`:
    /// `Whole`: `o`, `h0`, `ht`, `cu_seqlens`, `use_h0`, `use_ht` (then `states`, `chunk_offsets`
    /// with `store_states`); `State`: `h0`, `ht`, `cu_seqlens`, `use_h0`, `use_ht`, `states`,
    /// `chunk_offsets`, and `v_new` for the delta class; `Output`: `o`, `cu_seqlens`, `states`,
    /// `chunk_offsets`, and `v_new` for the delta class. `Output` has a third grid axis: the chunk
    /// of the sequence, `ceil(max_len / C)` of them (instances past a sequence's end store
    /// nothing).
    pub fn new(
        r: &Recurrence<'_>,
        tiling: Tiling,
        kernel: &str,
        used: &[String],
        part: Part,
        store_states: bool,
    ) -> Result<(Builder, Scaffold), LowerError> {
        let (k, v, c, bv, heads) = (r.k(), r.v(), tiling.chunk, tiling.block_v, r.heads as i64);
        if bv == 0 || v % bv != 0 {
            return Err(r.error(format!("block_v = {bv} does not divide V = {v}")));
        }
        r.check_storage()?;
        let store_states = store_states || part != Part::Whole;
        let axes: &[&str] =
            if part == Part::Output { &["sequences * heads", "value blocks", "chunks"] } else { &["sequences * heads", "value blocks"] };
        let mut b = Builder::new(&format!("{}_{kernel}", r.name), axes);
        let inputs = Inputs::declare(&mut b, r, used);
        let o = part.output().then(|| b.ptr("o", r.storage, true));
        let h0_ht = part.state().then(|| (b.ptr("h0", DType::F32, false), b.ptr("ht", DType::F32, true)));
        let cu = b.ptr("cu_seqlens", DType::I64, false);
        let flags = part.state().then(|| (b.int_param("use_h0"), b.int_param("use_ht")));
        let states_ptrs =
            store_states.then(|| (b.ptr("states", DType::F32, part != Part::Output), b.ptr("chunk_offsets", DType::I64, false)));
        let delta = r.class.family == crate::classify::Family::Delta;
        let v_new = (delta && part != Part::Whole).then(|| b.ptr("v_new", DType::F32, part == Part::State));

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
        let (s0, ht, t0) = match (h0_ht, flags) {
            (Some((h0, ht)), Some((use_h0, use_ht))) => {
                let has_h0 = b.cmp(CmpOp::Ne, use_h0, zero);
                (b.load(h0, s_off, Some(has_h0), 0.0), Some((ht, use_ht)), None)
            }
            _ => {
                // The chunk of grid axis 2, and the state entering it.
                let j = b.program_id(2);
                let c_i = b.i64(i64::from(c));
                let t0 = b.mul(j, c_i);
                let inside = b.cmp(CmpOp::Lt, t0, len);
                let (p, offsets) = states_ptrs.ok_or_else(|| r.error("the output pass reads stored states"))?;
                let first = load_scalar(&mut b, offsets, seq);
                let n = b.add(j, first);
                let off = state_offsets(&mut b, n, (h_count, head), k * v, s_tile);
                (b.load(p, off, Some(inside), 0.0), None, Some(t0))
            }
        };

        let env = inputs.bind_head(&mut b, r, head, k_cols);
        let needs_position =
            [&r.class.exprs.key, &r.class.exprs.query].iter().any(|e| e.as_ref().is_some_and(|e| super::expr::mentions_call(e, "rope")));
        let states = states_ptrs.filter(|_| part != Part::Output).map(|(p, offsets)| (p, load_scalar(&mut b, offsets, seq)));
        Ok((
            b,
            Scaffold {
                s_tile,
                states,
                needs_position,
                env,
                inputs,
                part,
                o,
                ht,
                v_new,
                h_count,
                head,
                bos,
                len,
                k_cols,
                v_cols,
                s_off,
                s0,
                t0,
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
        let off = state_offsets(b, n, (self.h_count, self.head), self.k * self.v, self.s_tile);
        b.store(p, off, s, None);
    }

    /// Stores a [C, block_v] output tile for the chunk's valid rows.
    pub fn store_output(&self, b: &mut Builder, chunk: &Chunk, o: Value) {
        if let Some(p) = self.o {
            self.store_rows(b, p, chunk, o);
        }
    }

    /// Offsets of this instance's value columns in the chunk's rows of a `[tokens, heads, V]`
    /// tensor ([C, block_v]).
    fn row_offsets(&self, b: &mut Builder, chunk: &Chunk) -> Value {
        let v_size = b.i64(i64::from(self.v));
        let base = b.mul(chunk.row, v_size);
        let vr = b.row(self.v_cols);
        b.add(base, vr)
    }

    /// Stores a [C, block_v] tile into the chunk's valid rows of the `[tokens, heads, V]` tensor `p`.
    pub fn store_rows(&self, b: &mut Builder, p: Ptr, chunk: &Chunk, x: Value) {
        let off = self.row_offsets(b, chunk);
        b.store(p, off, x, Some(chunk.valid));
    }

    /// Loads a [C, block_v] tile from the chunk's valid rows of the `[tokens, heads, V]` tensor
    /// `p` (zero on the others).
    pub fn load_rows(&self, b: &mut Builder, p: Ptr, chunk: &Chunk) -> Value {
        let off = self.row_offsets(b, chunk);
        b.load(p, off, Some(chunk.valid), 0.0)
    }

    /// Stores the final state (when `use_ht`, in a walk over the chunks) and returns the finished
    /// program.
    pub fn finish(&self, mut b: Builder, s: Value) -> hlac_runtime::kir::Program {
        if let Some((ht, use_ht)) = self.ht {
            let zero = b.i64(0);
            let has_ht = b.cmp(CmpOp::Ne, use_ht, zero);
            b.store(ht, self.s_off, s, Some(has_ht));
        }
        b.finish()
    }
}

/// Offsets of an instance's state tile (`s_tile`, relative to a state's start) in chunk `n`'s
/// states of `[chunks, heads, K, V]`, for head `head` of `heads`; `kv` is K · V.
fn state_offsets(b: &mut Builder, n: Value, (heads, head): (Value, Value), kv: u32, s_tile: Value) -> Value {
    let base = b.mul(n, heads);
    let base = b.add(base, head);
    let kv = b.i64(i64::from(kv));
    let base = b.mul(base, kv);
    b.add(s_tile, base)
}

/// Every name the class's expressions mention.
pub fn used_names(r: &Recurrence<'_>) -> Vec<String> {
    used_names_for(r, Part::Whole)
}

/// The names the expressions a `part` of the forward evaluates mention: the state's walk reads
/// the gate, β, key and value; the output the gate, key, query and scale, and the value unless
/// it is the delta class's (whose output reads Δ instead).
pub fn used_names_for(r: &Recurrence<'_>, part: Part) -> Vec<String> {
    let ex = &r.class.exprs;
    let delta = r.class.family == crate::classify::Family::Delta;
    let state = part.state();
    let output = part.output();
    let mut used = Vec::new();
    for (e, wanted) in [
        (ex.decay.as_ref(), true),
        (ex.beta.as_ref(), state),
        (ex.key.as_ref(), true),
        (ex.value.as_ref(), state || !delta),
        (ex.query.as_ref(), output),
        (ex.scale.as_ref(), output),
    ] {
        if let Some(e) = e.filter(|_| wanted) {
            expr::names(e, &mut used);
        }
    }
    used
}

/// Loads one element at a scalar offset.
pub fn load_scalar(b: &mut Builder, ptr: Ptr, offset: Value) -> Value {
    let off = b.reshape(offset, &[1]);
    let x = b.load(ptr, off, None, 0.0);
    b.reshape(x, &[])
}

/// The per-chunk step of a chunked forward: stores the chunk's output (unless the scaffold's part
/// is [`Part::State`]), returns the next state (the given one in [`Part::Output`]).
pub type ChunkStep<'s> = dyn Fn(&Recurrence<'_>, &Scaffold, &mut Builder, &Chunk, Value) -> Result<Value, String> + 's;

/// Builds a chunked forward kernel: the scaffold, the loop over chunks carrying the state (storing
/// it first when `store_states`), `step` for each chunk, and the final state.
pub fn chunked_forward(r: &Recurrence<'_>, tiling: Tiling, store_states: bool, step: &ChunkStep<'_>) -> Result<super::Kernel, LowerError> {
    let name = if store_states { "chunk_fwd_states" } else { "chunk_fwd" };
    walk(r, tiling, name, Part::Whole, store_states, step)
}

/// The two passes of the chunk-parallel forward ([`Part`]): the walk carrying the state
/// (`chunk_states`; grid: sequences × heads, V / block_v), then one instance per chunk computing
/// its output (`chunk_out`; grid: sequences × heads, V / block_v, ⌈max_len / C⌉). Their outputs
/// together are the fused forward's with `store_states`: `o`, `ht` and `states`.
pub fn two_pass_forward(r: &Recurrence<'_>, tiling: Tiling, step: &ChunkStep<'_>) -> Result<(super::Kernel, super::Kernel), LowerError> {
    let states = walk(r, tiling, "chunk_states", Part::State, true, step)?;
    let (mut b, sc) = Scaffold::new(r, tiling, "chunk_out", &used_names_for(r, Part::Output), Part::Output, true)?;
    let t0 = sc.t0.ok_or_else(|| r.error("the output pass has no chunk index"))?;
    let chunk = sc.chunk(&mut b, r, t0);
    step(r, &sc, &mut b, &chunk, sc.s0).map_err(|e| r.error(e))?;
    let grid = vec!["sequences * heads".into(), format!("{} / {}", r.v(), sc.bv), format!("ceil(max_len / {})", sc.c)];
    let out = super::Kernel { program: sc.finish(b, sc.s0), grid };
    Ok((states, out))
}

/// A kernel walking each sequence's chunks in order, carrying the state.
fn walk(
    r: &Recurrence<'_>,
    tiling: Tiling,
    name: &str,
    part: Part,
    store_states: bool,
    step: &ChunkStep<'_>,
) -> Result<super::Kernel, LowerError> {
    let (mut b, sc) = Scaffold::new(r, tiling, name, &used_names_for(r, part), part, store_states)?;
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

/// A chunk's effective q' = scale · query (when the part computes outputs), key and value (unless
/// the part is the delta class's output, which reads Δ instead) as [C, K], [C, K] and
/// [C, block_v] tiles, with k and v zero on rows past the sequence's end.
pub fn chunk_qkv(
    r: &Recurrence<'_>,
    sc: &Scaffold,
    b: &mut Builder,
    chunk: &Chunk,
) -> Result<(Option<Value>, Value, Option<Value>), String> {
    let ex = &r.class.exprs;
    let key = ex.key.as_ref().ok_or("no key expression")?;
    let value = ex.value.as_ref().ok_or("no value expression")?;
    let query = ex.query.as_ref().ok_or("the read-out has no query")?;
    let (env, valid) = (&chunk.env, chunk.valid);
    let zero = b.f32(0.0);
    let q = if sc.part.output() {
        let mut q = super::expr::lower(b, query, env)?;
        if let Some(scale) = &ex.scale {
            let s = super::expr::lower(b, scale, env)?;
            q = b.mul(q, s);
        }
        Some(b.broadcast(q, &[sc.c, sc.k]))
    } else {
        None
    };
    let k = super::expr::lower(b, key, env)?;
    let k = b.broadcast(k, &[sc.c, sc.k]);
    let k = b.select(valid, k, zero);
    let delta = r.class.family == crate::classify::Family::Delta;
    let v = if sc.part.state() || !delta {
        let v = super::expr::lower(b, value, env)?;
        let v = b.broadcast(v, &[sc.c, sc.bv]);
        Some(b.select(valid, v, zero))
    } else {
        None
    };
    Ok((q, k, v))
}
