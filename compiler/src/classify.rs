//! Classifies the per-head math of a recurrence into the algebra of design.md:
//!
//! ```text
//! S ← D · (I − β k kᵀ)^δ · S + β^δ · k vᵀ          o = c · Sᵀ q
//! ```
//!
//! where the decay D is none, a fixed scalar per head, a data-dependent scalar, or a diagonal over
//! K (`diag(α)`); the delta correction (δ) is present or not; the key k is a token input (possibly
//! through an elementwise feature map such as `l2norm`, `silu` or `rope`) or `1 − α`; and c is a
//! constant scale. A recurrence outside this form is rejected with a diagnostic that points at the
//! term that is not supported. The result drives the choice of chunked algorithm in later stages.

use std::collections::HashMap;
use std::fmt;

use hlac_grammar::ast::{BinOp, Expr, ExprKind, UnOp};
use hlac_grammar::fmt::format_expr;
use hlac_grammar::{Diagnostic, Span};

use crate::mixer::Math;

/// A state axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    K,
    V,
}

/// The shape of a per-head quantity. Vectors are columns; `Row` is a transposed vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scalar,
    Col(Axis),
    Row(Axis),
    Mat(Axis, Axis),
    /// `I`, whose size is taken from context.
    Identity,
}

/// What a quantity depends on, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Dep {
    Const,
    Head,
    Token,
    State,
}

#[derive(Debug, Clone, Copy)]
struct Ty {
    shape: Shape,
    dep: Dep,
}

/// How the state decays between tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", content = "expr", rename_all = "snake_case")]
pub enum Decay {
    /// No decay (α = 1).
    None,
    /// A scalar per head that does not depend on the data (RetNet's γ_h).
    FixedScalar(String),
    /// A scalar per head and token (GDN, HGRN).
    DataScalar(String),
    /// A diagonal over K per head and token (GLA, HGRN2).
    DataVector(String),
    /// A diagonal over K that does not depend on the data.
    FixedVector(String),
}

/// Where the key of the write term comes from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeySource {
    /// A token input, possibly through an elementwise feature map.
    Input {
        /// The token inputs it reads.
        inputs: Vec<String>,
        /// The expression.
        expr: String,
    },
    /// `1 − α`, coupled to the decay (HGRN, HGRN2).
    OneMinusDecay,
}

/// A recurrence placed in the algebra.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecurrenceClass {
    /// The decay.
    pub decay: Decay,
    /// Whether the delta-rule correction is present.
    pub delta_rule: bool,
    /// The write strength β (delta rule), if any.
    pub beta: Option<String>,
    /// The key.
    pub key: KeySource,
    /// The value expression.
    pub value: String,
    /// The query expression (`None` when the state is read out directly, K = 1).
    pub query: Option<String>,
    /// The read-out scale.
    pub scale: Option<String>,
    /// K = V = 1: an elementwise scan (HGRN).
    pub elementwise: bool,
    /// The chunked algorithm family the kernels use.
    pub family: Family,
    /// The same terms as expressions over the recurrence's names, for lowering to kernels.
    #[serde(skip)]
    pub exprs: ClassExprs,
}

/// The terms of a classified recurrence as expressions (with every `def` inlined). Names in them
/// are token inputs, per-head parameters, `head_index`, `lower_bound` and the state's axis names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClassExprs {
    /// The decay α: a scalar expression, or the argument of `diag` (a vector over K); `None` when
    /// there is no decay.
    pub decay: Option<Expr>,
    /// The delta rule's β.
    pub beta: Option<Expr>,
    /// The key (a vector over K), including any write strength when there is no delta rule.
    pub key: Option<Expr>,
    /// The value (a vector over V).
    pub value: Option<Expr>,
    /// The query.
    pub query: Option<Expr>,
    /// The read-out scale.
    pub scale: Option<Expr>,
}

/// Which generic chunked algorithm runs a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Decay class: chunked linear attention with gates (RetNet, GLA, HGRN2).
    Decay,
    /// Delta class: WY/UT chunked form (DeltaNet, GDN).
    Delta,
    /// Elementwise scan (HGRN).
    Scan,
}

