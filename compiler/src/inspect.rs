//! `hlac inspect`: what a model costs. Parameter counts (total, per mixer kind), recurrent-state
//! bytes per sequence, KV-cache bytes per token and forward FLOPs per token, as a table or JSON.
//!
//! Conventions: a matrix–vector product costs 2·in·out FLOPs; a recurrent mixer costs 4·K·V per
//! head and token (state update and read-out) plus 2·K·V for the delta rule's Sᵀk; attention costs
//! 4·head_dim per head and attended token, with the context averaged over a sequence of
//! `target.seq_len` tokens (capped by the sliding window). States are fp32; conv and KV caches use
//! the target dtype.

use std::collections::BTreeMap;
use std::fmt::Write;

use hlac_grammar::ast::DeclKind;

use crate::classify::Family;
use crate::ir::{DType, Model, Role};
use crate::value::Value;

/// One row of the layer table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerRow {
    /// Layer index.
    pub index: u64,
    /// Mixer name as used in the pattern.
    pub mixer: String,
    /// The declaration it instantiates.
    pub kind: String,
    /// The recurrence family, or `attention`.
    pub family: String,
    /// Parameters in this layer.
    pub params: u64,
    /// Recurrent state (and conv cache) bytes per sequence.
    pub state_bytes: u64,
    /// KV-cache bytes per token.
    pub kv_bytes_per_token: u64,
    /// Forward FLOPs per token.
    pub flops_per_token: u64,
}

/// The whole report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Model name.
    pub model: String,
    /// Number of layers.
    pub num_layers: u64,
    /// Hidden size.
    pub hidden_size: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Target device.
    pub device: String,
    /// Target dtype.
    pub dtype: String,
    /// The sequence length FLOPs are averaged over.
    pub seq_len: u64,
    /// Per-layer rows.
    pub layers: Vec<LayerRow>,
    /// Total parameters.
    pub params_total: u64,
    /// Parameters per mixer kind (layers of that kind, norms and MLPs included).
    pub params_by_kind: BTreeMap<String, u64>,
    /// Parameters outside the layers (embeddings, final norm, head, lower bounds).
    pub params_outside_layers: u64,
    /// Recurrent-state bytes per sequence.
    pub state_bytes_per_sequence: u64,
    /// KV-cache bytes per token.
    pub kv_cache_bytes_per_token: u64,
    /// Forward FLOPs per token.
    pub forward_flops_per_token: u64,
}

fn int(v: Option<&Value>) -> Option<u64> {
    match v {
        Some(Value::Int(i)) if *i > 0 => Some(*i as u64),
        _ => None,
    }
}

