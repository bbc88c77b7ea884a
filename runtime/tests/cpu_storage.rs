//! bf16 and f16 storage on the CPU back end: loads through a bf16 or f16 pointer widen to f32
//! exactly, stores round to nearest, ties to even — bit for bit what the `half` crate's
//! conversions give, over every 16-bit pattern (loads) and over ties, subnormals, infinities,
//! overflow, NaNs and a million random f32 bit patterns (stores), on both the unchecked path and
//! the bounds-checked one an out-of-bounds tile falls back to. And the verifier's side of the
//! contract: bf16 and f16 exist only in memory, never as tiles.

use half::{bf16, f16};
use hlac_runtime::cpu::{Arg, CpuModule, LaunchError};
use hlac_runtime::kir::{verify, Builder, CmpOp, Const, DType, Op, Program, Ty};

/// Elements per program instance of [`copy_kernel`].
const BLOCK: u32 = 64;

/// `y[i] = x[i]` for i < n, BLOCK elements per instance (masked at the end): a load through `x`'s
/// element type and a store through `y`'s, with the f32 tile between.
fn copy_kernel(from: DType, to: DType) -> Program {
    let mut b = Builder::new("copy", &["blocks"]);
    let x = b.ptr("x", from, false);
    let y = b.ptr("y", to, true);
    let n = b.int_param("n");
    let pid = b.program_id(0);
    let block = b.i64(i64::from(BLOCK));
    let base = b.mul(pid, block);
    let iota = b.iota(BLOCK);
    let off = b.add(iota, base);
    let inside = b.cmp(CmpOp::Lt, off, n);
    let v = b.load(x, off, Some(inside), -7.0);
    b.store(y, off, v, Some(inside));
    b.finish()
}

fn module(p: Program) -> (CpuModule, hlac_runtime::cpu::KernelId) {
    verify(&p).unwrap_or_else(|e| panic!("{e}\n{p}"));
    let mut m = CpuModule::new().expect("jit");
    let id = m.add(p).expect("compiles");
    (m, id)
}

fn blocks(n: usize) -> u64 {
    (n as u64).div_ceil(u64::from(BLOCK))
}

/// f32 values whose rounding to 16 bits is delicate (the first 65536 of them hold every special
/// case and tie), then `random` random bit patterns.
fn hard_f32s(random: usize) -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0x0000_0000, // +0
        0x8000_0000, // −0
        0x7F80_0000, // +∞
        0xFF80_0000, // −∞
        0x7FC0_0000, // quiet NaN
        0xFFC0_0000, // negative quiet NaN
        0x7F80_0001, // signalling NaN whose payload is all in the dropped half
        0x7FA0_0000, // signalling NaN with a payload in the kept half
        0xFFFF_FFFF, // NaN, every bit set
        0x7F7F_FFFF, // f32::MAX: rounds up to bf16 ∞
        0x7F7F_7FFF, // just below the bf16 overflow threshold
        0x7F7F_8000, // the bf16 overflow threshold itself (a tie, kept half odd: rounds to ∞)
        0x0000_0001, // the smallest f32 subnormal
        0x0000_8000, // a subnormal tie, kept half even (0)
        0x0001_8000, // a subnormal tie, kept half odd
        0x007F_FFFF, // the largest f32 subnormal: rounds up to the smallest normal
        0x0080_0000, // the smallest normal
        0x3F80_0000, // 1
        0x3F80_8000, // 1 + half an ulp of bf16: a tie, kept half even → 1
        0x3F81_8000, // a tie with the kept half odd → rounds up
        0x3F80_8001, // just above a tie
        0x3F80_7FFF, // just below a tie
        0xBF81_8000, // a negative tie, kept half odd
        0x3F7F_FFFF, // just below 1: rounds up across the exponent boundary
        0x4780_0000, // 65536 (f16 overflows to ∞)
        0x477F_E000, // 65504, the largest f16
        0x477F_F000, // the f16 overflow threshold (a tie)
        0x3380_0000, // 2⁻²⁴, the smallest f16 subnormal
        0x3300_0000, // 2⁻²⁵, an f16 subnormal tie: rounds to 0
        0x3340_0000, // 1.5 · 2⁻²⁵: rounds up to the smallest f16 subnormal
        0x3880_0000, // 2⁻¹⁴, the smallest normal f16
        0x387F_C000, // just below it: an f16 subnormal
    ];
    // Ties and near-ties of bf16's dropped half under 4096 kept halves (all exponents, both signs).
    for k in 0..4096u32 {
        let kept = (k.wrapping_mul(0x9E37) & 0xFFFF) << 16;
        bits.extend([kept | 0x8000, kept | 0x7FFF, kept | 0x8001]);
    }
    let mut state = 0x1234_5678_9ABC_DEF0u64;
    for _ in 0..random {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        bits.push((state >> 32) as u32);
    }
    bits.into_iter().map(f32::from_bits).collect()
}

