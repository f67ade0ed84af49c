//! Reads the partition table of a disk, whatever it is: a GPT (through [`crate::gpt`]) or a
//! DOS table with its logical partitions (through [`crate::mbr`], numbered from 5, as Linux
//! does; the Raspberry Pi images use them). `kiln flash` uses it to find the data partition of
//! an image it is about to write.

use crate::gpt::{GptTable, SECTOR};
use crate::mbr::{MbrError, MbrTable, TYPE_PROTECTIVE};
use std::io::{Read, Seek, SeekFrom};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Gpt,
    Dos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers them: GPT entries in order, DOS primaries 1-4 and logicals from 5.
    pub number: u32,
    /// Bytes from the start of the disk.
    pub start: u64,
    pub size: u64,
    /// The GPT partition name; empty for DOS.
    pub name: String,
    /// The GPT type GUID, or the DOS type byte as `0x83`.
    pub type_id: String,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub scheme: Scheme,
    /// Without the DOS extended container.
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    /// The partition that starts last on the disk (kiln's layouts put the data partition there).
    pub fn last(&self) -> Option<&Partition> {
        self.partitions.iter().max_by_key(|p| p.start)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartTableError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the GPT is damaged: {0}")]
    Gpt(#[from] crate::gpt::GptError),
    #[error(transparent)]
    Dos(#[from] MbrError),
    #[error("partition {number} (bytes {start}..{end}) extends beyond the end of the disk ({disk} bytes)")]
    Beyond { number: u32, start: u64, end: u64, disk: u64 },
}

/// Reads the table of a disk of `disk_size` bytes; `None` when sector 0 holds no table.
pub fn read<R: Read + Seek>(disk: &mut R, disk_size: u64) -> Result<Option<PartitionTable>, PartTableError> {
    if disk_size < 2 * SECTOR {
        return Ok(None);
    }
    let mut mbr = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let protective = (0..4).any(|i| mbr[446 + 16 * i + 4] == TYPE_PROTECTIVE);
    let table = if protective {
        let gpt = GptTable::read(disk, disk_size / SECTOR)?;
        let partitions = gpt
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| Partition {
                number: i as u32 + 1,
                start: p.first_lba * SECTOR,
                size: (p.last_lba + 1 - p.first_lba) * SECTOR,
                name: p.name.clone(),
                type_id: p.type_guid.to_string(),
            })
            .collect();
        PartitionTable { scheme: Scheme::Gpt, partitions }
    } else {
        let dos = MbrTable::read(disk)?;
        let partitions = dos
            .partitions
            .iter()
            .map(|p| Partition {
                number: p.number,
                start: p.first_lba * SECTOR,
                size: p.sectors * SECTOR,
                name: String::new(),
                type_id: format!("0x{:02x}", p.kind),
            })
            .collect();
        PartitionTable { scheme: Scheme::Dos, partitions }
    };
    for p in &table.partitions {
        if p.end() > disk_size {
            return Err(PartTableError::Beyond { number: p.number, start: p.start, end: p.end(), disk: disk_size });
        }
    }
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::GptPartition;
    use crate::Uuid;
    use std::io::Cursor;

    const DISK: u64 = 64 << 20;

    fn put_entry(sector: &mut [u8], i: usize, kind: u8, lba: u32, sectors: u32) {
        let e = &mut sector[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    /// The Raspberry Pi layout: boot partitions primary, the rest logical in an extended one.
    fn pi_like() -> Vec<u8> {
        let mut d = vec![0u8; DISK as usize];
        let s = |lba: u64| lba as usize * 512;
        put_entry(&mut d[..512], 0, 0x0c, 2048, 8192);
        put_entry(&mut d[..512], 1, 0x0c, 10240, 8192);
        put_entry(&mut d[..512], 2, 0x0f, 18432, 100000);
        d[510] = 0x55;
        d[511] = 0xaa;
        // EBR 1 at 18432: logical 5 at +2048, next EBR at ext+22528.
        let e1 = s(18432);
        put_entry(&mut d[e1..e1 + 512], 0, 0x83, 2048, 20000);
        put_entry(&mut d[e1..e1 + 512], 1, 0x05, 22528, 30000);
        d[e1 + 510] = 0x55;
        d[e1 + 511] = 0xaa;
        // EBR 2 at 40960: logical 6, next EBR at ext+55296.
        let e2 = s(18432 + 22528);
        put_entry(&mut d[e2..e2 + 512], 0, 0x83, 2048, 20000);
        put_entry(&mut d[e2..e2 + 512], 1, 0x05, 55296, 40000);
        d[e2 + 510] = 0x55;
        d[e2 + 511] = 0xaa;
        // EBR 3 at 73728: logical 7, the last.
        let e3 = s(18432 + 55296);
        put_entry(&mut d[e3..e3 + 512], 0, 0x83, 2048, 40000);
        d[e3 + 510] = 0x55;
        d[e3 + 511] = 0xaa;
        d
    }

    #[test]
    fn dos_table_with_logical_partitions() {
        let t = read(&mut Cursor::new(pi_like()), DISK).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Dos);
        let got: Vec<(u32, u64, u64)> = t.partitions.iter().map(|p| (p.number, p.start / 512, p.size / 512)).collect();
        assert_eq!(got, [(1, 2048, 8192), (2, 10240, 8192), (5, 20480, 20000), (6, 43008, 20000), (7, 75776, 40000)]);
        assert_eq!(t.last().unwrap().number, 7);
        assert_eq!(t.partitions[2].type_id, "0x83");
    }

    #[test]
    fn broken_chains_are_errors() {
        let mut d = pi_like();
        d[(18432 + 22528) * 512 + 511] = 0;
        assert_eq!(
            read(&mut Cursor::new(d), DISK).unwrap_err().to_string(),
            "the extended boot record at sector 40960 has no 0x55AA signature"
        );
        let mut d = pi_like();
        // EBR 2 pointing back at EBR 1.
        put_entry(&mut d[(18432 + 22528) * 512..(18432 + 22528) * 512 + 512], 1, 0x05, 0, 30000);
        assert!(matches!(read(&mut Cursor::new(d), DISK), Err(PartTableError::Dos(MbrError::EbrLoop))));
        let mut d = pi_like();
        put_entry(&mut d[..512], 0, 0x0c, 2048, 200000);
        assert!(matches!(read(&mut Cursor::new(d), DISK), Err(PartTableError::Beyond { number: 1, .. })));
    }

    #[test]
    fn gpt_and_no_table() {
        assert_eq!(read(&mut Cursor::new(vec![0u8; DISK as usize]), DISK).unwrap(), None);
        let u = |s: &str| Uuid::parse(s).unwrap();
        let gpt = GptTable {
            disk_guid: Uuid::derive("t", "disk"),
            disk_sectors: DISK / 512,
            partitions: vec![
                GptPartition {
                    type_guid: u(crate::gpt::TYPE_ESP),
                    guid: Uuid::derive("t", "esp"),
                    first_lba: 2048,
                    last_lba: 4095,
                    name: "esp".into(),
                },
                GptPartition {
                    type_guid: u(crate::gpt::TYPE_LINUX_DATA),
                    guid: Uuid::derive("t", "data"),
                    first_lba: 8192,
                    last_lba: 16383,
                    name: "data".into(),
                },
                GptPartition {
                    type_guid: u(crate::gpt::TYPE_LINUX_DATA),
                    guid: Uuid::derive("t", "root"),
                    first_lba: 4096,
                    last_lba: 8191,
                    name: "root".into(),
                },
            ],
        };
        let mut c = Cursor::new(vec![0u8; DISK as usize]);
        gpt.write(&mut c).unwrap();
        let t = read(&mut c, DISK).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        let last = t.last().unwrap();
        assert_eq!((last.number, last.name.as_str(), last.start, last.size), (2, "data", 8192 * 512, 8192 * 512));
        assert_eq!(t.partitions[0].type_id, crate::gpt::TYPE_ESP);
    }
}
