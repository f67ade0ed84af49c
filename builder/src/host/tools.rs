//! The host tools kiln runs, how each is found, and which Debian package provides it: what
//! `kiln doctor` checks and installs, and what a "not installed" error names.

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
    Tool {
        name: "ssh-keygen",
        probe: "ssh-keygen",
        package: "openssh-client",
        backports_on_bookworm: false,
        used_for: "keys for test devices, ssh into them (tests, kiln boot --ssh-port)",
    },
    Tool {
        name: "curl",
        probe: "curl",
        package: "curl",
        backports_on_bookworm: false,
        used_for: "kiln's release installer (tests: it downloads the archive from loopback)",
    },
    Tool {
        name: "chromium",
        probe: "chromium",
        package: "chromium",
        backports_on_bookworm: false,
        used_for: "rendering kiln status --html pages in a real browser (tests)",
    },
    Tool {
        name: "openssl",
        probe: "openssl",
        package: "openssl",
        backports_on_bookworm: false,
        used_for: "TLS certificates about to expire for test devices (tests: the monitor's certificate watch)",
    },
    Tool {
        name: "newuidmap",
        probe: "newuidmap",
        package: "uidmap",
        backports_on_bookworm: false,
        used_for: "builds as an ordinary user: mapping its subordinate ids into kiln's user namespace",
    },
];

/// Other programs kiln runs that come with a package of [`TOOLS`]: (program, tool name).
pub const ALSO_PROVIDED: &[(&str, &str)] = &[
    ("e2fsck", "mkfs.ext4"),
    ("e2label", "mkfs.ext4"),
    ("mdir", "mcopy"),
    ("mtype", "mcopy"),
    ("ssh", "ssh-keygen"),
    ("dpkg-deb", "dpkg-query"),
    ("newgidmap", "newuidmap"),
];

/// Programs the test suite needs that come from the Rust toolchain or the Rust crate registry,
/// not from apt: (program, what installs it). `scripts/test` installs them (`cargo install
/// --locked`); cargo runs the tests themselves (the OTA test builds the previous release's agent
/// with it).
pub const CARGO_TEST_TOOLS: &[(&str, &str)] =
    &[("dist", "cargo-dist 0.34.0, the release packager"), ("cargo", "the Rust toolchain that runs the tests")];

/// Programs of Debian's and Ubuntu's Essential and required packages (coreutils, dash,
/// util-linux, mount, apt, systemd's escape helper where systemd is the init): on every host,
/// so doctor does not list them.
pub const BASE_PROGRAMS: &[&str] = &[
    "sh",
    "cp",
    "chroot",
    "mount",
    "umount",
    "losetup",
    "findmnt",
    "lsblk",
    "partx",
    "unshare",
    "apt-get",
    "systemd-escape",
    "env",
    "chown",
    "runuser",
    // passwd (Priority: required): the rootless tests' ordinary user.
    "useradd",
    "usermod",
    "tar",
];

/// The tools `kiln build` needs for an image of `arch` (the rest serve boot, flash and tests).
pub fn build_tools(arch: crate::config::image::Arch) -> impl Iterator<Item = &'static Tool> {
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
        "ssh-keygen",
        "curl",
        "chromium",
        "openssl",
        // Root builds do not need it; an ordinary user's build checks it (host/userns.rs).
        "newuidmap",
    ];
    let foreign = !arch.is_host();
    TOOLS.iter().filter(move |t| !NOT_FOR_BUILD.contains(&t.name) && (foreign || !t.name.starts_with("qemu-aarch64")))
}

pub fn package_for_program(program: &str) -> Option<&'static str> {
    let base = program.rsplit('/').next().unwrap_or(program);
    let name = ALSO_PROVIDED.iter().find(|(p, _)| *p == base).map_or(base, |(_, tool)| *tool);
    TOOLS.iter().find(|t| t.probe == name || t.name == name).map(|t| t.package)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program named by a string literal right after `Cmd::new(` or `Command::new(` in
    /// the builder's sources or the integration tests.
    fn spawned_programs() -> Vec<(String, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        let mut dirs = vec![root.join("src"), root.join("../tests")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut out = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for pat in ["Cmd::new(\"", "Command::new(\""] {
                for (i, _) in text.match_indices(pat) {
                    let rest = &text[i + pat.len()..];
                    let prog = &rest[..rest.find('"').unwrap()];
                    out.push((prog.to_string(), f.display().to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn every_program_kiln_and_its_tests_spawn_is_in_doctors_table() {
        let spawned = spawned_programs();
        assert!(spawned.iter().any(|(p, _)| p == "mmdebstrap"), "the scan found nothing: {spawned:?}");
        let mut unknown = Vec::new();
        for (prog, file) in &spawned {
            // Absolute paths are run inside an image tree or checked where they are used; the
            // test suite spawns names that must not exist on purpose.
            let absent = ["no-such", "nonexistent", "does-not-exist"];
            if prog.starts_with('/') || absent.iter().any(|a| prog.contains(a)) {
                continue;
            }
            let known = TOOLS.iter().any(|t| t.probe == prog || t.name == prog)
                || ALSO_PROVIDED.iter().any(|(p, _)| p == prog)
                || BASE_PROGRAMS.contains(&prog.as_str())
                || CARGO_TEST_TOOLS.iter().any(|(p, _)| p == prog);
            if !known {
                unknown.push(format!("{prog} ({file})"));
            }
        }
        assert!(unknown.is_empty(), "spawned but unknown to kiln doctor (add them to TOOLS): {unknown:?}");
        for (prog, tool) in ALSO_PROVIDED {
            assert!(TOOLS.iter().any(|t| t.name == *tool), "{prog}: no tool {tool}");
            assert!(package_for_program(prog).is_some(), "{prog}: no package");
        }
    }
}
