//! Helpers the kernel tests share: conversions between the reference's f64 and the kernels' f32,
//! the relative L2 error they are judged by, packed-sequence offsets, a spec's first mixer, and for
//! kernels whose activations are stored in bf16 or f16: rounding inputs to the storage type, a
//! launcher that binds buffers by parameter name in each parameter's element type, and the
//! tolerance such outputs are judged by ([`check_stored`]).

use std::collections::HashMap;

use half::{bf16, f16};
use hlac_runtime::cpu::{Arg, CpuModule, KernelId};
use hlac_runtime::kir::{DType, ParamKind, Program};

/// f64 → f32, elementwise.
pub fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|v| *v as f32).collect()
}

/// f32 → f64, elementwise.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| f64::from(*v)).collect()
}

/// ‖got − want‖₂ / ‖want‖₂; infinite when `got` holds a NaN or infinity (which never passes), the
/// absolute norm when `want` is zero.
pub fn rel_l2_f64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// [`rel_l2_f64`] of an f32 result against an f64 reference.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    rel_l2_f64(&f64s(got), want)
}

/// Cumulative offsets of packed sequences of the given lengths, as usize (for the reference) and
/// i64 (for the kernels).
pub fn packing(lengths: &[usize]) -> (Vec<usize>, Vec<i64>) {
    let mut cu = vec![0usize];
    for l in lengths {
        cu.push(cu.last().copied().unwrap_or(0) + l);
    }
    let cu64 = cu.iter().map(|&x| x as i64).collect();
    (cu, cu64)
}

/// The first chunk of each sequence of the given lengths in a `[chunks, …]` buffer of `chunk`-token
/// chunks, then the number of chunks (`chunk_offsets`, as the chunked kernels read it).
pub fn chunk_offsets(lengths: impl IntoIterator<Item = usize>, chunk: usize) -> Vec<i64> {
    let mut out = vec![0i64];
    for l in lengths {
        out.push(out.last().copied().unwrap_or(0) + l.div_ceil(chunk) as i64);
    }
    out
}

/// The first mixer of a model compiled from spec text (panics with the diagnostics if it fails).
pub fn mixer(spec: &str) -> hlac::ir::Mixer {
    let c = hlac::compile_str("<kernel test>", spec, &crate::root());
    assert!(!c.failed(), "{}", c.render(false));
    let model = c.model.expect("a spec with a model");
    let first = model.mixers.iter().next().map(|(_, m)| m.clone());
    first.expect("a mixer")
}

/// Each value rounded to the nearest value of `dtype` (ties to even), as f64: what a buffer of that
/// element type holds. A test rounds its inputs with this before computing the reference, so that
/// kernel and reference see the same numbers and only the kernel's own arithmetic and the rounding
/// of its outputs remain to be judged.
pub fn stored(dtype: DType, x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|&v| match dtype {
            DType::Bf16 => f64::from(bf16::from_f64(v).to_f32()),
            DType::F16 => f64::from(f16::from_f64(v).to_f32()),
            _ => f64::from(v as f32),
        })
        .collect()
}

/// A kernel argument by parameter name, for [`launch`]. Float data is given as f32 and stored as
/// the parameter's element type (rounded to nearest, ties to even, for bf16 and f16 parameters).
pub enum Buf {
    /// Data the kernel reads.
    In(Vec<f32>),
    /// A buffer the kernel writes, with its initial contents (NaN, so that an element no instance
    /// writes shows; or a state the kernel updates in place).
    Out(Vec<f32>),
    /// Integer data (offsets).
    I64(Vec<i64>),
    /// An integer parameter.
    Int(i64),
}

/// A buffer in its parameter's element type.
enum Host {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    Int(i64),
}

impl Host {
    fn new(dtype: DType, data: Vec<f32>) -> Host {
        match dtype {
            DType::Bf16 => Host::Bf16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Host::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => Host::F32(data),
        }
    }

    fn widened(self) -> Vec<f32> {
        match self {
            Host::F32(v) => v,
            Host::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Host::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Host::I64(_) | Host::Int(_) => Vec::new(),
        }
    }
}

/// Compiles `program` for the CPU and launches it once; see [`launch_compiled`].
pub fn launch(program: &Program, bufs: HashMap<String, Buf>, grid: &[u64]) -> HashMap<String, Vec<f32>> {
    let mut module = CpuModule::new().expect("jit");
    let id = module.add(program.clone()).unwrap_or_else(|e| panic!("{e}\n{program}"));
    launch_compiled(&module, id, bufs, grid)
}

