//! The conv and norm kernels a model's layers need, read off the model IR's `conv` and `norm`
//! tensors and lowered by [`super::pieces`]: one kernel per distinct configuration per model, each
//! recording the weights it serves, so the runtime applies one kernel wherever its configuration
//! recurs (every layer, several mixers). Stops at [`ModelKernel`]s; [`super::model_kernels`] adds
//! them after the mixers' kernels.
//!
//! What each tensor asks for follows fla's layers, which the prelude's declarations mirror:
//! - a `conv` weight `[C, 1, W]` is a `ShortConvolution` of C channels and kernel size W (the
//!   mixer's `conv_size`), without bias; SiLU follows it in fla's GLA, DeltaNet and Gated DeltaNet
//!   (and in a user's recurrence, as the prelude's header states), but not in HGRN and HGRN-2,
//!   whose layers convolve with `activation=None` (`conv_activation`);
//! - a recurrence's `norm` weight is its output norm over D-wide rows of its output (per head, or
//!   HGRN-2's whole width); it is gated by silu of the output-gate projection (`FusedRMSNormGated`,
//!   fla's swish) when the mixer declares one (`g_proj`: GLA's and RetNet's `g_norm_swish_gate`,
//!   HGRN's `g_norm`, DeltaNet's and GDN's `o_norm` with `use_gate`), and a plain RMSNorm when not;
//! - attention's norms (`q_norm`, `k_norm` with `qk_norm`) are plain RMSNorms over each head;
//! - the block's `attn_norm`, `mlp_norm` and the final `model.norm` are plain RMSNorms over the
//!   hidden size.
//!
//! Every norm uses the model's `norm_eps`, as fla passes `config.norm_eps` to every layer. A
//! configuration is its kind and sizes (conv: channels, taps, activation; norm: width, gating), so
//! HGRN-2's output norm shares the block norms' kernel and equal-width q/k/v convs share one.
//!
//! Per configuration: a conv gets its forward (`conv_fwd`, with initial and final cache for
//! prefill) and its one-token step (`conv_decode`); a norm its forward (`norm_fwd`, which serves
//! decode too: a decode step is a forward over one row per sequence). Training adds `conv_bwd`
//! and `norm_bwd`, and one `sum_partials` (`reduce_partials`) that finishes the weight gradients
//! both leave as partial sums.
//!
//! Block sizes: a conv program walks its sequence in steps of 64 tokens × 16 channels on the CPU
//! (fla's setting) and of 32 tokens on a GPU (see [`kernels`]); a norm program takes rows
//! spanning about `NORM_TILE` elements. On a GPU target each is shrunk (to 16 tokens, to fewer
//! rows) until its workspace fits the block's shared memory, where [`ModelKernel::gpu_options`](super::ModelKernel::gpu_options)
//! lets the back end put it.

use hlac_runtime::{PieceInfo, PieceUse};

use super::pieces::{self, Conv, Norm};
use super::{fits_shared, Kernel, LowerError, ModelKernel};
use crate::ir::{Device, Mode, Model, Role};

/// The widest short convolution hlac lowers. fla's layers use 4 (and `causal-conv1d`, which fla
/// calls when installed, stops at 4); the conv backward recomputes W pre-activations for each of
/// W taps, so its code grows as W², and a much wider kernel is a long convolution, not a short one.
pub const MAX_TAPS: u32 = 16;

/// Elements of a norm program's widest tile: rows per program are chosen so that a block of rows
/// spans about this many (16 rows of D = 128, one row of D = 2048); larger tiles would take more
/// shared memory per block for no more parallelism.
const NORM_TILE: u32 = 2048;

/// Columns per program of `sum_partials`: one element per thread of a 128-thread block.
const PARTIALS_BLOCK: u32 = 128;

/// One distinct configuration of a piece.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Config {
    /// A short convolution: channels C, kernel size W, SiLU after it.
    Conv { channels: u32, taps: u32, silu: bool },
    /// An RMSNorm over rows of width `dim`, gated by silu(g) or not.
    Norm { dim: u32, gated: bool },
}

/// A configuration with every weight it applies.
struct Piece {
    config: Config,
    uses: Vec<PieceUse>,
}

/// Whether a conv of `mixer` is followed by SiLU: not in fla's HGRN and HGRN-2 layers
/// (`ShortConvolution(..., activation=None)`), in every other layer (GLA, DeltaNet, Gated
/// DeltaNet pass `activation='silu'`) and in a user's recurrence (the prelude's convention).
fn conv_activation(mixer: &crate::ir::Mixer) -> bool {
    !matches!(mixer.instance.fla.as_ref().map(|(model_type, _)| model_type.as_str()), Some("hgrn" | "hgrn2"))
}

