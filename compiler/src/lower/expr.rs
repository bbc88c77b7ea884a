//! Compiles the expressions of a recurrence's declaration (gates, keys, values, queries, scales)
//! into kernel-IR operations on a chunk's tiles. Token inputs are [C, D] tiles (a scalar input is
//! [C, 1]), per-head parameters and `head_index` are scalars, `lower_bound` is a [1, K] row and the
//! state's axis names are their sizes. Elementwise functions map onto kir's unary operations;
//! `l2norm` normalises over the channel axis as fla does (x · (Σx² + 1e-6)^−½).

use std::collections::HashMap;

use hlac_grammar::ast::{BinOp as AstBin, Expr, ExprKind, UnOp as AstUn};
use hlac_runtime::kir::{BinOp, Builder, CmpOp, UnOp, Value};

/// fla's epsilon inside L2 normalisation.
pub const L2_EPS: f64 = 1e-6;
/// The environment name of a [R, 1] f32 tile holding each row's position in its sequence (used by
/// `rope`).
pub const POSITION: &str = "__position";
/// The rotary base of `rope(x)` (RetNet's, fla's default).
pub const ROPE_BASE: f64 = 10000.0;

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
                "rope" => {
                    let pos = env.get(POSITION).copied().ok_or("`rope` needs token positions, which this kernel does not have")?;
                    return Ok(rope(b, x, pos, ROPE_BASE));
                }
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

/// Rotary position embedding over the last axis of a [R, D] tile, non-interleaved (the pair of
/// channel i is channel i + D/2, as fla's RotaryEmbedding): x·cos θ + rotate(x)·sin θ with
/// θ_ri = pos_r · base^(−2(i mod D/2)/D). The half rotation is a product with a signed permutation
/// matrix, which keeps it an ordinary `dot` for both back ends. An odd last channel passes through.
pub fn rope(b: &mut Builder, x: Value, pos: Value, base: f64) -> Value {
    let shape = b.shape(x);
    let d = shape[shape.len() - 1];
    if d / 2 == 0 {
        return x;
    }
    let (p, cos, sin) = rope_parts(b, d, pos, base);
    let x2 = b.reshape(x, &[shape[0], d]);
    let rotated = b.dot(x2, p);
    let a = b.mul(x2, cos);
    let c = b.mul(rotated, sin);
    let y = b.add(a, c);
    b.reshape(y, &shape)
}

/// The signed half-rotation matrix P ([D, D]) and the [R, D] cos θ and sin θ tiles of [`rope`].
pub fn rope_parts(b: &mut Builder, d: u32, pos: Value, base: f64) -> (Value, Value, Value) {
    let half = d / 2;
    let iota = b.iota(d);
    // P[j, i] = −1 where i < D/2 and j = i + D/2; +1 where D/2 ≤ i < 2·(D/2) and j = i − D/2.
    let j = b.col(iota);
    let i = b.row(iota);
    let h = b.i64(i64::from(half));
    let i_plus = b.add(i, h);
    let i_minus = b.sub(i, h);
    let lower = b.cmp(CmpOp::Lt, i, h);
    let two_h = b.i64(2 * i64::from(half));
    let paired = b.cmp(CmpOp::Lt, i, two_h);
    let is_up = b.cmp(CmpOp::Eq, j, i_plus);
    let is_down = b.cmp(CmpOp::Eq, j, i_minus);
    let neg = b.f32(-1.0);
    let posv = b.f32(1.0);
    let zero = b.f32(0.0);
    let up = b.select(is_up, neg, zero);
    let down = b.select(is_down, posv, zero);
    let upper_half = b.select(paired, down, zero);
    let p = b.select(lower, up, upper_half);
    let (cos, sin) = rope_angles(b, d, pos, base);
    (p, cos, sin)
}

/// cos θ and sin θ ([R, D]) of the rotary angles θ_ri = pos_r · base^(−2(i mod D/2)/D) (the
/// unpaired last channel of an odd D gets θ = 0), from a [R, 1] f32 tile of positions.
pub fn rope_angles(b: &mut Builder, d: u32, pos: Value, base: f64) -> (Value, Value) {
    let freqs = rope_frequencies(b, d, base);
    rope_angles_at(b, freqs, pos)
}

/// The split inverse frequencies (f_hi, f_lo) of [`rope_angles`], `[1, d]` rows: independent of
/// the position, so a kernel can build them once outside its loops ([`rope_angles_at`]).
pub fn rope_frequencies(b: &mut Builder, d: u32, base: f64) -> (Value, Value) {
    let half = d / 2;
    // Angles θ = pos · f with f = base^(−2k/D) (k = i mod D/2; the unpaired last channel gets 0),
    // formed accurately in f32: f is computed in f64 here and split into f_hi (8 significant bits,
    // so pos · f_hi is exact for pos < 2¹⁶) and f_lo; pos · f_hi is reduced mod 2π with 2π in three
    // parts (Cody–Waite; k · C1 is exact), then pos · f_lo is added. A plain f32 product loses
    // about pos · 2⁻²⁴ rad, 2.4e-4 at position 4096.
    let freq = |i: u32| if i < 2 * half { base.powf(-2.0 * f64::from(i % half) / f64::from(d)) } else { 0.0 };
    let (hi, lo): (Vec<f64>, Vec<f64>) = (0..d)
        .map(|i| {
            let f = freq(i);
            let f_hi = round_to_bits(f, 8);
            (f_hi, f - f_hi)
        })
        .unzip();
    let f_hi = b.table(&hi);
    let f_hi = b.row(f_hi);
    let f_lo = b.table(&lo);
    let f_lo = b.row(f_lo);
    (f_hi, f_lo)
}

/// cos and sin of the RoPE angles at `pos` (`[n, 1]` f32) from [`rope_frequencies`].
pub fn rope_angles_at(b: &mut Builder, (f_hi, f_lo): (Value, Value), pos: Value) -> (Value, Value) {
    let a = b.mul(pos, f_hi);
    let inv_tau = b.f32(1.0 / std::f64::consts::TAU);
    let turns = b.mul(a, inv_tau);
    let turns = b.unary(UnOp::Round, turns);
    const C1: f64 = 6.28125;
    let c2 = f64::from((std::f64::consts::TAU - C1) as f32);
    let c3 = std::f64::consts::TAU - C1 - c2;
    let mut r = a;
    for c in [C1, c2, c3] {
        let cv = b.f32(c);
        let t = b.mul(turns, cv);
        r = b.sub(r, t);
    }
    let small = b.mul(pos, f_lo);
    let theta = b.add(r, small);
    let cos = b.unary(UnOp::Cos, theta);
    let sin = b.unary(UnOp::Sin, theta);
    (cos, sin)
}

/// `x` rounded to `bits` significant bits (0 stays 0).
fn round_to_bits(x: f64, bits: i32) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 2f64.powi(bits - 1 - x.abs().log2().floor() as i32);
    (x * scale).round() / scale
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

/// Whether an expression calls `func` anywhere.
pub fn mentions_call(e: &Expr, func: &str) -> bool {
    match &e.kind {
        ExprKind::Call { func: f, args } => f.name == func || args.iter().any(|a| mentions_call(a, func)),
        ExprKind::Unary { operand, .. } => mentions_call(operand, func),
        ExprKind::Binary { lhs, rhs, .. } => mentions_call(lhs, func) || mentions_call(rhs, func),
        ExprKind::Transpose(x) | ExprKind::Paren(x) => mentions_call(x, func),
        _ => false,
    }
}
