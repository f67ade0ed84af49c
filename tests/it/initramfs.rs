//! The initramfs kiln builds natively from a target tree (`kiln::boot::initramfs`), booted for real.
//!
//! A trixie amd64 tree with busybox-static and cryptsetup-bin (bootstrapped once, ~1 min, and
//! kept in the kiln cache under `initramfs-it/`) is made into an EROFS root with its dm-verity
//! hash tree appended, placed on a GPT disk whose partition UUID is the first 128 bits of the
//! root hash, and booted directly (`-kernel`/`-initrd`) under QEMU three times: healthy (must
//! reach systemd), with a flipped byte in the root (dm-verity panic, then the reboot that
//! `panic=10` asks for) and with a wrong root hash (the initramfs's own error line).
//!
//! `KILN_IT_INITRAMFS_ARCH=arm64` runs the same on an arm64 tree under `qemu-system-aarch64 -M
//! virt` (its bootstrap runs under qemu-user and takes ~10 min; `scripts/try-initramfs`), and
//! `KILN_IT_INITRAMFS_TREE=DIR` uses an existing tree of that architecture (only read).

use crate::Need;
use crate::{flip_byte, repo_root};
use kiln::gpt::{GptPartition, GptTable, SECTOR};
use kiln::host::exec::Cmd;
use kiln::units::Uuid;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MODULES: &[&str] = &["erofs", "dm-verity", "dm-mod", "virtio_blk", "virtio_pci"];
const PACKAGES: &str = "busybox-static,cryptsetup-bin,systemd-sysv,udev";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn native_initramfs_opens_the_verified_root_and_boots_systemd() {
    let Some(_timed) = crate::heavy_test(
        "native_initramfs_opens_the_verified_root_and_boots_systemd",
        &[Need::Root, Need::Tool("mmdebstrap"), Need::Tool("qemu-system-x86_64")],
    ) else {
        return;
    };
    let arch = Arch::from_env();
    let work = repo_root().join(format!("target/kiln-it-initramfs-{}", arch.debian));
    let _scratch = crate::Scratch(work.clone());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let tree = match std::env::var_os("KILN_IT_INITRAMFS_TREE") {
        Some(dir) => PathBuf::from(dir),
        None => cached_tree(&arch),
    };
    let kver = kernel_version(&tree);

    // Built twice: the archives must be byte-identical.
    let modules: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let initrd = work.join("initrd.img");
    let t = Instant::now();
    let info = kiln::boot::initramfs::build(&tree, &kver, &modules, &initrd).unwrap();
    let build_seconds = t.elapsed().as_secs_f64();
    let again = work.join("initrd-again.img");
    kiln::boot::initramfs::build(&tree, &kver, &modules, &again).unwrap();
    assert!(std::fs::read(&initrd).unwrap() == std::fs::read(&again).unwrap(), "two builds of the initramfs differ");
    println!(
        "kiln-it: initramfs for {kver} built natively in {build_seconds:.1}s: {info}; a second build is byte-identical"
    );

    // The root: EROFS + dm-verity hash tree, on a GPT disk.
    let t = Instant::now();
    let root = work.join("root.img");
    Cmd::new("mkfs.erofs")
        .args(["-zlz4", "-T0", "-U", "6b696c6e-0000-4000-8000-000000000001"])
        .arg(&root)
        .arg(&tree)
        .run()
        .unwrap();
    let fs_size = std::fs::metadata(&root).unwrap().len();
    let offset = fs_size.div_ceil(4096) * 4096;
    let format = Cmd::new("veritysetup")
        .arg("format")
        .arg(&root)
        .arg(&root)
        .arg(format!("--hash-offset={offset}"))
        .read()
        .unwrap();
    let hash = format
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .expect("veritysetup prints the root hash");
    let disk = work.join("disk.img");
    make_disk(&root, &hash, &disk, arch.root_type);
    println!(
        "kiln-it: root image {} MiB (root hash {}…) and GPT disk in {:.1}s",
        std::fs::metadata(&root).unwrap().len() >> 20,
        &hash[..16],
        t.elapsed().as_secs_f64()
    );
    let guest = Guest {
        arch: &arch,
        kernel: tree.join(format!("boot/vmlinuz-{kver}")),
        initrd: initrd.clone(),
        logs: work.clone(),
    };
    let append = |hash: &str, extra: &str| {
        format!("console={} kiln.verity={hash} kiln.verity_offset={offset} panic=10 {extra}", arch.console)
    };

    // 1. The healthy boot reaches systemd in the verified root. Whether the tree's services
    // then get to a login prompt on a read-only root is the tree's business: it is reported.
    let ok = guest.boot("ok", &disk, &append(&hash, ""), |l| l.contains(" login:"), Stop::AtLine);
    // (Kernel messages may follow on the same console line: cut them off.)
    let verified =
        ok.line("kiln-initramfs: verified root").split_inclusive("…)").next().unwrap_or_default().to_string();
    assert!(verified.contains(&format!("verified root /dev/vda1 (root hash {}…)", &hash[..16])), "{}", ok.tail());
    let welcome = ok.line("Welcome to");
    assert!(welcome.contains("Debian"), "systemd did not start in the verified root:\n{}", ok.tail());
    assert!(!ok.has("kiln-initramfs: waiting"), "the root partition should be there at once:\n{}", ok.tail());
    println!("kiln-it: healthy boot: {verified}");
    println!("kiln-it: healthy boot: {welcome}");
    if ok.matched {
        println!(
            "kiln-it: healthy boot: {} after {:.1}s",
            ok.whole(" login:").split_inclusive("login:").next().unwrap_or_default(),
            ok.seconds
        );
    } else {
        println!(
            "kiln-it: healthy boot: systemd ran, but no login prompt within {}s (see {})",
            BOOT_TIMEOUT.as_secs(),
            work.join("boot-ok.log").display()
        );
    }

    // 2. A flipped byte in the root (in the EROFS superblock, read at mount): dm-verity panics
    // the kernel, which reboots after 10 s (QEMU -no-reboot exits then).
    let bad = work.join("disk-corrupt.img");
    std::fs::copy(&disk, &bad).unwrap();
    flip_byte(&bad, PARTITION_START * SECTOR + 1024 + 8);
    let corrupt = guest.boot("corrupt", &bad, &append(&hash, ""), |l| l.contains("Kernel panic"), Stop::AtExit);
    let panic = corrupt.line("Kernel panic");
    assert!(
        panic.contains("dm-verity device corrupted"),
        "the failure should come from dm-verity:\n{}",
        corrupt.tail()
    );
    assert!(corrupt.exited, "after the panic the machine should reboot (panic=10):\n{}", corrupt.tail());
    println!("kiln-it: flipped byte: {}", corrupt.whole("is corrupted"));
    println!("kiln-it: flipped byte: {panic} (rebooted after {:.1}s)", corrupt.seconds);

    // 3. A wrong root hash names no partition: the initramfs says so and the kernel panics.
    // `quiet` leaves only the error line.
    let wrong = format!("{}{}", if hash.starts_with('0') { '1' } else { '0' }, &hash[1..]);
    let miss = guest.boot("wrong-hash", &disk, &append(&wrong, "quiet"), |l| l.contains("Kernel panic"), Stop::AtExit);
    let error = miss.line("kiln-initramfs: ");
    assert!(error.starts_with("kiln-initramfs: no partition with PARTUUID="), "{}", miss.tail());
    assert!(
        !miss.has("kiln-initramfs: waiting"),
        "quiet should keep the initramfs quiet except errors:\n{}",
        miss.tail()
    );
    assert!(miss.has("Attempted to kill init"), "{}", miss.tail());
    assert!(miss.exited, "after the panic the machine should reboot (panic=10):\n{}", miss.tail());
    println!("kiln-it: wrong root hash: {error}");
    println!("kiln-it: wrong root hash: {} (rebooted after {:.1}s)", miss.line("Kernel panic"), miss.seconds);

    // 4. A second disk holding a copy of the image (a USB stick with the public image and a
    // data partition of someone's making): its root passes dm-verity, so the boot must stop
    // rather than take the root, and /var, from a disk it cannot tell apart.
    let twin = guest.boot_disks(
        "twin",
        &[&disk, &disk],
        &append(&hash, "quiet"),
        |l| l.contains("Kernel panic"),
        Stop::AtExit,
    );
    let error = twin.line("kiln-initramfs: ");
    // (blkid names the disks in the order it probed them.)
    assert!(
        error.contains("is on several disks: vda vdb;") || error.contains("is on several disks: vdb vda;"),
        "{error}\n{}",
        twin.tail()
    );
    assert!(!twin.has("verified root"), "{}", twin.tail());
    println!("kiln-it: a second disk with the same root: {error}");
}

