//! Instantiates a mixer declaration (`recurrence` or `attention`) with the hyper-parameters a model
//! gives it: checks each setting's name and type, runs the declaration's statements in order
//! (`let`, `if`, `require`, weights) and collects the per-head math of a recurrence with every `def`
//! inlined, ready for [`crate::classify`]. It stops before classification.

use std::collections::HashMap;

use hlac_grammar::ast::{Assign, Decl, DeclKind, Expr, ExprKind, Ident, Stmt, StmtKind, TokenDecl, TypeRef, WeightRole};
use hlac_grammar::{Diagnostic, Span};

use crate::value::{eval, type_ref_name, Env, EvalError, Value};

/// A declared hyper-parameter.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    /// Its name (and fla config key).
    pub name: String,
    /// Its type.
    pub ty: TypeRef,
    /// Its default, evaluated.
    pub default: Value,
}

/// The hyper-parameters a declaration accepts, in declaration order.
pub fn param_decls(decl: &Decl, globals: &Env) -> Vec<ParamDecl> {
    let mut out = Vec::new();
    let mut env = globals.clone();
    for s in &decl.body {
        if let StmtKind::Param { name, ty, default } = &s.kind {
            let default = eval(default, &env).unwrap_or(Value::None);
            env.insert(name.name.clone(), default.clone());
            out.push(ParamDecl { name: name.name.clone(), ty: *ty, default });
        }
    }
    out
}

/// One weight of a layer, with its shape evaluated.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WeightSpec {
    /// The name after the layer's `attn.` prefix (or after `model.` when shared).
    pub name: String,
    /// What it is for.
    #[serde(skip)]
    pub role: WeightRole,
    /// Its shape, PyTorch layout.
    pub shape: Vec<u64>,
    /// Whether a `<name>.bias` of shape `[shape[0]]` goes with it.
    pub bias: bool,
    /// One tensor per model rather than per layer.
    pub shared: bool,
}

/// The per-head math of a recurrence, as declared, with `def`s inlined.
#[derive(Debug, Clone)]
pub struct Math {
    /// The state's name.
    pub state: Ident,
    /// The key axis name and size.
    pub key_axis: (String, u64),
    /// The value axis name and size.
    pub value_axis: (String, u64),
    /// Token inputs.
    pub tokens: Vec<TokenDecl>,
    /// Learned per-head scalars.
    pub head_params: Vec<Ident>,
    /// `update S = …`
    pub update: Option<(Ident, Expr)>,
    /// `output o = …`
    pub output: Option<(Ident, Expr)>,
    /// Where the `state` statement is.
    pub span: Span,
}

/// A declaration instantiated with concrete hyper-parameters.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The declaration's name.
    pub decl_name: String,
    /// Recurrence or attention.
    pub kind: DeclKind,
    /// Every hyper-parameter with its value, in declaration order.
    pub params: Vec<(String, Value)>,
    /// Every `let`, in order.
    pub lets: Vec<(String, Value)>,
    /// The number of heads.
    pub heads: u64,
    /// Weights in declaration order.
    pub weights: Vec<WeightSpec>,
    /// The math (recurrences only).
    pub math: Option<Math>,
    /// fla's `model_type` and architecture.
    pub fla: Option<(String, String)>,
}

impl Instance {
    /// A parameter's or a `let`'s value.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.params.iter().chain(self.lets.iter()).find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// Where a mixer is configured in the user's spec, for pointing diagnostics at it.
pub struct UseSite<'a> {
    /// The settings the user wrote.
    pub assigns: &'a [Assign],
    /// The span to blame when no single setting is at fault.
    pub span: Span,
}

