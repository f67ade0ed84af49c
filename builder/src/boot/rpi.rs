//! Raspberry Pi boot files: rendering config.txt and cmdline.txt from the templates in `firmware/`
//! and autoboot.txt with `kiln_device::boot::Autoboot` (the agent's writer too), and reading them back the way the Pi's firmware does (which slot boots, which
//! kernel and initramfs it loads). `kiln boot` uses the reading side to play the firmware's part
//! under QEMU; the updater (issue 5) uses it to switch slots.
//!
//! The firmware's rules (Raspberry Pi documentation, "autoboot.txt" and "tryboot"):
//! - autoboot.txt lives on the first FAT partition and is at most 512 bytes;
//! - it may use only the `[all]`, `[none]` and `[tryboot]` filters;
//! - with `tryboot_a_b=1`, `boot_partition=N` under `[all]` is booted normally and the one under
//!   `[tryboot]` only when the one-shot tryboot flag is set (`reboot '0 tryboot'`).

use crate::config::image::Slot;
use anyhow::{bail, Context as _, Result};

pub use kiln_device::boot::{Autoboot, AUTOBOOT_MAX_BYTES};

pub const TEMPLATES: &[(&str, &str)] = &[
    ("config.txt", include_str!("../../../firmware/config.txt.tera")),
    ("cmdline.txt", include_str!("../../../firmware/cmdline.txt.tera")),
];

/// The partition number of a slot's boot partition (partitions 2 and 3: primary, as
/// `boot_partition` needs).
pub fn boot_partition_number(slot: Slot) -> u32 {
    match slot {
        Slot::A => 2,
        Slot::B => 3,
    }
}

pub fn slot_of_partition(n: u32) -> Option<Slot> {
    match n {
        2 => Some(Slot::A),
        3 => Some(Slot::B),
        _ => None,
    }
}

fn tera() -> Result<tera::Tera> {
    let mut t = tera::Tera::default();
    t.autoescape_on(vec![]);
    for (name, text) in TEMPLATES {
        t.add_raw_template(name, text).with_context(|| format!("firmware template {name}"))?;
    }
    Ok(t)
}

fn render(name: &str, ctx: &tera::Context) -> Result<String> {
    tera()?.render(name, ctx).map_err(|e| anyhow::anyhow!("rendering firmware/{name}.tera: {e:?}"))
}

/// autoboot.txt with `committed` as the normal slot and the other one as the try-boot slot
/// (written by `kiln_device::boot::Autoboot`, as the agent writes it on the device).
pub fn autoboot_txt(committed: Slot) -> Result<String> {
    let text = Autoboot::ab(boot_partition_number(committed), boot_partition_number(!committed)).render();
    Autoboot::check(&text).map_err(anyhow::Error::msg)?;
    Ok(text)
}

/// autoboot.txt read with the firmware's rules.
pub fn parse_autoboot(text: &str) -> Result<Autoboot> {
    Autoboot::parse(text).map_err(anyhow::Error::msg)
}

/// How the guest's last run ended, read off its console once QEMU (`-no-reboot`) exited by
/// itself: what a real Pi's firmware knows at the next start. The tryboot flag is one-shot:
/// only a reboot that asks for it sets it; any other reset (plain reboot, watchdog, a crash
/// with `panic=N`) boots the `[all]` slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// `reboot "0 tryboot"`: the kernel handed the firmware the tryboot flag.
    Tryboot,
    /// A plain reboot or a kernel panic that reboots.
    Plain,
    /// The guest powered itself off: nothing starts again.
    PowerOff,
}

/// `None`: the console says nothing about it. Headless, QEMU exiting by itself then means a
/// reset without a word (the watchdog), which boots the `[all]` slot like a plain one.
pub fn reset_of(console: &[String]) -> Option<Reset> {
    for line in console.iter().rev() {
        // kernel/reboot.c: "reboot: Restarting system with command '<cmd>'" / "... system".
        if let Some(i) = line.find("reboot: Restarting system") {
            let cmd = line[i..].split_once("with command '").map(|(_, c)| c.trim_end().trim_end_matches('\''));
            let tryboot = cmd.is_some_and(|c| c.split_whitespace().any(|w| w == "tryboot"));
            return Some(if tryboot { Reset::Tryboot } else { Reset::Plain });
        }
        if line.contains("Rebooting in ") {
            return Some(Reset::Plain);
        }
        if line.contains("reboot: Power down") || line.contains("reboot: System halted") {
            return Some(Reset::PowerOff);
        }
    }
    None
}

