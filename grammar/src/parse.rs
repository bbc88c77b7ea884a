//! Text → typed AST. pest does the recognising; this module turns its pairs into [`crate::ast`]
//! nodes at once (no pest type escapes) and turns pest's errors into [`Diagnostic`]s.

use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;

use crate::ast::*;
use crate::diag::{Diagnostic, FileId, Span};

#[derive(pest_derive::Parser)]
#[grammar = "hla.pest"]
struct HlaParser;

/// Parses one file. On a syntax error returns one diagnostic pointing at it.
pub fn parse(file: FileId, text: &str) -> Result<File, Diagnostic> {
    // pest recurses once per nesting level; refuse absurd nesting before it can exhaust the stack.
    if let Some(offset) = too_deep(text, 200) {
        return Err(Diagnostic::error(
            "E0001",
            "nesting is too deep",
            Span::new(file, offset, offset + 1),
            "more than 200 open brackets here",
        ));
    }
    let mut pairs = HlaParser::parse(Rule::file, text).map_err(|e| syntax_error(file, text, e))?;
    let Some(root) = pairs.next() else {
        return Err(Diagnostic::error_nowhere("E0001", "empty parse"));
    };
    let cx = Cx { file };
    let items = root.into_inner().filter(|p| p.as_rule() != Rule::EOI).map(|p| cx.item(p)).collect();
    Ok(File { items, comments: scan_comments(file, text) })
}

/// Parses a standalone expression (used by `hlac import` and tests).
pub fn parse_expr(file: FileId, text: &str) -> Result<Expr, Diagnostic> {
    let mut pairs = HlaParser::parse(Rule::expr, text).map_err(|e| syntax_error(file, text, e))?;
    let pair = pairs.next().ok_or_else(|| Diagnostic::error_nowhere("E0001", "empty expression"))?;
    if pair.as_span().end() != text.trim_end().len() {
        let at = pair.as_span().end();
        return Err(Diagnostic::error(
            "E0001",
            "syntax error: unexpected text after the expression",
            Span::new(file, at, text.len()),
            "unexpected",
        ));
    }
    Ok(Cx { file }.expr(pair))
}

fn too_deep(text: &str, limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > limit {
                    return Some(i);
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

fn syntax_error(file: FileId, text: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let (start, end) = match e.location {
        InputLocation::Pos(p) => (p, p),
        InputLocation::Span((s, e)) => (s, e),
    };
    // Point at the whole offending word rather than a zero-width position.
    let end = if end > start {
        end
    } else {
        text[start..]
            .char_indices()
            .find(|&(i, c)| i > 0 && !(c.is_alphanumeric() || c == '_') || c.is_whitespace())
            .map_or(text.len(), |(i, _)| start + i)
            .max(start)
    };
    let found = text[start..end].trim();
    let (message, label) = match &e.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut expected: Vec<&str> = positives.iter().filter_map(|r| describe(*r)).collect();
            expected.sort_unstable();
            expected.dedup();
            let what = if found.is_empty() { "end of file".to_string() } else { format!("`{found}`") };
            let label = if expected.is_empty() { "unexpected here".to_string() } else { format!("expected {}", join_or(&expected)) };
            (format!("syntax error: unexpected {what}"), label)
        }
        ErrorVariant::CustomError { message } => (format!("syntax error: {message}"), String::new()),
    };
    let mut d = Diagnostic::error("E0001", message, Span::new(file, start, end), label);
    if found == "×" || found.starts_with('x') {
        d = d.with_hint("a repeat is written `Name x 3` or `[A x 3, B x 1] x 6`");
    }
    if ["recurrence", "attention", "model", "target", "import"].contains(&found) {
        d = d.with_hint("a `}` may be missing before this item");
    }
    d
}

fn join_or(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {}", init.join(", "), last),
    }
}

