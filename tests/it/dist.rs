//! Releases of kiln itself: `dist build` (cargo-dist, configured in the workspace Cargo.toml)
//! makes the x86_64 archives, their sha256 files and the shell installers; the installers,
//! served by a real HTTP server on loopback, install kiln and kiln-agent into an empty prefix,
//! and the installed kiln works from there (`--version`, `plan`, `doctor`, finding its agent).

use crate::httpd::Server;
use crate::{repo_root, text, Need};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const TARGET: &str = "x86_64-unknown-linux-gnu";

#[test]
fn release_archives_install_and_run_from_an_empty_prefix() {
    let Some(_timed) = crate::heavy_test(
        "release_archives_install_and_run_from_an_empty_prefix",
        &[Need::Tool("dist"), Need::Tool("curl")],
    ) else {
        return;
    };
    let root = repo_root();
    let t = Instant::now();
    // The archive's layout and contents are the release's; its optimisation is turned down
    // (the `dist` profile's LTO and opt-level through cargo's environment) so the test compiles
    // in about a minute instead of several. What is under test is the packaging.
    let out = Command::new("dist")
        .args(["build", "--artifacts=all", "--target", TARGET])
        .current_dir(&root)
        .env("CARGO_PROFILE_DIST_LTO", "false")
        .env("CARGO_PROFILE_DIST_OPT_LEVEL", "0")
        .env("CARGO_PROFILE_DIST_CODEGEN_UNITS", "256")
        .env("CARGO_PROFILE_DIST_DEBUG", "false")
        .output()
        .expect("dist runs");
    assert!(out.status.success(), "dist build failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    println!("kiln-it: dist build (x86_64 archives, installers, checksums) in {:.1}s", t.elapsed().as_secs_f64());
    let distrib = root.join("target/distrib");
    for app in ["kiln", "kiln-agent"] {
        let archive = format!("{app}-{TARGET}.tar.xz");
        let sum = std::fs::read_to_string(distrib.join(format!("{archive}.sha256"))).unwrap();
        let want = sum.split_whitespace().next().unwrap().to_string();
        let have = kiln::units::sha256_file(&distrib.join(&archive)).unwrap().hex();
        assert_eq!(have, want, "{archive}: its .sha256 file");
        let size = std::fs::metadata(distrib.join(&archive)).unwrap().len();
        println!("kiln-it: {archive}: {:.1} MiB, sha256 {have}", size as f64 / 1048576.0);
        let listing = Command::new("tar").arg("-tJf").arg(distrib.join(&archive)).output().unwrap();
        let listing = text(&listing.stdout);
        assert!(listing.lines().any(|l| l.ends_with(&format!("/{app}"))), "{archive} holds {app}:\n{listing}");
    }

    // The installers, as a user runs them (`curl ... | sh`), from loopback, into an empty prefix.
    let scratch = root.join("target/kiln-it-dist");
    let _scratch = crate::Scratch(scratch.clone());
    let _ = std::fs::remove_dir_all(&scratch);
    let (home, prefix) = (scratch.join("home"), scratch.join("prefix"));
    std::fs::create_dir_all(&home).unwrap();
    let server = Server::start(&distrib);
    for app in ["kiln", "kiln-agent"] {
        let out = Command::new("sh")
            .arg(distrib.join(format!("{app}-installer.sh")))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", &home)
            .env("KILN_DOWNLOAD_URL", format!("http://127.0.0.1:{}", server.port()))
            .env("KILN_AGENT_DOWNLOAD_URL", format!("http://127.0.0.1:{}", server.port()))
            .env("KILN_INSTALL_DIR", &prefix)
            .env("KILN_AGENT_INSTALL_DIR", &prefix)
            .env("KILN_NO_MODIFY_PATH", "1")
            .env("KILN_AGENT_NO_MODIFY_PATH", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{app}-installer.sh failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    }
    let bin = prefix.join("bin");
    let kiln = bin.join("kiln");
    assert!(kiln.is_file() && bin.join("kiln-agent").is_file(), "installed: {:?}", ls(&bin));
    let fetched: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert!(fetched.iter().any(|p| p.ends_with(&format!("kiln-{TARGET}.tar.xz"))), "{fetched:?}");

    let run = |args: &[&str]| {
        let out = Command::new(&kiln).args(args).current_dir(&scratch).output().unwrap();
        (out.status.success(), text(&out.stdout) + &text(&out.stderr))
    };
    let (ok, version) = run(&["--version"]);
    assert!(ok && version.starts_with("kiln 0."), "{version}");
    let (ok, plan) = run(&["plan"]);
    assert!(
        ok && plan.contains("minimal") && plan.contains("pc-uefi"),
        "the installed kiln plans the default image:\n{plan}"
    );
    let (ok, doctor) = run(&["doctor"]);
    assert!(ok, "kiln doctor (installed) failed:\n{doctor}");
    let agent_line = format!("on-device agent (amd64): {}", bin.join("kiln-agent").display());
    assert!(doctor.contains(&agent_line), "the installed kiln finds the installed agent:\n{doctor}");
    println!("kiln-it: installed from loopback into {}: {}; {agent_line}", prefix.display(), version.trim());
}

fn ls(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}
