//! `kiln flash IMAGE DEVICE`: writes a disk image to an SD card or USB stick, only the blocks
//! its block map ([`crate::flash::bmap`], made at build time) lists, then reads every written range
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

pub mod bmap;
mod device;
pub mod provision;

use crate::parttable::{self, Partition};
use crate::units::{Bytes, Sha256};
use anyhow::{bail, Context as _, Result};
use bmap::{human_size, Bmap};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;
use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
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
    if dev_size == 0 {
        bail!("refusing to write {}: it has no medium (size 0): is the card in the reader?", args.device.display());
    }
    if dev_size < map.image_size {
        bail!(
            "refusing to write {}: it holds {} but the image needs {}; use a larger card",
            args.device.display(),
            human_size(dev_size),
            human_size(map.image_size)
        );
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
    let table = parttable::read(&mut &image, image_len)
        .with_context(|| format!("reading the partition table of {}", args.image.display()))?;
    let data = table.as_ref().and_then(|t| t.last()).cloned();
    let provision = match &args.provision {
        Some(dir) => {
            if !nix::unistd::geteuid().is_root() {
                bail!("--provision needs root, or kiln's user namespace: the files on the device must belong to root");
            }
            let (id, made) = provision::ensure_device_id(dir)?;
            if made {
                eprintln!(
                    "device-id {id}: made in {} (the device's backup identity: keep it with the directory, so this device flashed again restores its own backups)",
                    dir.join(provision::DEVICE_ID).display()
                );
            }
            let p = provision::Provision::load(dir)?;
            let part = data.clone().with_context(|| {
                format!("{} has no partition table: --provision needs the image's data partition", args.image.display())
            })?;
            Some((p, part))
        }
        None => None,
    };

    // 3. Say what is about to happen, and ask.
    let model = dev.model();
    eprintln!(
        "device  {}: {model}, {}{}",
        args.device.display(),
        human_size(dev_size),
        if dev.removable() { ", removable" } else { "" }
    );
    eprintln!(
        "image   {}: {}, {} mapped ({:.1}%), map {}",
        args.image.display(),
        human_size(map.image_size),
        human_size(map.mapped_bytes()),
        map.mapped_bytes() as f64 * 100.0 / map.image_size as f64,
        bmap_path.display()
    );
    if let Some((p, part)) = &provision {
        eprintln!(
            "data    partition {} ({}): a new ext4 filesystem holding {}",
            part.number,
            describe(part),
            p.dir.display()
        );
    }

    let figures = if args.verify_only {
        let skip = data.as_ref().map(|p| p.start..p.end());
        if let Some(p) = &data {
            eprintln!(
                "        the data partition {} ({}) is not compared: the device changes it once it runs",
                p.number,
                describe(p)
            );
        }
        let file = open_device(&dev, false)?;
        let src = Source { file: &image, path: &args.image, map: &map, shift: 0, label: "image" };
        let pieces = plan_pieces(&src, skip.as_ref())?;
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
        let total =
            kept_bytes(&map, skip.as_ref()) + data_fs.as_ref().map(|(fs, _)| fs.bmap.mapped_bytes()).unwrap_or(0);
        let mut meter = Meter::new("write", total);
        let src = Source { file: &image, path: &args.image, map: &map, shift: 0, label: "image" };
        let mut pieces = write_source(&src, skip.as_ref(), &file, &mut meter)
            .map_err(|e| anyhow::anyhow!("{e:#}; {}", partial_warning(&dev)))?;
        if let Some((fs, part)) = &data_fs {
            let f = File::open(&fs.image).with_context(|| format!("opening {}", fs.image.display()))?;
            let src = Source { file: &f, path: &fs.image, map: &fs.bmap, shift: part.start, label: "data partition" };
            pieces.extend(
                write_source(&src, None, &file, &mut meter)
                    .map_err(|e| anyhow::anyhow!("{e:#}; {}", partial_warning(&dev)))?,
            );
        }
        meter.note("syncing (waiting for the device to store the last writes)");
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
    eprint!(
        "Write {} to {} ({model}, {})? All data on it will be lost. [y/N] ",
        args.image.display(),
        args.device.display(),
        human_size(size)
    );
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
        bail!(
            "{} changed while kiln was checking it (now device {}, was {}); run kiln flash again",
            dev.path.display(),
            DevId::from_rdev(meta.rdev()),
            dev.dev
        );
    }
    // The same device number may be another medium by now (a card swapped while the prompt
    // waited, a loop device attached to another file): the sequence number tells.
    if let Some(seen) = dev.diskseq {
        let mut now = 0u64;
        // SAFETY: BLKGETDISKSEQ writes one u64 through the pointer.
        if unsafe { blkgetdiskseq(file.as_raw_fd(), &mut now) }.is_ok() && now != seen {
            bail!(
                "{} is another disk than the one checked (the kernel's disk sequence number went from {seen} to {now}: a card or stick was swapped, or the device re-attached); nothing was written; run kiln flash again",
                dev.path.display()
            );
        }
    }
    Ok(file)
}

