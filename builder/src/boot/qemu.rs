//! `kiln boot`: runs an image under QEMU, interactively on the serial console or, with
//! `--check`, headless until the image's health unit prints its readiness marker.
//!
//! Networking is off unless asked for, and then it is user-mode with `restrict=on` and port
//! forwards bound to 127.0.0.1 only. KVM is used only when a short probe shows it works.

use crate::boot::rpi::BootConfig;
use crate::config::image::{Firmware, Qemu};
use crate::host::exec::Cmd;
use anyhow::{bail, Context as _, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const READY_MARKER: &str = "KILN-READY";
pub const NOT_READY_MARKER: &str = "KILN-NOT-READY";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Lines of console output shown when a check fails.
pub const TAIL_LINES: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a short probe boot shows it works, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug)]
pub struct BootOptions {
    pub disk: PathBuf,
    pub qemu: Qemu,
    pub accel: Accel,
    /// Write guest changes to the disk image (default: a throw-away overlay).
    pub persist: bool,
    /// Forward 127.0.0.1:<port> to the guest's SSH port.
    pub ssh_port: Option<u16>,
    /// Extra user-mode forwards, e.g. `guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:8080`.
    pub net_rules: Vec<String>,
    /// Where the full console log goes (check mode).
    pub log: Option<PathBuf>,
    /// Raspberry Pi images: boot the `[tryboot]` slot of autoboot.txt, as after `reboot '0 tryboot'`.
    pub tryboot: bool,
    /// vCPUs: `None` for the board's count under KVM and [`tcg_vcpus`] under TCG.
    pub smp: Option<u32>,
}

/// The vCPUs of a TCG guest: the board's count, but at most one per two host cores. Each TCG
/// vCPU is a host thread, and a guest kernel waits for its other vCPUs (TLB shootdowns, IPIs)
/// by spinning: when the host has no free core for them, that wait burns the core it has.
/// Measured on 2 cores (minimal image to KILN-READY, two boots at once): 2 vCPUs each 122
/// CPU-s and 125 s, 1 vCPU each 61 CPU-s and 63 s. Alone on an idle 2-core host 2 vCPUs
/// reach ready in 43 s instead of 63 s, for the same CPU: `kiln boot --smp 2` for that.
/// Emulated arm64 guests follow the same rule once their kernel runs without page table
/// isolation ([`emulated_pi_cmdline`]): the Pi card on `virt`, idle host, ready after 39.5 s
/// with 1 vCPU and 39.6 s with 2, for 95 and 111 CPU-s.
pub fn tcg_vcpus(board: u32, host_cores: usize) -> u32 {
    let cap = u32::try_from((host_cores / 2).max(1)).unwrap_or(u32::MAX);
    board.max(1).min(cap)
}

/// The `-cpu` of a boot. An emulated x86 `max` CPU offers AMD's virtualisation (SVM), and the
/// guest's udev then loads kvm, kvm_amd and ccp (~2 MB of modules, verified and linked by an
/// emulated CPU) for a hypervisor nobody runs in a test boot: not offered under TCG.
fn tcg_cpu(cpu: &str, system: &str, accel: Accel) -> String {
    if accel != Accel::Kvm && system == "x86_64" && cpu == "max" {
        "max,svm=off".into()
    } else {
        cpu.into()
    }
}

