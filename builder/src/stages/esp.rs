//! Stage 4: the boot side. A unified kernel image (systemd stub + os-release + command line +
//! kernel + initramfs) whose command line carries the root hash, and the EFI system partition
//! (FAT, made without a loop device) holding systemd-boot and that UKI.

use super::bootstrap::BootFiles;
use super::rootfs::RootImage;
use super::{BootOutput, Context};
use crate::boot::pe;
use crate::config::image::Role;
use crate::host::exec::Cmd;
use crate::host::progress::StageProgress;
use crate::units::{Bytes, Uuid};
use anyhow::{Context as _, Result};
use std::path::Path;

/// The kernel command line for a root image. `root_partuuid` names the partition when the
/// table cannot carry a PARTUUID derived from the root hash (DOS tables).
pub fn kernel_cmdline(ctx: &Context, root: &RootImage, root_partuuid: Option<&str>) -> String {
    let mut args = vec![
        "root=/dev/mapper/root".to_string(),
        "rootfstype=erofs".into(),
        "ro".into(),
        format!("kiln.verity={}", root.root_hash),
        format!("kiln.verity_offset={}", root.hash_offset),
        "systemd.show_status=auto".into(),
        // A failed boot (initramfs error, kernel panic, verity corruption) reboots after 10 s
        // instead of waiting at a shell, so the boot counter can move on to the other slot.
        "panic=10".into(),
    ];
    if let Some(uuid) = root_partuuid {
        args.push(format!("kiln.root=PARTUUID={uuid}"));
    }
    args.extend(ctx.plan.kernel_cmdline.iter().cloned());
    args.join(" ")
}

pub fn make_boot(ctx: &Context, boot: &BootFiles, root: &RootImage) -> Result<BootOutput> {
    let plan = ctx.plan;
    let progress = StageProgress::start("boot partition", "unified kernel image + ESP");
    let dir = ctx.work.join("esp-tree");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let cmdline = kernel_cmdline(ctx, root, None);
    let uki_name = format!("kiln-{}.efi", plan.version);
    let uki = ctx.work.join(&uki_name);
    make_uki(ctx, boot, &cmdline, &uki)?;

    // The ESP's tree, with every mtime at SOURCE_DATE_EPOCH so the FAT image is reproducible.
    let efi_lib = ctx.tree.join("usr/lib/systemd/boot/efi");
    let sd_boot = efi_lib.join("systemd-bootx64.efi");
    let copy = |from: &Path, to: &str| -> Result<()> {
        let dest = dir.join(to);
        std::fs::create_dir_all(dest.parent().expect("has parent"))
            .with_context(|| format!("creating {}", dest.display()))?;
        std::fs::copy(from, &dest).with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
        Ok(())
    };
    copy(&sd_boot, "EFI/BOOT/BOOTX64.EFI")?;
    copy(&sd_boot, "EFI/systemd/systemd-bootx64.efi")?;
    copy(&uki, &format!("EFI/Linux/{uki_name}"))?;
    let loader = ctx.templates.render("esp/loader.conf", &tera::Context::new())?;
    super::customize::write_file(&dir.join("loader/loader.conf"), loader.as_bytes(), 0o644)?;
    super::customize::write_file(&dir.join("loader/entries.srel"), b"type1\n", 0o644)?;
    set_mtimes(&dir, plan.source_date_epoch)?;

    let part = plan.partition(Role::Esp, None);
    let esp = ctx.work.join("esp.img");
    make_fat(&dir, &esp, part.size, "KILN-ESP", &Uuid::derive(&plan.seed, "esp-volume").fat_volume_id())?;
    progress.finish(&format!(
        "{} ({}), ESP {}",
        uki_name,
        Bytes(std::fs::metadata(&uki).map(|m| m.len()).unwrap_or(0)),
        part.size
    ));
    let uki_out = ctx.work.join("artifacts").join(&uki_name);
    std::fs::create_dir_all(ctx.work.join("artifacts")).context("creating the artifacts directory")?;
    std::fs::rename(&uki, &uki_out).with_context(|| format!("moving {}", uki.display()))?;
    Ok(BootOutput { partitions: vec![(Role::Esp, None, esp)], artifacts: vec![uki_out], cmdline })
}

