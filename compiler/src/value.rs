//! Compile-time values and the evaluator for size expressions: the hyper-parameters of a mixer,
//! the sizes derived from them, `require` conditions and weight shapes. The math of a recurrence is
//! not evaluated here; it is classified symbolically by [`crate::classify`].

use std::collections::HashMap;
use std::fmt;

use hlac_grammar::ast::{BinOp, Expr, ExprKind, ScalarType, TypeRef, UnOp};
use hlac_grammar::Span;

/// A compile-time value. Integers and reals stay distinct so that a config written with `1`
/// is exported with `1`, not `1.0`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A whole number.
    Int(i64),
    /// A real number.
    Float(f64),
    /// A truth value.
    Bool(bool),
    /// A string.
    Str(String),
    /// The absence of a value (`none`, JSON `null`).
    None,
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    write!(f, "{x:.1}")
                } else {
                    write!(f, "{x}")
                }
            }
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "\"{s}\""),
            Value::None => write!(f, "none"),
        }
    }
}

impl Value {
    /// The type's name as a user writes it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Bool(_) => "bool",
            Value::Str(_) => "str",
            Value::None => "none",
        }
    }

    /// The value as a real number, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(x) => Some(*x),
            _ => None,
        }
    }

    /// Whether the value may be given to a parameter of type `ty`.
    pub fn fits(&self, ty: TypeRef) -> bool {
        match (self, ty.scalar) {
            (Value::None, _) => ty.optional,
            (Value::Int(_), ScalarType::Int | ScalarType::Float) => true,
            (Value::Float(_), ScalarType::Float) => true,
            (Value::Bool(_), ScalarType::Bool) => true,
            (Value::Str(_), ScalarType::Str) => true,
            _ => false,
        }
    }

    /// The value as a JSON value (for configs and manifests).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(x) => serde_json::Number::from_f64(*x).map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::None => serde_json::Value::Null,
        }
    }
}

/// The name of a type as a user writes it (`int?`).
pub fn type_ref_name(ty: TypeRef) -> String {
    let base = match ty.scalar {
        ScalarType::Int => "int",
        ScalarType::Float => "float",
        ScalarType::Bool => "bool",
        ScalarType::Str => "str",
    };
    if ty.optional {
        format!("{base}?")
    } else {
        base.to_string()
    }
}

/// Why an expression could not be evaluated, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    /// The sub-expression at fault.
    pub span: Span,
    /// What went wrong.
    pub message: String,
}

fn err<T>(span: Span, message: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError { span, message: message.into() })
}

/// Names and their values.
pub type Env = HashMap<String, Value>;

