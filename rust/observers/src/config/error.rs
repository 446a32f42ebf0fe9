//! Configuration errors: every one names the file, the dotted key and (where known) the line.

use std::fmt;

/// One configuration problem.
///
/// Displayed as `file:line[:column]: key: message`, for example
/// `fraiseql.toml:3: observers.max_dlq_sise: unknown key (did you mean max_dlq_size?)`.
/// `line`/`column` are 1-based; they are `None` for values that carry no position (values built
/// by the Python front, environment variables, unreadable files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File label (`fraiseql.toml`), `environment` for `FRAISEQL_NATS_*` overrides, or the origin
    /// given to [`parse_handler`](super::parse_handler) and friends.
    pub file: String,
    /// Dotted key path (`observers.handlers[1].actions[0].url_env`); empty for file-level errors.
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column; only set for TOML syntax errors.
    pub column: Option<usize>,
    /// What was expected and what was found.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(
        file: impl Into<String>,
        key: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            key: key.into(),
            line,
            column: None,
            message: message.into(),
        }
    }
}

impl ConfigError {
    /// A problem that is not the config's (a schema or condition error), to list with them:
    /// shown as its message alone.
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            file: String::new(),
            key: String::new(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.is_empty() && self.key.is_empty() {
            return f.write_str(&self.message);
        }
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// All the problems found in one load, in the order they were found (file order, then
/// cross-field checks). Displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
