//! fla / Hugging Face configs: `hlac import config.json` writes the equivalent `.hla` spec and
//! `hlac export-config` writes a spec's model back as fla's `config.json`. The mapping is driven by
//! the declarations: a mixer's `fla "model_type", "Architecture"` line names its config class and
//! its `param`s are that class's keys. Keys hlac does not interpret are kept in the spec's
//! `fla { … }` block, so a config survives import and export unchanged.

use std::collections::BTreeMap;

use hlac_grammar::ast::DeclKind;
use serde_json::{Map, Value as Json};

use crate::build::Decls;
use crate::ir::Model;
use crate::mixer::param_decls;
use crate::value::{Env, Value};

/// Model-level keys hlac interprets, in the order a spec lists them.
const MODEL_KEYS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "max_position_embeddings",
    "elementwise_affine",
];
const MLP_KEYS: &[&str] = &["hidden_ratio", "intermediate_size", "hidden_act"];
/// Keys of a hybrid's `attn` dictionary besides `layers`.
const ATTN_KEYS: &[&str] = &["num_heads", "num_kv_heads", "qkv_bias", "rope_theta", "window_size"];

/// An import or export failure, said in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The input is not a config hlac understands.
    #[error("{0}")]
    Unsupported(String),
}

fn unsupported<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Unsupported(msg.into()))
}

/// The result of an import: the spec text and anything that could not be carried over.
pub struct Imported {
    /// The `.hla` text, formatted.
    pub text: String,
    /// What was dropped, one line each.
    pub warnings: Vec<String>,
}

/// Converts an fla config to a `.hla` spec. `decls` must hold the prelude's declarations.
pub fn import(config: &Json, model_name: &str, decls: &Decls<'_>) -> Result<Imported, ConfigError> {
    let Json::Object(cfg) = config else {
        return unsupported("the config is not a JSON object");
    };
    let Some(Json::String(model_type)) = cfg.get("model_type") else {
        return unsupported("the config has no `model_type`");
    };
    let Some(decl) = decls.iter().find(|d| fla_of(d).is_some_and(|(t, _)| t == *model_type)) else {
        let known: Vec<String> = decls.iter().filter_map(|d| fla_of(d).map(|(t, _)| t)).collect();
        return unsupported(format!("model_type `{model_type}` has no hlac mixer; known: {}", known.join(", ")));
    };
    let is_transformer = decl.kind == DeclKind::Attention;
    let attn_decl = decls.iter().find(|d| d.kind == DeclKind::Attention);
    let mut warnings = Vec::new();
    let mut used: Vec<&str> = vec!["model_type", "architectures", "attn"];
    let value_of = |key: &str| -> Result<Option<Value>, ConfigError> {
        match cfg.get(key) {
            None => Ok(None),
            Some(v) => match Value::from_json(v) {
                Some(x) => Ok(Some(x)),
                None => unsupported(format!("`{key}` must be a number, string, bool or null")),
            },
        }
    };
    let Some(Value::Int(layers)) = value_of("num_hidden_layers")? else {
        return unsupported("the config has no integer `num_hidden_layers`");
    };
    if !(1..=crate::build::MAX_LAYERS as i64).contains(&layers) {
        return unsupported(format!("num_hidden_layers = {layers} is out of range"));
    }
    let mut out = String::new();
    out.push_str(&format!("// Imported from an fla `{model_type}` config by `hlac import`.\n"));
    out.push_str(&format!("model {model_name} {{\n"));
    for key in MODEL_KEYS {
        if let Some(v) = value_of(key)? {
            out.push_str(&format!("  {key} = {}\n", lit(key, &v)?));
            used.push(key);
        }
    }
    // The layer pattern.
    let mixer_name = decl.name.name.clone();
    let mut attn_params: Vec<(String, Value)> = Vec::new();
    let kinds: Vec<String> = if is_transformer {
        vec![mixer_name.clone(); layers as usize]
    } else {
        let mut kinds = vec![mixer_name.clone(); layers as usize];
        match cfg.get("attn") {
            None | Some(Json::Null) => {}
            Some(Json::Object(attn)) => {
                let Some(attn_decl) = attn_decl else {
                    return unsupported("no attention declaration is available");
                };
                let Some(Json::Array(idx)) = attn.get("layers") else {
                    return unsupported("`attn.layers` must be a list of layer indices");
                };
                for i in idx {
                    match i.as_u64() {
                        Some(i) if (i as i64) < layers => kinds[i as usize] = attn_decl.name.name.clone(),
                        _ => return unsupported(format!("`attn.layers` holds {i}, not a layer index below {layers}")),
                    }
                }
                for (k, v) in attn {
                    if k == "layers" {
                        continue;
                    }
                    match (ATTN_KEYS.contains(&k.as_str()), Value::from_json(v)) {
                        (true, Some(v)) => attn_params.push((k.clone(), v)),
                        _ => warnings.push(format!("dropped `attn.{k}`: hlac's hybrid attention has no such setting")),
                    }
                }
            }
            Some(_) => return unsupported("hlac reads `attn` as one dictionary (heterogeneous attention lists are not supported)"),
        }
        kinds
    };
    out.push_str(&format!("  pattern = {}\n", compress(&kinds)));
    let mlp: Vec<String> = MLP_KEYS
        .iter()
        .filter_map(|k| value_of(k).transpose().map(|v| v.and_then(|v| Ok(format!("    {k} = {}\n", lit(k, &v)?)))))
        .collect::<Result<_, _>>()?;
    used.extend(MLP_KEYS);
    if !mlp.is_empty() {
        out.push_str("  mlp {\n");
        out.push_str(&mlp.concat());
        out.push_str("  }\n");
    }
    // The main mixer's parameters: every config key its declaration names, when not the default.
    let env = globals_for(cfg);
    let mut block = String::new();
    for p in param_decls(decl, &env) {
        if let Some(v) = value_of(&p.name)? {
            used.push(decl_key(decl, &p.name));
            if !v.fits(p.ty) {
                return unsupported(format!("`{}` = {} does not fit `{}`'s parameter type", p.name, v, mixer_name));
            }
            if v != p.default {
                block.push_str(&format!("    {} = {}\n", p.name, lit(&p.name, &v)?));
            }
        }
    }
    if !block.is_empty() {
        out.push_str(&format!("  mixer {mixer_name} {{\n{block}  }}\n"));
    }
    if !attn_params.is_empty() {
        let attn_name = attn_decl.map_or("Attn".to_string(), |d| d.name.name.clone());
        out.push_str(&format!("  mixer {attn_name} {{\n"));
        for (k, v) in &attn_params {
            out.push_str(&format!("    {k} = {}\n", lit(k, v)?));
        }
        out.push_str("  }\n");
    }
    // Everything else is kept verbatim for export.
    let mut extra = String::new();
    for (k, v) in cfg {
        if used.contains(&k.as_str()) {
            continue;
        }
        match Value::from_json(v).and_then(|x| x.literal()) {
            Some(text) if is_ident(k) => extra.push_str(&format!("    {k} = {text}\n")),
            _ => warnings.push(format!("dropped `{k}`: its value has no .hla form")),
        }
    }
    if !extra.is_empty() {
        out.push_str("  fla {\n");
        out.push_str(&extra);
        out.push_str("  }\n");
    }
    out.push_str("}\n");
    let text = reformat(&out)?;
    Ok(Imported { text, warnings })
}

