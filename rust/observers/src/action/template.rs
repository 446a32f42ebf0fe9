//! Templates of the built-in actions, compiled once when the action is built.
//!
//! Two syntaxes share one compiled form (a list of literal and placeholder segments):
//!
//! - [`Syntax::Mustache`], for webhook bodies: `{{field}}`. Single braces are literal text, so
//!   JSON templates need no escaping. An unterminated or malformed `{{…}}` is a build error.
//! - [`Syntax::Braces`], for Slack messages and email subjects and bodies: `{field}` (and
//!   `{{field}}`, for users used to the webhook syntax). A brace that does not start a valid
//!   placeholder (`{ }`, `{"a": 1}`) is literal text.
//!
//! A placeholder names:
//!
//! - `field`, `nested.field`, `items.0.sku`: a value of the row the event describes (`new`, or
//!   `old` for a DELETE);
//! - `new.field` / `old.field`: a value of the new / previous row (unless the entity declares
//!   a field called `new` / `old`, which then wins);
//! - `_json`: the whole row as JSON (`new`, or `old` for a DELETE); `_id`, `_event`,
//!   `_entity`, `_table`, `_timestamp`: the event's metadata.
//!
//! When the entity is known, the first segment of a field path must be a declared field (a
//! build error with a did-you-mean otherwise). At run time a value that is absent renders as
//! the empty string and is reported to the caller, which logs it once per action.

use serde_json::Value;

use crate::event::Event;
use crate::schema::EntityDef;

/// Placeholder syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    /// `{{field}}`
    Mustache,
    /// `{field}`
    Braces,
}

/// How substituted values are escaped (literal template text is never touched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escape {
    /// As is.
    None,
    /// As the contents of a JSON string; `null` for a JSON null.
    Json,
    /// Slack's control characters `&`, `<`, `>` (so that a value cannot mention `<!channel>`).
    Slack,
}

impl Escape {
    /// JSON escaping when the template is JSON: its first non-blank character is `{` or `[`.
    pub(crate) fn json_if_json_template(text: &str) -> Escape {
        match text.trim_start().chars().next() {
            Some('{' | '[') => Escape::Json,
            _ => Escape::None,
        }
    }
}

