//! A reversible encoding of JSON values (and text) into what `jsonb` and
//! `text` columns can hold exactly.
//!
//! The model accepts any JSON and any string, but Postgres does not store
//! them all verbatim: `text` and `jsonb` strings cannot hold U+0000, and
//! `jsonb` numbers are `numeric`, which has no negative zero and prints
//! `1e+16` as `10000000000000000` (an integer on the way back). A store
//! that must give back exactly what it was given therefore writes such
//! values in an escaped form and reads them back through the inverse:
//!
//! - a string holding U+0000, or starting with the marker U+E000, is
//!   written as marker, `s`, then the string with every marker doubled and
//!   every U+0000 written as marker `0`;
//! - a number whose text has an exponent, or is negative zero, is written
//!   as the string marker, `n`, then its text;
//! - everything else is written as it is.
//!
//! Every other string is unchanged, so SQL that reads tool-call fields or
//! part types sees the values it expects, and a part type that needed
//! escaping is not a tool part to SQL or to the model alike.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// Marks an escaped value (a private-use character).
const MARK: char = '\u{E000}';

/// The stored form of a string.
pub(crate) fn encode_str(s: &str) -> Cow<'_, str> {
    if !s.contains('\0') && !s.starts_with(MARK) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    out.push(MARK);
    out.push('s');
    for c in s.chars() {
        match c {
            MARK => {
                out.push(MARK);
                out.push(MARK);
            }
            '\0' => {
                out.push(MARK);
                out.push('0');
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// What an escaped string stands for.
enum Escaped {
    Text(String),
    Number(serde_json::Number),
}

/// Reads an escaped string; `None` if `s` is not one (it is then taken
/// literally: a value someone wrote outside this store).
fn unescape(s: &str) -> Option<Escaped> {
    let rest = s.strip_prefix(MARK)?;
    if let Some(num) = rest.strip_prefix('n') {
        return serde_json::from_str::<serde_json::Number>(num)
            .ok()
            .map(Escaped::Number);
    }
    let body = rest.strip_prefix('s')?;
    let mut out = String::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == MARK {
            match chars.next()? {
                MARK => out.push(MARK),
                '0' => out.push('\0'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(Escaped::Text(out))
}

/// The original of a stored string.
pub(crate) fn decode_str(s: &str) -> Cow<'_, str> {
    match unescape(s) {
        Some(Escaped::Text(t)) => Cow::Owned(t),
        _ => Cow::Borrowed(s),
    }
}

/// True if `numeric` gives the number back with the same JSON text.
fn survives_numeric(text: &str) -> bool {
    !text.contains(['e', 'E']) && text != "-0.0" && text != "-0"
}

/// The stored form of a JSON value.
pub(crate) fn encode(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(encode_str(s).into_owned()),
        Value::Number(n) => {
            let text = n.to_string();
            if survives_numeric(&text) {
                Value::Number(n.clone())
            } else {
                Value::String(format!("{MARK}n{text}"))
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(encode).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (encode_str(k).into_owned(), encode(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Null | Value::Bool(_) => v.clone(),
    }
}

/// The original of a stored JSON value.
pub(crate) fn decode(v: Value) -> Value {
    match v {
        Value::String(s) => match unescape(&s) {
            Some(Escaped::Text(t)) => Value::String(t),
            Some(Escaped::Number(n)) => Value::Number(n),
            None => Value::String(s),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(decode).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (decode_str(&k).into_owned(), decode(v)))
                .collect::<Map<String, Value>>(),
        ),
        other => other,
    }
}

/// The stored JSON text of a value.
pub(crate) fn encode_text(v: &Value) -> String {
    encode(v).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) {
        let v: Value = serde_json::from_str(text).unwrap();
        let stored = encode_text(&v);
        assert!(!stored.contains("\\u0000"), "{stored}");
        let back = decode(serde_json::from_str(&stored).unwrap());
        assert_eq!(back, v, "{text} stored as {stored}");
    }

    #[test]
    fn values_postgres_would_change_round_trip() {
        for text in [
            r#""a\u0000b""#,
            r#""\u0000""#,
            "\"\u{E000}\"",
            "\"\u{E000}s\u{E000}0\"",
            "\"x\u{E000}\"",
            "-0",
            "-0.0",
            "1e16",
            "-1E+17",
            "1.5e-7",
            "5e-324",
            "1e300",
            "100.0",
            "18446744073709551615",
            "-9223372036854775808",
            r#"{"k\u0000": ["\u0000", -0.0, {"\u0000": 1e16}], "plain": "text"}"#,
            r#"[true, false, null, 1, 2.5, "tool-call"]"#,
        ] {
            round_trip(text);
        }
    }

    #[test]
    fn ordinary_values_are_stored_unchanged() {
        let v: Value =
            serde_json::from_str(r#"{"type": "tool-call", "n": [1, 2.5, -3], "s": "x\u0001"}"#)
                .unwrap();
        assert_eq!(encode(&v), v);
        assert!(matches!(encode_str("plain"), Cow::Borrowed(_)));
        assert_eq!(decode_str(&encode_str("a\0b")), "a\0b");
        assert_eq!(
            decode_str("\u{E000}zz"),
            "\u{E000}zz",
            "unknown escapes are literal"
        );
    }
}