/// Instantiates `decl` with the user's settings. Returns the instance or diagnostics.
pub fn instantiate(decl: &Decl, site: &UseSite<'_>, globals: &Env) -> Result<Instance, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let params = param_decls(decl, globals);
    let mut given: HashMap<&str, &Assign> = HashMap::new();
    for a in site.assigns {
        if let Some(prev) = given.insert(a.name.name.as_str(), a) {
            diags.push(
                Diagnostic::error("E0205", format!("`{}` is set twice", a.name.name), a.name.span, "set again here")
                    .with_label(prev.name.span, "first set here"),
            );
        }
        if !params.iter().any(|p| p.name == a.name.name) {
            let mut d = Diagnostic::error(
                "E0203",
                format!("`{}` has no parameter `{}`", decl.name.name, a.name.name),
                a.name.span,
                "unknown parameter",
            );
            if let Some(close) = closest(&a.name.name, params.iter().map(|p| p.name.as_str())) {
                d = d.with_hint(format!("did you mean `{close}`?"));
            }
            let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
            d = d.with_note(format!("`{}` takes: {}", decl.name.name, names.join(", ")));
            diags.push(d);
        }
    }
    let mut env = globals.clone();
    let mut values = Vec::new();
    for p in &params {
        let value = match given.get(p.name.as_str()) {
            Some(a) => match eval(&a.value, &env) {
                Ok(v) if v.fits(p.ty) => v,
                Ok(v) => {
                    diags.push(
                        Diagnostic::error(
                            "E0204",
                            format!("`{}` must be {}, found {} `{v}`", p.name, article(p.ty), v.type_name()),
                            a.value.span,
                            format!("expected {}", type_ref_name(p.ty)),
                        )
                        .with_note(format!(
                            "declared as `param {}: {}` in `{}`",
                            p.name,
                            type_ref_name(p.ty),
                            decl.name.name
                        )),
                    );
                    p.default.clone()
                }
                Err(e) => {
                    diags.push(eval_diag(&e));
                    p.default.clone()
                }
            },
            None => p.default.clone(),
        };
        env.insert(p.name.clone(), value.clone());
        values.push((p.name.clone(), value));
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    let mut inst = Instance {
        decl_name: decl.name.name.clone(),
        kind: decl.kind,
        params: values,
        lets: Vec::new(),
        heads: 0,
        weights: Vec::new(),
        math: None,
        fla: None,
    };
    let mut run = Run { env, site, decl, defs: HashMap::new(), diags: Vec::new(), heads_set: false };
    run.stmts(&decl.body, &mut inst);
    if run.diags.is_empty() && !run.heads_set {
        run.diags.push(Diagnostic::error(
            "E0601",
            format!("`{}` does not say how many heads it has", decl.name.name),
            decl.name.span,
            "add `heads = …` to this declaration",
        ));
    }
    if run.diags.is_empty() {
        Ok(inst)
    } else {
        Err(run.diags)
    }
}

fn article(ty: TypeRef) -> String {
    let name = type_ref_name(ty);
    if name.starts_with('i') {
        format!("an {name}")
    } else {
        format!("a {name}")
    }
}

/// Turns an evaluation error into a diagnostic.
pub fn eval_diag(e: &EvalError) -> Diagnostic {
    Diagnostic::error("E0302", format!("cannot evaluate: {}", e.message), e.span, e.message.clone())
}

struct Run<'a> {
    env: Env,
    site: &'a UseSite<'a>,
    decl: &'a Decl,
    defs: HashMap<String, Expr>,
    diags: Vec<Diagnostic>,
    heads_set: bool,
}

