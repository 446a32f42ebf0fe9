//! The configuration reader: `fraiseql.toml` and `fraiseql-observer.toml` text, `${VAR}` and
//! `${VAR:-default}` interpolation, the `FRAISEQL_NATS_*` overrides and the cross-field
//! checks (`Config::from_sources`, `Config::facts`); then, as `fraiseql check` does, each
//! handler's condition and action templates.
//!
//! Input: the main file, then optionally a NUL byte and the runtime file, then optionally a
//! NUL byte and the environment, one `NAME=value` per line (a default environment otherwise).
//!
//! Skipped: a file that sets `credentials_file` or `nkey_file`: the loader reads the file it
//! names, and a fuzzer must not read arbitrary paths (`/dev/zero`, a FIFO) of the machine.

#![no_main]

mod common;

use std::collections::HashMap;

use fraiseql_observers::{action, Condition, Config};
use libfuzzer_sys::fuzz_target;
use toml::de::{DeTable, DeValue};

const FILE_KEYS: &[&str] = &["credentials_file", "nkey_file"];

fn names_a_file(table: &DeTable<'_>) -> bool {
    table
        .iter()
        .any(|(k, v)| FILE_KEYS.contains(&k.get_ref().as_ref()) || value_names_a_file(v.get_ref()))
}

fn value_names_a_file(v: &DeValue<'_>) -> bool {
    match v {
        DeValue::Table(t) => names_a_file(t),
        DeValue::Array(a) => a.iter().any(|v| value_names_a_file(v.get_ref())),
        _ => false,
    }
}

/// Whether the loader would read a file named in `text` (it reads nothing when the text does
/// not parse).
fn reads_files(text: &str) -> bool {
    let (doc, errors) = DeTable::parse_recoverable(text);
    errors.is_empty() && names_a_file(doc.get_ref())
}

fn default_env() -> HashMap<String, String> {
    [
        ("DATABASE_URL", "postgres://app:pw@db/app"),
        ("NATS_URL", "nats://localhost:4222"),
        ("API_TOKEN", "s3cr3t"),
        ("EMPTY", ""),
        ("REDIS_URL", "redis://localhost:6379/0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (main, rest) = common::split_nul(data);
    let (runtime, env) = if rest.is_empty() {
        (None, None)
    } else {
        let (runtime, env) = common::split_nul(rest);
        (Some(runtime), (!env.is_empty()).then_some(env))
    };
    let Ok(main) = std::str::from_utf8(main) else {
        return;
    };
    let runtime = match runtime.map(std::str::from_utf8) {
        Some(Ok(r)) => Some(r),
        Some(Err(_)) => return,
        None => None,
    };
    if reads_files(main) || runtime.is_some_and(reads_files) {
        return;
    }
    let env = match env.map(std::str::from_utf8) {
        Some(Ok(text)) => parse_env(text),
        Some(Err(_)) => return,
        None => default_env(),
    };
    let lookup = |name: &str| env.get(name).cloned();
    let main = Some(("fraiseql.toml", main));
    let runtime = runtime.map(|r| ("fraiseql-observer.toml", r));

    let _ = Config::facts(main, runtime, &lookup);
    match Config::from_sources(main, runtime, &lookup) {
        Ok(config) => {
            let _ = format!("{config:?}");
            for h in &config.observers.handlers {
                if let Some(c) = &h.condition {
                    if let Err(e) = Condition::compile(c, None) {
                        let _ = e.to_string();
                    }
                }
                for a in &h.actions {
                    if let Err(e) = action::check(&h.name, a, None) {
                        let _ = e.to_string();
                    }
                }
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "an error without a message");
            let _ = errors.to_string();
            for e in errors.iter() {
                let _ = e.to_string();
            }
        }
    }
});
