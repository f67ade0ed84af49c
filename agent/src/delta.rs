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

use crate::download::{self, DownloadError, Pace, Pacer};
use anyhow::{Context as _, Result};
use kiln_feed::delta::{Chunk, Head, Packing, ENTRY};
use kiln_feed::{Artifact, Delta};
use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
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

/// A response body read under a [`Pacer`]: a read after which the pace is too slow fails.
struct Paced<'a, R> {
    inner: R,
    pacer: &'a mut Pacer,
}

impl<R: Read> Read for Paced<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(detail) = self.pacer.count(n as u64) {
            self.pacer.slow = Some(detail);
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "too slow"));
        }
        Ok(n)
    }
}

/// Reads `f` from `pos` to `end` with positional reads (a `&File` shares one cursor).
struct At<'a> {
    f: &'a std::fs::File,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Sends a Range request for `[start, end)` of `url`, checked by [`check_partial`].
fn send_range(client: &Client, url: &str, start: u64, end: u64) -> Result<reqwest::blocking::Response> {
    let resp = client
        .get(url)
        .header(RANGE, format!("bytes={start}-{}", end - 1))
        .send()
        .map_err(|e| DownloadError::Network { url: url.into(), source: e })?;
    check_partial(url, &resp, start)?;
    Ok(resp)
}

/// `[start, end)` of `url`, asked again from where a response ended early; given up (a
/// fallback) after [`ATTEMPTS`] responses in a row that brought nothing.
fn get_range(
    client: &Client,
    url: &str,
    (start, end): (u64, u64),
    pacer: &mut Pacer,
    requests: &mut u32,
) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut attempts = 0;
    while (body.len() as u64) < end - start {
        attempts += 1;
        if attempts > ATTEMPTS {
            return Err(fallback(format!(
                "{url}: the response to a Range request ended early {ATTEMPTS} times: a full download instead"
            )));
        }
        *requests += 1;
        let before = body.len();
        pacer.restart();
        let resp = send_range(client, url, start + before as u64, end)?;
        let want = end - start - before as u64;
        if let Err(e) = (Paced { inner: resp.take(want), pacer }).read_to_end(&mut body) {
            if let Some(e) = pacer.too_slow(url, body.len() as u64, end - start) {
                return Err(e);
            }
            println!("kiln-agent: {url}: the response ended early ({e}); asking again");
        }
        if body.len() > before {
            attempts = 0;
        }
    }
    Ok(body)
}

/// A Range response must be 206 for the bytes asked. 200 (the whole file), 416 (the file is
/// shorter than the signed metadata says) and other refusals (4xx) leave the delta path; a
/// server error (5xx) is tried again at the next check.
fn check_partial(url: &str, resp: &reqwest::blocking::Response, start: u64) -> Result<()> {
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            if download::range_start(resp) != Some(start) {
                let answered = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("no range");
                return Err(fallback(format!("{url}: asked for bytes from {start}, the server answered {answered:?}")));
            }
            Ok(())
        }
        StatusCode::RANGE_NOT_SATISFIABLE => Err(fallback(format!(
            "{url}: the file ends before byte {start}, shorter than the signed metadata says: a full download instead"
        ))),
        StatusCode::OK => Err(fallback(format!(
            "{url}: the server ignores Range requests (it answered 200 with the whole file): a full download instead"
        ))),
        s if s.is_client_error() => {
            Err(fallback(format!("{url}: the server answered {s} to a Range request: a full download instead")))
        }
        s => Err(DownloadError::Http { url: url.into(), status: s }.into()),
    }
}