/// Stores `x` through a `to` pointer with the copy kernel and returns (index, 16-bit pattern
/// written) for every element checked. With `short`, each block of `x` is launched alone with an
/// output one element short, so the instance takes the bounds-checked path for its whole tile and
/// the launch reports the overrun; the elements inside the buffer must still be converted alike.
/// (Only the overrunning instance is sure to have run: the launcher stops at the first failure.)
fn store_bits(to: DType, x: &[f32], short: bool) -> Vec<(usize, u16)> {
    let (m, id) = module(copy_kernel(DType::F32, to));
    let run = |x: &[f32], len: usize| -> (Result<(), LaunchError>, Vec<u16>) {
        let n = Arg::Int(x.len() as i64);
        match to {
            DType::Bf16 => {
                let mut y = vec![bf16::from_bits(0xDEAD); len];
                let r = m.launch(id, &mut [Arg::F32(x), Arg::Bf16Mut(&mut y), n], &[blocks(x.len())]);
                (r, y.iter().map(|v| v.to_bits()).collect())
            }
            _ => {
                let mut y = vec![f16::from_bits(0xDEAD); len];
                let r = m.launch(id, &mut [Arg::F32(x), Arg::F16Mut(&mut y), n], &[blocks(x.len())]);
                (r, y.iter().map(|v| v.to_bits()).collect())
            }
        }
    };
    if !short {
        let (r, bits) = run(x, x.len());
        r.unwrap_or_else(|e| panic!("{e}"));
        return bits.into_iter().enumerate().collect();
    }
    let mut out = Vec::new();
    for (c, block) in x.chunks(BLOCK as usize).enumerate() {
        match run(block, block.len() - 1) {
            (Err(LaunchError::OutOfBounds { param, .. }), bits) if param == "y" => {
                out.extend(bits.into_iter().enumerate().map(|(i, b)| (c * BLOCK as usize + i, b)));
            }
            (r, _) => panic!("block {c}: expected an overrun of `y`, got {:?}", r.err().map(|e| e.to_string())),
        }
    }
    out
}

#[test]
fn bf16_stores_round_to_nearest_even_exactly_as_half_does() {
    let x = hard_f32s(1 << 20);
    for short in [false, true] {
        let x = if short { &x[..1 << 16] } else { &x[..] };
        for (i, g) in store_bits(DType::Bf16, x, short) {
            let want = bf16::from_f32(x[i]).to_bits();
            assert_eq!(g, want, "bf16 store of {:#010x} ({}), short {short}: got {g:#06x}, want {want:#06x}", x[i].to_bits(), x[i]);
        }
    }
    // Spot checks of the rule itself, independent of `half`.
    let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::MAX, f32::NAN, -0.0, 2f32.powi(-133)];
    let got: Vec<u16> = store_bits(DType::Bf16, &x, false).into_iter().map(|(_, b)| b).collect();
    assert_eq!(got[0], 0x3F80, "a tie rounds to the even neighbour (1)");
    assert_eq!(got[1], 0x3F82, "a tie with an odd kept half rounds up");
    assert_eq!(got[2], 0x7F80, "f32::MAX overflows bf16 to +∞");
    assert!(got[3] & 0x7F80 == 0x7F80 && got[3] & 0x7F != 0, "NaN stays NaN: {:#06x}", got[3]);
    assert_eq!(got[4], 0x8000, "−0 keeps its sign");
    assert_eq!(got[5], 0x0000, "2⁻¹³³ is below half the smallest bf16 subnormal (2⁻¹³³ is exactly half: a tie to 0)");
}

#[test]
fn f16_stores_round_to_nearest_even_exactly_as_half_does() {
    let x = hard_f32s(1 << 18);
    for short in [false, true] {
        let x = if short { &x[..1 << 16] } else { &x[..] };
        for (i, g) in store_bits(DType::F16, x, short) {
            let want = f16::from_f32(x[i]).to_bits();
            assert_eq!(g, want, "f16 store of {:#010x} ({}), short {short}: got {g:#06x}, want {want:#06x}", x[i].to_bits(), x[i]);
        }
    }
}

#[test]
fn loads_widen_every_bf16_and_f16_pattern_exactly() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    for from in [DType::Bf16, DType::F16] {
        let (m, id) = module(copy_kernel(from, DType::F32));
        let mut y = vec![0.0f32; all.len()];
        let n = Arg::Int(all.len() as i64);
        match from {
            DType::Bf16 => {
                let x: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
                m.launch(id, &mut [Arg::Bf16(&x), Arg::F32Mut(&mut y), n], &[blocks(all.len())]).expect("runs");
            }
            _ => {
                let x: Vec<f16> = all.iter().map(|&b| f16::from_bits(b)).collect();
                m.launch(id, &mut [Arg::F16(&x), Arg::F32Mut(&mut y), n], &[blocks(all.len())]).expect("runs");
            }
        }
        for (&b, got) in all.iter().zip(&y) {
            let want = if from == DType::Bf16 { bf16::from_bits(b).to_f32() } else { f16::from_bits(b).to_f32() };
            if want.is_nan() {
                assert!(got.is_nan(), "{} {b:#06x}: got {got}, want NaN", from.name());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{} {b:#06x}: got {got}, want {want}", from.name());
            }
        }
    }
}