nix::ioctl_read!(blkgetdiskseq, 0x12, 128, u64);
nix::ioctl_none!(blkflsbuf, 0x12, 97);
nix::ioctl_none!(blkrrpart, 0x12, 95);

/// Drops what the kernel caches of the device, so that the read-back comes from the device.
fn drop_caches(file: &File) {
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is an open block device.
    let flushed = unsafe { blkflsbuf(file.as_raw_fd()) };
    let advised = nix::fcntl::posix_fadvise(file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    if crate::host::exec::debug_enabled() {
        eprintln!("  | BLKFLSBUF: {flushed:?}, POSIX_FADV_DONTNEED: {advised:?}");
    }
}

/// Asks the kernel to read the new partition table (best effort: not every device has
/// partitions, e.g. a loop device without partition scanning).
fn reread_partitions(file: &File) {
    // SAFETY: BLKRRPART takes no argument; the descriptor is an open block device.
    let r = unsafe { blkrrpart(file.as_raw_fd()) };
    if crate::host::exec::debug_enabled() {
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

/// How many chunk buffers travel between the two threads of a pipeline.
const BUFFERS: usize = 4;
/// Written bytes handed to the kernel's writeback at a time (see [`writeback`]).
const WRITEBACK_WINDOW: u64 = 32 << 20;

/// Reads every mapped range of `src` (except what lies in `skip`) in chunks and checks each
/// range's sha256 against the map as it goes. `sink(buffer, length, device offset)` gets every
/// chunk to write and hands back a buffer for the next one. Returns the pieces to compare after
/// writing, each with its expected hash. A range cut by `skip` is still read whole, to check it
/// against the map; with `read_uncut` false, ranges `skip` does not cut are not read at all
/// (their expected hash is the map's).
fn read_ranges(
    src: &Source,
    skip: Option<&Range<u64>>,
    read_uncut: bool,
    mut sink: impl FnMut(AlignedBuf, usize, u64) -> Result<AlignedBuf>,
) -> Result<Vec<Piece>> {
    let mut buf = AlignedBuf::new();
    let mut pieces = Vec::new();
    for r in &src.map.ranges {
        let span = src.map.bytes(r);
        let kept = outside(span.clone(), skip);
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
        if !read_uncut && !cut {
            pieces.push(Piece {
                start: span.start + src.shift,
                len: span.end - span.start,
                sha256: r.sha256,
                what: what(&span),
            });
            continue;
        }
        let mut whole = sha2::Sha256::new();
        let mut parts: Vec<sha2::Sha256> = kept.iter().map(|_| sha2::Sha256::new()).collect();
        let mut pos = span.start;
        while pos < span.end {
            let mut next = span.end.min((pos / CHUNK as u64 + 1) * CHUNK as u64);
            if let Some(s) = skip {
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
                    anyhow::anyhow!(
                        "{} ends before byte {next}, which its block map maps ({}): the image is truncated",
                        src.path.display(),
                        r
                    )
                } else {
                    anyhow::Error::new(e).context(format!("reading bytes {pos}-{} of {}", next - 1, src.path.display()))
                }
            })?;
            whole.update(&*chunk);
            if let Some(i) = kept.iter().position(|k| k.contains(&pos)) {
                if cut {
                    parts[i].update(&*chunk);
                }
                buf = sink(buf, n, pos + src.shift)?;
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
                pieces.push(Piece {
                    start: k.start + src.shift,
                    len: k.end - k.start,
                    sha256: Sha256(h.finalize().into()),
                    what: what(k),
                });
            }
        } else {
            pieces.push(Piece {
                start: span.start + src.shift,
                len: span.end - span.start,
                sha256: r.sha256,
                what: what(&span),
            });
        }
    }
    Ok(pieces)
}

/// The pieces `--verify-only` compares: nothing is written, only ranges cut by `skip` are read.
fn plan_pieces(src: &Source, skip: Option<&Range<u64>>) -> Result<Vec<Piece>> {
    read_ranges(src, skip, false, |buf, _, _| Ok(buf))
}

/// Writes `src` to `dev` on two threads: this one reads and hashes, a writer writes, so that
/// hashing and writing overlap. Returns the pieces written, each with its expected hash.
fn write_source(src: &Source, skip: Option<&Range<u64>>, dev: &File, meter: &mut Meter) -> Result<Vec<Piece>> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, usize, u64)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<AlignedBuf>(BUFFERS + 1);
    for _ in 0..BUFFERS {
        free_tx.send(AlignedBuf::new()).expect("the pool has room for every buffer");
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<()> {
            // Written, not yet handed to writeback; handed over, not yet waited for.
            let mut pending: Option<Range<u64>> = None;
            let mut pending_bytes = 0u64;
            let mut in_flight: Option<Range<u64>> = None;
            for (mut buf, n, at) in full_rx {
                dev.write_all_at(&buf.get()[..n], at)
                    .with_context(|| format!("writing {n} bytes at byte {at} of the device"))?;
                let span = at..at + n as u64;
                pending = Some(pending.map_or(span.clone(), |p| p.start.min(span.start)..p.end.max(span.end)));
                pending_bytes += n as u64;
                if pending_bytes >= WRITEBACK_WINDOW {
                    if let Some(r) = in_flight.take() {
                        writeback(dev, &r, true);
                    }
                    in_flight = pending.take();
                    if let Some(r) = &in_flight {
                        writeback(dev, r, false);
                    }
                    pending_bytes = 0;
                }
                meter.add(n as u64);
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let stopped = || anyhow::anyhow!("the writing thread stopped");
        let read = read_ranges(src, skip, true, |buf, n, at| {
            full_tx.send((buf, n, at)).map_err(|_| stopped())?;
            free_rx.recv().map_err(|_| stopped())
        });
        drop(full_tx);
        // A write error explains a stopped reader better than the reader's own error does.
        writer.join().map_err(|_| anyhow::anyhow!("the writing thread panicked"))??;
        read
    })
}

