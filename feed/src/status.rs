//! A device's status feed: what its agent saw, as events. The agent (`kiln-agent monitor`) writes
//! it to `/var/lib/kiln-agent/status.json` and renders the same record as Atom
//! (`status.atom`, [`atom`]) for people and feed readers; both are pushed where the profile's
//! `[monitor] push` says. `kiln status` reads the JSON twin.
//!
//! Reading is lenient (unknown fields are ignored, missing optional ones default) so a `kiln
//! status` reads feeds of agents older and newer than itself; `format` changes only when a
//! field changes its meaning.

use crate::render::xml_escape;
use crate::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The status feed format this code writes.
pub const STATUS_FORMAT: u32 = 1;

/// A device's status: who it is, what it looks like now, and what changed lately.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatusFeed {
    pub format: u32,
    pub device: DeviceInfo,
    /// When the agent last looked (every monitor run, healthy or not).
    pub updated: Timestamp,
    /// Seconds between the agent's looks: a feed not updated for [`SILENT_AFTER_INTERVALS`] of
    /// them belongs to a device that is off, wedged or cut off.
    pub interval_secs: u64,
    pub summary: Summary,
    /// Conditions raised and not cleared yet, oldest first.
    #[serde(default)]
    pub open: Vec<Event>,
    /// State changes and notices, newest first, bounded (the profile's `[monitor] history`).
    #[serde(default)]
    pub events: Vec<Event>,
    /// The data partition's use over time, oldest first, bounded.
    #[serde(default)]
    pub samples: Vec<Sample>,
}

/// A feed is silent once it was not updated for this many of its intervals.
pub const SILENT_AFTER_INTERVALS: u64 = 3;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DeviceInfo {
    pub hostname: String,
    /// The device's id (32 hex digits), when it has one (provisioned or made by its first backup).
    #[serde(default)]
    pub device_id: Option<String>,
    pub profile: String,
    pub image: String,
    pub arch: String,
    /// The running release.
    pub version: String,
    /// The update channel (None: the profile has no `[update]`).
    #[serde(default)]
    pub channel: Option<String>,
    /// When this boot started.
    #[serde(default)]
    pub booted: Option<Timestamp>,
}

/// The figures `kiln status` puts in its table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Summary {
    /// One line: "up to date", "installing 0.3.0", "0.3.0 on trial", "0.3.0 failed, running 0.2.0".
    pub update: String,
    /// The last update check that read the feed.
    #[serde(default)]
    pub last_check: Option<Timestamp>,
    /// The newest release of the device's profile the feed offered, when newer than the running one.
    #[serde(default)]
    pub available: Option<String>,
    /// The last good backup (None: none yet, or no `[backup]`).
    #[serde(default)]
    pub last_good_backup: Option<Timestamp>,
    #[serde(default)]
    pub backup_configured: bool,
    /// The data partition: share of bytes and of inodes in use, in percent.
    #[serde(default)]
    pub data_used_percent: Option<f64>,
    #[serde(default)]
    pub data_inodes_percent: Option<f64>,
    #[serde(default)]
    pub clock_synchronised: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at: Timestamp,
    pub data_used_percent: f64,
}

/// One entry: a condition raised or cleared, or a one-off notice (a login, an unclean shutdown).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique within the device's feed.
    pub id: String,
    /// What the condition is about; a raise and its clearing share it ("disk:/var", "unit:x.service").
    pub key: String,
    pub kind: EventKind,
    pub severity: Severity,
    /// When this entry was made.
    pub at: Timestamp,
    /// Since when the condition holds (a clearing: since when it had held).
    pub since: Timestamp,
    /// One line: what happened.
    pub title: String,
    /// More of what was seen (figures, the unit's last state, the reason given).
    #[serde(default)]
    pub detail: String,
    /// What the owner should do (empty for a clearing or a notice that needs nothing).
    #[serde(default)]
    pub what_to_do: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Raised,
    Cleared,
    Notice,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Alert,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Alert => "alert",
        })
    }
}

impl Event {
    /// The entry's title as feeds and alert messages show it: "ALERT: disk ...", "cleared: ...".
    pub fn headline(&self) -> String {
        match (self.kind, self.severity) {
            (EventKind::Cleared, _) => format!("cleared: {}", self.title),
            (_, Severity::Alert) => format!("ALERT: {}", self.title),
            (_, Severity::Warning) => format!("warning: {}", self.title),
            (_, Severity::Info) => self.title.clone(),
        }
    }

