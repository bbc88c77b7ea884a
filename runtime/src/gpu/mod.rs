//! The GPU back end: the PTX the compiler wrote for each kernel, loaded through the CUDA driver
//! (cudarc, loaded at run time, so this crate builds and runs where CUDA is absent and reports
//! [`GpuError::NoDriver`] there) and launched with the same arguments as the CPU launcher
//! ([`crate::cpu::CpuModule::launch`]).
//!
//! The kernel ABI the compiler's PTX follows, parameter by parameter: for each kernel-IR parameter
//! in order, a pointer parameter is two kernel parameters — the device address (u64) and the
//! buffer's element count (i64), against which the kernel bounds-checks — and an integer
//! parameter is one i64. Then `scratch`, the address of a zero-initialised workspace of
//! `scratch_bytes` per program instance, and `error`, the address of one u64 that is zero before
//! the launch; the kernel stores `p + 1` there when it accesses parameter `p` out of bounds. One
//! block of `threads` threads runs one program instance; the launch grid is the program's grid. A
//! kernel whose workspace is in shared memory gets `shared_bytes` of dynamic shared memory per
//! block (opted in above 48 KiB at load, after checking the device allows that much).
//!
//! Every driver failure comes back as a [`GpuError`] naming the kernel (where there is one) and the
//! driver's cause; nothing here panics on a driver error.

#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

use crate::kir::{DType, ParamKind, Program};

/// Why the GPU back end could not do something.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The CUDA driver library is not installed (no GPU on this machine, or no driver).
    #[error("no CUDA driver found: {0}")]
    NoDriver(String),
    /// The driver failed outside any kernel (initialisation, context creation, device queries).
    #[error("CUDA driver error while {what}: {cause}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        cause: DriverError,
    },
    /// The device cannot run code compiled for the artifact's target.
    #[error("the artifact targets `{target}`, but device 0 ({device}) has compute capability {major}.{minor}; {reason}")]
    Device {
        /// The artifact's `target.device`.
        target: String,
        /// The device's name.
        device: String,
        /// Its compute capability, major part.
        major: i32,
        /// Its compute capability, minor part.
        minor: i32,
        /// What the target needs.
        reason: String,
    },
    /// The artifact carries no usable PTX for a kernel.
    #[error("kernel `{kernel}`: {reason}")]
    Ptx {
        /// The kernel.
        kernel: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// The driver rejected a kernel's PTX (a PTX version or target this driver does not know, a
    /// missing entry point, an assembler error).
    #[error("kernel `{kernel}`: the CUDA driver rejected its PTX {ptx}: {cause}")]
    ModuleLoad {
        /// The kernel.
        kernel: String,
        /// The PTX file.
        ptx: PathBuf,
        /// The driver's error.
        cause: DriverError,
    },
    /// Device memory could not be allocated, filled or copied (out of memory, or a context broken
    /// by an earlier fault).
    #[error("device memory: {what}: {cause}")]
    Memory {
        /// What was being done (and for which kernel).
        what: String,
        /// The driver's error.
        cause: DriverError,
    },
    /// The arguments or grid do not match the kernel's parameters.
    #[error("kernel `{kernel}`: {reason}")]
    Arguments {
        /// The kernel.
        kernel: String,
        /// What is wrong.
        reason: String,
    },
    /// The launch failed, or the kernel faulted while running.
    #[error("kernel `{kernel}` failed {stage}: {cause}")]
    Launch {
        /// The kernel.
        kernel: String,
        /// `to launch` or `while running`.
        stage: &'static str,
        /// The driver's error.
        cause: DriverError,
    },
    /// The kernel accessed a buffer outside its bounds (a bug in hlac's lowering or code
    /// generation, or buffers too small for the sizes passed).
    #[error("kernel `{kernel}` accessed parameter `{param}` out of bounds")]
    OutOfBounds {
        /// The kernel.
        kernel: String,
        /// The parameter.
        param: String,
    },
}

/// Whether the CUDA driver library can be loaded on this machine. Everything else in this module
/// needs it; call this first to skip GPU work cleanly where there is none.
pub fn driver_present() -> bool {
    // SAFETY: this only tries to dlopen the driver library under its usual names (running its
    // initialisers, as any use of CUDA does) and drops the handle again; it touches no memory of ours.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn no_driver() -> GpuError {
    GpuError::NoDriver("libcuda could not be loaded (is an NVIDIA driver installed?)".into())
}

/// A CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Ordinal.
    pub ordinal: usize,
    /// Marketing name (`NVIDIA H100 80GB HBM3`, …).
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_memory: usize,
}

