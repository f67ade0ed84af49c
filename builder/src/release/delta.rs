//! `kiln delta OLD NEW`: how much of a new release a device that runs the old one would have to
//! download if it fetched only what it does not have (issue 19, "measure first"). For each
//! artifact a device downloads (root.img, the UKI or the Pi's boot.img) it counts the bytes of
//! the new file that are not in the old one, two ways: fixed 4 KiB blocks (what a block-hash
//! index finds) and content-defined chunks (FastCDC at 4, 16 and 64 KiB on average: what a chunk
//! index finds when a change shifts the data after it).

use anyhow::{bail, Context as _, Result};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Average chunk sizes measured (min = avg / 4, max = avg * 4, as FastCDC suggests).
pub const CDC_AVERAGES: &[usize] = &[4 << 10, 16 << 10, 64 << 10];
const BLOCK: usize = 4096;

/// One artifact's figures. New content that appears twice counts once (a content-addressed
/// download fetches it once); nothing is credited across artifacts (the old root's bytes do not
/// count for the UKI), so the figures are a slight upper bound.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Measure {
    /// "root.img", "kiln-0.2.0.efi", "boot.img".
    pub name: String,
    pub size: u64,
    /// Bytes of the new file in 4 KiB blocks (at 4 KiB offsets) that the old file does not hold.
    pub block_new: u64,
    /// Per [`CDC_AVERAGES`].
    pub cdc: Vec<Chunked>,
}

/// The figures at one average chunk size.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Chunked {
    pub average: usize,
    /// Bytes of the new file's chunks that the old file does not hold.
    pub new_bytes: u64,
    /// Chunks in the new file.
    pub chunks: usize,
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// The figures for `new` against `old`.
pub fn measure(name: &str, old: &[u8], new: &[u8]) -> Measure {
    let mut have: HashSet<[u8; 32]> = old.chunks(BLOCK).map(digest).collect();
    // `insert` is true for content not had yet: counted once, then had.
    let block_new = new.chunks(BLOCK).filter(|b| have.insert(digest(b))).map(|b| b.len() as u64).sum();
    let cdc = CDC_AVERAGES
        .iter()
        .map(|&avg| {
            let chunks = |data: &[u8]| -> Vec<(usize, usize)> {
                fastcdc::v2020::FastCDC::new(data, avg as u32 / 4, avg as u32, avg as u32 * 4)
                    .map(|c| (c.offset, c.length))
                    .collect()
            };
            let mut have: HashSet<[u8; 32]> = chunks(old).into_iter().map(|(o, l)| digest(&old[o..o + l])).collect();
            let new_chunks = chunks(new);
            let missing =
                new_chunks.iter().filter(|(o, l)| have.insert(digest(&new[*o..*o + *l]))).map(|(_, l)| *l as u64).sum();
            Chunked { average: avg, new_bytes: missing, chunks: new_chunks.len() }
        })
        .collect();
    Measure { name: name.to_string(), size: new.len() as u64, block_new, cdc }
}

/// What a device downloads, from one build output.
struct Artifacts {
    root: PathBuf,
    /// The UKI (UEFI) or boot.img (Raspberry Pi): (the kind, its file).
    boot: Option<(&'static str, PathBuf)>,
}

/// The artifacts of a build output: root.img, and its one UKI (`kiln-<version>.efi`) or boot.img.
fn artifacts(dir: &Path) -> Result<Artifacts> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let root = dir.join("root.img");
    if !root.is_file() {
        bail!("{} holds no root.img: expected a build output such as out/minimal-pc-uefi", dir.display());
    }
    let ukis: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "efi")).collect();
    if ukis.len() > 1 {
        bail!("{} holds {} UKIs (*.efi): a build output has one", dir.display(), ukis.len());
    }
    let boot = match (ukis.into_iter().next(), dir.join("boot.img")) {
        (Some(uki), _) => Some(("UKI", uki)),
        (None, img) if img.is_file() => Some(("boot.img", img)),
        _ => None,
    };
    Ok(Artifacts { root, boot })
}