impl fmt::Display for RecurrenceClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decay = match &self.decay {
            Decay::None => "none".to_string(),
            Decay::FixedScalar(e) => format!("fixed scalar per head: {e}"),
            Decay::DataScalar(e) => format!("data-dependent scalar: {e}"),
            Decay::DataVector(e) => format!("data-dependent vector over K: {e}"),
            Decay::FixedVector(e) => format!("fixed vector over K: {e}"),
        };
        let key = match &self.key {
            KeySource::Input { expr, .. } => format!("token input: {expr}"),
            KeySource::OneMinusDecay => "1 - decay".to_string(),
        };
        write!(f, "family {:?}; decay {decay}; delta rule {}", self.family, if self.delta_rule { "yes" } else { "no" })?;
        if let Some(b) = &self.beta {
            write!(f, " (beta {b})")?;
        }
        write!(f, "; key {key}; value {}", self.value)?;
        if let Some(q) = &self.query {
            write!(f, "; query {q}")?;
        }
        if let Some(s) = &self.scale {
            write!(f, "; scale {s}")?;
        }
        Ok(())
    }
}

const UNSUPPORTED: &str = "E0501";
const MALFORMED: &str = "E0502";

/// Elementwise functions allowed in gates, keys, values and queries.
const ELEMENTWISE: &[&str] = &["exp", "log", "sigmoid", "logsigmoid", "softplus", "silu", "sqrt", "rsqrt", "abs", "tanh"];
/// Feature maps over a whole vector (they need the token's position or all of its channels).
const VECTOR_MAPS: &[&str] = &["l2norm", "rope"];

struct Cx<'a> {
    math: &'a Math,
    names: HashMap<String, Ty>,
    unit_k: bool,
    unit_v: bool,
}

