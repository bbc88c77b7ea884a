//! The fused pieces around the mixers, forward and backward: the causal depthwise short
//! convolution over packed variable-length sequences (with optional SiLU, initial and final conv
//! state, and a one-token decode step), RMSNorm, and fla's gated RMSNorm (`FusedRMSNormGated`
//! with the swish gate), plus [`sum_partials`], which finishes the weight gradients, and
//! [`sum_blocks`], which finishes a value-block-split chunked backward's partial gradients.
//!
//! Layouts follow fla / PyTorch:
//! - conv input and output `[tokens, C]` (all H·D channels of a token in one row), weight
//!   `[C, 1, W]` (read as `[C, W]`: `weight[c·W + j]` multiplies x_{t − (W−1) + j}), and the conv
//!   state in fla's decode-cache layout `[sequences, C, W]`: the last W inputs of a sequence, newest
//!   in column W − 1. As an *initial* state only columns 1..W are history (column 0 would fall out
//!   of the window before it is used, so it is ignored); as a *final* state all W columns are
//!   written, so it feeds [`conv_step`] directly. Using the cache layout for both means prefill,
//!   decode and a resumed prefill exchange one buffer with no reshuffling.
//! - norm input, gate and output `[rows, D]`, weight `[D]`; rows are normalised independently.
//!
//! Weight gradients need a reduction over tokens, which programs cannot share without atomics:
//! every backward program writes its own partial sum (`dweight` is `[sequences, C, W]` for the
//! conv, one slice per sequence; `dw` is `[programs, D]` for the norms), and [`sum_partials`] —
//! a second tiny kernel — sums the leading axis. Norm backwards run a launcher-chosen number of
//! programs, each striding over row blocks, so the partial buffer stays small however many rows
//! there are.
//!
//! Every load and store is masked at the edges: tokens past a sequence's end, channels past C,
//! columns past D (norm tiles are padded to a power of two), rows past `rows`. Masked-off lanes
//! load zero, which every formula below tolerates (a zero row normalises to zero).

use hlac_runtime::kir::build::Ptr;
use hlac_runtime::kir::{BinOp, Builder, CmpOp, DType, UnOp, Value};

use super::{Kernel, LowerError};

/// A causal depthwise short convolution (fla's `ShortConvolution`, no bias, as fla's mixers use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv {
    /// Channels C (H·D of the projection it follows).
    pub channels: u32,
    /// Kernel width W (4 in fla's mixers).
    pub width: u32,
    /// Apply SiLU after the convolution.
    pub silu: bool,
    /// Tokens per loop step of one program.
    pub block_t: u32,
    /// Channels per program.
    pub block_c: u32,
    /// Element type in memory of the token tensors `x`, `y`, `dx`, `dy` (the weight, the conv
    /// state and the weight's partial gradients stay f32; see [`super::storage`]).
    pub storage: DType,
}

impl Conv {
    /// fla's setting for `channels` channels: width 4, SiLU, 64 tokens × 16 channels per step, f32
    /// storage (set [`Conv::storage`] for a bf16 or f16 model).
    pub fn fla(channels: u32) -> Conv {
        Conv { channels, width: 4, silu: true, block_t: 64, block_c: 16, storage: DType::F32 }
    }

    /// Programs on the channel axis of the grid: ⌈C / block_c⌉.
    pub fn channel_blocks(&self) -> u32 {
        self.channels.div_ceil(self.block_c.max(1))
    }

    fn check(&self, kernel: &str) -> Result<(), LowerError> {
        let zero = [("channels", self.channels), ("width", self.width), ("block_t", self.block_t), ("block_c", self.block_c)]
            .into_iter()
            .find(|(_, v)| *v == 0);
        match zero {
            Some((what, _)) => Err(error(kernel, format!("{what} must be positive"))),
            None => super::check_storage(kernel, self.storage),
        }
    }

    fn grid(&self) -> Vec<String> {
        vec!["sequences".into(), self.channel_blocks().to_string()]
    }
}

/// An RMSNorm over rows of width D, optionally gated: y = x · rsqrt(mean x² + eps) · w [· silu(g)].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// Row width D.
    pub dim: u32,
    /// The epsilon inside the square root (compiled in).
    pub eps: f64,
    /// Multiply by silu(g) of a gate input (fla's `FusedRMSNormGated`, swish activation).
    pub gated: bool,
    /// Rows per program (forward) or per loop step (backward).
    pub block_rows: u32,
    /// Element type in memory of the row tensors `x`, `g`, `y` and their gradients (the weight and
    /// its partial gradients stay f32; see [`super::storage`]).
    pub storage: DType,
}

