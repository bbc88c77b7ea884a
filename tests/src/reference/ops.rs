//! Scalar activations and the small pieces around the mixers: gate functions, L2 normalisation,
//! RMSNorm (plain and fla's FusedRMSNormGated with a swish gate), RoPE, and the causal depthwise
//! short convolution with its decode cache.

use super::tensor::{seq_ranges, T3};

/// fla's L2-norm epsilon: y = x · (Σx² + 1e−6)^(−1/2).
pub const L2_EPS: f64 = 1e-6;

/// σ(x), written so that neither branch overflows.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log σ(x) = −softplus(−x), stable for large |x|.
pub fn logsigmoid(x: f64) -> f64 {
    -softplus_exact(-x)
}

/// log(1 + eˣ) without the threshold, stable for large |x|.
fn softplus_exact(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// torch's softplus (beta 1, threshold 20): linear above 20, as fla's GDN gate uses.
pub fn softplus(x: f64) -> f64 {
    if x > 20.0 {
        x
    } else {
        softplus_exact(x)
    }
}

/// SiLU (swish): x · σ(x).
pub fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

/// log(eᵃ + eᵇ), with −∞ handled (log of a zero lower bound).
pub fn logaddexp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// L2 normalisation of one vector: x · (Σx² + eps)^(−1/2).
pub fn l2_norm(x: &[f64], eps: f64) -> Vec<f64> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() + eps).sqrt();
    x.iter().map(|v| v * r).collect()
}

/// L2 normalisation of every (token, head) vector of a [T, H, D] tensor, with fla's epsilon.
pub fn l2_norm_t3(x: &T3) -> T3 {
    let mut out = x.clone();
    for t in 0..x.t {
        for h in 0..x.h {
            out.vec_mut(t, h).copy_from_slice(&l2_norm(x.vec(t, h), L2_EPS));
        }
    }
    out
}

/// RMSNorm of one vector: x · (mean x² + eps)^(−1/2) ⊙ w.
pub fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    assert_eq!(x.len(), w.len(), "rms_norm: weight length");
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, wi)| v * r * wi).collect()
}

/// fla's FusedRMSNormGated with the swish gate: rmsnorm(x) ⊙ w ⊙ silu(g).
pub fn rms_norm_gated(x: &[f64], g: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    assert_eq!(x.len(), g.len(), "rms_norm_gated: gate length");
    rms_norm(x, w, eps).into_iter().zip(g).map(|(y, gi)| y * silu(*gi)).collect()
}

/// RMSNorm over the last dimension of every (token, head) vector (fla normalises per head).
pub fn rms_norm_t3(x: &T3, w: &[f64], eps: f64) -> T3 {
    let mut out = x.clone();
    for t in 0..x.t {
        for h in 0..x.h {
            out.vec_mut(t, h).copy_from_slice(&rms_norm(x.vec(t, h), w, eps));
        }
    }
    out
}

/// Gated RMSNorm over the last dimension of every (token, head) vector.
pub fn rms_norm_gated_t3(x: &T3, g: &T3, w: &[f64], eps: f64) -> T3 {
    assert_eq!((x.t, x.h, x.d), (g.t, g.h, g.d), "rms_norm_gated_t3: gate shape");
    let mut out = x.clone();
    for t in 0..x.t {
        for h in 0..x.h {
            out.vec_mut(t, h).copy_from_slice(&rms_norm_gated(x.vec(t, h), g.vec(t, h), w, eps));
        }
    }
    out
}

