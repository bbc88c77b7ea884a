//! Sizing shared by the GPU tools (`hlac-gpu-check`, `hlac-gpu-bench`): how a kernel's buffers
//! are sized from its parameters' names (the conventions of the compiler's lowerings) and the
//! manifest's mixer (for the conv and norm pieces, from the sizes the manifest records with them:
//! channels or row width, taps, rows per token), how its grid descriptions are evaluated, how
//! inputs are filled with seeded random values, and how the widths of inputs the manifest does not
//! record are found by probing the CPU launcher (which bounds-checks every access and names the
//! parameter it overran).
//!
//! Each binary includes this with `mod common;`; neither uses every item, hence the allow below
//! (it is per binary, not a sign of dead code across both).
#![allow(dead_code)]

use std::collections::HashMap;

use half::{bf16, f16};
use hlac_runtime::cpu::{self, Arg, CpuModule};
use hlac_runtime::gpu::{GpuArg, GpuBuffer, GpuError, GpuModule};
use hlac_runtime::kir::{DType, ParamKind, Program};
use hlac_runtime::{KernelInfo, Manifest, MixerInfo, PieceInfo};

/// Lengths of the test batch's sequences: a single token, one crossing a chunk boundary, one of
/// several chunks with a partial last one.
pub const LENGTHS: [i64; 3] = [1, 70, 130];
/// `programs` for kernels that take the launcher's choice of program count (the norm backward),
/// and `parts` for `sum_partials`: few, so that every program strides over several row blocks.
pub const PROGRAMS: i64 = 4;
/// Columns for `sum_partials`: not a multiple of its column block.
pub const PARTIAL_COLS: i64 = 300;
/// `width` for `sum_blocks`: a divisor of [`PARTIAL_COLS`] (and of any hidden size the bench sets
/// as the column count), so that its reads stay in the `[rows, parts, width]` buffer.
pub const SUM_BLOCKS_WIDTH: i64 = 4;

/// How one argument is made.
#[derive(Clone)]
pub enum Plan {
    /// An f32 buffer; `output` buffers start as NaN unless `inout` (read and updated in place).
    F32 { len: usize, output: bool, inout: bool },
    /// Integer data.
    I64(Vec<i64>),
    /// An integer parameter.
    Int(i64),
}

/// A batch of sequences the buffers are sized for.
pub struct Batch {
    /// Sequences.
    pub seqs: usize,
    /// Tokens in all.
    pub tokens: usize,
    /// The sequences' lengths (for decode: the tokens before the new one).
    pub lengths: Vec<i64>,
    /// `[seqs + 1]` offsets of the sequences.
    pub cu: Vec<i64>,
    /// `[seqs + 1]` first chunk of each sequence.
    pub chunk_offsets: Vec<i64>,
    /// Chunks in all.
    pub chunks: usize,
    /// The longest sequence.
    pub max_len: usize,
    /// Whether norm kernels get one row fewer than tokens × rows per token (the check's batch): a
    /// row count that no block size divides, so the last row block is partial even for a per-head
    /// norm of 16 heads in blocks of 16 rows (a norm's rows need not make whole tokens).
    pub odd_rows: bool,
}

impl Batch {
    /// The check's test batch ([`LENGTHS`]) for chunks of `chunk` tokens.
    pub fn test(chunk: i64) -> Batch {
        Batch { odd_rows: true, ..Batch::new(&LENGTHS, chunk) }
    }

    /// A batch of sequences of the given lengths, for chunks of `chunk` tokens.
    pub fn new(lengths: &[i64], chunk: i64) -> Batch {
        let mut cu = vec![0];
        let mut chunk_offsets = vec![0];
        for &l in lengths {
            cu.push(cu.last().copied().unwrap_or(0) + l);
            chunk_offsets.push(chunk_offsets.last().copied().unwrap_or(0) + (l + chunk - 1) / chunk.max(1));
        }
        Batch {
            seqs: lengths.len(),
            tokens: lengths.iter().sum::<i64>() as usize,
            chunks: chunk_offsets.last().copied().unwrap_or(0) as usize,
            lengths: lengths.to_vec(),
            cu,
            chunk_offsets,
            max_len: lengths.iter().copied().max().unwrap_or(0) as usize,
            odd_rows: false,
        }
    }
}

