//! Which global loads and stores can move 16 bytes per thread at once: a small abstract
//! interpretation of the kernel IR's index arithmetic along the last axis.
//!
//! A `load`'s offsets are whole-tile integer expressions (`base_row + iota`, the rotated partner
//! columns of RoPE `(iota + d/2) mod d`, …). For a group size g (16 bytes of the pointer's
//! elements: 8 bf16, 4 f32, 2 i64), a [`Fact`] about an integer or bool tile says, for every
//! aligned group of g elements along its last axis (the elements at j = g·t … g·t + g − 1, other
//! indices fixed): the elements step by `stride` from the group's first, and the first is a
//! multiple of `div` (0: it is 0). A load whose offsets step by 1 from a first offset that is a
//! multiple of g, and whose mask is the same across each group (stride 0), reads each group as one
//! aligned vector (`ld.global.v4.b32` and kin; a store likewise) — given, at run time, a 16-byte
//! aligned pointer and a group wholly in bounds; any other group takes the element-by-element
//! path. Measured on an H200 (BENCHMARKS.md, 2026-12-02): attention's forward 34.4 → 20.1 ms with
//! the vector loads alone.
//!
//! A tile whose last axis has one element (a column `[n, 1]`, a scalar) is uniform along any
//! broadcast of it: its fact is stride 0 with `div` holding for every element.

use std::collections::HashMap;

use super::{Gen, R};
use hlac_runtime::kir::{BinOp, Block, CmpOp, Const, DType, Op, Program, Value};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, IntValue, VectorValue};
use inkwell::{AddressSpace, IntPredicate};

/// What is known about a tile along its last axis, per aligned group (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fact {
    /// The step from one element of a group to the next.
    pub(super) stride: i64,
    /// A divisor of each group's first element (0: the first element is 0).
    pub(super) div: u64,
    /// The value of every element, when it is one known constant.
    konst: Option<i64>,
}

impl Fact {
    fn uniform(div: u64, konst: Option<i64>) -> Fact {
        Fact { stride: 0, div, konst }
    }

    /// A divisor of every element (not only of groups' first ones).
    fn all_div(self) -> u64 {
        gcd(self.div, self.stride.unsigned_abs())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The facts of a program's values for one group size, computed on demand.
pub(super) struct Contig<'p> {
    p: &'p Program,
    defs: HashMap<Value, &'p Op>,
    memo: HashMap<(Value, u32), Option<Fact>>,
    /// Whether comparisons against bounds may be uniform ([`bound_uniform`]; HLAC_NVPTX_BOUND=on).
    bounds: bool,
}

impl<'p> Contig<'p> {
    pub(super) fn new(p: &'p Program) -> Contig<'p> {
        fn walk<'p>(b: &'p Block, defs: &mut HashMap<Value, &'p Op>) {
            for inst in &b.insts {
                if let [r] = inst.results[..] {
                    defs.insert(r, &inst.op);
                }
                if let Op::For { body, .. } = &inst.op {
                    walk(body, defs);
                }
            }
        }
        let mut defs = HashMap::new();
        walk(&p.body, &mut defs);
        let bounds = std::env::var("HLAC_NVPTX_BOUND").is_ok_and(|v| v == "on");
        Contig { p, defs, memo: HashMap::new(), bounds }
    }

    fn last(&self, v: Value) -> u32 {
        self.p.ty(v).shape.last().copied().unwrap_or(1)
    }

    /// The fact about `v` for groups of `g` elements, if anything is known.
    pub(super) fn fact(&mut self, v: Value, g: u32) -> Option<Fact> {
        if let Some(f) = self.memo.get(&(v, g)) {
            return *f;
        }
        let f = self.compute(v, g);
        self.memo.insert((v, g), f);
        f
    }

    fn compute(&mut self, v: Value, g: u32) -> Option<Fact> {
        // Whatever it holds, a tile with one element along its last axis (a scalar, a column) is
        // the same across each group of any broadcast of it.
        let single = self.last(v) == 1;
        match self.derive(v, g) {
            None if single => Some(Fact::uniform(1, None)),
            f => f,
        }
    }

