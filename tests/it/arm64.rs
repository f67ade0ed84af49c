//! The Raspberry Pi image for real: an arm64 mmdebstrap build on this x86-64 host (qemu-user for
//! maintainer scripts only; kiln's initramfs is made natively; the arm64 kiln-agent cross-built
//! by kiln itself), the DOS table with the tryboot A/B layout, the firmware files of slot A, and
//! then the Pi updating itself over the air on QEMU's `virt` machine (the same card, the same
//! boot files read as the firmware reads them, restarted after every reset as the firmware
//! would): a first try-boot of a never-updated card falling back to slot A, v1 -> v2 committed
//! (autoboot.txt swapped), a power cut during v3's install, v3 failing its health check rolled
//! back to v2, a power cut during v4's trial. Prints what it measured.

use crate::httpd::{serve_channel as serve, Server};
use crate::vm::Vm;
use crate::Need;
use crate::{kiln, kiln_bin, repo_root, text};
use kiln::boot::rpi::Reset;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the guest finds the feed: QEMU's user-mode network forwards it to the test's server.
const FEED_HOST: &str = "10.0.2.100";

/// One boot of the arm64 guest under TCG, generously (a loaded 2-core host).
const BOOT: Duration = Duration::from_secs(900);

/// kiln with the default cache (the agent's toolchain root and the .debs are kept across runs).
fn kiln_here(work: &Path, args: &[&str]) -> String {
    let out = Command::new(kiln_bin()).args(args).current_dir(work).output().unwrap();
    assert!(out.status.success(), "kiln {} failed:\n{}\n{}", args.join(" "), text(&out.stdout), text(&out.stderr));
    text(&out.stdout) + &text(&out.stderr)
}

fn snapshot(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["stable.json", "stable.json.sig"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to.to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// A file from the FAT partition at `offset` of `disk`, read with mtools.
fn fat_file(disk: &Path, offset: u64, name: &str) -> String {
    run(Command::new("mtype")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()))
        .arg(format!("::{name}"))
        .env("MTOOLS_SKIP_CHECK", "1"))
}

#[test]
fn rpi4_image_builds_boots_and_updates_itself() {
    let Some(_timed) = crate::heavy_test(
        "rpi4_image_builds_boots_and_updates_itself",
        &[
            Need::Root,
            Need::Tool("mmdebstrap"),
            Need::Tool("arch-test"),
            Need::Tool("qemu-system-aarch64"),
            Need::Tool("mtype"),
        ],
    ) else {
        return;
    };
    let root = repo_root();
    let work = root.join("target/kiln-it-rpi");
    let _scratch = crate::Scratch(work.clone());
    let versions = ["0.1.0", "0.2.0", "0.3.0", "0.4.0"];
    let outs: Vec<PathBuf> = versions.iter().map(|v| work.join(format!("out-{v}/pi-rpi4"))).collect();
    // KILN_IT_REUSE=1 keeps the builds of an earlier run (for working on the update part).
    let reuse = std::env::var_os("KILN_IT_REUSE").is_some() && outs[3].join("manifest.json").exists();
    if reuse {
        for d in ["site", "site-staging", "meta-2", "meta-3", "meta-4", "qemu", "card.img", "console.log"] {
            let p = work.join(d);
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
        }
    } else {
        let _ = std::fs::remove_dir_all(&work);
        build_releases(&work, &versions);
    }
    let dir = outs[0].clone();
    let disk = dir.join("disk.img");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["arch"], "arm64");
    assert_eq!(manifest["partition_table"], "mbr");

    // The DOS table as sfdisk reads it: autoboot, boot A/B (FAT, primary), extended, root A/B, data.
    let dump = run(Command::new("sfdisk").arg("-d").arg(&disk));
    assert!(dump.contains("label: dos"), "{dump}");
    let types: Vec<&str> = dump.lines().filter_map(|l| l.split("type=").nth(1)).collect();
    assert_eq!(types, ["c", "c", "c", "f", "83", "83", "83"], "{dump}");
    let label_id = dump.lines().find_map(|l| l.strip_prefix("label-id: 0x")).unwrap().trim().to_string();
    println!("kiln-it: sfdisk: dos label {label_id}, partition types {types:?}");

    // What the firmware reads: autoboot.txt in p1, config.txt + cmdline.txt + files in p2.
    let parts = manifest["partitions"].as_array().unwrap();
    let offset = |name: &str| parts.iter().find(|p| p["name"] == name).unwrap()["offset"].as_u64().unwrap();
    let autoboot = fat_file(&disk, offset("autoboot"), "autoboot.txt");
    assert_eq!(autoboot, "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n");
    let config = fat_file(&disk, offset("boot-a"), "config.txt");
    for want in ["arm_64bit=1", "upstream_kernel=1", "kernel=vmlinuz", "initramfs initrd.img"] {
        assert!(config.lines().any(|l| l == want), "config.txt lacks {want:?}:\n{config}");
    }
    let cmdline = fat_file(&disk, offset("boot-a"), "cmdline.txt");
    let hash = manifest["verity"]["root_hash"].as_str().unwrap();
    assert_eq!(cmdline.lines().count(), 1, "{cmdline}");
    assert!(cmdline.contains(&format!("kiln.root=PARTUUID={label_id}-05")), "{cmdline}");
    assert!(cmdline.contains(&format!("kiln.verity={hash}")), "{cmdline}");
    let listing = run(Command::new("mdir")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), offset("boot-a")))
        .args(["-b", "::"])
        .env("MTOOLS_SKIP_CHECK", "1"));
    for want in ["start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "vmlinuz", "initrd.img"] {
        assert!(listing.contains(want), "boot-a lacks {want}:\n{listing}");
    }
    println!("kiln-it: autoboot.txt -> slot A (p2), tryboot -> p3; boot-a holds firmware, kernel, initramfs, DTBs; cmdline binds root p5 + root hash");

    let inspect = kiln(&root, &["inspect", "--verify", dir.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));
    println!("kiln-it: {}", text(&inspect.stdout).lines().last().unwrap_or_default());

    // QEMU's raspi3b machine (the Pi's own device tree, SD card and mini UART) is booted by
    // scripts/bench ("rpi4 boot to ready (raspi3b)"); here the card boots on `virt`, which
    // reads the same boot files and is several times faster under TCG.
    updates_over_the_air(&work, &outs);
}