/// A possible layout of a parameter whose size the manifest does not give: its length, and
/// whether it is per head (its gradient is then per sequence, `[sequences, …]`).
#[derive(Clone, Copy)]
pub struct Layout {
    len: usize,
    per_head: bool,
    /// Which shape it is, so a layout probed on one batch can be found again on another (the
    /// smallest-first order of the lengths depends on the batch: `heads × key` may be more or
    /// fewer elements than `rows × heads`).
    kind: LayoutKind,
}

/// The shapes of [`Layout`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum LayoutKind {
    /// `[heads]`.
    Head,
    /// `[heads, key]`.
    HeadKey,
    /// `[rows, heads]`.
    RowHead,
    /// `[rows, heads, key]`.
    RowHeadKey,
    /// `[rows, heads, value]`.
    RowHeadValue,
}

/// The probing state: for each probed parameter, the index of its layout in
/// [`Sizer::layouts`]; under `#width`, the index of the piece width.
pub type Levels = HashMap<String, usize>;

/// The sizes a kernel's parameters are made from.
pub struct Sizer<'a> {
    program: &'a Program,
    /// The mixer the kernel belongs to (none for the conv and norm pieces and `sum_partials`).
    mixer: Option<&'a MixerInfo>,
    /// What the manifest records of a conv or norm kernel.
    piece: Option<&'a PieceInfo>,
    batch: &'a Batch,
    /// Heads, key size, value size of the recurrence (1, 1 for the elementwise scan, whose state
    /// is one number per channel).
    pub h: usize,
    pub k: usize,
    pub v: usize,
    /// Attention: kv heads and head size.
    pub kvh: usize,
    pub d: usize,
    /// Whether the kernel handles one token per sequence (decode).
    pub decode: bool,
    /// The width of a convolution's channels or a norm's rows, when the kernel is one of those
    /// (the one the manifest records).
    pub piece_width: Vec<usize>,
    /// `programs` of the norm backward and `parts` of `sum_partials` ([`PROGRAMS`] unless the
    /// tool sets another).
    pub programs: usize,
    /// `cols` of `sum_partials` ([`PARTIAL_COLS`] unless the tool sets another).
    pub partial_cols: usize,
}

