//! A builder for kernel programs. It types every value as it is created, inserts explicit
//! `broadcast`s where operands of different shapes meet (numpy rules), and keeps loop bodies
//! nested, so that algorithms read close to their math.

use super::{BinOp, Block, CmpOp, Const, DType, Inst, Op, Param, ParamKind, Program, ReduceOp, Ty, UnOp, Value};

/// Builds one [`Program`].
pub struct Builder {
    program: Program,
    /// Open blocks; the last is where instructions go.
    stack: Vec<Block>,
}

/// A pointer parameter, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ptr(pub u32);

impl Builder {
    /// A new, empty program with the given grid axis names.
    pub fn new(name: &str, grid: &[&str]) -> Builder {
        Builder {
            program: Program {
                name: name.to_string(),
                params: Vec::new(),
                grid: grid.iter().map(|s| s.to_string()).collect(),
                body: Block::default(),
                types: Vec::new(),
            },
            stack: vec![Block::default()],
        }
    }

    /// Finishes the program.
    pub fn finish(mut self) -> Program {
        self.program.body = self.stack.pop().unwrap_or_default();
        self.program
    }

    /// Declares a pointer parameter.
    pub fn ptr(&mut self, name: &str, dtype: DType, writable: bool) -> Ptr {
        self.program.params.push(Param { name: name.to_string(), kind: ParamKind::Ptr { dtype, writable } });
        Ptr(self.program.params.len() as u32 - 1)
    }

    /// Declares an integer parameter and returns its value.
    pub fn int_param(&mut self, name: &str) -> Value {
        self.program.params.push(Param { name: name.to_string(), kind: ParamKind::Int });
        let index = self.program.params.len() as u32 - 1;
        self.op(Op::Param(index), Ty::scalar(DType::I64))
    }

    /// The type of a value.
    pub fn ty(&self, v: Value) -> &Ty {
        &self.program.types[v.0 as usize]
    }

    /// The shape of a value.
    pub fn shape(&self, v: Value) -> Vec<u32> {
        self.ty(v).shape.clone()
    }

    fn new_value(&mut self, ty: Ty) -> Value {
        self.program.types.push(ty);
        Value(self.program.types.len() as u32 - 1)
    }

    fn push(&mut self, inst: Inst) {
        if let Some(block) = self.stack.last_mut() {
            block.insts.push(inst);
        }
    }

    /// Appends an operation with one result of type `ty`.
    pub fn op(&mut self, op: Op, ty: Ty) -> Value {
        let v = self.new_value(ty);
        self.push(Inst { results: vec![v], op });
        v
    }

    /// The grid index on `axis`.
    pub fn program_id(&mut self, axis: u8) -> Value {
        self.op(Op::ProgramId(axis), Ty::scalar(DType::I64))
    }

    /// An f32 scalar.
    pub fn f32(&mut self, x: f64) -> Value {
        self.op(Op::Const(Const::Float(x)), Ty::scalar(DType::F32))
    }

    /// An i64 scalar.
    pub fn i64(&mut self, x: i64) -> Value {
        self.op(Op::Const(Const::Int(x)), Ty::scalar(DType::I64))
    }

    /// A bool scalar.
    pub fn bool(&mut self, x: bool) -> Value {
        self.op(Op::Const(Const::Bool(x)), Ty::scalar(DType::Bool))
    }

    /// An f32 vector of constants.
    pub fn table(&mut self, values: &[f64]) -> Value {
        self.op(Op::Table(values.to_vec()), Ty::tile(DType::F32, &[values.len() as u32]))
    }

    /// 0..n as an i64 vector.
    pub fn iota(&mut self, n: u32) -> Value {
        self.op(Op::Iota(n), Ty::tile(DType::I64, &[n]))
    }

    /// Broadcasts `v` to `shape` (a no-op when it already has it).
    pub fn broadcast(&mut self, v: Value, shape: &[u32]) -> Value {
        let ty = self.ty(v).clone();
        if ty.shape == shape {
            return v;
        }
        // Numpy alignment: missing leading axes are size 1.
        let v = if !ty.is_scalar() && ty.shape.len() < shape.len() {
            let mut padded = vec![1; shape.len() - ty.shape.len()];
            padded.extend(&ty.shape);
            self.reshape(v, &padded)
        } else {
            v
        };
        self.op(Op::Broadcast(v), Ty::tile(ty.dtype, shape))
    }