/// Human names for the rules pest reports as expected; `None` hides internal rules.
fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "end of file",
        Rule::import => "`import`",
        Rule::recurrence => "`recurrence`",
        Rule::attention => "`attention`",
        Rule::model => "`model`",
        Rule::target => "`target`",
        Rule::ident => "a name",
        Rule::path => "a weight name",
        Rule::expr | Rule::number | Rule::paren | Rule::call | Rule::boolean | Rule::none => "an expression",
        Rule::string => "a string",
        Rule::type_ref | Rule::type_name => "a type (int, float, bool, str)",
        Rule::param_stmt
        | Rule::let_stmt
        | Rule::heads_stmt
        | Rule::state_stmt
        | Rule::token_stmt
        | Rule::head_stmt
        | Rule::def_stmt
        | Rule::update_stmt
        | Rule::output_stmt
        | Rule::weight_stmt
        | Rule::weight_role
        | Rule::if_stmt
        | Rule::require_stmt
        | Rule::fla_stmt => "a declaration statement",
        Rule::assign => "a setting `name = value`",
        Rule::pattern_stmt | Rule::mlp_stmt | Rule::mixer_stmt | Rule::fla_block => "a model statement",
        Rule::pattern_seq | Rule::pattern_term | Rule::pattern_group => "a layer pattern",
        Rule::repeat => "a repeat count",
        Rule::or | Rule::and | Rule::eq | Rule::ne | Rule::le | Rule::ge | Rule::lt | Rule::gt => "an operator",
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::rem => "an operator",
        Rule::neg | Rule::not => "an expression",
        Rule::transpose => "`^T`",
        Rule::state_dim => "a state axis `K = size`",
        Rule::token_decl => "a token input",
        Rule::bias_flag => "`bias`",
        Rule::block => "`{`",
        _ => return None,
    })
}

struct Cx {
    file: FileId,
}

impl Cx {
    /// The span of a pair without the whitespace and comments pest lets a rule swallow at its end.
    fn span(&self, p: &Pair<Rule>) -> Span {
        let s = p.as_span();
        Span::new(self.file, s.start(), s.start() + content_len(p.as_str()))
    }

    fn ident(&self, p: Pair<Rule>) -> Ident {
        Ident { name: p.as_str().to_string(), span: self.span(&p) }
    }

    fn string(&self, p: Pair<Rule>) -> StrLit {
        let span = self.span(&p);
        let value = p.into_inner().next().map_or(String::new(), |i| i.as_str().to_string());
        StrLit { value, span }
    }

