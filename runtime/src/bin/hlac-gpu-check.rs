//! `hlac-gpu-check ARTIFACT_DIR [--seed N] [--cpu-only]`: runs every kernel of a GPU artifact on
//! the GPU and on the CPU (which compiles the same kernel-IR programs with Cranelift) on a test
//! batch of three sequences (lengths 1, 70 and 130), and compares every output.
//!
//! Inputs are seeded random values (never zero, so a kernel that ignores an input shows), outputs
//! start as NaN (so an element nobody writes shows), and a kernel passes when every output is
//! finite on both sides and the relative L2 error ‖gpu − cpu‖ / ‖cpu‖ is at most 1e-5 — or 1e-2
//! for every output of a kernel that stores activations in bf16 or f16 ([`tolerance`]). Buffers of
//! such a kernel hold the f32 draws rounded to their type, so both sides read the very same
//! inputs. Prints a
//! table and exits 1 if any kernel fails or could not be sized; with no CUDA driver it prints
//! "no CUDA driver found: skipping" and exits 0. `--cpu-only` runs the sizing and the CPU side
//! alone (useful where there is no GPU: it checks that every kernel can be sized and writes all of
//! its outputs).
//!
//! Buffers are sized from the parameters' names (the conventions of the compiler's lowerings) and
//! the manifest's mixer: heads, key and value sizes, attention's head size. Token inputs of a
//! declared recurrence have names and widths the manifest does not record, so their widths are
//! found by probing: the CPU launcher bounds-checks every access and names the parameter it
//! overran, and the check grows that buffer through its possible layouts, smallest first. The
//! conv and norm kernels are sized from what the manifest records with them (channels or row
//! width, taps, rows per token): the convolutions run over the same packed batch (blocks of tokens
//! that end mid-sequence, a one-token sequence, initial and final caches), the norms over one row
//! fewer than tokens × rows per token (so the last row block is partial), the norm backward and
//! `sum_partials` over 4 programs' partial sums.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use common::{fnv, gpu_args, probe, Batch, Dev, Host, ProbeError, Probed, Sizer};
use hlac_runtime::cpu::{self, CpuModule};
use hlac_runtime::gpu::{self, GpuModule};
use hlac_runtime::kir::{DType, ParamKind, Program};
use hlac_runtime::{Artifact, KernelInfo, Manifest};

/// The relative L2 error an f32 output may have.
const TOLERANCE: f64 = 1e-5;

/// The relative L2 error any output of a kernel with bf16 or f16 storage may have.
const NARROW_TOLERANCE: f64 = 1e-2;

/// The relative L2 error the outputs of `program` may have: [`TOLERANCE`] for an f32 kernel, and
/// [`NARROW_TOLERANCE`] for one that stores activations in bf16 or f16, whose outputs carry
/// bf16-operand error on the GPU — the tensor cores multiply bf16-rounded operands with f32
/// accumulation there (fla's precision; the compiler's `nvptx` dot modes), where the CPU multiplies
/// in f32 — and whose bf16 outputs round the two sides' slightly different f32 results, a few
/// elements a unit (2⁻⁷) apart. bf16 operands land between 1e-3 and 1e-2 against an exact
/// product (2e-3 to 6e-3 on this check's batch, H200, all-mixers-bf16); a wrong element, an
/// unwritten one or a missed conversion lands far above.
fn tolerance(program: &Program) -> f64 {
    let narrow = program.params.iter().any(|p| matches!(p.kind, ParamKind::Ptr { dtype: DType::Bf16 | DType::F16, .. }));
    if narrow {
        NARROW_TOLERANCE
    } else {
        TOLERANCE
    }
}