    /// Same elements, new shape.
    pub fn reshape(&mut self, v: Value, shape: &[u32]) -> Value {
        let dtype = self.ty(v).dtype;
        if self.ty(v).shape == shape {
            return v;
        }
        self.op(Op::Reshape(v), Ty::tile(dtype, shape))
    }

    /// `v` as a column: [n] → [n, 1].
    pub fn col(&mut self, v: Value) -> Value {
        let n = self.shape(v)[0];
        self.reshape(v, &[n, 1])
    }

    /// `v` as a row: [n] → [1, n].
    pub fn row(&mut self, v: Value) -> Value {
        let n = self.shape(v)[0];
        self.reshape(v, &[1, n])
    }

    /// Matrix transpose.
    pub fn transpose(&mut self, v: Value) -> Value {
        let ty = self.ty(v).clone();
        let shape = [ty.shape[1], ty.shape[0]];
        self.op(Op::Transpose(v), Ty::tile(ty.dtype, &shape))
    }

    /// The common numpy broadcast shape of two shapes (each axis the larger of the two, missing
    /// leading axes counting as 1).
    pub fn common(a: &[u32], b: &[u32]) -> Vec<u32> {
        let n = a.len().max(b.len());
        (0..n)
            .map(|i| {
                let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
                let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
                x.max(y)
            })
            .collect()
    }

    fn both(&mut self, a: Value, b: Value) -> (Value, Value, Vec<u32>) {
        let shape = Self::common(&self.shape(a), &self.shape(b));
        let a = self.broadcast(a, &shape);
        let b = self.broadcast(b, &shape);
        (a, b, shape)
    }

    /// Elementwise binary operation with broadcasting.
    pub fn binary(&mut self, op: BinOp, a: Value, b: Value) -> Value {
        let (a, b, shape) = self.both(a, b);
        let dtype = self.ty(a).dtype;
        self.op(Op::Binary(op, a, b), Ty::tile(dtype, &shape))
    }