/// Starts writeback of `span` of the device and, with `wait`, waits until it is done. The
/// writer keeps at most two windows of dirty pages: the progress shows what reached the device
/// (not only the page cache; a slow SD card would otherwise sit at 100% during the final
/// fsync), and the device writes while the next chunks are read and hashed. Best effort: the
/// fsync at the end is what makes the data safe.
fn writeback(dev: &File, span: &Range<u64>, wait: bool) {
    use nix::libc::{SYNC_FILE_RANGE_WAIT_AFTER, SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE};
    let flags = if wait {
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: a system call on an open descriptor, with no pointers.
    unsafe { nix::libc::sync_file_range(dev.as_raw_fd(), span.start as i64, (span.end - span.start) as i64, flags) };
}

/// Reads every piece back from the device (O_DIRECT where the device allows it) and compares
/// its sha256; every difference is listed. Returns the bytes compared and the time it took.
fn verify(file: &File, dev: &BlockDevice, pieces: &[Piece]) -> Result<(u64, Duration)> {
    let total: u64 = pieces.iter().map(|p| p.len).sum();
    if let Err(e) = set_direct(file) {
        eprintln!(
            "        O_DIRECT is not available on {} ({e}): reading back through the (dropped) page cache",
            dev.path.display()
        );
    }
    let mut meter = Meter::new("verify", total);
    let sums = hash_pieces(file, &dev.path, pieces, &mut meter)?;
    let took = meter.finish();
    let bad: Vec<String> = pieces
        .iter()
        .zip(&sums)
        .filter(|(p, got)| p.sha256 != **got)
        .map(|(p, got)| {
            format!(
                "{} at device bytes {}-{}: the device has sha256 {got}, the image {}",
                p.what,
                p.start,
                p.start + p.len - 1,
                p.sha256
            )
        })
        .collect();
    if !bad.is_empty() {
        bail!(
            "verification failed: {} of {} ranges on {} differ from the image:\n  {}\nflash it again; if it fails again, the card is failing (or fake: less capacity than it claims)",
            bad.len(),
            pieces.len(),
            dev.path.display(),
            bad.join("\n  ")
        );
    }
    Ok((total, took))
}

fn set_direct(file: &File) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT))?;
    Ok(())
}