/// The `-smp` value of a boot: what was asked for, else the rule above (raspi machines have the
/// SoC's fixed count).
fn vcpus(opts: &BootOptions, accel: Accel) -> u32 {
    let q = &opts.qemu;
    if let Some(n) = opts.smp {
        return n;
    }
    if accel == Accel::Kvm || q.machine.starts_with("raspi") {
        return q.smp;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    tcg_vcpus(q.smp, cores)
}

#[derive(Debug)]
pub enum CheckOutcome {
    /// `then` is the result of the command run against the ready guest, if one was given.
    Ready {
        seconds: f64,
        line: String,
        then: Option<Result<(), String>>,
    },
    NotReady {
        seconds: f64,
        line: String,
        tail: Vec<String>,
    },
    Failed {
        seconds: f64,
        reason: String,
        tail: Vec<String>,
    },
}

/// The QEMU command for an image. The VARS copy (or the Pi's boot files) live in `scratch`.
pub fn command(opts: &BootOptions, accel: Accel, scratch: &Path, interactive: bool) -> Result<Cmd> {
    if opts.qemu.firmware == Firmware::Rpi {
        return rpi_command(opts, scratch, interactive);
    }
    let q = &opts.qemu;
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).exists() {
            bail!("UEFI firmware {f} is missing: run `kiln doctor --install` (Debian package ovmf)");
        }
    }
    let vars = scratch.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS} to {}", vars.display()))?;
    let smp = vcpus(opts, accel).to_string();
    let cpu = tcg_cpu(&q.cpu, &q.system, accel);
    let accel = match accel {
        Accel::Kvm => "kvm",
        _ => "tcg",
    };
    let mut drive = format!("if=none,id=disk0,format=raw,file={}", opts.disk.display());
    if !opts.persist {
        drive.push_str(",snapshot=on");
    }
    let mut cmd = Cmd::new(format!("qemu-system-{}", q.system))
        .args(["-accel", accel, "-machine", &q.machine, "-cpu", &cpu, "-m", &q.memory])
        .args(["-smp", &smp])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
        .arg("-drive")
        .arg(drive)
        .args(["-device", "virtio-blk-pci,drive=disk0,bootindex=1"])
        .args(["-device", "virtio-rng-pci"]);
    if interactive {
        cmd = cmd.args(["-serial", "mon:stdio"]);
    } else {
        // A check ends at the first reboot: a boot that fails and reboots has failed.
        cmd = cmd.args(["-serial", "stdio", "-monitor", "none", "-no-reboot"]);
    }
    Ok(with_network(cmd, opts, "virtio-net-pci"))
}

/// User-mode networking, restricted, forwards on 127.0.0.1 only; or none at all.
fn with_network(cmd: Cmd, opts: &BootOptions, model: &str) -> Cmd {
    let mut nic = Vec::new();
    if let Some(port) = opts.ssh_port {
        nic.push(format!("hostfwd=tcp:127.0.0.1:{port}-:22"));
    }
    nic.extend(opts.net_rules.iter().cloned());
    if nic.is_empty() {
        cmd.args(["-nic", "none"])
    } else {
        cmd.arg("-nic").arg(format!("user,model={model},restrict=on,{}", nic.join(",")))
    }
}

