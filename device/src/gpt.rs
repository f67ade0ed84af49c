//! A GUID partition table written by code: protective MBR, primary and backup headers and
//! entry arrays, with every GUID given by the caller so that two builds are bit-identical.

use crate::Uuid;
use std::io::{Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
/// Sectors taken by the entry array (128 * 128 bytes).
const ENTRY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR;

pub const TYPE_ESP: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
pub const TYPE_ROOT_AMD64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const TYPE_ROOT_ARM64: &str = "b921b045-1df0-41c3-af44-4c6f280d3fae";
pub const TYPE_LINUX_DATA: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

#[derive(Debug, Clone, PartialEq)]
pub struct GptPartition {
    pub type_guid: Uuid,
    pub guid: Uuid,
    pub first_lba: u64,
    /// Inclusive, as GPT stores it.
    pub last_lba: u64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GptTable {
    pub disk_guid: Uuid,
    pub disk_sectors: u64,
    pub partitions: Vec<GptPartition>,
}

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error(
        "partition {name:?} (sectors {first}..={last}) does not fit the usable area {usable_first}..={usable_last}"
    )]
    OutOfRange { name: String, first: u64, last: u64, usable_first: u64, usable_last: u64 },
    #[error("partitions {a:?} and {b:?} overlap")]
    Overlap { a: String, b: String },
    #[error("partition name {0:?} is longer than 36 UTF-16 units")]
    NameTooLong(String),
    #[error("no valid GPT header: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl GptTable {
    fn first_usable(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    fn last_usable(&self) -> u64 {
        self.disk_sectors - 2 - ENTRY_SECTORS
    }

    fn check(&self) -> Result<(), GptError> {
        for p in &self.partitions {
            if p.first_lba < self.first_usable() || p.last_lba > self.last_usable() || p.last_lba < p.first_lba {
                return Err(GptError::OutOfRange {
                    name: p.name.clone(),
                    first: p.first_lba,
                    last: p.last_lba,
                    usable_first: self.first_usable(),
                    usable_last: self.last_usable(),
                });
            }
            if p.name.encode_utf16().count() > 36 {
                return Err(GptError::NameTooLong(p.name.clone()));
            }
        }
        for (i, a) in self.partitions.iter().enumerate() {
            for b in &self.partitions[i + 1..] {
                if a.first_lba <= b.last_lba && b.first_lba <= a.last_lba {
                    return Err(GptError::Overlap { a: a.name.clone(), b: b.name.clone() });
                }
            }
        }
        Ok(())
    }

    fn entry_array(&self) -> Vec<u8> {
        let mut buf = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        for (i, p) in self.partitions.iter().enumerate() {
            let e = &mut buf[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize];
            e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
            e[16..32].copy_from_slice(&p.guid.to_gpt_bytes());
            e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
            e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
            for (j, unit) in p.name.encode_utf16().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
        }
        buf
    }

    fn header(&self, current: u64, backup: u64, entries_lba: u64, entries_crc: u32) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.to_gpt_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
        h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[0..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn protective_mbr(&self) -> Vec<u8> {
        let mut m = vec![0u8; SECTOR as usize];
        let e = &mut m[446..462];
        e[0] = 0x00;
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        let size = (self.disk_sectors - 1).min(u32::MAX as u64) as u32;
        e[12..16].copy_from_slice(&size.to_le_bytes());
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    /// Writes the protective MBR, both headers and both entry arrays. Touches nothing else.
    pub fn write<W: Write + Seek>(&self, disk: &mut W) -> Result<(), GptError> {
        self.write_with(disk, &mut |d: &mut W| d.flush())
    }

    /// [`GptTable::write`] in an order that survives a torn write, with `barrier` (an fsync on
    /// a device) between the steps: the backup entries and header at the end of the disk first,
    /// then the primary entries, then the primary header, which makes them valid. Cut anywhere,
    /// either the primary table is whole (old or new) or the new backup is, and
    /// [`GptTable::read`] (and Linux) fall back to the backup when the primary does not read.
    pub fn write_with<W: Write + Seek>(
        &self,
        disk: &mut W,
        barrier: &mut dyn FnMut(&mut W) -> std::io::Result<()>,
    ) -> Result<(), GptError> {
        self.check()?;
        let last = self.disk_sectors - 1;
        let entries = self.entry_array();
        let crc = crc32fast::hash(&entries);
        let backup_entries_lba = last - ENTRY_SECTORS;
        disk.seek(SeekFrom::Start(backup_entries_lba * SECTOR))?;
        disk.write_all(&entries)?;
        disk.write_all(&self.header(last, 1, backup_entries_lba, crc))?;
        barrier(disk)?;
        disk.seek(SeekFrom::Start(2 * SECTOR))?;
        disk.write_all(&entries)?;
        barrier(disk)?;
        disk.seek(SeekFrom::Start(0))?;
        disk.write_all(&self.protective_mbr())?;
        disk.write_all(&self.header(1, last, 2, crc))?;
        barrier(disk)?;
        Ok(())
    }

    /// Reads the table of a disk of `disk_sectors` sectors: the primary one, or the backup in
    /// the disk's last sector when the primary does not read (a torn write, a damaged sector 1).
    pub fn read<R: Read + Seek>(disk: &mut R, disk_sectors: u64) -> Result<GptTable, GptError> {
        GptTable::read_where(disk, disk_sectors).map(|(t, _)| t)
    }

    /// [`GptTable::read`], and where the table was found.
    pub fn read_where<R: Read + Seek>(disk: &mut R, disk_sectors: u64) -> Result<(GptTable, Found), GptError> {
        let primary = match read_at(disk, 1, disk_sectors) {
            Ok((table, backup_lba)) => return Ok((table, Found::Primary { backup_lba })),
            Err(e) => e,
        };
        if disk_sectors < 2 {
            return Err(primary);
        }
        match read_at(disk, disk_sectors - 1, disk_sectors) {
            Ok((table, _)) => Ok((table, Found::Backup { primary_error: primary.to_string() })),
            Err(backup) => Err(GptError::Invalid(format!(
                "primary table: {}; backup table in the last sector: {}",
                bare(&primary),
                bare(&backup)
            ))),
        }
    }
}

/// Where [`GptTable::read_where`] found the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// At LBA 1, naming its backup's LBA (the last sector of the disk it was written for).
    Primary { backup_lba: u64 },
    /// The primary did not read; the backup in the disk's last sector did.
    Backup { primary_error: String },
}

fn bare(e: &GptError) -> String {
    match e {
        GptError::Invalid(m) => m.clone(),
        e => e.to_string(),
    }
}

/// Reads and checks the header at `lba` and its entry array; also returns the header's
/// alternate LBA.
fn read_at<R: Read + Seek>(disk: &mut R, lba: u64, disk_sectors: u64) -> Result<(GptTable, u64), GptError> {
    let mut h = vec![0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(lba * SECTOR))?;
    disk.read_exact(&mut h)?;
    if &h[0..8] != b"EFI PART" {
        return Err(GptError::Invalid(format!("no \"EFI PART\" signature at LBA {lba}")));
    }
    let stored = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
    if !(92..=SECTOR as usize).contains(&size) {
        return Err(GptError::Invalid(format!("header at LBA {lba} has size {size}")));
    }
    let mut z = h[0..size].to_vec();
    z[16..20].fill(0);
    if crc32fast::hash(&z) != stored {
        return Err(GptError::Invalid(format!("header CRC mismatch at LBA {lba}")));
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    if u64_at(24) != lba {
        return Err(GptError::Invalid(format!("the header at LBA {lba} says it is at LBA {}", u64_at(24))));
    }
    if u32_at(80) as u64 != ENTRIES || u32_at(84) as u64 != ENTRY_SIZE {
        return Err(GptError::Invalid(format!(
            "{} entries of {} bytes (kiln reads tables of {ENTRIES} entries of {ENTRY_SIZE} bytes)",
            u32_at(80),
            u32_at(84)
        )));
    }
    let entries_lba = u64_at(72);
    if entries_lba + ENTRY_SECTORS > disk_sectors {
        return Err(GptError::Invalid(format!("the entry array at LBA {entries_lba} is beyond the disk")));
    }
    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    disk.seek(SeekFrom::Start(entries_lba * SECTOR))?;
    disk.read_exact(&mut entries)?;
    if crc32fast::hash(&entries) != u32_at(88) {
        return Err(GptError::Invalid(format!("partition entry array CRC mismatch (header at LBA {lba})")));
    }
    let from_gpt = |b: &[u8]| {
        Uuid([b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
    };
    let mut partitions = Vec::new();
    for e in entries.chunks(ENTRY_SIZE as usize) {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let units: Vec<u16> =
            e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
        partitions.push(GptPartition {
            type_guid: from_gpt(&e[0..16]),
            guid: from_gpt(&e[16..32]),
            first_lba: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
            last_lba: u64::from_le_bytes(e[40..48].try_into().expect("8 bytes")),
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok((GptTable { disk_guid: from_gpt(&h[56..72]), disk_sectors, partitions }, u64_at(32)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn table() -> GptTable {
        let u = |s: &str| Uuid::parse(s).unwrap();
        GptTable {
            disk_guid: Uuid::derive("t", "disk"),
            disk_sectors: 8192,
            partitions: vec![
                GptPartition {
                    type_guid: u(TYPE_ESP),
                    guid: Uuid::derive("t", "esp"),
                    first_lba: 2048,
                    last_lba: 4095,
                    name: "esp".into(),
                },
                GptPartition {
                    type_guid: u(TYPE_LINUX_DATA),
                    guid: Uuid::derive("t", "data"),
                    first_lba: 4096,
                    last_lba: 6143,
                    name: "data".into(),
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        let mut a = Cursor::new(vec![0u8; 8192 * 512]);
        table().write(&mut a).unwrap();
        let mut b = Cursor::new(vec![0u8; 8192 * 512]);
        table().write(&mut b).unwrap();
        assert_eq!(a.get_ref(), b.get_ref());
        assert_eq!(GptTable::read(&mut a, 8192).unwrap(), table());
        assert_eq!(&a.get_ref()[510..512], &[0x55, 0xAA]);
        assert_eq!(&a.get_ref()[(8191 * 512)..(8191 * 512 + 8)], b"EFI PART");
    }

    #[test]
    fn detects_corruption_and_overlap() {
        let mut a = Cursor::new(vec![0u8; 8192 * 512]);
        table().write(&mut a).unwrap();
        // The primary entries and the backup header damaged: nothing to read.
        a.get_mut()[1024 + 5] ^= 1;
        a.get_mut()[8191 * 512 + 40] ^= 1;
        assert!(matches!(GptTable::read(&mut a, 8192), Err(GptError::Invalid(_))));
        let mut t = table();
        t.partitions[1].first_lba = 4000;
        assert!(matches!(t.write(&mut Cursor::new(vec![0u8; 8192 * 512])), Err(GptError::Overlap { .. })));
    }

    #[test]
    fn a_write_cut_anywhere_leaves_the_old_or_the_new_table() {
        // The image's table on a disk twice its size, then the data partition grown to the end
        // (what the device does at first boot), cut after every single write.
        let old = table();
        let mut disk = vec![0u8; 16384 * 512];
        old.write(&mut Cursor::new(&mut disk[..8192 * 512])).unwrap();
        let mut new = old.clone();
        new.disk_sectors = 16384;
        new.partitions[1].last_lba = 16384 - 34;
        let mut rec = crate::fs::WriteLog::default();
        new.write(&mut rec).unwrap();
        let mut seen_new = false;
        for cut in 0..=rec.writes.len() {
            let mut d = disk.clone();
            for (at, bytes) in &rec.writes[..cut] {
                d[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
            }
            let got = GptTable::read(&mut Cursor::new(d), 16384)
                .unwrap_or_else(|e| panic!("cut after {cut} of {} writes: {e}", rec.writes.len()));
            assert!(
                got.partitions == old.partitions || got.partitions == new.partitions,
                "cut after {cut} writes: {got:?}"
            );
            seen_new |= got.partitions == new.partitions;
        }
        assert!(seen_new);
    }

    #[test]
    fn a_damaged_primary_falls_back_to_the_backup() {
        let mut a = Cursor::new(vec![0u8; 8192 * 512]);
        table().write(&mut a).unwrap();
        a.get_mut()[512 + 40] ^= 1;
        let (t, found) = GptTable::read_where(&mut a, 8192).unwrap();
        assert_eq!(t, table());
        assert!(matches!(found, Found::Backup { .. }), "{found:?}");
        // Both gone: an error that names both.
        a.get_mut()[8191 * 512 + 20] ^= 1;
        let e = GptTable::read(&mut a, 8192).unwrap_err().to_string();
        assert!(e.contains("primary table: header CRC mismatch at LBA 1") && e.contains("backup table"), "{e}");
    }

    #[test]
    fn sfdisk_reads_it() {
        if std::process::Command::new("sfdisk").arg("--version").output().is_err() {
            eprintln!("sfdisk not installed: checked by the image tests instead");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        f.set_len(8192 * 512).unwrap();
        table().write(&mut f).unwrap();
        let out = std::process::Command::new("sfdisk").arg("-d").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("label: gpt"), "{text}");
        assert!(
            text.contains("start=        2048, size=        2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
            "{text}"
        );
        assert!(text.contains("name=\"data\""), "{text}");
        assert!(
            String::from_utf8_lossy(&out.stderr).is_empty(),
            "sfdisk complained: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
