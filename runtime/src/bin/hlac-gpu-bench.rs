//! `hlac-gpu-bench ARTIFACT_DIR [--batch B] [--tokens T] [--repeats N] [--warmup N] [--json FILE]
//! [--kernels a,b] [--seed N] [--plan-only]`: times every kernel of a GPU artifact (or the listed
//! ones) on device 0 at a batch of B sequences of T tokens each (default 4 × 4096; decode kernels
//! get one new token per sequence after T cached ones).
//!
//! Buffers are sized as `hlac-gpu-check` sizes them (the shared `common` module): widths the
//! manifest does not record are probed on the CPU at the check's small test batch, then carried
//! over to the benchmark's batch. The conv and norm kernels take their sizes from the manifest:
//! a conv over B × T tokens of its channels, a norm over B × T × (rows per token) rows (the heads
//! of a per-head output norm), the norm backward with 1024 programs, `sum_partials` adding
//! 1024 partial gradients of the model's width, and `sum_blocks` adding a split backward's
//! partial dk (one per value block, tokens × heads × K elements; dq is as large). Inputs are seeded random values (never zeros).
//! Each kernel gets `--warmup` launches (default 3), then `--repeats` launches (default 20), each
//! bracketed by two CUDA events on the module's stream; launches are queued without waiting
//! ([`GpuModule::launch_async`]) so the host's launch overhead overlaps the previous kernel, as in
//! a real forward pass. The out-of-bounds error word is checked once after the warm-up and once
//! after the timed launches (reading it needs a synchronisation, which would distort the timing).
//! The scratch workspace is allocated and zeroed once per kernel and not cleared between
//! launches, so the times are the kernels' own, without a per-launch memset.
//!
//! Prints, per kernel: role, shape, median and minimum ms, achieved GB/s (every parameter buffer
//! counted once, read or written, at its size as it lies in device memory), tokens/s, and
//! TFLOP/s of the matrix products the algorithm performs ([`matrix_flops`]: a yardstick for the
//! chunked and attention kernels, none for the memory-bound ones);
//! and the cold start: process start to the artifact opened and every kernel's module loaded.
//! Exits 0 when every kernel ran, 1 when one failed (its row says why), 2 on bad usage or an
//! unreadable artifact; with no CUDA driver it prints "no CUDA driver found: skipping" and exits 0.
//! `--plan-only` sizes every kernel and prints shapes, grids and bytes without a GPU (no timing).
//! An artifact built with `HLAC_NVPTX_PROFILE=1` has per-instruction cycle counters in its
//! kernels; then each kernel's table follows: the instructions that took the most of its blocks'
//! time, with their share and their cycles per block and launch.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use common::{fnv, gpu_args, make_host, probe, Batch, Dev, Host, Plan, ProbeError, Sizer};
use hlac_runtime::cpu::CpuModule;
use hlac_runtime::gpu::{self, GpuError, GpuKernelId, GpuModule, KernelProfile};
use hlac_runtime::kir::{ParamKind, Program};
use hlac_runtime::{Artifact, KernelInfo};

/// Programs the norm backward runs at the benchmark's batch (its grid is the launcher's choice):
/// enough 128-thread blocks to fill the 132 SMs of an H100 or H200 several times over, few enough
/// that the partial weight gradients `sum_partials` adds stay small.
const BENCH_PROGRAMS: usize = 1024;

/// Command-line options.
struct Options {
    dir: PathBuf,
    batch: usize,
    tokens: usize,
    repeats: usize,
    warmup: usize,
    json: Option<PathBuf>,
    kernels: Option<Vec<String>>,
    seed: u64,
    plan_only: bool,
}

/// A kernel sized at the benchmark's batch.
struct Sized {
    /// The host side of every argument.
    host: Vec<Host>,
    grid: Vec<u64>,
    /// Bytes of every pointer parameter's buffer, each counted once.
    bytes: u64,
    /// Tokens one launch processes (one per sequence for decode).
    tokens: usize,
    /// A short description of the shape.
    shape: String,
    /// The matrix-product FLOPs of one launch ([`matrix_flops`]).
    flops: Option<f64>,
}

