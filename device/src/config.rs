//! `/usr/lib/kiln/device.json`: what the builder bakes into every image and the agent reads back.
//! Every choice is an enum, spelled in JSON as it always was ("systemd-boot", "gpt", "root", "a",
//! "require", "stop"), so an image built by an older kiln still reads.
//!
//! The builder writes these types (`builder/src/config/device.rs`) and the agent reads them; there is no
//! other definition of device.json. `reads_what_older_builders_wrote_and_round_trips` holds the
//! spelling on disk.

use kiln_feed::Version;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub const DEVICE_CONFIG: &str = "/usr/lib/kiln/device.json";

/// An A/B slot. `!slot` is the other one.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl std::ops::Not for Slot {
    type Output = Slot;
    fn not(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "a",
            Slot::B => "b",
        })
    }
}

impl Slot {
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Bootloader {
    /// systemd-boot on an ESP, one UKI per root slot, boot counting for A/B.
    SystemdBoot,
    /// The Raspberry Pi's own firmware: autoboot.txt picks boot partition A or B (tryboot).
    RpiFirmware,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    Gpt,
    /// DOS partition table (the Pi firmware's tryboot needs it); more than four partitions
    /// make the fourth an extended partition holding the rest.
    Mbr,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// EFI system partition (FAT): bootloader and UKIs.
    Esp,
    /// Raspberry Pi: the first FAT partition, holding only autoboot.txt (which slot boots).
    Autoboot,
    /// Raspberry Pi: a slot's boot partition (FAT): firmware, kernel, initramfs, DTBs, config.
    Boot,
    /// A root filesystem slot: EROFS with its dm-verity hash tree appended.
    Root,
    /// Persistent state (/var, /home, /srv), created and grown at first boot.
    Data,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Esp => "esp",
            Role::Autoboot => "autoboot",
            Role::Boot => "boot",
            Role::Root => "root",
            Role::Data => "data",
        })
    }
}

/// `[backup] before_update`: what a failed backup before an install means.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BeforeUpdate {
    /// No good backup, no install (the default).
    #[default]
    Require,
    /// Back up, and install even when that failed.
    Try,
    /// No backup before installs.
    Off,
}

impl BeforeUpdate {
    pub const NAMES: &'static [&'static str] = &["require", "try", "off"];
}

impl FromStr for BeforeUpdate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "require" => Ok(BeforeUpdate::Require),
            "try" => Ok(BeforeUpdate::Try),
            "off" => Ok(BeforeUpdate::Off),
            _ => Err(format!("expected \"require\", \"try\" or \"off\", found {s:?}")),
        }
    }
}

/// How a service's state directory is made consistent for a backup.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quiesce {
    /// Stopped for the few seconds a backup takes, started again after (the default).
    #[default]
    Stop,
    /// Its files are consistent at any moment.
    Live,
    /// Not backed up.
    Skip,
}

impl Quiesce {
    pub const NAMES: &'static [&'static str] = &["stop", "live", "skip"];
}

impl FromStr for Quiesce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(Quiesce::Stop),
            "live" => Ok(Quiesce::Live),
            "skip" => Ok(Quiesce::Skip),
            _ => Err(format!("expected \"stop\", \"live\" or \"skip\", found {s:?}")),
        }
    }
}

impl fmt::Display for Quiesce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Quiesce::NAMES[*self as usize])
    }
}

/// Which image this is, how its disk is laid out, and where updates come from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub profile: String,
    pub image: String,
    pub arch: String,
    pub version: Version,
    pub bootloader: Bootloader,
    pub partition_table: PartitionTable,
    pub partitions: Vec<DevicePartition>,
    /// Seconds the health check may take before the boot counts as failed.
    pub health_timeout: u32,
    /// None: the profile has no `[update]`; the agent only reports status.
    pub update: Option<UpdateConfig>,
    /// None: the profile has no `[backup]`.
    #[serde(default)]
    pub backup: Option<BackupConfig>,
    /// None: the profile has no `[network] wifi = true`; the image has no supplicant.
    #[serde(default)]
    pub wifi: Option<WifiConfig>,
    /// What the device watches and where it reports (`[monitor]`; images made before it have
    /// the defaults).
    #[serde(default)]
    pub monitor: MonitorConfig,
}

