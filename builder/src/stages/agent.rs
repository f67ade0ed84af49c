//! Stage 0: the on-device agent (`kiln-agent`) for the image's architecture. Every image
//! carries one; this stage finds or builds it before minutes of bootstrapping.
//!
//! Where it comes from, first match wins:
//! 1. `$KILN_AGENT` (a file);
//! 2. for a foreign architecture, when kiln runs from its source tree (the workspace it was
//!    compiled from is still there): a **cross build** in a cached Debian trixie toolchain root
//!    (amd64 with arm64 as a foreign architecture: trixie's rustc/cargo, `libstd-rust-dev:arm64`
//!    and the aarch64 cross gcc; the host's rustup cannot download other targets). The root,
//!    the downloaded crates and cargo's target directory persist under
//!    `<cache>/agent-toolchain/`, so a second build only re-links what changed. No arm64 code
//!    runs: it is a cross build, not an emulated one;
//! 3. a binary next to the running kiln: `kiln-agent` for the host's architecture,
//!    `kiln-agent-<arch>` for another (what a release archive ships).
//!
//! The cross build runs `cargo` chrooted into the toolchain root through `unshare` in a private
//! mount namespace (only /proc is mounted, and it vanishes with the namespace): nothing stays
//! mounted when kiln is killed. The workspace is copied in (changed files only, mtimes kept,
//! so cargo's fingerprints stay valid), never bind-mounted.

use crate::config::image::Arch;
use crate::config::plan::Plan;
use crate::debian::cache::Cache;
use crate::host::exec::Cmd;
use crate::host::progress::StageProgress;
use anyhow::{bail, Context as _, Result};
use sha2::Digest;
use std::path::{Path, PathBuf};

/// The Debian suite whose Rust toolchain cross-builds the agent (rustc >= kiln's rust-version).
pub const TOOLCHAIN_SUITE: &str = "trixie";

/// What the toolchain root holds. Changing this list (or the suite) makes a new root.
pub const TOOLCHAIN_PACKAGES: &[&str] = &[
    "rustc",
    "cargo",
    "libstd-rust-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "binutils-aarch64-linux-gnu",
    "ca-certificates",
];

/// The cargo profile of device binaries (workspace Cargo.toml): optimized for size, no LTO,
/// stripped by the linker, so the cross build stays quick and the binary small.
pub const DEVICE_PROFILE: &str = "device";

/// The workspace kiln was compiled from, if it is still there (kiln run from its checkout).
pub fn source_tree() -> Option<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_path_buf();
    (ws.join("Cargo.lock").is_file() && ws.join("agent/Cargo.toml").is_file()).then_some(ws)
}

/// Where the agent for an architecture comes from: one rule for `prepare` and `kiln doctor`.
pub enum AgentSource {
    /// `$KILN_AGENT` names it.
    Env(PathBuf),
    /// Cross-built from kiln's source tree (a foreign architecture, kiln run from its checkout).
    CrossBuild(PathBuf),
    /// `kiln-agent[-<arch>]` next to kiln (what the release archives install), if it is there.
    NextToKiln(Result<PathBuf>),
}

pub fn source(arch: Arch) -> AgentSource {
    if let Some(p) = std::env::var_os("KILN_AGENT") {
        return AgentSource::Env(PathBuf::from(p));
    }
    match source_tree().filter(|_| !arch.is_host()) {
        Some(ws) => AgentSource::CrossBuild(ws),
        None => AgentSource::NextToKiln(next_to_kiln(arch)),
    }
}

/// The agent binary for this plan's image: found, or cross-built (see the module comment).
pub fn prepare(plan: &Plan, cache: &Cache) -> Result<PathBuf> {
    match source(plan.arch) {
        AgentSource::Env(p) if !p.is_file() => bail!(
            "KILN_AGENT={} is not a file: point it at a kiln-agent binary for {}",
            p.display(),
            plan.arch.debian()
        ),
        AgentSource::Env(p) => Ok(p),
        AgentSource::CrossBuild(ws) => cross_build(plan.arch, &ws, cache, &plan.mirror.debian),
        AgentSource::NextToKiln(found) => found,
    }
}

/// The agent for `plan`, found at once or being cross-built in a thread of `scope`.
pub enum Pending<'scope> {
    Ready(PathBuf),
    Building(std::thread::ScopedJoinHandle<'scope, Result<PathBuf>>),
}