impl Sizer<'_> {
    pub fn new<'a>(manifest: &'a Manifest, info: &'a KernelInfo, program: &'a Program, batch: &'a Batch) -> Sizer<'a> {
        let mixer = info.mixer.and_then(|m| manifest.mixers.get(m));
        let h = mixer.map_or(0, |m| m.heads as usize);
        let (k, v) = match mixer {
            Some(m) if m.family == "scan" => (1, 1),
            Some(m) => (m.key_dim as usize, m.value_dim as usize),
            None => (0, 0),
        };
        // Attention's sizes follow the prelude's `Attn`: head_dim = hidden_size / num_heads, kv
        // heads default to the heads.
        let int = |name: &str| mixer.and_then(|m| m.params.get(name)).and_then(serde_json::Value::as_u64).map(|x| x as usize);
        let kvh = int("num_kv_heads").or(int("kv_heads")).unwrap_or(h);
        let d = int("head_dim").unwrap_or_else(|| (manifest.model.hidden_size as usize).checked_div(h).unwrap_or(0));
        let decode = program.grid.first().is_some_and(|g| g.contains("batch")) || info.role.contains("decode");
        let piece = info.piece.as_ref();
        let piece_width = piece.map(|p| p.width as usize).into_iter().collect();
        Sizer {
            program,
            mixer,
            piece,
            batch,
            h,
            k,
            v,
            kvh,
            d,
            decode,
            piece_width,
            programs: PROGRAMS as usize,
            partial_cols: PARTIAL_COLS as usize,
        }
    }

    /// Rows of a norm kernel: the tokens times the rows each gives its first use (the heads of a
    /// per-head norm), one fewer on the check's batch ([`Batch::odd_rows`]).
    pub fn norm_rows(&self) -> usize {
        let per_token = self.piece.and_then(|p| p.uses.first()).map_or(1, |u| u.rows_per_token as usize);
        let rows = self.batch.tokens * per_token;
        if self.batch.odd_rows && rows > 1 {
            rows - 1
        } else {
            rows
        }
    }

    /// Rows of token-shaped buffers: the tokens, or one per sequence for decode.
    pub fn rows(&self) -> usize {
        if self.decode {
            self.batch.seqs
        } else {
            self.batch.tokens
        }
    }

    /// The layouts an input not known by name may have, smallest first.
    pub fn layouts(&self) -> Vec<Layout> {
        let (r, h, k, v) = (self.rows(), self.h, self.k, self.v);
        let mut out = vec![
            Layout { len: h, per_head: true, kind: LayoutKind::Head },
            Layout { len: h * k, per_head: true, kind: LayoutKind::HeadKey },
            Layout { len: r * h, per_head: false, kind: LayoutKind::RowHead },
            Layout { len: r * h * k, per_head: false, kind: LayoutKind::RowHeadKey },
            Layout { len: r * h * v, per_head: false, kind: LayoutKind::RowHeadValue },
        ];
        out.retain(|l| l.len > 0);
        out.sort_by_key(|l| l.len);
        out.dedup_by_key(|l| l.len);
        out
    }

    /// The plan for every parameter, given the probing state (`levels`: the layout chosen for each
    /// probed parameter, and under `#width` the piece width), or the name of a parameter it cannot
    /// size.
    pub fn plan(&self, levels: &Levels) -> Result<Vec<Plan>, String> {
        let p = self.program;
        let b = self.batch;
        let (h, k, v, kvh, d) = (self.h, self.k, self.v, self.kvh, self.d);
        let attention = self.mixer.is_some_and(|m| m.family == "attention");
        let r = self.rows();
        let layouts = self.layouts();
        let layout_of = |name: &str| layouts.get(levels.get(name).copied().unwrap_or(0)).copied();
        let width = self.piece_width.get(levels.get("#width").copied().unwrap_or(0)).copied();
        let kind = self.piece.map(|piece| piece.kind.as_str());
        let (is_conv, is_norm) = (kind == Some("conv"), kind == Some("norm"));
        let taps = self.piece.map_or(0, |piece| piece.taps as usize);
        let norm_rows = self.norm_rows();
        let (programs, partial_cols) = (self.programs, self.partial_cols);
        let mut out = Vec::with_capacity(p.params.len());
        for param in &p.params {
            let name = param.name.as_str();
            let writable = matches!(param.kind, ParamKind::Ptr { writable: true, .. });
            let f32_buf = |len: usize| Plan::F32 { len, output: writable, inout: false };
            let inout = |len: usize| Plan::F32 { len, output: true, inout: true };
            // Buffers are sized by name whatever their float element type (a bf16 or f16
            // activation has the size of its f32 counterpart); `make_host` gives them their type.
            let kind = match &param.kind {
                ParamKind::Ptr { dtype, writable } if dtype.is_float() => ParamKind::Ptr { dtype: DType::F32, writable: *writable },
                other => other.clone(),
            };
            let plan = match (&kind, name) {
                (ParamKind::Int, "use_h0" | "use_ht" | "use_dht") => Plan::Int(1),
                (ParamKind::Int, "max_len") => Plan::Int(b.max_len as i64 + 1),
                (ParamKind::Int, "rows") => Plan::Int(norm_rows as i64),
                (ParamKind::Int, "programs" | "parts") => Plan::Int(programs as i64),
                (ParamKind::Int, "cols") => Plan::Int(partial_cols as i64),
                // `sum_blocks`'s row width: any that divides `cols` keeps its reads in bounds.
                (ParamKind::Int, "width") => Plan::Int(SUM_BLOCKS_WIDTH),
                (ParamKind::Int, _) => return Err(name.to_string()),
                (ParamKind::Ptr { dtype: DType::I64, .. }, "cu_seqlens") => Plan::I64(b.cu.clone()),
                (ParamKind::Ptr { dtype: DType::I64, .. }, "chunk_offsets") => Plan::I64(b.chunk_offsets.clone()),
                // Decode: the new token's position is the number of tokens before it.
                (ParamKind::Ptr { dtype: DType::I64, .. }, "positions" | "lengths") => Plan::I64(b.lengths.clone()),
                (ParamKind::Ptr { dtype: DType::I64, .. }, _) => return Err(name.to_string()),
                (ParamKind::Ptr { dtype: DType::F32, .. }, _) if attention && !is_norm => match name {
                    "q" | "o" | "do" | "dq" => f32_buf(r * h * d),
                    "k" | "v" | "dk" | "dv" => f32_buf(r * kvh * d),
                    "lse" => f32_buf(r * h),
                    "k_cache" | "v_cache" => inout(b.seqs * (b.max_len + 1) * kvh * d),
                    _ => return Err(name.to_string()),
                },
                (ParamKind::Ptr { dtype: DType::F32, .. }, _) if is_conv => {
                    let c = width.ok_or_else(|| name.to_string())?;
                    match name {
                        "x" | "y" | "dy" | "dx" => f32_buf(if p.param_index("cu_seqlens").is_some() { b.tokens * c } else { b.seqs * c }),
                        "weight" => f32_buf(c * taps),
                        "h0" | "ht" | "dht" | "dh0" | "dweight" => f32_buf(b.seqs * c * taps),
                        "state" => inout(b.seqs * c * taps),
                        _ => return Err(name.to_string()),
                    }
                }
                (ParamKind::Ptr { dtype: DType::F32, .. }, _) if is_norm => {
                    let w = width.ok_or_else(|| name.to_string())?;
                    match name {
                        "x" | "g" | "y" | "dy" | "dx" | "dg" => f32_buf(norm_rows * w),
                        "w" => f32_buf(w),
                        "dw" => f32_buf(programs * w),
                        _ => return Err(name.to_string()),
                    }
                }
                (ParamKind::Ptr { dtype: DType::F32, .. }, "partials") => f32_buf(programs * partial_cols),
                (ParamKind::Ptr { dtype: DType::F32, .. }, "out") => f32_buf(partial_cols),
                // The recurrences.
                // `v_new`: the delta class's Δ, handed from the two-pass forward's walk to its
                // output pass.
                (ParamKind::Ptr { dtype: DType::F32, .. }, "o" | "do" | "v_new") => f32_buf(r * h * v),
                (ParamKind::Ptr { dtype: DType::F32, .. }, "h0" | "ht" | "dht" | "dh0") => f32_buf(b.seqs * h * k * v),
                (ParamKind::Ptr { dtype: DType::F32, .. }, "state") => inout(b.seqs * h * k * v),
                (ParamKind::Ptr { dtype: DType::F32, .. }, "states") => f32_buf(b.chunks * h * k * v),
                // The scan's chunk summaries and entering states (one per chunk and channel).
                (ParamKind::Ptr { dtype: DType::F32, .. }, "chunk_gates" | "chunk_ends" | "chunk_starts") => f32_buf(b.chunks * h),
                (ParamKind::Ptr { dtype: DType::F32, .. }, _) if writable => {
                    // The gradient `d<input>` of an input of the same kernel, or a split
                    // backward's partial sums of it, `d<input>_parts`: one per value block (the
                    // program's second grid axis).
                    let blocks = if name.ends_with("_parts") { self.program_axis(1, levels).ok_or_else(|| name.to_string())? } else { 1 };
                    let input = gradient_input(p, name).ok_or_else(|| name.to_string())?;
                    let l = layout_of(input).ok_or_else(|| input.to_string())?;
                    f32_buf(blocks * if l.per_head { b.seqs * l.len } else { l.len })
                }
                (ParamKind::Ptr { dtype: DType::F32, .. }, _) => f32_buf(layout_of(name).ok_or_else(|| name.to_string())?.len),
                (ParamKind::Ptr { dtype, .. }, _) => return Err(format!("{name} ({})", dtype.name())),
            };
            out.push(plan);
        }
        Ok(out)
    }

    /// The program's grid axis `i` (its own description), if it has one and it evaluates.
    fn program_axis(&self, i: usize, levels: &Levels) -> Option<usize> {
        let g = self.program.grid.get(i)?;
        let vars = self.grid_vars(levels);
        let x = Expr { s: g.as_bytes(), i: 0, vars: &vars }.parse().ok()?;
        (x >= 1.0 && x.fract() == 0.0).then_some(x as usize)
    }

    /// The launch grid from the program's grid descriptions.
    pub fn grid(&self, info: &KernelInfo, levels: &Levels) -> Result<Vec<u64>, String> {
        let vars = self.grid_vars(levels);
        // The manifest's grid is the one the launcher uses; the program's axis names are shorter.
        let axes = if info.grid.len() == self.program.grid.len() { &info.grid } else { &self.program.grid };
        axes.iter()
            .map(|g| {
                let x = Expr { s: g.as_bytes(), i: 0, vars: &vars }.parse().map_err(|e| format!("grid `{g}`: {e}"))?;
                if x < 0.0 || x.fract() != 0.0 {
                    return Err(format!("grid `{g}` = {x} is not a count"));
                }
                Ok(x as u64)
            })
            .collect()
    }

    /// The names a grid description may use, at this batch and these levels.
    fn grid_vars(&self, levels: &Levels) -> HashMap<&'static str, f64> {
        let b = self.batch;
        let width = self.piece_width.get(levels.get("#width").copied().unwrap_or(0)).copied().unwrap_or(0);
        [
            ("sequences", b.seqs as f64),
            ("batch", b.seqs as f64),
            ("tokens", b.tokens as f64),
            ("heads", self.h as f64),
            ("kv_heads", self.kvh as f64),
            ("max_len", b.max_len as f64),
            ("rows", self.norm_rows() as f64),
            ("programs", self.programs as f64),
            ("parts", self.programs as f64),
            ("cols", self.partial_cols as f64),
            ("channels", width as f64),
        ]
        .into_iter()
        .collect()
    }
}

