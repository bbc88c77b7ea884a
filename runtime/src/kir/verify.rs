//! The kernel-IR verifier. It checks, for every instruction:
//!
//! - every operand is defined exactly once, before its use, in the same block or an enclosing one
//!   (loop-body arguments are visible only inside their body);
//! - every value has a type, and the result types follow the operation's typing rule (equal shapes
//!   for elementwise operands, bool masks and conditions, i64 offsets and loop bounds, f32 `dot`
//!   results, broadcast axes that are equal or 1, reshapes that keep the element count);
//! - `param` names an integer parameter, `load`/`store` a pointer parameter (writable for stores)
//!   whose element type matches the tile's: f32 tiles for f32, bf16 and f16 pointers, i64 tiles for
//!   i64 pointers; no value anywhere is a bf16 or f16 tile (those types live only in memory);
//! - a loop body's arguments match its carried values, and it ends with a `yield` of those types;
//!   `yield` appears nowhere else.
//!
//! A failure is a bug in hlac (a lowering produced invalid IR), never the user's fault.

use std::collections::HashSet;

use super::{BinOp, Block, Const, DType, Inst, Op, ParamKind, Program, Ty, UnOp, Value};

/// A verifier failure: which program, which instruction, what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("this is a bug in hlac: kernel `{program}` is invalid: {message}")]
pub struct VerifyError {
    /// The program's name.
    pub program: String,
    /// What is wrong.
    pub message: String,
}

/// Checks every invariant listed in the module documentation.
pub fn verify(p: &Program) -> Result<(), VerifyError> {
    let mut v = Verifier { p, defined: HashSet::new(), ever: HashSet::new() };
    if !p.body.args.is_empty() {
        return Err(v.err("the top-level block has arguments"));
    }
    v.block(&p.body, false)
}

struct Verifier<'a> {
    p: &'a Program,
    /// Values visible at this point.
    defined: HashSet<Value>,
    /// Values defined anywhere so far (a value may be defined only once in the whole program).
    ever: HashSet<Value>,
}

