//! The profile build ([`super::Options::profile`], which the lowering sets from
//! `HLAC_NVPTX_PROFILE=1` when the artifact is built): every thread reads
//! `%clock64` after each tile instruction and adds the cycles since its previous reading to that
//! instruction's counter, so a barrier's wait is charged to the operation it ends. At the end
//! thread 0 of each block adds its counters to the module's global `hlac_profile` (one `u64` per
//! counter, then the block's whole time), and `hlac_profile_ops` names the counters, one line
//! each in the kernel IR's text form: `hlac-gpu-bench` finds them and prints where each kernel's time
//! goes, instruction by instruction — what a PTX-level profiler cannot say about a kernel whose
//! source is tile IR. Thread 0's view is the block's critical path (it waits at every barrier), so
//! the shares add up to the block's time. A measuring build only: the counters live in local
//! memory and the clock reads order the code around them, so its timings run a little slower
//! than the default's (GDN's forward 4.04 ms against 3.16, attention's 14.3 against 10.5 on an
//! H200: read shares, not absolute times).

use inkwell::values::{BasicValue, IntValue, PointerValue};
use inkwell::AddressSpace;

use super::{Gen, NvptxError, R};
use hlac_runtime::kir::{self, Block, Op};

/// The counters of a profile build.
pub(super) struct Profile<'ctx> {
    /// One i64 stack slot per counter, per thread (accessed volatile, so LLVM keeps them in
    /// local memory instead of a register each for the whole kernel).
    counts: Vec<PointerValue<'ctx>>,
    /// The clock at the thread's previous reading, and at the kernel's start.
    mark: PointerValue<'ctx>,
    start: PointerValue<'ctx>,
    /// The counters' names, in order.
    labels: Vec<String>,
    /// The counter of the last instruction emitted (a barrier paid after it is charged to it).
    last: Option<u32>,
}

/// Counters a program can need: one per [`counted`] instruction (nested ones included; fused
/// ones turn out to need none).
fn instructions(p: &kir::Program, b: &Block) -> u32 {
    b.insts
        .iter()
        .map(|i| {
            let nested = match &i.op {
                Op::For { body, .. } => instructions(p, body),
                _ => 0,
            };
            nested + u32::from(counted(p, i))
        })
        .sum()
}

/// Whether an instruction gets a counter of its own: those that work on tiles (scalar arithmetic
/// is charged to the next one).
pub(super) fn counted(p: &kir::Program, inst: &kir::Inst) -> bool {
    matches!(inst.op, Op::Store { .. } | Op::For { .. } | Op::Yield(_)) || inst.results.iter().any(|r| !p.ty(*r).is_scalar())
}

