//! Lowering: from a classified recurrence (or attention, conv, norm) to kernel-IR programs. Each
//! algorithm is written once here, generically over its class; the gate activations, keys, values
//! and queries a declaration states are compiled into the kernels ([`expr`]), so a recurrence a user
//! declares gets its kernels with no new code. Stops at kernel IR; back ends take it from there.

pub mod attention;
pub mod chunk;
pub mod chunk_bwd;
pub mod decay;
pub mod decode;
pub mod delta;
pub mod delta_bwd;
pub mod expr;
pub mod grad;
pub mod layer_pieces;
pub mod pieces;
pub mod scan;

use hlac_runtime::kir::{DType, Program};

use crate::classify::RecurrenceClass;
use crate::mixer::Math;

/// Why a recurrence could not be lowered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot lower `{mixer}`: {reason}")]
pub struct LowerError {
    /// The mixer.
    pub mixer: String,
    /// What is not implemented or not possible.
    pub reason: String,
}

/// Everything a lowering needs to know about one recurrence.
#[derive(Debug, Clone)]
pub struct Recurrence<'a> {
    /// The mixer's name (for kernel names and errors).
    pub name: &'a str,
    /// Its class and expressions.
    pub class: &'a RecurrenceClass,
    /// Its per-head math (axis names and sizes, token inputs).
    pub math: &'a Math,
    /// Number of heads.
    pub heads: u64,
    /// Element type of the token tensors in memory ([`storage`]).
    pub storage: DType,
}

/// The storage dtype of a model's activations: the element type in memory of every token tensor
/// a kernel reads or writes — a recurrence's token inputs (q, k, v, gates), its output `o`, their
/// gradients (`do`, `dq`, …), attention's q, k, v, o and KV cache, the conv's and norms' x, y, g
/// and gradients. Everything else stays f32 whatever the target's dtype, as in fla: recurrent
/// states (`h0`, `ht`, `states`, decode's `state`, the conv cache) and their gradients, per-head
/// parameters and `lower_bound` and their gradients, attention's `lse`, conv and norm weights and
/// their partial gradients. Kernels compute in f32 either way (the kernel IR converts at loads and
/// stores), so this only changes what crosses the memory boundary. f32 unless the target says
/// otherwise (the cpu target is always f32).
pub fn storage(dtype: crate::ir::DType) -> DType {
    match dtype {
        crate::ir::DType::F32 => DType::F32,
        crate::ir::DType::Bf16 => DType::Bf16,
        crate::ir::DType::F16 => DType::F16,
    }
}

/// Rejects a storage dtype that is not a float type (the lowerings' callers choose it).
fn check_storage(kernel: &str, dtype: DType) -> Result<(), LowerError> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(LowerError { mixer: kernel.to_string(), reason: format!("storage dtype {} is not a float type", dtype.name()) })
    }
}

/// Static choices of a kernel variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tokens per chunk.
    pub chunk: u32,
    /// Value columns per program instance (must divide V).
    pub block_v: u32,
    /// For vector gates: rows per sub-block of the intra-chunk product (algorithms.md §1.2:
    /// anchored matrix products between sub-blocks, pairwise exponentials only inside the
    /// diagonal ones); 0 computes the whole chunk pairwise. Used when it divides the chunk and is
    /// smaller than it.
    pub sub_block: u32,
}

impl Recurrence<'_> {
    /// The key size K.
    pub fn k(&self) -> u32 {
        self.math.key_axis.1 as u32
    }

    /// The value size V.
    pub fn v(&self) -> u32 {
        self.math.value_axis.1 as u32
    }

    fn error(&self, reason: impl Into<String>) -> LowerError {
        LowerError { mixer: self.name.to_string(), reason: reason.into() }
    }

    /// Rejects a non-float [`Recurrence::storage`].
    fn check_storage(&self) -> Result<(), LowerError> {
        check_storage(self.name, self.storage)
    }
}

/// A lowered kernel with what its launcher needs to know.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The program.
    pub program: Program,
    /// How many instances run on each grid axis, as a description (`sequences * heads`, …).
    pub grid: Vec<String>,
}

/// The forward kernel of a recurrence, by its family (for the elementwise scan, `block_v` is the
/// channel block and the grid is sequences × ⌈heads / block_v⌉).
pub fn chunk_forward(r: &Recurrence<'_>, tiling: Tiling) -> Result<Kernel, LowerError> {
    match r.class.family {
        crate::classify::Family::Decay => decay::forward(r, tiling, false),
        crate::classify::Family::Delta => delta::forward(r, tiling, false),
        crate::classify::Family::Scan => scan::forward(r, tiling.block_v, tiling.chunk),
    }
}