/// Computes the report for a model.
pub fn report(model: &Model) -> Report {
    let c = &model.config;
    let t = &model.target;
    let act = t.dtype.bytes();
    let mut layers = Vec::new();
    for (_, layer) in model.layers.iter() {
        let mixer = &model.mixers[layer.mixer];
        let inst = &mixer.instance;
        let mut params = 0;
        let mut flops = 0;
        let mut state_bytes = 0;
        let mut kv = 0;
        for h in &layer.tensors {
            let tensor = &model.tensors[*h];
            params += tensor.numel();
            if tensor.role == Role::Linear {
                flops += 2 * tensor.numel();
            }
            if tensor.role == Role::Conv {
                // A depthwise conv of width w keeps w-1 past inputs per channel and costs 2w per channel.
                let (channels, width) = (tensor.shape[0], *tensor.shape.last().unwrap_or(&1));
                state_bytes += channels * width.saturating_sub(1) * act;
                flops += 2 * channels * width;
            }
        }
        let family = match (&mixer.class, inst.kind) {
            (Some(class), _) => {
                let math = inst.math.as_ref();
                let (k, v) = math.map_or((1, 1), |m| (m.key_axis.1, m.value_axis.1));
                state_bytes += inst.heads * k * v * DType::F32.bytes();
                let per_head = if class.delta_rule { 6 * k * v } else { 4 * k * v };
                flops += inst.heads * per_head;
                match class.family {
                    Family::Decay => "decay",
                    Family::Delta => "delta",
                    Family::Scan => "scan",
                }
            }
            (None, DeclKind::Attention) => {
                let head_dim = int(inst.get("head_dim")).unwrap_or(1);
                let kv_heads = int(inst.get("kv_heads")).unwrap_or(inst.heads);
                kv = 2 * kv_heads * head_dim * act;
                let mean_ctx = t.seq_len.div_ceil(2);
                let ctx = int(inst.get("window_size")).map_or(mean_ctx, |w| w.min(mean_ctx));
                flops += 4 * inst.heads * head_dim * ctx;
                "attention"
            }
            (None, DeclKind::Recurrence) => "recurrence",
        };
        layers.push(LayerRow {
            index: layer.index,
            mixer: mixer.name.clone(),
            kind: inst.decl_name.clone(),
            family: family.to_string(),
            params,
            state_bytes,
            kv_bytes_per_token: kv,
            flops_per_token: flops,
        });
    }
    let mut by_kind = BTreeMap::new();
    for row in &layers {
        *by_kind.entry(row.mixer.clone()).or_insert(0) += row.params;
    }
    let outside: u64 = model.globals.iter().map(|h| model.tensors[*h].numel()).sum();
    // The output projection to the vocabulary (tied or not) is a matrix product per token.
    let head_flops = 2 * c.vocab_size * c.hidden_size;
    Report {
        model: model.name.clone(),
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        vocab_size: c.vocab_size,
        device: t.device.name().into(),
        dtype: t.dtype.name().into(),
        seq_len: t.seq_len,
        params_total: outside + layers.iter().map(|r| r.params).sum::<u64>(),
        params_by_kind: by_kind,
        params_outside_layers: outside,
        state_bytes_per_sequence: layers.iter().map(|r| r.state_bytes).sum(),
        kv_cache_bytes_per_token: layers.iter().map(|r| r.kv_bytes_per_token).sum(),
        forward_flops_per_token: head_flops + layers.iter().map(|r| r.flops_per_token).sum::<u64>(),
        layers,
    }
}

/// Groups digits in threes: 1234567 → "1,234,567".
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human(n: u64, unit: &str) -> String {
    let x = n as f64;
    let (v, p) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2} {p}{unit}")
}

fn bytes(n: u64) -> String {
    let x = n as f64;
    if x >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", x / (1024.0 * 1024.0))
    } else if x >= 1024.0 {
        format!("{:.2} KiB", x / 1024.0)
    } else {
        format!("{n} B")
    }
}

impl Report {
    /// The table `hlac inspect` prints.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {}: {} layers, hidden {}, vocab {}, target {} {}",
            self.model, self.num_layers, self.hidden_size, self.vocab_size, self.device, self.dtype
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>5}  {:<12} {:<10} {:<10} {:>14} {:>12} {:>10} {:>14}",
            "layer", "mixer", "kind", "family", "params", "state", "kv/token", "flops/token"
        );
        for r in &self.layers {
            let _ = writeln!(
                s,
                "{:>5}  {:<12} {:<10} {:<10} {:>14} {:>12} {:>10} {:>14}",
                r.index,
                r.mixer,
                r.kind,
                r.family,
                grouped(r.params),
                bytes(r.state_bytes),
                bytes(r.kv_bytes_per_token),
                grouped(r.flops_per_token)
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "parameters       {:>16}  ({:.3}B)", grouped(self.params_total), self.params_total as f64 / 1e9);
        for (kind, n) in &self.params_by_kind {
            let count = self.layers.iter().filter(|r| &r.mixer == kind).count();
            let _ = writeln!(s, "  {:<14} {:>16}  ({count} layers)", kind, grouped(*n));
        }
        let _ = writeln!(s, "  {:<14} {:>16}  (embeddings, final norm, head, shared)", "outside", grouped(self.params_outside_layers));
        let _ = writeln!(s, "recurrent state  {:>16}  per sequence (fp32 state + conv cache)", bytes(self.state_bytes_per_sequence));
        let _ = writeln!(s, "KV cache         {:>16}  per token", bytes(self.kv_cache_bytes_per_token));
        let _ = writeln!(
            s,
            "forward FLOPs    {:>16}  per token ({} at seq_len {})",
            grouped(self.forward_flops_per_token),
            human(self.forward_flops_per_token, "FLOP"),
            self.seq_len
        );
        s
    }
}
