//! Delta installs: an artifact assembled from what the device already has plus the chunks it
//! lacks, fetched with HTTP Range requests from the release's pack (`kiln_feed::delta`).
//!
//! 1. The chunk index is fetched and must match the signed metadata (size, sha256) and name the
//!    artifact being installed (an index of another release is refused).
//! 2. Chunks already in place in the destination (a previous attempt cut off by a power loss,
//!    or the release the other slot held before) are kept; the rest are looked up in the local
//!    sources (the running slot, cut the same way) and copied, each re-hashed on the way.
//! 3. What is left is fetched from the pack, one Range request per run of chunks (runs closer
//!    than [`MERGE_GAP`] are merged), each chunk decompressed and hashed before it is written.
//!    A response cut short is retried from the first chunk not yet written.
//! 4. The whole destination must then hash to the artifact's sha256.
//!
//! Anything the delta path cannot trust or use (an index that does not match, a chunk that
//! hashes wrong, a server that ignores Range, a delta larger than half the artifact, ranges cut
//! short again and again) is a [`Fallback`]: the caller downloads the whole artifact as before
//! and says why in the device's status. Nothing unverified is written as if it were verified:
//! a chunk is written only after its hash matched, and nothing boots before step 4.

use crate::download::{self, DownloadError, Pace};
use anyhow::{Context as _, Result};
use kiln_feed::delta::{Chunk, Chunking, Head, Packing, ENTRY};
use kiln_feed::{Artifact, Delta};
use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

/// Runs of missing chunks closer than this in the pack are fetched in one request (the bytes
/// between are read and dropped): fewer round trips for a few KiB more.
pub const MERGE_GAP: u64 = 8 << 10;
/// A range cut short is asked for again this many times before the delta is given up.
const ATTEMPTS: u32 = 4;

/// Data the device has: a file or block device, of which the first `len` bytes are indexed.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub len: u64,
}

/// Why the delta path was left for a full download (named in `kiln-agent status`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fallback(pub String);

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Bytes of the chunk index.
    pub index_bytes: u64,
    /// Bytes of the pack that came over the network (compressed chunks and merged gaps).
    pub pack_bytes: u64,
    pub requests: u32,
    /// Bytes of the artifact found in place, copied from the device's own data, and fetched.
    pub in_place: u64,
    pub copied: u64,
    pub fetched: u64,
    pub seconds: f64,
}

impl Report {
    pub fn downloaded(&self) -> u64 {
        self.index_bytes + self.pack_bytes
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "delta: {:.2} MiB downloaded in {} request(s) (index {:.2} MiB); {:.1} MiB in place, {:.1} MiB copied from this device, {:.2} MiB fetched; {:.1}s",
            mib(self.downloaded()),
            self.requests + 1,
            mib(self.index_bytes),
            mib(self.in_place),
            mib(self.copied),
            mib(self.fetched),
            self.seconds
        )
    }
}

fn fallback(s: String) -> anyhow::Error {
    anyhow::Error::new(Fallback(s))
}

/// Whether an error from [`install`] means "download the whole artifact instead".
pub fn is_fallback(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Fallback>().is_some()
}

/// Fetches and checks the head of `a`'s chunk index.
fn fetch_head(client: &Client, metadata_url: &str, a: &Artifact, d: &Delta) -> Result<Head> {
    let url = kiln_feed::join_url(metadata_url, &d.index);
    let bytes = match download::fetch_small(client, &url, d.index_size) {
        Ok(b) => b,
        Err(e) if e.downcast_ref::<DownloadError>().is_some_and(|d| matches!(d, DownloadError::Http { .. })) => {
            return Err(fallback(format!("chunk index {url}: {e:#}")))
        }
        Err(e) if format!("{e:#}").contains("larger than") => {
            return Err(fallback(format!(
                "chunk index {url} is larger than the signed metadata says ({} bytes)",
                d.index_size
            )))
        }
        Err(e) => return Err(e),
    };
    let sha = hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != d.index_size || sha != d.index_sha256 {
        return Err(fallback(format!(
            "chunk index {url} refused: {} bytes with sha256 {sha}, the signed metadata says {} bytes with {} (tampered, or replaced by another)",
            bytes.len(),
            d.index_size,
            d.index_sha256
        )));
    }
    let head = Head::decode(&bytes).map_err(|e| fallback(format!("{url}: {e}")))?;
    if hex::encode(head.artifact_sha256) != a.sha256 || head.size != a.size {
        return Err(fallback(format!(
            "chunk index {url} refused: it cuts artifact {} ({} bytes), not {} {} ({} bytes): an index of another release",
            hex::encode(head.artifact_sha256),
            head.size,
            a.name,
            a.sha256,
            a.size
        )));
    }
    if head.pack_size != d.pack_size || head.count as u64 * ENTRY as u64 != d.leaves_size {
        return Err(fallback(format!(
            "chunk index {url} refused: it needs a pack of {} bytes and {} entries, the signed metadata says {} and {} bytes of them",
            head.pack_size, head.count, d.pack_size, d.leaves_size
        )));
    }
    Ok(head)
}