#[test]
fn a_bf16_round_trip_keeps_every_number_and_masked_lanes_read_the_fallback() {
    // bf16 → f32 → bf16 is the identity on numbers (NaNs come back as NaNs).
    let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let (m, id) = module(copy_kernel(DType::Bf16, DType::Bf16));
    let mut y = vec![bf16::ZERO; all.len()];
    m.launch(id, &mut [Arg::Bf16(&all), Arg::Bf16Mut(&mut y), Arg::Int(all.len() as i64)], &[blocks(all.len())]).expect("runs");
    for (x, got) in all.iter().zip(&y) {
        if x.is_nan() {
            assert!(got.is_nan(), "{:#06x} came back as {:#06x}", x.to_bits(), got.to_bits());
        } else {
            assert_eq!(x.to_bits(), got.to_bits());
        }
    }

    // Masked-off lanes of a bf16 load read the fallback (−7), as an f32.
    let mut b = Builder::new("fallback", &["one"]);
    let x = b.ptr("x", DType::Bf16, false);
    let y = b.ptr("y", DType::F32, true);
    let iota = b.iota(8);
    let three = b.i64(3);
    let inside = b.cmp(CmpOp::Lt, iota, three);
    let v = b.load(x, iota, Some(inside), -7.0);
    b.store(y, iota, v, None);
    let (m, id) = module(b.finish());
    let x: Vec<bf16> = [1.5f32, -2.25, 1e30].iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out = vec![f32::NAN; 8];
    m.launch(id, &mut [Arg::Bf16(&x), Arg::F32Mut(&mut out)], &[1]).expect("runs");
    assert_eq!(&out[..2], &[1.5, -2.25]);
    assert_eq!(out[2], bf16::from_f32(1e30).to_f32());
    assert!(out[3..].iter().all(|&v| v == -7.0), "{out:?}");
}

#[test]
fn launch_arguments_must_have_the_parameters_element_type() {
    let (m, id) = module(copy_kernel(DType::F32, DType::Bf16));
    let x = vec![1.0f32; 4];
    let mut wrong = vec![0.0f32; 4];
    let err = m.launch(id, &mut [Arg::F32(&x), Arg::F32Mut(&mut wrong), Arg::Int(4)], &[1]).expect_err("an f32 buffer for bf16");
    assert!(err.to_string().contains("wrong kind") && err.to_string().contains("writable bf16 buffer"), "{err}");
    let y = vec![bf16::ZERO; 4];
    let err = m.launch(id, &mut [Arg::F32(&x), Arg::Bf16(&y), Arg::Int(4)], &[1]).expect_err("read-only for a written parameter");
    assert!(err.to_string().contains("wrong kind"), "{err}");
}

#[test]
fn the_verifier_keeps_bf16_and_f16_in_memory() {
    // A store of a non-f32 tile through a bf16 pointer.
    let mut b = Builder::new("store_i64", &["one"]);
    let y = b.ptr("y", DType::Bf16, true);
    let i = b.iota(4);
    b.store(y, i, i, None);
    let err = verify(&b.finish()).expect_err("i64 tile into bf16");
    assert!(err.to_string().contains("not a writable pointer that stores i64 tiles"), "{err}");

    // A load through an f16 pointer typed as anything but f32: as i64, and as an f16 tile.
    for dtype in [DType::I64, DType::F16] {
        let mut b = Builder::new("load_typed", &["one"]);
        let x = b.ptr("x", DType::F16, false);
        let i = b.iota(4);
        b.op(Op::Load { ptr: x.0, offsets: i, mask: None, other: 0.0 }, Ty::tile(dtype, &[4]));
        let err = verify(&b.finish()).expect_err("a load that is not f32");
        assert!(err.to_string().contains("not a pointer loading the result's type"), "{dtype:?}: {err}");
    }

    // No bf16 value anywhere: a cast to it, a bf16 constant.
    let mut b = Builder::new("cast", &["one"]);
    let one = b.f32(1.0);
    b.cast(one, DType::Bf16);
    let err = verify(&b.finish()).expect_err("a bf16 tile");
    assert!(err.to_string().contains("storage types only"), "{err}");
    let mut b = Builder::new("const", &["one"]);
    b.op(Op::Const(Const::Float(1.0)), Ty::scalar(DType::Bf16));
    assert!(verify(&b.finish()).is_err());

    // And the builder types a bf16 load as f32, which verifies.
    let p = copy_kernel(DType::Bf16, DType::F16);
    verify(&p).expect("a bf16 load and an f16 store of f32 tiles verify");
    assert!(p.to_string().contains("x: ptr<bf16>") && p.to_string().contains("f32[64] = load x"), "{p}");
}
