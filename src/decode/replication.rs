//! The CopyData payloads of the [streaming replication protocol], which carry pgoutput
//! messages one level down: XLogData and Primary Keepalive from the server, Standby Status
//! Update from the client.
//!
//! [streaming replication protocol]: https://www.postgresql.org/docs/15/protocol-replication.html

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::Reader;
use super::DecodeError;
use crate::lsn::Lsn;

/// XLogData: WAL data, here one pgoutput message.
const XLOG_DATA: u8 = b'w';
/// Primary keepalive message.
const PRIMARY_KEEPALIVE: u8 = b'k';
/// Standby status update, sent by the client.
const STANDBY_STATUS_UPDATE: u8 = b'r';
/// Tag, three LSNs, a timestamp and the reply flag: 1 + 4 × 8 + 1.
const STANDBY_STATUS_UPDATE_LEN: usize = 34;

/// Unix time of the PostgreSQL epoch, 2000-01-01 00:00:00 UTC, in microseconds.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A message from the server inside the CopyBoth stream of `START_REPLICATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data; for a logical slot `data` is exactly one pgoutput message.
    XLogData {
        /// Start of the WAL that `data` was decoded from.
        wal_start: Lsn,
        /// Documented as the server's current end of WAL. Not a position to confirm: only
        /// commit end LSNs that the target has made durable are.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since the PostgreSQL epoch.
        server_time_micros: i64,
        data: Bytes,
    },
    /// The server is alive; if `reply_requested`, answer now or be disconnected by
    /// `wal_sender_timeout`.
    PrimaryKeepalive {
        /// The end of WAL on the server; confirmable when nothing is pending.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since the PostgreSQL epoch.
        server_time_micros: i64,
        reply_requested: bool,
    },
}

/// Decodes one CopyData payload received on a replication connection.
pub fn decode_replication_message(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let mut reader = Reader::new(buf);
    match reader.u8("replication message tag")? {
        XLOG_DATA => Ok(ReplicationMessage::XLogData {
            wal_start: reader.lsn("XLogData WAL start")?,
            wal_end: reader.lsn("XLogData WAL end")?,
            server_time_micros: reader.i64("XLogData server time")?,
            data: reader.rest(),
        }),
        PRIMARY_KEEPALIVE => {
            let message = ReplicationMessage::PrimaryKeepalive {
                wal_end: reader.lsn("keepalive WAL end")?,
                server_time_micros: reader.i64("keepalive server time")?,
                reply_requested: reader.u8("keepalive reply flag")? != 0,
            };
            reader.finish("keepalive")?;
            Ok(message)
        }
        tag => Err(DecodeError::UnknownTag {
            context: "replication message",
            tag,
        }),
    }
}

/// Builds the CopyData payload of a Standby Status Update.
///
/// The positions are passed through as given: the protocol wants "last byte + 1", which is
/// what a commit's end LSN already is, so callers confirm `end_lsn` values (or a keepalive's
/// `wal_end`) without adjusting them. `flushed` is what the server may discard WAL up to.
pub fn encode_standby_status_update(
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    client_time_micros: i64,
    reply_requested: bool,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(STANDBY_STATUS_UPDATE_LEN);
    buf.put_u8(STANDBY_STATUS_UPDATE);
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(applied.0);
    buf.put_i64(client_time_micros);
    buf.put_u8(u8::from(reply_requested));
    buf.freeze()
}

/// Converts a wire time to Unix microseconds. Saturates, because PostgreSQL encodes the
/// timestamps `infinity` and `-infinity` as the extreme `i64` values.
pub fn pg_micros_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)
}

