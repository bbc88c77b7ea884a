//! Every kernel the compiler emits for the GPU — each prelude mixer's forward, decode and backward,
//! attention's forward and decode, the conv and norm pieces — compiles to PTX for sm_80 and sm_90,
//! and, where `ptxas` is available (`HLAC_PTXAS`, or `ptxas` on PATH; `.ci/run` installs it),
//! assembles without error. Registers and spills per kernel are printed.

use std::path::PathBuf;
use std::process::Command;

use hlac::lower::ModelKernel;

fn ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HLAC_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let found = Command::new("ptxas").arg("--version").output().ok()?;
    found.status.success().then(|| PathBuf::from("ptxas"))
}

fn kernels(spec: &str) -> Vec<ModelKernel> {
    let c = hlac::compile_str("<ptx>", spec, &hlac_tests::root());
    assert!(!c.failed(), "{}", c.render(false));
    hlac::lower::model_kernels(&c.model.expect("model")).expect("lowers")
}

#[test]
fn every_kernel_assembles_for_sm80_and_sm90() {
    let mut all = Vec::new();
    for (mixer, config) in [
        ("GLA", "num_heads = 2"),
        ("HGRN", "expand_ratio = 1"),
        ("HGRN2", "expand_ratio = 16"),
        ("RetNet", "num_heads = 4"),
        ("DeltaNet", "num_heads = 4"),
        ("GDN", "num_heads = 2\n    head_dim = 16"),
    ] {
        let spec = format!(
            "model m {{\n  hidden_size = 64\n  pattern = {mixer}, Attn\n  mixer {mixer} {{\n    {config}\n  }}\n  mixer Attn {{\n    num_heads = 4\n  }}\n}}\ntarget {{\n  device = sm_90\n  dtype = bf16\n  mode = training\n}}\n"
        );
        all.extend(kernels(&spec));
    }
    let ptxas = ptxas();
    if ptxas.is_none() {
        println!("ptxas not found (set HLAC_PTXAS): checking PTX generation only");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut report = Vec::new();
    for k in &all {
        for device in ["sm_80", "sm_90"] {
            let compiled = hlac::nvptx::compile(&k.kernel.program, device).unwrap_or_else(|e| panic!("{}: {e}", k.name));
            assert!(compiled.ptx.contains(&format!(".entry {}", compiled.entry)), "{}: no entry point", k.name);
            let Some(ptxas) = &ptxas else { continue };
            let file = dir.path().join(format!("{}_{device}.ptx", compiled.entry));
            std::fs::write(&file, &compiled.ptx).expect("write");
            let out =
                Command::new(ptxas).args([&format!("-arch={device}"), "-v", "-o", "/dev/null"]).arg(&file).output().expect("ptxas runs");
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "ptxas rejected {} for {device}:\n{text}", k.name);
            let regs = text.lines().find(|l| l.contains("registers")).map(str::trim).unwrap_or("").to_string();
            report.push(format!("{:<28} {device}  {regs}", k.name));
        }
    }
    for line in report {
        println!("{line}");
    }
}
