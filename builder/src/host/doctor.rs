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
        // Registered already (by an earlier build), only not mounted in this namespace.
        if handler.exists() {
            return Ok(());
        }
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

/// What an ordinary user needs for rootless builds (mmdebstrap `--mode=unshare`): the setuid
/// id mappers, a subordinate uid and gid range of at least 65536 ids, and unprivileged user
/// namespaces. Each problem comes with the command that fixes it.
pub struct RootlessHost<'a> {
    pub user: &'a str,
    pub uid: u32,
    pub subuid: &'a str,
    pub subgid: &'a str,
    /// (program, present and setuid root)
    pub mappers: [(&'a str, bool); 2],
    /// `kernel.unprivileged_userns_clone` (Debian), `user.max_user_namespaces`,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 24.04+); None where absent.
    pub userns_clone: Option<&'a str>,
    pub max_user_namespaces: Option<&'a str>,
    pub apparmor_restrict: Option<&'a str>,
}

/// The ids mmdebstrap maps into a rootless build's user namespace.
pub const SUBID_NEEDED: u64 = 65536;

/// `user`'s (or `uid`'s) largest range in /etc/subuid or /etc/subgid text: (start, count).
pub fn subid_range(text: &str, user: &str, uid: u32) -> Option<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
            (who == user || who == uid.to_string()).then_some((start, count))
        })
        .max_by_key(|&(_, count)| count)
}

pub fn rootless_problems(h: &RootlessHost) -> Vec<String> {
    let mut p = Vec::new();
    let user = h.user;
    for (program, ok) in h.mappers {
        if !ok {
            p.push(format!("{program} is missing or not setuid root: `sudo apt-get install uidmap`"));
        }
    }
    let start = free_subid_start(h.subuid, h.subgid);
    for (file, text, flag) in [("/etc/subuid", h.subuid, "--add-subuids"), ("/etc/subgid", h.subgid, "--add-subgids")] {
        match subid_range(text, user, h.uid) {
            Some((_, count)) if count >= SUBID_NEEDED => {}
            found => p.push(format!(
                "{file} gives {user} {}, and a build needs {SUBID_NEEDED}: `sudo usermod {flag} {start}-{} {user}` (or `sudo kiln doctor --install`, run by {user})",
                found.map(|(s, c)| format!("only {c} ids (from {s})")).unwrap_or_else(|| "no range".into()),
                start + SUBID_NEEDED - 1
            )),
        }
    }
    if h.userns_clone.map(str::trim) == Some("0") {
        p.push("unprivileged user namespaces are off (kernel.unprivileged_userns_clone = 0): `sudo sysctl -w kernel.unprivileged_userns_clone=1`, and the same line in /etc/sysctl.d/ to keep it".into());
    }
    if h.max_user_namespaces.map(str::trim) == Some("0") {
        p.push("user namespaces are disabled (user.max_user_namespaces = 0): `sudo sysctl -w user.max_user_namespaces=15000`, and in /etc/sysctl.d/ to keep it".into());
    }
    if h.apparmor_restrict.map(str::trim) == Some("1") {
        p.push("AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1): `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile for mmdebstrap".into());
    }
    p
}

/// What this host lacks for `user`'s rootless builds (read from /etc and /proc).
pub fn host_rootless_problems(user: &str, uid: u32) -> Vec<String> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let setuid_root = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.uid() == 0 && m.mode() & 0o4000 != 0).unwrap_or(false)
    };
    let (subuid, subgid) = (read("/etc/subuid").unwrap_or_default(), read("/etc/subgid").unwrap_or_default());
    let (clone, max, apparmor) = (
        read("/proc/sys/kernel/unprivileged_userns_clone"),
        read("/proc/sys/user/max_user_namespaces"),
        read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    );
    rootless_problems(&RootlessHost {
        user,
        uid,
        subuid: &subuid,
        subgid: &subgid,
        mappers: [
            ("/usr/bin/newuidmap", setuid_root("/usr/bin/newuidmap")),
            ("/usr/bin/newgidmap", setuid_root("/usr/bin/newgidmap")),
        ],
        userns_clone: clone.as_deref(),
        max_user_namespaces: max.as_deref(),
        apparmor_restrict: apparmor.as_deref(),
    })
}

