//! DOS (MBR) partition tables, written and read by code: what the Raspberry Pi firmware boots.
//!
//! Up to four partitions are primary. With more, the first three stay primary, the fourth slot
//! holds an extended partition (type 0x0f) and the rest are logical partitions 5, 6, ...: each
//! is preceded by an extended boot record (EBR) 1 MiB before it, chained from one EBR to the
//! next. The layout must leave that room (see `plan::layout`). Linux names a partition by
//! `PARTUUID=<disk id as 8 hex digits>-<partition number as 2 hex digits>`.
//!
//! One writer ([`MbrTable::write`], for kiln's images) and one reader ([`MbrTable::read`], for
//! any disk: it is guarded against hostile or damaged tables, since `kiln flash` and the agent
//! read disks kiln did not write).

use std::io::{Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
/// FAT32 with LBA addressing: what the Pi firmware reads.
pub const TYPE_FAT32_LBA: u8 = 0x0c;
pub const TYPE_LINUX: u8 = 0x83;
pub const TYPE_EXTENDED_LBA: u8 = 0x0f;
/// Where the EBR of a logical partition sits, in sectors before the partition (1 MiB).
pub const EBR_GAP_SECTORS: u64 = 2048;

/// DOS partition types that hold a chain of logical partitions.
const EXTENDED_TYPES: [u8; 3] = [0x05, 0x0f, 0x85];
/// The single partition of a GPT's protective MBR.
pub const TYPE_PROTECTIVE: u8 = 0xee;
/// More logical partitions than this means a loop in the chain of extended boot records.
const MAX_LOGICAL: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrPartition {
    /// As Linux numbers it: primaries 1-4, logicals from 5.
    pub number: u32,
    pub kind: u8,
    pub bootable: bool,
    pub first_lba: u64,
    pub sectors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrTable {
    /// The disk identifier (bytes 440..444, little endian).
    pub disk_id: u32,
    /// In disk order, without the extended container.
    pub partitions: Vec<MbrPartition>,
}

#[derive(Debug, thiserror::Error)]
pub enum MbrError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("sector 0 is not a DOS partition table (no 0x55AA signature)")]
    NoTable,
    #[error("this disk has a GPT (protective MBR), not a DOS partition table")]
    Protective,
    #[error("the extended boot record at sector {0} has no 0x55AA signature")]
    BadEbr(u64),
    #[error("the chain of logical partitions loops or is longer than {MAX_LOGICAL}")]
    EbrLoop,
    #[error("a partition at sector {first} with {sectors} sectors does not fit a DOS partition table (2 TiB limit)")]
    TooLarge { first: u64, sectors: u64 },
    #[error("{0}")]
    Layout(String),
}

/// The Linux partition number of the `index`th partition (0-based) of a table kiln writes with
/// `count` partitions.
pub fn partition_number(index: usize, count: usize) -> u32 {
    if count <= 4 || index < 3 {
        index as u32 + 1
    } else {
        index as u32 + 2
    }
}

/// `PARTUUID=` value Linux gives partition `number` of a disk with this id.
pub fn partuuid(disk_id: u32, number: u32) -> String {
    format!("{disk_id:08x}-{number:02x}")
}

