//! Plain-Rust float64 reference implementations of everything hlac's kernels compute: the generic
//! linear recurrence of design.md (and the six mixers as thin wrappers with fla's gate
//! conventions), packed variable-length batches, one-step decode, causal softmax attention, the
//! small pieces around the mixers, and gradients.
//!
//! Everything here is written token by token straight from the equations, in f64, for clarity
//! rather than speed: it is the yardstick that kernel tests compare against, so it must be easy
//! to read and check by eye.
//!
//! Layouts follow fla: activations are [T, H, D] row-major ([`T3`]); fla's batch dimension B is
//! folded into T through cumulative sequence offsets `cu_seqlens` (`[0, T]` for one sequence,
//! [`uniform_cu_seqlens`] for B equal-length sequences). A recurrent state for one (sequence,
//! head) is a `Vec<f64>` of length K·V, row-major [K, V] (fla's state is [N, H, K, V]); a list of
//! states is indexed `n * H + h`.
// Index loops mirror the equations (S[i, j], k[t, i]) and read better than iterator chains here.
#![allow(clippy::needless_range_loop)]

pub mod attention;
pub mod grad;
pub mod linear;
pub mod mixers;
pub mod ops;
pub mod rng;
pub mod tensor;

pub use tensor::{max_abs_diff, positions, rel_err, seq_ranges, uniform_cu_seqlens, T3};