/// One Range request: `[start, end)` of `url` into `out`, or why not. A response that ends
/// early gives what came (the caller asks again for the rest).
fn get_range(client: &Client, url: &str, start: u64, end: u64, out: &mut Vec<u8>) -> Result<()> {
    let resp = client
        .get(url)
        .header(RANGE, format!("bytes={start}-{}", end - 1))
        .send()
        .map_err(|e| DownloadError::Network { url: url.into(), source: e })?;
    check_partial(url, &resp, start)?;
    let _ = resp.take(end - start).read_to_end(out);
    Ok(())
}

/// A Range response must be 206 for the bytes asked; 200 (the whole file) and 416 (the file
/// is shorter than the signed metadata says) leave the delta path.
fn check_partial(url: &str, resp: &reqwest::blocking::Response, start: u64) -> Result<()> {
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            if download::range_start(resp) != Some(start) {
                return Err(fallback(format!(
                    "{url}: asked for bytes from {start}, the server answered {:?}",
                    resp.headers().get(CONTENT_RANGE)
                )));
            }
            Ok(())
        }
        StatusCode::RANGE_NOT_SATISFIABLE => Err(fallback(format!(
            "{url}: the file ends before byte {start}, shorter than the signed metadata says: a full download instead"
        ))),
        StatusCode::OK => Err(fallback(format!(
            "{url}: the server ignores Range requests (it answered 200 with the whole file): a full download instead"
        ))),
        s => Err(DownloadError::Http { url: url.into(), status: s }.into()),
    }
}

/// The entries of the groups marked in `need`, checked against the head: all of them in one
/// request when most are needed, else one Range request per run of groups.
fn fetch_leaves(
    client: &Client,
    url: &str,
    head: &Head,
    need: &[bool],
    chunks: &mut [Option<Chunk>],
    report: &mut Report,
) -> Result<()> {
    let wanted = need.iter().filter(|n| **n).count();
    if wanted == 0 {
        return Ok(());
    }
    let mut fill = |g: usize, bytes: &[u8]| -> Result<()> {
        let got = head.decode_group(g, bytes).map_err(|e| fallback(format!("{url}: {e} (tampered)")))?;
        for (i, c) in head.chunks_of(g).zip(got) {
            chunks[i] = Some(c);
        }
        Ok(())
    };
    if wanted * 2 > need.len() {
        let size = head.count as u64 * ENTRY as u64;
        let all = match download::fetch_small(client, url, size) {
            Ok(b) => b,
            Err(e) if e.downcast_ref::<DownloadError>().is_some_and(|d| matches!(d, DownloadError::Http { .. })) => {
                return Err(fallback(format!("chunk entries {url}: {e:#}")))
            }
            Err(e) => return Err(e),
        };
        report.index_bytes += all.len() as u64;
        report.requests += 1;
        if all.len() as u64 != size {
            return Err(fallback(format!("{url}: {} bytes, the index has {size} bytes of entries", all.len())));
        }
        for g in (0..need.len()).filter(|&g| need[g]) {
            let r = head.leaves_range(g);
            fill(g, &all[r.start as usize..r.end as usize])?;
        }
        return Ok(());
    }
    let mut g = 0;
    while g < need.len() {
        if !need[g] {
            g += 1;
            continue;
        }
        let mut last = g;
        while last + 1 < need.len() && need[last + 1] {
            last += 1;
        }
        let (start, end) = (head.leaves_range(g).start, head.leaves_range(last).end);
        let mut body = Vec::new();
        for attempt in 1..=ATTEMPTS {
            report.requests += 1;
            let from = start + body.len() as u64;
            get_range(client, url, from, end, &mut body)?;
            if body.len() as u64 == end - start {
                break;
            }
            if attempt == ATTEMPTS {
                return Err(fallback(format!(
                    "{url}: the response to a Range request ended early {ATTEMPTS} times: a full download instead"
                )));
            }
        }
        report.index_bytes += body.len() as u64;
        for k in g..=last {
            let r = head.leaves_range(k);
            fill(k, &body[(r.start - start) as usize..(r.end - start) as usize])?;
        }
        g = last + 1;
    }
    Ok(())
}

