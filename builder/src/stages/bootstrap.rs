//! Stage 1: bootstrap the Debian root tree with mmdebstrap, initramfs included.
//!
//! The initramfs configuration (module list, the verity hook and boot script) is copied into the
//! tree by a setup hook, before any package is installed. Initramfs images made while packages
//! install are throw-aways; a customize hook removes them and builds the real one, strictly
//! (the verity hook then fails if veritysetup is missing). This works the same for the minbase
//! variant (apt resolves) and the custom variant (`--locked`: exactly the locked set).

use super::Context;
use crate::config::image::InitramfsKind;
use crate::config::lock::LockFile;
use crate::host::exec::{shell_quote, Cmd};
use crate::host::progress::StageProgress;
use anyhow::{bail, Context as _, Result};
use std::path::{Path, PathBuf};

/// Parts of Debian an appliance never reads: manuals, docs (but not the copyright files, which
/// the SBOM reads), translations.
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
];

/// The kernel and initramfs the bootstrap produced, copied out of the tree.
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    /// Raspberry Pi: the GPU firmware files and device trees, copied out of the tree (they go
    /// into the boot slots, not the root).
    pub rpi_dir: Option<PathBuf>,
}

/// Which packages the bootstrap installs.
pub enum Packages<'a> {
    /// apt resolves the plan's package request against the mirror's current indexes.
    Resolve,
    /// Exactly the locked set, installed from `debs` (verified .debs named as apt names them).
    Locked { lock: &'a LockFile, debs: &'a Path },
}

pub fn bootstrap(ctx: &Context, packages: Packages) -> Result<BootFiles> {
    let plan = ctx.plan;
    if !nix_is_root() {
        bail!("kiln build must run as root or in kiln's user namespace: mmdebstrap installs packages into a chroot");
    }
    crate::host::doctor::ensure_binfmt(plan.arch.debian())?;
    let hooks = ctx.work.join("initramfs-files");
    let tools = plan.initramfs == InitramfsKind::InitramfsTools;
    if tools {
        write_initramfs_config(ctx, &hooks)?;
    }
    if ctx.tree.exists() {
        std::fs::remove_dir_all(&ctx.tree).with_context(|| format!("removing the old tree {}", ctx.tree.display()))?;
    }

    let what = match &packages {
        Packages::Resolve => format!("{} packages asked", plan.packages.len()),
        Packages::Locked { lock, .. } => format!("{} locked packages", lock.packages.len()),
    };
    let progress =
        StageProgress::start("bootstrap", &format!("mmdebstrap {} {} ({what})", plan.suite, plan.arch.debian()));
    let files = shell_quote(&hooks.to_string_lossy());
    let debs_out = ctx.work.join("debs");
    if debs_out.exists() {
        std::fs::remove_dir_all(&debs_out).with_context(|| format!("removing {}", debs_out.display()))?;
    }
    std::fs::create_dir_all(&debs_out).with_context(|| format!("creating {}", debs_out.display()))?;
    // kiln's initramfs configuration is in place before any package is installed. The
    // initramfs built while packages install may lack parts (the verity hook tolerates a missing
    // veritysetup then); the customize hook builds the real one, once, and strictly.
    let setup = format!("cp -a {files}/. \"$1/\"");
    let final_initramfs =
        "rm -f \"$1\"/boot/initrd.img-* && chroot \"$1\" env KILN_INITRAMFS_FINAL=1 update-initramfs -c -k all";
    // With kiln's own initramfs, update-initramfs is diverted to a no-op before any package
    // that calls it is installed: no initramfs is ever made under emulation. These hooks run
    // as extract hooks (after the first packages are unpacked, before any is configured):
    // mmdebstrap runs no essential hook for the custom variant of locked builds, where every
    // package is installed in that first step.
    let divert = "chroot \"$1\" dpkg-divert --local --quiet --rename --divert /usr/sbin/update-initramfs.distrib --add /usr/sbin/update-initramfs && printf '#!/bin/sh\\n# kiln: the initramfs is built on the build host\\nexit 0\\n' > \"$1/usr/sbin/update-initramfs\" && chmod 755 \"$1/usr/sbin/update-initramfs\"";
    let mut cmd = mmdebstrap(plan);
    cmd = match packages {
        Packages::Resolve => cmd
            .arg("--variant=minbase")
            .arg(format!("--include={}", plan.packages.join(",")))
            // Keep every downloaded .deb and copy them out for the cache and the lock.
            .arg("--skip=essential/unlink")
            .arg("--skip=download/empty")
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {}",
                shell_quote(&debs_out.to_string_lossy())
            )),
        Packages::Locked { lock, debs } => {
            let include: Vec<String> = lock.packages.iter().map(|p| format!("{}={}", p.name, p.version)).collect();
            cmd.arg("--variant=custom")
                .arg(format!("--include={}", include.join(",")))
                .arg("--setup-hook=mkdir -p \"$1/var/cache/apt/archives/\"")
                .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", shell_quote(&debs.to_string_lossy())))
        }
    };
    cmd = if tools {
        cmd.arg(format!("--setup-hook={setup}")).arg(format!("--customize-hook={final_initramfs}"))
    } else {
        cmd.arg(format!("--extract-hook={divert}"))
    };
    let foreign = !plan.arch.is_host();
    if foreign {
        cmd = cmd
            .arg(format!("--extract-hook={}", super::native::extract_hook()))
            .env("QEMU_CPU", plan.arch.emulated_cpu());
    }
    run_mmdebstrap(plan, cmd, &ctx.tree, &progress)?;

    if foreign {
        progress.line("host-side steps: CA certificates");
        let _dev = crate::host::userns::DevNodes::bind(&ctx.tree)?;
        super::native::finish(&ctx.tree)?;
    }
    let boot = copy_out_boot_files(ctx)?;
    progress.finish(&format!("kernel {}", boot.kernel_version));
    Ok(boot)
}

