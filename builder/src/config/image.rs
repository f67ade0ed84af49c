//! Image (board) definitions: architecture, disk layout, bootloader and the QEMU machine that
//! test-boots the image. Built-in definitions live in `images/*.toml` and are compiled in.

use crate::config::profile::{ProfileError, Source};
use crate::units::Bytes;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Slots, partition roles, bootloaders and table kinds are the device contract's types: what
/// a board definition names is what device.json carries.
pub use kiln_device::{Bootloader, PartitionTable, Role, Slot};

pub const BUILTIN_IMAGES: &[(&str, &str)] = &[
    ("pc-uefi", include_str!("../../../images/pc-uefi.toml")),
    ("rpi4", include_str!("../../../images/rpi4.toml")),
    ("rpi3", include_str!("../../../images/rpi3.toml")),
    ("rpi5", include_str!("../../../images/rpi5.toml")),
];

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageDef {
    pub description: String,
    /// Debian architecture: "amd64" or "arm64".
    pub arch: Arch,
    pub bootloader: Bootloader,
    pub kernel_package: String,
    /// Archive components the image needs (e.g. `non-free-firmware` for the Pi's GPU firmware).
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub kernel_cmdline: Vec<String>,
    #[serde(default)]
    pub initramfs_modules: Vec<String>,
    /// Firmware packages for the board's Wi-Fi chip, installed when a profile turns Wi-Fi on.
    #[serde(default)]
    pub wifi_firmware: Vec<String>,
    /// Who makes the initramfs: Debian's initramfs-tools inside the tree, or kiln on the host
    /// from the tree's files (no code of the image's architecture runs: fast for arm64 on x86).
    #[serde(default)]
    pub initramfs: InitramfsKind,
    pub disk: Disk,
    /// Raspberry Pi boot files (images with `bootloader = "rpi-firmware"`).
    #[serde(default)]
    pub rpi: Option<RpiDef>,
    pub qemu: Qemu,
}

fn default_components() -> Vec<String> {
    vec!["main".into()]
}

