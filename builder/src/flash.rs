//! `kiln flash IMAGE DEVICE`: writes a disk image to an SD card or USB stick, only the blocks
//! its block map ([`crate::bmap`], made at build time) lists, then reads every written range
//! back and compares its sha256 with the map.
//!
//! Order of events (nothing is written before the last check):
//! 1. The device: a block device, not the disk of the running system, not a partition, not
//!    mounted, used as swap or held by device-mapper/md (itself or any partition), not
//!    read-only, large enough for the image, and not larger than `--max-size` unless `--force`.
//! 2. The image against its map (size; every range's sha256 is checked while it is read), the
//!    image's partition table (its last partition is the data partition), the `--provision`
//!    directory ([`provision`]).
//! 3. Vendor, model and size, and a `[y/N]` question on the terminal unless `--yes`.
//! 4. `O_EXCL` open (the kernel refuses while anything has it mounted, and refuses mounts
//!    meanwhile), 4 MiB writes of the mapped ranges, `fsync`, the device's buffer cache dropped
//!    (`BLKFLSBUF`, `POSIX_FADV_DONTNEED`), every written range read back with `O_DIRECT` and
//!    hashed. Any difference is an error naming the range and both hashes.
//!
//! `--verify-only` does only the read-back, for a device flashed earlier; the data partition is
//! left out of it, since the device changes it as soon as it runs.

mod device;
pub mod provision;

use crate::bmap::{self, human_size, Bmap};
use crate::parttable::{self, Partition};
use crate::units::{Bytes, Sha256};
use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;
use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use device::{parse_mountinfo, BlockDevice, DevId, Mount};

/// Writes and reads go in chunks of this size (aligned for O_DIRECT).
const CHUNK: usize = 4 << 20;
/// O_DIRECT alignment: covers every logical block size in use (512 and 4096).
const ALIGN: u64 = 4096;

/// Write a disk image to an SD card or USB stick, only the blocks that carry data, and verify.
#[derive(clap::Args, Debug, Clone)]
pub struct FlashArgs {
    /// The disk image (disk.img of a build output).
    pub image: PathBuf,
    /// The whole device to write, like /dev/sdX or /dev/mmcblk0 (lsblk lists them).
    pub device: PathBuf,
    /// The image's block map (default: IMAGE.bmap next to the image, as builds write it).
    #[arg(long, value_name = "FILE")]
    pub bmap: Option<PathBuf>,
    /// Do not ask before writing (needed when stdin is not a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Write a device larger than --max-size.
    #[arg(long)]
    pub force: bool,
    /// Refuse devices larger than this unless --force: SD cards and USB sticks are smaller than
    /// the disks a mistake would wipe.
    #[arg(long, value_name = "SIZE", default_value = "256GiB", value_parser = Bytes::parse)]
    pub max_size: Bytes,
    /// Write nothing: read the device back and compare it with the image's map (the data
    /// partition is skipped: the device changes it once it runs).
    #[arg(long, conflicts_with = "provision")]
    pub verify_only: bool,
    /// Per-device files for the data partition, never the verified root: ssh/authorized_keys/<user>,
    /// backup/, wifi/, hostname (README: Flashing).
    #[arg(long, value_name = "DIR")]
    pub provision: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub written: u64,
    pub write: Duration,
    pub verified: u64,
    pub verify: Duration,
}

