//! The CPU back end, op by op: each kernel-IR operation compiled through Cranelift and run, against
//! the same computation done directly in f64, on seeded random inputs at awkward sizes.

use hlac_runtime::cpu::{Arg, CpuModule, LaunchError};
use hlac_runtime::kir::{verify, BinOp, Builder, CmpOp, DType, Program, UnOp, Value};

/// A small deterministic generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.next() * scale) as f32).collect()
    }
}

fn run(p: Program, args: &mut [Arg<'_>], grid: &[u64]) -> Result<(), LaunchError> {
    verify(&p).unwrap_or_else(|e| panic!("{e}\n{p}"));
    let mut m = CpuModule::new().expect("jit");
    let id = m.add(p).expect("compiles");
    m.launch(id, args, grid)
}

fn close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (f64::from(*x) - y).abs() / y.abs().max(1.0);
        assert!(err <= tol, "{what}[{i}]: got {x}, want {y} (error {err:.2e})");
    }
}

/// Offsets `base + row · cols + col` of a row-major [rows, cols] tile.
fn grid_offsets(b: &mut Builder, rows: u32, cols: u32, base: i64) -> Value {
    let r = b.iota(rows);
    let c = b.iota(cols);
    let cv = b.i64(i64::from(cols));
    let rc = b.col(r);
    let rr = b.mul(rc, cv);
    let cr = b.row(c);
    let o = b.add(rr, cr);
    if base == 0 {
        return o;
    }
    let base = b.i64(base);
    b.add(o, base)
}

/// y = f(x) elementwise over a [rows, cols] tile.
fn unary_kernel(op: UnOp, rows: u32, cols: u32) -> Program {
    let mut b = Builder::new("unary", &["one"]);
    let x = b.ptr("x", DType::F32, false);
    let y = b.ptr("y", DType::F32, true);
    let off = grid_offsets(&mut b, rows, cols, 0);
    let v = b.load(x, off, None, 0.0);
    let w = b.unary(op, v);
    b.store(y, off, w, None);
    b.finish()
}

