//! The kernel IR ("kir"): the level at which hlac's chunked algorithms are written once and from
//! which both back ends lower — Cranelift on the CPU (in this crate, at load time) and LLVM/NVPTX
//! on the GPU (in the compiler, ahead of time).
//!
//! A [`Program`] is one kernel: typed parameters (global pointers and 64-bit integers), a grid of
//! independent program instances, and a body of SSA instructions over *tiles* — values with a
//! static shape (rank 0 is a scalar, then vectors and matrices) and an element type. Tiles are
//! immutable; loops carry tiles explicitly (`for … iter(…)`, ending in `yield`). Memory is touched
//! only by `load` and `store`, which take a tile of element offsets and an optional mask, as in
//! Triton. Shapes of operands of elementwise operations must match exactly: broadcasting is an
//! explicit `broadcast`, so back ends never guess.
//!
//! Meaning of the operations, all elementwise unless said otherwise:
//! - `program_id a`: this instance's index on grid axis `a` (i64 scalar). `param i`: an integer
//!   parameter's value. `const`: a scalar constant. `iota n`: the i64 vector 0..n. `table [..]`:
//!   an f32 vector of constants.
//! - `unary`/`binary`/`cmp`/`select`/`cast`: arithmetic in the operand type; comparisons give bool.
//! - `broadcast`: repeats size-1 axes (or a scalar) to a shape; `reshape` keeps the elements in
//!   row-major order; `transpose` swaps the two axes of a matrix.
//! - `load p[offsets] mask m else x`: reads `p[offsets[e]]` where the mask holds and `x` elsewhere
//!   (masked-off offsets are never dereferenced); `store` writes where the mask holds.
//! - `reduce sum|max axis a`: removes axis `a`. `scan sum axis a [reverse]`: inclusive cumulative
//!   sum along `a`. `scan linear x decay d axis a`: the first-order linear recurrence along `a`,
//!   out₀ = x₀ and outₖ = dₖ·outₖ₋₁ + xₖ (d₀ unused); with `reverse`, its adjoint with the same
//!   `d`: outₙ₋₁ = xₙ₋₁ and outₖ = dₖ₊₁·outₖ₊₁ + xₖ (the backward of the forward scan: dx =
//!   scan_reverse(d(out), d)), evaluated in order along the axis. `dot a b`: matrix product with f32 accumulation ([m,k]·[k,n]).
//! - `tri_inv a`: for a square `a` whose strictly-lower part is L (the rest is ignored), returns
//!   (I + L)⁻¹ — the unit lower-triangular solve of the delta rule's chunk.
//! - `for i = lo to hi step s iter(x = init…) { … yield … }`: a counted loop carrying tiles.
//!
//! Storage types: a pointer parameter's element type is f32, bf16, f16 or i64. Tiles are never
//! bf16 or f16 — arithmetic is f32 everywhere, and the narrow types exist only at the memory
//! boundary, as in fla's kernels (bf16 activations, f32 accumulation and state): `load` through a
//! bf16 or f16 pointer gives an f32 tile (an exact widening), and `store` of an f32 tile through
//! one rounds each element to the nearest representable value, ties to even (overflow gives ±∞,
//! NaN stays NaN). An i64 pointer loads and stores i64 tiles.
//!
//! [`verify`] checks every invariant a back end relies on; back ends accept only verified programs.

pub mod build;
pub mod layout;
mod print;
pub mod verify;

pub use build::Builder;
pub use print::inst_text;
pub use verify::verify;

use serde::{Deserialize, Serialize};

/// Element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16: a pointer's element type only (loads widen it to f32, stores round to it).
    Bf16,
    /// IEEE half precision: a pointer's element type only, like [`DType::Bf16`].
    F16,
    /// 64-bit signed integers (indices and offsets).
    I64,
    /// Truth values (masks).
    Bool,
}

impl DType {
    /// The name used by the printer.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    /// Whether arithmetic in this type is floating point.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::Bf16 | DType::F16)
    }

    /// The type of the tile a `load` through a pointer to this type gives (and a `store` takes):
    /// f32 for every float type, since bf16 and f16 exist only in memory.
    pub fn tile_type(self) -> DType {
        if self.is_float() {
            DType::F32
        } else {
            self
        }
    }

    /// Bytes per element in memory.
    pub fn bytes(self) -> u32 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }
}