/// Keys, the profile, one lock, a cold locked build of the first version, then the others from
/// the cached tree.
fn build_releases(work: &Path, versions: &[&str]) {
    std::fs::create_dir_all(work.join("profiles")).unwrap();
    // With [update]: the image must carry the arm64 agent, which kiln cross-builds itself.
    // Release 0.3.0 is the same appliance with a health check that fails.
    kiln_here(work, &["keygen", "--out", "keys"]);
    std::fs::write(
        work.join("profiles/pi.toml"),
        format!(
            "extends = \"minimal\"\n[system]\nhostname = \"kiln-pi\"\n\
             [update]\nfeed = \"http://{FEED_HOST}/stable.atom\"\npublic_key = \"../keys/kiln-release.pub\"\n\
             interval = \"10s\"\njitter = \"0s\"\n\
             [health]\ncommands = [\"! grep -q '^IMAGE_VERSION=0.3.0$' /usr/lib/os-release\"]\n"
        ),
    )
    .unwrap();
    let t = Instant::now();
    kiln_here(work, &["lock", "--profile", "profiles/pi.toml", "--image", "rpi4", "--out", "scratch"]);
    println!(
        "kiln-it: locked pi-rpi4 (arm64: apt resolves and downloads, nothing installed) in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let lock = "profiles/pi.rpi4.lock";
    for v in versions {
        let t = Instant::now();
        let o = work.join(format!("out-{v}"));
        let log = kiln_here(
            work,
            &["build", "--profile", "profiles/pi.toml", "--image", "rpi4", "--lock", lock, "--release", v, "--out"]
                .into_iter()
                .chain([o.to_str().unwrap()])
                .collect::<Vec<_>>(),
        );
        let secs = t.elapsed().as_secs_f64();
        // The per-stage summary lines ("    bootstrap   512.3s  kernel ...").
        let stages: Vec<String> = log
            .lines()
            .filter(|l| l.starts_with("    ") && !l.trim_start().starts_with("==>"))
            .map(|l| l.trim().to_string())
            .collect();
        println!("kiln-it: built pi-rpi4 {v} (arm64, locked) in {secs:.1}s");
        // Only the first release's card is booted; the others are published (root, boot image).
        if *v != versions[0] {
            crate::drop_outputs(&o.join("pi-rpi4"), &["disk.img", "disk.img.bmap"]);
        }
        if *v == versions[0] {
            for s in stages.iter().take(14) {
                println!("kiln-it:   {s}");
            }
        }
        // The agent stage cross-built (or, with a warm cache, reused) the arm64 agent.
        assert!(
            stages.iter().any(|s| s.starts_with("agent ") && s.contains("kiln-agent arm64")),
            "no agent stage in the build output:\n{log}"
        );
    }
}

/// The Pi updating itself: the releases published with `kiln publish`, served on 127.0.0.1
/// (relayed into the guest's restricted network), the real agent on the card, QEMU `virt`
/// started again after every reset with the slot the firmware would take.
fn updates_over_the_air(work: &Path, outs: &[PathBuf]) {
    let staging = work.join("site-staging");
    let mut metas = Vec::new();
    for (i, dir) in outs.iter().enumerate().skip(1) {
        kiln_here(
            work,
            &[
                "publish",
                dir.to_str().unwrap(),
                "--channel",
                "stable",
                "--to",
                staging.to_str().unwrap(),
                "--key",
                "keys/kiln-release.key",
                "--base-url",
                &format!("http://{FEED_HOST}/"),
            ],
        );
        metas.push(snapshot(&staging, &work.join(format!("meta-{}", i + 1))));
        crate::drop_outputs(dir, &["root.img", "boot.img"]);
    }
    let (meta_v2, meta_v3, meta_v4) = (&metas[0], &metas[1], &metas[2]);
    let site = work.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::os::unix::fs::symlink(staging.join("artifacts"), site.join("artifacts")).unwrap();
    // Nothing published yet at first (the server answers 404): the device says so and runs on.
    let server = Server::start(&site);
    let port = server.port();

    let manifest: kiln::stages::manifest::Manifest =
        serde_json::from_str(&std::fs::read_to_string(outs[0].join("manifest.json")).unwrap()).unwrap();
    let qemu = kiln::boot::qemu::virt_machine(manifest.qemu.clone());
    let disk = work.join("card.img");
    let cp = Command::new("cp").arg("--sparse=always").arg(outs[0].join("disk.img")).arg(&disk).status().unwrap();
    assert!(cp.success());
    crate::drop_outputs(&outs[0], &["disk.img", "disk.img.bmap"]);
    // An 8 GiB card: the data partition (logical 7 in the extended 4) grows to its end at first boot.
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 << 30).unwrap();
    let offset = |name: &str| manifest.partitions.iter().find(|p| p.name == name).unwrap().offset;
    let autoboot = || fat_file(&disk, offset("autoboot"), "autoboot.txt");
    let log = work.join("console.log");
    let scratch = work.join("qemu");
    let relays = [(format!("{FEED_HOST}:80"), port)];
    let relays: Vec<(&str, u16)> = relays.iter().map(|(g, p)| (g.as_str(), *p)).collect();
    let start = |tryboot: bool| Vm::start_rpi(&disk, &qemu, &relays, tryboot, &log, &scratch);
    // The next start after `vm` ended, as the firmware decides it.
    let restart = |vm: &Vm, expect: Reset| {
        let reset = vm.reset().unwrap_or(Reset::Plain);
        assert_eq!(reset, expect, "the guest's last reset");
        start(reset == Reset::Tryboot)
    };

    // v1 -> v2: installed into boot-b + root-b, `reboot "0 tryboot"`, healthy, committed.
    // The first start asks for the tryboot slot of a card that was never updated: slot B holds
    // no boot files, so the firmware (played by kiln) falls back to slot A, as the real one does.
    let t = Instant::now();
    let mut vm = start(true);
    let var = vm.wait_for(&["kiln-agent: /var is ", "kiln-agent: error: the data partition"], BOOT);
    assert!(
        var.contains("partition grown from") && var.contains("new ext4 file system"),
        "the first boot should grow the data partition to the 8 GiB card and format it: {var}"
    );
    println!("kiln-it: pi first boot on an 8 GiB card: {}", var.trim());
    vm.wait_for(&["kiln-agent: booted 0.1.0 from slot a (committed)"], BOOT);
    let ready = vm.wait_for(&["KILN-READY", "KILN-NOT-READY"], BOOT);
    assert!(ready.contains("KILN-READY"), "{ready}");
    let first_ready = t.elapsed().as_secs_f64();
    let unserved = vm.wait_for(&["kiln-agent: "], BOOT);
    println!("kiln-it: pi v1 ready after {first_ready:.1}s; with no release served: {}", unserved.trim());
    assert!(vm.child.try_wait().unwrap().is_none(), "the device rebooted without a feed");
    serve(&site, meta_v2);
    vm.wait_for(&["kiln-agent: installing 0.2.0 into slot b"], BOOT);
    let t_install = Instant::now();
    let installed = vm.wait_for(&["kiln-agent: installed 0.2.0 into slot b"], BOOT);
    let install_secs = t_install.elapsed().as_secs_f64();
    vm.wait_exit(Duration::from_secs(300));
    let mut vm = restart(&vm, Reset::Tryboot);
    let var = vm.wait_for(&["kiln-agent: /var is ", "kiln-agent: error: the data partition"], BOOT);
    assert!(var.contains("/var is") && !var.contains("grown"), "an update must not touch the data partition: {var}");
    vm.wait_for(&["kiln-agent: booted 0.2.0 from slot b (trial"], BOOT);
    vm.wait_for(&["KILN-READY version=0.2.0"], BOOT);
    vm.wait_for(&["kiln-agent: committed 0.2.0 in slot b"], BOOT);
    vm.wait_for(&["kiln-agent: running 0.2.0, the newest release"], BOOT);
    let swapped = autoboot();
    assert_eq!(swapped, "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n");
    println!(
        "kiln-it: pi v1 -> v2 installed in {install_secs:.1}s ({}), committed {:.1}s after v1 started; autoboot.txt: [all] -> 3",
        installed.trim(),
        t.elapsed().as_secs_f64()
    );

    // v3 fails its health check: the trial rolls back by itself (a plain reboot: [all] = v2).
    // First a power cut while v3 downloads: the committed v2 comes up and the install goes on.
    serve(&site, meta_v3);
    server.set_rate_limit(Some(4 << 20));
    let t = Instant::now();
    vm.wait_for(&["kiln-agent: installing 0.3.0 into slot a"], BOOT);
    std::thread::sleep(Duration::from_secs(6));
    vm.kill();
    let mut vm = start(false);
    vm.wait_for(&["kiln-agent: booted 0.2.0 from slot b (committed)"], BOOT);
    vm.wait_for(&["KILN-READY version=0.2.0"], BOOT);
    server.set_rate_limit(None);
    let resumed = vm.wait_for(&["kiln-agent: resuming", "kiln-agent: installing 0.3.0"], BOOT);
    vm.wait_for(&["kiln-agent: installed 0.3.0 into slot a"], BOOT);
    println!("kiln-it: pi power cut during the v3 download: came up on v2; then {}", resumed.trim());
    vm.wait_exit(Duration::from_secs(900));
    let mut vm = restart(&vm, Reset::Tryboot);
    vm.wait_for(&["kiln-agent: booted 0.3.0 from slot a (trial"], BOOT);
    vm.wait_for(&["KILN-NOT-READY version=0.3.0"], BOOT);
    vm.wait_for(&["kiln-agent: 0.3.0 failed its health check; rolling back to 0.2.0 in slot b"], BOOT);
    vm.wait_exit(Duration::from_secs(300));
    let mut vm = restart(&vm, Reset::Plain);
    vm.wait_for(&["kiln-agent: booted 0.2.0 from slot b (committed)"], BOOT);
    let skip = vm.wait_for(&["kiln-agent: release 0.3.0 skipped: it failed on this device"], BOOT);
    // The rejected trial is marked on the medium itself: [tryboot] names the committed slot too.
    assert_eq!(
        autoboot(),
        "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=3\n",
        "no tryboot may start the failed v3"
    );
    println!("kiln-it: pi v3 rolled back to v2 in {:.1}s; then: {}", t.elapsed().as_secs_f64(), skip.trim());

    // A power cut during v4's trial: the tryboot flag is gone, the committed v2 boots, and the
    // trial is started again (tryboot leaves no trace: reboots into it are counted up to
    // update.tries, 3), where it passes and is committed.
    serve(&site, meta_v4);
    vm.wait_for(&["kiln-agent: installed 0.4.0 into slot a"], BOOT);
    vm.wait_exit(Duration::from_secs(300));
    let mut vm = restart(&vm, Reset::Tryboot);
    vm.wait_for(&["kiln-agent: booted 0.4.0 from slot a (trial"], BOOT);
    vm.kill();
    let mut vm = start(false);
    let note = vm.wait_for(&["kiln-agent: the trial of 0.4.0 in slot a ended in a reset or power cut"], BOOT);
    assert!(note.contains("(reboot 1 of 3)"), "{note}");
    vm.wait_for(&["kiln-agent: booted 0.2.0 from slot b (committed)"], BOOT);
    vm.wait_for(&["KILN-READY version=0.2.0"], BOOT);
    assert_eq!(autoboot(), swapped, "an interrupted trial must not change autoboot.txt");
    vm.wait_for(&["kiln-agent: installed 0.4.0 into slot a"], BOOT);
    vm.wait_exit(Duration::from_secs(300));
    let mut vm = restart(&vm, Reset::Tryboot);
    vm.wait_for(&["kiln-agent: booted 0.4.0 from slot a (trial"], BOOT);
    vm.wait_for(&["kiln-agent: committed 0.4.0 in slot a"], BOOT);
    assert_eq!(autoboot(), "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n");
    vm.kill();
    println!(
        "kiln-it: pi power cut during the v4 trial: came up on the committed v2 ({}), started the trial again, committed v4",
        note.trim()
    );
}
