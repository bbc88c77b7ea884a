//! `hlac bench --target cpu`: times the kernels of a spec's recurrences on this machine with the
//! Cranelift back end — the chunked forward over a batch of sequences and one decode step — and
//! reports the median time and tokens per second. A benchmark, not a test: inputs are seeded random
//! values, outputs are not checked here (the kernel tests do that).

use std::time::Instant;

use hlac_runtime::cpu::{Arg, CpuModule};
use hlac_runtime::kir::ParamKind;

use crate::ir::Model;
use crate::lower::{model_kernels, ModelKernel};

/// One measured kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// Kernel name.
    pub kernel: String,
    /// `chunk_fwd`, `scan_fwd` or `decode`.
    pub role: String,
    /// Sequences × tokens per call.
    pub shape: String,
    /// Median wall time per call, milliseconds.
    pub median_ms: f64,
    /// Tokens processed per second (batch × tokens / time).
    pub tokens_per_s: f64,
    /// Time to compile the kernel with Cranelift, milliseconds.
    pub compile_ms: f64,
}

/// A deterministic generator for benchmark inputs (SplitMix64), values in [−1, 1).
struct Rng(u64);

impl Rng {
    fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.0;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }
}

/// Times every recurrence kernel of `model` at `batch` sequences of `tokens` tokens.
pub fn run(model: &Model, batch: usize, tokens: usize, repeats: usize) -> Result<Vec<Measurement>, String> {
    let kernels = model_kernels(model).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // The recurrences' inference kernels; training and attention kernels are timed on the GPU by
    // hlac-gpu-bench.
    for k in kernels.into_iter().filter(|k| matches!(k.role, "chunk_fwd" | "scan_fwd" | "decode")) {
        out.push(measure(model, &k, batch, tokens, repeats.max(1))?);
    }
    Ok(out)
}

fn measure(model: &Model, k: &ModelKernel, batch: usize, tokens: usize, repeats: usize) -> Result<Measurement, String> {
    let mixer = k.mixer.and_then(|i| model.mixers.iter().nth(i)).map(|(_, m)| m).ok_or("kernel without a mixer")?;
    let math = mixer.instance.math.as_ref().ok_or("kernel of a mixer without math")?;
    let (kd, vd, heads) = (math.key_axis.1 as usize, math.value_axis.1 as usize, mixer.instance.heads as usize);
    let decode = k.role == "decode";
    let rows = if decode { batch } else { batch * tokens };
    let program = &k.kernel.program;
    let mut rng = Rng(0x5eed);
    let cu: Vec<i64> = (0..=batch).map(|s| (s * tokens) as i64).collect();
    let positions = vec![tokens as i64; batch];
    // One buffer per parameter, sized from its role.
    let mut buffers: Vec<Vec<f32>> = Vec::new();
    for p in &program.params {
        let n = match p.name.as_str() {
            "o" => rows * heads * vd,
            "h0" | "ht" | "state" => batch * heads * kd * vd,
            "lower_bound" => heads * kd,
            name if math.head_params.iter().any(|h| h.name == name) => heads,
            name => match math.tokens.iter().find(|t| t.name.name == name) {
                Some(t) => {
                    let width = match &t.dim {
                        None => 1,
                        Some(d) if d.name == math.key_axis.0 => kd,
                        Some(_) => vd,
                    };
                    rows * heads * width
                }
                None => 0,
            },
        };
        buffers.push(rng.fill(n));
    }
    let started = Instant::now();
    let mut module = CpuModule::new().map_err(|e| e.to_string())?;
    let id = module.add(program.clone()).map_err(|e| e.to_string())?;
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;
    let value_blocks = k
        .kernel
        .grid
        .get(1)
        .and_then(|g| g.split(" / ").collect::<Vec<_>>().get(1).and_then(|b| b.parse::<usize>().ok()))
        .map_or(1, |b| vd / b);
    let grid: Vec<u64> = if k.role == "scan_fwd" {
        vec![batch as u64, heads.div_ceil(64) as u64]
    } else {
        vec![(batch * heads) as u64, value_blocks as u64]
    };
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats + 1 {
        let mut args: Vec<Arg<'_>> = Vec::new();
        for (p, buf) in program.params.iter().zip(buffers.iter_mut()) {
            args.push(match (&p.kind, p.name.as_str()) {
                (ParamKind::Int, "use_h0" | "use_ht") => Arg::Int(1),
                (ParamKind::Int, _) => Arg::Int(0),
                (_, "cu_seqlens") => Arg::I64(&cu),
                (_, "positions") => Arg::I64(&positions),
                (ParamKind::Ptr { writable: true, .. }, _) => Arg::F32Mut(buf),
                _ => Arg::F32(buf),
            });
        }
        let t = Instant::now();
        module.launch(id, &mut args, &grid).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    // The first call warms caches and page tables; it is not counted.
    times.remove(0);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let processed = if decode { batch } else { batch * tokens };
    Ok(Measurement {
        kernel: k.name.clone(),
        role: k.role.to_string(),
        shape: if decode { format!("{batch} x 1") } else { format!("{batch} x {tokens}") },
        median_ms: median * 1e3,
        tokens_per_s: processed as f64 / median,
        compile_ms,
    })
}
