//! Resolution: from the loaded files to the model IR. Collects the mixer declarations of every file,
//! reads the root file's `model` and `target`, expands the layer pattern, instantiates and
//! classifies each mixer, and lays out every parameter tensor with fla's name, shape and dtype.
//! All user errors come back as diagnostics, as many as can be found in one run.

use std::collections::HashMap;

use hlac_grammar::ast::{
    Assign, Decl, DeclKind, ExprKind, Item, Model as AstModel, ModelStmt, PatternAtom, PatternSeq, Target as AstTarget, WeightRole,
};
use hlac_grammar::{Diagnostic, Span};

use crate::classify::classify;
use crate::ir::{Config, DType, Device, Handle, Layer, Mixer, Mode, Model, Role, Target, Tensor};
use crate::load::Loaded;
use crate::mixer::{check_decl, closest, instantiate, token_source, UseSite};
use crate::value::{eval, Env, Value};

/// The most layers a pattern may expand to.
pub const MAX_LAYERS: u64 = 4096;

/// Every mixer declaration visible to a compilation, by name.
pub struct Decls<'a> {
    map: HashMap<String, &'a Decl>,
    order: Vec<&'a Decl>,
}

impl<'a> Decls<'a> {
    /// Collects declarations from every loaded file, reporting duplicates.
    pub fn collect(loaded: &'a Loaded, diags: &mut Vec<Diagnostic>) -> Decls<'a> {
        let mut map: HashMap<String, &Decl> = HashMap::new();
        let mut order = Vec::new();
        for (_, file) in &loaded.files {
            for item in &file.items {
                let Item::Decl(d) = item else { continue };
                if let Some(prev) = map.get(&d.name.name) {
                    let mut diag =
                        Diagnostic::error("E0201", format!("`{}` is declared twice", d.name.name), d.name.span, "declared again here")
                            .with_label(prev.name.span, "first declared here");
                    if prev.name.span.file.0 == 0 {
                        diag = diag.with_hint(format!("the prelude declares `{}`; choose another name", d.name.name));
                    }
                    diags.push(diag);
                    continue;
                }
                diags.extend(check_decl(d, &Env::new()));
                map.insert(d.name.name.clone(), d);
                order.push(d);
            }
        }
        Decls { map, order }
    }

    /// A declaration by name.
    pub fn get(&self, name: &str) -> Option<&'a Decl> {
        self.map.get(name).copied()
    }

    /// Every declaration in load order (prelude first).
    pub fn iter(&self) -> impl Iterator<Item = &'a Decl> + '_ {
        self.order.iter().copied()
    }
}

/// Settings of `model`, `mlp` and `target`: name, type and default.
struct Setting {
    name: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Int,
    OptInt,
    Float,
    Bool,
    Str,
    Word(&'static [&'static str]),
}

const MODEL_SETTINGS: &[Setting] = &[
    Setting { name: "vocab_size", kind: Kind::Int },
    Setting { name: "hidden_size", kind: Kind::Int },
    Setting { name: "num_hidden_layers", kind: Kind::Int },
    Setting { name: "norm_eps", kind: Kind::Float },
    Setting { name: "tie_word_embeddings", kind: Kind::Bool },
    Setting { name: "initializer_range", kind: Kind::Float },
    Setting { name: "max_position_embeddings", kind: Kind::Int },
    Setting { name: "elementwise_affine", kind: Kind::Bool },
];
const MLP_SETTINGS: &[Setting] = &[
    Setting { name: "hidden_ratio", kind: Kind::OptInt },
    Setting { name: "intermediate_size", kind: Kind::OptInt },
    Setting { name: "hidden_act", kind: Kind::Str },
];
const TARGET_SETTINGS: &[Setting] = &[
    Setting { name: "device", kind: Kind::Word(&["cpu", "sm_80", "sm_90"]) },
    Setting { name: "dtype", kind: Kind::Word(&["f32", "bf16", "f16"]) },
    Setting { name: "chunk_size", kind: Kind::Int },
    Setting { name: "mode", kind: Kind::Word(&["inference", "training"]) },
    Setting { name: "seq_len", kind: Kind::Int },
];