/// Builds the UKI with objcopy, placing the sections after the stub's own.
fn make_uki(ctx: &Context, boot: &BootFiles, cmdline: &str, out: &Path) -> Result<()> {
    let stub_path = ctx.tree.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub");
    let stub = std::fs::read(&stub_path).with_context(|| {
        format!("reading the EFI stub {} (is systemd-boot-efi in the image's packages?)", stub_path.display())
    })?;
    let layout = pe::stub_layout(&stub).with_context(|| format!("reading {}", stub_path.display()))?;
    let parts = ctx.work.join("uki-parts");
    std::fs::create_dir_all(&parts).with_context(|| format!("creating {}", parts.display()))?;
    let osrel = parts.join("os-release");
    std::fs::copy(ctx.tree.join("usr/lib/os-release"), &osrel).context("copying os-release for the UKI")?;
    let cmdline_file = parts.join("cmdline");
    std::fs::write(&cmdline_file, format!("{cmdline}\0"))
        .with_context(|| format!("writing {}", cmdline_file.display()))?;
    let uname = parts.join("uname");
    std::fs::write(&uname, &boot.kernel_version).with_context(|| format!("writing {}", uname.display()))?;
    let sections: [(&str, &Path); 5] = [
        (".osrel", &osrel),
        (".cmdline", &cmdline_file),
        (".uname", &uname),
        (".initrd", &boot.initrd),
        (".linux", &boot.kernel),
    ];
    let sizes: Vec<u64> = sections
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_>>()?;
    let vmas = pe::place_sections(layout, &sizes);
    let mut cmd = Cmd::new("objcopy");
    for ((name, path), vma) in sections.iter().zip(&vmas) {
        cmd = cmd
            .arg("--add-section")
            .arg(format!("{name}={}", path.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"));
    }
    let _ = std::fs::remove_file(out);
    cmd.arg(&stub_path).arg(out).run()?;
    // objcopy stamps the PE header with the clock: use the image's timestamp instead.
    let mut pe = std::fs::read(out).with_context(|| format!("reading {}", out.display()))?;
    pe::set_timestamp(&mut pe, ctx.plan.source_date_epoch as u32)
        .with_context(|| format!("normalizing {}", out.display()))?;
    std::fs::write(out, pe).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// A FAT32 image of `size` holding the tree `dir`, made without a loop device (mkfs.vfat +
/// mtools). Reproducible when the tree's mtimes are fixed: `--invariant` and a given volume id.
pub fn make_fat(dir: &Path, out: &Path, size: Bytes, label: &str, volume_id: &str) -> Result<()> {
    let _ = std::fs::remove_file(out);
    Cmd::new("mkfs.vfat")
        .args(["-F", "32", "-n", label, "--invariant", "-i", volume_id])
        .arg("-C")
        .arg(out)
        .arg((size.0 / 1024).to_string())
        .run()?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    if !entries.is_empty() {
        Cmd::new("mcopy")
            .arg("-i")
            .arg(out)
            .args(["-s", "-m", "-Q"])
            .args(&entries)
            .arg("::/")
            .env("MTOOLS_SKIP_CHECK", "1")
            .run()?;
    }
    Ok(())
}

/// Sets every mtime under `dir` (and of `dir`) to `epoch`, deepest first.
pub fn set_mtimes(dir: &Path, epoch: u64) -> Result<()> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch);
    fn walk(p: &Path, t: std::time::SystemTime) -> Result<()> {
        if p.is_dir() {
            for e in std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()))? {
                walk(&e?.path(), t)?;
            }
        }
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        f.set_modified(t).with_context(|| format!("setting the mtime of {}", p.display()))?;
        Ok(())
    }
    walk(dir, t)
}
