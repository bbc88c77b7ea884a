//! The model IR: a resolved layer graph. Mixers, layers and parameter tensors live in arenas and
//! refer to each other by typed [`Handle`]s. Every tensor carries fla's exact name, its shape and
//! dtype, so that weights load from fla checkpoints and back. Built by [`crate::build`]; printed by
//! [`Model::print`] (the snapshot format); serialised into the artifact manifest.

use std::fmt::Write;
use std::marker::PhantomData;

use crate::classify::RecurrenceClass;
use crate::mixer::Instance;
use crate::value::Value;

/// A typed index into an [`Arena`].
pub struct Handle<T> {
    index: u32,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    /// The position in the arena.
    pub fn index(self) -> usize {
        self.index as usize
    }
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Handle<T> {}
impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}
impl<T> Eq for Handle<T> {}
impl<T> std::fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.index)
    }
}

/// A growable store whose elements are addressed by [`Handle`].
#[derive(Debug)]
pub struct Arena<T> {
    pub(crate) items: Vec<T>,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena { items: Vec::new() }
    }
}

impl<T> Arena<T> {
    /// Stores a value and returns its handle.
    pub fn alloc(&mut self, value: T) -> Handle<T> {
        let index = u32::try_from(self.items.len()).unwrap_or_else(|_| unreachable!("more than 4 billion IR nodes"));
        self.items.push(value);
        Handle { index, _marker: PhantomData }
    }

    /// Every element with its handle, in allocation order.
    pub fn iter(&self) -> impl Iterator<Item = (Handle<T>, &T)> {
        self.items.iter().enumerate().map(|(i, v)| (Handle { index: i as u32, _marker: PhantomData }, v))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the arena is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl<T> std::ops::Index<Handle<T>> for Arena<T> {
    type Output = T;
    fn index(&self, h: Handle<T>) -> &T {
        &self.items[h.index()]
    }
}

/// Element types of tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    /// The name used in specs.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

/// What a compiled model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The host CPU, through Cranelift.
    Cpu,
    /// NVIDIA Ampere (A100) and later.
    Sm80,
    /// NVIDIA Hopper (H100/H200).
    Sm90,
}

impl Device {
    /// The name used in specs.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Sm80 => "sm_80",
            Device::Sm90 => "sm_90",
        }
    }
}

/// Whether the artifact includes backward kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Forward and decode only.
    Inference,
    /// Forward, backward and decode.
    Training,
}

/// The `target` section, resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Target {
    /// Device.
    pub device: Device,
    /// Activation and weight dtype.
    pub dtype: DType,
    /// Chunk length of the chunked recurrences.
    pub chunk_size: u64,
    /// Inference or training.
    pub mode: Mode,
    /// The sequence length used for per-token FLOP estimates of attention.
    pub seq_len: u64,
}

/// Model-wide settings, resolved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Width of the residual stream.
    pub hidden_size: u64,
    /// Number of layers (the pattern's length).
    pub num_hidden_layers: u64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Standard deviation of the initial weights.
    pub initializer_range: f64,
    /// fla's `max_position_embeddings`.
    pub max_position_embeddings: u64,
    /// fla's `hidden_ratio`, as given.
    pub hidden_ratio: Option<i64>,
    /// fla's `intermediate_size`, as given.
    pub intermediate_size_given: Option<i64>,
    /// The SwiGLU width actually used.
    pub intermediate_size: u64,
    /// `elementwise_affine` as given (hlac requires true; fla writes it only for some classes).
    pub elementwise_affine: Option<bool>,
    /// fla config keys kept for export but not interpreted, in order.
    pub fla_extra: Vec<(String, Value)>,
}

/// A configured mixer used by one or more layers.
#[derive(Debug, Clone)]
pub struct Mixer {
    /// The name layers use in the pattern.
    pub name: String,
    /// The declaration instantiated with its hyper-parameters.
    pub instance: Instance,
    /// The recurrence's class; `None` for attention.
    pub class: Option<RecurrenceClass>,
}

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Token embedding table.
    Embedding,
    /// A matrix applied to every token (`[out, in]`).
    Linear,
    /// A bias vector.
    Bias,
    /// A normalisation's scale.
    Norm,
    /// A depthwise convolution's taps.
    Conv,
    /// Other learned parameters (gate parameters, lower bounds).
    Other,
}