impl Verifier<'_> {
    fn err(&self, message: impl Into<String>) -> VerifyError {
        VerifyError { program: self.p.name.clone(), message: message.into() }
    }

    fn ty(&self, v: Value) -> Result<&Ty, VerifyError> {
        self.p.types.get(v.0 as usize).ok_or_else(|| self.err(format!("{v} has no type")))
    }

    fn define(&mut self, v: Value) -> Result<(), VerifyError> {
        let dtype = self.ty(v)?.dtype;
        if matches!(dtype, DType::Bf16 | DType::F16) {
            return Err(self.err(format!("{v} is a {} tile; bf16 and f16 are storage types only", dtype.name())));
        }
        if !self.ever.insert(v) || !self.defined.insert(v) {
            return Err(self.err(format!("{v} is defined twice")));
        }
        Ok(())
    }

    fn used(&self, v: Value) -> Result<&Ty, VerifyError> {
        if !self.defined.contains(&v) {
            return Err(self.err(format!("{v} is used before it is defined (or outside its loop)")));
        }
        self.ty(v)
    }

    fn block(&mut self, b: &Block, in_loop: bool) -> Result<(), VerifyError> {
        let outer = self.defined.clone();
        for a in &b.args {
            self.define(*a)?;
        }
        for (i, inst) in b.insts.iter().enumerate() {
            let last = i + 1 == b.insts.len();
            if matches!(inst.op, Op::Yield(_)) && !(in_loop && last) {
                return Err(self.err("`yield` outside the end of a loop body"));
            }
            self.inst(inst)?;
        }
        if in_loop && !matches!(b.insts.last().map(|i| &i.op), Some(Op::Yield(_))) {
            return Err(self.err("a loop body does not end with `yield`"));
        }
        // Values defined inside this block are not visible after it, but stay defined-once.
        let inner: Vec<Value> = self.defined.difference(&outer).copied().collect();
        for v in inner {
            self.defined.remove(&v);
        }
        Ok(())
    }

    fn one_result(&self, inst: &Inst) -> Result<Ty, VerifyError> {
        match inst.results.as_slice() {
            [r] => Ok(self.ty(*r)?.clone()),
            _ => Err(self.err(format!("{:?} must define one value", inst.op))),
        }
    }

    fn inst(&mut self, inst: &Inst) -> Result<(), VerifyError> {
        let p = self.p;
        match &inst.op {
            Op::Store { ptr, offsets, value, mask } => {
                if !inst.results.is_empty() {
                    return Err(self.err("store defines no value"));
                }
                let (o, v) = (self.used(*offsets)?.clone(), self.used(*value)?.clone());
                match p.params.get(*ptr as usize).map(|x| &x.kind) {
                    Some(ParamKind::Ptr { dtype, writable: true }) if dtype.tile_type() == v.dtype => {}
                    _ => {
                        return Err(self.err(format!(
                            "store of {v} to parameter {ptr}, which is not a writable pointer that stores {} tiles",
                            v.dtype.name()
                        )))
                    }
                }
                if o.dtype != DType::I64 || o.shape != v.shape {
                    return Err(self.err(format!("store offsets {o} do not match the value {v}")));
                }
                if let Some(m) = mask {
                    let m = self.used(*m)?;
                    if m.dtype != DType::Bool || m.shape != v.shape {
                        return Err(self.err(format!("store mask {m} does not match {v}")));
                    }
                }
                return Ok(());
            }
            Op::Yield(vs) => {
                for v in vs {
                    self.used(*v)?;
                }
                return Ok(());
            }
            Op::For { lo, hi, step, init, body } => {
                for b in [lo, hi, step] {
                    if *self.used(*b)? != Ty::scalar(DType::I64) {
                        return Err(self.err("loop bounds must be i64 scalars"));
                    }
                }
                if body.args.len() != init.len() + 1 || inst.results.len() != init.len() {
                    return Err(self.err("a loop's body arguments, carried values and results disagree in number"));
                }
                if *self.ty(body.args[0])? != Ty::scalar(DType::I64) {
                    return Err(self.err("a loop index must be an i64 scalar"));
                }
                for (k, i) in init.iter().enumerate() {
                    let t = self.used(*i)?.clone();
                    if *self.ty(body.args[k + 1])? != t || *self.ty(inst.results[k])? != t {
                        return Err(self.err(format!("carried value {k} changes type")));
                    }
                }
                self.block(body, true)?;
                if let Some(Inst { op: Op::Yield(next), .. }) = body.insts.last() {
                    if next.len() != init.len() {
                        return Err(self.err("a loop yields the wrong number of values"));
                    }
                    for (k, n) in next.iter().enumerate() {
                        if self.ty(*n)? != self.ty(init[k])? {
                            return Err(self.err(format!(
                                "a loop yields {} for carried value {k} of type {}",
                                self.ty(*n)?,
                                self.ty(init[k])?
                            )));
                        }
                    }
                }
                for r in &inst.results {
                    self.define(*r)?;
                }
                return Ok(());
            }
            _ => {}
        }
        let out = self.one_result(inst)?;
        let bad = |what: &str| self.err(format!("{what} in {:?} -> {out}", inst.op));
        match &inst.op {
            Op::ProgramId(a) => {
                if (*a as usize) >= p.grid.len() || out != Ty::scalar(DType::I64) {
                    return Err(bad("program_id axis outside the grid"));
                }
            }
            Op::Param(i) => {
                if !matches!(p.params.get(*i as usize).map(|x| &x.kind), Some(ParamKind::Int)) || out != Ty::scalar(DType::I64) {
                    return Err(bad("`param` of a non-integer parameter"));
                }
            }
            Op::Const(c) => {
                let ok = out.is_scalar()
                    && match c {
                        Const::Float(_) => out.dtype.is_float(),
                        Const::Int(_) => out.dtype == DType::I64,
                        Const::Bool(_) => out.dtype == DType::Bool,
                    };
                if !ok {
                    return Err(bad("constant of the wrong type"));
                }
            }
            Op::Table(xs) => {
                if xs.is_empty() || out != Ty::tile(DType::F32, &[xs.len() as u32]) {
                    return Err(bad("table must give a non-empty f32 vector of its length"));
                }
            }
            Op::Iota(n) => {
                if *n == 0 || out != Ty::tile(DType::I64, &[*n]) {
                    return Err(bad("iota must give a non-empty i64 vector"));
                }
            }
            Op::Unary(op, a) => {
                let a = self.used(*a)?;
                let ok = *a == out
                    && if *op == UnOp::Not {
                        a.dtype == DType::Bool
                    } else {
                        a.dtype.is_float() || (*op == UnOp::Neg && a.dtype == DType::I64) || (*op == UnOp::Abs && a.dtype == DType::I64)
                    };
                if !ok {
                    return Err(bad("unary operand type"));
                }
            }
            Op::Binary(op, a, b) => {
                let (a, b) = (self.used(*a)?, self.used(*b)?);
                let ok = *a == out
                    && *b == out
                    && match op {
                        BinOp::And | BinOp::Or => out.dtype == DType::Bool,
                        BinOp::Rem => out.dtype == DType::I64,
                        BinOp::Pow => out.dtype.is_float(),
                        _ => out.dtype != DType::Bool,
                    };
                if !ok {
                    return Err(bad("binary operand types"));
                }
            }
            Op::Cmp(_, a, b) => {
                let (a, b) = (self.used(*a)?, self.used(*b)?);
                if a != b || out.dtype != DType::Bool || out.shape != a.shape {
                    return Err(bad("comparison operand types"));
                }
            }
            Op::Select { cond, then, otherwise } => {
                let (c, t, o) = (self.used(*cond)?, self.used(*then)?, self.used(*otherwise)?);
                if c.dtype != DType::Bool || c.shape != out.shape || *t != out || *o != out {
                    return Err(bad("select operand types"));
                }
            }
            Op::Cast(a, to) => {
                let a = self.used(*a)?;
                if a.shape != out.shape || out.dtype != *to {
                    return Err(bad("cast shape"));
                }
            }
            Op::Broadcast(a) => {
                let a = self.used(*a)?;
                let ok = a.dtype == out.dtype
                    && (a.is_scalar()
                        || (a.shape.len() == out.shape.len() && a.shape.iter().zip(&out.shape).all(|(x, y)| x == y || *x == 1)));
                if !ok {
                    return Err(bad("broadcast from an incompatible shape"));
                }
            }
            Op::Reshape(a) => {
                let a = self.used(*a)?;
                if a.dtype != out.dtype || a.numel() != out.numel() {
                    return Err(bad("reshape changes the element count"));
                }
            }
            Op::Transpose(a) => {
                let a = self.used(*a)?;
                if a.shape.len() != 2 || out.shape != [a.shape[1], a.shape[0]] || a.dtype != out.dtype {
                    return Err(bad("transpose of a non-matrix"));
                }
            }
            Op::Load { ptr, offsets, mask, .. } => {
                let o = self.used(*offsets)?.clone();
                match p.params.get(*ptr as usize).map(|x| &x.kind) {
                    Some(ParamKind::Ptr { dtype, .. }) if dtype.tile_type() == out.dtype => {}
                    _ => return Err(bad("load from a parameter that is not a pointer loading the result's type")),
                }
                if o.dtype != DType::I64 || o.shape != out.shape {
                    return Err(bad("load offsets"));
                }
                if let Some(m) = mask {
                    let m = self.used(*m)?;
                    if m.dtype != DType::Bool || m.shape != out.shape {
                        return Err(bad("load mask"));
                    }
                }
            }
            Op::Reduce(_, a, axis) => {
                let a = self.used(*a)?;
                let mut s = a.shape.clone();
                if (*axis as usize) >= s.len() {
                    return Err(bad("reduce axis"));
                }
                s.remove(*axis as usize);
                if s != out.shape || a.dtype != out.dtype || a.dtype == DType::Bool {
                    return Err(bad("reduce result"));
                }
            }
            Op::Scan { value, axis, decay, .. } => {
                let a = self.used(*value)?;
                if *a != out || (*axis as usize) >= a.shape.len() || !a.dtype.is_float() {
                    return Err(bad("scan"));
                }
                if let Some(d) = decay {
                    if *self.used(*d)? != out {
                        return Err(bad("linear scan decay"));
                    }
                }
            }
            Op::Dot(a, b) => {
                let (a, b) = (self.used(*a)?, self.used(*b)?);
                let ok = a.shape.len() == 2
                    && b.shape.len() == 2
                    && a.shape[1] == b.shape[0]
                    && a.dtype.is_float()
                    && b.dtype.is_float()
                    && out == Ty::tile(DType::F32, &[a.shape[0], b.shape[1]]);
                if !ok {
                    return Err(bad("dot shapes"));
                }
            }
            Op::TriInv(a) => {
                let a = self.used(*a)?;
                if a.shape.len() != 2 || a.shape[0] != a.shape[1] || *a != out || a.dtype != DType::F32 {
                    return Err(bad("tri_inv needs a square f32 matrix"));
                }
            }
            Op::Store { .. } | Op::Yield(_) | Op::For { .. } => unreachable!("handled above"),
        }
        for r in &inst.results {
            self.define(*r)?;
        }
        Ok(())
    }
}
