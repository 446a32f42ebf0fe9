//! Conditions: compile (with and without the field check), print errors, evaluate on rows.
//!
//! Input: the expression, then optionally a NUL byte and either a JSON document for the rows
//! (`[new, old]`, or one row used as both) or bytes that pick the values of the referenced
//! fields from a palette (two bytes per field: new, old).
//!
//! Checked: nothing panics; a condition that compiles without the field check compiles with
//! it or fails only on an unknown field; `!(expr)` evaluates to the negation of `expr` on
//! every combination of rows.

#![no_main]

mod common;

use fraiseql_observers::{Condition, ConditionError};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

const FIELDS: &[&str] = &[
    "id",
    "status",
    "total",
    "customer",
    "is_premium",
    "tags",
    "note",
];

fn palette() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(false),
        json!(0),
        json!(-1),
        json!(1000),
        json!(1000.0),
        json!(99.99),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(""),
        json!("shipped"),
        json!("pending"),
        json!("Paris"),
        json!([1, 2]),
        json!({"a": 1}),
        json!({"address": {"city": "Paris"}, "name": "Ann"}),
    ]
}

/// The rows to evaluate on: (new, old).
fn rows(cond: &Condition, tail: &[u8]) -> (Value, Value) {
    if let Ok(v) = serde_json::from_slice::<Value>(tail) {
        return match v {
            Value::Array(mut a) if a.len() == 2 => {
                let old = a.pop().unwrap_or(Value::Null);
                let new = a.pop().unwrap_or(Value::Null);
                (new, old)
            }
            v => (v.clone(), v),
        };
    }
    let palette = palette();
    let pick =
        |i: usize| palette[usize::from(tail.get(i).copied().unwrap_or(0)) % palette.len()].clone();
    let (mut new, mut old) = (serde_json::Map::new(), serde_json::Map::new());
    for (i, field) in cond.referenced_fields().into_iter().enumerate() {
        new.insert(field.to_owned(), pick(2 * i));
        old.insert(field.to_owned(), pick(2 * i + 1));
    }
    (Value::Object(new), Value::Object(old))
}

fuzz_target!(|data: &[u8]| {
    let (expr, tail) = common::split_nul(data);
    let Ok(expr) = std::str::from_utf8(expr) else {
        return;
    };
    let known: Vec<String> = FIELDS.iter().map(|f| f.to_string()).collect();
    let checked = Condition::compile(expr, Some(&known));
    if let Err(e) = &checked {
        let _ = e.to_string();
        let _ = (e.line(), e.column(), e.source_line());
    }
    let cond = match Condition::compile(expr, None) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            assert!(
                checked.is_err(),
                "compiles only with the field check: {expr:?}"
            );
            return;
        }
    };
    if let Err(e @ ConditionError::Syntax { .. }) = &checked {
        panic!("a syntax error only with the field check: {e}");
    }
    let _ = (cond.to_string(), cond.source(), cond.referenced_fields());

    let (new, old) = rows(&cond, tail);
    let negated = Condition::compile(&format!("!({expr})"), None).ok();
    for (n, o) in [
        (Some(&new), Some(&old)),
        (Some(&new), None),
        (None, Some(&old)),
        (None, None),
    ] {
        let result = cond.evaluate(n, o);
        assert_eq!(result, cond.evaluate(n, o), "deterministic");
        if let Some(neg) = &negated {
            assert_eq!(
                neg.evaluate(n, o),
                !result,
                "!({expr}) on new={n:?} old={o:?}"
            );
        }
    }
});
