//! The CPU back end: kernel programs compiled with Cranelift when an artifact is loaded, and run
//! in parallel over their grid with rayon. Launches are safe: every buffer is passed with its
//! length and every access the kernel makes is bounds-checked (see [`codegen`]).

#![allow(unsafe_code)]

pub mod codegen;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::kir::{DType, ParamKind, Program};
use codegen::{CodegenError, Jit};

/// An argument of a kernel launch. A pointer parameter takes the buffer variant of its element
/// type (read-only variants only for parameters the kernel does not write).
pub enum Arg<'a> {
    /// A buffer the kernel only reads.
    F32(&'a [f32]),
    /// A buffer the kernel writes.
    F32Mut(&'a mut [f32]),
    /// A bf16 buffer the kernel only reads (loads widen it to f32).
    Bf16(&'a [bf16]),
    /// A bf16 buffer the kernel writes (stores round to bf16).
    Bf16Mut(&'a mut [bf16]),
    /// An f16 buffer the kernel only reads.
    F16(&'a [f16]),
    /// An f16 buffer the kernel writes.
    F16Mut(&'a mut [f16]),
    /// Integer data the kernel reads (offsets such as `cu_seqlens`).
    I64(&'a [i64]),
    /// An integer parameter.
    Int(i64),
}

impl Arg<'_> {
    /// What the argument is, for error messages (`a read-only bf16 buffer`).
    fn describe(&self) -> String {
        let (what, dtype) = match self {
            Arg::F32(_) => ("a read-only", "f32"),
            Arg::F32Mut(_) => ("a writable", "f32"),
            Arg::Bf16(_) => ("a read-only", "bf16"),
            Arg::Bf16Mut(_) => ("a writable", "bf16"),
            Arg::F16(_) => ("a read-only", "f16"),
            Arg::F16Mut(_) => ("a writable", "f16"),
            Arg::I64(_) => ("a read-only", "i64"),
            Arg::Int(_) => return "an integer".to_string(),
        };
        format!("{what} {dtype} buffer")
    }
}

/// Why a launch failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The arguments do not match the kernel's parameters.
    #[error("kernel `{kernel}`: {reason}")]
    Arguments {
        /// The kernel.
        kernel: String,
        /// What is wrong.
        reason: String,
    },
    /// The kernel accessed a buffer outside its bounds (a bug in hlac's lowering, or buffers too small
    /// for the sizes passed).
    #[error("kernel `{kernel}` accessed parameter `{param}` out of bounds")]
    OutOfBounds {
        /// The kernel.
        kernel: String,
        /// The parameter.
        param: String,
    },
}

/// A compiled kernel in a [`CpuModule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelId(usize);

struct Kernel {
    program: Program,
    entry: usize,
    scratch_bytes: usize,
}

/// A set of kernels compiled for the host CPU.
pub struct CpuModule {
    jit: Jit,
    kernels: Vec<Kernel>,
}

type Entry = unsafe extern "C" fn(*const u64, *const i64, *mut u8);

impl CpuModule {
    /// An empty module.
    pub fn new() -> Result<CpuModule, CodegenError> {
        Ok(CpuModule { jit: Jit::new()?, kernels: Vec::new() })
    }

    /// Compiles a program into the module.
    pub fn add(&mut self, program: Program) -> Result<KernelId, CodegenError> {
        let compiled = self.jit.compile(&program)?;
        self.kernels.push(Kernel { program, entry: compiled.entry as usize, scratch_bytes: compiled.scratch_bytes });
        Ok(KernelId(self.kernels.len() - 1))
    }

    /// Compiles every kernel of an artifact, returning the module and the kernels' ids in the
    /// order of the manifest's `kernels`.
    pub fn load(artifact: &crate::Artifact) -> Result<(CpuModule, Vec<KernelId>), CodegenError> {
        let mut module = CpuModule::new()?;
        let ids = artifact.programs.iter().map(|p| module.add(p.clone())).collect::<Result<Vec<_>, _>>()?;
        Ok((module, ids))
    }

    /// The program a kernel was compiled from.
    pub fn program(&self, id: KernelId) -> &Program {
        &self.kernels[id.0].program
    }

    /// Runs a kernel over `grid` (one extent per grid axis), instances in parallel.
    pub fn launch(&self, id: KernelId, args: &mut [Arg<'_>], grid: &[u64]) -> Result<(), LaunchError> {
        let k = &self.kernels[id.0];
        let p = &k.program;
        let bad = |reason: String| LaunchError::Arguments { kernel: p.name.clone(), reason };
        if args.len() != p.params.len() {
            return Err(bad(format!("{} arguments for {} parameters", args.len(), p.params.len())));
        }
        if grid.len() != p.grid.len() {
            return Err(bad(format!("a grid of {} axes for {} axes", grid.len(), p.grid.len())));
        }
        let mut words = Vec::with_capacity(2 * args.len());
        for (param, arg) in p.params.iter().zip(args.iter_mut()) {
            let (addr, len) = match (&param.kind, arg) {
                (ParamKind::Ptr { dtype: DType::F32, writable: false }, Arg::F32(s)) => (s.as_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::F32, .. }, Arg::F32Mut(s)) => (s.as_mut_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::Bf16, writable: false }, Arg::Bf16(s)) => (s.as_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::Bf16, .. }, Arg::Bf16Mut(s)) => (s.as_mut_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::F16, writable: false }, Arg::F16(s)) => (s.as_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::F16, .. }, Arg::F16Mut(s)) => (s.as_mut_ptr() as u64, s.len() as u64),
                (ParamKind::Ptr { dtype: DType::I64, writable: false }, Arg::I64(s)) => (s.as_ptr() as u64, s.len() as u64),
                (ParamKind::Int, Arg::Int(v)) => (*v as u64, 0),
                (kind, arg) => {
                    let want = match kind {
                        ParamKind::Ptr { dtype, writable } => {
                            format!("{}{} buffer", if *writable { "writable " } else { "" }, dtype.name())
                        }
                        ParamKind::Int => "integer".to_string(),
                    };
                    return Err(bad(format!("argument for `{}` has the wrong kind: {} for a {want}", param.name, arg.describe())));
                }
            };
            words.extend([addr, len]);
        }
        let total: u64 = grid.iter().product();
        let entry = k.entry;
        let scratch = k.scratch_bytes.max(64);
        let failed = (0..total)
            .into_par_iter()
            .map_init(
                || vec![0u64; scratch.div_ceil(8)],
                |buf, flat| {
                    let mut pid = [0i64; 3];
                    let mut rest = flat;
                    for axis in (0..grid.len()).rev() {
                        pid[axis] = (rest % grid[axis]) as i64;
                        rest /= grid[axis];
                    }
                    buf[0] = 0;
                    // SAFETY: `entry` was compiled from a verified program by this module's JIT, which
                    // lives as long as `self`. `words` holds, for every pointer parameter, the address
                    // and length of a live slice borrowed for this call (mutably for written buffers),
                    // and the compiled code bounds-checks every access against those lengths. `buf`
                    // is at least the kernel's scratch size, 8-byte aligned. Instances write disjoint
                    // elements of output buffers by construction of the lowering.
                    unsafe {
                        let f: Entry = std::mem::transmute::<usize, Entry>(entry);
                        f(words.as_ptr(), pid.as_ptr(), buf.as_mut_ptr().cast::<u8>());
                    }
                    buf[0]
                },
            )
            .find_any(|code| *code != 0);
        if let Some(code) = failed {
            let param = p.params.get(code as usize - 1).map_or("?".to_string(), |x| x.name.clone());
            return Err(LaunchError::OutOfBounds { kernel: p.name.clone(), param });
        }
        Ok(())
    }
}
