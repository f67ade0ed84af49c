//! kiln's release feed, shared by the builder (`kiln publish`) and the device (`kiln-agent`).
//!
//! A channel is published as four files next to each other:
//! - `<channel>.json`: the release [`Metadata`] the device acts on (newest release first),
//! - `<channel>.json.sig`: its ed25519 signature (see `sign`),
//! - `<channel>.atom` and `<channel>.rss`: the same releases for people and feed readers.
//!
//! Artifacts are stored by content: `artifacts/<sha256>`, URLs relative to the metadata file.

pub mod render;
pub mod sign;

pub use sign::{sign, verify, KeyError, PublicKey, SecretKey, SignatureError};

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metadata format this code reads and writes.
pub const FORMAT: u32 = 1;

/// A release version: dot-separated unsigned numbers ("0.2.0", "2026.11.3"), compared
/// numerically part by part; missing parts count as 0, so "1.2" == "1.2.0".
#[derive(Clone, Debug, Eq)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Result<Vec<u64>, _> = s
            .split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    Err(())
                } else {
                    p.parse::<u64>().map_err(|_| ())
                }
            })
            .collect();
        match parts {
            Ok(parts) if !parts.is_empty() => Ok(Version { parts, text: s.to_string() }),
            _ => Err(format!("version {s:?} is not dot-separated numbers such as \"1.4.0\"")),
        }
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.parts.len().max(other.parts.len());
        (0..n)
            .map(|i| self.parts.get(i).unwrap_or(&0).cmp(other.parts.get(i).unwrap_or(&0)))
            .find(|o| *o != Ordering::Equal)
            .unwrap_or(Ordering::Equal)
    }
}
impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}
impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A point in time, whole seconds since the Unix epoch, written as RFC 3339 UTC
/// ("2026-11-22T03:00:00Z") in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
    }
    pub fn rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.0)).to_string()
    }
}
impl FromStr for Timestamp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = humantime::parse_rfc3339(s)
            .map_err(|e| format!("time {s:?} is not RFC 3339 UTC (\"2026-11-22T03:00:00Z\"): {e}"))?;
        Ok(Timestamp(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)))
    }
}
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}
impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The signed document a device acts on: every release of one channel, newest first.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format: u32,
    pub channel: String,
    /// When this document was written.
    pub generated: Timestamp,
    /// After this time a device refuses the document (a stale feed replayed by an attacker
    /// cannot hold devices on old software forever). Re-publish before then.
    pub expires: Timestamp,
    pub releases: Vec<Release>,
}

/// One image version of one profile for one kind of hardware.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: Version,
    pub published: Timestamp,
    /// The profile it was built from ("home").
    pub profile: String,
    /// The image (board) definition ("pc-uefi", "rpi4"); a device installs only its own.
    pub image: String,
    /// Debian architecture ("amd64", "arm64").
    pub arch: String,
    /// dm-verity root hash of the root artifact.
    pub root_hash: String,
    pub artifacts: Vec<Artifact>,
    /// Package changes since the previous release of the channel.
    #[serde(default)]
    pub changelog: Vec<Change>,
    /// Free text from the publisher (`kiln publish --notes`).
    #[serde(default)]
    pub notes: String,
}

impl Release {
    pub fn artifact(&self, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// Unified kernel image (UEFI): goes to the ESP as `EFI/Linux/kiln-<version>+3.efi`.
    Uki,
    /// The root partition image (EROFS + dm-verity hash tree): written raw into the other root slot.
    Root,
    /// The Raspberry Pi boot partition (FAT): written raw into the other boot slot, whose
    /// `cmdline.txt` the agent then points at the matching root slot.
    Boot,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// The file's name in the build output ("root.img", "kiln-0.2.0.efi").
    pub name: String,
    /// Relative to the metadata document's URL (normally "artifacts/<sha256>").
    pub url: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// One package difference between two releases.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub package: String,
    /// None: added.
    pub from: Option<String>,
    /// None: removed.
    pub to: Option<String>,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.from, &self.to) {
            (None, Some(to)) => write!(f, "{} {} (new)", self.package, to),
            (Some(from), None) => write!(f, "{} {} (removed)", self.package, from),
            (Some(from), Some(to)) => write!(f, "{} {} -> {}", self.package, from, to),
            (None, None) => write!(f, "{}", self.package),
        }
    }
}

/// Resolves an artifact URL against the metadata document's URL.
pub fn join_url(metadata_url: &str, relative: &str) -> String {
    if relative.contains("://") {
        return relative.to_string();
    }
    match metadata_url.rfind('/') {
        Some(i) => format!("{}/{}", &metadata_url[..i], relative.trim_start_matches('/')),
        None => relative.to_string(),
    }
}

/// The metadata URL a feed URL stands for: `stable.atom` or `stable.rss` -> `stable.json`.
pub fn metadata_url(feed_url: &str) -> String {
    for ext in [".atom", ".rss", ".xml"] {
        if let Some(base) = feed_url.strip_suffix(ext) {
            return format!("{base}.json");
        }
    }
    feed_url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("0.10.0") > v("0.9.9"));
        assert!(v("1.2") == v("1.2.0"));
        assert!(v("2026.11.3") > v("2026.11"));
        assert!("1.x".parse::<Version>().is_err());
        assert!("".parse::<Version>().is_err());
        assert!("1..2".parse::<Version>().is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        let t: Timestamp = "2026-11-22T03:00:00Z".parse().unwrap();
        assert_eq!(t.0, 1795316400);
        assert_eq!(t.rfc3339(), "2026-11-22T03:00:00Z");
    }

    #[test]
    fn urls_resolve() {
        assert_eq!(metadata_url("https://u.example/stable.atom"), "https://u.example/stable.json");
        assert_eq!(join_url("http://10.0.2.100/ch/stable.json", "artifacts/ab"), "http://10.0.2.100/ch/artifacts/ab");
    }
}

/// What the builder bakes into every image as `/usr/lib/kiln/device.json` (see `DEVICE_CONFIG`)
/// and the agent reads: which image this is, how its disk is laid out, and where updates come from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub profile: String,
    pub image: String,
    pub arch: String,
    pub version: Version,
    /// "systemd-boot" (UEFI: UKIs with boot counting) or "rpi-firmware" (autoboot.txt + tryboot).
    pub bootloader: String,
    /// "gpt" or "mbr".
    pub partition_table: String,
    pub partitions: Vec<DevicePartition>,
    /// Seconds the health check may take before the boot counts as failed.
    pub health_timeout: u32,
    /// None: the profile has no `[update]`; the agent only reports status.
    pub update: Option<UpdateConfig>,
    /// None: the profile has no `[backup]`.
    #[serde(default)]
    pub backup: Option<BackupConfig>,
}

pub const DEVICE_CONFIG: &str = "/usr/lib/kiln/device.json";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicePartition {
    pub name: String,
    /// Linux partition number (`/dev/sda<number>`, `/dev/mmcblk0p<number>`).
    pub number: u32,
    /// "esp", "autoboot", "boot", "root", "data".
    pub role: String,
    /// "a" or "b" for slotted partitions.
    pub slot: Option<String>,
    pub size: u64,
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
    /// Before an update is installed: "require" (no backup, no install), "try", "off".
    pub before_update: String,
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
    /// "stop" (stopped for the backup, started again after) or "live".
    pub quiesce: String,
    /// Its state directory's real path (`/var/lib/private/<name>` with DynamicUser).
    pub path: String,
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