/// Compares two build outputs (`out/<profile>-<image>` of two releases), artifact by artifact.
pub fn compare(old_dir: &Path, new_dir: &Path) -> Result<Vec<Measure>> {
    let (old, new) = (artifacts(old_dir)?, artifacts(new_dir)?);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut out = vec![measure("root.img", &read(&old.root)?, &read(&new.root)?)];
    match (&old.boot, &new.boot) {
        // The UKI is named by version: the old output's one is the new one's counterpart.
        (Some((a, o)), Some((b, n))) if a == b => out.push(measure(&name(n), &read(o)?, &read(n)?)),
        (None, None) => {}
        (o, n) => bail!(
            "{} has {} and {} has {}: two outputs of different kinds of image (compare builds of one profile and image)",
            old_dir.display(),
            o.as_ref().map_or("no UKI or boot.img", |(k, _)| *k),
            new_dir.display(),
            n.as_ref().map_or("no UKI or boot.img", |(k, _)| *k),
        ),
    }
    Ok(out)
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{:.2} %", 100.0 * part as f64 / whole as f64)
}

/// The figures as a table, with the total a device would download.
pub fn report(measures: &[Measure]) -> String {
    let mut rows = vec![{
        let mut h = vec!["ARTIFACT".to_string(), "SIZE".into(), "NEW 4K BLOCKS".into()];
        h.extend(CDC_AVERAGES.iter().map(|a| format!("NEW CDC {}K", a >> 10)));
        h
    }];
    let total_size: u64 = measures.iter().map(|m| m.size).sum();
    for m in measures {
        let mut r = vec![m.name.clone(), mib(m.size), format!("{} ({})", mib(m.block_new), pct(m.block_new, m.size))];
        r.extend(m.cdc.iter().map(|c| format!("{} ({})", mib(c.new_bytes), pct(c.new_bytes, m.size))));
        rows.push(r);
    }
    let block: u64 = measures.iter().map(|m| m.block_new).sum();
    let mut total = vec!["total".to_string(), mib(total_size), format!("{} ({})", mib(block), pct(block, total_size))];
    for i in 0..CDC_AVERAGES.len() {
        let b: u64 = measures.iter().map(|m| m.cdc[i].new_bytes).sum();
        total.push(format!("{} ({})", mib(b), pct(b, total_size)));
    }
    rows.push(total);
    let widths: Vec<usize> = (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| {
            r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
                + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise (xorshift), so the test data has no repeats of its own.
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

    #[test]
    fn an_insertion_costs_a_few_chunks_but_every_block_after_it() {
        let old = noise(4 << 20, 7);
        let mut new = old.clone();
        // 100 bytes inserted at 1 MiB: everything after it moves.
        new.splice(1 << 20..1 << 20, noise(100, 9));
        let m = measure("root.img", &old, &new);
        assert_eq!(m.size, (4 << 20) + 100);
        assert!(m.block_new > 3 << 20, "fixed blocks: all of the last 3 MiB is new: {}", m.block_new);
        for c in &m.cdc {
            assert!(c.new_bytes <= 3 * 4 * c.average as u64, "CDC {}: {} new bytes", c.average, c.new_bytes);
            assert!(c.chunks > (4 << 20) / (c.average * 4));
        }
        // Identical files: nothing new either way.
        let same = measure("x", &old, &old);
        assert_eq!(same.block_new, 0);
        assert!(same.cdc.iter().all(|c| c.new_bytes == 0));
        // New content twice counts once.
        let block = noise(4096, 3);
        let twice = [old.clone(), block.clone(), block].concat();
        assert_eq!(measure("x", &old, &twice).block_new, 4096);
        // An in-place change of one byte: one block.
        let mut poked = old.clone();
        poked[12345] ^= 1;
        assert_eq!(measure("x", &old, &poked).block_new, 4096);
        let r = report(&[m]);
        assert!(r.starts_with("ARTIFACT  SIZE"), "{r}");
        assert!(r.lines().last().unwrap().starts_with("total"), "{r}");
    }
}