    /// Plain text: the headline, then since when, the detail and what to do, one per line.
    pub fn text(&self) -> String {
        let mut t = self.headline();
        let since = if self.kind == EventKind::Cleared { "had held since" } else { "since" };
        t.push_str(&format!("\n{since} {}", self.since));
        if !self.detail.is_empty() {
            t.push_str(&format!("\n{}", self.detail));
        }
        if !self.what_to_do.is_empty() {
            t.push_str(&format!("\nwhat to do: {}", self.what_to_do));
        }
        t
    }
}

impl StatusFeed {
    /// Reads a status feed's JSON (errors say what is wrong, not where: the caller names the source).
    pub fn parse(text: &str) -> Result<StatusFeed, String> {
        let f: StatusFeed = serde_json::from_str(text).map_err(|e| format!("not a kiln status feed: {e}"))?;
        if f.format != STATUS_FORMAT {
            return Err(format!("status feed format {} (this kiln reads format {STATUS_FORMAT})", f.format));
        }
        Ok(f)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a status feed serialises") + "\n"
    }

    /// The device's name in tables and pages: its hostname, or its id.
    pub fn name(&self) -> &str {
        if self.device.hostname.is_empty() {
            self.device.device_id.as_deref().unwrap_or("?")
        } else {
            &self.device.hostname
        }
    }

    /// Whether the device has not updated its feed for [`SILENT_AFTER_INTERVALS`] intervals
    /// (or `silent_after` seconds, when given) at `now`.
    pub fn silent(&self, now: Timestamp, silent_after: Option<u64>) -> bool {
        let limit = silent_after.unwrap_or(self.interval_secs.max(1).saturating_mul(SILENT_AFTER_INTERVALS));
        now.0.saturating_sub(self.updated.0) > limit
    }
}

/// The JSON twin of a status feed's URL or file name: `.atom` at the end of the path becomes
/// `.json` (a query, such as a presigned URL's, is kept). None: it does not end in `.atom`.
pub fn json_twin(url: &str) -> Option<String> {
    let (path, query) = url.split_once('?').map_or((url, None), |(p, q)| (p, Some(q)));
    let stem = path.strip_suffix(".atom")?;
    Some(match query {
        Some(q) => format!("{stem}.json?{q}"),
        None => format!("{stem}.json"),
    })
}

/// The feed's stable id: by device id when there is one (a renamed device keeps its feed).
fn feed_id(f: &StatusFeed) -> String {
    match &f.device.device_id {
        Some(id) => format!("urn:kiln:device:{id}"),
        None => format!("urn:kiln:host:{}", f.device.hostname),
    }
}