/// The first sector of the root partition.
const PARTITION_START: u64 = 2048;

/// A GPT disk with the root image as its only partition, PARTUUID = the root hash's first 128 bits.
fn make_disk(root: &Path, hash: &str, disk: &Path, root_type: &str) {
    let root_sectors = std::fs::metadata(root).unwrap().len().div_ceil(SECTOR);
    let disk_sectors = PARTITION_START + root_sectors + 2048;
    let table = GptTable {
        disk_guid: Uuid::derive("kiln-it-initramfs", "disk"),
        disk_sectors,
        partitions: vec![GptPartition {
            type_guid: Uuid::parse(root_type).unwrap(),
            guid: Uuid::parse(&hash[..32]).unwrap(),
            first_lba: PARTITION_START,
            last_lba: PARTITION_START + root_sectors - 1,
            name: "root-a".into(),
        }],
    };
    let mut f = std::fs::File::create(disk).unwrap();
    f.set_len(disk_sectors * SECTOR).unwrap();
    table.write(&mut f).unwrap();
    f.seek(SeekFrom::Start(PARTITION_START * SECTOR)).unwrap();
    std::io::copy(&mut std::fs::File::open(root).unwrap(), &mut f).unwrap();
    f.flush().unwrap();
}

/// The target architecture the test runs for.
struct Arch {
    debian: &'static str,
    qemu: &'static [&'static str],
    console: &'static str,
    root_type: &'static str,
}