impl Norm {
    /// The tile width: D rounded up to a power of two (the GPU back end wants power-of-two tiles;
    /// the padding is masked).
    pub fn padded_dim(&self) -> u32 {
        self.dim.next_power_of_two()
    }

    fn check(&self, kernel: &str) -> Result<(), LowerError> {
        if self.dim == 0 || self.block_rows == 0 {
            return Err(error(kernel, "dim and block_rows must be positive"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(error(kernel, format!("eps = {} must be positive and finite", self.eps)));
        }
        super::check_storage(kernel, self.storage)
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}_{suffix}", if self.gated { "rms_norm_gated" } else { "rms_norm" })
    }
}

fn error(kernel: &str, reason: impl Into<String>) -> LowerError {
    LowerError { mixer: kernel.to_string(), reason: reason.into() }
}

fn and(b: &mut Builder, x: Value, y: Value) -> Value {
    b.binary(BinOp::And, x, y)
}

/// An integer parameter used as a switch: true when non-zero.
fn flag(b: &mut Builder, v: Value) -> Value {
    let zero = b.i64(0);
    b.cmp(CmpOp::Ne, v, zero)
}

/// Loads one element at a scalar offset (unmasked: callers pass offsets known to be in range).
fn load_scalar(b: &mut Builder, ptr: Ptr, offset: Value) -> Value {
    let off = b.reshape(offset, &[1]);
    let x = b.load(ptr, off, None, 0.0);
    b.reshape(x, &[])
}

/// d silu(p)/dp = σ(p) · (1 + p · (1 − σ(p))).
fn silu_grad(b: &mut Builder, p: Value) -> Value {
    let s = b.unary(UnOp::Sigmoid, p);
    let one = b.f32(1.0);
    let oms = b.sub(one, s);
    let t = b.mul(p, oms);
    let t = b.add(t, one);
    b.mul(s, t)
}

/// What every conv program knows: its sequence, its channels, the weights of its channels.
struct ConvCtx {
    c: Conv,
    x: Ptr,
    h0: Ptr,
    /// Bool scalar: whether an initial state is given.
    use_h0: Value,
    bos: Value,
    len: Value,
    /// This program's channels, `[1, block_c]` i64.
    chan: Value,
    /// Which of them exist (the last block is partial), `[1, block_c]` bool.
    chan_ok: Value,
    /// Weight of tap j for these channels, `[1, block_c]` f32 each.
    taps: Vec<Value>,
    /// Where this sequence's state rows for these channels start in a `[sequences, C, W]`
    /// buffer, `[1, block_c]` i64.
    state_base: Value,
}

impl ConvCtx {
    /// Grid: axis 0 is the sequence, axis 1 the channel block.
    fn new(b: &mut Builder, c: Conv, x: Ptr, weight: Ptr, h0: Ptr, cu: Ptr, use_h0: Value) -> ConvCtx {
        let seq = b.program_id(0);
        let blk = b.program_id(1);
        let one = b.i64(1);
        let next = b.add(seq, one);
        let bos = load_scalar(b, cu, seq);
        let eos = load_scalar(b, cu, next);
        let len = b.sub(eos, bos);
        let bc = b.i64(i64::from(c.block_c));
        let c0 = b.mul(blk, bc);
        let iota = b.iota(c.block_c);
        let chan = b.add(iota, c0);
        let chan = b.row(chan);
        let cn = b.i64(i64::from(c.channels));
        let chan_ok = b.cmp(CmpOp::Lt, chan, cn);
        let wd = b.i64(i64::from(c.width));
        let wbase = b.mul(chan, wd);
        let taps = (0..c.width)
            .map(|j| {
                let jv = b.i64(i64::from(j));
                let off = b.add(wbase, jv);
                b.load(weight, off, Some(chan_ok), 0.0)
            })
            .collect();
        let use_h0 = flag(b, use_h0);
        let cw = b.i64(i64::from(c.channels) * i64::from(c.width));
        let sbase = b.mul(seq, cw);
        let state_base = b.add(wbase, sbase);
        ConvCtx { c, x, h0, use_h0, len, bos, chan, chan_ok, taps, state_base }
    }