/// A recursive-descent evaluator for the grid descriptions (`sequences * heads`,
/// `ceil(max_len / 64)`, `128 / 64`).
struct Expr<'a> {
    s: &'a [u8],
    i: usize,
    vars: &'a HashMap<&'a str, f64>,
}

impl Expr<'_> {
    fn parse(mut self) -> Result<f64, String> {
        let x = self.sum()?;
        self.ws();
        if self.i != self.s.len() {
            return Err(format!("unexpected `{}`", String::from_utf8_lossy(&self.s[self.i..])));
        }
        Ok(x)
    }

    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn sum(&mut self) -> Result<f64, String> {
        let mut x = self.product()?;
        loop {
            if self.eat(b'+') {
                x += self.product()?;
            } else if self.eat(b'-') {
                x -= self.product()?;
            } else {
                return Ok(x);
            }
        }
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut x = self.atom()?;
        loop {
            if self.eat(b'*') {
                x *= self.atom()?;
            } else if self.eat(b'/') {
                x /= self.atom()?;
            } else {
                return Ok(x);
            }
        }
    }

    fn atom(&mut self) -> Result<f64, String> {
        self.ws();
        if self.eat(b'(') {
            let x = self.sum()?;
            return if self.eat(b')') { Ok(x) } else { Err("missing `)`".into()) };
        }
        let start = self.i;
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.') {
            self.i += 1;
        }
        let word = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
        if word.is_empty() {
            return Err("expected a number or a name".into());
        }
        if let Ok(x) = word.parse::<f64>() {
            return Ok(x);
        }
        if word == "ceil" {
            if !self.eat(b'(') {
                return Err("`ceil` without `(`".into());
            }
            let x = self.sum()?;
            return if self.eat(b')') { Ok(x.ceil()) } else { Err("missing `)`".into()) };
        }
        self.vars.get(word).copied().ok_or_else(|| format!("unknown size `{word}`"))
    }
}