impl Arch {
    fn from_env() -> Arch {
        match std::env::var("KILN_IT_INITRAMFS_ARCH").as_deref() {
            Err(_) | Ok("amd64") => Arch {
                debian: "amd64",
                qemu: &["qemu-system-x86_64", "-accel", "tcg"],
                console: "ttyS0",
                root_type: kiln::gpt::TYPE_ROOT_AMD64,
            },
            Ok("arm64") => Arch {
                debian: "arm64",
                qemu: &["qemu-system-aarch64", "-accel", "tcg", "-M", "virt", "-cpu", "cortex-a72", "-smp", "2"],
                console: "ttyAMA0",
                root_type: kiln::gpt::TYPE_ROOT_ARM64,
            },
            Ok(other) => panic!("KILN_IT_INITRAMFS_ARCH={other}: amd64 or arm64 expected"),
        }
    }
}

/// The trixie tree, bootstrapped on first use and kept in the kiln cache. Its kernel package
/// would build an initramfs with initramfs-tools: that is diverted away (not needed).
fn cached_tree(arch: &Arch) -> PathBuf {
    let cache = kiln::debian::cache::Cache::open_default().unwrap();
    let dir = cache.dir.join(format!("initramfs-it/trixie-{}", arch.debian));
    let tree = dir.join("tree");
    if tree.join("usr/bin/busybox").is_file() {
        println!("kiln-it: using the cached trixie {} tree {}", arch.debian, tree.display());
        return tree;
    }
    let part = dir.with_extension("part");
    let _ = std::fs::remove_dir_all(&part);
    std::fs::create_dir_all(&part).unwrap();
    let mirror = kiln::debian::mirror::from_host(Path::new("/etc/apt")).unwrap();
    let divert = "chroot \"$1\" dpkg-divert --local --rename --divert /usr/sbin/update-initramfs.real --add /usr/sbin/update-initramfs \
                  && printf '#!/bin/sh\\nexit 0\\n' > \"$1/usr/sbin/update-initramfs\" && chmod 755 \"$1/usr/sbin/update-initramfs\"";
    let t = Instant::now();
    Cmd::new("mmdebstrap")
        .args(["--mode=root", "--format=directory", "--variant=minbase"])
        .arg(format!("--architectures={}", arch.debian))
        .arg(format!("--include=linux-image-{},{PACKAGES}", arch.debian))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .args([
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ])
        .arg(format!("--essential-hook={divert}"))
        .arg("trixie")
        .arg(part.join("tree"))
        .arg(format!("deb {} trixie main", mirror.debian))
        .run()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&part, &dir).unwrap();
    println!(
        "kiln-it: bootstrapped a trixie {} tree in {:.1}s into {}",
        arch.debian,
        t.elapsed().as_secs_f64(),
        tree.display()
    );
    tree
}

