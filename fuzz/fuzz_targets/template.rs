//! Templates of the built-in actions (webhook `body_template`, Slack `message`, email
//! `subject` / `body_template`): compile, with and without the entity's fields, and render.
//!
//! Input: one byte of options (bits 0-1: webhook / Slack / email; bits 2-3: INSERT / UPDATE /
//! DELETE), the template text, then optionally a NUL byte and a JSON document for the rows
//! (`[new, old]`, or one row used as both); default rows otherwise.
//!
//! Checked: nothing panics, and the escaping is exact: the input text as a field value comes
//! back unchanged from a JSON webhook body (parsed), a Slack message (unescaped, and with no
//! `<` or `>` left) and an email (as is).

#![no_main]

mod common;

use fraiseql_observers::fuzzing::{render_template, TemplateKind};
use fraiseql_observers::{EntityDef, Event, EventKind};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fn entity() -> EntityDef {
    EntityDef {
        name: "Order".into(),
        table: "tb_order".into(),
        fields: ["id", "status", "total", "customer", "items", "note", "new"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    }
}

fn event(kind: EventKind, new: Value, old: Value) -> Event {
    let (new, old) = match kind {
        EventKind::Insert => (Some(new), None),
        EventKind::Update => (Some(new), Some(old)),
        EventKind::Delete => (None, Some(old)),
    };
    let mut e = Event::new("Order", kind, "tb_order", new, old);
    e.id = "0000000016B374D8-1".into();
    e.timestamp = "2026-02-25T10:00:00.000000Z".into();
    e
}

fn rows(tail: &[u8]) -> (Value, Value) {
    match serde_json::from_slice::<Value>(tail) {
        Ok(Value::Array(mut a)) if a.len() == 2 => {
            let old = a.pop().unwrap_or(Value::Null);
            let new = a.pop().unwrap_or(Value::Null);
            (new, old)
        }
        Ok(v) => (v.clone(), v),
        Err(_) => (
            json!({"id": "o-1", "status": "shipped", "total": 12.5, "note": null,
                   "customer": {"name": "Ann \"A\" <x>", "tags": ["a", "b"]},
                   "items": [{"sku": "X-1", "qty": 2}]}),
            json!({"id": "o-1", "status": "paid", "total": 10}),
        ),
    }
}

fn unslack(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let (text, tail) = common::split_nul(rest);
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let kind = match options & 3 {
        0 => TemplateKind::WebhookBody,
        1 => TemplateKind::SlackMessage,
        _ => TemplateKind::Email,
    };
    let event_kind = match (options >> 2) & 3 {
        0 => EventKind::Insert,
        1 => EventKind::Update,
        _ => EventKind::Delete,
    };
    let (new, old) = rows(tail);
    let ev = event(event_kind, new, old);
    let entity = entity();
    let checked = render_template(kind, text, Some(&entity), &ev);
    match render_template(kind, text, None, &ev) {
        Ok(_) => {}
        Err(e) => assert!(
            checked.is_err(),
            "compiles with the entity's fields, not without: {e}"
        ),
    }
    if kind == TemplateKind::Email && !text.contains('{') {
        let (out, missing) = render_template(kind, text, None, &ev).expect("plain text compiles");
        assert_eq!(out, text, "plain text renders as is");
        assert!(missing.is_none());
    }

    // The text as a value: escaping is exact.
    let valued = event(EventKind::Insert, json!({"v": text}), Value::Null);
    let (out, _) =
        render_template(TemplateKind::WebhookBody, "[\"{{v}}\"]", None, &valued).expect("compiles");
    let parsed: Value = serde_json::from_str(&out).expect("a JSON body stays JSON");
    assert_eq!(parsed, json!([text]), "JSON escaping of {text:?}");
    let (out, _) =
        render_template(TemplateKind::SlackMessage, "{v}", None, &valued).expect("compiles");
    assert!(
        !out.contains(['<', '>']),
        "Slack escaping of {text:?}: {out:?}"
    );
    assert_eq!(unslack(&out), text, "Slack escaping of {text:?}");
    let (out, _) = render_template(TemplateKind::Email, "{v}", None, &valued).expect("compiles");
    assert_eq!(out, text);
});
