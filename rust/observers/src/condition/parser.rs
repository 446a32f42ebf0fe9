//! Recursive-descent parser producing the compiled [`Node`] tree.
//!
//! Grammar (precedence from loosest to tightest):
//! ```text
//! or      := and ( "||" and )*
//! and     := cmp ( "&&" cmp )*
//! cmp     := unary ( ("==" | "!=" | ">" | ">=" | "<" | "<=") unary )?   -- non-associative
//! unary   := "!" unary | primary
//! primary := literal | path | "(" or ")"
//! path    := IDENT ( "." NAME )* [ ".old" | ".new" | ".changed" "(" ")" ]
//! ```

use super::eval::{CmpOp, Lit, Node, Row};
use super::lexer::{tokenize, Pos, Tok, Token};
use super::ConditionError;

/// A use of a top-level field, for the field check and `referenced_fields`.
pub(super) struct FieldUse<'a> {
    pub name: &'a str,
    pub at: Pos,
}

/// A top-level field compared with a literal (`status == 'shipped'`, `1000 < total`), for
/// the check against the field's declared type.
pub(super) struct LiteralComparison<'a> {
    pub field: &'a str,
    pub literal: Lit,
    /// The literal as written, and where.
    pub text: &'a str,
    pub at: Pos,
}

pub(super) struct Parsed<'a> {
    pub root: Node,
    pub uses: Vec<FieldUse<'a>>,
    pub comparisons: Vec<LiteralComparison<'a>>,
}

pub(super) fn parse(src: &str) -> Result<Parsed<'_>, ConditionError> {
    let mut p = Parser {
        src,
        toks: tokenize(src),
        i: 0,
        uses: Vec::new(),
        comparisons: Vec::new(),
        depth: 0,
    };
    if p.cur().tok == Tok::Eof {
        return Err(p.error_at(Pos { line: 1, column: 1 }, "empty condition".into()));
    }
    let root = p.or()?;
    let cur = p.cur_checked()?;
    if cur.tok != Tok::Eof {
        let hint = match cur.tok {
            Tok::Ident("and" | "AND") => " (use `&&` for a logical and)",
            Tok::Ident("or" | "OR") => " (use `||` for a logical or)",
            Tok::RParen => " (no matching `(`)",
            _ => "",
        };
        let msg = format!(
            "unexpected `{}`: expected `&&`, `||` or the end of the condition{hint}",
            cur.text
        );
        return Err(p.error_at(cur.start, msg));
    }
    Ok(Parsed {
        root,
        uses: p.uses,
        comparisons: p.comparisons,
    })
}

struct Parser<'a> {
    src: &'a str,
    toks: Vec<Token<'a>>,
    i: usize,
    uses: Vec<FieldUse<'a>>,
    comparisons: Vec<LiteralComparison<'a>>,
    /// Current nesting of `!` and `(`, bounded to keep recursion (parse and evaluate) shallow.
    depth: usize,
}

/// Deepest nesting of `!` and parentheses accepted.
const MAX_DEPTH: usize = 64;

fn cmp_op(tok: &Tok<'_>) -> Option<CmpOp> {
    Some(match tok {
        Tok::Eq => CmpOp::Eq,
        Tok::Ne => CmpOp::Ne,
        Tok::Gt => CmpOp::Gt,
        Tok::Ge => CmpOp::Ge,
        Tok::Lt => CmpOp::Lt,
        Tok::Le => CmpOp::Le,
        _ => return None,
    })
}

impl<'a> Parser<'a> {
    fn error_at(&self, at: Pos, message: String) -> ConditionError {
        ConditionError::Syntax {
            message,
            line: at.line,
            column: at.column,
            source_line: super::source_line(self.src, at.line),
        }
    }