fn kernel_version(tree: &Path) -> String {
    let mut versions: Vec<String> = std::fs::read_dir(tree.join("boot"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(String::from))
        .collect();
    versions.sort();
    versions.pop().expect("a kernel in the tree's /boot")
}

struct Boot {
    lines: Vec<String>,
    /// A line satisfied `until`.
    matched: bool,
    /// QEMU ended by itself (the guest rebooted, and -no-reboot made QEMU exit).
    exited: bool,
    seconds: f64,
}

impl Boot {
    fn has(&self, s: &str) -> bool {
        self.lines.iter().any(|l| l.contains(s))
    }

    /// The first console line containing `s`, from `s` on (robust against kernel messages
    /// printed on the same line before it), or a failure with the console tail.
    fn line(&self, s: &str) -> String {
        let found = self.lines.iter().find_map(|l| l.find(s).map(|i| l[i..].trim_end().to_string()));
        found.unwrap_or_else(|| panic!("no console line with {s:?}:\n{}", self.tail()))
    }

    /// The first console line containing `s`, whole but for the kernel's timestamp.
    fn whole(&self, s: &str) -> String {
        let found = self.lines.iter().find(|l| l.contains(s)).map(|l| {
            let l = l.trim();
            match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                Some((_, rest)) => rest.to_string(),
                None => l.to_string(),
            }
        });
        found.unwrap_or_else(|| panic!("no console line with {s:?}:\n{}", self.tail()))
    }

    fn tail(&self) -> String {
        self.lines[self.lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A direct kernel boot of one kernel and initramfs.
struct Guest<'a> {
    arch: &'a Arch,
    kernel: PathBuf,
    initrd: PathBuf,
    /// Where the console logs go.
    logs: PathBuf,
}

/// When a boot is over.
#[derive(PartialEq, Eq)]
enum Stop {
    /// At the first line `until` accepts: QEMU is stopped.
    AtLine,
    /// When QEMU exits (the guest rebooted; -no-reboot), after a line `until` accepts.
    AtExit,
}

impl Guest<'_> {
    /// Boots the kernel and initramfs with the disk on virtio until a console line satisfies
    /// `until`; then stops QEMU, or lets the guest go on until QEMU exits. Stops anyway after
    /// BOOT_TIMEOUT. The console goes to `boot-<name>.log`.
    fn boot(&self, name: &str, disk: &Path, append: &str, until: impl Fn(&str) -> bool, stop: Stop) -> Boot {
        self.boot_disks(name, &[disk], append, until, stop)
    }

    /// [`Guest::boot`] with several disks (virtio, in order: vda, vdb, ...).
    fn boot_disks(&self, name: &str, disks: &[&Path], append: &str, until: impl Fn(&str) -> bool, stop: Stop) -> Boot {
        let cmd = Cmd::new(self.arch.qemu[0])
            .args(&self.arch.qemu[1..])
            .args([
                "-m",
                "1024",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-nic",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(append);
        let cmd = disks.iter().fold(cmd, |c, d| {
            c.arg("-drive").arg(format!("file={},format=raw,if=virtio,snapshot=on,file.locking=off", d.display()))
        });
        let started = Instant::now();
        let mut child = cmd.spawn_piped(false).unwrap();
        let (tx, rx) = mpsc::channel();
        let tx2 = tx.clone();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let _ = tx.send(plain_text(&String::from_utf8_lossy(&line)));
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let _ = tx2.send(format!("qemu: {}", String::from_utf8_lossy(&line)));
            }
        });
        let mut log = std::fs::File::create(self.logs.join(format!("boot-{name}.log"))).unwrap();
        let mut lines = Vec::new();
        let mut matched = false;
        let mut exited = false;
        let deadline = started + BOOT_TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) => {
                    writeln!(log, "{line}").unwrap();
                    matched |= until(&line);
                    lines.push(line);
                    if matched && stop == Stop::AtLine {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    exited = true;
                    break;
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();
        Boot { lines, matched, exited, seconds }
    }
}

/// A console line without carriage returns and terminal escape sequences (colours, cursor).
fn plain_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    // Parameters, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}