/// Raspberry Pi images: QEMU cannot run the GPU firmware, so kiln does its part. It reads
/// autoboot.txt from partition 1, takes the slot the firmware would boot (`[tryboot]` with
/// `--tryboot`), reads that slot's config.txt and cmdline.txt, and hands the kernel, initramfs
/// and device tree to QEMU. The console argument is QEMU's, the rest of the command line the slot's.
fn rpi_command(opts: &BootOptions, scratch: &Path, interactive: bool) -> Result<Cmd> {
    let q = &opts.qemu;
    let raspi = q.machine.starts_with("raspi");
    // The card the guest writes to is also where the firmware (kiln) reads the boot files from
    // at every start: without --persist a sparse copy per `kiln boot` (a reboot keeps what the
    // guest wrote, autoboot.txt included), never the image itself.
    let disk = &if opts.persist {
        opts.disk.clone()
    } else {
        let copy = scratch.join("sd.img");
        if !copy.exists() {
            Cmd::new("cp").arg("--sparse=always").arg(&opts.disk).arg(&copy).run()?;
        }
        copy
    };
    // The SD card model wants a power-of-two size: the file grows (the space after the last
    // partition stays unused).
    let size = std::fs::metadata(disk).with_context(|| format!("reading {}", disk.display()))?.len();
    if raspi && !size.is_power_of_two() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(disk)
            .with_context(|| format!("opening {} for writing", disk.display()))?;
        f.set_len(size.next_power_of_two())
            .with_context(|| format!("growing {} to a power of two for QEMU's SD card", disk.display()))?;
    }
    let mut f = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let table = crate::mbr::MbrTable::read(&mut f)
        .with_context(|| format!("reading the partition table of {}", disk.display()))?;
    let offset_of = |number: u32| -> Result<u64> {
        table
            .partition(number)
            .map(|p| p.first_lba * crate::mbr::SECTOR)
            .with_context(|| format!("{} has no partition {number}", disk.display()))
    };
    let files = scratch.join("rpi-boot");
    std::fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
    let autoboot = read_fat_file(disk, offset_of(1)?, "autoboot.txt", &files)?;
    let autoboot =
        crate::boot::rpi::parse_autoboot(&std::fs::read_to_string(&autoboot).context("reading autoboot.txt")?)?;
    let slot_name =
        |part: u32| crate::boot::rpi::slot_of_partition(part).map(|s| format!("{s:?}")).unwrap_or_else(|| "?".into());
    let load = |part: u32| -> Result<(u64, BootConfig, String, PathBuf)> {
        let offset = offset_of(part)?;
        let config = crate::boot::rpi::parse_config(&std::fs::read_to_string(read_fat_file(
            disk,
            offset,
            "config.txt",
            &files,
        )?)?)
        .context("reading config.txt")?;
        let cmdline = std::fs::read_to_string(read_fat_file(disk, offset, "cmdline.txt", &files)?)
            .context("reading cmdline.txt")?;
        let kernel = read_fat_file(disk, offset, &config.kernel, &files)?;
        if std::fs::metadata(&kernel).map(|m| m.len()).unwrap_or(0) == 0 {
            bail!("the kernel {} is empty", config.kernel);
        }
        Ok((offset, config, cmdline, kernel))
    };
    // The firmware boots the [tryboot] partition once when the flag is set; when that
    // partition has no bootable files it falls back to the normal one, as kiln does here.
    let mut part = autoboot.partition(opts.tryboot);
    let (boot_offset, config, cmdline, kernel) = match load(part) {
        Ok(l) => l,
        Err(e) if opts.tryboot && part != autoboot.partition(false) => {
            let normal = autoboot.partition(false);
            // One line: the reason may carry a tool's multi-line stderr.
            let why = format!("{e:#}").split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!(
                "firmware (played by kiln): tryboot partition {part} (slot {}) is not bootable ({why}); falling back to partition {normal}",
                slot_name(part)
            );
            part = normal;
            load(part)?
        }
        Err(e) => return Err(e.context(format!("partition {part} (slot {}) is not bootable", slot_name(part)))),
    };
    let slot = slot_name(part);
    let console = q.console.as_deref().unwrap_or("ttyAMA0");
    let cmdline = emulated_pi_cmdline(&cmdline, console);
    eprintln!(
        "firmware (played by kiln): autoboot.txt -> partition {part} (slot {slot}{}), kernel {}",
        if opts.tryboot && part == autoboot.partition(true) { ", tryboot" } else { "" },
        config.kernel
    );

    let smp = vcpus(opts, Accel::Tcg).to_string();
    let mut cmd = Cmd::new(format!("qemu-system-{}", q.system))
        .args(["-accel", "tcg", "-machine", &q.machine, "-cpu", &q.cpu, "-m", &q.memory, "-smp", &smp])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-append")
        .arg(&cmdline);
    if let Some(initrd) = &config.initramfs {
        cmd = cmd.arg("-initrd").arg(read_fat_file(disk, boot_offset, initrd, &files)?);
    }
    if let Some(dtb) = &q.dtb {
        cmd = cmd.arg("-dtb").arg(read_fat_file(disk, boot_offset, dtb, &files)?);
    }
    let drive = format!("file={},format=raw", disk.display());
    cmd = if raspi {
        cmd.arg("-drive").arg(format!("{drive},if=sd"))
    } else {
        cmd.arg("-drive").arg(format!("{drive},if=none,id=disk0")).args([
            "-device",
            "virtio-blk-pci,drive=disk0",
            "-device",
            "virtio-rng-pci",
        ])
    };
    // raspi3b's device tree gives the PL011 to Bluetooth: the console is the mini UART, QEMU's
    // second serial port.
    // Interactive, the console is also logged: when the guest resets, kiln reads how (the
    // tryboot flag) from it to start the next boot as the firmware would.
    let serial = if interactive { "chardev:con" } else { "stdio" };
    if interactive {
        cmd = cmd
            .arg("-chardev")
            .arg(format!("stdio,id=con,mux=on,logfile={},logappend=off", interactive_console_log(scratch).display()));
        cmd = cmd.args(["-mon", "chardev=con"]);
    } else {
        cmd = cmd.args(["-monitor", "none"]);
    }
    if console == "ttyS1" {
        cmd = cmd.args(["-serial", "null", "-serial", serial]);
    } else {
        cmd = cmd.args(["-serial", serial]);
    }
    // The firmware's part happens between two QEMU runs: a reset ends this one.
    cmd = cmd.arg("-no-reboot");
    Ok(if raspi {
        // The Pi 3's only network is USB (dwc2 + a USB Ethernet device).
        if opts.ssh_port.is_some() || !opts.net_rules.is_empty() {
            bail!("networking under QEMU's raspi machines is not supported by kiln boot; use --machine virt for SSH");
        }
        cmd.args(["-nic", "none"])
    } else {
        with_network(cmd, opts, "virtio-net-pci")
    })
}

