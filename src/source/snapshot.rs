//! The initial copy: the users table as of the slot's exported snapshot.
//!
//! `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` returns a snapshot name that stays valid
//! while the replication connection does nothing else. Reading the table in a transaction
//! that adopts it (`SET TRANSACTION SNAPSHOT`) sees exactly the transactions committed
//! before the slot's consistent point; every later one will stream from the slot. So the copy
//! plus the stream miss nothing and apply nothing twice, even while users are being written.
//!
//! The copy uses `COPY ... TO STDOUT` (text format, with the same session settings as the
//! replication connection) and parses it into the same tuples the stream carries, so one
//! mapping serves both.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use postgres_protocol::escape::escape_literal;
use tokio_postgres::{Client, CopyOutStream};

use super::SourceError;
use crate::decode::{ColumnValue, TupleData};

/// Session settings that make COPY's text match pgoutput's (see the replication client).
pub(crate) const SESSION_SETTINGS: &str = "SET DateStyle = ISO; SET TimeZone = UTC; \
    SET extra_float_digits = 3; SET IntervalStyle = iso_8601; SET bytea_output = hex";

/// Rows of the snapshot, read page by page.
pub struct SnapshotRows {
    total: Option<u64>,
    stream: std::pin::Pin<Box<CopyOutStream>>,
    buf: BytesMut,
    columns: usize,
    done: bool,
}

impl SnapshotRows {
    /// Opens the snapshot on `client` (which then stays inside that transaction until the
    /// copy is read to the end) and starts copying what `select` reads (the profile's
    /// `snapshot_select`), rows of `width` columns.
    pub async fn open(
        client: &Client,
        select: &str,
        width: usize,
        snapshot_name: &str,
    ) -> Result<SnapshotRows, SourceError> {
        client
            .batch_execute(&format!(
                "{SESSION_SETTINGS}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SET TRANSACTION SNAPSHOT {}",
                escape_literal(snapshot_name)
            ))
            .await
            .map_err(SourceError::sql("opening the slot's snapshot"))?;
        // An exact count in the same snapshot, for the progress bar's ETA.
        let total = client
            .query_one(&format!("SELECT count(*) FROM ({select}) AS copied"), &[])
            .await
            .map_err(SourceError::sql("counting the users to copy"))?
            .get::<_, i64>(0);
        let stream = client
            .copy_out(&format!("COPY ({select}) TO STDOUT"))
            .await
            .map_err(SourceError::sql("copying the users table"))?;
        Ok(SnapshotRows {
            total: u64::try_from(total).ok(),
            stream: Box::pin(stream),
            buf: BytesMut::new(),
            columns: width,
            done: false,
        })
    }

    /// How many rows the snapshot holds.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Up to `max` more rows; an empty page means the copy is complete.
    pub async fn next_page(&mut self, max: usize) -> Result<Vec<TupleData>, SourceError> {
        let mut rows = Vec::new();
        while rows.len() < max {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(end + 1).freeze();
                line.truncate(end);
                rows.push(parse_line(&line, self.columns)?);
                continue;
            }
            if self.done {
                break;
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.extend_from_slice(
                    &chunk.map_err(SourceError::sql("copying the users table"))?,
                ),
                None => self.done = true,
            }
        }
        if self.done && rows.is_empty() && !self.buf.is_empty() {
            return Err(SourceError::Definite(
                "the source's COPY output ended in the middle of a row".into(),
            ));
        }
        Ok(rows)
    }
}

/// Every row `select` reads, rows of `width` columns, in the transaction `client` is in.
pub async fn copy_rows(
    client: &Client,
    select: &str,
    width: usize,
) -> Result<Vec<TupleData>, SourceError> {
    let stream = client
        .copy_out(&format!("COPY ({select}) TO STDOUT"))
        .await
        .map_err(SourceError::sql("copying a chunk of the users table"))?;
    let mut rows = SnapshotRows {
        total: None,
        stream: Box::pin(stream),
        buf: BytesMut::new(),
        columns: width,
        done: false,
    };
    let mut all = Vec::new();
    loop {
        let page = rows.next_page(usize::MAX).await?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}

/// One line of COPY text: tab-separated fields, `\N` for NULL, backslash escapes. A field
/// without escapes shares the line's buffer rather than being copied.
fn parse_line(line: &Bytes, columns: usize) -> Result<TupleData, SourceError> {
    let mut values = Vec::with_capacity(columns);
    let mut start = 0;
    for field in line.split(|&b| b == b'\t') {
        values.push(parse_field(line, start..start + field.len()));
        start += field.len() + 1;
    }
    if values.len() != columns {
        return Err(SourceError::Definite(format!(
            "the source's COPY output has {} columns where {columns} were expected",
            values.len()
        )));
    }
    Ok(TupleData(values))
}

fn parse_field(line: &Bytes, range: std::ops::Range<usize>) -> ColumnValue {
    let raw = &line[range.clone()];
    if raw == b"\\N" {
        return ColumnValue::Null;
    }
    if !raw.contains(&b'\\') {
        return ColumnValue::Text(line.slice(range));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = raw[i];
        i += 1;
        if byte != b'\\' || i == raw.len() {
            out.push(byte);
            continue;
        }
        let escaped = raw[i];
        i += 1;
        match escaped {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(value as u8);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match raw.get(i).and_then(|d| char::from(*d).to_digit(16)) {
                        Some(d) => {
                            value = value * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(value as u8);
                }
            }
            other => out.push(other),
        }
    }
    ColumnValue::Text(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &ColumnValue) -> &[u8] {
        match value {
            ColumnValue::Text(bytes) => bytes,
            other => panic!("not text: {other:?}"),
        }
    }

    #[test]
    fn parses_copy_text_lines() {
        let row = parse_line(
            &Bytes::from_static(b"1\t\\N\ta\\tb\\nc\\\\d\t\\x41\\101"),
            4,
        )
        .unwrap();
        assert_eq!(text(&row.0[0]), b"1");
        assert_eq!(row.0[1], ColumnValue::Null);
        assert_eq!(text(&row.0[2]), b"a\tb\nc\\d");
        assert_eq!(text(&row.0[3]), b"AA");
        assert!(parse_line(&Bytes::from_static(b"1\t2"), 3).is_err());
    }

    #[test]
    fn keeps_utf8_and_empty_strings() {
        let row = parse_line(&Bytes::from("ünï\t"), 2).unwrap();
        assert_eq!(text(&row.0[0]), "ünï".as_bytes());
        assert_eq!(text(&row.0[1]), b"");
    }
}
