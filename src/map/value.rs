//! PostgreSQL text-format values → JSON, shared by every profile.
//!
//! The replication session runs with `DateStyle=ISO, TimeZone=UTC, extra_float_digits=3,
//! IntervalStyle=iso_8601, bytea_output=hex`, so each type arrives in exactly one spelling and
//! the parsers here accept that spelling only: anything else means the session settings were
//! lost, which is worth an error rather than a guess.
//!
//! Two rules shape the conversions:
//! - **Never lose digits silently.** `serde_json` (as this crate builds it) holds numbers as
//!   `i64`, `u64` or `f64`. A `numeric` or a number inside `json`/`jsonb` that would not be
//!   written back with exactly its value stays text (a `numeric` becomes a JSON string; a JSON
//!   document whose numbers do not survive is kept whole as a string). Scale is not a digit:
//!   `1.50` becomes `1.5`. A `json`/`jsonb` column that goes into `raw_json` whole is not
//!   converted here at all: it keeps PostgreSQL's text (`super::RawJson`).
//! - **Time is UTC and RFC 3339** where JSON readers expect it (`…T…Z`), but values that
//!   RFC 3339 cannot express (BC dates, years after 9999, `infinity`) keep PostgreSQL's text,
//!   because a recognisable original beats an invented approximation.

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{Datelike, NaiveDate, NaiveDateTime, TimeDelta, Timelike};
use serde_json::{Number, Value};

use super::MapError;
use crate::decode::ColumnValue;

/// Type OIDs of the built-in types we convert; they are fixed in `pg_type.dat` across releases.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const JSON_ARRAY: u32 = 199;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const BYTEA_ARRAY: u32 = 1001;
    pub const NAME_ARRAY: u32 = 1003;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const OID_ARRAY: u32 = 1028;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSONB: u32 = 3802;
    pub const JSONB_ARRAY: u32 = 3807;
}

/// Why a value's text could not be converted. Deliberately carries no part of the value: user
/// rows hold personal data, and errors end up in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error(
        "the value is not valid UTF-8 (is client_encoding=UTF8 set on the replication session?)"
    )]
    NotUtf8,
    #[error("the value arrived in binary format; usersync reads the text format only")]
    BinaryFormat,
    #[error("expected t or f")]
    NotBool,
    #[error("expected an integer")]
    NotInteger,
    #[error("expected a floating-point number")]
    NotFloat,
    #[error("expected a decimal number")]
    NotNumeric,
    #[error(
        "expected an ISO date like 2024-01-02 (is DateStyle=ISO set on the replication session?)"
    )]
    NotDate,
    #[error(
        "expected an ISO timestamp like 2024-01-02 03:04:05+00 \
         (is DateStyle=ISO set on the replication session?)"
    )]
    NotTimestamp,
    #[error("expected a timestamp, date or integer milliseconds")]
    NotMillisType,
    #[error("expected integer milliseconds, found a fraction")]
    FractionalMillis,
    #[error("the time is infinite, which has no millisecond value")]
    InfiniteTime,
    #[error("the time is outside the range of 64-bit milliseconds since 1970")]
    MillisOutOfRange,
    #[error("the time is outside the range of 64-bit microseconds since 1970")]
    MicrosOutOfRange,
    #[error("expected a timestamp or date")]
    NotTimeType,
    #[error("expected a boolean, an integer, or a timestamp whose presence means verified")]
    NotVerifiedType,
}

/// A column value with its text borrowed from the decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextValue<'a> {
    Null,
    /// Unchanged TOAST: the source did not send the value, the target still has it.
    UnchangedToast,
    Text(&'a str),
}

impl<'a> TextValue<'a> {
    /// Validates UTF-8 once here so every later step can work on `&str` without copying.
    pub fn of(value: &'a ColumnValue) -> Result<Self, ValueError> {
        match value {
            ColumnValue::Null => Ok(TextValue::Null),
            ColumnValue::UnchangedToast => Ok(TextValue::UnchangedToast),
            ColumnValue::Text(bytes) => std::str::from_utf8(bytes)
                .map(TextValue::Text)
                .map_err(|_| ValueError::NotUtf8),
            ColumnValue::Binary(_) => Err(ValueError::BinaryFormat),
        }
    }
}

/// Types `timestamp_millis` accepts, so a mapping can check a column when it binds instead of
/// failing on the first row.
pub const MILLIS_TYPES: &[u32] = &[
    oid::TIMESTAMPTZ,
    oid::TIMESTAMP,
    oid::DATE,
    oid::INT8,
    oid::INT4,
    oid::INT2,
    oid::NUMERIC,
];

/// Types `verified_from_text` accepts: booleans (Better Auth, Stack Auth), integers (schemas
/// ported from MySQL) and timestamps (Auth.js `emailVerified`, Supabase `email_confirmed_at`).
pub const VERIFIED_TYPES: &[u32] = &[
    oid::BOOL,
    oid::INT2,
    oid::INT4,
    oid::INT8,
    oid::TIMESTAMPTZ,
    oid::TIMESTAMP,
    oid::DATE,
];

/// For an array type we convert, the type of its elements.
pub fn array_element_type(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        oid::BOOL_ARRAY => oid::BOOL,
        oid::BYTEA_ARRAY => oid::BYTEA,
        oid::NAME_ARRAY => oid::NAME,
        oid::INT2_ARRAY => oid::INT2,
        oid::INT4_ARRAY => oid::INT4,
        oid::INT8_ARRAY => oid::INT8,
        oid::OID_ARRAY => oid::OID,
        oid::TEXT_ARRAY => oid::TEXT,
        oid::BPCHAR_ARRAY => oid::BPCHAR,
        oid::VARCHAR_ARRAY => oid::VARCHAR,
        oid::FLOAT4_ARRAY => oid::FLOAT4,
        oid::FLOAT8_ARRAY => oid::FLOAT8,
        oid::NUMERIC_ARRAY => oid::NUMERIC,
        oid::DATE_ARRAY => oid::DATE,
        oid::TIMESTAMP_ARRAY => oid::TIMESTAMP,
        oid::TIMESTAMPTZ_ARRAY => oid::TIMESTAMPTZ,
        oid::UUID_ARRAY => oid::UUID,
        oid::JSON_ARRAY => oid::JSON,
        oid::JSONB_ARRAY => oid::JSONB,
        _ => return None,
    })
}

/// Converts one value's text by its type. Types we do not know (citext, enums, domains,
/// extension types) become strings: their text is the most faithful thing we can keep.
pub fn text_to_json(type_oid: u32, text: &str) -> Result<Value, ValueError> {
    match array_element_type(type_oid) {
        Some(element_oid) => {
            Ok(array_to_json(element_oid, text)?.unwrap_or_else(|| Value::String(text.to_owned())))
        }
        None => scalar_to_json(type_oid, Cow::Borrowed(text)),
    }
}

