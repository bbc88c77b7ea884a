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
                let l = layout::plan_packed(p, &HashSet::new(), packing);
                if let Err(e) = layout::check(p, &HashSet::new(), &l) {
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
    let by_definition = layout::plan_packed(p, &HashSet::new(), Packing::Definition).bytes;
    let largest_first = layout::plan_packed(p, &HashSet::new(), Packing::LargestFirst).bytes;
    assert!(largest_first < by_definition, "largest first {largest_first} bytes, by definition {by_definition}");
}