/// mmdebstrap with what every kiln bootstrap shares: unshare mode into a directory, the plan's
/// architecture and components, no recommends, the build's timestamp, the dpkg excludes.
///
/// Unshare mode as root (real, or of kiln's user namespace for an ordinary user, see
/// host/userns.rs) only adds mount and pid namespaces: nothing it mounts outlives it, and the
/// same code runs for both. The one difference between the two, device nodes in `/dev` (root
/// can make them, a namespace cannot), is removed by [`empty_dev`].
fn mmdebstrap(plan: &crate::config::plan::Plan) -> Cmd {
    let mut cmd = Cmd::new("mmdebstrap")
        .arg("--mode=unshare")
        .arg("--format=directory")
        .arg(format!("--architectures={}", plan.arch.debian()))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(format!("--components={}", plan.components.join(",")))
        .env("SOURCE_DATE_EPOCH", plan.source_date_epoch.to_string());
    for opt in DPKG_EXCLUDES {
        cmd = cmd.arg(format!("--dpkgopt={opt}"));
    }
    cmd
}

/// Runs `cmd` (from `mmdebstrap`) for the plan's suite and sources into `tree`, its output as
/// progress lines; a failure names the mirror to check.
fn run_mmdebstrap(plan: &crate::config::plan::Plan, cmd: Cmd, tree: &Path, progress: &StageProgress) -> Result<()> {
    cmd.arg(&plan.suite).arg(tree).args(&plan.sources).run_with_lines(|l| progress.line(l)).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nhint: check that the mirror {} serves {} for {} and that every package in system.packages exists there",
            plan.mirror.debian,
            plan.suite,
            plan.arch.debian()
        )
    })?;
    empty_dev(tree)
}

