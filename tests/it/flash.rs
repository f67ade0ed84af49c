//! `kiln flash` against real block devices: loop devices over files in a temporary directory,
//! always detached (and unmounted) by guards, also when a test fails.
//!
//! Partitions of a loop device are added with `partx` (BLKPG): it works whether or not the
//! running kernel parses partition tables itself.

use crate::Need;
use crate::{kiln, text};
use kiln::flash::bmap::{self, Bmap};
use kiln::gpt::{GptPartition, GptTable, TYPE_ESP, TYPE_LINUX_DATA, TYPE_ROOT_AMD64};
use kiln::units::{sha256_file, Uuid};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
/// Where the test image's partitions are (bytes).
const ESP_AT: u64 = MIB;
const ROOT_AT: u64 = 9 * MIB;
const DATA_AT: u64 = 25 * MIB;

/// Loop devices and mounts need root: false (skipped, said why) where the host cannot.
#[must_use]
fn require_root(test: &str) -> bool {
    crate::host_can_run(
        test,
        &[
            Need::Root,
            Need::Tool("losetup"),
            Need::Tool("partx"),
            Need::Tool("sfdisk"),
            Need::Tool("mkfs.ext4"),
            Need::Tool("debugfs"),
        ],
    )
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// A loop device, detached when dropped.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        let dev = run(Command::new("losetup").args(["--find", "--show", "--partscan"]).arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev }
    }

    /// Makes the kernel's partitions match the table on the device (BLKPG through partx).
    fn update_partitions(&self) {
        run(Command::new("partx").args(["-u", &self.dev]));
    }

    fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A mounted filesystem, unmounted when dropped (before the loop device under it).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A 64 MiB sparse disk image with a real GPT: an ESP and a root partition with data, an empty
/// data partition; and its block map next to it, with the first MiB of every partition to be
/// written even though it holds zeros.
fn make_image(dir: &Path) -> (PathBuf, Bmap) {
    let path = dir.join("disk.img");
    let mut f = fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let u = |s: &str| Uuid::parse(s).unwrap();
    let table = GptTable {
        disk_guid: Uuid::derive("flash-test", "disk"),
        disk_sectors: IMAGE_SIZE / 512,
        partitions: vec![
            GptPartition {
                type_guid: u(TYPE_ESP),
                guid: Uuid::derive("flash-test", "esp"),
                first_lba: ESP_AT / 512,
                last_lba: ROOT_AT / 512 - 1,
                name: "esp".into(),
            },
            GptPartition {
                type_guid: u(TYPE_ROOT_AMD64),
                guid: Uuid::derive("flash-test", "root"),
                first_lba: ROOT_AT / 512,
                last_lba: DATA_AT / 512 - 1,
                name: "root-a".into(),
            },
            GptPartition {
                type_guid: u(TYPE_LINUX_DATA),
                guid: Uuid::derive("flash-test", "data"),
                first_lba: DATA_AT / 512,
                last_lba: IMAGE_SIZE / 512 - 34,
                name: "data".into(),
            },
        ],
    };
    table.write(&mut f).unwrap();
    let esp: Vec<u8> = b"kiln-esp".iter().cycle().take(512 * 1024).copied().collect();
    f.write_all_at(&esp, ESP_AT + 64 * 1024).unwrap();
    f.write_all_at(b"a lonely block", ESP_AT + 5 * MIB).unwrap();
    let root: Vec<u8> = (0..3 * MIB as usize).map(|i| ((i * 2654435761usize) >> 13) as u8).collect();
    f.write_all_at(&root, ROOT_AT + MIB).unwrap();
    f.sync_all().unwrap();
    let map = bmap::create(&path, &[(ESP_AT, MIB), (ROOT_AT, MIB), (DATA_AT, MIB)]).unwrap();
    map.write_xml(&bmap::default_path(&path)).unwrap();
    (path, map)
}

/// A file of `size` bytes of 0xAA: a used SD card.
fn stale_card(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    let block = vec![0xAAu8; MIB as usize];
    for i in 0..size / MIB {
        f.write_all_at(&block, i * MIB).unwrap();
    }
}