impl DeviceConfig {
    /// Reads and checks `path` (normally [`DEVICE_CONFIG`]); errors name the file.
    pub fn load(path: &Path) -> Result<DeviceConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        DeviceConfig::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<DeviceConfig, String> {
        let c: DeviceConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut seen = std::collections::HashSet::new();
        for p in &c.partitions {
            if !seen.insert((p.role, p.slot)) {
                let slot = p.slot.map(|s| format!(" for slot {s}")).unwrap_or_default();
                return Err(format!("two {} partitions{slot}", p.role));
            }
            if p.number == 0 {
                return Err(format!("partition {:?} has number 0", p.name));
            }
        }
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a DeviceConfig serialises") + "\n"
    }

    /// The partition with `role` (and `slot`, for slotted ones).
    pub fn partition(&self, role: Role, slot: Option<Slot>) -> Option<&DevicePartition> {
        self.partitions.iter().find(|p| p.role == role && p.slot == slot)
    }

    /// The Linux partition number of a slot's partition with `role`.
    pub fn partition_number(&self, role: Role, slot: Slot) -> Result<u32, String> {
        self.partition(role, Some(slot))
            .map(|p| p.number)
            .ok_or_else(|| format!("{DEVICE_CONFIG}: no {role} partition for slot {slot}"))
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicePartition {
    pub name: String,
    /// Linux partition number (`/dev/sda<number>`, `/dev/mmcblk0p<number>`).
    pub number: u32,
    pub role: Role,
    /// For slotted partitions.
    pub slot: Option<Slot>,
    pub size: u64,
}

/// A device's backup identity (provisioning's `device-id`): 32 lowercase hex digits.
pub fn valid_device_id(id: &str) -> bool {
    id.len() == 32 && id.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// Makes a device id from 16 random bytes.
pub fn device_id_from(bytes: [u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random device id (16 bytes from /dev/urandom, as 32 hex digits).
pub fn new_device_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(device_id_from(bytes))
}

/// A device's provisioned `backup/env`: KEY=VALUE lines for restic (comments with '#', blank lines allowed).
pub fn parse_backup_env(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE, such as RESTIC_REST_USERNAME=device1", i + 1));
        };
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
            return Err(format!(
                "line {}: {k:?} is not an environment variable name (capital letters, digits, '_')",
                i + 1
            ));
        }
        if k == "RESTIC_PASSWORD" || k == "RESTIC_PASSWORD_FILE" || k == "RESTIC_PASSWORD_COMMAND" {
            return Err(format!("line {}: the repository password belongs in backup/password, not {k}", i + 1));
        }
        out.push((k.to_string(), v.trim().trim_matches('"').to_string()));
    }
    Ok(out)
}

/// `[backup]` as the agent runs it: restic against `repository` (or the device's provisioned
/// `backup/repository`), with the password and credentials from the device's provisioning.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// A restic repository: `rest:https://...`, `sftp:user@host:/path`, `s3:...`, or a local path.
    pub repository: String,
    /// Absolute paths on the data partition (`/var/...`), in the order given.
    pub paths: Vec<String>,
    /// restic `--exclude` patterns.
    pub exclude: Vec<String>,
    /// Retention: restic `--keep-<key> <n>` (`last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`).
    pub keep: std::collections::BTreeMap<String, u32>,
    /// The device runs `forget --prune` after scheduled backups. Off for append-only targets,
    /// which a trusted machine prunes.
    pub prune: bool,
    /// `restic check --read-data-subset` of a restore drill ("10%", "1/5", "100%").
    pub check_subset: String,
    /// Alert when the last good backup is older than this.
    pub stale_after_secs: u64,
    pub before_update: BeforeUpdate,
    /// A fresh data partition with credentials restores the latest snapshot at first boot.
    pub self_restore: bool,
    /// How long restic may keep retrying a target that does not answer before the run fails.
    pub retry_secs: u64,
    /// Services whose state is backed up, and how each is made consistent.
    pub services: Vec<BackupService>,
    /// Where alerts are POSTed as plain text when raised and when cleared (ntfy, gotify-compatible
    /// relays, any webhook); None: journal, console and status only.
    #[serde(default)]
    pub alert_url: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackupService {
    pub unit: String,
    pub quiesce: Quiesce,
    /// Its state directory's real path (`/var/lib/private/<name>` with DynamicUser).
    pub path: String,
}

/// Wi-Fi: the networks come from provisioning (`/var/kiln/provision/wifi/*.network`,
/// [`crate::wifi`]); the image knows only where it is used.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WifiConfig {
    /// The regulatory domain (ISO 3166-1 alpha-2, or "00"): which channels and powers are legal.
    pub country: String,
}