/// One row of the results.
struct Row {
    kernel: String,
    role: String,
    shape: String,
    grid: Vec<u64>,
    bytes: u64,
    tokens: usize,
    scratch_bytes: u64,
    flops: Option<f64>,
    /// Per-launch device times (ms), when it ran.
    times: Vec<f64>,
    error: Option<String>,
}

impl Row {
    fn median_ms(&self) -> Option<f64> {
        let mut t = self.times.clone();
        t.sort_by(f64::total_cmp);
        let n = t.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(t[n / 2]),
            _ => Some((t[n / 2 - 1] + t[n / 2]) / 2.0),
        }
    }

    fn min_ms(&self) -> Option<f64> {
        self.times.iter().copied().min_by(f64::total_cmp)
    }

    fn gb_per_s(&self) -> Option<f64> {
        self.median_ms().filter(|&m| m > 0.0).map(|m| self.bytes as f64 / (m * 1e-3) / 1e9)
    }

    fn tokens_per_s(&self) -> Option<f64> {
        self.median_ms().filter(|&m| m > 0.0).map(|m| self.tokens as f64 / (m * 1e-3))
    }

    fn tflops(&self) -> Option<f64> {
        let (m, f) = (self.median_ms().filter(|&m| m > 0.0)?, self.flops?);
        Some(f / (m * 1e-3) / 1e12)
    }
}

/// FLOPs (a multiply-add counted as 2) of the matrix products a kernel's algorithm performs for
/// `b` sequences of `t` tokens, from its role and sizes; `None` for kernels that are memory-bound
/// by design (decode steps, scans, convs, norms). Chunked recurrences (C-token chunks, per token
/// and head): 2C(K + V) for the intra-chunk QKᵀ and AV, 4KV for the state's QS and KᵀV — the
/// forward's count (the two-pass forward's walk has the KᵀV half of 4KV, its output pass the
/// rest), ×2.5 for the backward, whatever the class does besides (the delta rule's
/// inverse and WY products are not counted). Causal attention, per sequence and head: T²D for
/// each of QKᵀ and PV (half of each square); its dq kernel recomputes QKᵀ and forms dO Vᵀ and dS K
/// (3 T²D), its dk/dv kernel recomputes QKᵀ and forms dO Vᵀ, Pᵀ dO and dSᵀ Q (4 T²D).
fn matrix_flops(role: &str, s: &common::Sizer, b: usize, t: usize, chunk: usize) -> Option<f64> {
    let (b, t, chunk) = (b as f64, t as f64, chunk as f64);
    let (h, k, v, d) = (s.h as f64, s.k as f64, s.v as f64, s.d as f64);
    let chunked = b * t * h * (2.0 * chunk * (k + v) + 4.0 * k * v);
    let attn = b * h * t * t * d;
    match role {
        "chunk_fwd" | "chunk_fwd_states" => Some(chunked),
        // The two-pass forward: the walk's K Vᵀ update (and the delta class's W S), then the
        // outputs' intra-chunk products and Q S.
        "chunk_states" => Some(b * t * h * 2.0 * k * v),
        "chunk_out" => Some(b * t * h * (2.0 * chunk * (k + v) + 2.0 * k * v)),
        "chunk_bwd" => Some(2.5 * chunked),
        "attn_fwd" => Some(2.0 * attn),
        "attn_bwd_dq" => Some(3.0 * attn),
        "attn_bwd_dkv" => Some(4.0 * attn),
        _ => None,
    }
}