#[test]
fn unary_operations_match_f64() {
    let mut rng = Rng(1);
    type Reference = fn(f64) -> f64;
    let cases: [(UnOp, Reference); 13] = [
        (UnOp::Neg, |x| -x),
        (UnOp::Exp, f64::exp),
        (UnOp::Abs, f64::abs),
        (UnOp::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
        (UnOp::LogSigmoid, |x| -((-x).exp().ln_1p())),
        (UnOp::Softplus, |x| x.exp().ln_1p()),
        (UnOp::Silu, |x| x / (1.0 + (-x).exp())),
        (UnOp::Tanh, f64::tanh),
        (UnOp::Sqrt, |x| x.abs().sqrt()),
        (UnOp::Log, |x| x.abs().ln()),
        (UnOp::Sin, f64::sin),
        (UnOp::Cos, f64::cos),
        (UnOp::Round, |x| (x as f32).round_ties_even() as f64),
    ];
    for (op, f) in cases {
        let (rows, cols) = (3u32, 50u32);
        let mut x = rng.vec((rows * cols) as usize, 8.0);
        if matches!(op, UnOp::Sqrt | UnOp::Log) {
            x.iter_mut().for_each(|v| *v = v.abs() + 1e-3);
        }
        let mut y = vec![f32::NAN; x.len()];
        run(unary_kernel(op, rows, cols), &mut [Arg::F32(&x), Arg::F32Mut(&mut y)], &[1]).expect("runs");
        let want: Vec<f64> = x.iter().map(|v| f(f64::from(*v))).collect();
        close(&y, &want, 2e-6, &format!("{op:?}"));
    }
    // Saturated inputs stay finite and exact where f64 says so.
    let x = vec![-100.0f32, -30.0, 30.0, 100.0];
    for op in [UnOp::LogSigmoid, UnOp::Softplus, UnOp::Sigmoid] {
        let mut y = vec![f32::NAN; 4];
        run(unary_kernel(op, 1, 4), &mut [Arg::F32(&x), Arg::F32Mut(&mut y)], &[1]).expect("runs");
        assert!(y.iter().all(|v| v.is_finite()), "{op:?}: {y:?}");
    }
}

#[test]
fn broadcast_transpose_reduce_scan_dot_and_tri_inv_match_f64() {
    let (m, k, n) = (5u32, 7u32, 3u32);
    let mut rng = Rng(7);
    let a = rng.vec((m * k) as usize, 1.0);
    let bm = rng.vec((k * n) as usize, 1.0);
    let mut b = Builder::new("mix", &["one"]);
    let pa = b.ptr("a", DType::F32, false);
    let pb = b.ptr("b", DType::F32, false);
    let out = b.ptr("out", DType::F32, true);
    let oa = grid_offsets(&mut b, m, k, 0);
    let ob = grid_offsets(&mut b, k, n, 0);
    let ta = b.load(pa, oa, None, 0.0);
    let tb = b.load(pb, ob, None, 0.0);
    // dot, then transpose of the product, then row sums of the transpose, then a reverse cumsum.
    let d = b.dot(ta, tb); // [m, n]
    let od = grid_offsets(&mut b, m, n, 0);
    b.store(out, od, d, None);
    let t = b.transpose(d); // [n, m]
    let ot = grid_offsets(&mut b, n, m, i64::from(m * n));
    b.store(out, ot, t, None);
    let s = b.sum(d, 0); // [n]
    let sn = b.iota(n);
    let base = b.i64(i64::from(2 * m * n));
    let os = b.add(sn, base);
    b.store(out, os, s, None);
    let c = b.cumsum(d, 0, true); // reverse cumsum down the rows, [m, n]
    let oc = grid_offsets(&mut b, m, n, i64::from(2 * m * n + n));
    b.store(out, oc, c, None);
    // A broadcast row added to every row.
    let row = b.reshape(s, &[1, n]);
    let br = b.add(d, row);
    let ob2 = grid_offsets(&mut b, m, n, i64::from(3 * m * n + n));
    b.store(out, ob2, br, None);
    let p = b.finish();
    let total = (4 * m * n + n) as usize;
    let mut o = vec![f32::NAN; total];
    run(p, &mut [Arg::F32(&a), Arg::F32(&bm), Arg::F32Mut(&mut o)], &[1]).expect("runs");

    let (m, k, n) = (m as usize, k as usize, n as usize);
    let mut want = vec![0.0f64; total];
    let dot = |i: usize, j: usize| (0..k).map(|l| f64::from(a[i * k + l]) * f64::from(bm[l * n + j])).sum::<f64>();
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = dot(i, j);
            want[m * n + j * m + i] = dot(i, j);
            want[2 * m * n + j] += dot(i, j);
            want[2 * m * n + n + i * n + j] = (i..m).map(|r| dot(r, j)).sum();
        }
    }
    for i in 0..m {
        for j in 0..n {
            want[3 * m * n + n + i * n + j] = dot(i, j) + want[2 * m * n + j];
        }
    }
    close(&o, &want, 1e-5, "mix");
}

