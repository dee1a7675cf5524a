//! Framing of backend messages on a replication connection.
//!
//! `postgres-protocol` parses most backend messages but not `CopyBothResponse` (`'W'`), which
//! is the one a replication stream lives in, so the replication client frames messages itself
//! and interprets only the handful a walsender sends. Framing is pure: a buffer in, a frame
//! out, no I/O, so it is cancel-safe to call after every read.

use bytes::{Buf, Bytes, BytesMut};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';

/// Largest backend message accepted once the server has authenticated. A walsender's messages
/// are bounded by the WAL record sizes (1 GiB for a single datum); anything bigger is a corrupt
/// length, not data.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// Largest backend message accepted before authentication completes. Until then the other end
/// is whoever answered the TCP connection (with `sslmode=require` any certificate passes), and
/// a length word must not make the client reserve memory at that stranger's will. The messages
/// of that phase are small: libpq refuses an authentication request over 2,000 bytes and an
/// ErrorResponse over 30,000 (`PQconnectPoll`, CONNECTION_AWAITING_RESPONSE) and caps every
/// other short message type at 30,000 (`pqParseInput3`). 64 KiB holds all of them with room to
/// spare, including a NoticeResponse, and costs nothing to keep.
pub const MAX_PRE_AUTH_FRAME_LEN: usize = 64 * 1024;

/// One backend message: its tag and its body (without the length word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// The connection sent bytes that are not a PostgreSQL backend message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("backend message {tag:?} has an invalid length {len}")]
    BadLength { tag: char, len: u32 },
    /// Longer than the caller accepts at this point of the connection; nothing was reserved for it.
    #[error("backend message {tag:?} claims {len} bytes, more than the {max} accepted here")]
    TooLong { tag: char, len: u32, max: usize },
    #[error("backend message {tag:?} is malformed: {what}")]
    Malformed { tag: char, what: &'static str },
}

/// Takes one complete frame off the front of `buf`, or returns `None` when more bytes are needed.
/// A frame longer than `max_len` (body and length word) is an error before any memory is
/// reserved for it.
pub fn take_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength {
            tag: char::from(tag),
            len,
        });
    }
    if len as usize > max_len {
        return Err(WireError::TooLong {
            tag: char::from(tag),
            len,
            max: max_len,
        });
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame }))
}

/// The fields of an ErrorResponse or NoticeResponse that an operator needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMessage {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, "; detail: {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Parses the body of an `'E'` or `'N'` message: a list of (field type byte, C string).
pub fn parse_server_message(tag: u8, body: &[u8]) -> Result<ServerMessage, WireError> {
    let malformed = |what| WireError::Malformed {
        tag: char::from(tag),
        what,
    };
    let mut out = ServerMessage::default();
    let mut rest = body;
    loop {
        let (&field, tail) = rest
            .split_first()
            .ok_or_else(|| malformed("no terminator"))?;
        if field == 0 {
            return Ok(out);
        }
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed("unterminated field"))?;
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            b'D' => out.detail = Some(value),
            b'H' => out.hint = Some(value),
            _ => {}
        }
        rest = &tail[end + 1..];
    }
}

/// Splits a DataRow body into its text columns (`None` for SQL NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let malformed = |what| WireError::Malformed {
        tag: char::from(DATA_ROW),
        what,
    };
    let (count, mut rest) = split_be::<2>(body).ok_or_else(|| malformed("no column count"))?;
    let count = u16::from_be_bytes(count);
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (len, tail) = split_be::<4>(rest).ok_or_else(|| malformed("no column length"))?;
        let len = i32::from_be_bytes(len);
        if len < 0 {
            columns.push(None);
            rest = tail;
            continue;
        }
        let len = len as usize;
        if tail.len() < len {
            return Err(malformed("column longer than the message"));
        }
        columns.push(Some(String::from_utf8_lossy(&tail[..len]).into_owned()));
        rest = &tail[len..];
    }
    Ok(columns)
}

