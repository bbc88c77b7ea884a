//! The NVPTX back end: kernel IR → LLVM IR (through inkwell, LLVM 19) → PTX for sm_80 and sm_90.
//!
//! The kernel IR maps onto the GPU directly, as a sibling of the Cranelift back end: one program
//! instance is one thread block of up to [`THREADS`] threads ([`threads_for`]: whole warps enough
//! for its widest tile, capped per kernel by [`Options`], recorded in the manifest); every stored
//! tile lives in a per-instance workspace at the offsets `kir::layout` plans for both back ends —
//! in the block's dynamic shared memory when the whole of it fits and the kernel asks for it
//! (zeroed at entry; the manifest records `shared_bytes`), else in global memory
//! (`scratch_bytes`; see [`Workspace`]; packed largest tile first when only that makes it fit).
//! Every tile operation is a loop over its elements strided across the block's threads (up to
//! four per thread and iteration, all computed before any is stored), followed by a block barrier, as is every read of a tile into a
//! scalar, since the workspace layout reuses a dead tile's storage for the next one; elementwise
//! chains are fused into the operations that read them (computed per element, not stored), and a
//! chain that touches each byte from one thread only pays one barrier at its end; a transpose of a
//! stored tile is read through at the transposed index. In kernels with tensor-core products,
//! shared-memory tiles are stored swizzled against bank conflicts (`swizzle_of`). Scalars are
//! computed by every thread alike. `dot` runs on the tensor cores (`mma.sync`) where its shape
//! tiles (starting from the other addend when its one use is an add), else as FMA loops (each output's sum split across lanes when outputs are fewer than
//! threads); row reductions take a warp per row, several rows at once; sum scans of few lines
//! take a warp per line, other scans a thread per line; `tri_inv` goes by 16 × 16 blocks. Every global access is bounds-checked against the length passed
//! with its pointer, and an out-of-bounds access is recorded in the `error` word, exactly as on
//! the CPU; loads and stores whose offsets are provably contiguous in aligned 16-byte groups move
//! each group as one vector when it is aligned and in bounds at run time (`codegen/contig.rs`); an element of a bf16 or f16 pointer is widened to f32 as it is loaded and rounded to
//! nearest even as it is stored (the kernel IR's storage types), so every workspace tile is f32 —
//! except, in kernels with bf16 products, the tiles whose values reach only the tensor cores'
//! operands and those loaded from bf16 memory, which the workspace holds as bf16 with no change
//! in any value (`codegen/narrow.rs`; [`Narrowing`]), their fragments loaded with `ldmatrix`
//! from shared memory. Transcendentals use the approximate PTX instructions with range reduction (exp via
//! ex2.approx, log via lg2.approx, sin/cos reduced to [−π, π]; sqrt, rsqrt and the divisions
//! inside sigmoid, tanh and log1p approximate too). A profile build ([`Options::profile`])
//! counts each tile instruction's cycles. Still to come: tiles held in
//! registers across operations, wgmma on sm_90a (BENCHMARKS.md says why it matters).
//!
//! Kernel ABI (what the runtime launches): for each kernel-IR parameter in order, a pointer is two
//! PTX parameters (the device address, then its element count) and an integer is one; then
//! `scratch` (a workspace of grid size × `scratch_bytes`, unused when it is in shared memory) and
//! `error` (one u64, zero before the launch). Grid axes map to blockIdx.x/y/z; blocks are `threads` × 1 × 1.

mod codegen;

pub use codegen::{
    assemble, compile, find_ptxas, profile_requested, shared_limit, threads_for, widest_tile, workspace_fits_shared, Compiled, Narrowing,
    NvptxError, Options, Workspace, THREADS,
};