#[test]
fn tri_inv_inverts_unit_lower_triangular_matrices() {
    for size in [1u32, 3, 16, 33] {
        let mut rng = Rng(u64::from(size));
        let l = rng.vec((size * size) as usize, 0.5);
        let mut b = Builder::new("tri", &["one"]);
        let pl = b.ptr("l", DType::F32, false);
        let out = b.ptr("t", DType::F32, true);
        let off = grid_offsets(&mut b, size, size, 0);
        let lt = b.load(pl, off, None, 0.0);
        let t = b.tri_inv(lt);
        b.store(out, off, t, None);
        let mut t = vec![f32::NAN; l.len()];
        run(b.finish(), &mut [Arg::F32(&l), Arg::F32Mut(&mut t)], &[1]).expect("runs");
        // (I + strictly_lower(L)) · T must be the identity.
        let s = size as usize;
        for i in 0..s {
            for j in 0..s {
                let mut acc = 0.0f64;
                for q in 0..s {
                    let lhs = if i == q {
                        1.0
                    } else if q < i {
                        f64::from(l[i * s + q])
                    } else {
                        0.0
                    };
                    acc += lhs * f64::from(t[q * s + j]);
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((acc - want).abs() < 1e-4, "size {size}: ({i},{j}) = {acc}");
            }
        }
    }
}

#[test]
fn loops_carry_tiles_and_scalars_and_masks_guard_the_tail() {
    // A running sum over chunks of 4 of a length-T vector, carried as a tile, plus a carried scalar
    // counting the chunks; masked loads read zero past T.
    for len in [1i64, 3, 4, 13] {
        let mut rng = Rng(len as u64);
        let x = rng.vec(len as usize, 1.0);
        let mut b = Builder::new("chunks", &["one"]);
        let px = b.ptr("x", DType::F32, false);
        let out = b.ptr("out", DType::F32, true);
        let t = b.int_param("T");
        let zero_i = b.i64(0);
        let four = b.i64(4);
        let init = b.f32(0.0);
        let init_tile = b.broadcast(init, &[4]);
        let count0 = b.i64(0);
        let res = b.for_loop(zero_i, t, four, &[init_tile, count0], |b, i, carried| {
            let lanes = b.iota(4);
            let idx = b.add(lanes, i);
            let inside = b.cmp(CmpOp::Lt, idx, t);
            let v = b.load(px, idx, Some(inside), 0.0);
            let acc = b.add(carried[0], v);
            let one = b.i64(1);
            let count = b.binary(BinOp::Add, carried[1], one);
            vec![acc, count]
        });
        let lanes = b.iota(4);
        b.store(out, lanes, res[0], None);
        let count = b.cast(res[1], DType::F32);
        let at = b.i64(4);
        let at = b.reshape(at, &[1]);
        b.store(out, at, count, None);
        let mut o = vec![f32::NAN; 5];
        run(b.finish(), &mut [Arg::F32(&x), Arg::F32Mut(&mut o), Arg::Int(len)], &[1]).expect("runs");
        let mut want = vec![0.0f64; 5];
        for (i, v) in x.iter().enumerate() {
            want[i % 4] += f64::from(*v);
        }
        want[4] = (len as f64 / 4.0).ceil();
        close(&o, &want, 1e-6, &format!("len {len}"));
    }
}

#[test]
fn grid_instances_run_in_parallel_and_out_of_bounds_is_an_error() {
    // Each instance writes its own row: out[pid, j] = pid * 10 + j.
    let mut b = Builder::new("rows", &["rows"]);
    let out = b.ptr("out", DType::F32, true);
    let pid = b.program_id(0);
    let j = b.iota(8);
    let eight = b.i64(8);
    let base = b.mul(pid, eight);
    let off = b.add(j, base);
    let ten = b.i64(10);
    let v = b.mul(pid, ten);
    let v = b.add(v, j);
    let v = b.cast(v, DType::F32);
    b.store(out, off, v, None);
    let p = b.finish();
    let mut m = CpuModule::new().expect("jit");
    let id = m.add(p).expect("compiles");
    let mut o = vec![0.0f32; 37 * 8];
    m.launch(id, &mut [Arg::F32Mut(&mut o)], &[37]).expect("runs");
    for r in 0..37 {
        for j in 0..8 {
            assert_eq!(o[r * 8 + j], (r * 10 + j) as f32);
        }
    }
    // A buffer too small for the grid is caught, not written past.
    let mut small = vec![0.0f32; 8 * 3];
    let err = m.launch(id, &mut [Arg::F32Mut(&mut small)], &[4]).expect_err("out of bounds");
    assert!(err.to_string().contains("out of bounds") && err.to_string().contains("`out`"), "{err}");
    let err = m.launch(id, &mut [Arg::Int(3)], &[4]).expect_err("wrong kind");
    assert!(err.to_string().contains("wrong kind"), "{err}");
}

#[test]
fn the_verifier_rejects_ill_typed_programs() {
    let mut b = Builder::new("bad", &["one"]);
    let x = b.ptr("x", DType::F32, false);
    let i = b.iota(4);
    let v = b.load(x, i, None, 0.0);
    // Storing through a read-only pointer.
    b.store(x, i, v, None);
    let err = verify(&b.finish()).expect_err("read-only store");
    assert!(err.to_string().contains("not a writable pointer"), "{err}");

    let mut b = Builder::new("bad2", &["one"]);
    let a = b.iota(4);
    let c = b.iota(5);
    // Bypass the builder's broadcasting to create a shape mismatch.
    let t = hlac_runtime::kir::Ty::tile(DType::I64, &[4]);
    b.op(hlac_runtime::kir::Op::Binary(BinOp::Add, a, c), t);
    let err = verify(&b.finish()).expect_err("shape mismatch");
    assert!(err.to_string().contains("binary operand types"), "{err}");
}

#[test]
fn exp_is_accurate_over_the_whole_range() {
    // Across the range, into the subnormal results, past overflow, and the special values; with
    // 16 lanes plus a tail of 3, both the vector and the scalar code run.
    let mut x: Vec<f32> = vec![-200.0, -104.0, -103.5, -100.0, -90.0, -88.0, -87.5, -1e-8, 0.0, 1e-8, 0.5, 88.5, 88.72, 89.0, 100.0];
    x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.346_573_6]);
    let mut rng = Rng(11);
    x.extend(rng.vec(1000, 87.0));
    let n = x.len() as u32;
    let mut y = vec![0.0f32; x.len()];
    run(unary_kernel(UnOp::Exp, 1, n), &mut [Arg::F32(&x), Arg::F32Mut(&mut y)], &[1]).expect("runs");
    for (a, got) in x.iter().zip(&y) {
        let want = f64::from(*a).exp();
        if a.is_nan() {
            assert!(got.is_nan(), "exp(NaN) = {got}");
            continue;
        }
        let want32 = want as f32;
        if want32.is_infinite() || want32 == 0.0 {
            assert_eq!(*got, want32, "exp({a})");
            continue;
        }
        // Within 2 ulp of the exact value (in absolute terms near the subnormal range).
        let ulp = f64::from(f32::from_bits(want32.abs().to_bits() + 1)) - f64::from(want32.abs());
        let err = (f64::from(*got) - want).abs();
        assert!(err <= 2.0 * ulp, "exp({a}): got {got}, want {want} ({:.2} ulp)", err / ulp);
    }
}

