//! A small reader for 64-bit little-endian ELF files: the interpreter (PT_INTERP) and the
//! dynamic section's DT_NEEDED, DT_RUNPATH and DT_RPATH, which is all it takes to collect a
//! program's shared libraries without running the program (or any code of its architecture).

use std::path::Path;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;
pub const EM_RISCV: u16 = 243;

/// What a dynamic loader needs to know about an ELF file before running it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine` (62 = x86-64, 183 = AArch64).
    pub machine: u16,
    /// The program interpreter (PT_INTERP), e.g. `/lib/ld-linux-aarch64.so.1`; `None` for
    /// static executables and for libraries.
    pub interpreter: Option<String>,
    /// DT_NEEDED, in file order.
    pub needed: Vec<String>,
    /// DT_RUNPATH, or DT_RPATH when there is no DT_RUNPATH, split at `:`.
    pub runpath: Vec<String>,
}

impl ElfInfo {
    /// Debian's multiarch triplet for the machine (the `/usr/lib/<triplet>` directory).
    pub fn multiarch(&self) -> Option<&'static str> {
        match self.machine {
            EM_X86_64 => Some("x86_64-linux-gnu"),
            EM_AARCH64 => Some("aarch64-linux-gnu"),
            EM_RISCV => Some("riscv64-linux-gnu"),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("a 32-bit ELF file (only 64-bit targets are supported)")]
    NotElf64,
    #[error("a big-endian ELF file (only little-endian targets are supported)")]
    BigEndian,
    #[error("truncated or malformed ELF file: {0}")]
    Malformed(&'static str),
}

/// Reads and parses an ELF file.
pub fn read(path: &Path) -> anyhow::Result<ElfInfo> {
    use anyhow::Context as _;
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&data).with_context(|| format!("reading the ELF headers of {}", path.display()))
}

/// Parses the ELF header, program headers and dynamic section of `data`.
pub fn parse(data: &[u8]) -> Result<ElfInfo, ElfError> {
    if data.len() < 16 || &data[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    match data[4] {
        2 => {}
        1 => return Err(ElfError::NotElf64),
        _ => return Err(ElfError::Malformed("unknown ELF class")),
    }
    match data[5] {
        1 => {}
        2 => return Err(ElfError::BigEndian),
        _ => return Err(ElfError::Malformed("unknown byte order")),
    }
    let machine = u16_at(data, 18).ok_or(ElfError::Malformed("ELF header"))?;
    let phoff = u64_at(data, 32).ok_or(ElfError::Malformed("ELF header"))?;
    let phentsize = u16_at(data, 54).ok_or(ElfError::Malformed("ELF header"))? as u64;
    let phnum = u16_at(data, 56).ok_or(ElfError::Malformed("ELF header"))? as u64;
    if phnum > 0 && phentsize < 56 {
        return Err(ElfError::Malformed("program header size"));
    }

    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or(ElfError::Malformed("program header offset"))?;
        let field = |off: usize| u64_at(data, at + off).ok_or(ElfError::Malformed("program header"));
        let kind = u32_at(data, at).ok_or(ElfError::Malformed("program header"))?;
        segments.push(Segment { kind, offset: field(8)?, vaddr: field(16)?, filesz: field(32)? });
    }

    let mut info = ElfInfo { machine, interpreter: None, needed: Vec::new(), runpath: Vec::new() };
    if let Some(interp) = segments.iter().find(|s| s.kind == PT_INTERP) {
        let bytes = slice(data, interp.offset, interp.filesz).ok_or(ElfError::Malformed("PT_INTERP"))?;
        info.interpreter = Some(c_string(bytes).ok_or(ElfError::Malformed("PT_INTERP"))?);
    }
    let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
        return Ok(info);
    };
    let table = slice(data, dynamic.offset, dynamic.filesz).ok_or(ElfError::Malformed("PT_DYNAMIC"))?;
    let mut entries = Vec::new();
    for entry in table.chunks_exact(16) {
        let tag = u64_at(entry, 0).ok_or(ElfError::Malformed("PT_DYNAMIC"))?;
        let val = u64_at(entry, 8).ok_or(ElfError::Malformed("PT_DYNAMIC"))?;
        if tag == DT_NULL {
            break;
        }
        entries.push((tag, val));
    }
    let value = |tag: u64| entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
    let strtab_addr = value(DT_STRTAB).ok_or(ElfError::Malformed("no DT_STRTAB in the dynamic section"))?;
    let strsz = value(DT_STRSZ).ok_or(ElfError::Malformed("no DT_STRSZ in the dynamic section"))?;
    // DT_STRTAB is an address: the PT_LOAD segment that maps it says where it is in the file.
    let strtab_offset = segments
        .iter()
        .filter(|s| s.kind == PT_LOAD)
        .find(|s| strtab_addr >= s.vaddr && strtab_addr < s.vaddr.saturating_add(s.filesz))
        .map(|s| strtab_addr - s.vaddr + s.offset)
        .ok_or(ElfError::Malformed("DT_STRTAB is not in a loaded segment"))?;
    let strtab = slice(data, strtab_offset, strsz).ok_or(ElfError::Malformed("string table"))?;
    let string = |off: u64| -> Result<String, ElfError> {
        let rest =
            usize::try_from(off).ok().and_then(|o| strtab.get(o..)).ok_or(ElfError::Malformed("string offset"))?;
        c_string(rest).ok_or(ElfError::Malformed("string table entry"))
    };
    let mut rpath = Vec::new();
    for &(tag, val) in &entries {
        match tag {
            DT_NEEDED => info.needed.push(string(val)?),
            DT_RUNPATH => info.runpath.extend(string(val)?.split(':').filter(|s| !s.is_empty()).map(String::from)),
            DT_RPATH => rpath.extend(string(val)?.split(':').filter(|s| !s.is_empty()).map(String::from)),
            _ => {}
        }
    }
    // The loader ignores DT_RPATH when DT_RUNPATH is present.
    if info.runpath.is_empty() {
        info.runpath = rpath;
    }
    Ok(info)
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn slice(data: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    data.get(start..end)
}

fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).ok()
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Builds minimal ELF64 files for tests: a PT_LOAD covering the file, an optional PT_INTERP and
/// a PT_DYNAMIC with DT_NEEDED/DT_RUNPATH entries.
#[cfg(test)]
pub(crate) fn synthetic(machine: u16, interpreter: Option<&str>, needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
    const VADDR: u64 = 0x40_0000;
    let phnum: u64 = if interpreter.is_some() { 3 } else { 2 };
    let headers = 64 + 56 * phnum;
    // String table: a leading NUL, then the interpreter, the needed names and the runpath.
    let mut strtab = vec![0u8];
    let mut add = |s: &str| {
        let at = strtab.len() as u64;
        strtab.extend_from_slice(s.as_bytes());
        strtab.push(0);
        at
    };
    let interp_at = interpreter.map(&mut add);
    let needed_at: Vec<u64> = needed.iter().map(|n| add(n)).collect();
    let runpath_at = runpath.map(&mut add);
    let strtab_off = headers;
    let dyn_off = (strtab_off + strtab.len() as u64).div_ceil(8) * 8;
    let mut dynamic: Vec<(u64, u64)> = needed_at.iter().map(|&at| (DT_NEEDED, at)).collect();
    if let Some(at) = runpath_at {
        dynamic.push((DT_RUNPATH, at));
    }
    dynamic.push((DT_STRTAB, VADDR + strtab_off));
    dynamic.push((DT_STRSZ, strtab.len() as u64));
    dynamic.push((DT_NULL, 0));
    let total = dyn_off + 16 * dynamic.len() as u64;

    let mut f = vec![0u8; total as usize];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let mut ph = |i: u64, kind: u32, offset: u64, size: u64| {
        let at = (64 + 56 * i) as usize;
        f[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&(VADDR + offset).to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
    };
    ph(0, PT_LOAD, 0, total);
    ph(1, PT_DYNAMIC, dyn_off, 16 * dynamic.len() as u64);
    if let (Some(at), Some(interp)) = (interp_at, interpreter) {
        ph(2, PT_INTERP, strtab_off + at, interp.len() as u64 + 1);
    }
    f[strtab_off as usize..strtab_off as usize + strtab.len()].copy_from_slice(&strtab);
    for (i, (tag, val)) in dynamic.iter().enumerate() {
        let at = dyn_off as usize + 16 * i;
        f[at..at + 8].copy_from_slice(&tag.to_le_bytes());
        f[at + 8..at + 16].copy_from_slice(&val.to_le_bytes());
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_host_ls() {
        let ls = read(Path::new("/bin/ls")).unwrap();
        assert_eq!(ls.machine, EM_X86_64, "this test expects an x86-64 host");
        assert_eq!(ls.interpreter.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(ls.needed.iter().any(|n| n == "libc.so.6"), "{:?}", ls.needed);
        assert_eq!(ls.multiarch(), Some("x86_64-linux-gnu"));
        let libc = read(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        assert!(libc.needed.iter().any(|n| n.starts_with("ld-linux-x86-64")), "{:?}", libc.needed);
    }

    #[test]
    fn reads_a_synthetic_aarch64_program() {
        let f = synthetic(
            EM_AARCH64,
            Some("/lib/ld-linux-aarch64.so.1"),
            &["libfoo.so.1", "libc.so.6"],
            Some("$ORIGIN/../lib:/opt/x"),
        );
        let info = parse(&f).unwrap();
        assert_eq!(
            info,
            ElfInfo {
                machine: EM_AARCH64,
                interpreter: Some("/lib/ld-linux-aarch64.so.1".into()),
                needed: vec!["libfoo.so.1".into(), "libc.so.6".into()],
                runpath: vec!["$ORIGIN/../lib".into(), "/opt/x".into()],
            }
        );
        assert_eq!(info.multiarch(), Some("aarch64-linux-gnu"));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(matches!(parse(b"#!/bin/sh\necho hi\n"), Err(ElfError::NotElf)));
        let mut f = synthetic(EM_X86_64, None, &[], None);
        f[4] = 1;
        assert!(matches!(parse(&f), Err(ElfError::NotElf64)));
        let f = synthetic(EM_X86_64, None, &["libc.so.6"], None);
        assert!(matches!(parse(&f[..f.len() - 40]), Err(ElfError::Malformed(_))));
    }
}