/// Reads `name = value` settings against a schema; values are literals (or, for words, bare names).
fn read_settings(assigns: &[Assign], schema: &[Setting], what: &str, diags: &mut Vec<Diagnostic>) -> HashMap<&'static str, (Value, Span)> {
    let mut out: HashMap<&'static str, (Value, Span)> = HashMap::new();
    for a in assigns {
        let Some(setting) = schema.iter().find(|s| s.name == a.name.name) else {
            let mut d = Diagnostic::error("E0203", format!("unknown {what} setting `{}`", a.name.name), a.name.span, "unknown setting");
            if let Some(c) = closest(&a.name.name, schema.iter().map(|s| s.name)) {
                d = d.with_hint(format!("did you mean `{c}`?"));
            }
            let names: Vec<&str> = schema.iter().map(|s| s.name).collect();
            diags.push(d.with_note(format!("{what} settings: {}", names.join(", "))));
            continue;
        };
        if let Some((_, prev)) = out.get(setting.name) {
            diags.push(
                Diagnostic::error("E0205", format!("`{}` is set twice", a.name.name), a.name.span, "set again here")
                    .with_label(*prev, "first set here"),
            );
            continue;
        }
        let value = match (&a.value.kind, setting.kind) {
            (ExprKind::Name(n), Kind::Word(words)) => {
                if words.contains(&n.as_str()) {
                    Some(Value::Str(n.clone()))
                } else {
                    let mut d = Diagnostic::error(
                        "E0207",
                        format!("`{n}` is not a valid {}", setting.name),
                        a.value.span,
                        format!("expected one of: {}", words.join(", ")),
                    );
                    if let Some(c) = closest(n, words.iter().copied()) {
                        d = d.with_hint(format!("did you mean `{c}`?"));
                    }
                    diags.push(d);
                    None
                }
            }
            _ => match eval(&a.value, &Env::new()) {
                Ok(v) => {
                    let ok = matches!(
                        (setting.kind, &v),
                        (Kind::Int, Value::Int(_))
                            | (Kind::OptInt, Value::Int(_) | Value::None)
                            | (Kind::Float, Value::Int(_) | Value::Float(_))
                            | (Kind::Bool, Value::Bool(_))
                            | (Kind::Str, Value::Str(_))
                    );
                    if ok {
                        Some(v)
                    } else {
                        let want = match setting.kind {
                            Kind::Int => "an int".to_string(),
                            Kind::OptInt => "an int or none".to_string(),
                            Kind::Float => "a number".to_string(),
                            Kind::Bool => "true or false".to_string(),
                            Kind::Str => "a string".to_string(),
                            Kind::Word(w) => format!("one of {}", w.join(", ")),
                        };
                        diags.push(Diagnostic::error(
                            "E0204",
                            format!("`{}` must be {want}, found {} `{v}`", setting.name, v.type_name()),
                            a.value.span,
                            format!("expected {want}"),
                        ));
                        None
                    }
                }
                Err(e) => {
                    diags.push(crate::mixer::eval_diag(&e));
                    None
                }
            },
        };
        if let Some(v) = value {
            out.insert(setting.name, (v, a.span));
        }
    }
    out
}

fn int_of(map: &HashMap<&str, (Value, Span)>, key: &str) -> Option<(i64, Span)> {
    match map.get(key) {
        Some((Value::Int(i), s)) => Some((*i, *s)),
        _ => None,
    }
}

fn float_of(map: &HashMap<&str, (Value, Span)>, key: &str, default: f64) -> f64 {
    map.get(key).and_then(|(v, _)| v.as_f64()).unwrap_or(default)
}

fn bool_of(map: &HashMap<&str, (Value, Span)>, key: &str, default: bool) -> bool {
    match map.get(key) {
        Some((Value::Bool(b), _)) => *b,
        _ => default,
    }
}

