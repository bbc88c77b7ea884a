//! The artifact manifest: a JSON description of the compiled model (its configuration, mixers,
//! layers and every parameter tensor with fla's name), written by the compiler and read here.
//! [`Artifact::open`] validates it fully, so the rest of the runtime may trust it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest format this runtime reads and the compiler writes.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Model-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model's name.
    pub name: String,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Residual width.
    pub hidden_size: u64,
    /// Number of layers.
    pub num_layers: u64,
    /// SwiGLU width.
    pub intermediate_size: u64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether the head reuses the embeddings.
    pub tie_word_embeddings: bool,
    /// Initial weight standard deviation.
    pub initializer_range: f64,
}

/// What the artifact was compiled for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// `cpu`, `sm_80` or `sm_90`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// Chunk length of the chunked recurrences.
    pub chunk_size: u64,
    /// `inference` or `training`.
    pub mode: String,
}

/// A configured mixer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerInfo {
    /// The name layers use.
    pub name: String,
    /// The declaration it instantiates (`GDN`, `Attn`, or a user's recurrence).
    pub kind: String,
    /// `decay`, `delta`, `scan` or `attention`.
    pub family: String,
    /// Number of heads.
    pub heads: u64,
    /// State key size per head (0 for attention).
    pub key_dim: u64,
    /// State value size per head (0 for attention).
    pub value_dim: u64,
    /// Hyper-parameters by name.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The recurrence's class in the algebra (absent for attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<serde_json::Value>,
}

/// A layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Position.
    pub index: u64,
    /// Index into [`Manifest::mixers`].
    pub mixer: usize,
    /// Indices into [`Manifest::tensors`].
    pub tensors: Vec<usize>,
}

/// A parameter tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// fla's name.
    pub name: String,
    /// PyTorch layout.
    pub shape: Vec<u64>,
    /// Storage dtype.
    pub dtype: String,
    /// What it is for (`linear`, `norm`, `conv`, …).
    pub role: String,
}

/// A compiled kernel stored in the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// The kernel's name (unique in the artifact).
    pub name: String,
    /// Index into [`Manifest::mixers`] of the mixer it belongs to; absent for the pieces around
    /// the mixers ([`PieceInfo`]), which one kernel serves wherever its configuration recurs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixer: Option<usize>,
    /// What it computes: a recurrence's `chunk_fwd`, `chunk_fwd_states` (or, built with
    /// `HLAC_GPU_FWD=2` for a GPU, the two-pass forward's `chunk_states` and `chunk_out`),
    /// `chunk_bwd`, `scan_fwd` (or, built with `HLAC_SCAN_PASSES=3` for a GPU, the three passes
    /// `scan_fwd_chunks`, `scan_fwd_carry`, `scan_fwd_out`),
    /// `scan_bwd` or `decode`; attention's `attn_fwd`, `attn_decode`, `attn_bwd_dq`, `attn_bwd_dkv`;
    /// the pieces' `conv_fwd`, `conv_decode`, `conv_bwd`, `norm_fwd`, `norm_bwd`; and
    /// `reduce_partials`, which sums the partial weight gradients of `conv_bwd` and `norm_bwd`;
    /// and `reduce_blocks`, which sums a value-block-split `chunk_bwd`'s partial gradients
    /// (`d<input>_parts`; a GPU target's backward is split except for vector gates).
    pub role: String,
    /// Its kernel-IR program, relative to the artifact directory (JSON).
    pub file: String,
    /// How many instances run on each grid axis.
    pub grid: Vec<String>,
    /// The kernel's PTX, relative to the artifact directory (GPU targets only; the CPU compiles
    /// `file` when it loads the artifact instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ptx: Option<String>,
    /// The kernel assembled for the target by ptxas at build time (a cubin, relative to the artifact
    /// directory), when ptxas was available; loading it skips the driver's PTX compilation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cubin: Option<String>,
    /// The PTX entry point's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Threads per block on x (blocks are one-dimensional; one block runs one program instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Bytes of zero-initialised global workspace each program instance needs (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_bytes: Option<u64>,
    /// Bytes of dynamic shared memory each block needs (absent: none); the workspace lives there
    /// when it fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
    /// For a conv or norm kernel: the sizes compiled into it and the weights it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece: Option<PieceInfo>,
}