/// The host side of one argument.
#[derive(Clone)]
pub enum Host {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    Int(i64),
}

impl Host {
    /// f32 data as a buffer of `dtype` (rounded to nearest even for bf16 and f16; NaN stays NaN).
    fn stored(dtype: DType, data: Vec<f32>) -> Host {
        match dtype {
            DType::Bf16 => Host::Bf16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Host::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => Host::F32(data),
        }
    }

    /// A float buffer's values widened to f32 (exactly), with its element type; None for integers.
    pub fn floats(&self) -> Option<(DType, Vec<f32>)> {
        match self {
            Host::F32(v) => Some((DType::F32, v.clone())),
            Host::Bf16(v) => Some((DType::Bf16, v.iter().map(|x| x.to_f32()).collect())),
            Host::F16(v) => Some((DType::F16, v.iter().map(|x| x.to_f32()).collect())),
            Host::I64(_) | Host::Int(_) => None,
        }
    }
}

/// splitmix64: a small seeded generator, so the check needs no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in ±[0.1, 1): never zero, and small enough that decays and gates stay in their
    /// stable ranges over 130 tokens.
    pub fn value(&mut self) -> f32 {
        let bits = self.next();
        let u = (bits >> 11) as f64 / (1u64 << 53) as f64;
        let x = 0.1 + 0.9 * u;
        (if bits & 1 == 0 { x } else { -x }) as f32
    }
}

