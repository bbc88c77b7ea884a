//! The canonical layout of `.hla` text (`hlac fmt`). It prints the syntax tree back with two-space
//! indentation, one statement per line, single spaces around binary operators and `x` for
//! repeats, keeps every comment where it was (before a statement, or after it on the same line)
//! and keeps single blank lines the author put between statements. Printing is idempotent.

use std::fmt::Write;

use crate::ast::*;

/// Formats a parsed file. `text` must be the source the file was parsed from (it is used to find
/// blank lines and the positions of comments).
pub fn format_file(file: &File, text: &str) -> String {
    let mut p = Printer { text, comments: &file.comments, next_comment: 0, out: String::new(), indent: 0 };
    for (i, item) in file.items.iter().enumerate() {
        let start = item.span().start as usize;
        if i > 0 {
            p.out.push('\n');
        }
        p.leading(start, i == 0);
        p.item(item);
        let limit = file.items.get(i + 1).map_or(text.len(), |next| next.span().start as usize);
        p.trailing(item.span().end as usize, limit);
        p.out.push('\n');
    }
    p.leading(text.len(), file.items.is_empty());
    // Exactly one newline at the end, none at the start.
    let trimmed = p.out.trim_matches('\n');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}\n")
    }
}

/// Prints one expression in canonical form.
pub fn format_expr(e: &Expr) -> String {
    let mut s = String::new();
    expr(&mut s, e);
    s
}

struct Printer<'a> {
    text: &'a str,
    comments: &'a [Comment],
    next_comment: usize,
    out: String,
    indent: usize,
}

impl Printer<'_> {
    fn pad(&mut self) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
    }

    /// Whether the author left an empty line just before byte `at`.
    fn blank_before(&self, at: usize) -> bool {
        let before = &self.text[..at.min(self.text.len())];
        let gap = &before[before.trim_end().len()..];
        !before.trim_end().is_empty() && gap.matches('\n').count() >= 2
    }

    /// Emits the comments that come before byte `at`, each on its own line.
    fn leading(&mut self, at: usize, first_in_block: bool) {
        let mut first = first_in_block;
        while let Some(c) = self.comments.get(self.next_comment) {
            if c.span.start as usize >= at {
                break;
            }
            if !first && self.blank_before(c.span.start as usize) && !self.out.ends_with("\n\n") {
                self.out.push('\n');
            }
            self.pad();
            self.out.push_str(&c.text);
            self.out.push('\n');
            self.next_comment += 1;
            first = false;
        }
        if !first && self.blank_before(at) && at < self.text.len() && !self.out.ends_with("\n\n") {
            self.out.push('\n');
        }
    }

    /// Appends a comment that follows byte `at` on the same source line, before byte `limit` (where
    /// the next statement starts: a comment after that belongs to the later statement).
    fn trailing(&mut self, at: usize, limit: usize) {
        if let Some(c) = self.comments.get(self.next_comment) {
            let start = c.span.start as usize;
            if start >= at && start < limit && !self.text[at..start].contains('\n') {
                self.out.push_str("  ");
                self.out.push_str(&c.text);
                self.next_comment += 1;
            }
        }
    }

    /// Prints a sequence of lines inside braces; `close` is the offset of the closing brace.
    fn lines<T>(&mut self, items: &[T], close: usize, span_of: impl Fn(&T) -> crate::Span, mut print: impl FnMut(&mut Self, &T)) {
        self.out.push_str("{\n");
        self.indent += 1;
        for (i, it) in items.iter().enumerate() {
            let span = span_of(it);
            self.leading(span.start as usize, i == 0);
            self.pad();
            print(self, it);
            let limit = items.get(i + 1).map_or(close, |next| span_of(next).start as usize);
            self.trailing(span.end as usize, limit);
            self.out.push('\n');
        }
        self.leading(close, items.is_empty());
        self.indent -= 1;
        self.pad();
        self.out.push('}');
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Import(i) => {
                let _ = write!(self.out, "import {}", quote(&i.path.value));
            }
            Item::Decl(d) => {
                let kw = match d.kind {
                    DeclKind::Recurrence => "recurrence",
                    DeclKind::Attention => "attention",
                };
                let _ = write!(self.out, "{kw} {} ", d.name.name);
                self.stmts(&d.body, d.span.end as usize - 1);
            }
            Item::Model(m) => {
                let _ = write!(self.out, "model {} ", m.name.name);
                self.lines(&m.body, m.span.end as usize - 1, ModelStmt::span, |p, s| p.model_stmt(s));
            }
            Item::Target(t) => {
                self.out.push_str("target ");
                self.lines(&t.assigns, t.span.end as usize - 1, |a| a.span, |p, a| p.assign(a));
            }
        }
    }

    fn stmts(&mut self, body: &[Stmt], close: usize) {
        self.lines(body, close, |s| s.span, |p, s| p.stmt(s));
    }

    fn stmt(&mut self, s: &Stmt) {
        match &s.kind {
            StmtKind::Param { name, ty, default } => {
                let t = match ty.scalar {
                    ScalarType::Int => "int",
                    ScalarType::Float => "float",
                    ScalarType::Bool => "bool",
                    ScalarType::Str => "str",
                };
                let q = if ty.optional { "?" } else { "" };
                let _ = write!(self.out, "param {}: {t}{q} = {}", name.name, format_expr(default));
            }
            StmtKind::Let { name, value } => {
                let _ = write!(self.out, "let {} = {}", name.name, format_expr(value));
            }
            StmtKind::Heads(e) => {
                let _ = write!(self.out, "heads = {}", format_expr(e));
            }
            StmtKind::State { name, key, value } => {
                let _ = write!(
                    self.out,
                    "state {}[{} = {}, {} = {}]",
                    name.name,
                    key.name.name,
                    format_expr(&key.size),
                    value.name.name,
                    format_expr(&value.size)
                );
            }
            StmtKind::Token(tokens) => {
                let parts: Vec<String> = tokens
                    .iter()
                    .map(|t| {
                        let mut s = t.name.name.clone();
                        if let Some(d) = &t.dim {
                            let _ = write!(s, "[{}]", d.name);
                        }
                        if let Some(f) = &t.from {
                            let _ = write!(s, " from {}", f.name);
                        }
                        s
                    })
                    .collect();
                let _ = write!(self.out, "token {}", parts.join(", "));
            }
            StmtKind::Head(names) => {
                let names: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
                let _ = write!(self.out, "head {}", names.join(", "));
            }
            StmtKind::Def { name, value } => {
                let _ = write!(self.out, "def {} = {}", name.name, format_expr(value));
            }
            StmtKind::Update { target, value } => {
                let _ = write!(self.out, "update {} = {}", target.name, format_expr(value));
            }
            StmtKind::Output { target, value } => {
                let _ = write!(self.out, "output {} = {}", target.name, format_expr(value));
            }
            StmtKind::Weight { role, path, shape, bias, shared } => {
                let role = match role {
                    WeightRole::Linear => "linear",
                    WeightRole::Norm => "norm",
                    WeightRole::Conv => "conv",
                    WeightRole::Weight => "weight",
                };
                let dims: Vec<String> = shape.iter().map(format_expr).collect();
                let b = match bias {
                    None => String::new(),
                    Some(Expr { kind: ExprKind::Bool(true), .. }) => " bias".to_string(),
                    Some(cond) => format!(" bias({})", format_expr(cond)),
                };
                let s = if *shared { "shared " } else { "" };
                let _ = write!(self.out, "{s}{role} {} [{}]{b}", path.name, dims.join(", "));
            }
            StmtKind::If { cond, then_body, else_body } => {
                let _ = write!(self.out, "if {} ", format_expr(cond));
                // The then-block closes at the `}` before `else` (or at the statement's end).
                let then_close = if else_body.is_empty() {
                    s.span.end as usize - 1
                } else {
                    let tail_start = then_body.last().map_or(cond.span.end, |b| b.span.end) as usize;
                    self.text[tail_start..].find('}').map_or(tail_start, |n| tail_start + n)
                };
                self.stmts(then_body, then_close);
                if !else_body.is_empty() {
                    self.out.push_str(" else ");
                    self.stmts(else_body, s.span.end as usize - 1);
                }
            }
            StmtKind::Require { cond, message } => {
                let _ = write!(self.out, "require {} else {}", format_expr(cond), quote(&message.value));
            }
            StmtKind::Fla { model_type, architecture } => {
                let _ = write!(self.out, "fla {}, {}", quote(&model_type.value), quote(&architecture.value));
            }
        }
    }

    fn model_stmt(&mut self, s: &ModelStmt) {
        match s {
            ModelStmt::Assign(a) => self.assign(a),
            ModelStmt::Pattern { pattern, .. } => {
                self.out.push_str("pattern = ");
                pattern_seq(&mut self.out, pattern);
            }
            ModelStmt::Mlp { assigns, span } | ModelStmt::Fla { assigns, span } => {
                self.out.push_str(if matches!(s, ModelStmt::Mlp { .. }) { "mlp " } else { "fla " });
                self.lines(assigns, span.end as usize - 1, |a| a.span, |p, a| p.assign(a));
            }
            ModelStmt::Mixer { name, kind, assigns, span } => {
                let _ = write!(self.out, "mixer {}", name.name);
                if let Some(k) = kind {
                    let _ = write!(self.out, " = {}", k.name);
                }
                self.out.push(' ');
                self.lines(assigns, span.end as usize - 1, |a| a.span, |p, a| p.assign(a));
            }
        }
    }

    fn assign(&mut self, a: &Assign) {
        let _ = write!(self.out, "{} = {}", a.name.name, format_expr(&a.value));
    }
}