    fn derive(&mut self, v: Value, g: u32) -> Option<Fact> {
        let Some(op) = self.defs.get(&v).copied() else {
            // Loop indices, carried values, a loop's results: nothing known (beyond what
            // `compute` says of single elements).
            return None;
        };
        let f = match op {
            Op::Const(Const::Int(c)) => Some(Fact::uniform(c.unsigned_abs(), Some(*c))),
            Op::Const(_) | Op::ProgramId(_) | Op::Param(_) => Some(Fact::uniform(1, None)),
            Op::Iota(n) => (n % g == 0).then_some(Fact { stride: 1, div: u64::from(g), konst: None }),
            Op::Broadcast(a) | Op::Reshape(a) => {
                let (a, from, to) = (*a, self.last(*a), self.last(v));
                let fa = self.fact(a, g)?;
                if from == to && !self.p.ty(a).is_scalar() {
                    Some(fa)
                } else if from == 1 || to == 1 {
                    // Every element becomes (or was) the first of its group.
                    Some(Fact::uniform(fa.all_div(), fa.konst))
                } else {
                    fa.konst.map(|k| Fact::uniform(k.unsigned_abs(), Some(k)))
                }
            }
            Op::Binary(op, a, b) => {
                let (fa, fb) = (self.fact(*a, g)?, self.fact(*b, g)?);
                binary(*op, fa, fb, g)
            }
            Op::Select { cond, then, otherwise } => {
                let fc = self.fact(*cond, g)?;
                let (ft, fe) = (self.fact(*then, g)?, self.fact(*otherwise, g)?);
                // Each group takes one side whole when the condition is uniform across it.
                (fc.stride == 0 && ft.stride == fe.stride).then(|| Fact { stride: ft.stride, div: gcd(ft.div, fe.div), konst: None })
            }
            Op::Cmp(op, a, b) => {
                let (fa, fb) = (self.fact(*a, g)?, self.fact(*b, g)?);
                (fa.stride == 0 && fb.stride == 0 || self.bounds && bound_uniform(*op, fa, fb, g)).then(|| Fact::uniform(1, None))
            }
            Op::Unary(_, a) | Op::Cast(a, _) => {
                let fa = self.fact(*a, g)?;
                (fa.stride == 0).then(|| Fact::uniform(1, None))
            }
            _ => None,
        };
        f
    }
}

/// Whether `a op b` is the same across each group when one side runs through g consecutive values
/// from a multiple of g and the other is a multiple of g throughout: the scan's channel mask
/// `channel < heads` over blocks of channels (its loads went element by element without this).
/// A group's values x₀ … x₀ + g − 1 all lie below such a bound n exactly when x₀ does, since
/// n ≥ x₀ + 1 makes n ≥ x₀ + g; so `<` and `≥` against it (and `>`, `≤` with the sides swapped)
/// are uniform, while `≤` is not (x₀ = n).
///
/// Only with HLAC_NVPTX_BOUND=on for now: written after this session's last device call, so its
/// kernels (the scans', convs' and norms') are not yet checked or timed on a GPU; the default PTX
/// stays that of the checked build (2026-12-06, commit 1d899e5). The random programs of
/// `facts_hold_on_random_index_programs` check it on the CPU.
fn bound_uniform(op: CmpOp, a: Fact, b: Fact, g: u32) -> bool {
    let g = u64::from(g);
    let run = |f: Fact| f.stride == 1 && f.div.is_multiple_of(g);
    let bound = |f: Fact| f.stride == 0 && f.div.is_multiple_of(g);
    match op {
        CmpOp::Lt | CmpOp::Ge => run(a) && bound(b),
        CmpOp::Gt | CmpOp::Le => bound(a) && run(b),
        CmpOp::Eq | CmpOp::Ne => false,
    }
}

fn binary(op: BinOp, a: Fact, b: Fact, g: u32) -> Option<Fact> {
    let both = a.konst.zip(b.konst);
    match op {
        BinOp::Add | BinOp::Sub => {
            let sign = if op == BinOp::Add { 1 } else { -1 };
            Some(Fact {
                stride: a.stride.checked_add(sign * b.stride)?,
                div: gcd(a.div, b.div),
                konst: both.and_then(|(x, y)| if op == BinOp::Add { x.checked_add(y) } else { x.checked_sub(y) }),
            })
        }
        BinOp::Mul => {
            let scale = |f: Fact, k: i64| -> Option<Fact> {
                Some(Fact {
                    stride: f.stride.checked_mul(k)?,
                    div: f.div.checked_mul(k.unsigned_abs())?,
                    konst: f.konst.and_then(|x| x.checked_mul(k)),
                })
            };
            match (a.konst, b.konst) {
                (_, Some(k)) => scale(a, k),
                (Some(k), _) => scale(b, k),
                _ if a.stride == 0 && b.stride == 0 => Some(Fact::uniform(a.div.checked_mul(b.div).unwrap_or(1), None)),
                _ => None,
            }
        }
        BinOp::Rem => {
            let k = b.konst.filter(|&k| k > 0)?.unsigned_abs();
            let div = gcd(a.div, k);
            // A group starting at a multiple of g runs over g consecutive values, which cannot
            // straddle a multiple of k when g divides k.
            match a.stride {
                0 => Some(Fact::uniform(div, None)),
                1 if k.is_multiple_of(u64::from(g)) && a.div.is_multiple_of(u64::from(g)) => Some(Fact { stride: 1, div, konst: None }),
                _ => None,
            }
        }
        _ if a.stride == 0 && b.stride == 0 => {
            Some(Fact::uniform(if matches!(op, BinOp::Min | BinOp::Max) { gcd(a.div, b.div) } else { 1 }, None))
        }
        _ => None,
    }
}

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// The elements per 16-byte vector with which `load ptr[offsets] mask` can read `out` (or a
    /// `store` write it), or 1 (element by element). `HLAC_NVPTX_VECTOR=off` always gives 1, for
    /// A/B measurements.
    pub(super) fn vector_width(&mut self, ptr: u32, offsets: Value, mask: Option<Value>, out: Value) -> u32 {
        if std::env::var("HLAC_NVPTX_VECTOR").is_ok_and(|v| v == "off") {
            return 1;
        }
        let Ok(stored) = self.stored_type(ptr) else { return 1 };
        let w = 16 / stored.bytes();
        let last = self.p.ty(out).shape.last().copied().unwrap_or(1);
        if w < 2 || !last.is_multiple_of(w) {
            return 1;
        }
        let offsets_ok = self.contig.fact(offsets, w).is_some_and(|f| f.stride == 1 && f.div.is_multiple_of(u64::from(w)));
        let mask_ok = mask.is_none_or(|m| self.contig.fact(m, w).is_some_and(|f| f.stride == 0));
        if offsets_ok && mask_ok {
            w
        } else {
            1
        }
    }

