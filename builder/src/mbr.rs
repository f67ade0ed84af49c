//! DOS (MBR) partition tables, written and read by code: what the Raspberry Pi firmware boots.
//!
//! Up to four partitions are primary. With more, the first three stay primary, the fourth slot
//! holds an extended partition (type 0x0f) and the rest are logical partitions 5, 6, ...: each
//! is preceded by an extended boot record (EBR) 1 MiB before it, chained from one EBR to the
//! next. The layout must leave that room (see `plan::layout`). Linux names a partition by
//! `PARTUUID=<disk id as 8 hex digits>-<partition number as 2 hex digits>`.

use anyhow::{bail, Context as _, Result};
use std::io::{Read, Seek, SeekFrom, Write};

pub const SECTOR: u64 = 512;
/// FAT32 with LBA addressing: what the Pi firmware reads.
pub const TYPE_FAT32_LBA: u8 = 0x0c;
pub const TYPE_LINUX: u8 = 0x83;
pub const TYPE_EXTENDED_LBA: u8 = 0x0f;
/// Where the EBR of a logical partition sits, in sectors before the partition (1 MiB).
pub const EBR_GAP_SECTORS: u64 = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrPartition {
    pub kind: u8,
    pub bootable: bool,
    pub first_lba: u64,
    pub sectors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrTable {
    /// The disk identifier (bytes 440..444, little endian).
    pub disk_id: u32,
    /// In order; numbered 1.. (primary) or 1-3 and 5.. when there are more than four.
    pub partitions: Vec<MbrPartition>,
}

/// The Linux partition number of the `index`th partition (0-based) of a table with `count`.
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

fn entry(kind: u8, bootable: bool, first: u64, sectors: u64) -> Result<[u8; 16]> {
    if first > u32::MAX as u64 || sectors > u32::MAX as u64 {
        bail!("a partition at sector {first} with {sectors} sectors does not fit a DOS partition table (2 TiB limit)");
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

impl MbrTable {
    /// Writes the MBR and, for logical partitions, the EBR chain. Checks the layout first.
    pub fn write<W: Write + Seek>(&self, w: &mut W) -> Result<()> {
        let n = self.partitions.len();
        if n == 0 {
            bail!("a partition table needs at least one partition");
        }
        let mut sorted = self.partitions.clone();
        sorted.sort_by_key(|p| p.first_lba);
        if sorted != self.partitions {
            bail!("partitions must be in disk order");
        }
        for pair in self.partitions.windows(2) {
            if pair[0].first_lba + pair[0].sectors > pair[1].first_lba {
                bail!("partitions at sectors {} and {} overlap", pair[0].first_lba, pair[1].first_lba);
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
            let ext_start =
                first.first_lba.checked_sub(EBR_GAP_SECTORS).filter(|s| *s >= prev_end).with_context(|| {
                    format!(
                        "logical partition at sector {} needs {EBR_GAP_SECTORS} free sectors before it for its EBR",
                        first.first_lba
                    )
                })?;
            entries.push(entry(TYPE_EXTENDED_LBA, false, ext_start, last.first_lba + last.sectors - ext_start)?);
            for (i, p) in logical.iter().enumerate() {
                let ebr = p.first_lba - EBR_GAP_SECTORS;
                if i > 0 {
                    let prev = &logical[i - 1];
                    if ebr < prev.first_lba + prev.sectors {
                        bail!(
                            "logical partition at sector {} needs {EBR_GAP_SECTORS} free sectors before it for its EBR",
                            p.first_lba
                        );
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

    /// Reads a table written by `write` (or any DOS table with one extended partition).
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<MbrTable> {
        let mbr = read_sector(r, 0)?;
        let disk_id = u32::from_le_bytes(mbr[440..444].try_into().expect("4 bytes"));
        let mut partitions = Vec::new();
        let mut extended = None;
        for (kind, bootable, first, sectors) in entries_of(&mbr) {
            match kind {
                0 => {}
                0x05 | 0x0f | 0x85 => extended = Some(first),
                0xee => bail!("this disk has a GPT (protective MBR), not a DOS partition table"),
                _ => partitions.push(MbrPartition { kind, bootable, first_lba: first, sectors }),
            }
        }
        if let Some(ext_start) = extended {
            let mut ebr = ext_start;
            for _ in 0..128 {
                let s = read_sector(r, ebr)?;
                let e = entries_of(&s);
                let (kind, bootable, rel, sectors) = e[0];
                if kind != 0 {
                    partitions.push(MbrPartition { kind, bootable, first_lba: ebr + rel, sectors });
                }
                let (next_kind, _, next_rel, _) = e[1];
                if next_kind == 0 {
                    break;
                }
                ebr = ext_start + next_rel;
            }
        }
        Ok(MbrTable { disk_id, partitions })
    }

    pub fn partuuid(&self, index: usize) -> String {
        partuuid(self.disk_id, partition_number(index, self.partitions.len()))
    }
}

fn read_sector<R: Read + Seek>(r: &mut R, lba: u64) -> Result<[u8; 512]> {
    let mut s = [0u8; 512];
    r.seek(SeekFrom::Start(lba * SECTOR))?;
    r.read_exact(&mut s).with_context(|| format!("reading sector {lba}"))?;
    if s[510..512] != [0x55, 0xaa] {
        bail!("sector {lba} is not a DOS partition table (no 55 aa signature)");
    }
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
        let p = |kind, first, sectors| MbrPartition { kind, bootable: false, first_lba: first, sectors };
        MbrTable {
            disk_id: 0x1234abcd,
            partitions: vec![
                p(TYPE_FAT32_LBA, MIB, 16 * MIB),
                p(TYPE_FAT32_LBA, 17 * MIB, 128 * MIB),
                p(TYPE_FAT32_LBA, 145 * MIB, 128 * MIB),
                p(TYPE_LINUX, 274 * MIB, 1024 * MIB),
                p(TYPE_LINUX, 1299 * MIB, 1024 * MIB),
                p(TYPE_LINUX, 2324 * MIB, 512 * MIB),
            ],
        }
    }

    #[test]
    fn round_trip_with_logical_partitions() {
        let t = pi_layout();
        let mut disk = Cursor::new(vec![0u8; (2837 * MIB * SECTOR) as usize]);
        t.write(&mut disk).unwrap();
        assert_eq!(MbrTable::read(&mut disk).unwrap(), t);
        assert_eq!(t.partuuid(0), "1234abcd-01");
        assert_eq!(t.partuuid(3), "1234abcd-05");
        assert_eq!(t.partuuid(5), "1234abcd-07");
    }

    #[test]
    fn sfdisk_reads_the_same_table() {
        if !crate::testing::host_has("sfdisk_reads_the_same_table", "sfdisk") {
            return;
        }
        let t = pi_layout();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(2837 * MIB * SECTOR).unwrap();
        t.write(&mut f).unwrap();
        drop(f);
        let out = crate::exec::Cmd::new("sfdisk").arg("--dump").arg(&path).read().unwrap();
        assert!(out.contains("label: dos"), "{out}");
        assert!(out.contains("label-id: 0x1234abcd"), "{out}");
        for (n, p) in [(1, &t.partitions[0]), (3, &t.partitions[2]), (5, &t.partitions[3]), (7, &t.partitions[5])] {
            let line = format!("disk.img{n} : start={:>12}, size={:>12}, type={:x}", p.first_lba, p.sectors, p.kind);
            assert!(out.contains(&line), "missing {line:?} in\n{out}");
        }
        assert!(out.contains("disk.img4 : start=      559104, size=     5249024, type=f"), "{out}");
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
