//! Tokenizer for condition expressions.
//!
//! Positions are 1-based lines and columns, columns counted in characters (not bytes).
//! Lexing never fails outright: a lexical error becomes a final [`Tok::Error`] token so
//! that the parser reports errors in source order (an earlier syntax error wins over a
//! later unterminated string).

use super::eval::{Lit, Num};

/// A 1-based line and column (column in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok<'a> {
    Ident(&'a str),
    Lit(Lit),
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    AndAnd,
    OrOr,
    Bang,
    LParen,
    RParen,
    Dot,
    Eof,
    /// A lexical error at `start`; always the last token.
    Error(String),
}

#[derive(Debug, Clone)]
pub(super) struct Token<'a> {
    pub tok: Tok<'a>,
    /// The token's source text (empty for `Eof`).
    pub text: &'a str,
    /// Position of the first character.
    pub start: Pos,
    /// Position just after the last character.
    pub end: Pos,
}

struct Lexer<'a> {
    src: &'a str,
    off: usize,
    line: usize,
    column: usize,
    /// Where a lexical error is reported when not at the token's start.
    err_at: Option<Pos>,
}

impl<'a> Lexer<'a> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.off..].chars().next()
    }

    fn peek_nth(&self, n: usize) -> Option<char> {
        self.src[self.off..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.off += c.len_utf8();
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn bump_while(&mut self, pred: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&pred) {
            self.bump();
        }
    }

    /// Lexes one token starting at the current (non-whitespace) position.
    fn token(&mut self, c: char) -> Tok<'a> {
        let two = |lx: &mut Self, second: char, yes: Tok<'a>, no: Tok<'a>| {
            lx.bump();
            if lx.peek() == Some(second) {
                lx.bump();
                yes
            } else {
                no
            }
        };
        match c {
            '(' => {
                self.bump();
                Tok::LParen
            }
            ')' => {
                self.bump();
                Tok::RParen
            }
            '.' => {
                self.bump();
                Tok::Dot
            }
            '!' => two(self, '=', Tok::Ne, Tok::Bang),
            '>' => two(self, '=', Tok::Ge, Tok::Gt),
            '<' => two(self, '=', Tok::Le, Tok::Lt),
            '=' => two(
                self,
                '=',
                Tok::Eq,
                Tok::Error("unexpected `=`; use `==` to compare values".into()),
            ),
            '&' => two(
                self,
                '&',
                Tok::AndAnd,
                Tok::Error("unexpected `&`; use `&&` for a logical and".into()),
            ),
            '|' => two(
                self,
                '|',
                Tok::OrOr,
                Tok::Error("unexpected `|`; use `||` for a logical or".into()),
            ),
            '\'' | '"' => self.string(c),
            '0'..='9' => self.number(),
            '-' if self.peek_nth(1).is_some_and(|d| d.is_ascii_digit()) => self.number(),
            c if c.is_alphabetic() || c == '_' => {
                let start = self.off;
                self.bump_while(|c| c.is_alphanumeric() || c == '_');
                match &self.src[start..self.off] {
                    "true" => Tok::Lit(Lit::Bool(true)),
                    "false" => Tok::Lit(Lit::Bool(false)),
                    "null" => Tok::Lit(Lit::Null),
                    ident => Tok::Ident(ident),
                }
            }
            '-' => Tok::Error(
                "unexpected character `-`: arithmetic is not supported (a negative number is written `-5`)"
                    .into(),
            ),
            c => Tok::Error(format!("unexpected character `{}`", c.escape_default())),
        }
    }

    fn string(&mut self, quote: char) -> Tok<'a> {
        self.bump();
        let mut out = String::new();
        loop {
            let Some(c) = self.bump() else {
                return Tok::Error("unterminated string literal".into());
            };
            match c {
                c if c == quote => return Tok::Lit(Lit::Str(out.into_boxed_str())),
                '\\' => {
                    let escape_at = Pos {
                        line: self.line,
                        column: self.column - 1,
                    };
                    let escaped = match self.bump() {
                        None => return Tok::Error("unterminated string literal".into()),
                        Some('\\') => '\\',
                        Some('\'') => '\'',
                        Some('"') => '"',
                        Some('n') => '\n',
                        Some('t') => '\t',
                        Some('r') => '\r',
                        Some('0') => '\0',
                        Some(other) => {
                            // Report at the backslash rather than at the string's start.
                            self.err_at = Some(escape_at);
                            return Tok::Error(format!(
                                "unknown escape sequence `\\{}` in string (supported: \\\\ \\' \\\" \\n \\t \\r \\0)",
                                other.escape_default()
                            ));
                        }
                    };
                    out.push(escaped);
                }
                c => out.push(c),
            }
        }
    }

    fn number(&mut self) -> Tok<'a> {
        let start = self.off;
        if self.peek() == Some('-') {
            self.bump();
        }
        self.bump_while(|c| c.is_ascii_digit());
        let mut float = false;
        if self.peek() == Some('.') && self.peek_nth(1).is_some_and(|c| c.is_ascii_digit()) {
            float = true;
            self.bump();
            self.bump_while(|c| c.is_ascii_digit());
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            let exp_digit = match self.peek_nth(1) {
                Some('+' | '-') => self.peek_nth(2),
                other => other,
            };
            if exp_digit.is_some_and(|c| c.is_ascii_digit()) {
                float = true;
                self.bump();
                if matches!(self.peek(), Some('+' | '-')) {
                    self.bump();
                }
                self.bump_while(|c| c.is_ascii_digit());
            }
        }
        if self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            self.bump_while(|c| c.is_alphanumeric() || c == '_' || c == '.');
            return Tok::Error(format!("invalid number `{}`", &self.src[start..self.off]));
        }
        let text = &self.src[start..self.off];
        let num = if float {
            None
        } else if let Ok(i) = text.parse::<i64>() {
            Some(Num::I(i))
        } else if let Ok(u) = text.parse::<u64>() {
            Some(Num::U(u))
        } else {
            None
        };
        match num {
            Some(n) => Tok::Lit(Lit::Num(n)),
            None => match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Tok::Lit(Lit::Num(Num::F(f))),
                _ => Tok::Error(format!("number `{text}` is out of range")),
            },
        }
    }
}

/// Splits `src` into tokens. The last token is always `Eof` or `Error`.
pub(super) fn tokenize(src: &str) -> Vec<Token<'_>> {
    let mut lx = Lexer {
        src,
        off: 0,
        line: 1,
        column: 1,
        err_at: None,
    };
    let mut out = Vec::new();
    loop {
        lx.bump_while(char::is_whitespace);
        let start = lx.pos();
        let start_off = lx.off;
        let Some(c) = lx.peek() else {
            out.push(Token {
                tok: Tok::Eof,
                text: "",
                start,
                end: start,
            });
            return out;
        };
        let tok = lx.token(c);
        if let Tok::Error(_) = tok {
            // Errors are reported at the token's start, except escape errors (at the
            // offending backslash).
            let at = lx.err_at.unwrap_or(start);
            out.push(Token {
                tok,
                text: &src[start_off..lx.off],
                start: at,
                end: at,
            });
            return out;
        }
        out.push(Token {
            tok,
            text: &src[start_off..lx.off],
            start,
            end: lx.pos(),
        });
    }
}