fn pattern_seq(out: &mut String, seq: &PatternSeq) {
    for (i, t) in seq.terms.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match &t.atom {
            PatternAtom::Mixer(id) => out.push_str(&id.name),
            PatternAtom::Group(g) => {
                out.push('[');
                pattern_seq(out, g);
                out.push(']');
            }
        }
        if let Some((n, _)) = t.repeat {
            let _ = write!(out, " x {n}");
        }
    }
}

/// Prints a pattern sequence in canonical form.
pub fn format_pattern(seq: &PatternSeq) -> String {
    let mut s = String::new();
    pattern_seq(&mut s, seq);
    s
}

fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

fn expr(out: &mut String, e: &Expr) {
    match &e.kind {
        ExprKind::Number { text, .. } => out.push_str(text),
        ExprKind::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        ExprKind::None => out.push_str("none"),
        ExprKind::Str(s) => out.push_str(&quote(s)),
        ExprKind::Name(n) => out.push_str(n),
        ExprKind::Call { func, args } => {
            out.push_str(&func.name);
            out.push('(');
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                expr(out, a);
            }
            out.push(')');
        }
        ExprKind::Unary { op, operand } => {
            out.push(match op {
                UnOp::Neg => '-',
                UnOp::Not => '!',
            });
            expr(out, operand);
        }
        ExprKind::Binary { op, lhs, rhs } => {
            expr(out, lhs);
            let _ = write!(out, " {} ", op.symbol());
            expr(out, rhs);
        }
        ExprKind::Transpose(inner) => {
            expr(out, inner);
            out.push_str("^T");
        }
        ExprKind::Paren(inner) => {
            out.push('(');
            expr(out, inner);
            out.push(')');
        }
    }
}