/// A kernel of a compiled model, ready to store in an artifact.
#[derive(Debug, Clone)]
pub struct ModelKernel {
    /// Unique name in the artifact: `<mixer>_<role>` for a mixer's kernels; the configuration for
    /// the pieces ([`layer_pieces`]: `conv_c1024_w4_silu_fwd`, `rms_norm_gated_d128_bwd`).
    pub name: String,
    /// Index of its mixer in the model IR; `None` for the pieces, which serve any layer whose
    /// configuration matches.
    pub mixer: Option<usize>,
    /// What it computes, as the manifest names it ([`hlac_runtime::KernelInfo::role`]).
    pub role: &'static str,
    /// The kernel.
    pub kernel: Kernel,
    /// For a conv or norm kernel: its sizes and the weights it applies.
    pub piece: Option<hlac_runtime::PieceInfo>,
}

/// Elements per instance of `sum_blocks`.
const SUM_BLOCKS_BLOCK: u32 = 256;

/// An A/B measurement knob: the environment variable `name` as a number, when it is set to one.
fn knob(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok())
}

/// Whether a kernel's whole workspace fits in one block's shared memory on a GPU `device` (where
/// the NVPTX back end then places it, for kernels that ask: [`ModelKernel::gpu_options`]). On the CPU
/// any size fits.
fn fits_shared(device: crate::ir::Device, k: &Kernel) -> bool {
    device == crate::ir::Device::Cpu || crate::nvptx::workspace_fits_shared(&k.program, device.name())
}

/// The kernel built with the largest block size (64, 32 or 16 keys) that `fits`; 64 when none
/// does. Smaller blocks shrink the workspace at the price of more, smaller steps.
fn largest_fitting<K>(build: impl Fn(u32) -> Result<K, LowerError>, fits: impl Fn(&K) -> bool) -> Result<K, LowerError> {
    for b in [64, 32, 16] {
        let k = build(b)?;
        if fits(&k) {
            return Ok(k);
        }
    }
    build(64)
}

/// The largest divisor of `v` that is at most `cap` (the value block of an instance).
fn block_of(v: u32, cap: u32) -> u32 {
    (1..=cap.min(v)).rev().find(|d| v.is_multiple_of(*d)).unwrap_or(1)
}