fn word_of<'m>(map: &'m HashMap<&str, (Value, Span)>, key: &str) -> Option<&'m str> {
    match map.get(key) {
        Some((Value::Str(s), _)) => Some(s.as_str()),
        _ => None,
    }
}

fn positive(map: &HashMap<&str, (Value, Span)>, key: &str, diags: &mut Vec<Diagnostic>) -> Option<u64> {
    let (v, span) = int_of(map, key)?;
    if v > 0 {
        Some(v as u64)
    } else {
        diags.push(Diagnostic::error("E0207", format!("`{key}` must be positive, found {v}"), span, "not positive"));
        None
    }
}

/// One layer of the expanded pattern: the mixer name and where it was written.
struct Slot {
    name: String,
    span: Span,
}

fn expand(seq: &PatternSeq, out: &mut Vec<Slot>, diags: &mut Vec<Diagnostic>) -> bool {
    for term in &seq.terms {
        let times = match term.repeat {
            Some((0, span)) => {
                diags.push(Diagnostic::error("E0402", "a pattern repeat must be at least 1", span, "repeats zero times"));
                return false;
            }
            Some((n, _)) => n,
            None => 1,
        };
        let mut once = Vec::new();
        match &term.atom {
            PatternAtom::Mixer(id) => once.push(Slot { name: id.name.clone(), span: id.span }),
            PatternAtom::Group(g) => {
                if !expand(g, &mut once, diags) {
                    return false;
                }
            }
        }
        let total = (out.len() as u64).saturating_add((once.len() as u64).saturating_mul(times));
        if total > MAX_LAYERS {
            diags.push(Diagnostic::error(
                "E0402",
                format!("the pattern expands to more than {MAX_LAYERS} layers"),
                term.span,
                "too many layers",
            ));
            return false;
        }
        for _ in 0..times {
            out.extend(once.iter().map(|s| Slot { name: s.name.clone(), span: s.span }));
        }
    }
    true
}

/// fla's SwiGLU width: `int(hidden * ratio * 2 / 3)` rounded up to a multiple of 256.
pub fn fla_intermediate_size(hidden: u64, ratio: u64) -> u64 {
    let raw = ((hidden * ratio) as f64 * 2.0 / 3.0) as u64;
    raw.div_ceil(256) * 256
}

