//! Warp-cooperative forms of tile operations whose per-thread form serialises (the first and
//! last also take several rows or steps at once):
//! - a reduction along a tile's last axis gives each output row to one warp (lanes stride along
//!   the row, then combine by butterfly shuffles) instead of to one thread reading the row alone —
//!   a thread per row reads a column of the workspace, every lane of a warp in the same
//!   shared-memory bank when the row length is a multiple of 32 (a 32-way conflict on every read);
//! - a `dot` with fewer outputs than threads (a decode step's matrix–vector products, 1 × 64
//!   outputs over K = 128 on 256 threads) splits each output's reduction across a group of lanes
//!   instead of leaving most threads idle while the others walk the whole of K.

use super::{Gen, NvptxError, R};
use hlac_runtime::kir::{BinOp, DType, ReduceOp, Value};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, IntValue};

/// Rows a warp reduces together ([`Gen::reduce_rows_warp`]).
const ROWS_AT_ONCE: u64 = 8;

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// `out[o] = reduce(a[o, 0..extent])` for an f32 tile `a` of `outer` rows, one warp per row.
    /// A warp takes up to [`ROWS_AT_ONCE`] of its rows together, with an accumulator each, so
    /// their loads and their shuffles' latencies overlap instead of queueing row after row (the
    /// profile build measured a 64 × 64 row max at 3.5 k cycles in attention's forward, one row
    /// at a time; `HLAC_NVPTX_REDUCE_ROWS=1` keeps that, for A/B measurements).
    pub(super) fn reduce_rows_warp(&mut self, out: Value, a: Value, op: ReduceOp, outer: u64, extent: u64) -> R<()> {
        let d = DType::F32;
        let bop = match op {
            ReduceOp::Sum => BinOp::Add,
            ReduceOp::Max => BinOp::Max,
            ReduceOp::Min => BinOp::Min,
        };
        let t: BasicTypeEnum = self.ctx.f32_type().into();
        let warps = u64::from(self.threads / 32);
        // Rows per warp at once: a divisor of each warp's share, so no row is out of range.
        let share = outer.div_ceil(warps);
        let limit = std::env::var("HLAC_NVPTX_REDUCE_ROWS").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(ROWS_AT_ONCE).max(1);
        let group =
            if outer.is_multiple_of(warps) { (1..=limit.min(share)).rev().find(|g| share.is_multiple_of(*g)).unwrap_or(1) } else { 1 };
        let accs = (0..group).map(|_| self.stack_slot(t)).collect::<R<Vec<_>>>()?;
        let e = |x| self.llvm(x);
        let lane = self.b.build_and(self.tid()?, self.i64c(31), "").map_err(e)?;
        let warp = self.b.build_right_shift(self.tid()?, self.i64c(5), false, "").map_err(e)?;
        // Warp w takes rows w·group … w·group + group − 1, then the same again warps·group on.
        let first_row = self.b.build_int_mul(warp, self.i64c(group as i64), "").map_err(e)?;
        let rows = self.i64c(outer as i64);
        let stride = self.i64c((warps * group) as i64);
        self.counted(first_row, rows, stride, &mut |g, o| {
            let z = g.zero(d, op)?;
            for acc in &accs {
                g.b.build_store(*acc, z).map_err(|x| g.llvm(x))?;
            }
            let (end, step) = (g.i64c(extent as i64), g.i64c(32));
            g.counted(lane, end, step, &mut |g, k| {
                for (r, acc) in accs.iter().enumerate() {
                    let row = g.b.build_int_add(o, g.i64c(r as i64), "").map_err(|x| g.llvm(x))?;
                    let row = g.b.build_int_mul(row, g.i64c(extent as i64), "").map_err(|x| g.llvm(x))?;
                    let idx = g.b.build_int_add(row, k, "").map_err(|x| g.llvm(x))?;
                    let x = g.read(a, idx)?;
                    let cur = g.b.build_load(t, *acc, "").map_err(|x| g.llvm(x))?;
                    let nv = g.binary(bop, d, cur, x)?;
                    g.b.build_store(*acc, nv).map_err(|x| g.llvm(x))?;
                }
                Ok(())
            })?;
            let mut vs = Vec::with_capacity(accs.len());
            for acc in &accs {
                vs.push(g.b.build_load(t, *acc, "").map_err(|x| g.llvm(x))?);
            }
            let vs = g.butterflies(vs, 32, &mut |g, x, y| g.binary(bop, d, x, y))?;
            // Every lane holds each row's value; lane 0 writes them.
            let first = g.b.build_int_compare(inkwell::IntPredicate::EQ, lane, g.i64c(0), "").map_err(|x| g.llvm(x))?;
            g.only_where(first, &mut |g| {
                for (r, v) in vs.iter().enumerate() {
                    let row = g.b.build_int_add(o, g.i64c(r as i64), "").map_err(|x| g.llvm(x))?;
                    g.write(out, row, *v)?;
                }
                Ok(())
            })
        })?;
        self.barrier()
    }

    /// `out = a · b` with each output's sum over k split across a group of `parts` neighbouring
    /// lanes (a power of two, at most 32, so a group never straddles warps): lane j of a group sums
    /// the terms l ≡ j (mod parts), then the group adds its partial sums by butterfly shuffles
    /// and its first lane writes. Used when the product has at most half as many outputs as the
    /// block has threads and k ≥ 2; returns whether it applied. Every thread takes part in the
    /// shuffles (idle ones with zero), as `shfl.sync` over the full warp requires.
    pub(super) fn dot_split_k(&mut self, out: Value, a: Value, b: Value) -> R<bool> {
        let (m, k) = (u64::from(self.p.ty(a).shape[0]), u64::from(self.p.ty(a).shape[1]));
        let n = u64::from(self.p.ty(b).shape[1]);
        let outputs = m * n;
        let mut parts = 1u64;
        while parts < 32 && outputs * parts * 2 <= u64::from(self.threads) && parts * 2 <= k {
            parts *= 2;
        }
        // HLAC_NVPTX_SPLITK=off keeps the one-thread-per-output loop, for A/B measurements.
        if parts < 2 || !self.split_k || std::env::var("HLAC_NVPTX_SPLITK").is_ok_and(|v| v == "off") {
            return Ok(false);
        }
        self.alloc(out);
        let e = |x: inkwell::builder::BuilderError| super::NvptxError::Llvm { kernel: String::new(), message: x.to_string() };
        let t: BasicTypeEnum = self.ctx.f32_type().into();
        let acc = self.stack_slot(t)?;
        let fma = self.intrinsic("llvm.fma", &[t])?;
        let shift = i64::from(parts.trailing_zeros());
        let o = self.b.build_right_shift(self.tid()?, self.i64c(shift), false, "").map_err(e)?;
        let j = self.b.build_and(self.tid()?, self.i64c(parts as i64 - 1), "").map_err(e)?;
        let active = self.b.build_int_compare(inkwell::IntPredicate::ULT, o, self.i64c(outputs as i64), "").map_err(e)?;
        let i = self.b.build_int_unsigned_div(o, self.i64c(n as i64), "").map_err(e)?;
        let c = self.b.build_int_unsigned_rem(o, self.i64c(n as i64), "").map_err(e)?;
        self.b.build_store(acc, self.f32c(0.0)).map_err(e)?;
        // An idle thread's loop runs no iterations.
        let end = self.b.build_select(active, self.i64c(k as i64), self.i64c(0), "").map_err(e)?.into_int_value();
        let step = self.i64c(parts as i64);
        let row = self.b.build_int_mul(i, self.i64c(k as i64), "").map_err(e)?;
        self.counted(j, end, step, &mut |g, l: IntValue<'ctx>| {
            let ia = g.b.build_int_add(row, l, "").map_err(|x| g.llvm(x))?;
            let ib = g.b.build_int_mul(l, g.i64c(n as i64), "").map_err(|x| g.llvm(x))?;
            let ib = g.b.build_int_add(ib, c, "").map_err(|x| g.llvm(x))?;
            g.fma_into(acc, fma, (a, ia), (b, ib))
        })?;
        let v = self.b.build_load(t, acc, "").map_err(e)?;
        let add = |g: &mut Self, x: BasicValueEnum<'ctx>, y: BasicValueEnum<'ctx>| -> R<BasicValueEnum<'ctx>> {
            Ok(g.b.build_float_add(x.into_float_value(), y.into_float_value(), "").map_err(|x| g.llvm(x))?.into())
        };
        let v = self.butterfly(v, parts, &mut |g, x, y| add(g, x, y))?;
        let lead = self.b.build_int_compare(inkwell::IntPredicate::EQ, j, self.i64c(0), "").map_err(e)?;
        let writes = self.b.build_and(active, lead, "").map_err(e)?;
        self.only_where(writes, &mut |g| g.write(out, o, v))?;
        self.barrier()?;
        Ok(true)
    }

    /// An inclusive sum `scan` (forward or `reverse`) of an f32 tile with at most one line per
    /// warp and at most 8 elements per lane, a warp per line: each lane sums its run of
    /// consecutive elements, the warp scans the runs' totals by shuffles, and each lane adds the
    /// total before its run. One thread walking the line did 64 dependent read-add-writes for a
    /// chunk's cumulative gate (13 k cycles, 5.5 % of Gated DeltaNet's forward in the profile
    /// build). Returns whether it applied; the sums associate differently from the CPU's
    /// left-to-right ones (within the f32 tolerance). `HLAC_NVPTX_SCAN=serial` keeps the serial
    /// walk, for A/B measurements.
    pub(super) fn scan_sum_warp(&mut self, out: Value, a: Value, (outer, extent, inner): (u64, u64, u64), reverse: bool) -> R<bool> {
        let lines = outer * inner;
        let run = extent.div_ceil(32);
        if lines > u64::from(self.threads / 32) || run > 8 || std::env::var("HLAC_NVPTX_SCAN").is_ok_and(|v| v == "serial") {
            return Ok(false);
        }
        let e = |x| self.llvm(x);
        let f32t = self.ctx.f32_type();
        let lane = self.b.build_and(self.tid()?, self.i64c(31), "").map_err(e)?;
        let warp = self.b.build_right_shift(self.tid()?, self.i64c(5), false, "").map_err(e)?;
        let active = self.b.build_int_compare(inkwell::IntPredicate::SLT, warp, self.i64c(lines as i64), "").map_err(e)?;
        // Whole warps skip or run it, so the shuffles see every lane of theirs.
        self.only_where(active, &mut |g| {
            let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
            let o = g.b.build_int_signed_div(warp, g.i64c(inner as i64), "").map_err(e)?;
            let n = g.b.build_int_signed_rem(warp, g.i64c(inner as i64), "").map_err(e)?;
            // Step s of the scan's direction is element `at(s)` of the line.
            let at = |g: &Self, step: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                let e = |x| g.llvm(x);
                let k = if reverse { g.b.build_int_sub(g.i64c(extent as i64 - 1), step, "").map_err(e)? } else { step };
                let t = g.b.build_int_mul(o, g.i64c(extent as i64), "").map_err(e)?;
                let t = g.b.build_int_add(t, k, "").map_err(e)?;
                let t = g.b.build_int_mul(t, g.i64c(inner as i64), "").map_err(e)?;
                g.b.build_int_add(t, n, "").map_err(e)
            };
            let start = g.b.build_int_mul(lane, g.i64c(run as i64), "").map_err(e)?;
            // The run's prefix sums, in registers (steps past the line's end add nothing).
            let mut sums = Vec::with_capacity(run as usize);
            let mut total = f32t.const_zero();
            for j in 0..run {
                let step = g.b.build_int_add(start, g.i64c(j as i64), "").map_err(e)?;
                let inside = g.b.build_int_compare(inkwell::IntPredicate::SLT, step, g.i64c(extent as i64), "").map_err(e)?;
                let slot = g.stack_slot(f32t.into())?;
                g.b.build_store(slot, f32t.const_zero()).map_err(e)?;
                g.only_where(inside, &mut |g| {
                    let idx = at(g, step)?;
                    let x = g.read(a, idx)?;
                    g.b.build_store(slot, x).map_err(|x| g.llvm(x))?;
                    Ok(())
                })?;
                let x = g.b.build_load(f32t, slot, "").map_err(e)?.into_float_value();
                total = g.b.build_float_add(total, x, "").map_err(e)?;
                sums.push((step, inside, total));
            }
            // Inclusive scan of the runs' totals across the warp, then the total before this run.
            let shfl = g.intrinsic("llvm.nvvm.shfl.sync.up.f32", &[])?;
            let full: BasicValueEnum = g.ctx.i32_type().const_all_ones().into();
            let clamp: BasicValueEnum = g.ctx.i32_type().const_zero().into();
            let mut incl = total;
            let mut d = 1;
            while d < 32 {
                let delta: BasicValueEnum = g.ctx.i32_type().const_int(d, false).into();
                let other = g.call(shfl, &[full, incl.into(), delta, clamp])?.into_float_value();
                let has = g.b.build_int_compare(inkwell::IntPredicate::UGE, lane, g.i64c(d as i64), "").map_err(e)?;
                let added = g.b.build_float_add(incl, other, "").map_err(e)?;
                incl = g.b.build_select(has, added, incl, "").map_err(e)?.into_float_value();
                d *= 2;
            }
            let before = g.b.build_float_sub(incl, total, "").map_err(e)?;
            for (step, inside, sum) in sums {
                let v = g.b.build_float_add(before, sum, "").map_err(e)?;
                g.only_where(inside, &mut |g| {
                    let idx = at(g, step)?;
                    g.write(out, idx, v.into())
                })?;
            }
            Ok(())
        })?;
        self.barrier()?;
        Ok(true)
    }

    /// [`Gen::butterfly`] of several values at once, step by step (their shuffles overlap).
    fn butterflies(
        &mut self,
        mut vs: Vec<BasicValueEnum<'ctx>>,
        width: u64,
        combine: &mut dyn FnMut(&mut Self, BasicValueEnum<'ctx>, BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>>,
    ) -> R<Vec<BasicValueEnum<'ctx>>> {
        let shfl = self.intrinsic("llvm.nvvm.shfl.sync.bfly.f32", &[])?;
        let full: BasicValueEnum = self.ctx.i32_type().const_all_ones().into();
        let clamp: BasicValueEnum = self.ctx.i32_type().const_int(31, false).into();
        let mut mask = width / 2;
        while mask >= 1 {
            let lane_mask: BasicValueEnum = self.ctx.i32_type().const_int(mask, false).into();
            let others = vs.iter().map(|v| self.call(shfl, &[full, *v, lane_mask, clamp])).collect::<R<Vec<_>>>()?;
            for (v, other) in vs.iter_mut().zip(others) {
                *v = combine(self, *v, other)?;
            }
            mask /= 2;
        }
        Ok(vs)
    }

    /// Combines `v` across each aligned group of `width` lanes (a power of two, at most 32) by
    /// butterfly shuffles over lane distances width/2, …, 1: every lane of a group ends with the
    /// group's `combine` of all its values. Every lane of the warp must execute it.
    fn butterfly(
        &mut self,
        v: BasicValueEnum<'ctx>,
        width: u64,
        combine: &mut dyn FnMut(&mut Self, BasicValueEnum<'ctx>, BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>>,
    ) -> R<BasicValueEnum<'ctx>> {
        let vs = self.butterflies(vec![v], width, combine)?;
        vs.into_iter().next().ok_or_else(|| self.llvm("a butterfly without its value"))
    }
}
