//! The build, top to bottom: bootstrap -> customize -> harden -> root image -> boot partition ->
//! disk -> manifest. Outputs are written to a staging directory and moved into place at the end, so a
//! failed build never leaves a half-written output behind.

use crate::config::image::Bootloader;
use crate::config::lock::LockFile;
use crate::config::plan::Plan;
use crate::debian::cache::Cache;
use crate::stages::bootstrap::Packages;
use crate::stages::{self, Context};
use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BuildOptions {
    pub out_dir: PathBuf,
    /// Keep the work directory (tree, intermediate images) after a successful build.
    pub keep_work: bool,
    /// Install exactly this lock's packages (`--locked`).
    pub locked: Option<LockFile>,
}

pub struct BuildResult {
    pub dir: PathBuf,
    pub manifest: stages::manifest::Manifest,
    /// What was installed, with .deb hashes (the lock's package list).
    pub locked: Vec<crate::config::lock::LockedPackage>,
    pub seconds: f64,
}

pub fn build(plan: &Plan, opts: &BuildOptions) -> Result<BuildResult> {
    let started = Instant::now();
    // Every tool kiln runs (mmdebstrap, maintainer scripts in the chroot, mkfs.*, mtools) reads
    // the image's timestamp from here; `exec::Cmd` passes it on.
    std::env::set_var("SOURCE_DATE_EPOCH", plan.source_date_epoch.to_string());
    // A foreign architecture's programs run in the chroot (customize, harden) even when the
    // bootstrapped tree comes from the cache: qemu-user must be registered for every build, in
    // this build's own mount namespace (a fresh host has binfmt_misc mounted nowhere).
    crate::host::doctor::ensure_binfmt(plan.arch.debian())?;
    std::fs::create_dir_all(&opts.out_dir).with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let out_dir =
        std::fs::canonicalize(&opts.out_dir).with_context(|| format!("resolving {}", opts.out_dir.display()))?;
    crate::host::userns::check_output_dir(&out_dir)?;
    let opts = &BuildOptions { out_dir, keep_work: opts.keep_work, locked: opts.locked.clone() };
    let final_dir = opts.out_dir.join(&plan.output_name);
    let work = opts.out_dir.join(".work").join(&plan.output_name);
    let staging = opts.out_dir.join(format!(".{}.staging", plan.output_name));
    for d in [&work, &staging] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing the leftover {}", d.display()))?;
        }
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    check_free_space(&opts.out_dir, plan)?;
    let cache = Cache::open_default()?;
    let ctx = Context {
        plan,
        tree: work.join("tree"),
        work: work.clone(),
        staging: staging.clone(),
        templates: crate::stages::templates::Templates::load()?,
    };
    // The agent goes into every image: found at once (a missing one is an error before minutes
    // of bootstrapping), or cross-built for a foreign architecture (minutes, the first time)
    // while the tree bootstraps: a compiler beside mostly single-threaded package scripts.
    let (agent, (boot_files, locked)) = std::thread::scope(|s| -> Result<_> {
        let agent = stages::agent::start(s, plan, &cache)?;
        let tree = tree(&ctx, &cache, opts);
        let agent = agent.wait();
        // The tree's error first (the agent's, if both failed, follows as context).
        match (tree, agent) {
            (Ok(t), Ok(a)) => Ok((a, t)),
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(a)) => Err(e.context(format!("(the agent's build failed too: {a:#})"))),
            (Ok(_), Err(a)) => Err(a),
        }
    })?;
    let dev = crate::host::userns::DevNodes::bind(&ctx.tree)?;
    stages::customize::customize(&ctx, &agent)?;
    let security = stages::harden::harden(&ctx)?;
    drop(dev);
    let packages = stages::manifest::packages(&ctx.tree)?;
    let root = stages::rootfs::make_root(&ctx)?;
    let boot = match plan.bootloader {
        Bootloader::SystemdBoot => stages::esp::make_boot(&ctx, &boot_files, &root)?,
        Bootloader::RpiFirmware => stages::rpi::make_boot(&ctx, &boot_files, &root)?,
    };
    let disk = stages::disk::assemble(&ctx, &boot, &root)?;
    let bmap_path = stages::disk::write_bmap(&ctx, &disk)?;

    // Artifacts next to the disk: the root image (the update payload) and the boot stage's.
    let root_out = staging.join("root.img");
    std::fs::rename(&root.path, &root_out)
        .with_context(|| format!("moving the root image to {}", root_out.display()))?;
    let mut outputs = vec![disk, bmap_path, root_out];
    for a in &boot.artifacts {
        let dest = staging.join(a.file_name().expect("artifact file name"));
        std::fs::copy(a, &dest).with_context(|| format!("copying {} to {}", a.display(), dest.display()))?;
        outputs.push(dest);
    }
    let mut artifacts = BTreeMap::new();
    for p in &outputs {
        let name = p.file_name().expect("file").to_string_lossy().into_owned();
        artifacts.insert(name, stages::manifest::artifact(p)?);
    }
    let partuuids = stages::disk::partuuids(&ctx, &root)?;
    let manifest = stages::manifest::write(
        &ctx,
        &root,
        &boot_files.kernel_version,
        &boot.cmdline,
        &partuuids,
        artifacts,
        packages,
        security,
    )?;
    stages::sbom::write(&manifest, &ctx.tree, &staging)?;

    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing the old output {}", final_dir.display()))?;
    }
    std::fs::rename(&staging, &final_dir)
        .with_context(|| format!("moving {} to {}", staging.display(), final_dir.display()))?;
    if !opts.keep_work {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing the work directory {}", work.display()))?;
    }
    Ok(BuildResult { dir: final_dir, manifest, locked, seconds: started.elapsed().as_secs_f64() })
}

