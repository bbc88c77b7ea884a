//! `dot` on the tensor cores: warp-level `mma.sync` over 16×8 output tiles.
//!
//! The block's warps share out the product's 16×8 output tiles in rectangular per-warp blocks of
//! `mr × nc` tiles ([`warp_block`]), so each A fragment a warp loads serves `nc` products and each
//! B fragment `mr`; accumulators stay in registers for the whole reduction and are written once.
//! Operands come from the tiles' workspace (f32) and are converted per fragment:
//! - [`DotMode::Bf16`]: `mma.m16n8k16` on bf16 operands rounded to nearest, f32 accumulation —
//!   the peer's precision, used by kernels that store activations in bf16 or f16;
//! - [`DotMode::Tf32x3`]: `mma.m16n8k8` on tf32 with each operand split into a high and a low tf32
//!   part (x = hi + lo, both rounded to nearest) and a·b ≈ hi·hi + hi·lo + lo·hi: about 2⁻²¹
//!   relative error per product, so f32 kernels keep (near) f32 results on the tensor cores.
//!
//! Products whose shape does not tile (an m that is not a multiple of 16, say a decode step's
//! single row) keep the per-thread loop in the caller ([`DotMode::Simt`] forces it everywhere, for
//! measuring what the tensor cores gain).
//!
//! Fragment layouts are PTX's (ISA "Matrix fragments for mma.m16n8k16 / m16n8k8"): with
//! g = lane / 4 and t = lane mod 4, A's registers hold rows g and g + 8, B's column g, and the
//! f32 accumulators rows g and g + 8 at columns 2t and 2t + 1.

use std::collections::{HashMap, HashSet};

use super::{Gen, R};
use hlac_runtime::kir::{BinOp, Block, DType, Op, ParamKind, Program, Value};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue};

/// How `dot` multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DotMode {
    /// Each thread computes whole output elements with FMA (exact f32, slow).
    Simt,
    /// Tensor cores, 3×TF32 (near f32).
    Tf32x3,
    /// Tensor cores, bf16 operands.
    Bf16,
}

impl DotMode {
    /// The mode for a program: bf16 operands when it stores activations in bf16 or f16 (its
    /// inputs carry no more precision than that), else 3×TF32. `HLAC_NVPTX_DOT=simt|tf32x3|bf16`
    /// overrides it, for A/B measurements.
    pub(super) fn for_program(p: &Program) -> DotMode {
        match std::env::var("HLAC_NVPTX_DOT").as_deref() {
            Ok("simt") => return DotMode::Simt,
            Ok("tf32x3") => return DotMode::Tf32x3,
            Ok("bf16") => return DotMode::Bf16,
            _ => {}
        }
        let half = p.params.iter().any(|q| matches!(q.kind, ParamKind::Ptr { dtype: DType::Bf16 | DType::F16, .. }));
        if half {
            DotMode::Bf16
        } else {
            DotMode::Tf32x3
        }
    }

    /// Whether `a · b` runs on the tensor cores in this mode (its shape tiles into `mma`s); else
    /// it is a per-thread loop.
    pub(super) fn tiles(self, p: &Program, a: Value, b: Value) -> bool {
        let (sa, sb) = (&p.ty(a).shape, &p.ty(b).shape);
        let (Some(&m), Some(&k), Some(&n)) = (sa.first(), sa.get(1), sb.get(1)) else { return false };
        self != DotMode::Simt && m.is_multiple_of(16) && n.is_multiple_of(8) && k.is_multiple_of(self.k_step())
    }

    /// The reduction depth of one `mma` instruction.
    fn k_step(self) -> u32 {
        match self {
            DotMode::Bf16 => 16,
            _ => 8,
        }
    }
}

/// The most 16×8 tiles one warp accumulates at once (4 f32 registers each).
const MAX_TILES_PER_WARP: u32 = 8;

