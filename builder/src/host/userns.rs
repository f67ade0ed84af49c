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
    use nix::unistd::{fork, pipe, read, ForkResult};
    let parent = nix::unistd::getpid();
    let (ready_r, ready_w) = pipe().context("pipe")?;
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
        .context("making / a private mount in kiln's mount namespace")
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
        let mut nodes = DevNodes { mounted: Vec::new() };
        for name in DEV_NODES {
            let target = tree.join("dev").join(name);
            std::fs::write(&target, b"").with_context(|| format!("creating {}", target.display()))?;
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
            if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("warning: unmounting {}: {e}", target.display());
            }
            let _ = std::fs::remove_file(&target);
        }
    }
}