fn error(what: &str, reason: impl Into<String>) -> LowerError {
    LowerError { mixer: what.to_string(), reason: reason.into() }
}

fn to_u32(what: &str, x: u64) -> Result<u32, LowerError> {
    u32::try_from(x).map_err(|_| error(what, format!("{x} is too large for a kernel size")))
}

/// The configuration of a mixer's `conv` or `norm` weight `name` (without the layer prefix and
/// `.weight`), and how many rows a token gives it.
fn mixer_piece(model: &Model, mixer: &crate::ir::Mixer, name: &str, role: Role, shape: &[u64]) -> Result<(Config, u64), LowerError> {
    let what = format!("{}.{name}", mixer.name);
    // fla's short convolutions in these layers have no bias (`conv_bias = False`), and an RMSNorm
    // has none; the kernels add none.
    if mixer.instance.weights.iter().any(|w| w.name == name && w.bias) {
        return Err(error(&what, "a conv or norm with a bias is not supported"));
    }
    match (role, shape) {
        (Role::Conv, [channels, 1, taps]) => {
            let (channels, taps) = (to_u32(&what, *channels)?, to_u32(&what, *taps)?);
            if taps > MAX_TAPS {
                return Err(error(&what, format!("a short convolution of kernel size {taps}: hlac supports at most {MAX_TAPS}")));
            }
            Ok((Config::Conv { channels, taps, silu: conv_activation(mixer) }, 1))
        }
        (Role::Conv, _) => Err(error(&what, format!("a conv weight of shape {shape:?}, not [channels, 1, width]"))),
        (Role::Norm, [dim]) => {
            let weights = &mixer.instance.weights;
            let linear = |n: &str| weights.iter().find(|w| w.role == hlac_grammar::ast::WeightRole::Linear && !w.shared && w.name == n);
            let (normed, gated) = match &mixer.instance.math {
                // A recurrence's norm normalises its output, heads × V wide per token.
                Some(math) => (mixer.instance.heads * math.value_axis.1, linear("g_proj").is_some()),
                // Attention's `q_norm` / `k_norm` normalise each head of `q_proj` / `k_proj`.
                None => {
                    let proj = name.strip_suffix("_norm").and_then(|p| linear(&format!("{p}_proj")));
                    (proj.and_then(|w| w.shape.first().copied()).unwrap_or(model.config.hidden_size), false)
                }
            };
            if *dim == 0 || normed % dim != 0 {
                return Err(error(&what, format!("a norm of width {dim} over an output {normed} wide per token")));
            }
            Ok((Config::Norm { dim: to_u32(&what, *dim)?, gated }, normed / dim))
        }
        (Role::Norm, _) => Err(error(&what, format!("a norm weight of shape {shape:?}, not [width]"))),
        _ => Err(error(&what, "not a conv or norm weight (this is a bug in hlac)")),
    }
}

/// Every distinct piece configuration of `model` with the weights it serves, in state-dict order
/// of first use.
fn pieces(model: &Model) -> Result<Vec<Piece>, LowerError> {
    // Which layer each tensor belongs to.
    let mut layer_of = vec![None; model.tensors.len()];
    for (_, layer) in model.layers.iter() {
        for h in &layer.tensors {
            layer_of[h.index()] = Some(layer);
        }
    }
    let hidden = to_u32("hidden_size", model.config.hidden_size)?;
    let mut out: Vec<Piece> = Vec::new();
    for (h, t) in model.tensors.iter() {
        if !matches!(t.role, Role::Conv | Role::Norm) {
            continue;
        }
        let block_norm = t.name == "model.norm.weight" || t.name.ends_with(".attn_norm.weight") || t.name.ends_with(".mlp_norm.weight");
        let (config, rows_per_token) = match layer_of[h.index()] {
            _ if block_norm => (Config::Norm { dim: hidden, gated: false }, 1),
            Some(layer) => {
                let mixer = &model.mixers[layer.mixer];
                let prefix = format!("model.layers.{}.attn.", layer.index);
                let name = t.name.strip_prefix(&prefix).and_then(|n| n.strip_suffix(".weight")).unwrap_or(&t.name);
                mixer_piece(model, mixer, name, t.role, &t.shape)?
            }
            // A norm or conv outside the layers other than the final norm: none is declared today
            // (shared weights are stored as `Other`).
            None => continue,
        };
        let used = PieceUse { tensor: h.index(), rows_per_token };
        match out.iter_mut().find(|p| p.config == config) {
            Some(p) => p.uses.push(used),
            None => out.push(Piece { config, uses: vec![used] }),
        }
    }
    Ok(out)
}