impl Run<'_> {
    fn value(&mut self, e: &Expr) -> Option<Value> {
        match eval(e, &self.env) {
            Ok(v) => Some(v),
            Err(err) => {
                self.blame(eval_diag(&err), e);
                None
            }
        }
    }

    /// A positive size.
    fn size(&mut self, e: &Expr, what: &str) -> Option<u64> {
        match self.value(e)? {
            Value::Int(i) if i > 0 => Some(i as u64),
            v => {
                let d = Diagnostic::error("E0302", format!("{what} must be a positive int, found {v}"), e.span, "not a positive int");
                self.blame(d, e);
                None
            }
        }
    }

    /// Reports a diagnostic about the declaration; when the declaration is the prelude's (or any
    /// file other than the spec's mixer block) the user's settings that fed it are labelled too.
    fn blame(&mut self, mut d: Diagnostic, e: &Expr) {
        let mentioned = names_in(e, &self.env, &self.decl.body);
        let culprits: Vec<&Assign> = self.site.assigns.iter().filter(|a| mentioned.contains(&a.name.name)).collect();
        if let Some(first) = culprits.first() {
            // Make the user's setting the primary label; the declaration's text becomes context.
            for l in &mut d.labels {
                l.primary = false;
                if l.message.is_empty() {
                    l.message = "required here".into();
                }
            }
            let mut labels = vec![hlac_grammar::Label { span: first.span, message: "this setting".into(), primary: true }];
            for a in culprits.iter().skip(1) {
                labels.push(hlac_grammar::Label { span: a.span, message: "and this one".into(), primary: false });
            }
            labels.append(&mut d.labels);
            d.labels = labels;
        } else if self.site.span != self.decl.span {
            d = d.with_label(self.site.span, format!("`{}` is used here", self.decl.name.name));
        }
        self.diags.push(d);
    }

    /// Runs statements in order, stopping at the first error: later statements depend on earlier
    /// ones, and their failures would only repeat it.
    fn stmts(&mut self, body: &[Stmt], inst: &mut Instance) {
        for s in body {
            if !self.diags.is_empty() {
                return;
            }
            self.stmt(s, inst);
        }
    }

    fn stmt(&mut self, s: &Stmt, inst: &mut Instance) {
        match &s.kind {
            StmtKind::Param { .. } => {}
            StmtKind::Fla { model_type, architecture } => inst.fla = Some((model_type.value.clone(), architecture.value.clone())),
            StmtKind::Let { name, value } => {
                if let Some(v) = self.value(value) {
                    self.env.insert(name.name.clone(), v.clone());
                    inst.lets.push((name.name.clone(), v));
                }
            }
            StmtKind::Require { cond, message } => match self.value(cond) {
                Some(Value::Bool(true)) | None => {}
                Some(Value::Bool(false)) => {
                    let d = Diagnostic::error("E0301", format!("`{}`: {}", self.decl.name.name, message.value), cond.span, "");
                    self.blame(d, cond);
                }
                Some(v) => {
                    let d = Diagnostic::error(
                        "E0601",
                        format!("`require` needs a bool, found {} `{v}`", v.type_name()),
                        cond.span,
                        "not a bool",
                    );
                    self.diags.push(d);
                }
            },
            StmtKind::If { cond, then_body, else_body } => match self.value(cond) {
                Some(Value::Bool(true)) => self.stmts(then_body, inst),
                Some(Value::Bool(false)) => self.stmts(else_body, inst),
                Some(v) => self.diags.push(Diagnostic::error(
                    "E0601",
                    format!("`if` needs a bool, found {} `{v}`", v.type_name()),
                    cond.span,
                    "not a bool",
                )),
                None => {}
            },
            StmtKind::Heads(e) => {
                if let Some(h) = self.size(e, "the number of heads") {
                    inst.heads = h;
                    self.heads_set = true;
                }
            }
            StmtKind::Weight { role, path, shape, bias, shared } => {
                let dims: Vec<Option<u64>> = shape.iter().map(|d| self.size(d, "a weight dimension")).collect();
                let bias = match bias {
                    None => Some(false),
                    Some(c) => match self.value(c) {
                        Some(Value::Bool(b)) => Some(b),
                        Some(_) => {
                            self.diags.push(Diagnostic::error("E0601", "`bias(…)` needs a bool", c.span, "not a bool"));
                            None
                        }
                        None => None,
                    },
                };
                if let (Some(dims), Some(bias)) = (dims.into_iter().collect::<Option<Vec<u64>>>(), bias) {
                    if inst.weights.iter().any(|w| w.name == path.name) {
                        self.diags.push(Diagnostic::error(
                            "E0601",
                            format!("weight `{}` is declared twice", path.name),
                            path.span,
                            "declared again here",
                        ));
                    }
                    inst.weights.push(WeightSpec { name: path.name.clone(), role: *role, shape: dims, bias, shared: *shared });
                }
            }
            StmtKind::State { name, key, value } => {
                if inst.kind == DeclKind::Attention {
                    self.not_in_attention(s);
                    return;
                }
                let k = self.size(&key.size, "the key axis");
                let v = self.size(&value.size, "the value axis");
                if let (Some(k), Some(v)) = (k, v) {
                    if inst.math.is_some() {
                        self.diags.push(Diagnostic::error("E0502", "a recurrence has exactly one state", name.span, "second state"));
                        return;
                    }
                    inst.math = Some(Math {
                        state: name.clone(),
                        key_axis: (key.name.name.clone(), k),
                        value_axis: (value.name.name.clone(), v),
                        tokens: Vec::new(),
                        head_params: Vec::new(),
                        update: None,
                        output: None,
                        span: s.span,
                    });
                }
            }
            StmtKind::Token(_) | StmtKind::Head(_) | StmtKind::Def { .. } | StmtKind::Update { .. } | StmtKind::Output { .. } => {
                if inst.kind == DeclKind::Attention {
                    self.not_in_attention(s);
                    return;
                }
                let Some(math) = inst.math.as_mut() else {
                    self.diags.push(Diagnostic::error(
                        "E0502",
                        "the math of a recurrence must come after its `state`",
                        s.span,
                        "no `state` declared before this",
                    ));
                    return;
                };
                match &s.kind {
                    StmtKind::Token(tokens) => math.tokens.extend(tokens.iter().cloned()),
                    StmtKind::Head(names) => math.head_params.extend(names.iter().cloned()),
                    StmtKind::Def { name, value } => {
                        let inlined = inline(value, &self.defs);
                        self.defs.insert(name.name.clone(), inlined);
                    }
                    StmtKind::Update { target, value } => math.update = Some((target.clone(), inline(value, &self.defs))),
                    StmtKind::Output { target, value } => math.output = Some((target.clone(), inline(value, &self.defs))),
                    _ => {}
                }
            }
        }
    }

    fn not_in_attention(&mut self, s: &Stmt) {
        self.diags.push(Diagnostic::error(
            "E0502",
            "an `attention` declaration has no recurrence math",
            s.span,
            "only allowed in a `recurrence`",
        ));
    }
}

