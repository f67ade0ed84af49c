//! kiln's release feed, shared by the builder (`kiln publish`) and the device (`kiln-agent`).
//!
//! A channel is published as four files next to each other:
//! - `<channel>.json`: the release [`Metadata`] the device acts on (newest release first),
//! - `<channel>.json.sig`: its ed25519 signature (see `sign`),
//! - `<channel>.atom` and `<channel>.rss`: the same releases for people and feed readers.
//!
//! Artifacts are stored by content: `artifacts/<sha256>`, URLs relative to the metadata file.

pub mod delta;
pub mod render;
pub mod sign;
pub mod status;

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
///
/// How the format evolves: fields are only ever added, optional, and inside the signature;
/// readers ignore fields they do not know (no `deny_unknown_fields` on this document's types),
/// so an agent reads documents of later publishers. `format` changes only when a field changes
/// its meaning; then the publisher keeps a bridge: the previous format's document beside the
/// new one until every device runs an agent that reads both. (Agents built before this rule,
/// kiln's first ones, refuse unknown fields: `kiln publish --security` adds one.)
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
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
    /// The release fixes security problems (`kiln publish --security`): a device that has not
    /// installed it says so in its status feed. Written only when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub security: bool,
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

/// One file of a release (read leniently, as [`Metadata`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Artifact {
    pub kind: ArtifactKind,
    /// The file's name in the build output ("root.img", "kiln-0.2.0.efi").
    pub name: String,
    /// Relative to the metadata document's URL (normally "artifacts/<sha256>").
    pub url: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// The artifact's chunk index and pack ([`delta`]), for a device that fetches only what it
    /// does not have. Absent: a full download (releases published before deltas existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
}

/// Where an artifact's chunks are (the first field added to the format, issue 19). The index's
/// size and sha256 are signed with the metadata, and bind every chunk.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Delta {
    /// The index's head (`delta::Head`), relative to the metadata document's URL (normally
    /// "chunks/<artifact sha256>.index").
    pub index: String,
    pub index_size: u64,
    /// Lower-case hex.
    pub index_sha256: String,
    /// The index's entries (normally "chunks/<artifact sha256>.leaves"), each group checked
    /// against the head.
    pub leaves: String,
    pub leaves_size: u64,
    /// Relative to the metadata document's URL (normally "chunks/<artifact sha256>.pack").
    pub pack: String,
    pub pack_size: u64,
}

/// One package difference between two releases (read leniently, as [`Metadata`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
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
    fn later_publishers_fields_are_ignored_and_security_is_written_only_when_set() {
        let doc = r#"{"format": 1, "channel": "stable", "generated": "2026-12-01T00:00:00Z",
            "expires": "2026-12-31T00:00:00Z", "deltas": {"chunked": true},
            "releases": [{"version": "0.2.0", "published": "2026-12-01T00:00:00Z", "profile": "p",
              "image": "pc-uefi", "arch": "amd64", "root_hash": "00", "security": true, "mirror": "x",
              "artifacts": [{"kind": "root", "name": "root.img", "url": "artifacts/ab", "size": 1,
                "sha256": "ab", "chunks": "artifacts/ab.idx"}],
              "changelog": [{"package": "zstd", "from": "1", "to": "2", "urgency": "high"}]}]}"#;
        let m: Metadata = serde_json::from_str(doc).unwrap();
        assert!(m.releases[0].security);
        assert_eq!(m.releases[0].artifacts[0].size, 1);
        let mut r = m.releases[0].clone();
        r.security = false;
        assert!(!serde_json::to_string(&r).unwrap().contains("security"), "an old agent reads what this writes");
    }

    #[test]
    fn urls_resolve() {
        assert_eq!(metadata_url("https://u.example/stable.atom"), "https://u.example/stable.json");
        assert_eq!(join_url("http://10.0.2.100/ch/stable.json", "artifacts/ab"), "http://10.0.2.100/ch/artifacts/ab");
    }
}
