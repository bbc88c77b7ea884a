//! The text form of kernel programs (the snapshot format), e.g.
//! `%12: f32[64, 128] = dot %9, %11`.

use std::fmt::{self, Write};

use super::{Block, Const, Inst, Op, ParamKind, Program, Ty, Value};

impl fmt::Display for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.shape.is_empty() {
            write!(f, "{}", self.dtype.name())
        } else {
            let dims: Vec<String> = self.shape.iter().map(u32::to_string).collect();
            write!(f, "{}[{}]", self.dtype.name(), dims.join(", "))
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

fn snake<T: serde::Serialize>(x: &T) -> String {
    serde_json::to_value(x).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| match &p.kind {
                ParamKind::Ptr { dtype, writable } => format!("{}: {}ptr<{}>", p.name, if *writable { "mut " } else { "" }, dtype.name()),
                ParamKind::Int => format!("{}: i64", p.name),
            })
            .collect();
        writeln!(f, "kernel {}({}) grid [{}] {{", self.name, params.join(", "), self.grid.join(", "))?;
        let mut s = String::new();
        block(self, &self.body, 1, &mut s)?;
        f.write_str(&s)?;
        writeln!(f, "}}")
    }
}

fn list(vs: &[Value]) -> String {
    vs.iter().map(Value::to_string).collect::<Vec<_>>().join(", ")
}

fn block(p: &Program, b: &Block, depth: usize, out: &mut String) -> fmt::Result {
    let pad = "  ".repeat(depth);
    for inst in &b.insts {
        out.push_str(&pad);
        head(p, inst, out)?;
        if let Op::For { body, .. } = &inst.op {
            out.push_str(" {\n");
            block(p, body, depth + 1, out)?;
            out.push_str(&pad);
            out.push('}');
        }
        out.push('\n');
    }
    Ok(())
}

/// One instruction in the text form, on one line: a loop's header without its body. For tools
/// that name an instruction (the GPU profile's table).
pub fn inst_text(p: &Program, inst: &Inst) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = head(p, inst, &mut s);
    s
}

fn head(p: &Program, inst: &Inst, out: &mut String) -> fmt::Result {
    if !inst.results.is_empty() && !matches!(inst.op, Op::For { .. }) {
        let r: Vec<String> = inst.results.iter().map(|v| format!("{v}: {}", p.ty(*v))).collect();
        write!(out, "{} = ", r.join(", "))?;
    }
    let param = |i: u32| p.params.get(i as usize).map_or("?", |x| x.name.as_str());
    match &inst.op {
        Op::ProgramId(a) => write!(out, "program_id {a}")?,
        Op::Param(i) => write!(out, "param {}", param(*i))?,
        Op::Const(Const::Float(x)) => write!(out, "const {x:?}")?,
        Op::Const(Const::Int(x)) => write!(out, "const {x}")?,
        Op::Const(Const::Bool(x)) => write!(out, "const {x}")?,
        Op::Iota(n) => write!(out, "iota {n}")?,
        Op::Table(xs) => write!(out, "table [{}]", xs.iter().map(|x| format!("{:?}", *x as f32)).collect::<Vec<_>>().join(", "))?,
        Op::Unary(op, a) => write!(out, "{} {a}", snake(op))?,
        Op::Binary(op, a, b) => write!(out, "{} {a}, {b}", snake(op))?,
        Op::Cmp(op, a, b) => write!(out, "cmp {} {a}, {b}", snake(op))?,
        Op::Select { cond, then, otherwise } => write!(out, "select {cond}, {then}, {otherwise}")?,
        Op::Cast(a, t) => write!(out, "cast {a} to {}", t.name())?,
        Op::Broadcast(a) => write!(out, "broadcast {a}")?,
        Op::Reshape(a) => write!(out, "reshape {a}")?,
        Op::Transpose(a) => write!(out, "transpose {a}")?,
        Op::Load { ptr, offsets, mask, other } => {
            write!(out, "load {}[{offsets}]", param(*ptr))?;
            if let Some(m) = mask {
                write!(out, " mask {m} else {other:?}")?;
            }
        }
        Op::Store { ptr, offsets, value, mask } => {
            write!(out, "store {}[{offsets}] = {value}", param(*ptr))?;
            if let Some(m) = mask {
                write!(out, " mask {m}")?;
            }
        }
        Op::Reduce(op, a, axis) => write!(out, "reduce {} {a} axis {axis}", snake(op))?,
        Op::Scan { value, axis, reverse, decay: None } => {
            write!(out, "scan sum {value} axis {axis}{}", if *reverse { " reverse" } else { "" })?
        }
        Op::Scan { value, axis, reverse, decay: Some(d) } => {
            write!(out, "scan linear {value} decay {d} axis {axis}{}", if *reverse { " reverse" } else { "" })?
        }
        Op::Dot(a, b) => write!(out, "dot {a}, {b}")?,
        Op::TriInv(a) => write!(out, "tri_inv {a}")?,
        Op::Yield(vs) => write!(out, "yield {}", list(vs))?,
        Op::For { lo, hi, step, init, body } => {
            let carried: Vec<String> = body.args.iter().skip(1).zip(init).map(|(a, i)| format!("{a} = {i}")).collect();
            if !inst.results.is_empty() {
                write!(out, "{} = ", list(&inst.results))?;
            }
            write!(out, "for {} = {lo} to {hi} step {step}", body.args.first().map_or(String::new(), Value::to_string))?;
            if !carried.is_empty() {
                write!(out, " iter({})", carried.join(", "))?;
            }
        }
    }
    Ok(())
}