/// The entries of the groups marked in `need`, checked against the head: one Range request
/// per run of groups, or all of them in one when most are needed.
fn fetch_leaves(
    client: &Client,
    url: &str,
    head: &Head,
    need: &[bool],
    chunks: &mut [Option<Chunk>],
    report: &mut Report,
    pacer: &mut Pacer,
) -> Result<()> {
    let wanted = need.iter().filter(|n| **n).count();
    if wanted == 0 {
        return Ok(());
    }
    let all = wanted * 2 > need.len();
    let want = |g: usize| all || need[g];
    let mut g = 0;
    while g < need.len() {
        if !want(g) {
            g += 1;
            continue;
        }
        let mut last = g;
        while last + 1 < need.len() && want(last + 1) {
            last += 1;
        }
        let (start, end) = (head.leaves_range(g).start, head.leaves_range(last).end);
        let body = get_range(client, url, (start, end), pacer, &mut report.requests)?;
        report.index_bytes += body.len() as u64;
        for k in (g..=last).filter(|&k| need[k]) {
            let r = head.leaves_range(k);
            let got = head
                .decode_group(k, &body[(r.start - start) as usize..(r.end - start) as usize])
                .map_err(|e| fallback(format!("{url}: {e} (tampered)")))?;
            for (i, c) in head.chunks_of(k).zip(got) {
                chunks[i] = Some(c);
            }
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

/// Where each chunk the device has is, by the first 8 bytes of its sha256: 16 bytes a chunk
/// (a multi-GiB root has a million blocks). Whatever it points at is read and hashed again in
/// full before it is used, so a shortened key can only cost a fetch.
#[derive(Default)]
struct Have(Vec<(u64, u64)>);

impl Have {
    const OFFSET_BITS: u32 = 48;

    fn key(h: &[u8; 32]) -> u64 {
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
    }

    fn add(&mut self, source: usize, offset: u64, h: &[u8; 32]) {
        self.0.push((Self::key(h), (source as u64) << Self::OFFSET_BITS | offset));
    }

    /// Ready for lookups (the first place of each chunk is kept).
    fn seal(&mut self) {
        self.0.sort_by_key(|e| e.0);
        self.0.dedup_by_key(|e| e.0);
    }

    fn get(&self, h: &[u8; 32]) -> Option<(usize, u64)> {
        let i = self.0.binary_search_by_key(&Self::key(h), |e| e.0).ok()?;
        let at = self.0[i].1;
        Some(((at >> Self::OFFSET_BITS) as usize, at & ((1 << Self::OFFSET_BITS) - 1)))
    }
}

/// One pass over the first `len` bytes of `f`, cut as `head` cuts: `each(offset, hash)` for
/// every chunk, and for fixed-size blocks the digest of the blocks at each of the artifact's
/// groups (`None` where `f` does not hold the whole group).
fn scan(
    f: &std::fs::File,
    len: u64,
    head: &Head,
    mut each: impl FnMut(u64, &[u8; 32]),
) -> std::io::Result<Vec<Option<[u8; 32]>>> {
    let mut groups = Vec::new();
    let mut current: Vec<[u8; 32]> = Vec::with_capacity(head.group as usize);
    let block = head.chunking.max as u64;
    let reader = std::io::BufReader::with_capacity(1 << 20, At { f, pos: 0, end: len });
    kiln_feed::delta::for_each_chunk(reader, head.chunking, |offset, data| {
        let h = kiln_feed::delta::sha256(data);
        each(offset, &h);
        let i = (offset / block) as usize;
        if head.chunking.fixed() && i < head.count as usize {
            current.push(h);
            if i + 1 == head.chunks_of(i / head.group as usize).end {
                groups.push(Some(kiln_feed::delta::blocks_digest(&current)));
                current.clear();
            }
        }
        Ok(())
    })?;
    if head.chunking.fixed() {
        groups.resize(head.groups.len(), None);
    }
    Ok(groups)
}

/// Assembles artifact `a` in `dest` from `sources` and the release's pack. `dest` is a
/// partition or a staging file (opened read-write); on success its first `a.size` bytes are
/// the artifact, checked against its sha256. A source that cannot be read is left out (its
/// chunks are fetched): a bad sector in the running slot must not stop every update.
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
    // Every chunk the device has (fixed-size blocks are cut the same way anywhere).
    let mut have = Have::default();
    // Per place (the target, then each source): the digest of its blocks at each group.
    let mut positional: Vec<Vec<Option<[u8; 32]>>> = Vec::new();
    if fixed {
        positional.push(if dest_len == 0 {
            Vec::new()
        } else {
            scan(dest, a.size.min(dest_len), &head, |_, _| {}).unwrap_or_default()
        });
    }
    for (i, (s, f)) in sources.iter().zip(&files).enumerate() {
        let scanned = match f {
            Some(f) => scan(f, s.len, &head, |o, h| have.add(i, o, h)).map_err(|e| e.to_string()),
            None => Err("it cannot be opened".to_string()),
        };
        positional.push(scanned.unwrap_or_else(|e| {
            println!("kiln-agent: delta: {} not read ({e}); what it holds is fetched instead", s.path.display());
            Vec::new()
        }));
    }
    have.seal();

    // A group whose blocks all match what a place holds at the same offsets needs neither its
    // entries nor its data: kept in place, or copied (read again and checked again against the
    // signed head: only bytes that match are written).
    let mut group_buf = Vec::new();
    for (g, needed) in need.iter_mut().enumerate().filter(|_| fixed) {
        let r = head.chunks_of(g);
        let (o, end) = (r.start as u64 * block, (r.end as u64 * block).min(a.size));
        for (p, digests) in positional.iter().enumerate() {
            if digests.get(g).copied().flatten() != Some(head.groups[g].blocks) {
                continue;
            }
            if p > 0 {
                let f = files[p - 1].as_ref().expect("scanned above");
                group_buf.resize((end - o) as usize, 0);
                let same = f.read_exact_at(&mut group_buf, o).is_ok()
                    && kiln_feed::delta::blocks_digest(
                        &group_buf.chunks(block as usize).map(kiln_feed::delta::sha256).collect::<Vec<_>>(),
                    ) == head.groups[g].blocks;
                if !same {
                    println!(
                        "kiln-agent: delta: {} read differently at byte {o} the second time; fetching those blocks",
                        sources[p - 1].path.display()
                    );
                    continue;
                }
                dest.write_all_at(&group_buf, o).map_err(io(format!("writing at byte {o}")))?;
                report.copied += end - o;
            } else {
                report.in_place += end - o;
            }
            done[r.clone()].fill(true);
            *needed = false;
            break;
        }
    }
    drop(positional);

    // The entries of the other groups (all of them for content-defined chunks).
    let mut pacer = Pacer::new(pace);
    let leaves_url = kiln_feed::join_url(metadata_url, &d.leaves);
    fetch_leaves(client, &leaves_url, &head, &need, &mut chunks, &mut report, &mut pacer)?;
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
        let Some((s, so)) = have.get(&c.sha256) else { continue };
        let Some(f) = &files[s] else { continue };
        if f.read_exact_at(&mut buf[..size], so).is_ok() && kiln_feed::delta::sha256(&buf[..size]) == c.sha256 {
            dest.write_all_at(&buf[..size], o).map_err(io(format!("writing at byte {o}")))?;
            done[i] = true;
            report.copied += size as u64;
        }
    }
    drop(have);

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
    let pack_read = pacer.total;
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
            pacer.restart();
            let resp = send_range(client, &pack_url, start, end)?;
            let mut body = Paced { inner: resp, pacer: &mut pacer };
            while next <= last {
                let Some(c) = chunks[next].as_ref() else { break };
                let mut packed = vec![0u8; c.packed as usize];
                if let Err(e) = body.read_exact(&mut packed) {
                    let got = body.pacer.total - pack_read;
                    if let Some(e) = body.pacer.too_slow(&pack_url, got, missing) {
                        return Err(e);
                    }
                    println!("kiln-agent: {pack_url}: the response ended early at chunk {next} ({e}); asking again");
                    break;
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
                // A response that brings chunks is not a failure, however it ends.
                attempts = 0;
            }
        }
    }
    report.pack_bytes = pacer.total - pack_read;

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
        /// Range requests of the pack are answered with this status.
        Refuse(u16),
        /// Ranged responses come a few bytes at a time, this many milliseconds apart.
        Trickle(u64),
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
                if let (Mode::Refuse(status), Some(_), true) = (mode, range, path.ends_with(".pack")) {
                    let _ = conn.write_all(
                        format!("HTTP/1.1 {status} No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
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
                if let (Mode::Trickle(ms), Some(_)) = (mode, range) {
                    for piece in part.chunks(16) {
                        if conn.write_all(piece).is_err() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                    }
                    continue;
                }
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
        run_with(c, served, mode, dest_init, false)
    }

    /// [`run`], with a pace of 1 MiB a second checked every second (for a trickling server),
    /// and, with `unreadable`, a first source that cannot be read (a directory).
    fn run_with(
        c: &Case,
        served: Served,
        mode: Mode,
        dest_init: &[u8],
        unreadable: bool,
    ) -> (Result<Report>, Vec<u8>, Vec<String>) {
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
        let pace = match mode {
            Mode::Trickle(_) => Pace {
                window: std::time::Duration::from_secs(1),
                min_bytes: 1 << 20,
                deadline: Instant::now() + std::time::Duration::from_secs(600),
            },
            _ => Pace {
                window: std::time::Duration::from_secs(60),
                min_bytes: 1,
                deadline: Instant::now() + std::time::Duration::from_secs(60),
            },
        };
        let mut sources = vec![Source { path: old, len: c.old.len() as u64 }];
        if unreadable {
            sources.insert(0, Source { path: dir.path().to_path_buf(), len: c.old.len() as u64 });
        }
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
        assert!(log[0].contains(".index None") && log[1].contains(".leaves Some((0, "), "{log:?}");
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

        // A server that ignores Range: given up at the first answer to one (the entries), not
        // read to the end.
        let (r, _, log) = run(&c, c.served.clone(), Mode::IgnoreRange, &[]);
        let e = r.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("ignores Range"), "{e:#}");
        assert_eq!(log.len(), 2, "{log:?}");

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
    fn refusals_fall_back_server_errors_and_slow_links_wait_for_the_next_check() {
        let c = case();
        // 403 to a Range request: this server will not serve parts; a full download instead.
        let e = run(&c, c.served.clone(), Mode::Refuse(403), &[]).0.unwrap_err();
        assert!(is_fallback(&e) && e.to_string().contains("403"), "{e:#}");
        // 503: the server is busy; the next check tries the delta again (chunks written stay).
        let e = run(&c, c.served.clone(), Mode::Refuse(503), &[]).0.unwrap_err();
        assert!(!is_fallback(&e) && format!("{e:#}").contains("503"), "{e:#}");
        // A few bytes every 200 ms, far below the pace: refused after a window, not after the
        // whole range crept in.
        let e = run(&c, c.served.clone(), Mode::Trickle(200), &[]).0.unwrap_err();
        assert!(matches!(e.downcast_ref::<DownloadError>(), Some(DownloadError::TooSlow { .. })), "{e:#}");
    }

    #[test]
    fn a_source_that_cannot_be_read_is_left_out() {
        let c = case();
        let (r, written, _) = run_with(&c, c.served.clone(), Mode::Honest, &[], true);
        let r = r.unwrap();
        assert_eq!(&written[..c.new.len()], &c.new[..]);
        assert!(r.copied > (1 << 20), "the readable source was used: {r:?}");
    }

    #[test]
    fn the_table_of_what_the_device_has_finds_each_chunk() {
        let mut have = Have::default();
        let hashes: Vec<[u8; 32]> = (0..1000u32).map(|i| kiln_feed::delta::sha256(&i.to_le_bytes())).collect();
        for (i, h) in hashes.iter().enumerate() {
            have.add(i % 3, i as u64 * 4096, h);
        }
        // The same chunk at a later place: the first place is kept.
        have.add(2, 1 << 40, &hashes[7]);
        have.seal();
        for (i, h) in hashes.iter().enumerate() {
            assert_eq!(have.get(h), Some((i % 3, i as u64 * 4096)));
        }
        assert_eq!(have.get(&kiln_feed::delta::sha256(b"absent")), None);
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