/// Empties the tree's `/dev`: the image mounts devtmpfs there (the initramfs moves its own), so
/// nothing in it is ever seen on a device, and what a bootstrap leaves there depends on who ran
/// it (root makes device nodes, a user namespace cannot). Run after the bootstrap and again
/// before the root image (a program run in the chroot may have written `/dev/null` as a file).
pub fn empty_dev(tree: &Path) -> Result<()> {
    let dev = tree.join("dev");
    let meta = std::fs::symlink_metadata(&dev).with_context(|| format!("reading {}", dev.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", dev.display());
    }
    for e in std::fs::read_dir(&dev).with_context(|| format!("reading {}", dev.display()))? {
        let path = e.with_context(|| format!("reading {}", dev.display()))?.path();
        let is_dir = std::fs::symlink_metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }
            .with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn write_initramfs_config(ctx: &Context, dir: &Path) -> Result<()> {
    let t = &ctx.templates;
    let mut tctx = tera::Context::new();
    tctx.insert("initramfs_modules", &ctx.plan.initramfs_modules);
    let files = [
        ("etc/initramfs-tools/conf.d/kiln.conf", t.render("initramfs/kiln.conf", &tctx)?, 0o644),
        ("usr/share/initramfs-tools/modules.d/kiln.conf", t.render("initramfs/modules.tera", &tctx)?, 0o644),
        ("etc/initramfs-tools/hooks/kiln-verity", t.render("initramfs/hook-kiln-verity", &tctx)?, 0o755),
        (
            "etc/initramfs-tools/scripts/local-top/kiln-verity",
            t.render("initramfs/local-top-kiln-verity", &tctx)?,
            0o755,
        ),
    ];
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    for (rel, text, mode) in files {
        super::customize::write_file(&dir.join(rel), text.as_bytes(), mode)?;
    }
    Ok(())
}

/// Copies the kernel and initramfs out of /boot (they go into the UKI or the boot slot, not the
/// root). With `initramfs = "kiln"` the initramfs is built here, on the host.
fn copy_out_boot_files(ctx: &Context) -> Result<BootFiles> {
    let boot = ctx.tree.join("boot");
    let mut kernels = Vec::new();
    for e in std::fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            kernels.push(v.to_string());
        }
    }
    kernels.sort();
    let Some(version) = kernels.pop() else {
        bail!("no kernel in {} after bootstrap: is the image's kernel_package right?", boot.display());
    };
    let out = ctx.work.join("boot");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    std::fs::copy(boot.join(format!("vmlinuz-{version}")), &kernel)
        .with_context(|| format!("copying the kernel to {}", kernel.display()))?;
    match ctx.plan.initramfs {
        InitramfsKind::InitramfsTools => {
            let initrd_src = boot.join(format!("initrd.img-{version}"));
            if !initrd_src.is_file() {
                bail!("no initramfs {} after bootstrap: initramfs-tools did not run (see the mmdebstrap output with --debug)", initrd_src.display());
            }
            std::fs::copy(&initrd_src, &initrd)
                .with_context(|| format!("copying the initramfs to {}", initrd.display()))?;
        }
        InitramfsKind::Kiln => {
            let progress = StageProgress::start(
                "initramfs",
                &format!("built on the host for {} {version}", ctx.plan.arch.debian()),
            );
            let info = crate::boot::initramfs::build(&ctx.tree, &version, &ctx.plan.initramfs_modules, &initrd)?;
            progress.finish(&format!("{info}"));
        }
    }
    Ok(BootFiles { kernel, initrd, kernel_version: version.clone(), rpi_dir: copy_out_rpi_files(ctx, &version)? })
}

/// Raspberry Pi images: the GPU firmware and the device trees the boot slots need.
fn copy_out_rpi_files(ctx: &Context, kernel_version: &str) -> Result<Option<PathBuf>> {
    let Some(def) = &ctx.plan.rpi else { return Ok(None) };
    let out = ctx.work.join("boot/rpi");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let fw = ctx.tree.join("usr/lib/raspi-firmware");
    let dtbs = ctx.tree.join(format!("usr/lib/linux-image-{kernel_version}/broadcom"));
    for f in &def.firmware_files {
        std::fs::copy(fw.join(f), out.join(f))
            .with_context(|| format!("copying the firmware file {f} from {} (is raspi-firmware in the image's packages, and non-free-firmware in its components?)", fw.display()))?;
    }
    for f in def.dtbs.iter().chain(ctx.plan.qemu.dtb.iter()) {
        std::fs::copy(dtbs.join(f), out.join(f)).with_context(|| {
            format!("copying the device tree {f} from {} (does kernel {kernel_version} ship it?)", dtbs.display())
        })?;
    }
    Ok(Some(out))
}

