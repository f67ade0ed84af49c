//! Locked builds of a `kiln init` project: the ordinary user who made it runs `kiln lock`, then
//! two `kiln build --locked` in different directories, one as root and one as that user, must
//! give bit-identical images; the user boots its image and logs in with its own SSH key; a
//! tampered cached .deb must stop a locked build.

use crate::Need;
use crate::{kiln_bin, repo_root, text, Unprivileged};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

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
    let Some(_timed) = crate::heavy_test(
        "locked_builds_are_bit_identical_and_refuse_tampered_debs",
        &[Need::Root, Need::Tool("mmdebstrap")],
    ) else {
        return;
    };
    let work = repo_root().join("target/kiln-it-repro");
    let _scratch = crate::Scratch(work.clone());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The project: an ordinary user's `kiln init`, with that user's own SSH key.
    let user = Unprivileged::new("repro");
    let ssh_dir = user.dir.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-it@repro", "-f"])
        .arg(ssh_dir.join("id_ed25519"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen.stderr));
    user.chown(&user.dir);
    let init = user.kiln(&user.dir, &user.dir.join("cache"), &["init", "myhome"]);
    assert!(init.status.success(), "kiln init as {}:\n{}", user.name, text(&init.stderr));
    let profile = user.dir.join("myhome/myhome.toml");
    let profile_arg = "myhome/myhome.toml";
    // Root runs in the same directory as the user (the manifest records the profile's path as
    // given), with its cache and outputs under `work`.
    let root_kiln = |args: &[&str]| {
        Command::new(kiln_bin())
            .args(args)
            .current_dir(&user.dir)
            .env("KILN_CACHE", work.join("cache"))
            .output()
            .expect("kiln runs")
    };
    let out = |name: &str| work.join(name).to_str().unwrap().to_string();
    assert!(std::fs::read_to_string(&profile).unwrap().contains("kiln-it@repro"), "the user's key is in the profile");

    // The user locks its project (apt resolves and downloads into the user's cache).
    let cache = user.dir.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    user.chown(&cache);
    let t = Instant::now();
    let lock = user.kiln(&user.dir, &cache, &["lock", "--profile", profile_arg, "--out", "scratch"]);
    assert!(lock.status.success(), "kiln lock as {} failed:\n{}", user.name, text(&lock.stderr));
    let lock_file = user.dir.join("myhome/myhome.pc-uefi.lock");
    let lock_dir = lock_file.parent().unwrap().to_str().unwrap();
    let locked = kiln::config::lock::LockFile::read(&lock_file).unwrap();
    println!(
        "kiln-it: locked {} packages in {:.1}s ({})",
        locked.packages.len(),
        t.elapsed().as_secs_f64(),
        lock_file.display()
    );

    // Two cold builds (each bootstraps) in different directories at different times: one as
    // root (its cache seeded with the user's verified .debs), one as the ordinary user (kiln in
    // its user namespace, host/userns.rs). The images must be the same bytes.
    let mut hashes = Vec::new();
    std::fs::create_dir_all(work.join("cache")).unwrap();
    let cp = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(cache.join("debs"))
        .arg(work.join("cache"))
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", text(&cp.stderr));
    let prune = root_kiln(&["cache", "prune", lock_dir]);
    assert!(prune.status.success(), "kiln cache prune failed:\n{}", text(&prune.stderr));
    let t = Instant::now();
    let b = root_kiln(&["build", "--profile", profile_arg, "--locked", "--out", &out("out-1")]);
    assert!(b.status.success(), "kiln build --locked failed:\n{}", text(&b.stderr));
    assert!(!text(&b.stderr).contains("from the cache"), "a cold build must bootstrap");
    let root_secs = t.elapsed().as_secs_f64();
    hashes.push(image_hashes(&work.join("out-1/myhome-pc-uefi"), "out-1 (root)", root_secs));

    let prune = user.kiln(&user.dir, &cache, &["cache", "prune", "myhome"]);
    assert!(prune.status.success(), "kiln cache prune as {}:\n{}", user.name, text(&prune.stderr));
    let doctor = user.kiln(&user.dir, &cache, &["doctor"]);
    let doctor_out = text(&doctor.stdout);
    assert!(doctor_out.contains("rootless builds: this host is ready for kiln-it"), "{doctor_out}");
    // Bad input first: a user without subordinate ids is told what is missing and how to fix
    // it; an output directory the user cannot write is named.
    let nobody = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(user.dir.join("bin/kiln"))
        .arg("build")
        .current_dir("/tmp")
        .output()
        .unwrap();
    let err = text(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(1), "{err}");
    assert!(err.contains("/etc/subuid gives nobody no range") && err.contains("usermod --add-subuids"), "{err}");
    let unwritable =
        user.kiln(&user.dir, &cache, &["build", "--profile", "myhome/myhome.toml", "--out", "/root/kiln-it-out"]);
    let err = text(&unwritable.stderr);
    assert!(!unwritable.status.success() && err.contains("creating /root/kiln-it-out"), "{err}");
    println!("kiln-it: as nobody: {}", text(&nobody.stderr).lines().take(2).collect::<Vec<_>>().join(" / "));

    let t = Instant::now();
    let b = user.kiln(&user.dir, &cache, &["build", "--profile", "myhome/myhome.toml", "--locked", "--out", "out-2"]);
    assert!(b.status.success(), "kiln build --locked as {} failed:\n{}", user.name, text(&b.stderr));
    assert!(!text(&b.stderr).contains("from the cache"), "a cold build must bootstrap");
    let cold = t.elapsed().as_secs_f64();
    let dir = user.dir.join("out-2/myhome-pc-uefi");
    hashes.push(image_hashes(&dir, "out-2 (ordinary user)", cold));
    for f in ["disk.img", "root.img", "manifest.json"] {
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(dir.join(f)).unwrap().uid(), user.uid, "{f} belongs to the user who built it");
    }
    assert!(!user.dir.join("out-2/.work/myhome-pc-uefi").exists(), "the work tree is removed");
    assert_eq!(hashes[0], hashes[1], "a root build and an ordinary user's build from one lock differ");
    println!("kiln-it: a root build and an ordinary user's build from one lock are bit-identical (root {root_secs:.1}s, user {cold:.1}s)");
    let _ = std::fs::remove_dir_all(work.join("out-1"));

    // The user boots its image (QEMU as the user) and logs in as admin with its own key.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let ssh = "ssh -i .ssh/id_ed25519 -p \"$KILN_SSH_PORT\" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes admin@127.0.0.1 'echo login-as-$(id -un)'";
    let t = Instant::now();
    let boot = user.kiln(
        &user.dir,
        &cache,
        &[
            "boot",
            "--check",
            "--timeout",
            "900",
            "--ssh-port",
            &port,
            "out-2/myhome-pc-uefi/disk.img",
            "--",
            "sh",
            "-c",
            ssh,
        ],
    );
    let boot_out = text(&boot.stdout) + &text(&boot.stderr);
    assert!(boot.status.success() && boot_out.contains("login-as-admin"), "boot and SSH as {}:\n{boot_out}", user.name);
    println!(
        "kiln-it: {} booted its image and logged in as admin with its own key in {:.1}s",
        user.name,
        t.elapsed().as_secs_f64()
    );

    // A configuration-only change (the release version) reuses the bootstrapped tree.
    let t = Instant::now();
    let b =
        root_kiln(&["build", "--profile", profile_arg, "--locked", "--out", &out("out-warm"), "--release", "0.1.1"]);
    assert!(b.status.success(), "warm kiln build --locked failed:\n{}", text(&b.stderr));
    assert!(text(&b.stderr).contains("(from the cache)"), "the warm build must reuse the tree:\n{}", text(&b.stderr));
    let warm = t.elapsed().as_secs_f64();
    println!(
        "kiln-it: warm rebuild after a config-only change: {warm:.1}s (cold {cold:.1}s, {:.1}x faster)",
        cold / warm
    );
    let _ = std::fs::remove_dir_all(work.join("out-warm"));
    let prune = root_kiln(&["cache", "prune", lock_dir]);
    assert!(prune.status.success(), "{}", text(&prune.stderr));

    // Tamper with one cached .deb: the locked build must stop, naming the package.
    let victim = locked.packages.iter().find(|p| p.name == "systemd").expect("systemd is locked");
    let cached = work.join("cache/debs").join(format!("{}.deb", victim.sha256));
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[100] ^= 0x01;
    std::fs::remove_file(&cached).unwrap();
    std::fs::write(&cached, bytes).unwrap();
    let b = root_kiln(&["build", "--profile", profile_arg, "--locked", "--out", &out("out-3")]);
    let err = text(&b.stderr);
    assert_eq!(b.status.code(), Some(1), "a tampered .deb must fail the build:\n{err}");
    let want = format!("package systemd {}: the cached .deb", victim.version);
    assert!(
        err.contains(&want) && err.contains(&format!("but the lock says {}", victim.sha256)),
        "expected {want:?} in:\n{err}"
    );
    assert!(!work.join("out-3/myhome-pc-uefi").exists(), "a failed build must not leave an output");
    println!(
        "kiln-it: tampered systemd .deb refused: {}",
        err.lines().find(|l| l.starts_with("error:")).unwrap_or_default()
    );
}
