//! Command-line behaviour that needs no image build.

use crate::{kiln, repo_root, text};

#[test]
fn plan_of_the_default_profile_has_the_ab_layout() {
    let out = kiln(&repo_root(), &["plan", "--mirror", "http://mirror.invalid/debian"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["output_name"], "minimal-pc-uefi");
    assert_eq!(plan["suite"], "trixie");
    let names: Vec<&str> =
        plan["disk"]["partitions"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["esp", "root-a", "root-b", "data"]);
    assert_eq!(plan["sources"][0], "deb http://mirror.invalid/debian trixie main");
}

#[test]
fn a_child_profile_adds_packages_and_users() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("profiles")).unwrap();
    std::fs::write(
        dir.path().join("profiles/home.toml"),
        "extends = \"minimal\"\n[system]\npackages = [\"vim-tiny\"]\ntimezone = \"Europe/Berlin\"\n\
         [users.alice]\nssh_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxJ1nJ8Qv0bGz2jQ8g7 alice\"]\ngroups = [\"sudo\"]\n",
    )
    .unwrap();
    let out = kiln(
        dir.path(),
        &["plan", "--profile", "home", "--mirror", "http://mirror.invalid/debian", "--release", "2.1.0"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pkgs: Vec<&str> = plan["packages"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).collect();
    assert!(pkgs.contains(&"vim-tiny") && pkgs.contains(&"openssh-server") && pkgs.contains(&"sudo"), "{pkgs:?}");
    assert_eq!(plan["hostname"], "kiln-minimal", "inherited from minimal");
    assert_eq!(plan["version"], "2.1.0");
    assert_eq!(plan["users"][0]["name"], "alice");
    assert_eq!(plan["profile_chain"][1], "<built-in>/profiles/minimal.toml");
}

#[test]
fn inspect_of_a_missing_output_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln(dir.path(), &["inspect", "nothing-here"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with("error: reading nothing-here/manifest.json (is nothing-here a kiln build output?)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn delta_of_two_outputs_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let out = kiln(dir.path(), &["delta", "a", "b"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("a holds no root.img"), "{}", text(&out.stderr));
    // Two small stand-ins for build outputs: one 4 KiB block of root.img changed, the UKI renamed.
    let root: Vec<u8> = (0..64 * 4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(a.join("root.img"), &root).unwrap();
    std::fs::write(a.join("kiln-0.1.0.efi"), b"uki").unwrap();
    let mut changed = root.clone();
    changed[5 * 4096 + 7] ^= 0xff;
    std::fs::write(b.join("root.img"), &changed).unwrap();
    std::fs::write(b.join("kiln-0.1.1.efi"), b"uki").unwrap();
    let out = kiln(dir.path(), &["delta", "a", "b", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m[0]["name"], "root.img");
    assert_eq!(m[0]["block_new"], 4096);
    assert_eq!(m[1]["name"], "kiln-0.1.1.efi");
    assert_eq!(m[1]["block_new"], 0, "the UKI of the old output is the new one's counterpart");
    assert_eq!(m[0]["cdc"][1]["average"], 16384);
    // A UEFI output against a Pi one: named, not guessed.
    std::fs::remove_file(a.join("kiln-0.1.0.efi")).unwrap();
    std::fs::write(a.join("boot.img"), b"fat").unwrap();
    let out = kiln(dir.path(), &["delta", "a", "b"]);
    assert!(text(&out.stderr).contains("two outputs of different kinds of image"), "{}", text(&out.stderr));
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    // `kiln plan | head -0`: the reader is gone before kiln writes.
    let mut child = std::process::Command::new(crate::kiln_bin())
        .args(["plan", "--mirror", "http://mirror.invalid/debian"])
        .current_dir(repo_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kiln runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "no panic report on a closed pipe");
}