/// Copies `name` out of the FAT filesystem at `offset` in `disk` (mtools, no loop device).
fn read_fat_file(disk: &Path, offset: u64, name: &str, dir: &Path) -> Result<PathBuf> {
    if name.contains('/') || name.starts_with('.') {
        bail!("refusing the boot file name {name:?}");
    }
    let dest = dir.join(name);
    let _ = std::fs::remove_file(&dest);
    Cmd::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .args(["-n", "-m"])
        .arg(format!("::{name}"))
        .arg(&dest)
        .env("MTOOLS_SKIP_CHECK", "1")
        .run()
        .with_context(|| format!("reading {name} from the FAT partition at byte {offset} of {}", disk.display()))?;
    Ok(dest)
}

/// The kernel command line kiln (playing the Pi firmware) hands to an emulated Pi: the slot's
/// cmdline.txt with QEMU's console instead of the board's, and two arguments for emulation only
/// (the card keeps its cmdline.txt as it is for real hardware):
/// - `systemd.watchdog_sec=off`: the guest runs many times slower than the wall clock that the
///   emulated BCM2835 watchdog (at most ~15 s) counts in, and would reset a healthy, slow guest;
/// - `kpti=off`: the arm64 kernel turns page table isolation on whenever KASLR is on and the CPU
///   lacks E0PD (a Cortex-A72 does), and then switches translation tables on every entry to and
///   exit from the kernel. Under TCG each switch flushes QEMU's software TLB, and an emulator
///   has no speculative execution for the isolation to guard against. Measured (the Pi card on
///   `virt`, 1 vCPU, idle host): KILN-READY after 122.5 s with it, 39.5 s without.
pub fn emulated_pi_cmdline(cmdline: &str, console: &str) -> String {
    let mut args: Vec<String> =
        cmdline.split_whitespace().filter(|a| !a.starts_with("console=")).map(String::from).collect();
    args.push(format!("console={console},115200"));
    args.push("systemd.watchdog_sec=off".into());
    args.push("kpti=off".into());
    args.join(" ")
}

/// `kiln boot --machine virt`: the generic arm64 machine instead of the image's raspi model
/// (faster, virtio disk and network).
pub fn virt_machine(mut q: Qemu) -> Qemu {
    q.machine = "virt".into();
    q.cpu = "cortex-a72".into();
    q.memory = "1G".into();
    q.smp = 2;
    q.dtb = None;
    q.console = Some("ttyAMA0".into());
    q
}

/// Chooses the accelerator: KVM only when asked for or when a probe proves it boots firmware.
pub fn choose_accel(requested: Accel, qemu: &Qemu, scratch: &Path) -> Accel {
    match requested {
        Accel::Kvm | Accel::Tcg => requested,
        Accel::Auto => {
            // An ordinary user outside the kvm group cannot open /dev/kvm: TCG, no probe.
            let usable =
                nix::unistd::access("/dev/kvm", nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK);
            if qemu.system != "x86_64" || usable.is_err() {
                return Accel::Tcg;
            }
            // One verdict per user and boot of the host; a file another user made is not read.
            let euid = nix::unistd::geteuid();
            let cache = std::env::temp_dir().join(format!("kiln-kvm-probe-{euid}"));
            let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
            let mine = {
                use std::os::unix::fs::MetadataExt as _;
                std::fs::symlink_metadata(&cache).map(|m| m.is_file() && m.uid() == euid.as_raw()).unwrap_or(false)
            };
            if let Some(c) = mine.then(|| std::fs::read_to_string(&cache).ok()).flatten() {
                if let Some((id, verdict)) = c.split_once(' ') {
                    if id == boot_id.trim() {
                        return if verdict.trim() == "kvm" { Accel::Kvm } else { Accel::Tcg };
                    }
                }
            }
            let verdict = if probe_kvm(qemu, scratch) { Accel::Kvm } else { Accel::Tcg };
            // Never through a link another user put there (the file is in the shared /tmp).
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&cache)
                .and_then(|mut f| {
                    f.write_all(
                        format!("{} {}\n", boot_id.trim(), if verdict == Accel::Kvm { "kvm" } else { "tcg" })
                            .as_bytes(),
                    )
                });
            verdict
        }
    }
}