/// The per-warp block (rows of tiles, columns of tiles) for a product of `tm × tn` tiles on
/// `warps` warps: keeps every warp busy where possible, then maximises fragment reuse (fewest
/// fragment loads per `mma`, 4·(mr + nc)/(mr·nc)).
pub(super) fn warp_block(tm: u32, tn: u32, warps: u32) -> (u32, u32) {
    let divisors = |x: u32| (1..=x).filter(move |d| x.is_multiple_of(*d));
    let mut best = (1, 1);
    let mut best_key = (0.0f64, f64::MIN);
    for mr in divisors(tm) {
        for nc in divisors(tn).filter(|nc| mr * nc <= MAX_TILES_PER_WARP) {
            let blocks = (tm / mr) * (tn / nc);
            let busy = f64::from(blocks) / f64::from(blocks.div_ceil(warps) * warps);
            let reuse = -f64::from(mr + nc) / f64::from(mr * nc);
            let key = (busy, reuse);
            if key.0 > best_key.0 + 1e-9 || ((key.0 - best_key.0).abs() <= 1e-9 && key.1 > best_key.1) {
                best = (mr, nc);
                best_key = key;
            }
        }
    }
    best
}

/// The `dot`s computed straight into the `add` that is their one use, `d → (r, x)` for
/// `d = a · b` and `r = x + d` (or `d + x`): the accumulators start from `x` instead of zero, so
/// `d` is never stored and the add's pass and barrier go (attention's `acc·α + p·V`, a chunk's
/// `o_intra + q·S`, a state's `S·γ + kᵀv`). Only products on the tensor cores that one round of
/// the block's warps covers (every warp then reads its `x` elements, the block waits at a barrier,
/// and only then does any warp write `r`, whose storage may be `x`'s), with the add in the same
/// block after nothing but fused instructions, and `x` defined before the product.
/// `HLAC_NVPTX_DOTACC=off` keeps every add separate, for A/B measurements.
pub(super) fn accumulations(p: &Program, fused: &HashSet<Value>, mode: DotMode, warps: u32) -> HashMap<Value, (Value, Value)> {
    let mut found = HashMap::new();
    if mode == DotMode::Simt || std::env::var("HLAC_NVPTX_DOTACC").is_ok_and(|v| v == "off") {
        return found;
    }
    let mut uses: HashMap<Value, usize> = HashMap::new();
    fn count(b: &Block, uses: &mut HashMap<Value, usize>) {
        for inst in &b.insts {
            let mut ops = Vec::new();
            inst.op.operands(&mut ops);
            for v in ops {
                *uses.entry(v).or_default() += 1;
            }
            if let Op::For { body, .. } = &inst.op {
                count(body, uses);
            }
        }
    }
    count(&p.body, &mut uses);
    fn walk(
        p: &Program,
        b: &Block,
        fused: &HashSet<Value>,
        mode: DotMode,
        warps: u32,
        uses: &HashMap<Value, usize>,
        found: &mut HashMap<Value, (Value, Value)>,
    ) {
        let defined_here: HashMap<Value, usize> =
            b.insts.iter().enumerate().flat_map(|(i, inst)| inst.results.iter().map(move |r| (*r, i))).collect();
        for (i, inst) in b.insts.iter().enumerate() {
            if let Op::For { body, .. } = &inst.op {
                walk(p, body, fused, mode, warps, uses, found);
            }
            let (Op::Dot(a, bb), [d]) = (&inst.op, &inst.results[..]) else { continue };
            if !mode.tiles(p, *a, *bb) || fused.contains(d) || uses.get(d) != Some(&1) {
                continue;
            }
            let (m, n) = (p.ty(*a).shape[0], p.ty(*bb).shape[1]);
            let (mr, nc) = warp_block(m / 16, n / 8, warps);
            if (m / 16 / mr) * (n / 8 / nc) > warps {
                continue;
            }
            // The add, after nothing but fused instructions.
            let Some(user) = b.insts.iter().skip(i + 1).find(|u| !u.results.first().is_some_and(|r| fused.contains(r))) else {
                continue;
            };
            let (Op::Binary(BinOp::Add, l, rr), [r]) = (&user.op, &user.results[..]) else { continue };
            let x = if l == d {
                *rr
            } else if rr == d {
                *l
            } else {
                continue;
            };
            if x == *d || fused.contains(r) || p.ty(x) != p.ty(*d) || defined_here.get(&x).is_some_and(|k| *k > i) {
                continue;
            }
            found.insert(*d, (*r, x));
        }
    }
    walk(p, &p.body, fused, mode, warps, &uses, &mut found);
    found
}

