//! Observer conditions: a small expression language compiled once and evaluated against
//! the new/old rows of every change event.
//!
//! ```text
//! total > 1000 && is_premium == true
//! status.changed() && status == 'shipped'
//! status.old == 'pending' && status == 'approved'
//! customer.address.city == "Paris" || !is_test
//! ```
//!
//! * Literals: integers and decimals (`100`, `-5`, `99.99`, `1e3`), `'single'` or
//!   `"double"` quoted strings with backslash escapes, `true`, `false`, `null`.
//! * Field paths: `total`, `customer.address.city`; a final `.old` reads the old row,
//!   `.new` the new row, `.changed()` is true on an UPDATE whose old and new values differ.
//!   A bare field reads the new row, or the old row on DELETE.
//! * Operators, tightest first: `!`, comparisons (`== != > >= < <=`, non-associative),
//!   `&&`, `||`; parentheses group.
//! * Numbers compare numerically (`100 == 100.0`), strings lexicographically, booleans and
//!   null by equality; values of different types are unequal and unordered. Missing
//!   fields are null. A value used as a boolean is true only if it is JSON `true`.
//!
//! [`Condition::evaluate`] walks the compiled tree without allocating or cloning.

mod eval;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use std::fmt;

use serde_json::Value;

use eval::{Lit, Node, Rows};

use crate::schema::FieldKind;

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    source: Box<str>,
    root: Node,
    /// Distinct top-level fields referenced, in order of first appearance.
    fields: Box<[Box<str>]>,
    /// Top-level fields compared with a literal, for [`Condition::check_kinds`].
    comparisons: Box<[Compared]>,
}

#[derive(Debug, Clone)]
struct Compared {
    field: Box<str>,
    kind: FieldKind,
    literal: Box<str>,
    line: usize,
    column: usize,
}

impl Condition {
    /// Compiles `expr`. `fields`: the entity's declared top-level field names, or `None`
    /// to skip the check that every referenced field exists.
    pub fn compile(expr: &str, fields: Option<&[String]>) -> Result<Condition, ConditionError> {
        let parsed = parser::parse(expr)?;
        if let Some(known) = fields {
            if let Some(unknown) = parsed
                .uses
                .iter()
                .find(|u| !known.iter().any(|k| k == u.name))
            {
                return Err(ConditionError::UnknownField {
                    field: unknown.name.to_string(),
                    line: unknown.at.line,
                    column: unknown.at.column,
                    source_line: source_line(expr, unknown.at.line),
                    suggestion: suggest(unknown.name, known),
                    known: known.to_vec(),
                });
            }
        }
        let mut names: Vec<Box<str>> = Vec::new();
        for u in &parsed.uses {
            if !names.iter().any(|n| &**n == u.name) {
                names.push(u.name.into());
            }
        }
        let comparisons = parsed
            .comparisons
            .iter()
            .map(|c| Compared {
                field: c.field.into(),
                kind: match c.literal {
                    Lit::Str(_) => FieldKind::Text,
                    Lit::Num(_) => FieldKind::Number,
                    Lit::Bool(_) | Lit::Null => FieldKind::Boolean,
                },
                literal: c.text.into(),
                line: c.at.line,
                column: c.at.column,
            })
            .collect();
        Ok(Condition {
            source: expr.into(),
            root: parsed.root,
            fields: names.into_boxed_slice(),
            comparisons,
        })
    }

    /// Checks each top-level field compared with a literal against the field's declared
    /// kind (`kind_of`; `None`: not declared, not checked). `status > 1000` on a text
    /// `status` is never true, whatever the row: it is an error, not a silent no-match.
    pub fn check_kinds(
        &self,
        kind_of: impl Fn(&str) -> Option<FieldKind>,
    ) -> Result<(), ConditionError> {
        let Some((c, declared)) = self.comparisons.iter().find_map(|c| {
            kind_of(&c.field)
                .filter(|declared| *declared != c.kind)
                .map(|declared| (c, declared))
        }) else {
            return Ok(());
        };
        Err(ConditionError::KindMismatch {
            field: c.field.to_string(),
            declared,
            literal: c.literal.to_string(),
            literal_kind: c.kind,
            line: c.line,
            column: c.column,
            source_line: source_line(&self.source, c.line),
        })
    }