/// Boots OVMF with no disk under KVM and waits a few seconds for the firmware to reach its boot
/// manager on the serial console. Hosts where KVM guests hang fail this and get TCG.
fn probe_kvm(qemu: &Qemu, scratch: &Path) -> bool {
    let opts = BootOptions {
        disk: scratch.join("probe-empty.img"),
        qemu: qemu.clone(),
        accel: Accel::Kvm,
        persist: false,
        ssh_port: None,
        net_rules: vec![],
        log: None,
        tryboot: false,
        smp: None,
    };
    if std::fs::File::create(&opts.disk).and_then(|f| f.set_len(1 << 20)).is_err() {
        return false;
    }
    let Ok(cmd) = command(&opts, Accel::Kvm, scratch, false) else { return false };
    let Ok(mut child) = cmd.spawn_piped(false) else { return false };
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ok = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("BdsDxe") || line.contains("UEFI") => {
                ok = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    ok
}

/// How many times one `kiln boot` starts a Raspberry Pi guest that keeps resetting.
const MAX_STARTS: u32 = 8;

/// Starts QEMU headless: its console and its own messages (`qemu: ...`) as lines.
fn start_headless(
    opts: &BootOptions,
    accel: Accel,
    scratch: &Path,
) -> Result<(std::process::Child, mpsc::Receiver<String>)> {
    let mut child = command(opts, accel, scratch, false)?.spawn_piped(false)?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(clean_line(&line));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {}", clean_line(&line)));
        }
    });
    Ok((child, rx))
}

/// Boots and waits for the readiness marker. With `then`, runs that command while the guest is
/// still up (e.g. an SSH smoke test against `--ssh-port`), then stops the guest.
pub fn check(
    opts: &BootOptions,
    timeout: Duration,
    scratch: &Path,
    echo: bool,
    then: Option<&Cmd>,
) -> Result<CheckOutcome> {
    let accel = choose_accel(opts.accel, &opts.qemu, scratch);
    eprintln!(
        "booting {} under {} ({}), waiting up to {}s for {READY_MARKER}",
        opts.disk.display(),
        opts.qemu.system,
        if accel == Accel::Kvm { "kvm" } else { "tcg" },
        timeout.as_secs()
    );
    let started = Instant::now();
    let mut run = opts.clone();
    let (mut child, mut rx) = start_headless(&run, accel, scratch)?;
    let mut starts = 1;
    // Console lines of the current QEMU run (the tail spans every run).
    let mut this_run = 0usize;
    let mut log = match &opts.log {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("creating the console log {}", p.display()))?),
        None => None,
    };
    let mut tail: VecDeque<String> = VecDeque::new();
    let deadline = started + timeout;
    let outcome = loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break CheckOutcome::Failed {
                seconds: started.elapsed().as_secs_f64(),
                reason: format!("no {READY_MARKER} within {}s", timeout.as_secs()),
                tail: vec![],
            };
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if echo {
                    eprintln!("  | {line}");
                }
                tail.push_back(line.clone());
                this_run += 1;
                if tail.len() > TAIL_LINES {
                    tail.pop_front();
                }
                let secs = started.elapsed().as_secs_f64();
                if line.contains(NOT_READY_MARKER) {
                    break CheckOutcome::NotReady { seconds: secs, line, tail: vec![] };
                }
                if line.contains(READY_MARKER) {
                    break CheckOutcome::Ready { seconds: secs, line, then: None };
                }
                if line.contains("Kernel panic - not syncing") {
                    // Let a few more lines of the panic arrive.
                    let until = Instant::now() + Duration::from_secs(2);
                    while let Some(l) =
                        until.checked_duration_since(Instant::now()).and_then(|d| rx.recv_timeout(d).ok())
                    {
                        tail.push_back(l);
                        if tail.len() > TAIL_LINES {
                            tail.pop_front();
                        }
                    }
                    break CheckOutcome::Failed { seconds: secs, reason: "kernel panic".into(), tail: vec![] };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait();
                // A Raspberry Pi that resets starts again: kiln plays the firmware's part and
                // picks the slot the tryboot flag (or its absence) says.
                let by_itself = status.as_ref().is_ok_and(|s| s.success());
                // Only this run's lines tell how it ended; QEMU stopped by a signal ("terminating
                // on signal") also exits 0, and is not a reset.
                let lines: Vec<String> = tail.iter().skip(tail.len().saturating_sub(this_run)).cloned().collect();
                let stopped = lines.iter().any(|l| l.starts_with("qemu: ") && l.contains("terminating on signal"));
                if opts.qemu.firmware == Firmware::Rpi && by_itself && !stopped && starts < MAX_STARTS {
                    let reset = crate::boot::rpi::reset_of(&lines).unwrap_or(crate::boot::rpi::Reset::Plain);
                    if reset != crate::boot::rpi::Reset::PowerOff {
                        run.tryboot = reset == crate::boot::rpi::Reset::Tryboot;
                        eprintln!(
                            "firmware (played by kiln): the guest reset{}; starting it again",
                            if run.tryboot { " with the tryboot flag" } else { "" }
                        );
                        (child, rx) = start_headless(&run, accel, scratch)?;
                        starts += 1;
                        this_run = 0;
                        continue;
                    }
                }
                let status = status.map(crate::host::exec::describe_status).unwrap_or_default();
                break CheckOutcome::Failed {
                    seconds: started.elapsed().as_secs_f64(),
                    reason: format!("QEMU exited ({status}) before {READY_MARKER}"),
                    tail: vec![],
                };
            }
        }
    };
    let outcome = match (outcome, then) {
        (CheckOutcome::Ready { seconds, line, .. }, Some(cmd)) => {
            eprintln!("ready after {seconds:.1}s; running {cmd}");
            // Keep the console log going while the command runs.
            let log_thread = log.take().map(|mut f| {
                std::thread::spawn(move || {
                    for l in rx {
                        let _ = writeln!(f, "{l}");
                    }
                })
            });
            let result = cmd.run_with_lines(|l| println!("{l}")).map_err(|e| e.to_string());
            let _ = child.kill();
            let _ = child.wait();
            if let Some(t) = log_thread {
                let _ = t.join();
            }
            CheckOutcome::Ready { seconds, line, then: Some(result) }
        }
        (other, _) => other,
    };
    let _ = child.kill();
    let _ = child.wait();
    let tail: Vec<String> = tail.into_iter().collect();
    Ok(match outcome {
        CheckOutcome::NotReady { seconds, line, .. } => CheckOutcome::NotReady { seconds, line, tail },
        CheckOutcome::Failed { seconds, reason, .. } => CheckOutcome::Failed { seconds, reason, tail },
        ready => ready,
    })
}