pub fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The arguments `plans` describe: seeded random f32 inputs, NaN outputs, stored in each
/// parameter's element type (bf16 and f16 buffers get the f32 draws rounded to nearest even, so
/// the CPU and the GPU read the very same rounded inputs).
pub fn make_host(program: &Program, plans: &[Plan], seed: u64) -> Vec<Host> {
    let mut rng = Rng(seed);
    plans
        .iter()
        .zip(&program.params)
        .map(|(p, param)| {
            let dtype = match param.kind {
                ParamKind::Ptr { dtype, .. } => dtype,
                ParamKind::Int => DType::I64,
            };
            match p {
                Plan::F32 { len, output: true, inout: false } => Host::stored(dtype, vec![f32::NAN; *len]),
                // A lower bound on a decay is a fraction (the chunked kernels take its logarithm).
                Plan::F32 { len, .. } if param.name == "lower_bound" => Host::stored(dtype, (0..*len).map(|_| rng.value().abs()).collect()),
                Plan::F32 { len, .. } => Host::stored(dtype, (0..*len).map(|_| rng.value()).collect()),
                Plan::I64(v) => Host::I64(v.clone()),
                Plan::Int(v) => Host::Int(*v),
            }
        })
        .collect()
}

pub fn run_cpu(module: &CpuModule, id: cpu::KernelId, program: &Program, host: &mut [Host], grid: &[u64]) -> Result<(), cpu::LaunchError> {
    let mut args: Vec<Arg<'_>> = host
        .iter_mut()
        .zip(&program.params)
        .map(|(h, p)| {
            let writable = matches!(p.kind, ParamKind::Ptr { writable: true, .. });
            match (h, writable) {
                (Host::F32(v), true) => Arg::F32Mut(v),
                (Host::F32(v), false) => Arg::F32(v),
                (Host::Bf16(v), true) => Arg::Bf16Mut(v),
                (Host::Bf16(v), false) => Arg::Bf16(v),
                (Host::F16(v), true) => Arg::F16Mut(v),
                (Host::F16(v), false) => Arg::F16(v),
                (Host::I64(v), _) => Arg::I64(v),
                (Host::Int(v), _) => Arg::Int(*v),
            }
        })
        .collect();
    module.launch(id, &mut args, grid)
}

impl Sizer<'_> {
    /// `levels` probed with `from` (another batch of the same kernel), re-indexed for this one:
    /// the same layout kinds, wherever they fall in this batch's smallest-first order.
    pub fn carry_levels(&self, from: &Sizer<'_>, levels: &Levels) -> Levels {
        let (old, new) = (from.layouts(), self.layouts());
        levels
            .iter()
            .map(|(name, &level)| {
                // The piece width does not depend on the batch.
                if name == "#width" {
                    return (name.clone(), level);
                }
                let at = old.get(level).and_then(|l| new.iter().position(|n| n.kind == l.kind)).unwrap_or(level);
                (name.clone(), at)
            })
            .collect()
    }
}

/// Why a kernel could not be sized.
pub enum ProbeError {
    /// A parameter whose size no convention gives.
    Unsized(String),
    /// Anything else (a grid that does not evaluate, a CPU failure).
    Fail(String),
}

/// A kernel sized on a batch: the probing state, its arguments as made (before running), the
/// CPU's results and the grid.
pub struct Probed {
    /// The layouts chosen for inputs the manifest does not size.
    pub levels: Levels,
    /// The arguments before the run.
    pub initial: Vec<Host>,
    /// The arguments after the CPU ran the kernel.
    pub cpu_out: Vec<Host>,
    /// The launch grid.
    pub grid: Vec<u64>,
}

/// The input of `program` whose gradient the parameter `name` is: `d<input>`, or a split
/// backward's partial sums of it, `d<input>_parts`.
fn gradient_input<'n>(program: &Program, name: &'n str) -> Option<&'n str> {
    let grad = name.strip_suffix("_parts").unwrap_or(name);
    grad.strip_prefix('d').filter(|n| program.param_index(n).is_some())
}