/// Reads the column names of a RowDescription body.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<String>, WireError> {
    let malformed = |what| WireError::Malformed {
        tag: char::from(ROW_DESCRIPTION),
        what,
    };
    let (count, mut rest) = split_be::<2>(body).ok_or_else(|| malformed("no field count"))?;
    let count = u16::from_be_bytes(count);
    let mut names = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| malformed("unterminated field name"))?;
        names.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        // Name, then table oid (4), column number (2), type oid (4), size (2), modifier (4), format (2).
        const FIELD_TAIL: usize = 18;
        rest = rest
            .get(end + 1 + FIELD_TAIL..)
            .ok_or_else(|| malformed("field description cut short"))?;
    }
    Ok(names)
}

fn split_be<const N: usize>(buf: &[u8]) -> Option<([u8; N], &[u8])> {
    let head = buf.get(..N)?;
    let mut array = [0u8; N];
    array.copy_from_slice(head);
    Some((array, &buf[N..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn takes_frames_only_when_complete() {
        let bytes = frame(COPY_DATA, b"hello");
        let mut buf = BytesMut::from(&bytes[..6]);
        assert_eq!(take_frame(&mut buf, MAX_FRAME_LEN).unwrap(), None);
        buf.extend_from_slice(&bytes[6..]);
        buf.extend_from_slice(&frame(COPY_DONE, b""));
        let first = take_frame(&mut buf, MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!((first.tag, &first.body[..]), (COPY_DATA, &b"hello"[..]));
        let second = take_frame(&mut buf, MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!((second.tag, second.body.len()), (COPY_DONE, 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_impossible_lengths() {
        let mut buf = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(take_frame(&mut buf, MAX_FRAME_LEN).is_err());
        let mut buf = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(take_frame(&mut buf, MAX_FRAME_LEN).is_err());
    }

    #[test]
    fn refuses_a_frame_over_the_limit_without_reserving_for_it() {
        // An authentication request claiming 1 GiB, before authentication.
        let mut buf = BytesMut::from(&[b'R', 0x40, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(
            take_frame(&mut buf, MAX_PRE_AUTH_FRAME_LEN),
            Err(WireError::TooLong {
                tag: 'R',
                len: 1 << 30,
                max: MAX_PRE_AUTH_FRAME_LEN
            })
        );
        assert!(
            buf.capacity() < MAX_PRE_AUTH_FRAME_LEN,
            "{}",
            buf.capacity()
        );
        // A frame of exactly the limit passes.
        let body = vec![0; MAX_PRE_AUTH_FRAME_LEN - 4];
        let mut buf = BytesMut::from(&frame(b'E', &body)[..]);
        assert!(take_frame(&mut buf, MAX_PRE_AUTH_FRAME_LEN)
            .unwrap()
            .is_some());
    }

    #[test]
    fn parses_error_fields() {
        let body = b"SERROR\0VERROR\0C42501\0Mpermission denied\0Hgrant it\0\0";
        let msg = parse_server_message(ERROR_RESPONSE, body).unwrap();
        assert_eq!(msg.code, "42501");
        assert_eq!(msg.severity, "ERROR");
        assert_eq!(msg.hint.as_deref(), Some("grant it"));
        assert!(parse_server_message(ERROR_RESPONSE, b"Mno end").is_err());
    }

    #[test]
    fn parses_data_rows_with_nulls() {
        let mut body = 2u16.to_be_bytes().to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let row = parse_data_row(&body).unwrap();
        assert_eq!(row, vec![Some("abc".to_owned()), None]);
        assert!(parse_data_row(&body[..5]).is_err());
    }

    #[test]
    fn parses_row_descriptions() {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"systemid\0");
        body.extend_from_slice(&[0u8; 18]);
        assert_eq!(parse_row_description(&body).unwrap(), vec!["systemid"]);
        assert!(parse_row_description(&body[..12]).is_err());
    }
}