    fn item(&self, p: Pair<Rule>) -> Item {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::import => {
                let path = self.string(first(p));
                Item::Import(Import { path, span })
            }
            Rule::recurrence | Rule::attention => {
                let kind = if p.as_rule() == Rule::recurrence { DeclKind::Recurrence } else { DeclKind::Attention };
                let mut inner = p.into_inner();
                let name = self.ident(next(&mut inner));
                let body = inner.map(|s| self.stmt(s)).collect();
                Item::Decl(Decl { kind, name, body, span })
            }
            Rule::model => {
                let mut inner = p.into_inner();
                let name = self.ident(next(&mut inner));
                let body = inner.map(|s| self.model_stmt(s)).collect();
                Item::Model(Model { name, body, span })
            }
            Rule::target => Item::Target(Target { assigns: p.into_inner().map(|a| self.assign(a)).collect(), span }),
            r => unreachable!("grammar produced {r:?} as an item"),
        }
    }

    fn stmt(&self, p: Pair<Rule>) -> Stmt {
        let span = self.span(&p);
        let rule = p.as_rule();
        let mut inner = p.into_inner();
        let kind = match rule {
            Rule::param_stmt => {
                let name = self.ident(next(&mut inner));
                let ty_pair = next(&mut inner);
                let mut ty_inner = ty_pair.into_inner();
                let scalar = match next(&mut ty_inner).as_str() {
                    "int" => ScalarType::Int,
                    "float" => ScalarType::Float,
                    "bool" => ScalarType::Bool,
                    _ => ScalarType::Str,
                };
                let optional = ty_inner.next().is_some();
                let default = self.expr(next(&mut inner));
                StmtKind::Param { name, ty: TypeRef { scalar, optional }, default }
            }
            Rule::let_stmt => StmtKind::Let { name: self.ident(next(&mut inner)), value: self.expr(next(&mut inner)) },
            Rule::heads_stmt => StmtKind::Heads(self.expr(next(&mut inner))),
            Rule::state_stmt => {
                let name = self.ident(next(&mut inner));
                let key = self.state_dim(next(&mut inner));
                let value = self.state_dim(next(&mut inner));
                StmtKind::State { name, key, value }
            }
            Rule::token_stmt => StmtKind::Token(inner.map(|t| self.token_decl(t)).collect()),
            Rule::head_stmt => StmtKind::Head(inner.map(|t| self.ident(t)).collect()),
            Rule::def_stmt => StmtKind::Def { name: self.ident(next(&mut inner)), value: self.expr(next(&mut inner)) },
            Rule::update_stmt => StmtKind::Update { target: self.ident(next(&mut inner)), value: self.expr(next(&mut inner)) },
            Rule::output_stmt => StmtKind::Output { target: self.ident(next(&mut inner)), value: self.expr(next(&mut inner)) },
            Rule::weight_stmt => {
                let mut role_pair = next(&mut inner);
                let shared = role_pair.as_rule() == Rule::shared_flag;
                if shared {
                    role_pair = next(&mut inner);
                }
                let role = match role_pair.as_str() {
                    "linear" => WeightRole::Linear,
                    "norm" => WeightRole::Norm,
                    "conv" => WeightRole::Conv,
                    _ => WeightRole::Weight,
                };
                let path = self.ident(next(&mut inner));
                let mut shape = Vec::new();
                let mut bias = None;
                for q in inner {
                    match q.as_rule() {
                        Rule::bias_flag => {
                            let span = self.span(&q);
                            bias = Some(q.into_inner().next().map_or(Expr { kind: ExprKind::Bool(true), span }, |c| self.expr(c)));
                        }
                        _ => shape.push(self.expr(q)),
                    }
                }
                StmtKind::Weight { role, path, shape, bias, shared }
            }
            Rule::if_stmt => {
                let cond = self.expr(next(&mut inner));
                let then_body = self.block(next(&mut inner));
                let else_body = inner.next().map(|b| self.block(b)).unwrap_or_default();
                StmtKind::If { cond, then_body, else_body }
            }
            Rule::require_stmt => StmtKind::Require { cond: self.expr(next(&mut inner)), message: self.string(next(&mut inner)) },
            Rule::fla_stmt => StmtKind::Fla { model_type: self.string(next(&mut inner)), architecture: self.string(next(&mut inner)) },
            r => unreachable!("grammar produced {r:?} as a statement"),
        };
        Stmt { kind, span }
    }

    fn block(&self, p: Pair<Rule>) -> Vec<Stmt> {
        p.into_inner().map(|s| self.stmt(s)).collect()
    }

    fn state_dim(&self, p: Pair<Rule>) -> StateDim {
        let mut inner = p.into_inner();
        StateDim { name: self.ident(next(&mut inner)), size: self.expr(next(&mut inner)) }
    }

    fn token_decl(&self, p: Pair<Rule>) -> TokenDecl {
        let span = self.span(&p);
        let text = p.as_str();
        let has_dim = text.contains('[');
        let mut inner = p.into_inner();
        let name = self.ident(next(&mut inner));
        let dim = if has_dim { inner.next().map(|d| self.ident(d)) } else { None };
        let from = inner.next().map(|f| self.ident(f));
        TokenDecl { name, dim, from, span }
    }

    fn model_stmt(&self, p: Pair<Rule>) -> ModelStmt {
        let span = self.span(&p);
        match p.as_rule() {
            Rule::assign => ModelStmt::Assign(self.assign(p)),
            Rule::pattern_stmt => ModelStmt::Pattern { pattern: self.pattern_seq(first(p)), span },
            Rule::fla_block => ModelStmt::Fla { assigns: p.into_inner().map(|a| self.assign(a)).collect(), span },
            Rule::mlp_stmt => ModelStmt::Mlp { assigns: p.into_inner().map(|a| self.assign(a)).collect(), span },
            Rule::mixer_stmt => {
                let mut name = None;
                let mut kind = None;
                let mut assigns = Vec::new();
                for q in p.into_inner() {
                    match q.as_rule() {
                        Rule::ident if name.is_none() => name = Some(self.ident(q)),
                        Rule::ident => kind = Some(self.ident(q)),
                        _ => assigns.push(self.assign(q)),
                    }
                }
                ModelStmt::Mixer { name: name.unwrap_or_else(|| unreachable!("mixer without a name")), kind, assigns, span }
            }
            r => unreachable!("grammar produced {r:?} as a model statement"),
        }
    }

    fn assign(&self, p: Pair<Rule>) -> Assign {
        let span = self.span(&p);
        let mut inner = p.into_inner();
        Assign { name: self.ident(next(&mut inner)), value: self.expr(next(&mut inner)), span }
    }

    fn pattern_seq(&self, p: Pair<Rule>) -> PatternSeq {
        let span = self.span(&p);
        PatternSeq { terms: p.into_inner().map(|t| self.pattern_term(t)).collect(), span }
    }

    fn pattern_term(&self, p: Pair<Rule>) -> PatternTerm {
        let span = self.span(&p);
        let mut inner = p.into_inner();
        let atom_pair = next(&mut inner);
        let atom = match atom_pair.as_rule() {
            Rule::pattern_group => PatternAtom::Group(self.pattern_seq(first(atom_pair))),
            _ => PatternAtom::Mixer(self.ident(atom_pair)),
        };
        let repeat = inner.next().map(|r| {
            // A count too large for u64 saturates; the checker rejects it by size later.
            (r.as_str().parse::<u64>().unwrap_or(u64::MAX), self.span(&r))
        });
        PatternTerm { atom, repeat, span }
    }

    fn expr(&self, p: Pair<Rule>) -> Expr {
        pratt()
            .map_primary(|q| self.primary(q))
            .map_prefix(|op, operand| {
                let span = self.span(&op).to(operand.span);
                let op = if op.as_rule() == Rule::neg { UnOp::Neg } else { UnOp::Not };
                Expr { kind: ExprKind::Unary { op, operand: Box::new(operand) }, span }
            })
            .map_postfix(|operand, op| {
                let span = operand.span.to(self.span(&op));
                Expr { kind: ExprKind::Transpose(Box::new(operand)), span }
            })
            .map_infix(|lhs, op, rhs| {
                let op = match op.as_rule() {
                    Rule::or => BinOp::Or,
                    Rule::and => BinOp::And,
                    Rule::eq => BinOp::Eq,
                    Rule::ne => BinOp::Ne,
                    Rule::lt => BinOp::Lt,
                    Rule::gt => BinOp::Gt,
                    Rule::le => BinOp::Le,
                    Rule::ge => BinOp::Ge,
                    Rule::add => BinOp::Add,
                    Rule::sub => BinOp::Sub,
                    Rule::mul => BinOp::Mul,
                    Rule::rem => BinOp::Rem,
                    _ => BinOp::Div,
                };
                let span = lhs.span.to(rhs.span);
                Expr { kind: ExprKind::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs) }, span }
            })
            .parse(p.into_inner())
    }

    fn primary(&self, p: Pair<Rule>) -> Expr {
        let span = self.span(&p);
        let kind = match p.as_rule() {
            Rule::number => {
                let text = p.as_str().to_string();
                let is_int = !text.contains(['.', 'e', 'E']);
                // The grammar only admits well-formed decimals; a literal beyond f64 becomes inf
                // and is rejected by the checker.
                let value = text.parse::<f64>().unwrap_or(f64::INFINITY);
                ExprKind::Number { text, value, is_int }
            }
            Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
            Rule::none => ExprKind::None,
            Rule::string => ExprKind::Str(self.string(p).value),
            Rule::ident => ExprKind::Name(p.as_str().to_string()),
            Rule::paren => ExprKind::Paren(Box::new(self.expr(first(p)))),
            Rule::call => {
                let mut inner = p.into_inner();
                let func = self.ident(next(&mut inner));
                ExprKind::Call { func, args: inner.map(|a| self.expr(a)).collect() }
            }
            r => unreachable!("grammar produced {r:?} as a primary"),
        };
        Expr { kind, span }
    }
}