    /// Offsets and mask of positions `pos` (`[R, 1]` i64, relative to the sequence start) of this
    /// program's channels in a `[tokens, C]` buffer; the mask holds inside the sequence.
    fn token_offsets(&self, b: &mut Builder, pos: Value) -> (Value, Value) {
        let zero = b.i64(0);
        let ge0 = b.cmp(CmpOp::Ge, pos, zero);
        let lt = b.cmp(CmpOp::Lt, pos, self.len);
        let inside = and(b, ge0, lt);
        let mask = and(b, inside, self.chan_ok);
        let tok = b.add(pos, self.bos);
        let cn = b.i64(i64::from(self.c.channels));
        let row = b.mul(tok, cn);
        (b.add(row, self.chan), mask)
    }

    /// Offsets of columns `col` (any shape broadcastable against `[1, block_c]`, i64) of this
    /// sequence's state for this program's channels in a `[sequences, C, W]` buffer.
    fn state_offsets(&self, b: &mut Builder, col: Value) -> Value {
        b.add(col, self.state_base)
    }

    /// The convolution's input at positions `pos` (`[R]` i64, relative to the sequence start), as
    /// `[R, block_c]`: x inside the sequence, the initial state's history for the W − 1 positions
    /// before it (state column W + pos), zero elsewhere. The two masked loads never overlap, so
    /// their sum is the input.
    fn input_at(&self, b: &mut Builder, pos: Value) -> Value {
        let p = b.col(pos);
        let (off, mask) = self.token_offsets(b, p);
        let xv = b.load(self.x, off, Some(mask), 0.0);
        let wd = b.i64(i64::from(self.c.width));
        let col = b.add(p, wd);
        let one = b.i64(1);
        let zero = b.i64(0);
        let in_window = b.cmp(CmpOp::Ge, col, one);
        let before = b.cmp(CmpOp::Lt, p, zero);
        let hist = and(b, in_window, before);
        let hist = and(b, hist, self.use_h0);
        let hist = and(b, hist, self.chan_ok);
        let hoff = self.state_offsets(b, col);
        let hv = b.load(self.h0, hoff, Some(hist), 0.0);
        b.add(xv, hv)
    }

    fn ty_rows(&self, b: &Builder, pos: Value) -> u32 {
        b.shape(pos).first().copied().unwrap_or(1)
    }

    /// The pre-activation Σ_j w_j · input(pos − (W−1) + j) at positions `pos` (`[R]`), and the
    /// inputs it read (one `[R, block_c]` tile per tap, for the weight gradient).
    fn pre_activation(&self, b: &mut Builder, pos: Value) -> (Value, Vec<Value>) {
        let mut inputs = Vec::new();
        let mut acc = None;
        for j in 0..self.c.width {
            let shift = b.i64(i64::from(j) - (i64::from(self.c.width) - 1));
            let at = b.add(pos, shift);
            let xin = self.input_at(b, at);
            let term = b.mul(xin, self.taps[j as usize]);
            acc = Some(match acc {
                Some(a) => b.add(a, term),
                None => term,
            });
            inputs.push(xin);
        }
        let p = match acc {
            Some(p) => p,
            // Unreachable: `check` guarantees W ≥ 1. An empty convolution would be zero.
            None => {
                let z = b.f32(0.0);
                let shape = [self.ty_rows(b, pos), self.c.block_c];
                b.broadcast(z, &shape)
            }
        };
        (p, inputs)
    }

    /// The gradient of the loss with respect to the pre-activation at positions `pos` (`[R]`):
    /// dy, times silu′ of the recomputed pre-activation when SiLU is fused; zero outside the sequence.
    fn d_pre(&self, b: &mut Builder, dy: Ptr, pos: Value, pre: Option<Value>) -> Value {
        let p = b.col(pos);
        let (off, mask) = self.token_offsets(b, p);
        let g = b.load(dy, off, Some(mask), 0.0);
        if !self.c.silu {
            return g;
        }
        let pre = match pre {
            Some(v) => v,
            None => self.pre_activation(b, pos).0,
        };
        let s = silu_grad(b, pre);
        b.mul(g, s)
    }