fn interactive_console_log(scratch: &Path) -> PathBuf {
    scratch.join("console.log")
}

/// Runs QEMU attached to this terminal (serial console; Ctrl-A X quits). A Raspberry Pi guest
/// that reboots is started again on the slot the firmware would pick.
pub fn interactive(opts: &BootOptions, scratch: &Path) -> Result<()> {
    let accel = choose_accel(opts.accel, &opts.qemu, scratch);
    eprintln!(
        "serial console of {} (Ctrl-A X quits QEMU){}",
        opts.disk.display(),
        if opts.persist { "" } else { "; changes are thrown away (use --persist to keep them)" }
    );
    let mut run = opts.clone();
    for _ in 0..MAX_STARTS * 4 {
        let cmd = command(&run, accel, scratch, true)?;
        let status = cmd.spawn_piped(true)?.wait().context("waiting for QEMU")?;
        if !status.success() {
            bail!("QEMU exited with {}", crate::host::exec::describe_status(status));
        }
        if opts.qemu.firmware != Firmware::Rpi {
            return Ok(());
        }
        let log = std::fs::read(interactive_console_log(scratch)).unwrap_or_default();
        let lines: Vec<String> = log.split(|b| *b == b'\n').map(clean_line).collect();
        let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
        // Without a word on the console QEMU was quit (Ctrl-A X): nothing starts again.
        match crate::boot::rpi::reset_of(tail) {
            Some(crate::boot::rpi::Reset::Tryboot) => run.tryboot = true,
            Some(crate::boot::rpi::Reset::Plain) => run.tryboot = false,
            Some(crate::boot::rpi::Reset::PowerOff) | None => return Ok(()),
        }
        eprintln!(
            "firmware (played by kiln): the guest reset{}; starting it again",
            if run.tryboot { " with the tryboot flag" } else { "" }
        );
    }
    bail!("the guest kept resetting ({} starts); stopped", MAX_STARTS * 4)
}

