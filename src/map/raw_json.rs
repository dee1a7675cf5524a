//! A user's `raw_json` object as the mapping builds it and apply sends it.
//!
//! Most members are JSON values the profiles compute. A `jsonb` column passed through is
//! different: PostgreSQL sends it as JSON text, the target parses it again into `jsonb`, and
//! nothing in between needs its structure. Parsing it into values only to write
//! them back out was most of usersync's own CPU per row with identity-store documents of half
//! a kilobyte (the initial copy of issue #15), and it could not hold every document exactly
//! (numbers beyond `f64`). Such a member keeps its text ([`Member::Text`]) and is written as
//! it came.
//!
//! The object is written with its keys in `jsonb`'s own order (shorter keys first, then
//! bytewise), so that the target's sort of them finds them sorted.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;

use serde::de::IgnoredAny;
use serde_json::{Map, Value};

/// One member's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    Value(Value),
    /// Valid JSON text ([`Member::json_text`]), written as it is.
    Text(Box<str>),
}

impl Member {
    /// A `jsonb` value's text as a member, when it is one JSON value serde_json can read
    /// (checked without building it, which is what the text saves) in the shape PostgreSQL
    /// writes `jsonb` ([`written_like_jsonb`]). Anything else comes from a server that is not
    /// PostgreSQL, and may be what a target's `jsonb` refuses, failing the row's batch on
    /// every try: `None`, and the caller converts it as any other value.
    pub fn json_text(text: &str) -> Option<Member> {
        if !written_like_jsonb(text) {
            return None;
        }
        serde_json::from_str::<IgnoredAny>(text)
            .ok()
            .map(|_| Member::Text(text.into()))
    }

    /// The member as a JSON value: a text member parsed as any `json` value is (a document
    /// serde_json cannot hold exactly becomes its text as a string).
    pub fn to_value(&self) -> Value {
        match self {
            Member::Value(value) => value.clone(),
            Member::Text(text) => super::value::json_to_json(Cow::Borrowed(text)),
        }
    }

    fn write(&self, out: &mut impl io::Write) -> io::Result<()> {
        match self {
            Member::Value(value) => serde_json::to_writer(out, value).map_err(io::Error::from),
            Member::Text(text) => out.write_all(text.as_bytes()),
        }
    }
}

/// Nesting beyond which text is converted rather than kept: far below what PostgreSQL's
/// default `max_stack_depth` parses, far above any identity store's document.
const MAX_DEPTH: usize = 1_000;
/// Digits in a row beyond which a number is converted rather than kept (`numeric` holds
/// 131,072 before the point and 16,383 after it).
const MAX_DIGITS: usize = 1_000;