/// Builds the model IR from the root file's `model` and `target`.
pub fn build(loaded: &Loaded, decls: &Decls<'_>, diags: &mut Vec<Diagnostic>) -> Option<Model> {
    let root = loaded.root_file();
    let mut models = root.items.iter().filter_map(|i| match i {
        Item::Model(m) => Some(m),
        _ => None,
    });
    let mut targets = root.items.iter().filter_map(|i| match i {
        Item::Target(t) => Some(t),
        _ => None,
    });
    let model = models.next()?;
    if let Some(extra) = models.next() {
        diags.push(
            Diagnostic::error("E0403", "a spec declares one model", extra.name.span, "second model")
                .with_label(model.name.span, "first model")
                .with_hint("put each model in its own file and `import` shared declarations"),
        );
    }
    let target_ast = targets.next();
    if let Some(extra) = targets.next() {
        diags.push(Diagnostic::error("E0403", "a spec has one `target` section", extra.span, "second target"));
    }
    let target = read_target(target_ast, diags);
    let config_and_pattern = read_model(model, diags);
    let (mut config, pattern_span, slots, layers_setting) = config_and_pattern?;

    // The mixers the model configures.
    let mut configured: HashMap<String, (&Decl, &[Assign], Span)> = HashMap::new();
    for stmt in &model.body {
        let ModelStmt::Mixer { name, kind, assigns, span } = stmt else { continue };
        let decl_name = kind.as_ref().unwrap_or(name);
        let Some(decl) = decls.get(&decl_name.name) else {
            diags.push(unknown_mixer(&decl_name.name, decl_name.span, decls));
            continue;
        };
        if kind.is_some() && decls.get(&name.name).is_some() {
            diags.push(
                Diagnostic::error(
                    "E0201",
                    format!("`{}` is already a declared mixer", name.name),
                    name.span,
                    "choose another name for this variant",
                )
                .with_label(decl_name.span, "a variant of this"),
            );
            continue;
        }
        if let Some((_, _, prev)) = configured.get(&name.name) {
            diags.push(
                Diagnostic::error("E0205", format!("mixer `{}` is configured twice", name.name), name.span, "configured again")
                    .with_label(*prev, "first here"),
            );
            continue;
        }
        configured.insert(name.name.clone(), (decl, assigns.as_slice(), *span));
    }

    let num_layers = slots.len() as u64;
    if let Some((n, span)) = layers_setting {
        if n != num_layers as i64 {
            diags.push(
                Diagnostic::error(
                    "E0401",
                    format!("the pattern has {num_layers} layers but num_hidden_layers is {n}"),
                    pattern_span,
                    format!("{num_layers} layers"),
                )
                .with_label(span, format!("says {n}")),
            );
        }
    }
    config.num_hidden_layers = num_layers;

    let mut globals = Env::new();
    globals.insert("hidden_size".into(), Value::Int(config.hidden_size as i64));
    globals.insert("num_hidden_layers".into(), Value::Int(num_layers as i64));

    // Instantiate each mixer the pattern uses, once, in order of first use.
    let mut mixers = crate::ir::Arena::default();
    let mut by_name: HashMap<String, Option<Handle<Mixer>>> = HashMap::new();
    let mut layer_mixers = Vec::new();
    for slot in &slots {
        if let Some(h) = by_name.get(&slot.name) {
            layer_mixers.push(*h);
            continue;
        }
        let handle = (|| {
            let (decl, assigns, span) = match configured.get(&slot.name) {
                Some(c) => *c,
                None => match decls.get(&slot.name) {
                    Some(d) => (d, &[][..], slot.span),
                    None => {
                        diags.push(unknown_mixer(&slot.name, slot.span, decls));
                        return None;
                    }
                },
            };
            let site = UseSite { assigns, span };
            let instance = match instantiate(decl, &site, &globals) {
                Ok(i) => i,
                Err(mut d) => {
                    diags.append(&mut d);
                    return None;
                }
            };
            let class = match (&instance.math, decl.kind) {
                (Some(math), DeclKind::Recurrence) => match classify(math) {
                    Ok(c) => Some(c),
                    Err(ds) => {
                        for d in ds {
                            diags.push(d.with_label(slot.span, format!("`{}` is used here", slot.name)));
                        }
                        return None;
                    }
                },
                (None, DeclKind::Recurrence) => {
                    diags.push(Diagnostic::error(
                        "E0502",
                        format!("recurrence `{}` has no `state`", decl.name.name),
                        decl.name.span,
                        "add `state S[K = …, V = …]`",
                    ));
                    return None;
                }
                _ => None,
            };
            if let Some(math) = &instance.math {
                for t in &math.tokens {
                    let source = token_source(t);
                    if !instance.weights.iter().any(|w| w.name == source) {
                        diags.push(
                            Diagnostic::error(
                                "E0502",
                                format!("token `{}` is produced by `{source}`, which `{}` does not declare", t.name.name, decl.name.name),
                                t.span,
                                "no such weight",
                            )
                            .with_hint(format!("declare `linear {source} [...]` or write `token {} from <weight>`", t.name.name)),
                        );
                        return None;
                    }
                }
            }
            Some(mixers.alloc(Mixer { name: slot.name.clone(), instance, class }))
        })();
        by_name.insert(slot.name.clone(), handle);
        layer_mixers.push(handle);
    }
    for (name, (_, _, span)) in &configured {
        if !by_name.contains_key(name) {
            diags.push(Diagnostic::warning(
                "W0001",
                format!("mixer `{name}` is configured but the pattern never uses it"),
                *span,
                "unused",
            ));
        }
    }
    let target = target?;
    if layer_mixers.iter().any(Option::is_none) || diags.iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(lay_out(model.name.name.clone(), config, target, mixers, layer_mixers.into_iter().flatten().collect(), diags))
}

