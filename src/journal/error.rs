//! [`JournalError`]: what opening, writing or syncing a journal fails with.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why the journal could not open, record a write, or make it durable.
///
/// Each variant's message says what to do about it.
///
/// # Examples
/// ```
/// use writebehind::journal::JournalError;
///
/// let e = JournalError::Locked { dir: "/var/lib/app/wb".into() };
/// assert!(e.to_string().contains("another cache holds the journal directory"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum JournalError {
    /// Another journal holds the directory (in this process or another one).
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// A segment is damaged somewhere other than its unsynced tail.
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the first damaged header or record.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A file system call failed (disk full, read-only file system, I/O error).
    Io {
        /// What the journal was doing.
        op: &'static str,
        /// The file or directory it was doing it to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A key or value codec failed or panicked.
    Codec {
        /// What was being encoded or decoded ("encoding a key", "decoding a value", ...).
        what: &'static str,
        /// The segment a decoded record came from (`None` when encoding).
        file: Option<PathBuf>,
        /// The record's offset in `file`.
        offset: Option<u64>,
        /// The codec's error or panic message.
        message: String,
    },
    /// One record is larger than the format can frame (4 GiB).
    RecordTooLarge {
        /// Encoded key plus value bytes.
        bytes: u64,
    },
}

impl JournalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JournalError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// `true` for a full disk or quota (`ENOSPC`, `EDQUOT`): freeing space fixes it.
    pub fn is_disk_full(&self) -> bool {
        match self {
            JournalError::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
            }
            _ => false,
        }
    }
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Locked { dir } => write!(
                f,
                "another cache holds the journal directory {}: stop it, or give this cache a \
                 directory of its own",
                dir.display()
            ),
            JournalError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "journal segment {} is damaged at byte {offset}: {reason}; keep a copy of the \
                 directory, then open it with `Journal::salvage(true)` to replay what is readable",
                file.display()
            ),
            JournalError::Io { op, path, source } => {
                write!(f, "journal: {op} {} failed: {source}", path.display())?;
                if self.is_disk_full() {
                    write!(
                        f,
                        "; free space on that file system, writes resume when it has room"
                    )?;
                }
                Ok(())
            }
            JournalError::Codec {
                what,
                file,
                offset,
                message,
            } => {
                write!(f, "journal codec failed {what}: {message}")?;
                if let (Some(file), Some(offset)) = (file, offset) {
                    write!(
                        f,
                        " (record at byte {offset} of {}); the codec must read back what it \
                         wrote: fix it, or open with `Journal::salvage(true)` to skip such keys",
                        file.display()
                    )?;
                }
                Ok(())
            }
            JournalError::RecordTooLarge { bytes } => write!(
                f,
                "a journal record of {bytes} bytes is larger than the format allows (4 GiB): \
                 store smaller values"
            ),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JournalError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