/// What the reading thread of [`hash_pieces`] sends: the bytes of a piece in a buffer, or the
/// end of a piece.
enum ReadBack {
    Bytes(AlignedBuf, Range<usize>),
    End,
}

/// The sha256 of each piece as `file` holds it, read in aligned chunks on one thread and
/// hashed on this one.
fn hash_pieces(file: &File, name: &Path, pieces: &[Piece], meter: &mut Meter) -> Result<Vec<Sha256>> {
    let (full_tx, full_rx) = mpsc::sync_channel::<ReadBack>(BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<AlignedBuf>(BUFFERS + 1);
    for _ in 0..BUFFERS {
        free_tx.send(AlignedBuf::new()).expect("the pool has room for every buffer");
    }
    std::thread::scope(|s| {
        let reader = s.spawn(move || -> Result<()> {
            for p in pieces {
                read_piece(file, p.start, p.len, &free_rx, &full_tx)
                    .with_context(|| format!("reading back {} from {}", p.what, name.display()))?;
                if full_tx.send(ReadBack::End).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut sums = Vec::with_capacity(pieces.len());
        let mut h = sha2::Sha256::new();
        for msg in full_rx {
            match msg {
                ReadBack::Bytes(mut buf, r) => {
                    h.update(&buf.get()[r.clone()]);
                    meter.add(r.len() as u64);
                    let _ = free_tx.send(buf);
                }
                ReadBack::End => sums.push(Sha256(std::mem::take(&mut h).finalize().into())),
            }
        }
        reader.join().map_err(|_| anyhow::anyhow!("the reading thread panicked"))??;
        Ok(sums)
    })
}

/// Reads `len` bytes at `start` in aligned chunks (O_DIRECT needs aligned offsets, lengths and
/// buffers) and sends the wanted part of each.
fn read_piece(
    file: &File,
    start: u64,
    len: u64,
    free: &mpsc::Receiver<AlignedBuf>,
    out: &mpsc::SyncSender<ReadBack>,
) -> Result<()> {
    let stopped = || anyhow::anyhow!("the hashing thread stopped");
    let end = start + len;
    let mut pos = start / ALIGN * ALIGN;
    while pos < end {
        let mut buf = free.recv().map_err(|_| stopped())?;
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
        out.send(ReadBack::Bytes(buf, (from - pos) as usize..(to - pos) as usize)).map_err(|_| stopped())?;
        pos += want as u64;
    }
    Ok(())
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
        let tty = std::io::stderr().is_terminal() && !crate::host::exec::debug_enabled();
        let bar = tty.then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8.bold} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
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
            eprintln!(
                "    {} {:>3}% ({} of {})",
                self.label,
                self.done * 100 / self.total,
                human_size(self.done),
                human_size(self.total)
            );
            while self.next_line <= self.done {
                self.next_line += (self.total / 10).max(1);
            }
        }
    }

    /// Says what is going on after the last byte (the final fsync).
    fn note(&self, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(what.to_string()),
            None => eprintln!("    {} {what}", self.label),
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
        println!(
            "verified {} against {}: {} match",
            args.device.display(),
            args.image.display(),
            human_size(f.verified)
        );
    } else {
        println!("flashed {} to {} and verified it", args.image.display(), dev.path.display());
        println!(
            "  mapped   {} of {} ({:.1}%){}",
            human_size(map.mapped_bytes()),
            human_size(map.image_size),
            map.mapped_bytes() as f64 * 100.0 / map.image_size as f64,
            if args.provision.is_some() { ", data partition replaced by the provisioned filesystem" } else { "" }
        );
        println!(
            "  write    {:.2} s  {} ({} written, fsync included)",
            f.write.as_secs_f64(),
            rate(f.written, f.write),
            human_size(f.written)
        );
    }
    println!(
        "  verify   {:.2} s  {} ({} read back with O_DIRECT)",
        f.verify.as_secs_f64(),
        rate(f.verified, f.verify),
        human_size(f.verified)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    #[test]
    fn another_medium_under_the_same_device_number_is_refused() {
        // Issue 16 item 16: a card swapped while the prompt waited has the same device number;
        // its disk sequence number differs. A loop device re-attached to another file is the
        // same event.
        let test = "another_medium_under_the_same_device_number_is_refused";
        if !crate::testing::allows(test, nix::unistd::geteuid().is_root(), "root (loop devices)") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
        for f in [&a, &b] {
            std::fs::File::create(f).unwrap().set_len(4 * MIB).unwrap();
        }
        let losetup = |args: &[&std::ffi::OsStr]| {
            let o = std::process::Command::new("losetup").args(args).output().unwrap();
            assert!(o.status.success(), "losetup {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let loopdev = losetup(&["--find".as_ref(), "--show".as_ref(), a.as_os_str()]);
        let dev = device::BlockDevice::inspect(Path::new(&loopdev)).unwrap();
        assert!(dev.diskseq.is_some(), "this kernel has no diskseq for {loopdev}");
        open_device(&dev, false).unwrap();
        losetup(&["-d".as_ref(), loopdev.as_ref()]);
        losetup(&[loopdev.as_ref(), b.as_os_str()]);
        let e = open_device(&dev, false).map(|_| ()).unwrap_err().to_string();
        losetup(&["-d".as_ref(), loopdev.as_ref()]);
        assert!(e.contains("is another disk than the one checked (the kernel's disk sequence number went from"), "{e}");
    }

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
        let map = crate::flash::bmap::create(&img, &[]).unwrap();
        assert_eq!(map.ranges.len(), 1);
        let f = File::open(&img).unwrap();
        let src = Source { file: &f, path: &img, map: &map, shift: 0, label: "image" };
        let pieces = plan_pieces(&src, Some(&(MIB..2 * MIB))).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[0].start, pieces[0].len), (0, MIB));
        assert_eq!(pieces[0].sha256, Sha256::of(&data[..MIB as usize]));
        assert_eq!((pieces[1].start, pieces[1].len), (2 * MIB, MIB));
        assert_eq!(pieces[1].sha256, Sha256::of(&data[2 * MIB as usize..]));
        assert_eq!(pieces[1].what, format!("image blocks 0-767 (its bytes {}-{})", 2 * MIB, 3 * MIB - 1));
        // Uncut, nothing is read: the map's hash is the expectation.
        let whole = plan_pieces(&src, None).unwrap();
        assert_eq!(whole[0].sha256, map.ranges[0].sha256);
        // A changed byte inside the skipped part is still noticed: the image no longer matches.
        let w = OpenOptions::new().write(true).open(&img).unwrap();
        w.write_all_at(b"!", MIB + 5).unwrap();
        let err = plan_pieces(&src, Some(&(MIB..2 * MIB))).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: blocks 0-767 (bytes 0-3145727) have sha256 ", img.display())), "{err}");
        assert!(
            err.ends_with(&format!(
                "but the block map says {}: the image is damaged, or the map was made for another image",
                map.ranges[0].sha256
            )),
            "{err}"
        );
    }

    fn quiet_meter() -> Meter {
        Meter { label: "t", bar: None, total: 0, done: 0, next_line: u64::MAX, started: Instant::now() }
    }

    /// The two-thread writer puts every kept byte where it belongs and nothing else.
    #[test]
    fn write_source_copies_the_kept_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let f = File::options().create(true).truncate(true).read(true).write(true).open(&img).unwrap();
        f.set_len(20 * MIB).unwrap();
        let data: Vec<u8> = (0..9 * MIB as usize).map(|i| (i % 241) as u8 + 1).collect();
        f.write_all_at(&data, MIB).unwrap();
        f.write_all_at(b"end", 19 * MIB).unwrap();
        let map = crate::flash::bmap::create(&img, &[]).unwrap();
        let out = dir.path().join("out.img");
        let dev = File::options().create(true).truncate(true).read(true).write(true).open(&out).unwrap();
        let src = Source { file: &f, path: &img, map: &map, shift: 4096, label: "image" };
        let mut meter = quiet_meter();
        let pieces = write_source(&src, Some(&(3 * MIB..5 * MIB)), &dev, &mut meter).unwrap();
        assert_eq!(meter.done, map.mapped_bytes() - 2 * MIB);
        let written = std::fs::read(&out).unwrap();
        let image = std::fs::read(&img).unwrap();
        for p in &pieces {
            let (a, b) = ((p.start - 4096) as usize, (p.start - 4096 + p.len) as usize);
            assert_eq!(&written[p.start as usize..(p.start + p.len) as usize], &image[a..b], "{}", p.what);
            assert_eq!(Sha256::of(&image[a..b]), p.sha256, "{}", p.what);
        }
        assert!(
            written[(3 * MIB + 4096) as usize..(5 * MIB + 4096) as usize].iter().all(|b| *b == 0),
            "the skipped span was written"
        );
        let mut meter = quiet_meter();
        let sums = hash_pieces(&dev, &out, &pieces, &mut meter).unwrap();
        assert_eq!(sums, pieces.iter().map(|p| p.sha256).collect::<Vec<_>>());
    }

    #[test]
    fn read_back_hashes_unaligned_spans_and_stops_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let data: Vec<u8> = (0..(MIB as usize + 1000)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&img, &data).unwrap();
        let f = File::open(&img).unwrap();
        let piece = |start: u64, len: u64| Piece { start, len, sha256: Sha256([0; 32]), what: "piece".into() };
        let mut meter = quiet_meter();
        let sums = hash_pieces(&f, &img, &[piece(5000, MIB - 4000), piece(0, 10)], &mut meter).unwrap();
        assert_eq!(sums, [Sha256::of(&data[5000..(MIB as usize + 1000)]), Sha256::of(&data[..10])]);
        assert_eq!(meter.done, MIB - 4000 + 10);
        let err = hash_pieces(&f, &img, &[piece(MIB, 2000)], &mut meter).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            format!(
                "reading back piece from {}: the device ends at byte {}, before byte {}",
                img.display(),
                MIB + 1000,
                MIB + 2000
            )
        );
    }
}
