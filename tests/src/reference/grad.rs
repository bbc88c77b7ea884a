//! Gradient checking: central differences of any scalar function of a flat parameter vector.
//! The analytic backward of the generic recurrence lives in `linear::recurrent_backward`.

/// Central-difference gradient (f(x + h e_i) − f(x − h e_i)) / 2h for every coordinate i.
pub fn numeric_grad(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    let mut g = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + h;
        let fp = f(&xp);
        xp[i] = orig - h;
        let fm = f(&xp);
        xp[i] = orig;
        g.push((fp - fm) / (2.0 * h));
    }
    g
}

/// Σ a_i b_i: the scalar loss ⟨weights, outputs⟩ that gradient checks differentiate.
pub fn weighted_sum(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
