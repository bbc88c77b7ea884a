//! The `hlac` command: check, build, inspect, format, and convert fla configs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use hlac::{compile, Compilation};

#[derive(Parser)]
#[command(
    name = "hlac",
    version,
    about = "A static compiler for hybrid linear-attention language models",
    after_help = "Examples:\n  hlac check specs/hgrn2-r3.hla\n  hlac build specs/hgrn2-r3.hla -o out/hgrn2-r3\n  hlac build specs/gdn-r3-340m.hla --target cpu\n  hlac inspect specs/gdn-r3-340m.hla --json\n  hlac fmt --check specs/*.hla\n  hlac import config.json -o my-model.hla\n  hlac export-config specs/gla-r3-340m.hla -o config.json"
)]
struct Cli {
    /// Colour diagnostics: auto (when stderr is a terminal), always or never.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetDevice {
    /// The host CPU (Cranelift).
    Cpu,
    /// NVIDIA Ampere.
    #[value(name = "sm_80")]
    Sm80,
    /// NVIDIA Hopper.
    #[value(name = "sm_90")]
    Sm90,
}

impl TargetDevice {
    fn device(self) -> hlac::ir::Device {
        match self {
            TargetDevice::Cpu => hlac::ir::Device::Cpu,
            TargetDevice::Sm80 => hlac::ir::Device::Sm80,
            TargetDevice::Sm90 => hlac::ir::Device::Sm90,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    /// The syntax tree of the root file, in canonical layout.
    Ast,
    /// The model IR.
    Ir,
    /// The artifact manifest (JSON).
    Manifest,
    /// The kernel-IR programs.
    Kir,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check specs; report every error with its location.
    #[command(after_help = "Example:\n  hlac check specs/*.hla")]
    Check {
        /// Spec files.
        #[arg(required = true)]
        specs: Vec<PathBuf>,
        /// Print a stage of the compilation to stdout.
        #[arg(long, value_enum)]
        emit: Option<Stage>,
    },
    /// Compile a spec into an artifact directory.
    #[command(after_help = "Example:\n  hlac build specs/hgrn2-r3.hla -o out/hgrn2-r3")]
    Build {
        /// The spec.
        spec: PathBuf,
        /// The artifact directory (default: out/<spec name>).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Compile for this device instead of the spec's target (cpu uses f32).
        #[arg(long, value_enum)]
        target: Option<TargetDevice>,
        /// Also print a stage of the compilation to stdout.
        #[arg(long, value_enum)]
        emit: Option<Stage>,
    },
    /// Print the layer table, parameter counts, state and cache sizes and FLOPs.
    #[command(after_help = "Example:\n  hlac inspect specs/gdn-r3-1.3b.hla --json")]
    Inspect {
        /// The spec.
        spec: PathBuf,
        /// JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite specs in canonical layout.
    #[command(after_help = "Examples:\n  hlac fmt specs/*.hla\n  hlac fmt --check specs/*.hla")]
    Fmt {
        /// Spec files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Change nothing; exit 1 if a file is not formatted.
        #[arg(long)]
        check: bool,
    },
    /// Time a spec's recurrence kernels on this machine's CPU (Cranelift back end; the spec's
    /// target is moved to the CPU).
    #[command(after_help = "Example:\n  hlac bench specs/gdn-r3-340m.hla --batch 2 --tokens 1024")]
    Bench {
        /// The spec.
        spec: PathBuf,
        /// Sequences per call.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Timed calls per kernel (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Convert an fla / Hugging Face config.json into a spec.
    #[command(after_help = "Example:\n  hlac import config.json --name gla_r3 -o gla-r3.hla")]
    Import {
        /// The config.json.
        config: PathBuf,
        /// Where to write the spec (default: stdout).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// The model's name (default: from the file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Write a spec's model as an fla config.json.
    #[command(name = "export-config", after_help = "Example:\n  hlac export-config specs/gla-r3-340m.hla -o config.json")]
    ExportConfig {
        /// The spec.
        spec: PathBuf,
        /// Where to write the config (default: stdout).
        #[arg(short, long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => std::io::stderr().is_terminal(),
    };
    match run(cli.command, color) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Reported) => ExitCode::from(1),
        Err(Failure::Message(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    /// Diagnostics were already printed.
    Reported,
    /// Print this and fail.
    Message(String),
}

/// Compiles a spec and prints its diagnostics; fails when any is an error.
fn checked(spec: &Path, color: bool) -> Result<Compilation, Failure> {
    let c = compile(spec);
    eprint!("{}", c.render(color));
    if c.failed() {
        return Err(Failure::Reported);
    }
    Ok(c)
}

fn model_of(c: &Compilation, spec: &Path) -> Result<(), Failure> {
    if c.model.is_none() {
        return Err(Failure::Message(format!("{} declares no model", spec.display())));
    }
    Ok(())
}

fn emit(c: &Compilation, spec: &Path, stage: Stage) -> Result<(), Failure> {
    match stage {
        Stage::Ast => {
            let text = std::fs::read_to_string(spec).map_err(|e| Failure::Message(format!("cannot read {}: {e}", spec.display())))?;
            let file = hlac_grammar::parse(hlac_grammar::FileId(0), &text).map_err(|_| Failure::Reported)?;
            print!("{}", hlac_grammar::fmt::format_file(&file, &text));
        }
        Stage::Ir => {
            if let Some(m) = &c.model {
                print!("{}", m.print());
            }
        }
        Stage::Manifest => {
            if let Some(m) = &c.model {
                let kernels = hlac::lower::model_kernels(m).map_err(|e| Failure::Message(e.to_string()))?;
                let json = serde_json::to_string_pretty(&hlac::artifact::manifest(m, &kernels, &[]))
                    .map_err(|e| Failure::Message(e.to_string()))?;
                println!("{json}");
            }
        }
        Stage::Kir => {
            if let Some(m) = &c.model {
                for k in hlac::lower::model_kernels(m).map_err(|e| Failure::Message(e.to_string()))? {
                    println!("{}", k.kernel.program);
                }
            }
        }
    }
    Ok(())
}

fn run(command: Command, color: bool) -> Result<(), Failure> {
    match command {
        Command::Check { specs, emit: stage } => {
            let mut failed = false;
            for spec in &specs {
                match checked(spec, color) {
                    Ok(c) => {
                        if let Some(m) = &c.model {
                            let r = hlac::inspect::report(m);
                            eprintln!(
                                "ok: {} ({}): {} layers, {} parameters",
                                spec.display(),
                                m.name,
                                m.config.num_hidden_layers,
                                hlac::inspect::grouped(r.params_total)
                            );
                        } else {
                            eprintln!("ok: {} (declarations only)", spec.display());
                        }
                        if let Some(stage) = stage {
                            emit(&c, spec, stage)?;
                        }
                    }
                    Err(_) => failed = true,
                }
            }
            if failed {
                Err(Failure::Reported)
            } else {
                Ok(())
            }
        }
        Command::Build { spec, out, target, emit: stage } => {
            let mut c = checked(&spec, color)?;
            model_of(&c, &spec)?;
            if let (Some(t), Some(m)) = (target, c.model.as_mut()) {
                m.retarget(t.device());
            }
            let Some(model) = &c.model else { return Err(Failure::Reported) };
            let out = out.unwrap_or_else(|| PathBuf::from("out").join(spec.file_stem().unwrap_or_default()));
            let kernels = hlac::lower::model_kernels(model).map_err(|e| Failure::Message(e.to_string()))?;
            let ptx = hlac::artifact::compile_gpu(model, &kernels).map_err(|e| Failure::Message(e.to_string()))?;
            hlac::artifact::write(model, &kernels, &ptx, &out)
                .map_err(|e| Failure::Message(format!("cannot write the artifact {}: {e}", out.display())))?;
            // Read the artifact back through the runtime: what we wrote must be what it accepts.
            let artifact = hlac_runtime::Artifact::open(&out).map_err(|e| Failure::Message(format!("this is a bug in hlac: {e}")))?;
            let r = hlac::inspect::report(model);
            eprintln!(
                "built {} -> {}: {} layers, {} tensors, {} kernels, {} parameters, target {} {}",
                model.name,
                out.display(),
                artifact.manifest.layers.len(),
                artifact.manifest.tensors.len(),
                artifact.manifest.kernels.len(),
                hlac::inspect::grouped(r.params_total),
                model.target.device.name(),
                model.target.dtype.name()
            );
            if let Some(stage) = stage {
                emit(&c, &spec, stage)?;
            }
            Ok(())
        }
        Command::Inspect { spec, json } => {
            let c = checked(&spec, color)?;
            model_of(&c, &spec)?;
            let Some(model) = &c.model else { return Err(Failure::Reported) };
            let r = hlac::inspect::report(model);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).map_err(|e| Failure::Message(e.to_string()))?);
            } else {
                print!("{}", r.to_text());
            }
            Ok(())
        }
        Command::Fmt { files, check } => fmt(&files, check, color),
        Command::Bench { spec, batch, tokens, repeats, json } => {
            let mut c = checked(&spec, color)?;
            model_of(&c, &spec)?;
            // The CPU back end runs here whatever the spec targets (GPU kernels: hlac-gpu-bench).
            if let Some(m) = c.model.as_mut() {
                m.retarget(hlac::ir::Device::Cpu);
            }
            let Some(model) = &c.model else { return Err(Failure::Reported) };
            if batch == 0 || tokens == 0 {
                return Err(Failure::Message("--batch and --tokens must be positive".into()));
            }
            let results = hlac::bench::run(model, batch, tokens, repeats).map_err(Failure::Message)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results).map_err(|e| Failure::Message(e.to_string()))?);
            } else {
                println!("{:<24} {:<10} {:>12} {:>12} {:>16} {:>12}", "kernel", "role", "shape", "median ms", "tokens/s", "compile ms");
                for r in results {
                    println!(
                        "{:<24} {:<10} {:>12} {:>12.3} {:>16.0} {:>12.1}",
                        r.kernel, r.role, r.shape, r.median_ms, r.tokens_per_s, r.compile_ms
                    );
                }
            }
            Ok(())
        }
        Command::Import { config, out, name } => {
            let text = std::fs::read_to_string(&config).map_err(|e| Failure::Message(format!("cannot read {}: {e}", config.display())))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Failure::Message(format!("{} is not valid JSON: {e}", config.display())))?;
            let name = name.unwrap_or_else(|| model_name_from(&config));
            let imported = hlac::hf::import_with_prelude(&json, &name)
                .map_err(|e| Failure::Message(format!("cannot import {}: {e}", config.display())))?;
            for w in &imported.warnings {
                eprintln!("warning: {w}");
            }
            write_or_print(out.as_deref(), &imported.text)
        }
        Command::ExportConfig { spec, out } => {
            let c = checked(&spec, color)?;
            model_of(&c, &spec)?;
            let Some(model) = &c.model else { return Err(Failure::Reported) };
            let json = hlac::hf::export(model).map_err(|e| Failure::Message(format!("cannot export {}: {e}", spec.display())))?;
            let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Message(e.to_string()))? + "\n";
            write_or_print(out.as_deref(), &text)
        }
    }
}