/// Converts Unix microseconds to a wire time, saturating like [`pg_micros_to_unix_micros`].
pub fn unix_micros_to_pg_micros(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_UNIX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xlog_data(payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(XLOG_DATA);
        buf.put_u64(0x16_0000_0010);
        buf.put_u64(0x16_0000_0020);
        buf.put_i64(777);
        buf.put_slice(payload);
        buf.freeze()
    }

    fn keepalive(reply: u8) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(PRIMARY_KEEPALIVE);
        buf.put_u64(0x2A);
        buf.put_i64(-5);
        buf.put_u8(reply);
        buf.freeze()
    }

    #[test]
    fn decodes_xlog_data_with_its_payload_as_a_view() {
        let input = xlog_data(b"B...");
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            server_time_micros,
            data,
        } = decode_replication_message(input.clone()).unwrap()
        else {
            panic!("not XLogData");
        };
        assert_eq!(wal_start, Lsn(0x16_0000_0010));
        assert_eq!(wal_end, Lsn(0x16_0000_0020));
        assert_eq!(server_time_micros, 777);
        assert_eq!(&data[..], b"B...");
        assert_eq!(data.as_ptr(), input[25..].as_ptr());
    }

    #[test]
    fn decodes_xlog_data_with_an_empty_payload() {
        assert!(matches!(
            decode_replication_message(xlog_data(b"")),
            Ok(ReplicationMessage::XLogData { data, .. }) if data.is_empty()
        ));
    }

    #[test]
    fn decodes_keepalives() {
        assert_eq!(
            decode_replication_message(keepalive(1)).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                wal_end: Lsn(0x2A),
                server_time_micros: -5,
                reply_requested: true,
            }
        );
        assert!(matches!(
            decode_replication_message(keepalive(0)),
            Ok(ReplicationMessage::PrimaryKeepalive {
                reply_requested: false,
                ..
            })
        ));
    }

    #[test]
    fn every_truncated_message_is_an_error() {
        for whole in [xlog_data(b""), keepalive(1)] {
            for len in 0..whole.len() {
                let result = decode_replication_message(whole.slice(..len));
                assert!(
                    matches!(result, Err(DecodeError::Truncated { .. })),
                    "prefix of {len} bytes: {result:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_trailing_bytes_after_a_keepalive() {
        let mut buf = BytesMut::from(&keepalive(0)[..]);
        buf.put_u8(0);
        assert_eq!(
            decode_replication_message(buf.freeze()),
            Err(DecodeError::TrailingBytes {
                what: "keepalive",
                count: 1
            })
        );
    }

    #[test]
    fn rejects_unknown_tags() {
        assert_eq!(
            decode_replication_message(Bytes::from_static(b"r")),
            Err(DecodeError::UnknownTag {
                context: "replication message",
                tag: b'r'
            })
        );
    }

    #[test]
    fn standby_status_update_has_the_documented_layout() {
        let buf = encode_standby_status_update(
            Lsn(0x0102_0304_0506_0708),
            Lsn(0x1112_1314_1516_1718),
            Lsn(0x2122_2324_2526_2728),
            -2,
            true,
        );
        let mut expected = vec![b'r'];
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        expected.extend_from_slice(&[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]);
        expected.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE]);
        expected.push(1);
        assert_eq!(buf.len(), 34);
        assert_eq!(&buf[..], &expected[..]);

        let quiet = encode_standby_status_update(Lsn::ZERO, Lsn::ZERO, Lsn::ZERO, 0, false);
        assert_eq!(quiet.len(), 34);
        assert_eq!(quiet[33], 0);
    }

    #[test]
    fn converts_between_the_postgres_and_unix_epochs() {
        // 2000-01-01 00:00:00 UTC is zero on the wire.
        assert_eq!(pg_micros_to_unix_micros(0), 946_684_800_000_000);
        assert_eq!(unix_micros_to_pg_micros(946_684_800_000_000), 0);
        // 2024-01-01 00:00:00 UTC.
        let unix = 1_704_067_200_000_000;
        assert_eq!(
            pg_micros_to_unix_micros(unix_micros_to_pg_micros(unix)),
            unix
        );
        // `infinity` and `-infinity` stay at the extremes instead of overflowing.
        assert_eq!(pg_micros_to_unix_micros(i64::MAX), i64::MAX);
        assert_eq!(unix_micros_to_pg_micros(i64::MIN), i64::MIN);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_replication_message(Bytes::from(bytes));
        }

        #[test]
        fn tagged_arbitrary_bodies_never_panic(
            tag in prop_oneof![Just(XLOG_DATA), Just(PRIMARY_KEEPALIVE)],
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut buf = vec![tag];
            buf.extend_from_slice(&body);
            let _ = decode_replication_message(Bytes::from(buf));
        }
    }
}