/// What goes into each boot slot of a Raspberry Pi image besides the kernel and initramfs.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RpiDef {
    /// GPU firmware files from `raspi-firmware` (`/usr/lib/raspi-firmware`).
    pub firmware_files: Vec<String>,
    /// Device trees from the kernel package (`broadcom/<name>`), upstream names.
    pub dtbs: Vec<String>,
    /// Extra config.txt lines, appended after kiln's (conditional sections allowed).
    #[serde(default)]
    pub config: Vec<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Whether programs of this architecture run natively on the build host.
    pub fn is_host(self) -> bool {
        matches!((self, std::env::consts::ARCH), (Arch::Amd64, "x86_64") | (Arch::Arm64, "aarch64"))
    }

    /// The CPU that qemu-user emulates for this architecture's programs on a foreign build host
    /// (`QEMU_CPU`). Its default, "max", has SVE on arm64, and glibc then takes its SVE string
    /// functions, which TCG runs slower than the plain ones: a Cortex-A72 (the Pi 4's core, no
    /// SVE) unpacked a 4.8 MB .deb 15 % faster (dpkg-deb under qemu-aarch64, 2.4 s -> 2.05 s).
    pub fn emulated_cpu(self) -> &'static str {
        match self {
            Arch::Amd64 => "max",
            Arch::Arm64 => "cortex-a72",
        }
    }

    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InitramfsKind {
    #[default]
    InitramfsTools,
    Kiln,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub table: PartitionTable,
    pub partitions: Vec<PartitionDef>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartitionDef {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub slot: Option<Slot>,
    pub size: Bytes,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Qemu {
    /// qemu-system-<system>
    pub system: String,
    pub machine: String,
    pub cpu: String,
    pub memory: String,
    pub smp: u32,
    pub firmware: Firmware,
    /// Device tree QEMU's machine needs (from the boot slot), for `firmware = "rpi"`.
    #[serde(default)]
    pub dtb: Option<String>,
    /// The guest's serial console device (e.g. `ttyS1` on raspi3b, whose PL011 is Bluetooth's).
    #[serde(default)]
    pub console: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// UEFI (OVMF) boots the disk like a PC would.
    Ovmf,
    /// QEMU loads the kernel, initramfs and DTB of the boot slot that autoboot.txt names, with
    /// that slot's cmdline.txt: what the Pi's GPU firmware does (which QEMU cannot run).
    Rpi,
}

#[derive(Debug, Clone)]
pub struct LoadedImage {
    pub name: String,
    pub source: String,
    pub def: ImageDef,
}

/// Finds an image by path or name (`images/NAME.toml` under `cwd`, else built-in) and checks it.
pub fn load(arg: &str, cwd: &Path) -> Result<LoadedImage, ProfileError> {
    let (name, source, text) = if arg.contains('/') || arg.ends_with(".toml") {
        let p = PathBuf::from(arg);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ProfileError::new(arg, None, format!("cannot read image definition: {e}")))?;
        let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        (name, arg.to_string(), text)
    } else if cwd.join("images").join(format!("{arg}.toml")).is_file() {
        let rel = format!("images/{arg}.toml");
        let text = std::fs::read_to_string(cwd.join(&rel))
            .map_err(|e| ProfileError::new(&rel, None, format!("cannot read: {e}")))?;
        (arg.to_string(), rel, text)
    } else if let Some((_, text)) = BUILTIN_IMAGES.iter().find(|(n, _)| *n == arg) {
        (arg.to_string(), format!("<built-in>/images/{arg}.toml"), text.to_string())
    } else {
        let names: Vec<&str> = BUILTIN_IMAGES.iter().map(|(n, _)| *n).collect();
        return Err(ProfileError::new(
            format!("--image {arg}"),
            None,
            format!(
                "no image named {arg:?}: looked for images/{arg}.toml and the built-in images ({})",
                names.join(", ")
            ),
        ));
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ProfileError::new(&source, None, format!("not valid TOML: {}", e.message())))?;
    let def: ImageDef = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        ProfileError::new(&source, Some(&path), e.into_inner().to_string())
    })?;
    validate(&Source::File(source.clone().into()), &def)?;
    Ok(LoadedImage { name, source, def })
}