    /// The gradient with respect to the input at positions `pos` (`[R]`, in the sequence or in the
    /// initial state's history): Σ_s w_{W−1−s} · dpre(pos + s), plus the final state's gradient
    /// where that input is column pos − (len − W) of the final state. `dp0` is dpre(pos) when the
    /// caller has it already.
    fn d_input(&self, b: &mut Builder, dy: Ptr, dht: Ptr, use_dht: Value, pos: Value, dp0: Option<Value>) -> Value {
        let w = self.c.width;
        let mut acc = match dp0 {
            Some(d) => d,
            None => self.d_pre(b, dy, pos, None),
        };
        acc = b.mul(acc, self.taps[(w - 1) as usize]);
        for s in 1..w {
            let sv = b.i64(i64::from(s));
            let at = b.add(pos, sv);
            let d = self.d_pre(b, dy, at, None);
            let term = b.mul(d, self.taps[(w - 1 - s) as usize]);
            acc = b.add(acc, term);
        }
        let p = b.col(pos);
        let wd = b.i64(i64::from(w));
        let start = b.sub(self.len, wd);
        let col = b.sub(p, start);
        let zero = b.i64(0);
        let ge0 = b.cmp(CmpOp::Ge, col, zero);
        let ltw = b.cmp(CmpOp::Lt, col, wd);
        let m = and(b, ge0, ltw);
        let m = and(b, m, use_dht);
        let m = and(b, m, self.chan_ok);
        let off = self.state_offsets(b, col);
        let g = b.load(dht, off, Some(m), 0.0);
        b.add(acc, g)
    }
}

/// The conv forward over a packed batch.
///
/// Parameters: `x` `[tokens, C]`, `weight` `[C, W]`, `h0` `[sequences, C, W]` (read when `use_h0`
/// ≠ 0; may be empty otherwise), `y` `[tokens, C]`, `ht` `[sequences, C, W]` (written when
/// `use_ht` ≠ 0), `cu_seqlens` `[sequences + 1]`, then the integers `use_h0`, `use_ht`.
/// Grid: sequences × ⌈C / block_c⌉; each program walks its sequence in blocks of `block_t` tokens.
pub fn conv_forward(c: &Conv) -> Result<Kernel, LowerError> {
    let name = "short_conv_fwd";
    c.check(name)?;
    let mut b = Builder::new(name, &["sequences", "channel blocks"]);
    let x = b.ptr("x", c.storage, false);
    let weight = b.ptr("weight", DType::F32, false);
    let h0 = b.ptr("h0", DType::F32, false);
    let y = b.ptr("y", c.storage, true);
    let ht = b.ptr("ht", DType::F32, true);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let use_h0 = b.int_param("use_h0");
    let use_ht = b.int_param("use_ht");
    let k = ConvCtx::new(&mut b, *c, x, weight, h0, cu, use_h0);

    let zero = b.i64(0);
    let bt = b.i64(i64::from(c.block_t));
    b.for_loop(zero, k.len, bt, &[], |b, t0, _| {
        let it = b.iota(c.block_t);
        let pos = b.add(it, t0);
        let (p, _) = k.pre_activation(b, pos);
        let out = if c.silu { b.unary(UnOp::Silu, p) } else { p };
        let pc = b.col(pos);
        let (off, mask) = k.token_offsets(b, pc);
        b.store(y, off, out, Some(mask));
        Vec::new()
    });

    // The final cache holds the inputs at positions len − W .. len (history or zero where the
    // sequence is shorter than W).
    let iw = b.iota(c.width);
    let wd = b.i64(i64::from(c.width));
    let start = b.sub(k.len, wd);
    let pos = b.add(iw, start);
    let last = k.input_at(&mut b, pos);
    let col = b.col(iw);
    let off = k.state_offsets(&mut b, col);
    let want = flag(&mut b, use_ht);
    let mask = and(&mut b, want, k.chan_ok);
    b.store(ht, off, last, Some(mask));
    Ok(Kernel { program: b.finish(), grid: c.grid() })
}

/// The conv backward over a packed batch: dx, the initial state's gradient, and per-sequence
/// partial weight gradients.
///
/// Parameters: `x`, `weight`, `h0` as in [`conv_forward`], `dy` `[tokens, C]`, `dht`
/// `[sequences, C, W]` (the final state's gradient, read when `use_dht` ≠ 0), `dx` `[tokens, C]`,
/// `dh0` `[sequences, C, W]` (written when `use_h0` ≠ 0; column 0 is not history and gets zero),
/// `dweight` `[sequences, C, W]` (partial sums: sequence n's contribution; finish with
/// [`sum_partials`] over `sequences` parts of C·W columns), `cu_seqlens`, then `use_h0`, `use_dht`.
///
/// With SiLU fused, dpre at the W positions each input feeds is recomputed from x rather than
/// stored by the forward (W + 1 loads per position; on the GPU they hit cache), so the forward
/// saves nothing. Grid as the forward.
pub fn conv_backward(c: &Conv) -> Result<Kernel, LowerError> {
    let name = "short_conv_bwd";
    c.check(name)?;
    let mut b = Builder::new(name, &["sequences", "channel blocks"]);
    let x = b.ptr("x", c.storage, false);
    let weight = b.ptr("weight", DType::F32, false);
    let h0 = b.ptr("h0", DType::F32, false);
    let dy = b.ptr("dy", c.storage, false);
    let dht = b.ptr("dht", DType::F32, false);
    let dx = b.ptr("dx", c.storage, true);
    let dh0 = b.ptr("dh0", DType::F32, true);
    let dweight = b.ptr("dweight", DType::F32, true);
    let cu = b.ptr("cu_seqlens", DType::I64, false);
    let use_h0 = b.int_param("use_h0");
    let use_dht = b.int_param("use_dht");
    let k = ConvCtx::new(&mut b, *c, x, weight, h0, cu, use_h0);
    let use_dht = flag(&mut b, use_dht);

    let zero = b.i64(0);
    let bt = b.i64(i64::from(c.block_t));
    let zero_f = b.f32(0.0);
    let dw0 = b.broadcast(zero_f, &[c.block_c]);
    let init = vec![dw0; c.width as usize];
    let dw = b.for_loop(zero, k.len, bt, &init, |b, t0, dw| {
        let it = b.iota(c.block_t);
        let pos = b.add(it, t0);
        let (p, inputs) = k.pre_activation(b, pos);
        let dp = k.d_pre(b, dy, pos, Some(p));
        let g = k.d_input(b, dy, dht, use_dht, pos, Some(dp));
        let pc = b.col(pos);
        let (off, mask) = k.token_offsets(b, pc);
        b.store(dx, off, g, Some(mask));
        // dw_j += Σ_t dpre(t) · input(t − (W−1) + j); rows outside the sequence have dpre = 0.
        dw.iter()
            .zip(&inputs)
            .map(|(acc, xin)| {
                let prod = b.mul(dp, *xin);
                let s = b.sum(prod, 0);
                b.add(*acc, s)
            })
            .collect()
    });
    for (j, acc) in dw.iter().enumerate() {
        let jv = b.i64(j as i64);
        let off = k.state_offsets(&mut b, jv);
        let v = b.row(*acc);
        b.store(dweight, off, v, Some(k.chan_ok));
    }

    // The initial state's history sits at positions −(W−1) .. −1, i.e. column W + pos.
    let iw = b.iota(c.width);
    let wd = b.i64(i64::from(c.width));
    let pos = b.sub(iw, wd);
    let g = k.d_input(&mut b, dy, dht, use_dht, pos, None);
    let col = b.col(iw);
    let one = b.i64(1);
    let history = b.cmp(CmpOp::Ge, col, one);
    let g = b.select(history, g, zero_f);
    let off = k.state_offsets(&mut b, col);
    let mask = and(&mut b, k.use_h0, k.chan_ok);
    b.store(dh0, off, g, Some(mask));
    Ok(Kernel { program: b.finish(), grid: c.grid() })
}

/// One decode step: one new token per sequence shifts into the `[sequences, C, W]` cache (in
/// place), and the output is the convolution over the updated cache (SiLU when fused).
///
/// Parameters: `x` `[sequences, C]`, `weight` `[C, W]`, `state` `[sequences, C, W]` (read and
/// written), `y` `[sequences, C]`. Grid: sequences × ⌈C / block_c⌉ (`block_t` is unused).
pub fn conv_step(c: &Conv) -> Result<Kernel, LowerError> {
    let name = "short_conv_step";
    c.check(name)?;
    let mut b = Builder::new(name, &["sequences", "channel blocks"]);
    let x = b.ptr("x", c.storage, false);
    let weight = b.ptr("weight", DType::F32, false);
    let state = b.ptr("state", DType::F32, true);
    let y = b.ptr("y", c.storage, true);

    let seq = b.program_id(0);
    let blk = b.program_id(1);
    let bc = b.i64(i64::from(c.block_c));
    let c0 = b.mul(blk, bc);
    let iota = b.iota(c.block_c);
    let chan = b.add(iota, c0);
    let cn = b.i64(i64::from(c.channels));
    let chan_ok = b.cmp(CmpOp::Lt, chan, cn);
    let chan_c = b.col(chan);
    let ok_c = b.col(chan_ok);
    let wd = b.i64(i64::from(c.width));
    let iw = b.iota(c.width);
    let jr = b.row(iw);
    let cw = b.i64(i64::from(c.channels) * i64::from(c.width));
    let base = b.mul(seq, cw);
    let crow = b.mul(chan_c, wd);
    let wrow = b.add(crow, jr);
    let off = b.add(wrow, base);

    // Column j takes old column j + 1; the last column takes the new token.
    let last_col = b.i64(i64::from(c.width) - 1);
    let shifted = b.cmp(CmpOp::Lt, jr, last_col);
    let shift_ok = and(&mut b, shifted, ok_c);
    let one = b.i64(1);
    let next = b.add(off, one);
    let old = b.load(state, next, Some(shift_ok), 0.0);
    let srow = b.mul(seq, cn);
    let xoff = b.add(chan_c, srow);
    let xv = b.load(x, xoff, Some(ok_c), 0.0);
    let is_last = b.cmp(CmpOp::Eq, jr, last_col);
    let new = b.select(is_last, xv, old);
    b.store(state, off, new, Some(ok_c));

    let w = b.load(weight, wrow, Some(ok_c), 0.0);
    let prod = b.mul(new, w);
    let p = b.sum(prod, 1);
    let out = if c.silu { b.unary(UnOp::Silu, p) } else { p };
    let yoff = b.add(chan, srow);
    b.store(y, yoff, out, Some(chan_ok));
    Ok(Kernel { program: b.finish(), grid: c.grid() })
}

/// A block of rows of a `[rows, D]` buffer: offsets `[BR, Dp]`, mask, the column indices `[Dp]`
/// and their mask `[Dp]`.
struct RowBlock {
    off: Value,
    mask: Value,
    cols: Value,
    cols_ok: Value,
}

fn row_block(b: &mut Builder, n: &Norm, r0: Value, rows: Value) -> RowBlock {
    let ir = b.iota(n.block_rows);
    let r = b.add(ir, r0);
    let rc = b.col(r);
    let rok = b.cmp(CmpOp::Lt, rc, rows);
    let cols = b.iota(n.padded_dim());
    let d = b.i64(i64::from(n.dim));
    let cols_ok = b.cmp(CmpOp::Lt, cols, d);
    let cr = b.row(cols);
    let cok = b.row(cols_ok);
    let mask = and(b, rok, cok);
    let base = b.mul(rc, d);
    let off = b.add(base, cr);
    RowBlock { off, mask, cols, cols_ok }
}

/// x̂ = x · rsqrt(mean x² + eps) over the last axis of `x` (`[BR, Dp]`, zero in the padding), and
/// the per-row factor as a `[BR, 1]` column.
fn normalise(b: &mut Builder, n: &Norm, x: Value) -> (Value, Value) {
    let sq = b.mul(x, x);
    let ss = b.sum(sq, 1);
    let d = b.f32(f64::from(n.dim));
    let mean = b.div(ss, d);
    let eps = b.f32(n.eps);
    let var = b.add(mean, eps);
    let rstd = b.unary(UnOp::Rsqrt, var);
    let rstd = b.col(rstd);
    (b.mul(x, rstd), rstd)
}

/// The norm forward: one program per block of `block_rows` rows.
///
/// Parameters: `x` `[rows, D]`, `g` `[rows, D]` (gated only), `w` `[D]`, `y` `[rows, D]`, then the
/// integer `rows`. Grid: ⌈rows / block_rows⌉. Nothing is saved for the backward, which
/// recomputes the row statistics from x (one reduction over a row it loads anyway).
pub fn norm_forward(n: &Norm) -> Result<Kernel, LowerError> {
    let name = n.name("fwd");
    n.check(&name)?;
    let mut b = Builder::new(&name, &["row blocks"]);
    let x = b.ptr("x", n.storage, false);
    let g = n.gated.then(|| b.ptr("g", n.storage, false));
    let w = b.ptr("w", DType::F32, false);
    let y = b.ptr("y", n.storage, true);
    let rows = b.int_param("rows");

    let pid = b.program_id(0);
    let br = b.i64(i64::from(n.block_rows));
    let r0 = b.mul(pid, br);
    let rb = row_block(&mut b, n, r0, rows);
    let xv = b.load(x, rb.off, Some(rb.mask), 0.0);
    let (xh, _) = normalise(&mut b, n, xv);
    let wv = b.load(w, rb.cols, Some(rb.cols_ok), 0.0);
    let wv = b.row(wv);
    let mut out = b.mul(xh, wv);
    if let Some(g) = g {
        let gv = b.load(g, rb.off, Some(rb.mask), 0.0);
        let s = b.unary(UnOp::Silu, gv);
        out = b.mul(out, s);
    }
    b.store(y, rb.off, out, Some(rb.mask));
    Ok(Kernel { program: b.finish(), grid: vec![format!("ceil(rows / {})", n.block_rows)] })
}

/// The norm backward: dx (and dg when gated) and per-program partial sums of dw.
///
/// With u = dy ⊙ silu(g) (u = dy ungated), x̂ = x · r and r = rsqrt(mean x² + eps):
///
/// ```text
/// dx = r · (u⊙w − x̂ · mean(u⊙w⊙x̂))      dw = Σ_rows u ⊙ x̂      dg = dy ⊙ x̂ ⊙ w ⊙ silu′(g)
/// ```
///
/// Parameters: `x`, `g` (gated only), `w`, `dy`, `dx`, `dg` (gated only), `dw` `[programs, D]`
/// (partials: finish with [`sum_partials`] over `programs` parts of D columns), then the integers
/// `rows` and `programs`. Grid: `programs` (the launcher's choice, e.g. the number of cores or
/// SMs); program i handles row blocks i, i + programs, ….
pub fn norm_backward(n: &Norm) -> Result<Kernel, LowerError> {
    let name = n.name("bwd");
    n.check(&name)?;
    let mut b = Builder::new(&name, &["programs"]);
    let x = b.ptr("x", n.storage, false);
    let g = n.gated.then(|| b.ptr("g", n.storage, false));
    let w = b.ptr("w", DType::F32, false);
    let dy = b.ptr("dy", n.storage, false);
    let dx = b.ptr("dx", n.storage, true);
    let dg = n.gated.then(|| b.ptr("dg", n.storage, true));
    let dw = b.ptr("dw", DType::F32, true);
    let rows = b.int_param("rows");
    let programs = b.int_param("programs");

    let pid = b.program_id(0);
    let br = b.i64(i64::from(n.block_rows));
    let lo = b.mul(pid, br);
    let step = b.mul(programs, br);
    let cols = b.iota(n.padded_dim());
    let d = b.i64(i64::from(n.dim));
    let cols_ok = b.cmp(CmpOp::Lt, cols, d);
    let wv = b.load(w, cols, Some(cols_ok), 0.0);
    let wv = b.row(wv);
    let zero_f = b.f32(0.0);
    let acc0 = b.broadcast(zero_f, &[n.padded_dim()]);
    let acc = b.for_loop(lo, rows, step, &[acc0], |b, r0, carried| {
        let rb = row_block(b, n, r0, rows);
        let xv = b.load(x, rb.off, Some(rb.mask), 0.0);
        let dyv = b.load(dy, rb.off, Some(rb.mask), 0.0);
        let (xh, rstd) = normalise(b, n, xv);
        let u = match (g, dg) {
            (Some(g), Some(dg)) => {
                let gv = b.load(g, rb.off, Some(rb.mask), 0.0);
                let s = b.unary(UnOp::Silu, gv);
                let sg = silu_grad(b, gv);
                let yn = b.mul(xh, wv);
                let t = b.mul(dyv, yn);
                let dgv = b.mul(t, sg);
                b.store(dg, rb.off, dgv, Some(rb.mask));
                b.mul(dyv, s)
            }
            _ => dyv,
        };
        let uw = b.mul(u, wv);
        let t = b.mul(uw, xh);
        let dot = b.sum(t, 1);
        let df = b.f32(f64::from(n.dim));
        let mean = b.div(dot, df);
        let mean = b.col(mean);
        let corr = b.mul(xh, mean);
        let inner = b.sub(uw, corr);
        let dxv = b.mul(inner, rstd);
        b.store(dx, rb.off, dxv, Some(rb.mask));
        let t = b.mul(u, xh);
        let s = b.sum(t, 0);
        vec![b.add(carried[0], s)]
    });
    let pbase = b.mul(pid, d);
    let off = b.add(cols, pbase);
    b.store(dw, off, acc[0], Some(cols_ok));
    Ok(Kernel { program: b.finish(), grid: vec!["programs".into()] })
}

/// Sums partial results over their leading axis: `out[c] = Σ_p partials[p · cols + c]`.
///
/// Parameters: `partials` `[parts, cols]`, `out` `[cols]`, then the integers `parts` and `cols`.
/// Grid: ⌈cols / block⌉. Parts are added in order, so the result does not depend on the grid.
pub fn sum_partials(block: u32) -> Result<Kernel, LowerError> {
    let name = "sum_partials";
    if block == 0 {
        return Err(error(name, "block must be positive"));
    }
    let mut b = Builder::new(name, &["column blocks"]);
    let partials = b.ptr("partials", DType::F32, false);
    let out = b.ptr("out", DType::F32, true);
    let parts = b.int_param("parts");
    let cols = b.int_param("cols");

    sum_over_parts(
        &mut b,
        block,
        (partials, out),
        (parts, cols),
        |_, c| c,
        |b, c, p| {
            let base = b.mul(p, cols);
            b.add(c, base)
        },
    );
    Ok(Kernel { program: b.finish(), grid: vec![format!("ceil(cols / {block})")] })
}

/// The body `sum_partials` and `sum_blocks` share: this instance's `block` elements `n` of `out`
/// (those below `cols`), each the sum over `p` in 0..`parts` of `partials` at
/// `offset(key, p)`, where `key = prepare(n)` is computed once per element before the loop.
fn sum_over_parts<K: Copy>(
    b: &mut Builder,
    block: u32,
    (partials, out): (Ptr, Ptr),
    (parts, cols): (Value, Value),
    prepare: impl FnOnce(&mut Builder, Value) -> K,
    offset: impl Fn(&mut Builder, K, Value) -> Value,
) {
    let pid = b.program_id(0);
    let bl = b.i64(i64::from(block));
    let n0 = b.mul(pid, bl);
    let iota = b.iota(block);
    let n = b.add(iota, n0);
    let ok = b.cmp(CmpOp::Lt, n, cols);
    let key = prepare(b, n);
    let zero = b.i64(0);
    let one = b.i64(1);
    let zero_f = b.f32(0.0);
    let acc0 = b.broadcast(zero_f, &[block]);
    let acc = b.for_loop(zero, parts, one, &[acc0], |b, p, carried| {
        let off = offset(b, key, p);
        let v = b.load(partials, off, Some(ok), 0.0);
        vec![b.add(carried[0], v)]
    });
    b.store(out, n, acc[0], Some(ok));
}

/// Adds up a split backward's partial gradients ([`super::chunk_bwd::backward`] over value
/// blocks): `out[r · width + c] = Σ_j partials[(r · parts + j) · width + c]` for the `cols`
/// elements of `out`, stored as `storage` (the gradient's own type: bf16 for a token input's,
/// f32 for a per-head parameter's).
///
/// Parameters: `partials` (f32, `[rows, parts, width]`), `out` (`[rows, width]`), then the
/// integers `parts`, `width` and `cols` (= rows · width). Grid: ⌈cols / block⌉. The blocks are
/// added in order, so the result does not depend on the grid.
pub fn sum_blocks(storage: DType, block: u32) -> Result<Kernel, LowerError> {
    let name = format!("sum_blocks_{}", storage.name());
    if block == 0 {
        return Err(error(&name, "block must be positive"));
    }
    let mut b = Builder::new(&name, &["element blocks"]);
    let partials = b.ptr("partials", DType::F32, false);
    let out = b.ptr("out", storage, true);
    let parts = b.int_param("parts");
    let width = b.int_param("width");
    let cols = b.int_param("cols");

    // Per element: the first of its partial sums' rows (row · parts) and its column.
    let prepare = |b: &mut Builder, n: Value| {
        let row = b.binary(BinOp::Div, n, width);
        let col = b.binary(BinOp::Rem, n, width);
        (b.mul(row, parts), col)
    };
    sum_over_parts(&mut b, block, (partials, out), (parts, cols), prepare, |b, (first, col), j| {
        let at = b.add(first, j);
        let at = b.mul(at, width);
        b.add(at, col)
    });
    Ok(Kernel { program: b.finish(), grid: vec![format!("ceil(cols / {block})")] })
}