/// `[monitor]`: what `kiln-agent monitor` watches, its thresholds, and where it reports. URLs
/// here are the profile's; a device's provisioning (`monitor/push-url`, `alert-url`,
/// `heartbeat-url`, `push-authorization` in [`MONITOR_PROVISION_DIR`]) overrides them, so
/// secrets (a presigned URL, credentials) never need to be in the image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Seconds between looks (the timer), and so the heartbeat's period.
    pub interval_secs: u64,
    /// The data partition's use in percent: a warning at `disk_warn`, an alert at `disk_alert`.
    pub disk_warn: u8,
    pub disk_alert: u8,
    /// The same for its inodes.
    pub inodes_warn: u8,
    pub inodes_alert: u8,
    /// Restarts of one unit within ten minutes (or two looks) that make it crash-looping.
    pub restarts: u32,
    /// A TLS certificate caddy manages that expires within this many days is a warning
    /// (within a third of it, an alert).
    pub cert_days: u32,
    /// A newer release offered by the feed and not installed for this long is an alert.
    pub update_stale_secs: u64,
    /// Failed SSH logins and sudo denials within ten minutes (or two looks) that make an alert.
    pub failed_logins: u32,
    /// A clock not synchronised this long after boot is a warning (time sync switched off: at once).
    pub clock_grace_secs: u64,
    /// Entries kept in the status feed.
    pub history: u32,
    /// HTTP PUT target of `status.atom` after every look (`{hostname}` replaced); the JSON twin
    /// goes to the same URL with `.json` for `.atom`.
    pub push: Option<String>,
    /// Alerts raised and cleared are POSTed here as plain text (ntfy-style).
    pub alert_url: Option<String>,
    /// Fetched after every look while no alert is open (a dead man's switch).
    pub heartbeat_url: Option<String>,
}

