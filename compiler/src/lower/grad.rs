//! Reverse-mode differentiation of a declaration's expressions inside a kernel: given ∂ℓ/∂e for an
//! expression e (a gate, key, value or query), accumulates ∂ℓ/∂x for every name x it reads. This is
//! what lets the backward kernels chain the core recurrence's gradients (with respect to the
//! effective q, k, v, log α, β) back to the raw token inputs and per-head parameters of any
//! declared recurrence, with no per-mixer code. Forward values of subexpressions are recomputed
//! where a rule needs them (expressions are small).

use std::collections::HashMap;

use hlac_grammar::ast::{BinOp as AstBin, Expr, ExprKind, UnOp as AstUn};
use hlac_runtime::kir::{BinOp, Builder, CmpOp, UnOp, Value};

use super::expr::{self, Env, POSITION, ROPE_BASE};

/// Gradients accumulated per name.
pub type Grads = HashMap<String, Value>;

/// Sums `g` down to `shape` over the axes where `shape` is 1 (or missing), numpy's inverse of
/// broadcasting.
pub fn reduce_to(b: &mut Builder, g: Value, shape: &[u32]) -> Value {
    let gs = b.shape(g);
    if gs == shape {
        return g;
    }
    let rank = gs.len();
    let mut target = vec![1u32; rank.saturating_sub(shape.len())];
    target.extend(shape);
    let mut g = g;
    // Sum from the last axis so earlier axis numbers stay valid.
    for axis in (0..rank).rev() {
        if target[axis] == 1 && b.shape(g)[axis] != 1 {
            g = b.sum(g, axis as u8);
            let mut kept = b.shape(g);
            kept.insert(axis, 1);
            g = b.reshape(g, &kept);
        }
    }
    b.reshape(g, shape)
}