    /// What every group of a vector access through `ptr` is checked against, computed once:
    /// whether the buffer holds at least `wide` elements, and the last offset a group of `wide`
    /// may start at (then `off ≤ len − wide`, unsigned, puts the whole group in bounds).
    fn group_bounds(&mut self, ptr: u32, wide: IntValue<'ctx>) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let e = |x| self.llvm(x);
        let g = *self.globals.get(&ptr).ok_or_else(|| self.llvm("access through a non-pointer parameter"))?;
        let fits = self.b.build_int_compare(IntPredicate::UGE, g.len, wide, "").map_err(e)?;
        let last_start = self.b.build_int_sub(g.len, wide, "").map_err(e)?;
        Ok((fits, last_start))
    }

    /// The address of the group of a vector access starting at element `e0` of its tiles, and
    /// whether it may move as one vector: the (group-uniform) mask on, the address 16-byte
    /// aligned, the group in bounds (`bounds` from [`Gen::group_bounds`]).
    fn vector_group(
        &mut self,
        ptr: u32,
        offsets: Value,
        mask: Option<Value>,
        e0: IntValue<'ctx>,
        (fits, last_start): (IntValue<'ctx>, IntValue<'ctx>),
    ) -> R<(IntValue<'ctx>, IntValue<'ctx>)> {
        let g = *self.globals.get(&ptr).ok_or_else(|| self.llvm("access through a non-pointer parameter"))?;
        let stored = self.stored_type(ptr)?;
        let off = self.read(offsets, e0)?.into_int_value();
        let on = match mask {
            Some(m) => self.read(m, e0)?.into_int_value(),
            None => self.ctx.bool_type().const_int(1, false),
        };
        let e = |x| self.llvm(x);
        let byte = self.b.build_int_mul(off, self.i64c(i64::from(stored.bytes())), "").map_err(e)?;
        let addr = self.b.build_int_add(g.addr, byte, "").map_err(e)?;
        let low = self.b.build_and(addr, self.i64c(15), "").map_err(e)?;
        let aligned = self.b.build_int_compare(IntPredicate::EQ, low, self.i64c(0), "").map_err(e)?;
        let inside = self.b.build_int_compare(IntPredicate::ULE, off, last_start, "").map_err(e)?;
        let ok = self.b.build_and(on, aligned, "").map_err(e)?;
        let ok = self.b.build_and(ok, inside, "").map_err(e)?;
        let ok = self.b.build_and(ok, fits, "").map_err(e)?;
        Ok((addr, ok))
    }

