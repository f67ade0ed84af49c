//! The real build and boot: mmdebstrap, EROFS + dm-verity, UKI, GPT, and QEMU under OVMF.
//! Slow (a few minutes); it prints what it measured so the CI log shows it ran.

use crate::{kiln, kiln_bin, repo_root, text};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn minimal_image_builds_verifies_and_boots() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the image test needs root (mmdebstrap --mode=root); run the README's test command, which runs as root"
    );
    let root = repo_root();
    let out = root.join("target/kiln-it/out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();

    // Build.
    let t = Instant::now();
    let build = Command::new(kiln_bin()).args(["build", "--out"]).arg(&out).current_dir(&root).output().unwrap();
    assert!(build.status.success(), "kiln build failed:\n{}", text(&build.stderr));
    println!("kiln-it: built minimal-pc-uefi in {:.1}s", t.elapsed().as_secs_f64());
    let dir = out.join("minimal-pc-uefi");
    let disk = dir.join("disk.img");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();

    // The partition table, as sfdisk reads it.
    let dump = run(Command::new("sfdisk").arg("-d").arg(&disk));
    let names: Vec<&str> = dump.lines().filter_map(|l| l.split("name=\"").nth(1)).map(|n| n.trim_end_matches('"')).collect();
    assert_eq!(names, ["esp", "root-a", "root-b", "data"], "{dump}");
    assert!(dump.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "ESP type: {dump}");
    println!("kiln-it: sfdisk sees {names:?}");

    // dm-verity accepts the root image with the manifest's root hash.
    let hash = manifest["verity"]["root_hash"].as_str().unwrap().to_string();
    let offset = manifest["verity"]["hash_offset"].as_u64().unwrap();
    let root_img = dir.join("root.img");
    run(Command::new("veritysetup").arg("verify").arg(&root_img).arg(&root_img).arg(&hash).arg(format!("--hash-offset={offset}")));
    println!("kiln-it: veritysetup verify accepts root.img with root hash {hash}");

    // The manifest matches the files.
    let inspect = kiln(&root, &["inspect", "--verify", dir.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));
    assert!(text(&inspect.stdout).contains("verified: 3 artifacts and 4 partitions match the manifest"), "{}", text(&inspect.stdout));

    // It boots to the readiness marker.
    let boot = kiln(&root, &["boot", "--check", "--timeout", "400", disk.to_str().unwrap()]);
    let boot_out = text(&boot.stdout);
    assert!(boot.status.success(), "boot check failed:\n{boot_out}\n{}", text(&boot.stderr));
    assert!(boot_out.contains("KILN-READY version=0.1.0"), "{boot_out}");
    println!("kiln-it: {}", boot_out.trim());

    // One flipped byte in root-a (in the EROFS superblock, read at mount) must stop the boot.
    let bad_dir = out.join("corrupt");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = bad_dir.join("disk.img");
    run(Command::new("cp").arg("--sparse=always").arg(&disk).arg(&bad));
    std::fs::copy(dir.join("manifest.json"), bad_dir.join("manifest.json")).unwrap();
    let root_a = manifest["partitions"].as_array().unwrap().iter().find(|p| p["name"] == "root-a").unwrap();
    let at = root_a["offset"].as_u64().unwrap() + 1024 + 8;
    flip_byte(&bad, at);
    let bad_boot = kiln(&root, &["boot", "--check", "--timeout", "400", bad.to_str().unwrap()]);
    let stderr = text(&bad_boot.stderr);
    assert_eq!(bad_boot.status.code(), Some(1), "a corrupted root must not boot:\n{}\n{stderr}", text(&bad_boot.stdout));
    let log = std::fs::read_to_string(bad_dir.join("boot-console.log")).unwrap();
    assert!(
        log.contains("dm-verity device corrupted") || log.contains("is corrupted"),
        "the failure should come from dm-verity; console:\n{log}"
    );
    let verity_line = log.lines().find(|l| l.contains("is corrupted")).or_else(|| log.lines().find(|l| l.contains("corrupted"))).unwrap_or_default();
    println!("kiln-it: flipped byte at {at} of disk.img: boot refused: {}", verity_line.trim());
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    b[0] ^= 0xff;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}