/// After a `Packages::Resolve` bootstrap: every installed package with the sha256 of its .deb,
/// each .deb stored in the cache.
pub fn collect_locked(
    ctx: &Context,
    cache: &crate::debian::cache::Cache,
) -> Result<Vec<crate::config::lock::LockedPackage>> {
    let debs = ctx.work.join("debs");
    let mut out = Vec::new();
    for p in super::manifest::packages(&ctx.tree)? {
        let mut locked = crate::config::lock::LockedPackage {
            name: p.name,
            version: p.version,
            arch: p.arch,
            sha256: String::new(),
        };
        let file = debs.join(locked.deb_file_name());
        if !file.is_file() {
            bail!(
                "no .deb for the installed package {} {} in {} (apt's download cache): cannot lock it",
                locked.name,
                locked.version,
                debs.display()
            );
        }
        locked.sha256 = cache.store_deb(&file)?.hex();
        out.push(locked);
    }
    std::fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    Ok(out)
}

/// The package set of a lock: apt resolves the plan's request, every `Essential: yes` and
/// `Priority: required` package and apt (what mmdebstrap's minbase variant installs, the set
/// locks had before) with their dependencies against the mirror's current indexes, and
/// downloads them. Nothing is installed and no maintainer script
/// runs (mmdebstrap's extract variant): for a foreign architecture that is seconds instead of
/// minutes of emulation, and the locked bootstrap that follows is the only one. Every .deb is
/// stored in the cache; the packages come back sorted, each with its .deb's sha256.
pub fn resolve(ctx: &Context, cache: &crate::debian::cache::Cache) -> Result<Vec<crate::config::lock::LockedPackage>> {
    let plan = ctx.plan;
    if !nix_is_root() {
        bail!("kiln must run as root or in kiln's user namespace to resolve a lock: mmdebstrap extracts packages into a chroot");
    }
    let tree = ctx.work.join("resolve");
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing the old {}", tree.display()))?;
    }
    let progress = StageProgress::start(
        "resolve",
        &format!(
            "apt {} {} ({} packages asked, required and apt)",
            plan.suite,
            plan.arch.debian(),
            plan.packages.len()
        ),
    );
    let cmd = mmdebstrap(plan)
        .arg("--variant=extract")
        // An apt pattern goes in an --include of its own (mmdebstrap does not split it).
        .arg("--include=?or(?essential,?priority(required))")
        .arg(format!("--include=apt,{}", plan.packages.join(",")))
        // The downloaded .debs stay in the tree: they are the lock.
        .arg("--skip=cleanup/apt/cache")
        .arg("--skip=download/empty");
    run_mmdebstrap(plan, cmd, &tree, &progress)?;
    let archives = tree.join("var/cache/apt/archives");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&archives).with_context(|| format!("reading {}", archives.display()))? {
        let path = e?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()).filter(|n| n.ends_with(".deb")) else {
            continue;
        };
        let mut locked = locked_from_deb_name(file)
            .with_context(|| format!("{}: not a .deb name apt makes (name_version_arch.deb)", path.display()))?;
        locked.sha256 = cache.store_deb(&path)?.hex();
        out.push(locked);
    }
    if out.is_empty() {
        bail!("apt downloaded no packages into {}: nothing to lock", archives.display());
    }
    out.sort();
    std::fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    progress.finish(&format!("{} packages", out.len()));
    Ok(out)
}

