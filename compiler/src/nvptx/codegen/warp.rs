//! Warp-cooperative forms of tile operations whose per-thread form serialises:
//! - a reduction along a tile's last axis gives each output row to one warp (lanes stride along
//!   the row, then combine by butterfly shuffles) instead of to one thread reading the row alone —
//!   a thread per row reads a column of the workspace, every lane of a warp in the same
//!   shared-memory bank when the row length is a multiple of 32 (a 32-way conflict on every read);
//! - a `dot` with fewer outputs than threads (a decode step's matrix–vector products, 1 × 64
//!   outputs over K = 128 on 256 threads) splits each output's reduction across a group of lanes
//!   instead of leaving most threads idle while the others walk the whole of K.

use super::{Gen, R};
use hlac_runtime::kir::{BinOp, DType, ReduceOp, Value};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, IntValue};

impl<'a, 'ctx> Gen<'a, 'ctx> {
    /// `out[o] = reduce(a[o, 0..extent])` for an f32 tile `a` of `outer` rows, one warp per row.
    pub(super) fn reduce_rows_warp(&mut self, out: Value, a: Value, op: ReduceOp, outer: u64, extent: u64) -> R<()> {
        let d = DType::F32;
        let bop = match op {
            ReduceOp::Sum => BinOp::Add,
            ReduceOp::Max => BinOp::Max,
            ReduceOp::Min => BinOp::Min,
        };
        let t: BasicTypeEnum = self.ctx.f32_type().into();
        let acc = self.stack_slot(t)?;
        let e = |x| self.llvm(x);
        let lane = self.b.build_and(self.tid, self.i64c(31), "").map_err(e)?;
        let warp = self.b.build_right_shift(self.tid, self.i64c(5), false, "").map_err(e)?;
        let warps = self.i64c(i64::from(self.threads / 32));
        let rows = self.i64c(outer as i64);
        self.counted(warp, rows, warps, &mut |g, o| {
            let z = g.zero(d, op)?;
            g.b.build_store(acc, z).map_err(|x| g.llvm(x))?;
            let row = g.b.build_int_mul(o, g.i64c(extent as i64), "").map_err(|x| g.llvm(x))?;
            let (end, step) = (g.i64c(extent as i64), g.i64c(32));
            g.counted(lane, end, step, &mut |g, k| {
                let idx = g.b.build_int_add(row, k, "").map_err(|x| g.llvm(x))?;
                let x = g.read(a, idx)?;
                let cur = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
                let nv = g.binary(bop, d, cur, x)?;
                g.b.build_store(acc, nv).map_err(|x| g.llvm(x))?;
                Ok(())
            })?;
            let v = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
            let v = g.butterfly(v, 32, &mut |g, x, y| g.binary(bop, d, x, y))?;
            // Every lane holds the row's value; lane 0 writes it.
            let first = g.b.build_int_compare(inkwell::IntPredicate::EQ, lane, g.i64c(0), "").map_err(|x| g.llvm(x))?;
            g.only_where(first, &mut |g| g.write(out, o, v))
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
        let o = self.b.build_right_shift(self.tid, self.i64c(shift), false, "").map_err(e)?;
        let j = self.b.build_and(self.tid, self.i64c(parts as i64 - 1), "").map_err(e)?;
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

    /// Combines `v` across each aligned group of `width` lanes (a power of two, at most 32) by
    /// butterfly shuffles over lane distances width/2, …, 1: every lane of a group ends with the
    /// group's `combine` of all its values. Every lane of the warp must execute it.
    fn butterfly(
        &mut self,
        mut v: BasicValueEnum<'ctx>,
        width: u64,
        combine: &mut dyn FnMut(&mut Self, BasicValueEnum<'ctx>, BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>>,
    ) -> R<BasicValueEnum<'ctx>> {
        let shfl = self.intrinsic("llvm.nvvm.shfl.sync.bfly.f32", &[])?;
        let full: BasicValueEnum = self.ctx.i32_type().const_all_ones().into();
        let clamp: BasicValueEnum = self.ctx.i32_type().const_int(31, false).into();
        let mut mask = width / 2;
        while mask >= 1 {
            let lane_mask: BasicValueEnum = self.ctx.i32_type().const_int(mask, false).into();
            let other = self.call(shfl, &[full, v, lane_mask, clamp])?;
            v = combine(self, v, other)?;
            mask /= 2;
        }
        Ok(v)
    }
}
