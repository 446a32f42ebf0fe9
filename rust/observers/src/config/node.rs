//! A small owned TOML tree that remembers the line of every value and key.
//!
//! Both parsed files (`toml::de::DeTable`, with spans) and values built elsewhere
//! (`toml::Value`, no spans) are converted to [`Node`], so that one set of readers validates both.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// 1-based line where the value starts (for a table: its `[header]` or `{`).
    pub(crate) line: Option<usize>,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: String,
    /// Line of the key itself.
    pub(crate) line: Option<usize>,
    pub(crate) value: Node,
}

/// A TOML syntax error: 1-based line and column (when the parser gave a span) and message.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub(crate) line: Option<usize>,
    pub(crate) column: Option<usize>,
    pub(crate) message: String,
}

impl Node {
    /// What was found, for "expected X, found Y" messages. With `show_strings = false` a string's
    /// content is not shown (it may be a secret).
    pub(crate) fn describe(&self, show_strings: bool) -> String {
        match &self.kind {
            Kind::Str(s) if show_strings => format!("string {}", quote_short(s)),
            Kind::Str(_) => "a string".to_string(),
            Kind::Int(i) => format!("integer {i}"),
            Kind::Float(x) => format!("float {x}"),
            Kind::Bool(b) => format!("boolean {b}"),
            Kind::Datetime(d) => format!("datetime {d}"),
            Kind::Array(_) => "an array".to_string(),
            Kind::Table(_) => "a table".to_string(),
        }
    }

    /// Converts a value that has no position (built by the Python front, for instance).
    pub(crate) fn from_value(v: &toml::Value) -> Node {
        let kind = match v {
            toml::Value::String(s) => Kind::Str(s.clone()),
            toml::Value::Integer(i) => Kind::Int(i128::from(*i)),
            toml::Value::Float(x) => Kind::Float(*x),
            toml::Value::Boolean(b) => Kind::Bool(*b),
            toml::Value::Datetime(d) => Kind::Datetime(d.to_string()),
            toml::Value::Array(a) => Kind::Array(a.iter().map(Node::from_value).collect()),
            toml::Value::Table(t) => Kind::Table(
                t.iter()
                    .map(|(k, v)| Entry {
                        key: k.clone(),
                        line: None,
                        value: Node::from_value(v),
                    })
                    .collect(),
            ),
        };
        Node { kind, line: None }
    }

    /// Converts JSON values (what a host language declared). A number that is not an integer
    /// is a float; `null` is not a TOML value, and is read as an absent key by the caller, so
    /// it becomes an empty table here only if it slips through.
    pub(crate) fn from_json(v: &serde_json::Value) -> Node {
        use serde_json::Value as J;
        let kind = match v {
            J::String(s) => Kind::Str(s.clone()),
            J::Number(n) => match n.as_i64() {
                Some(i) => Kind::Int(i128::from(i)),
                None => match n.as_u64() {
                    Some(u) => Kind::Int(i128::from(u)),
                    None => Kind::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
            },
            J::Bool(b) => Kind::Bool(*b),
            J::Array(a) => Kind::Array(a.iter().map(Node::from_json).collect()),
            J::Object(o) => Kind::Table(
                o.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| Entry {
                        key: k.clone(),
                        line: None,
                        value: Node::from_json(v),
                    })
                    .collect(),
            ),
            J::Null => Kind::Table(Vec::new()),
        };
        Node { kind, line: None }
    }
}

/// Quotes a string for a message, cutting long values.
pub(crate) fn quote_short(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{:?}…", cut)
    } else {
        format!("{s:?}")
    }
}

/// Maps byte offsets to 1-based line and column.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, starts }
    }

    fn line(&self, offset: usize) -> usize {
        match self.starts.binary_search(&offset) {
            Ok(i) => i + 1,
            Err(i) => i,
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line(offset);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, column)
    }
}

/// Parses a whole document. On syntax errors, returns every error the parser reported.
pub(crate) fn parse_document(text: &str) -> Result<Node, Vec<SyntaxError>> {
    let index = LineIndex::new(text);
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| {
                let (line, column) = match e.span() {
                    Some(span) => {
                        let (l, c) = index.line_col(span.start);
                        (Some(l), Some(c))
                    }
                    None => (None, None),
                };
                SyntaxError {
                    line,
                    column,
                    message: e.message().to_string(),
                }
            })
            .collect());
    }
    Ok(Node {
        kind: Kind::Table(table_entries(doc.get_ref(), &index)),
        line: None,
    })
}

fn table_entries(t: &DeTable<'_>, index: &LineIndex<'_>) -> Vec<Entry> {
    t.iter()
        .map(|(k, v)| Entry {
            key: k.get_ref().to_string(),
            line: Some(index.line(k.span().start)),
            value: from_de(v, index),
        })
        .collect()
}

fn from_de(v: &Spanned<DeValue<'_>>, index: &LineIndex<'_>) -> Node {
    let kind = match v.get_ref() {
        DeValue::String(s) => Kind::Str(s.to_string()),
        DeValue::Integer(i) => {
            let text = i.as_str();
            let value = i128::from_str_radix(text, i.radix()).unwrap_or(if text.starts_with('-') {
                i128::MIN
            } else {
                i128::MAX
            });
            Kind::Int(value)
        }
        DeValue::Float(x) => Kind::Float(x.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Kind::Bool(*b),
        DeValue::Datetime(d) => Kind::Datetime(d.to_string()),
        DeValue::Array(a) => Kind::Array(a.iter().map(|e| from_de(e, index)).collect()),
        DeValue::Table(t) => Kind::Table(table_entries(t, index)),
    };
    Node {
        kind,
        line: Some(index.line(v.span().start)),
    }
}
