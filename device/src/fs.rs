//! Files a power cut must not tear: written to a temporary file next to the target, fsynced,
//! renamed over it, and the directory fsynced, so a reader finds the old or the new contents,
//! never a mix (on FAT as far as FAT allows). Records are JSON.

use serde::{de::DeserializeOwned, Serialize};
use std::io::Write as _;
use std::path::Path;

fn context(e: std::io::Error, what: String) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Replaces `path` with `data` in one step.
pub fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| context(e, format!("writing {}", tmp.display())))?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(|e| context(e, format!("writing {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| context(e, format!("renaming {} to {}", tmp.display(), path.display())))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| context(e, format!("syncing {}", dir.display())))
}

/// Why [`read_regular`] refused a file.
#[derive(Debug)]
pub enum ReadError {
    /// The path is a symbolic link (it is not followed).
    Link,
    /// Not a regular file (a directory, a FIFO, a device).
    NotRegular,
    /// Bigger than the caller's limit (the file's size).
    TooBig(u64),
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Link => write!(f, "a symbolic link, not a regular file"),
            ReadError::NotRegular => write!(f, "not a regular file"),
            ReadError::TooBig(n) => write!(f, "{n} bytes, too big"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The contents of `path` if it is a regular file of at most `max` bytes, opened without
/// following a link and without blocking on a FIFO (provisioned files come from a medium
/// anybody could have written).
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => ReadError::Link,
            _ => ReadError::Io(e),
        })?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > max {
        return Err(ReadError::TooBig(meta.len()));
    }
    let mut data = Vec::new();
    f.take(max + 1).read_to_end(&mut data).map_err(ReadError::Io)?;
    if data.len() as u64 > max {
        return Err(ReadError::TooBig(data.len() as u64));
    }
    Ok(data)
}

/// Writes a record as pretty JSON, in one step.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    text.push(b'\n');
    write_atomically(path, &text)
}

/// Reads a JSON record; `Ok(None)` when there is none yet. Errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// A sha256 given as 64 hex digits.
pub fn parse_sha256(hex: &str) -> Result<[u8; 32], String> {
    ::hex::decode(hex)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| format!("{hex:?} is not a sha256 (64 hex digits)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_regular_refuses_links_others_and_big_files() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"hello");
        assert!(matches!(read_regular(&f, 4), Err(ReadError::TooBig(5))));
        std::os::unix::fs::symlink(&f, t.path().join("l")).unwrap();
        assert!(matches!(read_regular(&t.path().join("l"), 5), Err(ReadError::Link)));
        assert!(matches!(read_regular(t.path(), 5), Err(ReadError::NotRegular)));
        nix::unistd::mkfifo(&t.path().join("p"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(read_regular(&t.path().join("p"), 5), Err(ReadError::NotRegular)));
        assert!(matches!(read_regular(&t.path().join("none"), 5), Err(ReadError::Io(_))));
    }

    #[test]
    fn records_round_trip_and_replace_in_one_step() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("status.json");
        assert_eq!(read_json::<Vec<u32>>(&p).unwrap(), None);
        write_json(&p, &vec![1u32, 2]).unwrap();
        write_json(&p, &vec![3u32]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&p).unwrap(), Some(vec![3]));
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["status.json"], "no temporary file is left behind");
        std::fs::write(&p, "{").unwrap();
        assert!(read_json::<Vec<u32>>(&p).unwrap_err().contains("status.json"));
        let e = write_atomically(&t.path().join("missing/x"), b"x").unwrap_err();
        assert!(e.to_string().contains("missing/.x.tmp"), "{e}");
    }

    #[test]
    fn hashes_parse() {
        let h = "ab".repeat(32);
        assert_eq!(parse_sha256(&h).unwrap(), [0xab; 32]);
        assert!(parse_sha256("ab").unwrap_err().contains("64 hex digits"));
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
    }
}

/// A writer that only records what is written where (absolute seeks only): to compare a table
/// writer's output with a disk, apply it in order with barriers, or cut it anywhere in a test.
#[derive(Debug, Default)]
pub struct WriteLog {
    pos: u64,
    /// (byte offset, bytes), in the order written.
    pub writes: Vec<(u64, Vec<u8>)>,
}

impl std::io::Write for WriteLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writes.push((self.pos, buf.to_vec()));
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::io::Seek for WriteLog {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        match to {
            std::io::SeekFrom::Start(p) => self.pos = p,
            _ => return Err(std::io::Error::other("only absolute seeks are recorded")),
        }
        Ok(self.pos)
    }
}