pub fn run(args: &FlashArgs) -> Result<()> {
    // 1. The device. The running system's disk is refused before anything else is looked at.
    let dev = BlockDevice::inspect(&args.device)?;
    device::refuse_system_disk(&dev)?;
    device::refuse_partition(&dev)?;
    device::refuse_in_use(&dev)?;
    if !args.verify_only {
        device::refuse_read_only(&dev)?;
    }
    let dev_size = dev.size()?;

    // 2. The image and its map.
    let bmap_path = match &args.bmap {
        Some(p) => p.clone(),
        None => find_bmap(&args.image)?,
    };
    let map = Bmap::read_xml(&bmap_path)?;
    let image = File::open(&args.image).with_context(|| format!("opening the image {}", args.image.display()))?;
    let image_len = image.metadata().with_context(|| format!("reading the size of {}", args.image.display()))?.len();
    if image_len != map.image_size {
        bail!(
            "{} is {image_len} bytes but its block map {} describes an image of {} bytes: {}",
            args.image.display(),
            bmap_path.display(),
            map.image_size,
            if image_len < map.image_size { "the image is truncated" } else { "the map belongs to another image" }
        );
    }
    if dev_size < map.image_size {
        bail!("refusing to write {}: it holds {} but the image needs {}; use a larger card", args.device.display(), human_size(dev_size), human_size(map.image_size));
    }
    if dev_size > args.max_size.0 && !args.force {
        bail!(
            "refusing to write {}: it is {}, larger than --max-size {} ({}), which is unusual for an SD card or USB stick; check that it is the right device, then pass --force (or a larger --max-size)",
            args.device.display(),
            human_size(dev_size),
            args.max_size,
            dev.model()
        );
    }
    let table = parttable::read(&mut &image, image_len).with_context(|| format!("reading the partition table of {}", args.image.display()))?;
    let data = table.as_ref().and_then(|t| t.last()).cloned();
    let provision = match &args.provision {
        Some(dir) => {
            let p = provision::Provision::load(dir)?;
            let part = data.clone().with_context(|| format!("{} has no partition table: --provision needs the image's data partition", args.image.display()))?;
            Some((p, part))
        }
        None => None,
    };

    // 3. Say what is about to happen, and ask.
    let model = dev.model();
    eprintln!("device  {}: {model}, {}{}", args.device.display(), human_size(dev_size), if dev.removable() { ", removable" } else { "" });
    eprintln!(
        "image   {}: {}, {} mapped ({:.1}%), map {}",
        args.image.display(),
        human_size(map.image_size),
        human_size(map.mapped_bytes()),
        map.mapped_bytes() as f64 * 100.0 / map.image_size as f64,
        bmap_path.display()
    );
    if let Some((p, part)) = &provision {
        eprintln!("data    partition {} ({}): a new ext4 filesystem holding {}", part.number, describe(part), p.dir.display());
    }

    let figures = if args.verify_only {
        let skip = data.as_ref().map(|p| p.start..p.end());
        if let Some(p) = &data {
            eprintln!("        the data partition {} ({}) is not compared: the device changes it once it runs", p.number, describe(p));
        }
        let file = open_device(&dev, false)?;
        let src = Source { file: &image, path: &args.image, map: &map, shift: 0, label: "image" };
        let pieces = transfer(&src, skip, None, None)?;
        let (verified, verify) = verify(&file, &dev, &pieces)?;
        Figures { written: 0, write: Duration::ZERO, verified, verify }
    } else {
        confirm(args, &model, dev_size)?;
        let data_fs = match &provision {
            Some((p, part)) => Some((p.build(part.size)?, part.clone())),
            None => None,
        };
        let file = open_device(&dev, true)?;
        let skip = data_fs.as_ref().map(|(_, part)| part.start..part.end());
        let total = kept_bytes(&map, skip.as_ref()) + data_fs.as_ref().map(|(fs, _)| fs.bmap.mapped_bytes()).unwrap_or(0);
        let mut meter = Meter::new("write", total);
        let src = Source { file: &image, path: &args.image, map: &map, shift: 0, label: "image" };
        let mut pieces = transfer(&src, skip, Some(&file), Some(&mut meter)).map_err(|e| anyhow::anyhow!("{e:#}; {}", partial_warning(&dev)))?;
        if let Some((fs, part)) = &data_fs {
            let f = File::open(&fs.image).with_context(|| format!("opening {}", fs.image.display()))?;
            let src = Source { file: &f, path: &fs.image, map: &fs.bmap, shift: part.start, label: "data partition" };
            pieces.extend(transfer(&src, None, Some(&file), Some(&mut meter)).map_err(|e| anyhow::anyhow!("{e:#}; {}", partial_warning(&dev)))?);
        }
        file.sync_all().with_context(|| format!("flushing the writes to {} (fsync)", args.device.display()))?;
        let write = meter.finish();
        drop_caches(&file);
        let (verified, verify) = verify(&file, &dev, &pieces)?;
        reread_partitions(&file);
        Figures { written: total, write, verified, verify }
    };
    print_figures(args, &dev, &map, &figures);
    Ok(())
}

