//! Spill files: the changes of transactions too large to hold in memory until they commit.
//!
//! A transaction's changes are only usable once it commits, and a streamed one can run for
//! millions of rows before it does. Past the assembler's memory limit its pgoutput payloads go
//! to a file, as they came, and are decoded again on the way out; PostgreSQL's apply worker
//! does the same with its own spool files. The file is unlinked as soon as it is created, so
//! nothing is left behind by a crash, and it goes to the system's temporary directory
//! (`TMPDIR`).
//!
//! **Other users of the machine.** The payloads are users' rows, so the file is created
//! readable and writable by its owner only (mode 0600), under a name of 128 random bits, with
//! `O_CREAT | O_EXCL` (which never follows a symbolic link). A shared `/tmp` lets anyone
//! create files: were the names guessable, a file or link planted at the next name would stop
//! replication, so a name that is taken is simply skipped for a fresh one.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::pgoutput::{LogicalMessage, PgOutputDecoder};
use super::DecodeError;

/// Buffer of the file's reader and writer.
const BUFFER: usize = 256 * 1024;

/// Fresh names tried before giving up. Random names do not collide by chance: a name taken
/// means files planted on purpose, and a few more tries outlast any such guess.
const CREATE_ATTEMPTS: usize = 8;

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
    /// A new, private, already unlinked file in the system's temporary directory.
    pub fn create(in_stream: bool) -> Result<Self, DecodeError> {
        Self::create_in(&std::env::temp_dir(), random_name, in_stream)
    }

    /// A new file in `dir` under the first of `names` not taken.
    fn create_in(
        dir: &Path,
        mut names: impl FnMut() -> Result<String, DecodeError>,
        in_stream: bool,
    ) -> Result<Self, DecodeError> {
        let mut attempt = 0;
        let (file, path) = loop {
            let path = dir.join(names()?);
            match create_private(&path) {
                Ok(file) => break (file, path),
                Err(error)
                    if error.kind() == std::io::ErrorKind::AlreadyExists
                        && attempt + 1 < CREATE_ATTEMPTS =>
                {
                    attempt += 1;
                    tracing::warn!(path = %path.display(), "a spill file name was taken; trying another");
                }
                Err(error) => return Err(spill_error("creating", &path, &error)),
            }
        };
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
            full: false,
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

/// `usersync-spill-` and 128 random bits in hex: not guessable by another user.
fn random_name() -> Result<String, DecodeError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DecodeError::Spill {
            action: "creating",
            reason: "the system's random number generator failed to name a spill file".into(),
            full: false,
        })?;
    let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!("usersync-spill-{hex}"))
}

/// Creates `path`, which must not exist (not even as a symbolic link), readable and writable
/// by its owner only.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut options = File::options();
    options.read(true).write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
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
        full: matches!(
            error.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_worth_a_retry_and_a_denied_one_is_not() {
        let path = std::path::Path::new("/tmp/usersync-spill-x");
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let full: crate::Error = spill_error("writing", path, &full).into();
        let denied: crate::Error = spill_error("creating", path, &denied).into();
        assert!(full.is_transient(), "{full}");
        assert!(!denied.is_transient(), "{denied}");
        assert_eq!(denied.exit_code(), crate::error::EXIT_DEFINITE);
    }

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

    #[cfg(unix)]
    #[test]
    fn spill_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let file = SpillFile::create(false).unwrap();
        let mode = file
            .writer
            .get_ref()
            .metadata()
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }

    /// Another local user who can guess the names could plant files at them to stop
    /// replication; with names derived from the pid and a counter they could.
    #[test]
    fn files_planted_at_guessable_names_do_not_stop_spilling() {
        let dir = std::env::temp_dir();
        let planted: Vec<PathBuf> = (0..200)
            .map(|n| dir.join(format!("usersync-spill-{}-{n}", std::process::id())))
            .filter(|path| {
                File::options()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .is_ok()
            })
            .collect();
        let created = SpillFile::create(false);
        for path in &planted {
            let _ = std::fs::remove_file(path);
        }
        created.expect("a spill file despite the planted ones");
    }

    #[test]
    fn names_are_random() {
        let (a, b) = (random_name().unwrap(), random_name().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("usersync-spill-") && a.len() == "usersync-spill-".len() + 32);
    }

    /// A scratch directory of the test's own.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "usersync-spill-test-{name}-{}",
            random_name().unwrap()
        ));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// Names handed out in order, as a planted-file scenario needs them.
    fn names_in_order(names: &[&str]) -> impl FnMut() -> Result<String, DecodeError> {
        let mut names: Vec<String> = names.iter().rev().map(|name| (*name).to_owned()).collect();
        move || Ok(names.pop().expect("no more names"))
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_file_or_symlink_is_skipped_and_left_alone() {
        let dir = scratch_dir("planted");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::write(dir.join("taken-by-file"), b"planted").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("taken-by-link")).unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("taken-by-dangling-link"))
            .unwrap();

        let names = names_in_order(&[
            "taken-by-file",
            "taken-by-link",
            "taken-by-dangling-link",
            "free",
        ]);
        let mut file = SpillFile::create_in(&dir, names, false).unwrap();
        assert_eq!(file.path, dir.join("free"));
        assert!(!file.path.exists(), "unlinked at once");
        file.append(&insert_payload("a")).unwrap();
        assert_eq!(ids(file.into_changes().unwrap()), ["a"]);

        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(dir.join("taken-by-file")).unwrap(),
            b"planted"
        );
        assert!(
            !dir.join("nowhere").exists(),
            "a dangling link is not followed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gives_up_with_the_reason_when_every_name_is_taken() {
        let dir = scratch_dir("taken");
        std::fs::write(dir.join("taken"), b"").unwrap();
        let error = SpillFile::create_in(&dir, || Ok("taken".to_owned()), false).unwrap_err();
        assert!(error.to_string().contains("exists"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
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
