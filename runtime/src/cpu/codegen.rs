//! Kernel IR → native code through Cranelift, at load time. Every tile lives in a per-thread
//! scratch buffer at an offset fixed at compile time; every tile operation becomes a loop nest over
//! its elements (f32, i64, or one byte per bool). Scalars stay in registers, and so do splats
//! (broadcasts and reshapes of a scalar): they take no storage and readers use the scalar. `reshape`
//! aliases its operand's storage (tiles are immutable), and a loop's results alias its carried
//! storage.
//!
//! Hot operations use 128-bit vectors: f32 arithmetic, `select` and exp-based unary operations run
//! four lanes at a time with a scalar tail; broadcasts and copies move whole rows 16 bytes at a
//! time; reductions and scans across a non-last axis run four columns at a time; `dot` keeps
//! register tiles of 2 rows × 16 columns. None of this changes results: each element is computed
//! by the same operations in the same order as one at a time (sums are never reassociated), except
//! that eˣ is computed inline (under 2 ulp, see `Gen::exp`) rather than by the Rust library; other
//! transcendentals call small Rust functions registered with the JIT.
//!
//! Pointers to bf16 or f16 hold 2-byte elements that loads widen to f32 and stores round to
//! nearest, ties to even (the kernel IR's storage types): bf16 inline on the f32's bits
//! ([`Gen::store_elem`]), f16 through two small Rust functions (exact, subnormals included).
//!
//! The compiled function has the C signature `fn(args: *const u64, pid: *const i64, scratch: *mut u8)`:
//! `args[2i]` is parameter `i` (an address or an integer) and `args[2i + 1]` the element count of a
//! pointer parameter's buffer; `pid` holds the instance's grid coordinates. Every load and store is
//! bounds-checked against that count: an access outside it is skipped and recorded in the first
//! eight bytes of scratch (as 1 + the parameter index), which the launcher turns into an error —
//! so a wrong kernel can never touch memory it was not given. The check is made once per tile, in
//! a branch-free pass over the offsets of enabled elements; only if one is outside does the access
//! fall back to checking (and skipping) element by element.

use std::collections::HashMap;

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::{types, AbiParam, Block as ClBlock, FuncRef, InstBuilder, MemFlagsData, Type, Value as ClValue};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};

use crate::kir::{BinOp, Block, CmpOp, Const, DType, Op, Program, ReduceOp, Ty, UnOp, Value};

/// Why a program could not be compiled for the CPU.
#[derive(Debug, thiserror::Error)]
pub enum CodegenError {
    /// The program failed verification (a bug in hlac).
    #[error(transparent)]
    Invalid(#[from] crate::kir::verify::VerifyError),
    /// The program uses something the CPU back end does not implement.
    #[error("kernel `{kernel}`: {what} is not supported by the cpu back end")]
    Unsupported {
        /// The kernel.
        kernel: String,
        /// What.
        what: String,
    },
    /// Cranelift refused the generated code (a bug in hlac).
    #[error("this is a bug in hlac: Cranelift rejected kernel `{kernel}`: {message}")]
    Cranelift {
        /// The kernel.
        kernel: String,
        /// Cranelift's message.
        message: String,
    },
}

extern "C" fn hlac_expf(x: f32) -> f32 {
    x.exp()
}
extern "C" fn hlac_logf(x: f32) -> f32 {
    x.ln()
}
extern "C" fn hlac_log1pf(x: f32) -> f32 {
    x.ln_1p()
}
extern "C" fn hlac_tanhf(x: f32) -> f32 {
    x.tanh()
}
extern "C" fn hlac_sinf(x: f32) -> f32 {
    x.sin()
}
extern "C" fn hlac_cosf(x: f32) -> f32 {
    x.cos()
}
extern "C" fn hlac_powf(x: f32, y: f32) -> f32 {
    x.powf(y)
}

/// f32 → f16 bits, rounding to nearest, ties to even (subnormals, overflow to ±∞ and NaN as IEEE
/// 754 says). f16 stores call this rather than inlining the conversion: f16 is a GPU storage type,
/// on the CPU only the GPU check runs it, and a library call keeps every corner case exact.
extern "C" fn hlac_f32_to_f16(x: f32) -> u32 {
    u32::from(half::f16::from_f32(x).to_bits())
}
/// f16 bits (the low 16 bits of the argument) → f32, exactly.
extern "C" fn hlac_f16_to_f32(bits: u32) -> f32 {
    half::f16::from_bits(bits as u16).to_f32()
}

const UNARY_LIBM: [(&str, extern "C" fn(f32) -> f32); 6] = [
    ("hlac_expf", hlac_expf),
    ("hlac_logf", hlac_logf),
    ("hlac_log1pf", hlac_log1pf),
    ("hlac_tanhf", hlac_tanhf),
    ("hlac_sinf", hlac_sinf),
    ("hlac_cosf", hlac_cosf),
];

/// A JIT module holding compiled kernels.
pub struct Jit {
    module: JITModule,
    libm: HashMap<&'static str, FuncId>,
}

/// A compiled kernel: its entry point and scratch size.
pub struct Compiled {
    /// Address of the compiled function.
    pub entry: *const u8,
    /// Bytes of scratch each instance needs.
    pub scratch_bytes: usize,
}

impl Jit {
    /// A JIT for the host CPU.
    pub fn new() -> Result<Jit, CodegenError> {
        let fail = |message: String| CodegenError::Cranelift { kernel: String::new(), message };
        let mut flags = settings::builder();
        flags.set("use_colocated_libcalls", "false").map_err(|e| fail(e.to_string()))?;
        flags.set("is_pic", "false").map_err(|e| fail(e.to_string()))?;
        flags.set("opt_level", "speed").map_err(|e| fail(e.to_string()))?;
        let isa = cranelift_native::builder()
            .map_err(|e| fail(e.to_string()))?
            .finish(settings::Flags::new(flags))
            .map_err(|e| fail(e.to_string()))?;
        let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
        for (name, f) in UNARY_LIBM {
            builder.symbol(name, f as *const u8);
        }
        builder.symbol("hlac_powf", hlac_powf as *const u8);
        builder.symbol("hlac_f32_to_f16", hlac_f32_to_f16 as *const u8);
        builder.symbol("hlac_f16_to_f32", hlac_f16_to_f32 as *const u8);
        let mut module = JITModule::new(builder);
        let mut libm = HashMap::new();
        let f32_fns =
            UNARY_LIBM.iter().map(|(n, _)| (*n, vec![types::F32], types::F32)).chain([("hlac_powf", vec![types::F32; 2], types::F32)]);
        let conversions = [("hlac_f32_to_f16", vec![types::F32], types::I32), ("hlac_f16_to_f32", vec![types::I32], types::F32)];
        for (name, params, ret) in f32_fns.chain(conversions) {
            let mut sig = module.make_signature();
            for p in params {
                sig.params.push(AbiParam::new(p));
            }
            sig.returns.push(AbiParam::new(ret));
            let id = module.declare_function(name, Linkage::Import, &sig).map_err(|e| fail(e.to_string()))?;
            libm.insert(name, id);
        }
        Ok(Jit { module, libm })
    }