fn read_device(dev: &str, len: u64) -> Vec<u8> {
    let f = File::open(dev).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn flash_writes_only_mapped_blocks_and_detects_corruption() {
    if !require_root("flash_writes_only_mapped_blocks_and_detects_corruption") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, map) = make_image(dir.path());
    let card = dir.path().join("card.img");
    stale_card(&card, 80 * MIB);
    let lp = Loop::attach(&card);

    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&format!("flashed {} to {} and verified it\n", img.display(), lp.dev)), "{stdout}");
    println!(
        "kiln-it: flash of a 64 MiB image with {} mapped: {}",
        bmap::human_size(map.mapped_bytes()),
        stdout.lines().skip(2).collect::<Vec<_>>().join(";")
    );

    let device = read_device(&lp.dev, 80 * MIB);
    let image = fs::read(&img).unwrap();
    for r in &map.ranges {
        let b = map.bytes(r);
        assert!(
            device[b.start as usize..b.end as usize] == image[b.start as usize..b.end as usize],
            "{r} differs on the device"
        );
    }
    // The head of the data partition is zeroed although the image only has a hole there ...
    assert!(
        device[DATA_AT as usize..(DATA_AT + MIB) as usize].iter().all(|b| *b == 0),
        "the stale head of the data partition survived"
    );
    // ... while unmapped blocks are not written at all (the card's old bytes stay).
    assert!(
        device[(DATA_AT + 5 * MIB) as usize..(DATA_AT + 6 * MIB) as usize].iter().all(|b| *b == 0xAA),
        "unmapped blocks were written"
    );
    assert!(device[IMAGE_SIZE as usize..].iter().all(|b| *b == 0xAA), "bytes past the image were written");

    // The read-back check passes on the good card, then catches one flipped byte.
    let verify = |dir: &Path| kiln(dir, &["flash", img.to_str().unwrap(), &lp.dev, "--verify-only"]);
    let ok = verify(dir.path());
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let at = ROOT_AT + MIB + 123_457;
    let mut byte = [0u8; 1];
    let backing = fs::OpenOptions::new().read(true).write(true).open(&card).unwrap();
    backing.read_exact_at(&mut byte, at).unwrap();
    backing.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    backing.sync_all().unwrap();
    let bad = verify(dir.path());
    let stderr = text(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    let r = map.ranges.iter().find(|r| map.bytes(r).contains(&at)).unwrap();
    let span = map.bytes(r);
    assert!(
        stderr.contains(&format!("error: verification failed: 1 of {} ranges on {} differ from the image:\n  image {r} at device bytes {}-{}: the device has sha256 ", map.ranges.len() - 1, lp.dev, span.start, span.end - 1)),
        "{stderr}"
    );
    assert!(stderr.contains(&format!(", the image {}", r.sha256)), "{stderr}");
    println!(
        "kiln-it: a flipped byte at {at} is reported: {}",
        stderr.lines().find(|l| l.contains("the device has sha256")).unwrap_or("").trim()
    );

    // An image changed after its map was made is caught while it is read.
    let tampered = dir.path().join("tampered.img");
    fs::copy(&img, &tampered).unwrap();
    File::options().write(true).open(&tampered).unwrap().write_all_at(b"X", ROOT_AT + MIB + 10).unwrap();
    fs::copy(bmap::default_path(&img), bmap::default_path(&tampered)).unwrap();
    let out = kiln(dir.path(), &["flash", tampered.to_str().unwrap(), &lp.dev, "--yes"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: {r} (bytes {}-{}) have sha256 ", tampered.display(), span.start, span.end - 1)),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "but the block map says {}: the image is damaged, or the map was made for another image",
            r.sha256
        )),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{} now holds a partial image", lp.dev)), "{stderr}");
}

/// A card with a DOS table and an ext4 partition 1 (made by mkfs), partitions known to the kernel.
fn partitioned_card(dir: &Path) -> (PathBuf, Loop) {
    let card = dir.join("card.img");
    File::create(&card).unwrap().set_len(80 * MIB).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread"])
        .arg(&card)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"label: dos\nstart=2048, size=32768, type=83\n").unwrap();
    assert!(child.wait().unwrap().success());
    let lp = Loop::attach(&card);
    lp.update_partitions();
    run(Command::new("mkfs.ext4").args(["-q", &lp.part(1)]));
    (card, lp)
}

#[test]
fn a_device_with_a_mounted_partition_is_refused_and_untouched() {
    if !require_root("a_device_with_a_mounted_partition_is_refused_and_untouched") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let (card, lp) = partitioned_card(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    // Read-only: a read-write ext4 mount writes by itself (lazy inode table init, the journal)
    // while the test compares the card's bytes.
    run(Command::new("mount").args(["-o", "ro"]).arg(lp.part(1)).arg(&mnt));
    let _mounted = Mounted(mnt.clone());
    let before = sha256_file(&card).unwrap();
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!("error: refusing to write {}: it is in use: {} is mounted at {} (umount {}); make sure it is the device you mean", lp.dev, lp.part(1), mnt.display(), mnt.display())
    );
    assert_eq!(sha256_file(&card).unwrap(), before, "the device was changed");
}