/// Fragments of one 16-row (A) or 8-column (B) strip for one k-step, as `mma` register operands.
/// For 3×TF32 each has a high and a low part.
struct Frag<'ctx> {
    hi: Vec<BasicValueEnum<'ctx>>,
    lo: Vec<BasicValueEnum<'ctx>>,
}

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// Emits `out = a · b` on the tensor cores when the shapes tile for the current mode; returns
    /// whether it did (else the caller emits the per-thread loop).
    pub(super) fn dot_mma(&mut self, out: Value, a: Value, b: Value) -> R<bool> {
        self.dot_mma_from(out, a, b, None)
    }

    /// `out = a · b` on the tensor cores, plus `addend` when given ([`accumulations`]: the caller
    /// has checked that one round of warps covers the product, so the accumulators can be read in
    /// from `addend` by every warp before any writes `out`).
    pub(super) fn dot_mma_from(&mut self, out: Value, a: Value, b: Value, addend: Option<Value>) -> R<bool> {
        let mode = self.dot_mode;
        let (m, k) = (self.p.ty(a).shape[0], self.p.ty(a).shape[1]);
        let n = self.p.ty(b).shape[1];
        if !mode.tiles(self.p, a, b) {
            return Ok(false);
        }
        self.alloc(out);
        let e = |x| self.llvm(x);
        let warps = self.threads / 32;
        let (tm, tn) = (m / 16, n / 8);
        let (mr, nc) = warp_block(tm, tn, warps);
        let col_blocks = tn / nc;
        let blocks = (tm / mr) * col_blocks;
        let f32t: BasicTypeEnum = self.ctx.f32_type().into();
        let acc: Vec<PointerValue> = (0..mr * nc * 4).map(|_| self.stack_slot(f32t)).collect::<R<_>>()?;
        let name = match mode {
            DotMode::Bf16 => "llvm.nvvm.mma.m16n8k16.row.col.bf16",
            _ => "llvm.nvvm.mma.m16n8k8.row.col.tf32",
        };
        let mma = self.intrinsic(name, &[])?;
        let lane = self.b.build_and(self.tid()?, self.i64c(31), "").map_err(e)?;
        let warp = self.b.build_right_shift(self.tid()?, self.i64c(5), false, "").map_err(e)?;
        let g = self.b.build_right_shift(lane, self.i64c(2), false, "").map_err(e)?;
        let t = self.b.build_and(lane, self.i64c(3), "").map_err(e)?;
        let k64 = i64::from(k);
        let step = self.i64c(i64::from(warps));
        let end = self.i64c(i64::from(blocks));
        // The block's first row and column, and row g of every A strip and column g of every B
        // strip this thread touches.
        let corner = |s: &mut Self, blk: IntValue<'ctx>| -> R<(IntValue<'ctx>, Vec<IntValue<'ctx>>, Vec<IntValue<'ctx>>)> {
            let bm = s.b.build_int_unsigned_div(blk, s.i64c(i64::from(col_blocks)), "").map_err(|x| s.llvm(x))?;
            let bn = s.b.build_int_unsigned_rem(blk, s.i64c(i64::from(col_blocks)), "").map_err(|x| s.llvm(x))?;
            let row0 = s.mul(bm, i64::from(mr * 16))?;
            let col0 = s.mul(bn, i64::from(nc * 8))?;
            let rows: Vec<IntValue> = (0..mr).map(|i| s.add(row0, s.add(g, s.i64c(i64::from(i * 16)))?)).collect::<R<_>>()?;
            let cols: Vec<IntValue> = (0..nc).map(|j| s.add(col0, s.add(g, s.i64c(i64::from(j * 8)))?)).collect::<R<_>>()?;
            Ok((col0, rows, cols))
        };
        // Accumulator q of tile (i, j) is element (row g + 8·(q / 2), column 2t + q mod 2).
        let n64 = i64::from(n);
        let at_of = |s: &Self, col0: IntValue<'ctx>, rows: &[IntValue<'ctx>], i: usize, j: usize, q: usize| -> R<IntValue<'ctx>> {
            let two_t = s.mul(t, 2)?;
            let col = s.add(col0, s.add(two_t, s.i64c(j as i64 * 8 + (q % 2) as i64))?)?;
            let row = s.add(rows[i], s.i64c(8 * (q / 2) as i64))?;
            s.add(s.mul(row, n64)?, col)
        };
        if let Some(x) = addend {
            // Every warp reads its accumulators' starting values, then the block waits: `out`
            // may be stored where `x` (or what it is computed from) is.
            self.counted(warp, end, step, &mut |s, blk| {
                let (col0, rows, _) = corner(s, blk)?;
                for i in 0..mr as usize {
                    for j in 0..nc as usize {
                        for q in 0..4 {
                            let at = at_of(s, col0, &rows, i, j, q)?;
                            let v = s.read(x, at)?;
                            s.b.build_store(acc[(i * nc as usize + j) * 4 + q], v).map_err(|e| s.llvm(e))?;
                        }
                    }
                }
                Ok(())
            })?;
            self.barrier()?;
        }
        self.counted(warp, end, step, &mut |s, blk| {
            let (col0, rows, cols) = corner(s, blk)?;
            if addend.is_none() {
                for slot in &acc {
                    s.b.build_store(*slot, s.f32c(0.0)).map_err(|x| s.llvm(x))?;
                }
            }
            let zero = s.i64c(0);
            let kend = s.i64c(k64);
            let kstep = s.i64c(i64::from(mode.k_step()));
            s.counted(zero, kend, kstep, &mut |s, kk| {
                let af: Vec<Frag> = rows.iter().map(|r| s.a_frag(a, *r, kk, t, k64, mode)).collect::<R<_>>()?;
                let bf: Vec<Frag> = cols.iter().map(|c| s.b_frag(b, *c, kk, t, n64, mode)).collect::<R<_>>()?;
                for (i, fa) in af.iter().enumerate() {
                    for (j, fb) in bf.iter().enumerate() {
                        let slots = &acc[(i * nc as usize + j) * 4..][..4];
                        let mut c: Vec<BasicValueEnum> =
                            slots.iter().map(|p| s.b.build_load(f32t, *p, "").map_err(|x| s.llvm(x))).collect::<R<_>>()?;
                        // Small terms first, so they are not lost against the large one.
                        let passes: Vec<(&[BasicValueEnum], &[BasicValueEnum])> = match mode {
                            DotMode::Tf32x3 => vec![(&fa.hi, &fb.lo), (&fa.lo, &fb.hi), (&fa.hi, &fb.hi)],
                            _ => vec![(&fa.hi, &fb.hi)],
                        };
                        for (x, y) in passes {
                            let args: Vec<BasicValueEnum> = x.iter().chain(y.iter()).chain(c.iter()).copied().collect();
                            let r = s.call(mma, &args)?.into_struct_value();
                            c = (0..4).map(|q| s.b.build_extract_value(r, q, "").map_err(|x| s.llvm(x))).collect::<R<_>>()?;
                        }
                        for (p, v) in slots.iter().zip(&c) {
                            s.b.build_store(*p, *v).map_err(|x| s.llvm(x))?;
                        }
                    }
                }
                Ok(())
            })?;
            for i in 0..mr as usize {
                for j in 0..nc as usize {
                    for half in 0..2usize {
                        let at = at_of(s, col0, &rows, i, j, 2 * half)?;
                        let x = s.b.build_load(f32t, acc[(i * nc as usize + j) * 4 + 2 * half], "").map_err(|x| s.llvm(x))?;
                        let y = s.b.build_load(f32t, acc[(i * nc as usize + j) * 4 + 2 * half + 1], "").map_err(|x| s.llvm(x))?;
                        s.store_pair(out, at, x.into_float_value(), y.into_float_value())?;
                    }
                }
            }
            Ok(())
        })?;
        self.barrier()?;
        Ok(true)
    }

    fn add(&self, x: IntValue<'ctx>, y: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        self.b.build_int_add(x, y, "").map_err(|e| self.llvm(e))
    }

    fn mul(&self, x: IntValue<'ctx>, c: i64) -> R<IntValue<'ctx>> {
        self.b.build_int_mul(x, self.i64c(c), "").map_err(|e| self.llvm(e))
    }

    /// Two adjacent f32 elements of tile `v` from element `at` (even, so 8-byte aligned — 4-byte
    /// for a bf16 tile: tiles start on 64-byte boundaries).
    fn load_pair(&mut self, v: Value, at: IntValue<'ctx>) -> R<(FloatValue<'ctx>, FloatValue<'ctx>)> {
        if self.fusion.fused.contains(&v) {
            let next = self.add(at, self.i64c(1))?;
            return Ok((self.elem(v, at)?, self.elem(v, next)?));
        }
        let e = |x| self.llvm(x);
        let ptr = self.tile_ptr(v, at)?;
        let narrow = self.storage.narrow.contains(&v);
        let (vt, align) = if narrow { (self.ctx.bf16_type().vec_type(2), 4) } else { (self.ctx.f32_type().vec_type(2), 8) };
        let x = self.b.build_load(vt, ptr, "").map_err(e)?;
        if let Some(inst) = x.into_vector_value().as_instruction() {
            inst.set_alignment(align).map_err(|x| self.llvm(x))?;
        }
        let mut x = x.into_vector_value();
        if narrow {
            x = self.b.build_float_ext(x, self.ctx.f32_type().vec_type(2), "").map_err(e)?;
        }
        let lo = self.b.build_extract_element(x, self.ctx.i32_type().const_zero(), "").map_err(e)?;
        let hi = self.b.build_extract_element(x, self.ctx.i32_type().const_int(1, false), "").map_err(e)?;
        Ok((lo.into_float_value(), hi.into_float_value()))
    }

    /// Stores two adjacent f32 elements of tile `v` at element `at` (even).
    fn store_pair(&mut self, v: Value, at: IntValue<'ctx>, x: FloatValue<'ctx>, y: FloatValue<'ctx>) -> R<()> {
        let e = |x| self.llvm(x);
        let ptr = self.tile_ptr(v, at)?;
        let vt = self.ctx.f32_type().vec_type(2);
        let vec = vt.get_undef();
        let vec = self.b.build_insert_element(vec, x, self.ctx.i32_type().const_zero(), "").map_err(e)?;
        let vec = self.b.build_insert_element(vec, y, self.ctx.i32_type().const_int(1, false), "").map_err(e)?;
        let (vec, align) = if self.storage.narrow.contains(&v) {
            (self.b.build_float_trunc(vec, self.ctx.bf16_type().vec_type(2), "").map_err(e)?, 4)
        } else {
            (vec, 8)
        };
        let st = self.b.build_store(ptr, vec).map_err(e)?;
        st.set_alignment(align).map_err(|x| self.llvm(x))?;
        Ok(())
    }

    /// Whether fragments of tile `v` load with `ldmatrix`: a bf16 tile ([`super::narrow`]) in the
    /// shared-memory workspace, whose rows of 8 elements are 16-byte aligned (tiles start on 64-byte
    /// boundaries, rows are whole multiples of 8 elements for any product that tiles, and the
    /// swizzle moves whole 16-byte groups). One `ldmatrix` replaces the four loads (A) or four
    /// loads and two packs (B) of a fragment. `HLAC_NVPTX_LDMATRIX=off` keeps the loads, for A/B
    /// measurements.
    fn ldmatrix(&self, v: Value) -> bool {
        self.smem.is_some()
            && self.storage.narrow.contains(&v)
            && !self.fusion.fused.contains(&v)
            && !std::env::var("HLAC_NVPTX_LDMATRIX").is_ok_and(|x| x == "off")
    }

    /// The tile X when `v` is a transpose of X read through (fused) and X's fragments load with
    /// `ldmatrix` ([`Gen::ldmatrix`]): the load then transposes (or not) the other way.
    fn ldmatrix_transposed(&self, v: Value) -> Option<Value> {
        match self.fusion.defs.get(&v) {
            Some(Op::Transpose(x)) if self.fusion.fused.contains(&v) && self.ldmatrix(*x) => Some(*x),
            _ => None,
        }
    }

    /// `ldmatrix.sync.aligned.m8n8.x{count}[.trans].b16` (count 2 or 4) from this lane's row at
    /// element `at` of tile `v`: the fragment's `count` registers.
    fn ldmatrix_regs(&mut self, v: Value, at: IntValue<'ctx>, count: u32, trans: bool) -> R<Frag<'ctx>> {
        let name = format!("llvm.nvvm.ldmatrix.sync.aligned.m8n8.x{count}{}.b16", if trans { ".trans" } else { "" });
        let ptr = self.tile_ptr(v, at)?;
        // Overloaded on the pointer's address space (shared here).
        let f = self.intrinsic(&name, &[ptr.get_type().into()])?;
        let st = self.call(f, &[ptr.into()])?.into_struct_value();
        let regs = (0..count).map(|q| self.b.build_extract_value(st, q, "").map_err(|x| self.llvm(x))).collect::<R<_>>()?;
        Ok(Frag { hi: regs, lo: Vec::new() })
    }

    /// This thread's lane, and the first row (or column) of the 16-row (8-column) strip whose row
    /// (column) g = lane / 4 is `at`: where an `ldmatrix` lane's address is counted from.
    fn lane_and_strip(&self, at: IntValue<'ctx>) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let e = |x| self.llvm(x);
        let lane = self.b.build_and(self.tid()?, self.i64c(31), "").map_err(e)?;
        let g = self.b.build_right_shift(lane, self.i64c(2), false, "").map_err(e)?;
        Ok((lane, self.b.build_int_sub(at, g, "").map_err(e)?))
    }

    /// One element of tile `v` at flat index `at` as f32.
    fn elem(&mut self, v: Value, at: IntValue<'ctx>) -> R<FloatValue<'ctx>> {
        Ok(self.read(v, at)?.into_float_value())
    }

    /// Two f32 values as one bf16×2 register (`lo` in the low half), rounded to nearest even.
    fn bf16x2(&self, lo: FloatValue<'ctx>, hi: FloatValue<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let vt = self.ctx.f32_type().vec_type(2);
        let v = vt.get_undef();
        let v = self.b.build_insert_element(v, lo, self.ctx.i32_type().const_zero(), "").map_err(e)?;
        let v = self.b.build_insert_element(v, hi, self.ctx.i32_type().const_int(1, false), "").map_err(e)?;
        let h = self.b.build_float_trunc(v, self.ctx.bf16_type().vec_type(2), "").map_err(e)?;
        self.b.build_bit_cast(h, self.ctx.i32_type(), "").map_err(e)
    }

    /// x rounded to tf32 (nearest, ties away from zero) as its 32-bit pattern, and the f32 value.
    fn tf32(&self, x: FloatValue<'ctx>) -> R<(IntValue<'ctx>, FloatValue<'ctx>)> {
        let e = |x| self.llvm(x);
        let i32t = self.ctx.i32_type();
        let bits = self.b.build_bit_cast(x, i32t, "").map_err(e)?.into_int_value();
        let bits = self.b.build_int_add(bits, i32t.const_int(0x1000, false), "").map_err(e)?;
        let bits = self.b.build_and(bits, i32t.const_int(0xFFFF_E000, false), "").map_err(e)?;
        let value = self.b.build_bit_cast(bits, self.ctx.f32_type(), "").map_err(e)?.into_float_value();
        Ok((bits, value))
    }

    /// Register operands for `mma` from f32 values: bf16 pairs, or tf32 high and low parts.
    fn operands(&self, xs: &[FloatValue<'ctx>], mode: DotMode) -> R<Frag<'ctx>> {
        let e = |x| self.llvm(x);
        match mode {
            DotMode::Bf16 => {
                let hi = xs.chunks(2).map(|p| self.bf16x2(p[0], p[1])).collect::<R<_>>()?;
                Ok(Frag { hi, lo: Vec::new() })
            }
            _ => {
                let mut hi = Vec::new();
                let mut lo = Vec::new();
                for x in xs {
                    let (h, hv) = self.tf32(*x)?;
                    let rest = self.b.build_float_sub(*x, hv, "").map_err(e)?;
                    let (l, _) = self.tf32(rest)?;
                    hi.push(h.into());
                    lo.push(l.into());
                }
                Ok(Frag { hi, lo })
            }
        }
    }

    /// A's fragment for the 16-row strip whose row g is `row`, at reduction offset `kk`.
    fn a_frag(&mut self, a: Value, row: IntValue<'ctx>, kk: IntValue<'ctx>, t: IntValue<'ctx>, k: i64, mode: DotMode) -> R<Frag<'ctx>> {
        let r0 = self.mul(row, k)?;
        let r8 = self.add(r0, self.i64c(8 * k))?;
        let base = |s: &Self, r: IntValue<'ctx>, c: i64| -> R<IntValue<'ctx>> { s.add(s.add(r, kk)?, s.add(t, s.i64c(c))?) };
        match mode {
            DotMode::Bf16 => {
                // Registers: (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..).
                if let Some(x) = self.ldmatrix_transposed(a) {
                    // A = Xᵀ for a bf16 tile X [k, m]: A's registers are X's 8×8 matrices at rows
                    // kk (+8) and columns row0 (+8), transposed on the load. Lane l names X's row
                    // kk + (l mod 8) + 8·(l / 16) at column row0 + 8·(l / 8 mod 2).
                    let e = |x| self.llvm(x);
                    let m = i64::from(self.p.ty(a).shape[0]);
                    let (lane, top) = self.lane_and_strip(row)?;
                    let l7 = self.b.build_and(lane, self.i64c(7), "").map_err(e)?;
                    let hi = self.b.build_right_shift(lane, self.i64c(4), false, "").map_err(e)?;
                    let mid = self.b.build_right_shift(lane, self.i64c(3), false, "").map_err(e)?;
                    let mid = self.b.build_and(mid, self.i64c(1), "").map_err(e)?;
                    let xr = self.add(self.add(kk, l7)?, self.mul(hi, 8)?)?;
                    let xc = self.add(top, self.mul(mid, 8)?)?;
                    let at = self.add(self.mul(xr, m)?, xc)?;
                    return self.ldmatrix_regs(x, at, 4, true);
                }
                if self.ldmatrix(a) {
                    // Lane l names row l mod 16, column 8·(l / 16) of the strip: the four 8×8
                    // matrices (rows 0-7 and 8-15, then the same at columns 8-15) are A's four
                    // registers in order.
                    let e = |x| self.llvm(x);
                    let (lane, top) = self.lane_and_strip(row)?;
                    let lr = self.b.build_and(lane, self.i64c(15), "").map_err(e)?;
                    let lc = self.b.build_right_shift(lane, self.i64c(4), false, "").map_err(e)?;
                    let r = self.add(top, lr)?;
                    let at = self.add(self.add(self.mul(r, k)?, kk)?, self.mul(lc, 8)?)?;
                    return self.ldmatrix_regs(a, at, 4, false);
                }
                let t2 = self.mul(t, 2)?;
                let direct = self.storage.narrow.contains(&a);
                let mut xs = Vec::new();
                let mut regs = Vec::new();
                for (r, c) in [(r0, 0), (r8, 0), (r0, 8), (r8, 8)] {
                    let at = self.add(self.add(r, kk)?, self.add(t2, self.i64c(c))?)?;
                    if direct {
                        // A bf16 tile's adjacent pair is the register itself.
                        let ptr = self.tile_ptr(a, at)?;
                        let x = self.b.build_load(self.ctx.i32_type(), ptr, "").map_err(|x| self.llvm(x))?;
                        if let Some(inst) = x.into_int_value().as_instruction() {
                            inst.set_alignment(4).map_err(|x| self.llvm(x))?;
                        }
                        regs.push(x);
                        continue;
                    }
                    let (x, y) = self.load_pair(a, at)?;
                    xs.push(x);
                    xs.push(y);
                }
                if direct {
                    return Ok(Frag { hi: regs, lo: Vec::new() });
                }
                self.operands(&xs, mode)
            }
            _ => {
                // Registers: (g, t), (g+8, t), (g, t+4), (g+8, t+4).
                let mut xs = Vec::new();
                for (r, c) in [(r0, 0), (r8, 0), (r0, 4), (r8, 4)] {
                    let at = base(self, r, c)?;
                    xs.push(self.elem(a, at)?);
                }
                self.operands(&xs, mode)
            }
        }
    }

    /// B's fragment for the 8-column strip whose column g is `col`, at reduction offset `kk`.
    fn b_frag(&mut self, b: Value, col: IntValue<'ctx>, kk: IntValue<'ctx>, t: IntValue<'ctx>, n: i64, mode: DotMode) -> R<Frag<'ctx>> {
        // Rows (reduction indices) this thread holds, in register order.
        let rows: Vec<i64> = match mode {
            DotMode::Bf16 => vec![0, 1, 8, 9],
            _ => vec![0, 4],
        };
        let per_t = if mode == DotMode::Bf16 { 2 } else { 1 };
        let tk = self.add(kk, self.mul(t, per_t)?)?;
        if let (DotMode::Bf16, Some(x)) = (mode, self.ldmatrix_transposed(b)) {
            // B = Xᵀ for a bf16 tile X [n, k]: B's registers are X's 8×8 matrices at rows col0
            // and columns kk (+8), as they lie. Lane l names X's row col0 + (l mod 8) at column
            // kk + 8·(l / 8 mod 2).
            let e = |x| self.llvm(x);
            let k = i64::from(self.p.ty(b).shape[0]);
            let (lane, left) = self.lane_and_strip(col)?;
            let l7 = self.b.build_and(lane, self.i64c(7), "").map_err(e)?;
            let mid = self.b.build_right_shift(lane, self.i64c(3), false, "").map_err(e)?;
            let mid = self.b.build_and(mid, self.i64c(1), "").map_err(e)?;
            let xr = self.add(left, l7)?;
            let xc = self.add(kk, self.mul(mid, 8)?)?;
            let at = self.add(self.mul(xr, k)?, xc)?;
            return self.ldmatrix_regs(x, at, 2, false);
        }
        if mode == DotMode::Bf16 && self.ldmatrix(b) {
            // Lane l names row kk + (l mod 16) of the strip's first column; transposed, the two
            // 8×8 matrices are B's two registers.
            let e = |x| self.llvm(x);
            let (lane, left) = self.lane_and_strip(col)?;
            let lr = self.b.build_and(lane, self.i64c(15), "").map_err(e)?;
            let at = self.add(self.mul(self.add(kk, lr)?, n)?, left)?;
            return self.ldmatrix_regs(b, at, 2, true);
        }
        if mode == DotMode::Bf16 && self.storage.narrow.contains(&b) {
            // A bf16 tile's elements go into the registers as they are.
            let e = |x| self.llvm(x);
            let mut regs = Vec::new();
            for pair in rows.chunks(2) {
                let mut vec = self.ctx.bf16_type().vec_type(2).get_undef();
                for (q, r) in pair.iter().enumerate() {
                    let row = self.add(tk, self.i64c(*r))?;
                    let at = self.add(self.mul(row, n)?, col)?;
                    let ptr = self.tile_ptr(b, at)?;
                    let x = self.b.build_load(self.ctx.bf16_type(), ptr, "").map_err(e)?;
                    vec = self.b.build_insert_element(vec, x, self.ctx.i32_type().const_int(q as u64, false), "").map_err(e)?;
                }
                regs.push(self.b.build_bit_cast(vec, self.ctx.i32_type(), "").map_err(e)?);
            }
            return Ok(Frag { hi: regs, lo: Vec::new() });
        }
        let mut xs = Vec::new();
        for r in rows {
            let row = self.add(tk, self.i64c(r))?;
            let at = self.add(self.mul(row, n)?, col)?;
            xs.push(self.elem(b, at)?);
        }
        self.operands(&xs, mode)
    }
}
