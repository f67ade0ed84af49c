//! Builds without root. A build writes only files, but the files of a Debian root belong to many
//! users (root, `_apt`, `systemd-network`, ...), and maintainer scripts run in a chroot. For an
//! ordinary user, kiln re-executes itself as "root" of a user namespace, mapped as podman and
//! mmdebstrap map one: namespace uid 0 is the user, uids 1..65536 are the user's subordinate
//! range from /etc/subuid (the same for gids). The setuid `newuidmap`/`newgidmap` (package
//! `uidmap`) write the mapping; nothing else is privileged. Inside, every stage runs unchanged:
//! mmdebstrap's `--mode=unshare` (as root of the namespace it only adds a mount and a pid
//! namespace), `chroot`, `chown` to the image's users, `mkfs.erofs` reading the owners back. The
//! outputs belong to the user; the work tree's files belong to subordinate ids, and kiln (again
//! inside the namespace) removes them.

use anyhow::{bail, Context as _, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;

/// Set in the re-executed kiln, so it never tries twice.
pub const ENV: &str = "KILN_USERNS";

/// Returns when kiln may write a Debian root: it is root (real, or of kiln's namespace). For an
/// ordinary user it does not return: kiln runs again inside the namespace and exits with its
/// status. `what` names the command for the error when the host is not ready.
pub fn become_root(what: &str) -> Result<()> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        return Ok(());
    }
    if std::env::var_os(ENV).is_some() {
        bail!("kiln {what}: inside kiln's user namespace but not root there (uid {euid}): the id mapping failed");
    }
    let user = nix::unistd::User::from_uid(euid)
        .ok()
        .flatten()
        .with_context(|| format!("kiln {what}: uid {euid} has no entry in the user database"))?;
    let problems = crate::host::doctor::host_rootless_problems(&user.name, euid.as_raw());
    if !problems.is_empty() {
        bail!(
            "kiln {what} as {} (not root) builds in a user namespace, and this host is not ready for it:\n  - {}\n(or run kiln with sudo; `kiln doctor` checks this)",
            user.name,
            problems.join("\n  - ")
        );
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let range = |file: &str| {
        crate::host::doctor::subid_range(&read(file), &user.name, euid.as_raw())
            .with_context(|| format!("{file} has no range for {}", user.name))
    };
    let (uid_start, _) = range("/etc/subuid")?;
    let (gid_start, _) = range("/etc/subgid")?;
    let count = crate::host::doctor::SUBID_NEEDED.to_string();
    let uid_map = ["0".to_string(), euid.to_string(), "1".into(), "1".into(), uid_start.to_string(), count.clone()];
    let gid_map =
        ["0".to_string(), nix::unistd::getegid().to_string(), "1".into(), "1".into(), gid_start.to_string(), count];
    enter(&uid_map, &gid_map).with_context(|| format!("kiln {what}: entering a user namespace"))?;

    // Mapped: this process is root of the namespace. Run kiln again there (a fresh process image
    // with the namespace's credentials), the environment kept.
    std::env::set_var(ENV, "1");
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).context("an argument holds a NUL byte");
    let argv = std::env::args_os().map(|a| c(&a)).collect::<Result<Vec<_>>>()?;
    let e = nix::unistd::execv(&c(exe.as_os_str())?, &argv).unwrap_err();
    bail!("kiln {what}: running {} in the user namespace: {e}", exe.display())
}

/// Unshares the user namespace and has a child map it (a process may not map its own namespace
/// with the subordinate ids; the setuid mappers, run from outside, may).
fn enter(uid_map: &[String], gid_map: &[String]) -> Result<()> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, pipe2, read, ForkResult};
    let parent = nix::unistd::getpid();
    let (ready_r, ready_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: kiln is single-threaded here (called before any stage starts a thread), and the
    // child only waits, spawns the two mappers and exits.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            drop(ready_w);
            let mut b = [0u8; 1];
            // EOF: the parent has unshared.
            let _ = read(&ready_r, &mut b);
            let pid = parent.to_string();
            let mut status = 0;
            for (program, map) in [("newuidmap", uid_map), ("newgidmap", gid_map)] {
                if let Err(e) = crate::host::exec::Cmd::new(program).arg(&pid).args(map).run() {
                    eprintln!("error: {e:#}");
                    status = 1;
                    break;
                }
            }
            // SAFETY: leaves the forked child without running the parent's exit handlers.
            unsafe { nix::libc::_exit(status) }
        }
        ForkResult::Parent { child } => {
            drop(ready_r);
            let unshared = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
            drop(ready_w);
            let waited = waitpid(child, None).context("waiting for the id mapper")?;
            unshared.context("unshare(CLONE_NEWUSER)")?;
            match waited {
                WaitStatus::Exited(_, 0) => Ok(()),
                other => bail!("newuidmap/newgidmap did not map the namespace ({other:?}); see the lines above"),
            }
        }
    }
}

