//! The GPU back end where it can be checked from here: on a machine with a CUDA driver, that the
//! driver reports devices through [`hlac_runtime::gpu`]; everywhere, that the runtime's dependency
//! tree stays free of LLVM (the GPU machines have no libLLVM, and the runtime must run there).

use hlac_runtime::gpu;

#[test]
fn driver_reports_devices() {
    if !gpu::driver_present() {
        println!("skipped: no CUDA driver found");
        return;
    }
    let devices = match gpu::devices() {
        Ok(d) => d,
        Err(e) => panic!("the CUDA driver is installed but failed: {e}"),
    };
    assert!(!devices.is_empty(), "the CUDA driver is installed but reports no devices");
    for d in &devices {
        println!(
            "device {}: {} (compute capability {}.{}, {} MiB)",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_memory >> 20
        );
        assert!(d.compute_capability.0 > 0, "device {} reports compute capability {:?}", d.ordinal, d.compute_capability);
    }
}

#[test]
fn targets_are_checked_against_the_device() {
    assert!(gpu::check_target("sm_80", "A100", (8, 0)).is_ok());
    assert!(gpu::check_target("sm_80", "H100", (9, 0)).is_ok());
    assert!(gpu::check_target("sm_90", "H100", (9, 0)).is_ok());
    let e = gpu::check_target("sm_90", "A100", (8, 0)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("sm_90") && e.contains("8.0") && e.contains("A100"), "{e}");
    let e = gpu::check_target("sm_80", "T4", (7, 5)).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("sm_80") && e.contains("7.5"), "{e}");
    assert!(gpu::check_target("cpu", "H100", (9, 0)).is_err());
}

#[test]
fn runtime_does_not_link_llvm() {
    // The workspace root: this crate's manifest directory's parent.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "-p", "hlac-runtime", "-e", "normal", "--offline"])
        .current_dir(&root)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            println!("skipped: `cargo tree` failed: {}", String::from_utf8_lossy(&o.stderr));
            return;
        }
        Err(e) => {
            println!("skipped: cargo is not runnable: {e}");
            return;
        }
    };
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("hlac-runtime"), "unexpected `cargo tree` output:\n{tree}");
    for banned in ["inkwell", "llvm-sys"] {
        assert!(!tree.contains(banned), "hlac-runtime depends on {banned}:\n{tree}");
    }
}