/// Sizes a kernel on `sizer`'s batch by running it on the CPU and growing whatever the CPU reports
/// overrun (the parameter itself, the input a gradient belongs to, or the piece width) until it
/// runs in bounds.
pub fn probe(sizer: &Sizer<'_>, info: &KernelInfo, cpu_module: &CpuModule, cpu_id: cpu::KernelId, seed: u64) -> Result<Probed, ProbeError> {
    let program = sizer.program;
    let mut levels = Levels::new();
    let max_tries = 8 * (program.params.len() + 1);
    for _ in 0..max_tries {
        let plans = sizer.plan(&levels).map_err(ProbeError::Unsized)?;
        let grid = sizer.grid(info, &levels).map_err(ProbeError::Fail)?;
        let initial = make_host(program, &plans, seed);
        let mut host = initial.clone();
        match run_cpu(cpu_module, cpu_id, program, &mut host, &grid) {
            Ok(()) => return Ok(Probed { levels, initial, cpu_out: host, grid }),
            Err(cpu::LaunchError::OutOfBounds { param, .. }) => {
                let key = if !sizer.piece_width.is_empty() {
                    "#width".to_string()
                } else if program
                    .param_index(&param)
                    .is_some_and(|i| matches!(program.params[i].kind, ParamKind::Ptr { writable: true, .. }))
                {
                    match gradient_input(program, &param) {
                        Some(input) => input.to_string(),
                        None => return Err(ProbeError::Fail(format!("the CPU overran `{param}`, whose size is fixed"))),
                    }
                } else {
                    param.clone()
                };
                let limit = if key == "#width" { sizer.piece_width.len() } else { sizer.layouts().len() };
                let level = levels.entry(key).or_insert(0);
                *level += 1;
                if *level >= limit {
                    return Err(ProbeError::Unsized(param));
                }
            }
            Err(e) => return Err(ProbeError::Fail(format!("on the CPU: {e}"))),
        }
    }
    Err(ProbeError::Fail("sizing did not settle".into()))
}

/// One argument in device memory.
pub enum Dev {
    /// A buffer (f32, bf16, f16 or i64).
    Buf(GpuBuffer),
    /// An integer parameter.
    Int(i64),
}

impl Dev {
    /// Copies one host argument to the device.
    pub fn upload(module: &GpuModule, host: &Host) -> Result<Dev, GpuError> {
        Ok(match host {
            Host::F32(v) => Dev::Buf(module.upload_f32(v)?),
            Host::Bf16(v) => Dev::Buf(module.upload_bf16(v)?),
            Host::F16(v) => Dev::Buf(module.upload_f16(v)?),
            Host::I64(v) => Dev::Buf(module.upload_i64(v)?),
            Host::Int(v) => Dev::Int(*v),
        })
    }

    /// A float buffer copied back to the host, widened to f32 (None for integers).
    pub fn download_floats(&self, module: &GpuModule) -> Result<Option<Vec<f32>>, GpuError> {
        let Dev::Buf(b) = self else { return Ok(None) };
        Ok(match b.dtype() {
            DType::F32 => Some(module.download_f32(b)?),
            DType::Bf16 => Some(module.download_bf16(b)?.iter().map(|x| x.to_f32()).collect()),
            DType::F16 => Some(module.download_f16(b)?.iter().map(|x| x.to_f32()).collect()),
            _ => None,
        })
    }
}

/// The launch arguments for `dev`, borrowed as `program`'s parameters want them (written
/// buffers mutably).
pub fn gpu_args<'a>(dev: &'a mut [Dev], program: &Program) -> Vec<GpuArg<'a>> {
    dev.iter_mut()
        .zip(&program.params)
        .map(|(d, p)| {
            let writable = matches!(p.kind, ParamKind::Ptr { writable: true, .. });
            match (d, writable) {
                (Dev::Buf(b), true) => match b.dtype() {
                    DType::Bf16 => GpuArg::Bf16Mut(b),
                    DType::F16 => GpuArg::F16Mut(b),
                    _ => GpuArg::F32Mut(b),
                },
                (Dev::Buf(b), false) => {
                    let b: &GpuBuffer = b;
                    match b.dtype() {
                        DType::I64 => GpuArg::I64(b),
                        DType::Bf16 => GpuArg::Bf16(b),
                        DType::F16 => GpuArg::F16(b),
                        _ => GpuArg::F32(b),
                    }
                }
                (Dev::Int(v), _) => GpuArg::Int(*v),
            }
        })
        .collect()
}
