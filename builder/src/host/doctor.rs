//! `kiln doctor`: checks the host tools kiln runs and, with `--install`, installs the missing
//! ones with apt (idempotent). On Debian 12 QEMU comes from bookworm-backports, whose apt entry
//! is derived from the host's own mirror line.

use crate::host::exec::Cmd;
use crate::host::tools::{is_present, Tool, TOOLS};
use anyhow::{Context as _, Result};
use std::path::Path;

fn host_codename() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default()
}

/// Prints a table of the tools; returns the missing ones.
pub fn report() -> Vec<&'static Tool> {
    let mut missing = Vec::new();
    for t in TOOLS {
        let ok = is_present(t);
        println!("{:<4} {:<20} {:<16} {}", if ok { "ok" } else { "MISS" }, t.name, t.package, t.used_for);
        if !ok {
            missing.push(t);
        }
    }
    missing
}

/// Installs every missing tool with apt-get. Does nothing when all are present.
pub fn install(missing: &[&Tool]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("installing host tools needs root: run `sudo kiln doctor --install`");
    }
    let bookworm = host_codename() == "bookworm";
    let backports: Vec<&str> =
        missing.iter().filter(|t| bookworm && t.backports_on_bookworm).map(|t| t.package).collect();
    let plain: Vec<&str> =
        missing.iter().filter(|t| !(bookworm && t.backports_on_bookworm)).map(|t| t.package).collect();
    if !backports.is_empty() {
        ensure_backports_source()?;
    }
    let apt = |args: &[&str]| {
        Cmd::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").run_with_lines(|l| eprintln!("  {l}"))
    };
    apt(&["update", "-q"])?;
    if !plain.is_empty() {
        let mut a = vec!["install", "-y", "-q", "--no-install-recommends"];
        a.extend(&plain);
        apt(&a)?;
    }
    if !backports.is_empty() {
        // qemu-utils on Debian 12 build machines often comes from backports already; the
        // system emulators must match it or apt refuses ("generated breaks").
        let mut a = vec!["install", "-y", "-q", "--no-install-recommends", "-t", "bookworm-backports"];
        a.extend(&backports);
        if !a.contains(&"qemu-utils") {
            a.push("qemu-utils");
        }
        apt(&a)?;
    }
    Ok(())
}

/// Makes sure foreign-architecture binaries run through qemu-user (binfmt_misc): mounts
/// binfmt_misc if needed and registers the handler from its binfmt.d file. Hosts without an
/// init system that does this (containers, CI VMs) need it before an arm64 bootstrap.
pub fn ensure_binfmt(arch: &str) -> Result<()> {
    let qemu_name = match arch {
        "arm64" => "aarch64",
        "amd64" => "x86_64",
        other => other,
    };
    let host_native = matches!((std::env::consts::ARCH, arch), ("x86_64", "amd64") | ("aarch64", "arm64"));
    if host_native {
        return Ok(());
    }
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let handler = dir.join(format!("qemu-{qemu_name}"));
    if handler.exists() {
        return Ok(());
    }
    let conf = Path::new("/usr/lib/binfmt.d").join(format!("qemu-{qemu_name}.conf"));
    let rule = std::fs::read_to_string(&conf)
        .with_context(|| format!("{arch} images need qemu-user for their maintainer scripts, and {} is missing: run `kiln doctor --install` (Debian packages qemu-user, qemu-user-binfmt)", conf.display()))?;
    if !dir.join("register").exists() {
        nix::mount::mount(Some("binfmt_misc"), dir, Some("binfmt_misc"), nix::mount::MsFlags::empty(), None::<&str>)
            .with_context(|| {
                format!("mounting binfmt_misc on {} (needed to run {arch} programs; are we root?)", dir.display())
            })?;
    }
    let rule = rule
        .lines()
        .find(|l| l.starts_with(':'))
        .with_context(|| format!("{} holds no binfmt rule", conf.display()))?;
    std::fs::write(dir.join("register"), rule)
        .with_context(|| format!("registering {} with binfmt_misc", conf.display()))?;
    eprintln!("registered the qemu-{qemu_name} binfmt handler from {}", conf.display());
    Ok(())
}

/// Adds a bookworm-backports entry built from the host's own Debian mirror line, once.
fn ensure_backports_source() -> Result<()> {
    let path = Path::new("/etc/apt/sources.list.d/kiln-backports.sources");
    let mirror = crate::debian::mirror::from_host(Path::new("/etc/apt"))?;
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let text = format!(
        "# Written by kiln doctor: QEMU for Debian 12 comes from backports.\nTypes: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        mirror.debian
    );
    let already = existing.contains("bookworm-backports") && existing.contains(&mirror.debian);
    if !already {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("added {} ({} bookworm-backports)", path.display(), mirror.debian);
    }
    Ok(())
}
