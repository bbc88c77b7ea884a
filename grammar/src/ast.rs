//! The typed syntax tree of a `.hla` file. Every node keeps the [`Span`] it came from so that
//! later stages can point diagnostics at the user's text. No pest type appears here.

use crate::Span;

/// An identifier with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    /// The identifier's text.
    pub name: String,
    /// Where it was written.
    pub span: Span,
}

/// A string literal (without quotes) with its location.
#[derive(Debug, Clone, PartialEq)]
pub struct StrLit {
    /// The text between the quotes.
    pub value: String,
    /// The span of the whole literal, quotes included.
    pub span: Span,
}

/// A comment, kept for the formatter.
#[derive(Debug, Clone, PartialEq)]
pub struct Comment {
    /// The comment's text including its `//` or `/* */` delimiters.
    pub text: String,
    /// Where it was written.
    pub span: Span,
}

/// One parsed source file.
#[derive(Debug, Clone, PartialEq)]
pub struct File {
    /// Top-level items in source order.
    pub items: Vec<Item>,
    /// Every comment in source order (the parser skips them; the formatter puts them back).
    pub comments: Vec<Comment>,
}

/// A top-level item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `import "other.hla"`
    Import(Import),
    /// `recurrence Name { … }` or `attention Name { … }`
    Decl(Decl),
    /// `model name { … }`
    Model(Model),
    /// `target { … }`
    Target(Target),
}

impl Item {
    /// The item's whole span.
    pub fn span(&self) -> Span {
        match self {
            Item::Import(i) => i.span,
            Item::Decl(d) => d.span,
            Item::Model(m) => m.span,
            Item::Target(t) => t.span,
        }
    }
}

/// `import "path"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    /// The path, relative to the importing file.
    pub path: StrLit,
    /// The whole statement.
    pub span: Span,
}

/// Which kind of mixer a declaration introduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclKind {
    /// A linear recurrence, classified into the algebra of design.md.
    Recurrence,
    /// Softmax attention, implemented natively by the compiler.
    Attention,
}

/// A mixer declaration: hyper-parameters, sizes, weights and (for recurrences) the math.
#[derive(Debug, Clone, PartialEq)]
pub struct Decl {
    /// Recurrence or attention.
    pub kind: DeclKind,
    /// The name used in patterns and `mixer` blocks.
    pub name: Ident,
    /// Statements in source order.
    pub body: Vec<Stmt>,
    /// The whole declaration.
    pub span: Span,
}

/// The value type of a declared hyper-parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    /// A whole number.
    Int,
    /// A real number (an integer literal is accepted).
    Float,
    /// `true` or `false`.
    Bool,
    /// A string.
    Str,
}

/// A parameter type: a scalar type, optionally allowing `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeRef {
    /// The underlying type.
    pub scalar: ScalarType,
    /// Whether `none` is a valid value (`int?`).
    pub optional: bool,
}

/// The role a weight plays; it decides how it is counted (FLOPs) and initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightRole {
    /// A matrix applied to every token, `[out, in]` as in PyTorch.
    Linear,
    /// The scale vector of a normalisation.
    Norm,
    /// A depthwise causal convolution, `[channels, 1, width]`.
    Conv,
    /// Any other learned tensor (e.g. per-head gate parameters).
    Weight,
}

/// One token input of a recurrence: `q[K] from q_proj`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDecl {
    /// The name used in gate, update and output expressions.
    pub name: Ident,
    /// The state axis it spans (`K` or `V`); `None` for one scalar per head.
    pub dim: Option<Ident>,
    /// The weight that produces it; defaults to `<name>_proj`.
    pub from: Option<Ident>,
    /// The whole declaration.
    pub span: Span,
}

/// One axis of the state: `K = head_k_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDim {
    /// The axis name used by token declarations.
    pub name: Ident,
    /// Its size, an expression over the hyper-parameters.
    pub size: Expr,
}

/// A statement inside a mixer declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    /// What the statement says.
    pub kind: StmtKind,
    /// The whole statement.
    pub span: Span,
}

/// The statement forms of a mixer declaration.
#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// `param name: type = default`
    Param {
        /// The parameter's name (also its fla config key).
        name: Ident,
        /// Its type.
        ty: TypeRef,
        /// Its default value.
        default: Expr,
    },
    /// `let name = expr`: a size derived from the parameters.
    Let {
        /// The name bound.
        name: Ident,
        /// Its value.
        value: Expr,
    },
    /// `heads = expr`: how many independent states a layer holds.
    Heads(Expr),
    /// `state S[K = …, V = …]`
    State {
        /// The state's name.
        name: Ident,
        /// The key axis.
        key: StateDim,
        /// The value axis.
        value: StateDim,
    },
    /// `token q[K], k[K], v[V], a`
    Token(Vec<TokenDecl>),
    /// `head A_log, dt_bias`: learned per-head scalars.
    Head(Vec<Ident>),
    /// `def alpha = expr`: a per-token quantity (a gate, a normalised key) used by the math.
    Def {
        /// The name bound.
        name: Ident,
        /// Its definition.
        value: Expr,
    },
    /// `update S = expr`
    Update {
        /// The state being updated.
        target: Ident,
        /// The new state.
        value: Expr,
    },
    /// `output o = expr`
    Output {
        /// The output's name.
        target: Ident,
        /// How it is read from the state.
        value: Expr,
    },
    /// `linear q_proj [out, in] bias`
    Weight {
        /// What the tensor is for.
        role: WeightRole,
        /// Its name after the layer prefix, e.g. `gk_proj.0`.
        path: Ident,
        /// Its shape.
        shape: Vec<Expr>,
        /// Whether it has a bias vector `<path>.bias`: `bias` alone is `true`; `bias(c)` is `c`.
        bias: Option<Expr>,
        /// `shared`: one tensor for the whole model (`model.<path>`), not one per layer.
        shared: bool,
    },
    /// `if cond { … } else { … }`
    If {
        /// A boolean expression over the hyper-parameters.
        cond: Expr,
        /// Statements when true.
        then_body: Vec<Stmt>,
        /// Statements when false.
        else_body: Vec<Stmt>,
    },
    /// `require cond else "message"`
    Require {
        /// What must hold.
        cond: Expr,
        /// What to tell the user when it does not.
        message: StrLit,
    },
    /// `fla "model_type", "Architecture"`: how the mixer appears in fla configs.
    Fla {
        /// fla's `model_type`.
        model_type: StrLit,
        /// The Hugging Face architecture class name.
        architecture: StrLit,
    },
}