    /// Evaluates the condition. `new`: the new row (`None` for DELETE), `old`: the previous
    /// row (`None` for INSERT). Does not allocate.
    #[inline]
    pub fn evaluate(&self, new: Option<&Value>, old: Option<&Value>) -> bool {
        self.root.test(Rows { new, old })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The distinct top-level field names referenced, in order of first appearance.
    pub fn referenced_fields(&self) -> Vec<&str> {
        self.fields.iter().map(|f| &**f).collect()
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Why a condition does not compile. `Display` is multi-line: a message with the
/// position, then the offending source line with a caret under the position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConditionError {
    /// A syntax error: message, 1-based line and column (in characters), the source line.
    #[error(
        "syntax error at line {line}, column {column}: {message}\n  {source_line}\n  {caret}",
        caret = Caret(.source_line, *.column)
    )]
    Syntax {
        message: String,
        line: usize,
        column: usize,
        source_line: String,
    },
    /// The condition names a top-level field the entity does not declare.
    #[error(
        "unknown field `{field}` at line {line}, column {column} {hint}\n  {source_line}\n  {caret}",
        hint = Hint(.suggestion.as_deref(), .known),
        caret = Caret(.source_line, *.column)
    )]
    UnknownField {
        field: String,
        line: usize,
        column: usize,
        source_line: String,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    /// A field of a declared type compared with a literal of another kind.
    #[error(
        "`{field}` is declared as {declared} but is compared with the {literal_kind} {literal} at \
         line {line}, column {column}: a {declared} value never equals or orders with a \
         {literal_kind}{hint}\n  {source_line}\n  {caret}",
        declared = .declared.as_str(),
        literal_kind = .literal_kind.as_str(),
        hint = KindHint(*.declared, .literal),
        caret = Caret(.source_line, *.column)
    )]
    KindMismatch {
        field: String,
        declared: FieldKind,
        literal: String,
        literal_kind: FieldKind,
        line: usize,
        column: usize,
        source_line: String,
    },
}

/// How to write the literal for the field's kind, where there is an obvious way.
struct KindHint<'a>(FieldKind, &'a str);

impl fmt::Display for KindHint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unquoted = self.1.trim_matches(|c| c == '\'' || c == '"');
        match self.0 {
            FieldKind::Text => write!(f, " (write '{unquoted}' to compare text)"),
            FieldKind::Number if unquoted.parse::<f64>().is_ok() => {
                write!(f, " (write {unquoted} to compare numbers)")
            }
            FieldKind::Boolean => f.write_str(" (compare with true or false)"),
            FieldKind::Number => Ok(()),
        }
    }
}

impl ConditionError {
    /// 1-based line of the error.
    pub fn line(&self) -> usize {
        match self {
            ConditionError::Syntax { line, .. }
            | ConditionError::UnknownField { line, .. }
            | ConditionError::KindMismatch { line, .. } => *line,
        }
    }

    /// 1-based column of the error, in characters.
    pub fn column(&self) -> usize {
        match self {
            ConditionError::Syntax { column, .. }
            | ConditionError::UnknownField { column, .. }
            | ConditionError::KindMismatch { column, .. } => *column,
        }
    }

    /// The source line the error is on.
    pub fn source_line(&self) -> &str {
        match self {
            ConditionError::Syntax { source_line, .. }
            | ConditionError::UnknownField { source_line, .. }
            | ConditionError::KindMismatch { source_line, .. } => source_line,
        }
    }
}

/// The 1-based `line` of `src`, without its line terminator.
fn source_line(src: &str, line: usize) -> String {
    src.split('\n')
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .trim_end_matches('\r')
        .to_string()
}

/// The closest declared field to `field`, if close enough to be a likely typo.
fn suggest(field: &str, known: &[String]) -> Option<String> {
    let len = field.chars().count();
    known
        .iter()
        .filter_map(|k| {
            let score = strsim::jaro_winkler(field, k);
            let lower = strsim::jaro_winkler(&field.to_lowercase(), &k.to_lowercase());
            let edits = strsim::levenshtein(field, k);
            let close = score >= 0.8 || lower >= 0.95 || (edits <= 2 && edits < len);
            close.then_some((score.max(lower), k))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.clone())
}

/// Renders a caret under the 1-based `column` of `line` (tabs kept to stay aligned).
struct Caret<'a>(&'a str, usize);

impl fmt::Display for Caret<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pad = self.1.saturating_sub(1);
        let mut chars = self.0.chars();
        for _ in 0..pad {
            f.write_str(if chars.next() == Some('\t') {
                "\t"
            } else {
                " "
            })?;
        }
        f.write_str("^")
    }
}

/// `(did you mean `x`?)` or the list of known fields.
struct Hint<'a>(Option<&'a str>, &'a [String]);

impl fmt::Display for Hint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(s), _) => write!(f, "(did you mean `{s}`?)"),
            (None, []) => f.write_str("(the entity declares no fields)"),
            (None, known) => {
                f.write_str("(known fields: ")?;
                for (i, k) in known.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "`{k}`")?;
                }
                f.write_str(")")
            }
        }
    }
}