/// Takes `Cow` so an array element that had to be unescaped is moved into the JSON string
/// instead of being copied a second time.
fn scalar_to_json(type_oid: u32, text: Cow<'_, str>) -> Result<Value, ValueError> {
    match type_oid {
        oid::BOOL => parse_bool(&text).map(Value::Bool),
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| ValueError::NotInteger),
        oid::FLOAT4 | oid::FLOAT8 => float_to_json(text),
        oid::NUMERIC => numeric_to_json(text),
        oid::JSON | oid::JSONB => Ok(json_to_json(text)),
        oid::TIMESTAMPTZ => timestamp_to_json(text, Zone::Offset),
        oid::TIMESTAMP => timestamp_to_json(text, Zone::None),
        _ => Ok(Value::String(text.into_owned())),
    }
}

fn parse_bool(text: &str) -> Result<bool, ValueError> {
    match text {
        "t" => Ok(true),
        "f" => Ok(false),
        _ => Err(ValueError::NotBool),
    }
}

/// JSON has no NaN or infinities, so those keep PostgreSQL's spelling as strings.
fn float_to_json(text: Cow<'_, str>) -> Result<Value, ValueError> {
    if matches!(&*text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Value::String(text.into_owned()));
    }
    // extra_float_digits=3 makes PostgreSQL print the shortest exact text, and parsing that
    // as f64 (even for float4) gives the number a reader would expect, e.g. 0.1 not 0.10000000149.
    let float: f64 = text.parse().map_err(|_| ValueError::NotFloat)?;
    Number::from_f64(float)
        .map(Value::Number)
        .ok_or(ValueError::NotFloat)
}

fn numeric_to_json(text: Cow<'_, str>) -> Result<Value, ValueError> {
    if matches!(&*text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Value::String(text.into_owned()));
    }
    let literal =
        DecimalLiteral::parse(&text, Exponent::Forbidden).ok_or(ValueError::NotNumeric)?;
    if let Some(integer) = literal.integer_text(&text) {
        if let Ok(signed) = integer.parse::<i64>() {
            return Ok(Value::from(signed));
        }
        if let Ok(unsigned) = integer.parse::<u64>() {
            return Ok(Value::from(unsigned));
        }
    }
    // std's parse rounds correctly, and serde_json writes that f64 back as its shortest text;
    // the number is kept only if that text has exactly the source's value.
    let exact = text
        .parse::<f64>()
        .ok()
        .filter(|&float| literal.survives_as(float))
        .and_then(Number::from_f64);
    Ok(match exact {
        Some(number) => Value::Number(number),
        None => Value::String(text.into_owned()),
    })
}

/// `json` and `jsonb` are always valid JSON when they leave PostgreSQL, but serde_json cannot
/// hold every one of them (numbers beyond f64, nesting deeper than its recursion limit), and
/// `jsonb` cannot hold a `json` value's `\u0000` (the target refuses the whole row); those
/// documents stay whole as a string rather than losing digits or failing the row.
pub(super) fn json_to_json(text: Cow<'_, str>) -> Value {
    match serde_json::from_str::<Value>(&text) {
        Ok(value)
            if (!contains_float(&value) || json_numbers_survive(&text))
                && !(text.contains(NUL_ESCAPE) && contains_nul(&value)) =>
        {
            value
        }
        _ => Value::String(text.into_owned()),
    }
}