fn main() -> ExitCode {
    let mut dir = None;
    let mut seed = 0u64;
    let mut cpu_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => seed = s,
                None => return usage("--seed needs a number"),
            },
            "--cpu-only" => cpu_only = true,
            "-h" | "--help" => return usage(""),
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => return usage(&format!("unexpected argument `{a}`")),
        }
    }
    let Some(dir) = dir else { return usage("no artifact directory given") };
    if !cpu_only && !gpu::driver_present() {
        println!("no CUDA driver found: skipping");
        return ExitCode::SUCCESS;
    }
    let artifact = match Artifact::open(&dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (cpu_module, cpu_ids) = match CpuModule::load(&artifact) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: compiling the kernels for the CPU: {e}");
            return ExitCode::FAILURE;
        }
    };
    let gpu_module = if cpu_only {
        None
    } else {
        match GpuModule::load(&artifact) {
            Ok((m, ids)) => {
                let d = m.device();
                println!("device 0: {} (compute capability {}.{})", d.name, d.compute_capability.0, d.compute_capability.1);
                Some((m, ids))
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };

    let mut rows = Vec::new();
    let mut uncovered = Vec::new();
    let mut failed = false;
    for (i, info) in artifact.manifest.kernels.iter().enumerate() {
        let program = &artifact.programs[i];
        let kernel_seed = seed ^ fnv(&info.name);
        let gpu = gpu_module.as_ref().map(|(m, ids)| (m, ids[i]));
        let outcome = check_kernel(&artifact.manifest, info, program, &cpu_module, cpu_ids[i], gpu, kernel_seed);
        let (err, verdict) = match outcome {
            Outcome::Pass(e) => (e.map_or("-".into(), |e| format!("{e:.2e}")), "pass".to_string()),
            Outcome::Fail(e, why) => {
                failed = true;
                (e.map_or("-".into(), |e| format!("{e:.2e}")), format!("FAIL: {why}"))
            }
            Outcome::Unsized(param) => {
                failed = true;
                uncovered.push(format!("{} ({param})", info.name));
                ("-".into(), format!("skipped (unknown parameter {param})"))
            }
        };
        rows.push((info.name.clone(), err, verdict));
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max("kernel".len());
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max("max rel err".len());
    println!("{:w0$} | {:w1$} | {}", "kernel", "max rel err", if cpu_only { "pass (CPU only)" } else { "pass" });
    println!("{}-|-{}-|-{}", "-".repeat(w0), "-".repeat(w1), "-".repeat(4));
    for (name, err, verdict) in &rows {
        println!("{name:w0$} | {err:w1$} | {verdict}");
    }
    if !uncovered.is_empty() {
        println!("\nnot covered (the check cannot size these kernels' parameters):");
        for k in &uncovered {
            println!("  {k}");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(problem: &str) -> ExitCode {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!("usage: hlac-gpu-check ARTIFACT_DIR [--seed N] [--cpu-only]");
    ExitCode::from(2)
}

/// What checking one kernel found.
enum Outcome {
    /// The largest relative error over its outputs (none when only the CPU ran).
    Pass(Option<f64>),
    /// Why it failed (with the largest error, when outputs were compared).
    Fail(Option<f64>, String),
    /// A parameter it could not size.
    Unsized(String),
}

fn run_gpu(module: &GpuModule, id: gpu::GpuKernelId, host: &[Host], grid: &[u64]) -> Result<Vec<Option<Vec<f32>>>, gpu::GpuError> {
    let program = module.program(id);
    let mut dev = Vec::with_capacity(host.len());
    for h in host {
        dev.push(Dev::upload(module, h)?);
    }
    module.launch(id, &mut gpu_args(&mut dev, program), grid)?;
    dev.iter()
        .zip(&program.params)
        .map(|(d, p)| match p.kind {
            ParamKind::Ptr { writable: true, .. } => d.download_floats(module),
            _ => Ok(None),
        })
        .collect()
}

fn check_kernel(
    manifest: &Manifest,
    info: &KernelInfo,
    program: &Program,
    cpu_module: &CpuModule,
    cpu_id: cpu::KernelId,
    gpu: Option<(&GpuModule, gpu::GpuKernelId)>,
    seed: u64,
) -> Outcome {
    let batch = Batch::test(manifest.target.chunk_size as i64);
    let sizer = Sizer::new(manifest, info, program, &batch);
    let Probed { initial, cpu_out, grid, .. } = match probe(&sizer, info, cpu_module, cpu_id, seed) {
        Ok(p) => p,
        Err(ProbeError::Unsized(param)) => return Outcome::Unsized(param),
        Err(ProbeError::Fail(why)) => return Outcome::Fail(None, why),
    };
    // Every output element must be written (they started as NaN) and finite on the CPU.
    for (h, p) in cpu_out.iter().zip(&program.params) {
        if let (Some((_, v)), ParamKind::Ptr { writable: true, .. }) = (h.floats(), &p.kind) {
            let bad = v.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                return Outcome::Fail(None, format!("the CPU left {bad} of {} elements of `{}` unwritten or not finite", v.len(), p.name));
            }
        }
    }
    let Some((gpu_module, gpu_id)) = gpu else { return Outcome::Pass(None) };
    let gpu_out = match run_gpu(gpu_module, gpu_id, &initial, &grid) {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(None, format!("on the GPU: {e}")),
    };
    let mut worst = 0.0f64;
    let mut problems = Vec::new();
    for ((h, g), p) in cpu_out.iter().zip(&gpu_out).zip(&program.params) {
        let (Some((dtype, c)), Some(g)) = (h.floats(), g) else { continue };
        let nonfinite = g.iter().filter(|x| !x.is_finite()).count();
        if nonfinite > 0 {
            problems.push(format!("{nonfinite} of {} elements of `{}` unwritten or not finite on the GPU", g.len(), p.name));
            continue;
        }
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (a, b) in c.iter().zip(g.iter()) {
            diff += (f64::from(*a) - f64::from(*b)).powi(2);
            norm += f64::from(*a).powi(2);
        }
        // An all-zero reference gets an absolute error.
        let rel = if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() };
        worst = worst.max(rel);
        if rel > tolerance(program) {
            problems.push(format!("`{}` ({}) differs (rel L2 {rel:.2e} > {:.0e})", p.name, dtype.name(), tolerance(program)));
        }
    }
    if problems.is_empty() {
        Outcome::Pass(Some(worst))
    } else {
        Outcome::Fail(Some(worst), problems.join("; "))
    }
}