/// `name_version_arch.deb` as apt names a download (an epoch's `:` written `%3a`).
fn locked_from_deb_name(file: &str) -> Option<crate::config::lock::LockedPackage> {
    let stem = file.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (name, version, arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || version.is_empty() || arch.is_empty() {
        return None;
    }
    let locked = crate::config::lock::LockedPackage {
        name: name.into(),
        version: version.replace("%3a", ":"),
        arch: arch.into(),
        sha256: String::new(),
    };
    (locked.deb_file_name() == file).then_some(locked)
}

/// Puts the locked .debs, verified against the lock, under `dir` with apt's file names.
/// Packages missing from the cache are downloaded from the plan's mirror (found through its
/// hash-checked indexes for the suite, -updates and -security) and must match the lock's sha256.
pub fn stage_locked_debs(
    plan: &crate::config::plan::Plan,
    lock: &LockFile,
    cache: &crate::debian::cache::Cache,
    dir: &Path,
) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut missing = Vec::new();
    for p in &lock.packages {
        match cache.verified_deb(&p.name, &p.version, &p.sha256)? {
            Some(src) => link_or_copy(&src, &dir.join(p.deb_file_name()))?,
            None => missing.push(p),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let progress = StageProgress::start("fetch", &format!("{} locked .debs not in the cache", missing.len()));
    let config = crate::debian::FetchConfig { timeout: std::time::Duration::from_secs(600), ..Default::default() };
    let fetcher = crate::debian::Fetcher::new(config)?;
    let suites = plan.mirror.index_suites(&plan.suite);
    let mut indexes = Vec::new();
    for (mirror, suite) in &suites {
        for component in &plan.components {
            progress.line(&format!("index {suite}/{component}"));
            indexes.push((mirror.clone(), fetcher.packages(mirror, suite, component, &lock.arch)?));
        }
    }
    let mut bytes = 0u64;
    for p in &missing {
        let found = indexes.iter().find_map(|(mirror, entries)| {
            entries.iter().find(|e| e.name == p.name && e.version == p.version && e.arch == p.arch).map(|e| (mirror, e))
        });
        let Some((mirror, entry)) = found else {
            bail!(
                "package {} {} ({}) is no longer served by {} (looked in {}): set system.mirror to a snapshot mirror that still has it, or run `kiln lock` to move to current versions",
                p.name,
                p.version,
                p.arch,
                plan.mirror.debian,
                suites.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        };
        let url = format!("{}/{}", mirror.trim_end_matches('/'), entry.filename);
        progress.line(&url);
        let data = fetcher.file(&url, entry.size)?;
        bytes += data.len() as u64;
        let stored = cache.store_deb_bytes(&p.name, &p.version, &url, &data, &p.sha256)?;
        link_or_copy(&stored, &dir.join(p.deb_file_name()))?;
    }
    progress.finish(&format!("{} .debs, {}", missing.len(), crate::units::Bytes(bytes)));
    Ok(())
}

fn link_or_copy(src: &Path, dest: &Path) -> Result<()> {
    if std::fs::hard_link(src, dest).is_err() {
        std::fs::copy(src, dest).with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    }
    Ok(())
}

/// The cache key of a locked bootstrap: everything that shapes the tree before `customize`.
pub fn tree_key(
    plan: &crate::config::plan::Plan,
    lock: &LockFile,
    templates: &crate::stages::templates::Templates,
) -> Result<String> {
    let mut input = format!(
        "kiln {} mmdebstrap-unshare\n{} {} {:?} {:?}\nepoch {}\nmodules {}\nexcludes {}\n",
        env!("CARGO_PKG_VERSION"),
        plan.suite,
        plan.arch.debian(),
        plan.components,
        plan.initramfs,
        plan.source_date_epoch,
        plan.initramfs_modules.join(","),
        DPKG_EXCLUDES.join(",")
    );
    match plan.initramfs {
        InitramfsKind::InitramfsTools => {
            for name in ["initramfs/kiln.conf", "initramfs/hook-kiln-verity", "initramfs/local-top-kiln-verity"] {
                input.push_str(&templates.render(name, &tera::Context::new())?);
            }
        }
        // The cached tree comes with its initramfs: kiln's /init is part of what made it.
        InitramfsKind::Kiln => input.push_str(include_str!("../../templates/initramfs/init.tera")),
    }
    for p in &lock.packages {
        input.push_str(&format!("{} {} {} {}\n", p.name, p.version, p.arch, p.sha256));
    }
    Ok(crate::units::Sha256::of(input.as_bytes()).hex())
}

/// Copies a cached tree (and its kernel and initramfs) into the build. `None` when not cached.
pub fn restore_tree(ctx: &Context, cache: &crate::debian::cache::Cache, key: &str) -> Result<Option<BootFiles>> {
    let dir = cache.tree_dir(key);
    let Ok(kernel_version) = std::fs::read_to_string(dir.join("kernel-version")) else { return Ok(None) };
    let progress = StageProgress::start("bootstrap", &format!("cached tree {}", &key[..12]));
    if ctx.tree.exists() {
        std::fs::remove_dir_all(&ctx.tree).with_context(|| format!("removing the old tree {}", ctx.tree.display()))?;
    }
    Cmd::new("cp").args(["-a", "--reflink=auto"]).arg(dir.join("tree")).arg(&ctx.tree).run()?;
    let out = ctx.work.join("boot");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let kernel_version = kernel_version.trim().to_string();
    let boot = BootFiles {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        rpi_dir: copy_out_rpi_files(ctx, &kernel_version)?,
        kernel_version,
    };
    std::fs::copy(dir.join("vmlinuz"), &boot.kernel)
        .with_context(|| format!("copying the cached kernel to {}", boot.kernel.display()))?;
    std::fs::copy(dir.join("initrd.img"), &boot.initrd)
        .with_context(|| format!("copying the cached initramfs to {}", boot.initrd.display()))?;
    progress.finish(&format!("kernel {} (from the cache)", boot.kernel_version));
    Ok(Some(boot))
}

/// Stores the freshly bootstrapped tree under its key (written aside, then renamed).
pub fn save_tree(ctx: &Context, cache: &crate::debian::cache::Cache, key: &str, boot: &BootFiles) -> Result<()> {
    let dir = cache.tree_dir(key);
    let tmp = dir.with_extension("part");
    for d in [&dir, &tmp] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Cmd::new("cp").args(["-a", "--reflink=auto"]).arg(&ctx.tree).arg(tmp.join("tree")).run()?;
    std::fs::copy(&boot.kernel, tmp.join("vmlinuz")).with_context(|| format!("caching {}", boot.kernel.display()))?;
    std::fs::copy(&boot.initrd, tmp.join("initrd.img"))
        .with_context(|| format!("caching {}", boot.initrd.display()))?;
    std::fs::write(tmp.join("kernel-version"), &boot.kernel_version)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))
}

#[cfg(test)]
mod tests {
    use super::locked_from_deb_name;

    #[test]
    fn deb_names_read_back_as_apt_wrote_them() {
        let p = locked_from_deb_name("libc6_2.41-12_arm64.deb").unwrap();
        assert_eq!((p.name.as_str(), p.version.as_str(), p.arch.as_str()), ("libc6", "2.41-12", "arm64"));
        let p = locked_from_deb_name("systemd_1%3a257.9-1~deb13u1_amd64.deb").unwrap();
        assert_eq!(p.version, "1:257.9-1~deb13u1");
        assert_eq!(p.deb_file_name(), "systemd_1%3a257.9-1~deb13u1_amd64.deb");
        for bad in ["libc6_2.41_arm64_x.deb", "libc6_2.41.deb", "_1_all.deb", "libc6_2.41-12_arm64.udeb", "a_b_c"] {
            assert!(locked_from_deb_name(bad).is_none(), "{bad}");
        }
    }
}
