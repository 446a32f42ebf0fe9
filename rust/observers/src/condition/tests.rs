use serde_json::{json, Value};

use super::{Condition, ConditionError};

fn c(src: &str) -> Condition {
    Condition::compile(src, None).unwrap_or_else(|e| panic!("`{src}` should compile:\n{e}"))
}

fn insert(src: &str, new: &Value) -> bool {
    c(src).evaluate(Some(new), None)
}

fn update(src: &str, new: &Value, old: &Value) -> bool {
    c(src).evaluate(Some(new), Some(old))
}

fn delete(src: &str, old: &Value) -> bool {
    c(src).evaluate(None, Some(old))
}

fn syntax(src: &str) -> ConditionError {
    match Condition::compile(src, None) {
        Ok(_) => panic!("`{src}` should not compile"),
        Err(e @ ConditionError::Syntax { .. }) => e,
        Err(e) => panic!("`{src}`: expected a syntax error, got {e:?}"),
    }
}

/// Asserts the syntax error's position, that its message contains `needle`, and the full
/// rendering (message line, source line, caret).
fn assert_syntax(src: &str, line: usize, column: usize, needle: &str) -> ConditionError {
    let e = syntax(src);
    assert_eq!((e.line(), e.column()), (line, column), "`{src}`: {e}");
    let ConditionError::Syntax {
        message,
        source_line,
        ..
    } = &e
    else {
        unreachable!()
    };
    assert!(
        message.contains(needle),
        "`{src}`: {message:?} lacks {needle:?}"
    );
    let expected = format!(
        "syntax error at line {line}, column {column}: {message}\n  {source_line}\n  {}^",
        " ".repeat(column - 1)
    );
    assert_eq!(e.to_string(), expected);
    e
}

