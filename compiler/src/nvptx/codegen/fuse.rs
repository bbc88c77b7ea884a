//! Fusion of elementwise tiles into their users: which tiles the back end never stores, and how it
//! computes one of their elements where it is read.
//!
//! The kernel IR spells index arithmetic, masks and gate expressions as whole-tile operations (an
//! `iota`, a `broadcast` of a scalar, an `add` of two offset tiles…). Stored, each is a pass over
//! the workspace and, across threads, a barrier; most are read once, by the next operation. A
//! *fused* tile is instead computed element by element inside the loop of each operation that
//! reads it, from the stored values (its leaves) and scalars its expression reaches — no storage,
//! no pass, no barrier ([`kir::layout::plan_fused`] keeps the leaves alive until the reads).
//!
//! Which tiles fuse:
//! - *index-like* tiles — `iota`, broadcasts of scalars, and cheap elementwise operations,
//!   broadcasts and reshapes of index-like tiles: always, even where read inside a nested loop
//!   (recomputing them costs a few integer operations);
//! - other elementwise results, broadcasts and reshapes of fused tiles: when every read is in the
//!   block that defines them (not inside a nested loop, which would recompute them per iteration),
//!   and there is one read, or at most [`MAX_CHEAP_READS`] of an operation without a
//!   transcendental function;
//! - a transpose of a stored tile: always (it is read through, at the transposed index), unless
//!   a loop yields it or a `dot` off the tensor cores reads it (a decode step's one-row product,
//!   whose lanes would then read the tile down its columns: measured slower on an H200);
//! - never a value a loop yields (its carried storage is rewritten while later carried values may
//!   still read it), nor a loop's carried values and results, nor an operand of an operation that
//!   reads each element many times (`dot`, `tri_inv`, a reduction to a scalar, which every thread
//!   computes: recomputing per read measured slower than storing once);
//! - with `HLAC_NVPTX_FUSE=no-amplify` (an experiment, not yet measured on a GPU), nor a value
//!   whose computation holds a transcendental function and that a broadcast expands: HGRN-2's
//!   key 1 − α, say, read through a `[64, 1, K] → [64, 64, K]` broadcast, is otherwise recomputed
//!   (a sigmoid each time) for every one of the 64 rows of the pairwise product;
//! - nor a value whose computation holds a transcendental function and that more than one
//!   operation reads (`HLAC_NVPTX_FUSE=costly-reads`, the old rule for A/B measurements, asks
//!   only the chain's last operation to be cheap: GLA's gate, `select(valid, logsigmoid(gk) /
//!   16, 0)`, was recomputed by its cumulative sum and by its column sum), nor one that a scan or
//!   a reduction over another axis than the last reads (those walk a line a thread each, so the
//!   recomputation runs on a fraction of the threads: GLA's state walk spent 36 % of its time in
//!   that column sum and cumulative sum in the profile build);
//! - nor a value with a transcendental function that a transpose reads: stored in one pass in
//!   its own order, it is then read through by the transpose's user, where fused the transpose
//!   is a pass that recomputes it while gathering its leaves down their columns (GLA's four
//!   gate-scaled key transposes: 7 % of its forward each in the profile build). Measured on an
//!   H200 (2026-12-03): GLA's forward 3.51 → 3.33 ms, HGRN-2's 3.30 → 3.16, attention's with
//!   RoPE 14.0 → 8.99 (its rotated keys), GDN's unchanged. `HLAC_NVPTX_FUSE=transpose` fuses
//!   them into the transpose as before, for A/B measurements.

use std::collections::{HashMap, HashSet};

use hlac_runtime::kir::{BinOp, Block, Op, Program, UnOp, Value};

/// Reads of a cheap fused value (each recomputes it) before it is stored instead.
const MAX_CHEAP_READS: usize = 4;

/// The fused tiles of a program and their defining operations.
#[derive(Default)]
pub(super) struct Fusion {
    pub(super) fused: HashSet<Value>,
    pub(super) defs: HashMap<Value, Op>,
}

struct Info {
    op: Op,
    block: usize,
    reads: Vec<usize>,
    yielded: bool,
    /// Read by an operation that reads each element many times (`dot`, `tri_inv`, a reduction…).
    reread: bool,
    /// Read by a broadcast that repeats its elements (directly or through reshapes).
    expanded: bool,
    /// Read by a `dot` that runs as a per-thread loop (not on the tensor cores).
    simt_dot: bool,
    /// Read by a transpose.
    transposed: bool,
    /// Read by an operation that walks lines of it a thread each (a scan, a reduction over
    /// another axis than the last), so fused it is recomputed by that many threads, not by all.
    serial: bool,
}

struct Walk<'m> {
    info: HashMap<Value, Info>,
    blocks: usize,
    /// Whether a `dot` of these operands runs on the tensor cores.
    mma: &'m dyn Fn(Value, Value) -> bool,
}

