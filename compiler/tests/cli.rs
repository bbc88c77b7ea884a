//! The `hlac` command end to end: exit codes, what it writes and where, and that nothing is left
//! half-written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn hlac(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hlac")).args(args).current_dir(cwd).output().expect("hlac runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_accepts_good_specs_and_rejects_bad_ones_with_exit_1() {
    let ok = hlac(&["check", "specs/hgrn2-r3.hla"], &root());
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stderr(&ok).contains("ok: specs/hgrn2-r3.hla"));
    let bad = hlac(&["check", "--color", "never", "specs/errors/E0202-unknown-mixer.hla"], &root());
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("error[E0202]"), "{}", stderr(&bad));
    let missing = hlac(&["check", "no/such/spec.hla"], &root());
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("cannot read"), "{}", stderr(&missing));
}

#[test]
fn build_writes_an_artifact_the_runtime_accepts_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("art");
    let spec = root().join("specs/hgrn2-r3.hla");
    for _ in 0..2 {
        // Twice: the second build replaces the first.
        let o = hlac(&["build", spec.to_str().unwrap_or_default(), "-o", out.to_str().unwrap_or_default()], dir.path());
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let artifact = hlac_runtime::Artifact::open(&out).expect("the runtime opens what hlac built");
    assert_eq!(artifact.manifest.model.num_layers, 24);
    assert_eq!(artifact.manifest.target.device, "sm_90");
    assert!(artifact.manifest.tensors.iter().any(|t| t.name == "model.lower_bounds" && t.shape == [24, 1024]));
    // Its kernels (HGRN-2's chunked forward, decode and backward; attention's forward, decode and
    // backward; one RMSNorm over the hidden size, forward and backward, which serves HGRN-2's
    // output norm and the block norms alike, and the reduction of its weight gradients) load and
    // compile for the CPU, and each carries its PTX for the sm_90 target.
    let roles: Vec<&str> = artifact.manifest.kernels.iter().map(|k| k.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "chunk_fwd",
            "decode",
            "chunk_fwd_states",
            "chunk_bwd",
            "attn_fwd",
            "attn_decode",
            "attn_bwd_dq",
            "attn_bwd_dkv",
            "norm_fwd",
            "norm_bwd",
            "reduce_partials"
        ]
    );
    let norm = artifact.manifest.kernels.iter().find(|k| k.role == "norm_fwd").and_then(|k| k.piece.as_ref()).expect("a norm piece");
    // 24 layers × (attn_norm, g_norm of the 18 HGRN-2 layers, mlp_norm) + the final norm.
    assert_eq!((norm.width, norm.uses.len()), (1024, 24 * 2 + 18 + 1));
    for k in &artifact.manifest.kernels {
        let ptx = k.ptx.as_ref().expect("a GPU artifact has PTX");
        let text = std::fs::read_to_string(out.join(ptx)).expect("the PTX file exists");
        assert!(text.contains(".target sm_90"), "{}", k.name);
    }
    let (_, ids) = hlac_runtime::cpu::CpuModule::load(&artifact).expect("kernels compile");
    assert_eq!(ids.len(), 11);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("readable").filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("art")], "only the artifact remains");

    let failed = dir.path().join("failed");
    let o = hlac(
        &[
            "build",
            root().join("specs/errors/E0301-heads-do-not-divide.hla").to_str().unwrap_or_default(),
            "-o",
            failed.to_str().unwrap_or_default(),
        ],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(!failed.exists(), "a failed build writes nothing");
}

#[test]
fn inspect_json_is_machine_readable() {
    let o = hlac(&["inspect", "--json", "specs/gdn-r3-1.3b.hla"], &root());
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let params = v["params_total"].as_u64().expect("a count");
    assert!((1_200_000_000..1_500_000_000).contains(&params));
    assert_eq!(v["layers"].as_array().map(Vec::len), Some(24));
    assert!(v["kv_cache_bytes_per_token"].as_u64() > Some(0));
}

#[test]
fn fmt_check_reports_and_fmt_rewrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.hla");
    let messy = "model m{hidden_size=256 pattern=GLA x 2}\n";
    std::fs::write(&file, messy).expect("write");
    let o = hlac(&["fmt", "--check", "m.hla"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), messy, "--check changes nothing");
    let o = hlac(&["fmt", "m.hla"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let formatted = std::fs::read_to_string(&file).expect("read");
    assert_eq!(formatted, "model m {\n  hidden_size = 256\n  pattern = GLA x 2\n}\n");
    assert!(hlac(&["fmt", "--check", "m.hla"], dir.path()).status.success());
}

#[test]
fn import_and_export_config_through_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = root().join("tests/fixtures/fla/gdn-r3.json");
    let o = hlac(&["import", config.to_str().unwrap_or_default(), "-o", "gdn.hla", "--name", "gdn_small"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hlac(&["export-config", "gdn.hla", "-o", "config.json"], dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let a: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).expect("read")).expect("json");
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("read")).expect("json");
    assert_eq!(a, b);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").expect("write");
    let o = hlac(&["import", "bad.json"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
}

#[test]
fn help_shows_examples() {
    let o = hlac(&["--help"], &root());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Examples:") && text.contains("hlac build specs/hgrn2-r3.hla"), "{text}");
    let o = hlac(&["build", "--help"], &root());
    assert!(String::from_utf8_lossy(&o.stdout).contains("Example:"));
}

#[test]
fn build_can_retarget_to_the_cpu_and_bench_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("cpu");
    let o = hlac(&["build", "specs/gdn-r3-340m.hla", "--target", "cpu", "-o", out.to_str().unwrap_or_default()], &root());
    assert!(o.status.success(), "{}", stderr(&o));
    let artifact = hlac_runtime::Artifact::open(&out).expect("opens");
    assert_eq!((artifact.manifest.target.device.as_str(), artifact.manifest.target.dtype.as_str()), ("cpu", "f32"));
    assert!(artifact.manifest.kernels.iter().all(|k| k.ptx.is_none()), "no PTX for the CPU");
    assert!(artifact.manifest.tensors.iter().all(|t| t.dtype == "f32"));
    let o = hlac(&["bench", "specs/hgrn-r3-340m.hla", "--batch", "1", "--tokens", "8", "--repeats", "1", "--json"], &root());
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(rows[0]["kernel"], "HGRN_scan_fwd");
}
