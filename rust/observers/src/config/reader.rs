//! Typed, error-collecting readers over [`Node`] trees.
//!
//! Every reader reports problems into [`Ctx::errors`] and returns `None`, so that one load
//! reports every problem at once.

use std::cell::RefCell;
use std::rc::Rc;

use super::error::ConfigError;
use super::interp::{self, is_env_name};
use super::node::{quote_short, Entry, Kind, Node};

pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reading context: which file, how to read the environment, the errors so far, and the
/// tables opened (whose unknown keys [`Ctx::finish`] reports).
pub(crate) struct Ctx<'a> {
    pub(crate) file: String,
    pub(crate) env: Env<'a>,
    pub(crate) errors: Vec<ConfigError>,
    opened: Vec<Opened>,
}

/// A table being read: its path, line and entries.
///
/// Every key a reader asks for with [`Tbl::get`] is a key of the table: that call is the one
/// place a key is spelled. When the reading ends ([`Ctx::finish`]), each key the table holds
/// that no reader asked for is an unknown key, with a did-you-mean among those asked.
pub(crate) struct Tbl<'n> {
    pub(crate) path: String,
    pub(crate) line: Option<usize>,
    pub(crate) entries: &'n [Entry],
    asked: Rc<RefCell<Vec<String>>>,
}

/// What [`Ctx::finish`] needs of a table that was opened.
struct Opened {
    path: String,
    keys: Vec<(String, Option<usize>)>,
    asked: Rc<RefCell<Vec<String>>>,
    /// Where its unknown-key errors go among the others: where it was opened.
    at: usize,
}

impl<'n> Tbl<'n> {
    pub(crate) fn get(&self, key: &str) -> Option<&'n Node> {
        self.ask(key);
        self.entries.iter().find(|e| e.key == key).map(|e| &e.value)
    }

    /// Keys read without [`Self::get`] (an action's `type`, read to choose its reader).
    pub(crate) fn known(&self, keys: &[&str]) {
        for key in keys {
            self.ask(key);
        }
    }

    fn ask(&self, key: &str) {
        let mut asked = self.asked.borrow_mut();
        if !asked.iter().any(|k| k == key) {
            asked.push(key.to_owned());
        }
    }

    /// Dotted path of `key` in this table.
    pub(crate) fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

/// Allowed integer values.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Range {
    /// `0 ..= i64::MAX`
    NonNegative,
    /// `1 ..= i64::MAX`
    Positive,
    /// `-1` (unlimited) or `1 ..= i64::MAX`
    Limit,
    /// inclusive bounds
    Between(i128, i128),
}

impl Range {
    pub(crate) fn contains(self, v: i128) -> bool {
        let max = i128::from(i64::MAX);
        match self {
            Range::NonNegative => (0..=max).contains(&v),
            Range::Positive => (1..=max).contains(&v),
            Range::Limit => v == -1 || (1..=max).contains(&v),
            Range::Between(lo, hi) => (lo..=hi).contains(&v),
        }
    }

    pub(crate) fn expected(self) -> String {
        match self {
            Range::NonNegative => "a non-negative integer".to_string(),
            Range::Positive => "a positive integer (at least 1)".to_string(),
            Range::Limit => "-1 (unlimited) or a positive integer".to_string(),
            Range::Between(lo, hi) => format!("an integer between {lo} and {hi}"),
        }
    }
}

/// Appends a key to a dotted path, quoting keys that are not bare TOML keys.
pub(crate) fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

/// Nearest option to `input`, if it is near enough to be a plausible typo.
pub(crate) fn suggest<'a>(input: &str, options: &[&'a str]) -> Option<&'a str> {
    let input = input.to_ascii_lowercase();
    let mut best: Option<(&'a str, f64, f64)> = None;
    for &option in options {
        let lower = option.to_ascii_lowercase();
        let ndl = strsim::normalized_damerau_levenshtein(&input, &lower);
        let jw = strsim::jaro_winkler(&input, &lower);
        if ndl < 0.7 && jw < 0.88 {
            continue;
        }
        if best.is_none_or(|(_, b_ndl, b_jw)| (ndl, jw) > (b_ndl, b_jw)) {
            best = Some((option, ndl, jw));
        }
    }
    best.map(|(o, _, _)| o)
}