fn entry(kind: u8, bootable: bool, first: u64, sectors: u64) -> Result<[u8; 16], MbrError> {
    if first > u32::MAX as u64 || sectors > u32::MAX as u64 {
        return Err(MbrError::TooLarge { first, sectors });
    }
    let mut e = [0u8; 16];
    e[0] = if bootable { 0x80 } else { 0 };
    // CHS fields: "use LBA" markers, as current tools write for partitions past 8 GiB.
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = kind;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(first as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
    Ok(e)
}

fn sector_with(entries: &[[u8; 16]], disk_id: Option<u32>) -> [u8; 512] {
    let mut s = [0u8; 512];
    if let Some(id) = disk_id {
        s[440..444].copy_from_slice(&id.to_le_bytes());
    }
    for (i, e) in entries.iter().enumerate() {
        s[446 + 16 * i..462 + 16 * i].copy_from_slice(e);
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

fn layout(m: String) -> MbrError {
    MbrError::Layout(m)
}

fn ebr_room(first_lba: u64) -> MbrError {
    layout(format!(
        "logical partition at sector {first_lba} needs {EBR_GAP_SECTORS} free sectors before it for its EBR"
    ))
}

impl MbrTable {
    /// Writes the MBR and, for logical partitions, the EBR chain. Checks the layout first.
    pub fn write<W: Write + Seek>(&self, w: &mut W) -> Result<(), MbrError> {
        let n = self.partitions.len();
        if n == 0 {
            return Err(layout("a partition table needs at least one partition".into()));
        }
        for (i, p) in self.partitions.iter().enumerate() {
            if p.number != partition_number(i, n) {
                return Err(layout(format!(
                    "partition {} of {n} is numbered {}; Linux will call it {}",
                    i + 1,
                    p.number,
                    partition_number(i, n)
                )));
            }
        }
        for pair in self.partitions.windows(2) {
            if pair[0].first_lba >= pair[1].first_lba {
                return Err(layout("partitions must be in disk order".into()));
            }
            if pair[0].first_lba + pair[0].sectors > pair[1].first_lba {
                return Err(layout(format!(
                    "partitions at sectors {} and {} overlap",
                    pair[0].first_lba, pair[1].first_lba
                )));
            }
        }
        let primary = if n <= 4 { n } else { 3 };
        let mut entries = Vec::new();
        for p in &self.partitions[..primary] {
            entries.push(entry(p.kind, p.bootable, p.first_lba, p.sectors)?);
        }
        let logical = &self.partitions[primary..];
        if let (Some(first), Some(last)) = (logical.first(), logical.last()) {
            let prev_end = self.partitions[primary - 1].first_lba + self.partitions[primary - 1].sectors;
            let ext_start = first
                .first_lba
                .checked_sub(EBR_GAP_SECTORS)
                .filter(|s| *s >= prev_end)
                .ok_or_else(|| ebr_room(first.first_lba))?;
            entries.push(entry(TYPE_EXTENDED_LBA, false, ext_start, last.first_lba + last.sectors - ext_start)?);
            for (i, p) in logical.iter().enumerate() {
                let ebr = p.first_lba - EBR_GAP_SECTORS;
                if i > 0 {
                    let prev = &logical[i - 1];
                    if ebr < prev.first_lba + prev.sectors {
                        return Err(ebr_room(p.first_lba));
                    }
                }
                // Entry 1: the partition, relative to this EBR. Entry 2: the next EBR, relative
                // to the start of the extended partition.
                let mut e = vec![entry(p.kind, p.bootable, EBR_GAP_SECTORS, p.sectors)?];
                if let Some(next) = logical.get(i + 1) {
                    let next_ebr = next.first_lba - EBR_GAP_SECTORS;
                    e.push(entry(
                        TYPE_EXTENDED_LBA,
                        false,
                        next_ebr - ext_start,
                        next.first_lba + next.sectors - next_ebr,
                    )?);
                }
                w.seek(SeekFrom::Start(ebr * SECTOR))?;
                w.write_all(&sector_with(&e, None))?;
            }
        }
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&sector_with(&entries, Some(self.disk_id)))?;
        Ok(())
    }

    /// Reads any DOS table: primaries and the chain of logical partitions in one extended
    /// partition. Empty entries are skipped; a chain that loops, points backwards or out of its
    /// extended partition, or lacks a signature is an error, not an endless read.
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<MbrTable, MbrError> {
        let mbr = read_sector(r, 0)?;
        if !signed(&mbr) {
            return Err(MbrError::NoTable);
        }
        let disk_id = u32::from_le_bytes(mbr[440..444].try_into().expect("4 bytes"));
        let mut partitions = Vec::new();
        let mut extended = None;
        for (i, (kind, bootable, first, sectors)) in entries_of(&mbr).into_iter().enumerate() {
            if kind == TYPE_PROTECTIVE {
                return Err(MbrError::Protective);
            }
            if kind == 0 || sectors == 0 {
                continue;
            }
            if EXTENDED_TYPES.contains(&kind) {
                extended = Some((first, sectors));
                continue;
            }
            partitions.push(MbrPartition { number: i as u32 + 1, kind, bootable, first_lba: first, sectors });
        }
        if let Some((ext_start, ext_sectors)) = extended {
            let mut ebr = ext_start;
            let mut number = 5;
            loop {
                if number - 5 >= MAX_LOGICAL {
                    return Err(MbrError::EbrLoop);
                }
                let s = read_sector(r, ebr)?;
                if !signed(&s) {
                    return Err(MbrError::BadEbr(ebr));
                }
                let e = entries_of(&s);
                let (kind, bootable, rel, sectors) = e[0];
                if kind != 0 && sectors != 0 {
                    partitions.push(MbrPartition { number, kind, bootable, first_lba: ebr + rel, sectors });
                    number += 1;
                }
                let (next_kind, _, next_rel, next_sectors) = e[1];
                if !EXTENDED_TYPES.contains(&next_kind) || next_sectors == 0 {
                    break;
                }
                let next = ext_start + next_rel;
                if next <= ebr || next >= ext_start + ext_sectors {
                    return Err(MbrError::EbrLoop);
                }
                ebr = next;
            }
        }
        partitions.sort_by_key(|p| p.first_lba);
        Ok(MbrTable { disk_id, partitions })
    }

    /// The partition Linux numbers `number`.
    pub fn partition(&self, number: u32) -> Option<&MbrPartition> {
        self.partitions.iter().find(|p| p.number == number)
    }

    pub fn partuuid(&self, p: &MbrPartition) -> String {
        partuuid(self.disk_id, p.number)
    }
}

fn signed(s: &[u8; 512]) -> bool {
    s[510..512] == [0x55, 0xaa]
}

fn read_sector<R: Read + Seek>(r: &mut R, lba: u64) -> std::io::Result<[u8; 512]> {
    let mut s = [0u8; 512];
    r.seek(SeekFrom::Start(lba * SECTOR))?;
    r.read_exact(&mut s).map_err(|e| std::io::Error::new(e.kind(), format!("reading sector {lba}: {e}")))?;
    Ok(s)
}

fn entries_of(s: &[u8; 512]) -> [(u8, bool, u64, u64); 4] {
    std::array::from_fn(|i| {
        let e = &s[446 + 16 * i..462 + 16 * i];
        let le = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64;
        (e[4], e[0] == 0x80, le(&e[8..12]), le(&e[12..16]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const MIB: u64 = 2048;

    fn pi_layout() -> MbrTable {
        // autoboot, boot-a, boot-b, root-a, root-b, data: logical ones with 1 MiB for the EBR.
        let p =
            |number, kind, first, sectors| MbrPartition { number, kind, bootable: false, first_lba: first, sectors };
        MbrTable {
            disk_id: 0x1234abcd,
            partitions: vec![
                p(1, TYPE_FAT32_LBA, MIB, 16 * MIB),
                p(2, TYPE_FAT32_LBA, 17 * MIB, 128 * MIB),
                p(3, TYPE_FAT32_LBA, 145 * MIB, 128 * MIB),
                p(5, TYPE_LINUX, 274 * MIB, 1024 * MIB),
                p(6, TYPE_LINUX, 1299 * MIB, 1024 * MIB),
                p(7, TYPE_LINUX, 2324 * MIB, 512 * MIB),
            ],
        }
    }

    #[test]
    fn round_trip_with_logical_partitions() {
        let t = pi_layout();
        let mut disk = Cursor::new(vec![0u8; (2837 * MIB * SECTOR) as usize]);
        t.write(&mut disk).unwrap();
        assert_eq!(MbrTable::read(&mut disk).unwrap(), t);
        assert_eq!(t.partuuid(&t.partitions[0]), "1234abcd-01");
        assert_eq!(t.partuuid(&t.partitions[3]), "1234abcd-05");
        assert_eq!(t.partition(7).map(|p| t.partuuid(p)).as_deref(), Some("1234abcd-07"));
        let mut wrong = t.clone();
        wrong.partitions[3].number = 4;
        assert!(wrong.write(&mut disk).unwrap_err().to_string().contains("Linux will call it 5"));
    }

    #[test]
    fn refuses_logical_partition_without_room_for_its_ebr() {
        let mut t = pi_layout();
        t.partitions[3].first_lba = 273 * MIB;
        let err = t.write(&mut Cursor::new(vec![0u8; 4096])).unwrap_err().to_string();
        assert!(err.contains("free sectors before it"), "{err}");
    }

    #[test]
    fn four_or_fewer_are_primary() {
        assert_eq!((0..4).map(|i| partition_number(i, 4)).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!((0..6).map(|i| partition_number(i, 6)).collect::<Vec<_>>(), [1, 2, 3, 5, 6, 7]);
    }
}
