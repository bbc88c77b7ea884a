//! Causal softmax attention as fla's Attention layer computes it: GQA (each group of
//! H / H_kv query heads shares one kv head), optional RoPE (non-interleaved, base θ, over the head
//! dim), optional sliding window (window w: query i sees keys j with i − w < j ≤ i), scale
//! 1/sqrt(D), packed sequences; and decode over a KV cache.

use super::ops::rope_t3;
use super::tensor::{positions, seq_ranges, T3};

/// Attention options.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttnOpts {
    /// Sliding window w (None = full causal).
    pub window: Option<usize>,
    /// RoPE base θ (None = no rotary embedding).
    pub rope_theta: Option<f64>,
}

fn group(h: usize, hkv: usize) -> usize {
    assert!(hkv > 0 && h.is_multiple_of(hkv), "num_kv_heads must divide num_heads");
    h / hkv
}

/// softmax(q Kᵀ · scale) V over the visible keys (`keys` and `values` are lists of vectors).
fn attend(q: &[f64], keys: &[&[f64]], values: &[&[f64]], dv: usize) -> Vec<f64> {
    let scale = 1.0 / (q.len() as f64).sqrt();
    let scores: Vec<f64> = keys.iter().map(|k| scale * k.iter().zip(q).map(|(a, b)| a * b).sum::<f64>()).collect();
    // Subtract the maximum so that exponentials cannot overflow.
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut o = vec![0.0; dv];
    for (wi, v) in w.iter().zip(values) {
        for j in 0..dv {
            o[j] += wi / z * v[j];
        }
    }
    o
}

fn visible(i: usize, j: usize, window: Option<usize>) -> bool {
    j <= i && window.is_none_or(|w| j + w > i)
}

/// Causal attention: q [T, H, D], k [T, H_kv, D], v [T, H_kv, Dv] → o [T, H, Dv].
pub fn attention(q: &T3, k: &T3, v: &T3, opts: AttnOpts, cu_seqlens: &[usize]) -> T3 {
    let g = group(q.h, k.h);
    let (q, k) = match opts.rope_theta {
        Some(theta) => {
            let pos = positions(cu_seqlens);
            (rope_t3(q, &pos, theta), rope_t3(k, &pos, theta))
        }
        None => (q.clone(), k.clone()),
    };
    let mut o = T3::zeros(q.t, q.h, v.d);
    for (a, b) in seq_ranges(cu_seqlens) {
        for h in 0..q.h {
            let kh = h / g;
            for i in 0..b - a {
                let js: Vec<usize> = (0..b - a).filter(|&j| visible(i, j, opts.window)).collect();
                let keys: Vec<&[f64]> = js.iter().map(|&j| k.vec(a + j, kh)).collect();
                let values: Vec<&[f64]> = js.iter().map(|&j| v.vec(a + j, kh)).collect();
                o.vec_mut(a + i, h).copy_from_slice(&attend(q.vec(a + i, h), &keys, &values, v.d));
            }
        }
    }
    o
}

/// Repeats each kv head `groups` times (GQA → MHA), as fla's repeat_kv does.
pub fn repeat_kv(x: &T3, groups: usize) -> T3 {
    T3::from_fn(x.t, x.h * groups, x.d, |t, h, i| x.get(t, h / groups, i))
}

/// One sequence's KV cache: rotated keys and values of every past token, per kv head.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// `keys[h]` lists the (rotated) key vectors of kv head h, oldest first.
    pub keys: Vec<Vec<Vec<f64>>>,
    /// `values[h]` lists the value vectors of kv head h, oldest first.
    pub values: Vec<Vec<Vec<f64>>>,
}

impl KvCache {
    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.keys.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decodes one token (q [1, H, D], k [1, H_kv, D], v [1, H_kv, Dv]): appends k and v to the
/// cache, then attends over the visible cached keys.
pub fn attention_step(q: &T3, k: &T3, v: &T3, opts: AttnOpts, cache: &mut KvCache) -> T3 {
    assert_eq!(q.t, 1, "attention_step: one token");
    let g = group(q.h, k.h);
    let pos = cache.len();
    let (q, k) = match opts.rope_theta {
        Some(theta) => (rope_t3(q, &[pos], theta), rope_t3(k, &[pos], theta)),
        None => (q.clone(), k.clone()),
    };
    if cache.keys.is_empty() {
        cache.keys = vec![Vec::new(); k.h];
        cache.values = vec![Vec::new(); k.h];
    }
    for h in 0..k.h {
        cache.keys[h].push(k.vec(0, h).to_vec());
        cache.values[h].push(v.vec(0, h).to_vec());
    }
    let mut o = T3::zeros(1, q.h, v.d);
    for h in 0..q.h {
        let kh = h / g;
        let js: Vec<usize> = (0..=pos).filter(|&j| visible(pos, j, opts.window)).collect();
        let keys: Vec<&[f64]> = js.iter().map(|&j| cache.keys[kh][j].as_slice()).collect();
        let values: Vec<&[f64]> = js.iter().map(|&j| cache.values[kh][j].as_slice()).collect();
        o.vec_mut(0, h).copy_from_slice(&attend(q.vec(0, h), &keys, &values, v.d));
    }
    o
}