#[test]
fn a_partition_is_refused() {
    if !require_root("a_partition_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let (card, lp) = partitioned_card(dir.path());
    let before = sha256_file(&card).unwrap();
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.part(1), "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim_end(),
        format!("error: refusing to write {}: it is a partition of {}; pass the whole device {} (the image brings its own partition table)", lp.part(1), lp.dev, lp.dev)
    );
    assert_eq!(sha256_file(&card).unwrap(), before, "the device was changed");
}

/// The disk that holds `/`, resolved the way a user would (findmnt, lsblk).
fn root_disk() -> String {
    let source = run(Command::new("findmnt").args(["-n", "-o", "SOURCE", "/"]));
    let source = source.trim().split('[').next().unwrap().to_string();
    assert!(
        source.starts_with("/dev/"),
        "/ is mounted from {source:?}, not a block device: this test needs a host whose root is on a disk"
    );
    let parent = run(Command::new("lsblk").args(["-n", "-d", "-o", "PKNAME"]).arg(&source));
    let disk = if parent.trim().is_empty() { source } else { format!("/dev/{}", parent.trim()) };
    assert!(fs::metadata(&disk).is_ok(), "{disk} does not exist");
    disk
}

/// Never run with --yes or --force: if the refusal were broken, the missing confirmation
/// (stdin is not a terminal) would still stop it before the device is opened.
#[test]
fn the_disk_holding_root_is_refused() {
    if !require_root("the_disk_holding_root_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let disk = root_disk();
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &disk]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .starts_with(&format!("error: refusing to write {disk}: it holds the running system (/ is mounted from ")),
        "{stderr}"
    );
    println!("kiln-it: {}", stderr.trim());
}

#[test]
fn a_device_larger_than_the_limit_needs_force() {
    if !require_root("a_device_larger_than_the_limit_needs_force") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let card = dir.path().join("big.img");
    File::create(&card).unwrap().set_len(2048 * MIB).unwrap();
    let lp = Loop::attach(&card);
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes", "--max-size", "1GiB"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().last().unwrap(),
        format!("error: refusing to write {}: it is 2.0 GiB, larger than --max-size 1GiB (loop device backed by {}), which is unusual for an SD card or USB stick; check that it is the right device, then pass --force (or a larger --max-size)", lp.dev, card.display())
    );
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes", "--max-size", "1GiB", "--force"]);
    assert!(out.status.success(), "with --force: {}", text(&out.stderr));
}

#[test]
fn without_yes_and_without_a_terminal_nothing_is_written() {
    if !require_root("without_yes_and_without_a_terminal_nothing_is_written") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let card = dir.path().join("card.img");
    stale_card(&card, 64 * MIB);
    let lp = Loop::attach(&card);
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().last().unwrap(),
        format!("error: refusing to write {} without confirmation: stdin is not a terminal; pass --yes once you are sure it is the right device", lp.dev)
    );
    assert!(read_device(&lp.dev, 64 * MIB).iter().all(|b| *b == 0xAA));
}