impl<'ctx> Gen<'_, 'ctx> {
    fn clock(&self) -> R<IntValue<'ctx>> {
        let f = self.intrinsic("llvm.nvvm.read.ptx.sreg.clock64", &[])?;
        Ok(self.call(f, &[])?.into_int_value())
    }

    /// Sets up the counters (zero) and the first clock reading, at the kernel's start.
    pub(super) fn profile_start(&mut self) -> R<()> {
        let n = instructions(self.p, &self.p.body);
        let i64t = self.ctx.i64_type();
        let mut counts = Vec::new();
        for _ in 0..n {
            let at = self.stack_slot(i64t.into())?;
            self.b.build_store(at, i64t.const_zero()).map_err(|e| self.llvm(e))?.set_volatile(true).map_err(|e| self.llvm(e))?;
            counts.push(at);
        }
        let mark = self.stack_slot(i64t.into())?;
        let start = self.stack_slot(i64t.into())?;
        let now = self.clock()?;
        self.b.build_store(mark, now).map_err(|e| self.llvm(e))?;
        self.b.build_store(start, now).map_err(|e| self.llvm(e))?;
        self.profile = Some(Profile { counts, mark, start, labels: Vec::new(), last: None });
        Ok(())
    }

    /// Charges the cycles since the previous reading to counter `i`.
    fn charge(&mut self, i: u32) -> R<()> {
        let Some(p) = &self.profile else { return Ok(()) };
        let (at, mark) = (p.counts[i as usize], p.mark);
        let i64t = self.ctx.i64_type();
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let v = |x: inkwell::values::InstructionValueError| NvptxError::Llvm { kernel: String::new(), message: x.to_string() };
        let now = self.clock()?;
        let before = self.b.build_load(i64t, mark, "").map_err(e)?.into_int_value();
        let old = self.b.build_load(i64t, at, "").map_err(e)?;
        if let Some(x) = old.as_instruction_value() {
            x.set_volatile(true).map_err(v)?;
        }
        let spent = self.b.build_int_sub(now, before, "").map_err(e)?;
        let new = self.b.build_int_add(old.into_int_value(), spent, "").map_err(e)?;
        self.b.build_store(at, new).map_err(e)?.set_volatile(true).map_err(v)?;
        self.b.build_store(mark, now).map_err(e)?;
        Ok(())
    }

    /// After an instruction: charges it (when it gets a counter).
    pub(super) fn profile_after(&mut self, inst: &kir::Inst) -> R<()> {
        if self.profile.is_none() || !counted(self.p, inst) {
            return Ok(());
        }
        let label = kir::inst_text(self.p, inst);
        let p = self.profile.as_mut().expect("checked above");
        let i = p.labels.len() as u32;
        p.labels.push(label);
        p.last = Some(i);
        self.charge(i)
    }

    /// After a barrier owed by earlier elementwise instructions: charges the wait to the last.
    pub(super) fn profile_barrier(&mut self) -> R<()> {
        match self.profile.as_ref().and_then(|p| p.last) {
            Some(i) => self.charge(i),
            None => Ok(()),
        }
    }

    /// At the kernel's end: thread 0 adds its counters and the block's time to `hlac_profile`, and
    /// the names go into `hlac_profile_ops`.
    pub(super) fn profile_finish(&mut self) -> R<()> {
        let Some(p) = self.profile.take() else { return Ok(()) };
        let i64t = self.ctx.i64_type();
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let n = p.labels.len() as u32;
        let global = self.module.add_global(i64t.array_type(n + 1), Some(AddressSpace::from(1)), "hlac_profile");
        global.set_initializer(&i64t.array_type(n + 1).const_zero());
        global.set_alignment(8);
        let text = p.labels.join("\n");
        let names = self.ctx.const_string(text.as_bytes(), false);
        let ops = self.module.add_global(names.get_type(), Some(AddressSpace::from(1)), "hlac_profile_ops");
        ops.set_initializer(&names);
        ops.set_constant(true);
        let now = self.clock()?;
        let first = self.b.build_int_compare(inkwell::IntPredicate::EQ, self.tid()?, i64t.const_zero(), "").map_err(e)?;
        let (counts, start) = (p.counts, p.start);
        self.only_where(first, &mut |g| {
            // Integer arithmetic on the address, as elsewhere (this crate has no `unsafe` for a GEP).
            let base = g.b.build_ptr_to_int(global.as_pointer_value(), i64t, "").map_err(e)?;
            let add = |g: &mut Gen<'_, 'ctx>, i: u32, v: IntValue<'ctx>| -> R<()> {
                let addr = g.b.build_int_add(base, i64t.const_int(8 * u64::from(i), false), "").map_err(e)?;
                let at = g.b.build_int_to_ptr(addr, g.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)?;
                g.b.build_atomicrmw(inkwell::AtomicRMWBinOp::Add, at, v, inkwell::AtomicOrdering::Monotonic).map_err(e)?;
                Ok(())
            };
            for (i, &at) in counts.iter().enumerate().take(n as usize) {
                let v = g.b.build_load(i64t, at, "").map_err(e)?;
                if let Some(x) = v.as_instruction_value() {
                    x.set_volatile(true).map_err(|x| NvptxError::Llvm { kernel: String::new(), message: x.to_string() })?;
                }
                add(g, i as u32, v.into_int_value())?;
            }
            let began = g.b.build_load(i64t, start, "").map_err(e)?.into_int_value();
            let whole = g.b.build_int_sub(now, began, "").map_err(e)?;
            add(g, n, whole)
        })
    }
}