/// Every CUDA device the driver sees (empty when the driver is installed but no device is usable).
pub fn devices() -> Result<Vec<DeviceInfo>, GpuError> {
    if !driver_present() {
        return Err(no_driver());
    }
    let driver = |what: &str| {
        let what = what.to_string();
        move |cause| GpuError::Driver { what: what.clone(), cause }
    };
    cudarc::driver::result::init().map_err(driver("initialising CUDA"))?;
    let count = CudaContext::device_count().map_err(driver("counting devices"))?;
    let mut out = Vec::new();
    for ordinal in 0..usize::try_from(count).unwrap_or(0) {
        let ctx = CudaContext::new(ordinal).map_err(driver(&format!("opening device {ordinal}")))?;
        out.push(DeviceInfo {
            ordinal,
            name: ctx.name().map_err(driver("reading the device name"))?,
            compute_capability: ctx.compute_capability().map_err(driver("reading the compute capability"))?,
            total_memory: ctx.total_mem().map_err(driver("reading the memory size"))?,
        });
    }
    Ok(out)
}

/// Checks that a device of compute capability `major.minor` runs PTX compiled for `target`:
/// `sm_80` PTX is JIT-compiled forward to any later architecture, `sm_90` PTX (which may use
/// Hopper-only instructions such as wgmma) runs on Hopper only.
pub fn check_target(target: &str, device: &str, (major, minor): (i32, i32)) -> Result<(), GpuError> {
    let reason = match target {
        "sm_80" if major >= 8 => return Ok(()),
        "sm_80" => "sm_80 needs compute capability 8.0 or newer",
        "sm_90" if major == 9 => return Ok(()),
        "sm_90" => "sm_90 needs compute capability 9.x (Hopper)",
        "cpu" => "it was compiled for the CPU; rebuild it with `device = sm_80` or `sm_90`",
        _ => "this runtime knows no such GPU target",
    };
    Err(GpuError::Device { target: target.to_string(), device: device.to_string(), major, minor, reason: reason.to_string() })
}

/// Device memory holding f32, bf16, f16 or i64 elements.
pub struct GpuBuffer {
    data: Data,
    len: usize,
}

/// A buffer's device memory. bf16 and f16 elements are kept as their 16-bit patterns: the driver
/// only copies bytes, and this way cudarc needs no half-precision support of its own.
enum Data {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    F16(CudaSlice<u16>),
    I64(CudaSlice<i64>),
}

impl Data {
    /// The device address, for a launch that only reads the buffer, and the guard that orders the
    /// buffer's later uses after the launch.
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            Data::F32(s) => s.device_ptr(stream),
            Data::Bf16(s) | Data::F16(s) => s.device_ptr(stream),
            Data::I64(s) => s.device_ptr(stream),
        }
    }

    /// As [`Data::device_ptr`], for a launch that writes the buffer.
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        match self {
            Data::F32(s) => s.device_ptr_mut(stream),
            Data::Bf16(s) | Data::F16(s) => s.device_ptr_mut(stream),
            Data::I64(s) => s.device_ptr_mut(stream),
        }
    }
}

impl GpuBuffer {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::Bf16(_) => DType::Bf16,
            Data::F16(_) => DType::F16,
            Data::I64(_) => DType::I64,
        }
    }
}

