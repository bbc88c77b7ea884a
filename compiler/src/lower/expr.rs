//! Compiles the expressions of a recurrence's declaration (gates, keys, values, queries, scales)
//! into kernel-IR operations on a chunk's tiles. Token inputs are [C, D] tiles (a scalar input is
//! [C, 1]), per-head parameters and `head_index` are scalars, `lower_bound` is a [1, K] row and the
//! state's axis names are their sizes. Elementwise functions map onto kir's unary operations;
//! `l2norm` normalises over the channel axis as fla does (x · (Σx² + 1e-6)^−½).

use std::collections::HashMap;

use hlac_grammar::ast::{BinOp as AstBin, Expr, ExprKind, UnOp as AstUn};
use hlac_runtime::kir::{BinOp, Builder, UnOp, Value};

/// fla's epsilon inside L2 normalisation.
pub const L2_EPS: f64 = 1e-6;

/// Names an expression may use, bound to kir values.
pub type Env = HashMap<String, Value>;

/// Lowers `e`. Errors name what is not supported.
pub fn lower(b: &mut Builder, e: &Expr, env: &Env) -> Result<Value, String> {
    match &e.kind {
        ExprKind::Number { value, .. } => Ok(b.f32(*value)),
        ExprKind::Name(n) => env.get(n).copied().ok_or_else(|| format!("`{n}` is not available in this kernel")),
        ExprKind::Paren(x) => lower(b, x, env),
        ExprKind::Unary { op: AstUn::Neg, operand } => {
            let x = lower(b, operand, env)?;
            Ok(b.unary(UnOp::Neg, x))
        }
        ExprKind::Binary { op, lhs, rhs } => {
            let x = lower(b, lhs, env)?;
            let y = lower(b, rhs, env)?;
            let op = match op {
                AstBin::Add => BinOp::Add,
                AstBin::Sub => BinOp::Sub,
                AstBin::Mul => BinOp::Mul,
                AstBin::Div => BinOp::Div,
                other => return Err(format!("`{}` in a kernel expression", other.symbol())),
            };
            Ok(b.binary(op, x, y))
        }
        ExprKind::Call { func, args } => {
            let name = func.name.as_str();
            if name == "pow" {
                let x = lower(b, &args[0], env)?;
                let y = lower(b, &args[1], env)?;
                return Ok(b.binary(BinOp::Pow, x, y));
            }
            let x = lower(b, &args[0], env)?;
            let op = match name {
                "exp" => UnOp::Exp,
                "log" => UnOp::Log,
                "sigmoid" => UnOp::Sigmoid,
                "logsigmoid" => UnOp::LogSigmoid,
                "softplus" => UnOp::Softplus,
                "silu" => UnOp::Silu,
                "sqrt" => UnOp::Sqrt,
                "rsqrt" => UnOp::Rsqrt,
                "abs" => UnOp::Abs,
                "tanh" => UnOp::Tanh,
                "diag" => return Ok(x),
                "l2norm" => return Ok(l2norm(b, x)),
                other => return Err(format!("`{other}` is not lowered yet")),
            };
            Ok(b.unary(op, x))
        }
        other => Err(format!("{other:?} in a kernel expression")),
    }
}

/// x · (Σ_d x_d² + ε)^−½ over the last axis of a [C, D] tile.
pub fn l2norm(b: &mut Builder, x: Value) -> Value {
    let sq = b.mul(x, x);
    let axis = (b.shape(x).len() - 1) as u8;
    let ss = b.sum(sq, axis);
    let ss = b.col(ss);
    let eps = b.f32(L2_EPS);
    let ss = b.add(ss, eps);
    let r = b.unary(UnOp::Rsqrt, ss);
    b.mul(x, r)
}

/// log α for a decay expression: the argument of a top-level `exp` when there is one (exact, as
/// fla computes GLA's and GDN's gates in log space), otherwise the log of the value.
pub fn log_of(b: &mut Builder, e: &Expr, env: &Env) -> Result<Value, String> {
    match &e.kind {
        ExprKind::Paren(x) => log_of(b, x, env),
        ExprKind::Call { func, args } if func.name == "exp" => lower(b, &args[0], env),
        ExprKind::Call { func, args } if func.name == "diag" => log_of(b, &args[0], env),
        _ => {
            let x = lower(b, e, env)?;
            Ok(b.unary(UnOp::Log, x))
        }
    }
}

/// Every name an expression mentions.
pub fn names(e: &Expr, out: &mut Vec<String>) {
    crate::mixer::walk(e, &mut |n| {
        if !out.iter().any(|x| x == n) {
            out.push(n.to_string());
        }
    });
}