/// Every kernel a model needs: for each linear mixer its forward and, for the decay and delta
/// classes, its decode step; attention's forward and decode; for training targets, every backward
/// (with the state-keeping forward it reads); then the conv and norm kernels of its layers, one
/// per distinct configuration ([`layer_pieces`]).
pub fn model_kernels(model: &crate::ir::Model) -> Result<Vec<ModelKernel>, LowerError> {
    let mut out = Vec::new();
    let gpu = model.target.device != crate::ir::Device::Cpu;
    // The gradient types a split backward leaves in partial sums (`sum_blocks` adds them up).
    let mut split_storages: Vec<DType> = Vec::new();
    for (h, m) in model.mixers.iter() {
        if m.instance.kind == hlac_grammar::ast::DeclKind::Attention {
            let cfg = attention_config(m, storage(model.target.dtype)).map_err(|reason| LowerError { mixer: m.name.clone(), reason })?;
            let fits = |k: &Kernel| fits_shared(model.target.device, k);
            // Forward and backward keep 64-row blocks: at D = 128 the 32-row forward that fits in
            // shared memory measured 1.9× slower than the 64-row one in global memory (H200,
            // BENCHMARKS.md), twice the instances for no faster tile access. The decode step,
            // one instance per head, gains from its workspace in shared memory (6.2 → 4.9 ms).
            let tiling = attention::AttnTiling { block_q: 64, block_k: 64 };
            out.push(ModelKernel {
                name: format!("{}_flash_fwd", m.name),
                mixer: Some(h.index()),
                piece: None,
                role: "attn_fwd",
                kernel: attention::forward(&cfg, tiling)?,
            });
            let decode = largest_fitting(|b| attention::decode(&cfg, b), fits)?;
            out.push(ModelKernel {
                name: format!("{}_decode", m.name),
                mixer: Some(h.index()),
                piece: None,
                role: "attn_decode",
                kernel: decode,
            });
            if model.target.mode == crate::ir::Mode::Training {
                let bwd = attention::backward(&cfg, tiling)?;
                out.push(ModelKernel {
                    name: format!("{}_bwd_dq", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "attn_bwd_dq",
                    kernel: bwd.dq,
                });
                out.push(ModelKernel {
                    name: format!("{}_bwd_dkv", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "attn_bwd_dkv",
                    kernel: bwd.dkv,
                });
            }
            continue;
        }
        let (Some(class), Some(math)) = (&m.class, &m.instance.math) else { continue };
        let r = Recurrence { name: &m.name, class, math, heads: m.instance.heads, storage: storage(model.target.dtype) };
        // On the CPU one instance per head computes every value column (the intra-chunk matrix is
        // then built once per chunk); GPUs split V across blocks for parallelism.
        // HLAC_GPU_BLOCK_V=n caps the GPU's value block at n instead (for A/B measurements).
        // 64 columns for every class: RetNet's forward was faster at 32 (5.20 -> 4.01 ms, H200,
        // 2026-12-02) while its kernels spilled at 255 registers; with `reread_tid`
        // (`ModelKernel::gpu_options`) 64 won, 2.94 -> 1.58 ms, its state-keeping forward 3.01 ->
        // 1.64, its backward unchanged (2026-12-03). GLA's, HGRN-2's and GDN's forwards got
        // 1.8-2.6x slower at 32 (their intra-chunk work is repeated per block).
        let gpu_cap = knob("HLAC_GPU_BLOCK_V").filter(|v| *v > 0).unwrap_or(64);
        let block_v = if model.target.device == crate::ir::Device::Cpu { r.v() } else { block_of(r.v(), gpu_cap) };
        // The decode step streams the state: 32 value columns per block (half the shared memory,
        // twice the blocks in flight) took GDN's at B = 64 from 0.0834 to 0.066 ms (H200,
        // 2026-12-02). HLAC_GPU_BLOCK_V caps it too.
        let decode_block = if model.target.device == crate::ir::Device::Cpu { block_v } else { block_of(r.v(), gpu_cap.min(32)) };
        // Vector gates' sub-blocks of 16 rows on every target, measured faster than the pairwise
        // form on both (BENCHMARKS.md; on an H200, GLA fwd 14.7 -> 11.2 ms, bwd 114 -> 51 ms;
        // HGRN-2 fwd 35.1 -> 11.6 ms, bwd 225 -> 58 ms). HLAC_SUB_BLOCK=n selects n rows (0: the
        // pairwise form), for A/B measurements.
        let sub_block = knob("HLAC_SUB_BLOCK").unwrap_or(16);
        let tiling = Tiling { chunk: model.target.chunk_size as u32, block_v, sub_block };
        if class.family == crate::classify::Family::Scan {
            // The tokens of a sequence are one chain, so the scan's parallelism is the channels: on
            // a GPU, blocks of 32 channels, whose [rows, 32] tiles (rows = 64) fill a 256-thread
            // block, and twice as many blocks share the SMs as with 64 (256 at B = 4, d = 2048).
            let scan_block = if model.target.device == crate::ir::Device::Cpu { 64 } else { 32 };
            // Tokens per block of the scan: the chunk size (HLAC_SCAN_ROWS=n overrides it, for
            // A/B measurements).
            let rows = knob("HLAC_SCAN_ROWS").filter(|r| *r > 0).unwrap_or(tiling.chunk);
            // HLAC_SCAN_PASSES=3 runs a GPU's forward in three passes with a program per chunk
            // (`scan::forward_chunks`), whose chunks are the target's, as `chunk_offsets` counts
            // them. Not the default: measured slower (H200, 2026-12-02: 0.338 + 0.010 + 0.377 ms
            // against the serial 0.393) — each token pass alone takes as long as the serial
            // kernel, so that is bound by the elementwise work per tile, not by its parallelism.
            if gpu && knob("HLAC_SCAN_PASSES") == Some(3) {
                let c = tiling.chunk;
                let passes = [
                    ("scan_fwd_chunks", scan::forward_chunks(&r, scan_block, c)?),
                    ("scan_fwd_carry", scan::forward_carry(&r, scan_block, c)?),
                    ("scan_fwd_out", scan::forward_out(&r, scan_block, c)?),
                ];
                for (role, kernel) in passes {
                    out.push(ModelKernel { name: format!("{}_{role}", m.name), mixer: Some(h.index()), piece: None, role, kernel });
                }
            } else {
                out.push(ModelKernel {
                    name: format!("{}_scan_fwd", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "scan_fwd",
                    kernel: scan::forward(&r, scan_block, rows)?,
                });
            }
            if model.target.mode == crate::ir::Mode::Training {
                out.push(ModelKernel {
                    name: format!("{}_scan_bwd", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "scan_bwd",
                    kernel: scan::backward(&r, scan_block, rows)?,
                });
            }
        } else {
            // HLAC_GPU_FWD=2 runs a GPU's forward in two passes (`chunk::two_pass_forward`): the
            // walk over the chunks carrying only the state, then one instance per chunk for the
            // outputs; they serve the training forward too (the walk keeps the states). Not the
            // default: slower than the fused walk on an H200 (2026-12-03: GLA 2.57 → 0.84 + 2.67
            // ms, GDN 2.31 → 1.85 + 0.73, DeltaNet 2.15 → 1.76 + 0.59), its output pass alone
            // costing what the whole walk does.
            let two_pass = gpu && knob("HLAC_GPU_FWD") == Some(2);
            if two_pass {
                let (states, outputs) = if class.family == crate::classify::Family::Delta {
                    delta::two_pass(&r, tiling)?
                } else {
                    decay::two_pass(&r, tiling)?
                };
                for (role, kernel) in [("chunk_states", states), ("chunk_out", outputs)] {
                    out.push(ModelKernel { name: format!("{}_{role}", m.name), mixer: Some(h.index()), piece: None, role, kernel });
                }
            } else {
                out.push(ModelKernel {
                    name: format!("{}_chunk_fwd", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "chunk_fwd",
                    kernel: chunk_forward(&r, tiling)?,
                });
            }
            out.push(ModelKernel {
                name: format!("{}_decode", m.name),
                mixer: Some(h.index()),
                piece: None,
                role: "decode",
                kernel: decode::decode(&r, decode_block)?,
            });
            // Training adds the forward that keeps chunk states and the backward that reads them.
            // The state-keeping forward splits V as the inference forward does (each block stores
            // its columns of every state): with all of V per block it ran half the blocks on a
            // larger workspace, 2x the inference forward's time (GDN, H200: 6.55 against 3.16 ms).
            if model.target.mode == crate::ir::Mode::Training {
                let full = Tiling { block_v: r.v(), ..tiling };
                if !two_pass {
                    let states = if class.family == crate::classify::Family::Delta {
                        delta::forward(&r, tiling, true)?
                    } else {
                        decay::forward(&r, tiling, true)?
                    };
                    out.push(ModelKernel {
                        name: format!("{}_chunk_fwd_states", m.name),
                        mixer: Some(h.index()),
                        piece: None,
                        role: "chunk_fwd_states",
                        kernel: states,
                    });
                }
                // A GPU's backward is split over the forward's value blocks (twice the instances
                // at V = 128, each with half the V-wide tiles), its partial gradients then added
                // by `sum_blocks`, except for vector gates. Measured on an H200 (2026-12-03, B = 4,
                // T = 4096, bf16), whole → split: GDN 14.88 → 13.75 ms, DeltaNet 14.70 → 13.42,
                // RetNet 10.62 → 9.11, each plus about 0.2 ms of `sum_blocks` over dq and dk
                // (2 × 335 MB at 3.5 TB/s); GLA 18.19 → 18.89 and HGRN-2 22.37 → 23.49, whose
                // sub-blocks' pairwise work is repeated per block. HLAC_GPU_BWD_SPLIT=0 never
                // splits, =1 splits vector gates too (for A/B measurements).
                let vector = matches!(class.decay, crate::classify::Decay::DataVector(_) | crate::classify::Decay::FixedVector(_));
                let split = gpu
                    && tiling.block_v < r.v()
                    && match knob("HLAC_GPU_BWD_SPLIT") {
                        Some(0) => false,
                        Some(_) => true,
                        None => !vector,
                    };
                let bwd = chunk_bwd::backward(&r, if split { tiling } else { full })?;
                // The types its partial gradients are summed into: f32 for the per-head
                // parameters' and the lower bound's, the storage type for the token inputs'.
                for q in bwd.program.params.iter().filter_map(|q| q.name.strip_suffix("_parts")?.strip_prefix('d')) {
                    let per_head = q == "lower_bound" || r.math.head_params.iter().any(|hp| hp.name == q);
                    split_storages.push(if per_head { DType::F32 } else { r.storage });
                }
                out.push(ModelKernel {
                    name: format!("{}_chunk_bwd", m.name),
                    mixer: Some(h.index()),
                    piece: None,
                    role: "chunk_bwd",
                    kernel: bwd,
                });
            }
        }
    }
    // One reduction per gradient type that a split backward leaves in partial sums.
    let mut reductions: Vec<DType> = Vec::new();
    for d in split_storages {
        if !reductions.contains(&d) {
            reductions.push(d);
        }
    }
    for d in reductions {
        let kernel = pieces::sum_blocks(d, SUM_BLOCKS_BLOCK)?;
        out.push(ModelKernel { name: kernel.program.name.clone(), mixer: None, piece: None, role: "reduce_blocks", kernel });
    }
    out.extend(layer_pieces::kernels(model)?);
    unique_names(&mut out);
    Ok(out)
}

/// Makes kernel names unique: a piece's name is its configuration, which a user's mixer could
/// also be called (`mixer conv_c64_w4_silu = GDN`); a later duplicate gets a numeric suffix.
fn unique_names(kernels: &mut [ModelKernel]) {
    let mut seen = std::collections::HashSet::new();
    for k in kernels {
        if seen.insert(k.name.clone()) {
            continue;
        }
        let name = (2..).map(|i| format!("{}_{i}", k.name)).find(|n| !seen.contains(n)).unwrap_or_default();
        seen.insert(name.clone());
        k.kernel.program.name.clone_from(&name);
        k.name = name;
    }
}

impl ModelKernel {
    /// How the GPU back end launches this kernel, from measurements on an H200 (BENCHMARKS.md):
    ///
    /// - Workspace: in shared memory where it fits. The backward kernels run one instance per 64
    ///   query (or key) rows — thousands per launch — so a shared workspace can leave one block
    ///   per SM: at D = 64 `bwd_dq` took 100 ms with it against 83 in global memory (f32 tiles,
    ///   2026-11). With its operand tiles in bf16 (`nvptx` codegen's `narrow`) `bwd_dq` fits at
    ///   D = 128 and gained: 21.5 → 15.0 ms (H200, 2026-12-03). `bwd_dkv` fits at D = 128 since
    ///   its products add straight into its accumulators and its two loops share one storage for
    ///   them (`kir::layout`'s initial values in place; 279 → 180 KB), and went 30.1 → 10.2 ms
    ///   (H100, 2026-12-06; 10.5 at 512 threads). The forward's registers already hold it to one
    ///   block per SM, so its 198 KB at D = 128 gain from shared memory: 45.6 → 37.5 ms. Kernels
    ///   with one instance per (sequence, head, value block) gain too (GDN decode 0.048 → 0.035
    ///   ms), and so do the conv and norm pieces, whose block sizes [`layer_pieces`] chooses to
    ///   fit shared memory: a norm forward runs one instance per few rows (16 384 at B = 4,
    ///   T = 4096, 16 heads), so a global workspace would be that many times its size in scratch
    ///   memory.
    /// - Threads: 256 (attention's `bwd_dkv` too, which took 128 while its workspace was in
    ///   global memory: 29.8 ms at 128 against 33.8 at 256 and 40.7 at 512 in 2026-12-03), except
    ///   128 for the elementwise scan's backward (5.0 → 3.1 ms), whose register use then lets
    ///   several blocks share an SM; 512 for the chunked forwards and attention's forward,
    ///   `bwd_dq` and decode step, which have most of an SM to themselves; 1024 for the chunked forwards of vector gates, and 512 for their
    ///   backwards (the sub-blocks' pairwise tiles). Measured on an H200 (2026-12-03, with
    ///   `reread_tid`, which took their registers from 255 and spills to ≤ 128), 256 → 512:
    ///   GLA's forward 3.51 → 2.94 (2.74 → 2.57 at 1024 with `no-transpose` fusion), HGRN-2's
    ///   3.30 → 2.82, GDN's 2.47 → 2.36, DeltaNet's 2.28 → 2.23, attention's `bwd_dq` 13.5 → 7.2
    ///   (RoPE: 18.4 → 11.1) and decode 0.716 → 0.631; attention's forward unchanged (6.36,
    ///   slower at 1024: 6.87). The backwards at 512 against 256: GLA's 18.0 against 20.2,
    ///   HGRN-2's 22.2 against 24.1, but GDN's 15.7 against 14.7, DeltaNet's 15.6 against 14.5,
    ///   RetNet's 11.1 against 10.6.
    /// - bf16 tiles (`nvptx` codegen's `narrow`: tensor-core operands and bf16 loads) everywhere
    ///   but in the norms, whose bf16 loads (the only tiles narrowed there) made them slower:
    ///   `rms_norm_d2048_bwd` 0.230 → 0.319 ms, the gated d128 one 0.412 → 0.655 (H200,
    ///   2026-12-03). They bring GLA's and HGRN-2's forward workspaces into shared memory (8.27 →
    ///   5.10 ms, 8.09 → 5.05), and took attention's forward 10.39 → 8.84, its `bwd_dq` 15.96 →
    ///   12.53 and every chunked backward 5–9 %. The forwards whose f32 workspace fits were
    ///   slower narrowed while their kernels spilled at 255 registers (GDN's 2.95 → 3.36); with
    ///   `reread_tid` they are not: DeltaNet's 2.28 → 2.18, RetNet's 3.57 → 3.26, GDN's 2.47 →
    ///   2.49.
    /// - Split-K `dot`s (an output's sum shared by a group of lanes) everywhere but in the
    ///   recurrences' decode steps: attention's decode gained from them (1.30 → 0.98 ms), GDN's
    ///   decode at B = 64 lost (0.090 → 0.102 ms; the lanes of a group read one shared bank).
    /// - The thread index read afresh by every tile operation (`Options::reread_tid`) in the
    ///   mixers' and attention's kernels and the norms' forwards: hoisted out of the chunk loops,
    ///   their per-thread addresses held 255 registers and spilled. Measured on an H200
    ///   (2026-12-03, at the old thread counts): GLA's forward 5.19 → 3.51 ms and backward 25.0 →
    ///   18.2, HGRN-2's 5.18 → 3.30 and 31.4 → 22.1, GDN's 2.97 → 2.47 and 19.7 → 15.8, RetNet's
    ///   backward 14.2 → 11.2, attention's forward 8.95 → 6.34 and `bwd_dkv` 34.2 → 29.8. The
    ///   small kernels keep one read, which they were faster with: the conv forward 0.473 (once)
    ///   against 0.602, its backward 2.61 against 3.26, HGRN's scan 0.389 against 0.417,
    ///   `sum_partials` 0.209 against 0.249.
    pub fn gpu_options(&self) -> crate::nvptx::Options {
        use crate::nvptx::{Narrowing, Options, Workspace, THREADS};
        let workspace = Workspace::SharedWhenFits;
        // The chunked kernels of vector gates hold the sub-blocks' pairwise tiles ([4, 16, 16, K]:
        // 64 K elements at K = 128), whose passes gain from more threads.
        let pairwise = crate::nvptx::widest_tile(&self.kernel.program) >= 1 << 16;
        let max_threads = match self.role {
            "scan_bwd" => 128,
            "chunk_fwd" | "chunk_fwd_states" | "chunk_out" if pairwise => 4 * THREADS,
            "chunk_bwd" if !pairwise => THREADS,
            "chunk_fwd" | "chunk_fwd_states" | "chunk_states" | "chunk_out" | "chunk_bwd" | "attn_fwd" | "attn_bwd_dq" | "attn_decode" => {
                2 * THREADS
            }
            _ => THREADS,
        };
        let split_k = self.role != "decode";
        let narrowing = match self.role {
            "norm_fwd" | "norm_bwd" => Narrowing::Never,
            _ => Narrowing::Always,
        };
        let reread_tid = !matches!(self.role, "conv_fwd" | "conv_bwd" | "norm_bwd" | "reduce_partials") && !self.role.starts_with("scan_");
        Options { workspace, max_threads, split_k, profile: crate::nvptx::profile_requested(), narrowing, reread_tid }
    }
}

/// The attention kernels' configuration from an attention mixer's hyper-parameters, with its
/// activations stored as `storage`.
pub fn attention_config(m: &crate::ir::Mixer, storage: DType) -> Result<attention::AttnConfig, String> {
    use crate::value::Value;
    let int = |name: &str| match m.instance.get(name) {
        Some(Value::Int(i)) if *i > 0 => Ok(*i as u32),
        other => Err(format!("`{name}` is {other:?}, not a positive int")),
    };
    let head_dim = int("head_dim")?;
    let window = match m.instance.get("window_size") {
        Some(Value::Int(w)) if *w > 0 => Some(*w as u32),
        _ => None,
    };
    let rope_theta = m.instance.get("rope_theta").and_then(Value::as_f64);
    Ok(attention::AttnConfig {
        name: m.name.clone(),
        heads: int("num_heads")?,
        kv_heads: int("kv_heads")?,
        head_dim,
        value_dim: head_dim,
        window,
        rope_theta,
        scale: 1.0 / f64::from(head_dim).sqrt(),
        storage,
    })
}