/// Interns a key as one of the declaration's parameter names (for the `used` list).
fn decl_key<'a>(decl: &'a hlac_grammar::ast::Decl, name: &str) -> &'a str {
    decl.body
        .iter()
        .find_map(|s| match &s.kind {
            hlac_grammar::ast::StmtKind::Param { name: n, .. } if n.name == name => Some(n.name.as_str()),
            _ => None,
        })
        .unwrap_or("")
}

fn globals_for(cfg: &Map<String, Json>) -> Env {
    let mut env = Env::new();
    for k in ["hidden_size", "num_hidden_layers"] {
        if let Some(v) = cfg.get(k).and_then(Value::from_json) {
            env.insert(k.to_string(), v);
        }
    }
    env
}

fn is_ident(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn lit(key: &str, v: &Value) -> Result<String, ConfigError> {
    v.literal().ok_or_else(|| ConfigError::Unsupported(format!("`{key}` = {v} cannot be written in .hla")))
}

fn reformat(text: &str) -> Result<String, ConfigError> {
    let mut sources = hlac_grammar::SourceMap::new();
    let id = sources.add("<import>", text);
    match hlac_grammar::parse(id, text) {
        Ok(file) => Ok(hlac_grammar::fmt::format_file(&file, text)),
        Err(d) => unsupported(format!(
            "this is a bug in hlac: the imported spec does not parse:\n{}",
            hlac_grammar::render(&[d], &sources, false)
        )),
    }
}

fn fla_of(d: &hlac_grammar::ast::Decl) -> Option<(String, String)> {
    d.body.iter().find_map(|s| match &s.kind {
        hlac_grammar::ast::StmtKind::Fla { model_type, architecture } => Some((model_type.value.clone(), architecture.value.clone())),
        _ => None,
    })
}

/// Writes a layer sequence as the shortest pattern of the form `[A x r, B] x n` or runs.
pub fn compress(kinds: &[String]) -> String {
    let n = kinds.len();
    for period in 1..=n {
        if !n.is_multiple_of(period) || kinds.chunks(period).any(|c| c != &kinds[..period]) {
            continue;
        }
        let block = runs(&kinds[..period]);
        let reps = n / period;
        return if reps == 1 {
            block
        } else if period == 1 {
            format!("{} x {reps}", kinds[0])
        } else {
            format!("[{block}] x {reps}")
        };
    }
    runs(kinds)
}

fn runs(kinds: &[String]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < kinds.len() {
        let mut j = i;
        while j < kinds.len() && kinds[j] == kinds[i] {
            j += 1;
        }
        parts.push(if j - i == 1 { kinds[i].clone() } else { format!("{} x {}", kinds[i], j - i) });
        i = j;
    }
    parts.join(", ")
}

/// Converts a compiled model to an fla `config.json` value.
pub fn export(model: &Model) -> Result<Json, ConfigError> {
    let c = &model.config;
    let mut linear = None;
    let mut attention = None;
    for (_, m) in model.mixers.iter() {
        let slot = if m.instance.kind == DeclKind::Attention { &mut attention } else { &mut linear };
        if slot.is_some() {
            return unsupported(format!(
                "an fla config describes one linear mixer and one attention; `{}` uses more than one {}",
                model.name,
                if m.instance.kind == DeclKind::Attention { "attention configuration" } else { "linear mixer" }
            ));
        }
        *slot = Some(m);
    }
    let main = linear.or(attention).ok_or_else(|| ConfigError::Unsupported("the model has no layers".into()))?;
    let Some((model_type, architecture)) = main.instance.fla.clone() else {
        return unsupported(format!("`{}` has no fla counterpart (its declaration has no `fla` line)", main.instance.decl_name));
    };
    let mut out: BTreeMap<String, Json> = BTreeMap::new();
    out.insert("architectures".into(), Json::Array(vec![Json::String(architecture)]));
    out.insert("model_type".into(), Json::String(model_type));
    out.insert("vocab_size".into(), c.vocab_size.into());
    out.insert("hidden_size".into(), c.hidden_size.into());
    out.insert("num_hidden_layers".into(), c.num_hidden_layers.into());
    out.insert("norm_eps".into(), Value::Float(c.norm_eps).to_json());
    out.insert("tie_word_embeddings".into(), c.tie_word_embeddings.into());
    out.insert("initializer_range".into(), Value::Float(c.initializer_range).to_json());
    out.insert("max_position_embeddings".into(), c.max_position_embeddings.into());
    out.insert("hidden_act".into(), "swish".into());
    // Not every fla config class has this key: write it only when the spec says it.
    if let Some(affine) = c.elementwise_affine {
        out.insert("elementwise_affine".into(), affine.into());
    }
    out.insert("hidden_ratio".into(), c.hidden_ratio.map_or(Json::from(4), Json::from));
    out.insert("intermediate_size".into(), c.intermediate_size_given.map_or(Json::Null, Json::from));
    for (k, v) in &main.instance.params {
        out.insert(k.clone(), v.to_json());
    }
    if let (Some(_), Some(attn)) = (linear, attention) {
        let layers: Vec<Json> = model
            .layers
            .iter()
            .filter(|(_, l)| model.mixers[l.mixer].instance.kind == DeclKind::Attention)
            .map(|(_, l)| Json::from(l.index))
            .collect();
        let mut a = Map::new();
        a.insert("layers".into(), Json::Array(layers));
        for key in ATTN_KEYS {
            // fla fills num_kv_heads with num_heads in a hybrid's attn dictionary.
            let v = if *key == "num_kv_heads" { attn.instance.get("kv_heads") } else { attn.instance.get(key) };
            a.insert((*key).into(), v.map_or(Json::Null, Value::to_json));
        }
        if attn.instance.get("qk_norm") == Some(&Value::Bool(true)) {
            return unsupported("fla's hybrid attention has no qk_norm; set qk_norm = false");
        }
        out.insert("attn".into(), Json::Object(a));
    } else if linear.is_some() {
        out.insert("attn".into(), Json::Null);
    }
    for (k, v) in &c.fla_extra {
        out.insert(k.clone(), v.to_json());
    }
    Ok(Json::Object(out.into_iter().collect()))
}

/// [`import`] against the prelude's declarations alone.
pub fn import_with_prelude(config: &Json, model_name: &str) -> Result<Imported, ConfigError> {
    let mut sources = hlac_grammar::SourceMap::new();
    let dir = std::path::Path::new(".");
    let (loaded, diags) = crate::load::load(crate::load::Input::Text { name: "<import>", text: "", dir }, &mut sources);
    let Some(loaded) = loaded else {
        return unsupported(format!("this is a bug in hlac: {}", hlac_grammar::render(&diags, &sources, false)));
    };
    let mut diags = Vec::new();
    let decls = Decls::collect(&loaded, &mut diags);
    import(config, model_name, &decls)
}