    /// `out = load ptr[offsets] mask … else other` in groups of `w` elements, each read as one
    /// aligned vector when its pointer is 16-byte aligned and the group is in bounds (and the mask,
    /// uniform across a group by [`Gen::vector_width`], is on); any other group goes element by
    /// element, bounds-checked as every load is. Each thread issues up to 16 elements' loads
    /// before it writes any of them.
    pub(super) fn load_vectors(&mut self, out: Value, ptr: u32, offsets: Value, mask: Option<Value>, other: f64, w: u32) -> R<()> {
        let d = self.p.ty(out).dtype;
        let stored = self.stored_type(ptr)?;
        let groups = self.p.ty(out).numel() / u64::from(w);
        let threads = u64::from(self.threads);
        // At most 16 elements in flight per thread (two bf16 vectors, four of f32): more made
        // ptxas spill in attention's backward (255 registers at 128 threads).
        let unroll = [4u64, 2].into_iter().find(|u| u * u64::from(w) <= 16 && groups.is_multiple_of(threads * u)).unwrap_or(1);
        let (tid, end, step) = (self.tid()?, self.i64c(groups as i64), self.i64c((threads * unroll) as i64));
        let wide = self.i64c(i64::from(w));
        let bounds = self.group_bounds(ptr, wide)?;
        let vec_ty = match stored {
            DType::Bf16 => self.ctx.bf16_type().vec_type(w),
            DType::F16 => self.ctx.f16_type().vec_type(w),
            DType::F32 => self.ctx.f32_type().vec_type(w),
            _ => self.ctx.i64_type().vec_type(w),
        };
        let reg = self.reg_type(d)?;
        let pack = self.packs(out, w);
        let narrow = self.storage.narrow.contains(&out);
        let raw = pack && stored == DType::Bf16 && narrow;
        // Groups whose bytes land in the tile as they are in memory (bf16 into a bf16 tile, f32
        // into an f32 one) move by `cp.async` (sm_80 and later) when the tile is in shared
        // memory, the tile pending until its first reader waits (`Gen::wait_copies`), unless
        // HLAC_NVPTX_ASYNC=0 (no copies) or =bf16 (bf16 groups only, the code before f32 copies).
        // Measured on an H200 (2026-12-03, B = 4, T = 4096, bf16), plain loads → packed stores
        // → copies: attention's forward 6.38 → 5.30 → 5.07 ms, `bwd_dq` 7.20 → 5.60 → 4.84,
        // `bwd_dkv` 29.8 → 25.7 → 25.7 (with RoPE: 8.81 → 7.28 → 6.82, 10.46 → 8.17 → 7.49);
        // GDN's forward 2.02 → 1.94 → 1.86, backward 13.8 → 13.5 → 13.5; GLA's forward 2.34 →
        // 2.15 and backward 18.2 → 17.4 (copies).
        // f32 copies: GDN's decode step waited on its f32 state's load after its bf16 loads had
        // landed (the profile build, 2026-12-06); copied, the state arrives beside them.
        let as_is = raw || (pack && stored == DType::F32 && !narrow);
        let copy = self.smem.is_some()
            && match std::env::var("HLAC_NVPTX_ASYNC").as_deref() {
                Ok("0") => false,
                Ok("bf16") => raw,
                _ => as_is,
            };

        self.counted(tid, end, step, &mut |g2, i| {
            let mut loaded: Vec<(IntValue<'ctx>, Group<'ctx>)> = Vec::new();
            for u in 0..unroll {
                let gi = g2.b.build_int_add(i, g2.i64c((u * threads) as i64), "").map_err(|x| g2.llvm(x))?;
                let e0 = g2.b.build_int_mul(gi, wide, "").map_err(|x| g2.llvm(x))?;
                let (addr, ok) = g2.vector_group(ptr, offsets, mask, e0, bounds)?;
                let vec_bb = g2.ctx.append_basic_block(g2.func, "vector");
                let one_bb = g2.ctx.append_basic_block(g2.func, "elements");
                let join = g2.ctx.append_basic_block(g2.func, "loaded");
                g2.b.build_conditional_branch(ok, vec_bb, one_bb).map_err(|x| g2.llvm(x))?;
                g2.b.position_at_end(vec_bb);
                let p = g2.b.build_int_to_ptr(addr, g2.ctx.ptr_type(AddressSpace::from(1)), "").map_err(|x| g2.llvm(x))?;
                if copy {
                    // The group goes from global to shared memory without a register, while the
                    // thread goes on (waited for by the tile's first reader); a group that may
                    // not move whole is loaded and stored element by element as below.
                    let dst = g2.tile_ptr(out, e0)?;
                    let f = g2.intrinsic("llvm.nvvm.cp.async.cg.shared.global.16", &[])?;
                    g2.b.build_call(f, &[dst.into(), p.into()], "").map_err(|x| g2.llvm(x))?;
                    g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
                    g2.b.position_at_end(one_bb);
                    let slow = g2.group_elements(ptr, (offsets, mask, other), e0, w, d)?;
                    let sv = if narrow { g2.bf16_vector(&slow)? } else { g2.vector_of(&slow, reg)? };
                    g2.store_group(out, e0, sv)?;
                    g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
                    g2.b.position_at_end(join);
                    continue;
                }
                let v = g2.b.build_load(vec_ty, p, "").map_err(|x| g2.llvm(x))?;
                let v = v.into_vector_value();
                v.as_instruction().ok_or_else(|| g2.llvm("a load that is no instruction"))?.set_alignment(16).map_err(|x| g2.llvm(x))?;
                let mut fast = Vec::new();
                for k in (0..w).filter(|_| !raw) {
                    let x = g2.b.build_extract_element(v, g2.ctx.i32_type().const_int(u64::from(k), false), "").map_err(|x| g2.llvm(x))?;
                    let x: BasicValueEnum = match stored {
                        DType::Bf16 | DType::F16 => {
                            g2.b.build_float_ext(x.into_float_value(), g2.ctx.f32_type(), "").map_err(|x| g2.llvm(x))?.into()
                        }
                        _ => x,
                    };
                    fast.push(x);
                }
                let vec_end = g2.b.get_insert_block().ok_or_else(|| g2.llvm("no insertion block"))?;
                g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
                g2.b.position_at_end(one_bb);
                let slow = g2.group_elements(ptr, (offsets, mask, other), e0, w, d)?;
                // bf16 in memory and in the tile: the group moves as the loaded bits, and the
                // element-wise path's values are rounded into a vector of the same type.
                let slow_vec = if raw { Some(g2.bf16_vector(&slow)?) } else { None };
                let one_end = g2.b.get_insert_block().ok_or_else(|| g2.llvm("no insertion block"))?;
                g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
                g2.b.position_at_end(join);
                if let Some(sv) = slow_vec {
                    let phi = g2.b.build_phi(vec_ty, "").map_err(|x| g2.llvm(x))?;
                    phi.add_incoming(&[(&v, vec_end), (&sv, one_end)]);
                    loaded.push((e0, Group::Raw(phi.as_basic_value().into_vector_value())));
                    continue;
                }
                let mut xs = Vec::new();
                for (x, y) in fast.into_iter().zip(slow) {
                    let phi = g2.b.build_phi(reg, "").map_err(|x| g2.llvm(x))?;
                    phi.add_incoming(&[(&x, vec_end), (&y, one_end)]);
                    xs.push(phi.as_basic_value());
                }
                loaded.push((e0, Group::Elements(xs)));
            }
            for (e0, group) in loaded {
                let xs = match group {
                    Group::Raw(v) => {
                        g2.store_group(out, e0, v)?;
                        continue;
                    }
                    Group::Elements(xs) if pack => {
                        let v = if g2.storage.narrow.contains(&out) { g2.bf16_vector(&xs)? } else { g2.vector_of(&xs, reg)? };
                        g2.store_group(out, e0, v)?;
                        continue;
                    }
                    Group::Elements(xs) => xs,
                };
                for (k, x) in xs.into_iter().enumerate() {
                    let at = g2.b.build_int_add(e0, g2.i64c(k as i64), "").map_err(|x| g2.llvm(x))?;
                    g2.write(out, at, x)?;
                }
            }
            Ok(())
        })?;
        if copy {
            self.commit_copies(out)?;
        }
        Ok(())
    }