/// An argument of a kernel launch, as [`crate::cpu::Arg`] but in device memory: the variant
/// names the element type and access the parameter must have, and the buffer must hold that type.
pub enum GpuArg<'a> {
    /// An f32 buffer the kernel only reads.
    F32(&'a GpuBuffer),
    /// An f32 buffer the kernel writes.
    F32Mut(&'a mut GpuBuffer),
    /// A bf16 buffer the kernel only reads (loads widen it to f32).
    Bf16(&'a GpuBuffer),
    /// A bf16 buffer the kernel writes (stores round to bf16).
    Bf16Mut(&'a mut GpuBuffer),
    /// An f16 buffer the kernel only reads.
    F16(&'a GpuBuffer),
    /// An f16 buffer the kernel writes.
    F16Mut(&'a mut GpuBuffer),
    /// Integer data the kernel reads (offsets such as `cu_seqlens`).
    I64(&'a GpuBuffer),
    /// An integer parameter.
    Int(i64),
}

/// A kernel loaded into a [`GpuModule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuKernelId(usize);

struct Kernel {
    program: Program,
    /// The module the function is in (kept for its globals: a profile build's counters).
    module: Arc<cudarc::driver::CudaModule>,
    func: CudaFunction,
    threads: u32,
    scratch_bytes: u64,
    /// Dynamic shared memory per block.
    shared_bytes: u32,
}

/// Where a profile build's blocks spent their cycles, summed over every block of every launch
/// since the counters were cleared (thread 0's clock: the block's critical path).
#[derive(Debug, Clone)]
pub struct KernelProfile {
    /// Each counter's instruction, in the kernel IR's text form.
    pub ops: Vec<String>,
    /// Cycles charged to each (the time since the previous counted instruction ended).
    pub cycles: Vec<u64>,
    /// The blocks' whole time, start to end.
    pub block_cycles: u64,
}

/// The kernels of an artifact loaded on device 0, with the stream they run on.
pub struct GpuModule {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device: DeviceInfo,
    kernels: Vec<Kernel>,
}

impl GpuModule {
    /// Opens device 0, checks it against the artifact's target and loads every kernel's PTX,
    /// returning the module and the kernels' ids in the order of the manifest's `kernels`.
    pub fn load(artifact: &crate::Artifact) -> Result<(GpuModule, Vec<GpuKernelId>), GpuError> {
        if !driver_present() {
            return Err(no_driver());
        }
        let driver = |what: &'static str| move |cause| GpuError::Driver { what: what.to_string(), cause };
        let ctx = CudaContext::new(0).map_err(driver("opening device 0"))?;
        let device = DeviceInfo {
            ordinal: 0,
            name: ctx.name().map_err(driver("reading the device name"))?,
            compute_capability: ctx.compute_capability().map_err(driver("reading the compute capability"))?,
            total_memory: ctx.total_mem().map_err(driver("reading the memory size"))?,
        };
        check_target(&artifact.manifest.target.device, &device.name, device.compute_capability)?;
        let stream = ctx.default_stream();
        let mut kernels = Vec::with_capacity(artifact.programs.len());
        let max_shared = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver("reading the shared-memory limit"))?;
        for (info, program) in artifact.manifest.kernels.iter().zip(&artifact.programs) {
            let fail = |reason: String| GpuError::Ptx { kernel: info.name.clone(), reason };
            let (Some(ptx), Some(entry), Some(threads)) = (&info.ptx, &info.entry, info.threads) else {
                return Err(fail("the manifest gives no PTX, entry or thread count (was the artifact built for a GPU?)".into()));
            };
            if threads == 0 || threads > 1024 {
                return Err(fail(format!("{threads} threads per block (a block has 1 to 1024)")));
            }
            let path = artifact.dir.join(ptx);
            let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
            // cudarc passes both strings through `CString::new(..).unwrap()`: reject NULs here so
            // a corrupt file is an error, not a panic.
            if text.contains('\0') || entry.contains('\0') {
                return Err(fail(format!("{} or its entry name contains a NUL byte", path.display())));
            }
            // A cubin assembled for the target loads in microseconds; the PTX (which the driver
            // compiles, seconds for large kernels) is the fallback, e.g. for an sm_80 cubin on a
            // Hopper card.
            let cubin = info.cubin.as_ref().and_then(|c| std::fs::read(artifact.dir.join(c)).ok());
            let module = match cubin.map(|bytes| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bytes))) {
                Some(Ok(m)) => m,
                _ => ctx.load_module(cudarc::nvrtc::Ptx::from_src(text)).map_err(|cause| GpuError::ModuleLoad {
                    kernel: info.name.clone(),
                    ptx: path.clone(),
                    cause,
                })?,
            };
            let func = module.load_function(entry).map_err(|cause| GpuError::ModuleLoad {
                kernel: info.name.clone(),
                ptx: path.clone(),
                cause,
            })?;
            let shared_bytes = info.shared_bytes.unwrap_or(0);
            let shared_bytes = match u32::try_from(shared_bytes) {
                Ok(b) if i64::from(b) <= i64::from(max_shared) => b,
                _ => {
                    return Err(fail(format!("needs {shared_bytes} bytes of shared memory per block; {} allows {max_shared}", device.name)))
                }
            };
            // Above 48 KiB a kernel must opt in to its dynamic shared memory.
            if shared_bytes > 48 * 1024 {
                func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes as i32)
                    .map_err(|cause| GpuError::ModuleLoad { kernel: info.name.clone(), ptx: path.clone(), cause })?;
            }
            // The share of each SM's unified L1/shared memory a kernel with a shared workspace
            // asks for, in percent (HLAC_GPU_CARVEOUT=n, for A/B measurements; unset, the
            // driver's choice): a hint, which could decide whether two blocks of a 112 KB
            // workspace share an SM. 100 made no difference to attention's forward on an H200
            // (6.38 ms either way, 2026-12-03), so the driver's choice stands.
            if let Some(percent) = carveout().filter(|_| shared_bytes > 0) {
                func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, percent)
                    .map_err(|cause| GpuError::ModuleLoad { kernel: info.name.clone(), ptx: path.clone(), cause })?;
            }
            kernels.push(Kernel {
                program: program.clone(),
                module,
                func,
                threads,
                scratch_bytes: info.scratch_bytes.unwrap_or(0),
                shared_bytes,
            });
        }
        let ids = (0..kernels.len()).map(GpuKernelId).collect();
        Ok((GpuModule { ctx, stream, device, kernels }, ids))
    }

    /// The device the module runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// The program a kernel was compiled from.
    pub fn program(&self, id: GpuKernelId) -> &Program {
        &self.kernels[id.0].program
    }

    /// Copies f32 data to a new device buffer.
    pub fn upload_f32(&self, data: &[f32]) -> Result<GpuBuffer, GpuError> {
        let slice = self.upload(data)?;
        Ok(GpuBuffer { data: Data::F32(slice), len: data.len() })
    }

    /// Copies bf16 data to a new device buffer.
    pub fn upload_bf16(&self, data: &[bf16]) -> Result<GpuBuffer, GpuError> {
        let slice = self.upload(data.reinterpret_cast())?;
        Ok(GpuBuffer { data: Data::Bf16(slice), len: data.len() })
    }

    /// Copies f16 data to a new device buffer.
    pub fn upload_f16(&self, data: &[f16]) -> Result<GpuBuffer, GpuError> {
        let slice = self.upload(data.reinterpret_cast())?;
        Ok(GpuBuffer { data: Data::F16(slice), len: data.len() })
    }

    /// Copies i64 data to a new device buffer.
    pub fn upload_i64(&self, data: &[i64]) -> Result<GpuBuffer, GpuError> {
        let slice = self.upload(data)?;
        Ok(GpuBuffer { data: Data::I64(slice), len: data.len() })
    }

    /// A new f32 buffer of `len` zeros.
    pub fn zeros_f32(&self, len: usize) -> Result<GpuBuffer, GpuError> {
        let slice = self.stream.alloc_zeros::<f32>(len.max(1)).map_err(|cause| memory(format!("allocating {len} f32"), cause))?;
        Ok(GpuBuffer { data: Data::F32(slice), len })
    }

    /// Overwrites a buffer with host data of the same length and type.
    pub fn write_f32(&self, buffer: &mut GpuBuffer, data: &[f32]) -> Result<(), GpuError> {
        match &mut buffer.data {
            Data::F32(s) if buffer.len == data.len() => {
                self.stream.memcpy_htod(data, s).map_err(|cause| memory(format!("copying {} f32 to the device", data.len()), cause))
            }
            _ => Err(GpuError::Arguments {
                kernel: String::new(),
                reason: format!("cannot write {} f32 into a buffer of {} {}", data.len(), buffer.len, buffer.dtype().name()),
            }),
        }
    }

    /// Copies an f32 buffer back to the host.
    pub fn download_f32(&self, buffer: &GpuBuffer) -> Result<Vec<f32>, GpuError> {
        match &buffer.data {
            Data::F32(s) => self.download(s, buffer.len),
            _ => Err(wrong_download("download_f32", buffer)),
        }
    }

    /// Copies a bf16 buffer back to the host.
    pub fn download_bf16(&self, buffer: &GpuBuffer) -> Result<Vec<bf16>, GpuError> {
        match &buffer.data {
            Data::Bf16(s) => Ok(self.download(s, buffer.len)?.reinterpret_cast::<bf16>().to_vec()),
            _ => Err(wrong_download("download_bf16", buffer)),
        }
    }

    /// Copies an f16 buffer back to the host.
    pub fn download_f16(&self, buffer: &GpuBuffer) -> Result<Vec<f16>, GpuError> {
        match &buffer.data {
            Data::F16(s) => Ok(self.download(s, buffer.len)?.reinterpret_cast::<f16>().to_vec()),
            _ => Err(wrong_download("download_f16", buffer)),
        }
    }

    /// Copies an i64 buffer back to the host.
    pub fn download_i64(&self, buffer: &GpuBuffer) -> Result<Vec<i64>, GpuError> {
        match &buffer.data {
            Data::I64(s) => self.download(s, buffer.len),
            _ => Err(wrong_download("download_i64", buffer)),
        }
    }

    fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, data: &[T]) -> Result<CudaSlice<T>, GpuError> {
        let what = || format!("copying {} elements to the device", data.len());
        // A zero-length allocation is an error for the driver; an empty buffer gets one element
        // that nothing reads (its length stays 0, and kernels bounds-check against the length).
        let mut slice = self.stream.alloc_zeros::<T>(data.len().max(1)).map_err(|cause| memory(what(), cause))?;
        if !data.is_empty() {
            self.stream.memcpy_htod(data, &mut slice).map_err(|cause| memory(what(), cause))?;
        }
        Ok(slice)
    }

    fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(&self, slice: &CudaSlice<T>, len: usize) -> Result<Vec<T>, GpuError> {
        let mut out = self.stream.clone_dtoh(slice).map_err(|cause| memory(format!("copying {len} elements to the host"), cause))?;
        out.truncate(len);
        Ok(out)
    }

    /// Runs a kernel over `grid` (one extent per grid axis, at most three) and waits for it.
    pub fn launch(&self, id: GpuKernelId, args: &mut [GpuArg<'_>], grid: &[u64]) -> Result<(), GpuError> {
        let (k, dims, total) = self.validate(id, grid)?;
        check_arg_count(k, args.len())?;
        if total == 0 {
            return Ok(());
        }
        let p = &k.program;
        let scratch_len = scratch_len(k, total)?;
        let in_kernel = |what: String| move |cause| memory(format!("{what} for kernel `{}`", p.name), cause);
        let mut scratch =
            self.stream.alloc_zeros::<u8>(scratch_len.max(256)).map_err(in_kernel(format!("allocating {scratch_len} bytes of scratch")))?;
        let mut error = self.stream.alloc_zeros::<u64>(1).map_err(in_kernel("allocating the error word".into()))?;
        self.enqueue(k, args, dims, &mut scratch, &mut error)?;
        self.finish(k, &error)
    }

    /// A workspace for launching kernel `id` over `grid` (or any smaller grid) with
    /// [`GpuModule::launch_async`]: its scratch (zeroed now) and its error word, allocated once so
    /// that repeated launches allocate nothing.
    pub fn workspace(&self, id: GpuKernelId, grid: &[u64]) -> Result<GpuWorkspace, GpuError> {
        let (k, _, total) = self.validate(id, grid)?;
        let len = scratch_len(k, total)?;
        let what = |w: &str| format!("{w} for kernel `{}`", k.program.name);
        let scratch = self
            .stream
            .alloc_zeros::<u8>(len.max(256))
            .map_err(|cause| memory(what(&format!("allocating {len} bytes of scratch")), cause))?;
        let error = self.stream.alloc_zeros::<u64>(1).map_err(|cause| memory(what("allocating the error word"), cause))?;
        Ok(GpuWorkspace { kernel: id, scratch, scratch_len: len, error })
    }

    /// Queues a launch of kernel `id` over `grid` on the module's stream and returns without
    /// waiting, so that launches can be queued back to back (and timed with [`GpuEvent`]s).
    ///
    /// Unlike [`GpuModule::launch`] it neither allocates nor zeroes scratch per launch: it uses
    /// `workspace`'s, which is zero when made and afterwards holds whatever the previous launch
    /// left; call [`GpuModule::clear_workspace`] first where a launch's results must follow the
    /// ABI's zero-initialised contract exactly. Launch failures that the driver reports at queue
    /// time come back here; faults while running and out-of-bounds accesses come back from
    /// [`GpuModule::check_workspace`], which waits for the stream.
    pub fn launch_async(
        &self,
        id: GpuKernelId,
        args: &mut [GpuArg<'_>],
        grid: &[u64],
        workspace: &mut GpuWorkspace,
    ) -> Result<(), GpuError> {
        let (k, dims, total) = self.validate(id, grid)?;
        check_arg_count(k, args.len())?;
        if total == 0 {
            return Ok(());
        }
        let bad = |reason: String| GpuError::Arguments { kernel: k.program.name.clone(), reason };
        if workspace.kernel != id {
            return Err(bad(format!("a workspace made for kernel #{}", workspace.kernel.0)));
        }
        let need = scratch_len(k, total)?;
        if need > workspace.scratch_len {
            return Err(bad(format!("the grid needs {need} bytes of scratch; the workspace has {}", workspace.scratch_len)));
        }
        self.enqueue(k, args, dims, &mut workspace.scratch, &mut workspace.error)
    }

    /// Queues zeroing `workspace`'s scratch on the module's stream (no wait).
    pub fn clear_workspace(&self, workspace: &mut GpuWorkspace) -> Result<(), GpuError> {
        self.stream.memset_zeros(&mut workspace.scratch).map_err(|cause| memory("zeroing a kernel's scratch".into(), cause))
    }

    /// Waits for everything queued on the module's stream, then reports what the launches queued
    /// with `workspace` since the last check did: a fault, or the first parameter accessed out of
    /// bounds (the error word keeps the code of the launch that last stored one). Resets the
    /// error word for the next launches.
    pub fn check_workspace(&self, workspace: &mut GpuWorkspace) -> Result<(), GpuError> {
        let k = self.kernels.get(workspace.kernel.0).ok_or_else(|| no_kernel(workspace.kernel))?;
        self.finish(k, &workspace.error)?;
        self.stream.memset_zeros(&mut workspace.error).map_err(|cause| memory("resetting the error word".into(), cause))
    }

    /// What a profile build of a kernel (`HLAC_NVPTX_PROFILE=1` at `hlac build`) counted since
    /// the last [`GpuModule::clear_profile`], after waiting for the stream; `None` for a kernel
    /// built without the counters.
    pub fn profile(&self, id: GpuKernelId) -> Result<Option<KernelProfile>, GpuError> {
        let k = self.kernels.get(id.0).ok_or_else(|| no_kernel(id))?;
        let (Ok(counts), Ok(names)) =
            (k.module.get_global("hlac_profile", &self.stream), k.module.get_global("hlac_profile_ops", &self.stream))
        else {
            return Ok(None);
        };
        let fail = |cause| memory(format!("reading kernel `{}`'s profile", k.program.name), cause);
        let counts = self.stream.clone_dtoh(&counts).map_err(fail)?;
        let names = self.stream.clone_dtoh(&names).map_err(fail)?;
        self.synchronize()?;
        let mut cycles: Vec<u64> = counts.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let block_cycles = cycles.pop().unwrap_or(0);
        let ops: Vec<String> = String::from_utf8_lossy(&names).split('\n').map(str::to_string).collect();
        if ops.len() != cycles.len() {
            return Err(GpuError::Ptx {
                kernel: k.program.name.clone(),
                reason: format!("its profile names {} counters but has {}", ops.len(), cycles.len()),
            });
        }
        Ok(Some(KernelProfile { ops, cycles, block_cycles }))
    }

    /// Zeroes a profile build's counters (nothing for a kernel without them).
    pub fn clear_profile(&self, id: GpuKernelId) -> Result<(), GpuError> {
        let k = self.kernels.get(id.0).ok_or_else(|| no_kernel(id))?;
        if let Ok(mut counts) = k.module.get_global("hlac_profile", &self.stream) {
            self.stream
                .memset_zeros(&mut counts)
                .map_err(|cause| memory(format!("zeroing kernel `{}`'s profile", k.program.name), cause))?;
        }
        Ok(())
    }

    /// Waits for everything queued on the module's stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(|cause| GpuError::Driver { what: "waiting for the stream".into(), cause })?;
        self.ctx.check_err().map_err(|cause| GpuError::Driver { what: "waiting for the stream".into(), cause })
    }

    /// A new event that records timing, for [`GpuModule::record`] and [`GpuEvent::elapsed_ms`].
    pub fn event(&self) -> Result<GpuEvent, GpuError> {
        self.ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map(GpuEvent)
            .map_err(|cause| GpuError::Driver { what: "creating an event".into(), cause })
    }

    /// Records `event` at the current end of the module's stream: it completes when everything
    /// queued before it has run.
    pub fn record(&self, event: &GpuEvent) -> Result<(), GpuError> {
        event.0.record(&self.stream).map_err(|cause| GpuError::Driver { what: "recording an event".into(), cause })
    }

    /// Checks a launch's grid against the kernel, returning the kernel, the CUDA grid and the
    /// number of program instances.
    fn validate(&self, id: GpuKernelId, grid: &[u64]) -> Result<(&Kernel, [u32; 3], u64), GpuError> {
        let k = self.kernels.get(id.0).ok_or_else(|| no_kernel(id))?;
        let p = &k.program;
        let bad = |reason: String| GpuError::Arguments { kernel: p.name.clone(), reason };
        if grid.len() != p.grid.len() {
            return Err(bad(format!("a grid of {} axes for {} axes", grid.len(), p.grid.len())));
        }
        if grid.len() > 3 {
            return Err(bad(format!("{} grid axes; CUDA has three", grid.len())));
        }
        let mut dims = [1u32; 3];
        for (axis, (&extent, limit)) in grid.iter().zip([i32::MAX as u64, 65535, 65535]).enumerate() {
            if extent > limit {
                return Err(bad(format!("grid axis {axis} has {extent} instances; CUDA allows at most {limit}")));
            }
            dims[axis] = extent as u32;
        }
        Ok((k, dims, grid.iter().product()))
    }

    /// Queues one launch of `k` with `args` (already counted by [`GpuModule::validate`]), the
    /// given scratch (at least `scratch_bytes` per instance) and error word. Does not wait.
    fn enqueue(
        &self,
        k: &Kernel,
        args: &mut [GpuArg<'_>],
        dims: [u32; 3],
        scratch: &mut CudaSlice<u8>,
        error: &mut CudaSlice<u64>,
    ) -> Result<(), GpuError> {
        let p = &k.program;
        let bad = |reason: String| GpuError::Arguments { kernel: p.name.clone(), reason };
        // Kernel parameter values, in ABI order; the launch takes their addresses, so this vector
        // is complete (never reallocated) before the first one is pushed. Integers travel as u64
        // words: the driver copies the bytes, and i64 and u64 share their representation.
        let mut words: Vec<u64> = Vec::with_capacity(2 * args.len() + 2);
        // Keeps the buffers' stream-ordering guards alive until the launch is queued.
        let mut guards = Vec::with_capacity(args.len());
        for (param, arg) in p.params.iter().zip(args.iter_mut()) {
            // The variant says the element type and access the caller means; the parameter and
            // the buffer must both agree with it (a read-only variant only for a read-only
            // parameter, as on the CPU).
            let (want, writes) = arg.buffer_type();
            let wrong = |got: String| {
                let param_is = match &param.kind {
                    ParamKind::Ptr { dtype, writable } => format!("{}{} buffer", if *writable { "writable " } else { "" }, dtype.name()),
                    ParamKind::Int => "integer".to_string(),
                };
                bad(format!("argument for `{}` has the wrong kind: {got} for a {param_is}", param.name))
            };
            if param.kind == ParamKind::Int {
                let GpuArg::Int(v) = arg else { return Err(wrong("a buffer".into())) };
                words.push(*v as u64);
                continue;
            }
            let (Some(want), ParamKind::Ptr { dtype, writable }) = (want, &param.kind) else {
                return Err(wrong("an integer".into()));
            };
            let dtype = *dtype;
            if want != dtype || (*writable && !writes) {
                return Err(wrong(format!("{} {} buffer", if writes { "a writable" } else { "a read-only" }, want.name())));
            }
            let held = match &*arg {
                GpuArg::F32(b) | GpuArg::Bf16(b) | GpuArg::F16(b) | GpuArg::I64(b) => b.dtype(),
                GpuArg::F32Mut(b) | GpuArg::Bf16Mut(b) | GpuArg::F16Mut(b) => b.dtype(),
                GpuArg::Int(_) => return Err(wrong("an integer".into())),
            };
            if held != dtype {
                return Err(wrong(format!("a {} argument holding {} data", dtype.name(), held.name())));
            }
            let (ptr, guard, len) = match arg {
                GpuArg::F32(b) | GpuArg::Bf16(b) | GpuArg::F16(b) | GpuArg::I64(b) => {
                    let (ptr, guard) = b.data.device_ptr(&self.stream);
                    (ptr, guard, b.len)
                }
                GpuArg::F32Mut(b) | GpuArg::Bf16Mut(b) | GpuArg::F16Mut(b) => {
                    let len = b.len;
                    let (ptr, guard) = b.data.device_ptr_mut(&self.stream);
                    (ptr, guard, len)
                }
                GpuArg::Int(_) => return Err(wrong("an integer".into())),
            };
            guards.push(guard);
            words.extend([ptr, len as u64]);
        }
        let (scratch_ptr, scratch_guard) = scratch.device_ptr_mut(&self.stream);
        let (error_ptr, error_guard) = error.device_ptr_mut(&self.stream);
        words.extend([scratch_ptr, error_ptr]);
        let mut launch = self.stream.launch_builder(&k.func);
        for w in &words {
            launch.arg(w);
        }
        let cfg = LaunchConfig { grid_dim: (dims[0], dims[1], dims[2]), block_dim: (k.threads, 1, 1), shared_mem_bytes: k.shared_bytes };
        // SAFETY: `func` comes from PTX the compiler generated for this verified program, with
        // the parameter list documented in this module: `words` holds exactly one value per
        // kernel parameter (checked above: one (address, length) pair per pointer, one word per
        // integer, then scratch and error), each a u64/i64 the kernel reads by value. Every
        // address is a live device allocation of this context, borrowed from `args` (mutably for
        // written buffers) or from the caller's scratch and error word, and stays valid while the
        // kernel runs even if the caller drops it right after this returns: cudarc frees device
        // memory stream-ordered (`cuMemFreeAsync` on this stream, or a synchronise before a
        // plain free), so the free runs after the queued kernel. The kernel bounds-checks every
        // access against the lengths passed and reports violations through `error` instead of
        // touching memory. `scratch` holds `scratch_bytes` for every instance (checked by the
        // callers). Instances write disjoint output elements by construction of the lowering, as
        // on the CPU.
        unsafe { launch.launch(cfg) }.map_err(|cause| GpuError::Launch { kernel: p.name.clone(), stage: "to launch", cause })?;
        drop((scratch_guard, error_guard, guards));
        Ok(())
    }

    /// Waits for the stream and turns a fault or the error word's code into an error for `k`.
    fn finish(&self, k: &Kernel, error: &CudaSlice<u64>) -> Result<(), GpuError> {
        let p = &k.program;
        self.stream.synchronize().map_err(|cause| GpuError::Launch { kernel: p.name.clone(), stage: "while running", cause })?;
        // Errors recorded asynchronously by cudarc (frees, event waits) surface here.
        self.ctx.check_err().map_err(|cause| GpuError::Launch { kernel: p.name.clone(), stage: "while running", cause })?;
        let code =
            self.stream.clone_dtoh(error).map_err(|cause| memory(format!("reading the error word for kernel `{}`", p.name), cause))?;
        match code.first().copied().unwrap_or(0) {
            0 => Ok(()),
            v => {
                let param =
                    usize::try_from(v - 1).ok().and_then(|i| p.params.get(i)).map_or_else(|| format!("#{}", v - 1), |x| x.name.clone());
                Err(GpuError::OutOfBounds { kernel: p.name.clone(), param })
            }
        }
    }
}

/// The scratch and error word of one kernel's launches through [`GpuModule::launch_async`], made
/// by [`GpuModule::workspace`].
pub struct GpuWorkspace {
    kernel: GpuKernelId,
    scratch: CudaSlice<u8>,
    scratch_len: usize,
    error: CudaSlice<u64>,
}

impl GpuWorkspace {
    /// Bytes of scratch it holds (for the largest grid it was made for).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch_len
    }
}

/// A CUDA event on a [`GpuModule`]'s stream, for timing launches on the device.
pub struct GpuEvent(cudarc::driver::CudaEvent);

impl GpuEvent {
    /// Milliseconds of device time between this event and `end` (both recorded); waits for both.
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32, GpuError> {
        self.0.elapsed_ms(&end.0).map_err(|cause| GpuError::Driver { what: "reading an event's time".into(), cause })
    }
}

impl GpuArg<'_> {
    /// The element type a buffer argument declares (none for an integer) and whether the kernel
    /// may write it.
    fn buffer_type(&self) -> (Option<DType>, bool) {
        match self {
            GpuArg::F32(_) => (Some(DType::F32), false),
            GpuArg::F32Mut(_) => (Some(DType::F32), true),
            GpuArg::Bf16(_) => (Some(DType::Bf16), false),
            GpuArg::Bf16Mut(_) => (Some(DType::Bf16), true),
            GpuArg::F16(_) => (Some(DType::F16), false),
            GpuArg::F16Mut(_) => (Some(DType::F16), true),
            GpuArg::I64(_) => (Some(DType::I64), false),
            GpuArg::Int(_) => (None, false),
        }
    }
}