/// Where a device's monitor URLs and push credentials are provisioned.
pub const MONITOR_PROVISION_DIR: &str = "/var/kiln/provision/monitor";

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval_secs: 300,
            disk_warn: 85,
            disk_alert: 95,
            inodes_warn: 85,
            inodes_alert: 95,
            restarts: 3,
            cert_days: 14,
            update_stale_secs: 7 * 86400,
            failed_logins: 10,
            clock_grace_secs: 3600,
            history: 200,
            push: None,
            alert_url: None,
            heartbeat_url: None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// The Atom feed people subscribe to; the agent reads `metadata` next to it.
    pub feed: String,
    /// The signed metadata document (default: the feed URL with `.json` for `.atom`/`.rss`).
    pub metadata: String,
    pub channel: String,
    /// ed25519 public keys (hex) any of which may sign the metadata.
    pub public_keys: Vec<String>,
    /// Local time window "HH:MM-HH:MM" in which installs may start (None: any time).
    pub window: Option<String>,
    /// Seconds between checks, and the random delay added to each.
    pub interval_secs: u64,
    pub jitter_secs: u64,
    /// Boots a new version gets to become healthy before the old one boots again (UEFI).
    pub tries: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// device.json as kiln 0.1.0's builder wrote it, before these were types.
    const WRITTEN_BY_0_1: &str = r#"{
  "profile": "ota", "image": "pc-uefi", "arch": "amd64", "version": "0.2.0",
  "bootloader": "systemd-boot", "partition_table": "gpt",
  "partitions": [
    {"name": "esp", "number": 1, "role": "esp", "slot": null, "size": 268435456},
    {"name": "root-a", "number": 2, "role": "root", "slot": "a", "size": 1073741824},
    {"name": "root-b", "number": 3, "role": "root", "slot": "b", "size": 1073741824},
    {"name": "data", "number": 4, "role": "data", "slot": null, "size": 536870912}
  ],
  "health_timeout": 120,
  "update": {"feed": "http://10.0.2.100/stable.atom", "metadata": "http://10.0.2.100/stable.json",
    "channel": "stable", "public_keys": ["ab"], "window": null, "interval_secs": 3600, "jitter_secs": 60, "tries": 3},
  "backup": {"repository": "rest:https://b.example/d", "paths": ["/var/lib/private/syncthing"], "exclude": [],
    "keep": {"daily": 7}, "prune": true, "check_subset": "10%", "stale_after_secs": 172800,
    "before_update": "try", "self_restore": true, "retry_secs": 300,
    "services": [{"unit": "syncthing.service", "quiesce": "stop", "path": "/var/lib/private/syncthing"},
                 {"unit": "caddy.service", "quiesce": "live", "path": "/var/lib/private/caddy"}],
    "alert_url": null}
}"#;

    #[test]
    fn reads_what_older_builders_wrote_and_round_trips() {
        let c = DeviceConfig::parse(WRITTEN_BY_0_1).unwrap();
        assert_eq!(c.bootloader, Bootloader::SystemdBoot);
        assert_eq!(c.partition_table, PartitionTable::Gpt);
        assert_eq!(c.partition(Role::Root, Some(Slot::B)).unwrap().number, 3);
        assert_eq!(c.partition_number(Role::Root, Slot::A).unwrap(), 2);
        assert!(c.partition_number(Role::Boot, Slot::A).unwrap_err().contains("no boot partition for slot a"));
        let b = c.backup.as_ref().unwrap();
        assert_eq!(b.before_update, BeforeUpdate::Try);
        assert_eq!(b.services.iter().map(|s| s.quiesce).collect::<Vec<_>>(), [Quiesce::Stop, Quiesce::Live]);
        assert_eq!(c.monitor, MonitorConfig::default(), "an image made before [monitor] has the defaults");
        let again = DeviceConfig::parse(&c.to_json()).unwrap();
        assert_eq!(again, c);
        // The spelling on disk is unchanged.
        let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(v["bootloader"], "systemd-boot");
        assert_eq!(v["partitions"][1]["slot"], "a");
        assert_eq!(v["backup"]["services"][1]["quiesce"], "live");
    }

    #[test]
    fn every_enum_round_trips_through_its_json_spelling() {
        fn rt<T: Serialize + for<'a> Deserialize<'a> + PartialEq + fmt::Debug>(v: T, spelled: &str) {
            let j = serde_json::to_string(&v).unwrap();
            assert_eq!(j, format!("\"{spelled}\""));
            assert_eq!(serde_json::from_str::<T>(&j).unwrap(), v);
        }
        rt(Slot::A, "a");
        rt(Slot::B, "b");
        rt(Bootloader::SystemdBoot, "systemd-boot");
        rt(Bootloader::RpiFirmware, "rpi-firmware");
        rt(PartitionTable::Gpt, "gpt");
        rt(PartitionTable::Mbr, "mbr");
        for (r, s) in [(Role::Esp, "esp"), (Role::Autoboot, "autoboot"), (Role::Boot, "boot"), (Role::Root, "root")] {
            assert_eq!(r.to_string(), s);
            rt(r, s);
        }
        rt(Role::Data, "data");
        for s in BeforeUpdate::NAMES {
            rt(s.parse::<BeforeUpdate>().unwrap(), s);
        }
        for s in Quiesce::NAMES {
            let q: Quiesce = s.parse().unwrap();
            assert_eq!(q.to_string(), *s);
            rt(q, s);
        }
        assert_eq!(Slot::parse(&(!Slot::A).to_string()), Some(Slot::B));
        assert!("sometimes".parse::<BeforeUpdate>().unwrap_err().contains("\"require\", \"try\" or \"off\""));
        assert!("pause".parse::<Quiesce>().is_err());
    }

    #[test]
    fn refuses_unknown_values_and_ambiguous_layouts() {
        let bad = WRITTEN_BY_0_1.replace("\"systemd-boot\"", "\"grub\"");
        assert!(DeviceConfig::parse(&bad).unwrap_err().contains("unknown variant `grub`"));
        let twice = WRITTEN_BY_0_1.replace(
            "\"number\": 3, \"role\": \"root\", \"slot\": \"b\"",
            "\"number\": 3, \"role\": \"root\", \"slot\": \"a\"",
        );
        assert_eq!(DeviceConfig::parse(&twice).unwrap_err(), "two root partitions for slot a");
    }

    #[test]
    fn backup_env_lines() {
        assert_eq!(
            parse_backup_env("# c\n\nRESTIC_REST_USERNAME=\"dev1\"\n").unwrap(),
            [("RESTIC_REST_USERNAME".to_string(), "dev1".to_string())]
        );
        assert!(parse_backup_env("RESTIC_PASSWORD=x").unwrap_err().contains("backup/password"));
        assert!(parse_backup_env("lower=x").is_err());
        assert!(parse_backup_env("novalue").is_err());
    }
}
