//! Lowering: from a classified recurrence (or attention, conv, norm) to kernel-IR programs. Each
//! algorithm is written once here, generically over its class; the gate activations, keys, values
//! and queries a declaration states are compiled into the kernels ([`expr`]), so a recurrence a user
//! declares gets its kernels with no new code. Stops at kernel IR; back ends take it from there.

pub mod attention;
pub mod chunk;
pub mod decay;
pub mod decode;
pub mod delta;
pub mod expr;
pub mod pieces;
pub mod scan;

use hlac_runtime::kir::Program;

use crate::classify::RecurrenceClass;
use crate::mixer::Math;

/// Why a recurrence could not be lowered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot lower `{mixer}`: {reason}")]
pub struct LowerError {
    /// The mixer.
    pub mixer: String,
    /// What is not implemented or not possible.
    pub reason: String,
}

/// Everything a lowering needs to know about one recurrence.
#[derive(Debug, Clone)]
pub struct Recurrence<'a> {
    /// The mixer's name (for kernel names and errors).
    pub name: &'a str,
    /// Its class and expressions.
    pub class: &'a RecurrenceClass,
    /// Its per-head math (axis names and sizes, token inputs).
    pub math: &'a Math,
    /// Number of heads.
    pub heads: u64,
}

/// Static choices of a kernel variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tokens per chunk.
    pub chunk: u32,
    /// Value columns per program instance (must divide V).
    pub block_v: u32,
}

impl Recurrence<'_> {
    /// The key size K.
    pub fn k(&self) -> u32 {
        self.math.key_axis.1 as u32
    }

    /// The value size V.
    pub fn v(&self) -> u32 {
        self.math.value_axis.1 as u32
    }

    fn error(&self, reason: impl Into<String>) -> LowerError {
        LowerError { mixer: self.name.to_string(), reason: reason.into() }
    }
}

/// A lowered kernel with what its launcher needs to know.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The program.
    pub program: Program,
    /// How many instances run on each grid axis, as a description (`sequences * heads`, …).
    pub grid: Vec<String>,
}

/// The forward kernel of a recurrence, by its family (for the elementwise scan, `block_v` is the
/// channel block and the grid is sequences × ⌈heads / block_v⌉).
pub fn chunk_forward(r: &Recurrence<'_>, tiling: Tiling) -> Result<Kernel, LowerError> {
    match r.class.family {
        crate::classify::Family::Decay => decay::forward(r, tiling),
        crate::classify::Family::Delta => delta::forward(r, tiling),
        crate::classify::Family::Scan => scan::forward(r, tiling.block_v),
    }
}