impl Walk<'_> {
    fn block(&mut self, p: &Program, b: &Block) {
        let id = self.blocks;
        self.blocks += 1;
        for inst in &b.insts {
            let mut operands = Vec::new();
            inst.op.operands(&mut operands);
            for v in &operands {
                if let Some(i) = self.info.get_mut(v) {
                    i.reads.push(id);
                    if matches!(inst.op, Op::Yield(_)) {
                        i.yielded = true;
                    }
                    // A reduction to a scalar runs in every thread (each reads every element).
                    let to_scalar = inst.results.first().is_some_and(|r| p.ty(*r).is_scalar());
                    if matches!(inst.op, Op::Dot(..) | Op::TriInv(_)) || (matches!(inst.op, Op::Reduce(..)) && to_scalar) {
                        i.reread = true;
                    }
                    if let Op::Dot(a, b) = inst.op {
                        if !(self.mma)(a, b) {
                            i.simt_dot = true;
                        }
                    }
                    if matches!(inst.op, Op::Broadcast(_)) && inst.results.first().is_some_and(|r| p.ty(*r).numel() > p.ty(*v).numel()) {
                        i.expanded = true;
                    }
                    if matches!(inst.op, Op::Transpose(_)) {
                        i.transposed = true;
                    }
                    let rank = p.ty(*v).shape.len();
                    if matches!(inst.op, Op::Scan { .. }) || matches!(inst.op, Op::Reduce(_, _, axis) if usize::from(axis) + 1 < rank) {
                        i.serial = true;
                    }
                }
            }
            if let Op::For { body, .. } = &inst.op {
                self.block(p, body);
                continue;
            }
            if let [r] = inst.results[..] {
                if !p.ty(r).is_scalar() && candidate(&inst.op) {
                    let info = Info {
                        op: inst.op.clone(),
                        block: id,
                        reads: Vec::new(),
                        yielded: false,
                        reread: false,
                        expanded: false,
                        simt_dot: false,
                        transposed: false,
                        serial: false,
                    };
                    self.info.insert(r, info);
                }
            }
        }
    }
}

/// Operations that may fuse at all.
fn candidate(op: &Op) -> bool {
    // A reshape qualifies when its operand is a scalar or itself fuses (decided in `analyse`).
    matches!(
        op,
        Op::Iota(_)
            | Op::Broadcast(_)
            | Op::Reshape(_)
            | Op::Transpose(_)
            | Op::Unary(..)
            | Op::Binary(..)
            | Op::Cmp(..)
            | Op::Select { .. }
            | Op::Cast(..)
    )
}

/// Whether an operation is a few arithmetic instructions per element.
fn cheap(op: &Op) -> bool {
    match op {
        Op::Unary(u, _) => matches!(u, UnOp::Neg | UnOp::Abs | UnOp::Not | UnOp::Round),
        // Integer division by a constant is a multiply; a float division a few instructions.
        Op::Binary(b, _, _) => !matches!(b, BinOp::Pow),
        _ => true,
    }
}

/// The fused tiles of `p`; `mma` says whether a `dot` of two operands runs on the tensor cores.
pub(super) fn analyse(p: &Program, mma: &dyn Fn(Value, Value) -> bool) -> Fusion {
    let costly_once = !std::env::var("HLAC_NVPTX_FUSE").is_ok_and(|v| v == "costly-reads");
    analyse_with(p, mma, costly_once)
}

