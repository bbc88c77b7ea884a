//! Warp-cooperative forms of tile operations whose per-thread form serialises: a reduction along
//! a tile's last axis gives each output row to one warp (lanes stride along the row, then combine
//! by butterfly shuffles) instead of to one thread reading the row alone — a thread per row reads
//! a column of the workspace, every lane of a warp in the same shared-memory bank when the row
//! length is a multiple of 32 (a 32-way conflict on every read).

use super::{Gen, R};
use hlac_runtime::kir::{BinOp, DType, ReduceOp, Value};
use inkwell::types::BasicTypeEnum;
use inkwell::values::BasicValueEnum;

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
        let shfl = self.intrinsic("llvm.nvvm.shfl.sync.bfly.f32", &[])?;
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
            let mut v = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
            let full: BasicValueEnum = g.ctx.i32_type().const_all_ones().into();
            let clamp: BasicValueEnum = g.ctx.i32_type().const_int(31, false).into();
            for m in [16u64, 8, 4, 2, 1] {
                let mask: BasicValueEnum = g.ctx.i32_type().const_int(m, false).into();
                let other = g.call(shfl, &[full, v, mask, clamp])?;
                v = g.binary(bop, d, v, other)?;
            }
            // Every lane holds the row's value; lane 0 writes it.
            let first = g.b.build_int_compare(inkwell::IntPredicate::EQ, lane, g.i64c(0), "").map_err(|x| g.llvm(x))?;
            let w = g.ctx.append_basic_block(g.func, "row_out");
            let j = g.ctx.append_basic_block(g.func, "row_done");
            g.b.build_conditional_branch(first, w, j).map_err(|x| g.llvm(x))?;
            g.b.position_at_end(w);
            g.write(out, o, v)?;
            g.b.build_unconditional_branch(j).map_err(|x| g.llvm(x))?;
            g.b.position_at_end(j);
            Ok(())
        })?;
        self.barrier()
    }
}