/// What a conv or norm kernel computes and where the model applies it. Its sizes are compiled into
/// the kernel, so a launcher sizes the kernel's buffers from these (tokens × `width`, or rows × `width`
/// with rows = tokens × [`PieceUse::rows_per_token`]) rather than from the mixer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PieceInfo {
    /// `conv` (fla's `ShortConvolution`: causal depthwise, no bias) or `norm` (RMSNorm, gated when
    /// `activation` is set: fla's `FusedRMSNormGated`).
    pub kind: String,
    /// A conv's channels C; a norm's row width D.
    pub width: u64,
    /// A conv's kernel size W (0 for a norm).
    #[serde(default)]
    pub taps: u64,
    /// A conv's activation after the convolution, or a gated norm's activation of its gate
    /// (`silu`, fla's `swish`); absent for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<String>,
    /// A norm's epsilon (compiled in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Every weight of the model this kernel applies, in state-dict order.
    pub uses: Vec<PieceUse>,
}

/// One weight a piece kernel applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PieceUse {
    /// Index into [`Manifest::tensors`] of the conv's taps or the norm's scale.
    pub tensor: usize,
    /// Rows each token contributes: the number of heads for a per-head norm, 1 for a norm over a
    /// token's whole width and for a conv.
    pub rows_per_token: u64,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] at write time.
    pub format: u32,
    /// The compiler version that wrote it.
    pub hlac_version: String,
    /// Model settings.
    pub model: ModelInfo,
    /// Target.
    pub target: TargetInfo,
    /// Mixers.
    pub mixers: Vec<MixerInfo>,
    /// Layers in order.
    pub layers: Vec<LayerInfo>,
    /// Every parameter tensor in fla's state-dict order.
    pub tensors: Vec<TensorInfo>,
    /// The kernels the model runs.
    #[serde(default)]
    pub kernels: Vec<KernelInfo>,
}

/// Why an artifact cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The manifest could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON of the expected form.
    #[error("{path} is not a valid hlac manifest: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Written by an incompatible compiler.
    #[error("{path} has manifest format {found}, this runtime reads format {expected}; rebuild it with this version of hlac")]
    Version {
        /// The file.
        path: PathBuf,
        /// What it says.
        found: u32,
        /// What this runtime reads.
        expected: u32,
    },
    /// A kernel file is missing, unreadable or invalid.
    #[error("kernel `{kernel}` in {path}: {reason}")]
    Kernel {
        /// The artifact's manifest.
        path: PathBuf,
        /// The kernel.
        kernel: String,
        /// What is wrong.
        reason: String,
    },
    /// The manifest contradicts itself.
    #[error("{path} is inconsistent: {reason}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A loaded, validated artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The artifact directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The kernel programs, in the order of [`Manifest::kernels`], each verified.
    pub programs: Vec<crate::kir::Program>,
}

impl Artifact {
    /// Reads and validates the artifact in `dir`.
    pub fn open(dir: &Path) -> Result<Artifact, ArtifactError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ArtifactError::Io { path: path.clone(), source })?;
        // Check the version before the full schema, so an old artifact gets the helpful message.
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(found) = map.get("format").and_then(serde_json::Value::as_u64) {
                if found != u64::from(FORMAT_VERSION) {
                    return Err(ArtifactError::Version { path, found: u32::try_from(found).unwrap_or(u32::MAX), expected: FORMAT_VERSION });
                }
            }
        }
        let manifest: Manifest = serde_json::from_str(&text).map_err(|source| ArtifactError::Parse { path: path.clone(), source })?;
        manifest.validate().map_err(|reason| ArtifactError::Inconsistent { path: path.clone(), reason })?;
        let mut programs = Vec::with_capacity(manifest.kernels.len());
        for k in &manifest.kernels {
            let fail = |reason: String| ArtifactError::Kernel { path: path.clone(), kernel: k.name.clone(), reason };
            let file = dir.join(&k.file);
            let text = std::fs::read_to_string(&file).map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
            let program: crate::kir::Program =
                serde_json::from_str(&text).map_err(|e| fail(format!("{} is not a kernel program: {e}", file.display())))?;
            crate::kir::verify(&program).map_err(|e| fail(e.to_string()))?;
            programs.push(program);
        }
        Ok(Artifact { dir: dir.to_path_buf(), manifest, programs })
    }
}