/// The type of a value: an element type and a static shape (`[]` is a scalar).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ty {
    /// Element type.
    pub dtype: DType,
    /// Extent of each axis.
    pub shape: Vec<u32>,
}

/// Row-major strides (in elements) of a shape.
pub fn strides(shape: &[u32]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * i64::from(shape[k + 1]);
    }
    s
}

/// A shape split around `axis` into element counts (before, along, after) — the loop nest of a
/// reduction or scan over that axis.
pub fn split(shape: &[u32], axis: u8) -> (u64, u64, u64) {
    let a = axis as usize;
    let outer = shape[..a].iter().map(|&x| u64::from(x)).product();
    let inner = shape[a + 1..].iter().map(|&x| u64::from(x)).product();
    (outer, u64::from(shape[a]), inner)
}

impl Ty {
    /// A scalar.
    pub fn scalar(dtype: DType) -> Ty {
        Ty { dtype, shape: Vec::new() }
    }

    /// A tile.
    pub fn tile(dtype: DType, shape: &[u32]) -> Ty {
        Ty { dtype, shape: shape.to_vec() }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| u64::from(d)).product()
    }

    /// Whether this is a scalar.
    pub fn is_scalar(&self) -> bool {
        self.shape.is_empty()
    }
}

/// An SSA value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Value(pub u32);

/// What a kernel parameter is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// A pointer to global memory holding elements of `dtype`; `writable` if the kernel stores to it.
    Ptr {
        /// Element type.
        dtype: DType,
        /// Whether the kernel stores through it.
        writable: bool,
    },
    /// A 64-bit integer (a length, a count).
    Int,
}

/// A kernel parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Param {
    /// Its name (used by launchers and the printer).
    pub name: String,
    /// Pointer or integer.
    pub kind: ParamKind,
}

/// Unary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnOp {
    /// −x
    Neg,
    /// eˣ
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// |x|
    Abs,
    /// 1/(1+e⁻ˣ)
    Sigmoid,
    /// ln σ(x), computed without overflow
    LogSigmoid,
    /// ln(1+eˣ), computed without overflow
    Softplus,
    /// x·σ(x)
    Silu,
    /// tanh x
    Tanh,
    /// sin x (radians; RoPE's rotation angles)
    Sin,
    /// cos x (radians)
    Cos,
    /// x rounded to the nearest integer, ties to even
    Round,
    /// ¬x for bools
    Not,
}

/// Binary operations (operands of equal type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinOp {
    /// a + b
    Add,
    /// a − b
    Sub,
    /// a · b
    Mul,
    /// a / b (integer division truncates)
    Div,
    /// remainder (integers)
    Rem,
    /// max(a, b)
    Max,
    /// min(a, b)
    Min,
    /// aᵇ (floats)
    Pow,
    /// a ∧ b (bools)
    And,
    /// a ∨ b (bools)
    Or,
}

/// Comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    /// a < b
    Lt,
    /// a ≤ b
    Le,
    /// a > b
    Gt,
    /// a ≥ b
    Ge,
    /// a = b
    Eq,
    /// a ≠ b
    Ne,
}

/// Reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    /// Σ
    Sum,
    /// max
    Max,
    /// min
    Min,
}

/// A scalar constant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Const {
    /// A float (stored as f64, used in the value's float type).
    Float(f64),
    /// An integer.
    Int(i64),
    /// A truth value.
    Bool(bool),
}