impl Pending<'_> {
    pub fn wait(self) -> Result<PathBuf> {
        match self {
            Pending::Ready(p) => Ok(p),
            Pending::Building(h) => h.join().unwrap_or_else(|_| bail!("the agent's cross-build panicked")),
        }
    }
}

/// [`prepare`], with a cross-build started in `scope` (to run beside the bootstrap); an agent
/// that is simply missing is an error at once.
pub fn start<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    plan: &'env Plan,
    cache: &'env Cache,
) -> Result<Pending<'scope>> {
    match source(plan.arch) {
        AgentSource::CrossBuild(ws) => {
            Ok(Pending::Building(scope.spawn(move || cross_build(plan.arch, &ws, cache, &plan.mirror.debian))))
        }
        _ => prepare(plan, cache).map(Pending::Ready),
    }
}

/// Where the agent for each architecture comes from, as `kiln doctor` says it.
pub fn report() {
    for arch in [Arch::Amd64, Arch::Arm64] {
        let how = match source(arch) {
            AgentSource::Env(p) => format!("$KILN_AGENT = {}", p.display()),
            AgentSource::CrossBuild(ws) => {
                format!("cross-built from {} at the first build for it (cached)", ws.display())
            }
            AgentSource::NextToKiln(Ok(p)) => p.display().to_string(),
            AgentSource::NextToKiln(Err(e)) => format!("{e:#}"),
        };
        println!("on-device agent ({}): {how}", arch.debian());
    }
}

/// `kiln-agent[-<arch>]` next to the running kiln executable.
pub fn next_to_kiln(arch: Arch) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the kiln executable")?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let name = if arch.is_host() { "kiln-agent".to_string() } else { format!("kiln-agent-{}", arch.debian()) };
    let path = dir.join(&name);
    if path.is_file() {
        return Ok(path);
    }
    let how = if arch.is_host() {
        "build it with `cargo build -p kiln-agent` (the same profile as kiln), or set $KILN_AGENT".to_string()
    } else {
        format!(
            "kiln cross-builds it only when run from its source tree; put the release archive's kiln-agent-{} next to kiln, or set $KILN_AGENT",
            arch.debian()
        )
    };
    bail!("the on-device agent for {} is missing: looked for {}; {how}", arch.debian(), path.display())
}

