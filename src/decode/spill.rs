//! Spill files: the changes of transactions too large to hold in memory until they commit.
//!
//! A transaction's changes are only usable once it commits, and a streamed one can run for
//! millions of rows before it does. Past the assembler's memory limit its pgoutput payloads go
//! to a file, as they came, and are decoded again on the way out; PostgreSQL's apply worker
//! does the same with its own spool files. The file is unlinked as soon as it is created, so
//! nothing is left behind by a crash, and it goes to the system's temporary directory
//! (`TMPDIR`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::pgoutput::{LogicalMessage, PgOutputDecoder};
use super::DecodeError;

/// Buffer of the file's reader and writer.
const BUFFER: usize = 256 * 1024;

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// Where payloads are appended, each as a 4-byte big-endian length and the payload.
#[derive(Debug)]
pub struct SpillFile {
    writer: BufWriter<File>,
    path: PathBuf,
    /// Bytes written, buffered ones included: where the next record starts.
    end: u64,
    count: usize,
    /// Whether the payloads came inside stream blocks (their changes carry an xid).
    in_stream: bool,
}

impl SpillFile {
    pub fn create(in_stream: bool) -> Result<Self, DecodeError> {
        let path = std::env::temp_dir().join(format!(
            "usersync-spill-{}-{}",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| spill_error("creating", &path, &error))?;
        std::fs::remove_file(&path).map_err(|error| spill_error("unlinking", &path, &error))?;
        Ok(SpillFile {
            writer: BufWriter::with_capacity(BUFFER, file),
            path,
            end: 0,
            count: 0,
            in_stream,
        })
    }

    /// Where the next payload will start: a mark to [`truncate`](Self::truncate) back to.
    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn append(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        let length = u32::try_from(payload.len()).map_err(|_| DecodeError::Spill {
            action: "writing",
            reason: format!("a message of {} bytes is too large", payload.len()),
        })?;
        self.writer
            .write_all(&length.to_be_bytes())
            .and_then(|()| self.writer.write_all(payload))
            .map_err(|error| spill_error("writing", &self.path, &error))?;
        self.end += 4 + u64::from(length);
        self.count += 1;
        Ok(())
    }

    /// Drops everything from `end` on, which then holds `count` payloads.
    pub fn truncate(&mut self, end: u64, count: usize) -> Result<(), DecodeError> {
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().set_len(end))
            .and_then(|()| self.writer.seek(SeekFrom::Start(end)).map(drop))
            .map_err(|error| spill_error("truncating", &self.path, &error))?;
        self.end = end;
        self.count = count;
        Ok(())
    }

    /// Reads the payloads back, in order, decoded.
    pub fn into_changes(self) -> Result<SpilledChanges, DecodeError> {
        let path = self.path.clone();
        let mut file = self
            .writer
            .into_inner()
            .map_err(|error| spill_error("writing", &path, error.error()))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|error| spill_error("reading", &path, &error))?;
        Ok(SpilledChanges {
            reader: BufReader::with_capacity(BUFFER, file),
            path,
            remaining: self.count,
            in_stream: self.in_stream,
        })
    }
}

/// The changes of a spilled transaction, decoded one at a time as they are read.
#[derive(Debug)]
pub struct SpilledChanges {
    reader: BufReader<File>,
    path: PathBuf,
    remaining: usize,
    in_stream: bool,
}

impl SpilledChanges {
    pub fn len(&self) -> usize {
        self.remaining
    }

    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    fn read_next(&mut self) -> Result<LogicalMessage, DecodeError> {
        let mut length = [0; 4];
        self.reader
            .read_exact(&mut length)
            .map_err(|error| spill_error("reading", &self.path, &error))?;
        let mut payload = vec![0; u32::from_be_bytes(length) as usize];
        self.reader
            .read_exact(&mut payload)
            .map_err(|error| spill_error("reading", &self.path, &error))?;
        PgOutputDecoder::decode_spilled(Bytes::from(payload), self.in_stream)
    }
}

impl Iterator for SpilledChanges {
    type Item = Result<LogicalMessage, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let next = self.read_next();
        if next.is_err() {
            self.remaining = 0;
        }
        Some(next)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// Spill files are compared by identity: two are never the same changes.
impl PartialEq for SpilledChanges {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for SpilledChanges {}

fn spill_error(
    action: &'static str,
    path: &std::path::Path,
    error: &std::io::Error,
) -> DecodeError {
    DecodeError::Spill {
        action,
        reason: format!(
            "{}: {error}; large transactions are spilled to TMPDIR: make sure it exists, is \
             writable and has room, or point it at another disk",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_payload(id: &str) -> Vec<u8> {
        // 'I', relation 16384, 'N', one text column.
        let mut payload = vec![b'I'];
        payload.extend_from_slice(&16_384u32.to_be_bytes());
        payload.push(b'N');
        payload.extend_from_slice(&1u16.to_be_bytes());
        payload.push(b't');
        payload.extend_from_slice(&(id.len() as u32).to_be_bytes());
        payload.extend_from_slice(id.as_bytes());
        payload
    }

    fn ids(changes: SpilledChanges) -> Vec<String> {
        changes
            .map(|change| match change.unwrap() {
                LogicalMessage::Insert(insert) => match &insert.new.0[0] {
                    crate::decode::ColumnValue::Text(text) => {
                        String::from_utf8(text.to_vec()).unwrap()
                    }
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn payloads_come_back_decoded_in_order() {
        let mut file = SpillFile::create(false).unwrap();
        for id in ["a", "b", "c"] {
            file.append(&insert_payload(id)).unwrap();
        }
        assert_eq!(file.len(), 3);
        assert_eq!(ids(file.into_changes().unwrap()), ["a", "b", "c"]);
    }

    #[test]
    fn truncate_drops_what_came_after_the_mark() {
        let mut file = SpillFile::create(false).unwrap();
        file.append(&insert_payload("a")).unwrap();
        let (mark, count) = (file.end(), file.len());
        file.append(&insert_payload("b")).unwrap();
        file.append(&insert_payload("c")).unwrap();
        file.truncate(mark, count).unwrap();
        file.append(&insert_payload("d")).unwrap();
        assert_eq!(ids(file.into_changes().unwrap()), ["a", "d"]);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_panic() {
        let mut file = SpillFile::create(false).unwrap();
        file.append(b"?").unwrap();
        let mut changes = file.into_changes().unwrap();
        assert!(changes.next().unwrap().is_err());
        assert!(changes.next().is_none());
    }
}