/// `IMAGE.bmap`, else the image's name without its extension + `.bmap` (bmaptool's two guesses).
fn find_bmap(image: &Path) -> Result<PathBuf> {
    let a = bmap::default_path(image);
    let b = image.with_extension("bmap");
    for p in [&a, &b] {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    bail!(
        "{}: no block map next to it ({} or {}); kiln build writes one, or pass --bmap FILE (`bmaptool create` makes one)",
        image.display(),
        a.display(),
        b.display()
    )
}

fn describe(p: &Partition) -> String {
    let name = if p.name.is_empty() { String::new() } else { format!("\"{}\", ", p.name) };
    format!("{name}{} at byte {}", human_size(p.size), p.start)
}

fn partial_warning(dev: &BlockDevice) -> String {
    format!("{} now holds a partial image: do not boot it; flash it again with a good image", dev.path.display())
}

fn confirm(args: &FlashArgs, model: &str, size: u64) -> Result<()> {
    if args.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to write {} without confirmation: stdin is not a terminal; pass --yes once you are sure it is the right device",
            args.device.display()
        );
    }
    eprint!("Write {} to {} ({model}, {})? All data on it will be lost. [y/N] ", args.image.display(), args.device.display(), human_size(size));
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).context("reading the answer from the terminal")?;
    if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        bail!("not confirmed: nothing was written to {}", args.device.display());
    }
    Ok(())
}

/// Opens the device exclusively: the kernel refuses while it (or a partition) is mounted, and
/// refuses mounts while it is open.
fn open_device(dev: &BlockDevice, write: bool) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_EXCL | nix::libc::O_CLOEXEC)
        .open(&dev.path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                anyhow::anyhow!("{} is busy: the kernel refuses an exclusive open (mounted, or opened by another program such as an automounter); unmount it and try again", dev.path.display())
            } else {
                anyhow::Error::new(e).context(format!("opening {} (kiln flash needs root or the disk group)", dev.path.display()))
            }
        })?;
    let meta = file.metadata().with_context(|| format!("reading {}", dev.path.display()))?;
    if DevId::from_rdev(meta.rdev()) != dev.dev {
        bail!("{} changed while kiln was checking it (now device {}, was {}); run kiln flash again", dev.path.display(), DevId::from_rdev(meta.rdev()), dev.dev);
    }
    Ok(file)
}

nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Drops what the kernel caches of the device, so that the read-back comes from the device.
fn drop_caches(file: &File) {
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is an open block device.
    let flushed = unsafe { blkflsbuf(file.as_raw_fd()) };
    let advised = nix::fcntl::posix_fadvise(file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    if crate::exec::debug_enabled() {
        eprintln!("  | BLKFLSBUF: {flushed:?}, POSIX_FADV_DONTNEED: {advised:?}");
    }
}

/// Asks the kernel to read the new partition table (best effort: not every device has
/// partitions, e.g. a loop device without partition scanning).
fn reread_partitions(file: &File) {
    // SAFETY: BLKRRPART takes no argument; the descriptor is an open block device.
    let r = unsafe { blkrrpart(file.as_raw_fd()) };
    if crate::exec::debug_enabled() {
        eprintln!("  | BLKRRPART: {r:?}");
    }
}

/// A file of blocks to write: the image, or the data filesystem made for `--provision`.
struct Source<'a> {
    file: &'a File,
    path: &'a Path,
    map: &'a Bmap,
    /// Where the file's byte 0 goes on the device.
    shift: u64,
    /// For messages.
    label: &'a str,
}

/// A span written to the device and the sha256 it must read back as.
#[derive(Debug, Clone)]
struct Piece {
    start: u64,
    len: u64,
    sha256: Sha256,
    what: String,
}