fn main() -> ExitCode {
    // The cold start is measured from here: the closest the program itself can get to process
    // start (exec and dynamic linking before `main` are not counted, a few ms at most).
    let start = Instant::now();
    let opts = match parse_args() {
        Ok(o) => o,
        Err(problem) => return usage(&problem),
    };
    if !opts.plan_only && !gpu::driver_present() {
        println!("no CUDA driver found: skipping");
        return ExitCode::SUCCESS;
    }
    let artifact = match Artifact::open(&opts.dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opened_ms = ms(start);
    let gpu_module = if opts.plan_only {
        None
    } else {
        match GpuModule::load(&artifact) {
            Ok(m) => Some(m),
            Err(GpuError::NoDriver(_)) => {
                println!("no CUDA driver found: skipping");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let cold_ms = ms(start);

    let selected: Vec<usize> = match &opts.kernels {
        None => (0..artifact.manifest.kernels.len()).collect(),
        Some(names) => {
            let mut out = Vec::new();
            for n in names {
                match artifact.manifest.kernels.iter().position(|k| &k.name == n) {
                    Some(i) => out.push(i),
                    None => {
                        let known: Vec<&str> = artifact.manifest.kernels.iter().map(|k| k.name.as_str()).collect();
                        return usage(&format!("no kernel `{n}` in the artifact (it has {})", known.join(", ")));
                    }
                }
            }
            out
        }
    };

    // The CPU compiles the kernels only to probe the widths of inputs the manifest does not size;
    // it is not part of the cold start.
    let cpu_start = Instant::now();
    let (cpu_module, cpu_ids) = match CpuModule::load(&artifact) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: compiling the kernels for the CPU (to size their buffers): {e}");
            return ExitCode::FAILURE;
        }
    };
    let cpu_ms = ms(cpu_start);

    let m = &artifact.manifest;
    println!("artifact: {} ({} kernels, target {} {})", opts.dir.display(), m.kernels.len(), m.target.device, m.target.dtype);
    if let Some((module, _)) = &gpu_module {
        let d = module.device();
        println!("device 0: {} (compute capability {}.{})", d.name, d.compute_capability.0, d.compute_capability.1);
    }
    println!(
        "shape: B={} sequences × T={} tokens; {} warm-up + {} timed launches per kernel, timed with CUDA events{}",
        opts.batch,
        opts.tokens,
        opts.warmup,
        opts.repeats,
        if opts.plan_only { " (--plan-only: sizing only, nothing timed)" } else { "" }
    );

    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    for &i in &selected {
        let info = &m.kernels[i];
        let program = &artifact.programs[i];
        let mut row = Row {
            kernel: info.name.clone(),
            role: info.role.clone(),
            shape: "-".into(),
            grid: Vec::new(),
            bytes: 0,
            tokens: 0,
            scratch_bytes: 0,
            flops: None,
            times: Vec::new(),
            error: None,
        };
        let seed = opts.seed ^ fnv(&info.name);
        match size_kernel(&artifact, info, program, &cpu_module, cpu_ids[i], &opts, seed) {
            Err(e) => row.error = Some(e),
            Ok(sized) => {
                row.shape = sized.shape.clone();
                row.grid = sized.grid.clone();
                row.flops = sized.flops;
                row.bytes = sized.bytes;
                row.tokens = sized.tokens;
                let per_instance = info.scratch_bytes.unwrap_or(0);
                row.scratch_bytes = sized.grid.iter().product::<u64>().saturating_mul(per_instance);
                if let Some((module, ids)) = &gpu_module {
                    match time_kernel(module, ids[i], &sized, &opts) {
                        Ok((t, profile)) => {
                            row.times = t;
                            if let Some(p) = profile {
                                profiles.push((info.name.clone(), p, sized.grid.iter().product::<u64>()));
                            }
                        }
                        Err(e) => row.error = Some(e.to_string()),
                    }
                }
            }
        }
        rows.push(row);
    }

    print_table(&rows, opts.plan_only);
    for (kernel, p, blocks) in &profiles {
        print_profile(kernel, p, opts.warmup + opts.repeats, *blocks);
    }
    println!();
    println!("cold start: {cold_ms:.1} ms (process start → artifact opened in {opened_ms:.1} ms → every kernel module loaded)");
    println!("(not counted: compiling the kernels for the CPU to probe buffer widths, {cpu_ms:.1} ms)");

    if let Some(path) = &opts.json {
        let device = gpu_module.as_ref().map(|(module, _)| module.device().name.clone());
        if let Err(e) = write_json(path, &opts, device, cold_ms, opened_ms, &rows) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if rows.iter().any(|r| r.error.is_some()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        dir: PathBuf::new(),
        batch: 4,
        tokens: 4096,
        repeats: 20,
        warmup: 3,
        json: None,
        kernels: None,
        seed: 0,
        plan_only: false,
    };
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |flag: &str| -> Result<usize, String> {
            args.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("{flag} needs a number"))
        };
        match a.as_str() {
            "--batch" => opts.batch = number("--batch")?,
            "--tokens" => opts.tokens = number("--tokens")?,
            "--repeats" => opts.repeats = number("--repeats")?,
            "--warmup" => opts.warmup = number("--warmup")?,
            "--seed" => opts.seed = number("--seed")? as u64,
            "--plan-only" => opts.plan_only = true,
            "--json" => opts.json = Some(args.next().ok_or("--json needs a file")?.into()),
            "--kernels" => {
                let list = args.next().ok_or("--kernels needs a comma-separated list")?;
                opts.kernels = Some(list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect());
            }
            "-h" | "--help" => return Err(String::new()),
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => return Err(format!("unexpected argument `{a}`")),
        }
    }
    opts.dir = dir.ok_or("no artifact directory given")?;
    if opts.batch == 0 || opts.tokens == 0 || opts.repeats == 0 {
        return Err("--batch, --tokens and --repeats must be at least 1".into());
    }
    Ok(opts)
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "usage: hlac-gpu-bench ARTIFACT_DIR [--batch B] [--tokens T] [--repeats N] [--warmup N] [--json FILE] [--kernels a,b] \
         [--seed N] [--plan-only]"
    );
    ExitCode::from(2)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The value blocks and elements (tokens × heads × K) of the first split `chunk_bwd`'s key-wide
/// partial gradients at `batch`, if the artifact has a split backward.
fn split_gradient_size(artifact: &Artifact, batch: &Batch) -> Option<(usize, usize)> {
    let m = &artifact.manifest;
    let (i, info) = m.kernels.iter().enumerate().find(|(_, k)| k.role == "chunk_bwd" && k.grid.len() == 2)?;
    let sizer = Sizer::new(m, info, &artifact.programs[i], batch);
    let blocks = *sizer.grid(info, &Default::default()).ok()?.get(1)?;
    Some((blocks as usize, batch.tokens * sizer.h * sizer.k))
}

/// Sizes a kernel at the benchmark's batch and makes its host arguments: probes the widths the
/// manifest does not give on the CPU at the check's small test batch (running the kernel on the
/// CPU at the full batch would take minutes), then plans the full batch with the same layouts.
fn size_kernel(
    artifact: &Artifact,
    info: &KernelInfo,
    program: &Program,
    cpu_module: &CpuModule,
    cpu_id: hlac_runtime::cpu::KernelId,
    opts: &Options,
    seed: u64,
) -> Result<Sized, String> {
    let m = &artifact.manifest;
    let chunk = m.target.chunk_size as i64;
    let test = Batch::test(chunk);
    let test_sizer = Sizer::new(m, info, program, &test);
    let probed = probe(&test_sizer, info, cpu_module, cpu_id, seed).map_err(|e| match e {
        ProbeError::Unsized(param) => format!("cannot size parameter `{param}`"),
        ProbeError::Fail(why) => format!("sizing: {why}"),
    })?;
    let tokens = i64::try_from(opts.tokens).map_err(|_| "--tokens is too large".to_string())?;
    let batch = Batch::new(&vec![tokens; opts.batch], chunk);
    let mut sizer = Sizer::new(m, info, program, &batch);
    // The norm backward strides over row blocks with as many programs as the launcher picks, and
    // `sum_partials` then adds that many partial weight gradients of the model's width.
    sizer.programs = BENCH_PROGRAMS;
    sizer.partial_cols = m.model.hidden_size as usize;
    // `sum_blocks` into the token inputs' type at the size of a split backward's largest partial
    // gradient, a key-wide token input's (dq, dk): one per value block for every token, head and
    // key channel. (Into f32 on a bf16 target it adds the per-head parameters', a few hundred
    // elements: it keeps the generic size.)
    let out_type = program.params.iter().find(|p| p.name == "out").and_then(|p| match p.kind {
        ParamKind::Ptr { dtype, .. } => Some(dtype.name()),
        _ => None,
    });
    if info.role == "reduce_blocks" && out_type == Some(m.target.dtype.as_str()) {
        if let Some((parts, cols)) = split_gradient_size(artifact, &batch) {
            (sizer.programs, sizer.partial_cols) = (parts, cols);
        }
    }
    let levels = sizer.carry_levels(&test_sizer, &probed.levels);
    let plans = sizer.plan(&levels).map_err(|param| format!("cannot size parameter `{param}` at the full batch"))?;
    let grid = sizer.grid(info, &levels)?;
    let mut bytes = 0u64;
    for (plan, param) in plans.iter().zip(&program.params) {
        bytes += match plan {
            // A float buffer in its element type: 2 bytes for bf16 and f16 activations.
            Plan::F32 { len, .. } => *len as u64 * u64::from(if let ParamKind::Ptr { dtype, .. } = param.kind { dtype.bytes() } else { 4 }),
            Plan::I64(v) => v.len() as u64 * 8,
            Plan::Int(_) => 0,
        };
    }
    let mixer = info.mixer.and_then(|i| m.mixers.get(i));
    let heads = match (&info.piece, mixer) {
        (Some(p), _) if p.kind == "conv" => format!("C={} W={}", p.width, p.taps),
        (Some(p), _) => format!("rows={} D={}", sizer.norm_rows(), p.width),
        (None, Some(mixer)) if mixer.family == "attention" => format!("H={} KVH={} D={}", sizer.h, sizer.kvh, sizer.d),
        (None, Some(_)) => format!("H={} K={} V={}", sizer.h, sizer.k, sizer.v),
        (None, None) => format!("parts={} cols={}", sizer.programs, sizer.partial_cols),
    };
    let shape = if mixer.is_none() && info.piece.is_none() {
        // `sum_partials` sees no tokens, only the partial sums.
        heads
    } else if sizer.decode {
        format!("B={} ×1 (after {}) {heads}", batch.seqs, opts.tokens)
    } else {
        format!("B={} T={} {heads}", batch.seqs, opts.tokens)
    };
    let flops = matrix_flops(&info.role, &sizer, opts.batch, opts.tokens, chunk as usize);
    Ok(Sized { host: make_host(program, &plans, seed), grid, bytes, tokens: sizer.rows(), shape, flops })
}

/// Uploads a kernel's arguments, runs the warm-up and the timed launches, and returns each timed
/// launch's device time in ms.
fn time_kernel(module: &GpuModule, id: GpuKernelId, sized: &Sized, opts: &Options) -> Result<(Vec<f64>, Option<KernelProfile>), GpuError> {
    let program = module.program(id);
    module.clear_profile(id)?;
    let mut dev = Vec::with_capacity(sized.host.len());
    for h in &sized.host {
        dev.push(Dev::upload(module, h)?);
    }
    let mut args = gpu_args(&mut dev, program);
    let mut workspace = module.workspace(id, &sized.grid)?;
    for _ in 0..opts.warmup {
        module.launch_async(id, &mut args, &sized.grid, &mut workspace)?;
    }
    // A kernel that faults or overruns a buffer is reported before it is timed.
    module.check_workspace(&mut workspace)?;
    // Events are made before the loop so that creating them does not delay the launches.
    let events = (0..2 * opts.repeats).map(|_| module.event()).collect::<Result<Vec<_>, _>>()?;
    for pair in events.chunks_exact(2) {
        module.record(&pair[0])?;
        module.launch_async(id, &mut args, &sized.grid, &mut workspace)?;
        module.record(&pair[1])?;
    }
    module.check_workspace(&mut workspace)?;
    let times = events.chunks_exact(2).map(|pair| pair[0].elapsed_ms(&pair[1]).map(f64::from)).collect::<Result<_, _>>()?;
    Ok((times, module.profile(id)?))
}

/// The instructions that took the most of a profiled kernel's time (all that took 1 % or more).
fn print_profile(kernel: &str, p: &KernelProfile, launches: usize, blocks: u64) {
    let total: u64 = p.cycles.iter().sum();
    let per = |c: u64| c as f64 / (launches as f64 * blocks.max(1) as f64);
    println!();
    println!(
        "profile of {kernel}: {:.0} cycles per block and launch ({:.0} of them charged to instructions), {blocks} blocks",
        per(p.block_cycles),
        per(total)
    );
    let mut order: Vec<usize> = (0..p.cycles.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(p.cycles[i]));
    for i in order {
        let share = p.cycles[i] as f64 / p.block_cycles.max(1) as f64;
        if share < 0.01 {
            break;
        }
        println!("  {:>5.1} % {:>10.0}  {}", 100.0 * share, per(p.cycles[i]), p.ops[i]);
    }
}

fn fmt_opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map_or_else(|| "-".into(), f)
}