/// Evaluates a size expression.
pub fn eval(e: &Expr, env: &Env) -> Result<Value, EvalError> {
    match &e.kind {
        ExprKind::Number { value, is_int, text } => {
            if *is_int {
                match text.parse::<i64>() {
                    Ok(i) => Ok(Value::Int(i)),
                    Err(_) => err(e.span, format!("`{text}` is too large")),
                }
            } else if value.is_finite() {
                Ok(Value::Float(*value))
            } else {
                err(e.span, format!("`{text}` is too large"))
            }
        }
        ExprKind::Bool(b) => Ok(Value::Bool(*b)),
        ExprKind::None => Ok(Value::None),
        ExprKind::Str(s) => Ok(Value::Str(s.clone())),
        ExprKind::Name(n) => match env.get(n) {
            Some(v) => Ok(v.clone()),
            None => err(e.span, format!("unknown name `{n}`")),
        },
        ExprKind::Paren(inner) => eval(inner, env),
        ExprKind::Transpose(_) => err(e.span, "`^T` belongs in the math of a recurrence, not in a size"),
        ExprKind::Unary { op, operand } => {
            let v = eval(operand, env)?;
            match (op, v) {
                (UnOp::Neg, Value::Int(i)) => i.checked_neg().map(Value::Int).ok_or(()).or_else(|_| err(e.span, "integer overflow")),
                (UnOp::Neg, Value::Float(x)) => Ok(Value::Float(-x)),
                (UnOp::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
                (UnOp::Neg, v) => err(operand.span, format!("cannot negate a {}", v.type_name())),
                (UnOp::Not, v) => err(operand.span, format!("`!` needs a bool, found a {}", v.type_name())),
            }
        }
        ExprKind::Binary { op, lhs, rhs } => binary(*op, lhs, rhs, env, e.span),
        ExprKind::Call { func, args } => call(&func.name, args, env, e.span),
    }
}

fn binary(op: BinOp, lhs: &Expr, rhs: &Expr, env: &Env, span: Span) -> Result<Value, EvalError> {
    // `&&` and `||` short-circuit so that `x == none || x > 0` works.
    if matches!(op, BinOp::And | BinOp::Or) {
        let Value::Bool(a) = eval(lhs, env)? else {
            return err(lhs.span, format!("`{}` needs bools", op.symbol()));
        };
        if (op == BinOp::And && !a) || (op == BinOp::Or && a) {
            return Ok(Value::Bool(a));
        }
        return match eval(rhs, env)? {
            Value::Bool(b) => Ok(Value::Bool(b)),
            _ => err(rhs.span, format!("`{}` needs bools", op.symbol())),
        };
    }
    let a = eval(lhs, env)?;
    let b = eval(rhs, env)?;
    match op {
        BinOp::Eq => return Ok(Value::Bool(equal(&a, &b))),
        BinOp::Ne => return Ok(Value::Bool(!equal(&a, &b))),
        _ => {}
    }
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => {
            let (x, y) = (*x, *y);
            let r = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div | BinOp::Rem if y == 0 => return err(rhs.span, "division by zero"),
                BinOp::Div if x % y != 0 => {
                    return err(span, format!("{x} is not divisible by {y}"));
                }
                BinOp::Div => Some(x / y),
                BinOp::Rem => Some(x % y),
                BinOp::Lt => return Ok(Value::Bool(x < y)),
                BinOp::Gt => return Ok(Value::Bool(x > y)),
                BinOp::Le => return Ok(Value::Bool(x <= y)),
                BinOp::Ge => return Ok(Value::Bool(x >= y)),
                _ => unreachable!("handled above"),
            };
            r.map(Value::Int).ok_or(()).or_else(|_| err(span, "integer overflow"))
        }
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => {
                let r = match op {
                    BinOp::Add => x + y,
                    BinOp::Sub => x - y,
                    BinOp::Mul => x * y,
                    BinOp::Div | BinOp::Rem if y == 0.0 => return err(rhs.span, "division by zero"),
                    BinOp::Div => x / y,
                    BinOp::Rem => x % y,
                    BinOp::Lt => return Ok(Value::Bool(x < y)),
                    BinOp::Gt => return Ok(Value::Bool(x > y)),
                    BinOp::Le => return Ok(Value::Bool(x <= y)),
                    BinOp::Ge => return Ok(Value::Bool(x >= y)),
                    _ => unreachable!("handled above"),
                };
                if r.is_finite() {
                    Ok(Value::Float(r))
                } else {
                    err(span, "the result is not a finite number")
                }
            }
            _ => {
                let bad = if a.as_f64().is_none() { (lhs, &a) } else { (rhs, &b) };
                err(bad.0.span, format!("`{}` needs numbers, found a {}", op.symbol(), bad.1.type_name()))
            }
        },
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn call(name: &str, args: &[Expr], env: &Env, span: Span) -> Result<Value, EvalError> {
    let arity = |n: usize| -> Result<(), EvalError> {
        if args.len() == n {
            Ok(())
        } else {
            err(span, format!("`{name}` takes {n} argument(s), found {}", args.len()))
        }
    };
    let number = |i: usize| -> Result<f64, EvalError> {
        let v = eval(&args[i], env)?;
        v.as_f64().ok_or(()).or_else(|_| err(args[i].span, format!("`{name}` needs a number, found a {}", v.type_name())))
    };
    match name {
        "some_or" => {
            arity(2)?;
            match eval(&args[0], env)? {
                Value::None => eval(&args[1], env),
                v => Ok(v),
            }
        }
        "int" => {
            arity(1)?;
            let x = number(0)?;
            if x.abs() < 9.0e15 {
                Ok(Value::Int(x.trunc() as i64))
            } else {
                err(span, "the value is too large for an int")
            }
        }
        "float" => {
            arity(1)?;
            Ok(Value::Float(number(0)?))
        }
        "sqrt" => {
            arity(1)?;
            let x = number(0)?;
            if x < 0.0 {
                return err(span, "square root of a negative number");
            }
            Ok(Value::Float(x.sqrt()))
        }
        "pow" => {
            arity(2)?;
            let r = number(0)?.powf(number(1)?);
            if r.is_finite() {
                Ok(Value::Float(r))
            } else {
                err(span, "the result is not a finite number")
            }
        }
        "min" | "max" => {
            arity(2)?;
            let a = eval(&args[0], env)?;
            let b = eval(&args[1], env)?;
            match (&a, &b) {
                (Value::Int(x), Value::Int(y)) => Ok(Value::Int(if name == "min" { *x.min(y) } else { *x.max(y) })),
                _ => match (a.as_f64(), b.as_f64()) {
                    (Some(x), Some(y)) => Ok(Value::Float(if name == "min" { x.min(y) } else { x.max(y) })),
                    _ => err(span, format!("`{name}` needs numbers")),
                },
            }
        }
        _ => err(span, format!("unknown function `{name}` in a size expression")),
    }
}

impl Value {
    /// The value written as `.hla` source, if it can be (strings may not hold `"`, `\` or newlines).
    pub fn literal(&self) -> Option<String> {
        Some(match self {
            Value::Int(i) => i.to_string(),
            // Debug keeps a decimal point or exponent, so a float stays a float when read back.
            Value::Float(x) if x.is_finite() => format!("{x:?}"),
            Value::Float(_) => return None,
            Value::Bool(b) => b.to_string(),
            Value::Str(s) if s.contains(['"', '\\', '\n']) => return None,
            Value::Str(s) => format!("\"{s}\""),
            Value::None => "none".to_string(),
        })
    }

    /// Converts a JSON scalar; arrays and objects have no `.hla` form.
    pub fn from_json(v: &serde_json::Value) -> Option<Value> {
        Some(match v {
            serde_json::Value::Null => Value::None,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64()?),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            _ => return None,
        })
    }
}