/// The length of `text` once trailing whitespace and trailing comments are removed.
fn content_len(text: &str) -> usize {
    let mut t = text.trim_end();
    loop {
        let line_start = t.rfind('\n').map_or(0, |i| i + 1);
        // A `//` on the last line that is not inside a string starts a comment.
        let last = &t[line_start..];
        let mut in_string = false;
        let mut cut = None;
        for (i, c) in last.char_indices() {
            match c {
                '"' => in_string = !in_string,
                '/' if !in_string && last[i..].starts_with("//") => {
                    cut = Some(line_start + i);
                    break;
                }
                _ => {}
            }
        }
        match cut {
            Some(c) if c > 0 => t = t[..c].trim_end(),
            _ => break,
        }
    }
    if t.is_empty() {
        text.len()
    } else {
        t.len()
    }
}

/// The operator table, built once.
fn pratt() -> &'static PrattParser<Rule> {
    static PRATT: std::sync::OnceLock<PrattParser<Rule>> = std::sync::OnceLock::new();
    PRATT.get_or_init(|| {
        PrattParser::new()
            .op(Op::infix(Rule::or, Assoc::Left))
            .op(Op::infix(Rule::and, Assoc::Left))
            .op(Op::infix(Rule::eq, Assoc::Left) | Op::infix(Rule::ne, Assoc::Left))
            .op(Op::infix(Rule::lt, Assoc::Left)
                | Op::infix(Rule::gt, Assoc::Left)
                | Op::infix(Rule::le, Assoc::Left)
                | Op::infix(Rule::ge, Assoc::Left))
            .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
            .op(Op::infix(Rule::mul, Assoc::Left) | Op::infix(Rule::div, Assoc::Left) | Op::infix(Rule::rem, Assoc::Left))
            .op(Op::prefix(Rule::neg) | Op::prefix(Rule::not))
            .op(Op::postfix(Rule::transpose))
    })
}

fn first(p: Pair<Rule>) -> Pair<Rule> {
    let rule = p.as_rule();
    p.into_inner().next().unwrap_or_else(|| unreachable!("grammar rule {rule:?} always has a child"))
}

fn next<'a>(it: &mut pest::iterators::Pairs<'a, Rule>) -> Pair<'a, Rule> {
    it.next().unwrap_or_else(|| unreachable!("the grammar guarantees this child"))
}

/// Finds every comment, skipping string literals, for the formatter.
fn scan_comments(file: FileId, text: &str) -> Vec<Comment> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if b == b'"' || b == b'\n' {
                in_string = false;
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            i += 1;
        } else if bytes[i..].starts_with(b"//") {
            let end = text[i..].find('\n').map_or(text.len(), |n| i + n);
            out.push(Comment { text: text[i..end].trim_end().to_string(), span: Span::new(file, i, end) });
            i = end;
        } else if bytes[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(text.len(), |n| i + 2 + n + 2);
            out.push(Comment { text: text[i..end].to_string(), span: Span::new(file, i, end) });
            i = end;
        } else {
            i += 1;
        }
    }
    out
}