    fn cur(&self) -> &Token<'a> {
        &self.toks[self.i]
    }

    /// The current token, or the lexical error it stands for.
    fn cur_checked(&self) -> Result<&Token<'a>, ConditionError> {
        let t = self.cur();
        match &t.tok {
            Tok::Error(msg) => Err(self.error_at(t.start, msg.clone())),
            _ => Ok(t),
        }
    }

    fn advance(&mut self) {
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
    }

    fn prev(&self) -> Option<&Token<'a>> {
        self.i.checked_sub(1).map(|j| &self.toks[j])
    }

    /// An error "expected X" at the current token, or just after the previous token
    /// when the input ended.
    fn expected(&self, what: &str) -> ConditionError {
        let cur = self.cur();
        match (&cur.tok, self.prev()) {
            (Tok::Eof, Some(prev)) => self.error_at(prev.end, what.to_string()),
            _ => self.error_at(cur.start, format!("{what}, found `{}`", cur.text)),
        }
    }

    /// Enters one level of nesting at the current token.
    fn enter(&mut self) -> Result<(), ConditionError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let msg = format!("the condition is nested too deeply (more than {MAX_DEPTH} levels of `!` or parentheses)");
            return Err(self.error_at(self.cur().start, msg));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Node, ConditionError> {
        let mut nodes = vec![self.and()?];
        while self.cur_checked()?.tok == Tok::OrOr {
            self.advance();
            nodes.push(self.and()?);
        }
        Ok(if nodes.len() == 1 {
            nodes.pop().expect("one node")
        } else {
            Node::Or(nodes.into_boxed_slice())
        })
    }

    fn and(&mut self) -> Result<Node, ConditionError> {
        let mut nodes = vec![self.cmp()?];
        while self.cur_checked()?.tok == Tok::AndAnd {
            self.advance();
            nodes.push(self.cmp()?);
        }
        Ok(Node::and(nodes))
    }

    fn cmp(&mut self) -> Result<Node, ConditionError> {
        let lhs_start = self.cur().clone();
        let lhs = self.unary()?;
        let Some(op) = cmp_op(&self.cur_checked()?.tok) else {
            return Ok(lhs);
        };
        self.advance();
        let rhs_start = self.cur().clone();
        let rhs = self.unary()?;
        self.note_literal_comparison([(&lhs_start, &lhs), (&rhs_start, &rhs)]);
        let next = self.cur_checked()?;
        if cmp_op(&next.tok).is_some() {
            return Err(self.error_at(
                next.start,
                format!(
                    "comparisons cannot be chained: unexpected `{}` after a comparison (combine comparisons with `&&`, or add parentheses)",
                    next.text
                ),
            ));
        }
        Ok(Node::comparison(op, lhs, rhs))
    }

    /// Records `field op literal` (either way round) where the field is a top-level one and
    /// the literal is written as one token and is not `null` (which any field may be).
    fn note_literal_comparison(&mut self, sides: [(&Token<'a>, &Node); 2]) {
        let field = sides
            .iter()
            .find_map(|(start, node)| match (&start.tok, node) {
                (Tok::Ident(name), Node::Field { path, .. }) if path.len() == 1 => Some(*name),
                _ => None,
            });
        let literal = sides
            .iter()
            .find_map(|(start, node)| match (&start.tok, node) {
                (Tok::Lit(_), Node::Lit(lit)) if *lit != Lit::Null => Some((*start, lit)),
                _ => None,
            });
        if let (Some(field), Some((token, literal))) = (field, literal) {
            self.comparisons.push(LiteralComparison {
                field,
                literal: literal.clone(),
                text: token.text,
                at: token.start,
            });
        }
    }

    fn unary(&mut self) -> Result<Node, ConditionError> {
        if self.cur_checked()?.tok == Tok::Bang {
            self.enter()?;
            self.advance();
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(inner)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Node, ConditionError> {
        let cur = self.cur_checked()?;
        match &cur.tok {
            Tok::Lit(lit) => {
                let node = Node::Lit(lit.clone());
                self.advance();
                Ok(node)
            }
            Tok::Ident(_) => self.path(),
            Tok::LParen => {
                let open = cur.start;
                self.enter()?;
                self.advance();
                let inner = self.or()?;
                self.depth -= 1;
                if self.cur_checked()?.tok != Tok::RParen {
                    return Err(self.expected(&format!(
                        "expected `)` to close the `(` at line {}, column {}",
                        open.line, open.column
                    )));
                }
                self.advance();
                Ok(inner)
            }
            _ => Err(match self.prev() {
                Some(prev) => self.expected(&format!("expected a value after `{}`", prev.text)),
                None => self.expected("expected a value"),
            }),
        }
    }

    /// Errors for `name(` where `name` cannot be called.
    fn not_callable(&self, name: &Token<'a>, is_first: bool) -> ConditionError {
        let msg = if name.text == "changed" && is_first {
            "`changed()` must follow a field, e.g. `status.changed()`".to_string()
        } else {
            format!(
                "`{}` is not a function; only `field.changed()` can be called",
                name.text
            )
        };
        self.error_at(name.start, msg)
    }

    fn path(&mut self) -> Result<Node, ConditionError> {
        let first = self.cur().clone();
        let Tok::Ident(name) = first.tok else {
            unreachable!("path() starts at an identifier")
        };
        self.uses.push(FieldUse {
            name,
            at: first.start,
        });
        self.advance();
        if self.cur_checked()?.tok == Tok::LParen {
            return Err(self.not_callable(&first, true));
        }
        let mut segs: Vec<Box<str>> = vec![name.into()];
        let mut row = Row::Current;
        while self.cur_checked()?.tok == Tok::Dot {
            self.advance();
            let seg = self.cur_checked()?.clone();
            // Keywords are ordinary names after a dot (`row.null`).
            if !matches!(seg.tok, Tok::Ident(_) | Tok::Lit(Lit::Bool(_) | Lit::Null)) {
                return Err(self.expected("expected a field name after `.`"));
            }
            self.advance();
            let next = self.cur_checked()?.tok.clone();
            match (seg.text, &next) {
                (_, Tok::Dot) => segs.push(seg.text.into()),
                ("changed", Tok::LParen) => {
                    self.advance();
                    let close = self.cur_checked()?;
                    if close.tok != Tok::RParen {
                        return Err(self.expected("`changed()` takes no arguments: expected `)`"));
                    }
                    self.advance();
                    return Ok(Node::Changed(segs.into_boxed_slice()));
                }
                (_, Tok::LParen) => return Err(self.not_callable(&seg, false)),
                ("changed", _) => {
                    return Err(self.error_at(
                        seg.start,
                        "`changed` must be called as `changed()`".to_string(),
                    ))
                }
                ("old", _) => row = Row::Old,
                ("new", _) => row = Row::New,
                (text, _) => segs.push(text.into()),
            }
        }
        Ok(Node::Field {
            path: segs.into_boxed_slice(),
            row,
        })
    }
}