/// Launches kernel `id` of `module` binding each parameter by name from `bufs` (panicking on a
/// missing or unused name, or a failed launch); returns every written buffer by name, widened to
/// f32.
pub fn launch_compiled(module: &CpuModule, id: KernelId, mut bufs: HashMap<String, Buf>, grid: &[u64]) -> HashMap<String, Vec<f32>> {
    let program = module.program(id);
    let mut hosts: Vec<(String, Host)> = Vec::with_capacity(program.params.len());
    for p in &program.params {
        let buf = bufs.remove(&p.name).unwrap_or_else(|| panic!("no buffer for `{}` of {}", p.name, program.name));
        let host = match (&p.kind, buf) {
            (ParamKind::Ptr { dtype, .. }, Buf::In(v) | Buf::Out(v)) => Host::new(*dtype, v),
            (_, Buf::I64(v)) => Host::I64(v),
            (_, Buf::Int(i)) => Host::Int(i),
            (ParamKind::Int, _) => panic!("a buffer for the integer parameter `{}`", p.name),
        };
        hosts.push((p.name.clone(), host));
    }
    assert!(bufs.is_empty(), "{} has no parameters {:?}", program.name, bufs.keys().collect::<Vec<_>>());
    {
        let mut args: Vec<Arg<'_>> = hosts
            .iter_mut()
            .zip(&program.params)
            .map(|((_, h), p)| {
                let writable = matches!(p.kind, ParamKind::Ptr { writable: true, .. });
                match (h, writable) {
                    (Host::F32(v), false) => Arg::F32(v),
                    (Host::F32(v), true) => Arg::F32Mut(v),
                    (Host::Bf16(v), false) => Arg::Bf16(v),
                    (Host::Bf16(v), true) => Arg::Bf16Mut(v),
                    (Host::F16(v), false) => Arg::F16(v),
                    (Host::F16(v), true) => Arg::F16Mut(v),
                    (Host::I64(v), _) => Arg::I64(v),
                    (Host::Int(i), _) => Arg::Int(*i),
                }
            })
            .collect();
        module.launch(id, &mut args, grid).unwrap_or_else(|e| panic!("{e}"));
    }
    hosts
        .into_iter()
        .zip(&program.params)
        .filter(|(_, p)| matches!(p.kind, ParamKind::Ptr { writable: true, .. }))
        .map(|((name, h), _)| (name, h.widened()))
        .collect()
}

/// The unit roundoff of a storage type: rounding to nearest moves a value by at most this much
/// relative to itself (2⁻⁸ for bf16's 8 significant bits, 2⁻¹¹ for f16, 2⁻²⁴ for f32).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::Bf16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// Judges a kernel output stored as `dtype` against the f64 reference computed on the same
/// (rounded) inputs, and returns its relative L2 error.
///
/// The kernel computes y in f32 and rounds it to `dtype` on the store. With u the storage type's
/// [`unit_roundoff`] and εᵢ = |yᵢ − refᵢ| the error of the computation before that rounding:
///
/// |outᵢ − refᵢ| ≤ |round(yᵢ) − yᵢ| + εᵢ ≤ u·|yᵢ| + εᵢ ≤ u·|refᵢ| + (1 + u)·εᵢ.
///
/// `compute` bounds ε relative to the output's scale: the f32 kernel tests' tolerance (1e-5 for
/// forwards, 1e-4 for gradients against central differences, both relative L2 errors), or u itself
/// for a kernel that reads an intermediate a previous kernel stored as `dtype` (the scan's and
/// attention's backward read the forward's rounded `o`: an input perturbed by up to u relative).
/// Hence the two checks:
/// - per element, |outᵢ − refᵢ| ≤ u·|refᵢ| + 2·compute·max|ref|: the first term is the rounding,
///   exact; the second the computation's error, which the f32 tests bound in the L2 norm only — it
///   spreads over the elements rather than piling onto one, and twice its share of the largest
///   element leaves room (a wrong or unrounded element is off by far more);
/// - in the L2 norm, ‖out − ref‖ ≤ u·‖ref‖ + (1 + u)·‖ε‖, so a relative error ≤ u + compute: for
///   bf16 forwards 2⁻⁸ + 1e-5 ≈ 3.92e-3 (within the 4e-3 asked of them). Rounding to nearest
///   moves values whose significands spread over an octave by about 0.4·u in the RMS (1.6e-3 for
///   bf16), which is what these kernels show (1.6e-3 to 2.1e-3).
///
/// Every element must be finite: outputs start as NaN, so an unwritten one fails.
pub fn check_stored(what: &str, dtype: DType, got: &[f32], want: &[f64], compute: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let unwritten = got.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(unwritten, 0, "{what}: {unwritten} of {} elements unwritten or not finite", got.len());
    let u = unit_roundoff(dtype);
    let largest = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs();
        let bound = u * w.abs() + 2.0 * compute * largest;
        assert!(err <= bound, "{what}: element {i} is {g}, the reference {w} (error {err:.3e} > bound {bound:.3e})");
    }
    let rel = rel_l2(got, want);
    assert!(rel <= u + compute, "{what}: relative L2 error {rel:.3e} > {:.3e}", u + compute);
    rel
}