    /// Compiles one verified program.
    pub fn compile(&mut self, program: &Program) -> Result<Compiled, CodegenError> {
        crate::kir::verify(program)?;
        let fail = |message: String| CodegenError::Cranelift { kernel: program.name.clone(), message };
        let ptr = self.module.target_config().pointer_type();
        let mut sig = self.module.make_signature();
        for _ in 0..3 {
            sig.params.push(AbiParam::new(ptr));
        }
        let id = self.module.declare_anonymous_function(&sig).map_err(|e| fail(e.to_string()))?;
        let mut ctx = self.module.make_context();
        ctx.func.signature = sig;
        let mut fctx = FunctionBuilderContext::new();
        let scratch_bytes;
        {
            let mut fb = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let mut funcs = HashMap::new();
            for (name, fid) in &self.libm {
                funcs.insert(*name, self.module.declare_func_in_func(*fid, fb.func));
            }
            let entry = fb.create_block();
            fb.append_block_params_for_function_params(entry);
            fb.switch_to_block(entry);
            let params = fb.block_params(entry).to_vec();
            let mut g = Gen {
                p: program,
                fb,
                funcs,
                args: params[0],
                pid: params[1],
                scratch: params[2],
                slots: HashMap::new(),
                scalars: HashMap::new(),
                splats: HashMap::new(),
                layout: crate::kir::layout::plan(program),
            };
            g.block(&program.body)?;
            g.fb.ins().return_(&[]);
            g.fb.seal_all_blocks();
            // Vector reads of bool tiles fetch 8 bytes for 4 lanes, so the last tile may be read up to
            // 4 bytes past its end: pad the scratch so that stays inside it.
            // The first 64 bytes hold the out-of-bounds error word; 64 more past the last tile allow
            // a vector read of a bool tile to run 4 bytes over its end.
            scratch_bytes = 64 + g.layout.bytes as usize + 64;
            g.fb.finalize(self.module.target_config());
        }
        self.module.define_function(id, &mut ctx).map_err(|e| fail(format!("{e:?}")))?;
        self.module.clear_context(&mut ctx);
        self.module.finalize_definitions().map_err(|e| fail(e.to_string()))?;
        Ok(Compiled { entry: self.module.get_finalized_function(id), scratch_bytes })
    }
}

/// Elements of an f32 tile per vector instruction (Cranelift's x64 and aarch64 vectors are 128 bits).
const LANES: u64 = 4;

/// Computes one element of an elementwise result from its operands' elements.
type ElemFn<'f, G> = dyn FnMut(&mut G, &[ClValue]) -> Result<ClValue, CodegenError> + 'f;
/// The body of a loop nest: the flat index and the per-axis indices.
type NestFn<'f, G> = dyn FnMut(&mut G, ClValue, &[ClValue]) -> Result<(), CodegenError> + 'f;

/// The unchecked half of a load or store: (base address, flat index, element offset, mask element).
type FastAccessFn<'f, G> = dyn FnMut(&mut G, ClValue, ClValue, ClValue, Option<ClValue>) -> Result<(), CodegenError> + 'f;
/// The checked half: (flat index, element offset, mask element).
type SlowAccessFn<'f, G> = dyn FnMut(&mut G, ClValue, ClValue, Option<ClValue>) -> Result<(), CodegenError> + 'f;

/// A memory access through a pointer parameter.
#[derive(Clone, Copy)]
enum Access {
    /// A load, with the value to use where it is masked off or out of bounds.
    Load(ClValue),
    /// A store of this value.
    Store(ClValue),
}

/// How a scalar is held: an SSA value, or a variable (loop indices and carried scalars).
#[derive(Clone, Copy)]
enum Scalar {
    Val(ClValue),
    Var(Variable),
}

struct Gen<'a> {
    p: &'a Program,
    fb: FunctionBuilder<'a>,
    funcs: HashMap<&'static str, FuncRef>,
    args: ClValue,
    pid: ClValue,
    scratch: ClValue,
    /// Scratch offset of every tile.
    slots: HashMap<Value, u64>,
    scalars: HashMap<Value, Scalar>,
    /// Tiles all of whose elements are one scalar (broadcasts and reshapes of scalars): never
    /// materialised; readers splat the scalar instead.
    splats: HashMap<Value, ClValue>,
    layout: crate::kir::layout::Layout,
}

fn mem() -> MemFlagsData {
    MemFlagsData::trusted()
}