/// How JSON text spells the one character `jsonb` cannot hold.
const NUL_ESCAPE: &str = "\\u0000";

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || contains_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Integers are held exactly; only floats can have lost digits, so most documents skip the
/// second pass over their text.
fn contains_float(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.is_f64(),
        Value::Array(items) => items.iter().any(contains_float),
        Value::Object(map) => map.values().any(contains_float),
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

/// Scans the document for number tokens outside strings and checks that each one parses, the
/// way serde_json parsed it, to a value serde_json will write back unchanged.
fn json_numbers_survive(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut position = 0;
    while let Some(&byte) = bytes.get(position) {
        match byte {
            b'"' => {
                position += 1;
                while let Some(&inner) = bytes.get(position) {
                    position += if inner == b'\\' { 2 } else { 1 };
                    if inner == b'"' {
                        break;
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = position;
                while bytes
                    .get(position)
                    .is_some_and(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    position += 1;
                }
                let survives = text.get(start..position).is_some_and(json_number_survives);
                if !survives {
                    return false;
                }
            }
            _ => position += 1,
        }
    }
    true
}

fn json_number_survives(token: &str) -> bool {
    let Some(literal) = DecimalLiteral::parse(token, Exponent::Allowed) else {
        return false;
    };
    if literal.frac.is_empty()
        && literal.exponent == 0
        && (token.parse::<i64>().is_ok() || token.parse::<u64>().is_ok())
    {
        return true;
    }
    // Parse with serde_json itself: its float parsing is not always correctly rounded, and what
    // matters is the f64 it holds in the document.
    serde_json::from_str::<f64>(token).is_ok_and(|float| literal.survives_as(float))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Exponent {
    Allowed,
    Forbidden,
}

/// A decimal literal `-?digits(.digits)?(e[+-]?digits)?`, borrowed, for comparing values
/// digit by digit without building a big-number type.
struct DecimalLiteral<'a> {
    negative: bool,
    int: &'a str,
    frac: &'a str,
    exponent: i64,
}

/// Far beyond any finite f64 (whose decimal exponents stay within ±400), yet far from
/// overflowing when added to a digit count.
const MAX_EXPONENT: i64 = i64::MAX / 4;

/// More significant digits than an f64's shortest text can ever have.
const MAX_F64_SIGNIFICANT_DIGITS: usize = 17;

/// Room for serde_json's longest f64 text (`-2.2250738585072014e-308` is 24 bytes).
const F64_TEXT_CAPACITY: usize = 32;

impl<'a> DecimalLiteral<'a> {
    fn parse(text: &'a str, exponent: Exponent) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, rest) = split_digits(rest);
        if int.is_empty() {
            return None;
        }
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(after_point) => {
                let (frac, rest) = split_digits(after_point);
                if frac.is_empty() {
                    return None;
                }
                (frac, rest)
            }
            None => ("", rest),
        };
        let exponent = match rest.strip_prefix(['e', 'E']) {
            None if rest.is_empty() => 0,
            Some(power) if exponent == Exponent::Allowed => {
                let digits = power.strip_prefix(['+', '-']).unwrap_or(power);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // Clamping keeps absurd exponents comparable (and unequal) without overflow.
                let clamped = if power.starts_with('-') {
                    -MAX_EXPONENT
                } else {
                    MAX_EXPONENT
                };
                power
                    .parse::<i64>()
                    .map_or(clamped, |e| e.clamp(-MAX_EXPONENT, MAX_EXPONENT))
            }
            _ => return None,
        };
        Some(DecimalLiteral {
            negative,
            int,
            frac,
            exponent,
        })
    }

    /// The sign and integer digits, when the literal has no fractional value.
    fn integer_text(&self, text: &'a str) -> Option<&'a str> {
        if self.exponent != 0 || !self.frac.bytes().all(|b| b == b'0') {
            return None;
        }
        text.get(..usize::from(self.negative) + self.int.len())
    }

    fn digits(&self) -> impl Iterator<Item = u8> + Clone + 'a {
        self.int.bytes().chain(self.frac.bytes())
    }

    /// (significant digits without leading or trailing zeros, decimal exponent of their first
    /// digit), or None for zero. Equal values give equal results whatever their spelling.
    fn normalized(&self) -> Option<(impl Iterator<Item = u8> + Clone + 'a, usize, i64)> {
        let total = self.int.len() + self.frac.len();
        let leading = self.digits().take_while(|&d| d == b'0').count();
        if leading == total {
            return None;
        }
        let trailing = self
            .int
            .bytes()
            .chain(self.frac.bytes())
            .rev()
            .take_while(|&d| d == b'0')
            .count();
        let significant = total - leading - trailing;
        let int_len = i64::try_from(self.int.len()).ok()?;
        let leading_len = i64::try_from(leading).ok()?;
        let point = int_len - leading_len + self.exponent;
        Some((
            self.digits().skip(leading).take(significant),
            significant,
            point,
        ))
    }

    /// Whether serde_json will write `float` as text with exactly this literal's value.
    fn survives_as(&self, float: f64) -> bool {
        if !float.is_finite() {
            return false;
        }
        let Some((digits, count, point)) = self.normalized() else {
            return float == 0.0;
        };
        if count > MAX_F64_SIGNIFICANT_DIGITS {
            return false;
        }
        let mut written = StackText::<F64_TEXT_CAPACITY>::new();
        if serde_json::to_writer(&mut written, &float).is_err() {
            return false;
        }
        let Some(written) = written
            .as_str()
            .and_then(|text| DecimalLiteral::parse(text, Exponent::Allowed))
        else {
            return false;
        };
        let same = match written.normalized() {
            Some((written_digits, written_count, written_point)) => {
                written.negative == self.negative
                    && written_point == point
                    && written_count == count
                    && written_digits.eq(digits)
            }
            None => false,
        };
        same
    }
}

fn split_digits(text: &str) -> (&str, &str) {
    let end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

/// A fixed buffer for formatting a number without a heap allocation per value.
struct StackText<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        StackText {
            bytes: [0; N],
            len: 0,
        }
    }

    fn as_str(&self) -> Option<&str> {
        self.bytes
            .get(..self.len)
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
    }
}

impl<const N: usize> std::io::Write for StackText<N> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let slot = self
            .len
            .checked_add(buf.len())
            .and_then(|end| self.bytes.get_mut(self.len..end))
            .ok_or(std::io::ErrorKind::WriteZero)?;
        slot.copy_from_slice(buf);
        self.len += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Arrays

/// Reads a one-dimensional array literal; `Ok(None)` means "not one we can read" (several
/// dimensions, explicit bounds like `[0:1]={…}`, malformed), and the caller keeps the text.
fn array_to_json(element_oid: u32, text: &str) -> Result<Option<Value>, ValueError> {
    let Some(inner) = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')) else {
        return Ok(None);
    };
    let mut elements = Vec::new();
    let mut reader = ArrayElements { rest: inner };
    if inner.is_empty() {
        return Ok(Some(Value::Array(elements)));
    }
    loop {
        let step = reader.next_element();
        // Check what follows before converting, so `{"a"b}` reads as malformed, not as a bad "a".
        let rest = match reader.rest.strip_prefix(',') {
            Some(rest) => Some(rest),
            None if reader.rest.is_empty() => None,
            None => return Ok(None),
        };
        match step {
            ArrayStep::Null => elements.push(Value::Null),
            ArrayStep::Element(element) => elements.push(scalar_to_json(element_oid, element)?),
            ArrayStep::Malformed => return Ok(None),
        }
        match rest {
            Some(rest) => reader.rest = rest,
            None => return Ok(Some(Value::Array(elements))),
        }
    }
}

enum ArrayStep<'a> {
    Null,
    Element(Cow<'a, str>),
    Malformed,
}

/// The inside of `{…}`, consumed one element at a time. PostgreSQL's array output quotes any
/// element that is empty, is `NULL` as a string, or contains `{}",\` or white space, and
/// escapes `"` and `\` inside quotes with a backslash.
struct ArrayElements<'a> {
    rest: &'a str,
}

impl<'a> ArrayElements<'a> {
    fn next_element(&mut self) -> ArrayStep<'a> {
        match self.rest.strip_prefix('"') {
            Some(quoted) => self.quoted(quoted),
            None => {
                let end = self.rest.find(',').unwrap_or(self.rest.len());
                let (element, rest) = self.rest.split_at(end);
                self.rest = rest;
                if element.is_empty() || element.contains(['{', '}', '"', '\\']) {
                    ArrayStep::Malformed
                } else if element.eq_ignore_ascii_case("NULL") {
                    ArrayStep::Null
                } else {
                    ArrayStep::Element(Cow::Borrowed(element))
                }
            }
        }
    }

    /// Borrows the element unless it contains escapes, which are rare.
    fn quoted(&mut self, after_quote: &'a str) -> ArrayStep<'a> {
        let mut unescaped: Option<String> = None;
        let mut segment_start = 0;
        let mut chars = after_quote.char_indices();
        while let Some((index, c)) = chars.next() {
            match c {
                '"' => {
                    let (Some(segment), Some(rest)) = (
                        after_quote.get(segment_start..index),
                        after_quote.get(index + 1..),
                    ) else {
                        return ArrayStep::Malformed;
                    };
                    self.rest = rest;
                    return ArrayStep::Element(match unescaped {
                        Some(mut owned) => {
                            owned.push_str(segment);
                            Cow::Owned(owned)
                        }
                        None => Cow::Borrowed(segment),
                    });
                }
                '\\' => {
                    let (Some(segment), Some((escaped_index, escaped))) =
                        (after_quote.get(segment_start..index), chars.next())
                    else {
                        return ArrayStep::Malformed;
                    };
                    let owned =
                        unescaped.get_or_insert_with(|| String::with_capacity(after_quote.len()));
                    owned.push_str(segment);
                    owned.push(escaped);
                    segment_start = escaped_index + escaped.len_utf8();
                }
                _ => {}
            }
        }
        ArrayStep::Malformed
    }
}

