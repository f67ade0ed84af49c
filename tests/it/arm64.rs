//! The Raspberry Pi image for real: an arm64 mmdebstrap build on this x86-64 host (qemu-user for
//! maintainer scripts only; kiln's initramfs is made natively), the DOS table with the tryboot
//! A/B layout, the firmware files of slot A, and a QEMU boot (`-M raspi3b`) to the readiness
//! marker with kiln playing the GPU firmware's part. Prints what it measured.

use crate::Need;
use crate::{kiln, kiln_bin, repo_root, text};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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
fn rpi4_image_builds_and_boots_in_qemu() {
    if !crate::host_can_run(
        "rpi4_image_builds_and_boots_in_qemu",
        &[Need::Root, Need::Tool("mmdebstrap"), Need::Tool("arch-test"), Need::Tool("qemu-system-aarch64")],
    ) {
        return;
    }
    let root = repo_root();
    let work = root.join("target/kiln-it-rpi");
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("profiles")).unwrap();
    // With [update]: the image must carry the arm64 agent, which kiln cross-builds itself.
    let keygen = Command::new(kiln_bin()).args(["keygen", "--out", "keys"]).current_dir(&work).output().unwrap();
    assert!(keygen.status.success(), "kiln keygen: {}", text(&keygen.stderr));
    std::fs::write(
        work.join("profiles/pi.toml"),
        "extends = \"minimal\"\n[system]\nhostname = \"kiln-pi\"\n\
         [update]\nfeed = \"http://10.0.2.100/stable.atom\"\npublic_key = \"../keys/kiln-release.pub\"\n",
    )
    .unwrap();

    let t = Instant::now();
    let build = Command::new(kiln_bin())
        .args(["build", "--profile", "profiles/pi.toml", "--image", "rpi4", "--out"])
        .arg(&out)
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(build.status.success(), "kiln build --image rpi4 failed:\n{}", text(&build.stderr));
    let secs = t.elapsed().as_secs_f64();
    // The per-stage summary lines ("    bootstrap   512.3s  kernel ...").
    let stages: Vec<String> = text(&build.stderr)
        .lines()
        .filter(|l| l.starts_with("    ") && !l.trim_start().starts_with("==>"))
        .map(|l| l.trim().to_string())
        .collect();
    println!("kiln-it: built pi-rpi4 (arm64, cold) in {secs:.1}s");
    for s in stages.iter().take(14) {
        println!("kiln-it:   {s}");
    }
    // The agent stage cross-built (or, with a warm cache, reused) the arm64 agent.
    assert!(
        stages.iter().any(|s| s.starts_with("agent ") && s.contains("kiln-agent arm64")),
        "no agent stage in the build output:\n{}",
        text(&build.stderr)
    );
    let dir = out.join("pi-rpi4");
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

    // Boots under QEMU's raspi3b to the readiness marker, asked to try-boot: slot B of a card
    // that was never updated holds no boot files, so the firmware (played by kiln boot) falls
    // back to the normal slot A, as the real one does.
    let t = Instant::now();
    let boot = kiln(&root, &["boot", "--check", "--tryboot", "--timeout", "900", disk.to_str().unwrap()]);
    let boot_out = text(&boot.stdout);
    let err = text(&boot.stderr);
    let fallback = err.lines().find(|l| l.contains("tryboot partition 3 (slot B) is not bootable")).map(str::to_string);
    assert!(
        fallback.as_deref().is_some_and(|l| l.contains("falling back to partition 2")),
        "no fallback (on one line) from the empty tryboot slot: {err}"
    );
    assert!(err.contains("autoboot.txt -> partition 2 (slot A)"), "{err}");
    println!("kiln-it: {}", fallback.unwrap().trim());
    assert!(boot.status.success(), "boot check of the rpi4 image failed:\n{boot_out}\n{}", text(&boot.stderr));
    assert!(boot_out.contains("KILN-READY"), "{boot_out}");
    println!(
        "kiln-it: raspi3b boot: {} ({:.1}s wall)",
        boot_out.lines().next().unwrap_or_default().trim(),
        t.elapsed().as_secs_f64()
    );
}