/// Atom 1.0: one entry per event, newest first; `self_url` is where the feed is published
/// (None: only on the device).
pub fn atom(f: &StatusFeed, self_url: Option<&str>) -> String {
    let id = feed_id(f);
    let mut x =
        String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<feed xmlns=\"http://www.w3.org/2005/Atom\">\n");
    x.push_str(&format!(
        "  <id>{}</id>\n  <title>{}: status</title>\n  <updated>{}</updated>\n",
        xml_escape(&id),
        xml_escape(f.name()),
        f.updated
    ));
    x.push_str(&format!(
        "  <subtitle>{} {} on {} ({}): {}; {} open</subtitle>\n",
        xml_escape(&f.device.profile),
        xml_escape(&f.device.version),
        xml_escape(&f.device.image),
        xml_escape(&f.device.arch),
        xml_escape(&f.summary.update),
        f.open.len()
    ));
    if let Some(u) = self_url {
        x.push_str(&format!("  <link rel=\"self\" type=\"application/atom+xml\" href=\"{}\"/>\n", xml_escape(u)));
    }
    x.push_str(&format!(
        "  <author><name>{}</name></author>\n  <generator>kiln-agent</generator>\n",
        xml_escape(f.name())
    ));
    for e in &f.events {
        x.push_str("  <entry>\n");
        x.push_str(&format!("    <id>{}:{}</id>\n", xml_escape(&id), xml_escape(&e.id)));
        x.push_str(&format!("    <title>{}</title>\n", xml_escape(&e.headline())));
        x.push_str(&format!("    <updated>{}</updated>\n", e.at));
        x.push_str(&format!(
            "    <category term=\"{}\" label=\"{}\"/>\n",
            xml_escape(&format!("{:?}", e.kind).to_lowercase()),
            e.severity
        ));
        let mut h = format!(
            "<p><b>{}</b></p><p>{} {}.</p>",
            xml_escape(&e.headline()),
            if e.kind == EventKind::Cleared { "Had held since" } else { "Since" },
            e.since
        );
        if !e.detail.is_empty() {
            h.push_str(&format!("<p>{}</p>", xml_escape(&e.detail)));
        }
        if !e.what_to_do.is_empty() {
            h.push_str(&format!("<p>What to do: {}</p>", xml_escape(&e.what_to_do)));
        }
        x.push_str(&format!("    <content type=\"html\">{}</content>\n", xml_escape(&h)));
        x.push_str("  </entry>\n");
    }
    x.push_str("</feed>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn example() -> StatusFeed {
        let ev = |id: &str, kind, severity, at, title: &str| Event {
            id: id.into(),
            key: "disk:/var".into(),
            kind,
            severity,
            at: Timestamp(at),
            since: Timestamp(1000),
            title: title.into(),
            detail: "96 % of 1.0 GiB used <tmp & logs>".into(),
            what_to_do: "free space on /var".into(),
        };
        let raised = ev("2-1", EventKind::Raised, Severity::Alert, 1000, "/var is 96 % full");
        StatusFeed {
            format: STATUS_FORMAT,
            device: DeviceInfo {
                hostname: "home".into(),
                device_id: Some("00112233445566778899aabbccddeeff".into()),
                profile: "home".into(),
                image: "pc-uefi".into(),
                arch: "amd64".into(),
                version: "0.2.0".into(),
                channel: Some("stable".into()),
                booted: Some(Timestamp(900)),
            },
            updated: Timestamp(1300),
            interval_secs: 300,
            summary: Summary { update: "up to date".into(), data_used_percent: Some(96.0), ..Default::default() },
            open: vec![raised.clone()],
            events: vec![raised],
            samples: vec![Sample { at: Timestamp(1000), data_used_percent: 96.0 }],
        }
    }

    #[test]
    fn round_trips_and_reads_leniently() {
        let f = example();
        assert_eq!(StatusFeed::parse(&f.to_json()).unwrap(), f);
        // A newer agent's extra field does not stop an older kiln status.
        let newer = f.to_json().replacen("\"format\": 1,", "\"format\": 1, \"battery\": 3,", 1);
        assert_eq!(StatusFeed::parse(&newer).unwrap(), f);
        let bumped = f.to_json().replacen("\"format\": 1,", "\"format\": 2,", 1);
        assert!(StatusFeed::parse(&bumped).unwrap_err().contains("format 2"));
        assert!(StatusFeed::parse("{}").unwrap_err().starts_with("not a kiln status feed"));
    }

    #[test]
    fn the_json_twin_keeps_a_query() {
        assert_eq!(json_twin("https://d/k/home.atom").as_deref(), Some("https://d/k/home.json"));
        assert_eq!(json_twin("https://s3/b/h.atom?X-Sig=a.atom").as_deref(), Some("https://s3/b/h.json?X-Sig=a.atom"));
        assert_eq!(json_twin("feeds/home.json"), None);
    }

    #[test]
    fn silence_is_three_intervals_unless_told() {
        let f = example();
        assert!(!f.silent(Timestamp(1300 + 900), None));
        assert!(f.silent(Timestamp(1300 + 901), None));
        assert!(f.silent(Timestamp(1300 + 61), Some(60)));
        let hostile = StatusFeed { interval_secs: u64::MAX, ..f };
        assert!(!hostile.silent(Timestamp(u64::MAX), None), "no overflow");
    }

    #[test]
    fn atom_escapes_and_says_what_to_do() {
        let x = atom(&example(), Some("https://dav.example/home.atom?a=1&b=2"));
        assert!(x.contains("<title>ALERT: /var is 96 % full</title>"), "{x}");
        assert!(x.contains("href=\"https://dav.example/home.atom?a=1&amp;b=2\""), "{x}");
        assert!(x.contains("&amp;lt;tmp &amp;amp; logs&amp;gt;"), "the detail is escaped inside escaped HTML: {x}");
        assert!(x.contains("What to do: free space on /var"), "{x}");
        assert!(x.contains("<id>urn:kiln:device:00112233445566778899aabbccddeeff:2-1</id>"), "{x}");
        let e = &example().events[0];
        assert_eq!(
            e.text(),
            "ALERT: /var is 96 % full\nsince 1970-01-01T00:16:40Z\n96 % of 1.0 GiB used <tmp & logs>\nwhat to do: free space on /var"
        );
    }
}