/// The cache directory of one toolchain root, keyed by suite and package list.
fn toolchain_dir(cache: &Cache) -> PathBuf {
    let mut h = sha2::Sha256::new();
    for part in ["v1", TOOLCHAIN_SUITE, "amd64,arm64"].iter().chain(TOOLCHAIN_PACKAGES) {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    let key = hex::encode(&h.finalize()[..8]);
    cache.dir.join("agent-toolchain").join(format!("{TOOLCHAIN_SUITE}-{key}"))
}

/// Cross-builds `kiln-agent` for `arch` from the workspace `ws`; returns the stripped binary.
pub fn cross_build(arch: Arch, ws: &Path, cache: &Cache, mirror: &str) -> Result<PathBuf> {
    if arch != Arch::Arm64 || std::env::consts::ARCH != "x86_64" {
        bail!(
            "kiln cross-builds the agent only for arm64 on an x86-64 host; for {} set $KILN_AGENT to a kiln-agent built for it",
            arch.debian()
        );
    }
    // The toolchain root is entered with a fresh /proc (`unshare --mount-proc`), which kiln's
    // user namespace may not mount: an ordinary user's build takes a prebuilt agent.
    if !nix::unistd::geteuid().is_root() || std::env::var_os(crate::host::userns::ENV).is_some() {
        bail!("cross-building the arm64 agent makes and enters a toolchain root (mmdebstrap, chroot, a new /proc), which needs real root: build the first Pi image with sudo (the agent is cached), or set $KILN_AGENT to the release's aarch64 kiln-agent");
    }
    let dir = toolchain_dir(cache);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = dir.join("lock");
    let lock_file = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((f, _)) => {
            eprintln!("kiln: waiting for another agent build using {}", dir.display());
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?
        }
    };

    let root = dir.join("root");
    if !root.join("usr/bin/cargo").is_file() {
        make_toolchain_root(&root, mirror)?;
    }

    let progress = StageProgress::start("agent", &format!("cross-building kiln-agent for {}", arch.debian()));
    let src = root.join("src");
    let copied = sync_workspace(ws, &src)?;
    // cargo fetches crates from the registry: the host's resolver and CA bundle (which may trust
    // a proxy's CA) go in as copies.
    for f in ["etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt"] {
        let host = Path::new("/").join(f);
        if host.is_file() {
            let dest = root.join(f);
            let _ = std::fs::remove_file(&dest); // may be a dangling link to systemd-resolved
            std::fs::copy(&host, &dest)
                .with_context(|| format!("copying {} into {}", host.display(), root.display()))?;
        }
    }
    for d in ["cargo-home", "target"] {
        std::fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
    }
    let triple = "aarch64-unknown-linux-gnu";
    let mut cmd = Cmd::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(format!("--root={}", root.display()))
        // Mounted after the chroot, inside it.
        .arg("--mount-proc=/proc")
        .args(["--wd=/src", "cargo", "build", "--locked", "--profile", DEVICE_PROFILE, "--target", triple])
        .args(["-p", "kiln-agent"])
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/root")
        .env("CARGO_HOME", "/cargo-home")
        .env("CARGO_TARGET_DIR", "/target")
        .env("CARGO_TERM_COLOR", "never")
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", "aarch64-linux-gnu-gcc")
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar");
    for v in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "CARGO_HTTP_PROXY"] {
        if let Some(val) = std::env::var_os(v) {
            cmd = cmd.env(v, val);
        }
    }
    let mut compiled = 0usize;
    cmd.run_with_lines(|l| {
        if l.trim_start().starts_with("Compiling") {
            compiled += 1;
        }
        progress.line(l)
    })
    .context("cross-building kiln-agent for arm64")?;
    let built = root.join("target").join(triple).join(DEVICE_PROFILE).join("kiln-agent");
    // Copied out of the root: the next build's cargo may rewrite its target directory while
    // this image is still being made from the binary.
    let out = dir.join("kiln-agent-arm64");
    let tmp = dir.join("kiln-agent-arm64.tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("moving {} into place", out.display()))?;
    let size = std::fs::metadata(&out).with_context(|| format!("reading {}", out.display()))?.len();
    progress.finish(&format!(
        "kiln-agent arm64, {:.2} MiB; {copied} source files copied, {compiled} crates compiled",
        size as f64 / 1048576.0
    ));
    Ok(out)
}

/// Makes the toolchain root with mmdebstrap (once per package list; atomic by rename).
fn make_toolchain_root(root: &Path, mirror: &str) -> Result<()> {
    let tmp = root.with_extension("tmp");
    if tmp.exists() {
        // From an interrupted run: nothing is ever mounted below it outside a private namespace.
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing the half-made {}", tmp.display()))?;
    }
    let progress = StageProgress::start(
        "agent toolchain",
        &format!("mmdebstrap {TOOLCHAIN_SUITE} amd64+arm64 ({})", TOOLCHAIN_PACKAGES.join(" ")),
    );
    let mirror = mirror.trim_end_matches('/');
    Cmd::new("mmdebstrap")
        .args(["--mode=root", "--format=directory", "--variant=essential", "--architectures=amd64,arm64"])
        .arg("--components=main")
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(format!("--include={}", TOOLCHAIN_PACKAGES.join(",")))
        .arg(TOOLCHAIN_SUITE)
        .arg(&tmp)
        .arg(format!("deb {mirror} {TOOLCHAIN_SUITE} main"))
        .arg(format!("deb {mirror} {TOOLCHAIN_SUITE}-updates main"))
        .run_with_lines(|l| progress.line(l))
        .map_err(|e| {
            anyhow::anyhow!(
                "{e}\nhint: the agent's toolchain comes from Debian {TOOLCHAIN_SUITE} at {mirror}; check that the mirror serves it (amd64 and arm64)"
            )
        })?;
    std::fs::rename(&tmp, root).with_context(|| format!("moving {} to {}", tmp.display(), root.display()))?;
    progress.finish("toolchain root made");
    Ok(())
}

/// What of the workspace the agent's build reads: the manifests and every member's sources.
const WORKSPACE_FILES: &[&str] = &["Cargo.toml", "Cargo.lock"];
const WORKSPACE_DIRS: &[&str] = &["agent", "device", "feed", "builder"];