/// `12345678` → `12.35M`.
fn si(x: f64) -> String {
    match x {
        _ if x >= 1e9 => format!("{:.2}G", x / 1e9),
        _ if x >= 1e6 => format!("{:.2}M", x / 1e6),
        _ if x >= 1e3 => format!("{:.2}k", x / 1e3),
        _ => format!("{x:.0}"),
    }
}

fn print_table(rows: &[Row], plan_only: bool) {
    let header = ["kernel", "role", "shape", "grid", "median ms", "min ms", "MB moved", "GB/s", "tokens/s", "scratch MB", "TFLOP/s"];
    let mut table: Vec<[String; 11]> = vec![header.map(String::from)];
    for r in rows {
        table.push([
            r.kernel.clone(),
            r.role.clone(),
            r.shape.clone(),
            format!("{:?}", r.grid),
            fmt_opt(r.median_ms(), |x| format!("{x:.3}")),
            fmt_opt(r.min_ms(), |x| format!("{x:.3}")),
            format!("{:.1}", r.bytes as f64 / 1e6),
            fmt_opt(r.gb_per_s(), |x| format!("{x:.1}")),
            fmt_opt(r.tokens_per_s(), si),
            format!("{:.1}", r.scratch_bytes as f64 / 1e6),
            fmt_opt(r.tflops(), |x| format!("{x:.2}")),
        ]);
    }
    let widths: Vec<usize> = (0..header.len()).map(|c| table.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for (n, r) in table.iter().enumerate() {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, &w)| format!("{c:w$}")).collect();
        println!("{}", cells.join(" | ").trim_end());
        if n == 0 {
            println!("{}", widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("-|-"));
        }
    }
    for r in rows {
        if let Some(e) = &r.error {
            println!("{}: FAILED: {e}", r.kernel);
        }
    }
    if !plan_only {
        println!("(GB/s: every parameter buffer counted once at its size in device memory (f32, bf16, f16 or i64); scratch not counted)");
    }
}

fn write_json(
    path: &std::path::Path,
    opts: &Options,
    device: Option<String>,
    cold_ms: f64,
    opened_ms: f64,
    rows: &[Row],
) -> std::io::Result<()> {
    let kernels: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "kernel": r.kernel,
                "role": r.role,
                "shape": r.shape,
                "grid": r.grid,
                "bytes": r.bytes,
                "tokens": r.tokens,
                "scratch_bytes": r.scratch_bytes,
                "median_ms": r.median_ms(),
                "min_ms": r.min_ms(),
                "gb_per_s": r.gb_per_s(),
                "tokens_per_s": r.tokens_per_s(),
                "flops": r.flops,
                "tflops": r.tflops(),
                "times_ms": r.times,
                "error": r.error,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "artifact": opts.dir.display().to_string(),
        "device": device,
        "batch": opts.batch,
        "tokens": opts.tokens,
        "warmup": opts.warmup,
        "repeats": opts.repeats,
        "timing": if opts.plan_only { "none (plan only)" } else { "cuda events" },
        "cold_start_ms": cold_ms,
        "artifact_opened_ms": opened_ms,
        "kernels": kernels,
    });
    let text = serde_json::to_string_pretty(&doc).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}