/// The parts of `span` outside `skip`.
fn outside(span: Range<u64>, skip: Option<&Range<u64>>) -> Vec<Range<u64>> {
    let Some(s) = skip else { return vec![span] };
    let mut out = Vec::new();
    if span.start < s.start {
        out.push(span.start..span.end.min(s.start));
    }
    if span.end > s.end {
        out.push(span.start.max(s.end)..span.end);
    }
    out.retain(|r| r.start < r.end);
    out
}

fn kept_bytes(map: &Bmap, skip: Option<&Range<u64>>) -> u64 {
    map.ranges.iter().flat_map(|r| outside(map.bytes(r), skip)).map(|r| r.end - r.start).sum()
}

/// A buffer whose start is aligned for O_DIRECT.
struct AlignedBuf {
    raw: Vec<u8>,
    offset: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let raw = vec![0u8; CHUNK + ALIGN as usize];
        let offset = raw.as_ptr().align_offset(ALIGN as usize);
        AlignedBuf { raw, offset }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + CHUNK]
    }
}

/// Reads every mapped range of `src` (except what lies in `skip`), checks each range's sha256
/// against the map as it goes, and writes the bytes to `dev` at `shift` when given. Returns
/// the pieces written (or, without `dev`, those to compare), each with its expected hash.
/// A range cut by `skip` is still read whole, to check it against the map.
fn transfer(src: &Source, skip: Option<Range<u64>>, dev: Option<&File>, mut meter: Option<&mut Meter>) -> Result<Vec<Piece>> {
    let mut buf = AlignedBuf::new();
    let mut pieces = Vec::new();
    for r in &src.map.ranges {
        let span = src.map.bytes(r);
        let kept = outside(span.clone(), skip.as_ref());
        if kept.is_empty() {
            continue;
        }
        let cut = kept.len() != 1 || kept[0] != span;
        let what = |k: &Range<u64>| {
            if cut {
                format!("{} {r} (its bytes {}-{})", src.label, k.start, k.end - 1)
            } else {
                format!("{} {r}", src.label)
            }
        };
        if dev.is_none() && !cut {
            pieces.push(Piece { start: span.start + src.shift, len: span.end - span.start, sha256: r.sha256, what: what(&span) });
            continue;
        }
        let mut whole = sha2::Sha256::new();
        let mut parts: Vec<sha2::Sha256> = kept.iter().map(|_| sha2::Sha256::new()).collect();
        let mut pos = span.start;
        while pos < span.end {
            let mut next = span.end.min((pos / CHUNK as u64 + 1) * CHUNK as u64);
            if let Some(s) = &skip {
                for b in [s.start, s.end] {
                    if b > pos && b < next {
                        next = b;
                    }
                }
            }
            let n = (next - pos) as usize;
            let chunk = &mut buf.get()[..n];
            src.file.read_exact_at(chunk, pos).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    anyhow::anyhow!("{} ends before byte {next}, which its block map maps ({}): the image is truncated", src.path.display(), r)
                } else {
                    anyhow::Error::new(e).context(format!("reading bytes {pos}-{} of {}", next - 1, src.path.display()))
                }
            })?;
            whole.update(&*chunk);
            if let Some(i) = kept.iter().position(|k| k.contains(&pos)) {
                if let Some(d) = dev {
                    let at = pos + src.shift;
                    d.write_all_at(chunk, at).with_context(|| format!("writing {n} bytes at byte {at} of the device"))?;
                    if let Some(m) = meter.as_deref_mut() {
                        m.add(n as u64);
                    }
                }
                if cut {
                    parts[i].update(&*chunk);
                }
            }
            pos = next;
        }
        let got = Sha256(whole.finalize().into());
        if got != r.sha256 {
            bail!(
                "{}: {r} (bytes {}-{}) have sha256 {got} but the block map says {}: the image is damaged, or the map was made for another image",
                src.path.display(),
                span.start,
                span.end - 1,
                r.sha256
            );
        }
        if cut {
            for (k, h) in kept.iter().zip(parts) {
                pieces.push(Piece { start: k.start + src.shift, len: k.end - k.start, sha256: Sha256(h.finalize().into()), what: what(k) });
            }
        } else {
            pieces.push(Piece { start: span.start + src.shift, len: span.end - span.start, sha256: r.sha256, what: what(&span) });
        }
    }
    Ok(pieces)
}

