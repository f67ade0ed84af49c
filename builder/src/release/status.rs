//! `kiln status`: what the devices' status feeds say (`kiln_feed::status`), read from URLs,
//! files or directories, shown as a table (a terminal, a cron mail), as JSON (scripts) or as one
//! static HTML page. A feed holds whatever was written where the device pushes it: every string
//! from it is escaped in the page and stripped of control characters in the table, and a feed
//! larger than [`FEED_LIMIT`] is refused.

use crate::debian::{FetchConfig, Fetcher};
use kiln_feed::render::xml_escape;
use kiln_feed::status::{Event, EventKind, Sample, Severity, StatusFeed};
use kiln_feed::{Metadata, Timestamp, Version};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest status feed read (its events and samples are bounded by the device's profile).
pub const FEED_LIMIT: u64 = 1 << 20;
/// The largest release metadata read (as the agent allows).
pub const METADATA_LIMIT: u64 = 4 << 20;
/// Feeds fetched at the same time.
const PARALLEL_FETCHES: usize = 8;

/// A device's feed and where it was read.
#[derive(Clone, Debug)]
pub struct Device {
    pub source: String,
    pub feed: StatusFeed,
}

/// A source, or a file of a directory source, and what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub source: String,
    pub reason: String,
}

/// What reading the sources gave.
#[derive(Debug, Default)]
pub struct Reading {
    pub devices: Vec<Device>,
    /// Sources that could not be read, or are not status feeds this kiln reads.
    pub failed: Vec<Note>,
    /// JSON files of a directory that are not status feeds (release metadata, other records).
    pub skipped: Vec<Note>,
}

fn note(source: impl Into<String>, reason: impl Into<String>) -> Note {
    Note { source: source.into(), reason: reason.into() }
}

fn is_url(s: &str) -> bool {
    s.contains("://")
}

/// A device pushes `NAME.atom` and its JSON twin `NAME.json`: the twin is what is read.
fn json_twin(url: &str) -> String {
    kiln_feed::status::json_twin(url).unwrap_or_else(|| url.to_string())
}

/// Reads every source, in the order given (a directory's feeds in the order of their names):
/// an http(s) URL (`NAME.atom` stands for `NAME.json`), a file (`NAME.json`, or `NAME.atom` for
/// the `NAME.json` beside it) or a directory (each `*.json` in it that is a status feed).
pub fn read(sources: &[String]) -> Reading {
    let urls: Vec<String> = sources.iter().filter(|s| is_url(s)).map(|s| json_twin(s)).collect();
    let mut fetched = fetch_all(&urls, FEED_LIMIT).into_iter().zip(urls);
    let mut r = Reading::default();
    for source in sources {
        if is_url(source) {
            let (body, url) = fetched.next().expect("one fetch per URL");
            match body.and_then(|b| parse_feed(&b)) {
                Ok(feed) => r.devices.push(Device { source: url, feed }),
                Err(reason) => r.failed.push(note(url, reason)),
            }
        } else {
            read_path(source, &mut r);
        }
    }
    r
}

/// GETs every URL, [`PARALLEL_FETCHES`] at a time (a device that is off costs one timeout, not
/// one per device after it); the results in the order of `urls`.
fn fetch_all(urls: &[String], limit: u64) -> Vec<Result<Vec<u8>, String>> {
    if urls.is_empty() {
        return Vec::new();
    }
    let config = FetchConfig { connect_timeout: Duration::from_secs(10), timeout: Duration::from_secs(20) };
    let fetcher = match Fetcher::new(config) {
        Ok(f) => f,
        Err(e) => return urls.iter().map(|_| Err(e.to_string())).collect(),
    };
    let fetch = |url: &str| {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("only http:// and https:// URLs are read".to_string());
        }
        fetcher.file(url, limit).map_err(|e| e.to_string())
    };
    let mut out = Vec::with_capacity(urls.len());
    for chunk in urls.chunks(PARALLEL_FETCHES) {
        std::thread::scope(|s| {
            let running: Vec<_> = chunk.iter().map(|u| s.spawn(|| fetch(u))).collect();
            for t in running {
                out.push(t.join().unwrap_or_else(|_| Err("fetching it panicked".to_string())));
            }
        });
    }
    out
}

fn parse_feed(bytes: &[u8]) -> Result<StatusFeed, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    StatusFeed::parse(text)
}

/// Reads a file of at most `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len > limit {
        return Err(format!("{len} bytes, more than the {limit} read"));
    }
    let mut data = Vec::new();
    f.take(limit + 1).read_to_end(&mut data).map_err(|e| e.to_string())?;
    if data.len() as u64 > limit {
        return Err(format!("more than the {limit} bytes read"));
    }
    Ok(data)
}

fn read_path(source: &str, r: &mut Reading) {
    let path = Path::new(source);
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return r.failed.push(note(source, e.to_string())),
    };
    if meta.is_dir() {
        return read_dir(path, r);
    }
    let path = if path.extension().is_some_and(|x| x == "atom") { path.with_extension("json") } else { path.into() };
    let shown = path.display().to_string();
    match read_limited(&path, FEED_LIMIT).and_then(|b| parse_feed(&b)) {
        Ok(feed) => r.devices.push(Device { source: shown, feed }),
        Err(reason) => r.failed.push(note(shown, reason)),
    }
}

