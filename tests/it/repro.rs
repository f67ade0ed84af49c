//! Locked builds: `kiln lock`, then two `kiln build --locked` in different directories, one as
//! root and one as an ordinary user, must give bit-identical images; a tampered cached .deb must
//! stop a locked build.

use crate::Need;
use crate::{kiln_bin, repo_root, text, Unprivileged};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

fn kiln_in(work: &Path, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .args(args)
        .current_dir(work)
        .env("KILN_CACHE", work.join("cache"))
        .output()
        .expect("kiln runs")
}

fn image_hashes(dir: &Path, what: &str, secs: f64) -> Vec<String> {
    let h: Vec<String> = ["disk.img", "root.img", "manifest.json"].iter().map(|f| sha256(&dir.join(f))).collect();
    println!("kiln-it: {what}: built in {secs:.1}s: disk.img {} root.img {} manifest.json {}", h[0], h[1], h[2]);
    h
}

fn sha256(path: &Path) -> String {
    kiln::units::sha256_file(path).unwrap_or_else(|e| panic!("hashing {}: {e}", path.display())).hex()
}

#[test]
fn locked_builds_are_bit_identical_and_refuse_tampered_debs() {
    if !crate::host_can_run(
        "locked_builds_are_bit_identical_and_refuse_tampered_debs",
        &[Need::Root, Need::Tool("mmdebstrap")],
    ) {
        return;
    }
    let work = repo_root().join("target/kiln-it-repro");
    let _scratch = crate::Scratch(work.clone());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let t = Instant::now();
    let lock = kiln_in(&work, &["lock", "--out", "scratch"]);
    assert!(lock.status.success(), "kiln lock failed:\n{}", text(&lock.stderr));
    let lock_file = work.join("profiles/minimal.pc-uefi.lock");
    let locked = kiln::config::lock::LockFile::read(&lock_file).unwrap();
    println!(
        "kiln-it: locked {} packages in {:.1}s ({})",
        locked.packages.len(),
        t.elapsed().as_secs_f64(),
        lock_file.display()
    );

    // Two cold builds (each bootstraps) in different directories at different times: one as
    // root, one as an ordinary user (kiln in its user namespace, host/userns.rs) with a cache of
    // its own, seeded with the same verified .debs. The images must be the same bytes.
    let mut hashes = Vec::new();
    let prune = kiln_in(&work, &["cache", "prune"]);
    assert!(prune.status.success(), "kiln cache prune failed:\n{}", text(&prune.stderr));
    let t = Instant::now();
    let b = kiln_in(&work, &["build", "--locked", "--out", "out-1"]);
    assert!(b.status.success(), "kiln build --locked failed:\n{}", text(&b.stderr));
    assert!(!text(&b.stderr).contains("from the cache"), "a cold build must bootstrap");
    let root_secs = t.elapsed().as_secs_f64();
    hashes.push(image_hashes(&work.join("out-1/minimal-pc-uefi"), "out-1 (root)", root_secs));

    let user = Unprivileged::new("repro");
    let cache = user.dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let cp =
        Command::new("cp").args(["-a", "--reflink=auto"]).arg(work.join("cache/debs")).arg(&cache).output().unwrap();
    assert!(cp.status.success(), "{}", text(&cp.stderr));
    std::fs::create_dir_all(user.dir.join("profiles")).unwrap();
    std::fs::copy(&lock_file, user.dir.join("profiles/minimal.pc-uefi.lock")).unwrap();
    user.chown(&user.dir);
    let doctor = user.kiln(&user.dir, &cache, &["doctor"]);
    let doctor_out = text(&doctor.stdout);
    assert!(doctor_out.contains("rootless builds: this host is ready for kiln-it"), "{doctor_out}");
    let t = Instant::now();
    let b = user.kiln(&user.dir, &cache, &["build", "--locked", "--out", "out-2"]);
    assert!(b.status.success(), "kiln build --locked as {} failed:\n{}", user.name, text(&b.stderr));
    assert!(!text(&b.stderr).contains("from the cache"), "a cold build must bootstrap");
    let cold = t.elapsed().as_secs_f64();
    let dir = user.dir.join("out-2/minimal-pc-uefi");
    hashes.push(image_hashes(&dir, "out-2 (ordinary user)", cold));
    for f in ["disk.img", "root.img", "manifest.json"] {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(dir.join(f)).unwrap().uid(), user.uid, "{f} belongs to the user who built it");
    }
    assert!(!user.dir.join("out-2/.work").join("minimal-pc-uefi").exists(), "the work tree is removed");
    assert_eq!(hashes[0], hashes[1], "a root build and an ordinary user's build from one lock differ");
    println!("kiln-it: a root build and an ordinary user's build from one lock are bit-identical (root {root_secs:.1}s, user {cold:.1}s)");
    let _ = std::fs::remove_dir_all(work.join("out-1"));
    drop(user);

    // A configuration-only change (the release version) reuses the bootstrapped tree.
    let t = Instant::now();
    let b = kiln_in(&work, &["build", "--locked", "--out", "out-warm", "--release", "0.1.1"]);
    assert!(b.status.success(), "warm kiln build --locked failed:\n{}", text(&b.stderr));
    assert!(text(&b.stderr).contains("(from the cache)"), "the warm build must reuse the tree:\n{}", text(&b.stderr));
    let warm = t.elapsed().as_secs_f64();
    println!(
        "kiln-it: warm rebuild after a config-only change: {warm:.1}s (cold {cold:.1}s, {:.1}x faster)",
        cold / warm
    );
    let _ = std::fs::remove_dir_all(work.join("out-warm"));
    let prune = kiln_in(&work, &["cache", "prune"]);
    assert!(prune.status.success(), "{}", text(&prune.stderr));

    // Tamper with one cached .deb: the locked build must stop, naming the package.
    let victim = locked.packages.iter().find(|p| p.name == "systemd").expect("systemd is locked");
    let cached = work.join("cache/debs").join(format!("{}.deb", victim.sha256));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[100] ^= 0x01;
    std::fs::remove_file(&cached).unwrap();
    std::fs::write(&cached, bytes).unwrap();
    let b = kiln_in(&work, &["build", "--locked", "--out", "out-3"]);
    let err = text(&b.stderr);
    assert_eq!(b.status.code(), Some(1), "a tampered .deb must fail the build:\n{err}");
    let want = format!("package systemd {}: the cached .deb", victim.version);
    assert!(
        err.contains(&want) && err.contains(&format!("but the lock says {}", victim.sha256)),
        "expected {want:?} in:\n{err}"
    );
    assert!(!work.join("out-3/minimal-pc-uefi").exists(), "a failed build must not leave an output");
    println!(
        "kiln-it: tampered systemd .deb refused: {}",
        err.lines().find(|l| l.starts_with("error:")).unwrap_or_default()
    );
}