/// [`analyse`] with the rule for costly values given: stored when read twice or by a line-walking
/// operation (`costly_once`), or only when their last operation is itself costly.
fn analyse_with(p: &Program, mma: &dyn Fn(Value, Value) -> bool, costly_once: bool) -> Fusion {
    let mut w = Walk { info: HashMap::new(), blocks: 0, mma };
    w.block(p, &p.body);
    // Decide in definition order (operands before users): value numbers grow along the program.
    let mut order: Vec<Value> = w.info.keys().copied().collect();
    order.sort();
    let no_amplify = std::env::var("HLAC_NVPTX_FUSE").is_ok_and(|v| v == "no-amplify");
    let no_transpose = !std::env::var("HLAC_NVPTX_FUSE").is_ok_and(|v| v == "transpose");
    if no_amplify {
        // A reshape that is expanded expands its operand too: users before operands.
        for v in order.iter().rev() {
            let Some(Info { op: Op::Reshape(src), expanded: true, .. }) = w.info.get(v) else { continue };
            let src = *src;
            if let Some(i) = w.info.get_mut(&src) {
                i.expanded = true;
            }
        }
    }
    let mut fused = HashSet::new();
    let mut index_like = HashSet::new();
    // Fused values whose computation holds a transcendental function.
    let mut costly: HashSet<Value> = HashSet::new();
    for v in order {
        let Some(i) = w.info.get(&v) else { continue };
        let mut tiles = Vec::new();
        i.op.operands(&mut tiles);
        tiles.retain(|o| !p.ty(*o).is_scalar());
        let (mut is_index, mut is_costly) = (false, false);
        let fuse = 'decide: {
            // A reshape shares its operand's storage unless both fuse.
            if matches!(i.op, Op::Reshape(_)) && tiles.iter().any(|o| !fused.contains(o)) {
                break 'decide false;
            }
            // A transpose of a stored tile is an index remap of it: read through, wherever and
            // however often it is read, instead of a pass that copies it (and a barrier).
            if let Op::Transpose(src) = i.op {
                break 'decide !i.yielded && !i.simt_dot && !p.ty(src).is_scalar() && !fused.contains(&src);
            }
            if i.yielded || i.reread {
                break 'decide false;
            }
            is_costly = !cheap(&i.op) || tiles.iter().any(|o| costly.contains(o));
            if (no_amplify && i.expanded && is_costly)
                || (no_transpose && i.transposed && is_costly)
                || (costly_once && i.serial && is_costly)
            {
                break 'decide false;
            }
            is_index = cheap(&i.op) && tiles.iter().all(|o| index_like.contains(o));
            let local = i.reads.iter().all(|b| *b == i.block);
            let cheap_reads = if costly_once { !is_costly } else { cheap(&i.op) };
            let few = i.reads.len() <= 1 || (cheap_reads && i.reads.len() <= MAX_CHEAP_READS);
            is_index || (local && few)
        };
        if fuse {
            fused.insert(v);
            if is_index {
                index_like.insert(v);
            }
            if is_costly {
                costly.insert(v);
            }
        } else if let Op::Reshape(src) = i.op {
            // A stored reshape is its operand's storage (`kir::layout` gives both one slot), so
            // the operand must be stored too, and so on down a chain of reshapes: a fused
            // operand has no storage to share. (Users decided before read it as a leaf either
            // way.)
            let mut src = src;
            while fused.remove(&src) {
                index_like.remove(&src);
                costly.remove(&src);
                match w.info.get(&src).map(|i| &i.op) {
                    Some(Op::Reshape(a)) => src = *a,
                    _ => break,
                }
            }
        }
    }
    let defs = fused.iter().filter_map(|v| w.info.get(v).map(|i| (*v, i.op.clone()))).collect();
    Fusion { fused, defs }
}

/// The stored tiles a fused tile's computation reads, each with whether it is read at the fused
/// element's own index (through elementwise operations and reshapes only) or elsewhere (through a
/// broadcast), which matters for barriers: another thread may read it.
pub(super) fn leaves(f: &Fusion, p: &Program, v: Value, own_index: bool, out: &mut Vec<(Value, bool)>) {
    let Some(op) = f.defs.get(&v) else {
        if !p.ty(v).is_scalar() {
            out.push((v, own_index));
        }
        return;
    };
    let same = !matches!(op, Op::Broadcast(_) | Op::Transpose(_));
    let mut ops = Vec::new();
    op.operands(&mut ops);
    for o in ops {
        leaves(f, p, o, own_index && same, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlac_runtime::kir::Inst;

    /// Every stored `reshape` whose operand is a tile: the operand is stored too (the two share
    /// one slot, `kir::layout`, and a fused tile has none).
    fn stored_reshapes_of_fused(p: &Program, f: &Fusion) -> Vec<Value> {
        fn walk(p: &Program, b: &Block, f: &Fusion, out: &mut Vec<Value>) {
            for Inst { results, op } in &b.insts {
                if let Op::For { body, .. } = op {
                    walk(p, body, f, out);
                }
                if let (Op::Reshape(a), [r]) = (op, &results[..]) {
                    if !p.ty(*a).is_scalar() && !p.ty(*r).is_scalar() && !f.fused.contains(r) && f.fused.contains(a) {
                        out.push(*r);
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(p, &p.body, f, &mut out);
        out
    }

    /// Over every kernel of the benchmark specs (the GPU target's, at fla's sizes) and of the
    /// all-mixers example, with the default rule for costly values and the old one: the norms'
    /// backwards hold `rsqrt` rows that a reshape reads twice, which once left a stored reshape
    /// of a fused tile reading storage nobody wrote (wrong gradients on the GPU).
    #[test]
    fn a_stored_reshape_never_reads_a_fused_tile() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let specs = ["gla", "hgrn", "hgrn2", "retnet", "deltanet", "gdn", "attn"]
            .map(|m| root.join(format!("examples/bench/{m}.hla")))
            .into_iter()
            .chain([root.join("examples/all-mixers-bf16.hla")]);
        let mut checked = 0;
        for spec in specs {
            let c = crate::compile(&spec);
            let model = c.model.unwrap_or_else(|| panic!("{} compiles", spec.display()));
            for k in crate::lower::model_kernels(&model).expect("lowers") {
                let p = &k.kernel.program;
                for costly_once in [true, false] {
                    let f = analyse_with(p, &|_, _| true, costly_once);
                    let bad = stored_reshapes_of_fused(p, &f);
                    assert!(bad.is_empty(), "{}: stored reshapes {bad:?} of fused tiles (costly once: {costly_once})", k.name);
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "only {checked} kernels checked");
    }
}
