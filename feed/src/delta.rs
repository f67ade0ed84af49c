//! Delta updates: the chunk index of an artifact, shared by `kiln publish` (which writes it) and
//! the agent (which reads it to fetch only the chunks it does not have).
//!
//! An artifact is cut into chunks: fixed 4 KiB blocks for root.img ([`BLOCKS`]: EROFS keeps
//! everything on block boundaries) and content-defined chunks for the UKI and the Pi's boot
//! image ([`CHUNKING`]: FastCDC 2020, 4/16/64 KiB), so a change moves only the chunks around
//! it. Three files are published per artifact, named by the artifact's sha256:
//! - the **pack** (`chunks/<sha256>.pack`): every chunk in the artifact's order, each compressed on its own (a zstd
//!   frame, or stored as is when that is not smaller), so chunks that follow each other in the
//!   artifact follow each other in the pack and one HTTP Range request fetches a run of them;
//! - the **leaves** (`chunks/<sha256>.leaves`): per chunk its sha256, size, packed size and
//!   packing, 41 bytes each (binary: the index counts against every delta);
//! - the **head** (`chunks/<sha256>.index`, [`Head`]): the artifact's size and sha256, the
//!   chunking, and per group of [`GROUP`] chunks a digest of their hashes, a digest of their
//!   entries and where they start in the pack. Its size and sha256 are in the signed metadata
//!   ([`crate::Delta`]); a group's entries are checked against the head when they arrive, so
//!   every chunk a device accepts is bound to the signature. A device that already has a group's
//!   blocks where the new image has them (fixed-size blocks: most of a root image, release
//!   after release) needs neither their entries nor their data: for the minimal image the head
//!   is ~100 KiB where all entries are 1.9 MiB.
//!
//! A chunk is accepted only when its bytes (after decompression) hash to the index's sha256;
//! the assembled artifact must then hash to the metadata's sha256 before it can boot.

use sha2::{Digest, Sha256};

/// FastCDC parameters, in bytes, or fixed-size blocks when `min == max` (`avg` equal too).
/// Written into each index, so a later kiln may choose others and a device chunks its own data
/// the way the index was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// What `kiln publish` uses for the UKI and the Pi's boot image: content-defined, 16 KiB on
/// average (`kiln delta` on kiln's images: 4 KiB found a few % fewer new bytes for 4 times the
/// index, 64 KiB up to twice as many).
pub const CHUNKING: Chunking = Chunking { min: 4 << 10, avg: 16 << 10, max: 64 << 10 };

/// What `kiln publish` uses for root.img: fixed 4 KiB blocks. EROFS places everything at 4 KiB
/// block boundaries, so a change moves data by whole blocks, and a moved block is found again
/// wherever it went; the changes themselves (inodes whose block addresses moved) are single
/// blocks spread over the image, which content-defined chunks would each round up to 16 KiB or
/// more (measured: one package added, 13.6 MiB of new 4 KiB blocks against 44.5 MiB of new
/// 16 KiB chunks).
pub const BLOCKS: Chunking = Chunking { min: 4 << 10, avg: 4 << 10, max: 4 << 10 };

impl Chunking {
    pub fn fixed(&self) -> bool {
        self.min == self.max
    }
}

const MAGIC: &[u8; 8] = b"KILNCDX2";
const HEAD: usize = 8 + 32 + 8 + 12 + 4 + 4 + 8;
const GROUP_ENTRY: usize = 32 + 32 + 8;
/// Bytes of one chunk's entry in the leaves file.
pub const ENTRY: usize = 32 + 4 + 4 + 1;
/// Chunks per group of the head. 32 blocks of root.img are 128 KiB: a head of ~100 KiB for the
/// minimal image, and a change fetches the entries of its groups only (1.3 KiB each).
pub const GROUP: u32 = 32;