/// Classifies a recurrence, or explains what is outside the algebra.
pub fn classify(math: &Math) -> Result<RecurrenceClass, Vec<Diagnostic>> {
    let unit_k = math.key_axis.1 == 1;
    let unit_v = math.value_axis.1 == 1;
    let mut cx = Cx { math, names: HashMap::new(), unit_k, unit_v };
    let mut diags = Vec::new();
    cx.bind(&math.state.name, Shape::Mat(Axis::K, Axis::V), Dep::State);
    cx.bind(&math.key_axis.0, Shape::Scalar, Dep::Const);
    cx.bind(&math.value_axis.0, Shape::Scalar, Dep::Const);
    cx.bind("head_index", Shape::Scalar, Dep::Head);
    cx.bind("lower_bound", Shape::Col(Axis::K), Dep::Head);
    cx.bind("I", Shape::Identity, Dep::Const);
    for p in &math.head_params {
        cx.bind(&p.name, Shape::Scalar, Dep::Head);
    }
    for t in &math.tokens {
        let shape = match &t.dim {
            None => Shape::Scalar,
            Some(d) if d.name == math.key_axis.0 => Shape::Col(Axis::K),
            Some(d) if d.name == math.value_axis.0 => Shape::Col(Axis::V),
            Some(d) => {
                diags.push(Diagnostic::error(
                    MALFORMED,
                    format!("`{}` is not an axis of the state", d.name),
                    d.span,
                    format!("the state's axes are `{}` and `{}`", math.key_axis.0, math.value_axis.0),
                ));
                continue;
            }
        };
        cx.bind(&t.name.name, shape, Dep::Token);
    }
    let Some((target, update)) = &math.update else {
        diags.push(Diagnostic::error(MALFORMED, "the recurrence has no `update`", math.span, "add `update S = …`"));
        return Err(diags);
    };
    let Some((_, output)) = &math.output else {
        diags.push(Diagnostic::error(MALFORMED, "the recurrence has no `output`", math.span, "add `output o = …`"));
        return Err(diags);
    };
    if target.name != math.state.name {
        diags.push(Diagnostic::error(
            MALFORMED,
            format!("`update` must assign the state `{}`", math.state.name),
            target.span,
            "not the state",
        ));
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    // Type both sides first: shape errors are reported before structural ones.
    let ty = cx.ty(update).map_err(|d| vec![d])?;
    if !cx.same(ty.shape, Shape::Mat(Axis::K, Axis::V)) {
        return Err(vec![Diagnostic::error(
            MALFORMED,
            format!("the update must produce a {} state, found {}", cx.describe(Shape::Mat(Axis::K, Axis::V)), cx.describe(ty.shape)),
            update.span,
            "wrong shape",
        )]);
    }
    cx.ty(output).map_err(|d| vec![d])?;
    let update_class = cx.update(update).map_err(|d| vec![d])?;
    let ReadOut { query, scale, query_expr, scale_expr } = cx.output(output).map_err(|d| vec![d])?;
    let exprs = ClassExprs { query: query_expr, scale: scale_expr, ..update_class.exprs.clone() };
    Ok(RecurrenceClass { query, scale, exprs, ..update_class })
}

fn unsupported(span: Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
    Diagnostic::error(UNSUPPORTED, message, span, label)
        .with_note("hlac supports S = D (I - beta k k^T)? S + beta? k v^T with D none, a scalar, or diag(vector over K), and o = c S^T q")
}

/// Strips redundant parentheses.
fn bare(e: &Expr) -> &Expr {
    match &e.kind {
        ExprKind::Paren(x) => bare(x),
        _ => e,
    }
}

/// Splits a sum into signed terms.
fn terms(e: &Expr, positive: bool, out: &mut Vec<(bool, Expr)>) {
    match &bare(e).kind {
        ExprKind::Binary { op: BinOp::Add, lhs, rhs } => {
            terms(lhs, positive, out);
            terms(rhs, positive, out);
        }
        ExprKind::Binary { op: BinOp::Sub, lhs, rhs } => {
            terms(lhs, positive, out);
            terms(rhs, !positive, out);
        }
        _ => out.push((positive, bare(e).clone())),
    }
}

/// Splits a product into factors, left to right; divisors are kept as `(expr, true)`.
fn factors(e: &Expr, out: &mut Vec<(Expr, bool)>) {
    match &bare(e).kind {
        ExprKind::Binary { op: BinOp::Mul, lhs, rhs } => {
            factors(lhs, out);
            factors(rhs, out);
        }
        ExprKind::Binary { op: BinOp::Div, lhs, rhs } => {
            factors(lhs, out);
            out.push((bare(rhs).clone(), true));
        }
        _ => out.push((bare(e).clone(), false)),
    }
}

fn text(e: &Expr) -> String {
    format_expr(e)
}

/// Rebuilds a product (with divisors) from its factors, left to right.
fn product_expr(fs: &[&(Expr, bool)]) -> Option<Expr> {
    let mut acc: Option<Expr> = None;
    for (e, div) in fs {
        let e = e.clone();
        acc = Some(match acc {
            None if *div => {
                let one = Expr { kind: ExprKind::Number { text: "1".into(), value: 1.0, is_int: true }, span: e.span };
                binary(BinOp::Div, one, e)
            }
            None => e,
            Some(a) => binary(if *div { BinOp::Div } else { BinOp::Mul }, a, e),
        });
    }
    acc
}

fn binary(op: BinOp, lhs: Expr, rhs: Expr) -> Expr {
    let span = lhs.span.to(rhs.span);
    Expr { kind: ExprKind::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }, span }
}

fn product_text(fs: &[&(Expr, bool)]) -> String {
    let mut s = String::new();
    for (i, (e, div)) in fs.iter().enumerate() {
        if i > 0 || *div {
            s.push_str(if *div { " / " } else { " * " });
        }
        let t = text(e);
        if matches!(e.kind, ExprKind::Binary { .. }) {
            s.push_str(&format!("({t})"));
        } else {
            s.push_str(&t);
        }
    }
    s
}