#[test]
fn vector_paths_with_tails_match_f64() {
    // Dot products whose widths leave partial vector groups and scalar columns, an odd row count,
    // row sums over a whole-vector axis, a forward cumsum over columns with a tail, and a select
    // on a computed mask, all against f64.
    let (m, k, n1, n2) = (5u32, 7u32, 22u32, 24u32);
    let mut rng = Rng(13);
    let a = rng.vec((m * k) as usize, 1.0);
    let b1 = rng.vec((k * n1) as usize, 1.0);
    let b2 = rng.vec((k * n2) as usize, 1.0);
    let mut b = Builder::new("lanes", &["one"]);
    let pa = b.ptr("a", DType::F32, false);
    let pb1 = b.ptr("b1", DType::F32, false);
    let pb2 = b.ptr("b2", DType::F32, false);
    let out = b.ptr("out", DType::F32, true);
    let oa = grid_offsets(&mut b, m, k, 0);
    let ta = b.load(pa, oa, None, 0.0);
    let o1 = grid_offsets(&mut b, k, n1, 0);
    let t1 = b.load(pb1, o1, None, 0.0);
    let o2 = grid_offsets(&mut b, k, n2, 0);
    let t2 = b.load(pb2, o2, None, 0.0);
    let d1 = b.dot(ta, t1); // [m, n1]
    let d2 = b.dot(ta, t2); // [m, n2]
    let mut at = 0i64;
    let od1 = grid_offsets(&mut b, m, n1, at);
    b.store(out, od1, d1, None);
    at += i64::from(m * n1);
    let od2 = grid_offsets(&mut b, m, n2, at);
    b.store(out, od2, d2, None);
    at += i64::from(m * n2);
    let rs = b.sum(d2, 1); // [m]
    let ri = b.iota(m);
    let rb = b.i64(at);
    let ors = b.add(ri, rb);
    b.store(out, ors, rs, None);
    at += i64::from(m);
    let cs = b.cumsum(d1, 0, false); // [m, n1]
    let ocs = grid_offsets(&mut b, m, n1, at);
    b.store(out, ocs, cs, None);
    at += i64::from(m * n1);
    let zero = b.f32(0.0);
    let zt = b.broadcast(zero, &[m, n1]);
    let pos = b.cmp(CmpOp::Gt, d1, zt);
    let e = b.exp(d1);
    let sel = b.select(pos, e, d1);
    let osel = grid_offsets(&mut b, m, n1, at);
    b.store(out, osel, sel, None);
    at += i64::from(m * n1);
    let p = b.finish();
    let mut o = vec![f32::NAN; at as usize];
    run(p, &mut [Arg::F32(&a), Arg::F32(&b1), Arg::F32(&b2), Arg::F32Mut(&mut o)], &[1]).expect("runs");
    let (m, k, n1, n2) = (m as usize, k as usize, n1 as usize, n2 as usize);
    let dot = |bm: &[f32], n: usize, i: usize, j: usize| (0..k).map(|l| f64::from(a[i * k + l]) * f64::from(bm[l * n + j])).sum::<f64>();
    let mut want = Vec::new();
    want.extend((0..m * n1).map(|x| dot(&b1, n1, x / n1, x % n1)));
    want.extend((0..m * n2).map(|x| dot(&b2, n2, x / n2, x % n2)));
    want.extend((0..m).map(|i| (0..n2).map(|j| dot(&b2, n2, i, j)).sum::<f64>()));
    want.extend((0..m * n1).map(|x| (0..=x / n1).map(|r| dot(&b1, n1, r, x % n1)).sum::<f64>()));
    want.extend((0..m * n1).map(|x| {
        let d = dot(&b1, n1, x / n1, x % n1);
        if d > 0.0 {
            d.exp()
        } else {
            d
        }
    }));
    close(&o, &want, 1e-5, "lanes");
}