/// Non-interleaved (GPT-NeoX / fla `interleaved=False`) rotary embedding of one head vector at
/// position `pos`: with r = 2⌊D/2⌋ rotary dims and half = r/2, pair (i, i + half) is rotated by
/// pos · θ^(−2i/r). An odd trailing dimension passes through unchanged (fla's rotary_dim < D).
pub fn rope(x: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let rot = x.len() / 2 * 2;
    let half = rot / 2;
    let mut out = x.to_vec();
    for i in 0..half {
        let freq = theta.powf(-((2 * i) as f64) / rot as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        let (x1, x2) = (x[i], x[i + half]);
        out[i] = x1 * c - x2 * s;
        out[i + half] = x2 * c + x1 * s;
    }
    out
}

/// RoPE on every head of a [T, H, D] tensor; `positions[t]` is token t's position in its sequence.
pub fn rope_t3(x: &T3, positions: &[usize], theta: f64) -> T3 {
    assert_eq!(positions.len(), x.t, "rope_t3: one position per token");
    let mut out = x.clone();
    for t in 0..x.t {
        for h in 0..x.h {
            out.vec_mut(t, h).copy_from_slice(&rope(x.vec(t, h), positions[t], theta));
        }
    }
    out
}

/// A causal depthwise convolution's parameters (fla's ShortConvolution, causal_conv1d).
#[derive(Clone, Copy, Debug)]
pub struct ShortConv<'a> {
    /// Weights, fla's [C, 1, W] layout: `weight[c * W + j]` multiplies x_{t − (W−1) + j}.
    pub weight: &'a [f64],
    /// Optional per-channel bias.
    pub bias: Option<&'a [f64]>,
    /// Kernel width W (4 in fla's mixers).
    pub width: usize,
    /// Apply SiLU after the convolution.
    pub silu: bool,
}

impl ShortConv<'_> {
    fn channels(&self) -> usize {
        self.weight.len() / self.width.max(1)
    }

    fn out(&self, c: usize, window: impl Fn(usize) -> f64) -> f64 {
        let w = self.width;
        let mut p = self.bias.map_or(0.0, |b| b[c]);
        for j in 0..w {
            p += self.weight[c * w + j] * window(j);
        }
        if self.silu {
            silu(p)
        } else {
            p
        }
    }
}

/// Causal depthwise convolution over a packed batch; channels are all H·D values of a token.
///
/// Conv state (fla's decode cache) per sequence is a row-major [C, W] array holding the last W
/// inputs, newest in column W − 1; a step shifts it left and writes the new input at the end, so
/// only columns 1..W are history. `initial` supplies that history per sequence (zero when None);
/// the returned states are the caches after each sequence, ready for [`short_conv_step`].
pub fn short_conv(x: &T3, conv: &ShortConv, initial: Option<&[Vec<f64>]>, cu_seqlens: &[usize]) -> (T3, Vec<Vec<f64>>) {
    let c_count = x.h * x.d;
    let w = conv.width;
    assert_eq!(conv.channels(), c_count, "short_conv: weight is not [C, 1, W]");
    let mut out = T3::zeros(x.t, x.h, x.d);
    let mut states = Vec::new();
    for (n, (a, b)) in seq_ranges(cu_seqlens).into_iter().enumerate() {
        let zero = vec![0.0; c_count * w];
        let hist = initial.map_or(&zero, |s| &s[n]);
        // Input u (relative to the sequence start, may be negative) for channel c.
        let input = |u: isize, c: usize| -> f64 {
            if u >= 0 {
                x.row(a + u as usize)[c]
            } else {
                let col = w as isize + u;
                if col >= 1 {
                    hist[c * w + col as usize]
                } else {
                    0.0
                }
            }
        };
        for t in 0..b - a {
            for c in 0..c_count {
                let y = conv.out(c, |j| input(t as isize - (w as isize - 1) + j as isize, c));
                out.data[(a + t) * c_count + c] = y;
            }
        }
        let len = (b - a) as isize;
        let mut state = vec![0.0; c_count * w];
        for c in 0..c_count {
            for j in 0..w {
                state[c * w + j] = input(len - w as isize + j as isize, c);
            }
        }
        states.push(state);
    }
    (out, states)
}

/// One decode step of [`short_conv`] for a single token (`x.t == 1`), updating the [C, W] cache.
pub fn short_conv_step(x: &T3, conv: &ShortConv, state: &mut [f64]) -> T3 {
    assert_eq!(x.t, 1, "short_conv_step: one token");
    let c_count = x.h * x.d;
    let w = conv.width;
    assert_eq!(state.len(), c_count * w, "short_conv_step: state is not [C, W]");
    let mut out = T3::zeros(1, x.h, x.d);
    for c in 0..c_count {
        let row = &mut state[c * w..(c + 1) * w];
        row.rotate_left(1);
        row[w - 1] = x.data[c];
        out.data[c] = conv.out(c, |j| row[j]);
    }
    out
}