impl Cx<'_> {
    fn bind(&mut self, name: &str, shape: Shape, dep: Dep) {
        let shape = self.norm(shape);
        self.names.insert(name.to_string(), Ty { shape, dep });
    }

    fn unit(&self, a: Axis) -> bool {
        match a {
            Axis::K => self.unit_k,
            Axis::V => self.unit_v,
        }
    }

    /// Collapses unit axes: with K = 1 a vector over K is a scalar.
    fn norm(&self, s: Shape) -> Shape {
        match s {
            Shape::Col(a) | Shape::Row(a) if self.unit(a) => Shape::Scalar,
            Shape::Mat(a, b) if self.unit(a) && self.unit(b) => Shape::Scalar,
            Shape::Mat(a, b) if self.unit(a) => Shape::Row(b),
            Shape::Mat(a, b) if self.unit(b) => Shape::Col(a),
            s => s,
        }
    }

    fn same(&self, a: Shape, b: Shape) -> bool {
        self.norm(a) == self.norm(b)
    }

    fn axis_name(&self, a: Axis) -> &str {
        match a {
            Axis::K => &self.math.key_axis.0,
            Axis::V => &self.math.value_axis.0,
        }
    }

    fn describe(&self, s: Shape) -> String {
        match self.norm(s) {
            Shape::Scalar => "scalar".into(),
            Shape::Col(a) => format!("vector over {}", self.axis_name(a)),
            Shape::Row(a) => format!("transposed vector over {}", self.axis_name(a)),
            Shape::Mat(a, b) => format!("{}×{} matrix", self.axis_name(a), self.axis_name(b)),
            Shape::Identity => "identity".into(),
        }
    }

    fn ty(&self, e: &Expr) -> Result<Ty, Diagnostic> {
        let konst = |shape| Ok(Ty { shape, dep: Dep::Const });
        match &e.kind {
            ExprKind::Number { .. } => konst(Shape::Scalar),
            ExprKind::Bool(_) | ExprKind::None | ExprKind::Str(_) => {
                Err(Diagnostic::error(MALFORMED, "only numbers may appear in the math of a recurrence", e.span, "not a number"))
            }
            ExprKind::Name(n) => self.names.get(n).copied().ok_or_else(|| {
                let mut d = Diagnostic::error(MALFORMED, format!("unknown name `{n}` in the recurrence"), e.span, "not declared");
                if let Some(c) = crate::mixer::closest(n, self.names.keys().map(String::as_str)) {
                    d = d.with_hint(format!("did you mean `{c}`?"));
                } else {
                    d = d.with_hint("declare it with `token`, `head` or `def`");
                }
                d
            }),
            ExprKind::Paren(x) => self.ty(x),
            ExprKind::Transpose(x) => {
                let t = self.ty(x)?;
                let shape = match t.shape {
                    Shape::Col(a) => Shape::Row(a),
                    Shape::Row(a) => Shape::Col(a),
                    Shape::Mat(a, b) => Shape::Mat(b, a),
                    s => s,
                };
                Ok(Ty { shape: self.norm(shape), dep: t.dep })
            }
            ExprKind::Unary { op, operand } => {
                let t = self.ty(operand)?;
                if *op == UnOp::Not {
                    return Err(Diagnostic::error(MALFORMED, "`!` has no meaning in the math", e.span, "not a number"));
                }
                Ok(t)
            }
            ExprKind::Call { func, args } => {
                let name = func.name.as_str();
                if !(ELEMENTWISE.contains(&name) || VECTOR_MAPS.contains(&name) || name == "diag" || name == "pow") {
                    let known: Vec<&str> = ELEMENTWISE.iter().chain(VECTOR_MAPS).chain(&["diag", "pow"]).copied().collect();
                    let mut d = Diagnostic::error(
                        UNSUPPORTED,
                        format!("unknown function `{name}` in the recurrence"),
                        func.span,
                        "not a function hlac can fuse",
                    );
                    if let Some(c) = crate::mixer::closest(name, known.iter().copied()) {
                        d = d.with_hint(format!("did you mean `{c}`?"));
                    }
                    return Err(d.with_note(format!("available: {}", known.join(", "))));
                }
                let want = if name == "pow" { 2 } else { 1 };
                if args.len() != want {
                    return Err(Diagnostic::error(
                        MALFORMED,
                        format!("`{name}` takes {want} argument(s), found {}", args.len()),
                        e.span,
                        "wrong number of arguments",
                    ));
                }
                let tys: Vec<Ty> = args.iter().map(|a| self.ty(a)).collect::<Result<_, _>>()?;
                let dep = tys.iter().map(|t| t.dep).max().unwrap_or(Dep::Const);
                if dep == Dep::State {
                    return Err(unsupported(
                        e.span,
                        format!("`{name}` of the state makes the recurrence nonlinear"),
                        "nonlinear in the state",
                    ));
                }
                match name {
                    "diag" => match tys[0].shape {
                        Shape::Col(a) => Ok(Ty { shape: self.norm(Shape::Mat(a, a)), dep }),
                        Shape::Scalar => Ok(Ty { shape: Shape::Scalar, dep }),
                        s => Err(Diagnostic::error(
                            MALFORMED,
                            format!("`diag` needs a vector, found a {}", self.describe(s)),
                            args[0].span,
                            "not a vector",
                        )),
                    },
                    "pow" => {
                        if tys.iter().any(|t| t.shape != Shape::Scalar) {
                            return Err(Diagnostic::error(MALFORMED, "`pow` takes scalars", e.span, "not scalars"));
                        }
                        Ok(Ty { shape: Shape::Scalar, dep })
                    }
                    n if ELEMENTWISE.contains(&n) || VECTOR_MAPS.contains(&n) => match tys[0].shape {
                        Shape::Scalar | Shape::Col(_) | Shape::Row(_) => {
                            Ok(Ty { shape: tys[0].shape, dep: if n == "rope" { Dep::Token.max(dep) } else { dep } })
                        }
                        s => Err(Diagnostic::error(
                            MALFORMED,
                            format!("`{n}` applies to scalars and vectors, found a {}", self.describe(s)),
                            args[0].span,
                            "not a vector",
                        )),
                    },
                    _ => unreachable!("function names are checked above"),
                }
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.ty(lhs)?;
                let b = self.ty(rhs)?;
                let dep = a.dep.max(b.dep);
                if matches!(op, BinOp::Mul | BinOp::Div) && a.dep == Dep::State && b.dep == Dep::State {
                    return Err(unsupported(e.span, "a product of the state with itself is not linear", "quadratic in the state"));
                }
                let mismatch = |what: &str| {
                    Diagnostic::error(
                        MALFORMED,
                        format!("cannot {what} a {} and a {}", self.describe(a.shape), self.describe(b.shape)),
                        e.span,
                        "shapes do not agree",
                    )
                };
                let shape = match op {
                    BinOp::Add | BinOp::Sub => match (a.shape, b.shape) {
                        (x, y) if x == y => x,
                        (Shape::Identity, m @ Shape::Mat(p, q)) | (m @ Shape::Mat(p, q), Shape::Identity) if p == q => m,
                        (Shape::Scalar, v @ (Shape::Col(_) | Shape::Row(_))) | (v @ (Shape::Col(_) | Shape::Row(_)), Shape::Scalar) => v,
                        (Shape::Identity, Shape::Scalar) | (Shape::Scalar, Shape::Identity) => Shape::Scalar,
                        _ => return Err(mismatch("add")),
                    },
                    BinOp::Mul => match (a.shape, b.shape) {
                        (Shape::Scalar, s) | (s, Shape::Scalar) => s,
                        (Shape::Identity, s) | (s, Shape::Identity) => s,
                        // Two vectors over the same axis multiply elementwise.
                        (Shape::Col(x), Shape::Col(y)) if x == y => Shape::Col(x),
                        (Shape::Col(x), Shape::Row(y)) => self.norm(Shape::Mat(x, y)),
                        (Shape::Row(x), Shape::Col(y)) if x == y => Shape::Scalar,
                        (Shape::Mat(x, y), Shape::Mat(p, q)) if y == p => self.norm(Shape::Mat(x, q)),
                        (Shape::Mat(x, y), Shape::Col(p)) if y == p => self.norm(Shape::Col(x)),
                        (Shape::Row(x), Shape::Mat(p, q)) if x == p => self.norm(Shape::Row(q)),
                        _ => return Err(mismatch("multiply")),
                    },
                    BinOp::Div => match b.shape {
                        Shape::Scalar => a.shape,
                        _ if a.shape == b.shape && matches!(a.shape, Shape::Col(_)) => a.shape,
                        _ => return Err(mismatch("divide")),
                    },
                    _ => {
                        return Err(Diagnostic::error(
                            MALFORMED,
                            format!("`{}` has no meaning in the math of a recurrence", op.symbol()),
                            e.span,
                            "not arithmetic",
                        ))
                    }
                };
                if *op == BinOp::Div && b.dep == Dep::State {
                    return Err(unsupported(e.span, "dividing by the state makes the recurrence nonlinear", "nonlinear in the state"));
                }
                Ok(Ty { shape: self.norm(shape), dep })
            }
        }
    }

    fn dep(&self, e: &Expr) -> Dep {
        self.ty(e).map_or(Dep::Token, |t| t.dep)
    }

    fn is_state(&self, e: &Expr) -> bool {
        matches!(&bare(e).kind, ExprKind::Name(n) if *n == self.math.state.name)
    }

    fn update(&self, e: &Expr) -> Result<RecurrenceClass, Diagnostic> {
        let mut ts = Vec::new();
        terms(e, true, &mut ts);
        let (carry, write): (Vec<_>, Vec<_>) = ts.into_iter().partition(|(_, t)| self.dep(t) == Dep::State);
        let Some((carry_sign, carry_term)) = carry.first() else {
            return Err(unsupported(e.span, "the update does not carry the previous state", "the state does not appear here"));
        };
        if let Some((_, extra)) = carry.get(1) {
            return Err(unsupported(extra.span, "the state may appear in only one term of the update", "a second term with the state"));
        }
        let carry = carry_term;
        if !carry_sign {
            return Err(unsupported(carry.span, "the state term must be added, not subtracted", "negated state"));
        }
        // The carry term: scalar and diagonal decays, an optional (I - beta k k^T), then the state.
        let mut fs = Vec::new();
        factors(carry, &mut fs);
        let Some(pos) = fs.iter().position(|(f, _)| self.is_state(f)) else {
            return Err(unsupported(carry.span, "the state must appear as a plain factor of its term", "state inside an expression"));
        };
        if pos + 1 != fs.len() {
            let (right, _) = &fs[pos + 1];
            return Err(unsupported(
                right.span,
                "multiplying the state on the right (mixing its value axis) is not supported",
                "right of the state",
            ));
        }
        let mut scalar_decay: Vec<&(Expr, bool)> = Vec::new();
        let mut vector_decay: Option<Expr> = None;
        let mut delta: Option<(Option<String>, Expr)> = None;
        for f in &fs[..pos] {
            let (fe, div) = f;
            let t = self.ty(fe)?;
            if t.dep == Dep::State {
                return Err(unsupported(fe.span, "the state appears inside its own transition", "nonlinear"));
            }
            match t.shape {
                Shape::Scalar => scalar_decay.push(f),
                Shape::Mat(Axis::K, Axis::K) if *div => {
                    return Err(unsupported(fe.span, "dividing by a matrix is not supported", "matrix division"));
                }
                Shape::Mat(Axis::K, Axis::K) => {
                    if let ExprKind::Call { func, args } = &fe.kind {
                        if func.name == "diag" {
                            if vector_decay.is_some() {
                                return Err(unsupported(fe.span, "only one diagonal decay is supported", "second diagonal"));
                            }
                            vector_decay = Some(args[0].clone());
                            continue;
                        }
                    }
                    if delta.is_some() {
                        return Err(unsupported(fe.span, "only one delta-rule correction is supported", "second correction"));
                    }
                    delta = Some(self.delta_factor(fe)?);
                }
                _ => {
                    return Err(unsupported(
                        fe.span,
                        format!("a {} cannot multiply the state", self.describe(t.shape)),
                        "unsupported transition factor",
                    ));
                }
            }
        }
        if vector_decay.is_some() && delta.is_some() {
            let v = vector_decay.as_ref().map_or(carry.span, |v| v.span);
            return Err(unsupported(
                v,
                "a decay over key channels (diag) together with the delta rule is not in the algebra",
                "vector decay with the delta rule",
            ));
        }
        let decay_text = if scalar_decay.is_empty() { None } else { Some(product_text(&scalar_decay)) };
        let decay_expr = match (product_expr(&scalar_decay), &vector_decay) {
            (Some(s), Some(v)) => Some(binary(BinOp::Mul, s, v.clone())),
            (s, v) => s.or_else(|| v.clone()),
        };
        let scalar_dep = scalar_decay.iter().map(|(f, _)| self.dep(f)).max().unwrap_or(Dep::Const);
        let decay = match (&vector_decay, &decay_text) {
            (Some(v), None) => {
                if self.dep(v) == Dep::Token {
                    Decay::DataVector(text(v))
                } else {
                    Decay::FixedVector(text(v))
                }
            }
            (Some(v), Some(s)) => {
                let t = format!("({s}) * {}", text(v));
                if self.dep(v).max(scalar_dep) == Dep::Token {
                    Decay::DataVector(t)
                } else {
                    Decay::FixedVector(t)
                }
            }
            (None, None) => Decay::None,
            (None, Some(s)) if scalar_dep == Dep::Const && is_one(s) => Decay::None,
            (None, Some(s)) if scalar_dep == Dep::Token => Decay::DataScalar(s.clone()),
            (None, Some(s)) => Decay::FixedScalar(s.clone()),
        };

        // The write term: beta? * key * value^T.
        let [(write_sign, write)] = write.as_slice() else {
            let span = write.get(1).map_or(e.span, |(_, w)| w.span);
            let msg = if write.is_empty() {
                "the update has no write term `k * v^T`"
            } else {
                "the update may have only one write term `k * v^T`"
            };
            return Err(unsupported(span, msg, "here"));
        };
        if !write_sign {
            return Err(unsupported(write.span, "the write term must be added, not subtracted", "negated write"));
        }
        let mut wf = Vec::new();
        factors(write, &mut wf);
        let mut value = None;
        let mut key_parts: Vec<&(Expr, bool)> = Vec::new();
        let mut coeff: Vec<&(Expr, bool)> = Vec::new();
        for f in &wf {
            let (fe, div) = f;
            let t = self.ty(fe)?;
            let is_value = matches!(fe.kind, ExprKind::Transpose(_)) && !div;
            if is_value {
                if value.is_some() {
                    return Err(unsupported(fe.span, "the write term has more than one transposed factor", "second value"));
                }
                value = Some(match &fe.kind {
                    ExprKind::Transpose(inner) => (**inner).clone(),
                    _ => fe.clone(),
                });
            } else if t.shape == Shape::Col(Axis::K) || (self.unit_k && t.dep == Dep::Token) {
                key_parts.push(f);
            } else if t.shape == Shape::Scalar {
                coeff.push(f);
            } else {
                return Err(unsupported(
                    fe.span,
                    format!("a {} cannot be part of the write term `k * v^T`", self.describe(t.shape)),
                    "unexpected factor",
                ));
            }
        }
        let Some(value) = value else {
            return Err(unsupported(
                write.span,
                "the write term must be an outer product `k * v^T` (the value is the transposed factor)",
                "no `^T` factor",
            ));
        };
        if key_parts.is_empty() {
            return Err(unsupported(write.span, "the write term has no key (a vector over K)", "no key"));
        }
        let key_text = product_text(&key_parts);
        let coeff_text = if coeff.is_empty() { None } else { Some(product_text(&coeff)) };

        let (delta_rule, beta) = match &delta {
            Some((beta, kk)) => {
                if text(kk) != key_text {
                    return Err(unsupported(
                        write.span,
                        format!("the delta rule needs the same key in the correction and the write term (`{}` vs `{key_text}`)", text(kk)),
                        "different key",
                    ));
                }
                if beta != &coeff_text {
                    return Err(unsupported(
                        write.span,
                        "the delta rule needs the same beta in the correction and the write term",
                        "different beta",
                    ));
                }
                (true, beta.clone())
            }
            // Without the delta rule a write strength is simply part of the key.
            None => (false, None),
        };
        let key_expr =
            if delta_rule { product_expr(&key_parts) } else { product_expr(&coeff.iter().chain(&key_parts).copied().collect::<Vec<_>>()) };
        let beta_expr = match &delta {
            Some(_) => product_expr(&coeff),
            None => None,
        };
        let full_key = if delta_rule || coeff_text.is_none() {
            key_text.clone()
        } else {
            format!("{} * {key_text}", coeff_text.clone().unwrap_or_default())
        };
        let one_minus = match &decay {
            Decay::DataScalar(d) | Decay::DataVector(d) => {
                key_text == format!("(1 - {d})") || key_text == format!("1 - {d}") || key_text == format!("(1 - ({d}))")
            }
            _ => false,
        };
        let key = if one_minus && coeff_text.is_none() {
            KeySource::OneMinusDecay
        } else {
            let mut inputs = Vec::new();
            for (f, _) in &key_parts {
                crate::mixer::walk(f, &mut |n| {
                    if self.math.tokens.iter().any(|t| t.name.name == n) && !inputs.iter().any(|i| i == n) {
                        inputs.push(n.to_string());
                    }
                });
            }
            if inputs.is_empty() {
                return Err(unsupported(
                    write.span,
                    "the key must come from the token (a `token` input) or be `1 - decay`",
                    "constant key",
                ));
            }
            KeySource::Input { inputs, expr: full_key }
        };
        let elementwise = self.unit_k && self.unit_v;
        let family = if delta_rule {
            Family::Delta
        } else if elementwise {
            Family::Scan
        } else {
            Family::Decay
        };
        let exprs = ClassExprs {
            decay: if decay == Decay::None { None } else { decay_expr },
            beta: beta_expr,
            key: key_expr,
            value: Some(value.clone()),
            query: None,
            scale: None,
        };
        Ok(RecurrenceClass { decay, delta_rule, beta, key, value: text(&value), query: None, scale: None, elementwise, family, exprs })
    }

    /// `(I - beta * k * k^T)`: returns beta's text and the key expression.
    fn delta_factor(&self, e: &Expr) -> Result<(Option<String>, Expr), Diagnostic> {
        let not_delta = || {
            unsupported(
                e.span,
                "a general matrix transition is not supported; the only matrix allowed is (I - beta * k * k^T)",
                "unsupported transition",
            )
        };
        let ExprKind::Binary { op: BinOp::Sub, lhs, rhs } = &bare(e).kind else {
            return Err(not_delta());
        };
        if !matches!(&bare(lhs).kind, ExprKind::Name(n) if n == "I") {
            return Err(not_delta());
        }
        let mut fs = Vec::new();
        factors(rhs, &mut fs);
        let mut beta = Vec::new();
        let mut col = None;
        let mut row = None;
        for f in &fs {
            let t = self.ty(&f.0)?;
            match (&f.0.kind, t.shape) {
                (ExprKind::Transpose(inner), Shape::Row(Axis::K)) => row = Some((**inner).clone()),
                (_, Shape::Col(Axis::K)) => col = Some(f.0.clone()),
                (_, Shape::Scalar) => beta.push(f),
                _ => return Err(not_delta()),
            }
        }
        let (Some(col), Some(row)) = (col, row) else {
            return Err(not_delta());
        };
        if text(&col) != text(&row) {
            return Err(unsupported(
                rhs.span,
                "the delta correction must be beta * k * k^T with the same k on both sides",
                "different keys",
            ));
        }
        let beta = if beta.is_empty() { None } else { Some(product_text(&beta)) };
        Ok((beta, col))
    }

    /// `S^T * q * c` (or the state itself when K = 1): returns the query and the scale.
    fn output(&self, e: &Expr) -> Result<ReadOut, Diagnostic> {
        let mut fs = Vec::new();
        factors(e, &mut fs);
        let bad =
            |span, msg: &str| unsupported(span, format!("the read-out must be `S^T * q` times a constant: {msg}"), "unsupported read-out");
        let Some(pos) = fs.iter().position(|(f, _)| match &f.kind {
            ExprKind::Transpose(x) => self.is_state(x),
            _ => self.is_state(f),
        }) else {
            return Err(bad(e.span, "the state does not appear"));
        };
        let direct = self.is_state(&fs[pos].0);
        if direct && !self.unit_k {
            return Err(bad(fs[pos].0.span, "read the state as `S^T * q`"));
        }
        let mut query = Vec::new();
        let mut scale = Vec::new();
        for (i, f) in fs.iter().enumerate() {
            if i == pos {
                continue;
            }
            let t = self.ty(&f.0)?;
            if t.dep == Dep::State {
                return Err(bad(f.0.span, "the state appears twice"));
            }
            if t.dep == Dep::Token {
                if i < pos || f.1 {
                    return Err(bad(f.0.span, "the query must come after `S^T` and multiply it"));
                }
                query.push(f);
            } else if t.shape == Shape::Scalar {
                scale.push(f);
            } else {
                return Err(bad(f.0.span, "a constant factor must be a scalar"));
            }
        }
        if !direct && query.is_empty() {
            return Err(bad(e.span, "there is no query"));
        }
        let query_expr = product_expr(&query);
        let scale_expr = product_expr(&scale);
        let query = if query.is_empty() { None } else { Some(product_text(&query)) };
        let scale = if scale.is_empty() {
            None
        } else {
            let t = product_text(&scale);
            Some(if t.starts_with(" / ") { format!("1{t}") } else { t })
        };
        Ok(ReadOut { query, scale, query_expr, scale_expr })
    }
}

/// The read-out `c · Sᵀ q`: its query and scale as text and as expressions.
struct ReadOut {
    query: Option<String>,
    scale: Option<String>,
    query_expr: Option<Expr>,
    scale_expr: Option<Expr>,
}

fn is_one(s: &str) -> bool {
    s == "1" || s == "1.0"
}