// ---------------------------------------------------------------------------------------------
// Dates and times

#[derive(Clone, Copy, PartialEq, Eq)]
enum Zone {
    /// `timestamptz`: a UTC offset follows the time.
    Offset,
    /// `timestamp`: wall-clock time, no offset.
    None,
}

/// An ISO date or timestamp as PostgreSQL prints it, fields parsed, text kept for copying.
struct IsoDateTime<'a> {
    year_digits: &'a str,
    month: u32,
    day: u32,
    time: Option<IsoTime<'a>>,
    /// Seconds east of UTC.
    offset_seconds: i32,
    before_christ: bool,
    /// The date and time without offset or era, e.g. `2024-01-02 03:04:05.12`.
    date_time_text: &'a str,
}

struct IsoTime<'a> {
    hour: u32,
    minute: u32,
    second: u32,
    fraction: &'a str,
}

/// RFC 3339 and four-digit-year readers cannot take these, so such values keep their text.
const RFC3339_YEAR_DIGITS: usize = 4;
const MAX_OFFSET_SECONDS: i32 = 24 * 3600;

impl<'a> IsoDateTime<'a> {
    /// `YYYY-MM-DD[ HH:MM:SS[.f…][±HH[:MM[:SS]]]][ BC]`; `time` says whether the time part is
    /// required (timestamps) or absent (dates).
    fn parse(text: &'a str, time: Option<Zone>) -> Option<Self> {
        let (text, before_christ) = match text.strip_suffix(" BC") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let mut cursor = Cursor { rest: text };
        let year_digits = cursor.digits();
        if year_digits.len() < RFC3339_YEAR_DIGITS {
            return None;
        }
        cursor.expect('-')?;
        let month = cursor.two_digits().filter(|m| (1..=12).contains(m))?;
        cursor.expect('-')?;
        let day = cursor.two_digits().filter(|d| (1..=31).contains(d))?;
        let Some(zone) = time else {
            return cursor.rest.is_empty().then_some(IsoDateTime {
                year_digits,
                month,
                day,
                time: None,
                offset_seconds: 0,
                before_christ,
                date_time_text: text,
            });
        };
        cursor.expect(' ')?;
        let hour = cursor.two_digits().filter(|h| *h <= 23)?;
        cursor.expect(':')?;
        let minute = cursor.two_digits().filter(|m| *m <= 59)?;
        cursor.expect(':')?;
        let second = cursor.two_digits().filter(|s| *s <= 59)?;
        let fraction = match cursor.rest.strip_prefix('.') {
            Some(after_point) => {
                cursor.rest = after_point;
                Some(cursor.digits()).filter(|f| !f.is_empty())?
            }
            None => "",
        };
        let date_time_text = text.get(..text.len() - cursor.rest.len())?;
        let offset_seconds = match zone {
            Zone::None => 0,
            Zone::Offset => cursor.offset()?,
        };
        cursor.rest.is_empty().then_some(IsoDateTime {
            year_digits,
            month,
            day,
            time: Some(IsoTime {
                hour,
                minute,
                second,
                fraction,
            }),
            offset_seconds,
            before_christ,
            date_time_text,
        })
    }

    fn fits_rfc3339(&self) -> bool {
        !self.before_christ && self.year_digits.len() == RFC3339_YEAR_DIGITS
    }

    /// The proleptic Gregorian year chrono uses: 1 BC is year 0.
    fn year(&self) -> Option<i32> {
        let year: i32 = self.year_digits.parse().ok()?;
        Some(if self.before_christ { 1 - year } else { year })
    }

    fn naive(&self) -> Option<NaiveDateTime> {
        let date = NaiveDate::from_ymd_opt(self.year()?, self.month, self.day)?;
        match &self.time {
            Some(time) => date.and_hms_opt(time.hour, time.minute, time.second),
            None => date.and_hms_opt(0, 0, 0),
        }
    }

    fn fraction(&self) -> &'a str {
        self.time.as_ref().map_or("", |time| time.fraction)
    }

    /// Milliseconds since 1970 in UTC, rounding towards the past like a clock reading.
    fn epoch_millis(&self) -> Result<i64, ValueError> {
        const MILLI_DIGITS: u32 = 3;
        self.epoch_units(MILLI_DIGITS)
            .ok_or(ValueError::MillisOutOfRange)
    }

    /// Microseconds since 1970 in UTC: PostgreSQL's own resolution, so nothing is rounded.
    fn epoch_micros(&self) -> Result<i64, ValueError> {
        const MICRO_DIGITS: u32 = 6;
        self.epoch_units(MICRO_DIGITS)
            .ok_or(ValueError::MicrosOutOfRange)
    }

    /// Units of 10^-`digits` seconds since 1970 in UTC, further fraction digits dropped.
    fn epoch_units(&self, digits: u32) -> Option<i64> {
        let local = self.naive()?;
        let seconds = local.and_utc().timestamp() - i64::from(self.offset_seconds);
        let mut units_of_second = 0;
        let mut fraction = self.fraction().bytes();
        for _ in 0..digits {
            let digit = fraction.next().map_or(0, |d| i64::from(d - b'0'));
            units_of_second = units_of_second * 10 + digit;
        }
        seconds
            .checked_mul(10_i64.pow(digits))
            .and_then(|units| units.checked_add(units_of_second))
    }
}

/// A forward-only reader over ASCII syntax; every step checks bounds instead of indexing.
struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    fn digits(&mut self) -> &'a str {
        let (digits, rest) = split_digits(self.rest);
        self.rest = rest;
        digits
    }

    fn expect(&mut self, c: char) -> Option<()> {
        self.rest = self.rest.strip_prefix(c)?;
        Some(())
    }

    fn two_digits(&mut self) -> Option<u32> {
        let bytes = self.rest.as_bytes();
        let (&tens, &units) = (bytes.first()?, bytes.get(1)?);
        if !tens.is_ascii_digit() || !units.is_ascii_digit() {
            return None;
        }
        self.rest = self.rest.get(2..)?;
        Some(u32::from(tens - b'0') * 10 + u32::from(units - b'0'))
    }

    /// `±HH[:MM[:SS]]`: whole hours is what TimeZone=UTC gives; minutes and seconds appear for
    /// other zones (and local mean time before 1900), which we still convert correctly.
    fn offset(&mut self) -> Option<i32> {
        let sign = if self.rest.starts_with('+') {
            1
        } else if self.rest.starts_with('-') {
            -1
        } else {
            return None;
        };
        self.rest = self.rest.get(1..)?;
        let mut seconds = i32::try_from(self.two_digits()?).ok()? * 3600;
        for unit in [60, 1] {
            if self.rest.starts_with(':') {
                self.expect(':')?;
                seconds += i32::try_from(self.two_digits().filter(|v| *v <= 59)?).ok()? * unit;
            } else {
                break;
            }
        }
        (seconds < MAX_OFFSET_SECONDS).then_some(sign * seconds)
    }
}