/// Copies the workspace into `dest`: files whose size or mtime differ, with their mtime; files
/// gone from the workspace are removed. Returns how many files were copied.
pub fn sync_workspace(ws: &Path, dest: &Path) -> Result<usize> {
    let mut copied = 0;
    let mut wanted = std::collections::BTreeSet::new();
    for f in WORKSPACE_FILES {
        copied += sync_file(&ws.join(f), &dest.join(f))? as usize;
        wanted.insert(dest.join(f));
    }
    for d in WORKSPACE_DIRS {
        let mut stack = vec![ws.join(d)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
                let path = entry.path();
                let ty = entry.file_type().with_context(|| format!("reading {}", path.display()))?;
                let rel = path.strip_prefix(ws).expect("below the workspace");
                if ty.is_dir() {
                    if rel.file_name().is_some_and(|n| n == "target" || n == ".git") {
                        continue;
                    }
                    stack.push(path);
                } else if ty.is_file() {
                    copied += sync_file(&path, &dest.join(rel))? as usize;
                    wanted.insert(dest.join(rel));
                }
            }
        }
    }
    // Files deleted from the workspace go from the copy too (a stale module would still compile).
    for d in WORKSPACE_DIRS {
        let mut stack = vec![dest.join(d)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path);
                } else if !wanted.contains(&path) {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
    }
    Ok(copied)
}

fn sync_file(src: &Path, dest: &Path) -> Result<bool> {
    let meta = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let mtime = meta.modified().with_context(|| format!("reading the mtime of {}", src.display()))?;
    if let Ok(d) = std::fs::metadata(dest) {
        if d.len() == meta.len() && d.modified().ok() == Some(mtime) {
            return Ok(false);
        }
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(src, dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    let f = std::fs::File::options().write(true).open(dest).with_context(|| format!("opening {}", dest.display()))?;
    f.set_modified(mtime).with_context(|| format!("setting the mtime of {}", dest.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_copy_follows_changes_and_deletions_and_keeps_mtimes() {
        let ws = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let w = ws.path();
        for f in WORKSPACE_FILES {
            std::fs::write(w.join(f), "x").unwrap();
        }
        for d in WORKSPACE_DIRS {
            std::fs::create_dir_all(w.join(d).join("src")).unwrap();
            std::fs::write(w.join(d).join("src/lib.rs"), "// lib").unwrap();
        }
        std::fs::create_dir_all(w.join("agent/target/debug")).unwrap();
        std::fs::write(w.join("agent/target/debug/big"), "never copied").unwrap();
        std::fs::write(w.join("agent/src/extra.rs"), "// extra").unwrap();

        let n = sync_workspace(w, dest.path()).unwrap();
        assert_eq!(n, WORKSPACE_FILES.len() + WORKSPACE_DIRS.len() + 1);
        assert!(!dest.path().join("agent/target").exists());
        let a = std::fs::metadata(w.join("agent/src/lib.rs")).unwrap().modified().unwrap();
        let b = std::fs::metadata(dest.path().join("agent/src/lib.rs")).unwrap().modified().unwrap();
        assert_eq!(a, b, "mtimes are kept (cargo's fingerprints)");
        assert_eq!(sync_workspace(w, dest.path()).unwrap(), 0, "nothing changed, nothing copied");

        // A same-size edit with a new mtime is copied; a deleted file goes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(w.join("device/src/lib.rs"), "// LIB").unwrap();
        std::fs::remove_file(w.join("agent/src/extra.rs")).unwrap();
        assert_eq!(sync_workspace(w, dest.path()).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(dest.path().join("device/src/lib.rs")).unwrap(), "// LIB");
        assert!(!dest.path().join("agent/src/extra.rs").exists());
    }

    #[test]
    fn the_toolchain_key_depends_on_the_package_list_only() {
        let a = Cache { dir: PathBuf::from("/c") };
        assert_eq!(toolchain_dir(&a), toolchain_dir(&a));
        assert!(toolchain_dir(&a).starts_with("/c/agent-toolchain"));
        assert!(toolchain_dir(&a).file_name().unwrap().to_string_lossy().starts_with("trixie-"));
    }
}