/// Keys whose string values may be secrets: never echo them in messages.
pub(crate) fn is_sensitive(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    p.contains("header")
        || p.contains("url")
        || p.contains("password")
        || p.contains("secret")
        || p.contains("token")
}

/// Shows at most the scheme of a URL-like value: never credentials, paths or query strings.
pub(crate) fn url_shape(value: &str) -> String {
    match value.find("://") {
        Some(i) => format!("\"{}://…\"", &value[..i]),
        None if value.trim().is_empty() => "an empty string".to_string(),
        None => "a value without a scheme://".to_string(),
    }
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(file: &str, env: Env<'a>) -> Self {
        Self {
            file: file.to_string(),
            env,
            errors: Vec::new(),
            opened: Vec::new(),
        }
    }

    /// Every error: those found while reading, and each table's unknown keys, placed where
    /// the table was opened so that errors stay in file order.
    pub(crate) fn finish(mut self) -> Vec<ConfigError> {
        // Last opened first, so that the positions of those before stay valid.
        for table in std::mem::take(&mut self.opened).into_iter().rev() {
            let asked = table.asked.borrow();
            let allowed: Vec<&str> = asked.iter().map(String::as_str).collect();
            let unknown: Vec<ConfigError> = table
                .keys
                .iter()
                .filter(|(key, _)| !allowed.contains(&key.as_str()))
                .map(|(key, line)| self.unknown_key(&join(&table.path, key), *line, key, &allowed))
                .collect();
            let at = table.at.min(self.errors.len());
            self.errors.splice(at..at, unknown);
        }
        self.errors
    }

    pub(crate) fn error(&mut self, key: &str, line: Option<usize>, message: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.file.clone(), key, line, message));
    }

    pub(crate) fn type_error(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.describe(!is_sensitive(path));
        self.error(
            path,
            node.line,
            format!("expected {expected}, found {found}"),
        );
    }

    /// Opens a table (a type error if it is not one). Its keys are those read from it.
    pub(crate) fn table<'n>(&mut self, node: &'n Node, path: &str) -> Option<Tbl<'n>> {
        let Kind::Table(entries) = &node.kind else {
            self.type_error(node, path, "a table");
            return None;
        };
        let asked = Rc::new(RefCell::new(Vec::new()));
        self.opened.push(Opened {
            path: path.to_string(),
            keys: entries.iter().map(|e| (e.key.clone(), e.line)).collect(),
            asked: asked.clone(),
            at: self.errors.len(),
        });
        Some(Tbl {
            path: path.to_string(),
            line: node.line,
            entries,
            asked,
        })
    }

    fn unknown_key(
        &self,
        path: &str,
        line: Option<usize>,
        key: &str,
        allowed: &[&str],
    ) -> ConfigError {
        let msg = match suggest(key, allowed) {
            Some(s) => format!("unknown key (did you mean {s}?)"),
            None if allowed.is_empty() => "unknown key (this table takes no keys)".to_string(),
            None => format!("unknown key (expected one of: {})", allowed.join(", ")),
        };
        ConfigError::new(self.file.clone(), path, line, msg)
    }

    /// Opens a table whose keys are free-form (HTTP headers).
    pub(crate) fn any_table<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Entry]> {
        match &node.kind {
            Kind::Table(entries) => Some(entries),
            _ => {
                self.type_error(node, path, "a table");
                None
            }
        }
    }

    pub(crate) fn array<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        expected: &str,
    ) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Array(items) => Some(items),
            _ => {
                self.type_error(node, path, expected);
                None
            }
        }
    }

    /// A string, without interpolation.
    pub(crate) fn raw_str<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n str> {
        match &node.kind {
            Kind::Str(s) => Some(s),
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    /// Interpolates `${VAR}` references in `raw`.
    pub(crate) fn interpolate(
        &mut self,
        raw: &str,
        path: &str,
        line: Option<usize>,
    ) -> Option<String> {
        match interp::interpolate(raw, self.env) {
            Ok(s) => Some(s),
            Err(errors) => {
                for e in errors {
                    self.error(path, line, e.to_string());
                }
                None
            }
        }
    }

    /// A string, interpolated.
    pub(crate) fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        let raw = self.raw_str(node, path)?;
        self.interpolate(raw, path, node.line)
    }

    /// A string that must not be empty (or blank) after interpolation.
    pub(crate) fn nonempty(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        if s.trim().is_empty() {
            let from = match &node.kind {
                Kind::Str(raw) if raw.contains("${") => format!(" (from {})", quote_short(raw)),
                _ => String::new(),
            };
            self.error(
                path,
                node.line,
                format!("expected a non-empty string, found an empty one{from}"),
            );
            return None;
        }
        Some(s)
    }

    /// An integer in `range`. A string containing `${VAR}` is interpolated and parsed, so that
    /// `http_port = "${PORT}"` works; any other string is a type error.
    pub(crate) fn int(&mut self, node: &Node, path: &str, range: Range) -> Option<i128> {
        let value = match &node.kind {
            Kind::Int(i) => *i,
            Kind::Str(raw) if raw.contains("${") => {
                let s = self.interpolate(raw, path, node.line)?;
                match parse_int(&s) {
                    Some(i) => i,
                    None => {
                        self.error(
                            path,
                            node.line,
                            format!(
                                "expected {}, found {} (from {})",
                                range.expected(),
                                quote_short(&s),
                                quote_short(raw)
                            ),
                        );
                        return None;
                    }
                }
            }
            _ => {
                self.type_error(node, path, &range.expected());
                return None;
            }
        };
        if !range.contains(value) {
            self.error(
                path,
                node.line,
                format!("expected {}, found {value}", range.expected()),
            );
            return None;
        }
        Some(value)
    }

    /// A duration: an integer of seconds, or a string of digits and a unit (`s`, `m`, `h`,
    /// `d`), e.g. `"7d"` or `"${RETENTION:-24h}"`.
    pub(crate) fn duration(&mut self, node: &Node, path: &str) -> Option<std::time::Duration> {
        let text = match &node.kind {
            Kind::Int(i) if *i >= 0 => {
                return u64::try_from(*i).ok().map(std::time::Duration::from_secs)
            }
            Kind::Str(raw) => self.interpolate(raw, path, node.line)?,
            _ => {
                self.type_error(
                    node,
                    path,
                    "a duration such as \"7d\" or a number of seconds",
                );
                return None;
            }
        };
        match parse_duration(&text) {
            Some(v) => Some(v),
            None => {
                self.error(
                    path,
                    node.line,
                    format!(
                        "expected a duration such as \"90s\", \"15m\", \"24h\" or \"7d\", found {}",
                        quote_short(&text)
                    ),
                );
                None
            }
        }
    }

    /// A size in bytes: an integer, or a string of digits and a unit (`B`, `kB`, `MB`, `GB`,
    /// `TB`, powers of 1024 as PostgreSQL counts them), e.g. `"512MB"` or `"${MAX_WAL:-1GB}"`.
    pub(crate) fn size(&mut self, node: &Node, path: &str) -> Option<u64> {
        let text = match &node.kind {
            Kind::Int(i) if *i >= 0 => return u64::try_from(*i).ok(),
            Kind::Str(raw) => self.interpolate(raw, path, node.line)?,
            _ => {
                self.type_error(node, path, "a size such as \"1GB\" or a number of bytes");
                return None;
            }
        };
        match parse_size(&text) {
            Some(v) => Some(v),
            None => {
                self.error(
                    path,
                    node.line,
                    format!(
                        "expected a size such as \"512MB\" or \"1GB\" (units B, kB, MB, GB, TB), \
                         found {}",
                        quote_short(&text)
                    ),
                );
                None
            }
        }
    }

    /// A boolean (or a string containing `${VAR}` that interpolates to `true`/`false`).
    pub(crate) fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.kind {
            Kind::Bool(b) => Some(*b),
            Kind::Str(raw) if raw.contains("${") => {
                let s = self.interpolate(raw, path, node.line)?;
                match s.trim().to_ascii_lowercase().as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => {
                        self.error(
                            path,
                            node.line,
                            format!(
                                "expected true or false, found {} (from {})",
                                quote_short(&s),
                                quote_short(raw)
                            ),
                        );
                        None
                    }
                }
            }
            _ => {
                self.type_error(node, path, "true or false");
                None
            }
        }
    }

    /// One of a fixed set of words. `map` normalizes and recognizes (aliases included);
    /// `shown` are the canonical spellings listed in the error.
    pub(crate) fn choice<T>(
        &mut self,
        node: &Node,
        path: &str,
        shown: &[&str],
        map: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let s = self.string(node, path)?;
        if let Some(v) = map(s.trim()) {
            return Some(v);
        }
        let list = shown
            .iter()
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut msg = format!("expected one of {list}, found {}", quote_short(&s));
        if let Some(best) = suggest(&s, shown) {
            msg.push_str(&format!(" (did you mean {best:?}?)"));
        }
        self.error(path, node.line, msg);
        None
    }

    /// The name of an environment variable (for `*_env` keys). Not interpolated: the variable
    /// is read when the action runs.
    pub(crate) fn env_name(&mut self, node: &Node, path: &str) -> Option<String> {
        let raw = self.raw_str(node, path)?;
        let key = path.rsplit('.').next().unwrap_or(path);
        let plain = key.strip_suffix("_env").unwrap_or(key);
        if is_env_name(raw) {
            return Some(raw.to_string());
        }
        let msg = if raw.contains("${") {
            format!(
                "expected the name of an environment variable, found a ${{...}} reference; \
                 write {key} = \"NAME\" (the variable is read when the action runs), \
                 or {plain} = \"${{NAME}}\""
            )
        } else if raw.contains("://") {
            format!(
                "expected the name of an environment variable, found what looks like a URL; \
                 put the URL in {plain} instead, or its variable's name here"
            )
        } else if raw.is_empty() {
            "expected the name of an environment variable, found an empty string".to_string()
        } else {
            format!(
                "expected the name of an environment variable (letters, digits and _, not \
                 starting with a digit), found {}",
                quote_short(raw)
            )
        };
        self.error(path, node.line, msg);
        None
    }

    /// An `http://` or `https://` URL (interpolated). The value is never echoed.
    pub(crate) fn http_url(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        let lower = s.trim().to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        match rest {
            Some(r) if !r.is_empty() => Some(s.trim().to_string()),
            _ => {
                self.error(
                    path,
                    node.line,
                    format!(
                        "expected a URL starting with http:// or https://, found {}",
                        url_shape(&s)
                    ),
                );
                None
            }
        }
    }
}

/// Parses an integer written in decimal, with optional `_` separators (as TOML allows).
pub(crate) fn parse_int(s: &str) -> Option<i128> {
    let t: String = s.trim().chars().filter(|&c| c != '_').collect();
    if t.is_empty() {
        return None;
    }
    t.parse().ok()
}

/// `"512MB"`, `"1 GB"`, `"1048576"`: digits, then an optional unit (case-insensitive, 1024-based).
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let number = u64::try_from(parse_int(&s[..digits])?).ok()?;
    let factor: u64 = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// `"90s"`, `"15m"`, `"24h"`, `"7d"`, `"3600"` (seconds).
pub(crate) fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let digits = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let number = u64::try_from(parse_int(&s[..digits])?).ok()?;
    let factor: u64 = match s[digits..].trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number
        .checked_mul(factor)
        .map(std::time::Duration::from_secs)
}