/// Prints what rootless builds would need on this host, for the user running kiln (or the one
/// who ran sudo). Informational: root builds need none of it.
pub fn report_rootless() -> Option<(String, u32, Vec<String>)> {
    let euid = nix::unistd::geteuid();
    let (user, uid) = if euid.is_root() {
        match std::env::var("SUDO_USER").ok().filter(|u| !u.is_empty() && u != "root") {
            Some(u) => {
                let uid = nix::unistd::User::from_name(&u).ok().flatten().map(|u| u.uid.as_raw()).unwrap_or(u32::MAX);
                (u, uid)
            }
            None => {
                println!(
                    "rootless builds: running as root (checked for an ordinary user when run as one, or via sudo)"
                );
                return None;
            }
        }
    } else {
        let name = nix::unistd::User::from_uid(euid).ok().flatten().map(|u| u.name).unwrap_or_default();
        (name, euid.as_raw())
    };
    let problems = host_rootless_problems(&user, uid);
    if problems.is_empty() {
        println!("rootless builds: this host is ready for {user} (id mappers, subordinate ids, user namespaces)");
    } else {
        println!("rootless builds: not ready for {user} (kiln build, lock and rebuild as {user} need; or use sudo):");
        for p in &problems {
            println!("  - {p}");
        }
    }
    Some((user, uid, problems))
}

/// `sudo kiln doctor --install`: gives the user behind sudo a subordinate uid and gid range
/// (65536 ids past every range already given) if it has none big enough, so its builds can run
/// without root. `useradd` does this for users made on Debian 12 and later; older ones lack it.
pub fn ensure_subids(user: &str, uid: u32) -> Result<()> {
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    let subgid = std::fs::read_to_string("/etc/subgid").unwrap_or_default();
    let enough = |text: &str| subid_range(text, user, uid).is_some_and(|(_, c)| c >= SUBID_NEEDED);
    if enough(&subuid) && enough(&subgid) {
        return Ok(());
    }
    let start = free_subid_start(&subuid, &subgid);
    let range = format!("{start}-{}", start + SUBID_NEEDED - 1);
    let mut cmd = Cmd::new("usermod");
    if !enough(&subuid) {
        cmd = cmd.args(["--add-subuids", &range]);
    }
    if !enough(&subgid) {
        cmd = cmd.args(["--add-subgids", &range]);
    }
    cmd.arg(user).run().with_context(|| format!("giving {user} subordinate ids {range}"))?;
    println!("gave {user} the subordinate ids {range} (/etc/subuid, /etc/subgid) for builds without root");
    Ok(())
}

/// The first id, at or above 100000 and a multiple of 65536 past it, that no range in either
/// file reaches.
pub fn free_subid_start(subuid: &str, subgid: &str) -> u64 {
    let end = subuid
        .lines()
        .chain(subgid.lines())
        .filter_map(|l| {
            let mut f = l.trim().split(':').skip(1);
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        })
        .max()
        .unwrap_or(0)
        .max(100000);
    100000 + (end - 100000).div_ceil(SUBID_NEEDED) * SUBID_NEEDED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_readiness_names_each_missing_piece_and_its_fix() {
        let ready = RootlessHost {
            user: "alice",
            uid: 1000,
            subuid: "bob:100000:65536\nalice:165536:65536\n",
            subgid: "1000:165536:65536\n",
            mappers: [("/usr/bin/newuidmap", true), ("/usr/bin/newgidmap", true)],
            userns_clone: Some("1\n"),
            max_user_namespaces: Some("15000\n"),
            apparmor_restrict: None,
        };
        assert_eq!(rootless_problems(&ready), Vec::<String>::new());
        assert_eq!(subid_range(ready.subuid, "alice", 1000), Some((165536, 65536)));
        assert_eq!(subid_range("junk\nalice:x:1\n", "alice", 1000), None);
        assert_eq!(free_subid_start("", ""), 100000);
        assert_eq!(free_subid_start("bob:100000:65536\n", "bob:100000:65536\ncarol:165536:100\n"), 231072);
        let broken = RootlessHost {
            subuid: "alice:165536:1000\n",
            subgid: "",
            mappers: [("/usr/bin/newuidmap", false), ("/usr/bin/newgidmap", true)],
            userns_clone: Some("0\n"),
            max_user_namespaces: Some("0"),
            apparmor_restrict: Some("1\n"),
            ..ready
        };
        let p = rootless_problems(&broken);
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(p[0].starts_with("/usr/bin/newuidmap is missing") && p[0].contains("apt-get install uidmap"));
        assert!(
            p[1].contains("/etc/subuid gives alice only 1000 ids (from 165536)")
                && p[1].contains("usermod --add-subuids")
        );
        assert!(
            p[2].contains("/etc/subgid gives alice no range") && p[2].contains("--add-subgids 231072-296607 alice")
        );
        assert!(p[3].contains("unprivileged_userns_clone = 0"));
        assert!(p[4].contains("max_user_namespaces = 0"));
        assert!(p[5].contains("apparmor_restrict_unprivileged_userns = 1"));
    }
}