/// Every `*.json` in `dir`: a document with a `device` is meant as a status feed (one that does
/// not parse is a failure, a torn upload for example); other JSON is skipped.
fn read_dir(dir: &Path, r: &mut Reading) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return r.failed.push(note(dir.display().to_string(), e.to_string())),
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.ends_with(".json") && !name.starts_with('.') && p.is_file()
        })
        .collect();
    files.sort();
    let (devices, failed, skipped) = (r.devices.len(), r.failed.len(), r.skipped.len());
    for path in files {
        let shown = path.display().to_string();
        let bytes = match read_limited(&path, FEED_LIMIT) {
            Ok(b) => b,
            Err(reason) => {
                r.failed.push(note(shown, reason));
                continue;
            }
        };
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Err(e) => r.failed.push(note(shown, format!("not JSON: {e}"))),
            Ok(v) if v.get("device").is_none() => r.skipped.push(note(shown, "not a kiln status feed")),
            Ok(_) => match parse_feed(&bytes) {
                Ok(feed) => r.devices.push(Device { source: shown, feed }),
                Err(reason) => r.failed.push(note(shown, reason)),
            },
        }
    }
    if r.devices.len() == devices && r.failed.len() == failed {
        let others = r.skipped.len() - skipped;
        let why = if others == 0 {
            "no *.json status feeds in it".to_string()
        } else {
            format!("no status feeds in it ({others} other JSON file(s) skipped)")
        };
        r.failed.push(note(dir.display().to_string(), why));
    }
}

/// A release channel's metadata (`CHANNEL.json`, or the `.atom`/`.rss` URL or file standing for
/// it), for display only: its signature is not checked here.
pub fn read_release_feed(source: &str) -> Result<Metadata, Note> {
    let at = kiln_feed::metadata_url(source);
    let bytes = if is_url(&at) {
        fetch_all(std::slice::from_ref(&at), METADATA_LIMIT).remove(0)
    } else {
        read_limited(Path::new(&at), METADATA_LIMIT)
    };
    let bytes = bytes.map_err(|reason| note(&at, reason))?;
    serde_json::from_slice(&bytes).map_err(|e| note(&at, format!("not a kiln release feed's metadata: {e}")))
}

/// The newest release in `m` for the device's profile, image and architecture (and channel,
/// when the device follows one) that is newer than what it runs.
pub fn behind(f: &StatusFeed, m: &Metadata) -> Option<Version> {
    let d = &f.device;
    if d.channel.as_ref().is_some_and(|c| *c != m.channel) {
        return None;
    }
    let running: Version = d.version.parse().ok()?;
    m.releases
        .iter()
        .filter(|r| r.profile == d.profile && r.image == d.image && r.arch == d.arch && r.version > running)
        .map(|r| r.version.clone())
        .max()
}

/// How a device is, worst first: a silent device's feed is stale, whatever it last said.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Silent,
    Alert,
    Warning,
    Fine,
}

impl State {
    pub fn label(self) -> &'static str {
        match self {
            State::Silent => "silent",
            State::Alert => "alert",
            State::Warning => "warning",
            State::Fine => "fine",
        }
    }
}

/// One device as `kiln status --json` prints it (these names are kept stable).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct DeviceReport {
    /// Its hostname, or its id.
    pub name: String,
    /// Where its feed was read (a URL or a file).
    pub source: String,
    pub device_id: Option<String>,
    pub profile: String,
    pub image: String,
    pub arch: String,
    /// The running release.
    pub version: String,
    pub channel: Option<String>,
    /// When the device last wrote its feed.
    pub last_seen: Timestamp,
    /// Not updated for three of its monitor intervals (or `--silent-after`).
    pub silent: bool,
    /// "fine", "warning" (open warnings only), "alert" (an open alert) or "silent".
    pub state: State,
    /// The device's one-line update state ("up to date", "0.3.0 on trial").
    pub update: String,
    /// The newest release for this device that it does not run: from `--feed`, else what the
    /// device's own last check saw. Null: none known.
    pub behind: Option<String>,
    pub backup_configured: bool,
    /// Null: no good backup yet (or none configured).
    pub last_good_backup: Option<Timestamp>,
    /// The data partition's use.
    pub data_used_percent: Option<f64>,
    /// The open alerts and warnings, oldest first.
    pub open: Vec<OpenEvent>,
    /// The data partition's use over time (the page's chart; not in the JSON).
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct OpenEvent {
    pub title: String,
    pub severity: Severity,
    pub since: Timestamp,
    pub detail: String,
    pub what_to_do: String,
}

/// Whether an open event counts: raised alerts and warnings (the count of the ALERTS column
/// and the exit status read only the alerts).
fn counts(e: &Event) -> bool {
    e.kind == EventKind::Raised && e.severity >= Severity::Warning
}

/// What `kiln status` says about one device at `now`.
pub fn report(d: &Device, release: Option<&Metadata>, now: Timestamp, silent_after: Option<u64>) -> DeviceReport {
    let f = &d.feed;
    let silent = f.silent(now, silent_after);
    let open: Vec<OpenEvent> = f
        .open
        .iter()
        .filter(|e| counts(e))
        .map(|e| OpenEvent {
            title: e.title.clone(),
            severity: e.severity,
            since: e.since,
            detail: e.detail.clone(),
            what_to_do: e.what_to_do.clone(),
        })
        .collect();
    let state = if silent {
        State::Silent
    } else if open.iter().any(|e| e.severity == Severity::Alert) {
        State::Alert
    } else if open.is_empty() {
        State::Fine
    } else {
        State::Warning
    };
    let behind = match release {
        Some(m) => behind(f, m).map(|v| v.to_string()),
        None => f.summary.available.clone(),
    };
    DeviceReport {
        name: f.name().to_string(),
        source: d.source.clone(),
        device_id: f.device.device_id.clone(),
        profile: f.device.profile.clone(),
        image: f.device.image.clone(),
        arch: f.device.arch.clone(),
        version: f.device.version.clone(),
        channel: f.device.channel.clone(),
        last_seen: f.updated,
        silent,
        state,
        update: f.summary.update.clone(),
        behind,
        backup_configured: f.summary.backup_configured,
        last_good_backup: f.summary.last_good_backup,
        data_used_percent: f.summary.data_used_percent.filter(|p| p.is_finite()),
        open,
        samples: f.samples.clone(),
    }
}