/// `debugfs -R "stat PATH"`: (mode, uid, gid).
fn stat(dev: &str, path: &str) -> (String, String, String) {
    let out = run(Command::new("debugfs").args(["-R", &format!("stat {path}"), dev]));
    let field = |key: &str| {
        out.split(key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (field("Mode:"), field("User:"), field("Group:"))
}

#[test]
fn provision_writes_an_ext4_data_partition() {
    if !require_root("provision_writes_an_ext4_data_partition") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let card = dir.path().join("card.img");
    stale_card(&card, 80 * MIB);
    let lp = Loop::attach(&card);

    let prov = dir.path().join("device-1");
    fs::create_dir_all(prov.join("ssh/authorized_keys")).unwrap();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f"])
        .arg(dir.path().join("id")));
    let key = fs::read_to_string(dir.path().join("id.pub")).unwrap();
    fs::write(prov.join("ssh/authorized_keys/alice"), &key).unwrap();
    fs::create_dir_all(prov.join("backup")).unwrap();
    fs::write(prov.join("backup/password"), "correct horse battery staple\n").unwrap();
    fs::write(prov.join("backup/env"), "RESTIC_REPOSITORY=sftp:backup@nas:/kiln\n").unwrap();
    fs::create_dir_all(prov.join("wifi")).unwrap();
    fs::write(prov.join("wifi/home.network"), "ssid=Home\npassphrase=hunter22\n").unwrap();
    fs::write(prov.join("hostname"), "kiln-test\n").unwrap();

    // An unknown entry is refused before anything is written.
    fs::write(prov.join("notes.txt"), "x").unwrap();
    let before = sha256_file(&card).unwrap();
    let out =
        kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes", "--provision", prov.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).lines().last().unwrap(),
        format!(
            "error: {}: unknown provisioning entry (known: ssh/authorized_keys/<user>, backup/, wifi/, hostname, device-id)",
            prov.join("notes.txt").display()
        )
    );
    assert_eq!(sha256_file(&card).unwrap(), before, "the device was changed");
    fs::remove_file(prov.join("notes.txt")).unwrap();

    let out =
        kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--yes", "--provision", prov.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    println!("kiln-it: provisioned flash: {}", text(&out.stdout).lines().skip(1).collect::<Vec<_>>().join(";"));
    lp.update_partitions();
    let data = lp.part(3);
    // A consistent filesystem, although the card's old 0xAA bytes are still in its unused blocks.
    run(Command::new("e2fsck").args(["-f", "-n", &data]));
    assert_eq!(run(Command::new("e2label").arg(&data)).trim(), "kiln-data");
    let cat = |p: &str| run(Command::new("debugfs").args(["-R", &format!("cat /kiln/provision/{p}"), &data]));
    assert_eq!(cat("ssh/authorized_keys/alice"), key);
    assert_eq!(cat("backup/password"), "correct horse battery staple\n");
    assert_eq!(cat("backup/env"), "RESTIC_REPOSITORY=sftp:backup@nas:/kiln\n");
    assert_eq!(cat("wifi/home.network"), "ssid=Home\npassphrase=hunter22\n");
    assert_eq!(cat("hostname"), "kiln-test\n");
    // The device's backup identity: made by the first flash, kept in DIR, on the device too.
    let id = fs::read_to_string(prov.join("device-id")).unwrap();
    assert!(id.trim().len() == 32 && id.trim().chars().all(|c| c.is_ascii_hexdigit()), "{id:?}");
    assert_eq!(cat("device-id"), id);
    let root = |m: &str| (m.to_string(), "0".to_string(), "0".to_string());
    assert_eq!(stat(&data, "/kiln/provision/ssh/authorized_keys/alice"), root("0644"));
    assert_eq!(stat(&data, "/kiln/provision/ssh/authorized_keys"), root("0755"));
    assert_eq!(stat(&data, "/kiln/provision/backup"), root("0700"));
    assert_eq!(stat(&data, "/kiln/provision/backup/password"), root("0600"));
    assert_eq!(stat(&data, "/kiln/provision/wifi/home.network"), root("0600"));
    assert_eq!(stat(&data, "/kiln/provision/hostname"), root("0600"));
    assert_eq!(stat(&data, "/"), root("0755"));

    // The rest of the device is the image, unchanged: the read-back check (which leaves the
    // data partition out) passes.
    let out = kiln(dir.path(), &["flash", img.to_str().unwrap(), &lp.dev, "--verify-only"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // An ordinary user with write access to the device (here: it owns the loop device) flashes
    // and provisions it too; kiln makes the data file system in its user namespace, so the
    // files still belong to root on the device.
    let user = crate::Unprivileged::new("flash");
    fs::copy(&img, user.dir.join("disk.img")).unwrap();
    let bmap = img.with_file_name("disk.img.bmap");
    fs::copy(&bmap, user.dir.join("disk.img.bmap")).unwrap();
    run(Command::new("cp").arg("-a").arg(&prov).arg(user.dir.join("device-1")));
    fs::write(user.dir.join("device-1/hostname"), "kiln-user\n").unwrap();
    user.chown(&user.dir);
    run(Command::new("chown").arg(user.name).arg(&lp.dev));
    let out = user.kiln(
        &user.dir,
        &user.dir.join("cache"),
        &["flash", "disk.img", &lp.dev, "--yes", "--provision", "device-1"],
    );
    run(Command::new("chown").arg("root").arg(&lp.dev));
    assert!(out.status.success(), "kiln flash --provision as {}:\n{}", user.name, text(&out.stderr));
    lp.update_partitions();
    assert_eq!(cat("hostname"), "kiln-user\n");
    assert_eq!(stat(&data, "/kiln/provision/backup/password"), root("0600"));
    assert_eq!(stat(&data, "/kiln/provision/hostname"), root("0600"));
    println!("kiln-it: {} flashed and provisioned {} (files owned by root on the device)", user.name, lp.dev);
}
