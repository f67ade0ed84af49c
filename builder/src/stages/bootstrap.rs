//! Stage 1: bootstrap the Debian root tree with mmdebstrap, initramfs included.
//!
//! The initramfs configuration (module list, the verity hook and boot script) is written into
//! the tree by an essential hook, before the kernel is installed, so initramfs-tools builds the
//! initramfs exactly once, at the end of the package installation.

use super::Context;
use crate::exec::{shell_quote, Cmd};
use crate::progress::StageProgress;
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
}

pub fn bootstrap(ctx: &Context) -> Result<BootFiles> {
    let plan = ctx.plan;
    if !nix_is_root() {
        bail!("kiln build must run as root: mmdebstrap installs packages into a chroot (run it with sudo)");
    }
    let hooks = ctx.work.join("initramfs-files");
    write_initramfs_config(ctx, &hooks)?;
    if ctx.tree.exists() {
        std::fs::remove_dir_all(&ctx.tree).with_context(|| format!("removing the old tree {}", ctx.tree.display()))?;
    }

    let progress = StageProgress::start("bootstrap", &format!("mmdebstrap {} {} ({} packages asked)", plan.suite, plan.arch.debian(), plan.packages.len()));
    let files = shell_quote(&hooks.to_string_lossy());
    // Before any package is installed: kiln's initramfs configuration, and update-initramfs
    // diverted so that the kernel's and every trigger's calls do nothing...
    let essential = format!(
        "cp -a {files}/. \"$1/\" && chroot \"$1\" dpkg-divert --quiet --local --no-rename --divert /usr/sbin/update-initramfs.kiln --add /usr/sbin/update-initramfs \
         && printf '#!/bin/sh\\necho \"kiln: update-initramfs $*: deferred\"\\n' > \"$1/usr/sbin/update-initramfs\" && chmod 755 \"$1/usr/sbin/update-initramfs\""
    );
    // ...then, once everything is installed, the real one runs exactly once.
    let customize = "rm -f \"$1/usr/sbin/update-initramfs\" && chroot \"$1\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs \
         && chroot \"$1\" update-initramfs -c -k all";
    let mut cmd = Cmd::new("mmdebstrap")
        .arg("--variant=minbase")
        .arg("--mode=root")
        .arg("--format=directory")
        .arg(format!("--architectures={}", plan.arch.debian()))
        .arg(format!("--include={}", plan.packages.join(",")))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(format!("--essential-hook={essential}"))
        .arg(format!("--customize-hook={customize}"))
        .env("SOURCE_DATE_EPOCH", plan.source_date_epoch.to_string());
    for opt in DPKG_EXCLUDES {
        cmd = cmd.arg(format!("--dpkgopt={opt}"));
    }
    cmd = cmd.arg(&plan.suite).arg(&ctx.tree).args(&plan.sources);
    cmd.run_with_lines(|l| progress.line(l)).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nhint: check that the mirror {} serves {} for {} and that every package in system.packages exists there",
            plan.mirror.debian,
            plan.suite,
            plan.arch.debian()
        )
    })?;

    let boot = copy_out_boot_files(ctx)?;
    progress.finish(&format!("kernel {}", boot.kernel_version));
    Ok(boot)
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
        ("etc/initramfs-tools/scripts/local-top/kiln-verity", t.render("initramfs/local-top-kiln-verity", &tctx)?, 0o755),
    ];
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    for (rel, text, mode) in files {
        super::customize::write_file(&dir.join(rel), text.as_bytes(), mode)?;
    }
    Ok(())
}

/// Copies the kernel and initramfs out of /boot (they go into the UKI, not the root).
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
    let initrd_src = boot.join(format!("initrd.img-{version}"));
    if !initrd_src.is_file() {
        bail!("no initramfs {} after bootstrap: initramfs-tools did not run (see the mmdebstrap output with --debug)", initrd_src.display());
    }
    let out = ctx.work.join("boot");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    std::fs::copy(boot.join(format!("vmlinuz-{version}")), &kernel).with_context(|| format!("copying the kernel to {}", kernel.display()))?;
    std::fs::copy(&initrd_src, &initrd).with_context(|| format!("copying the initramfs to {}", initrd.display()))?;
    Ok(BootFiles { kernel, initrd, kernel_version: version })
}