/// 0: every device is fine (warnings included); 1: a device has an open alert or is silent;
/// 2: a source could not be read (whatever the others say: the picture is incomplete).
pub fn exit_code(reports: &[DeviceReport], failed: &[Note]) -> u8 {
    if !failed.is_empty() {
        2
    } else if reports.iter().any(|r| matches!(r.state, State::Silent | State::Alert)) {
        1
    } else {
        0
    }
}

/// "45s", "12m", "5h", "3d": the coarse age a table needs.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn ago(now: Timestamp, t: Timestamp) -> String {
    format!("{} ago", age(now.0.saturating_sub(t.0)))
}

/// Text for a terminal: control characters (escape sequences) and bidirectional overrides in
/// a feed's strings become `?`.
pub fn plain(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') { '?' } else { c })
        .collect()
}

/// "up to date", with "behind: 0.3.0 available" when a newer release is known and the update
/// state does not name it already ("installing 0.3.0").
fn update_text(r: &DeviceReport) -> String {
    let update = if r.update.is_empty() { "-" } else { r.update.as_str() };
    match &r.behind {
        Some(v) if r.update.is_empty() => format!("behind: {v} available"),
        Some(v) if !r.update.contains(v.as_str()) => format!("{update}; behind: {v} available"),
        _ => update.to_string(),
    }
}

fn backup_text(r: &DeviceReport, now: Timestamp) -> String {
    match (r.backup_configured, r.last_good_backup) {
        (_, Some(t)) => ago(now, t),
        (true, None) => "none".to_string(),
        (false, None) => "-".to_string(),
    }
}

fn disk_text(r: &DeviceReport) -> String {
    r.data_used_percent.map_or("-".to_string(), |p| format!("{p:.0}%"))
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// "1", or "1 (+2 warnings)".
fn alerts_text(r: &DeviceReport) -> String {
    let alerts = r.open.iter().filter(|e| e.severity == Severity::Alert).count();
    let warnings = r.open.len() - alerts;
    if warnings == 0 {
        alerts.to_string()
    } else {
        format!("{alerts} (+{})", plural(warnings, "warning"))
    }
}

/// The table, then one line per open alert or warning and per silent device (with what to do),
/// so that a cron mail says what is wrong.
pub fn table(reports: &[DeviceReport], now: Timestamp) -> String {
    let header = ["DEVICE", "VERSION", "CHANNEL", "LAST SEEN", "UPDATE", "BACKUP", "DISK", "ALERTS"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in reports {
        let since = now.0.saturating_sub(r.last_seen.0);
        rows.push(vec![
            plain(&r.name),
            plain(&r.version),
            plain(r.channel.as_deref().unwrap_or("-")),
            if r.silent { format!("SILENT {}", age(since)) } else { ago(now, r.last_seen) },
            plain(&update_text(r)),
            backup_text(r, now),
            disk_text(r),
            alerts_text(r),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let mut problems = String::new();
    for r in reports {
        let name = plain(&r.name);
        if r.silent {
            let _ = writeln!(problems, "  {name}: SILENT: no status since {} ({})", r.last_seen, ago(now, r.last_seen));
        }
        for e in &r.open {
            let what = if e.severity == Severity::Alert { "ALERT" } else { "warning" };
            let _ =
                writeln!(problems, "  {name}: {what}: {} (since {}, {})", plain(&e.title), e.since, ago(now, e.since));
            if !e.what_to_do.is_empty() {
                let _ = writeln!(problems, "      what to do: {}", plain(&e.what_to_do));
            }
        }
    }
    if !problems.is_empty() {
        out.push('\n');
        out.push_str(&problems);
    }
    out
}

/// `--json`: the reports as a JSON array.
pub fn json(reports: &[DeviceReport]) -> String {
    serde_json::to_string_pretty(reports).expect("reports serialise") + "\n"
}

/// The state colours: the card's left border and its badge.
pub fn colour(s: State) -> &'static str {
    match s {
        State::Fine => "#2e7d32",
        State::Warning => "#f9a825",
        State::Alert => "#c62828",
        State::Silent => "#757575",
    }
}

/// The chart's size, and its plot area in the SVG's coordinates: left, top, width, height.
const CHART: (u32, u32) = (220, 100);
const PLOT: (f64, f64, f64, f64) = (30.0, 6.0, 184.0, 76.0);

/// Where each sample is drawn: time from left (the oldest) to right (the newest), use from the
/// bottom (0 %) to the top (100 %), clamped; samples that are not numbers are left out.
pub fn chart_points(samples: &[Sample]) -> Vec<(f64, f64)> {
    let (x0, y0, w, h) = PLOT;
    let samples: Vec<&Sample> = samples.iter().filter(|s| s.data_used_percent.is_finite()).collect();
    let (Some(first), Some(last)) = (samples.iter().map(|s| s.at.0).min(), samples.iter().map(|s| s.at.0).max()) else {
        return Vec::new();
    };
    let span = (last - first) as f64;
    samples
        .iter()
        .map(|s| {
            let x = if span > 0.0 { x0 + (s.at.0 - first) as f64 / span * w } else { x0 + w };
            let y = y0 + (100.0 - s.data_used_percent.clamp(0.0, 100.0)) / 100.0 * h;
            ((x * 10.0).round() / 10.0, (y * 10.0).round() / 10.0)
        })
        .collect()
}

/// "11-22 03:00" (UTC), for the chart's time axis.
fn short_time(t: Timestamp) -> String {
    let s = t.rfc3339();
    s.get(5..16).map(|m| m.replace('T', " ")).unwrap_or(s)
}

/// The data partition's use over time: a line on a 0-100 % scale, dashed at 85 and 95 %.
fn chart(samples: &[Sample]) -> String {
    let points = chart_points(samples);
    if points.is_empty() {
        return "<div class=\"nosamples\">no samples yet</div>\n".to_string();
    }
    let ((vw, vh), (x0, y0, w, h)) = (CHART, PLOT);
    let y = |pct: f64| y0 + (100.0 - pct) / 100.0 * h;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {vw} {vh}\" width=\"{vw}\" height=\"{vh}\" role=\"img\" \
         aria-label=\"data partition use over time\">\n\
         <rect x=\"{x0}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"#fafafa\" stroke=\"#e0e0e0\"/>\n\
         <line x1=\"{x0}\" x2=\"{x1}\" y1=\"{y50}\" y2=\"{y50}\" stroke=\"#eeeeee\"/>\n",
        x1 = x0 + w,
        y50 = y(50.0)
    );
    for (pct, stroke) in [(85.0, "#ffb300"), (95.0, "#e53935")] {
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" x2=\"{x1}\" y1=\"{y1}\" y2=\"{y1}\" stroke=\"{stroke}\" stroke-dasharray=\"4 3\"/>",
            x1 = x0 + w,
            y1 = y(pct)
        );
    }
    for pct in [100.0, 50.0, 0.0] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{pct}%</text>", x0 - 4.0, y(pct) + 3.0);
    }
    let coords: Vec<String> = points.iter().map(|(x, y)| format!("{x},{y}")).collect();
    if points.len() > 1 {
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1565c0\" stroke-width=\"2\" stroke-linejoin=\"round\"/>",
            coords.join(" ")
        );
    }
    let (lx, ly) = points[points.len() - 1];
    let _ = writeln!(s, "<circle cx=\"{lx}\" cy=\"{ly}\" r=\"3\" fill=\"#1565c0\"/>");
    let times: Vec<Timestamp> = samples.iter().filter(|s| s.data_used_percent.is_finite()).map(|s| s.at).collect();
    if let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) {
        let ty = vh - 4;
        let _ = writeln!(s, "<text x=\"{x0}\" y=\"{ty}\">{}</text>", short_time(*first));
        let _ = writeln!(s, "<text x=\"{}\" y=\"{ty}\" text-anchor=\"end\">{}</text>", x0 + w, short_time(*last));
    }
    s.push_str("</svg>\n");
    s
}

