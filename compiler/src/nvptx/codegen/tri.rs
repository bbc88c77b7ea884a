//! `tri_inv` by blocks: X = (I + L)⁻¹ for the strictly lower part L of an n × n tile, n a
//! multiple of 16, in 16 × 16 blocks.
//!
//! The column-by-column solve (one thread per column, each of its n steps a dot product of up to
//! n − 1 terms read from the workspace) left three quarters of a 256-thread block idle on a
//! dependent chain of n²/2 loads: the profile build measured 130 k cycles per 64 × 64 inverse,
//! 53 % of Gated DeltaNet's forward and 62 % of DeltaNet's. By blocks:
//!
//! 1. the diagonal blocks X_II = (I + L_II)⁻¹, one thread per column of every block, the whole
//!    16-row solve unrolled in registers (each step reads one element of L that the block's 16
//!    threads share: a broadcast), while the blocks above the diagonal are cleared;
//! 2. block row by block row, I = 1 … n/16 − 1: X_IJ = −X_II · Σ_{J ≤ K < I} L_IK X_KJ for every
//!    J < I at once: the sum over m = 16K + k runs over all m < 16I, since X is zero above its
//!    diagonal, so every thread of a row step runs the same loop and reads the same elements of L
//!    (broadcasts); one thread per column (J, c) keeps its sums in registers and applies the
//!    triangular X_II, one barrier per block row. (`HLAC_NVPTX_TRIINV_PARTS=2|4`: that many
//!    threads per column share its 16 rows, leaving the sums in the rows of X they will become,
//!    then one thread per column applies X_II, two barriers per block row — measured slower; see
//!    [`parts`].)
//!
//! Sums run in a different order than the CPU back end's column solve (same terms, rounded
//! differently): within the f32 kernels' tolerance, as the GPU checks confirm.
//! `HLAC_NVPTX_TRIINV=columns` keeps the column solve, for A/B measurements.

use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::IntPredicate;

use super::{Gen, NvptxError, R};
use hlac_runtime::kir::Value;

/// Rows and columns of a block.
const B: u32 = 16;

/// Whether `tri_inv` of an n × n tile goes by blocks.
pub(super) fn blocked(n: u32) -> bool {
    n.is_multiple_of(B) && std::env::var("HLAC_NVPTX_TRIINV").map_or(true, |v| v != "columns")
}

/// Whether step 2 goes by doubling, [`Gen::doubling_levels`]: for n/16 a power of two, unless
/// `HLAC_NVPTX_TRIINV=rows` asks for the block rows' solve (for A/B measurements).
fn doubling(n: u32) -> bool {
    (n / B).is_power_of_two() && n > B && std::env::var("HLAC_NVPTX_TRIINV").map_or(true, |v| v != "rows")
}

/// Threads per column in step 2: 1, or `HLAC_NVPTX_TRIINV_PARTS=1|2|4`. The profile build
/// measured the four-way split slower than one thread per column (1.81 M against 1.32 M cycles per
/// 64 chunks of Gated DeltaNet's forward, H200, 2026-12-02: the split multiplies the loads of X
/// and the loop overhead, which dominate, to divide the FMAs, which do not).
fn parts() -> u32 {
    std::env::var("HLAC_NVPTX_TRIINV_PARTS").ok().and_then(|v| v.parse().ok()).filter(|p| [1, 2, 4].contains(p)).unwrap_or(1)
}