fn unknown_mixer(name: &str, span: Span, decls: &Decls<'_>) -> Diagnostic {
    let mut d = Diagnostic::error("E0202", format!("unknown mixer `{name}`"), span, "not declared");
    if let Some(c) = closest(name, decls.iter().map(|d| d.name.name.as_str())) {
        d = d.with_hint(format!("did you mean `{c}`?"));
    }
    let names: Vec<&str> = decls.iter().map(|d| d.name.name.as_str()).collect();
    d.with_note(format!("declared mixers: {}", names.join(", ")))
}

type ModelParts = (Config, Span, Vec<Slot>, Option<(i64, Span)>);

fn read_model(model: &AstModel, diags: &mut Vec<Diagnostic>) -> Option<ModelParts> {
    let mut assigns = Vec::new();
    let mut mlp = Vec::new();
    let mut fla_extra = Vec::new();
    let mut pattern: Option<(&PatternSeq, Span)> = None;
    for stmt in &model.body {
        match stmt {
            ModelStmt::Assign(a) => assigns.push(a.clone()),
            ModelStmt::Mlp { assigns, .. } => mlp.extend(assigns.iter().cloned()),
            ModelStmt::Fla { assigns, .. } => {
                for a in assigns {
                    match eval(&a.value, &Env::new()) {
                        Ok(v) => fla_extra.push((a.name.name.clone(), v)),
                        Err(e) => diags.push(crate::mixer::eval_diag(&e)),
                    }
                }
            }
            ModelStmt::Pattern { pattern: p, span } => {
                if let Some((_, prev)) = pattern {
                    diags.push(
                        Diagnostic::error("E0205", "the pattern is given twice", *span, "second pattern").with_label(prev, "first pattern"),
                    );
                } else {
                    pattern = Some((p, *span));
                }
            }
            ModelStmt::Mixer { .. } => {}
        }
    }
    let settings = read_settings(&assigns, MODEL_SETTINGS, "model", diags);
    let mlp_settings = read_settings(&mlp, MLP_SETTINGS, "mlp", diags);
    let hidden = if settings.contains_key("hidden_size") {
        positive(&settings, "hidden_size", diags)
    } else {
        diags.push(
            Diagnostic::error(
                "E0206",
                format!("model `{}` does not set `hidden_size`", model.name.name),
                model.name.span,
                "missing hidden_size",
            )
            .with_hint("add `hidden_size = 1024`"),
        );
        None
    };
    let vocab = if settings.contains_key("vocab_size") { positive(&settings, "vocab_size", diags) } else { Some(32000) };
    if !bool_of(&settings, "elementwise_affine", true) {
        if let Some((_, span)) = settings.get("elementwise_affine") {
            diags.push(Diagnostic::error(
                "E0207",
                "norms without learned scales (elementwise_affine = false) are not supported",
                *span,
                "unsupported",
            ));
        }
    }
    if let Some((Value::Str(act), span)) = mlp_settings.get("hidden_act") {
        if act != "swish" {
            diags.push(
                Diagnostic::error(
                    "E0207",
                    format!("hlac's MLP is SwiGLU; hidden_act `{act}` is not supported"),
                    *span,
                    "expected \"swish\"",
                )
                .with_hint("remove the setting or write hidden_act = \"swish\""),
            );
        }
    }
    let ratio = match mlp_settings.get("hidden_ratio") {
        Some((Value::Int(r), span)) if *r <= 0 => {
            diags.push(Diagnostic::error("E0207", "hidden_ratio must be positive", *span, "not positive"));
            None
        }
        Some((Value::Int(r), _)) => Some(*r),
        _ => None,
    };
    let intermediate_given = match mlp_settings.get("intermediate_size") {
        Some((Value::Int(r), span)) if *r <= 0 => {
            diags.push(Diagnostic::error("E0207", "intermediate_size must be positive", *span, "not positive"));
            None
        }
        Some((Value::Int(r), _)) => Some(*r),
        _ => None,
    };
    let Some((pattern, pattern_span)) = pattern else {
        diags.push(
            Diagnostic::error("E0206", format!("model `{}` has no layer pattern", model.name.name), model.name.span, "missing pattern")
                .with_hint("add `pattern = [GDN x 3, Attn x 1] x 6`"),
        );
        return None;
    };
    let mut slots = Vec::new();
    if !expand(pattern, &mut slots, diags) {
        return None;
    }
    let hidden = hidden?;
    let vocab = vocab?;
    let max_pos = match int_of(&settings, "max_position_embeddings") {
        Some(_) => positive(&settings, "max_position_embeddings", diags)?,
        None => 2048,
    };
    if int_of(&settings, "num_hidden_layers").is_some() {
        positive(&settings, "num_hidden_layers", diags)?;
    }
    let eps = float_of(&settings, "norm_eps", 1e-6);
    if !(eps > 0.0 && eps < 1.0) {
        if let Some((_, span)) = settings.get("norm_eps") {
            diags.push(Diagnostic::error("E0207", "norm_eps must be between 0 and 1", *span, "out of range"));
        }
    }
    let intermediate = intermediate_given.map_or_else(|| fla_intermediate_size(hidden, ratio.unwrap_or(4) as u64), |i| i as u64);
    let config = Config {
        vocab_size: vocab,
        hidden_size: hidden,
        num_hidden_layers: slots.len() as u64,
        norm_eps: eps,
        tie_word_embeddings: bool_of(&settings, "tie_word_embeddings", false),
        initializer_range: float_of(&settings, "initializer_range", 0.02),
        max_position_embeddings: max_pos,
        hidden_ratio: ratio,
        intermediate_size_given: intermediate_given,
        intermediate_size: intermediate,
        elementwise_affine: settings.get("elementwise_affine").map(|_| bool_of(&settings, "elementwise_affine", true)),
        fla_extra,
    };
    Some((config, pattern_span, slots, int_of(&settings, "num_hidden_layers")))
}