impl Gen<'_> {
    fn unsupported(&self, what: impl Into<String>) -> CodegenError {
        CodegenError::Unsupported { kernel: self.p.name.clone(), what: what.into() }
    }

    fn cl_type(&self, d: DType) -> Result<Type, CodegenError> {
        match d {
            DType::F32 => Ok(types::F32),
            DType::I64 => Ok(types::I64),
            DType::Bool => Ok(types::I8),
            other => Err(self.unsupported(format!("element type {}", other.name()))),
        }
    }

    fn ty(&self, v: Value) -> &Ty {
        self.p.ty(v)
    }

    /// Places a tile at its planned offset (after the 64-byte error word; see [`crate::kir::layout`],
    /// which reuses a dead tile's storage and aligns every tile to 64 bytes).
    fn alloc(&mut self, v: Value) -> u64 {
        let at = 64 + self.layout.offset(v);
        self.slots.insert(v, at);
        at
    }

    fn elem_bytes(&self, d: DType) -> i64 {
        match d {
            DType::Bool => 1,
            DType::I64 => 8,
            _ => 4,
        }
    }

    /// The element type in memory of pointer parameter `ptr` (the verifier guarantees it is one).
    fn mem_dtype(&self, ptr: u32) -> DType {
        match self.p.params.get(ptr as usize).map(|p| &p.kind) {
            Some(crate::kir::ParamKind::Ptr { dtype, .. }) => *dtype,
            _ => DType::F32,
        }
    }

    /// Loads the element of memory type `mem` at address `a` as a tile element: bf16 and f16
    /// widen to f32 exactly (bf16 is the top half of an f32's bits; f16 goes through
    /// `hlac_f16_to_f32`).
    fn load_elem(&mut self, mem: DType, a: ClValue) -> Result<ClValue, CodegenError> {
        Ok(match mem {
            DType::Bf16 => {
                let h = self.fb.ins().uload16(types::I32, MemFlagsData::new(), a, 0);
                let w = self.fb.ins().ishl_imm_u(h, 16);
                self.fb.ins().bitcast(types::F32, MemFlagsData::new(), w)
            }
            DType::F16 => {
                let h = self.fb.ins().uload16(types::I32, MemFlagsData::new(), a, 0);
                self.call("hlac_f16_to_f32", &[h])
            }
            _ => {
                let t = self.cl_type(mem)?;
                self.fb.ins().load(t, MemFlagsData::new(), a, 0)
            }
        })
    }

    /// Stores tile element `x` at address `a` as memory type `mem`. bf16 rounds to nearest, ties
    /// to even, on the f32's bits: adding 0x7FFF plus the lowest kept bit carries into the kept
    /// half exactly when the dropped half is above one half, or equal to it with an odd kept half
    /// (an overflow carries into the exponent and gives ±∞, as it should); NaN, which the carry
    /// could turn into ∞, keeps its sign and top payload bits with the quiet bit set, as
    /// `half::bf16::from_f32` does. f16 goes through `hlac_f32_to_f16`.
    fn store_elem(&mut self, mem: DType, x: ClValue, a: ClValue) -> Result<(), CodegenError> {
        match mem {
            DType::Bf16 => {
                let bits = self.fb.ins().bitcast(types::I32, MemFlagsData::new(), x);
                let hi = self.fb.ins().ushr_imm_u(bits, 16);
                let odd = self.fb.ins().band_imm_u(hi, 1);
                let bias = self.fb.ins().iadd_imm_u(odd, 0x7FFF);
                let rounded = self.fb.ins().iadd(bits, bias);
                let rounded = self.fb.ins().ushr_imm_u(rounded, 16);
                let quiet = self.fb.ins().bor_imm_u(hi, 0x40);
                let nan = self.fb.ins().fcmp(FloatCC::Unordered, x, x);
                let out = self.fb.ins().select(nan, quiet, rounded);
                self.fb.ins().istore16(MemFlagsData::new(), out, a, 0);
            }
            DType::F16 => {
                let bits = self.call("hlac_f32_to_f16", &[x]);
                self.fb.ins().istore16(MemFlagsData::new(), bits, a, 0);
            }
            _ => {
                self.fb.ins().store(MemFlagsData::new(), x, a, 0);
            }
        }
        Ok(())
    }

    /// Address of element `i` (an i64 value) of tile `v`.
    fn addr(&mut self, v: Value, i: ClValue) -> ClValue {
        let base = self.slots.get(&v).copied().unwrap_or(0) as i64;
        let size = self.elem_bytes(self.ty(v).dtype);
        let off = self.fb.ins().imul_imm_s(i, size);
        let off = self.fb.ins().iadd_imm_s(off, base);
        self.fb.ins().iadd(self.scratch, off)
    }

    fn read(&mut self, v: Value, i: ClValue) -> Result<ClValue, CodegenError> {
        if let Some(x) = self.uniform(v)? {
            return Ok(x);
        }
        let t = self.cl_type(self.ty(v).dtype)?;
        let a = self.addr(v, i);
        Ok(self.fb.ins().load(t, mem(), a, 0))
    }

    fn write(&mut self, v: Value, i: ClValue, x: ClValue) {
        let a = self.addr(v, i);
        self.fb.ins().store(mem(), x, a, 0);
    }

    /// The one value of every element of `v`, when it is a scalar or a splat.
    fn uniform(&mut self, v: Value) -> Result<Option<ClValue>, CodegenError> {
        if self.ty(v).is_scalar() {
            return self.scalar(v).map(Some);
        }
        Ok(self.splats.get(&v).copied())
    }

    /// The vector type holding 16 bytes of elements of `d`, and its lane count.
    fn vec_type(&self, d: DType) -> Result<(Type, u64), CodegenError> {
        match d {
            DType::F32 => Ok((types::F32X4, 4)),
            DType::I64 => Ok((types::I64X2, 2)),
            DType::Bool => Ok((types::I8X16, 16)),
            other => Err(self.unsupported(format!("element type {}", other.name()))),
        }
    }

    /// `LANES` consecutive elements of the f32 or bool tile `v` from flat index `i`, as an F32X4:
    /// f32 elements are loaded, scalars splatted, and bools become lane masks (all bits set where
    /// true) for `bitselect`.
    fn read_vec(&mut self, v: Value, i: ClValue) -> Result<ClValue, CodegenError> {
        let d = self.ty(v).dtype;
        let mask = match (d, self.uniform(v)?) {
            (DType::F32, Some(x)) => return Ok(self.fb.ins().splat(types::F32X4, x)),
            (DType::F32, None) => {
                let a = self.addr(v, i);
                return Ok(self.fb.ins().load(types::F32X4, mem(), a, 0));
            }
            (DType::Bool, Some(x)) => {
                let w = self.fb.ins().uextend(types::I32, x);
                let m = self.fb.ins().ineg(w);
                self.fb.ins().splat(types::I32X4, m)
            }
            (DType::Bool, None) => {
                // Reads 8 bytes for 4 lanes; the scratch is padded for the last tile.
                let a = self.addr(v, i);
                let b = self.fb.ins().uload8x8(mem(), a, 0);
                let w = self.fb.ins().uwiden_low(b);
                let z = self.fb.ins().iconst(types::I32, 0);
                let z = self.fb.ins().splat(types::I32X4, z);
                self.fb.ins().icmp(IntCC::NotEqual, w, z)
            }
            (other, _) => return Err(self.unsupported(format!("vector of {}", other.name()))),
        };
        Ok(self.fb.ins().bitcast(types::F32X4, MemFlagsData::new(), mask))
    }

    /// Stores an F32X4 as elements `i..i + LANES` of `v`.
    fn write_vec(&mut self, v: Value, i: ClValue, x: ClValue) {
        let a = self.addr(v, i);
        self.fb.ins().store(mem(), x, a, 0);
    }

    /// A float constant of type `t` (F32, or F32X4 splatted).
    fn fconst(&mut self, t: Type, c: f32) -> ClValue {
        let x = self.fb.ins().f32const(c);
        if t == types::F32 {
            x
        } else {
            self.fb.ins().splat(t, x)
        }
    }

    /// An i32 constant of type `t` (I32, or I32X4 splatted).
    fn iconst32(&mut self, t: Type, c: i32) -> ClValue {
        let x = self.fb.ins().iconst(types::I32, i64::from(c));
        if t == types::I32 {
            x
        } else {
            self.fb.ins().splat(t, x)
        }
    }

    /// Emits `body(i, vector)` over `0..n`: for `i` in steps of `lanes` with `vector` true while a
    /// whole vector fits, then one element at a time for the tail. Short runs are unrolled.
    fn strip(
        &mut self,
        n: u64,
        lanes: u64,
        body: &mut dyn FnMut(&mut Self, ClValue, bool) -> Result<(), CodegenError>,
    ) -> Result<(), CodegenError> {
        let main = n / lanes * lanes;
        if main / lanes <= 4 {
            for c in 0..main / lanes {
                let i = self.fb.ins().iconst(types::I64, (c * lanes) as i64);
                body(self, i, true)?;
            }
        } else {
            let lo = self.fb.ins().iconst(types::I64, 0);
            let hi = self.fb.ins().iconst(types::I64, main as i64);
            self.counted(lo, hi, lanes as i64, &mut |g, i| body(g, i, true))?;
        }
        for t in main..n {
            let i = self.fb.ins().iconst(types::I64, t as i64);
            body(self, i, false)?;
        }
        Ok(())
    }

    fn scalar(&mut self, v: Value) -> Result<ClValue, CodegenError> {
        match self.scalars.get(&v) {
            Some(Scalar::Val(x)) => Ok(*x),
            Some(Scalar::Var(var)) => Ok(self.fb.use_var(*var)),
            None => Err(CodegenError::Cranelift { kernel: self.p.name.clone(), message: format!("scalar {v} has no value") }),
        }
    }

    /// Emits `for i in 0..n { body(i) }` with `n` a compile-time count.
    fn repeat(&mut self, n: u64, mut body: impl FnMut(&mut Self, ClValue) -> Result<(), CodegenError>) -> Result<(), CodegenError> {
        let lo = self.fb.ins().iconst(types::I64, 0);
        let hi = self.fb.ins().iconst(types::I64, n as i64);
        self.counted(lo, hi, 1, &mut body)
    }

    /// Emits a counted loop from `lo` to `hi` (exclusive) with a constant step.
    fn counted(
        &mut self,
        lo: ClValue,
        hi: ClValue,
        step: i64,
        body: &mut dyn FnMut(&mut Self, ClValue) -> Result<(), CodegenError>,
    ) -> Result<(), CodegenError> {
        let header = self.fb.create_block();
        let inner = self.fb.create_block();
        let exit = self.fb.create_block();
        self.fb.append_block_param(header, types::I64);
        self.fb.ins().jump(header, &[lo.into()]);
        self.fb.switch_to_block(header);
        let i = self.fb.block_params(header)[0];
        let go = self.fb.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.fb.ins().brif(go, inner, &[], exit, &[]);
        self.fb.switch_to_block(inner);
        body(self, i)?;
        let next = self.fb.ins().iadd_imm_s(i, step);
        self.fb.ins().jump(header, &[next.into()]);
        self.fb.switch_to_block(exit);
        Ok(())
    }

    fn call(&mut self, name: &'static str, args: &[ClValue]) -> ClValue {
        let f = self.funcs[name];
        let call = self.fb.ins().call(f, args);
        self.fb.inst_results(call)[0]
    }

    fn block(&mut self, b: &Block) -> Result<(), CodegenError> {
        for inst in &b.insts {
            self.inst(inst)?;
        }
        Ok(())
    }

    fn unary(&mut self, op: UnOp, d: DType, x: ClValue) -> Result<ClValue, CodegenError> {
        Ok(match (op, d) {
            (UnOp::Neg, DType::I64) => self.fb.ins().ineg(x),
            (UnOp::Abs, DType::I64) => self.fb.ins().iabs(x),
            (UnOp::Not, DType::Bool) => {
                let one = self.fb.ins().iconst(types::I8, 1);
                self.fb.ins().bxor(x, one)
            }
            (_, DType::F32) => {
                // Every arm but the library calls is written for F32 and F32X4 alike.
                let t = self.fb.func.dfg.value_type(x);
                match op {
                    UnOp::Neg => self.fb.ins().fneg(x),
                    UnOp::Abs => self.fb.ins().fabs(x),
                    UnOp::Sqrt => self.fb.ins().sqrt(x),
                    UnOp::Rsqrt => {
                        let r = self.fb.ins().sqrt(x);
                        let one = self.fconst(t, 1.0);
                        self.fb.ins().fdiv(one, r)
                    }
                    UnOp::Exp => self.exp(x),
                    UnOp::Log => self.call("hlac_logf", &[x]),
                    UnOp::Tanh => self.call("hlac_tanhf", &[x]),
                    UnOp::Sin => self.call("hlac_sinf", &[x]),
                    UnOp::Cos => self.call("hlac_cosf", &[x]),
                    UnOp::Round => self.fb.ins().nearest(x),
                    UnOp::Sigmoid => {
                        let n = self.fb.ins().fneg(x);
                        let e = self.exp(n);
                        let one = self.fconst(t, 1.0);
                        let d = self.fb.ins().fadd(one, e);
                        self.fb.ins().fdiv(one, d)
                    }
                    UnOp::Silu => {
                        let n = self.fb.ins().fneg(x);
                        let e = self.exp(n);
                        let one = self.fconst(t, 1.0);
                        let d = self.fb.ins().fadd(one, e);
                        self.fb.ins().fdiv(x, d)
                    }
                    // log σ(x) = min(x, 0) − log1p(e^{−|x|}) and softplus(x) = max(x, 0) + log1p(e^{−|x|}):
                    // both exact and overflow-free for any x.
                    UnOp::LogSigmoid | UnOp::Softplus => {
                        let a = self.fb.ins().fabs(x);
                        let n = self.fb.ins().fneg(a);
                        let e = self.exp(n);
                        let l = self.call("hlac_log1pf", &[e]);
                        let zero = self.fb.ins().f32const(0.0);
                        if op == UnOp::LogSigmoid {
                            let m = self.fb.ins().fmin(x, zero);
                            self.fb.ins().fsub(m, l)
                        } else {
                            let m = self.fb.ins().fmax(x, zero);
                            self.fb.ins().fadd(m, l)
                        }
                    }
                    UnOp::Not => return Err(self.unsupported("`not` on floats")),
                }
            }
            _ => return Err(self.unsupported(format!("{op:?} on {}", d.name()))),
        })
    }

    /// Whether `unary` computes `op` on F32X4 lanes (no library call).
    fn unary_vectorises(op: UnOp) -> bool {
        matches!(op, UnOp::Neg | UnOp::Abs | UnOp::Sqrt | UnOp::Rsqrt | UnOp::Exp | UnOp::Sigmoid | UnOp::Silu)
    }

    /// eˣ for F32 or F32X4, inline: x = n·ln 2 + r with n = round(x / ln 2) and |r| ≤ ln 2 / 2
    /// (Cody–Waite, ln 2 in two parts so n·C1 is exact), eʳ by Cephes' degree-7 polynomial (under
    /// 2 ulp), then scaled by 2ⁿ as two exact powers 2^(n/2)·2^(n − n/2) so that results in the
    /// subnormal range round once and overflow gives ∞. x is clamped to [−104, 89], beyond which
    /// the result is 0 or ∞ anyway; NaN stays NaN (Cranelift's fmin/fmax propagate it).
    fn exp(&mut self, x: ClValue) -> ClValue {
        let t = self.fb.func.dfg.value_type(x);
        let it = if t == types::F32 { types::I32 } else { types::I32X4 };
        let lo = self.fconst(t, -104.0);
        let hi = self.fconst(t, 89.0);
        let x = self.fb.ins().fmax(x, lo);
        let x = self.fb.ins().fmin(x, hi);
        // Adding 1.5·2²³ rounds x / ln 2 to the nearest integer, which lands in the low mantissa bits.
        let log2e = self.fconst(t, std::f32::consts::LOG2_E);
        let shifter = self.fconst(t, 12_582_912.0);
        let y = self.fb.ins().fmul(x, log2e);
        let y = self.fb.ins().fadd(y, shifter);
        let nf = self.fb.ins().fsub(y, shifter);
        let bits = self.fb.ins().bitcast(it, MemFlagsData::new(), y);
        let shifter_bits = self.iconst32(it, 0x4B40_0000);
        let n = self.fb.ins().isub(bits, shifter_bits);
        let c1 = self.fconst(t, 0.693_359_4); // 355/512 as an f32
        let c2 = self.fconst(t, -2.121_944_4e-4);
        let r = self.fb.ins().fmul(nf, c1);
        let r = self.fb.ins().fsub(x, r);
        let r2 = self.fb.ins().fmul(nf, c2);
        let r = self.fb.ins().fsub(r, r2);
        let mut p = self.fconst(t, 1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            let k = self.fconst(t, c);
            p = self.fb.ins().fmul(p, r);
            p = self.fb.ins().fadd(p, k);
        }
        let rr = self.fb.ins().fmul(r, r);
        let p = self.fb.ins().fmul(p, rr);
        let p = self.fb.ins().fadd(p, r);
        let one = self.fconst(t, 1.0);
        let p = self.fb.ins().fadd(p, one);
        let n1 = self.fb.ins().sshr_imm_u(n, 1);
        let n2 = self.fb.ins().isub(n, n1);
        let mut out = p;
        for k in [n1, n2] {
            let bias = self.iconst32(it, 127);
            let e = self.fb.ins().iadd(k, bias);
            let e = self.fb.ins().ishl_imm_u(e, 23);
            let scale = self.fb.ins().bitcast(t, MemFlagsData::new(), e);
            out = self.fb.ins().fmul(out, scale);
        }
        out
    }

    fn binary(&mut self, op: BinOp, d: DType, a: ClValue, b: ClValue) -> Result<ClValue, CodegenError> {
        let i = self.fb.ins();
        Ok(match (d, op) {
            (DType::F32, BinOp::Add) => i.fadd(a, b),
            (DType::F32, BinOp::Sub) => i.fsub(a, b),
            (DType::F32, BinOp::Mul) => i.fmul(a, b),
            (DType::F32, BinOp::Div) => i.fdiv(a, b),
            (DType::F32, BinOp::Max) => i.fmax(a, b),
            (DType::F32, BinOp::Min) => i.fmin(a, b),
            (DType::F32, BinOp::Pow) => self.call("hlac_powf", &[a, b]),
            (DType::I64, BinOp::Add) => i.iadd(a, b),
            (DType::I64, BinOp::Sub) => i.isub(a, b),
            (DType::I64, BinOp::Mul) => i.imul(a, b),
            (DType::I64, BinOp::Div) => i.sdiv(a, b),
            (DType::I64, BinOp::Rem) => i.srem(a, b),
            (DType::I64, BinOp::Max) => i.smax(a, b),
            (DType::I64, BinOp::Min) => i.smin(a, b),
            (DType::Bool, BinOp::And) => i.band(a, b),
            (DType::Bool, BinOp::Or) => i.bor(a, b),
            _ => return Err(self.unsupported(format!("{op:?} on {}", d.name()))),
        })
    }

    fn compare(&mut self, op: CmpOp, d: DType, a: ClValue, b: ClValue) -> ClValue {
        if d == DType::F32 {
            let cc = match op {
                CmpOp::Lt => FloatCC::LessThan,
                CmpOp::Le => FloatCC::LessThanOrEqual,
                CmpOp::Gt => FloatCC::GreaterThan,
                CmpOp::Ge => FloatCC::GreaterThanOrEqual,
                CmpOp::Eq => FloatCC::Equal,
                CmpOp::Ne => FloatCC::NotEqual,
            };
            self.fb.ins().fcmp(cc, a, b)
        } else {
            let cc = match op {
                CmpOp::Lt => IntCC::SignedLessThan,
                CmpOp::Le => IntCC::SignedLessThanOrEqual,
                CmpOp::Gt => IntCC::SignedGreaterThan,
                CmpOp::Ge => IntCC::SignedGreaterThanOrEqual,
                CmpOp::Eq => IntCC::Equal,
                CmpOp::Ne => IntCC::NotEqual,
            };
            self.fb.ins().icmp(cc, a, b)
        }
    }

    fn convert(&mut self, x: ClValue, from: DType, to: DType) -> Result<ClValue, CodegenError> {
        let i = self.fb.ins();
        Ok(match (from, to) {
            (a, b) if a == b => x,
            (DType::I64, DType::F32) => i.fcvt_from_sint(types::F32, x),
            (DType::F32, DType::I64) => i.fcvt_to_sint_sat(types::I64, x),
            (DType::Bool, DType::I64) => i.uextend(types::I64, x),
            (DType::Bool, DType::F32) => {
                let w = i.uextend(types::I64, x);
                self.fb.ins().fcvt_from_sint(types::F32, w)
            }
            (DType::I64, DType::Bool) => i.icmp_imm_s(IntCC::NotEqual, x, 0),
            (DType::F32, DType::Bool) => {
                let z = i.f32const(0.0);
                self.fb.ins().fcmp(FloatCC::NotEqual, x, z)
            }
            _ => return Err(self.unsupported(format!("cast from {} to {}", from.name(), to.name()))),
        })
    }

    /// Emits an elementwise operation over `out` whose element `i` is `f(operands at i)`. With
    /// `vf` (the same computation on F32X4 lanes, operands as `read_vec` gives them), whole
    /// vectors go through `vf` and only a tail of fewer than `LANES` elements through `f`.
    fn elementwise(
        &mut self,
        out: Value,
        operands: &[Value],
        f: &mut ElemFn<'_, Self>,
        vf: Option<&mut ElemFn<'_, Self>>,
    ) -> Result<(), CodegenError> {
        if self.ty(out).is_scalar() {
            let xs: Vec<ClValue> = operands.iter().map(|o| self.scalar(*o)).collect::<Result<_, _>>()?;
            let r = f(self, &xs)?;
            self.scalars.insert(out, Scalar::Val(r));
            return Ok(());
        }
        self.alloc(out);
        let n = self.ty(out).numel();
        match vf {
            Some(vf) => self.strip(n, LANES, &mut |g, i, vector| {
                if vector {
                    let xs: Vec<ClValue> = operands.iter().map(|o| g.read_vec(*o, i)).collect::<Result<_, _>>()?;
                    let r = vf(g, &xs)?;
                    g.write_vec(out, i, r);
                } else {
                    let xs: Vec<ClValue> = operands.iter().map(|o| g.read(*o, i)).collect::<Result<_, _>>()?;
                    let r = f(g, &xs)?;
                    g.write(out, i, r);
                }
                Ok(())
            }),
            None => self.repeat(n, |g, i| {
                let xs: Vec<ClValue> = operands.iter().map(|o| g.read(*o, i)).collect::<Result<_, _>>()?;
                let r = f(g, &xs)?;
                g.write(out, i, r);
                Ok(())
            }),
        }
    }

    /// Whether the operands and result of an elementwise op are all f32 (or bool, for a select's
    /// condition), so that it can run on F32X4 lanes.
    fn f32_lanes(&self, out: Value, operands: &[Value]) -> bool {
        self.ty(out).dtype == DType::F32
            && !self.ty(out).is_scalar()
            && operands.iter().all(|o| matches!(self.ty(*o).dtype, DType::F32 | DType::Bool))
    }

    /// Copies tile `from` into the storage of tile `to` (same element count).
    fn copy(&mut self, from: Value, to: Value) -> Result<(), CodegenError> {
        if !self.splats.contains_key(&from) && self.slots.get(&from) == self.slots.get(&to) {
            return Ok(());
        }
        let n = self.ty(to).numel();
        let zero = self.fb.ins().iconst(types::I64, 0);
        match self.uniform(from)? {
            Some(x) => self.fill_row(to, zero, x, n),
            None => self.copy_row(to, zero, from, zero, n),
        }
    }

    /// Copies `n` elements of tile `src` from flat index `si` to tile `dst` at flat index `di`
    /// (same element type), 16 bytes at a time.
    fn copy_row(&mut self, dst: Value, di: ClValue, src: Value, si: ClValue, n: u64) -> Result<(), CodegenError> {
        let d = self.ty(dst).dtype;
        let t = self.cl_type(d)?;
        let (vt, lanes) = self.vec_type(d)?;
        let from = self.addr(src, si);
        let to = self.addr(dst, di);
        let size = self.elem_bytes(d);
        self.strip(n, lanes, &mut |g, i, vector| {
            let off = g.fb.ins().imul_imm_s(i, size);
            let a = g.fb.ins().iadd(from, off);
            let b = g.fb.ins().iadd(to, off);
            let x = g.fb.ins().load(if vector { vt } else { t }, mem(), a, 0);
            g.fb.ins().store(mem(), x, b, 0);
            Ok(())
        })
    }

    /// Sets `n` elements of tile `dst` from flat index `di` to the scalar `x`, 16 bytes at a time.
    fn fill_row(&mut self, dst: Value, di: ClValue, x: ClValue, n: u64) -> Result<(), CodegenError> {
        let d = self.ty(dst).dtype;
        let (vt, lanes) = self.vec_type(d)?;
        let to = self.addr(dst, di);
        let size = self.elem_bytes(d);
        let xv = self.fb.ins().splat(vt, x);
        self.strip(n, lanes, &mut |g, i, vector| {
            let off = g.fb.ins().imul_imm_s(i, size);
            let b = g.fb.ins().iadd(to, off);
            g.fb.ins().store(mem(), if vector { xv } else { x }, b, 0);
            Ok(())
        })
    }
    /// Emits nested loops over `shape`, calling `body` with the flat index and the per-axis indices.
    fn nest(&mut self, shape: &[u32], body: &mut NestFn<'_, Self>) -> Result<(), CodegenError> {
        self.nest_from(shape, &mut Vec::new(), body)
    }

    fn nest_from(&mut self, shape: &[u32], idx: &mut Vec<ClValue>, body: &mut NestFn<'_, Self>) -> Result<(), CodegenError> {
        if idx.len() == shape.len() {
            let strides = crate::kir::strides(shape);
            let mut flat = self.fb.ins().iconst(types::I64, 0);
            for (k, i) in idx.iter().enumerate() {
                let t = self.fb.ins().imul_imm_s(*i, strides[k]);
                flat = self.fb.ins().iadd(flat, t);
            }
            let ids = idx.clone();
            return body(self, flat, &ids);
        }
        let n = shape[idx.len()];
        self.repeat(u64::from(n), |g, i| {
            idx.push(i);
            let r = g.nest_from(shape, idx, body);
            idx.pop();
            r
        })
    }

    fn inst(&mut self, inst: &crate::kir::Inst) -> Result<(), CodegenError> {
        let out = inst.results.first().copied();
        let res = || out.ok_or_else(|| CodegenError::Unsupported { kernel: String::new(), what: "an instruction without a result".into() });
        match &inst.op {
            Op::ProgramId(a) => {
                let x = self.fb.ins().load(types::I64, mem(), self.pid, i32::from(*a) * 8);
                self.scalars.insert(res()?, Scalar::Val(x));
            }
            Op::Param(i) => {
                let x = self.fb.ins().load(types::I64, mem(), self.args, (*i as i32) * 16);
                self.scalars.insert(res()?, Scalar::Val(x));
            }
            Op::Const(c) => {
                let x = match c {
                    Const::Float(f) => self.fb.ins().f32const(*f as f32),
                    Const::Int(i) => self.fb.ins().iconst(types::I64, *i),
                    Const::Bool(b) => self.fb.ins().iconst(types::I8, i64::from(*b)),
                };
                self.scalars.insert(res()?, Scalar::Val(x));
            }
            Op::Table(xs) => {
                let out = res()?;
                self.alloc(out);
                // Unrolled stores: tables are short (a head's worth of channels).
                for (i, x) in xs.iter().enumerate() {
                    let at = self.fb.ins().iconst(types::I64, i as i64);
                    let v = self.fb.ins().f32const(*x as f32);
                    self.write(out, at, v);
                }
            }
            Op::Iota(n) => {
                let out = res()?;
                self.alloc(out);
                self.repeat(u64::from(*n), |g, i| {
                    g.write(out, i, i);
                    Ok(())
                })?;
            }
            Op::Unary(op, a) => {
                let d = self.ty(*a).dtype;
                let (op, a) = (*op, *a);
                let out = res()?;
                let mut vf = |g: &mut Self, x: &[ClValue]| g.unary(op, d, x[0]);
                let lanes = Self::unary_vectorises(op) && self.f32_lanes(out, &[a]);
                self.elementwise(out, &[a], &mut |g, x| g.unary(op, d, x[0]), lanes.then_some(&mut vf as &mut ElemFn<'_, Self>))?;
            }
            Op::Binary(op, a, b) => {
                let d = self.ty(*a).dtype;
                let op = *op;
                let out = res()?;
                let mut vf = |g: &mut Self, x: &[ClValue]| g.binary(op, d, x[0], x[1]);
                let arith = matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Max | BinOp::Min);
                let lanes = arith && self.f32_lanes(out, &[*a, *b]);
                self.elementwise(
                    out,
                    &[*a, *b],
                    &mut |g, x| g.binary(op, d, x[0], x[1]),
                    lanes.then_some(&mut vf as &mut ElemFn<'_, Self>),
                )?;
            }
            Op::Cmp(op, a, b) => {
                let d = self.ty(*a).dtype;
                let op = *op;
                self.elementwise(res()?, &[*a, *b], &mut |g, x| Ok(g.compare(op, d, x[0], x[1])), None)?;
            }
            Op::Select { cond, then, otherwise } => {
                let out = res()?;
                let ops = [*cond, *then, *otherwise];
                // On lanes the condition is a mask with every bit of a true lane set.
                let mut vf = |g: &mut Self, x: &[ClValue]| Ok(g.fb.ins().bitselect(x[0], x[1], x[2]));
                let lanes = self.f32_lanes(out, &ops);
                self.elementwise(
                    out,
                    &ops,
                    &mut |g, x| Ok(g.fb.ins().select(x[0], x[1], x[2])),
                    lanes.then_some(&mut vf as &mut ElemFn<'_, Self>),
                )?;
            }
            Op::Cast(a, to) => {
                let from = self.ty(*a).dtype;
                let to = *to;
                self.elementwise(res()?, &[*a], &mut |g, x| g.convert(x[0], from, to), None)?;
            }
            Op::Reshape(a) => {
                let out = res()?;
                if let (false, Some(x)) = (self.ty(out).is_scalar(), self.uniform(*a)?) {
                    // A scalar reshaped to [1] or [1, 1], or a reshaped splat.
                    self.splats.insert(out, x);
                } else if self.ty(out).is_scalar() {
                    let zero = self.fb.ins().iconst(types::I64, 0);
                    let x = self.read(*a, zero)?;
                    self.scalars.insert(out, Scalar::Val(x));
                } else {
                    let at = self.slots.get(a).copied().unwrap_or(0);
                    self.slots.insert(out, at);
                }
            }
            Op::Broadcast(a) => {
                let out = res()?;
                let a = *a;
                if let Some(x) = self.uniform(a)? {
                    self.splats.insert(out, x);
                    return Ok(());
                }
                self.alloc(out);
                let oshape = self.ty(out).shape.clone();
                let ishape = self.ty(a).shape.clone();
                let istr = crate::kir::strides(&ishape);
                let last = oshape.len() - 1;
                let row = u64::from(oshape[last]);
                // Row by row along the last axis: copied when `a` has that axis, else filled with
                // one element.
                self.nest(&oshape[..last], &mut |g, flat, idx| {
                    let mut src = g.fb.ins().iconst(types::I64, 0);
                    for (k, i) in idx.iter().enumerate() {
                        if ishape[k] != 1 {
                            let t = g.fb.ins().imul_imm_s(*i, istr[k]);
                            src = g.fb.ins().iadd(src, t);
                        }
                    }
                    let dst = g.fb.ins().imul_imm_s(flat, row as i64);
                    if ishape[last] == 1 {
                        let x = g.read(a, src)?;
                        g.fill_row(out, dst, x, row)
                    } else {
                        g.copy_row(out, dst, a, src, row)
                    }
                })?;
            }
            Op::Transpose(a) => {
                let out = res()?;
                let a = *a;
                self.alloc(out);
                let oshape = self.ty(out).shape.clone();
                let rows_in = i64::from(oshape[0]);
                self.nest(&oshape, &mut |g, flat, idx| {
                    // out[i, j] = a[j, i]; a has shape [oshape[1], oshape[0]].
                    let t = g.fb.ins().imul_imm_s(idx[1], rows_in);
                    let src = g.fb.ins().iadd(t, idx[0]);
                    let x = g.read(a, src)?;
                    g.write(out, flat, x);
                    Ok(())
                })?;
            }
            Op::Load { ptr, offsets, mask, other } => {
                let out = res()?;
                let d = self.ty(out).dtype;
                let t = self.cl_type(d)?;
                let (offsets, mask, other, ptr) = (*offsets, *mask, *other, *ptr);
                let mem = self.mem_dtype(ptr);
                self.alloc(out);
                let n = self.ty(out).numel();
                let fallback = |g: &mut Self| match d {
                    DType::F32 => g.fb.ins().f32const(other as f32),
                    _ => g.fb.ins().iconst(t, other as i64),
                };
                self.checked_access(
                    ptr,
                    offsets,
                    mask,
                    n,
                    &mut |g, base, i, off, enabled| {
                        // Masked-off elements read element 0 (the buffer is not empty on this path)
                        // and are then replaced by the fallback.
                        let off = match enabled {
                            Some(m) => {
                                let zero = g.fb.ins().iconst(types::I64, 0);
                                g.fb.ins().select(m, off, zero)
                            }
                            None => off,
                        };
                        let b = g.fb.ins().imul_imm_s(off, i64::from(mem.bytes()));
                        let a = g.fb.ins().iadd(base, b);
                        let x = g.load_elem(mem, a)?;
                        let x = match enabled {
                            Some(m) => {
                                let f = fallback(g);
                                g.fb.ins().select(m, x, f)
                            }
                            None => x,
                        };
                        g.write(out, i, x);
                        Ok(())
                    },
                    &mut |g, i, off, enabled| {
                        let f = fallback(g);
                        if let Some(x) = g.guarded(ptr, off, enabled, d, Access::Load(f))? {
                            g.write(out, i, x);
                        }
                        Ok(())
                    },
                )?;
            }
            Op::Store { ptr, offsets, value, mask } => {
                let d = self.ty(*value).dtype;
                self.cl_type(d)?;
                let (offsets, mask, value, ptr) = (*offsets, *mask, *value, *ptr);
                let mem = self.mem_dtype(ptr);
                let n = self.ty(value).numel();
                self.checked_access(
                    ptr,
                    offsets,
                    mask,
                    n,
                    &mut |g, base, i, off, enabled| {
                        let x = g.read(value, i)?;
                        let b = g.fb.ins().imul_imm_s(off, i64::from(mem.bytes()));
                        let a = g.fb.ins().iadd(base, b);
                        match enabled {
                            Some(m) => {
                                let yes = g.fb.create_block();
                                let next = g.fb.create_block();
                                g.fb.ins().brif(m, yes, &[], next, &[]);
                                g.fb.switch_to_block(yes);
                                g.store_elem(mem, x, a)?;
                                g.fb.ins().jump(next, &[]);
                                g.fb.switch_to_block(next);
                            }
                            None => g.store_elem(mem, x, a)?,
                        }
                        Ok(())
                    },
                    &mut |g, i, off, enabled| {
                        let x = g.read(value, i)?;
                        g.guarded(ptr, off, enabled, d, Access::Store(x))?;
                        Ok(())
                    },
                )?;
            }
            Op::Reduce(op, a, axis) => self.reduce(res()?, *op, *a, *axis)?,
            Op::Scan { value, axis, reverse, decay } => self.scan(res()?, *value, *axis, *reverse, *decay)?,
            Op::Dot(a, b) => self.dot(res()?, *a, *b)?,
            Op::TriInv(a) => self.tri_inv(res()?, *a)?,
            Op::For { lo, hi, step, init, body } => self.for_loop(&inst.results, *lo, *hi, *step, init, body)?,
            Op::Yield(_) => {}
        }
        Ok(())
    }

    /// A load or store of `n` elements through pointer parameter `ptr` at `offsets` where `mask`
    /// holds. A first, branch-free pass checks every enabled offset against the buffer's length;
    /// when all are inside (and, with a mask, the buffer is not empty), `fast(base, i, offset, mask
    /// element)` does element `i` with no further checks. Otherwise `slow(i, offset, mask element)`
    /// does every element through `guarded`, which skips and records out-of-bounds accesses exactly
    /// as documented above.
    fn checked_access(
        &mut self,
        ptr: u32,
        offsets: Value,
        mask: Option<Value>,
        n: u64,
        fast: &mut FastAccessFn<'_, Self>,
        slow: &mut SlowAccessFn<'_, Self>,
    ) -> Result<(), CodegenError> {
        let base = self.fb.ins().load(types::I64, mem(), self.args, (ptr as i32) * 16);
        let len = self.fb.ins().load(types::I64, mem(), self.args, (ptr as i32) * 16 + 8);
        let bad = self.fb.declare_var(types::I8);
        let none = self.fb.ins().iconst(types::I8, 0);
        self.fb.def_var(bad, none);
        self.repeat(n, |g, i| {
            let off = g.read(offsets, i)?;
            // Unsigned comparison: a negative offset is as out of bounds as one past the end.
            let outside = g.fb.ins().icmp(IntCC::UnsignedGreaterThanOrEqual, off, len);
            let outside = match mask {
                Some(m) => {
                    let m = g.read(m, i)?;
                    g.fb.ins().band(outside, m)
                }
                None => outside,
            };
            let cur = g.fb.use_var(bad);
            let nv = g.fb.ins().bor(cur, outside);
            g.fb.def_var(bad, nv);
            Ok(())
        })?;
        let bad = self.fb.use_var(bad);
        let ok = self.fb.ins().icmp_imm_s(IntCC::Equal, bad, 0);
        let ok = if mask.is_some() {
            let nonempty = self.fb.ins().icmp_imm_s(IntCC::NotEqual, len, 0);
            self.fb.ins().band(ok, nonempty)
        } else {
            ok
        };
        let fast_block = self.fb.create_block();
        let slow_block = self.fb.create_block();
        let done = self.fb.create_block();
        self.fb.ins().brif(ok, fast_block, &[], slow_block, &[]);
        self.fb.switch_to_block(fast_block);
        self.repeat(n, |g, i| {
            let off = g.read(offsets, i)?;
            let enabled = match mask {
                Some(m) => Some(g.read(m, i)?),
                None => None,
            };
            fast(g, base, i, off, enabled)
        })?;
        self.fb.ins().jump(done, &[]);
        self.fb.switch_to_block(slow_block);
        self.repeat(n, |g, i| {
            let off = g.read(offsets, i)?;
            let enabled = match mask {
                Some(m) => Some(g.read(m, i)?),
                None => None,
            };
            slow(g, i, off, enabled)
        })?;
        self.fb.ins().jump(done, &[]);
        self.fb.switch_to_block(done);
        Ok(())
    }

    /// A bounds-checked access to element `off` of pointer parameter `ptr`, done only where
    /// `enabled` (a mask element) holds. Loads return the element, or the fallback where masked off
    /// or out of bounds; an out-of-bounds access is recorded in the scratch error word.
    fn guarded(
        &mut self,
        ptr: u32,
        off: ClValue,
        enabled: Option<ClValue>,
        d: DType,
        access: Access,
    ) -> Result<Option<ClValue>, CodegenError> {
        let t = self.cl_type(d)?;
        let stored = self.mem_dtype(ptr);
        let size = i64::from(stored.bytes());
        let base = self.fb.ins().load(types::I64, mem(), self.args, (ptr as i32) * 16);
        let len = self.fb.ins().load(types::I64, mem(), self.args, (ptr as i32) * 16 + 8);
        let join = self.fb.create_block();
        let check = self.fb.create_block();
        let ok = self.fb.create_block();
        let oob = self.fb.create_block();
        if let Access::Load(_) = access {
            self.fb.append_block_param(join, t);
        }
        let fallback: Vec<cranelift_codegen::ir::BlockArg> = match access {
            Access::Load(f) => vec![f.into()],
            Access::Store(_) => Vec::new(),
        };
        match enabled {
            Some(m) => {
                self.fb.ins().brif(m, check, &[], join, &fallback);
            }
            None => {
                self.fb.ins().jump(check, &[]);
            }
        }
        self.fb.switch_to_block(check);
        // Unsigned comparison: a negative offset is as out of bounds as one past the end.
        let inside = self.fb.ins().icmp(IntCC::UnsignedLessThan, off, len);
        self.fb.ins().brif(inside, ok, &[], oob, &[]);
        self.fb.switch_to_block(oob);
        let code = self.fb.ins().iconst(types::I64, i64::from(ptr) + 1);
        self.fb.ins().store(mem(), code, self.scratch, 0);
        self.fb.ins().jump(join, &fallback);
        self.fb.switch_to_block(ok);
        let b = self.fb.ins().imul_imm_s(off, size);
        let a = self.fb.ins().iadd(base, b);
        match access {
            Access::Load(_) => {
                let x = self.load_elem(stored, a)?;
                self.fb.ins().jump(join, &[x.into()]);
            }
            Access::Store(x) => {
                self.store_elem(stored, x, a)?;
                self.fb.ins().jump(join, &[]);
            }
        }
        self.fb.switch_to_block(join);
        Ok(match access {
            Access::Load(_) => Some(self.fb.block_params(join)[0]),
            Access::Store(_) => None,
        })
    }

    fn zero(&mut self, d: DType, op: ReduceOp) -> Result<ClValue, CodegenError> {
        Ok(match (d, op) {
            (DType::F32, ReduceOp::Sum) => self.fb.ins().f32const(0.0),
            (DType::F32, ReduceOp::Max) => self.fb.ins().f32const(f32::NEG_INFINITY),
            (DType::F32, ReduceOp::Min) => self.fb.ins().f32const(f32::INFINITY),
            (DType::I64, ReduceOp::Sum) => self.fb.ins().iconst(types::I64, 0),
            (DType::I64, ReduceOp::Max) => self.fb.ins().iconst(types::I64, i64::MIN),
            (DType::I64, ReduceOp::Min) => self.fb.ins().iconst(types::I64, i64::MAX),
            _ => return Err(self.unsupported(format!("reduction over {}", d.name()))),
        })
    }

    fn combine(&mut self, d: DType, op: ReduceOp, a: ClValue, b: ClValue) -> Result<ClValue, CodegenError> {
        let bop = match op {
            ReduceOp::Sum => BinOp::Add,
            ReduceOp::Max => BinOp::Max,
            ReduceOp::Min => BinOp::Min,
        };
        self.binary(bop, d, a, b)
    }
    fn reduce(&mut self, out: Value, op: ReduceOp, a: Value, axis: u8) -> Result<(), CodegenError> {
        let d = self.ty(a).dtype;
        let t = self.cl_type(d)?;
        let (outer, extent, inner) = crate::kir::split(&self.ty(a).shape.clone(), axis);
        let scalar_out = self.ty(out).is_scalar();
        if !scalar_out {
            self.alloc(out);
        }
        if d == DType::F32 && inner % LANES == 0 {
            // LANES neighbouring outputs at a time, each still combined in order along the axis.
            let acc = self.fb.declare_var(types::F32X4);
            return self.repeat(outer, |g, o| {
                g.strip(inner, LANES, &mut |g, n, _| {
                    let z = g.zero(d, op)?;
                    let z = g.fb.ins().splat(types::F32X4, z);
                    g.fb.def_var(acc, z);
                    g.repeat(extent, |g, e| {
                        let t1 = g.fb.ins().imul_imm_s(o, extent as i64);
                        let t2 = g.fb.ins().iadd(t1, e);
                        let t3 = g.fb.ins().imul_imm_s(t2, inner as i64);
                        let idx = g.fb.ins().iadd(t3, n);
                        let x = g.read_vec(a, idx)?;
                        let cur = g.fb.use_var(acc);
                        let nv = g.combine(d, op, cur, x)?;
                        g.fb.def_var(acc, nv);
                        Ok(())
                    })?;
                    let t1 = g.fb.ins().imul_imm_s(o, inner as i64);
                    let idx = g.fb.ins().iadd(t1, n);
                    let v = g.fb.use_var(acc);
                    g.write_vec(out, idx, v);
                    Ok(())
                })
            });
        }
        if d == DType::F32 && op != ReduceOp::Sum && inner == 1 && extent % LANES == 0 && extent >= 2 * LANES {
            // Along a contiguous axis: lane l combines elements l, l + 4, …, and the four lane
            // results are combined pairwise at the end, which does not change a max or a min. Sums
            // stay in order: reassociating them moves ill-conditioned results (extreme gates) past
            // the kernel tests' tolerances.
            let acc = self.fb.declare_var(types::F32X4);
            let result = self.fb.declare_var(types::F32);
            self.repeat(outer, |g, o| {
                let z = g.zero(d, op)?;
                let z = g.fb.ins().splat(types::F32X4, z);
                g.fb.def_var(acc, z);
                let row = g.fb.ins().imul_imm_s(o, extent as i64);
                g.strip(extent, LANES, &mut |g, e, _| {
                    let idx = g.fb.ins().iadd(row, e);
                    let x = g.read_vec(a, idx)?;
                    let cur = g.fb.use_var(acc);
                    let nv = g.combine(d, op, cur, x)?;
                    g.fb.def_var(acc, nv);
                    Ok(())
                })?;
                let v = g.fb.use_var(acc);
                let l: Vec<ClValue> = (0..4u8).map(|k| g.fb.ins().extractlane(v, k)).collect();
                let lo = g.combine(d, op, l[0], l[1])?;
                let hi = g.combine(d, op, l[2], l[3])?;
                let r = g.combine(d, op, lo, hi)?;
                if scalar_out {
                    g.fb.def_var(result, r);
                } else {
                    g.write(out, o, r);
                }
                Ok(())
            })?;
            if scalar_out {
                let v = self.fb.use_var(result);
                self.scalars.insert(out, Scalar::Val(v));
            }
            return Ok(());
        }
        let acc = self.fb.declare_var(t);
        self.repeat(outer, |g, o| {
            g.repeat(inner, |g, n| {
                let z = g.zero(d, op)?;
                g.fb.def_var(acc, z);
                g.repeat(extent, |g, e| {
                    // index = (o * extent + e) * inner + n
                    let t1 = g.fb.ins().imul_imm_s(o, extent as i64);
                    let t2 = g.fb.ins().iadd(t1, e);
                    let t3 = g.fb.ins().imul_imm_s(t2, inner as i64);
                    let idx = g.fb.ins().iadd(t3, n);
                    let x = g.read(a, idx)?;
                    let cur = g.fb.use_var(acc);
                    let nv = g.combine(d, op, cur, x)?;
                    g.fb.def_var(acc, nv);
                    Ok(())
                })?;
                if !scalar_out {
                    let t1 = g.fb.ins().imul_imm_s(o, inner as i64);
                    let idx = g.fb.ins().iadd(t1, n);
                    let v = g.fb.use_var(acc);
                    g.write(out, idx, v);
                }
                Ok(())
            })
        })?;
        if scalar_out {
            let v = self.fb.use_var(acc);
            self.scalars.insert(out, Scalar::Val(v));
        }
        Ok(())
    }

    fn scan(&mut self, out: Value, a: Value, axis: u8, reverse: bool, decay: Option<Value>) -> Result<(), CodegenError> {
        let (outer, extent, inner) = crate::kir::split(&self.ty(a).shape.clone(), axis);
        self.alloc(out);
        // LANES neighbouring columns at a time while they fill whole vectors (the same sums in the
        // same order as one at a time).
        let acc_vec = self.fb.declare_var(types::F32X4);
        let acc_one = self.fb.declare_var(types::F32);
        self.repeat(outer, |g, o| {
            g.strip(inner, LANES, &mut |g, n, vector| {
                let acc = if vector { acc_vec } else { acc_one };
                let z = g.fconst(if vector { types::F32X4 } else { types::F32 }, 0.0);
                g.fb.def_var(acc, z);
                g.repeat(extent, |g, e| {
                    let last = g.fb.ins().iconst(types::I64, extent as i64 - 1);
                    let k = if reverse { g.fb.ins().isub(last, e) } else { e };
                    let at = |g: &mut Self, k: ClValue| {
                        let t1 = g.fb.ins().imul_imm_s(o, extent as i64);
                        let t2 = g.fb.ins().iadd(t1, k);
                        let t3 = g.fb.ins().imul_imm_s(t2, inner as i64);
                        g.fb.ins().iadd(t3, n)
                    };
                    let idx = at(g, k);
                    // A linear scan multiplies the running value by d at this index (forward) or
                    // at the one before it in scan order, k + 1 (reverse, the adjoint); the first
                    // step takes x alone (clamped index, product discarded).
                    let mult = match decay {
                        Some(d) => {
                            let km = if reverse {
                                let next = g.fb.ins().iadd_imm_s(k, 1);
                                g.fb.ins().smin(next, last)
                            } else {
                                k
                            };
                            let im = at(g, km);
                            Some(if vector { g.read_vec(d, im)? } else { g.read(d, im)? })
                        }
                        None => None,
                    };
                    let cur = g.fb.use_var(acc);
                    let x = if vector { g.read_vec(a, idx)? } else { g.read(a, idx)? };
                    let nv = match mult {
                        Some(m) => {
                            let p = g.fb.ins().fmul(m, cur);
                            let s = g.fb.ins().fadd(p, x);
                            let first = g.fb.ins().icmp_imm_s(IntCC::Equal, e, 0);
                            g.fb.ins().select(first, x, s)
                        }
                        None => g.fb.ins().fadd(cur, x),
                    };
                    g.fb.def_var(acc, nv);
                    if vector {
                        g.write_vec(out, idx, nv);
                    } else {
                        g.write(out, idx, nv);
                    }
                    Ok(())
                })
            })
        })
    }

    /// out[i, j] = Σ_l a[i, l]·b[l, j], each sum a chain of fmas in increasing l from 0 (as a
    /// scalar loop would do it, so results do not depend on the blocking). The output is computed in
    /// register tiles of up to 2 rows × 4 F32X4 vectors held in accumulators across the whole l loop:
    /// each b row segment loaded serves both rows, each a element splatted serves 4 vectors. Columns
    /// past the last whole vector get scalar accumulators.
    fn dot(&mut self, out: Value, a: Value, b: Value) -> Result<(), CodegenError> {
        let (m, k) = (u64::from(self.ty(a).shape[0]), u64::from(self.ty(a).shape[1]));
        let n = u64::from(self.ty(b).shape[1]);
        self.alloc(out);
        // Column groups: (first column, vectors), 0 vectors meaning one scalar column.
        let mut groups = Vec::new();
        let whole = n / LANES;
        let mut c = 0;
        while c < whole {
            let v = (whole - c).min(4);
            groups.push((c * LANES, v));
            c += v;
        }
        groups.extend((whole * LANES..n).map(|j| (j, 0)));
        const ROWS: u64 = 2;
        let paired = m / ROWS * ROWS;
        if paired > 0 {
            let lo = self.fb.ins().iconst(types::I64, 0);
            let hi = self.fb.ins().iconst(types::I64, paired as i64);
            self.counted(lo, hi, ROWS as i64, &mut |g, i| {
                for &(col, vecs) in &groups {
                    g.dot_tile(out, a, b, i, ROWS, col, vecs, k, n)?;
                }
                Ok(())
            })?;
        }
        if paired < m {
            let i = self.fb.ins().iconst(types::I64, paired as i64);
            for &(col, vecs) in &groups {
                self.dot_tile(out, a, b, i, 1, col, vecs, k, n)?;
            }
        }
        Ok(())
    }

    /// One register tile of `dot`: rows i..i + rows, columns col.. (vecs F32X4 vectors, or one
    /// scalar column when vecs is 0).
    #[allow(clippy::too_many_arguments)]
    fn dot_tile(
        &mut self,
        out: Value,
        a: Value,
        b: Value,
        i: ClValue,
        rows: u64,
        col: u64,
        vecs: u64,
        k: u64,
        n: u64,
    ) -> Result<(), CodegenError> {
        let width = vecs.max(1);
        let t = if vecs == 0 { types::F32 } else { types::F32X4 };
        let zero = self.fconst(t, 0.0);
        let mut accs = Vec::new();
        for _ in 0..rows * width {
            let var = self.fb.declare_var(t);
            self.fb.def_var(var, zero);
            accs.push(var);
        }
        // Flat index of a[i, 0] for each row.
        let a_rows: Vec<ClValue> = (0..rows)
            .map(|r| {
                let ir = self.fb.ins().iadd_imm_s(i, r as i64);
                self.fb.ins().imul_imm_s(ir, k as i64)
            })
            .collect();
        self.repeat(k, |g, l| {
            let mut ys = Vec::new();
            let b_row = g.fb.ins().imul_imm_s(l, n as i64);
            for c in 0..width {
                let idx = g.fb.ins().iadd_imm_s(b_row, (col + c * LANES) as i64);
                ys.push(if vecs == 0 { g.read(b, idx)? } else { g.read_vec(b, idx)? });
            }
            for r in 0..rows {
                let idx = g.fb.ins().iadd(a_rows[r as usize], l);
                let x = g.read(a, idx)?;
                let x = if vecs == 0 { x } else { g.fb.ins().splat(types::F32X4, x) };
                for (c, y) in ys.iter().enumerate() {
                    let var = accs[(r * width) as usize + c];
                    let cur = g.fb.use_var(var);
                    let nv = g.fb.ins().fma(x, *y, cur);
                    g.fb.def_var(var, nv);
                }
            }
            Ok(())
        })?;
        for r in 0..rows {
            let ir = self.fb.ins().iadd_imm_s(i, r as i64);
            let o_row = self.fb.ins().imul_imm_s(ir, n as i64);
            for c in 0..width {
                let idx = self.fb.ins().iadd_imm_s(o_row, (col + c * LANES) as i64);
                let v = self.fb.use_var(accs[(r * width + c) as usize]);
                if vecs == 0 {
                    self.write(out, idx, v);
                } else {
                    self.write_vec(out, idx, v);
                }
            }
        }
        Ok(())
    }

    /// Forward substitution: T[i, j] = −(L[i, j] + Σ_{j<k<i} L[i, k] T[k, j]) for j < i, T[i, i] = 1.
    fn tri_inv(&mut self, out: Value, a: Value) -> Result<(), CodegenError> {
        let n = self.ty(a).shape[0];
        self.alloc(out);
        let acc = self.fb.declare_var(types::F32);
        let nn = i64::from(n);
        self.repeat(u64::from(n), |g, i| {
            g.repeat(u64::from(n), |g, j| {
                let here = g.fb.ins().imul_imm_s(i, nn);
                let here = g.fb.ins().iadd(here, j);
                let lower = g.fb.create_block();
                let upper = g.fb.create_block();
                let done = g.fb.create_block();
                let below = g.fb.ins().icmp(IntCC::SignedLessThan, j, i);
                g.fb.ins().brif(below, lower, &[], upper, &[]);
                g.fb.switch_to_block(upper);
                let eq = g.fb.ins().icmp(IntCC::Equal, i, j);
                let one = g.fb.ins().f32const(1.0);
                let zero = g.fb.ins().f32const(0.0);
                let v = g.fb.ins().select(eq, one, zero);
                g.write(out, here, v);
                g.fb.ins().jump(done, &[]);
                g.fb.switch_to_block(lower);
                let lij = g.read(a, here)?;
                g.fb.def_var(acc, lij);
                let from = g.fb.ins().iadd_imm_s(j, 1);
                g.counted(from, i, 1, &mut |g, k| {
                    let ik = g.fb.ins().imul_imm_s(i, nn);
                    let ik = g.fb.ins().iadd(ik, k);
                    let kj = g.fb.ins().imul_imm_s(k, nn);
                    let kj = g.fb.ins().iadd(kj, j);
                    let l = g.read(a, ik)?;
                    let t = g.read(out, kj)?;
                    let cur = g.fb.use_var(acc);
                    let nv = g.fb.ins().fma(l, t, cur);
                    g.fb.def_var(acc, nv);
                    Ok(())
                })?;
                let s = g.fb.use_var(acc);
                let v = g.fb.ins().fneg(s);
                g.write(out, here, v);
                g.fb.ins().jump(done, &[]);
                g.fb.switch_to_block(done);
                Ok(())
            })
        })
    }

    fn for_loop(&mut self, results: &[Value], lo: Value, hi: Value, step: Value, init: &[Value], body: &Block) -> Result<(), CodegenError> {
        let lo = self.scalar(lo)?;
        let hi = self.scalar(hi)?;
        let step = self.scalar(step)?;
        // Carried tiles get storage of their own; carried scalars become variables.
        for (k, arg) in body.args.iter().skip(1).enumerate() {
            if self.ty(*arg).is_scalar() {
                let t = self.cl_type(self.ty(*arg).dtype)?;
                let var = self.fb.declare_var(t);
                let x = self.scalar(init[k])?;
                self.fb.def_var(var, x);
                self.scalars.insert(*arg, Scalar::Var(var));
                self.scalars.insert(results[k], Scalar::Var(var));
            } else {
                let at = self.alloc(*arg);
                self.copy(init[k], *arg)?;
                self.slots.insert(results[k], at);
            }
        }
        let index = self.fb.declare_var(types::I64);
        self.scalars.insert(body.args[0], Scalar::Var(index));
        let header: ClBlock = self.fb.create_block();
        let inner = self.fb.create_block();
        let exit = self.fb.create_block();
        self.fb.def_var(index, lo);
        self.fb.ins().jump(header, &[]);
        self.fb.switch_to_block(header);
        let i = self.fb.use_var(index);
        let go = self.fb.ins().icmp(IntCC::SignedLessThan, i, hi);
        self.fb.ins().brif(go, inner, &[], exit, &[]);
        self.fb.switch_to_block(inner);
        self.block(body)?;
        if let Some(crate::kir::Inst { op: Op::Yield(next), .. }) = body.insts.last() {
            // Read every yielded scalar before writing any carried variable (a yield may swap them).
            let mut scalar_next = Vec::new();
            for (k, arg) in body.args.iter().skip(1).enumerate() {
                if self.ty(*arg).is_scalar() {
                    scalar_next.push((*arg, self.scalar(next[k])?));
                }
            }
            for (k, arg) in body.args.iter().skip(1).enumerate() {
                if !self.ty(*arg).is_scalar() {
                    self.copy(next[k], *arg)?;
                }
            }
            for (arg, x) in scalar_next {
                if let Some(Scalar::Var(var)) = self.scalars.get(&arg).copied() {
                    self.fb.def_var(var, x);
                }
            }
        }
        let i = self.fb.use_var(index);
        let next = self.fb.ins().iadd(i, step);
        self.fb.def_var(index, next);
        self.fb.ins().jump(header, &[]);
        self.fb.switch_to_block(exit);
        Ok(())
    }
}