    /// a + b
    pub fn add(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinOp::Add, a, b)
    }

    /// a − b
    pub fn sub(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinOp::Sub, a, b)
    }

    /// a · b
    pub fn mul(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinOp::Mul, a, b)
    }

    /// a / b
    pub fn div(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinOp::Div, a, b)
    }

    /// max(a, b)
    pub fn max(&mut self, a: Value, b: Value) -> Value {
        self.binary(BinOp::Max, a, b)
    }

    /// Elementwise unary operation.
    pub fn unary(&mut self, op: UnOp, a: Value) -> Value {
        let ty = self.ty(a).clone();
        self.op(Op::Unary(op, a), ty)
    }

    /// eˣ
    pub fn exp(&mut self, a: Value) -> Value {
        self.unary(UnOp::Exp, a)
    }

    /// Comparison with broadcasting.
    pub fn cmp(&mut self, op: CmpOp, a: Value, b: Value) -> Value {
        let (a, b, shape) = self.both(a, b);
        self.op(Op::Cmp(op, a, b), Ty::tile(DType::Bool, &shape))
    }

    /// Elementwise choice with broadcasting of all three operands.
    pub fn select(&mut self, cond: Value, then: Value, otherwise: Value) -> Value {
        let shape = Self::common(&Self::common(&self.shape(cond), &self.shape(then)), &self.shape(otherwise));
        let cond = self.broadcast(cond, &shape);
        let then = self.broadcast(then, &shape);
        let otherwise = self.broadcast(otherwise, &shape);
        let dtype = self.ty(then).dtype;
        self.op(Op::Select { cond, then, otherwise }, Ty::tile(dtype, &shape))
    }

    /// Type conversion.
    pub fn cast(&mut self, v: Value, to: DType) -> Value {
        let ty = self.ty(v).clone();
        if ty.dtype == to {
            return v;
        }
        self.op(Op::Cast(v, to), Ty::tile(to, &ty.shape))
    }

    /// Masked load of a tile shaped like `offsets`: f32 through any float pointer (bf16 and f16
    /// widen on load), i64 through an i64 pointer.
    pub fn load(&mut self, ptr: Ptr, offsets: Value, mask: Option<Value>, other: f64) -> Value {
        let dtype = match &self.program.params[ptr.0 as usize].kind {
            ParamKind::Ptr { dtype, .. } => dtype.tile_type(),
            ParamKind::Int => DType::F32,
        };
        let shape = self.shape(offsets);
        let mask = mask.map(|m| self.broadcast(m, &shape));
        self.op(Op::Load { ptr: ptr.0, offsets, mask, other }, Ty::tile(dtype, &shape))
    }

    /// Masked store.
    pub fn store(&mut self, ptr: Ptr, offsets: Value, value: Value, mask: Option<Value>) {
        let shape = self.shape(offsets);
        let value = self.broadcast(value, &shape);
        let mask = mask.map(|m| self.broadcast(m, &shape));
        self.push(Inst { results: Vec::new(), op: Op::Store { ptr: ptr.0, offsets, value, mask } });
    }

    /// Reduction over `axis`.
    pub fn reduce(&mut self, op: ReduceOp, v: Value, axis: u8) -> Value {
        let mut ty = self.ty(v).clone();
        ty.shape.remove(axis as usize);
        self.op(Op::Reduce(op, v, axis), ty)
    }

    /// Σ over `axis`.
    pub fn sum(&mut self, v: Value, axis: u8) -> Value {
        self.reduce(ReduceOp::Sum, v, axis)
    }

    /// Inclusive cumulative sum over `axis`.
    pub fn cumsum(&mut self, v: Value, axis: u8, reverse: bool) -> Value {
        let ty = self.ty(v).clone();
        self.op(Op::Scan { value: v, axis, reverse, decay: None }, ty)
    }

    /// The linear recurrence along `axis`: out₀ = x₀, outₖ = dₖ·outₖ₋₁ + xₖ; with `reverse`, its
    /// adjoint outₖ = dₖ₊₁·outₖ₊₁ + xₖ from the end (module docs). `d` has `x`'s type.
    pub fn linear_scan(&mut self, x: Value, d: Value, axis: u8, reverse: bool) -> Value {
        let ty = self.ty(x).clone();
        self.op(Op::Scan { value: x, axis, reverse, decay: Some(d) }, ty)
    }

    /// Matrix product with f32 accumulation.
    pub fn dot(&mut self, a: Value, b: Value) -> Value {
        let (m, n) = (self.shape(a)[0], self.shape(b)[1]);
        self.op(Op::Dot(a, b), Ty::tile(DType::F32, &[m, n]))
    }

    /// (I + strictly_lower(a))⁻¹.
    pub fn tri_inv(&mut self, a: Value) -> Value {
        let ty = self.ty(a).clone();
        self.op(Op::TriInv(a), ty)
    }

    /// A counted loop carrying `init`; `body` gets the index and the carried values and returns the
    /// next carried values. Returns the values after the last iteration.
    pub fn for_loop(
        &mut self,
        lo: Value,
        hi: Value,
        step: Value,
        init: &[Value],
        body: impl FnOnce(&mut Builder, Value, &[Value]) -> Vec<Value>,
    ) -> Vec<Value> {
        let index = self.new_value(Ty::scalar(DType::I64));
        let args: Vec<Value> = init
            .iter()
            .map(|v| {
                let ty = self.ty(*v).clone();
                self.new_value(ty)
            })
            .collect();
        let mut block_args = vec![index];
        block_args.extend(&args);
        self.stack.push(Block { args: block_args, insts: Vec::new() });
        let next = body(self, index, &args);
        self.push(Inst { results: Vec::new(), op: Op::Yield(next) });
        let block = self.stack.pop().unwrap_or_default();
        let results: Vec<Value> = init
            .iter()
            .map(|v| {
                let ty = self.ty(*v).clone();
                self.new_value(ty)
            })
            .collect();
        self.push(Inst { results: results.clone(), op: Op::For { lo, hi, step, init: init.to_vec(), body: block } });
        results
    }
}
