//! `${VAR}` / `${VAR:-default}` interpolation of string values.

/// Why a string could not be interpolated. Messages name the variable, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InterpError {
    /// `${NAME}` with `NAME` unset and no default.
    Unset(String),
    /// `${` without a closing `}`, or a bad variable name.
    Malformed(String),
}

impl std::fmt::Display for InterpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterpError::Unset(name) => write!(
                f,
                "environment variable {name} is not set (referenced as ${{{name}}}; \
                 set it, or give a default with ${{{name}:-default}})"
            ),
            InterpError::Malformed(why) => f.write_str(why),
        }
    }
}

/// True for `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces every `${VAR}` and `${VAR:-default}` in `raw`.
///
/// `${VAR}` is the value of `VAR` (an error when unset; empty when set to the empty string);
/// `${VAR:-default}` is `default` when `VAR` is unset or empty, as in POSIX shells. A `$` not
/// followed by `{` is kept as is. All problems in the string are reported.
pub(crate) fn interpolate(
    raw: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<InterpError>> {
    if !raw.contains("${") {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut errors = Vec::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            errors.push(InterpError::Malformed(format!(
                "unterminated variable reference {}: expected ${{NAME}} or ${{NAME:-default}}",
                super::node::quote_short(&rest[start..])
            )));
            rest = "";
            break;
        };
        let inner = &after[..end];
        let (name, default) = match inner.find(":-") {
            Some(i) => (&inner[..i], Some(&inner[i + 2..])),
            None => (inner, None),
        };
        if !is_env_name(name) {
            errors.push(InterpError::Malformed(format!(
                "invalid variable reference ${{{inner}}}: the name must be letters, digits and \
                 underscores, not starting with a digit (forms: ${{NAME}} or ${{NAME:-default}})"
            )));
        } else {
            match (env(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => errors.push(InterpError::Unset(name.to_string())),
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}