/// Decompresses (or takes) one packed chunk and checks it against the index.
fn unpack(packed: &[u8], packing: Packing, size: u32, sha256: &[u8; 32]) -> Option<Vec<u8>> {
    let data = match packing {
        Packing::Stored => packed.to_vec(),
        Packing::Zstd => {
            let mut out = Vec::with_capacity(size as usize);
            let dec = ruzstd::streaming_decoder::StreamingDecoder::new(packed).ok()?;
            dec.take(size as u64 + 1).read_to_end(&mut out).ok()?;
            out
        }
    };
    (data.len() == size as usize && kiln_feed::delta::sha256(&data) == *sha256).then_some(data)
}

/// Hashes of `f`'s chunks cut as `chunking` does over its first `len` bytes: (offset, hash).
fn hash_chunks(f: &std::fs::File, len: u64, chunking: Chunking) -> std::io::Result<Vec<(u64, [u8; 32])>> {
    let mut out = Vec::new();
    let reader = std::io::BufReader::with_capacity(1 << 20, f.take(len));
    kiln_feed::delta::for_each_chunk(reader, chunking, |offset, data| {
        out.push((offset, kiln_feed::delta::sha256(data)));
        Ok(())
    })?;
    Ok(out)
}

/// Assembles artifact `a` in `dest` from `sources` and the release's pack. `dest` is a
/// partition or a staging file (opened read-write); on success its first `a.size` bytes are
/// the artifact, checked against its sha256.
pub fn install(
    client: &Client,
    metadata_url: &str,
    a: &Artifact,
    d: &Delta,
    dest: &std::fs::File,
    sources: &[Source],
    pace: Pace,
) -> Result<Report> {
    let started = Instant::now();
    let mut report = Report::default();
    let head = fetch_head(client, metadata_url, a, d)?;
    report.index_bytes = d.index_size;
    let io = |what: String| move |e: std::io::Error| anyhow::anyhow!("{what}: {e}");
    let n = head.count as usize;
    let fixed = head.chunking.fixed();
    let block = head.chunking.max as u64;
    let dest_len = dest.metadata().map(|m| if m.is_file() { m.len() } else { u64::MAX }).unwrap_or(0);
    let mut buf = vec![0u8; head.chunking.max as usize];
    let mut done = vec![false; n];
    let mut chunks: Vec<Option<Chunk>> = vec![None; n];
    let mut need = vec![true; head.groups.len()];
    let files: Vec<Option<std::fs::File>> = sources.iter().map(|s| std::fs::File::open(&s.path).ok()).collect();
    // Every block the device has, by hash (fixed-size chunks are cut the same way anywhere).
    let mut have: HashMap<[u8; 32], (usize, u64)> = HashMap::new();
    let mut chunked_sources = false;

    if fixed {
        // What is where already: the target's blocks, and the running image's at the same
        // places. A group whose blocks all match needs neither its entries nor its data.
        let mut positional: Vec<Vec<Option<[u8; 32]>>> = Vec::new();
        let target: Vec<(u64, [u8; 32])> = if dest_len == 0 {
            Vec::new()
        } else {
            hash_chunks(dest, a.size.min(dest_len), head.chunking).unwrap_or_default()
        };
        positional.push(target.iter().map(|(_, h)| Some(*h)).collect());
        for (i, (s, f)) in sources.iter().zip(&files).enumerate() {
            let Some(f) = f else {
                println!("kiln-agent: delta: {} not read; its chunks will be fetched", s.path.display());
                positional.push(Vec::new());
                continue;
            };
            let hashes =
                hash_chunks(f, s.len, head.chunking).with_context(|| format!("reading {}", s.path.display()))?;
            positional.push(hashes.iter().map(|(_, h)| Some(*h)).collect());
            for (o, h) in hashes {
                have.entry(h).or_insert((i, o));
            }
        }
        chunked_sources = true;
        for (g, needed) in need.iter_mut().enumerate() {
            let r = head.chunks_of(g);
            // 0: the target itself; then each source.
            for (p, hashes) in positional.iter().enumerate() {
                let Some(hs) = r.clone().map(|i| hashes.get(i).copied().flatten()).collect::<Option<Vec<_>>>() else {
                    continue;
                };
                if kiln_feed::delta::blocks_digest(&hs) != head.groups[g].blocks {
                    continue;
                }
                for (i, h) in r.clone().zip(&hs) {
                    let (o, size) = (i as u64 * block, (a.size - i as u64 * block).min(block) as usize);
                    if p > 0 {
                        let f = files[p - 1].as_ref().expect("hashed above");
                        // Read again and hashed again: only bytes that match are written.
                        f.read_exact_at(&mut buf[..size], o)
                            .map_err(io(format!("reading {}", sources[p - 1].path.display())))?;
                        if kiln_feed::delta::sha256(&buf[..size]) != *h {
                            anyhow::bail!("{} changed while it was read", sources[p - 1].path.display());
                        }
                        dest.write_all_at(&buf[..size], o).map_err(io(format!("writing at byte {o}")))?;
                        report.copied += size as u64;
                    } else {
                        report.in_place += size as u64;
                    }
                    done[i] = true;
                }
                *needed = false;
                break;
            }
        }
    }

    // The entries of the other groups (all of them for content-defined chunks).
    let leaves_url = kiln_feed::join_url(metadata_url, &d.leaves);
    fetch_leaves(client, &leaves_url, &head, &need, &mut chunks, &mut report)?;
    // Offsets in the artifact and the pack of every chunk whose entry is known.
    let mut offset = vec![0u64; n];
    let mut pack_offset = vec![0u64; n];
    for g in (0..head.groups.len()).filter(|&g| need[g]) {
        let mut po = head.groups[g].pack_offset;
        for i in head.chunks_of(g) {
            pack_offset[i] = po;
            po += chunks[i].as_ref().map_or(0, |c| c.packed as u64);
        }
    }
    if fixed {
        for (i, o) in offset.iter_mut().enumerate() {
            *o = i as u64 * block;
        }
    } else {
        let mut o = 0;
        for (i, c) in chunks.iter().enumerate() {
            offset[i] = o;
            o += c.as_ref().map_or(0, |c| c.size as u64);
        }
        if o != a.size {
            return Err(fallback(format!("{leaves_url}: its chunks cover {o} bytes, the artifact has {}", a.size)));
        }
    }

    // Chunks of those groups: in place, copied from the device's own data, or missing.
    if !chunked_sources {
        for (idx, (s, f)) in sources.iter().zip(&files).enumerate() {
            let Some(f) = f else {
                println!("kiln-agent: delta: {} not read; its chunks will be fetched", s.path.display());
                continue;
            };
            for (o, h) in
                hash_chunks(f, s.len, head.chunking).with_context(|| format!("reading {}", s.path.display()))?
            {
                have.entry(h).or_insert((idx, o));
            }
        }
    }
    for i in 0..n {
        let Some(c) = chunks[i].as_ref().filter(|_| !done[i]) else { continue };
        let (o, size) = (offset[i], c.size as usize);
        if o + size as u64 <= dest_len
            && dest.read_exact_at(&mut buf[..size], o).is_ok()
            && kiln_feed::delta::sha256(&buf[..size]) == c.sha256
        {
            done[i] = true;
            report.in_place += size as u64;
            continue;
        }
        let Some(&(s, so)) = have.get(&c.sha256) else { continue };
        let Some(f) = &files[s] else { continue };
        if f.read_exact_at(&mut buf[..size], so).is_ok() && kiln_feed::delta::sha256(&buf[..size]) == c.sha256 {
            dest.write_all_at(&buf[..size], o).map_err(io(format!("writing at byte {o}")))?;
            done[i] = true;
            report.copied += size as u64;
        }
    }

    // The rest from the pack: one Range request per run of missing chunks (merged across
    // small gaps).
    let missing: u64 = (0..n).filter(|&i| !done[i]).map(|i| chunks[i].as_ref().map_or(0, |c| c.packed as u64)).sum();
    if missing > a.size / 2 {
        return Err(fallback(format!(
            "the delta is {missing} of {} bytes (more than half): a full download is simpler",
            a.size
        )));
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for i in (0..n).filter(|&i| !done[i]) {
        chunks[i].as_ref().context("a chunk with neither an entry nor data (index groups out of step)")?;
        match runs.last_mut() {
            Some((_, last))
                if pack_offset[i] >= pack_offset[*last]
                    && pack_offset[i]
                        - (pack_offset[*last] + chunks[*last].as_ref().map_or(0, |c| c.packed as u64))
                        <= MERGE_GAP
                    && (*last + 1..i).all(|k| chunks[k].is_some()) =>
            {
                *last = i
            }
            _ => runs.push((i, i)),
        }
    }
    let pack_url = kiln_feed::join_url(metadata_url, &d.pack);
    let (mut window_start, mut window_bytes) = (Instant::now(), 0u64);
    for (first, last) in runs {
        let mut next = first;
        let mut attempts = 0;
        while next <= last {
            attempts += 1;
            if attempts > ATTEMPTS {
                return Err(fallback(format!(
                    "{pack_url}: the response to a Range request ended early {ATTEMPTS} times (at chunk {next}): a full download instead"
                )));
            }
            let start = pack_offset[next];
            let end = pack_offset[last] + chunks[last].as_ref().map_or(0, |c| c.packed as u64);
            report.requests += 1;
            let resp = client
                .get(&pack_url)
                .header(RANGE, format!("bytes={start}-{}", end - 1))
                .send()
                .map_err(|e| DownloadError::Network { url: pack_url.clone(), source: e })?;
            check_partial(&pack_url, &resp, start)?;
            let mut body = resp;
            while next <= last {
                let Some(c) = chunks[next].as_ref() else { break };
                let n = c.packed as usize;
                let mut packed = vec![0u8; n];
                if let Err(e) = body.read_exact(&mut packed) {
                    println!("kiln-agent: {pack_url}: the response ended early at chunk {next} ({e}); asking again");
                    break;
                }
                report.pack_bytes += n as u64;
                window_bytes += n as u64;
                if let Some(detail) = download::too_slow(&pace, &mut window_start, &mut window_bytes) {
                    return Err(DownloadError::TooSlow {
                        url: pack_url.clone(),
                        got: report.pack_bytes,
                        expected: missing,
                        detail,
                    }
                    .into());
                }
                if !done[next] {
                    let data = unpack(&packed, c.packing, c.size, &c.sha256).ok_or_else(|| {
                        fallback(format!(
                            "{pack_url}: chunk {next} (bytes {}..{} of the pack) does not hash to the index's {}: tampered; a full download instead",
                            pack_offset[next],
                            pack_offset[next] + c.packed as u64,
                            hex::encode(c.sha256)
                        ))
                    })?;
                    dest.write_all_at(&data, offset[next]).map_err(io(format!("writing at byte {}", offset[next])))?;
                    done[next] = true;
                    report.fetched += c.size as u64;
                }
                next += 1;
            }
        }
    }

    // The whole artifact.
    dest.sync_data().map_err(io("syncing".into()))?;
    let mut h = Sha256::new();
    let mut big = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < a.size {
        let n = ((a.size - pos) as usize).min(big.len());
        dest.read_exact_at(&mut big[..n], pos).map_err(io(format!("re-reading byte {pos}")))?;
        h.update(&big[..n]);
        pos += n as u64;
    }
    let actual = hex::encode(h.finalize());
    if actual != a.sha256 {
        return Err(fallback(format!(
            "{}: assembled from chunks it hashes to {actual}, not {}: a full download instead",
            a.name, a.sha256
        )));
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Bytes of a root artifact (EROFS + dm-verity superblock and hash tree) whose hash tree starts
/// at `hash_offset` (the running kernel's `kiln.verity_offset=`): what to index of the running
/// root partition (the partition is larger).
pub fn root_extent(cmdline: &str) -> Option<u64> {
    let offset: u64 = crate::system::cmdline_value(cmdline, "kiln.verity_offset")?.parse().ok()?;
    Some(kiln_device::verity_image_size(offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_feed::delta::{Chunk, Index, CHUNKING};
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// What `kiln publish` writes, made here the same way (stored chunks, and zstd for the
    /// compressible ones).
    fn publish(data: &[u8]) -> (Index, Vec<u8>) {
        publish_with(data, CHUNKING)
    }

    fn publish_with(data: &[u8], chunking: kiln_feed::delta::Chunking) -> (Index, Vec<u8>) {
        let mut chunks = Vec::new();
        let mut pack = Vec::new();
        kiln_feed::delta::for_each_chunk(data, chunking, |_, c| {
            let z = zstd_like(c);
            let (packing, bytes) = match z {
                Some(z) => (Packing::Zstd, z),
                None => (Packing::Stored, c.to_vec()),
            };
            pack.extend_from_slice(&bytes);
            chunks.push(Chunk {
                sha256: kiln_feed::delta::sha256(c),
                size: c.len() as u32,
                packed: bytes.len() as u32,
                packing,
            });
            Ok(())
        })
        .unwrap();
        let index =
            Index { artifact_sha256: kiln_feed::delta::sha256(data), size: data.len() as u64, chunking, chunks };
        (index, pack)
    }

    /// A zstd frame (libzstd, as `kiln publish` makes them) when it is smaller.
    fn zstd_like(c: &[u8]) -> Option<Vec<u8>> {
        let z = zstd::bulk::compress(c, 9).unwrap();
        (z.len() < c.len()).then_some(z)
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Honest,
        IgnoreRange,
        /// Each ranged response ends after this many bytes.
        Cut(usize),
    }

    /// A loopback server of `files` (path -> bytes), logging each request's path and Range.
    fn serve(files: Vec<(&'static str, Vec<u8>)>, mode: Mode) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut path, mut range) = (String::new(), None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(p) = line.strip_prefix("GET ") {
                        path = p.split(' ').next().unwrap().to_string();
                    }
                    if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = r.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    }
                }
                log2.lock().unwrap().push(format!("{path} {range:?}"));
                let Some((_, body)) = files.iter().find(|(p, _)| *p == path) else {
                    let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                };
                if range.is_some_and(|(a, _)| a >= body.len()) && mode != Mode::IgnoreRange {
                    let _ = conn.write_all(
                        b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let (head, part) = match (range, mode) {
                    (Some((a, b)), m) if m != Mode::IgnoreRange => {
                        let b = b.min(body.len() - 1);
                        let part = &body[a..=b];
                        let send = match m {
                            Mode::Cut(n) => &part[..n.min(part.len())],
                            _ => part,
                        };
                        (
                            format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len(),
                                part.len()
                            ),
                            send,
                        )
                    }
                    _ => (
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()),
                        &body[..],
                    ),
                };
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(part);
            }
        });
        (base, log)
    }

    struct Case {
        old: Vec<u8>,
        new: Vec<u8>,
        artifact: Artifact,
        delta: Delta,
        index: Index,
        served: Served,
    }

    /// What the server holds: the index's head and leaves, and the pack.
    #[derive(Clone)]
    struct Served {
        head: Vec<u8>,
        leaves: Vec<u8>,
        pack: Vec<u8>,
    }

    /// An old artifact and a new one that differs in two places (one insertion, one run of
    /// zeros that compresses), published.
    fn case() -> Case {
        let old = noise(2 << 20, 5);
        let mut new = old.clone();
        new.splice(300_000..300_000, noise(5_000, 11));
        new[1_500_000..1_560_000].fill(0);
        case_of(old, new, CHUNKING)
    }

    fn case_of(old: Vec<u8>, new: Vec<u8>, chunking: kiln_feed::delta::Chunking) -> Case {
        let (index, pack) = publish_with(&new, chunking);
        let head = index.head().encode();
        let leaves = index.encode_leaves();
        let sha = hex::encode(kiln_feed::delta::sha256(&new));
        let artifact = Artifact {
            kind: kiln_feed::ArtifactKind::Root,
            name: "root.img".into(),
            url: format!("artifacts/{sha}"),
            size: new.len() as u64,
            sha256: sha.clone(),
            delta: None,
        };
        let delta = Delta {
            index: format!("chunks/{sha}.index"),
            index_size: head.len() as u64,
            index_sha256: hex::encode(kiln_feed::delta::sha256(&head)),
            leaves: format!("chunks/{sha}.leaves"),
            leaves_size: leaves.len() as u64,
            pack: format!("chunks/{sha}.pack"),
            pack_size: index.pack_size(),
        };
        Case { old, new, artifact, delta, index, served: Served { head, leaves, pack } }
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    fn run(c: &Case, served: Served, mode: Mode, dest_init: &[u8]) -> (Result<Report>, Vec<u8>, Vec<String>) {
        let files = vec![
            (leak(format!("/{}", c.delta.index)), served.head),
            (leak(format!("/{}", c.delta.leaves)), served.leaves),
            (leak(format!("/{}", c.delta.pack)), served.pack),
        ];
        let (base, log) = serve(files, mode);
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::write(&old, &c.old).unwrap();
        let dest_path = dir.path().join("dest");
        std::fs::write(&dest_path, dest_init).unwrap();
        let dest = std::fs::File::options().read(true).write(true).open(&dest_path).unwrap();
        let pace = Pace {
            window: std::time::Duration::from_secs(60),
            min_bytes: 1,
            deadline: Instant::now() + std::time::Duration::from_secs(60),
        };
        let sources = [Source { path: old, len: c.old.len() as u64 }];
        let r = install(
            &download::client().unwrap(),
            &format!("{base}/stable.json"),
            &c.artifact,
            &c.delta,
            &dest,
            &sources,
            pace,
        );
        drop(dest);
        let written = std::fs::read(&dest_path).unwrap();
        let log = log.lock().unwrap().clone();
        (r, written, log)
    }

    #[test]
    fn a_small_change_downloads_a_few_chunks_and_the_result_is_exact() {
        let c = case();
        let (r, written, log) = run(&c, c.served.clone(), Mode::Honest, &[]);
        let r = r.unwrap();
        assert_eq!(&written[..c.new.len()], &c.new[..]);
        assert!(r.copied > (1 << 20), "most of it copied from the old data: {r:?}");
        assert!(r.fetched < 300_000, "only the changed chunks fetched: {r:?}");
        assert!(r.pack_bytes < r.fetched, "the run of zeros came compressed: {r:?}");
        // The head, all entries (content-defined chunks have no places to compare), then one
        // Range request per run (two changes: at most two runs).
        assert!(log[0].contains(".index None") && log[1].contains(".leaves None"), "{log:?}");
        assert!((3..=4).contains(&log.len()) && log[2..].iter().all(|l| l.contains(".pack Some")), "{log:?}");
        assert_eq!(r.requests as usize, log.len() - 1);
        // Run again over the finished destination: everything is in place, no pack request.
        let (r, written, log) = run(&c, c.served.clone(), Mode::Honest, &written);
        let r = r.unwrap();
        assert_eq!(r.in_place, c.new.len() as u64);
        assert_eq!((r.copied, r.fetched, r.pack_bytes, log.len()), (0, 0, 0, 2));
        assert_eq!(&written[..c.new.len()], &c.new[..]);
    }

    #[test]
    fn tampering_and_unhelpful_servers_fall_back_to_a_full_download() {
        let c = case();
        // A chunk of the pack changed (the one at the insertion, which the device needs):
        // refused before it is written.
        let mut served = c.served.clone();
        let (mut offset, mut pack_offset) = (0u64, 0u64);
        for ch in &c.index.chunks {
            if offset + ch.size as u64 > 300_000 {
                break;
            }
            offset += ch.size as u64;
            pack_offset += ch.packed as u64;
        }
        served.pack[pack_offset as usize + 10] ^= 1;
        let e = run(&c, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("does not hash to the index"), "{e:#}");

        // The head changed: its sha256 no longer matches the metadata.
        let mut served = c.served.clone();
        served.head[100] ^= 1;
        let e = run(&c, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("tampered, or replaced"), "{e:#}");

        // An entry changed (one chunk's hash): its group no longer matches the head.
        let mut served = c.served.clone();
        served.leaves[10] ^= 1;
        let e = run(&c, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("do not match the index's digest"), "{e:#}");

        // The index of another release, with metadata that vouches for it: the artifact differs.
        let other = publish(&c.old).0.head().encode();
        let mut c2 = case();
        c2.delta.index_size = other.len() as u64;
        c2.delta.index_sha256 = hex::encode(kiln_feed::delta::sha256(&other));
        let served = Served { head: other, ..c.served.clone() };
        let e = run(&c2, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("an index of another release"), "{e:#}");

        // A server that ignores Range: given up at the first answer to one, not read to the end.
        let (r, _, log) = run(&c, c.served.clone(), Mode::IgnoreRange, &[]);
        let e = r.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("ignores Range"), "{e:#}");
        assert_eq!(log.len(), 3, "{log:?}");

        // Every range answer cut short after 1000 bytes: asked again, then given up.
        let (r, _, log) = run(&c, c.served.clone(), Mode::Cut(1000), &[]);
        let e = r.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("ended early"), "{e:#}");
        assert!(log.len() >= 2 + ATTEMPTS as usize, "{log:?}");

        // A pack shorter than the metadata says (the server answers 416 past its end).
        let mut served = c.served.clone();
        served.pack.truncate(1000);
        let e = run(&c, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("shorter than the signed metadata"), "{e:#}");

        // An empty answer where the head should be: a full download.
        let served = Served { head: Vec::new(), ..c.served.clone() };
        let e = run(&c, served, Mode::Honest, &[]).0.unwrap_err();
        assert!(is_fallback(&e), "{e:#}");
    }

    #[test]
    fn fixed_blocks_find_moved_blocks_like_a_file_system_image() {
        // As in EROFS: two blocks inserted (everything after moves by 8 KiB) and one block
        // changed in place; an unaligned tail.
        let old = noise((1 << 20) + 100, 21);
        let mut new = old.clone();
        new.splice(40_960..40_960, noise(8192, 22));
        new[500 * 1024..501 * 1024].fill(1);
        let c = case_of(old, new, kiln_feed::delta::BLOCKS);
        let (r, written, _) = run(&c, c.served.clone(), Mode::Honest, &[]);
        let r = r.unwrap();
        assert_eq!(&written[..c.new.len()], &c.new[..]);
        assert_eq!(r.fetched, 3 * 4096, "the two new blocks and the changed one: {r:?}");
    }

    #[test]
    fn groups_a_device_has_in_place_need_no_entries() {
        // One block changed where it was (a configuration-only release): the head, the
        // entries of that block's group alone, and the block.
        let old = noise(1 << 20, 31);
        let mut new = old.clone();
        new[100 * 4096..101 * 4096].fill(3);
        let c = case_of(old, new, kiln_feed::delta::BLOCKS);
        let (r, written, log) = run(&c, c.served.clone(), Mode::Honest, &[]);
        let r = r.unwrap();
        assert_eq!(written, c.new);
        assert_eq!(r.fetched, 4096, "{r:?}");
        let group = kiln_feed::delta::GROUP as u64 * ENTRY as u64;
        assert_eq!(r.index_bytes, c.served.head.len() as u64 + group, "{r:?}");
        let first = 3 * group; // block 100 is in group 3 (of 32 blocks each)
        assert_eq!(log[1], format!("/{} Some(({first}, {}))", c.delta.leaves, first + group - 1), "{log:?}");
        assert_eq!(log.len(), 3, "{log:?}");
    }

    #[test]
    fn a_delta_larger_than_half_is_not_attempted() {
        let mut c = case();
        c.old = noise(2 << 20, 99); // nothing in common
        let (r, _, log) = run(&c, c.served.clone(), Mode::Honest, &[]);
        let e = r.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("more than half"), "{e:#}");
        assert_eq!(log.len(), 2, "only the index was fetched: {log:?}");
    }

    #[test]
    fn the_root_extent_follows_the_kernel_command_line() {
        let off = 100 * 4096;
        assert_eq!(
            root_extent(&format!("quiet kiln.verity=ab kiln.verity_offset={off}")),
            Some(kiln_device::verity_image_size(off))
        );
        assert_eq!(root_extent("quiet"), None);
    }
}