fn is_infinity(text: &str) -> bool {
    matches!(text, "infinity" | "-infinity")
}

/// `timestamptz` → `2024-01-02T03:04:05.123456Z`; `timestamp` → `2024-01-02T03:04:05.123456`.
fn timestamp_to_json(text: Cow<'_, str>, zone: Zone) -> Result<Value, ValueError> {
    if is_infinity(&text) {
        return Ok(Value::String(text.into_owned()));
    }
    let parsed = IsoDateTime::parse(&text, Some(zone)).ok_or(ValueError::NotTimestamp)?;
    if !parsed.fits_rfc3339() {
        return Ok(Value::String(text.into_owned()));
    }
    let converted = if parsed.offset_seconds == 0 {
        Some(rewrite_separator(parsed.date_time_text, zone))
    } else {
        shift_to_utc(&parsed)
    };
    Ok(Value::String(
        converted.unwrap_or_else(|| text.into_owned()),
    ))
}

/// The common case (UTC session, `+00`): only the separator and suffix change, no calendar math.
fn rewrite_separator(date_time_text: &str, zone: Zone) -> String {
    const DATE_LEN: usize = "YYYY-MM-DD".len();
    let mut out = String::with_capacity(date_time_text.len() + 1);
    let (date, time) = date_time_text.split_at(DATE_LEN.min(date_time_text.len()));
    out.push_str(date);
    out.push('T');
    out.push_str(time.get(1..).unwrap_or(""));
    if zone == Zone::Offset {
        out.push('Z');
    }
    out
}

/// None when the shifted time leaves the four-digit years RFC 3339 can write.
fn shift_to_utc(parsed: &IsoDateTime<'_>) -> Option<String> {
    let offset = TimeDelta::try_seconds(i64::from(parsed.offset_seconds))?;
    let utc = parsed.naive()?.checked_sub_signed(offset)?;
    if !(0..=9999).contains(&utc.year()) {
        return None;
    }
    let fraction = parsed.fraction();
    let mut out = String::with_capacity(parsed.date_time_text.len() + 1);
    write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        utc.year(),
        utc.month(),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second()
    )
    .ok()?;
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    out.push('Z');
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Stack Auth fields with a fixed type

/// `signed_up_at_millis` for a value of the given type: Neon's generated `created_at` casts
/// it to bigint, so anything that is not an integer would fail the insert.
pub fn timestamp_millis(type_oid: u32, text: &str) -> Result<i64, MapError> {
    millis_from_text(type_oid, text).map_err(|source| MapError::SignedUpAt { type_oid, source })
}

/// `timestamp_millis` without the error context, for callers that add the column name.
/// `timestamp` is taken as UTC and `date` as midnight UTC; integers are taken to be
/// milliseconds already, because guessing seconds from magnitude would misdate early rows.
pub fn millis_from_text(type_oid: u32, text: &str) -> Result<i64, ValueError> {
    match type_oid {
        oid::TIMESTAMPTZ | oid::TIMESTAMP | oid::DATE if is_infinity(text) => {
            Err(ValueError::InfiniteTime)
        }
        oid::TIMESTAMPTZ => IsoDateTime::parse(text, Some(Zone::Offset))
            .ok_or(ValueError::NotTimestamp)?
            .epoch_millis(),
        oid::TIMESTAMP => IsoDateTime::parse(text, Some(Zone::None))
            .ok_or(ValueError::NotTimestamp)?
            .epoch_millis(),
        oid::DATE => IsoDateTime::parse(text, None)
            .ok_or(ValueError::NotDate)?
            .epoch_millis(),
        oid::INT2 | oid::INT4 | oid::INT8 => {
            text.parse::<i64>().map_err(|_| ValueError::NotInteger)
        }
        oid::NUMERIC => {
            let literal =
                DecimalLiteral::parse(text, Exponent::Forbidden).ok_or(ValueError::NotNumeric)?;
            literal
                .integer_text(text)
                .ok_or(ValueError::FractionalMillis)?
                .parse::<i64>()
                .map_err(|_| ValueError::MillisOutOfRange)
        }
        _ => Err(ValueError::NotMillisType),
    }
}

/// Types `micros_from_text` accepts.
pub const TIME_TYPES: &[u32] = &[oid::TIMESTAMPTZ, oid::TIMESTAMP, oid::DATE];

/// Microseconds since the Unix epoch of a timestamp or date (a source's own deletion time,
/// which becomes the target's `deleted_at` exactly). `timestamp` is taken as UTC and `date`
/// as midnight UTC, as in [`millis_from_text`].
pub fn micros_from_text(type_oid: u32, text: &str) -> Result<i64, ValueError> {
    let zone = match type_oid {
        oid::TIMESTAMPTZ => Some(Zone::Offset),
        oid::TIMESTAMP => Some(Zone::None),
        oid::DATE => None,
        _ => return Err(ValueError::NotTimeType),
    };
    if is_infinity(text) {
        return Err(ValueError::InfiniteTime);
    }
    let not_time = if zone.is_some() {
        ValueError::NotTimestamp
    } else {
        ValueError::NotDate
    };
    IsoDateTime::parse(text, zone)
        .ok_or(not_time)?
        .epoch_micros()
}