fn read_target(target: Option<&AstTarget>, diags: &mut Vec<Diagnostic>) -> Option<Target> {
    let empty = Vec::new();
    let assigns = target.map_or(&empty, |t| &t.assigns);
    let before = diags.iter().filter(|d| d.is_error()).count();
    let s = read_settings(assigns, TARGET_SETTINGS, "target", diags);
    let device = match word_of(&s, "device") {
        Some("sm_80") => Device::Sm80,
        Some("sm_90") => Device::Sm90,
        _ => Device::Cpu,
    };
    let dtype = match word_of(&s, "dtype") {
        Some("bf16") => DType::Bf16,
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    let device_ok = !assigns.iter().any(|a| a.name.name == "device") || s.contains_key("device");
    if device == Device::Cpu && dtype != DType::F32 && device_ok {
        if let Some((_, span)) = s.get("dtype") {
            diags.push(
                Diagnostic::error(
                    "E0207",
                    format!("the cpu target computes in f32; dtype {} is for GPU targets", dtype.name()),
                    *span,
                    "not available on cpu",
                )
                .with_hint("write `dtype = f32`, or choose `device = sm_90`"),
            );
        }
    }
    let chunk_size = match int_of(&s, "chunk_size") {
        Some((c, _)) if [16, 32, 64, 128].contains(&c) => c as u64,
        Some((c, span)) => {
            diags.push(
                Diagnostic::error("E0207", format!("chunk_size must be 16, 32, 64 or 128, found {c}"), span, "unsupported chunk size")
                    .with_hint("fla uses 64"),
            );
            64
        }
        None => 64,
    };
    let mode = match word_of(&s, "mode") {
        Some("training") => Mode::Training,
        _ => Mode::Inference,
    };
    let seq_len = match int_of(&s, "seq_len") {
        Some(_) => positive(&s, "seq_len", diags).unwrap_or(4096),
        None => 4096,
    };
    if diags.iter().filter(|d| d.is_error()).count() > before {
        return None;
    }
    Some(Target { device, dtype, chunk_size, mode, seq_len })
}

/// Lays out every tensor in fla's state-dict order.
fn lay_out(
    name: String,
    config: Config,
    target: Target,
    mixers: crate::ir::Arena<Mixer>,
    layer_mixers: Vec<Handle<Mixer>>,
    diags: &mut Vec<Diagnostic>,
) -> Model {
    let mut tensors = crate::ir::Arena::default();
    let mut globals = Vec::new();
    let h = config.hidden_size;
    let dtype = target.dtype;
    let tensor = |tensors: &mut crate::ir::Arena<Tensor>, name: String, shape: Vec<u64>, role: Role| {
        // Gate parameters and bounds stay in f32: they feed exponentials computed in f32.
        let dtype = if role == Role::Other { DType::F32 } else { dtype };
        tensors.alloc(Tensor { name, shape, dtype, role })
    };
    // Shared tensors first (fla registers `lower_bounds` before the embeddings).
    let mut shared: Vec<(String, Vec<u64>)> = Vec::new();
    for (_, m) in mixers.iter() {
        for w in m.instance.weights.iter().filter(|w| w.shared) {
            match shared.iter().find(|(n, _)| *n == w.name) {
                Some((_, shape)) if *shape != w.shape => diags.push(Diagnostic::error_nowhere(
                    "E0601",
                    format!("mixers disagree on the shape of the shared weight `model.{}`", w.name),
                )),
                Some(_) => {}
                None => shared.push((w.name.clone(), w.shape.clone())),
            }
        }
    }
    for (n, shape) in shared {
        globals.push(tensor(&mut tensors, format!("model.{n}"), shape, Role::Other));
    }
    globals.push(tensor(&mut tensors, "model.embeddings.weight".into(), vec![config.vocab_size, h], Role::Embedding));
    let mut layers = crate::ir::Arena::default();
    let inter = config.intermediate_size;
    for (i, mh) in layer_mixers.into_iter().enumerate() {
        let p = format!("model.layers.{i}");
        let mut ts = vec![tensor(&mut tensors, format!("{p}.attn_norm.weight"), vec![h], Role::Norm)];
        for w in mixers[mh].instance.weights.iter().filter(|w| !w.shared) {
            let role = match w.role {
                WeightRole::Linear => Role::Linear,
                WeightRole::Norm => Role::Norm,
                WeightRole::Conv => Role::Conv,
                WeightRole::Weight => Role::Other,
            };
            // Parameters that fla registers directly (A_log) have no `.weight` suffix.
            let full = if role == Role::Other { format!("{p}.attn.{}", w.name) } else { format!("{p}.attn.{}.weight", w.name) };
            ts.push(tensor(&mut tensors, full, w.shape.clone(), role));
            if w.bias {
                ts.push(tensor(&mut tensors, format!("{p}.attn.{}.bias", w.name), vec![w.shape[0]], Role::Bias));
            }
        }
        ts.push(tensor(&mut tensors, format!("{p}.mlp_norm.weight"), vec![h], Role::Norm));
        ts.push(tensor(&mut tensors, format!("{p}.mlp.gate_proj.weight"), vec![inter, h], Role::Linear));
        ts.push(tensor(&mut tensors, format!("{p}.mlp.up_proj.weight"), vec![inter, h], Role::Linear));
        ts.push(tensor(&mut tensors, format!("{p}.mlp.down_proj.weight"), vec![h, inter], Role::Linear));
        layers.alloc(Layer { index: i as u64, mixer: mh, tensors: ts });
    }
    globals.push(tensor(&mut tensors, "model.norm.weight".into(), vec![h], Role::Norm));
    if !config.tie_word_embeddings {
        globals.push(tensor(&mut tensors, "lm_head.weight".into(), vec![config.vocab_size, h], Role::Linear));
    }
    Model { name, config, target, mixers, layers, tensors, globals }
}
