//! Emission of one kernel program as an NVPTX kernel; see the module documentation for the
//! mapping. Values: kir scalars are LLVM SSA values (loop indices and carried scalars are stack
//! slots that LLVM's mem2reg promotes), kir tiles are workspace offsets.

use std::collections::HashMap;

mod contig;
mod fuse;
mod mma;
mod narrow;
mod profile;
mod tri;
mod warp;
use mma::DotMode;

use hlac_runtime::kir::{self, BinOp, Block, CmpOp, Const, DType, Op, ParamKind, Program, ReduceOp, UnOp, Value};
use inkwell::builder::Builder;
use inkwell::context::Context;
use inkwell::intrinsics::Intrinsic;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetTriple};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate, OptimizationLevel};

/// The most threads per block.
pub const THREADS: u32 = 256;

/// Threads per block for a program: enough whole warps to give every element of its largest tile
/// a thread of its own, at most `cap` (a multiple of 32; [`THREADS`] by default). A program of
/// narrow tiles (the elementwise scan over a block of 32 channels) then runs as one warp instead
/// of leaving most of a block idle, and more of its blocks fit on each SM.
pub fn threads_for(program: &Program, cap: u32) -> u32 {
    let widest = widest_tile(program);
    // HLAC_NVPTX_THREADS overrides the cap (a multiple of 32), for A/B measurements.
    let forced =
        std::env::var("HLAC_NVPTX_THREADS").ok().and_then(|v| v.parse::<u32>().ok()).filter(|t| t % 32 == 0 && (32..=1024).contains(t));
    let cap = forced.unwrap_or(cap).max(32);
    (widest.div_ceil(32) * 32).clamp(32, u64::from(cap)) as u32
}

/// The number of elements of a program's largest tile (1 for a program of scalars).
pub fn widest_tile(program: &Program) -> u64 {
    program.types.iter().map(|t| t.numel()).max().unwrap_or(1)
}

/// The most elements a thread computes per iteration of an elementwise pass (`Gen::strided`):
/// 4, or `HLAC_NVPTX_UNROLL=n` (1, 2 or 4), for A/B measurements.
fn unroll_limit() -> u64 {
    std::env::var("HLAC_NVPTX_UNROLL").ok().and_then(|v| v.parse().ok()).filter(|u| [1, 2, 4].contains(u)).unwrap_or(4)
}

/// Whether square roots, reciprocal square roots and the divisions inside sigmoid, tanh and log1p run on
/// the approximate unit (`sqrt.approx`, `rsqrt.approx`, `div.approx`: ≤ 2⁻²² relative error, as
/// Triton's `tl.sqrt`/`tl.rsqrt` and fla's kernels use) rather than as IEEE-rounded sequences.
/// The profile build found GDN's l2norm spending 6.7 k cycles per 64 × 128 pass on a
/// `sqrt.rn` + `rcp.rn` recomputed for every element of a broadcast row norm. Default on;
/// `HLAC_NVPTX_IEEE=1` keeps the IEEE forms, for A/B measurements. A user's own `/` stays IEEE.
fn approx() -> bool {
    std::env::var("HLAC_NVPTX_IEEE").map_or(true, |v| v != "1")
}

/// Why a program could not be compiled to PTX.
#[derive(Debug, thiserror::Error)]
pub enum NvptxError {
    /// The program failed verification (a bug in hlac).
    #[error(transparent)]
    Invalid(#[from] kir::verify::VerifyError),
    /// Something the back end does not implement.
    #[error("kernel `{kernel}`: {what} is not supported by the NVPTX back end")]
    Unsupported {
        /// The kernel.
        kernel: String,
        /// What.
        what: String,
    },
    /// LLVM failed (a bug in hlac).
    #[error("this is a bug in hlac: LLVM failed on kernel `{kernel}`: {message}")]
    Llvm {
        /// The kernel.
        kernel: String,
        /// LLVM's message.
        message: String,
    },
}

/// A compiled kernel.
pub struct Compiled {
    /// The PTX text.
    pub ptx: String,
    /// The entry point's name.
    pub entry: String,
    /// Global-memory workspace bytes per program instance (0 when the workspace is in shared memory).
    pub scratch_bytes: u64,
    /// Dynamic shared-memory bytes per block: the whole workspace, when it fits (0 otherwise).
    pub shared_bytes: u64,
    /// Threads per block.
    pub threads: u32,
    /// The machine code ptxas made of the PTX, when it was run.
    pub cubin: Option<Vec<u8>>,
}

/// The most dynamic shared memory one block may use on `device` (the opt-in maximum per block).
pub fn shared_limit(device: &str) -> u64 {
    match device {
        "sm_90" => 227 * 1024,
        _ => 163 * 1024,
    }
}

/// Workspace bytes per instance: the planned bytes rounded up to whole 16-byte lines (at least 64).
fn shared_size(layout: &kir::layout::Layout) -> u64 {
    layout.bytes.max(64).div_ceil(16) * 16
}

/// Whether `program`'s whole workspace fits in one block's shared memory on `device` (the test
/// [`compile`] applies for [`Workspace::SharedWhenFits`]).
pub fn workspace_fits_shared(program: &Program, device: &str) -> bool {
    let limit = shared_limit(device);
    let (_, layout) = storage_of(program, fusion_of(program).fused, limit, Narrowing::Always);
    shared_size(&layout) <= limit
}

/// How a program's tiles are stored, and where, for a shared-memory budget of `limit` bytes (0:
/// the workspace is in global memory), given the tiles not stored (`unstored`): with the
/// [`narrow`] tiles in bf16 as `narrowing` says, except where only the f32 workspace fits the
/// budget (first-fit packing of tiles of two sizes can come out larger).
fn storage_of(
    p: &Program,
    unstored: std::collections::HashSet<Value>,
    limit: u64,
    narrowing: Narrowing,
) -> (kir::layout::Storage, kir::layout::Layout) {
    let fits = |l: &kir::layout::Layout| limit > 0 && shared_size(l) <= limit;
    // HLAC_NVPTX_NARROW=always overrides the kernel's choice, for A/B measurements.
    let narrowing = if std::env::var("HLAC_NVPTX_NARROW").is_ok_and(|v| v == "always") { Narrowing::Always } else { narrowing };
    let wide = kir::layout::Storage::fused(unstored);
    let layout = layout_of(p, &wide, limit);
    if narrowing == Narrowing::Never || (narrowing == Narrowing::ToFit && fits(&layout)) {
        return (wide, layout);
    }
    let narrow = narrow::analyse(p, &wide.fused, DotMode::for_program(p));
    if narrow.is_empty() {
        return (wide, layout);
    }
    let storage = kir::layout::Storage { fused: wide.fused.clone(), narrow };
    let narrowed = layout_of(p, &storage, limit);
    if !fits(&narrowed) && fits(&layout) {
        return (wide, layout);
    }
    (storage, narrowed)
}

/// The workspace layout of a program for a shared-memory budget of `limit` bytes (0: the
/// workspace is in global memory): tiles packed in order of definition, unless only largest
/// first packing (`kir::layout::Packing`) brings the workspace into shared memory. Measured on an
/// H200 (B = 4, T = 4096): GDN's forward 247 → 197 KB, into shared memory, 9.08 → 6.34 ms; the
/// kernels that fit either way were no faster packed largest first (GLA's forward 11.24 → 11.78,
/// HGRN-2's backward 53.2 → 54.5, others within 3 %), so they keep the default. `HLAC_PACK`
/// overrides the choice for both back ends (`kir::layout::plan_fused`).
fn layout_of(p: &Program, storage: &kir::layout::Storage, limit: u64) -> kir::layout::Layout {
    let default = kir::layout::plan_fused(p, storage);
    if limit == 0 || shared_size(&default) <= limit || std::env::var("HLAC_PACK").is_ok() {
        return default;
    }
    let packed = kir::layout::plan_packed(p, storage, kir::layout::Packing::LargestFirst);
    if shared_size(&packed) <= limit {
        packed
    } else {
        default
    }
}

/// The program's fused tiles ([`fuse`]); none with `HLAC_NVPTX_FUSE=off`, which stores every tile
/// (for measuring what fusion gains).
fn fusion_of(program: &Program) -> fuse::Fusion {
    if std::env::var("HLAC_NVPTX_FUSE").is_ok_and(|v| v == "off") {
        return fuse::Fusion::default();
    }
    let mode = DotMode::for_program(program);
    fuse::analyse(program, &|a, b| mode.tiles(program, a, b))
}

/// The PTX target for a device name (`sm_80`, `sm_90`).
fn target_for(device: &str) -> Option<(&'static str, &'static str)> {
    match device {
        "sm_80" => Some(("sm_80", "+ptx75")),
        "sm_90" => Some(("sm_90", "+ptx80")),
        _ => None,
    }
}

/// Where a kernel's workspace goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workspace {
    /// In the block's dynamic shared memory when the whole of it fits, else in global memory.
    SharedWhenFits,
    /// Always in global memory: for kernels launched as many instances per SM, where a large
    /// shared workspace would leave one block per SM (measured slower: BENCHMARKS.md).
    Global,
}

/// When a kernel stores its tensor-core operand tiles and bf16 loads as bf16 ([`narrow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Narrowing {
    /// Wherever the analysis allows.
    Always,
    /// Only when the f32 workspace does not fit in shared memory.
    ToFit,
    /// Never.
    Never,
}

/// How one kernel is to be launched: where its workspace goes and the most threads per block
/// (the lowering chooses both per kernel from measurements: `ModelKernel::gpu_options`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The workspace's placement.
    pub workspace: Workspace,
    /// The most threads per block (a multiple of 32).
    pub max_threads: u32,
    /// Whether a `dot` with fewer outputs than threads splits each output's sum across lanes
    /// (`codegen/warp.rs`); otherwise one thread computes each output.
    pub split_k: bool,
    /// Whether the kernel carries the profile build's cycle counters ([`profile`]; the lowering
    /// sets it from `HLAC_NVPTX_PROFILE=1`).
    pub profile: bool,
    /// When tiles are stored as bf16.
    pub narrowing: Narrowing,
    /// Whether every tile operation reads the thread index afresh (`Gen::tid`), which keeps
    /// LLVM from hoisting each operation's per-thread addresses out of the loops around it;
    /// otherwise it is read once at entry (cheaper for small kernels, whose few hoisted
    /// addresses fit the registers).
    pub reread_tid: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            workspace: Workspace::SharedWhenFits,
            max_threads: THREADS,
            split_k: true,
            profile: false,
            narrowing: Narrowing::Always,
            reread_tid: true,
        }
    }
}

/// Whether shared-memory workspace offsets are computed in 32 bits (`Gen::tile_ptr`):
/// `HLAC_NVPTX_INDEX32=1`, an experiment measured slower on an H200 (attention's forward 6.37 →
/// 6.76 ms, GLA's 2.57 → 2.72, 2026-12-03).
fn index32() -> bool {
    std::env::var("HLAC_NVPTX_INDEX32").is_ok_and(|v| v == "1")
}

/// Whether every use of the thread index reads it afresh (`Gen::tid`): the kernel's option,
/// unless `HLAC_NVPTX_TID=once` or `=fresh` forces it, for A/B measurements.
fn reread_tid(option: bool) -> bool {
    match std::env::var("HLAC_NVPTX_TID").as_deref() {
        Ok("once") => false,
        Ok("fresh") => true,
        _ => option,
    }
}

/// Whether `HLAC_NVPTX_PROFILE=1` asks for the profile build.
pub fn profile_requested() -> bool {
    std::env::var("HLAC_NVPTX_PROFILE").is_ok_and(|v| v == "1")
}