fn fields(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn order_new() -> Value {
    json!({"id": 1, "status": "shipped", "total": 1500, "is_premium": true,
           "email": "new@example.com", "retry_count": 0})
}

fn order_old() -> Value {
    json!({"id": 1, "status": "pending", "total": 1500, "is_premium": true,
           "email": "old@example.com", "retry_count": 0})
}

// ---------------------------------------------------------------- spec examples

#[test]
fn total_greater_than() {
    assert!(insert("total > 1000", &json!({"total": 1500})));
    assert!(!insert("total > 1000", &json!({"total": 1000})));
    assert!(!insert("total > 1000", &json!({"total": 999.99})));
    assert!(update(
        "total > 1000",
        &json!({"total": 1000.5}),
        &json!({"total": 5})
    ));
    assert!(!update(
        "total > 1000",
        &json!({"total": 5}),
        &json!({"total": 5000})
    ));
}

#[test]
fn string_equality() {
    assert!(insert("status == 'active'", &json!({"status": "active"})));
    assert!(!insert(
        "status == 'active'",
        &json!({"status": "inactive"})
    ));
    assert!(insert("status == \"active\"", &json!({"status": "active"})));
    assert!(update(
        "status == 'active'",
        &json!({"status": "active"}),
        &json!({"status": "x"})
    ));
    assert!(!update(
        "status == 'active'",
        &json!({"status": "x"}),
        &json!({"status": "active"})
    ));
}

#[test]
fn boolean_equality() {
    assert!(insert("is_premium == true", &json!({"is_premium": true})));
    assert!(!insert("is_premium == true", &json!({"is_premium": false})));
    assert!(!insert(
        "is_premium == true",
        &json!({"is_premium": "true"})
    ));
    assert!(!insert("is_premium == true", &json!({})));
    assert!(update(
        "is_premium == true",
        &json!({"is_premium": true}),
        &json!({"is_premium": false})
    ));
    assert!(insert("is_premium == false", &json!({"is_premium": false})));
}

#[test]
fn changed_to_specific_value() {
    let src = "status.changed() && status == 'shipped'";
    assert!(update(src, &order_new(), &order_old()));
    // changed, but to something else
    assert!(!update(
        src,
        &json!({"status": "cancelled"}),
        &json!({"status": "pending"})
    ));
    // already shipped: not changed
    assert!(!update(
        src,
        &json!({"status": "shipped"}),
        &json!({"status": "shipped"})
    ));
    // INSERT and DELETE: changed() is false
    assert!(!insert(src, &order_new()));
    assert!(!delete(src, &order_new()));
}

#[test]
fn old_and_new_values() {
    let src = "status.old == 'pending' && status == 'approved'";
    let old = json!({"status": "pending"});
    assert!(update(src, &json!({"status": "approved"}), &old));
    assert!(!update(src, &json!({"status": "rejected"}), &old));
    assert!(!update(
        src,
        &json!({"status": "approved"}),
        &json!({"status": "draft"})
    ));
    // INSERT: no old row, `.old` is null
    assert!(!insert(src, &json!({"status": "approved"})));
    assert!(insert("status.old == null", &json!({"status": "approved"})));
    // `.new` reads the new row
    assert!(update(
        "status.new == 'approved'",
        &json!({"status": "approved"}),
        &old
    ));
    assert!(!update(
        "status.new == 'pending'",
        &json!({"status": "approved"}),
        &old
    ));
}

#[test]
fn email_changed() {
    assert!(update("email.changed()", &order_new(), &order_old()));
    assert!(!update("email.changed()", &order_new(), &order_new()));
    assert!(!insert("email.changed()", &order_new()));
    assert!(!delete("email.changed()", &order_old()));
    // missing counts as null
    assert!(update(
        "email.changed()",
        &json!({"email": "a"}),
        &json!({})
    ));
    assert!(!update(
        "email.changed()",
        &json!({"email": null}),
        &json!({})
    ));
    // numerically equal values did not change
    assert!(!update(
        "email.changed()",
        &json!({"email": 100.0}),
        &json!({"email": 100})
    ));
}

#[test]
fn and_of_comparisons() {
    let src = "total > 1000 && is_premium == true";
    assert!(insert(src, &json!({"total": 1001, "is_premium": true})));
    assert!(!insert(src, &json!({"total": 1001, "is_premium": false})));
    assert!(!insert(src, &json!({"total": 10, "is_premium": true})));
    assert!(update(
        src,
        &json!({"total": 2000, "is_premium": true}),
        &json!({"total": 1, "is_premium": false})
    ));
}

#[test]
fn or_of_comparisons() {
    let src = "status == 'failed' || retry_count > 3";
    assert!(insert(src, &json!({"status": "failed", "retry_count": 0})));
    assert!(insert(src, &json!({"status": "ok", "retry_count": 4})));
    assert!(!insert(src, &json!({"status": "ok", "retry_count": 3})));
    assert!(update(
        src,
        &json!({"status": "failed", "retry_count": 0}),
        &json!({"status": "ok", "retry_count": 0})
    ));
    assert!(!update(
        src,
        &json!({"status": "ok", "retry_count": 0}),
        &json!({"status": "failed", "retry_count": 9})
    ));
}

#[test]
fn field_to_field() {
    let src = "quantity > min_quantity";
    assert!(insert(src, &json!({"quantity": 10, "min_quantity": 5})));
    assert!(!insert(src, &json!({"quantity": 5, "min_quantity": 5})));
    assert!(insert(src, &json!({"quantity": 5.5, "min_quantity": 5})));
    assert!(update(
        src,
        &json!({"quantity": 10, "min_quantity": 5}),
        &json!({"quantity": 1, "min_quantity": 5})
    ));
    assert!(insert("status.old != status", &json!({"status": "x"})));
    assert!(update("status.old != status", &order_new(), &order_old()));
    assert!(!update("total.old != total", &order_new(), &order_old()));
}

#[test]
fn spaces_not_required() {
    assert!(insert("total>100", &json!({"total": 101})));
    assert!(!insert("total>100", &json!({"total": 100})));
    assert!(insert(
        "total>=100&&status=='a'||x",
        &json!({"total": 100, "status": "a"})
    ));
    assert!(insert("!(total<=-5)", &json!({"total": -4})));
    assert!(update(
        "status.changed()&&!email.changed()",
        &json!({"status": 1}),
        &json!({})
    ));
}

// ---------------------------------------------------------------- semantics

#[test]
fn numeric_equality_across_representations() {
    assert!(insert("total == 100", &json!({"total": 100.0})));
    assert!(insert("total == 100.0", &json!({"total": 100})));
    assert!(insert("total == 1e2", &json!({"total": 100})));
    assert!(insert("total == -5", &json!({"total": -5.0})));
    assert!(!insert("total != 100", &json!({"total": 100.0})));
    assert!(insert("a == b", &json!({"a": 100, "b": 100.0})));
    // u64 and i64 compare exactly
    assert!(insert(
        "big == 18446744073709551615",
        &json!({"big": u64::MAX})
    ));
    assert!(insert(
        "big > 9223372036854775807",
        &json!({"big": u64::MAX})
    ));
    assert!(insert(
        "neg < 18446744073709551615",
        &json!({"neg": i64::MIN})
    ));
    assert!(!insert(
        "big == 9007199254740993",
        &json!({"big": 9_007_199_254_740_992_i64})
    ));
    assert!(insert("price >= 99.99", &json!({"price": 99.99})));
    assert!(insert("price < 99.99", &json!({"price": 99.98})));
}

#[test]
fn strings_order_lexicographically() {
    assert!(insert("name < 'b'", &json!({"name": "abc"})));
    assert!(insert("name >= 'abc'", &json!({"name": "abc"})));
    assert!(!insert("name > 'b'", &json!({"name": "B"})));
    assert!(insert("name != 'x'", &json!({"name": "y"})));
}

#[test]
fn mixed_types() {
    let row = json!({"n": 1, "s": "1", "b": true, "z": null});
    for (src, expected) in [
        ("n == '1'", false),
        ("n != '1'", true),
        ("n > '0'", false),
        ("n < '2'", false),
        ("s == 1", false),
        ("b == 1", false),
        ("b != 1", true),
        ("b > false", false),
        ("z == null", true),
        ("missing == null", true),
        ("z != null", false),
        ("n == null", false),
        ("n != null", true),
        ("z < 1", false),
        ("z >= null", false),
    ] {
        assert_eq!(insert(src, &row), expected, "{src}");
    }
}

#[test]
fn nested_paths() {
    let row = json!({"customer": {"address": {"city": "Paris", "zip": 75001}, "name": "Ann"},
                     "tags": ["a"], "scalar": 5});
    assert!(insert("customer.address.city == 'Paris'", &row));
    assert!(!insert("customer.address.city == 'Lyon'", &row));
    assert!(insert("customer.address.zip > 75000", &row));
    assert!(insert("customer.missing.deep == null", &row));
    assert!(insert("scalar.x == null", &row)); // path through a non-object
    assert!(insert("tags.x == null", &row));
    assert!(insert("customer.address.city.old == null", &row));
    let old = json!({"customer": {"address": {"city": "Lyon"}}});
    assert!(update("customer.address.city.changed()", &row, &old));
    assert!(update("customer.address.city.old == 'Lyon'", &row, &old));
    assert!(!update(
        "customer.name.changed() && customer.name == 'x'",
        &row,
        &old
    ));
    assert!(update("customer.changed()", &row, &old));
    // reserved words are ordinary keys when not last
    let row = json!({"a": {"old": {"x": 1}, "changed": {"y": 2}, "null": 3}});
    assert!(insert("a.old.x == 1", &row));
    assert!(insert("a.changed.y == 2", &row));
    assert!(insert("a.null == 3", &row));
}

#[test]
fn composites_compare_structurally() {
    let row = json!({"a": [1, 2], "b": [1, 2], "c": {"k": 1}});
    assert!(insert("a == b", &row));
    assert!(!insert("a != b", &row));
    assert!(!insert("a == c", &row));
    assert!(!insert("a > b", &row));
    assert!(update("c.changed()", &json!({"c": {"k": 2}}), &row));
    assert!(!update("c.changed()", &row, &row));
}

#[test]
fn delete_reads_old_row() {
    let old = json!({"status": "shipped", "total": 50, "is_premium": true});
    assert!(delete("status == 'shipped'", &old));
    assert!(delete("total < 100 && is_premium", &old));
    assert!(delete("status.old == 'shipped'", &old));
    assert!(!delete("status.new == 'shipped'", &old)); // no new row
    assert!(delete("status.new == null", &old));
    assert!(!delete("status.changed()", &old));
    // no rows at all
    assert!(!c("status == 'x'").evaluate(None, None));
    assert!(c("status == null").evaluate(None, None));
}

#[test]
fn truthiness_and_not() {
    let row = json!({"yes": true, "no": false, "one": 1, "s": "true", "z": null});
    for (src, expected) in [
        ("yes", true),
        ("no", false),
        ("one", false),
        ("s", false),
        ("z", false),
        ("missing", false),
        ("!yes", false),
        ("!no", true),
        ("!one", true),
        ("!missing", true),
        ("!!yes", true),
        ("yes && one > 0", true),
        ("no || one == 1", true),
        ("!(one == 1)", false),
        ("!(one == 2) && !no", true),
        ("true", true),
        ("false", false),
        ("null", false),
        ("'x'", false),
        ("yes == !no", true),
        ("(one > 0) == yes", true),
        ("!yes == false", true),          // `!` binds tighter than `==`
        ("true || false && false", true), // `&&` binds tighter than `||`
        ("(true || false) && false", false),
        ("no && missing.x == 1 || yes", true),
    ] {
        assert_eq!(insert(src, &row), expected, "{src}");
    }
}

#[test]
fn string_escapes() {
    let row = json!({"s": "it's \"q\" \\ end", "nl": "a\nb"});
    assert!(insert(r#"s == 'it\'s "q" \\ end'"#, &row));
    assert!(insert(r#"s == "it's \"q\" \\ end""#, &row));
    assert!(insert(r"nl == 'a\nb'", &row));
    assert!(insert("s != ''", &row));
}

#[test]
fn multiline_and_unicode() {
    let src = "status == 'café'\n  && total > 10\n  || is_premium";
    assert!(insert(src, &json!({"status": "café", "total": 11})));
    assert!(insert(src, &json!({"is_premium": true})));
    assert!(!insert(src, &json!({"status": "café", "total": 1})));
    assert!(insert("prénom == 'Zoë'", &json!({"prénom": "Zoë"})));
}

#[test]
fn accessors() {
    let cond = c("status.changed() && status == 'shipped' || total > total.old && a.b.c");
    assert_eq!(
        cond.source(),
        "status.changed() && status == 'shipped' || total > total.old && a.b.c"
    );
    assert_eq!(cond.referenced_fields(), vec!["status", "total", "a"]);
    assert_eq!(cond.to_string(), cond.source());
    assert!(c("true").referenced_fields().is_empty());
    fn assert_traits<T: Clone + std::fmt::Debug + Send + Sync + 'static>() {}
    assert_traits::<Condition>();
    assert_traits::<ConditionError>();
    let cloned = cond.clone();
    assert!(cloned.evaluate(
        Some(&json!({"a": {"b": {"c": true}}, "total": 2})),
        Some(&json!({"total": 1}))
    ));
}

// ---------------------------------------------------------------- field check

#[test]
fn field_check_accepts_declared_fields() {
    let known = fields(&["status", "total", "customer"]);
    let cond = Condition::compile(
        "status.changed() && customer.address.city == 'x' || total.old > 1",
        Some(&known),
    )
    .unwrap();
    assert_eq!(
        cond.referenced_fields(),
        vec!["status", "customer", "total"]
    );
}

#[test]
fn unknown_field_with_suggestion() {
    let known = fields(&["id", "status", "total", "is_premium"]);
    let e = Condition::compile("totl > 100", Some(&known)).unwrap_err();
    assert_eq!(
        e,
        ConditionError::UnknownField {
            field: "totl".into(),
            line: 1,
            column: 1,
            source_line: "totl > 100".into(),
            suggestion: Some("total".into()),
            known: known.clone(),
        }
    );
    assert_eq!(
        e.to_string(),
        "unknown field `totl` at line 1, column 1 (did you mean `total`?)\n  totl > 100\n  ^"
    );

    // the first unknown field is reported, at its own position
    let e = Condition::compile("status == 'x' && is_premum && totl > 1", Some(&known)).unwrap_err();
    assert_eq!((e.line(), e.column()), (1, 18));
    assert!(
        matches!(&e, ConditionError::UnknownField { field, suggestion: Some(s), .. }
        if field == "is_premum" && s == "is_premium")
    );

    // case slip
    let e = Condition::compile("Status == 'x'", Some(&known)).unwrap_err();
    assert!(
        matches!(&e, ConditionError::UnknownField { suggestion: Some(s), .. } if s == "status")
    );

    // on a later line, in a changed() call
    let e = Condition::compile("total > 1 &&\n  stauts.changed()", Some(&known)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown field `stauts` at line 2, column 3 (did you mean `status`?)\n    stauts.changed()\n    ^"
    );
}

#[test]
fn unknown_field_without_suggestion_lists_known() {
    let known = fields(&["id", "status", "total"]);
    let e = Condition::compile("total > 1 && warehouse == 'x'", Some(&known)).unwrap_err();
    assert!(matches!(
        &e,
        ConditionError::UnknownField {
            suggestion: None,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "unknown field `warehouse` at line 1, column 14 (known fields: `id`, `status`, `total`)\n  total > 1 && warehouse == 'x'\n               ^"
    );
    let e = Condition::compile("x == 1", Some(&[])).unwrap_err();
    assert!(
        e.to_string().contains("(the entity declares no fields)"),
        "{e}"
    );
    // only the first segment is checked
    assert!(Condition::compile("status.anything.old == 1", Some(&known)).is_ok());
    // syntax errors win over unknown fields
    assert!(matches!(
        Condition::compile("nope == ", Some(&known)),
        Err(ConditionError::Syntax { .. })
    ));
}

// ---------------------------------------------------------------- syntax errors

#[test]
fn error_missing_value_after_operator() {
    let e = assert_syntax("total >", 1, 8, "expected a value after `>`");
    assert_eq!(
        e.to_string(),
        "syntax error at line 1, column 8: expected a value after `>`\n  total >\n         ^"
    );
    assert_syntax("total >   ", 1, 8, "expected a value after `>`");
    assert_syntax("a && ", 1, 5, "expected a value after `&&`");
    assert_syntax("a || )", 1, 6, "expected a value after `||`, found `)`");
    assert_syntax("!", 1, 2, "expected a value after `!`");
    assert_syntax(
        "total == &&",
        1,
        10,
        "expected a value after `==`, found `&&`",
    );
    assert_syntax(")", 1, 1, "expected a value, found `)`");
}

#[test]
fn error_empty() {
    assert_syntax("", 1, 1, "empty condition");
    assert_syntax("   \n\t ", 1, 1, "empty condition");
}

#[test]
fn error_unterminated_string() {
    assert_syntax("status == 'shipped", 1, 11, "unterminated string");
    assert_syntax("status == \"a\\\"", 1, 11, "unterminated string");
    assert_syntax("a == 'x\\q'", 1, 8, "unknown escape sequence `\\q`");
}

#[test]
fn error_unexpected_character() {
    assert_syntax("total > 10 # comment", 1, 12, "unexpected character `#`");
    assert_syntax("total = 10", 1, 7, "use `==`");
    assert_syntax("a & b", 1, 3, "use `&&`");
    assert_syntax("a | b", 1, 3, "use `||`");
    assert_syntax("total - 1 > 0", 1, 7, "arithmetic is not supported");
    assert_syntax("prénom @ 1", 1, 8, "unexpected character `@`"); // columns count chars
    assert_syntax("total > 10abc", 1, 9, "invalid number `10abc`");
    assert_syntax("total > 1e999", 1, 9, "out of range");
}

#[test]
fn error_trailing_tokens() {
    assert_syntax("total > 1 status", 1, 11, "unexpected `status`");
    assert_syntax("a == 1 and b", 1, 8, "use `&&`");
    assert_syntax("a == 1 or b", 1, 8, "use `||`");
    assert_syntax("(a == 1))", 1, 9, "no matching `(`");
    assert_syntax(
        "a 'x'",
        1,
        3,
        "expected `&&`, `||` or the end of the condition",
    );
}

#[test]
fn error_unclosed_parenthesis() {
    assert_syntax(
        "(a == 1",
        1,
        8,
        "expected `)` to close the `(` at line 1, column 1",
    );
    assert_syntax(
        "!(a == 1 && (b",
        1,
        15,
        "expected `)` to close the `(` at line 1, column 13",
    );
    assert_syntax(
        "(a == 1 b)",
        1,
        9,
        "expected `)` to close the `(` at line 1, column 1, found `b`",
    );
}

#[test]
fn error_changed_usage() {
    assert_syntax(
        "status.changed && x",
        1,
        8,
        "`changed` must be called as `changed()`",
    );
    assert_syntax(
        "status.changed",
        1,
        8,
        "`changed` must be called as `changed()`",
    );
    assert_syntax("status.changed(1)", 1, 16, "`changed()` takes no arguments");
    assert_syntax("status.changed(", 1, 16, "`changed()` takes no arguments");
    assert_syntax("changed()", 1, 1, "must follow a field");
    assert_syntax("status.old()", 1, 8, "`old` is not a function");
    assert_syntax("len(status)", 1, 1, "`len` is not a function");
    assert_syntax("status.changed().x", 1, 17, "unexpected `.`");
}

#[test]
fn error_chained_comparison() {
    assert_syntax("a == b == c", 1, 8, "comparisons cannot be chained");
    assert_syntax("1 < x <= 3", 1, 7, "comparisons cannot be chained");
    // parenthesised it is fine
    assert!(insert("(a == b) == c", &json!({"a": 1, "b": 1, "c": true})));
}

#[test]
fn error_bad_path() {
    assert_syntax(
        "customer. == 1",
        1,
        11,
        "expected a field name after `.`, found `==`",
    );
    assert_syntax("customer.", 1, 10, "expected a field name after `.`");
    assert_syntax(
        "items.0 == 1",
        1,
        7,
        "expected a field name after `.`, found `0`",
    );
    assert_syntax(".x == 1", 1, 1, "expected a value, found `.`");
}

#[test]
fn error_positions_on_later_lines() {
    let e = assert_syntax(
        "status == 'a'\n  && total >",
        2,
        13,
        "expected a value after `>`",
    );
    assert_eq!(e.source_line(), "  && total >");
    assert_syntax("a == 1 &&\r\n  b == 'x", 2, 8, "unterminated string");
    assert_syntax(
        "a == 1\n&&\n\n  (b",
        4,
        5,
        "expected `)` to close the `(` at line 4, column 3",
    );
    // a string spanning lines is allowed; errors after it count lines inside it
    assert_syntax("a == 'x\ny' &&", 2, 6, "expected a value after `&&`");
}

#[test]
fn caret_keeps_tabs_aligned() {
    let e = syntax("\ttotal >");
    assert_eq!((e.line(), e.column()), (1, 9));
    assert_eq!(
        e.to_string(),
        "syntax error at line 1, column 9: expected a value after `>`\n  \ttotal >\n  \t       ^"
    );
}

// ---------------------------------------------------------------- compiled forms

#[test]
fn literal_comparisons_match_general_comparisons() {
    // `x op LIT` uses a specialised node; `x op y` the general one: they must agree.
    let values = [
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(100),
        json!(100.0),
        json!(-5),
        json!(99.99),
        json!(u64::MAX),
        json!(""),
        json!("abc"),
        json!("b"),
        json!([1]),
        json!({"k": 1}),
    ];
    let literals = [
        ("null", json!(null)),
        ("true", json!(true)),
        ("false", json!(false)),
        ("100", json!(100)),
        ("100.0", json!(100.0)),
        ("-5", json!(-5)),
        ("18446744073709551615", json!(u64::MAX)),
        ("'abc'", json!("abc")),
        ("''", json!("")),
    ];
    for op in ["==", "!=", ">", ">=", "<", "<="] {
        for (lit_src, lit_json) in &literals {
            let specialised = c(&format!("x {op} {lit_src}"));
            let flipped = c(&format!("{lit_src} {op} y"));
            let general = c(&format!("x {op} y"));
            let general_flipped = c(&format!("y {op} x"));
            for v in values.iter().map(Some).chain([None]) {
                let mut row = serde_json::Map::new();
                if let Some(v) = v {
                    row.insert("x".into(), v.clone());
                }
                row.insert("y".into(), lit_json.clone());
                let row = Value::Object(row);
                let flipped_row = json!({"y": v.cloned().unwrap_or(Value::Null)});
                assert_eq!(
                    specialised.evaluate(Some(&row), None),
                    general.evaluate(Some(&row), None),
                    "x {op} {lit_src} with x = {v:?}"
                );
                assert_eq!(
                    flipped.evaluate(Some(&flipped_row), None),
                    general_flipped.evaluate(Some(&row), None),
                    "{lit_src} {op} y with y = {v:?}"
                );
            }
        }
    }
}

#[test]
fn changed_to_value_in_any_position() {
    let old = json!({"status": "pending", "a": true, "b": true, "n": 1});
    let shipped = json!({"status": "shipped", "a": true, "b": true, "n": 1});
    let still = json!({"status": "pending", "a": true, "b": true, "n": 1});
    for (src, on_shipped, on_still) in [
        ("status.changed() && status == 'shipped'", true, false),
        ("status == 'shipped' && status.changed()", true, false),
        (
            "a && status == 'shipped' && b && status.changed() && n == 1",
            true,
            false,
        ),
        (
            "a && status.changed() && b && status == 'shipped' && n == 1",
            true,
            false,
        ),
        ("status.changed() && status != 'shipped'", false, false),
        ("status.changed() && status.new == 'shipped'", true, false),
        ("status.changed() && status.old == 'pending'", true, false),
        ("status.changed() && 'shipped' == status", true, false),
        (
            "status.changed() && status == 'shipped' && !a",
            false,
            false,
        ),
        ("!status.changed() && status == 'pending'", false, true),
        (
            "status.changed() && status.changed() && status == 'shipped'",
            true,
            false,
        ),
        ("n.changed() && status == 'shipped'", false, false),
    ] {
        assert_eq!(update(src, &shipped, &old), on_shipped, "{src} (shipped)");
        assert_eq!(update(src, &still, &old), on_still, "{src} (unchanged)");
        assert!(
            !insert(src, &shipped) || src.starts_with('!'),
            "{src} (insert)"
        );
        assert!(!delete(src, &old) || src.starts_with('!'), "{src} (delete)");
    }
}

#[test]
fn changed_to_value_is_fused() {
    let debug = format!("{:?}", c("status.changed() && status == 'shipped'"));
    assert!(debug.contains("ChangedTo"), "{debug}");
    let debug = format!("{:?}", c("total > 1000 && is_premium == true"));
    assert_eq!(debug.matches("FieldLit").count(), 2, "{debug}");
}

#[test]
fn nesting_is_bounded() {
    let ok = format!("{}a{}", "(".repeat(64), ")".repeat(64));
    assert!(insert(&ok, &json!({"a": true})));
    assert!(insert(&format!("{}a", "!".repeat(64)), &json!({"a": true})));
    let deep = format!("{}a{}", "(".repeat(65), ")".repeat(65));
    assert_syntax(&deep, 1, 65, "nested too deeply");
    assert_syntax(
        &format!("{}a", "!".repeat(10_000)),
        1,
        65,
        "nested too deeply",
    );
}

fn kind_of(field: &str) -> Option<crate::schema::FieldKind> {
    use crate::schema::FieldKind;
    match field {
        "status" => Some(FieldKind::Text),
        "total" => Some(FieldKind::Number),
        "is_premium" => Some(FieldKind::Boolean),
        _ => None,
    }
}

fn kinds(src: &str) -> Result<(), String> {
    c(src).check_kinds(kind_of).map_err(|e| e.to_string())
}

#[test]
fn literals_of_the_declared_kind_pass() {
    for src in [
        "status == 'shipped' && total > 1000 && is_premium == true",
        "1000 < total || 'a' <= status",
        "status.old == 'pending' && status.changed() && status == 'approved'",
        "status == null && total != null && is_premium != null",
        "total >= -5.5e3 && note == 7 && customer.address.zip == 'x'", // undeclared, nested
        "status == total",                                             // no literal
        "(status) == 1",                                               // parenthesised: not checked
    ] {
        assert_eq!(kinds(src), Ok(()), "{src}");
    }
}

#[test]
fn a_literal_of_another_kind_is_an_error_at_the_literal() {
    assert_eq!(
        kinds("status > 1000").unwrap_err(),
        "`status` is declared as text but is compared with the number 1000 at line 1, column 10: \
         a text value never equals or orders with a number (write '1000' to compare text)\n  \
         status > 1000\n           ^"
    );
    let e = kinds("is_premium && total > '1000'").unwrap_err();
    assert!(
        e.starts_with(
            "`total` is declared as number but is compared with the text '1000' at line 1, \
             column 23: a number value never equals or orders with a text (write 1000 to compare \
             numbers)"
        ),
        "{e}"
    );
    let e = kinds("status == 'x' &&\n  1 == is_premium").unwrap_err();
    assert!(e.contains("`is_premium` is declared as boolean but is compared with the number 1 at line 2, column 3"), "{e}");
    assert!(e.contains("(compare with true or false)"), "{e}");
    let e = kinds("total == 'many'").unwrap_err();
    assert!(
        e.contains("never equals or orders with a text\n"),
        "no hint for a word: {e}"
    );
    let e = kinds("status.old == false").unwrap_err();
    assert!(
        e.contains("`status` is declared as text but is compared with the boolean false"),
        "{e}"
    );
    let err = c("status > 1000").check_kinds(kind_of).unwrap_err();
    assert_eq!(
        (err.line(), err.column(), err.source_line()),
        (1, 10, "status > 1000")
    );
}