/// `model name { … }`
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The model's name.
    pub name: Ident,
    /// Statements in source order.
    pub body: Vec<ModelStmt>,
    /// The whole item.
    pub span: Span,
}

/// `name = expr`
#[derive(Debug, Clone, PartialEq)]
pub struct Assign {
    /// The setting's name.
    pub name: Ident,
    /// Its value.
    pub value: Expr,
    /// The whole assignment.
    pub span: Span,
}

/// A statement inside a model.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelStmt {
    /// A model setting such as `hidden_size = 1024`.
    Assign(Assign),
    /// `pattern = [GDN x 3, Attn x 1] x 6`
    Pattern {
        /// The layer sequence.
        pattern: PatternSeq,
        /// The whole statement.
        span: Span,
    },
    /// `mlp { hidden_ratio = 4 }`
    Mlp {
        /// Its settings.
        assigns: Vec<Assign>,
        /// The whole block.
        span: Span,
    },
    /// `fla { fuse_norm = true }`: fla config keys hlac keeps for `export-config` but does not interpret.
    Fla {
        /// The keys and values.
        assigns: Vec<Assign>,
        /// The whole block.
        span: Span,
    },
    /// `mixer GDN { … }` or `mixer wide = GDN { … }`
    Mixer {
        /// The name patterns use.
        name: Ident,
        /// The declared mixer it configures, when it differs from `name`.
        kind: Option<Ident>,
        /// Hyper-parameter settings.
        assigns: Vec<Assign>,
        /// The whole block.
        span: Span,
    },
}

impl ModelStmt {
    /// The statement's whole span.
    pub fn span(&self) -> Span {
        match self {
            ModelStmt::Assign(a) => a.span,
            ModelStmt::Pattern { span, .. } | ModelStmt::Mlp { span, .. } | ModelStmt::Fla { span, .. } | ModelStmt::Mixer { span, .. } => {
                *span
            }
        }
    }
}

/// `target { device = sm_90 … }`
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Its settings.
    pub assigns: Vec<Assign>,
    /// The whole item.
    pub span: Span,
}

/// A comma-separated sequence of pattern terms.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternSeq {
    /// The terms in order.
    pub terms: Vec<PatternTerm>,
    /// The whole sequence.
    pub span: Span,
}

/// A mixer name or a bracketed group, optionally repeated.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternTerm {
    /// What is repeated.
    pub atom: PatternAtom,
    /// `× n`, with the span of `n`.
    pub repeat: Option<(u64, Span)>,
    /// The whole term.
    pub span: Span,
}

/// The thing a pattern term repeats.
#[derive(Debug, Clone, PartialEq)]
pub enum PatternAtom {
    /// One layer of the named mixer.
    Mixer(Ident),
    /// A bracketed sub-sequence.
    Group(PatternSeq),
}

/// An expression with its span.
#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    /// What it says.
    pub kind: ExprKind,
    /// Where it was written.
    pub span: Span,
}

/// Binary operators, loosest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    /// `||`
    Or,
    /// `&&`
    And,
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `>`
    Gt,
    /// `<=`
    Le,
    /// `>=`
    Ge,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*` (scalar, elementwise-by-scalar or matrix product, by shape)
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
}

impl BinOp {
    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Gt => ">",
            BinOp::Le => "<=",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }

    /// Binding strength: higher binds tighter.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::Ne => 3,
            BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => 4,
            BinOp::Add | BinOp::Sub => 5,
            BinOp::Mul | BinOp::Div | BinOp::Rem => 6,
        }
    }
}

/// Unary prefix operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnOp {
    /// `-x`
    Neg,
    /// `!x`
    Not,
}

/// The expression forms.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    /// A number; `text` keeps its spelling (`1e-6`) for the formatter.
    Number {
        /// As written.
        text: String,
        /// Its value.
        value: f64,
        /// Whether it was written as an integer (no `.` or exponent).
        is_int: bool,
    },
    /// `true` / `false`
    Bool(bool),
    /// `none`
    None,
    /// A string literal.
    Str(String),
    /// A name.
    Name(String),
    /// `f(a, b)`
    Call {
        /// The function.
        func: Ident,
        /// Its arguments.
        args: Vec<Expr>,
    },
    /// `-x`, `!x`
    Unary {
        /// The operator.
        op: UnOp,
        /// Its operand.
        operand: Box<Expr>,
    },
    /// `a op b`
    Binary {
        /// The operator.
        op: BinOp,
        /// Left operand.
        lhs: Box<Expr>,
        /// Right operand.
        rhs: Box<Expr>,
    },
    /// `x^T`
    Transpose(Box<Expr>),
    /// `(x)`, kept so the formatter preserves the user's grouping.
    Paren(Box<Expr>),
}