fn model_name_from(path: &Path) -> String {
    let stem = path.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    let mut name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.insert_str(0, "m_");
    }
    name
}

/// Writes to a file (through a temporary file and a rename) or to stdout.
fn write_or_print(out: Option<&Path>, text: &str) -> Result<(), Failure> {
    match out {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(path) => hlac::write_atomically(path, text).map_err(|e| Failure::Message(format!("cannot write {}: {e}", path.display()))),
    }
}

fn fmt(files: &[PathBuf], check: bool, color: bool) -> Result<(), Failure> {
    let mut failed = false;
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                failed = true;
                continue;
            }
        };
        let mut sources = hlac_grammar::SourceMap::new();
        let id = sources.add(path.display().to_string(), text.clone());
        let file = match hlac_grammar::parse(id, &text) {
            Ok(f) => f,
            Err(d) => {
                eprint!("{}", hlac_grammar::render(&[d], &sources, color));
                failed = true;
                continue;
            }
        };
        let formatted = hlac_grammar::fmt::format_file(&file, &text);
        if formatted == text {
            continue;
        }
        if check {
            eprintln!("not formatted: {}", path.display());
            failed = true;
        } else if let Err(e) = hlac::write_atomically(path, &formatted) {
            eprintln!("error: cannot write {}: {e}", path.display());
            failed = true;
        } else {
            eprintln!("formatted {}", path.display());
        }
    }
    if failed {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}
