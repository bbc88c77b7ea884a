//! Writes the artifact of `hlac build`: a directory holding `manifest.json` (the runtime's
//! [`hlac_runtime::Manifest`], made from the model IR) and `kernels/<name>.kir.json`, the kernel-IR
//! program of every kernel (the CPU runtime compiles them with Cranelift when it loads the
//! artifact). It is written to a temporary directory beside the destination and renamed into
//! place, so a failed build never leaves half an artifact.

use std::path::Path;

use hlac_runtime::{KernelInfo, LayerInfo, Manifest, MixerInfo, ModelInfo, TargetInfo, TensorInfo, FORMAT_VERSION, MANIFEST_FILE};

use crate::ir::{Mode, Model, Role};
use crate::lower::ModelKernel;
use crate::nvptx::Compiled;

/// The manifest describing a model and its kernels (`ptx[i]` is kernel i's PTX, for GPU targets).
pub fn manifest(model: &Model, kernels: &[ModelKernel], ptx: &[Compiled]) -> Manifest {
    let c = &model.config;
    let mixers = model
        .mixers
        .iter()
        .map(|(_, m)| {
            let (k, v) = m.instance.math.as_ref().map_or((0, 0), |x| (x.key_axis.1, x.value_axis.1));
            MixerInfo {
                name: m.name.clone(),
                kind: m.instance.decl_name.clone(),
                family: m.class.as_ref().map_or_else(
                    || "attention".to_string(),
                    |c| serde_json::to_value(c.family).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                ),
                heads: m.instance.heads,
                key_dim: k,
                value_dim: v,
                params: m.instance.params.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
                class: m.class.as_ref().and_then(|c| serde_json::to_value(c).ok()),
            }
        })
        .collect();
    let layers = model
        .layers
        .iter()
        .map(|(_, l)| LayerInfo { index: l.index, mixer: l.mixer.index(), tensors: l.tensors.iter().map(|h| h.index()).collect() })
        .collect();
    let tensors = model
        .tensors
        .iter()
        .map(|(_, t)| TensorInfo {
            name: t.name.clone(),
            shape: t.shape.clone(),
            dtype: t.dtype.name().to_string(),
            role: role_name(t.role).to_string(),
        })
        .collect();
    Manifest {
        format: FORMAT_VERSION,
        hlac_version: env!("CARGO_PKG_VERSION").to_string(),
        model: ModelInfo {
            name: model.name.clone(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            intermediate_size: c.intermediate_size,
            norm_eps: c.norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            initializer_range: c.initializer_range,
        },
        target: TargetInfo {
            device: model.target.device.name().to_string(),
            dtype: model.target.dtype.name().to_string(),
            chunk_size: model.target.chunk_size,
            mode: match model.target.mode {
                Mode::Inference => "inference",
                Mode::Training => "training",
            }
            .to_string(),
        },
        mixers,
        layers,
        tensors,
        kernels: kernels
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let gpu = ptx.get(i);
                KernelInfo {
                    name: k.name.clone(),
                    mixer: k.mixer,
                    role: k.role.to_string(),
                    file: kernel_file(&k.name),
                    grid: k.kernel.grid.clone(),
                    ptx: gpu.map(|_| ptx_file(&k.name)),
                    cubin: gpu.filter(|c| c.cubin.is_some()).map(|_| cubin_file(&k.name)),
                    entry: gpu.map(|c| c.entry.clone()),
                    threads: gpu.map(|c| c.threads),
                    scratch_bytes: gpu.map(|c| c.scratch_bytes),
                    shared_bytes: gpu.map(|c| c.shared_bytes).filter(|&b| b > 0),
                    piece: k.piece.clone(),
                }
            })
            .collect(),
    }
}

/// Where a kernel's cubin is stored, relative to the artifact.
fn cubin_file(name: &str) -> String {
    format!("kernels/{name}.cubin")
}

/// Where a kernel's PTX is stored, relative to the artifact.
fn ptx_file(name: &str) -> String {
    format!("kernels/{name}.ptx")
}

/// Compiles every kernel to PTX when the model targets a GPU (nothing for the CPU), and to a cubin
/// too when ptxas is available.
pub fn compile_gpu(model: &Model, kernels: &[ModelKernel]) -> Result<Vec<Compiled>, crate::nvptx::NvptxError> {
    let device = model.target.device;
    if device == crate::ir::Device::Cpu {
        return Ok(Vec::new());
    }
    let ptxas = crate::nvptx::find_ptxas();
    kernels
        .iter()
        .map(|k| {
            let mut c = crate::nvptx::compile(&k.kernel.program, device.name(), k.gpu_options())?;
            if let Some(ptxas) = &ptxas {
                c.cubin = crate::nvptx::assemble(ptxas, &c.ptx, device.name()).ok();
            }
            Ok(c)
        })
        .collect()
}

/// Where a kernel's program is stored, relative to the artifact.
fn kernel_file(name: &str) -> String {
    format!("kernels/{name}.kir.json")
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Embedding => "embedding",
        Role::Linear => "linear",
        Role::Bias => "bias",
        Role::Norm => "norm",
        Role::Conv => "conv",
        Role::Other => "other",
    }
}

/// Writes the artifact directory `out` atomically (temporary directory, then rename).
pub fn write(model: &Model, kernels: &[ModelKernel], ptx: &[Compiled], out: &Path) -> std::io::Result<()> {
    let m = manifest(model, kernels, ptx);
    let json = serde_json::to_string_pretty(&m).map_err(std::io::Error::other)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let name = out.file_name().map_or_else(|| "artifact".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp)?;
    let result = (|| {
        std::fs::write(tmp.join(MANIFEST_FILE), json + "\n")?;
        std::fs::create_dir(tmp.join("kernels"))?;
        for k in kernels {
            let program = serde_json::to_string(&k.kernel.program).map_err(std::io::Error::other)?;
            std::fs::write(tmp.join(kernel_file(&k.name)), program)?;
        }
        for (k, c) in kernels.iter().zip(ptx) {
            std::fs::write(tmp.join(ptx_file(&k.name)), &c.ptx)?;
            if let Some(cubin) = &c.cubin {
                std::fs::write(tmp.join(cubin_file(&k.name)), cubin)?;
            }
        }
        if out.exists() {
            // A directory cannot be renamed over a non-empty one: move the old artifact aside first.
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(out, &old)?;
            std::fs::rename(&tmp, out)?;
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::rename(&tmp, out)
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
