//! The files on the boot medium that decide which slot starts, written by the builder and
//! changed by the agent: the Raspberry Pi's `autoboot.txt` and `cmdline.txt`, and the names of
//! the UKIs on a UEFI ESP (with systemd-boot's boot counters). One writer and one reader each.
//!
//! The Pi firmware's rules (Raspberry Pi documentation, "autoboot.txt" and "tryboot"):
//! autoboot.txt lives on the first FAT partition and is at most 512 bytes; it may use only the
//! `[all]`, `[none]` and `[tryboot]` filters; with `tryboot_a_b=1`, `boot_partition=N` under
//! `[all]` is booted normally and the one under `[tryboot]` only when the one-shot tryboot flag
//! is set (`reboot '0 tryboot'`).

pub const AUTOBOOT_MAX_BYTES: usize = 512;
const ALLOWED_FILTERS: &[&str] = &["[all]", "[none]", "[tryboot]"];

/// What autoboot.txt says, read with the firmware's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Autoboot {
    pub tryboot_a_b: bool,
    /// `boot_partition` under `[all]`.
    pub default_partition: u32,
    /// `boot_partition` under `[tryboot]`.
    pub tryboot_partition: Option<u32>,
}

impl Autoboot {
    /// A/B: `normal` boots, `tryboot` only on the one-shot flag.
    pub fn ab(normal: u32, tryboot: u32) -> Autoboot {
        Autoboot { tryboot_a_b: true, default_partition: normal, tryboot_partition: Some(tryboot) }
    }

    /// The partition the firmware boots, with or without the one-shot tryboot flag.
    pub fn partition(&self, tryboot: bool) -> u32 {
        match (tryboot, self.tryboot_partition) {
            (true, Some(p)) if self.tryboot_a_b => p,
            _ => self.default_partition,
        }
    }

    pub fn render(&self) -> String {
        let mut t =
            format!("[all]\ntryboot_a_b={}\nboot_partition={}\n", u8::from(self.tryboot_a_b), self.default_partition);
        if let Some(p) = self.tryboot_partition {
            t.push_str(&format!("[tryboot]\nboot_partition={p}\n"));
        }
        t
    }

    /// Checks the firmware's rules for autoboot.txt (size, filters).
    pub fn check(text: &str) -> Result<(), String> {
        if text.len() > AUTOBOOT_MAX_BYTES {
            return Err(format!(
                "autoboot.txt is {} bytes; the firmware reads at most {AUTOBOOT_MAX_BYTES}",
                text.len()
            ));
        }
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') && !ALLOWED_FILTERS.contains(&line) {
                return Err(format!(
                    "autoboot.txt may only use the filters {}; found {line}",
                    ALLOWED_FILTERS.join(", ")
                ));
            }
        }
        Ok(())
    }

    pub fn parse(text: &str) -> Result<Autoboot, String> {
        Autoboot::check(text)?;
        let mut section = "[all]";
        let (mut ab, mut default, mut tryboot) = (false, None, None);
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with('[') {
                section = ALLOWED_FILTERS.iter().find(|f| **f == line).expect("checked");
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("autoboot.txt: cannot read the line {line:?}"));
            };
            let num =
                || value.trim().parse::<u32>().map_err(|_| format!("autoboot.txt: {key}={value} is not a number"));
            match (section, key.trim()) {
                ("[none]", _) => {}
                ("[all]", "tryboot_a_b") => ab = num()? == 1,
                ("[all]", "boot_partition") => default = Some(num()?),
                ("[tryboot]", "boot_partition") => tryboot = Some(num()?),
                _ => {}
            }
        }
        let default_partition = default.ok_or("autoboot.txt has no boot_partition under [all]")?;
        Ok(Autoboot { tryboot_a_b: ab, default_partition, tryboot_partition: tryboot })
    }
}

/// Points a Pi boot slot's cmdline.txt at a root partition: replaces `kiln.root=...`.
pub fn retarget_cmdline(cmdline: &str, root_partuuid: &str) -> Result<String, String> {
    let mut found = false;
    let words: Vec<String> = cmdline
        .split_whitespace()
        .map(|w| {
            if w.starts_with("kiln.root=") {
                found = true;
                format!("kiln.root=PARTUUID={root_partuuid}")
            } else {
                w.to_string()
            }
        })
        .collect();
    if !found {
        return Err("cmdline.txt has no kiln.root= to point at the new root partition".into());
    }
    Ok(words.join(" ") + "\n")
}

/// A UKI file name on the ESP, `EFI/Linux/kiln-<version>[+<left>[-<done>]].efi`: blessed
/// (no counter) or being tried (systemd-boot counts `left` down on every start).
#[derive(Debug, Clone, PartialEq)]
pub struct UkiName {
    pub version: String,
    /// Tries left, when the entry is still being counted (not blessed).
    pub tries_left: Option<u32>,
    /// Tries systemd-boot has started so far (the `-<done>` part; 0 when absent).
    pub tries_done: u32,
}