/// `kiln lock`: apt resolves the request and downloads it (nothing is installed); the lock
/// records every package with its .deb's sha256.
pub fn lock(plan: &Plan, out_dir: &Path) -> Result<LockFile> {
    std::env::set_var("SOURCE_DATE_EPOCH", plan.source_date_epoch.to_string());
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = std::fs::canonicalize(out_dir).with_context(|| format!("resolving {}", out_dir.display()))?;
    crate::host::userns::check_output_dir(&out_dir)?;
    let work = out_dir.join(".work").join(format!("{}.lock", plan.output_name));
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing the leftover {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let ctx = Context {
        plan,
        tree: work.join("tree"),
        work: work.clone(),
        staging: work.join("staging"),
        templates: crate::stages::templates::Templates::load()?,
    };
    let cache = Cache::open_default()?;
    let packages = stages::bootstrap::resolve(&ctx, &cache)?;
    std::fs::remove_dir_all(&work).with_context(|| format!("removing the work directory {}", work.display()))?;
    Ok(lock_file(plan, packages))
}

/// The lock of a plan, given the package set apt resolved for it.
fn lock_file(plan: &Plan, packages: Vec<crate::config::lock::LockedPackage>) -> LockFile {
    LockFile {
        format: crate::config::lock::FORMAT,
        kiln: env!("CARGO_PKG_VERSION").into(),
        profile: plan.profile.clone(),
        image: plan.image.clone(),
        suite: plan.suite.clone(),
        arch: plan.arch.debian().into(),
        source_date_epoch: plan.source_date_epoch,
        request: crate::config::lock::request_hash(plan),
        host_tools: stages::manifest::host_tools(),
        packages,
    }
}

/// A build needs room for the tree, the root image and the sparse disk's written blocks: at its
/// peak in the output directory (`df` every 0.5 s through a locked build) the minimal image
/// takes ~0.8 GiB, the service test's image (caddy, syncthing, radicale) ~1.0 GiB; 1.5 GiB
/// leaves a margin without refusing a build that fits.
fn check_free_space(dir: &Path, plan: &Plan) -> Result<()> {
    let need = 3 * 512 * 1024 * 1024u64;
    let st = nix::sys::statvfs::statvfs(dir).with_context(|| format!("checking free space in {}", dir.display()))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < need {
        anyhow::bail!(
            "not enough free space in {}: {} free, a build of {} needs about {} (free some space or pass --out on another disk)",
            dir.display(),
            crate::units::Bytes(free),
            plan.output_name,
            crate::units::Bytes(need)
        );
    }
    Ok(())
}

/// The bootstrapped tree in `ctx.tree`: restored from the cache or bootstrapped (locked), or
/// resolved by apt (unlocked); its boot files and the packages it holds.
fn tree(
    ctx: &Context,
    cache: &Cache,
    opts: &BuildOptions,
) -> Result<(stages::bootstrap::BootFiles, Vec<crate::config::lock::LockedPackage>)> {
    let plan = ctx.plan;
    let work = &ctx.work;
    Ok(match &opts.locked {
        Some(lock) => {
            // A locked bootstrap depends only on its inputs: reuse the tree when they match.
            let key = stages::bootstrap::tree_key(plan, lock, &ctx.templates)?;
            let boot = match stages::bootstrap::restore_tree(ctx, cache, &key)? {
                Some(boot) => boot,
                None => {
                    let debs = work.join("locked-debs");
                    stages::bootstrap::stage_locked_debs(plan, lock, cache, &debs)?;
                    let boot = stages::bootstrap::bootstrap(ctx, Packages::Locked { lock, debs: &debs })?;
                    std::fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
                    stages::bootstrap::save_tree(ctx, cache, &key, &boot)?;
                    boot
                }
            };
            (boot, lock.packages.clone())
        }
        // Unlocked: one bootstrap in which apt resolves and installs (its timestamp is the
        // build's time, so no later build could reuse the tree).
        None => {
            let boot = stages::bootstrap::bootstrap(ctx, Packages::Resolve)?;
            (boot, stages::bootstrap::collect_locked(ctx, cache)?)
        }
    })
}