/// Reads every piece back from the device with O_DIRECT and compares its sha256; every
/// difference is listed. Returns the bytes compared and the time it took.
fn verify(file: &File, dev: &BlockDevice, pieces: &[Piece]) -> Result<(u64, Duration)> {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    let direct = set_direct(file);
    if let Err(e) = &direct {
        eprintln!("        O_DIRECT is not available on {} ({e}): reading back through the (dropped) page cache", dev.path.display());
    }
    let mut meter = Meter::new("verify", total);
    let mut buf = AlignedBuf::new();
    let mut bad = Vec::new();
    for p in pieces {
        let got = read_back(file, p.start, p.len, &mut buf, &mut meter).with_context(|| format!("reading back {} from {}", p.what, dev.path.display()))?;
        if got != p.sha256 {
            bad.push(format!("{} at device bytes {}-{}: the device has sha256 {got}, the image {}", p.what, p.start, p.start + p.len - 1, p.sha256));
        }
    }
    let took = meter.finish();
    if !bad.is_empty() {
        bail!("verification failed: {} of {} ranges on {} differ from the image:\n  {}", bad.len(), pieces.len(), dev.path.display(), bad.join("\n  "));
    }
    Ok((total, took))
}

fn set_direct(file: &File) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT))?;
    Ok(())
}

/// The sha256 of `len` bytes at `start`, read in aligned chunks.
fn read_back(file: &File, start: u64, len: u64, buf: &mut AlignedBuf, meter: &mut Meter) -> Result<Sha256> {
    let end = start + len;
    let mut h = sha2::Sha256::new();
    let mut pos = start / ALIGN * ALIGN;
    while pos < end {
        let want = ((end - pos).div_ceil(ALIGN) * ALIGN).min(CHUNK as u64) as usize;
        let chunk = buf.get();
        let mut got = 0;
        while got < want {
            match file.read_at(&mut chunk[got..want], pos + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading byte {}", pos + got as u64)),
            }
        }
        let from = start.max(pos);
        let to = end.min(pos + want as u64);
        if pos + (got as u64) < to {
            bail!("the device ends at byte {}, before byte {to}", pos + got as u64);
        }
        h.update(&chunk[(from - pos) as usize..(to - pos) as usize]);
        meter.add(to - from);
        pos += want as u64;
    }
    Ok(Sha256(h.finalize().into()))
}

/// Progress on stderr: a bar on a terminal, a line every 10% otherwise (CI logs).
struct Meter {
    label: &'static str,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    next_line: u64,
    started: Instant,
}

impl Meter {
    fn new(label: &'static str, total: u64) -> Meter {
        let tty = std::io::stderr().is_terminal() && !crate::exec::debug_enabled();
        let bar = tty.then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{prefix:>8.bold} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(label);
            b
        });
        if bar.is_none() {
            eprintln!("==> {label}: {}", human_size(total));
        }
        Meter { label, bar, total, done: 0, next_line: total / 10, started: Instant::now() }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.set_position(self.done);
        } else if self.total > 0 && self.done >= self.next_line && self.done < self.total {
            eprintln!("    {} {:>3}% ({} of {})", self.label, self.done * 100 / self.total, human_size(self.done), human_size(self.total));
            while self.next_line <= self.done {
                self.next_line += (self.total / 10).max(1);
            }
        }
    }

    fn finish(self) -> Duration {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.started.elapsed()
    }
}

fn rate(bytes: u64, d: Duration) -> String {
    let s = d.as_secs_f64();
    if s <= 0.0 {
        return "-".into();
    }
    format!("{:.1} MB/s", bytes as f64 / 1e6 / s)
}