impl Manifest {
    /// Checks every cross-reference and invariant the runtime relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_VERSION {
            return Err(format!("format {} is not {FORMAT_VERSION}", self.format));
        }
        if !["cpu", "sm_80", "sm_90"].contains(&self.target.device.as_str()) {
            return Err(format!("unknown device `{}`", self.target.device));
        }
        let dtypes = ["f32", "bf16", "f16"];
        if !dtypes.contains(&self.target.dtype.as_str()) {
            return Err(format!("unknown dtype `{}`", self.target.dtype));
        }
        if self.layers.len() as u64 != self.model.num_layers {
            return Err(format!("{} layers listed, model says {}", self.layers.len(), self.model.num_layers));
        }
        let mut names = HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor `{}` appears twice", t.name));
            }
            if t.shape.is_empty() || t.shape.contains(&0) {
                return Err(format!("tensor `{}` has an empty shape {:?}", t.name, t.shape));
            }
            if !dtypes.contains(&t.dtype.as_str()) {
                return Err(format!("tensor `{}` has unknown dtype `{}`", t.name, t.dtype));
            }
        }
        let mut used = vec![false; self.tensors.len()];
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.index != i as u64 {
                return Err(format!("layer {i} is numbered {}", layer.index));
            }
            if layer.mixer >= self.mixers.len() {
                return Err(format!("layer {i} refers to mixer {} of {}", layer.mixer, self.mixers.len()));
            }
            for &t in &layer.tensors {
                match used.get_mut(t) {
                    Some(u) if !*u => *u = true,
                    Some(_) => return Err(format!("tensor {t} belongs to two layers")),
                    None => return Err(format!("layer {i} refers to tensor {t} of {}", self.tensors.len())),
                }
            }
        }
        for want in ["model.embeddings.weight", "model.norm.weight"] {
            if !names.contains(want) {
                return Err(format!("tensor `{want}` is missing"));
            }
        }
        let mut kernel_names = HashSet::new();
        for k in &self.kernels {
            if !kernel_names.insert(k.name.as_str()) {
                return Err(format!("kernel `{}` appears twice", k.name));
            }
            if let Some(m) = k.mixer.filter(|&m| m >= self.mixers.len()) {
                return Err(format!("kernel `{}` refers to mixer {m} of {}", k.name, self.mixers.len()));
            }
            if let Some(piece) = &k.piece {
                if piece.width == 0 || piece.uses.is_empty() {
                    return Err(format!("kernel `{}` is a piece of width {} with {} uses", k.name, piece.width, piece.uses.len()));
                }
                for u in &piece.uses {
                    if u.tensor >= self.tensors.len() || u.rows_per_token == 0 {
                        return Err(format!(
                            "kernel `{}` applies tensor {} of {} with {} rows per token",
                            k.name,
                            u.tensor,
                            self.tensors.len(),
                            u.rows_per_token
                        ));
                    }
                }
            }
            // Kernel files live inside the artifact.
            for file in std::iter::once(&k.file).chain(k.ptx.as_ref()).chain(k.cubin.as_ref()) {
                if file.contains("..") || file.starts_with('/') {
                    return Err(format!("kernel `{}` has file `{}` outside the artifact", k.name, file));
                }
            }
        }
        if !self.model.tie_word_embeddings && !names.contains("lm_head.weight") {
            return Err("untied model without `lm_head.weight`".into());
        }
        Ok(())
    }
}
