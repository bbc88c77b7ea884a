//! The workspace packings of `kir::layout` on every kernel the compiler emits for the all-mixers
//! specs and the benchmark shapes: each packing's layout passes `layout::check` (no two tiles live
//! at the same time share a byte; reshapes and carried values keep their group's storage), and
//! largest-first packing (`HLAC_PACK=largest`, an A/B option for the GPU) packs GDN's forward at
//! the benchmark shape tighter than packing in order of definition (197 KB instead of 247 with
//! the NVPTX back end's fusion: then it fits one block's shared memory).

use std::collections::HashSet;
use std::path::Path;

use hlac_runtime::kir::layout::{self, Packing};

fn kernels(rel: &str) -> Vec<hlac::lower::ModelKernel> {
    let c = hlac_tests::compile_rel(Path::new(rel));
    assert!(!c.failed(), "{}", c.render(false));
    hlac::lower::model_kernels(&c.model.expect("model")).expect("lowers")
}

#[test]
fn every_packing_keeps_live_tiles_apart() {
    let mut checked = 0;
    for spec in ["examples/all-mixers-f32.hla", "examples/all-mixers-bf16.hla", "examples/pieces.hla", "examples/bench/gdn.hla"] {
        for k in kernels(spec) {
            let p = &k.kernel.program;
            for packing in [Packing::Definition, Packing::LargestFirst] {
                let l = layout::plan_packed(p, &layout::Storage::default(), packing);
                if let Err(e) = layout::check(p, &layout::Storage::default(), &l) {
                    panic!("{spec}: kernel {} packed {packing:?}: {e}", p.name);
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} layouts checked");
}

#[test]
fn largest_first_packs_gdn_forward_into_shared_memory() {
    let ks = kernels("examples/bench/gdn.hla");
    let Some(fwd) = ks.iter().find(|k| k.role == "chunk_fwd") else { panic!("no chunk_fwd kernel") };
    let p = &fwd.kernel.program;
    let by_definition = layout::plan_packed(p, &layout::Storage::default(), Packing::Definition).bytes;
    let largest_first = layout::plan_packed(p, &layout::Storage::default(), Packing::LargestFirst).bytes;
    assert!(largest_first < by_definition, "largest first {largest_first} bytes, by definition {by_definition}");
}

/// A loop's yielded tile takes its carried tile's storage exactly when the carried tile is dead by
/// the time it is written: read only before (or by an elementwise operation at the element it
/// writes), never afterwards, and never by the writing operation at other elements (through a
/// fused transpose, or a product) — with every elementwise step stored, and with them fused as the
/// NVPTX back end computes them.
#[test]
fn yields_in_place_only_over_dead_carried_tiles() {
    use hlac_runtime::kir::{Builder, DType, Value};
    type Ptr = hlac_runtime::kir::build::Ptr;
    type Body = fn(&mut Builder, Value, Ptr) -> Value;
    /// Stores a [16, 16] tile whole (a use the loop cannot drop).
    fn store_tile(b: &mut Builder, ptr: Ptr, v: Value) {
        let iota = b.iota(256);
        let off = b.reshape(iota, &[16, 16]);
        b.store(ptr, off, v, None);
    }
    // (name, body, in place when stored, in place when fused)
    let cases: [(&str, Body, bool, bool); 5] = [
        (
            "elementwise at its own element",
            |b, x, _| {
                let two = b.f32(2.0);
                b.mul(x, two)
            },
            true,
            true,
        ),
        (
            "read once before",
            |b, x, _| {
                let e = b.exp(x);
                let one = b.f32(1.0);
                b.add(e, one)
            },
            true,
            true,
        ),
        (
            "read again after",
            |b, x, ptr| {
                let two = b.f32(2.0);
                let y = b.mul(x, two);
                let one = b.f32(1.0);
                let w = b.add(x, one);
                store_tile(b, ptr, w);
                y
            },
            false,
            false,
        ),
        (
            "transposed",
            |b, x, _| {
                let t = b.transpose(x);
                let one = b.f32(1.0);
                b.add(t, one)
            },
            true,
            false,
        ),
        ("a product reading it", |b, x, _| b.dot(x, x), false, false),
    ];
    for (name, body, stored, fused_too) in cases {
        let mut b = Builder::new("t", &["x"]);
        let ptr = b.ptr("x", DType::F32, true);
        let (lo, hi, step) = (b.i64(0), b.i64(4), b.i64(1));
        let half = b.f32(0.5);
        let init = b.broadcast(half, &[16, 16]);
        let mut seen = (Value(0), Value(0));
        let out = b.for_loop(lo, hi, step, &[init], |b, _, args| {
            let y = body(b, args[0], ptr);
            seen = (args[0], y);
            vec![y]
        });
        store_tile(&mut b, ptr, out[0]);
        let p = b.finish();
        let (arg, y) = seen;
        // The elementwise steps and transposes inside the body, as the NVPTX back end fuses them.
        let mut fusable = HashSet::new();
        for inst in &p.body.insts {
            if let hlac_runtime::kir::Op::For { body, .. } = &inst.op {
                for i in &body.insts {
                    let elementwise = matches!(
                        i.op,
                        hlac_runtime::kir::Op::Unary(..) | hlac_runtime::kir::Op::Binary(..) | hlac_runtime::kir::Op::Transpose(_)
                    );
                    if let [r] = i.results[..] {
                        if elementwise && r != y && !p.ty(r).is_scalar() {
                            fusable.insert(r);
                        }
                    }
                }
            }
        }
        for (fused, expect) in [(HashSet::new(), stored), (fusable, fused_too)] {
            let l = layout::plan_fused(&p, &layout::Storage::fused(fused.clone()));
            layout::check(&p, &layout::Storage::fused(fused.clone()), &l).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(l.offset(y) == l.offset(arg), expect, "{name} (fused: {})", !fused.is_empty());
        }
    }
}

/// A loop's carried tile takes its initial value's storage exactly when nothing reads that value
/// once the loop has started (the loop's own start is its last read): then a nest of loops
/// accumulating into one tile, as attention's `bwd_dkv` does over a group's heads and their query
/// blocks, holds it once instead of once a level; a value read again after the loop, or inside
/// it, keeps storage of its own.
#[test]
fn initial_values_give_their_storage_only_when_dead() {
    use hlac_runtime::kir::{Builder, DType, Value};
    type Ptr = hlac_runtime::kir::build::Ptr;
    fn store_tile(b: &mut Builder, ptr: Ptr, v: Value) {
        let iota = b.iota(256);
        let off = b.reshape(iota, &[16, 16]);
        b.store(ptr, off, v, None);
    }
    // (name, read the initial value after the loop, read it inside, in place)
    for (name, after, inside, in_place) in
        [("dead at the start", false, false, true), ("read after", true, false, false), ("read inside", false, true, false)]
    {
        let mut b = Builder::new("t", &["x"]);
        let ptr = b.ptr("x", DType::F32, true);
        let (lo, hi, step) = (b.i64(0), b.i64(4), b.i64(1));
        let half = b.f32(0.5);
        let filled = b.broadcast(half, &[16, 16]);
        // Stored by every back end (a transcendental function is never a broadcast's splat).
        let init = b.exp(filled);
        let mut args = (Value(0), Value(0));
        let out = b.for_loop(lo, hi, step, &[init], |b, _, outer| {
            b.for_loop(lo, hi, step, &[outer[0]], |b, _, inner| {
                args = (outer[0], inner[0]);
                let one = b.f32(1.0);
                let mut y = b.add(inner[0], one);
                if inside {
                    y = b.add(y, init);
                }
                vec![y]
            })
        });
        store_tile(&mut b, ptr, out[0]);
        if after {
            store_tile(&mut b, ptr, init);
        }
        let p = b.finish();
        let l = layout::plan(&p);
        layout::check(&p, &layout::Storage::default(), &l).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (outer, inner) = args;
        assert_eq!(l.group(init) == l.group(outer), in_place, "{name}: the outer loop's carried tile");
        // The outer carried tile is read only by the inner loop's start: always dead there.
        assert_eq!(l.group(outer), l.group(inner), "{name}: the inner loop's carried tile");
    }
}
