//! Which f32 tiles the workspace keeps as bf16: those whose every value reaches only the tensor
//! cores' bf16 operands, and those loaded from bf16 memory.
//!
//! A `dot` on the tensor cores in [`DotMode::Bf16`] rounds each operand element to bf16 (nearest
//! even) as it loads its fragments, so a tile read by nothing else can be rounded once, when it is
//! written, and stored in half the bytes: every product then sees the same bf16 values, bit for
//! bit. Data movement commutes with rounding, so a tile read only by transposes whose results
//! reach only such operands qualifies too (and so do those transposes, when stored). Nothing else
//! does: an elementwise use, a reduction, a store to memory or a product on the FMA path reads
//! the f32 value. Nor is a tile narrowed whose operation reads back its own result (`tri_inv`,
//! `scan`): only loads, elementwise operations, broadcasts, transposes and products define one.
//! A narrow tile is alone in its storage group (no reshape of it, not a loop's carried value,
//! result or yielded tile), so the layout can size it on its own (`kir::layout::Storage`).
//!
//! A tile loaded from bf16 memory (with a masked-off value that is a bf16 too) is exact in bf16
//! whatever reads it, so it is stored as bf16 in any kernel with bf16 products: its reads widen
//! it back exactly. (`HLAC_NVPTX_NARROW=operands` narrows the operand tiles only, for A/B
//! measurements.)
//!
//! Halving those tiles is what brings the workspaces of GLA's and HGRN-2's chunked forwards and of
//! attention's `bwd_dq` into shared memory at K = V = 128, and it halves the shared-memory
//! traffic of every fragment load. Which kernels narrow is their launch options' choice
//! (`Narrowing`). `HLAC_NVPTX_NARROW=off` keeps every tile f32, for A/B
//! measurements.

use std::collections::{HashMap, HashSet};

use super::DotMode;
use hlac_runtime::kir::{Block, DType, Op, ParamKind, Program, Value};

/// How one instruction uses a value.
#[derive(Clone, Copy)]
enum Use {
    /// An operand of a `dot` on the tensor cores.
    Operand,
    /// The operand of the transpose that defines this value.
    Transpose(Value),
    /// Anything else.
    Other,
}

/// The tiles to store as bf16, of a program whose `unstored` tiles (fused, or products computed
/// into their adds) get no storage.
pub(super) fn analyse(p: &Program, unstored: &HashSet<Value>, mode: DotMode) -> HashSet<Value> {
    let knob = std::env::var("HLAC_NVPTX_NARROW").unwrap_or_default();
    if mode != DotMode::Bf16 || knob == "off" {
        return HashSet::new();
    }
    let loads = knob != "operands";
    let mut uses: HashMap<Value, Vec<Use>> = HashMap::new();
    // Tiles that share storage with another (reshapes and their operands, loop-carried values,
    // loop results and the tiles a loop yields) or are not an instruction's only result.
    let mut grouped: HashSet<Value> = HashSet::new();
    let mut defined: Vec<Value> = Vec::new();
    let mut exact: HashSet<Value> = HashSet::new();
    walk(p, &p.body, mode, &mut uses, &mut grouped, &mut defined, loads.then_some(&mut exact));
    let mut memo: HashMap<Value, bool> = HashMap::new();
    defined
        .into_iter()
        .filter(|v| {
            let t = p.ty(*v);
            t.dtype == DType::F32 && !t.is_scalar() && !unstored.contains(v) && !grouped.contains(v)
        })
        .filter(|v| exact.contains(v) || operand_only(*v, &uses, &grouped, &mut memo))
        .collect()
}

fn walk(
    p: &Program,
    b: &Block,
    mode: DotMode,
    uses: &mut HashMap<Value, Vec<Use>>,
    grouped: &mut HashSet<Value>,
    defined: &mut Vec<Value>,
    mut exact: Option<&mut HashSet<Value>>,
) {
    grouped.extend(b.args.iter().copied());
    for inst in &b.insts {
        match (&inst.op, &inst.results[..]) {
            (Op::Dot(a, x), _) if mode.tiles(p, *a, *x) => {
                uses.entry(*a).or_default().push(Use::Operand);
                uses.entry(*x).or_default().push(Use::Operand);
            }
            (Op::Transpose(a), [r]) => uses.entry(*a).or_default().push(Use::Transpose(*r)),
            (op, results) => {
                let mut ops = Vec::new();
                op.operands(&mut ops);
                for v in ops {
                    uses.entry(v).or_default().push(Use::Other);
                }
                if let Op::Reshape(a) = op {
                    grouped.insert(*a);
                    grouped.extend(results.iter().copied());
                }
                if results.len() > 1 || matches!(op, Op::For { .. }) {
                    grouped.extend(results.iter().copied());
                }
                // The layout may give a yielded tile its carried tile's (f32) storage.
                if let Op::Yield(vs) = op {
                    grouped.extend(vs.iter().copied());
                }
            }
        }
        // Only operations that write each element once, from values read elsewhere: `tri_inv`
        // and `scan` read back the rows of their own result as they compute it, which would then
        // be rounded.
        let writes_once = matches!(
            inst.op,
            Op::Load { .. }
                | Op::Unary(..)
                | Op::Binary(..)
                | Op::Select { .. }
                | Op::Cast(..)
                | Op::Broadcast(_)
                | Op::Transpose(_)
                | Op::Dot(..)
        );
        if let ([r], true) = (&inst.results[..], writes_once) {
            defined.push(*r);
        }
        // A load from bf16 memory, whose masked-off value is a bf16 too, holds nothing bf16
        // cannot: stored as bf16 whatever reads it (`exact` is None when only operands narrow).
        if let (Some(exact), Op::Load { ptr, other, .. }, [r]) = (exact.as_deref_mut(), &inst.op, &inst.results[..]) {
            let from_bf16 = p.params.get(*ptr as usize).is_some_and(|q| matches!(q.kind, ParamKind::Ptr { dtype: DType::Bf16, .. }));
            let x = *other as f32;
            if from_bf16 && f64::from(x) == *other && x.to_bits() & 0xFFFF == 0 {
                exact.insert(*r);
            }
        }
        if let Op::For { body, .. } = &inst.op {
            walk(p, body, mode, uses, grouped, defined, exact.as_deref_mut());
        }
    }
}

/// Whether every use of `v` is a tensor-core operand, directly or through transposes.
fn operand_only(v: Value, uses: &HashMap<Value, Vec<Use>>, grouped: &HashSet<Value>, memo: &mut HashMap<Value, bool>) -> bool {
    if let Some(&known) = memo.get(&v) {
        return known;
    }
    memo.insert(v, false);
    let ok = !grouped.contains(&v)
        && uses.get(&v).is_some_and(|us| {
            !us.is_empty()
                && us.iter().all(|u| match *u {
                    Use::Operand => true,
                    Use::Transpose(t) => operand_only(t, uses, grouped, memo),
                    Use::Other => false,
                })
        });
    memo.insert(v, ok);
    ok
}