/// Replaces every name bound by a `def` with its (already inlined) definition, in parentheses so
/// that precedence is kept when the result is printed.
fn inline(e: &Expr, defs: &HashMap<String, Expr>) -> Expr {
    let kind = match &e.kind {
        ExprKind::Name(n) => match defs.get(n) {
            Some(d) => {
                return match d.kind {
                    ExprKind::Binary { .. } | ExprKind::Unary { .. } => Expr { kind: ExprKind::Paren(Box::new(d.clone())), span: d.span },
                    _ => d.clone(),
                }
            }
            None => ExprKind::Name(n.clone()),
        },
        ExprKind::Call { func, args } => ExprKind::Call { func: func.clone(), args: args.iter().map(|a| inline(a, defs)).collect() },
        ExprKind::Unary { op, operand } => ExprKind::Unary { op: *op, operand: Box::new(inline(operand, defs)) },
        ExprKind::Binary { op, lhs, rhs } => {
            ExprKind::Binary { op: *op, lhs: Box::new(inline(lhs, defs)), rhs: Box::new(inline(rhs, defs)) }
        }
        ExprKind::Transpose(x) => ExprKind::Transpose(Box::new(inline(x, defs))),
        ExprKind::Paren(x) => ExprKind::Paren(Box::new(inline(x, defs))),
        other => other.clone(),
    };
    Expr { kind, span: e.span }
}

/// The parameter names an expression depends on, following `let`s back to parameters.
fn names_in(e: &Expr, env: &Env, body: &[Stmt]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![e.clone()];
    let lets = collect_lets(body);
    let mut seen = std::collections::HashSet::new();
    while let Some(x) = stack.pop() {
        walk(&x, &mut |n| {
            if !seen.insert(n.to_string()) {
                return;
            }
            if let Some(def) = lets.get(n) {
                stack.push((*def).clone());
            } else if env.contains_key(n) {
                out.push(n.to_string());
            }
        });
    }
    out
}

fn collect_lets(body: &[Stmt]) -> HashMap<String, &Expr> {
    let mut out = HashMap::new();
    for s in body {
        match &s.kind {
            StmtKind::Let { name, value } => {
                out.insert(name.name.clone(), value);
            }
            StmtKind::If { then_body, else_body, .. } => {
                out.extend(collect_lets(then_body));
                out.extend(collect_lets(else_body));
            }
            _ => {}
        }
    }
    out
}

/// Calls `f` on every name an expression mentions.
pub fn walk(e: &Expr, f: &mut impl FnMut(&str)) {
    match &e.kind {
        ExprKind::Name(n) => f(n),
        ExprKind::Call { args, .. } => args.iter().for_each(|a| walk(a, f)),
        ExprKind::Unary { operand, .. } => walk(operand, f),
        ExprKind::Binary { lhs, rhs, .. } => {
            walk(lhs, f);
            walk(rhs, f);
        }
        ExprKind::Transpose(x) | ExprKind::Paren(x) => walk(x, f),
        _ => {}
    }
}

/// The candidate closest to `name` by edit distance, if any is close enough to suggest.
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Checks the declaration's own consistency, independent of any model: default values fit their
/// types and every name in it is known. Run once per declaration.
pub fn check_decl(decl: &Decl, globals: &Env) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let mut seen: HashMap<&str, Span> = HashMap::new();
    let mut env = globals.clone();
    for s in &decl.body {
        if let StmtKind::Param { name, ty, default } = &s.kind {
            if let Some(prev) = seen.insert(&name.name, name.span) {
                diags.push(
                    Diagnostic::error("E0601", format!("parameter `{}` is declared twice", name.name), name.span, "declared again")
                        .with_label(prev, "first declared here"),
                );
            }
            match eval(default, &env) {
                Ok(v) if v.fits(*ty) => {
                    env.insert(name.name.clone(), v);
                }
                Ok(v) => diags.push(Diagnostic::error(
                    "E0204",
                    format!("the default of `{}` must be {}, found {} `{v}`", name.name, article(*ty), v.type_name()),
                    default.span,
                    format!("expected {}", type_ref_name(*ty)),
                )),
                Err(e) => diags.push(eval_diag(&e)),
            }
        }
    }
    diags
}

/// The token inputs' producing weight names (`from`, or `<name>_proj`).
pub fn token_source(t: &TokenDecl) -> String {
    t.from.as_ref().map_or_else(|| format!("{}_proj", t.name.name), |f| f.name.clone())
}