impl<'ctx> Gen<'_, 'ctx> {
    /// `out = (I + strictly_lower(a))⁻¹`, `a` and `out` n × n with n a multiple of [`B`].
    pub(super) fn tri_inv_blocked(&mut self, a: Value, out: Value, n: u32) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let nn = i64::from(n);
        let b = i64::from(B);
        let blocks = n / B;
        let f32t = self.ctx.f32_type();
        let fma = self.intrinsic("llvm.fma", &[f32t.into()])?;
        // Blocks above the diagonal are zero. No barrier of its own: step 1's publishes it, and
        // nothing before that reads them. (By doubling, they hold its products until the end.)
        let doubling = doubling(n);
        if !doubling {
            self.clear_above_blocks(out, n)?;
        }
        // 1. The diagonal blocks: thread j solves column j of its block, rows in registers.
        self.par(u64::from(n), &mut |g, j| {
            let c = g.b.build_int_signed_rem(j, g.i64c(b), "").map_err(e)?;
            let base = g.b.build_int_sub(j, c, "").map_err(e)?;
            let mut x: Vec<BasicValueEnum<'ctx>> = Vec::with_capacity(B as usize);
            for r in 0..B {
                let row = g.b.build_int_add(base, g.i64c(i64::from(r)), "").map_err(e)?;
                let at = g.b.build_int_mul(row, g.i64c(nn), "").map_err(e)?;
                // −Σ_{k<r} L[r][k]·x[k]: x is 0 above the diagonal and 1 on it, so the sum holds
                // the L[r][c] term.
                let mut s = g.f32c(0.0).into_float_value();
                for (k, xk) in x.iter().enumerate() {
                    let ik = g.b.build_int_add(at, base, "").map_err(e)?;
                    let ik = g.b.build_int_add(ik, g.i64c(k as i64), "").map_err(e)?;
                    let l = g.read(a, ik)?.into_float_value();
                    s = g.call(fma, &[l.into(), *xk, s.into()])?.into_float_value();
                }
                let neg = g.b.build_float_neg(s, "").map_err(e)?;
                let r64 = g.i64c(i64::from(r));
                let on = g.b.build_int_compare(IntPredicate::EQ, r64, c, "").map_err(e)?;
                let over = g.b.build_int_compare(IntPredicate::SLT, r64, c, "").map_err(e)?;
                let v = g.b.build_select(on, g.f32c(1.0), neg.into(), "").map_err(e)?;
                let v = g.b.build_select(over, g.f32c(0.0), v, "").map_err(e)?;
                let here = g.b.build_int_add(at, j, "").map_err(e)?;
                g.write(out, here, v)?;
                x.push(v);
            }
            Ok(())
        })?;
        if doubling {
            self.doubling_levels(a, out, n)?;
            self.clear_above_blocks(out, n)?;
            return self.barrier();
        }
        // 2. Block rows below the diagonal, top to bottom, each in two passes. (a) Thread
        // (col, q) sums t[r] = Σ_{m < top} L[top + r][m] · X[m][col] for its quarter of the rows
        // r, into X's own (not yet computed) rows top + r at col: nothing else reads them in this
        // step. (b) Thread col reads its t back and writes X[top + r][col] = −Σ_{s ≤ r} X_II[r][s]
        // · t[s] over it. Consecutive threads take consecutive columns (conflict-free reads of
        // X) and share q (broadcast reads of L).
        let parts = parts();
        if parts == 1 {
            return self.block_rows_one_pass(a, out, n);
        }
        let rows = B / parts;
        for bi in 1..blocks {
            let top = i64::from(bi) * b;
            let cols = i64::from(bi * B);
            let slots = (0..rows).map(|_| self.stack_slot(f32t.into())).collect::<R<Vec<_>>>()?;
            self.par(u64::from(bi * B * parts), &mut |g, job| {
                let col = g.b.build_int_signed_rem(job, g.i64c(cols), "").map_err(e)?;
                let q = g.b.build_int_signed_div(job, g.i64c(cols), "").map_err(e)?;
                let first = g.b.build_int_mul(q, g.i64c(i64::from(rows)), "").map_err(e)?;
                let first = g.b.build_int_add(first, g.i64c(top), "").map_err(e)?;
                g.column_sums((a, out), &slots, first, (top, nn, col), fma)?;
                for (r, s) in slots.iter().enumerate() {
                    let v = g.b.build_load(f32t, *s, "").map_err(e)?;
                    let row = g.b.build_int_add(first, g.i64c(r as i64), "").map_err(e)?;
                    let here = g.b.build_int_mul(row, g.i64c(nn), "").map_err(e)?;
                    let here = g.b.build_int_add(here, col, "").map_err(e)?;
                    g.write(out, here, v)?;
                }
                Ok(())
            })?;
            self.par(u64::from(bi * B), &mut |g, col| {
                let mut t = Vec::with_capacity(B as usize);
                for s in 0..B as i64 {
                    let at = g.b.build_int_add(g.i64c((top + s) * nn), col, "").map_err(e)?;
                    t.push(g.read(out, at)?.into_float_value());
                }
                g.apply_diagonal(out, (top, nn, col), &t, fma)
            })?;
        }
        Ok(())
    }

    /// Zeroes the 16 × 16 blocks of `out` (n × n) above its diagonal ones. No barrier.
    fn clear_above_blocks(&mut self, out: Value, n: u32) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let (nn, b) = (i64::from(n), i64::from(B));
        let (tid, step) = (self.tid()?, self.i64c(i64::from(self.threads)));
        let all = self.i64c(nn * nn);
        self.counted(tid, all, step, &mut |g, ij| {
            let i = g.b.build_int_signed_div(ij, g.i64c(nn), "").map_err(e)?;
            let j = g.b.build_int_signed_rem(ij, g.i64c(nn), "").map_err(e)?;
            let bi = g.b.build_int_signed_div(i, g.i64c(b), "").map_err(e)?;
            let bj = g.b.build_int_signed_div(j, g.i64c(b), "").map_err(e)?;
            let above = g.b.build_int_compare(IntPredicate::SLT, bi, bj, "").map_err(e)?;
            g.only_where(above, &mut |g| g.write(out, ij, g.f32c(0.0)))
        })
    }

    /// Step 2 by doubling: with the diagonal blocks of size s inverted, each pair of them on the
    /// diagonal (at p, p + s) gives the inverse of size 2s through its lower-left block
    /// X₂₁ = −X₂₂ · (L₂₁ · X₁₁), for s = 16, 32, … < n, every pair of a level at once and each
    /// product spread over all threads (one output each, s terms): two passes and two barriers
    /// per level (log₂(n/16) levels), where the block rows' solve is n/16 − 1 passes with 16
    /// threads per block of columns. T = L₂₁ X₁₁ waits in the (still unused) block above the
    /// pair's diagonal, X[p..p+s][p+s..p+2s], which the caller clears afterwards; reads of X₁₁
    /// and X₂₂ above their diagonals, which may hold a smaller level's T, are selected away.
    fn doubling_levels(&mut self, a: Value, out: Value, n: u32) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let nn = i64::from(n);
        let f32t = self.ctx.f32_type();
        let fma = self.intrinsic("llvm.fma", &[f32t.into()])?;
        let mut s = i64::from(B);
        while s < nn {
            let jobs = (nn / (2 * s) * s * s) as u64;
            // (p, i, c) of job j: the pair at p = 2s · (j / s²), row i, column c of its block.
            let split = |g: &mut Self, j: IntValue<'ctx>| -> R<(IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>)> {
                let pair = g.b.build_int_unsigned_div(j, g.i64c(s * s), "").map_err(e)?;
                let p = g.b.build_int_mul(pair, g.i64c(2 * s), "").map_err(e)?;
                let i = g.b.build_int_unsigned_div(j, g.i64c(s), "").map_err(e)?;
                let i = g.b.build_int_unsigned_rem(i, g.i64c(s), "").map_err(e)?;
                let c = g.b.build_int_unsigned_rem(j, g.i64c(s), "").map_err(e)?;
                Ok((p, i, c))
            };
            let at = |g: &mut Self, row: IntValue<'ctx>, col: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                let r = g.b.build_int_mul(row, g.i64c(nn), "").map_err(e)?;
                g.b.build_int_add(r, col, "").map_err(e)
            };
            // T[i][c] = Σ_k L[p+s+i][p+k] · X[p+k][p+c], X₁₁ lower triangular (k ≥ c).
            self.par(jobs, &mut |g, j| {
                let (p, i, c) = split(g, j)?;
                let l_row = g.b.build_int_add(p, g.i64c(s), "").map_err(e)?;
                let l_row = g.b.build_int_add(l_row, i, "").map_err(e)?;
                let x_col = g.b.build_int_add(p, c, "").map_err(e)?;
                let mut acc = g.f32c(0.0).into_float_value();
                for k in 0..s {
                    let pk = g.b.build_int_add(p, g.i64c(k), "").map_err(e)?;
                    let il = at(g, l_row, pk)?;
                    let l = g.read(a, il)?;
                    let ix = at(g, pk, x_col)?;
                    let x = g.read(out, ix)?;
                    let below = g.b.build_int_compare(IntPredicate::ULE, c, g.i64c(k), "").map_err(e)?;
                    let x = g.b.build_select(below, x, g.f32c(0.0), "").map_err(e)?;
                    acc = g.call(fma, &[l, x, acc.into()])?.into_float_value();
                }
                let t_col = g.b.build_int_add(p, g.i64c(s), "").map_err(e)?;
                let t_col = g.b.build_int_add(t_col, c, "").map_err(e)?;
                let t_row = g.b.build_int_add(p, i, "").map_err(e)?;
                let it = at(g, t_row, t_col)?;
                g.write(out, it, acc.into())
            })?;
            // X[p+s+i][p+c] = −Σ_k X[p+s+i][p+s+k] · T[k][c], X₂₂ lower triangular (k ≤ i).
            self.par(jobs, &mut |g, j| {
                let (p, i, c) = split(g, j)?;
                let row = g.b.build_int_add(p, g.i64c(s), "").map_err(e)?;
                let row = g.b.build_int_add(row, i, "").map_err(e)?;
                let t_col = g.b.build_int_add(row, c, "").map_err(e)?;
                let t_col = g.b.build_int_sub(t_col, i, "").map_err(e)?;
                let mut acc = g.f32c(0.0).into_float_value();
                for k in 0..s {
                    let col = g.b.build_int_add(p, g.i64c(s + k), "").map_err(e)?;
                    let ix = at(g, row, col)?;
                    let x = g.read(out, ix)?;
                    let on_or_below = g.b.build_int_compare(IntPredicate::UGE, i, g.i64c(k), "").map_err(e)?;
                    let x = g.b.build_select(on_or_below, x, g.f32c(0.0), "").map_err(e)?;
                    let t_row = g.b.build_int_add(p, g.i64c(k), "").map_err(e)?;
                    let it = at(g, t_row, t_col)?;
                    let t = g.read(out, it)?;
                    acc = g.call(fma, &[x, t, acc.into()])?.into_float_value();
                }
                let v = g.b.build_float_neg(acc, "").map_err(e)?;
                let col = g.b.build_int_add(p, c, "").map_err(e)?;
                let ix = at(g, row, col)?;
                g.write(out, ix, v.into())
            })?;
            s *= 2;
        }
        Ok(())
    }

    /// Step 2 with one thread per column (J, c), one pass and one barrier per block row: the
    /// column's 16 sums stay in registers for the triangular product.
    fn block_rows_one_pass(&mut self, a: Value, out: Value, n: u32) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let nn = i64::from(n);
        let b = i64::from(B);
        let f32t = self.ctx.f32_type();
        let fma = self.intrinsic("llvm.fma", &[f32t.into()])?;
        for bi in 1..n / B {
            let top = i64::from(bi) * b;
            let slots = (0..B).map(|_| self.stack_slot(f32t.into())).collect::<R<Vec<_>>>()?;
            self.par(u64::from(bi * B), &mut |g, col| {
                g.column_sums((a, out), &slots, g.i64c(top), (top, nn, col), fma)?;
                let t: Vec<_> = slots
                    .iter()
                    .map(|s| g.b.build_load(f32t, *s, "").map(|v| v.into_float_value()))
                    .collect::<Result<_, _>>()
                    .map_err(e)?;
                g.apply_diagonal(out, (top, nn, col), &t, fma)
            })?;
        }
        Ok(())
    }

    /// `X[top + r][col] = −Σ_{s ≤ r} X_II[r][s] · t[s]` for the 16 rows r of block row `top`
    /// (X = `out`, row length `nn`): the triangular diagonal block applied to one column's sums.
    fn apply_diagonal(
        &mut self,
        out: Value,
        (top, nn, col): (i64, i64, IntValue<'ctx>),
        t: &[FloatValue<'ctx>],
        fma: FunctionValue<'ctx>,
    ) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        for r in 0..i64::from(B) {
            let row = (top + r) * nn;
            let mut acc = self.f32c(0.0).into_float_value();
            for (s, ts) in t.iter().enumerate().take(r as usize + 1) {
                let xrs = self.read(out, self.i64c(row + top + s as i64))?.into_float_value();
                acc = self.call(fma, &[xrs.into(), (*ts).into(), acc.into()])?.into_float_value();
            }
            let v = self.b.build_float_neg(acc, "").map_err(e)?;
            let here = self.b.build_int_add(self.i64c(row), col, "").map_err(e)?;
            self.write(out, here, v.into())?;
        }
        Ok(())
    }

    /// `slot[r] = Σ_{m < top} L[first + r][m] · X[m][col]` for each of `slots` (L = `a`, X = `out`,
    /// row length `nn`): the sums of step 2, over every m below the block row.
    fn column_sums(
        &mut self,
        (a, out): (Value, Value),
        slots: &[PointerValue<'ctx>],
        first: IntValue<'ctx>,
        (top, nn, col): (i64, i64, IntValue<'ctx>),
        fma: FunctionValue<'ctx>,
    ) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let f32t = self.ctx.f32_type();
        for s in slots {
            self.b.build_store(*s, self.f32c(0.0)).map_err(e)?;
        }
        let (zero, end, one) = (self.i64c(0), self.i64c(top), self.i64c(1));
        self.counted(zero, end, one, &mut |g, m| {
            let mc = g.b.build_int_mul(m, g.i64c(nn), "").map_err(e)?;
            let mc = g.b.build_int_add(mc, col, "").map_err(e)?;
            let xm = g.read(out, mc)?.into_float_value();
            for (r, s) in slots.iter().enumerate() {
                let row = g.b.build_int_add(first, g.i64c(r as i64), "").map_err(e)?;
                let rm = g.b.build_int_mul(row, g.i64c(nn), "").map_err(e)?;
                let rm = g.b.build_int_add(rm, m, "").map_err(e)?;
                let l = g.read(a, rm)?.into_float_value();
                let cur = g.b.build_load(f32t, *s, "").map_err(e)?;
                let nv = g.call(fma, &[l.into(), xm.into(), cur])?;
                g.b.build_store(*s, nv).map_err(e)?;
            }
            Ok(())
        })
    }
}