/// Accumulates ∂ℓ/∂x into `grads` for every name in `wrt` that `e` reads, given `up` = ∂ℓ/∂e.
pub fn backprop(b: &mut Builder, e: &Expr, env: &Env, up: Value, wrt: &[String], grads: &mut Grads) -> Result<(), String> {
    match &e.kind {
        ExprKind::Number { .. } | ExprKind::Bool(_) | ExprKind::None | ExprKind::Str(_) => Ok(()),
        ExprKind::Name(n) => {
            if !wrt.iter().any(|w| w == n) {
                return Ok(());
            }
            let x = *env.get(n).ok_or_else(|| format!("`{n}` is not available in this kernel"))?;
            let shape = b.shape(x);
            let g = reduce_to(b, up, &shape);
            let total = match grads.get(n) {
                Some(prev) => b.add(*prev, g),
                None => g,
            };
            grads.insert(n.clone(), total);
            Ok(())
        }
        ExprKind::Paren(x) => backprop(b, x, env, up, wrt, grads),
        ExprKind::Unary { op: AstUn::Neg, operand } => {
            let g = b.unary(UnOp::Neg, up);
            child(b, operand, env, g, wrt, grads)
        }
        ExprKind::Unary { .. } => Err("`!` in a differentiated expression".into()),
        ExprKind::Binary { op, lhs, rhs } => {
            let (gx, gy) = match op {
                AstBin::Add => (up, up),
                AstBin::Sub => (up, b.unary(UnOp::Neg, up)),
                AstBin::Mul => {
                    let x = expr::lower(b, lhs, env)?;
                    let y = expr::lower(b, rhs, env)?;
                    (b.mul(up, y), b.mul(up, x))
                }
                AstBin::Div => {
                    let x = expr::lower(b, lhs, env)?;
                    let y = expr::lower(b, rhs, env)?;
                    let gx = b.div(up, y);
                    let q = b.div(x, y);
                    let t = b.mul(gx, q);
                    (gx, b.unary(UnOp::Neg, t))
                }
                other => return Err(format!("`{}` in a differentiated expression", other.symbol())),
            };
            child(b, lhs, env, gx, wrt, grads)?;
            child(b, rhs, env, gy, wrt, grads)
        }
        ExprKind::Call { func, args } => {
            let name = func.name.as_str();
            if name == "pow" {
                let a = expr::lower(b, &args[0], env)?;
                let p = expr::lower(b, &args[1], env)?;
                let y = b.binary(BinOp::Pow, a, p);
                let t = b.mul(up, y);
                let da = b.mul(t, p);
                let da = b.div(da, a);
                let la = b.unary(UnOp::Log, a);
                let dp = b.mul(t, la);
                child(b, &args[0], env, da, wrt, grads)?;
                return child(b, &args[1], env, dp, wrt, grads);
            }
            let x = expr::lower(b, &args[0], env)?;
            let one = b.f32(1.0);
            let g = match name {
                "diag" => up,
                "exp" => {
                    let y = b.exp(x);
                    b.mul(up, y)
                }
                "log" => b.div(up, x),
                "sigmoid" => {
                    let s = b.unary(UnOp::Sigmoid, x);
                    let c = b.sub(one, s);
                    let d = b.mul(s, c);
                    b.mul(up, d)
                }
                // d/dx log σ(x) = σ(−x).
                "logsigmoid" => {
                    let n = b.unary(UnOp::Neg, x);
                    let s = b.unary(UnOp::Sigmoid, n);
                    b.mul(up, s)
                }
                "softplus" => {
                    let s = b.unary(UnOp::Sigmoid, x);
                    b.mul(up, s)
                }
                // silu'(x) = σ(x)(1 + x(1 − σ(x))).
                "silu" => {
                    let s = b.unary(UnOp::Sigmoid, x);
                    let c = b.sub(one, s);
                    let xc = b.mul(x, c);
                    let t = b.add(one, xc);
                    let d = b.mul(s, t);
                    b.mul(up, d)
                }
                "sqrt" => {
                    let r = b.unary(UnOp::Sqrt, x);
                    let half = b.f32(0.5);
                    let d = b.div(half, r);
                    b.mul(up, d)
                }
                "rsqrt" => {
                    let r = b.unary(UnOp::Rsqrt, x);
                    let r2 = b.mul(r, r);
                    let r3 = b.mul(r2, r);
                    let c = b.f32(-0.5);
                    let d = b.mul(r3, c);
                    b.mul(up, d)
                }
                "abs" => {
                    let zero = b.f32(0.0);
                    let neg = b.cmp(CmpOp::Lt, x, zero);
                    let n = b.unary(UnOp::Neg, up);
                    b.select(neg, n, up)
                }
                "tanh" => {
                    let y = b.unary(UnOp::Tanh, x);
                    let y2 = b.mul(y, y);
                    let d = b.sub(one, y2);
                    b.mul(up, d)
                }
                // y = x r with r = (Σx² + ε)^−½: dx = r (dy − y (y·dy)).
                "l2norm" => {
                    let shape = b.shape(x);
                    let up = reduce_to(b, up, &shape);
                    let y = expr::l2norm(b, x);
                    let sq = b.mul(x, x);
                    let axis = (shape.len() - 1) as u8;
                    let ss = b.sum(sq, axis);
                    let ss = b.col(ss);
                    let eps = b.f32(expr::L2_EPS);
                    let ss = b.add(ss, eps);
                    let r = b.unary(UnOp::Rsqrt, ss);
                    let ydy = b.mul(y, up);
                    let dot = b.sum(ydy, axis);
                    let dot = b.col(dot);
                    let proj = b.mul(y, dot);
                    let diff = b.sub(up, proj);
                    b.mul(diff, r)
                }
                // y = x ⊙ cos + (x P) ⊙ sin: dx = dy ⊙ cos + (dy ⊙ sin) Pᵀ.
                "rope" => {
                    let shape = b.shape(x);
                    let d = shape[shape.len() - 1];
                    if d / 2 == 0 {
                        up
                    } else {
                        let up = reduce_to(b, up, &shape);
                        let pos = env.get(POSITION).copied().ok_or("`rope` needs token positions")?;
                        let (p, cos, sin) = expr::rope_parts(b, d, pos, ROPE_BASE);
                        let a = b.mul(up, cos);
                        let s = b.mul(up, sin);
                        let pt = b.transpose(p);
                        let r = b.dot(s, pt);
                        b.add(a, r)
                    }
                }
                other => return Err(format!("cannot differentiate `{other}`")),
            };
            child(b, &args[0], env, g, wrt, grads)
        }
        ExprKind::Transpose(_) => Err("`^T` in a differentiated expression".into()),
    }
}

/// Recurses into a child, first reducing the upstream gradient to the child's own shape (the
/// parent may have broadcast it).
fn child(b: &mut Builder, e: &Expr, env: &Env, up: Value, wrt: &[String], grads: &mut Grads) -> Result<(), String> {
    if matches!(e.kind, ExprKind::Number { .. }) {
        return Ok(());
    }
    let shape = shape_of(b, e, env)?;
    let up = reduce_to(b, up, &shape);
    backprop(b, e, env, up, wrt, grads)
}

/// The shape `expr::lower` would give `e`, without emitting anything.
fn shape_of(b: &Builder, e: &Expr, env: &Env) -> Result<Vec<u32>, String> {
    Ok(match &e.kind {
        ExprKind::Name(n) => b.shape(*env.get(n).ok_or_else(|| format!("`{n}` is not available in this kernel"))?),
        ExprKind::Paren(x) | ExprKind::Unary { operand: x, .. } | ExprKind::Transpose(x) => shape_of(b, x, env)?,
        ExprKind::Binary { lhs, rhs, .. } => Builder::common(&shape_of(b, lhs, env)?, &shape_of(b, rhs, env)?),
        ExprKind::Call { args, .. } => {
            let mut s = Vec::new();
            for a in args {
                s = Builder::common(&s, &shape_of(b, a, env)?);
            }
            s
        }
        _ => Vec::new(),
    })
}
