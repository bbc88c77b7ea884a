//! A minimal row-major [T, H, D] tensor (fla's [B, T, H, D] with B folded into T by cu_seqlens)
//! and helpers for sequence offsets and comparisons.

/// A row-major [T, H, D] array: element (t, h, i) lives at `(t * h_count + h) * d + i`.
/// Per-head scalars (gates, β) use D = 1.
#[derive(Clone, Debug, PartialEq)]
pub struct T3 {
    /// Tokens (all packed sequences together).
    pub t: usize,
    /// Heads.
    pub h: usize,
    /// Features per head.
    pub d: usize,
    /// The values, row-major.
    pub data: Vec<f64>,
}

impl T3 {
    /// All zeros.
    pub fn zeros(t: usize, h: usize, d: usize) -> Self {
        T3 { t, h, d, data: vec![0.0; t * h * d] }
    }

    /// Element (t, h, i) = f(t, h, i).
    pub fn from_fn(t: usize, h: usize, d: usize, mut f: impl FnMut(usize, usize, usize) -> f64) -> Self {
        let mut data = Vec::with_capacity(t * h * d);
        for ti in 0..t {
            for hi in 0..h {
                for i in 0..d {
                    data.push(f(ti, hi, i));
                }
            }
        }
        T3 { t, h, d, data }
    }

    /// Wraps `data`, checking its length.
    pub fn new(t: usize, h: usize, d: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), t * h * d, "T3::new: data length does not match [{t}, {h}, {d}]");
        T3 { t, h, d, data }
    }

    /// Flat index of (t, h, i).
    pub fn idx(&self, t: usize, h: usize, i: usize) -> usize {
        (t * self.h + h) * self.d + i
    }

    /// Element (t, h, i).
    pub fn get(&self, t: usize, h: usize, i: usize) -> f64 {
        self.data[self.idx(t, h, i)]
    }

    /// Sets element (t, h, i).
    pub fn set(&mut self, t: usize, h: usize, i: usize, v: f64) {
        let k = self.idx(t, h, i);
        self.data[k] = v;
    }

    /// The D-vector at (t, h).
    pub fn vec(&self, t: usize, h: usize) -> &[f64] {
        let k = self.idx(t, h, 0);
        &self.data[k..k + self.d]
    }

    /// The D-vector at (t, h), mutable.
    pub fn vec_mut(&mut self, t: usize, h: usize) -> &mut [f64] {
        let k = self.idx(t, h, 0);
        &mut self.data[k..k + self.d]
    }

    /// All H·D values of token t (one row of fla's [T, H·D] view).
    pub fn row(&self, t: usize) -> &[f64] {
        &self.data[t * self.h * self.d..(t + 1) * self.h * self.d]
    }

    /// Head `h` over tokens [t0, t1) as a row-major [t1 − t0, D] matrix.
    pub fn head(&self, h: usize, t0: usize, t1: usize) -> Vec<f64> {
        (t0..t1).flat_map(|t| self.vec(t, h).iter().copied()).collect()
    }

    /// Writes a row-major [n, D] matrix into head `h` starting at token `t0`.
    pub fn set_head(&mut self, h: usize, t0: usize, rows: &[f64]) {
        let d = self.d;
        for (r, chunk) in rows.chunks(d).enumerate() {
            self.vec_mut(t0 + r, h).copy_from_slice(chunk);
        }
    }

    /// Tokens [t0, t1).
    pub fn slice_t(&self, t0: usize, t1: usize) -> T3 {
        let w = self.h * self.d;
        T3 { t: t1 - t0, h: self.h, d: self.d, data: self.data[t0 * w..t1 * w].to_vec() }
    }

    /// Tokens of all parts, one after another (packing sequences).
    pub fn concat_t(parts: &[T3]) -> T3 {
        let (h, d) = parts.first().map(|p| (p.h, p.d)).unwrap_or((0, 0));
        let mut out = T3 { t: 0, h, d, data: Vec::new() };
        for p in parts {
            assert_eq!((p.h, p.d), (h, d), "T3::concat_t: parts disagree in [H, D]");
            out.t += p.t;
            out.data.extend_from_slice(&p.data);
        }
        out
    }

    /// Elementwise map.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> T3 {
        T3 { t: self.t, h: self.h, d: self.d, data: self.data.iter().map(|&x| f(x)).collect() }
    }

    /// The same data viewed as [T, 1, H·D] (one "head" holding every channel).
    pub fn flat_channels(&self) -> T3 {
        T3 { t: self.t, h: 1, d: self.h * self.d, data: self.data.clone() }
    }
}

/// The (start, end) token range of every sequence in a packed batch.
pub fn seq_ranges(cu_seqlens: &[usize]) -> Vec<(usize, usize)> {
    assert!(!cu_seqlens.is_empty(), "cu_seqlens must start with 0");
    assert_eq!(cu_seqlens[0], 0, "cu_seqlens must start with 0");
    cu_seqlens
        .windows(2)
        .map(|w| {
            assert!(w[0] <= w[1], "cu_seqlens must not decrease");
            (w[0], w[1])
        })
        .collect()
}

/// cu_seqlens for `b` sequences of `t` tokens each (fla's dense [B, T] batch).
pub fn uniform_cu_seqlens(b: usize, t: usize) -> Vec<usize> {
    (0..=b).map(|i| i * t).collect()
}

/// Position of every token within its own sequence (RoPE restarts at each sequence).
pub fn positions(cu_seqlens: &[usize]) -> Vec<usize> {
    seq_ranges(cu_seqlens).into_iter().flat_map(|(a, b)| 0..b - a).collect()
}

/// max |a − b| (infinite when lengths differ or either holds a NaN).
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() }).fold(0.0, f64::max)
}

/// max |a − b| ÷ max(max |b|, tiny): an error relative to the reference `b`'s scale.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    max_abs_diff(a, b) / scale
}