/// Whether JSON text has none of what PostgreSQL's `jsonb` output never holds: a `\u` escape
/// of a surrogate (output writes the character) or of NUL (`jsonb` cannot hold it), a number
/// with an exponent (`numeric` output never uses one; one can overflow `numeric`), a number
/// of more than [`MAX_DIGITS`] digits, nesting deeper than [`MAX_DEPTH`]. One pass over the
/// bytes; the syntax itself is serde_json's to check.
fn written_like_jsonb(text: &str) -> bool {
    let bytes = text.as_bytes();
    let (mut depth, mut digits) = (0usize, 0usize);
    let mut position = 0;
    while let Some(&byte) = bytes.get(position) {
        position += 1;
        match byte {
            b'0'..=b'9' => {
                digits += 1;
                if digits > MAX_DIGITS {
                    return false;
                }
                continue;
            }
            b'e' | b'E' if digits > 0 => return false,
            b'.' if digits > 0 => continue,
            b'"' => {
                // Most of a document is strings: from one quote or backslash to the next.
                loop {
                    let rest = bytes.get(position..).unwrap_or_default();
                    let Some(found) = memchr::memchr2(b'"', b'\\', rest) else {
                        // Unterminated: serde_json refuses it.
                        return true;
                    };
                    position += found + 1;
                    if rest[found] == b'"' {
                        break;
                    }
                    if bytes.get(position) == Some(&b'u') {
                        let hex = bytes.get(position + 1..position + 5).unwrap_or_default();
                        if matches!(hex.first(), Some(b'd' | b'D')) || hex == b"0000" {
                            return false;
                        }
                    }
                    position += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        digits = 0;
    }
    true
}

impl From<Value> for Member {
    fn from(value: Value) -> Self {
        Member::Value(value)
    }
}

impl From<&RawJson> for Member {
    /// A whole document as a member of another, written as its text.
    fn from(document: &RawJson) -> Self {
        // `write` puts out serde_json's output and text members, which are `str`: always UTF-8.
        let text = String::from_utf8(document.to_vec())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        Member::Text(text.into())
    }
}

/// `raw_json`: members by key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawJson(BTreeMap<String, Member>);

impl RawJson {
    pub fn new() -> Self {
        RawJson::default()
    }

    pub fn insert(&mut self, key: String, member: impl Into<Member>) -> Option<Member> {
        self.0.insert(key, member.into())
    }

    pub fn remove(&mut self, key: &str) -> Option<Member> {
        self.0.remove(key)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn get(&self, key: &str) -> Option<&Member> {
        self.0.get(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets each of `values`, replacing what the keys held.
    pub fn extend(&mut self, values: Map<String, Value>) {
        self.0.extend(
            values
                .into_iter()
                .map(|(key, value)| (key, Member::Value(value))),
        );
    }

    /// Writes the object as JSON text, keys in `jsonb` order (see the module docs).
    pub fn write(&self, out: &mut impl io::Write) -> io::Result<()> {
        let mut members: Vec<(&String, &Member)> = self.0.iter().collect();
        members.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        out.write_all(b"{")?;
        for (n, (key, member)) in members.into_iter().enumerate() {
            if n > 0 {
                out.write_all(b",")?;
            }
            serde_json::to_writer(&mut *out, key.as_str()).map_err(io::Error::from)?;
            out.write_all(b":")?;
            member.write(out)?;
        }
        out.write_all(b"}")
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 * self.0.len());
        self.write(&mut out)
            .expect("writing to a Vec does not fail");
        out
    }

    /// The object as a JSON value (text members parsed): for what shows a user rather than
    /// sends it (`--dry-run`).
    pub fn to_value(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(key, member)| (key.clone(), member.to_value()))
                .collect(),
        )
    }
}

impl From<Map<String, Value>> for RawJson {
    fn from(values: Map<String, Value>) -> Self {
        let mut raw_json = RawJson::new();
        raw_json.extend(values);
        raw_json
    }
}

/// For tests' `raw_json["key"]`: a member that is not JSON text.
#[cfg(test)]
impl std::ops::Index<&str> for RawJson {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        match self.0.get(key) {
            Some(Member::Value(value)) => value,
            Some(Member::Text(_)) => panic!("{key} is JSON text: use to_value()"),
            None => &Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_members_are_written_as_sent_and_keys_in_jsonb_order() {
        let mut raw_json = RawJson::from(
            json!({"id": "u1", "b": [1, 2], "aa": null})
                .as_object()
                .cloned()
                .unwrap(),
        );
        let text = r#"{"n": 12345678901234567890.000000000000000000001, "s": "\u00e9"}"#;
        raw_json.insert("meta".into(), Member::json_text(text).unwrap());
        let written = String::from_utf8(raw_json.to_vec()).unwrap();
        assert_eq!(
            written,
            format!(r#"{{"b":[1,2],"aa":null,"id":"u1","meta":{text}}}"#)
        );
        // Still one JSON object, with the same members.
        let parsed: Value = serde_json::from_str(&written).unwrap();
        assert_eq!(parsed["meta"]["s"], json!("é"));
        assert_eq!(parsed.as_object().unwrap().len(), 4);
    }

    #[test]
    fn only_one_whole_json_value_is_kept_as_text() {
        for text in [
            "",
            "{",
            r#"{"a":1} {"b":2}"#,
            r#"1, "id": "someone else""#,
            r#"{}, "id": "someone else""#,
            "nul",
            r#""unterminated"#,
            "{'a':1}",
            // jsonb cannot hold it: converted, so kept as a string.
            r#"{"a": "\u0000"}"#,
        ] {
            assert_eq!(Member::json_text(text), None, "{text:?}");
        }
        // Deeper than serde_json builds values, which PostgreSQL reads back all the same.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for text in ["null", "-0.5", r#""é""#, " {\"a\": [true, {}]} \n", &deep] {
            assert!(
                matches!(Member::json_text(text), Some(Member::Text(_))),
                "{text:?}"
            );
        }
    }

    /// [`written_like_jsonb`] byte by byte, as its oracle.
    fn written_like_jsonb_slowly(text: &str) -> bool {
        let bytes = text.as_bytes();
        let (mut depth, mut digits, mut in_string) = (0usize, 0usize, false);
        let mut position = 0;
        while let Some(&byte) = bytes.get(position) {
            position += 1;
            if in_string {
                if byte == b'"' {
                    in_string = false;
                } else if byte == b'\\' {
                    let hex = bytes.get(position + 1..position + 5).unwrap_or_default();
                    if bytes.get(position) == Some(&b'u')
                        && (matches!(hex.first(), Some(b'd' | b'D')) || hex == b"0000")
                    {
                        return false;
                    }
                    position += 1;
                }
                continue;
            }
            match byte {
                b'0'..=b'9' => digits += 1,
                b'e' | b'E' if digits > 0 => return false,
                b'.' if digits > 0 => {}
                _ => digits = 0,
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => depth += 1,
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if digits > MAX_DIGITS || depth > MAX_DEPTH {
                return false;
            }
        }
        true
    }

    proptest::proptest! {
        #[test]
        fn the_check_of_jsonb_text_agrees_with_its_oracle(
            text in r#"[\[\]{}",:0-9a-zA-Z \\u\-.]{0,40}"#,
        ) {
            proptest::prop_assert_eq!(written_like_jsonb(&text), written_like_jsonb_slowly(&text));
        }

        /// Whatever text a source sends as a document, the object stays one object whose
        /// keys are the mapping's: a document can never close it and add an `id` of its own.
        #[test]
        fn a_document_cannot_break_out_of_its_member(
            text in r#"[\[\]{}",:0-9a-z \\u\-.eE]{0,24}"#,
        ) {
            let mut raw_json = RawJson::new();
            raw_json.insert("id".into(), json!("u1"));
            if let Some(member) = Member::json_text(&text) {
                raw_json.insert("doc".into(), member);
                let written: Value = serde_json::from_slice(&raw_json.to_vec())
                    .expect("one JSON object");
                let object = written.as_object().expect("an object");
                proptest::prop_assert_eq!(object.len(), 2);
                proptest::prop_assert_eq!(&object["id"], &json!("u1"));
            }
        }
    }

    /// What PostgreSQL never writes as `jsonb` and a target's `jsonb` refuses (a row that
    /// would fail its batch on every try), from a server that is not PostgreSQL: converted
    /// instead, where a document serde_json cannot hold exactly stays a string.
    #[test]
    fn text_jsonb_would_refuse_is_not_kept_as_text() {
        // Escapes cut off by the end of the text are serde_json's to refuse; an escaped
        // backslash or quote before one is not one.
        for text in [r#""\"#, r#""\u"#, r#""\ud8"#] {
            assert_eq!(Member::json_text(text), None, "{text}");
        }
        assert!(!written_like_jsonb(r#"["\\\ud800"]"#));
        assert!(!written_like_jsonb(r#"["\"\u0000"]"#));
        assert!(written_like_jsonb(r#"["\\ud800", "\"u0000"]"#));
        let deep = format!("{}{}", "[".repeat(1001), "]".repeat(1001));
        let long = format!("[{}]", "9".repeat(1001));
        for text in [
            r#"{"a": "\ud800"}"#,
            r#"["\uDC00"]"#,
            r#"{"\uD83D\uDE00": 1}"#,
            r#"{"n": 1e999999}"#,
            r#"[1E-20000]"#,
            r#"[0.5e1]"#,
            &deep,
            &long,
        ] {
            assert_eq!(Member::json_text(text), None, "{text:.40}");
        }
        // Letters and escapes in strings, and literals, are not numbers or surrogates.
        for text in [
            r#"{"e": "1e5 \u00e9 \\ud800", "true": true, "f": false, "x": [1.5, -0, 10]}"#,
            &format!("{}{}", "[".repeat(1000), "]".repeat(1000)),
            &format!("[{}]", "9".repeat(1000)),
        ] {
            assert!(
                matches!(Member::json_text(text), Some(Member::Text(_))),
                "{text:.40}"
            );
        }
    }

    #[test]
    fn keys_with_quotes_and_controls_are_escaped() {
        let mut raw_json = RawJson::new();
        raw_json.insert("we\"ird\n".into(), json!(1));
        let written = raw_json.to_vec();
        let parsed: Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(parsed, json!({"we\"ird\n": 1}));
        assert_eq!(raw_json.to_value(), parsed);
    }
}