/// How one chunk is stored in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// The chunk's bytes as they are.
    Stored,
    /// One zstd frame.
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub sha256: [u8; 32],
    /// Bytes in the artifact.
    pub size: u32,
    /// Bytes in the pack.
    pub packed: u32,
    pub packing: Packing,
}

/// One artifact's chunks, whole (what `kiln publish` makes; published as a head and leaves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The artifact this index cuts (an index served for another artifact is refused).
    pub artifact_sha256: [u8; 32],
    pub size: u64,
    pub chunking: Chunking,
    pub chunks: Vec<Chunk>,
}

/// What the head says of one group of [`GROUP`] consecutive chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// sha256 of the chunks' sha256s one after the other ([`blocks_digest`]): a device that
    /// has the same blocks at the same places (fixed-size chunks) knows the whole group without
    /// its entries.
    pub blocks: [u8; 32],
    /// sha256 of the group's entries in the leaves file: entries fetched by a Range request
    /// are checked against it.
    pub entries: [u8; 32],
    /// Where the group's first chunk starts in the pack.
    pub pack_offset: u64,
}

/// The head of an index (`chunks/<sha256>.index`; its sha256 is in the signed metadata): the
/// artifact, the chunking, and a digest per group of chunks. The entries themselves are in the
/// leaves file (`chunks/<sha256>.leaves`, [`ENTRY`] bytes each), fetched only for the groups a
/// device does not already have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub artifact_sha256: [u8; 32],
    pub size: u64,
    pub chunking: Chunking,
    pub count: u32,
    pub group: u32,
    pub pack_size: u64,
    pub groups: Vec<Group>,
}

/// sha256 over chunk hashes one after the other.
pub fn blocks_digest<'a>(hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for x in hashes {
        h.update(x);
    }
    h.finalize().into()
}

fn encode_entry(out: &mut Vec<u8>, c: &Chunk) {
    out.extend_from_slice(&c.sha256);
    out.extend_from_slice(&c.size.to_le_bytes());
    out.extend_from_slice(&c.packed.to_le_bytes());
    out.push(match c.packing {
        Packing::Stored => 0,
        Packing::Zstd => 1,
    });
}

impl Index {
    /// The leaves file: every chunk's entry, in order.
    pub fn encode_leaves(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENTRY * self.chunks.len());
        for c in &self.chunks {
            encode_entry(&mut out, c);
        }
        out
    }

    pub fn head(&self) -> Head {
        let mut groups = Vec::new();
        let mut pack_offset = 0u64;
        for g in self.chunks.chunks(GROUP as usize) {
            let mut entries = Vec::with_capacity(ENTRY * g.len());
            for c in g {
                encode_entry(&mut entries, c);
            }
            groups.push(Group {
                blocks: blocks_digest(g.iter().map(|c| &c.sha256)),
                entries: sha256(&entries),
                pack_offset,
            });
            pack_offset += g.iter().map(|c| c.packed as u64).sum::<u64>();
        }
        Head {
            artifact_sha256: self.artifact_sha256,
            size: self.size,
            chunking: self.chunking,
            count: self.chunks.len() as u32,
            group: GROUP,
            pack_size: pack_offset,
            groups,
        }
    }

    /// The pack's size.
    pub fn pack_size(&self) -> u64 {
        self.chunks.iter().map(|c| c.packed as u64).sum()
    }

    /// An index from its head and all of its leaves, each group checked.
    pub fn from_parts(head: &Head, leaves: &[u8]) -> Result<Index, String> {
        if leaves.len() != head.count as usize * ENTRY {
            return Err(format!("chunk index: {} bytes of entries for {} chunks", leaves.len(), head.count));
        }
        let mut chunks = Vec::with_capacity(head.count as usize);
        for g in 0..head.groups.len() {
            let r = head.leaves_range(g);
            chunks.extend(head.decode_group(g, &leaves[r.start as usize..r.end as usize])?);
        }
        let total: u64 = chunks.iter().map(|c| c.size as u64).sum();
        if total != head.size {
            return Err(format!("chunk index: its chunks cover {total} bytes, the artifact has {}", head.size));
        }
        Ok(Index { artifact_sha256: head.artifact_sha256, size: head.size, chunking: head.chunking, chunks })
    }
}