impl UkiName {
    pub fn blessed(version: &str) -> UkiName {
        UkiName { version: version.into(), tries_left: None, tries_done: 0 }
    }

    pub fn trial(version: &str, tries: u32) -> UkiName {
        UkiName { version: version.into(), tries_left: Some(tries), tries_done: 0 }
    }

    pub fn parse(file: &str) -> Option<UkiName> {
        let stem = file.strip_prefix("kiln-")?.strip_suffix(".efi")?;
        match stem.split_once('+') {
            None => Some(UkiName::blessed(stem)),
            Some((v, counter)) => {
                let (left, done) = match counter.split_once('-') {
                    Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                    None => (counter.parse().ok()?, 0),
                };
                Some(UkiName { version: v.into(), tries_left: Some(left), tries_done: done })
            }
        }
    }

    /// Whether the firmware has started this entry at least once (a counter that moved, or ran
    /// out). A fresh `+<n>` entry has never been booted.
    pub fn was_tried(&self) -> bool {
        self.tries_done > 0 || self.tries_left == Some(0)
    }

    /// The file name, with the counter as systemd-boot spells it (`+<left>` or `+<left>-<done>`).
    pub fn file_name(&self) -> String {
        match (self.tries_left, self.tries_done) {
            (None, _) => format!("kiln-{}.efi", self.version),
            (Some(n), 0) => format!("kiln-{}+{n}.efi", self.version),
            (Some(n), d) => format!("kiln-{}+{n}-{d}.efi", self.version),
        }
    }
}

/// The directory of the UKIs on an ESP.
pub const UKI_DIR: &str = "EFI/Linux";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoboot_round_trips_and_keeps_its_spelling() {
        let a = Autoboot::ab(3, 2);
        let t = a.render();
        assert_eq!(t, "[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n");
        assert_eq!(Autoboot::parse(&t).unwrap(), a);
        assert_eq!((a.partition(false), a.partition(true)), (3, 2));
    }

    #[test]
    fn autoboot_follows_the_firmwares_rules() {
        let long = format!("[all]\nboot_partition=2\n#{}\n", "x".repeat(600));
        assert!(Autoboot::parse(&long).unwrap_err().contains("at most 512"));
        assert!(Autoboot::parse("[pi4]\nboot_partition=2\n").unwrap_err().contains("only use the filters"));
        let plain = Autoboot::parse("[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n").unwrap();
        assert_eq!(plain.partition(true), 2, "without tryboot_a_b=1 the [tryboot] section is not A/B");
        let none = Autoboot::parse("[all]\nboot_partition=2\n[none]\nboot_partition=3\n").unwrap();
        assert_eq!(none.tryboot_partition, None);
        assert!(Autoboot::parse("[tryboot]\nboot_partition=3\n").is_err());
        assert!(Autoboot::parse("[all]\nboot_partition=two\n").unwrap_err().contains("not a number"));
    }

    #[test]
    fn uki_names_round_trip() {
        for n in [UkiName::blessed("0.2.0"), UkiName::trial("0.2.0", 3), UkiName::trial("2026.12.1", 0)] {
            assert_eq!(UkiName::parse(&n.file_name()), Some(n));
        }
        assert_eq!(UkiName::trial("0.2.0", 3).file_name(), "kiln-0.2.0+3.efi");
        let spent = UkiName::parse("kiln-0.2.0+0-3.efi").unwrap();
        assert_eq!((spent.tries_left, spent.tries_done, spent.was_tried()), (Some(0), 3, true));
        assert_eq!(spent.file_name(), "kiln-0.2.0+0-3.efi");
        assert!(UkiName::parse("kiln-0.2.0+2-1.efi").unwrap().was_tried());
        assert!(!UkiName::trial("0.2.0", 3).was_tried(), "a fresh counter was never booted");
        assert_eq!(UkiName::parse("kiln-0.2.0+2-x.efi"), None);
        assert_eq!(UkiName::parse(".kiln-0.2.0.efi.tmp"), None);
        assert_eq!(UkiName::parse("other.efi"), None);
    }

    #[test]
    fn cmdline_retargeting_and_partuuids() {
        let c = "console=ttyS1,115200 kiln.root=PARTUUID=1234abcd-05 kiln.verity=ff rootwait\n";
        let p = crate::mbr::partuuid(0x1234abcd, 6);
        assert_eq!(p, "1234abcd-06");
        assert_eq!(
            retarget_cmdline(c, &p).unwrap(),
            "console=ttyS1,115200 kiln.root=PARTUUID=1234abcd-06 kiln.verity=ff rootwait\n"
        );
        assert!(retarget_cmdline("quiet", "x").is_err());
    }
}