/// Console bytes to a printable line: no carriage returns or terminal escape sequences.
pub fn clean_line(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&']') {
                    // OSC: ends at BEL or ESC \
                    while let Some(n) = chars.next() {
                        if n == '\x07' {
                            break;
                        }
                        if n == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                } else if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_cleaned() {
        assert_eq!(clean_line(b"\x1b[0;32m  OK  \x1b[0m] Reached target\r"), "  OK  ] Reached target");
        assert_eq!(clean_line(b"\x1b]104\x07[  1.0] KILN-READY"), "[  1.0] KILN-READY");
    }

    #[test]
    fn network_is_loopback_only() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = crate::config::image::load("pc-uefi", Path::new("/nonexistent")).unwrap().def.qemu;
        if !Path::new(OVMF_VARS).exists() {
            eprintln!("ovmf not installed; the boot tests cover this");
            return;
        }
        let opts = BootOptions {
            disk: "d.img".into(),
            qemu,
            accel: Accel::Tcg,
            persist: false,
            ssh_port: Some(2222),
            net_rules: vec![],
            log: None,
            tryboot: false,
            smp: None,
        };
        let cmd = command(&opts, Accel::Tcg, dir.path(), false).unwrap().to_string();
        assert!(cmd.contains("-nic user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"), "{cmd}");
        assert!(cmd.contains("snapshot=on"));
        let none = BootOptions { ssh_port: None, ..opts.clone() };
        assert!(command(&none, Accel::Tcg, dir.path(), false).unwrap().to_string().contains("-nic none"));
        // vCPUs: asked for, the board's under KVM, the TCG rule otherwise.
        let asked = BootOptions { smp: Some(3), ..opts.clone() };
        assert!(command(&asked, Accel::Tcg, dir.path(), false).unwrap().to_string().contains(" -smp 3 "));
        let board = opts.qemu.smp;
        assert!(command(&opts, Accel::Kvm, dir.path(), false)
            .unwrap()
            .to_string()
            .contains(&format!(" -smp {board} ")));
        let cores = std::thread::available_parallelism().unwrap().get();
        let tcg = format!(" -smp {} ", tcg_vcpus(board, cores));
        assert!(command(&opts, Accel::Tcg, dir.path(), false).unwrap().to_string().contains(&tcg));
        // No nested virtualisation offered to an emulated x86 guest; KVM passes the CPU as it is.
        assert_eq!((opts.qemu.system.as_str(), opts.qemu.cpu.as_str()), ("x86_64", "max"), "pc-uefi's board");
        assert!(command(&opts, Accel::Tcg, dir.path(), false).unwrap().to_string().contains(" -cpu max,svm=off "));
        assert!(command(&opts, Accel::Kvm, dir.path(), false).unwrap().to_string().contains(" -cpu max "));
        // An arm64 guest on `virt` follows the same rule.
        let arm =
            BootOptions { qemu: virt_machine(Qemu { system: "aarch64".into(), ..opts.qemu.clone() }), ..opts.clone() };
        let arm_tcg = format!(" -smp {} ", tcg_vcpus(2, cores));
        assert!(command(&arm, Accel::Tcg, dir.path(), false).unwrap().to_string().contains(&arm_tcg), "{arm:?}");
    }

    #[test]
    fn an_emulated_pi_gets_qemus_console_and_no_page_table_isolation() {
        let card = "root=/dev/mapper/root ro console=tty0 console=ttyS1,115200 rootwait quiet";
        assert_eq!(
            emulated_pi_cmdline(card, "ttyAMA0"),
            "root=/dev/mapper/root ro rootwait quiet console=ttyAMA0,115200 systemd.watchdog_sec=off kpti=off"
        );
        // The card's own choice comes first; the kernel takes the last `kpti=`.
        assert!(emulated_pi_cmdline("ro kpti=on", "ttyAMA0")
            .ends_with("kpti=on console=ttyAMA0,115200 systemd.watchdog_sec=off kpti=off"));
    }

    #[test]
    fn tcg_guests_get_at_most_one_vcpu_per_two_host_cores() {
        assert_eq!(tcg_vcpus(2, 2), 1);
        assert_eq!(tcg_vcpus(2, 1), 1);
        assert_eq!(tcg_vcpus(2, 3), 1);
        assert_eq!(tcg_vcpus(2, 4), 2);
        assert_eq!(tcg_vcpus(2, 64), 2);
        assert_eq!(tcg_vcpus(4, 6), 3);
        assert_eq!(tcg_vcpus(0, 8), 1);
    }
}