impl Head {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + GROUP_ENTRY * self.groups.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.artifact_sha256);
        out.extend_from_slice(&self.size.to_le_bytes());
        for v in [self.chunking.min, self.chunking.avg, self.chunking.max, self.count, self.group] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.pack_size.to_le_bytes());
        for g in &self.groups {
            out.extend_from_slice(&g.blocks);
            out.extend_from_slice(&g.entries);
            out.extend_from_slice(&g.pack_offset.to_le_bytes());
        }
        out
    }

    /// Reads a head, refusing anything inconsistent.
    pub fn decode(b: &[u8]) -> Result<Head, String> {
        if b.len() < HEAD || &b[..8] != MAGIC {
            return Err("not a kiln chunk index (bad magic)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let chunking = Chunking { min: u32_at(48), avg: u32_at(52), max: u32_at(56) };
        // The bounds the chunker asserts (a head outside them would panic the reader).
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN};
        let fastcdc = (MINIMUM_MIN..=MINIMUM_MAX).contains(&chunking.min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&chunking.avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&chunking.max)
            && chunking.min < chunking.avg
            && chunking.avg < chunking.max;
        if !(fastcdc || chunking.fixed() && chunking.min > 0 && chunking.avg == chunking.min) || chunking.max > 16 << 20
        {
            return Err(format!("chunk index: impossible chunking {chunking:?}"));
        }
        let (size, count, group, pack_size) = (u64_at(40), u32_at(60), u32_at(64), u64_at(68));
        if group == 0 {
            return Err("chunk index: groups of 0 chunks".into());
        }
        if chunking.fixed() && count as u64 != size.div_ceil(chunking.max as u64) {
            return Err(format!("chunk index: {count} blocks of {} bytes for {size} bytes", chunking.max));
        }
        if (count as u64) < size.div_ceil(chunking.max as u64) || count as u64 > size {
            return Err(format!("chunk index: {count} chunks cannot cover {size} bytes"));
        }
        let n = count.div_ceil(group) as usize;
        if b.len() != HEAD + n * GROUP_ENTRY {
            return Err(format!("chunk index: {} bytes for {n} groups (expected {})", b.len(), HEAD + n * GROUP_ENTRY));
        }
        let mut groups = Vec::with_capacity(n);
        for i in 0..n {
            let e = HEAD + i * GROUP_ENTRY;
            let g = Group {
                blocks: b[e..e + 32].try_into().unwrap(),
                entries: b[e + 32..e + 64].try_into().unwrap(),
                pack_offset: u64_at(e + 64),
            };
            let floor = groups.last().map_or(0, |p: &Group| p.pack_offset);
            if (i == 0 && g.pack_offset != 0) || g.pack_offset < floor || g.pack_offset > pack_size {
                return Err(format!("chunk index: group {i} starts at byte {} of the pack", g.pack_offset));
            }
            groups.push(g);
        }
        Ok(Head { artifact_sha256: b[8..40].try_into().unwrap(), size, chunking, count, group, pack_size, groups })
    }

    /// The chunks of group `g`.
    pub fn chunks_of(&self, g: usize) -> std::ops::Range<usize> {
        let start = g * self.group as usize;
        start..(start + self.group as usize).min(self.count as usize)
    }

    /// Where group `g`'s entries are in the leaves file.
    pub fn leaves_range(&self, g: usize) -> std::ops::Range<u64> {
        let r = self.chunks_of(g);
        (r.start * ENTRY) as u64..(r.end * ENTRY) as u64
    }

    /// Where group `g` ends in the pack.
    pub fn pack_end(&self, g: usize) -> u64 {
        self.groups.get(g + 1).map_or(self.pack_size, |n| n.pack_offset)
    }

    /// Group `g`'s entries, checked against the head: their digest, each chunk's sizes (a
    /// fixed-size chunk is a whole block but the artifact's last), and their packed sizes adding
    /// up to the group's room in the pack.
    pub fn decode_group(&self, g: usize, b: &[u8]) -> Result<Vec<Chunk>, String> {
        let r = self.chunks_of(g);
        if b.len() != r.len() * ENTRY || sha256(b) != self.groups[g].entries {
            return Err(format!("chunk index: the entries of group {g} do not match the index's digest of them"));
        }
        let mut out = Vec::with_capacity(r.len());
        for (k, e) in b.chunks(ENTRY).enumerate() {
            let i = r.start + k;
            let c = Chunk {
                sha256: e[..32].try_into().unwrap(),
                size: u32::from_le_bytes(e[32..36].try_into().unwrap()),
                packed: u32::from_le_bytes(e[36..40].try_into().unwrap()),
                packing: match e[40] {
                    0 => Packing::Stored,
                    1 => Packing::Zstd,
                    x => return Err(format!("chunk index: chunk {i} is packed in an unknown way ({x})")),
                },
            };
            // A fixed-size chunk is a whole block but the artifact's last (`decode` checked
            // that `count` blocks cover `size`).
            let block = self.chunking.max as u64;
            let fixed_size = self.size.saturating_sub(block * i as u64).min(block);
            if c.size == 0
                || c.size > self.chunking.max
                || (self.chunking.fixed() && c.size as u64 != fixed_size)
                || c.packed == 0
                || c.packed > c.size.saturating_add(1 << 10)
            {
                return Err(format!(
                    "chunk index: chunk {i} has impossible sizes ({} bytes, {} packed)",
                    c.size, c.packed
                ));
            }
            if c.packing == Packing::Stored && c.packed != c.size {
                return Err(format!("chunk index: stored chunk {i} has {} bytes packed as {}", c.size, c.packed));
            }
            out.push(c);
        }
        let packed: u64 = out.iter().map(|c| c.packed as u64).sum();
        if self.groups[g].pack_offset + packed != self.pack_end(g) {
            return Err(format!("chunk index: the chunks of group {g} do not fill its room in the pack"));
        }
        Ok(out)
    }
}