fn validate(src: &Source, def: &ImageDef) -> Result<(), ProfileError> {
    let parts = &def.disk.partitions;
    let err = |key: &str, msg: &str| Err(ProfileError::new(src, Some(key), msg.to_string()));
    let count = |role: Role| parts.iter().filter(|p| p.role == role).count();
    match def.bootloader {
        Bootloader::SystemdBoot => {
            if count(Role::Esp) != 1 {
                return err("disk.partitions", "a systemd-boot image needs exactly one partition with role = \"esp\"");
            }
            if count(Role::Autoboot) + count(Role::Boot) > 0 {
                return err("disk.partitions", "roles \"autoboot\" and \"boot\" are for bootloader = \"rpi-firmware\"");
            }
            if def.rpi.is_some() {
                return err("rpi", "an [rpi] section needs bootloader = \"rpi-firmware\"");
            }
        }
        Bootloader::RpiFirmware => {
            if def.disk.table != PartitionTable::Mbr {
                return err("disk.table", "the Raspberry Pi firmware's A/B boot (tryboot) needs table = \"mbr\"");
            }
            if parts.first().map(|p| p.role) != Some(Role::Autoboot) || count(Role::Autoboot) != 1 {
                return err("disk.partitions", "a Raspberry Pi image's first partition must be the only one with role = \"autoboot\" (the firmware reads autoboot.txt there)");
            }
            if count(Role::Esp) > 0 {
                return err("disk.partitions", "role = \"esp\" is for bootloader = \"systemd-boot\"");
            }
            for slot in [Slot::A, Slot::B] {
                let n = parts.iter().position(|p| p.role == Role::Boot && p.slot == Some(slot));
                // tryboot's boot_partition must be a primary partition: numbers 2 and 3.
                if parts.iter().filter(|p| p.role == Role::Boot && p.slot == Some(slot)).count() != 1
                    || !matches!(n, Some(1 | 2))
                {
                    return err("disk.partitions", "a Raspberry Pi image needs boot partitions for slot \"a\" and \"b\" as its second and third partitions");
                }
            }
            if def.rpi.is_none() {
                return err("rpi", "bootloader = \"rpi-firmware\" needs an [rpi] section (firmware_files, dtbs)");
            }
            if def.qemu.firmware != Firmware::Rpi && def.arch == Arch::Arm64 && def.qemu.machine.starts_with("raspi") {
                return err(
                    "qemu.firmware",
                    "QEMU's raspi machines need firmware = \"rpi\" (direct boot of the slot's kernel)",
                );
            }
        }
    }
    if def.disk.table == PartitionTable::Mbr && parts.len() > 15 {
        return err("disk.partitions", "a DOS partition table here holds at most 15 partitions");
    }
    for slot in [Slot::A, Slot::B] {
        if parts.iter().filter(|p| p.role == Role::Root && p.slot == Some(slot)).count() != 1 {
            return err(
                "disk.partitions",
                "an image needs exactly one root partition for slot \"a\" and one for slot \"b\" (A/B updates)",
            );
        }
    }
    if count(Role::Data) != 1 || parts.last().map(|p| p.role) != Some(Role::Data) {
        return err("disk.partitions", "an image needs one partition with role = \"data\", and it must be the last one (it grows to fill the disk)");
    }
    for (i, p) in parts.iter().enumerate() {
        if p.name.is_empty()
            || p.name.len() > 36
            || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return err(
                &format!("disk.partitions[{i}].name"),
                "expected a short partition name of letters, digits, '-' and '_'",
            );
        }
        if p.size.0 < crate::units::MIB || p.size.0 % crate::units::MIB != 0 {
            return err(&format!("disk.partitions[{i}].size"), "expected a whole number of MiB");
        }
        let slotted = matches!(p.role, Role::Root | Role::Boot);
        if slotted != p.slot.is_some() {
            return err(
                &format!("disk.partitions[{i}].slot"),
                "root and boot partitions need a slot (\"a\" or \"b\"), other partitions have none",
            );
        }
    }
    if def.qemu.firmware == Firmware::Rpi && def.qemu.dtb.is_none() && def.qemu.machine.starts_with("raspi") {
        return err("qemu.dtb", "QEMU's raspi machines need the device tree to load (e.g. \"bcm2837-rpi-3-b.dtb\")");
    }
    Ok(())
}

impl ImageDef {
    pub fn root_partition(&self, slot: Slot) -> &PartitionDef {
        self.disk
            .partitions
            .iter()
            .find(|p| p.role == Role::Root && p.slot == Some(slot))
            .expect("validated: both root slots exist")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_images_are_valid() {
        for (name, _) in BUILTIN_IMAGES {
            let img = load(name, Path::new("/nonexistent")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(img.def.root_partition(Slot::A).name, "root-a", "{name}");
            assert_eq!(!Slot::A, Slot::B);
        }
    }

    fn rpi4_with(from: &str, to: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../../images/rpi4.toml");
        assert!(text.contains(from), "{from}");
        let path = dir.path().join("pi.toml");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        load(path.to_str().unwrap(), dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn raspberry_pi_layout_rules_are_checked() {
        let err = rpi4_with("table = \"mbr\"", "table = \"gpt\"");
        assert!(err.contains("disk.table") && err.contains("tryboot"), "{err}");
        let err = rpi4_with("{ name = \"boot-b\",   role = \"boot\", slot = \"b\", size = \"128MiB\" },\n", "");
        assert!(err.contains("boot partitions for slot"), "{err}");
        let err = rpi4_with("firmware = \"rpi\"", "firmware = \"ovmf\"");
        assert!(err.contains("qemu.firmware"), "{err}");
        let err = rpi4_with("[rpi]", "[rpi]\nfirmware = []");
        assert!(err.contains("rpi") && err.contains("unknown field"), "{err}");
    }
}
