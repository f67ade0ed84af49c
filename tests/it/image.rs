//! The real build and boot: mmdebstrap, EROFS + dm-verity, UKI, GPT, and QEMU under OVMF.
//! Slow (a few minutes); it prints what it measured so the CI log shows it ran.

use crate::Need;
use crate::{flip_byte, kiln, kiln_bin, repo_root, text};
use std::process::Command;
use std::time::Instant;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn minimal_image_builds_verifies_and_boots() {
    let Some(_timed) = crate::heavy_test(
        "minimal_image_builds_verifies_and_boots",
        &[Need::Root, Need::Tool("mmdebstrap"), Need::Tool("qemu-system-x86_64")],
    ) else {
        return;
    };
    let root = repo_root();
    let work = root.join("target/kiln-it");
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("profiles")).unwrap();

    // The default profile plus a login user whose key the test holds.
    let key = work.join("id_ed25519");
    run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-it", "-f"]).arg(&key));
    let public = std::fs::read_to_string(work.join("id_ed25519.pub")).unwrap();
    std::fs::write(
        work.join("profiles/it.toml"),
        format!(
            "extends = \"minimal\"\n[users.tester]\nssh_keys = [\"{}\"]\ngroups = [\"sudo\"]\n\
             [health]\ncommands = [\"test -s /var/lib/kiln/ssh/ssh_host_ed25519_key\"]\n",
            public.trim()
        ),
    )
    .unwrap();

    // Build.
    let t = Instant::now();
    let build = Command::new(kiln_bin())
        .args(["build", "--profile", "profiles/it.toml", "--out"])
        .arg(&out)
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(build.status.success(), "kiln build failed:\n{}", text(&build.stderr));
    println!("kiln-it: built it-pc-uefi (minimal + a user) in {:.1}s", t.elapsed().as_secs_f64());
    let dir = out.join("it-pc-uefi");
    let disk = dir.join("disk.img");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();

    // The partition table, as sfdisk reads it.
    let dump = run(Command::new("sfdisk").arg("-d").arg(&disk));
    let names: Vec<&str> =
        dump.lines().filter_map(|l| l.split("name=\"").nth(1)).map(|n| n.trim_end_matches('"')).collect();
    assert_eq!(names, ["esp", "root-a", "root-b", "data"], "{dump}");
    assert!(dump.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "ESP type: {dump}");
    println!("kiln-it: sfdisk sees {names:?}");

    // dm-verity accepts the root image with the manifest's root hash.
    let hash = manifest["verity"]["root_hash"].as_str().unwrap().to_string();
    let offset = manifest["verity"]["hash_offset"].as_u64().unwrap();
    let root_img = dir.join("root.img");
    run(Command::new("veritysetup")
        .arg("verify")
        .arg(&root_img)
        .arg(&root_img)
        .arg(&hash)
        .arg(format!("--hash-offset={offset}")));
    println!("kiln-it: veritysetup verify accepts root.img with root hash {hash}");

    // The SBOM is valid SPDX 2.3 (checked by the spdx-tools validator).
    let sbom = dir.join("sbom.spdx.json");
    run(Command::new(root.join("scripts/spdx-validate")).arg(&sbom));
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sbom).unwrap()).unwrap();
    let pkgs = doc["packages"].as_array().unwrap();
    let licensed = pkgs.iter().filter(|p| p["licenseDeclared"].as_str().is_some_and(|l| l != "NOASSERTION")).count();
    assert!(pkgs.len() > 100, "the SBOM lists every package");
    println!(
        "kiln-it: sbom.spdx.json valid (pyspdxtools): {} packages, {} with a declared license",
        pkgs.len(),
        licensed
    );

    // The manifest matches the files.
    let inspect = kiln(&root, &["inspect", "--verify", dir.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));
    assert!(
        text(&inspect.stdout).contains("verified: 4 artifacts and 4 partitions match the manifest"),
        "{}",
        text(&inspect.stdout)
    );

    // It boots to the readiness marker; then the test user logs in over SSH with its key (and
    // sudo works, / is the verified EROFS, /var the data partition), while a password login
    // is refused.
    let port = free_port();
    let ssh = format!(
        "ssh -i {key} -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=20 -o LogLevel=ERROR",
        key = key.display()
    );
    // Booted from an 8 GiB disk: the data partition grows to its end at first boot.
    let big_dir = out.join("8g");
    std::fs::create_dir_all(&big_dir).unwrap();
    let big = big_dir.join("disk.img");
    run(Command::new("cp").arg("--sparse=always").arg(&disk).arg(&big));
    std::fs::copy(dir.join("manifest.json"), big_dir.join("manifest.json")).unwrap();
    std::fs::OpenOptions::new().write(true).open(&big).unwrap().set_len(8 << 30).unwrap();
    let script = format!(
        "{ssh} -o BatchMode=yes tester@127.0.0.1 'echo login-ok; sudo -n true && echo sudo-ok; findmnt -no SOURCE,FSTYPE /; findmnt -no FSTYPE /var; echo var-bytes=$(df -B1 --output=size /var | tail -1); echo dpkg-packages=$(dpkg-query -f . -W | wc -c); test -s /var/lib/kiln/factory.json && echo factory-recorded; touch /etc/x 2>&1 | head -1' \
         && if {ssh} -o BatchMode=yes -o PubkeyAuthentication=no -o PreferredAuthentications=password,keyboard-interactive tester@127.0.0.1 true 2>&1; \
            then echo password-login-accepted; else echo password-login-refused; fi"
    );
    let boot = kiln(
        &root,
        &[
            "boot",
            "--check",
            "--timeout",
            "900",
            "--ssh-port",
            &port.to_string(),
            big.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let boot_out = text(&boot.stdout);
    assert!(boot.status.success(), "boot check failed:\n{boot_out}\n{}", text(&boot.stderr));
    assert!(boot_out.contains("KILN-READY version=0.1.0"), "{boot_out}");
    for want in [
        "login-ok",
        "sudo-ok",
        "/dev/mapper/root erofs",
        "ext4",
        "Read-only file system",
        "Permission denied (publickey)",
        "password-login-refused",
        "factory-recorded",
    ] {
        assert!(boot_out.contains(want), "expected {want:?} in the SSH session output:\n{boot_out}");
    }
    println!("kiln-it: {}", boot_out.lines().next().unwrap_or_default().trim());
    let var_bytes: u64 = boot_out
        .lines()
        .find_map(|l| l.trim().strip_prefix("var-bytes="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no df figure for /var:\n{boot_out}"));
    // 8 GiB less the ESP and two root slots (2.25 GiB) and the file system's own overhead.
    assert!(var_bytes > 5 << 30, "/var should fill the 8 GiB disk: {var_bytes} bytes\n{boot_out}");
    // The package database reaches the device (a link into the running release's factory copy).
    let packages: u32 = boot_out
        .lines()
        .find_map(|l| l.trim().strip_prefix("dpkg-packages="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(packages > 100, "dpkg-query should list the image's packages on the device:\n{boot_out}");
    let console = std::fs::read_to_string(big_dir.join("boot-console.log")).unwrap();
    let grown = console.lines().find(|l| l.contains("kiln-agent: /var is")).unwrap_or_default();
    assert!(grown.contains("partition grown from 512 MiB"), "{console}");
    println!(
        "kiln-it: /var on an 8 GiB disk: df says {:.2} GiB; {}",
        var_bytes as f64 / (1u64 << 30) as f64,
        grown.trim()
    );
    println!(
        "kiln-it: SSH key login, sudo, read-only verified root, /var on ext4 and refused password login all checked"
    );

    // One flipped byte in root-a (in the EROFS superblock, read at mount) must stop the boot.
    let bad_dir = out.join("corrupt");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = bad_dir.join("disk.img");
    run(Command::new("cp").arg("--sparse=always").arg(&disk).arg(&bad));
    std::fs::copy(dir.join("manifest.json"), bad_dir.join("manifest.json")).unwrap();
    let root_a = manifest["partitions"].as_array().unwrap().iter().find(|p| p["name"] == "root-a").unwrap();
    let at = root_a["offset"].as_u64().unwrap() + 1024 + 8;
    flip_byte(&bad, at);
    let bad_boot = kiln(&root, &["boot", "--check", "--timeout", "900", bad.to_str().unwrap()]);
    let stderr = text(&bad_boot.stderr);
    assert_eq!(
        bad_boot.status.code(),
        Some(1),
        "a corrupted root must not boot:\n{}\n{stderr}",
        text(&bad_boot.stdout)
    );
    let log = std::fs::read_to_string(bad_dir.join("boot-console.log")).unwrap();
    assert!(
        log.contains("dm-verity device corrupted") || log.contains("is corrupted"),
        "the failure should come from dm-verity; console:\n{log}"
    );
    let verity_line = log
        .lines()
        .find(|l| l.contains("is corrupted"))
        .or_else(|| log.lines().find(|l| l.contains("corrupted")))
        .unwrap_or_default();
    println!("kiln-it: flipped byte at {at} of disk.img: boot refused: {}", verity_line.trim());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