/// config.txt of a boot slot.
pub fn config_txt(image: &str, version: &str, slot: Slot, extra: &[String]) -> Result<String> {
    let mut ctx = tera::Context::new();
    ctx.insert("image", image);
    ctx.insert("version", version);
    ctx.insert("slot", &format!("{slot:?}"));
    ctx.insert("extra", extra);
    render("config.txt", &ctx)
}

/// cmdline.txt: the firmware wants the whole command line on one line.
pub fn cmdline_txt(cmdline: &str) -> Result<String> {
    if cmdline.contains('\n') {
        bail!("a kernel command line must be one line");
    }
    let mut ctx = tera::Context::new();
    ctx.insert("cmdline", cmdline);
    render("cmdline.txt", &ctx)
}

/// The files config.txt tells the firmware to load (only `[all]` sections are taken: kiln's
/// config.txt puts board-specific lines after them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub kernel: String,
    pub initramfs: Option<String>,
    pub arm_64bit: bool,
}

pub fn parse_config(text: &str) -> Result<BootConfig> {
    let mut all = true;
    let (mut kernel, mut initramfs, mut arm_64bit) = (None, None, false);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            all = line == "[all]";
            continue;
        }
        if !all {
            continue;
        }
        if let Some(rest) = line.strip_prefix("initramfs ") {
            initramfs = rest.split_whitespace().next().map(str::to_string);
        } else if let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "kernel" => kernel = Some(v.trim().to_string()),
                "arm_64bit" => arm_64bit = v.trim() == "1",
                _ => {}
            }
        }
    }
    Ok(BootConfig { kernel: kernel.context("config.txt names no kernel= under [all]")?, initramfs, arm_64bit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoboot_starts_on_slot_a_and_tries_b() {
        let text = autoboot_txt(Slot::A).unwrap();
        assert!(text.len() <= AUTOBOOT_MAX_BYTES);
        assert_eq!(text, "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n");
        let a = parse_autoboot(&text).unwrap();
        assert!(a.tryboot_a_b);
        assert_eq!(a.partition(false), 2);
        assert_eq!(a.partition(true), 3);
    }

    #[test]
    fn committing_slot_b_swaps_the_numbers() {
        let b = parse_autoboot(&autoboot_txt(Slot::B).unwrap()).unwrap();
        assert_eq!((b.partition(false), b.partition(true)), (3, 2));
        assert_eq!(slot_of_partition(b.partition(false)), Some(Slot::B));
    }

    #[test]
    fn config_names_the_slots_kernel_and_initramfs() {
        for slot in [Slot::A, Slot::B] {
            let extra = vec!["[pi4]".to_string(), "kernel=other".into(), "[all]".into(), "dtparam=watchdog=on".into()];
            let text = config_txt("rpi4", "1.2.0", slot, &extra).unwrap();
            assert!(text.contains(&format!("Boot slot {slot:?} of rpi4 1.2.0")), "{text}");
            let c = parse_config(&text).unwrap();
            assert_eq!(
                c,
                BootConfig { kernel: "vmlinuz".into(), initramfs: Some("initrd.img".into()), arm_64bit: true }
            );
            assert!(text.lines().any(|l| l == "upstream_kernel=1"));
        }
    }

    #[test]
    fn the_next_start_follows_how_the_last_run_ended() {
        let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tryboot = lines(&[
            "kiln-agent: rebooting into the new slot",
            "[  201.2] reboot: Restarting system with command '0 tryboot'",
        ]);
        assert_eq!(reset_of(&tryboot), Some(Reset::Tryboot));
        assert_eq!(reset_of(&lines(&["[ 9.1] reboot: Restarting system"])), Some(Reset::Plain));
        assert_eq!(reset_of(&lines(&["reboot: Restarting system with command 'recovery'"])), Some(Reset::Plain));
        let panic = lines(&["Kernel panic - not syncing: VFS", "Rebooting in 10 seconds.."]);
        assert_eq!(reset_of(&panic), Some(Reset::Plain), "a crashed trial comes back on the committed slot");
        assert_eq!(reset_of(&lines(&["kiln-health: waiting"])), None, "a silent reset (the watchdog), or a quit");
        assert_eq!(reset_of(&lines(&["[ 30.0] reboot: Power down"])), Some(Reset::PowerOff));
        // The last reset counts: a tryboot earlier in the log was used up by the boot after it.
        let later = lines(&[
            "reboot: Restarting system with command '0 tryboot'",
            "Linux version",
            "reboot: Restarting system",
        ]);
        assert_eq!(reset_of(&later), Some(Reset::Plain));
    }

    #[test]
    fn cmdline_is_one_line() {
        assert_eq!(cmdline_txt("console=ttyS1,115200 ro").unwrap(), "console=ttyS1,115200 ro\n");
        assert!(cmdline_txt("a\nb").is_err());
    }
}