/// A download of the wrong element type.
fn wrong_download(what: &str, buffer: &GpuBuffer) -> GpuError {
    GpuError::Arguments { kernel: String::new(), reason: format!("{what} of a buffer of {} {}", buffer.len, buffer.dtype().name()) }
}

fn no_kernel(id: GpuKernelId) -> GpuError {
    GpuError::Arguments { kernel: format!("#{}", id.0), reason: "no such kernel".into() }
}

fn check_arg_count(k: &Kernel, n: usize) -> Result<(), GpuError> {
    let want = k.program.params.len();
    if n == want {
        Ok(())
    } else {
        Err(GpuError::Arguments { kernel: k.program.name.clone(), reason: format!("{n} arguments for {want} parameters") })
    }
}

/// Bytes of scratch `total` instances of `k` need.
fn scratch_len(k: &Kernel, total: u64) -> Result<usize, GpuError> {
    let bad = |reason: String| GpuError::Arguments { kernel: k.program.name.clone(), reason };
    let len =
        total.checked_mul(k.scratch_bytes).ok_or_else(|| bad(format!("{total} instances × {} scratch bytes overflow", k.scratch_bytes)))?;
    usize::try_from(len).map_err(|_| bad(format!("{len} bytes of scratch")))
}

fn memory(what: String, cause: DriverError) -> GpuError {
    GpuError::Memory { what, cause }
}

/// `HLAC_GPU_CARVEOUT` as a percentage (0–100), when it is set to one.
fn carveout() -> Option<i32> {
    std::env::var("HLAC_GPU_CARVEOUT").ok()?.parse::<i32>().ok().filter(|p| (0..=100).contains(p))
}