/// The first of `candidates` (largest first) whose kernel `fits` shared memory on `device`; the
/// last when none does (the GPU back end then places its workspace in global memory).
fn first_fitting(device: Device, candidates: &[u32], build: impl Fn(u32) -> Result<Kernel, LowerError>) -> Result<Kernel, LowerError> {
    let mut last = None;
    for &c in candidates {
        let k = build(c)?;
        if fits_shared(device, &k) {
            return Ok(k);
        }
        last = Some(k);
    }
    last.ok_or_else(|| error("pieces", "no block size to try (this is a bug in hlac)"))
}

/// Rows per norm program: enough to span about [`NORM_TILE`] elements, halving down to one.
fn norm_rows(dim: u32) -> Vec<u32> {
    let first = (NORM_TILE / dim.next_power_of_two().max(1)).clamp(1, 16);
    std::iter::successors(Some(first), |r| (*r > 1).then_some(r / 2)).collect()
}

/// A piece kernel named `name`, its program renamed to match (so PTX entry points and runtime
/// errors name the artifact's kernel).
fn piece_kernel(name: String, role: &'static str, mut kernel: Kernel, piece: Option<PieceInfo>) -> ModelKernel {
    kernel.program.name.clone_from(&name);
    ModelKernel { name, mixer: None, role, kernel, piece }
}

/// Every conv and norm kernel `model` needs (see the module doc), after the mixers' kernels.
pub fn kernels(model: &Model) -> Result<Vec<ModelKernel>, LowerError> {
    let device = model.target.device;
    let training = model.target.mode == Mode::Training;
    let eps = model.config.norm_eps;
    // Activations (x, y, g and their gradients) in the model's dtype, weights and caches in f32.
    let storage = super::storage(model.target.dtype);
    let mut out = Vec::new();
    for p in pieces(model)? {
        match p.config {
            Config::Conv { channels, taps, silu } => {
                let base = Conv { channels, width: taps, silu, storage, ..Conv::fla(channels) };
                let conv = |block_t: u32| Conv { block_t, ..base };
                let stem = format!("conv_c{channels}_w{taps}{}", if silu { "_silu" } else { "" });
                let info = PieceInfo {
                    kind: "conv".into(),
                    width: u64::from(channels),
                    taps: u64::from(taps),
                    activation: silu.then(|| "silu".to_string()),
                    eps: None,
                    uses: p.uses,
                };
                // The CPU walks fla's 64-token steps. On a GPU a 64 × 16 step gives each of the 128
                // threads 8 elements per tile, and ptxas (sm_90) then needs 237 registers for the
                // forward and 255 plus ~1 KB of spills for the backward; 32-token steps take 43
                // and 64 registers with no spills, so more blocks share an SM.
                let blocks: &[u32] = if device == Device::Cpu { &[64] } else { &[32, 16] };
                let fwd = first_fitting(device, blocks, |b| pieces::conv_forward(&conv(b)))?;
                out.push(piece_kernel(format!("{stem}_fwd"), "conv_fwd", fwd, Some(info.clone())));
                out.push(piece_kernel(format!("{stem}_decode"), "conv_decode", pieces::conv_step(&base)?, Some(info.clone())));
                if training {
                    let bwd = first_fitting(device, blocks, |b| pieces::conv_backward(&conv(b)))?;
                    out.push(piece_kernel(format!("{stem}_bwd"), "conv_bwd", bwd, Some(info)));
                }
            }
            Config::Norm { dim, gated } => {
                let norm = |block_rows: u32| Norm { dim, eps, gated, block_rows, storage };
                let stem = format!("rms_norm{}_d{dim}", if gated { "_gated" } else { "" });
                let info = PieceInfo {
                    kind: "norm".into(),
                    width: u64::from(dim),
                    taps: 0,
                    activation: gated.then(|| "silu".to_string()),
                    eps: Some(eps),
                    uses: p.uses,
                };
                let rows = norm_rows(dim);
                let fwd = first_fitting(device, &rows, |r| pieces::norm_forward(&norm(r)))?;
                out.push(piece_kernel(format!("{stem}_fwd"), "norm_fwd", fwd, Some(info.clone())));
                if training {
                    let bwd = first_fitting(device, &rows, |r| pieces::norm_backward(&norm(r)))?;
                    out.push(piece_kernel(format!("{stem}_bwd"), "norm_bwd", bwd, Some(info)));
                }
            }
        }
    }
    // One reduction finishes every backward's partial weight gradients (`parts` and `cols` are
    // launch arguments).
    if training && !out.is_empty() {
        out.push(piece_kernel("sum_partials".into(), "reduce_partials", pieces::sum_partials(PARTIALS_BLOCK)?, None));
    }
    Ok(out)
}
