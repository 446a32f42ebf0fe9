//! Column values as pgoutput sends them (text, in the walsender's `DateStyle = ISO` and
//! `TimeZone = UTC`) turned into the JSON that `to_jsonb(row)` gives — what the trigger
//! capture writes — so an observer sees the same row whichever way it was captured: numbers
//! and booleans as JSON numbers and booleans, `json`/`jsonb` as JSON, arrays as arrays,
//! timestamps in ISO 8601 with a `T`, everything else as its text.

use serde_json::{Number, Value};

// Type OIDs (pg_type.dat); stable across PostgreSQL versions.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

/// The element type of the array types whose elements are not plain text.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => BOOL,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1028 => OID,
        199 => JSON,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1115 => TIMESTAMP,
        1185 => TIMESTAMPTZ,
        1231 => NUMERIC,
        3807 => JSONB,
        // text, varchar, bpchar, name, uuid, date, time…: elements stay text.
        1009 | 1015 | 1014 | 1003 | 2951 | 1182 | 1183 | 1270 | 1041 | 651 | 1040 => 0,
        _ => return None,
    })
}

/// The JSON of one non-NULL column value of type `oid`. Text that is not what its type
/// promises (it cannot be, from PostgreSQL) stays a string rather than failing.
pub fn to_json(oid: u32, text: &str) -> Value {
    match oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        // NaN and ±Infinity have no JSON number: to_jsonb gives them as strings too.
        FLOAT4 | FLOAT8 | NUMERIC => number(text),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        TIMESTAMP | TIMESTAMPTZ => Value::String(iso_timestamp(text)),
        _ => match array_element(oid) {
            Some(element) => {
                parse_array(text, element).unwrap_or_else(|| Value::String(text.to_owned()))
            }
            None => Value::String(text.to_owned()),
        },
    }
}

fn number(text: &str) -> Value {
    match serde_json::from_str::<Number>(text) {
        Ok(n) => Value::Number(n),
        Err(_) => Value::String(text.to_owned()),
    }
}

/// `2024-05-01 12:00:00.5+00` → `2024-05-01T12:00:00.5+00:00` (what `to_jsonb` writes);
/// `infinity` and BC dates stay as they are.
fn iso_timestamp(text: &str) -> String {
    let bytes = text.as_bytes();
    if bytes.len() < 19 || bytes[10] != b' ' || text.ends_with(" BC") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 4);
    out.push_str(&text[..10]);
    out.push('T');
    let rest = &text[11..];
    // The zone, if any: the last '+' or '-' after the time.
    match rest.rfind(['+', '-']) {
        Some(at) if at >= 8 => {
            let (time, zone) = rest.split_at(at);
            out.push_str(time);
            if zone.len() == 3 {
                out.push_str(zone);
                out.push_str(":00");
            } else {
                out.push_str(zone);
            }
        }
        _ => out.push_str(rest),
    }
    out
}

/// A PostgreSQL array literal (`{1,2,NULL}`, `{{a,b},{"c d",e}}`, with an optional
/// `[1:2]=` bounds prefix) as nested JSON arrays, each element converted as type `element`
/// (0: text). `None` when the text is not an array literal.
fn parse_array(text: &str, element: u32) -> Option<Value> {
    let body = match text.find('=') {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let mut chars = body.char_indices().peekable();
    let value = parse_level(body, &mut chars, element, MAX_DIMENSIONS)?;
    chars.next().is_none().then_some(value)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

/// PostgreSQL's `MAXDIM`: an array has at most this many dimensions, so deeper nesting is not
/// an array literal (and would recurse without bound).
const MAX_DIMENSIONS: usize = 6;

fn parse_level(text: &str, chars: &mut Chars<'_>, element: u32, depth: usize) -> Option<Value> {
    let depth = depth.checked_sub(1)?;
    if chars.next()?.1 != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek()?.1 == '}' {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        let item = match chars.peek()?.1 {
            '{' => parse_level(text, chars, element, depth)?,
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()?.1 {
                        '\\' => s.push(chars.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                element_json(element, &s)
            }
            _ => {
                let start = chars.peek()?.0;
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let raw = text[start..end].trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    element_json(element, raw)
                }
            }
        };
        items.push(item);
        match chars.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

fn element_json(element: u32, text: &str) -> Value {
    if element == 0 {
        Value::String(text.to_owned())
    } else {
        to_json(element, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_become_what_to_jsonb_gives() {
        assert_eq!(to_json(BOOL, "t"), json!(true));
        assert_eq!(to_json(BOOL, "f"), json!(false));
        assert_eq!(to_json(INT4, "-42"), json!(-42));
        assert_eq!(
            to_json(INT8, "9007199254740993"),
            json!(9007199254740993_i64)
        );
        assert_eq!(to_json(NUMERIC, "1250.50"), json!(1250.5));
        assert_eq!(to_json(NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(to_json(FLOAT8, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            to_json(JSONB, r#"{"a": [1, null]}"#),
            json!({"a": [1, null]})
        );
        assert_eq!(to_json(25, "plain text"), json!("plain text"));
        assert_eq!(to_json(17, "\\x00ff"), json!("\\x00ff"));
    }

    #[test]
    fn timestamps_use_the_iso_t_form() {
        assert_eq!(
            to_json(TIMESTAMPTZ, "2024-05-01 12:00:00.123456+00"),
            json!("2024-05-01T12:00:00.123456+00:00")
        );
        assert_eq!(
            to_json(TIMESTAMPTZ, "2024-05-01 12:00:00+05:30"),
            json!("2024-05-01T12:00:00+05:30")
        );
        assert_eq!(
            to_json(TIMESTAMP, "2024-05-01 12:00:00"),
            json!("2024-05-01T12:00:00")
        );
        assert_eq!(to_json(TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(
            to_json(TIMESTAMP, "0044-03-15 12:00:00 BC"),
            json!("0044-03-15 12:00:00 BC")
        );
    }

    #[test]
    fn arrays_nest_and_convert_their_elements() {
        assert_eq!(to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            to_json(1009, r#"{a,"b c","d\"e",NULL,"NULL"}"#),
            json!(["a", "b c", "d\"e", null, "NULL"])
        );
        assert_eq!(to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(1007, "[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(to_json(1009, "{}"), json!([]));
        assert_eq!(to_json(1000, "{t,f}"), json!([true, false]));
        // Not an array literal: kept as text, never a panic.
        for bad in ["{1,2", "{", "}", "{\"a}", "{1}x", "", "[1:2]"] {
            assert_eq!(to_json(1007, bad), json!(bad), "{bad}");
        }
        // At most six dimensions, as in PostgreSQL; deeper text stays text (without recursing
        // into a stack overflow).
        assert_eq!(to_json(1007, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
        let deep = format!("{}{}", "{".repeat(7), "}".repeat(7));
        assert_eq!(to_json(1007, &deep), json!(deep));
        let deeper = "{".repeat(100_000);
        assert_eq!(to_json(1007, &deeper), json!(deeper));
    }
}