const STYLE: &str = "\
body{margin:0;padding:20px 24px;background:#eceff1;color:#212121;\
font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px;margin-bottom:16px}
h1{font-size:21px;margin:0}
.counts span{margin-right:12px;font-weight:600}
.muted{color:#616161}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(440px,100%),1fr));gap:14px}
.card{background:#fff;border-left:10px solid;border-radius:4px;padding:10px 14px;\
box-shadow:0 1px 3px rgba(0,0,0,.15);min-width:0}
.head{display:flex;align-items:center;justify-content:space-between;gap:8px}
h2{font-size:17px;margin:0;overflow-wrap:anywhere}
.sub{font-size:12px;overflow-wrap:anywhere}
.badge{font-size:11px;font-weight:700;letter-spacing:.06em;padding:2px 9px;border-radius:10px;color:#fff}
.badge.warning{color:#212121}
.body{display:flex;flex-wrap:wrap;gap:6px 12px;align-items:flex-start;margin-top:6px}
dl{flex:1 1 150px;display:grid;grid-template-columns:auto 1fr;gap:1px 10px;margin:0;font-size:13px}
dt{color:#616161}
dd{margin:0;overflow-wrap:anywhere}
.behind{color:#0d47a1;font-weight:600}
.chart{display:block;max-width:100%;height:auto}
.chart text{font-size:9px;fill:#616161}
.nosamples{width:220px;max-width:100%;height:100px;box-sizing:border-box;border:1px dashed #e0e0e0;\
display:flex;align-items:center;justify-content:center;color:#616161;font-size:12px;font-style:italic}
ul.events{list-style:none;margin:8px 0 2px;padding:0;font-size:13px}
ul.events li{margin:3px 0;padding:3px 8px;border-radius:3px;overflow-wrap:anywhere}
ul.events li.alert{background:#ffebee}
ul.events li.warning{background:#fff8e1}
.todo{display:block;color:#424242}
.failed{background:#ffebee;border:1px solid #ef9a9a;border-radius:4px;padding:8px 14px;margin-bottom:14px}
footer{margin-top:16px;font-size:12px;color:#616161}
";

/// One static page, no script: a card per device, bordered in its state's colour, those that
/// need attention first. Every string from a feed (and every source name) is escaped;
/// attributes and CSS hold only kiln's own values.
pub fn html(reports: &[DeviceReport], failed: &[Note], now: Timestamp) -> String {
    let e = xml_escape;
    let mut p = String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    p.push_str(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n",
    );
    p.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(p, "<title>kiln status: {}</title>", plural(reports.len(), "device"));
    let _ = write!(p, "<style>\n{STYLE}");
    for s in [State::Fine, State::Warning, State::Alert, State::Silent] {
        let _ = writeln!(p, ".card.{0}{{border-left-color:{1}}}\n.badge.{0}{{background:{1}}}", s.label(), colour(s));
    }
    p.push_str("</style>\n</head>\n<body>\n<header>\n");
    let _ = writeln!(p, "<h1>kiln status: {}</h1>", plural(reports.len(), "device"));
    p.push_str("<div class=\"counts\">");
    for s in PAGE_ORDER {
        let n = reports.iter().filter(|r| r.state == s).count();
        if n > 0 {
            let _ = write!(p, "<span style=\"color:{}\">{n} {}</span>", text_colour(s), s.label());
        }
    }
    p.push_str("</div>\n");
    let _ = writeln!(p, "<div class=\"muted\">as of {now}</div>\n</header>");
    if !failed.is_empty() {
        p.push_str("<div class=\"failed\"><b>Could not read</b>\n<ul>\n");
        for f in failed {
            let _ = writeln!(p, "<li>{}: {}</li>", e(&f.source), e(&f.reason));
        }
        p.push_str("</ul>\n</div>\n");
    }
    p.push_str("<main class=\"grid\">\n");
    let mut order: Vec<&DeviceReport> = reports.iter().collect();
    order.sort_by_key(|r| PAGE_ORDER.iter().position(|s| *s == r.state));
    for r in order {
        card(&mut p, r, now);
    }
    p.push_str("</main>\n");
    let _ = writeln!(
        p,
        "<footer>Made by <code>kiln status</code> from the devices' status feeds. The charts show the \
         data partition's use; the dashed lines mark 85&#160;% and 95&#160;%. Times are UTC.</footer>"
    );
    p.push_str("</body>\n</html>\n");
    p
}

/// The page's order: what needs attention first.
const PAGE_ORDER: [State; 4] = [State::Alert, State::Silent, State::Warning, State::Fine];

/// A darker shade of a state's colour, readable as text on the page's background.
fn text_colour(s: State) -> &'static str {
    match s {
        State::Fine => "#1b5e20",
        State::Warning => "#8d6e00",
        State::Alert => "#b71c1c",
        State::Silent => "#424242",
    }
}

fn card(p: &mut String, r: &DeviceReport, now: Timestamp) {
    let e = xml_escape;
    let state = r.state.label();
    let _ = writeln!(p, "<article class=\"card {state}\">");
    let _ = writeln!(
        p,
        "<div class=\"head\"><h2>{}</h2><span class=\"badge {state}\">{}</span></div>",
        e(&r.name),
        state.to_uppercase()
    );
    let _ = writeln!(p, "<div class=\"sub muted\">{} · {} · {}</div>", e(&r.profile), e(&r.image), e(&r.arch));
    p.push_str("<div class=\"body\">\n<dl>\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(p, "<dt>{k}</dt><dd>{v}</dd>");
    };
    row("Version", e(&r.version));
    row("Channel", e(r.channel.as_deref().unwrap_or("none")));
    let mut update = e(if r.update.is_empty() { "-" } else { &r.update });
    if let Some(v) = r.behind.as_ref().filter(|v| !r.update.contains(v.as_str())) {
        let _ = write!(update, "<br><span class=\"behind\">{} available</span>", e(v));
    }
    row("Update", update);
    row("Last backup", e(&backup_text(r, now)));
    let seen = if r.silent {
        format!("<b>silent</b> for {}", age(now.0.saturating_sub(r.last_seen.0)))
    } else {
        ago(now, r.last_seen)
    };
    row("Last seen", format!("<span title=\"{}\">{seen}</span>", r.last_seen));
    row("Disk", e(&disk_text(r)));
    p.push_str("</dl>\n");
    p.push_str(&chart(&r.samples));
    p.push_str("</div>\n");
    if !r.open.is_empty() {
        p.push_str("<ul class=\"events\">\n");
        for ev in &r.open {
            let (class, what) =
                if ev.severity == Severity::Alert { ("alert", "ALERT") } else { ("warning", "warning") };
            let _ = write!(
                p,
                "<li class=\"{class}\"><b>{what}: {}</b> <span class=\"muted\">since {}</span>",
                e(&ev.title),
                ago(now, ev.since)
            );
            if !ev.what_to_do.is_empty() {
                let _ = write!(p, "<span class=\"todo\">What to do: {}</span>", e(&ev.what_to_do));
            }
            p.push_str("</li>\n");
        }
        p.push_str("</ul>\n");
    }
    p.push_str("</article>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_feed::status::{DeviceInfo, Summary, STATUS_FORMAT};
    use kiln_feed::{Artifact, ArtifactKind, Release};

    /// 2026-11-22T12:00:00Z
    const NOW: Timestamp = Timestamp(1795348800);
    const MIN: u64 = 60;
    const HOUR: u64 = 3600;

    fn event(severity: Severity, title: &str, since_ago: u64) -> Event {
        Event {
            id: format!("{}-1", since_ago),
            key: format!("k:{title}"),
            kind: EventKind::Raised,
            severity,
            at: Timestamp(NOW.0 - since_ago),
            since: Timestamp(NOW.0 - since_ago),
            title: title.into(),
            detail: String::new(),
            what_to_do: String::new(),
        }
    }

    /// A device last seen `seen_ago` seconds before [`NOW`], reporting every 5 minutes.
    fn feed(host: &str, version: &str, seen_ago: u64) -> StatusFeed {
        StatusFeed {
            format: STATUS_FORMAT,
            device: DeviceInfo {
                hostname: host.into(),
                device_id: None,
                profile: "home".into(),
                image: "pc-uefi".into(),
                arch: "amd64".into(),
                version: version.into(),
                channel: Some("stable".into()),
                booted: None,
            },
            updated: Timestamp(NOW.0 - seen_ago),
            interval_secs: 300,
            summary: Summary {
                update: "up to date".into(),
                last_good_backup: Some(Timestamp(NOW.0 - 5 * HOUR)),
                backup_configured: true,
                data_used_percent: Some(41.0),
                clock_synchronised: true,
                ..Default::default()
            },
            open: Vec::new(),
            events: Vec::new(),
            samples: Vec::new(),
        }
    }

    fn device(feed: StatusFeed) -> Device {
        Device { source: format!("/feeds/{}.json", feed.device.hostname), feed }
    }

    /// Healthy, warnings only, an open alert, silent.
    fn mix() -> Vec<Device> {
        let healthy = feed("kitchen", "0.2.0", 2 * MIN);
        let mut warned = feed("garage", "0.2.0", 4 * MIN);
        warned.open.push(event(Severity::Warning, "clock not synchronised", HOUR));
        warned.summary.backup_configured = false;
        warned.summary.last_good_backup = None;
        let mut alert = feed("nas", "0.1.0", 30);
        alert.summary.data_used_percent = Some(96.4);
        alert.summary.update = "0.2.0 failed, running 0.1.0".into();
        let mut disk = event(Severity::Alert, "/var is 96 % full", 2 * HOUR);
        disk.what_to_do = "free space on /var or grow the data partition".into();
        alert.open.push(disk);
        alert.open.push(event(Severity::Warning, "backup is 2 days old", 3 * HOUR));
        alert.open.push(event(Severity::Warning, "unit x.service restarted 5 times", 10 * MIN));
        let mut silent = feed("shed", "0.2.0", 3 * HOUR);
        silent.summary.last_good_backup = None;
        silent.summary.data_used_percent = None;
        vec![device(healthy), device(warned), device(alert), device(silent)]
    }

    fn reports(devices: &[Device], release: Option<&Metadata>) -> Vec<DeviceReport> {
        devices.iter().map(|d| report(d, release, NOW, None)).collect()
    }

    #[test]
    fn the_table_says_what_is_wrong() {
        let r = reports(&mix(), None);
        assert_eq!(
            r.iter().map(|r| r.state).collect::<Vec<_>>(),
            [State::Fine, State::Warning, State::Alert, State::Silent]
        );
        assert_eq!(
            table(&r, NOW),
            "\
DEVICE   VERSION  CHANNEL  LAST SEEN  UPDATE                       BACKUP  DISK  ALERTS
kitchen  0.2.0    stable   2m ago     up to date                   5h ago  41%   0
garage   0.2.0    stable   4m ago     up to date                   -       41%   0 (+1 warning)
nas      0.1.0    stable   30s ago    0.2.0 failed, running 0.1.0  5h ago  96%   1 (+2 warnings)
shed     0.2.0    stable   SILENT 3h  up to date                   none    -     0

  garage: warning: clock not synchronised (since 2026-11-22T11:00:00Z, 1h ago)
  nas: ALERT: /var is 96 % full (since 2026-11-22T10:00:00Z, 2h ago)
      what to do: free space on /var or grow the data partition
  nas: warning: backup is 2 days old (since 2026-11-22T09:00:00Z, 3h ago)
  nas: warning: unit x.service restarted 5 times (since 2026-11-22T11:50:00Z, 10m ago)
  shed: SILENT: no status since 2026-11-22T09:00:00Z (3h ago)
"
        );
    }

    #[test]
    fn silence_follows_the_interval_or_the_option() {
        let d = device(feed("kitchen", "0.2.0", 16 * MIN));
        assert!(report(&d, None, NOW, None).silent, "three intervals of 5 minutes");
        assert!(!report(&d, None, NOW, Some(HOUR)).silent);
        assert_eq!(report(&d, None, NOW, Some(10 * MIN)).state, State::Silent);
    }

    #[test]
    fn exit_codes() {
        let mix = mix();
        let r = reports(&mix, None);
        assert_eq!(exit_code(&[], &[]), 0);
        assert_eq!(exit_code(&r[..2], &[]), 0, "warnings alone are fine");
        assert_eq!(exit_code(&r[..3], &[]), 1, "an open alert");
        assert_eq!(exit_code(&[r[0].clone(), r[3].clone()], &[]), 1, "a silent device");
        let failed = [note("http://x/a.json", "GET http://x/a.json: HTTP 404")];
        assert_eq!(exit_code(&r[..1], &failed), 2);
        assert_eq!(exit_code(&r, &failed), 2, "an unread source wins: the picture is incomplete");
        // A cleared or informational entry among the open ones is not an alert.
        let mut f = feed("kitchen", "0.2.0", 0);
        f.open.push(Event { kind: EventKind::Cleared, ..event(Severity::Alert, "was full", HOUR) });
        f.open.push(event(Severity::Info, "logged in", HOUR));
        assert_eq!(exit_code(&reports(&[device(f)], None), &[]), 0);
    }

    fn release(version: &str, image: &str) -> Release {
        Release {
            version: version.parse().unwrap(),
            published: Timestamp(NOW.0 - 86400),
            profile: "home".into(),
            image: image.into(),
            arch: "amd64".into(),
            root_hash: "00".repeat(32),
            artifacts: vec![Artifact {
                kind: ArtifactKind::Root,
                name: "root.img".into(),
                url: "artifacts/00".into(),
                size: 1,
                sha256: "00".repeat(32),
                delta: None,
            }],
            changelog: Vec::new(),
            notes: String::new(),
            security: false,
        }
    }

    #[test]
    fn behind_is_the_newest_release_for_the_device() {
        let m = Metadata {
            format: kiln_feed::FORMAT,
            channel: "stable".into(),
            generated: NOW,
            expires: Timestamp(NOW.0 + 86400),
            releases: vec![release("0.4.0", "rpi4"), release("0.3.0", "pc-uefi"), release("0.2.10", "pc-uefi")],
        };
        let behind_of = |f: &StatusFeed| behind(f, &m).map(|v| v.to_string());
        assert_eq!(behind_of(&feed("a", "0.2.0", 0)).as_deref(), Some("0.3.0"), "0.4.0 is for another image");
        assert_eq!(behind_of(&feed("a", "0.2.9", 0)).as_deref(), Some("0.3.0"));
        assert_eq!(behind_of(&feed("a", "0.3.0", 0)), None);
        assert_eq!(behind_of(&feed("a", "0.10.0", 0)), None, "versions compare numerically");
        let mut beta = feed("a", "0.2.0", 0);
        beta.device.channel = Some("beta".into());
        assert_eq!(behind_of(&beta), None, "another channel's releases");
        assert_eq!(behind_of(&feed("a", "dev-build", 0)), None);

        let mut installing = feed("b", "0.2.0", 0);
        installing.summary.update = "installing 0.3.0".into();
        let r = reports(&[device(feed("a", "0.2.0", 0)), device(installing)], Some(&m));
        assert_eq!(r[0].behind.as_deref(), Some("0.3.0"));
        assert!(table(&r, NOW).contains("  up to date; behind: 0.3.0 available  "), "{}", table(&r, NOW));
        assert!(table(&r, NOW).contains("  installing 0.3.0  "), "the update state names it already");
        // Without --feed: what the device's own last check saw.
        let mut told = feed("c", "0.2.0", 0);
        told.summary.available = Some("0.3.1".into());
        assert_eq!(reports(&[device(told)], None)[0].behind.as_deref(), Some("0.3.1"));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v: serde_json::Value = serde_json::from_str(&json(&reports(&mix()[2..3], None))).unwrap();
        let nas = &v[0];
        let mut keys: Vec<&str> = nas.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "arch",
                "backup_configured",
                "behind",
                "channel",
                "data_used_percent",
                "device_id",
                "image",
                "last_good_backup",
                "last_seen",
                "name",
                "open",
                "profile",
                "silent",
                "source",
                "state",
                "update",
                "version"
            ]
        );
        assert_eq!(nas["name"], "nas");
        assert_eq!(nas["state"], "alert");
        assert_eq!(nas["last_seen"], "2026-11-22T11:59:30Z");
        assert_eq!(nas["behind"], serde_json::Value::Null);
        assert_eq!(nas["open"][0]["severity"], "alert");
        assert_eq!(nas["open"][0]["since"], "2026-11-22T10:00:00Z");
        assert_eq!(nas["open"][0]["what_to_do"], "free space on /var or grow the data partition");
        assert_eq!(nas["source"], "/feeds/nas.json");
    }

    #[test]
    fn a_hostile_feed_is_escaped_in_the_page_and_the_table() {
        let evil = "<script>alert(1)</script>";
        let mut f = feed(evil, "0.2.0\"><img src=x onerror=alert(2)>", 0);
        f.device.channel = Some("'; background:url(x)".into());
        let mut e = event(Severity::Alert, evil, HOUR);
        e.what_to_do = "<a href=\"javascript:alert(3)\">click</a>".into();
        f.open.push(e);
        f.summary.update = "\u{1b}[2J\u{202e}up to date".into();
        let r = reports(&[device(f)], None);
        let failed = [note("<b>src</b>", "<i>why</i>")];
        let page = html(&r, &failed, NOW);
        assert!(!page.to_lowercase().contains("<script"), "{page}");
        assert!(!page.contains("<img") && !page.contains("<a "), "{page}");
        assert!(page.contains("<h2>&lt;script&gt;alert(1)&lt;/script&gt;</h2>"), "{page}");
        assert!(page.contains("<b>ALERT: &lt;script&gt;alert(1)&lt;/script&gt;</b>"), "{page}");
        assert!(page.contains("What to do: &lt;a href=&quot;javascript:alert(3)&quot;&gt;click&lt;/a&gt;"), "{page}");
        assert!(page.contains("<li>&lt;b&gt;src&lt;/b&gt;: &lt;i&gt;why&lt;/i&gt;</li>"), "{page}");
        assert!(page.contains("&apos;; background:url(x)"), "{page}");
        assert!(!page.contains('\u{1b}'), "control characters are dropped");
        let style = &page[page.find("<style>").unwrap()..page.find("</style>").unwrap()];
        assert!(!style.contains("url(") && !style.contains("script"), "no feed string in the CSS: {style}");
        assert!(page.contains("default-src 'none'"), "a CSP forbids scripts even if escaping failed");
        let t = table(&r, NOW);
        assert!(!t.contains('\u{1b}') && !t.contains('\u{202e}') && t.contains("?[2J?up to date"), "{t}");
    }

    #[test]
    fn the_page_has_a_card_per_device_in_its_colour() {
        let mut mix = mix();
        mix[2].feed.samples = vec![
            Sample { at: Timestamp(NOW.0 - 2 * HOUR), data_used_percent: 80.0 },
            Sample { at: NOW, data_used_percent: 96.0 },
        ];
        let page = html(&reports(&mix, None), &[], NOW);
        for (state, colour) in
            [("fine", "#2e7d32"), ("warning", "#f9a825"), ("alert", "#c62828"), ("silent", "#757575")]
        {
            assert!(page.contains(&format!(".card.{state}{{border-left-color:{colour}}}")), "{page}");
            assert_eq!(page.matches(&format!("<article class=\"card {state}\">")).count(), 1, "{state}");
            assert!(page.contains(&format!("<span class=\"badge {state}\">{}</span>", state.to_uppercase())));
        }
        assert_eq!(page.matches("<svg").count(), 1, "one device has samples");
        assert_eq!(page.matches("no samples yet").count(), 3);
        assert!(page.contains("<polyline points=\"30,21.2 214,9\""), "{page}");
        let order: Vec<usize> = ["card alert", "card silent", "card warning", "card fine"]
            .iter()
            .map(|c| page.find(&format!("<article class=\"{c}\">")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "what needs attention first");
        assert!(page.contains("What to do: free space on /var"), "{page}");
        assert!(page.contains("<b>silent</b> for 3h"), "{page}");
    }

    #[test]
    fn samples_are_drawn_on_a_0_to_100_scale() {
        let s = |at: u64, p: f64| Sample { at: Timestamp(at), data_used_percent: p };
        assert_eq!(chart_points(&[]), []);
        // Left edge 30, width 184; top 6, height 76: 0 % at y 82, 100 % at y 6.
        assert_eq!(
            chart_points(&[s(1000, 0.0), s(1100, 50.0), s(1400, 100.0), s(1300, f64::NAN)]),
            [(30.0, 82.0), (76.0, 44.0), (214.0, 6.0)]
        );
        assert_eq!(chart_points(&[s(1000, 120.0), s(2000, -5.0)]), [(30.0, 6.0), (214.0, 82.0)], "clamped");
        assert_eq!(chart_points(&[s(1000, 85.0)]), [(214.0, 17.4)], "one sample: at the right edge");
        let svg = chart(&[s(1000, 85.0), s(1600, 95.0)]);
        assert!(svg.contains("<polyline points=\"30,17.4 214,9.8\""), "{svg}");
        assert!(svg.contains("stroke-dasharray=\"4 3\""), "{svg}");
        let dashed = |y: &str| svg.lines().any(|l| l.contains(&format!("y1=\"{y}\" y2=\"{y}\"")) && l.contains("4 3"));
        assert!(dashed("17.4") && dashed("9.8"), "85 and 95 %: {svg}");
        assert!(svg.contains(">01-01 00:16<") && svg.contains(">01-01 00:26<"), "the time axis: {svg}");
        assert_eq!(chart(&[]), "<div class=\"nosamples\">no samples yet</div>\n");
    }

    #[test]
    fn a_directory_gives_its_feeds_and_names_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("b-kitchen.json"), feed("kitchen", "0.2.0", 0).to_json()).unwrap();
        std::fs::write(p.join("a-nas.json"), feed("nas", "0.2.0", 0).to_json()).unwrap();
        std::fs::write(p.join("a-nas.atom"), "<feed/>").unwrap();
        std::fs::write(p.join("stable.json"), "{\"format\": 1, \"channel\": \"stable\"}").unwrap();
        std::fs::write(p.join("torn.json"), "{\"format\": 1, \"device\": {\"hostname\": ").unwrap();
        std::fs::write(p.join(".c.json.tmp"), "x").unwrap();
        let dir_arg = p.display().to_string();
        let r = read(std::slice::from_ref(&dir_arg));
        let names: Vec<&str> = r.devices.iter().map(|d| d.feed.name()).collect();
        assert_eq!(names, ["nas", "kitchen"], "in the order of the file names");
        assert_eq!(r.skipped, [note(format!("{dir_arg}/stable.json"), "not a kiln status feed")]);
        assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
        assert_eq!(r.failed[0].source, format!("{dir_arg}/torn.json"));
        assert!(r.failed[0].reason.starts_with("not JSON: EOF"), "{:?}", r.failed);

        // A file named by its .atom reads the .json beside it; a missing one is named.
        let r = read(&[format!("{dir_arg}/a-nas.atom"), format!("{dir_arg}/gone.json")]);
        assert_eq!(r.devices[0].source, format!("{dir_arg}/a-nas.json"));
        assert_eq!(r.failed, [note(format!("{dir_arg}/gone.json"), "No such file or directory (os error 2)")]);

        let empty = tempfile::tempdir().unwrap();
        let r = read(&[empty.path().display().to_string()]);
        assert_eq!(r.failed[0].reason, "no *.json status feeds in it");
        let r = read(&["ftp://example.org/a.atom".to_string()]);
        assert_eq!(r.failed, [note("ftp://example.org/a.json", "only http:// and https:// URLs are read")]);
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(
            [age(0), age(59), age(60), age(3599), age(3600), age(47 * 3600), age(48 * 3600)],
            ["0s", "59s", "1m", "59m", "1h", "47h", "2d"]
        );
    }
}