/// Cuts `source` into chunks the way an index with `chunking` was cut, calling `f(offset,
/// bytes)` for each. Reads as it goes (memory stays at a few chunks, whatever the size).
pub fn for_each_chunk<R: std::io::Read>(
    mut source: R,
    chunking: Chunking,
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if chunking.fixed() {
        let mut buf = vec![0u8; chunking.max as usize];
        let mut offset = 0u64;
        loop {
            // A short read is not the end: fill the block unless the source ended.
            let mut n = 0;
            while n < buf.len() {
                match source.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if n == 0 {
                return Ok(());
            }
            f(offset, &buf[..n])?;
            offset += n as u64;
            if n < buf.len() {
                return Ok(());
            }
        }
    }
    let cdc = fastcdc::v2020::StreamCDC::new(source, chunking.min, chunking.avg, chunking.max);
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            e => std::io::Error::other(e.to_string()),
        })?;
        f(c.offset, &c.data)?;
    }
    Ok(())
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Index {
        let c = |n: u8, size, packed, packing| Chunk { sha256: [n; 32], size, packed, packing };
        let mut chunks: Vec<Chunk> = (0..40).map(|i| c(i, 4096, 4096, Packing::Stored)).collect();
        chunks[3] = c(3, 4096, 100, Packing::Zstd);
        chunks.push(c(99, 10, 10, Packing::Stored));
        Index { artifact_sha256: [7; 32], size: 40 * 4096 + 10, chunking: BLOCKS, chunks }
    }

    #[test]
    fn an_index_round_trips_as_head_and_leaves_and_refuses_what_does_not_add_up() {
        let i = sample();
        let (head, leaves) = (i.head(), i.encode_leaves());
        let hb = head.encode();
        assert_eq!(hb.len(), HEAD + 2 * GROUP_ENTRY);
        let back = Head::decode(&hb).unwrap();
        assert_eq!(back, head);
        assert_eq!(Index::from_parts(&back, &leaves).unwrap(), i);
        assert_eq!(head.groups[1].pack_offset, 31 * 4096 + 100);
        assert_eq!(head.pack_size, i.pack_size());
        assert_eq!(head.chunks_of(1), 32..41);
        // One group alone, from its bytes of the leaves.
        let r = head.leaves_range(1);
        assert_eq!(head.decode_group(1, &leaves[r.start as usize..r.end as usize]).unwrap(), i.chunks[32..].to_vec());
        // A group's entries changed (a hash, a packed size): refused by the head's digest.
        let mut bad = leaves.clone();
        bad[10] ^= 1;
        assert!(Index::from_parts(&head, &bad).unwrap_err().contains("do not match"));
        // A head that lies: counts, offsets, chunking, magic.
        assert!(Head::decode(&hb[..hb.len() - 1]).unwrap_err().contains("bytes for 2 groups"));
        let mut h = head.clone();
        h.count = 40;
        assert!(Head::decode(&h.encode()).unwrap_err().contains("blocks of 4096"));
        let mut h = head.clone();
        h.groups[1].pack_offset = h.pack_size + 1;
        assert!(Head::decode(&h.encode()).unwrap_err().contains("group 1 starts"));
        let mut h = head.clone();
        h.chunking = Chunking { min: 10, avg: 5, max: 20 };
        assert!(Head::decode(&h.encode()).unwrap_err().contains("impossible chunking"));
        // Ordered, but outside what FastCDC accepts (it would panic, not refuse).
        h.chunking = Chunking { min: 64, avg: 128, max: 512 };
        assert!(Head::decode(&h.encode()).unwrap_err().contains("impossible chunking"));
        assert!(Head::decode(&[b'<'; 200]).unwrap_err().contains("bad magic"));
        // Entries whose sizes do not fit a fixed-block index, rehashed so the digest matches.
        let mut odd = i.clone();
        odd.chunks[5].size = 100;
        odd.chunks[5].packed = 100;
        let oh = odd.head();
        assert!(Index::from_parts(&oh, &odd.encode_leaves()).unwrap_err().contains("impossible sizes"));
        let mut lying = i.clone();
        lying.chunks[0].packed = 10;
        let lh = lying.head();
        assert!(Index::from_parts(&lh, &lying.encode_leaves()).unwrap_err().contains("stored chunk 0"));
    }

    #[test]
    fn chunks_are_cut_by_content_and_cover_the_source() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut seen = Vec::new();
        for_each_chunk(&data[..], CHUNKING, |o, b| {
            seen.push((o, b.len()));
            Ok(())
        })
        .unwrap();
        assert!(seen.len() > 3);
        assert_eq!(seen.iter().map(|(_, l)| l).sum::<usize>(), data.len());
        // The same cut for the same bytes behind an insertion.
        let mut moved = vec![0u8; 100];
        moved.extend_from_slice(&data);
        let mut again = Vec::new();
        for_each_chunk(&moved[..], CHUNKING, |_, b| {
            again.push(sha256(b));
            Ok(())
        })
        .unwrap();
        let last = &data[seen.last().unwrap().0 as usize..];
        assert_eq!(again.last().unwrap(), &sha256(last));
        // Fixed blocks: every one full but the last.
        let mut sizes = Vec::new();
        for_each_chunk(&data[..], BLOCKS, |o, b| {
            assert_eq!(o % 4096, 0);
            sizes.push(b.len());
            Ok(())
        })
        .unwrap();
        assert_eq!(sizes.len(), data.len().div_ceil(4096));
        assert!(sizes[..sizes.len() - 1].iter().all(|s| *s == 4096));
        assert_eq!(*sizes.last().unwrap(), data.len() % 4096);
    }
}