/// A parameter tensor.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tensor {
    /// fla's full name, e.g. `model.layers.3.attn.q_proj.weight`.
    pub name: String,
    /// Shape in PyTorch layout.
    pub shape: Vec<u64>,
    /// Storage dtype.
    pub dtype: DType,
    /// What it is for.
    pub role: Role,
}

impl Tensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// One layer: pre-norm mixer then pre-norm SwiGLU MLP, each with a residual.
#[derive(Debug, Clone)]
pub struct Layer {
    /// 0-based position.
    pub index: u64,
    /// Its token mixer.
    pub mixer: Handle<Mixer>,
    /// Its tensors (norms, mixer weights, MLP), in fla's order.
    pub tensors: Vec<Handle<Tensor>>,
}

/// A resolved model.
#[derive(Debug)]
pub struct Model {
    /// The model's name.
    pub name: String,
    /// Model-wide settings.
    pub config: Config,
    /// The target.
    pub target: Target,
    /// Configured mixers.
    pub mixers: Arena<Mixer>,
    /// Layers in order.
    pub layers: Arena<Layer>,
    /// Every parameter tensor, in fla's state-dict order.
    pub tensors: Arena<Tensor>,
    /// Tensors that belong to no layer (embeddings, final norm, head, lower bounds).
    pub globals: Vec<Handle<Tensor>>,
}

impl Model {
    /// Moves the model to another device (`hlac build --target`). The CPU computes in f32, so a
    /// model moved there stores its weights in f32 too.
    pub fn retarget(&mut self, device: Device) {
        self.target.device = device;
        if device == Device::Cpu && self.target.dtype != DType::F32 {
            self.target.dtype = DType::F32;
            for t in &mut self.tensors.items {
                t.dtype = DType::F32;
            }
        }
    }

    /// The IR's text form (the snapshot format).
    pub fn print(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let t = &self.target;
        let _ = writeln!(s, "model {}", self.name);
        let _ = writeln!(
            s,
            "  config vocab_size={} hidden_size={} layers={} norm_eps={:?} tie_word_embeddings={} initializer_range={:?} intermediate_size={}",
            c.vocab_size, c.hidden_size, c.num_hidden_layers, c.norm_eps, c.tie_word_embeddings, c.initializer_range, c.intermediate_size
        );
        let _ = writeln!(
            s,
            "  target device={} dtype={} chunk_size={} mode={:?} seq_len={}",
            t.device.name(),
            t.dtype.name(),
            t.chunk_size,
            t.mode,
            t.seq_len
        );
        for (h, m) in self.mixers.iter() {
            let params: Vec<String> = m.instance.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  mixer {h:?} {} = {} heads={} {{{}}}", m.name, m.instance.decl_name, m.instance.heads, params.join(", "));
            if let Some(math) = &m.instance.math {
                let _ = writeln!(
                    s,
                    "    state {}[{}={}, {}={}] x {}",
                    math.state.name, math.key_axis.0, math.key_axis.1, math.value_axis.0, math.value_axis.1, m.instance.heads
                );
            }
            if let Some(class) = &m.class {
                let _ = writeln!(s, "    class {class}");
            }
        }
        for g in &self.globals {
            let tensor = &self.tensors[*g];
            if !tensor.name.starts_with("model.norm") && !tensor.name.starts_with("lm_head") {
                print_tensor(&mut s, tensor, "  ");
            }
        }
        for (_, layer) in self.layers.iter() {
            let _ = writeln!(s, "  layer {} {}", layer.index, self.mixers[layer.mixer].name);
            for h in &layer.tensors {
                print_tensor(&mut s, &self.tensors[*h], "    ");
            }
        }
        for g in &self.globals {
            let tensor = &self.tensors[*g];
            if tensor.name.starts_with("model.norm") || tensor.name.starts_with("lm_head") {
                print_tensor(&mut s, tensor, "  ");
            }
        }
        s
    }
}

fn print_tensor(s: &mut String, t: &Tensor, indent: &str) {
    let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
    let _ = writeln!(s, "{indent}{} [{}] {} {:?}", t.name, dims.join(", "), t.dtype.name(), t.role);
}