const META: &[&str] = &["_json", "_id", "_event", "_entity", "_table", "_timestamp"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `new`, or `old` for a DELETE.
    Row,
    New,
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    Json,
    Id,
    Event,
    Entity,
    Table,
    Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Field {
        source: Source,
        path: Vec<String>,
        /// As written, for the "no value" warning.
        name: String,
    },
    Meta(Meta),
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
    escape: Escape,
    literal_len: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `a`, `a.b`, `a.0.c`: non-empty segments of letters, digits, `_` and `-`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('.')
            .all(|seg| !seg.is_empty() && seg.chars().all(is_name_char))
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Template {
    /// Compiles `text`. Errors are plain sentences without context; the caller adds the
    /// observer and key.
    pub(crate) fn compile(
        text: &str,
        syntax: Syntax,
        escape: Escape,
        entity: Option<&EntityDef>,
    ) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut errors = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find('{') else {
                literal.push_str(rest);
                break;
            };
            literal.push_str(&rest[..open]);
            let at = &rest[open..];
            // `{{ name }}`, both syntaxes
            if let Some(inner_start) = at.strip_prefix("{{") {
                match inner_start.find("}}") {
                    Some(close) => {
                        let name = inner_start[..close].trim();
                        if is_valid_name(name) {
                            flush(&mut segments, &mut literal);
                            segments.push(placeholder(name, entity, syntax, &mut errors));
                            rest = &inner_start[close + 2..];
                            continue;
                        }
                        if syntax == Syntax::Mustache {
                            errors.push(format!(
                                "invalid placeholder {}: expected a field name such as \
                                 {{{{total}}}}, {{{{customer.name}}}}, {{{{old.status}}}} or \
                                 {{{{_json}}}} (sections and partials are not supported)",
                                shorten(&at[..close + 4])
                            ));
                            rest = &inner_start[close + 2..];
                            continue;
                        }
                    }
                    None if syntax == Syntax::Mustache => {
                        errors.push(format!(
                            "unterminated placeholder {}: expected }}}} to close it",
                            shorten(at)
                        ));
                        break;
                    }
                    None => {}
                }
            }
            // `{name}`, brace syntax only
            if syntax == Syntax::Braces {
                let inner = &at[1..];
                if inner.starts_with(is_name_start) {
                    if let Some(close) = inner.find('}') {
                        let name = &inner[..close];
                        if is_valid_name(name) {
                            flush(&mut segments, &mut literal);
                            segments.push(placeholder(name, entity, syntax, &mut errors));
                            rest = &inner[close + 1..];
                            continue;
                        }
                    }
                }
            }
            literal.push('{');
            rest = &at[1..];
        }
        flush(&mut segments, &mut literal);
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let literal_len = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len(),
                _ => 0,
            })
            .sum();
        Ok(Template {
            segments,
            escape,
            literal_len,
        })
    }

    /// The top-level row fields it reads (`{{customer.name}}` reads `customer`).
    pub(crate) fn fields(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Field { path, .. } => path.first().map(String::as_str),
            _ => None,
        })
    }

    /// Renders the template for `event`. The name of the first placeholder without a value is
    /// stored in `missing` (if it is still `None`).
    pub(crate) fn render(&self, event: &Event, missing: &mut Option<String>) -> String {
        let mut out = String::with_capacity(self.literal_len + 32 * self.segments.len());
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::Meta(meta) => {
                    let text = match meta {
                        Meta::Json => {
                            // Always valid JSON, never escaped: meant to be embedded unquoted.
                            let row = event.row().unwrap_or(&Value::Null);
                            out.push_str(&row.to_string());
                            continue;
                        }
                        Meta::Id => event.id.as_str(),
                        Meta::Event => event.event.as_str(),
                        Meta::Entity => event.entity.as_str(),
                        Meta::Table => event.table.as_str(),
                        Meta::Timestamp => event.timestamp.as_str(),
                    };
                    self.push_escaped(&mut out, text);
                }
                Segment::Field { source, path, name } => {
                    let row = match source {
                        Source::Row => event.row(),
                        Source::New => event.new.as_ref(),
                        Source::Old => event.old.as_ref(),
                    };
                    match row.and_then(|r| lookup(r, path)) {
                        Some(value) => self.push_value(&mut out, value),
                        None => {
                            if missing.is_none() {
                                *missing = Some(name.clone());
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn push_value(&self, out: &mut String, value: &Value) {
        match value {
            Value::String(s) => self.push_escaped(out, s),
            Value::Null if self.escape == Escape::Json => out.push_str("null"),
            Value::Null => {}
            Value::Bool(_) | Value::Number(_) => out.push_str(&value.to_string()),
            // Objects and arrays as JSON text: valid unquoted in a JSON template.
            Value::Array(_) | Value::Object(_) => match self.escape {
                Escape::Json | Escape::None => out.push_str(&value.to_string()),
                Escape::Slack => push_slack(out, &value.to_string()),
            },
        }
    }

    fn push_escaped(&self, out: &mut String, s: &str) {
        match self.escape {
            Escape::None => out.push_str(s),
            Escape::Json => push_json_string_contents(out, s),
            Escape::Slack => push_slack(out, s),
        }
    }
}

fn flush(segments: &mut Vec<Segment>, literal: &mut String) {
    if !literal.is_empty() {
        segments.push(Segment::Literal(std::mem::take(literal)));
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("`{out}`")
}

/// Resolves a placeholder name, checking fields against the entity.
fn placeholder(
    name: &str,
    entity: Option<&EntityDef>,
    syntax: Syntax,
    errors: &mut Vec<String>,
) -> Segment {
    let declared = |f: &str| entity.is_some_and(|e| e.fields.iter().any(|d| d == f));
    let mut path: Vec<String> = name.split('.').map(str::to_owned).collect();
    if let Some(meta) = meta_of(name) {
        if !declared(name) {
            return Segment::Meta(meta);
        }
    }
    let mut source = Source::Row;
    if path.len() > 1 && !declared(&path[0]) {
        match path[0].as_str() {
            "new" => source = Source::New,
            "old" => source = Source::Old,
            _ => {}
        }
        if source != Source::Row {
            path.remove(0);
        }
    }
    if let Some(entity) = entity {
        let first = &path[0];
        if !entity.fields.iter().any(|f| f == first) {
            errors.push(unknown_field(first, name, entity, syntax));
        }
    }
    Segment::Field {
        source,
        path,
        name: name.to_owned(),
    }
}

fn meta_of(name: &str) -> Option<Meta> {
    Some(match name {
        "_json" => Meta::Json,
        "_id" => Meta::Id,
        "_event" => Meta::Event,
        "_entity" => Meta::Entity,
        "_table" => Meta::Table,
        "_timestamp" => Meta::Timestamp,
        _ => return None,
    })
}

fn unknown_field(field: &str, written: &str, entity: &EntityDef, syntax: Syntax) -> String {
    let shown = match syntax {
        Syntax::Mustache => format!("{{{{{written}}}}}"),
        Syntax::Braces => format!("{{{written}}}"),
    };
    let candidates = entity
        .fields
        .iter()
        .map(String::as_str)
        .chain(META.iter().copied().filter(|_| field.starts_with('_')));
    let best = candidates
        .map(|c| (strsim::jaro_winkler(c, field), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let hint = match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None if entity.fields.is_empty() => format!("; `{}` declares no fields", entity.name),
        None => format!("; `{}` declares: {}", entity.name, entity.fields.join(", ")),
    };
    format!(
        "unknown field `{field}` in {shown}: type `{}` does not declare it{hint}",
        entity.name
    )
}

fn lookup<'a>(row: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut current = row;
    for segment in path {
        current = match current {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The contents of a JSON string literal (without the quotes).
pub(crate) fn push_json_string_contents(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

fn push_slack(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::event::EventKind;

    fn order() -> EntityDef {
        EntityDef {
            name: "Order".into(),
            table: "tb_order".into(),
            fields: vec![
                "id".into(),
                "status".into(),
                "total".into(),
                "customer".into(),
            ],
            kinds: Vec::new(),
        }
    }

    fn event() -> Event {
        Event::new(
            "Order",
            EventKind::Update,
            "tb_order",
            Some(json!({"id": "o-1", "status": "shipped", "total": 12.5,
                        "customer": {"name": "Ann \"A\" <x>"}, "note": null})),
            Some(json!({"id": "o-1", "status": "paid"})),
        )
    }

    fn render(t: &str, syntax: Syntax, escape: Escape) -> (String, Option<String>) {
        let tpl = Template::compile(t, syntax, escape, None).unwrap();
        let mut missing = None;
        (tpl.render(&event(), &mut missing), missing)
    }

    #[test]
    fn mustache_renders_fields_paths_old_and_meta() {
        let (out, missing) = render(
            "{{ id }} {{status}} was {{old.status}}; {{customer.name}} {{total}} {{_event}}",
            Syntax::Mustache,
            Escape::None,
        );
        assert_eq!(out, "o-1 shipped was paid; Ann \"A\" <x> 12.5 UPDATE");
        assert!(missing.is_none());
    }

    #[test]
    fn json_templates_escape_strings_and_embed_json() {
        let t = r#"{"who": "{{customer.name}}", "n": {{note}}, "row": {{_json}}}"#;
        assert_eq!(Escape::json_if_json_template(t), Escape::Json);
        let (out, _) = render(t, Syntax::Mustache, Escape::Json);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["who"], "Ann \"A\" <x>");
        assert_eq!(v["n"], Value::Null);
        assert_eq!(v["row"]["status"], "shipped");
    }

    #[test]
    fn braces_leave_non_placeholders_alone_and_escape_for_slack() {
        let (out, _) = render(
            "Order {id} {status} { x } {} {\"a\": 1} {{total}} {customer.name}",
            Syntax::Braces,
            Escape::Slack,
        );
        assert_eq!(
            out,
            "Order o-1 shipped { x } {} {\"a\": 1} 12.5 Ann \"A\" &lt;x&gt;"
        );
    }

    #[test]
    fn missing_values_render_empty_and_are_reported() {
        let (out, missing) = render("[{{nope}}][{{old.total}}]", Syntax::Mustache, Escape::None);
        assert_eq!(out, "[][]");
        assert_eq!(missing.as_deref(), Some("nope"));
    }

    #[test]
    fn unknown_fields_are_build_errors_with_hints() {
        let e = order();
        let err =
            Template::compile("{{totl}}", Syntax::Mustache, Escape::None, Some(&e)).unwrap_err();
        assert!(err.contains("unknown field `totl`"), "{err}");
        assert!(err.contains("did you mean `total`?"), "{err}");
        let err = Template::compile("{zzz}", Syntax::Braces, Escape::None, Some(&e)).unwrap_err();
        assert!(
            err.contains("declares: id, status, total, customer"),
            "{err}"
        );
        assert!(Template::compile(
            "{{old.status}} {{customer.name}} {{_json}}",
            Syntax::Mustache,
            Escape::None,
            Some(&e)
        )
        .is_ok());
        let err =
            Template::compile("{{_jsn}}", Syntax::Mustache, Escape::None, Some(&e)).unwrap_err();
        assert!(err.contains("did you mean `_json`?"), "{err}");
    }

    #[test]
    fn malformed_mustache_is_an_error() {
        for bad in ["{{#items}}", "{{ }}", "{{id"] {
            assert!(
                Template::compile(bad, Syntax::Mustache, Escape::None, None).is_err(),
                "{bad}"
            );
        }
    }
}