/// Compiles one verified program to PTX for `device`.
pub fn compile(program: &Program, device: &str, options: Options) -> Result<Compiled, NvptxError> {
    let workspace = options.workspace;
    kir::verify(program)?;
    let fail = |message: String| NvptxError::Llvm { kernel: program.name.clone(), message };
    let (cpu, features) =
        target_for(device).ok_or_else(|| NvptxError::Unsupported { kernel: program.name.clone(), what: format!("device `{device}`") })?;
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| fail(e.to_string()))?;
    let machine = target
        .create_target_machine(&triple, cpu, features, OptimizationLevel::Aggressive, RelocMode::Default, CodeModel::Default)
        .ok_or_else(|| fail("no NVPTX target machine".into()))?;
    let context = Context::create();
    let module = context.create_module(&program.name);
    module.set_triple(&triple);
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let entry = sanitize(&program.name);
    let (scratch_bytes, shared_bytes) = {
        // HLAC_NVPTX_WORKSPACE=global keeps every workspace in global memory: for measuring what
        // the shared-memory placement gains, kernel by kernel.
        // (HLAC_NVPTX_WORKSPACE=shared places it in shared memory wherever it fits.)
        let forced = std::env::var("HLAC_NVPTX_WORKSPACE").ok();
        let global = match forced.as_deref() {
            Some("global") => true,
            Some("shared") => false,
            _ => workspace == Workspace::Global,
        };
        let limit = if global { 0 } else { shared_limit(device) };
        let mut g = Gen::new(&context, &module, program, &entry, limit, options)?;
        // HLAC_NVPTX_LAYOUT=<kernel> prints that kernel's program and its stored tiles (offset,
        // type) to stderr: what makes its workspace the size it is.
        if std::env::var("HLAC_NVPTX_LAYOUT").is_ok_and(|k| k == program.name) {
            eprintln!("{program}");
            for (v, at) in g.layout.tiles() {
                let t = program.ty(v);
                let narrow = if g.storage.narrow.contains(&v) { " as bf16" } else { "" };
                eprintln!("{at:>8} {v}: {}{:?}{narrow} ({} bytes)", t.dtype.name(), t.shape, t.numel() * g.storage.elem_bytes(program, v));
            }
            eprintln!("{} bytes", g.layout.bytes);
        }
        g.emit()?;
        // `.maxntid`: ptxas then budgets registers for exactly this block size (all of a 256-thread
        // block's registers fit one SM's file at up to 255 per thread).
        let node = context.metadata_node(&[
            g.func.as_global_value().as_pointer_value().into(),
            context.metadata_string("maxntidx").into(),
            context.i32_type().const_int(u64::from(g.threads), false).into(),
        ]);
        module.add_global_metadata("nvvm.annotations", &node).map_err(|e| fail(e.to_string()))?;
        // HLAC_NVPTX_MINBLOCKS=n asks ptxas to fit n blocks per SM (fewer registers, maybe spills),
        // for A/B measurements of occupancy against spilling.
        if let Some(n) = std::env::var("HLAC_NVPTX_MINBLOCKS").ok().and_then(|v| v.parse::<u64>().ok()) {
            let node = context.metadata_node(&[
                g.func.as_global_value().as_pointer_value().into(),
                context.metadata_string("minctasm").into(),
                context.i32_type().const_int(n, false).into(),
            ]);
            module.add_global_metadata("nvvm.annotations", &node).map_err(|e| fail(e.to_string()))?;
        }
        let bytes = shared_size(&g.layout);
        if g.smem.is_some() {
            (0, bytes)
        } else {
            (bytes, 0)
        }
    };
    module.verify().map_err(|e| fail(format!("invalid LLVM IR: {e}")))?;
    let pipeline = std::env::var("HLAC_NVPTX_PASSES").unwrap_or_else(|_| "default<O3>".into());
    module.run_passes(&pipeline, &machine, PassBuilderOptions::create()).map_err(|e| fail(e.to_string()))?;
    let buffer = machine.write_to_memory_buffer(&module, FileType::Assembly).map_err(|e| fail(e.to_string()))?;
    let ptx = String::from_utf8_lossy(buffer.as_slice()).into_owned();
    Ok(Compiled { ptx, entry, scratch_bytes, shared_bytes, threads: threads_for(program, options.max_threads), cubin: None })
}

/// The shared-memory tiles to store swizzled, with their row length: in a kernel with a `dot` on
/// the tensor cores, every f32 tile of two or more axes whose last axis is a multiple of 32
/// elements (for a tile stored as bf16: a multiple of 64, or 16 or 32), the same for every tile of
/// the storage group. Row r's 16-byte groups are stored XORed with r mod 8 (shorter rows:
/// [`swizzle_key`]), so the fragments' reads and writes down a column (eight rows at one column:
/// one bank, eight-way conflicts on a plain row-major tile whose rows are a multiple of 128
/// bytes) and transposes spread over the banks, while a warp reading 32 consecutive elements of a
/// row still touches 128 contiguous bytes and the adjacent pairs the fragments load as one 8-byte
/// access stay adjacent. Measured on an H200: attention's forward 37.5 → 34.2 ms; swizzling only
/// the fragments' operands gave 37.3. Kernels without tensor-core products keep plain tiles: the
/// index arithmetic on every access made them slower (RMSNorm 0.112 → 0.133 ms, attention decode
/// 1.09 → 1.36, the HGRN scan 0.97 → 1.15). `HLAC_NVPTX_SWIZZLE=off` stores every tile plainly,
/// for A/B measurements.
fn swizzle_of(p: &Program, layout: &kir::layout::Layout, storage: &kir::layout::Storage) -> HashMap<Value, u32> {
    if std::env::var("HLAC_NVPTX_SWIZZLE").is_ok_and(|v| v == "off") {
        return HashMap::new();
    }
    let mode = DotMode::for_program(p);
    fn any_mma(p: &Program, b: &Block, mode: DotMode) -> bool {
        b.insts.iter().any(|inst| match &inst.op {
            Op::Dot(a, x) => mode.tiles(p, *a, *x),
            Op::For { body, .. } => any_mma(p, body, mode),
            _ => false,
        })
    }
    if !any_mma(p, &p.body, mode) {
        return HashMap::new();
    }
    // Rows of whole 128-byte lines: 32 f32 elements; a bf16 tile's ([`narrow`]) rows may also be
    // 64 or 32 bytes (16 or 32 elements: `swizzle_key`).
    let row = |v: Value| {
        let t = p.ty(v);
        let c = t.shape.last().copied().unwrap_or(0);
        let fits = if storage.narrow.contains(&v) { c.is_multiple_of(64) || c == 16 || c == 32 } else { c.is_multiple_of(32) };
        (t.dtype == DType::F32 && t.shape.len() >= 2 && c > 0 && fits).then_some(c)
    };
    // Per storage group: the common row length, or None when any member does not qualify.
    let mut groups: HashMap<Value, Option<u32>> = HashMap::new();
    for (v, _) in layout.tiles() {
        let r = row(v);
        let g = groups.entry(layout.group(v)).or_insert(r);
        if *g != r {
            *g = None;
        }
    }
    layout.tiles().into_iter().filter_map(|(v, _)| groups.get(&layout.group(v)).copied().flatten().map(|c| (v, c))).collect()
}

/// The swizzle key of row r for rows of `groups` 16-byte groups, as (shift, mask): the key is
/// (r >> shift) & mask. Rows of whole 128-byte lines XOR with r mod 8. Shorter rows (a bf16
/// tile's 64- or 32-byte rows, several to a line) XOR with the line's index among the lines of 8
/// rows, so that the rows 2t a B fragment reads (and the rows g an A fragment reads) fall in
/// distinct banks: 64-byte rows put rows 0, 2, 4, 6 at the same banks unswizzled (four-way
/// conflicts on every fragment load).
fn swizzle_key(groups: u64) -> (i64, i64) {
    match groups {
        2 => (2, 1),
        4 => (1, 3),
        _ => (0, 7),
    }
}

/// A PTX-safe identifier.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect()
}

#[derive(Clone, Copy)]
enum Scalar<'ctx> {
    Val(BasicValueEnum<'ctx>),
    /// A stack slot holding a value of this type.
    Slot(PointerValue<'ctx>, BasicTypeEnum<'ctx>),
}

/// A global pointer parameter: address (as i64) and element count.
#[derive(Clone, Copy)]
struct GlobalParam<'ctx> {
    addr: IntValue<'ctx>,
    len: IntValue<'ctx>,
}

/// A workspace region an elementwise operation touched: offset, element bytes, length in bytes,
/// and whether threads other than each element's own may have read it (through a broadcast).
#[derive(Clone, Copy)]
struct Region {
    at: u64,
    elem: i64,
    len: u64,
    cross: bool,
    /// The tile's swizzle ([`Gen::swizzle`]; 0 for none): one placement seen through two
    /// swizzles puts an element at two threads.
    swizzle: u32,
}

struct Gen<'a, 'ctx> {
    ctx: &'ctx Context,
    module: &'a Module<'ctx>,
    b: Builder<'ctx>,
    p: &'a Program,
    func: FunctionValue<'ctx>,
    entry_block: inkwell::basic_block::BasicBlock<'ctx>,
    /// Pointer parameters by kir parameter index; integer parameters' values.
    globals: HashMap<u32, GlobalParam<'ctx>>,
    ints: HashMap<u32, IntValue<'ctx>>,
    /// This block's workspace, as an i64 address (when it is in global memory).
    scratch: IntValue<'ctx>,
    /// The workspace in dynamic shared memory, when the whole of it fits: tile accesses then cost
    /// shared-memory latency instead of a round trip through L1/L2.
    smem: Option<PointerValue<'ctx>>,
    error: IntValue<'ctx>,
    tid: IntValue<'ctx>,
    /// Whether `tid()` and `scratch()` read afresh ([`Options::reread_tid`]).
    reread_tid: bool,
    /// Whether shared-memory offsets are computed in 32 bits ([`index32`]).
    index32: bool,
    /// Threads per block ([`threads_for`]).
    threads: u32,
    slots: HashMap<Value, u64>,
    /// Workspace regions (offset, element bytes, length in bytes) that elementwise operations have
    /// touched since the last barrier, whose barrier is still owed (see [`Gen::elementwise`]).
    unsynced: Vec<Region>,
    /// Tiles written by asynchronous copies not yet waited for, one commit group each, oldest
    /// first ([`Gen::wait_copies`]).
    pending: Vec<Value>,
    scalars: HashMap<Value, Scalar<'ctx>>,
    layout: kir::layout::Layout,
    /// What the layout was planned with: the tiles not stored, and those stored as bf16
    /// ([`narrow`]).
    storage: kir::layout::Storage,
    /// How `dot` multiplies ([`mma`]).
    dot_mode: DotMode,
    /// Whether small-output `dot`s split their sums across lanes ([`Options::split_k`]).
    split_k: bool,
    /// Tiles computed where they are read instead of stored ([`fuse`]).
    fusion: fuse::Fusion,
    /// Row length of each shared-memory tile stored swizzled ([`swizzle_of`]).
    swizzle: HashMap<Value, u32>,
    /// Elements of fused tiles already computed in the current basic block, by (tile, index value,
    /// basic block): a fused expression read twice at one index is computed once.
    memo: HashMap<(Value, usize, usize), BasicValueEnum<'ctx>>,
    /// What is known of the index tiles along their last axis ([`contig`]): which loads and
    /// stores move 16 bytes at a time.
    contig: contig::Contig<'a>,
    /// Products computed straight into the add that uses them ([`mma::accumulations`]): the
    /// product's value → (the add's result, the other addend).
    accum: HashMap<Value, (Value, Value)>,
    /// Those adds' results (already computed by their products: their instructions emit nothing).
    accumulated: std::collections::HashSet<Value>,
    /// The profile build's counters ([`profile`]; `None` in the default build).
    profile: Option<profile::Profile<'ctx>>,
    /// Whether this is a profile build ([`Options::profile`]).
    profiled: bool,
}

type R<T> = Result<T, NvptxError>;

impl<'a, 'ctx> Gen<'a, 'ctx> {
    fn new(ctx: &'ctx Context, module: &'a Module<'ctx>, p: &'a Program, entry: &str, shared_limit: u64, options: Options) -> R<Self> {
        let i64t = ctx.i64_type();
        let mut params = Vec::new();
        for param in &p.params {
            match param.kind {
                ParamKind::Ptr { .. } => {
                    params.push(i64t.into());
                    params.push(i64t.into());
                }
                ParamKind::Int => params.push(i64t.into()),
            }
        }
        params.push(i64t.into());
        params.push(i64t.into());
        let fn_type = ctx.void_type().fn_type(&params, false);
        let func = module.add_function(entry, fn_type, None);
        // The PTX kernel calling convention makes this an entry point.
        func.set_call_conventions(71);
        let entry_block = ctx.append_basic_block(func, "entry");
        let b = ctx.create_builder();
        b.position_at_end(entry_block);
        let mut globals = HashMap::new();
        let mut ints = HashMap::new();
        let mut at = 0;
        let arg = |i: u32| func.get_nth_param(i).map(|v| v.into_int_value());
        for (i, param) in p.params.iter().enumerate() {
            match param.kind {
                ParamKind::Ptr { .. } => {
                    let (Some(addr), Some(len)) = (arg(at), arg(at + 1)) else { unreachable!("declared above") };
                    globals.insert(i as u32, GlobalParam { addr, len });
                    at += 2;
                }
                ParamKind::Int => {
                    let Some(v) = arg(at) else { unreachable!("declared above") };
                    ints.insert(i as u32, v);
                    at += 1;
                }
            }
        }
        let (Some(scratch_base), Some(error)) = (arg(at), arg(at + 1)) else { unreachable!("declared above") };
        let fusion = fusion_of(p);
        let threads = threads_for(p, options.max_threads);
        let accum = mma::accumulations(p, &fusion.fused, DotMode::for_program(p), threads / 32);
        // Neither fused tiles nor the products computed into their adds are stored; tensor-core
        // operands and bf16 loads may be stored as bf16 ([`storage_of`]).
        let mut unstored = fusion.fused.clone();
        unstored.extend(accum.keys().copied());
        let (storage, layout) = storage_of(p, unstored, shared_limit, options.narrowing);
        let smem = (shared_size(&layout) <= shared_limit).then(|| {
            // `extern __shared__`: a zero-length array in the shared address space whose size is
            // the launch's dynamic shared memory.
            let g = module.add_global(ctx.i8_type().array_type(0), Some(AddressSpace::from(3)), "hlac_workspace");
            g.set_linkage(inkwell::module::Linkage::External);
            g.set_alignment(16);
            g.as_pointer_value()
        });
        let swizzle = if smem.is_some() { swizzle_of(p, &layout, &storage) } else { HashMap::new() };
        let mut g = Gen {
            ctx,
            module,
            b,
            p,
            func,
            entry_block,
            globals,
            ints,
            scratch: scratch_base,
            smem,
            error,
            tid: i64t.const_zero(),
            reread_tid: reread_tid(options.reread_tid),
            index32: index32(),
            threads,
            split_k: options.split_k,
            profiled: options.profile,
            slots: HashMap::new(),
            unsynced: Vec::new(),
            pending: Vec::new(),
            scalars: HashMap::new(),
            layout,
            storage,
            dot_mode: DotMode::for_program(p),
            fusion,
            swizzle,
            memo: HashMap::new(),
            contig: contig::Contig::new(p),
            accumulated: accum.values().map(|(r, _)| *r).collect(),
            accum,
            profile: None,
        };
        g.tid = g.sreg("llvm.nvvm.read.ptx.sreg.tid.x")?;
        Ok(g)
    }

