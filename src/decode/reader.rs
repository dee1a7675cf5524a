//! A checked cursor over one message: every read says what it was reading, so a short or
//! malformed message becomes a [`DecodeError`] naming the field instead of a panic.

use bytes::{Buf, Bytes};

use super::DecodeError;
use crate::lsn::Lsn;

/// Reads big-endian fields from the front of a message; slices stay views of the input.
pub(super) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// Bytes not read yet; used to bound allocations sized by counts from the wire.
    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, what: &'static str, needed: usize) -> Result<(), DecodeError> {
        if self.buf.len() < needed {
            return Err(DecodeError::Truncated {
                what,
                needed,
                available: self.buf.len(),
            });
        }
        Ok(())
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(what, 1)?;
        Ok(self.buf.get_u8())
    }

    pub(super) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(what, 2)?;
        Ok(self.buf.get_i16())
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_i32())
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(what, 4)?;
        Ok(self.buf.get_u32())
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_i64())
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(what, 8)?;
        Ok(self.buf.get_u64())
    }

    /// An `XLogRecPtr`: a WAL position as a big-endian 64-bit integer.
    pub(super) fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.u64(what).map(Lsn)
    }

    /// A NUL-terminated string; the NUL is consumed and not part of the result.
    pub(super) fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self
            .buf
            .iter()
            .position(|&byte| byte == 0)
            .ok_or(DecodeError::MissingNul { what })?;
        // `len` is the index of a NUL inside the buffer, so `..len` and `len + 1` are in bounds.
        let text = std::str::from_utf8(&self.buf[..len])
            .map_err(|source| DecodeError::InvalidUtf8 { what, source })?
            .to_owned();
        self.buf.advance(len + 1);
        Ok(text)
    }

    /// The next `len` bytes, as a view of the input rather than a copy.
    pub(super) fn bytes(&mut self, what: &'static str, len: usize) -> Result<Bytes, DecodeError> {
        self.need(what, len)?;
        Ok(self.buf.split_to(len))
    }

    /// An `Int32` length followed by that many bytes.
    pub(super) fn length_prefixed(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let length = self.i32(what)?;
        let len =
            usize::try_from(length).map_err(|_| DecodeError::NegativeLength { what, length })?;
        self.bytes(what, len)
    }

    /// Everything not read yet: for payloads that by definition run to the end of the message.
    pub(super) fn rest(self) -> Bytes {
        self.buf
    }

    /// Checks that the message `what` was read completely.
    pub(super) fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what,
                count: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(bytes: &[u8]) -> Reader {
        Reader::new(Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn reads_big_endian_integers_in_order() {
        let mut r = reader(&[
            0xAB, // u8
            0xFF, 0xFE, // i16 -2
            0xFF, 0xFF, 0xFF, 0xFD, // i32 -3
            0x80, 0x00, 0x00, 0x01, // u32
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFC, // i64 -4
            0x00, 0x00, 0x00, 0x16, 0xB3, 0x74, 0xD8, 0x48, // u64 as LSN
        ]);
        assert_eq!(r.u8("a").unwrap(), 0xAB);
        assert_eq!(r.i16("b").unwrap(), -2);
        assert_eq!(r.i32("c").unwrap(), -3);
        assert_eq!(r.u32("d").unwrap(), 0x8000_0001);
        assert_eq!(r.i64("e").unwrap(), -4);
        assert_eq!(r.lsn("f").unwrap(), Lsn(0x16_B374_D848));
        r.finish("all").unwrap();
    }

    #[test]
    fn short_reads_name_the_field_and_the_lengths() {
        let mut r = reader(&[1, 2, 3]);
        assert_eq!(
            r.u64("commit LSN"),
            Err(DecodeError::Truncated {
                what: "commit LSN",
                needed: 8,
                available: 3
            })
        );
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
        assert!(r.i32("x").is_err());
        assert!(r.u32("x").is_err());
        assert!(r.i64("x").is_err());
        assert_eq!(r.i16("x").unwrap(), 0x0102);
        assert_eq!(r.u8("x").unwrap(), 3);
        assert!(matches!(
            r.u8("tag"),
            Err(DecodeError::Truncated {
                needed: 1,
                available: 0,
                ..
            })
        ));
    }

    #[test]
    fn strings_are_nul_terminated_utf8() {
        let mut r = reader(b"public\0\0caf\xC3\xA9\0rest");
        assert_eq!(r.string("namespace").unwrap(), "public");
        assert_eq!(r.string("empty").unwrap(), "");
        assert_eq!(r.string("name").unwrap(), "café");
        assert_eq!(
            r.string("prefix"),
            Err(DecodeError::MissingNul { what: "prefix" })
        );
        assert_eq!(r.remaining(), 4);
        assert!(matches!(
            reader(b"\xFF\0").string("name"),
            Err(DecodeError::InvalidUtf8 { what: "name", .. })
        ));
    }

    #[test]
    fn byte_slices_are_views_of_the_input() {
        let input = Bytes::from_static(b"\x00\x00\x00\x03abcdef");
        let mut r = Reader::new(input.clone());
        let value = r.length_prefixed("value").unwrap();
        assert_eq!(&value[..], b"abc");
        assert_eq!(value.as_ptr(), input[4..].as_ptr());
        assert_eq!(
            r.bytes("more", 4),
            Err(DecodeError::Truncated {
                what: "more",
                needed: 4,
                available: 3
            })
        );
        assert_eq!(
            r.finish("message"),
            Err(DecodeError::TrailingBytes {
                what: "message",
                count: 3
            })
        );
    }

    #[test]
    fn negative_lengths_are_rejected() {
        assert_eq!(
            reader(&[0xFF, 0xFF, 0xFF, 0xFF]).length_prefixed("value"),
            Err(DecodeError::NegativeLength {
                what: "value",
                length: -1
            })
        );
    }

    #[test]
    fn rest_returns_the_unread_tail() {
        let mut r = reader(b"wpayload");
        r.u8("tag").unwrap();
        assert_eq!(&r.rest()[..], b"payload");
    }
}