fn print_figures(args: &FlashArgs, dev: &BlockDevice, map: &Bmap, f: &Figures) {
    if args.verify_only {
        println!("verified {} against {}: {} match", args.device.display(), args.image.display(), human_size(f.verified));
    } else {
        println!("flashed {} to {} and verified it", args.image.display(), dev.path.display());
        println!(
            "  mapped   {} of {} ({:.1}%){}",
            human_size(map.mapped_bytes()),
            human_size(map.image_size),
            map.mapped_bytes() as f64 * 100.0 / map.image_size as f64,
            if args.provision.is_some() { ", data partition replaced by the provisioned filesystem" } else { "" }
        );
        println!("  write    {:.2} s  {} ({} written, fsync included)", f.write.as_secs_f64(), rate(f.written, f.write), human_size(f.written));
    }
    println!("  verify   {:.2} s  {} ({} read back with O_DIRECT)", f.verify.as_secs_f64(), rate(f.verified, f.verify), human_size(f.verified));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    #[test]
    fn spans_are_cut_around_the_skipped_partition() {
        let skip = 10..20;
        let one = |r: Range<u64>| vec![r];
        assert_eq!(outside(0..5, Some(&skip)), one(0..5));
        assert_eq!(outside(5..15, Some(&skip)), one(5..10));
        assert_eq!(outside(12..18, Some(&skip)), Vec::<Range<u64>>::new());
        assert_eq!(outside(5..25, Some(&skip)), [5..10, 20..25]);
        assert_eq!(outside(20..25, Some(&skip)), one(20..25));
        assert_eq!(outside(5..25, None), one(5..25));
    }

    /// A map with a range that straddles the skipped partition: the pieces to compare get the
    /// hashes of their own bytes, and the range is still checked whole against the map.
    #[test]
    fn cut_ranges_get_their_own_hashes_and_are_still_checked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let data: Vec<u8> = (0..3 * MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let map = crate::bmap::create(&img, &[]).unwrap();
        assert_eq!(map.ranges.len(), 1);
        let f = File::open(&img).unwrap();
        let src = Source { file: &f, path: &img, map: &map, shift: 0, label: "image" };
        let pieces = transfer(&src, Some(MIB..2 * MIB), None, None).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[0].start, pieces[0].len), (0, MIB));
        assert_eq!(pieces[0].sha256, Sha256::of(&data[..MIB as usize]));
        assert_eq!((pieces[1].start, pieces[1].len), (2 * MIB, MIB));
        assert_eq!(pieces[1].sha256, Sha256::of(&data[2 * MIB as usize..]));
        assert_eq!(pieces[1].what, format!("image blocks 0-767 (its bytes {}-{})", 2 * MIB, 3 * MIB - 1));
        // Uncut, nothing is read: the map's hash is the expectation.
        let whole = transfer(&src, None, None, None).unwrap();
        assert_eq!(whole[0].sha256, map.ranges[0].sha256);
        // A changed byte inside the skipped part is still noticed: the image no longer matches.
        let w = OpenOptions::new().write(true).open(&img).unwrap();
        w.write_all_at(b"!", MIB + 5).unwrap();
        let err = transfer(&src, Some(MIB..2 * MIB), None, None).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: blocks 0-767 (bytes 0-3145727) have sha256 ", img.display())), "{err}");
        assert!(err.ends_with(&format!("but the block map says {}: the image is damaged, or the map was made for another image", map.ranges[0].sha256)), "{err}");
    }

    #[test]
    fn read_back_hashes_unaligned_spans() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let data: Vec<u8> = (0..(MIB as usize + 1000)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let f = File::open(&img).unwrap();
        let mut buf = AlignedBuf::new();
        let mut meter = Meter { label: "t", bar: None, total: 0, done: 0, next_line: u64::MAX, started: Instant::now() };
        let h = read_back(&f, 5000, MIB - 4000, &mut buf, &mut meter).unwrap();
        assert_eq!(h, Sha256::of(&data[5000..(MIB as usize + 1000)]));
        assert_eq!(meter.done, MIB - 4000);
        let err = read_back(&f, MIB, 2000, &mut buf, &mut meter).unwrap_err().to_string();
        assert_eq!(err, format!("the device ends at byte {}, before byte {}", MIB + 1000, MIB + 2000));
    }
}
