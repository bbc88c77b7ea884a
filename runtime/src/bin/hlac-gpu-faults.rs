//! `hlac-gpu-faults ARTIFACT_DIR`: provokes the failures a user of the GPU runtime can meet and
//! checks that each comes back as a [`GpuError`] that names the kernel (where there is one) and
//! the cause — never a panic, never a success:
//!
//! - a module the driver rejects (the first kernel's PTX replaced by text that is not PTX, its
//!   cubin dropped, so the driver has to assemble it);
//! - a kernel asking for more shared memory per block than the device has;
//! - an artifact built for a GPU this device is not (its target changed to `sm_100`);
//! - an allocation larger than the device's memory;
//! - launches with the wrong number of arguments and with a grid of the wrong rank;
//!
//! and that the context still works afterwards (a small allocation and copy back). The faulty
//! artifacts are copies made in memory (and one PTX file in a temporary directory); the artifact
//! on disk is not touched. Prints one line per case; exits 1 if any case misbehaves, 2 on bad
//! usage or an unreadable artifact, and 0 with "no CUDA driver found: skipping" where there is no
//! driver.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;

use hlac_runtime::gpu::{self, GpuError, GpuModule};
use hlac_runtime::Artifact;

/// What one case expects of the error it provokes.
struct Expect {
    /// The error's kind, as its variant name.
    kind: &'static str,
    /// Text the message must contain (the kernel's name, the cause).
    contains: Vec<String>,
}

fn kind(e: &GpuError) -> &'static str {
    match e {
        GpuError::NoDriver(_) => "NoDriver",
        GpuError::Driver { .. } => "Driver",
        GpuError::Device { .. } => "Device",
        GpuError::Ptx { .. } => "Ptx",
        GpuError::ModuleLoad { .. } => "ModuleLoad",
        GpuError::Memory { .. } => "Memory",
        GpuError::Arguments { .. } => "Arguments",
        GpuError::Launch { .. } => "Launch",
        GpuError::OutOfBounds { .. } => "OutOfBounds",
    }
}

/// Runs one case: `f` must return an error of the expected kind whose message holds the expected
/// text. Returns whether it did, after printing the verdict.
fn case<T>(name: &str, expect: Expect, f: impl FnOnce() -> Result<T, GpuError>) -> bool {
    let verdict = match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => Err("panicked".to_string()),
        Ok(Ok(_)) => Err("succeeded".to_string()),
        Ok(Err(e)) => {
            let text = e.to_string();
            let missing: Vec<&String> = expect.contains.iter().filter(|c| !text.contains(c.as_str())).collect();
            if kind(&e) != expect.kind {
                Err(format!("a {} error, not {}: {text}", kind(&e), expect.kind))
            } else if !missing.is_empty() {
                Err(format!("the message lacks {missing:?}: {text}"))
            } else {
                Ok(text)
            }
        }
    };
    match verdict {
        Ok(text) => {
            println!("ok    {name}: {text}");
            true
        }
        Err(why) => {
            println!("FAIL  {name}: {why}");
            false
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: hlac-gpu-faults ARTIFACT_DIR");
        return ExitCode::from(2);
    };
    if !gpu::driver_present() {
        println!("no CUDA driver found: skipping");
        return ExitCode::SUCCESS;
    }
    let artifact = match Artifact::open(&PathBuf::from(dir)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(first) = artifact.manifest.kernels.first().map(|k| k.name.clone()) else {
        eprintln!("error: the artifact has no kernels");
        return ExitCode::from(2);
    };
    let mut all = true;

    // A module the driver rejects: kernel 0's PTX is not PTX, and there is no cubin to fall back on.
    let scratch = std::env::temp_dir().join(format!("hlac-gpu-faults-{}", std::process::id()));
    let bad = (|| -> std::io::Result<Artifact> {
        std::fs::create_dir_all(scratch.join("kernels"))?;
        std::fs::write(scratch.join("kernels/bad.ptx"), ".version 8.0\n.target sm_90\nthis is not PTX\n")?;
        let mut a = Artifact { dir: scratch.clone(), manifest: artifact.manifest.clone(), programs: artifact.programs.clone() };
        a.manifest.kernels[0].ptx = Some("kernels/bad.ptx".into());
        a.manifest.kernels[0].cubin = None;
        Ok(a)
    })();
    match bad {
        Ok(a) => {
            all &=
                case("a module the driver rejects", Expect { kind: "ModuleLoad", contains: vec![first.clone(), "bad.ptx".into()] }, || {
                    GpuModule::load(&a)
                })
        }
        Err(e) => {
            println!("FAIL  a module the driver rejects: could not write the faulty PTX: {e}");
            all = false;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // More shared memory per block than any device has.
    let mut a = Artifact { dir: artifact.dir.clone(), manifest: artifact.manifest.clone(), programs: artifact.programs.clone() };
    a.manifest.kernels[0].shared_bytes = Some(1 << 30);
    all &= case(
        "more shared memory than the device has",
        Expect { kind: "Ptx", contains: vec![first.clone(), "shared memory".into()] },
        || GpuModule::load(&a),
    );

    // An artifact for another GPU.
    let mut a = Artifact { dir: artifact.dir.clone(), manifest: artifact.manifest.clone(), programs: artifact.programs.clone() };
    a.manifest.target.device = "sm_100".into();
    all &= case("an artifact for another GPU", Expect { kind: "Device", contains: vec!["sm_100".into()] }, || GpuModule::load(&a));

    // The artifact as built, for the remaining cases.
    let (module, ids) = match GpuModule::load(&artifact) {
        Ok(m) => m,
        Err(e) => {
            println!("FAIL  loading the artifact as built: {e}");
            return ExitCode::FAILURE;
        }
    };
    let too_many = module.device().total_memory / 4 * 2 + 1;
    all &= case("an allocation larger than the device", Expect { kind: "Memory", contains: vec![format!("{too_many}")] }, || {
        module.zeros_f32(too_many)
    });
    let rank = module.program(ids[0]).grid.len();
    all &= case("a launch without its arguments", Expect { kind: "Arguments", contains: vec![first.clone()] }, || {
        module.launch(ids[0], &mut [], &vec![1; rank])
    });
    all &= case("a grid of the wrong rank", Expect { kind: "Arguments", contains: vec![first.clone(), "axes".into()] }, || {
        module.launch(ids[0], &mut [], &vec![1; rank + 1])
    });

    // The context survives all of the above.
    let after = module.upload_f32(&[1.0, 2.0, 3.0]).and_then(|b| module.download_f32(&b));
    match after {
        Ok(v) if v == [1.0, 2.0, 3.0] => println!("ok    the context still works afterwards"),
        Ok(v) => {
            println!("FAIL  the context still works afterwards: read back {v:?}");
            all = false;
        }
        Err(e) => {
            println!("FAIL  the context still works afterwards: {e}");
            all = false;
        }
    }
    if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