/// `primary_email_verified` from a non-null value: a boolean as is, an integer when non-zero,
/// a timestamp or date by its presence (it records when the address was verified).
pub fn verified_from_text(type_oid: u32, text: &str) -> Result<bool, ValueError> {
    match type_oid {
        oid::BOOL => parse_bool(text),
        oid::INT2 | oid::INT4 | oid::INT8 => text
            .parse::<i64>()
            .map(|number| number != 0)
            .map_err(|_| ValueError::NotInteger),
        oid::TIMESTAMPTZ | oid::TIMESTAMP | oid::DATE => Ok(true),
        _ => Err(ValueError::NotVerifiedType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn convert(type_oid: u32, text: &str) -> Value {
        text_to_json(type_oid, text).unwrap()
    }

    #[test]
    fn text_value_borrows_utf8_and_rejects_binary() {
        let text = ColumnValue::Text(Bytes::from_static("é".as_bytes()));
        assert_eq!(TextValue::of(&text), Ok(TextValue::Text("é")));
        assert_eq!(TextValue::of(&ColumnValue::Null), Ok(TextValue::Null));
        assert_eq!(
            TextValue::of(&ColumnValue::UnchangedToast),
            Ok(TextValue::UnchangedToast)
        );
        let invalid = ColumnValue::Text(Bytes::from_static(&[0xff, 0xfe]));
        assert_eq!(TextValue::of(&invalid), Err(ValueError::NotUtf8));
        let binary = ColumnValue::Binary(Bytes::from_static(&[0, 0, 0, 1]));
        assert_eq!(TextValue::of(&binary), Err(ValueError::BinaryFormat));
    }

    /// serde_json's `raw_value` feature would turn an object with this key into the JSON its
    /// value holds, rewriting a user's `json` document: it must stay off.
    #[test]
    fn a_json_document_is_kept_whatever_its_keys() {
        let text = r#"{"a": {"$serde_json::private::RawValue": "[1,2]"}}"#;
        assert_eq!(
            json_to_json(Cow::Borrowed(text)),
            json!({"a": {"$serde_json::private::RawValue": "[1,2]"}})
        );
    }

    #[test]
    fn booleans() {
        assert_eq!(convert(oid::BOOL, "t"), json!(true));
        assert_eq!(convert(oid::BOOL, "f"), json!(false));
        assert_eq!(text_to_json(oid::BOOL, "true"), Err(ValueError::NotBool));
    }

    #[test]
    fn integers() {
        assert_eq!(convert(oid::INT2, "-32768"), json!(-32768));
        assert_eq!(convert(oid::INT4, "42"), json!(42));
        assert_eq!(convert(oid::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(convert(oid::OID, "4294967295"), json!(4_294_967_295_u32));
        assert_eq!(text_to_json(oid::INT4, "4.5"), Err(ValueError::NotInteger));
        assert_eq!(text_to_json(oid::INT8, ""), Err(ValueError::NotInteger));
    }

    #[test]
    fn floats_keep_non_finite_values_as_strings() {
        assert_eq!(convert(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(convert(oid::FLOAT4, "0.1"), json!(0.1));
        assert_eq!(convert(oid::FLOAT8, "1e+300"), json!(1e300));
        assert_eq!(convert(oid::FLOAT8, "-2.5e-10"), json!(-2.5e-10));
        assert_eq!(
            convert(oid::FLOAT8, "0.30000000000000004"),
            json!(0.30000000000000004)
        );
        assert_eq!(convert(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(convert(oid::FLOAT4, "Infinity"), json!("Infinity"));
        assert_eq!(convert(oid::FLOAT8, "-Infinity"), json!("-Infinity"));
        assert_eq!(text_to_json(oid::FLOAT8, "abc"), Err(ValueError::NotFloat));
        assert_eq!(text_to_json(oid::FLOAT8, "inf"), Err(ValueError::NotFloat));
    }

    #[test]
    fn numerics_become_numbers_only_when_exact() {
        assert_eq!(convert(oid::NUMERIC, "42"), json!(42));
        assert_eq!(convert(oid::NUMERIC, "-7"), json!(-7));
        assert_eq!(convert(oid::NUMERIC, "5.000"), json!(5));
        assert_eq!(
            convert(oid::NUMERIC, "18446744073709551615"),
            json!(u64::MAX)
        );
        assert_eq!(convert(oid::NUMERIC, "12.5"), json!(12.5));
        assert_eq!(convert(oid::NUMERIC, "0.1"), json!(0.1));
        assert_eq!(convert(oid::NUMERIC, "1.50"), json!(1.5));
        assert_eq!(convert(oid::NUMERIC, "-0.000123"), json!(-0.000123));
        assert_eq!(convert(oid::NUMERIC, "0.0"), json!(0));
        assert_eq!(convert(oid::NUMERIC, "0.000"), json!(0));
        assert_eq!(convert(oid::NUMERIC, "-0.5"), json!(-0.5));
        assert_eq!(
            convert(oid::NUMERIC, "0.1234567890123456"),
            json!(0.1234567890123456)
        );
        // Too many digits for an f64: the text survives instead.
        assert_eq!(
            convert(oid::NUMERIC, "0.12345678901234567890"),
            json!("0.12345678901234567890")
        );
        assert_eq!(
            convert(oid::NUMERIC, "123456789012345678901234567890"),
            json!("123456789012345678901234567890")
        );
        // 2^64 is an exact f64, but serde_json would write it as 1.8446744073709552e19.
        assert_eq!(
            convert(oid::NUMERIC, "18446744073709551616"),
            json!("18446744073709551616")
        );
        // A power of ten whose shortest f64 text is exact is kept as a number.
        assert_eq!(convert(oid::NUMERIC, "100000000000000000000"), json!(1e20));
        assert_eq!(
            convert(oid::NUMERIC, "9007199254740993.5"),
            json!("9007199254740993.5")
        );
        assert_eq!(convert(oid::NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(convert(oid::NUMERIC, "Infinity"), json!("Infinity"));
        assert_eq!(convert(oid::NUMERIC, "-Infinity"), json!("-Infinity"));
        for bad in ["", "-", "1.", ".5", "1e5", "1.2.3", "12a"] {
            assert_eq!(
                text_to_json(oid::NUMERIC, bad),
                Err(ValueError::NotNumeric),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn json_is_parsed() {
        assert_eq!(
            convert(
                oid::JSONB,
                r#"{"a": [1, 2.5, null, true], "b": {"c": "d"}}"#
            ),
            json!({"a": [1, 2.5, null, true], "b": {"c": "d"}})
        );
        assert_eq!(convert(oid::JSON, "\"plain\""), json!("plain"));
        assert_eq!(
            convert(oid::JSON, "12345678901234567890"),
            json!(12345678901234567890_u64)
        );
        assert_eq!(
            convert(
                oid::JSONB,
                r#"{"s": "-1.23456789012345678901 in a string", "n": -0.5}"#
            ),
            json!({"s": "-1.23456789012345678901 in a string", "n": -0.5})
        );
    }

    #[test]
    fn json_that_would_lose_digits_stays_text() {
        let long = r#"{"balance": 12345678901234567890.123}"#;
        assert_eq!(convert(oid::JSONB, long), json!(long));
        let huge = r#"[1e400]"#;
        assert_eq!(convert(oid::JSON, huge), json!(huge));
        let big_integer = r#"{"n": 123456789012345678901234567890}"#;
        assert_eq!(convert(oid::JSONB, big_integer), json!(big_integer));
    }

    #[test]
    fn json_that_jsonb_cannot_hold_stays_text() {
        for nul in [r#"{"a": "x\u0000"}"#, r#"{"\u0000": 1}"#, r#"["\u0000"]"#] {
            assert_eq!(convert(oid::JSON, nul), json!(nul));
        }
        // An escaped backslash before "u0000" is not the character.
        let escaped = r#"{"a": "\\u0000"}"#;
        assert_eq!(convert(oid::JSON, escaped), json!({"a": "\\u0000"}));
    }

    #[test]
    fn timestamptz_becomes_rfc3339_utc() {
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "2024-01-02 03:04:05+00"),
            json!("2024-01-02T03:04:05Z")
        );
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.5+00"),
            json!("2024-01-02T03:04:05.5Z")
        );
        // Offsets other than UTC still come out in UTC.
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "2024-01-01 01:30:00.25+05:30"),
            json!("2023-12-31T20:00:00.25Z")
        );
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "1883-11-18 11:58:30-04:56:02"),
            json!("1883-11-18T16:54:32Z")
        );
        assert_eq!(convert(oid::TIMESTAMPTZ, "infinity"), json!("infinity"));
        assert_eq!(convert(oid::TIMESTAMPTZ, "-infinity"), json!("-infinity"));
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"),
            json!("0044-03-15 12:00:00+00 BC")
        );
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "12024-01-02 03:04:05+00"),
            json!("12024-01-02 03:04:05+00")
        );
        // Shifting past year 9999 cannot be written in RFC 3339 either.
        assert_eq!(
            convert(oid::TIMESTAMPTZ, "9999-12-31 23:00:00-02"),
            json!("9999-12-31 23:00:00-02")
        );
        for bad in [
            "2024-01-02 03:04:05",
            "2024-01-02T03:04:05+00",
            "01/02/2024 03:04:05+00",
            "2024-13-02 03:04:05+00",
            "2024-01-02 03:04:05.+00",
            "2024-01-02 03:04:05+00 AD",
        ] {
            assert_eq!(
                text_to_json(oid::TIMESTAMPTZ, bad),
                Err(ValueError::NotTimestamp),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn timestamp_and_date() {
        assert_eq!(
            convert(oid::TIMESTAMP, "2024-01-02 03:04:05.123456"),
            json!("2024-01-02T03:04:05.123456")
        );
        assert_eq!(
            convert(oid::TIMESTAMP, "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
        assert_eq!(convert(oid::TIMESTAMP, "infinity"), json!("infinity"));
        assert_eq!(
            convert(oid::TIMESTAMP, "0001-01-01 00:00:00 BC"),
            json!("0001-01-01 00:00:00 BC")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMP, "2024-01-02 03:04:05+00"),
            Err(ValueError::NotTimestamp)
        );
        assert_eq!(convert(oid::DATE, "2024-01-02"), json!("2024-01-02"));
        assert_eq!(convert(oid::DATE, "0044-03-15 BC"), json!("0044-03-15 BC"));
    }

    #[test]
    fn strings_are_kept_as_sent() {
        assert_eq!(
            convert(oid::UUID, "0f8fad5b-d9cb-469f-a165-70867728950e"),
            json!("0f8fad5b-d9cb-469f-a165-70867728950e")
        );
        assert_eq!(convert(oid::TEXT, "Ada Lovelace"), json!("Ada Lovelace"));
        assert_eq!(convert(oid::VARCHAR, ""), json!(""));
        assert_eq!(convert(oid::BPCHAR, "ab   "), json!("ab   "));
        assert_eq!(convert(oid::NAME, "postgres"), json!("postgres"));
        assert_eq!(convert(oid::BYTEA, "\\xdeadbeef"), json!("\\xdeadbeef"));
        // citext and other extension types have OIDs assigned per database.
        assert_eq!(convert(16_385, "Mixed@Case.org"), json!("Mixed@Case.org"));
        // interval: IntervalStyle=iso_8601 text is already what a JSON reader wants.
        assert_eq!(convert(1186, "P1DT2H"), json!("P1DT2H"));
    }

    #[test]
    fn arrays_of_each_element_type() {
        assert_eq!(
            convert(oid::BOOL_ARRAY, "{t,f,NULL}"),
            json!([true, false, null])
        );
        assert_eq!(convert(oid::INT2_ARRAY, "{1,-2}"), json!([1, -2]));
        assert_eq!(convert(oid::INT4_ARRAY, "{}"), json!([]));
        assert_eq!(
            convert(oid::INT8_ARRAY, "{9223372036854775807}"),
            json!([i64::MAX])
        );
        assert_eq!(
            convert(oid::FLOAT8_ARRAY, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(convert(oid::FLOAT4_ARRAY, "{0.1}"), json!([0.1]));
        assert_eq!(
            convert(oid::NUMERIC_ARRAY, "{1.25,0.12345678901234567890,NULL}"),
            json!([1.25, "0.12345678901234567890", null])
        );
        assert_eq!(
            convert(
                oid::UUID_ARRAY,
                "{0f8fad5b-d9cb-469f-a165-70867728950e,NULL}"
            ),
            json!(["0f8fad5b-d9cb-469f-a165-70867728950e", null])
        );
        assert_eq!(
            convert(
                oid::TIMESTAMPTZ_ARRAY,
                r#"{"2024-01-02 03:04:05+00","2024-01-02 03:04:05.5+00",infinity}"#
            ),
            json!(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5Z", "infinity"])
        );
        assert_eq!(
            convert(oid::JSONB_ARRAY, r#"{"{\"a\": 1}","[1, \"x\"]",NULL,3}"#),
            json!([{"a": 1}, [1, "x"], null, 3])
        );
        assert_eq!(
            convert(oid::JSON_ARRAY, r#"{"\"quoted\""}"#),
            json!(["quoted"])
        );
        assert_eq!(convert(oid::VARCHAR_ARRAY, "{a,b}"), json!(["a", "b"]));
    }

    #[test]
    fn text_arrays_handle_quotes_escapes_and_null() {
        assert_eq!(
            convert(oid::TEXT_ARRAY, r#"{a,"b c",NULL,"x\"y"}"#),
            json!(["a", "b c", null, "x\"y"])
        );
        assert_eq!(
            convert(oid::TEXT_ARRAY, r#"{"NULL",null,"","\\","a,b","{}"}"#),
            json!(["NULL", null, "", "\\", "a,b", "{}"])
        );
        assert_eq!(
            convert(oid::TEXT_ARRAY, r#"{"é\ü",ß,"\"","a\\b\"c"}"#),
            json!(["éü", "ß", "\"", "a\\b\"c"])
        );
        assert_eq!(
            convert(oid::BYTEA_ARRAY, r#"{"\\x01ff"}"#),
            json!(["\\x01ff"])
        );
    }

    #[test]
    fn unreadable_arrays_keep_their_text() {
        for text in [
            "{{1,2},{3,4}}",
            "[0:1]={1,2}",
            "{1,2",
            "1,2}",
            "{1,,2}",
            "{1,}",
            r#"{"unterminated}"#,
            r#"{"a"b}"#,
            r#"{"a\"}"#,
            "{a b\"}",
        ] {
            assert_eq!(convert(oid::INT4_ARRAY, text), json!(text), "{text:?}");
            assert_eq!(convert(oid::TEXT_ARRAY, text), json!(text), "{text:?}");
        }
    }

    #[test]
    fn array_elements_of_the_wrong_shape_are_errors() {
        assert_eq!(
            text_to_json(oid::INT4_ARRAY, "{1,x}"),
            Err(ValueError::NotInteger)
        );
        assert_eq!(
            text_to_json(oid::BOOL_ARRAY, "{yes}"),
            Err(ValueError::NotBool)
        );
    }

    #[test]
    fn millis_from_each_accepted_type() {
        assert_eq!(
            timestamp_millis(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            Ok(1_704_164_645_123)
        );
        assert_eq!(
            timestamp_millis(oid::TIMESTAMPTZ, "2024-01-02 03:04:05+00"),
            Ok(1_704_164_645_000)
        );
        assert_eq!(
            timestamp_millis(oid::TIMESTAMPTZ, "2024-01-02 08:34:05.5+05:30"),
            Ok(1_704_164_645_500)
        );
        assert_eq!(
            timestamp_millis(oid::TIMESTAMP, "2024-01-02 03:04:05.1"),
            Ok(1_704_164_645_100)
        );
        assert_eq!(
            timestamp_millis(oid::TIMESTAMP, "1969-12-31 23:59:59.9999"),
            Ok(-1)
        );
        assert_eq!(
            timestamp_millis(oid::DATE, "2024-01-02"),
            Ok(1_704_153_600_000)
        );
        assert_eq!(timestamp_millis(oid::DATE, "1970-01-01"), Ok(0));
        assert_eq!(
            timestamp_millis(oid::DATE, "0001-01-01 BC"),
            Ok(-62_167_219_200_000)
        );
        assert_eq!(
            timestamp_millis(oid::TIMESTAMPTZ, "12024-01-01 00:00:00+00"),
            Ok(317_273_587_200_000)
        );
        assert_eq!(
            timestamp_millis(oid::INT8, "1704164645123"),
            Ok(1_704_164_645_123)
        );
        assert_eq!(timestamp_millis(oid::INT4, "-5"), Ok(-5));
        assert_eq!(
            timestamp_millis(oid::NUMERIC, "1704164645123"),
            Ok(1_704_164_645_123)
        );
        assert_eq!(
            timestamp_millis(oid::NUMERIC, "1704164645123.000"),
            Ok(1_704_164_645_123)
        );
    }

    #[test]
    fn micros_keep_postgres_resolution() {
        assert_eq!(
            micros_from_text(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.123456+00"),
            Ok(1_704_164_645_123_456)
        );
        assert_eq!(
            micros_from_text(oid::TIMESTAMPTZ, "2024-01-02 05:04:05.5+02"),
            Ok(1_704_164_645_500_000)
        );
        assert_eq!(
            micros_from_text(oid::TIMESTAMP, "1969-12-31 23:59:59.999999"),
            Ok(-1)
        );
        assert_eq!(
            micros_from_text(oid::DATE, "1970-01-02"),
            Ok(86_400_000_000)
        );
        assert_eq!(
            micros_from_text(oid::TIMESTAMPTZ, "infinity"),
            Err(ValueError::InfiniteTime)
        );
        assert_eq!(
            micros_from_text(oid::TIMESTAMPTZ, "2024-01-02"),
            Err(ValueError::NotTimestamp)
        );
        assert_eq!(
            micros_from_text(oid::INT8, "1704164645123"),
            Err(ValueError::NotTimeType)
        );
        assert_eq!(
            micros_from_text(oid::TIMESTAMPTZ, "294276-12-31 23:59:59+00"),
            Err(ValueError::MicrosOutOfRange)
        );
    }

    #[test]
    fn millis_errors_name_the_type_and_the_problem() {
        let error = timestamp_millis(oid::TEXT, "2024-01-02").unwrap_err();
        assert_eq!(
            error,
            MapError::SignedUpAt {
                type_oid: oid::TEXT,
                source: ValueError::NotMillisType
            }
        );
        assert_eq!(
            error.to_string(),
            "type oid 25 cannot become signed_up_at_millis"
        );
        let reason = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(
            reason.as_deref(),
            Some("expected a timestamp, date or integer milliseconds")
        );
        assert_eq!(
            millis_from_text(oid::TIMESTAMPTZ, "infinity"),
            Err(ValueError::InfiniteTime)
        );
        assert_eq!(
            millis_from_text(oid::DATE, "-infinity"),
            Err(ValueError::InfiniteTime)
        );
        assert_eq!(
            millis_from_text(oid::NUMERIC, "1.5"),
            Err(ValueError::FractionalMillis)
        );
        assert_eq!(
            millis_from_text(oid::NUMERIC, "99999999999999999999"),
            Err(ValueError::MillisOutOfRange)
        );
        assert_eq!(
            millis_from_text(oid::TIMESTAMPTZ, "294276-12-31 23:59:59+00"),
            Err(ValueError::MillisOutOfRange)
        );
        assert_eq!(
            millis_from_text(oid::TIMESTAMP, "2024-01-02"),
            Err(ValueError::NotTimestamp)
        );
        assert_eq!(
            millis_from_text(oid::DATE, "2024-02-30"),
            Err(ValueError::MillisOutOfRange)
        );
        assert_eq!(
            millis_from_text(oid::INT8, "1.0"),
            Err(ValueError::NotInteger)
        );
        assert_eq!(
            millis_from_text(oid::FLOAT8, "1"),
            Err(ValueError::NotMillisType)
        );
    }

    #[test]
    fn verified_flags() {
        assert_eq!(verified_from_text(oid::BOOL, "t"), Ok(true));
        assert_eq!(verified_from_text(oid::BOOL, "f"), Ok(false));
        assert_eq!(verified_from_text(oid::INT4, "0"), Ok(false));
        assert_eq!(verified_from_text(oid::INT2, "1"), Ok(true));
        assert_eq!(
            verified_from_text(oid::TIMESTAMPTZ, "2024-01-02 03:04:05+00"),
            Ok(true)
        );
        assert_eq!(
            verified_from_text(oid::TEXT, "yes"),
            Err(ValueError::NotVerifiedType)
        );
    }
}