    fn unsupported(&self, what: impl Into<String>) -> NvptxError {
        NvptxError::Unsupported { kernel: self.p.name.clone(), what: what.into() }
    }

    fn llvm(&self, e: impl std::fmt::Display) -> NvptxError {
        NvptxError::Llvm { kernel: self.p.name.clone(), message: e.to_string() }
    }

    fn intrinsic(&self, name: &str, types: &[BasicTypeEnum<'ctx>]) -> R<FunctionValue<'ctx>> {
        let i = Intrinsic::find(name).ok_or_else(|| self.llvm(format!("intrinsic {name} is missing")))?;
        i.get_declaration(self.module, types).ok_or_else(|| self.llvm(format!("intrinsic {name} has no declaration")))
    }

    fn call(&self, f: FunctionValue<'ctx>, args: &[BasicValueEnum<'ctx>]) -> R<BasicValueEnum<'ctx>> {
        let args: Vec<_> = args.iter().map(|a| (*a).into()).collect();
        let site = self.b.build_call(f, &args, "").map_err(|e| self.llvm(e))?;
        match site.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v),
            inkwell::values::ValueKind::Instruction(_) => Err(self.llvm("a call without a value")),
        }
    }

    /// The thread's index in its block, as i64. With `reread_tid` (else the one read at entry),
    /// read afresh at every use through an opaque `mov` (inline asm with a side effect), so
    /// that LLVM cannot hoist the address arithmetic of
    /// every tile operation out of the loops that contain it: hoisted, each operation's
    /// per-thread addresses stayed live across a chunk loop, hundreds of 64-bit values, and the
    /// kernels spilled at 255 registers.
    fn tid(&self) -> R<IntValue<'ctx>> {
        if !self.reread_tid {
            return Ok(self.tid);
        }
        let i32t = self.ctx.i32_type();
        let v = self.opaque(i32t.fn_type(&[], false), "mov.u32 $0, %tid.x;", "=r", &[])?;
        self.b.build_int_z_extend(v, self.ctx.i64_type(), "").map_err(|e| self.llvm(e))
    }

    /// The block's global workspace, read afresh at every use like [`Gen::tid`]: else LLVM
    /// hoists every tile's base address (workspace + offset) out of the loops, each a live
    /// 64-bit register across them.
    fn scratch(&self) -> R<IntValue<'ctx>> {
        if !self.reread_tid {
            return Ok(self.scratch);
        }
        let i64t = self.ctx.i64_type();
        self.opaque(i64t.fn_type(&[i64t.into()], false), "mov.b64 $0, $1;", "=l,l", &[self.scratch.into()])
    }

    /// The integer result of inline PTX `text` (of type `ty`, operands by `constraints`) marked
    /// as having a side effect, so that LLVM neither hoists nor merges it.
    fn opaque(
        &self,
        ty: inkwell::types::FunctionType<'ctx>,
        text: &str,
        constraints: &str,
        args: &[inkwell::values::BasicMetadataValueEnum<'ctx>],
    ) -> R<IntValue<'ctx>> {
        let asm = self.ctx.create_inline_asm(ty, text.into(), constraints.into(), true, false, None, false);
        let site = self.b.build_indirect_call(ty, asm, args, "").map_err(|e| self.llvm(e))?;
        match site.try_as_basic_value() {
            inkwell::values::ValueKind::Basic(v) => Ok(v.into_int_value()),
            inkwell::values::ValueKind::Instruction(_) => Err(self.llvm("inline asm without a value")),
        }
    }

    /// A special register, zero-extended to i64.
    fn sreg(&self, name: &str) -> R<IntValue<'ctx>> {
        let f = self.intrinsic(name, &[])?;
        let v = self.call(f, &[])?.into_int_value();
        self.b.build_int_z_extend(v, self.ctx.i64_type(), "").map_err(|e| self.llvm(e))
    }

    fn barrier(&self) -> R<()> {
        let f = self.intrinsic("llvm.nvvm.barrier0", &[])?;
        let args: Vec<_> = Vec::new();
        self.b.build_call(f, &args, "").map_err(|e| self.llvm(e))?;
        Ok(())
    }

    fn i64c(&self, x: i64) -> IntValue<'ctx> {
        self.ctx.i64_type().const_int(x as u64, true)
    }

    fn reg_type(&self, d: DType) -> R<BasicTypeEnum<'ctx>> {
        Ok(match d {
            DType::F32 => self.ctx.f32_type().into(),
            DType::I64 => self.ctx.i64_type().into(),
            DType::Bool => self.ctx.bool_type().into(),
            other => return Err(self.unsupported(format!("element type {} (bf16/f16 tiles come with the tensor-core path)", other.name()))),
        })
    }

    /// Bytes per element of tile `v` in the workspace (2 for a [`narrow`] tile).
    fn tile_elem_bytes(&self, v: Value) -> i64 {
        self.storage.elem_bytes(self.p, v) as i64
    }

    /// Places a tile at its planned offset ([`kir::layout`] reuses a dead tile's storage).
    fn alloc(&mut self, v: Value) -> u64 {
        let at = self.layout.offset(v);
        self.slots.insert(v, at);
        at
    }

    /// Pointer to element `i` of tile `v` in the workspace.
    fn tile_ptr(&self, v: Value, i: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        let base = self.slots.get(&v).copied().unwrap_or(0) as i64;
        let size = self.tile_elem_bytes(v);
        let e = |x| self.llvm(x);
        // In shared memory every offset is below 2³², so the index arithmetic can be 32-bit
        // (one instruction per operation where a 64-bit one is two) when `index32` asks for it.
        let narrow = self.smem.is_some() && self.index32;
        let ty = if narrow { self.ctx.i32_type() } else { self.ctx.i64_type() };
        let c = |x: i64| ty.const_int(x as u64, true);
        let i = if narrow { self.b.build_int_truncate(i, ty, "").map_err(e)? } else { i };
        // A swizzled tile keeps row r's 16-byte groups XORed with a key of r (see `swizzle_of`):
        // groups of four f32 elements, or of eight bf16 ones.
        let i = match self.swizzle.get(&v) {
            Some(&cols) => {
                let row = self.b.build_int_unsigned_div(i, c(i64::from(cols)), "").map_err(e)?;
                let (shift, mask) = swizzle_key(u64::from(cols) * size as u64 / 16);
                let row = self.b.build_right_shift(row, c(shift), false, "").map_err(e)?;
                let key = self.b.build_and(row, c(mask), "").map_err(e)?;
                let key = self.b.build_left_shift(key, c(if size == 2 { 3 } else { 2 }), "").map_err(e)?;
                self.b.build_xor(i, key, "").map_err(e)?
            }
            None => i,
        };
        let off = self.b.build_int_mul(i, c(size), "").map_err(e)?;
        let off = self.b.build_int_add(off, c(base), "").map_err(e)?;
        if self.smem.is_some() {
            let off = if narrow { self.b.build_int_z_extend(off, self.ctx.i64_type(), "").map_err(e)? } else { off };
            return self.smem_ptr(off);
        }
        let addr = self.b.build_int_add(self.scratch()?, off, "").map_err(e)?;
        self.b.build_int_to_ptr(addr, self.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)
    }

    /// Pointer to byte `off` of the shared-memory workspace (integer arithmetic, which LLVM folds
    /// into the address: the compiler crate has no `unsafe` for a GEP).
    fn smem_ptr(&self, off: IntValue<'ctx>) -> R<PointerValue<'ctx>> {
        let Some(smem) = self.smem else { return Err(self.llvm("no shared workspace")) };
        let e = |x| self.llvm(x);
        let shared = self.ctx.ptr_type(AddressSpace::from(3));
        let base = self.b.build_ptr_to_int(smem, self.ctx.i64_type(), "").map_err(e)?;
        let addr = self.b.build_int_add(base, off, "").map_err(e)?;
        self.b.build_int_to_ptr(addr, shared, "").map_err(e)
    }

    fn read(&mut self, v: Value, i: IntValue<'ctx>) -> R<BasicValueEnum<'ctx>> {
        if self.p.ty(v).is_scalar() {
            return self.scalar(v);
        }
        if self.fusion.fused.contains(&v) {
            return self.fused_elem(v, i);
        }
        let d = self.p.ty(v).dtype;
        let ptr = self.tile_ptr(v, i)?;
        let e = |x| self.llvm(x);
        if self.storage.narrow.contains(&v) {
            let x = self.b.build_load(self.ctx.bf16_type(), ptr, "").map_err(e)?.into_float_value();
            return Ok(self.b.build_float_ext(x, self.ctx.f32_type(), "").map_err(e)?.into());
        }
        if d == DType::Bool {
            let x = self.b.build_load(self.ctx.i8_type(), ptr, "").map_err(e)?.into_int_value();
            let z = self.ctx.i8_type().const_zero();
            return Ok(self.b.build_int_compare(IntPredicate::NE, x, z, "").map_err(e)?.into());
        }
        self.b.build_load(self.reg_type(d)?, ptr, "").map_err(e)
    }

    /// Element `i` of a fused tile, computed from its expression ([`fuse`]).
    fn fused_elem(&mut self, v: Value, i: IntValue<'ctx>) -> R<BasicValueEnum<'ctx>> {
        use inkwell::values::AsValueRef;
        let bb = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        let key = (v, i.as_value_ref() as usize, bb.as_mut_ptr() as usize);
        if let Some(x) = self.memo.get(&key) {
            return Ok(*x);
        }
        let op = self.fusion.defs.get(&v).cloned().ok_or_else(|| self.llvm(format!("fused tile {v} has no definition")))?;
        let dt = |g: &Self, a: Value| g.p.ty(a).dtype;
        let x = match op {
            Op::Iota(_) => i.into(),
            Op::Reshape(a) => self.read(a, i)?,
            Op::Broadcast(a) => {
                let src = if self.p.ty(a).is_scalar() { i } else { self.broadcast_source(a, v, i)? };
                self.read(a, src)?
            }
            Op::Unary(op, a) => {
                let x = self.read(a, i)?;
                self.unary(op, dt(self, a), x)?
            }
            Op::Binary(op, a, b2) => {
                let (x, y) = (self.read(a, i)?, self.read(b2, i)?);
                self.binary(op, dt(self, a), x, y)?
            }
            Op::Cmp(op, a, b2) => {
                let (x, y) = (self.read(a, i)?, self.read(b2, i)?);
                self.compare(op, dt(self, a), x, y)?
            }
            Op::Select { cond, then, otherwise } => {
                let (c, x, y) = (self.read(cond, i)?, self.read(then, i)?, self.read(otherwise, i)?);
                self.b.build_select(c.into_int_value(), x, y, "").map_err(|e| self.llvm(e))?
            }
            Op::Cast(a, to) => {
                let x = self.read(a, i)?;
                self.convert(x, dt(self, a), to)?
            }
            Op::Transpose(a) => {
                let src = self.transposed(v, i)?;
                self.read(a, src)?
            }
            other => return Err(self.llvm(format!("fused tile {v} defined by {other:?}"))),
        };
        self.memo.insert(key, x);
        Ok(x)
    }

    /// The flat index in tile `a` that element `i` of its broadcast `out` repeats.
    fn broadcast_source(&self, a: Value, out: Value, i: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let ishape = &self.p.ty(a).shape;
        let istr = kir::strides(ishape);
        let idx = self.unflatten(i, &self.p.ty(out).shape)?;
        let mut src = self.i64c(0);
        for (k, ix) in idx.iter().enumerate() {
            if ishape[k] != 1 {
                let t = self.b.build_int_mul(*ix, self.i64c(istr[k]), "").map_err(|x| self.llvm(x))?;
                src = self.b.build_int_add(src, t, "").map_err(|x| self.llvm(x))?;
            }
        }
        Ok(src)
    }

    /// The flat index in a transpose's operand of element `i` of the transpose `out` (2-D).
    fn transposed(&self, out: Value, i: IntValue<'ctx>) -> R<IntValue<'ctx>> {
        let oshape = &self.p.ty(out).shape;
        let idx = self.unflatten(i, oshape)?;
        let t = self.b.build_int_mul(idx[1], self.i64c(i64::from(oshape[0])), "").map_err(|x| self.llvm(x))?;
        self.b.build_int_add(t, idx[0], "").map_err(|x| self.llvm(x))
    }

    fn write(&mut self, v: Value, i: IntValue<'ctx>, x: BasicValueEnum<'ctx>) -> R<()> {
        let ptr = self.tile_ptr(v, i)?;
        let e = |x| self.llvm(x);
        let x = if self.p.ty(v).dtype == DType::Bool {
            self.b.build_int_z_extend(x.into_int_value(), self.ctx.i8_type(), "").map_err(e)?.into()
        } else if self.storage.narrow.contains(&v) {
            // Rounded to nearest even, as the tensor cores' operand conversion rounds.
            self.b.build_float_trunc(x.into_float_value(), self.ctx.bf16_type(), "").map_err(e)?.into()
        } else {
            x
        };
        self.b.build_store(ptr, x).map_err(e)?;
        Ok(())
    }

    fn scalar(&self, v: Value) -> R<BasicValueEnum<'ctx>> {
        match self.scalars.get(&v) {
            Some(Scalar::Val(x)) => Ok(*x),
            Some(Scalar::Slot(p, t)) => self.b.build_load(*t, *p, "").map_err(|e| self.llvm(e)),
            None => Err(self.llvm(format!("scalar {v} has no value"))),
        }
    }

    /// A stack slot in the entry block (where mem2reg promotes it).
    fn stack_slot(&self, t: BasicTypeEnum<'ctx>) -> R<PointerValue<'ctx>> {
        let here = self.b.get_insert_block();
        let tmp = self.ctx.create_builder();
        match self.entry_block.get_first_instruction() {
            Some(first) => tmp.position_before(&first),
            None => tmp.position_at_end(self.entry_block),
        }
        let slot = tmp.build_alloca(t, "").map_err(|e| self.llvm(e))?;
        if let Some(h) = here {
            self.b.position_at_end(h);
        }
        Ok(slot)
    }

    /// `for i in start..end step step { body(i) }`, all values i64.
    fn counted(
        &mut self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        step: IntValue<'ctx>,
        body: &mut dyn FnMut(&mut Self, IntValue<'ctx>) -> R<()>,
    ) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let pre = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        let header = self.ctx.append_basic_block(self.func, "loop");
        let inner = self.ctx.append_basic_block(self.func, "body");
        let exit = self.ctx.append_basic_block(self.func, "done");
        self.b.build_unconditional_branch(header).map_err(e)?;
        self.b.position_at_end(header);
        let phi = self.b.build_phi(self.ctx.i64_type(), "i").map_err(e)?;
        phi.add_incoming(&[(&start, pre)]);
        let i = phi.as_basic_value().into_int_value();
        let go = self.b.build_int_compare(IntPredicate::SLT, i, end, "").map_err(e)?;
        self.b.build_conditional_branch(go, inner, exit).map_err(e)?;
        self.b.position_at_end(inner);
        body(self, i)?;
        let next = self.b.build_int_add(i, step, "").map_err(e)?;
        let latch = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        self.b.build_unconditional_branch(header).map_err(e)?;
        phi.add_incoming(&[(&next, latch)]);
        self.b.position_at_end(exit);
        Ok(())
    }

    /// Each thread takes elements tid, tid + threads, … of 0..n; then a block barrier.
    fn par(&mut self, n: u64, body: &mut dyn FnMut(&mut Self, IntValue<'ctx>) -> R<()>) -> R<()> {
        let end = self.i64c(n as i64);
        let step = self.i64c(i64::from(self.threads));
        let tid = self.tid()?;
        self.counted(tid, end, step, body)?;
        self.barrier()
    }

    /// `*acc = fma(a[ia], b[ib], *acc)` for f32 tiles `a`, `b` and an f32 stack slot `acc`: one
    /// term of a `dot`.
    fn fma_into(
        &mut self,
        acc: PointerValue<'ctx>,
        fma: FunctionValue<'ctx>,
        (a, ia): (Value, IntValue<'ctx>),
        (b, ib): (Value, IntValue<'ctx>),
    ) -> R<()> {
        let x = self.read(a, ia)?;
        let y = self.read(b, ib)?;
        let cur = self.b.build_load(self.ctx.f32_type(), acc, "").map_err(|e| self.llvm(e))?;
        let nv = self.call(fma, &[x, y, cur])?;
        self.b.build_store(acc, nv).map_err(|e| self.llvm(e))?;
        Ok(())
    }

    /// Emits `body` so that only threads where `cond` holds run it (a branch around it; the
    /// threads meet again after it).
    fn only_where(&mut self, cond: IntValue<'ctx>, body: &mut dyn FnMut(&mut Self) -> R<()>) -> R<()> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let run = self.ctx.append_basic_block(self.func, "only");
        let after = self.ctx.append_basic_block(self.func, "only_done");
        self.b.build_conditional_branch(cond, run, after).map_err(e)?;
        self.b.position_at_end(run);
        body(self)?;
        self.b.build_unconditional_branch(after).map_err(e)?;
        self.b.position_at_end(after);
        Ok(())
    }

    /// A sequential loop over 0..n in every thread.
    fn seq(&mut self, n: u64, body: &mut dyn FnMut(&mut Self, IntValue<'ctx>) -> R<()>) -> R<()> {
        let zero = self.i64c(0);
        let end = self.i64c(n as i64);
        let one = self.i64c(1);
        self.counted(zero, end, one, body)
    }
    fn emit(&mut self) -> R<()> {
        // This block's workspace: scratch + linear block id × scratch bytes (patched below once the
        // size is known, through a placeholder multiply by a global constant).
        let bx = self.sreg("llvm.nvvm.read.ptx.sreg.ctaid.x")?;
        let by = self.sreg("llvm.nvvm.read.ptx.sreg.ctaid.y")?;
        let bz = self.sreg("llvm.nvvm.read.ptx.sreg.ctaid.z")?;
        let nx = self.sreg("llvm.nvvm.read.ptx.sreg.nctaid.x")?;
        let ny = self.sreg("llvm.nvvm.read.ptx.sreg.nctaid.y")?;
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let lin = self.b.build_int_mul(bz, ny, "").map_err(e)?;
        let lin = self.b.build_int_add(lin, by, "").map_err(e)?;
        let lin = self.b.build_int_mul(lin, nx, "").map_err(e)?;
        let lin = self.b.build_int_add(lin, bx, "").map_err(e)?;
        // The workspace size is known only after emission; read it from a global set afterwards.
        let size_global = self.module.add_global(self.ctx.i64_type(), Some(AddressSpace::from(4)), "hlac_scratch_bytes");
        size_global.set_constant(true);
        size_global.set_initializer(&self.ctx.i64_type().const_zero());
        let size = self.b.build_load(self.ctx.i64_type(), size_global.as_pointer_value(), "").map_err(e)?.into_int_value();
        let off = self.b.build_int_mul(lin, size, "").map_err(e)?;
        self.scratch = self.b.build_int_add(self.scratch, off, "").map_err(e)?;
        if self.smem.is_some() {
            // The kernels may rely on a zero-initialised workspace (the global one is zeroed by
            // the runtime); shared memory starts undefined, so clear it.
            let words = shared_size(&self.layout) / 4;
            let zero = self.ctx.i32_type().const_zero();
            self.par(words, &mut |g, i| {
                let off = g.b.build_int_mul(i, g.i64c(4), "").map_err(e)?;
                let ptr = g.smem_ptr(off)?;
                g.b.build_store(ptr, zero).map_err(e)?;
                Ok(())
            })?;
        }
        if self.profiled {
            self.profile_start()?;
        }
        let body = self.p.body.clone();
        self.block(&body)?;
        self.profile_finish()?;
        self.b.build_return(None).map_err(e)?;
        size_global.set_initializer(&self.ctx.i64_type().const_int(self.layout.bytes.max(64), false));
        Ok(())
    }

    fn block(&mut self, b: &Block) -> R<()> {
        for inst in &b.insts {
            // A fused tile is computed where it is read.
            if inst.results.first().is_some_and(|r| self.fusion.fused.contains(r) || self.accumulated.contains(r)) {
                continue;
            }
            // A tile still arriving by asynchronous copies (`contig::load_vectors`) is waited for
            // by the first instruction that reads it, directly or through fused tiles.
            if let Some(last) = self.last_pending_read(&inst.op) {
                self.wait_copies(last)?;
            }
            // Only elementwise operations may run on without a barrier after the one before.
            let elementwise = matches!(inst.op, Op::Unary(..) | Op::Binary(..) | Op::Cmp(..) | Op::Select { .. } | Op::Cast(..));
            if !elementwise {
                self.sync_charged()?;
            }
            self.inst(inst)?;
            self.profile_after(inst)?;
        }
        // A barrier owed inside a block is paid inside it (before a loop's back edge, say), and
        // so are copies still in flight.
        if !self.pending.is_empty() {
            self.wait_copies(self.pending.len() - 1)?;
        }
        self.sync_charged()
    }

    /// The position in [`Gen::pending`] of the latest tile `op` reads (directly or through fused
    /// tiles) whose asynchronous copies may still be in flight.
    fn last_pending_read(&self, op: &Op) -> Option<usize> {
        if self.pending.is_empty() {
            return None;
        }
        let mut operands = Vec::new();
        op.operands(&mut operands);
        let mut leaves = Vec::new();
        for o in operands {
            fuse::leaves(&self.fusion, self.p, o, true, &mut leaves);
        }
        leaves.iter().filter_map(|(v, _)| self.pending.iter().position(|p| p == v)).max()
    }

    /// Waits until the copies of [`Gen::pending`]'s tiles up to position `last` have landed: this
    /// thread's (`cp.async.wait_group` with the younger groups still allowed in flight), then
    /// every thread's (a barrier).
    fn wait_copies(&mut self, last: usize) -> R<()> {
        let younger = (self.pending.len() - 1 - last) as u64;
        let f = self.intrinsic("llvm.nvvm.cp.async.wait.group", &[])?;
        let n = self.ctx.i32_type().const_int(younger, false);
        self.b.build_call(f, &[n.into()], "").map_err(|e| self.llvm(e))?;
        self.pending.drain(..=last);
        self.barrier()
    }

    /// Closes the asynchronous copies issued since the last one into a group for tile `v`.
    pub(super) fn commit_copies(&mut self, v: Value) -> R<()> {
        let f = self.intrinsic("llvm.nvvm.cp.async.commit.group", &[])?;
        self.b.build_call(f, &[], "").map_err(|e| self.llvm(e))?;
        self.pending.push(v);
        Ok(())
    }

    /// [`Gen::sync`], charging the wait to the instruction that owed it in a profile build.
    fn sync_charged(&mut self) -> R<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        self.sync()?;
        self.profile_barrier()
    }

    /// Pays the barrier owed by the elementwise operations emitted since the last one.
    fn sync(&mut self) -> R<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        self.unsynced.clear();
        self.barrier()
    }

    fn f32c(&self, x: f64) -> BasicValueEnum<'ctx> {
        self.ctx.f32_type().const_float(x).into()
    }

    /// e^x = 2^(x·log₂e) on the approximate exponent unit.
    fn exp(&self, x: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let s = self.b.build_float_mul(x.into_float_value(), self.f32c(std::f64::consts::LOG2_E).into_float_value(), "").map_err(e)?;
        let f = self.intrinsic("llvm.nvvm.ex2.approx.f", &[])?;
        self.call(f, &[s.into()])
    }

    /// ln x = log₂x · ln 2.
    fn log(&self, x: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let f = self.intrinsic("llvm.nvvm.lg2.approx.f", &[])?;
        let l = self.call(f, &[x])?;
        Ok(self
            .b
            .build_float_mul(l.into_float_value(), self.f32c(std::f64::consts::LN_2).into_float_value(), "")
            .map_err(|e| self.llvm(e))?
            .into())
    }

    /// ln(1 + x) without cancellation: ln(u) · x / (u − 1) with u = 1 + x (x itself when u = 1).
    fn log1p(&self, x: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let xf = x.into_float_value();
        let one = self.f32c(1.0).into_float_value();
        let u = self.b.build_float_add(one, xf, "").map_err(e)?;
        let lu = self.log(u.into())?.into_float_value();
        let um1 = self.b.build_float_sub(u, one, "").map_err(e)?;
        let ratio = self.quotient(xf.into(), um1.into())?.into_float_value();
        let r = self.b.build_float_mul(lu, ratio, "").map_err(e)?;
        let exact = self.b.build_float_compare(FloatPredicate::OEQ, u, one, "").map_err(e)?;
        self.b.build_select(exact, xf, r, "").map_err(e)
    }

    /// sin or cos after reducing the argument to [−π, π] (the approximate unit is accurate there).
    fn trig(&self, x: BasicValueEnum<'ctx>, name: &str) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let xf = x.into_float_value();
        let inv = self.f32c(1.0 / std::f64::consts::TAU).into_float_value();
        let k = self.b.build_float_mul(xf, inv, "").map_err(e)?;
        let round = self.intrinsic("llvm.rint", &[self.ctx.f32_type().into()])?;
        let k = self.call(round, &[k.into()])?.into_float_value();
        // 2π split in two so that k·2π is subtracted almost exactly (Cody–Waite).
        let hi = self.f32c(6.283_185_482_025_146_5).into_float_value();
        let lo = self.f32c(std::f64::consts::TAU - 6.283_185_482_025_146_5).into_float_value();
        let t = self.b.build_float_mul(k, hi, "").map_err(e)?;
        let r = self.b.build_float_sub(xf, t, "").map_err(e)?;
        let t = self.b.build_float_mul(k, lo, "").map_err(e)?;
        let r = self.b.build_float_sub(r, t, "").map_err(e)?;
        let f = self.intrinsic(name, &[])?;
        self.call(f, &[r.into()])
    }

    fn sigmoid(&self, x: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let n = self.b.build_float_neg(x.into_float_value(), "").map_err(e)?;
        let ex = self.exp(n.into())?.into_float_value();
        let one = self.f32c(1.0).into_float_value();
        let d = self.b.build_float_add(one, ex, "").map_err(e)?;
        self.quotient(one.into(), d.into())
    }

    /// `a / d` inside the elementary functions, whose divisors lie in [2⁻²⁴, 2¹²⁶] (or are +∞,
    /// giving 0, or give a quotient the caller discards): on the approximate unit
    /// (`div.approx.f32`, 2 ulp there, a reciprocal and a multiply) instead of the
    /// IEEE division's dozen-instruction sequence with its slow path. With [`approx`]'s
    /// `HLAC_NVPTX_IEEE=1`, IEEE division.
    fn quotient(&self, a: BasicValueEnum<'ctx>, d: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        if !approx() {
            return Ok(self.b.build_float_div(a.into_float_value(), d.into_float_value(), "").map_err(|e| self.llvm(e))?.into());
        }
        let f = self.intrinsic("llvm.nvvm.div.approx.f", &[])?;
        self.call(f, &[a, d])
    }

    fn unary(&self, op: UnOp, d: DType, x: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let f32t: BasicTypeEnum = self.ctx.f32_type().into();
        Ok(match (op, d) {
            (UnOp::Neg, DType::I64) => self.b.build_int_neg(x.into_int_value(), "").map_err(e)?.into(),
            (UnOp::Abs, DType::I64) => {
                let v = x.into_int_value();
                let n = self.b.build_int_neg(v, "").map_err(e)?;
                let neg = self.b.build_int_compare(IntPredicate::SLT, v, self.i64c(0), "").map_err(e)?;
                self.b.build_select(neg, n, v, "").map_err(e)?
            }
            (UnOp::Not, DType::Bool) => self.b.build_not(x.into_int_value(), "").map_err(e)?.into(),
            (_, DType::F32) => {
                let xf = x.into_float_value();
                match op {
                    UnOp::Neg => self.b.build_float_neg(xf, "").map_err(e)?.into(),
                    UnOp::Abs => self.call(self.intrinsic("llvm.fabs", &[f32t])?, &[x])?,
                    UnOp::Sqrt if approx() => self.call(self.intrinsic("llvm.nvvm.sqrt.approx.f", &[])?, &[x])?,
                    UnOp::Rsqrt if approx() => self.call(self.intrinsic("llvm.nvvm.rsqrt.approx.f", &[])?, &[x])?,
                    UnOp::Sqrt => self.call(self.intrinsic("llvm.sqrt", &[f32t])?, &[x])?,
                    UnOp::Rsqrt => {
                        let s = self.call(self.intrinsic("llvm.sqrt", &[f32t])?, &[x])?.into_float_value();
                        self.b.build_float_div(self.f32c(1.0).into_float_value(), s, "").map_err(e)?.into()
                    }
                    UnOp::Exp => self.exp(x)?,
                    UnOp::Log => self.log(x)?,
                    UnOp::Sin => self.trig(x, "llvm.nvvm.sin.approx.f")?,
                    UnOp::Cos => self.trig(x, "llvm.nvvm.cos.approx.f")?,
                    UnOp::Round => self.call(self.intrinsic("llvm.rint", &[f32t])?, &[x])?,
                    UnOp::Sigmoid => self.sigmoid(x)?,
                    UnOp::Silu => {
                        let s = self.sigmoid(x)?.into_float_value();
                        self.b.build_float_mul(xf, s, "").map_err(e)?.into()
                    }
                    // tanh x = 1 − 2 / (e^{2x} + 1), saturating correctly at both ends.
                    UnOp::Tanh => {
                        let two = self.f32c(2.0).into_float_value();
                        let t = self.b.build_float_mul(xf, two, "").map_err(e)?;
                        let ex = self.exp(t.into())?.into_float_value();
                        let one = self.f32c(1.0).into_float_value();
                        let d = self.b.build_float_add(ex, one, "").map_err(e)?;
                        let q = self.quotient(two.into(), d.into())?.into_float_value();
                        self.b.build_float_sub(one, q, "").map_err(e)?.into()
                    }
                    // log σ(x) = min(x, 0) − log1p(e^{−|x|}); softplus(x) = max(x, 0) + log1p(e^{−|x|}).
                    UnOp::LogSigmoid | UnOp::Softplus => {
                        let a = self.call(self.intrinsic("llvm.fabs", &[f32t])?, &[x])?.into_float_value();
                        let n = self.b.build_float_neg(a, "").map_err(e)?;
                        let ex = self.exp(n.into())?;
                        let l = self.log1p(ex)?.into_float_value();
                        let zero = self.f32c(0.0);
                        if op == UnOp::LogSigmoid {
                            let m = self.call(self.intrinsic("llvm.minnum", &[f32t])?, &[x, zero])?.into_float_value();
                            self.b.build_float_sub(m, l, "").map_err(e)?.into()
                        } else {
                            let m = self.call(self.intrinsic("llvm.maxnum", &[f32t])?, &[x, zero])?.into_float_value();
                            self.b.build_float_add(m, l, "").map_err(e)?.into()
                        }
                    }
                    UnOp::Not => return Err(self.unsupported("`not` on floats")),
                }
            }
            _ => return Err(self.unsupported(format!("{op:?} on {}", d.name()))),
        })
    }

    fn binary(&self, op: BinOp, d: DType, a: BasicValueEnum<'ctx>, b2: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        let f32t: BasicTypeEnum = self.ctx.f32_type().into();
        let i64t: BasicTypeEnum = self.ctx.i64_type().into();
        Ok(match d {
            DType::F32 => {
                let (x, y) = (a.into_float_value(), b2.into_float_value());
                match op {
                    BinOp::Add => self.b.build_float_add(x, y, "").map_err(e)?.into(),
                    BinOp::Sub => self.b.build_float_sub(x, y, "").map_err(e)?.into(),
                    BinOp::Mul => self.b.build_float_mul(x, y, "").map_err(e)?.into(),
                    BinOp::Div => self.b.build_float_div(x, y, "").map_err(e)?.into(),
                    BinOp::Max => self.call(self.intrinsic("llvm.maxnum", &[f32t])?, &[a, b2])?,
                    BinOp::Min => self.call(self.intrinsic("llvm.minnum", &[f32t])?, &[a, b2])?,
                    // a^b = 2^(b · log₂ a).
                    BinOp::Pow => {
                        let lg = self.intrinsic("llvm.nvvm.lg2.approx.f", &[])?;
                        let l = self.call(lg, &[a])?.into_float_value();
                        let t = self.b.build_float_mul(y, l, "").map_err(e)?;
                        self.call(self.intrinsic("llvm.nvvm.ex2.approx.f", &[])?, &[t.into()])?
                    }
                    _ => return Err(self.unsupported(format!("{op:?} on f32"))),
                }
            }
            DType::I64 => {
                let (x, y) = (a.into_int_value(), b2.into_int_value());
                match op {
                    BinOp::Add => self.b.build_int_add(x, y, "").map_err(e)?.into(),
                    BinOp::Sub => self.b.build_int_sub(x, y, "").map_err(e)?.into(),
                    BinOp::Mul => self.b.build_int_mul(x, y, "").map_err(e)?.into(),
                    BinOp::Div => self.b.build_int_signed_div(x, y, "").map_err(e)?.into(),
                    BinOp::Rem => self.b.build_int_signed_rem(x, y, "").map_err(e)?.into(),
                    BinOp::Max => self.call(self.intrinsic("llvm.smax", &[i64t])?, &[a, b2])?,
                    BinOp::Min => self.call(self.intrinsic("llvm.smin", &[i64t])?, &[a, b2])?,
                    _ => return Err(self.unsupported(format!("{op:?} on i64"))),
                }
            }
            DType::Bool => {
                let (x, y) = (a.into_int_value(), b2.into_int_value());
                match op {
                    BinOp::And => self.b.build_and(x, y, "").map_err(e)?.into(),
                    BinOp::Or => self.b.build_or(x, y, "").map_err(e)?.into(),
                    _ => return Err(self.unsupported(format!("{op:?} on bool"))),
                }
            }
            other => return Err(self.unsupported(format!("{op:?} on {}", other.name()))),
        })
    }

    fn compare(&self, op: CmpOp, d: DType, a: BasicValueEnum<'ctx>, b2: BasicValueEnum<'ctx>) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        Ok(if d == DType::F32 {
            let p = match op {
                CmpOp::Lt => FloatPredicate::OLT,
                CmpOp::Le => FloatPredicate::OLE,
                CmpOp::Gt => FloatPredicate::OGT,
                CmpOp::Ge => FloatPredicate::OGE,
                CmpOp::Eq => FloatPredicate::OEQ,
                CmpOp::Ne => FloatPredicate::UNE,
            };
            self.b.build_float_compare(p, a.into_float_value(), b2.into_float_value(), "").map_err(e)?.into()
        } else {
            let p = match op {
                CmpOp::Lt => IntPredicate::SLT,
                CmpOp::Le => IntPredicate::SLE,
                CmpOp::Gt => IntPredicate::SGT,
                CmpOp::Ge => IntPredicate::SGE,
                CmpOp::Eq => IntPredicate::EQ,
                CmpOp::Ne => IntPredicate::NE,
            };
            self.b.build_int_compare(p, a.into_int_value(), b2.into_int_value(), "").map_err(e)?.into()
        })
    }

    fn convert(&self, x: BasicValueEnum<'ctx>, from: DType, to: DType) -> R<BasicValueEnum<'ctx>> {
        let e = |x| self.llvm(x);
        Ok(match (from, to) {
            (a, b) if a == b => x,
            (DType::I64, DType::F32) => self.b.build_signed_int_to_float(x.into_int_value(), self.ctx.f32_type(), "").map_err(e)?.into(),
            (DType::F32, DType::I64) => self.b.build_float_to_signed_int(x.into_float_value(), self.ctx.i64_type(), "").map_err(e)?.into(),
            (DType::Bool, DType::I64) => self.b.build_int_z_extend(x.into_int_value(), self.ctx.i64_type(), "").map_err(e)?.into(),
            (DType::Bool, DType::F32) => self.b.build_unsigned_int_to_float(x.into_int_value(), self.ctx.f32_type(), "").map_err(e)?.into(),
            (DType::I64, DType::Bool) => {
                self.b.build_int_compare(IntPredicate::NE, x.into_int_value(), self.i64c(0), "").map_err(e)?.into()
            }
            (DType::F32, DType::Bool) => {
                let z = self.f32c(0.0).into_float_value();
                self.b.build_float_compare(FloatPredicate::UNE, x.into_float_value(), z, "").map_err(e)?.into()
            }
            _ => return Err(self.unsupported(format!("cast from {} to {}", from.name(), to.name()))),
        })
    }

    /// An elementwise result: scalars directly, tiles in parallel over elements.
    fn elementwise(
        &mut self,
        out: Value,
        operands: &[Value],
        f: &mut dyn FnMut(&mut Self, &[BasicValueEnum<'ctx>]) -> R<BasicValueEnum<'ctx>>,
    ) -> R<()> {
        if self.p.ty(out).is_scalar() {
            let xs = operands.iter().map(|o| self.scalar(*o)).collect::<R<Vec<_>>>()?;
            let r = f(self, &xs)?;
            self.scalars.insert(out, Scalar::Val(r));
            return Ok(());
        }
        self.alloc(out);
        let n = self.p.ty(out).numel();
        // Element i of every tile here is handled by thread i mod threads, as in every other
        // elementwise operation. So a chain of them needs no barrier between its links as long as
        // each byte is touched by one thread only: two regions touched since the last barrier must
        // be the same tile placement (same offset and element size) or disjoint. The layout reuses
        // dead tiles' storage, so a partial overlap (a WAR race across threads) forces a barrier.
        // A fused operand reads its leaves: at the element's own index (same thread), or through a
        // broadcast at another (another thread's element: it clashes with any overlap).
        let mut touched = vec![(out, true)];
        for o in operands {
            fuse::leaves(&self.fusion, self.p, *o, true, &mut touched);
        }
        let regions: Vec<Region> = touched
            .iter()
            .map(|(v, own)| {
                let size = self.tile_elem_bytes(*v);
                Region {
                    at: self.slots.get(v).copied().unwrap_or(0),
                    elem: size,
                    len: self.p.ty(*v).numel() * size as u64,
                    cross: !own,
                    swizzle: self.swizzle.get(v).copied().unwrap_or(0),
                }
            })
            .collect();
        let clash = |a: &Region, b: &Region| {
            let disjoint = a.at + a.len <= b.at || b.at + b.len <= a.at;
            let same_placement = a.at == b.at && a.elem == b.elem && a.swizzle == b.swizzle && !a.cross && !b.cross;
            !disjoint && !same_placement
        };
        if regions.iter().any(|r| self.unsynced.iter().any(|u| clash(r, u))) {
            self.sync()?;
        }
        self.strided(
            n,
            &mut |g, i| {
                let xs = operands.iter().map(|o| g.read(*o, i)).collect::<R<Vec<_>>>()?;
                f(g, &xs)
            },
            &mut |g, i, r| g.write(out, i, r),
        )?;
        self.unsynced.extend(regions);
        Ok(())
    }

    /// Each thread computes elements tid, tid + threads, … of 0..n (`value`) and stores them
    /// (`store`), several per iteration: every value of an iteration first, then the stores. The
    /// workspace is addressed through integers, so neither LLVM nor ptxas may move a load above an
    /// earlier store; computed one after the other, each element would wait out its own reads'
    /// latency (an elementwise pass over a 64 × 128 tile, one element at a time, spent most of
    /// its time stalled on shared-memory loads). No barrier: the caller's.
    fn strided(
        &mut self,
        n: u64,
        value: &mut dyn FnMut(&mut Self, IntValue<'ctx>) -> R<BasicValueEnum<'ctx>>,
        store: &mut dyn FnMut(&mut Self, IntValue<'ctx>, BasicValueEnum<'ctx>) -> R<()>,
    ) -> R<()> {
        let threads = u64::from(self.threads);
        let most = unroll_limit();
        let unroll = [4u64, 2].into_iter().find(|u| *u <= most && n.is_multiple_of(threads * u)).unwrap_or(1);
        let (tid, end, step) = (self.tid()?, self.i64c(n as i64), self.i64c((threads * unroll) as i64));
        self.counted(tid, end, step, &mut |g, i| {
            let mut done = Vec::new();
            for u in 0..unroll {
                let at = if u == 0 { i } else { g.b.build_int_add(i, g.i64c((u * threads) as i64), "").map_err(|x| g.llvm(x))? };
                let x = value(g, at)?;
                done.push((at, x));
            }
            for (at, x) in done {
                store(g, at, x)?;
            }
            Ok(())
        })
    }

    fn copy(&mut self, from: Value, to: Value) -> R<()> {
        if self.slots.get(&from) == self.slots.get(&to) {
            return Ok(());
        }
        let n = self.p.ty(to).numel();
        self.strided(n, &mut |g, i| g.read(from, i), &mut |g, i, x| g.write(to, i, x))?;
        self.barrier()
    }
    /// Per-axis indices of a flat index into `shape`.
    fn unflatten(&self, flat: IntValue<'ctx>, shape: &[u32]) -> R<Vec<IntValue<'ctx>>> {
        let e = |x| self.llvm(x);
        let strides = kir::strides(shape);
        // Element indices are below the tile's size, far under 2³¹: 32-bit division by a constant
        // is a multiply-high, where the 64-bit one is a long emulated sequence.
        let i32t = self.ctx.i32_type();
        let mut rest = self.b.build_int_truncate(flat, i32t, "").map_err(e)?;
        let mut out = Vec::new();
        for s in &strides {
            let s = i32t.const_int(*s as u64, false);
            let q = self.b.build_int_unsigned_div(rest, s, "").map_err(e)?;
            rest = self.b.build_int_unsigned_rem(rest, s, "").map_err(e)?;
            out.push(self.b.build_int_z_extend(q, self.ctx.i64_type(), "").map_err(e)?);
        }
        Ok(out)
    }

    /// A bounds-checked global access; see the module documentation. `d` is the tile's element
    /// type; the element in memory has the pointer's type, and bf16/f16 elements are widened to
    /// f32 on load (`fpext`: `cvt.f32.bf16`, or a shift where the target lacks it) and rounded to
    /// nearest even on store (`fptrunc`: `cvt.rn.bf16.f32` / `cvt.rn.f16.f32`).
    fn guarded(
        &mut self,
        ptr: u32,
        off: IntValue<'ctx>,
        enabled: Option<BasicValueEnum<'ctx>>,
        d: DType,
        store: Option<BasicValueEnum<'ctx>>,
        fallback: f64,
    ) -> R<Option<BasicValueEnum<'ctx>>> {
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        let g = *self.globals.get(&ptr).ok_or_else(|| self.llvm("access through a non-pointer parameter"))?;
        let t = self.reg_type(d)?;
        let fallback: BasicValueEnum = match d {
            DType::F32 => self.f32c(fallback),
            DType::I64 => self.i64c(fallback as i64).into(),
            _ => self.ctx.bool_type().const_zero().into(),
        };
        let pre_enabled = match enabled {
            Some(m) => m.into_int_value(),
            None => self.ctx.bool_type().const_int(1, false),
        };
        let inside = self.b.build_int_compare(IntPredicate::ULT, off, g.len, "").map_err(e)?;
        let oob = self.b.build_not(inside, "").map_err(e)?;
        let report = self.b.build_and(pre_enabled, oob, "").map_err(e)?;
        let go = self.b.build_and(pre_enabled, inside, "").map_err(e)?;
        let cur = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        let rep_bb = self.ctx.append_basic_block(self.func, "oob");
        let after_rep = self.ctx.append_basic_block(self.func, "checked");
        self.b.build_conditional_branch(report, rep_bb, after_rep).map_err(e)?;
        self.b.position_at_end(rep_bb);
        let err_ptr = self.b.build_int_to_ptr(self.error, self.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)?;
        self.b.build_store(err_ptr, self.i64c(i64::from(ptr) + 1)).map_err(e)?;
        self.b.build_unconditional_branch(after_rep).map_err(e)?;
        self.b.position_at_end(after_rep);
        let _ = cur;
        let do_bb = self.ctx.append_basic_block(self.func, "access");
        let join = self.ctx.append_basic_block(self.func, "joined");
        let from = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        self.b.build_conditional_branch(go, do_bb, join).map_err(e)?;
        self.b.position_at_end(do_bb);
        let stored = self.stored_type(ptr)?;
        let narrow = match stored {
            DType::Bf16 => Some(self.ctx.bf16_type()),
            DType::F16 => Some(self.ctx.f16_type()),
            _ => None,
        };
        let byte = self.b.build_int_mul(off, self.i64c(i64::from(stored.bytes())), "").map_err(e)?;
        let addr = self.b.build_int_add(g.addr, byte, "").map_err(e)?;
        let p = self.b.build_int_to_ptr(addr, self.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)?;
        let loaded = match (store, narrow) {
            (Some(x), Some(nt)) => {
                let x = self.b.build_float_trunc(x.into_float_value(), nt, "").map_err(e)?;
                self.b.build_store(p, x).map_err(e)?;
                None
            }
            (Some(x), None) => {
                self.b.build_store(p, x).map_err(e)?;
                None
            }
            (None, Some(nt)) => {
                let x = self.b.build_load(nt, p, "").map_err(e)?.into_float_value();
                Some(self.b.build_float_ext(x, self.ctx.f32_type(), "").map_err(e)?.into())
            }
            (None, None) => Some(self.b.build_load(t, p, "").map_err(e)?),
        };
        let do_end = self.b.get_insert_block().ok_or_else(|| self.llvm("no insertion block"))?;
        self.b.build_unconditional_branch(join).map_err(e)?;
        self.b.position_at_end(join);
        Ok(match loaded {
            Some(x) => {
                let phi = self.b.build_phi(t, "").map_err(e)?;
                phi.add_incoming(&[(&x, do_end), (&fallback, from)]);
                Some(phi.as_basic_value())
            }
            None => None,
        })
    }

    /// A bounds-checked global load without a branch: an access that is masked off or out of
    /// bounds reads the (valid) error word instead and yields `fallback`. Returns the value and
    /// whether the access was out of bounds (for [`Gen::report_if`]).
    fn load_checked(
        &mut self,
        ptr: u32,
        off: IntValue<'ctx>,
        enabled: Option<BasicValueEnum<'ctx>>,
        d: DType,
        fallback: f64,
    ) -> R<(BasicValueEnum<'ctx>, IntValue<'ctx>)> {
        let e = |x| self.llvm(x);
        let g = *self.globals.get(&ptr).ok_or_else(|| self.llvm("access through a non-pointer parameter"))?;
        let stored = self.stored_type(ptr)?;
        let fallback: BasicValueEnum = match d {
            DType::F32 => self.f32c(fallback),
            DType::I64 => self.i64c(fallback as i64).into(),
            _ => self.ctx.bool_type().const_zero().into(),
        };
        let enabled = match enabled {
            Some(m) => m.into_int_value(),
            None => self.ctx.bool_type().const_int(1, false),
        };
        let inside = self.b.build_int_compare(IntPredicate::ULT, off, g.len, "").map_err(e)?;
        let outside = self.b.build_not(inside, "").map_err(e)?;
        let report = self.b.build_and(enabled, outside, "").map_err(e)?;
        let ok = self.b.build_and(enabled, inside, "").map_err(e)?;
        let byte = self.b.build_int_mul(off, self.i64c(i64::from(stored.bytes())), "").map_err(e)?;
        let addr = self.b.build_int_add(g.addr, byte, "").map_err(e)?;
        let addr = self.b.build_select(ok, addr, self.error, "").map_err(e)?.into_int_value();
        let p = self.b.build_int_to_ptr(addr, self.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)?;
        let x: BasicValueEnum = match stored {
            DType::Bf16 | DType::F16 => {
                let nt = if stored == DType::Bf16 { self.ctx.bf16_type() } else { self.ctx.f16_type() };
                let x = self.b.build_load(nt, p, "").map_err(e)?.into_float_value();
                self.b.build_float_ext(x, self.ctx.f32_type(), "").map_err(e)?.into()
            }
            _ => self.b.build_load(self.reg_type(d)?, p, "").map_err(e)?,
        };
        let x = self.b.build_select(ok, x, fallback, "").map_err(e)?;
        Ok((x, report))
    }

    /// The element type in memory of pointer parameter `ptr`.
    fn stored_type(&self, ptr: u32) -> R<DType> {
        match self.p.params.get(ptr as usize).map(|x| &x.kind) {
            Some(ParamKind::Ptr { dtype, .. }) => Ok(*dtype),
            _ => Err(self.llvm("access through a non-pointer parameter")),
        }
    }

    /// Element `at` of `load ptr[offsets] mask … else other` through [`Gen::load_checked`], its
    /// out-of-bounds flag ORed into `report` (for one [`Gen::report_if`] after several).
    #[allow(clippy::too_many_arguments)]
    fn load_element(
        &mut self,
        ptr: u32,
        offsets: Value,
        mask: Option<Value>,
        at: IntValue<'ctx>,
        d: DType,
        other: f64,
        report: &mut IntValue<'ctx>,
    ) -> R<BasicValueEnum<'ctx>> {
        let off = self.read(offsets, at)?.into_int_value();
        let en = match mask {
            Some(m) => Some(self.read(m, at)?),
            None => None,
        };
        let (x, bad) = self.load_checked(ptr, off, en, d, other)?;
        *report = self.b.build_or(*report, bad, "").map_err(|x| self.llvm(x))?;
        Ok(x)
    }

    /// Element `at` of a `store` (its offset, value and mask read from their tiles), bounds-checked:
    /// the scalar store's body and the vector store's fallback for a group it cannot move whole.
    fn store_element(&mut self, ptr: u32, offsets: Value, value: Value, mask: Option<Value>, at: IntValue<'ctx>, d: DType) -> R<()> {
        let off = self.read(offsets, at)?.into_int_value();
        let x = self.read(value, at)?;
        let en = match mask {
            Some(m) => Some(self.read(m, at)?),
            None => None,
        };
        self.guarded(ptr, off, en, d, Some(x), 0.0)?;
        Ok(())
    }

    /// Records an out-of-bounds access through pointer `ptr` in the error word when `bad` holds.
    fn report_if(&mut self, bad: IntValue<'ctx>, ptr: u32) -> R<()> {
        let e = |x| self.llvm(x);
        let rep = self.ctx.append_basic_block(self.func, "oob");
        let after = self.ctx.append_basic_block(self.func, "checked");
        self.b.build_conditional_branch(bad, rep, after).map_err(e)?;
        self.b.position_at_end(rep);
        let err_ptr = self.b.build_int_to_ptr(self.error, self.ctx.ptr_type(AddressSpace::from(1)), "").map_err(e)?;
        self.b.build_store(err_ptr, self.i64c(i64::from(ptr) + 1)).map_err(e)?;
        self.b.build_unconditional_branch(after).map_err(e)?;
        self.b.position_at_end(after);
        Ok(())
    }

    fn zero(&self, d: DType, op: ReduceOp) -> R<BasicValueEnum<'ctx>> {
        Ok(match (d, op) {
            (DType::F32, ReduceOp::Sum) => self.f32c(0.0),
            (DType::F32, ReduceOp::Max) => self.f32c(f64::NEG_INFINITY),
            (DType::F32, ReduceOp::Min) => self.f32c(f64::INFINITY),
            (DType::I64, ReduceOp::Sum) => self.i64c(0).into(),
            (DType::I64, ReduceOp::Max) => self.i64c(i64::MIN).into(),
            (DType::I64, ReduceOp::Min) => self.i64c(i64::MAX).into(),
            _ => return Err(self.unsupported(format!("reduction over {}", d.name()))),
        })
    }

    fn inst(&mut self, inst: &kir::Inst) -> R<()> {
        let out = inst.results.first().copied();
        let res = || out.ok_or_else(|| NvptxError::Llvm { kernel: String::new(), message: "an instruction without a result".into() });
        let e = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
        match &inst.op {
            Op::ProgramId(a) => {
                let name = ["llvm.nvvm.read.ptx.sreg.ctaid.x", "llvm.nvvm.read.ptx.sreg.ctaid.y", "llvm.nvvm.read.ptx.sreg.ctaid.z"]
                    [usize::from(*a).min(2)];
                let v = self.sreg(name)?;
                self.scalars.insert(res()?, Scalar::Val(v.into()));
            }
            Op::Param(i) => {
                let v = *self.ints.get(i).ok_or_else(|| self.llvm("param of a pointer"))?;
                self.scalars.insert(res()?, Scalar::Val(v.into()));
            }
            Op::Const(c) => {
                let v: BasicValueEnum = match c {
                    Const::Float(f) => self.f32c(*f),
                    Const::Int(i) => self.i64c(*i).into(),
                    Const::Bool(b) => self.ctx.bool_type().const_int(u64::from(*b), false).into(),
                };
                self.scalars.insert(res()?, Scalar::Val(v));
            }
            Op::Table(xs) => {
                let out = res()?;
                self.alloc(out);
                // Thread 0 writes the (short) table; the barrier publishes it.
                let zero = self.i64c(0);
                let first = self.b.build_int_compare(IntPredicate::EQ, self.tid()?, zero, "").map_err(e)?;
                self.only_where(first, &mut |g| {
                    for (i, x) in xs.iter().enumerate() {
                        let at = g.i64c(i as i64);
                        g.write(out, at, g.f32c(*x))?;
                    }
                    Ok(())
                })?;
                self.barrier()?;
            }
            Op::Iota(n) => {
                let out = res()?;
                self.alloc(out);
                self.par(u64::from(*n), &mut |g, i| g.write(out, i, i.into()))?;
            }
            Op::Unary(op, a) => {
                let d = self.p.ty(*a).dtype;
                let op = *op;
                self.elementwise(res()?, &[*a], &mut |g, x| g.unary(op, d, x[0]))?;
            }
            Op::Binary(op, a, b2) => {
                let d = self.p.ty(*a).dtype;
                let op = *op;
                self.elementwise(res()?, &[*a, *b2], &mut |g, x| g.binary(op, d, x[0], x[1]))?;
            }
            Op::Cmp(op, a, b2) => {
                let d = self.p.ty(*a).dtype;
                let op = *op;
                self.elementwise(res()?, &[*a, *b2], &mut |g, x| g.compare(op, d, x[0], x[1]))?;
            }
            Op::Select { cond, then, otherwise } => {
                self.elementwise(res()?, &[*cond, *then, *otherwise], &mut |g, x| {
                    g.b.build_select(x[0].into_int_value(), x[1], x[2], "").map_err(|err| g.llvm(err))
                })?;
            }
            Op::Cast(a, to) => {
                let from = self.p.ty(*a).dtype;
                let to = *to;
                self.elementwise(res()?, &[*a], &mut |g, x| g.convert(x[0], from, to))?;
            }
            Op::Reshape(a) => {
                let out = res()?;
                if self.p.ty(*a).is_scalar() {
                    let x = self.scalar(*a)?;
                    self.alloc(out);
                    // One thread writes; the barrier publishes it.
                    let zero = self.i64c(0);
                    let first = self.b.build_int_compare(IntPredicate::EQ, self.tid()?, zero, "").map_err(e)?;
                    self.only_where(first, &mut |g| g.write(out, zero, x))?;
                    self.barrier()?;
                } else if self.p.ty(out).is_scalar() {
                    let x = self.read(*a, self.i64c(0))?;
                    self.scalars.insert(out, Scalar::Val(x));
                    // As above: the storage may be reused by the next instruction.
                    self.barrier()?;
                } else {
                    let at = self.slots.get(a).copied().unwrap_or(0);
                    self.slots.insert(out, at);
                }
            }
            Op::Broadcast(a) => {
                let out = res()?;
                let a = *a;
                self.alloc(out);
                if self.p.ty(a).is_scalar() {
                    let x = self.scalar(a)?;
                    self.par(self.p.ty(out).numel(), &mut |g, i| g.write(out, i, x))?;
                } else {
                    let read = &mut |g: &mut Self, i| {
                        let src = g.broadcast_source(a, out, i)?;
                        g.read(a, src)
                    };
                    self.strided(self.p.ty(out).numel(), read, &mut |g, i, x| g.write(out, i, x))?;
                    self.barrier()?;
                }
            }
            Op::Transpose(a) => {
                let out = res()?;
                let a = *a;
                self.alloc(out);
                let read = &mut |g: &mut Self, i| {
                    let src = g.transposed(out, i)?;
                    g.read(a, src)
                };
                self.strided(self.p.ty(out).numel(), read, &mut |g, i, x| g.write(out, i, x))?;
                self.barrier()?;
            }
            Op::Load { ptr, offsets, mask, other } => {
                let out = res()?;
                let d = self.p.ty(out).dtype;
                let (offsets, mask, other, ptr) = (*offsets, *mask, *other, *ptr);
                self.alloc(out);
                let w = self.vector_width(ptr, offsets, mask, out);
                if w > 1 {
                    self.load_vectors(out, ptr, offsets, mask, other, w)?;
                    self.barrier()?;
                    return Ok(());
                }
                // Each thread issues `unroll` loads before it writes any: independent loads in
                // flight instead of one round trip to memory after another.
                let n = self.p.ty(out).numel();
                let threads = u64::from(self.threads);
                let unroll = [4u64, 2].into_iter().find(|u| n.is_multiple_of(threads * u)).unwrap_or(1);
                let (tid, end, step) = (self.tid()?, self.i64c(n as i64), self.i64c((threads * unroll) as i64));
                self.counted(tid, end, step, &mut |g, i| {
                    let mut loaded = Vec::new();
                    let mut report = g.ctx.bool_type().const_zero();
                    for u in 0..unroll {
                        let at = g.b.build_int_add(i, g.i64c((u * threads) as i64), "").map_err(|x| g.llvm(x))?;
                        let x = g.load_element(ptr, offsets, mask, at, d, other, &mut report)?;
                        loaded.push((at, x));
                    }
                    g.report_if(report, ptr)?;
                    for (at, x) in loaded {
                        g.write(out, at, x)?;
                    }
                    Ok(())
                })?;
                self.barrier()?;
            }
            Op::Store { ptr, offsets, value, mask } => {
                let d = self.p.ty(*value).dtype;
                let (offsets, mask, value, ptr) = (*offsets, *mask, *value, *ptr);
                // HLAC_NVPTX_VECTOR=loads keeps stores element by element (A/B of the two).
                let loads_only = std::env::var("HLAC_NVPTX_VECTOR").is_ok_and(|v| v == "loads");
                let w = if loads_only { 1 } else { self.vector_width(ptr, offsets, mask, value) };
                if w > 1 {
                    self.store_vectors(ptr, offsets, value, mask, w)?;
                    return self.barrier();
                }
                self.par(self.p.ty(value).numel(), &mut |g, i| g.store_element(ptr, offsets, value, mask, i, d))?;
            }
            Op::Reduce(op, a, axis) => {
                let out = res()?;
                let (op, a, axis) = (*op, *a, *axis);
                let d = self.p.ty(a).dtype;
                let t = self.reg_type(d)?;
                let (outer, extent, inner) = kir::split(&self.p.ty(a).shape, axis);
                let acc = self.stack_slot(t)?;
                let bop = match op {
                    ReduceOp::Sum => BinOp::Add,
                    ReduceOp::Max => BinOp::Max,
                    ReduceOp::Min => BinOp::Min,
                };
                let scalar_out = self.p.ty(out).is_scalar();
                if !scalar_out {
                    self.alloc(out);
                }
                if !scalar_out && inner == 1 && extent >= 16 && d == DType::F32 {
                    return self.reduce_rows_warp(out, a, op, outer, extent);
                }
                // Every thread computes each output when the result is a scalar (it is needed by
                // all); otherwise output elements are shared out among the threads.
                let mut body = |g: &mut Self, o_n: IntValue<'ctx>| -> R<()> {
                    let eb = |x| g.llvm(x);
                    let o = g.b.build_int_signed_div(o_n, g.i64c(inner as i64), "").map_err(eb)?;
                    let n = g.b.build_int_signed_rem(o_n, g.i64c(inner as i64), "").map_err(|x| g.llvm(x))?;
                    let z = g.zero(d, op)?;
                    g.b.build_store(acc, z).map_err(|x| g.llvm(x))?;
                    g.seq(extent, &mut |g, k| {
                        let t1 = g.b.build_int_mul(o, g.i64c(extent as i64), "").map_err(|x| g.llvm(x))?;
                        let t2 = g.b.build_int_add(t1, k, "").map_err(|x| g.llvm(x))?;
                        let t3 = g.b.build_int_mul(t2, g.i64c(inner as i64), "").map_err(|x| g.llvm(x))?;
                        let idx = g.b.build_int_add(t3, n, "").map_err(|x| g.llvm(x))?;
                        let x = g.read(a, idx)?;
                        let cur = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
                        let nv = g.binary(bop, d, cur, x)?;
                        g.b.build_store(acc, nv).map_err(|x| g.llvm(x))?;
                        Ok(())
                    })?;
                    if !scalar_out {
                        let v = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
                        g.write(out, o_n, v)?;
                    }
                    Ok(())
                };
                if scalar_out {
                    body(self, self.i64c(0))?;
                    let v = self.b.build_load(t, acc, "").map_err(e)?;
                    self.scalars.insert(out, Scalar::Val(v));
                    // Every thread read the tile; none may reuse its storage until all have.
                    self.barrier()?;
                } else {
                    self.par(outer * inner, &mut body)?;
                }
            }
            Op::Scan { value, axis, reverse, decay } => {
                let out = res()?;
                let (a, axis, reverse, decay) = (*value, *axis, *reverse, *decay);
                let (outer, extent, inner) = kir::split(&self.p.ty(a).shape, axis);
                self.alloc(out);
                if decay.is_none() && self.scan_sum_warp(out, a, (outer, extent, inner), reverse)? {
                    return Ok(());
                }
                let t: BasicTypeEnum = self.ctx.f32_type().into();
                let acc = self.stack_slot(t)?;
                self.par(outer * inner, &mut |g, o_n| {
                    let o = g.b.build_int_signed_div(o_n, g.i64c(inner as i64), "").map_err(|x| g.llvm(x))?;
                    let n = g.b.build_int_signed_rem(o_n, g.i64c(inner as i64), "").map_err(|x| g.llvm(x))?;
                    g.b.build_store(acc, g.f32c(0.0)).map_err(|x| g.llvm(x))?;
                    let at = |g: &Self, k: IntValue<'ctx>| -> R<IntValue<'ctx>> {
                        let t1 = g.b.build_int_mul(o, g.i64c(extent as i64), "").map_err(|x| g.llvm(x))?;
                        let t2 = g.b.build_int_add(t1, k, "").map_err(|x| g.llvm(x))?;
                        let t3 = g.b.build_int_mul(t2, g.i64c(inner as i64), "").map_err(|x| g.llvm(x))?;
                        g.b.build_int_add(t3, n, "").map_err(|x| g.llvm(x))
                    };
                    // Steps go in groups of `unroll`: a group's loads first, all in flight
                    // together, then its chain of adds and its stores (one step at a time, each
                    // step waited out its own load's latency).
                    let most = if unroll_limit() == 1 { 1 } else { 8 };
                    let unroll = [8u64, 4, 2].into_iter().find(|u| *u <= most && extent.is_multiple_of(*u)).unwrap_or(1);
                    g.seq(extent / unroll, &mut |g, group| {
                        let last = g.i64c(extent as i64 - 1);
                        let mut steps = Vec::with_capacity(unroll as usize);
                        for u in 0..unroll {
                            let e = g.b.build_int_mul(group, g.i64c(unroll as i64), "").map_err(|x| g.llvm(x))?;
                            let e = g.b.build_int_add(e, g.i64c(u as i64), "").map_err(|x| g.llvm(x))?;
                            let k = if reverse { g.b.build_int_sub(last, e, "").map_err(|x| g.llvm(x))? } else { e };
                            let idx = at(g, k)?;
                            let x = g.read(a, idx)?.into_float_value();
                            // As on the CPU: d at k (forward) or k + 1 (reverse, clamped on the
                            // first step, whose product is discarded).
                            let m = match decay {
                                Some(d) => {
                                    let km = if reverse {
                                        let next = g.b.build_int_add(k, g.i64c(1), "").map_err(|x| g.llvm(x))?;
                                        let over = g.b.build_int_compare(IntPredicate::SGT, next, last, "").map_err(|x| g.llvm(x))?;
                                        g.b.build_select(over, last, next, "").map_err(|x| g.llvm(x))?.into_int_value()
                                    } else {
                                        k
                                    };
                                    let im = at(g, km)?;
                                    Some(g.read(d, im)?.into_float_value())
                                }
                                None => None,
                            };
                            steps.push((e, idx, x, m));
                        }
                        for (e, idx, x, m) in steps {
                            let cur = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?.into_float_value();
                            let nv = match m {
                                // LLVM may contract the multiply and add into one FMA (within the
                                // f32 tolerance).
                                Some(m) => {
                                    let p = g.b.build_float_mul(m, cur, "").map_err(|x| g.llvm(x))?;
                                    let s = g.b.build_float_add(p, x, "").map_err(|x| g.llvm(x))?;
                                    let first = g.b.build_int_compare(IntPredicate::EQ, e, g.i64c(0), "").map_err(|x| g.llvm(x))?;
                                    g.b.build_select(first, x, s, "").map_err(|x| g.llvm(x))?.into_float_value()
                                }
                                None => g.b.build_float_add(cur, x, "").map_err(|x| g.llvm(x))?,
                            };
                            g.b.build_store(acc, nv).map_err(|x| g.llvm(x))?;
                            g.write(out, idx, nv.into())?;
                        }
                        Ok(())
                    })
                })?;
            }
            Op::Dot(a, b2) => {
                let out = res()?;
                let (a, b2) = (*a, *b2);
                if let Some(&(sum, addend)) = self.accum.get(&out) {
                    return match self.dot_mma_from(sum, a, b2, Some(addend))? {
                        true => Ok(()),
                        false => Err(self.llvm(format!("{out} was to be accumulated on the tensor cores"))),
                    };
                }
                if self.dot_mma(out, a, b2)? {
                    return Ok(());
                }
                let (m, k) = (self.p.ty(a).shape[0], self.p.ty(a).shape[1]);
                let n = self.p.ty(b2).shape[1];
                if self.dot_split_k(out, a, b2)? {
                    return Ok(());
                }
                self.alloc(out);
                let t: BasicTypeEnum = self.ctx.f32_type().into();
                let acc = self.stack_slot(t)?;
                let fma = self.intrinsic("llvm.fma", &[t])?;
                self.par(u64::from(m) * u64::from(n), &mut |g, ij| {
                    let i = g.b.build_int_signed_div(ij, g.i64c(i64::from(n)), "").map_err(|x| g.llvm(x))?;
                    let j = g.b.build_int_signed_rem(ij, g.i64c(i64::from(n)), "").map_err(|x| g.llvm(x))?;
                    g.b.build_store(acc, g.f32c(0.0)).map_err(|x| g.llvm(x))?;
                    g.seq(u64::from(k), &mut |g, l| {
                        let ia = g.b.build_int_mul(i, g.i64c(i64::from(k)), "").map_err(|x| g.llvm(x))?;
                        let ia = g.b.build_int_add(ia, l, "").map_err(|x| g.llvm(x))?;
                        let ib = g.b.build_int_mul(l, g.i64c(i64::from(n)), "").map_err(|x| g.llvm(x))?;
                        let ib = g.b.build_int_add(ib, j, "").map_err(|x| g.llvm(x))?;
                        g.fma_into(acc, fma, (a, ia), (b2, ib))
                    })?;
                    let v = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
                    g.write(out, ij, v)
                })?;
            }
            Op::TriInv(a) => {
                let out = res()?;
                let a = *a;
                let n = self.p.ty(a).shape[0];
                let nn = i64::from(n);
                self.alloc(out);
                if tri::blocked(n) {
                    return self.tri_inv_blocked(a, out, n);
                }
                let t: BasicTypeEnum = self.ctx.f32_type().into();
                let acc = self.stack_slot(t)?;
                let fma = self.intrinsic("llvm.fma", &[t])?;
                // Column j of the inverse depends only on column j (X[i][j] = −Σ_{j≤k<i} L[i][k]·X[k][j]
                // with X[j][j] = 1): each thread solves whole columns top to bottom, reading back
                // only what it wrote itself, so the solve needs no barrier until the end.
                self.par(u64::from(n), &mut |g, j| {
                    let ex = |x| NvptxError::Llvm { kernel: String::new(), message: format!("{x}") };
                    g.seq(u64::from(n), &mut |g, i| {
                        let here = g.b.build_int_mul(i, g.i64c(nn), "").map_err(ex)?;
                        let here = g.b.build_int_add(here, j, "").map_err(ex)?;
                        let below = g.b.build_int_compare(IntPredicate::SGT, i, j, "").map_err(ex)?;
                        let lower = g.ctx.append_basic_block(g.func, "lower");
                        let upper = g.ctx.append_basic_block(g.func, "upper");
                        let done = g.ctx.append_basic_block(g.func, "tri_done");
                        g.b.build_conditional_branch(below, lower, upper).map_err(ex)?;
                        g.b.position_at_end(upper);
                        let eq = g.b.build_int_compare(IntPredicate::EQ, i, j, "").map_err(ex)?;
                        let v = g.b.build_select(eq, g.f32c(1.0), g.f32c(0.0), "").map_err(ex)?;
                        g.write(out, here, v)?;
                        g.b.build_unconditional_branch(done).map_err(ex)?;
                        g.b.position_at_end(lower);
                        let lij = g.read(a, here)?;
                        g.b.build_store(acc, lij).map_err(ex)?;
                        let from = g.b.build_int_add(j, g.i64c(1), "").map_err(ex)?;
                        let one = g.i64c(1);
                        let row = g.b.build_int_mul(i, g.i64c(nn), "").map_err(ex)?;
                        g.counted(from, i, one, &mut |g, k| {
                            let ik = g.b.build_int_add(row, k, "").map_err(|x| g.llvm(x))?;
                            let kj = g.b.build_int_mul(k, g.i64c(nn), "").map_err(|x| g.llvm(x))?;
                            let kj = g.b.build_int_add(kj, j, "").map_err(|x| g.llvm(x))?;
                            let l = g.read(a, ik)?;
                            let tv = g.read(out, kj)?;
                            let cur = g.b.build_load(t, acc, "").map_err(|x| g.llvm(x))?;
                            let nv = g.call(fma, &[l, tv, cur])?;
                            g.b.build_store(acc, nv).map_err(|x| g.llvm(x))?;
                            Ok(())
                        })?;
                        let s = g.b.build_load(t, acc, "").map_err(ex)?.into_float_value();
                        let v = g.b.build_float_neg(s, "").map_err(ex)?;
                        g.write(out, here, v.into())?;
                        g.b.build_unconditional_branch(done).map_err(ex)?;
                        g.b.position_at_end(done);
                        Ok(())
                    })
                })?;
            }
            Op::For { lo, hi, step, init, body } => {
                let results = inst.results.clone();
                let lo = self.scalar(*lo)?.into_int_value();
                let hi = self.scalar(*hi)?.into_int_value();
                let step = self.scalar(*step)?.into_int_value();
                for (k, arg) in body.args.iter().skip(1).enumerate() {
                    if self.p.ty(*arg).is_scalar() {
                        let t = self.reg_type(self.p.ty(*arg).dtype)?;
                        let slot = self.stack_slot(t)?;
                        let x = self.scalar(init[k])?;
                        self.b.build_store(slot, x).map_err(e)?;
                        self.scalars.insert(*arg, Scalar::Slot(slot, t));
                        self.scalars.insert(results[k], Scalar::Slot(slot, t));
                    } else {
                        let at = self.alloc(*arg);
                        self.copy(init[k], *arg)?;
                        self.slots.insert(results[k], at);
                    }
                }
                let index_t: BasicTypeEnum = self.ctx.i64_type().into();
                let index = self.stack_slot(index_t)?;
                self.scalars.insert(body.args[0], Scalar::Slot(index, index_t));
                let body = body.clone();
                let args = body.args.clone();
                // The index lives in a stack slot so the body can read it as a kir scalar.
                self.counted(lo, hi, step, &mut |g, i| {
                    g.b.build_store(index, i).map_err(|x| g.llvm(x))?;
                    g.block(&body)?;
                    if let Some(kir::Inst { op: Op::Yield(next), .. }) = body.insts.last() {
                        let mut scalar_next = Vec::new();
                        for (k, arg) in args.iter().skip(1).enumerate() {
                            if g.p.ty(*arg).is_scalar() {
                                scalar_next.push((*arg, g.scalar(next[k])?));
                            }
                        }
                        for (k, arg) in args.iter().skip(1).enumerate() {
                            if !g.p.ty(*arg).is_scalar() {
                                g.copy(next[k], *arg)?;
                            }
                        }
                        for (arg, x) in scalar_next {
                            if let Some(Scalar::Slot(p, _)) = g.scalars.get(&arg).copied() {
                                g.b.build_store(p, x).map_err(|x| g.llvm(x))?;
                            }
                        }
                    }
                    Ok(())
                })?;
            }
            Op::Yield(_) => {}
        }
        Ok(())
    }
}

/// The ptxas to assemble with: `HLAC_PTXAS`, else `ptxas` on PATH, else the one `.ci/deps`
/// installs under `.deps/` in the working directory.
pub fn find_ptxas() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("HLAC_PTXAS").map(std::path::PathBuf::from),
        Some(std::path::PathBuf::from("ptxas")),
        Some(std::path::PathBuf::from(".deps/nvcc/nvidia/cuda_nvcc/bin/ptxas")),
    ];
    candidates.into_iter().flatten().find(|p| std::process::Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Assembles PTX to a cubin for `device` with ptxas; the error is ptxas's message.
pub fn assemble(ptxas: &std::path::Path, ptx: &str, device: &str) -> Result<Vec<u8>, String> {
    let dir = std::env::temp_dir().join(format!(
        "hlac-ptxas-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("k.ptx");
    let out = dir.join("k.cubin");
    let result = (|| {
        std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
        let run = std::process::Command::new(ptxas)
            .arg(format!("-arch={device}"))
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .output()
            .map_err(|e| e.to_string())?;
        if !run.status.success() {
            return Err(String::from_utf8_lossy(&run.stderr).into_owned());
        }
        std::fs::read(&out).map_err(|e| e.to_string())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
