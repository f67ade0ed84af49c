//! `kiln doctor`: checks the host tools kiln runs and, with `--install`, installs the missing
//! ones with apt (idempotent). On Debian 12 QEMU comes from bookworm-backports, whose apt entry
//! is derived from the host's own mirror line.

use crate::exec::Cmd;
use anyhow::{Context as _, Result};
use std::path::Path;

/// A host tool: how to find it and which Debian package provides it.
pub struct Tool {
    pub name: &'static str,
    /// A program on PATH, or an absolute path to a file.
    pub probe: &'static str,
    pub package: &'static str,
    /// Installed from bookworm-backports on Debian 12 hosts.
    pub backports_on_bookworm: bool,
    pub used_for: &'static str,
}

pub const TOOLS: &[Tool] = &[
    Tool {
        name: "mmdebstrap",
        probe: "mmdebstrap",
        package: "mmdebstrap",
        backports_on_bookworm: false,
        used_for: "bootstrapping the Debian root",
    },
    Tool {
        name: "arch-test",
        probe: "arch-test",
        package: "arch-test",
        backports_on_bookworm: false,
        used_for: "mmdebstrap's check that a foreign architecture (arm64) runs under qemu-user",
    },
    Tool {
        name: "mkfs.erofs",
        probe: "mkfs.erofs",
        package: "erofs-utils",
        backports_on_bookworm: false,
        used_for: "the read-only root filesystem",
    },
    Tool {
        name: "veritysetup",
        probe: "veritysetup",
        package: "cryptsetup-bin",
        backports_on_bookworm: false,
        used_for: "dm-verity hash trees",
    },
    Tool {
        name: "mkfs.vfat",
        probe: "mkfs.vfat",
        package: "dosfstools",
        backports_on_bookworm: false,
        used_for: "the EFI system partition",
    },
    Tool {
        name: "mcopy",
        probe: "mcopy",
        package: "mtools",
        backports_on_bookworm: false,
        used_for: "filling the ESP without a loop device",
    },
    Tool {
        name: "objcopy",
        probe: "objcopy",
        package: "binutils",
        backports_on_bookworm: false,
        used_for: "unified kernel images",
    },
    Tool {
        name: "dpkg-query",
        probe: "dpkg-query",
        package: "dpkg",
        backports_on_bookworm: false,
        used_for: "the package list of the manifest",
    },
    Tool {
        name: "sfdisk",
        probe: "sfdisk",
        package: "fdisk",
        backports_on_bookworm: false,
        used_for: "checking partition tables (tests)",
    },
    Tool {
        name: "mkfs.ext4",
        probe: "mkfs.ext4",
        package: "e2fsprogs",
        backports_on_bookworm: false,
        used_for: "kiln flash --provision: the data partition",
    },
    Tool {
        name: "debugfs",
        probe: "debugfs",
        package: "e2fsprogs",
        backports_on_bookworm: false,
        used_for: "kiln flash --provision: the journal's blocks",
    },
    Tool {
        name: "bmaptool",
        probe: "bmaptool",
        package: "bmap-tools",
        backports_on_bookworm: false,
        used_for: "checking block maps against bmap-tools (tests)",
    },
    Tool {
        name: "qemu-img",
        probe: "qemu-img",
        package: "qemu-utils",
        backports_on_bookworm: true,
        used_for: "disk image conversion",
    },
    Tool {
        name: "qemu-system-x86_64",
        probe: "qemu-system-x86_64",
        package: "qemu-system-x86",
        backports_on_bookworm: true,
        used_for: "kiln boot of x86-64 images",
    },
    Tool {
        name: "OVMF",
        probe: "/usr/share/OVMF/OVMF_CODE_4M.fd",
        package: "ovmf",
        backports_on_bookworm: false,
        used_for: "UEFI firmware for kiln boot",
    },
    Tool {
        name: "qemu-system-aarch64",
        probe: "qemu-system-aarch64",
        package: "qemu-system-arm",
        backports_on_bookworm: true,
        used_for: "kiln boot of arm64 (Raspberry Pi) images",
    },
    Tool {
        name: "qemu-aarch64 binfmt",
        probe: "/usr/lib/binfmt.d/qemu-aarch64.conf",
        package: "qemu-user-binfmt",
        backports_on_bookworm: true,
        used_for: "arm64 builds on an x86-64 host (maintainer scripts)",
    },
    Tool {
        name: "qemu-aarch64",
        probe: "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
        package: "qemu-user",
        backports_on_bookworm: true,
        used_for: "arm64 builds on an x86-64 host (maintainer scripts)",
    },
    Tool {
        name: "zstd",
        probe: "zstd",
        package: "zstd",
        backports_on_bookworm: false,
        used_for: "zstd-compressed kernel modules for kiln's initramfs",
    },
    Tool {
        name: "cpio",
        probe: "cpio",
        package: "cpio",
        backports_on_bookworm: false,
        used_for: "checking initramfs archives (tests)",
    },
    Tool {
        name: "openssl",
        probe: "openssl",
        package: "openssl",
        backports_on_bookworm: false,
        used_for: "CA certificate hashes for arm64 images",
    },
    Tool {
        name: "restic",
        probe: "restic",
        package: "restic",
        backports_on_bookworm: false,
        used_for: "reading devices' backups from a trusted machine (tests: stock restic lists and restores them)",
    },
];

/// The tools `kiln build` needs for an image of `arch` (the rest serve boot, flash and tests).
pub fn build_tools(arch: crate::image::Arch) -> impl Iterator<Item = &'static Tool> {
    const NOT_FOR_BUILD: &[&str] = &[
        "qemu-system-x86_64",
        "qemu-system-aarch64",
        "OVMF",
        "sfdisk",
        "bmaptool",
        "debugfs",
        "mkfs.ext4",
        "cpio",
        "qemu-img",
        "restic",
    ];
    let foreign = !arch.is_host();
    TOOLS.iter().filter(move |t| !NOT_FOR_BUILD.contains(&t.name) && (foreign || !t.name.starts_with("qemu-aarch64")))
}

pub fn package_for_program(program: &str) -> Option<&'static str> {
    let base = program.rsplit('/').next().unwrap_or(program);
    TOOLS.iter().find(|t| t.probe == base || t.name == base).map(|t| t.package)
}

pub fn is_present(t: &Tool) -> bool {
    if t.probe.starts_with('/') {
        return Path::new(t.probe).exists();
    }
    which(t.probe).is_some()
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

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
    let mirror = crate::mirror::from_host(Path::new("/etc/apt"))?;
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