    /// Whether a vector load's groups of `w` elements go into tile `out` as whole vectors (one
    /// store each; `HLAC_NVPTX_PACK=0` writes them element by element, the old code): an f32
    /// tile, stored as f32 or narrowed to bf16, whose groups are 16 bytes or less there. A group
    /// starts at a multiple of `w` in a row whose length `w` divides ([`Gen::vector_width`]),
    /// tiles start on 64-byte boundaries (`kir::layout`) and the swizzle moves whole 16-byte
    /// units, so its elements are adjacent and aligned in the workspace.
    fn packs(&self, out: Value, w: u32) -> bool {
        let bytes = self.tile_elem_bytes(out) as u32 * w;
        std::env::var("HLAC_NVPTX_PACK").map_or(true, |v| v != "0")
            && self.p.ty(out).dtype == DType::F32
            && w > 1
            && bytes <= 16
            && 16 % bytes == 0
    }

    /// The `w` elements of a load's group from element `e0` on, one bounds-checked access each
    /// (an out-of-bounds one reported): the path of a group that may not move whole.
    fn group_elements(
        &mut self,
        ptr: u32,
        (offsets, mask, other): (Value, Option<Value>, f64),
        e0: IntValue<'ctx>,
        w: u32,
        d: DType,
    ) -> R<Vec<BasicValueEnum<'ctx>>> {
        let mut out = Vec::with_capacity(w as usize);
        let mut report = self.ctx.bool_type().const_zero();
        for k in 0..w {
            let at = self.b.build_int_add(e0, self.i64c(i64::from(k)), "").map_err(|x| self.llvm(x))?;
            out.push(self.load_element(ptr, offsets, mask, at, d, other, &mut report)?);
        }
        self.report_if(report, ptr)?;
        Ok(out)
    }

    /// f32 values rounded to nearest even into a bf16 vector (as [`Gen::write`] rounds them).
    fn bf16_vector(&mut self, xs: &[BasicValueEnum<'ctx>]) -> R<VectorValue<'ctx>> {
        let bf16 = self.ctx.bf16_type();
        let rounded =
            xs.iter().map(|x| self.b.build_float_trunc(x.into_float_value(), bf16, "").map(Into::into)).collect::<Result<Vec<_>, _>>();
        self.vector_of(&rounded.map_err(|x| self.llvm(x))?, bf16.into())
    }

    /// Values of type `ty` as one vector.
    fn vector_of(&mut self, xs: &[BasicValueEnum<'ctx>], ty: BasicTypeEnum<'ctx>) -> R<VectorValue<'ctx>> {
        let n = xs.len() as u32;
        let mut v = match ty {
            BasicTypeEnum::FloatType(t) => t.vec_type(n),
            BasicTypeEnum::IntType(t) => t.vec_type(n),
            _ => return Err(self.llvm("a vector of neither floats nor integers")),
        }
        .get_undef();
        for (k, x) in xs.iter().enumerate() {
            v = self.b.build_insert_element(v, *x, self.ctx.i32_type().const_int(k as u64, false), "").map_err(|x| self.llvm(x))?;
        }
        Ok(v)
    }

    /// Stores the vector `v` of tile `out`'s elements from `e0` on with one aligned store.
    fn store_group(&mut self, out: Value, e0: IntValue<'ctx>, v: VectorValue<'ctx>) -> R<()> {
        let bytes = self.tile_elem_bytes(out) as u32 * v.get_type().get_size();
        let ptr = self.tile_ptr(out, e0)?;
        let st = self.b.build_store(ptr, v).map_err(|x| self.llvm(x))?;
        st.set_alignment(bytes).map_err(|x| self.llvm(x))?;
        Ok(())
    }
}

/// One group of a vector load, before it is written: its elements as f32, or (bf16 in memory and
/// in the tile) the loaded bf16 vector itself.
enum Group<'ctx> {
    Elements(Vec<BasicValueEnum<'ctx>>),
    Raw(VectorValue<'ctx>),
}

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// `store ptr[offsets] = value mask …` in groups of `w` elements ([`Gen::vector_width`] of the
    /// same facts as a load): each group as one aligned vector store of the rounded elements
    /// when its pointer is 16-byte aligned, the group in bounds and the mask on; any other group
    /// element by element, bounds-checked. No barrier: the caller's.
    pub(super) fn store_vectors(&mut self, ptr: u32, offsets: Value, value: Value, mask: Option<Value>, w: u32) -> R<()> {
        let d = self.p.ty(value).dtype;
        let stored = self.stored_type(ptr)?;
        let groups = self.p.ty(value).numel() / u64::from(w);
        let threads = u64::from(self.threads);
        let (tid, end, step) = (self.tid()?, self.i64c(groups as i64), self.i64c(threads as i64));
        let wide = self.i64c(i64::from(w));
        let bounds = self.group_bounds(ptr, wide)?;
        let narrow = match stored {
            DType::Bf16 => Some(self.ctx.bf16_type()),
            DType::F16 => Some(self.ctx.f16_type()),
            _ => None,
        };
        self.counted(tid, end, step, &mut |g2, gi| {
            let e0 = g2.b.build_int_mul(gi, wide, "").map_err(|x| g2.llvm(x))?;
            let (addr, ok) = g2.vector_group(ptr, offsets, mask, e0, bounds)?;
            let vec_bb = g2.ctx.append_basic_block(g2.func, "vector_store");
            let one_bb = g2.ctx.append_basic_block(g2.func, "element_stores");
            let join = g2.ctx.append_basic_block(g2.func, "stored");
            g2.b.build_conditional_branch(ok, vec_bb, one_bb).map_err(|x| g2.llvm(x))?;
            g2.b.position_at_end(vec_bb);
            let mut xs = Vec::new();
            for k in 0..w {
                let at = g2.b.build_int_add(e0, g2.i64c(i64::from(k)), "").map_err(|x| g2.llvm(x))?;
                xs.push(g2.read(value, at)?);
            }
            // The group as one vector: of f32 (rounded to the narrow type after) or of i64.
            let elem = if d == DType::F32 { g2.ctx.f32_type().into() } else { g2.ctx.i64_type().into() };
            let mut vec = g2.vector_of(&xs, elem)?;
            if let Some(nt) = narrow {
                vec = g2.b.build_float_trunc(vec, nt.vec_type(w), "").map_err(|x| g2.llvm(x))?;
            }
            let p = g2.b.build_int_to_ptr(addr, g2.ctx.ptr_type(AddressSpace::from(1)), "").map_err(|x| g2.llvm(x))?;
            let st = g2.b.build_store(p, vec).map_err(|x| g2.llvm(x))?;
            st.set_alignment(16).map_err(|x| g2.llvm(x))?;
            g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
            g2.b.position_at_end(one_bb);
            for k in 0..w {
                let at = g2.b.build_int_add(e0, g2.i64c(i64::from(k)), "").map_err(|x| g2.llvm(x))?;
                g2.store_element(ptr, offsets, value, mask, at, d)?;
            }
            g2.b.build_unconditional_branch(join).map_err(|x| g2.llvm(x))?;
            g2.b.position_at_end(join);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlac_runtime::kir::{Builder, CmpOp, DType, Inst};

    /// Evaluates the integer and bool tiles of a straight-line program (i64, bools as 0/1), with
    /// `program_id` = `pid`: the reference the facts are checked against.
    fn eval(p: &Program, pid: i64) -> HashMap<Value, Vec<i64>> {
        let mut vals: HashMap<Value, Vec<i64>> = HashMap::new();
        for Inst { results, op } in &p.body.insts {
            let Some(&r) = results.first() else { continue };
            let shape = &p.ty(r).shape;
            let n: usize = shape.iter().map(|&x| x as usize).product();
            let src = |v: &Value, i: usize, vals: &HashMap<Value, Vec<i64>>| -> i64 {
                // Broadcasting read: the source index of element i of `r`.
                let s = &p.ty(*v).shape;
                if s.is_empty() {
                    return vals[v][0];
                }
                let (mut rest, mut at, mut stride) = (i, 0usize, 1usize);
                for k in (0..shape.len()).rev() {
                    let ix = rest % shape[k] as usize;
                    rest /= shape[k] as usize;
                    if s[k] != 1 {
                        at += ix * stride;
                    }
                    stride *= s[k] as usize;
                }
                vals[v][at]
            };
            let out: Vec<i64> = match op {
                Op::Const(Const::Int(c)) => vec![*c],
                Op::ProgramId(_) => vec![pid],
                Op::Iota(m) => (0..i64::from(*m)).collect(),
                Op::Broadcast(a) => (0..n).map(|i| src(a, i, &vals)).collect(),
                Op::Reshape(a) => vals[a].clone(),
                Op::Binary(op, a, b) => (0..n)
                    .map(|i| {
                        let (x, y) = (src(a, i, &vals), src(b, i, &vals));
                        match op {
                            BinOp::Add => x + y,
                            BinOp::Sub => x - y,
                            BinOp::Mul => x * y,
                            BinOp::Rem => x % y,
                            BinOp::Div => x / y,
                            BinOp::Min => x.min(y),
                            _ => x.max(y),
                        }
                    })
                    .collect(),
                Op::Cmp(op, a, b) => (0..n)
                    .map(|i| {
                        let (x, y) = (src(a, i, &vals), src(b, i, &vals));
                        i64::from(match op {
                            CmpOp::Lt => x < y,
                            CmpOp::Le => x <= y,
                            CmpOp::Gt => x > y,
                            CmpOp::Ge => x >= y,
                            CmpOp::Eq => x == y,
                            CmpOp::Ne => x != y,
                        })
                    })
                    .collect(),
                Op::Select { cond, then, otherwise } => {
                    (0..n).map(|i| if src(cond, i, &vals) != 0 { src(then, i, &vals) } else { src(otherwise, i, &vals) }).collect()
                }
                other => panic!("not evaluated: {other:?}"),
            };
            vals.insert(r, out);
        }
        vals
    }

    /// Every fact the analysis claims holds on every group of every value of random index
    /// programs (iotas of awkward and round lengths, row and column broadcasts, constants and a
    /// program id, sums, differences, products, remainders, selects, comparisons of every kind),
    /// for groups of 2, 4 and 8, with the bound rule off and on — and the analysis knows the
    /// offsets fla-style kernels load through.
    #[test]
    fn facts_hold_on_random_index_programs() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let (rows, cols) = (3u32, 48u32);
        // Shapes that broadcast to the whole [rows, cols] tile.
        let broadcastable = |b: &Builder, v: Value| {
            let s = b.shape(v);
            s.is_empty() || s == [1, cols] || s == [rows, 1] || s == [rows, cols]
        };
        let mut known = 0;
        for _ in 0..300 {
            let mut b = Builder::new("t", &["x"]);
            let pid = b.program_id(0);
            let mut pool = vec![pid];
            for _ in 0..12 {
                let pick = |next: &mut dyn FnMut(u64) -> u64, pool: &Vec<Value>| pool[next(pool.len() as u64) as usize];
                let v = match next(10) {
                    0 => {
                        let len = [cols, 8, 24][next(3) as usize];
                        let i = b.iota(len);
                        if len == cols {
                            b.row(i)
                        } else {
                            i
                        }
                    }
                    1 => {
                        let i = b.iota(rows);
                        b.col(i)
                    }
                    2 => b.i64([0, 1, 2, 4, 8, 16, 24, 48, 64, 3, -8][next(11) as usize]),
                    3 | 4 => {
                        let (x, y) = (pick(&mut next, &pool), pick(&mut next, &pool));
                        if !broadcastable(&b, x) || !broadcastable(&b, y) {
                            continue;
                        }
                        let op = [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Add][next(4) as usize];
                        b.binary(op, x, y)
                    }
                    5 => {
                        let x = pick(&mut next, &pool);
                        if !broadcastable(&b, x) {
                            continue;
                        }
                        let k = b.i64([8, 16, 12, 48, 5][next(5) as usize]);
                        b.binary(BinOp::Rem, x, k)
                    }
                    6 => {
                        let x = pick(&mut next, &pool);
                        let s = b.shape(x);
                        if !(s.is_empty() || s == [1, cols] || s == [rows, 1]) {
                            continue;
                        }
                        b.broadcast(x, &[rows, cols])
                    }
                    7 => {
                        let (c, x, y) = (pick(&mut next, &pool), pick(&mut next, &pool), pick(&mut next, &pool));
                        let full = [rows, cols];
                        if [c, x, y].iter().any(|&v| !broadcastable(&b, v)) {
                            continue;
                        }
                        let zero = b.i64(0);
                        let c = b.cmp(CmpOp::Lt, c, zero);
                        let x = b.broadcast(x, &full);
                        let y = b.broadcast(y, &full);
                        let c = b.broadcast(c, &full);
                        b.select(c, x, y)
                    }
                    8 => {
                        let x = pick(&mut next, &pool);
                        let k = b.i64(128);
                        b.mul(x, k)
                    }
                    _ => {
                        // A comparison of any kind, either way round, against a pool value or a
                        // bound (multiples of the group sizes and not): masks such as `channel <
                        // heads`.
                        let x = if next(2) == 0 {
                            // A block of channels, as the scans and pieces index them.
                            let i = b.iota(cols);
                            let width = b.i64(i64::from(cols));
                            let c0 = b.mul(pid, width);
                            let c = b.add(i, c0);
                            b.row(c)
                        } else {
                            pick(&mut next, &pool)
                        };
                        let bounds = [0, 8, 16, 48, 24, 3, 5, 40, -8, 56, 64];
                        let y = if next(4) == 0 { pick(&mut next, &pool) } else { b.i64(bounds[next(11) as usize]) };
                        if !broadcastable(&b, x) || !broadcastable(&b, y) {
                            continue;
                        }
                        let op = [CmpOp::Lt, CmpOp::Le, CmpOp::Gt, CmpOp::Ge, CmpOp::Eq, CmpOp::Ne][next(6) as usize];
                        let (x, y) = if next(2) == 0 { (x, y) } else { (y, x) };
                        let full = [rows, cols];
                        let (x, y) = (b.broadcast(x, &full), b.broadcast(y, &full));
                        b.cmp(op, x, y)
                    }
                };
                pool.push(v);
            }
            let p = b.finish();
            // Program 0 (whose channel blocks meet the small bounds) and another; the analysis as
            // the back end runs it by default, and with the bound rule on.
            let pids = [0, next(5) as i64 * 7];
            for (pid, bounds) in pids.into_iter().flat_map(|pid| [(pid, false), (pid, true)]) {
                let vals = eval(&p, pid);
                let mut c = Contig::new(&p);
                c.bounds = bounds;
                for (&v, x) in &vals {
                    let last = p.ty(v).shape.last().copied().unwrap_or(1) as usize;
                    for g in [2u32, 4, 8] {
                        let Some(f) = c.fact(v, g) else { continue };
                        known += 1;
                        let g = g as usize;
                        for (row, chunk) in x.chunks(last).enumerate() {
                            let groups: Vec<&[i64]> = if last == 1 { chunk.chunks(1).collect() } else { chunk.chunks(g).collect() };
                            for grp in groups {
                                if last != 1 && grp.len() < g {
                                    continue; // a ragged tail: loads with it never vectorise
                                }
                                let first = grp[0];
                                let ok_div = if f.div == 0 { first == 0 } else { first.unsigned_abs() % f.div == 0 };
                                let ok_step = grp.windows(2).all(|w| w[1] - w[0] == f.stride);
                                let ok_konst = f.konst.is_none_or(|k| grp.iter().all(|&e| e == k));
                                assert!(ok_div && ok_step && ok_konst, "{v} (row {row}, g {g}, bounds {bounds}): {f:?} but {grp:?}\n{p}");
                            }
                        }
                    }
                }
            }
        }
        assert!(known > 1000, "the analysis knew too little to test: {known} facts");
    }

    /// The offsets of a RoPE-style head load (row base × width, columns rotated by half the head)
    /// are known contiguous and aligned; shifted by one element they are contiguous but unaligned.
    #[test]
    fn rotated_head_offsets_vectorise() {
        let mut b = Builder::new("t", &["x"]);
        let ptr = b.ptr("x", DType::Bf16, false);
        let pid = b.program_id(0);
        let rows = b.iota(16);
        let rows = b.add(rows, pid);
        let rows = b.col(rows);
        let width = b.i64(2048);
        let base = b.mul(rows, width);
        let cols = b.iota(128);
        let half = b.i64(64);
        let shifted = b.add(cols, half);
        let d = b.i64(128);
        let partner = b.binary(BinOp::Rem, shifted, d);
        let partner = b.row(partner);
        let off = b.add(base, partner);
        let one = b.i64(1);
        let odd = b.add(off, one);
        let _ = b.load(ptr, off, None, 0.0);
        let p = b.finish();
        let mut c = Contig::new(&p);
        let f = c.fact(off, 8).expect("known");
        assert_eq!((f.stride, f.div % 8), (1, 0));
        let f = c.fact(odd, 8).expect("known");
        assert_eq!(f.stride, 1);
        assert_ne!(f.div % 2, 0);
    }
}
