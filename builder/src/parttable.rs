//! Reads the partition table of a disk image: GPT (through [`crate::gpt`]) or MBR/DOS with an
//! extended partition and its chain of logical partitions (numbered from 5, as Linux does; the
//! Raspberry Pi images use them). `kiln flash` uses it to find the data partition.

use crate::gpt::{GptTable, SECTOR};
use std::io::{Read, Seek, SeekFrom};

/// MBR partition types that hold a chain of logical partitions.
const EXTENDED_TYPES: [u8; 3] = [0x05, 0x0f, 0x85];
const PROTECTIVE: u8 = 0xee;
/// More logical partitions than this means a loop in the chain of extended boot records.
const MAX_LOGICAL: u32 = 128;

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
    #[error("the extended boot record at sector {0} has no 0x55AA signature")]
    BadEbr(u64),
    #[error("the chain of logical partitions loops or is longer than {MAX_LOGICAL}")]
    EbrLoop,
    #[error("partition {number} (bytes {start}..{end}) extends beyond the end of the disk ({disk} bytes)")]
    Beyond { number: u32, start: u64, end: u64, disk: u64 },
}

struct MbrEntry {
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn entries(sector: &[u8]) -> Vec<MbrEntry> {
    (0..4)
        .map(|i| {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            MbrEntry {
                kind: e[4],
                lba: u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64,
                sectors: u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64,
            }
        })
        .collect()
}

fn read_sector<R: Read + Seek>(disk: &mut R, lba: u64) -> std::io::Result<Vec<u8>> {
    let mut s = vec![0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(lba * SECTOR))?;
    disk.read_exact(&mut s)?;
    Ok(s)
}

fn signed(sector: &[u8]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xaa
}

/// Reads the table of a disk of `disk_size` bytes; `None` when sector 0 holds no table.
pub fn read<R: Read + Seek>(disk: &mut R, disk_size: u64) -> Result<Option<PartitionTable>, PartTableError> {
    if disk_size < 2 * SECTOR {
        return Ok(None);
    }
    let mbr = read_sector(disk, 0)?;
    if !signed(&mbr) {
        return Ok(None);
    }
    let primaries = entries(&mbr);
    let table = if primaries.iter().any(|e| e.kind == PROTECTIVE) {
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
        let mut partitions = Vec::new();
        let mut extended = None;
        for (i, e) in primaries.iter().enumerate() {
            if e.kind == 0 || e.sectors == 0 {
                continue;
            }
            if EXTENDED_TYPES.contains(&e.kind) {
                extended = Some((e.lba, e.sectors));
                continue;
            }
            partitions.push(dos_partition(i as u32 + 1, e.lba, e));
        }
        if let Some((ext_start, ext_sectors)) = extended {
            let mut ebr = ext_start;
            let mut number = 5;
            loop {
                if number - 5 >= MAX_LOGICAL {
                    return Err(PartTableError::EbrLoop);
                }
                let sector = read_sector(disk, ebr)?;
                if !signed(&sector) {
                    return Err(PartTableError::BadEbr(ebr));
                }
                let es = entries(&sector);
                if es[0].kind != 0 && es[0].sectors != 0 {
                    partitions.push(dos_partition(number, ebr + es[0].lba, &es[0]));
                    number += 1;
                }
                if !EXTENDED_TYPES.contains(&es[1].kind) || es[1].sectors == 0 {
                    break;
                }
                let next = ext_start + es[1].lba;
                if next <= ebr || next >= ext_start + ext_sectors {
                    return Err(PartTableError::EbrLoop);
                }
                ebr = next;
            }
        }
        PartitionTable { scheme: Scheme::Dos, partitions }
    };
    for p in &table.partitions {
        if p.end() > disk_size {
            return Err(PartTableError::Beyond { number: p.number, start: p.start, end: p.end(), disk: disk_size });
        }
    }
    Ok(Some(table))
}

fn dos_partition(number: u32, lba: u64, e: &MbrEntry) -> Partition {
    Partition {
        number,
        start: lba * SECTOR,
        size: e.sectors * SECTOR,
        name: String::new(),
        type_id: format!("0x{:02x}", e.kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::GptPartition;
    use crate::units::Uuid;
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
        assert!(matches!(read(&mut Cursor::new(d), DISK), Err(PartTableError::EbrLoop)));
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

    /// The reader agrees with sfdisk on a DOS table sfdisk wrote, logical partitions included.
    #[test]
    fn agrees_with_sfdisk() {
        if !crate::testing::host_has("agrees_with_sfdisk", "sfdisk") {
            return;
        }
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
        let script = "label: dos\nstart=2048, size=16384, type=c\nstart=18432, size=16384, type=c\nstart=34816, type=5\nsize=8192, type=83\nsize=8192, type=83\ntype=83\n";
        let mut child = Command::new("sfdisk")
            .arg("--no-reread")
            .arg("-q")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sfdisk (fdisk package) is installed");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let dump = Command::new("sfdisk").arg("-d").arg(&path).output().unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        // sfdisk -d lines: "d.img5 : start= 36864, size= 8192, type=83"
        let theirs: Vec<(u32, u64, u64)> = dump
            .lines()
            .filter(|l| l.contains(" : start="))
            .filter(|l| !l.contains("type=5"))
            .map(|l| {
                let num: u32 = l
                    .split(" : ")
                    .next()
                    .unwrap()
                    .trim()
                    .strip_prefix(path.to_str().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                let field =
                    |k: &str| l.split(k).nth(1).unwrap().split(',').next().unwrap().trim().parse::<u64>().unwrap();
                (num, field("start="), field("size="))
            })
            .collect();
        let t = read(&mut std::fs::File::open(&path).unwrap(), DISK).unwrap().unwrap();
        let ours: Vec<(u32, u64, u64)> = t.partitions.iter().map(|p| (p.number, p.start / 512, p.size / 512)).collect();
        assert_eq!(ours.len(), 5, "{dump}");
        assert_eq!(ours, theirs, "{dump}");
    }
}
