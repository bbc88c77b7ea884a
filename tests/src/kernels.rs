//! Helpers the kernel tests share: conversions between the reference's f64 and the kernels' f32,
//! the relative L2 error they are judged by, packed-sequence offsets, and a spec's first mixer.

/// f64 → f32, elementwise.
pub fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|v| *v as f32).collect()
}

/// f32 → f64, elementwise.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| f64::from(*v)).collect()
}

/// ‖got − want‖₂ / ‖want‖₂; infinite when `got` holds a NaN or infinity (which never passes), the
/// absolute norm when `want` is zero.
pub fn rel_l2_f64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// [`rel_l2_f64`] of an f32 result against an f64 reference.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    rel_l2_f64(&f64s(got), want)
}

/// Cumulative offsets of packed sequences of the given lengths, as usize (for the reference) and
/// i64 (for the kernels).
pub fn packing(lengths: &[usize]) -> (Vec<usize>, Vec<i64>) {
    let mut cu = vec![0usize];
    for l in lengths {
        cu.push(cu.last().copied().unwrap_or(0) + l);
    }
    let cu64 = cu.iter().map(|&x| x as i64).collect();
    (cu, cu64)
}

/// The first mixer of a model compiled from spec text (panics with the diagnostics if it fails).
pub fn mixer(spec: &str) -> hlac::ir::Mixer {
    let c = hlac::compile_str("<kernel test>", spec, &crate::root());
    assert!(!c.failed(), "{}", c.render(false));
    let model = c.model.expect("a spec with a model");
    let first = model.mixers.iter().next().map(|(_, m)| m.clone());
    first.expect("a mixer")
}