/// Gives this process its own mount namespace (private propagation), so the bind mounts of a
/// build ([`DevNodes`]) are seen by kiln and the programs it runs only, and vanish with it, even
/// when it is killed. Called once, at startup (single-threaded), by the commands that write a
/// root, after [`become_root`].
pub fn private_mounts() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making / a private mount in kiln's mount namespace")?;
    PRIVATE.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

static PRIVATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// As real root (not in kiln's namespace), refuses an output directory another user could
/// change: one owned by someone else, or writable by a group other than root's or by anyone
/// (without the sticky bit). Such a user could swap the build's tree for links into the host
/// while root works on it. (An ordinary user's build needs no root: build without sudo.)
pub fn check_output_dir(dir: &std::path::Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() || std::env::var_os(ENV).is_some() {
        return Ok(());
    }
    for d in [dir.to_path_buf(), dir.join(".work")] {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(m) = std::fs::symlink_metadata(&d) else { continue };
        if let Some(problem) = unsafe_for_root(m.uid(), m.gid(), m.mode(), m.file_type().is_symlink()) {
            bail!(
                "{}: {problem}; as root, kiln builds only into a directory no other user can change (they could swap the build tree for links into this machine). Build without sudo (builds need no root), or pick another --out",
                d.display()
            );
        }
    }
    Ok(())
}

/// Why a directory with these owners and mode is not safe for root to build in, if it is not.
pub fn unsafe_for_root(uid: u32, gid: u32, mode: u32, symlink: bool) -> Option<String> {
    if symlink {
        return Some("a symbolic link".into());
    }
    if uid != 0 {
        return Some(format!("owned by uid {uid}, not root"));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o002 != 0 && !sticky {
        return Some(format!("writable by every user (mode {:o})", mode & 0o7777));
    }
    if mode & 0o020 != 0 && gid != 0 && !sticky {
        return Some(format!("writable by group {gid} (mode {:o})", mode & 0o7777));
    }
    None
}

/// The device nodes programs in the chroot expect (`sshd -t` will not start without
/// `/dev/null`), bound from the host's `/dev` onto files in the tree's empty `/dev` while the
/// customize and harden stages run, unmounted when dropped. Bind mounts work the same for root
/// and in a user namespace (which may not create device nodes).
pub struct DevNodes {
    mounted: Vec<std::path::PathBuf>,
}

const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom"];

impl DevNodes {
    pub fn bind(tree: &std::path::Path) -> Result<DevNodes> {
        use nix::mount::{mount, MsFlags};
        use std::os::unix::fs::OpenOptionsExt as _;
        if !PRIVATE.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("internal: device nodes are bound only in kiln's private mount namespace (userns::private_mounts)");
        }
        let mut nodes = DevNodes { mounted: Vec::new() };
        for name in DEV_NODES {
            let target = tree.join("dev").join(name);
            // A new file, never through a link (the tree's /dev was emptied).
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .mode(0o644)
                .open(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            let source = std::path::Path::new("/dev").join(name);
            mount(Some(&source), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).with_context(|| {
                format!("binding {} onto {} (kiln's private mount namespace)", source.display(), target.display())
            })?;
            nodes.mounted.push(target);
        }
        Ok(nodes)
    }
}

impl Drop for DevNodes {
    fn drop(&mut self) {
        for target in self.mounted.drain(..) {
            match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                // Removed only once unmounted: never the host's node through the bind mount.
                Ok(()) => {
                    let _ = std::fs::remove_file(&target);
                }
                Err(e) => eprintln!("warning: unmounting {}: {e}", target.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unsafe_for_root;

    #[test]
    fn root_builds_only_where_no_other_user_can_change_the_tree() {
        assert_eq!(unsafe_for_root(0, 0, 0o40755, false), None);
        assert_eq!(unsafe_for_root(0, 0, 0o40775, false), None, "root's own group");
        assert_eq!(unsafe_for_root(0, 0, 0o41777, false), None, "sticky, like /tmp");
        assert_eq!(unsafe_for_root(1000, 1000, 0o40755, false).unwrap(), "owned by uid 1000, not root");
        assert_eq!(unsafe_for_root(0, 100, 0o40775, false).unwrap(), "writable by group 100 (mode 775)");
        assert_eq!(unsafe_for_root(0, 0, 0o40777, false).unwrap(), "writable by every user (mode 777)");
        assert_eq!(unsafe_for_root(0, 0, 0o120777, true).unwrap(), "a symbolic link");
    }
}
