//! The "newc" cpio format (SVR4 without checksums) that the kernel unpacks an initramfs from,
//! written deterministically: entries in the order given, inode numbers counted from 1, owner
//! root, one fixed mtime.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

impl Node {
    fn mode(&self) -> u32 {
        match self {
            Node::Dir { mode } => S_IFDIR | (mode & 0o7777),
            Node::File { mode, .. } => S_IFREG | (mode & 0o7777),
            Node::Symlink { .. } => S_IFLNK | 0o777,
            Node::CharDevice { mode, .. } => S_IFCHR | (mode & 0o7777),
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Node::File { data, .. } => data,
            Node::Symlink { target } => target.as_bytes(),
            _ => &[],
        }
    }
}

/// Writes `entries` (paths relative to the archive root, without a leading `/`) and the
/// trailer. Parents must come before their children; the caller sorts.
pub fn write<'a, W: Write>(
    out: &mut W,
    entries: impl IntoIterator<Item = (&'a str, &'a Node)>,
    mtime: u32,
) -> io::Result<()> {
    let mut written = 0u64;
    for (i, (name, node)) in entries.into_iter().enumerate() {
        let (rdev_major, rdev_minor) = match node {
            Node::CharDevice { major, minor, .. } => (*major, *minor),
            _ => (0, 0),
        };
        let nlink = if matches!(node, Node::Dir { .. }) { 2 } else { 1 };
        let ino = u32::try_from(i + 1).map_err(|_| io::Error::other("too many cpio entries"))?;
        written += header(out, name, ino, node.mode(), nlink, mtime, node.data(), (rdev_major, rdev_minor))?;
    }
    written += header(out, "TRAILER!!!", 0, 0, 1, 0, &[], (0, 0))?;
    // The kernel reads the archive in 512-byte blocks, as cpio(1) writes it.
    let pad = (512 - written % 512) % 512;
    out.write_all(&vec![0u8; pad as usize])?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn header<W: Write>(
    out: &mut W,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> io::Result<u64> {
    let size = u32::try_from(data.len())
        .map_err(|_| io::Error::other(format!("{name} is too large for a newc cpio archive (4 GiB)")))?;
    let namesize = name.len() as u32 + 1;
    let fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev.0, rdev.1, namesize, 0];
    let mut h = String::with_capacity(110);
    h.push_str("070701");
    for f in fields {
        h.push_str(&format!("{f:08x}"));
    }
    out.write_all(h.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let name_end = 110 + namesize as u64;
    let name_pad = (4 - name_end % 4) % 4;
    out.write_all(&[0u8; 3][..name_pad as usize])?;
    out.write_all(data)?;
    let data_pad = (4 - data.len() as u64 % 4) % 4;
    out.write_all(&[0u8; 3][..data_pad as usize])?;
    Ok(name_end + name_pad + data.len() as u64 + data_pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_matches_newc() {
        let mut out = Vec::new();
        let file = Node::File { mode: 0o644, data: b"hi".to_vec() };
        write(&mut out, [("a", &file)], 7).unwrap();
        let s = String::from_utf8_lossy(&out);
        // magic, ino 1, mode 100644, uid 0, gid 0, nlink 1, mtime 7, size 2, ...
        assert!(s.starts_with("07070100000001000081a4000000000000000000000001000000070000000200000000"), "{s}");
        // name "a\0" ends at 112: already aligned; then the data.
        assert_eq!(&out[110..116], b"a\0hi\0\0");
        assert!(s.contains("TRAILER!!!"));
        assert_eq!(out.len() % 512, 0);
    }
}