/// An operation; see the module documentation for meanings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Grid index on an axis.
    ProgramId(u8),
    /// An integer parameter.
    Param(u32),
    /// A constant scalar.
    Const(Const),
    /// 0..n as i64.
    Iota(u32),
    /// An f32 vector of the given values (tables the compiler computes in f64, such as
    /// rotary frequencies).
    Table(Vec<f64>),
    /// Elementwise unary.
    Unary(UnOp, Value),
    /// Elementwise binary.
    Binary(BinOp, Value, Value),
    /// Elementwise comparison.
    Cmp(CmpOp, Value, Value),
    /// Elementwise choice.
    Select {
        /// Bool tile.
        cond: Value,
        /// Where true.
        then: Value,
        /// Where false.
        otherwise: Value,
    },
    /// Type conversion.
    Cast(Value, DType),
    /// Repeat size-1 axes (or a scalar) to the result's shape.
    Broadcast(Value),
    /// Same elements, new shape.
    Reshape(Value),
    /// Matrix transpose.
    Transpose(Value),
    /// Masked gather.
    Load {
        /// Pointer parameter index.
        ptr: u32,
        /// i64 element offsets.
        offsets: Value,
        /// Bool mask of the same shape.
        mask: Option<Value>,
        /// Value where masked off.
        other: f64,
    },
    /// Masked scatter.
    Store {
        /// Pointer parameter index.
        ptr: u32,
        /// i64 element offsets.
        offsets: Value,
        /// Values to write.
        value: Value,
        /// Bool mask.
        mask: Option<Value>,
    },
    /// Reduction over one axis.
    Reduce(ReduceOp, Value, u8),
    /// Inclusive cumulative sum over one axis, or with `decay` the linear recurrence
    /// outₖ = dₖ·outₖ₋₁ + valueₖ (reverse: its adjoint, outₖ = dₖ₊₁·outₖ₊₁ + valueₖ).
    Scan {
        /// The input.
        value: Value,
        /// The axis.
        axis: u8,
        /// From the end backwards.
        reverse: bool,
        /// The multipliers of a linear scan (same type as `value`); none for a plain sum.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        decay: Option<Value>,
    },
    /// Matrix product with f32 accumulation.
    Dot(Value, Value),
    /// (I + strictly_lower(a))⁻¹.
    TriInv(Value),
    /// Counted loop carrying tiles; its results are the carried values after the last iteration.
    For {
        /// First index (i64 scalar).
        lo: Value,
        /// Bound, exclusive.
        hi: Value,
        /// Step, positive.
        step: Value,
        /// Initial carried values.
        init: Vec<Value>,
        /// The body: `args[0]` is the index, then one argument per carried value.
        body: Block,
    },
    /// Ends a loop body with the next carried values.
    Yield(Vec<Value>),
}

impl Op {
    /// Every value the operation reads, appended to `out` (a loop's body excluded: its bounds and
    /// initial values only).
    pub fn operands(&self, out: &mut Vec<Value>) {
        match self {
            Op::ProgramId(_) | Op::Param(_) | Op::Const(_) | Op::Iota(_) | Op::Table(_) => {}
            Op::Unary(_, a) | Op::Cast(a, _) | Op::Broadcast(a) | Op::Reshape(a) | Op::Transpose(a) | Op::TriInv(a) => out.push(*a),
            Op::Reduce(_, a, _) => out.push(*a),
            Op::Scan { value, decay, .. } => {
                out.push(*value);
                out.extend(decay);
            }
            Op::Binary(_, a, b) | Op::Cmp(_, a, b) | Op::Dot(a, b) => out.extend([*a, *b]),
            Op::Select { cond, then, otherwise } => out.extend([*cond, *then, *otherwise]),
            Op::Load { offsets, mask, .. } => {
                out.push(*offsets);
                out.extend(mask);
            }
            Op::Store { offsets, value, mask, .. } => {
                out.extend([*offsets, *value]);
                out.extend(mask);
            }
            Op::For { lo, hi, step, init, .. } => {
                out.extend([*lo, *hi, *step]);
                out.extend(init);
            }
            Op::Yield(vs) => out.extend(vs),
        }
    }
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inst {
    /// Values it defines (none for stores and yields, several for loops).
    pub results: Vec<Value>,
    /// What it does.
    pub op: Op,
}

/// A sequence of instructions with arguments (loop bodies).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Block {
    /// Block arguments.
    pub args: Vec<Value>,
    /// Instructions in order.
    pub insts: Vec<Inst>,
}

/// A kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// Its name.
    pub name: String,
    /// Parameters in call order.
    pub params: Vec<Param>,
    /// The grid axes' names (their sizes are given at launch).
    pub grid: Vec<String>,
    /// The body.
    pub body: Block,
    /// The type of every value, indexed by [`Value`].
    pub types: Vec<Ty>,
}

impl Program {
    /// A value's type.
    pub fn ty(&self, v: Value) -> &Ty {
        &self.types[v.0 as usize]
    }

    /// The index of a parameter by name.
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }
}