#[test]
fn tables_hold_their_values() {
    let values = [0.5, -1.25, 3.0e-7, 1.0e6, 0.0];
    let mut b = Builder::new("table", &["one"]);
    let out = b.ptr("out", DType::F32, true);
    let t = b.table(&values);
    let i = b.iota(values.len() as u32);
    b.store(out, i, t, None);
    let mut o = vec![f32::NAN; values.len()];
    run(b.finish(), &mut [Arg::F32Mut(&mut o)], &[1]).expect("runs");
    let want: Vec<f32> = values.iter().map(|v| *v as f32).collect();
    assert_eq!(o, want);
}

#[test]
fn linear_scans_match_f64_and_the_reverse_is_the_adjoint() {
    // A [m, n] tile with n = 7 (one whole vector of columns and a tail): forward and reverse linear
    // scans down the rows, and a forward one along the columns, against the recurrences in f64;
    // and ⟨scan(x), y⟩ = ⟨x, scan_reverse(y)⟩ with the same multipliers (the backward's identity).
    let (m, n) = (9u32, 7u32);
    let len = (m * n) as usize;
    let mut rng = Rng(29);
    let x = rng.vec(len, 1.0);
    let y = rng.vec(len, 1.0);
    // Multipliers in (0.2, 1.2): some above 1, so an error in the order of products shows.
    let d: Vec<f32> = rng.vec(len, 0.5).iter().map(|v| v + 0.7).collect();
    let mut b = Builder::new("linear_scan", &["one"]);
    let px = b.ptr("x", DType::F32, false);
    let py = b.ptr("y", DType::F32, false);
    let pd = b.ptr("d", DType::F32, false);
    let out = b.ptr("out", DType::F32, true);
    let off = grid_offsets(&mut b, m, n, 0);
    let tx = b.load(px, off, None, 0.0);
    let ty = b.load(py, off, None, 0.0);
    let td = b.load(pd, off, None, 0.0);
    let results = [b.linear_scan(tx, td, 0, false), b.linear_scan(ty, td, 0, true), b.linear_scan(tx, td, 1, false)];
    for (i, v) in results.into_iter().enumerate() {
        let base = b.i64(i as i64 * len as i64);
        let o = b.add(off, base);
        b.store(out, o, v, None);
    }
    let mut o = vec![f32::NAN; 3 * len];
    run(b.finish(), &mut [Arg::F32(&x), Arg::F32(&y), Arg::F32(&d), Arg::F32Mut(&mut o)], &[1]).expect("runs");
    let (m, n) = (m as usize, n as usize);
    let at = |v: &[f32], i: usize, j: usize| f64::from(v[i * n + j]);
    let mut fwd = vec![0.0f64; len];
    let mut rev = vec![0.0f64; len];
    let mut along = vec![0.0f64; len];
    for j in 0..n {
        fwd[j] = at(&x, 0, j);
        for i in 1..m {
            fwd[i * n + j] = at(&d, i, j) * fwd[(i - 1) * n + j] + at(&x, i, j);
        }
        rev[(m - 1) * n + j] = at(&y, m - 1, j);
        for i in (0..m - 1).rev() {
            rev[i * n + j] = at(&d, i + 1, j) * rev[(i + 1) * n + j] + at(&y, i, j);
        }
    }
    for i in 0..m {
        along[i * n] = at(&x, i, 0);
        for j in 1..n {
            along[i * n + j] = at(&d, i, j) * along[i * n + j - 1] + at(&x, i, j);
        }
    }
    let want: Vec<f64> = fwd.iter().chain(&rev).chain(&along).copied().collect();
    close(&o, &want, 1e-5, "linear scans");
    let dot = |a: &[f64], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * f64::from(*q)).sum::<f64>();
    let lhs = dot(&fwd, &y);
    let got_rev: Vec<f64> = o[len..2 * len].iter().map(|v| f64::from(*v)).collect();
    let rhs = dot(&got_rev, &x);
    assert!((lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0), "adjoint: {lhs} vs {rhs}");
}
