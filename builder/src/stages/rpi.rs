//! Stage 4 (Raspberry Pi): the boot side. Partition 1 holds only autoboot.txt (slot A committed,
//! slot B the try-boot slot); boot slot A holds everything the firmware loads for that slot: the
//! GPU firmware, the kernel, kiln's initramfs, the device trees, config.txt and cmdline.txt,
//! whose `kiln.root=PARTUUID=…` and `kiln.verity=…` bind the slot to root-a's exact content.
//! Boot slot B stays empty until an update writes it.

use super::bootstrap::BootFiles;
use super::esp::{make_fat, set_mtimes};
use super::rootfs::RootImage;
use super::{BootOutput, Context};
use crate::boot::rpi;
use crate::config::image::{Role, Slot};
use crate::host::progress::StageProgress;
use crate::units::Uuid;
use anyhow::{Context as _, Result};
use std::path::Path;

pub fn make_boot(ctx: &Context, boot: &BootFiles, root: &RootImage) -> Result<BootOutput> {
    let plan = ctx.plan;
    let def = plan.rpi.as_ref().context("an rpi-firmware image needs its [rpi] section")?;
    let progress =
        StageProgress::start("boot partitions", "autoboot.txt + boot slot A (firmware, kernel, initramfs, DTBs)");
    let fw = boot.rpi_dir.as_ref().context("the bootstrap kept no Raspberry Pi firmware files")?;
    let slot = Slot::A;
    let root_part = plan.partition(Role::Root, Some(slot));
    let cmdline = super::esp::kernel_cmdline(ctx, root, Some(&root_part.uuid));

    let dir = ctx.work.join("boot-a-tree");
    fresh_dir(&dir)?;
    let copy = |from: &Path, name: &str| -> Result<u64> {
        let dest = dir.join(name);
        std::fs::copy(from, &dest).with_context(|| format!("copying {} to {}", from.display(), dest.display()))
    };
    let mut bytes = 0;
    for f in def.firmware_files.iter().chain(&def.dtbs).chain(plan.qemu.dtb.iter()) {
        if !dir.join(f).exists() {
            bytes += copy(&fw.join(f), f)?;
        }
    }
    bytes += copy(&boot.kernel, "vmlinuz")?;
    bytes += copy(&boot.initrd, "initrd.img")?;
    let config = rpi::config_txt(&plan.image, &plan.version, slot, &def.config)?;
    super::customize::write_file(&dir.join("config.txt"), config.as_bytes(), 0o644)?;
    super::customize::write_file(&dir.join("cmdline.txt"), rpi::cmdline_txt(&cmdline)?.as_bytes(), 0o644)?;
    set_mtimes(&dir, plan.source_date_epoch)?;
    let part = plan.partition(Role::Boot, Some(slot));
    if bytes + 4 * crate::units::MIB > part.size.0 {
        anyhow::bail!(
            "boot slot {slot:?} needs {} but partition {} holds {}: make it larger in {}",
            crate::units::Bytes(bytes),
            part.name,
            part.size,
            plan.image_source
        );
    }
    let boot_img = ctx.work.join("boot-a.img");
    make_fat(&dir, &boot_img, part.size, "KILN-BOOT-A", &Uuid::derive(&plan.seed, "boot-a-volume").fat_volume_id())?;

    let auto_dir = ctx.work.join("autoboot-tree");
    fresh_dir(&auto_dir)?;
    super::customize::write_file(&auto_dir.join("autoboot.txt"), rpi::autoboot_txt(slot)?.as_bytes(), 0o644)?;
    set_mtimes(&auto_dir, plan.source_date_epoch)?;
    let auto_part = plan.partition(Role::Autoboot, None);
    let auto_img = ctx.work.join("autoboot.img");
    make_fat(
        &auto_dir,
        &auto_img,
        auto_part.size,
        "KILN-AUTO",
        &Uuid::derive(&plan.seed, "autoboot-volume").fat_volume_id(),
    )?;

    progress.finish(&format!("slot A {} of files, root {}", crate::units::Bytes(bytes), root_part.uuid));
    // The boot slot's image is also the update payload for the boot partition (the updater
    // writes it into the other slot and points its cmdline.txt at that slot's root).
    let boot_artifact = ctx.work.join("boot.img");
    std::fs::copy(&boot_img, &boot_artifact)
        .with_context(|| format!("copying {} to {}", boot_img.display(), boot_artifact.display()))?;
    Ok(BootOutput {
        partitions: vec![(Role::Autoboot, None, auto_img), (Role::Boot, Some(slot), boot_img)],
        artifacts: vec![boot_artifact],
        cmdline,
    })
}

fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
