//! `kiln-agent monitor`: one look at the device (run by kiln-monitor.timer, and by `main` after
//! every backup and update command). The watchers (`watch.rs`) say which conditions hold now;
//! [`transition`] compares them with the conditions open since the last look and makes one
//! event per change (raised, cleared) plus the notices; the record (`monitor.json`) keeps what
//! is open, the bounded history and the watchers' memory. Then the status feed is written
//! (`status.atom`, and its JSON twin `status-feed.json`) and delivered: alerts to `alert_url`
//! (an outbox: what could not be delivered goes with the next look), the feed PUT to `push`,
//! the heartbeat fetched while no alert is open.

use crate::state::State;
use crate::watch::{self, Finding};
use anyhow::{Context as _, Result};
use kiln_device::{DeviceConfig, MonitorConfig, MONITOR_PROVISION_DIR};
use kiln_feed::status::{self, DeviceInfo, Event, EventKind, Sample, Severity, StatusFeed, Summary, STATUS_FORMAT};
use kiln_feed::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub const RECORD_FILE: &str = "monitor.json";
pub const FEED_ATOM: &str = "status.atom";
pub const FEED_JSON: &str = "status-feed.json";
/// Undelivered alerts kept for the next look; older ones are dropped (and counted).
const OUTBOX_LIMIT: usize = 100;
/// Data-partition samples kept for the chart.
const SAMPLES_LIMIT: usize = 336;
/// Journal lines read per look (a flood of failed logins is counted up to this).
const JOURNAL_LIMIT: usize = 20_000;

/// What the monitor remembers between looks (`/var/lib/kiln-agent/monitor.json`). Every field
/// defaults: a record of an older agent reads.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct Record {
    /// Events made so far (their ids).
    pub seq: u64,
    /// The first look: "no update check since" counts from here on a device that never checked.
    pub watching_since: Option<Timestamp>,
    pub open: BTreeMap<String, Event>,
    /// Newest first.
    pub events: Vec<Event>,
    pub samples: Vec<Sample>,
    /// Services' restart counts at recent looks (this boot).
    pub restarts: watch::RestartMemory,
    pub journal_cursor: Option<String>,
    /// Failed logins and sudo denials at recent looks.
    #[serde(default)]
    pub failures: watch::FailureMemory,
    /// Per login (user@address): when it was last in the feed, and logins since not reported.
    #[serde(default)]
    pub logins: BTreeMap<String, (Timestamp, u32)>,
    /// The boot noted last (at `kiln-agent boot`, or by a look), and the boot that recorded a
    /// clean shutdown.
    pub boot_id: Option<String>,
    pub clean_stop: Option<String>,
    /// How the boot before this one ended, noted at boot and reported by the next look:
    /// Some(true) cleanly, Some(false) not.
    pub previous_boot_clean: Option<bool>,
    /// The committed version at the last look (the update record's `current_version`).
    pub committed: Option<String>,
    /// The running version at the last look.
    pub version: Option<String>,
    /// Alerts not yet delivered to `alert_url`, oldest first.
    pub outbox: Vec<Event>,
    pub dropped_alerts: u64,
    pub last_look: Option<Timestamp>,
    pub last_push: Option<Timestamp>,
    pub last_heartbeat: Option<Timestamp>,
    /// The last delivery problem (push, alert, heartbeat), for `kiln-agent status`.
    pub delivery_error: Option<String>,
}

impl Record {
    pub fn load(state_dir: &Path) -> Result<Record> {
        Ok(kiln_device::fs::read_json(&state_dir.join(RECORD_FILE))
            .map_err(|e| anyhow::anyhow!("{e} (move it away to start the monitor's record afresh)"))?
            .unwrap_or_default())
    }
}

/// One watcher's result: its key prefix, and what it saw (None: it could not look this time,
/// so what it had raised stays as it is).
pub type Observed = (&'static str, Option<Vec<Finding>>);

/// The events of one look: a finding not open yet is raised, an open one with another
/// severity is raised again (escalated or eased), an open one no watcher reports any more is
/// cleared; notices are events of their own. Updates `open`; returns the events in order.
pub fn transition(
    open: &mut BTreeMap<String, Event>,
    observed: Vec<Observed>,
    notices: Vec<Finding>,
    now: Timestamp,
    seq: &mut u64,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut event = |f: &Finding, kind: EventKind, severity: Severity, since: Timestamp| {
        *seq += 1;
        Event {
            id: format!("{}-{}", now.0, seq),
            key: f.key.clone(),
            kind,
            severity,
            at: now,
            since,
            title: f.title.clone(),
            detail: f.detail.clone(),
            what_to_do: f.what_to_do.clone(),
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut unobserved = Vec::new();
    for (scope, findings) in observed {
        let Some(findings) = findings else {
            unobserved.push(scope);
            continue;
        };
        // One finding per key: the worst (two certificates of one domain, say).
        let mut worst: BTreeMap<String, Finding> = BTreeMap::new();
        for f in findings {
            match worst.get(&f.key) {
                Some(w) if w.severity >= f.severity => {}
                _ => {
                    worst.insert(f.key.clone(), f);
                }
            }
        }
        for f in worst.into_values() {
            seen.insert(f.key.clone());
            match open.get_mut(&f.key) {
                Some(e) if e.severity == f.severity => {
                    // No news, but the open condition shows today's figures ("96 %" not "85 %").
                    e.title = f.title.clone();
                    e.detail = f.detail.clone();
                }
                previous => {
                    let since = previous.map(|e| e.since).or(f.since).unwrap_or(now);
                    let e = event(&f, EventKind::Raised, f.severity, since);
                    open.insert(f.key.clone(), e.clone());
                    events.push(e);
                }
            }
        }
    }
    let gone: Vec<String> =
        open.keys().filter(|k| !seen.contains(*k) && !unobserved.iter().any(|s| k.starts_with(s))).cloned().collect();
    for k in gone {
        let was = open.remove(&k).expect("listed from open");
        let f = Finding::new(was.key.clone(), was.severity, was.title.clone());
        events.push(event(&f, EventKind::Cleared, was.severity, was.since));
    }
    for n in notices {
        let e = event(&n, EventKind::Notice, n.severity, n.since.unwrap_or(now));
        events.push(e);
    }
    events
}

/// A login from the same user and address is reported at most once an hour; the ones in between
/// are counted into the next report. Other notices pass.
pub const LOGIN_QUIET_SECS: u64 = 3600;

pub fn quiet_logins(
    seen: &mut BTreeMap<String, (Timestamp, u32)>,
    notices: Vec<Finding>,
    now: Timestamp,
) -> Vec<Finding> {
    seen.retain(|_, (at, _)| now.0.saturating_sub(at.0) < 30 * 86400);
    let mut out = Vec::new();
    for mut n in notices {
        let Some(who) = n.key.strip_prefix("login:").map(str::to_string) else {
            out.push(n);
            continue;
        };
        let times = n.count;
        match seen.get_mut(&who) {
            Some((at, quiet)) if now.0.saturating_sub(at.0) < LOGIN_QUIET_SECS => *quiet += times,
            previous => {
                if let Some((at, quiet)) = previous.filter(|(_, q)| *q > 0) {
                    n.detail = format!("{}; {quiet} more login(s) since {at} not reported one by one", n.detail);
                }
                seen.insert(who, (now, 0));
                out.push(n);
            }
        }
    }
    out
}

/// Whether an event goes to `alert_url`: raised and cleared conditions and notices that are
/// warnings or worse (logins are only in the feed).
pub fn is_alert(e: &Event) -> bool {
    e.severity >= Severity::Warning
}

/// The URLs and credentials in use: a device's provisioning overrides the profile's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub push: Option<String>,
    pub push_json: Option<String>,
    pub push_authorization: Option<String>,
    pub alert_url: Option<String>,
    pub heartbeat_url: Option<String>,
}

impl Targets {
    pub fn resolve(cfg: &MonitorConfig, provision: &Path, hostname: &str) -> Targets {
        let read = |name: &str| -> Option<String> {
            let p = provision.join(name);
            match kiln_device::fs::read_regular(&p, 8192) {
                Ok(b) => {
                    let s = String::from_utf8_lossy(&b).trim().to_string();
                    (!s.is_empty()).then_some(s)
                }
                Err(kiln_device::fs::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    println!("<4>kiln-agent: monitor: {}: {e}", p.display());
                    None
                }
            }
        };
        let url = |name: &str, profile: &Option<String>| -> Option<String> {
            let u = read(name).or_else(|| profile.clone())?;
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.chars().any(char::is_whitespace) {
                println!("<4>kiln-agent: monitor: {name} {:?} is not an http(s) URL; not used", redact(&u));
                return None;
            }
            Some(u.replace("{hostname}", hostname))
        };
        let push = url("push-url", &cfg.push);
        let push_json = url("push-json-url", &None).or_else(|| push.as_deref().and_then(kiln_feed::status::json_twin));
        Targets {
            push,
            push_json,
            push_authorization: read("push-authorization"),
            alert_url: url("alert-url", &cfg.alert_url),
            heartbeat_url: url("heartbeat-url", &cfg.heartbeat_url),
        }
    }
}

/// A URL as it may be printed: user info and query (a presigned URL's signature) taken out.
pub fn redact(url: &str) -> String {
    let url = url.split('?').next().unwrap_or(url);
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((_, host)) if !host.contains('/') || rest.find('@') < rest.find('/') => {
                format!("{scheme}://***@{host}")
            }
            _ => format!("{scheme}://{rest}"),
        },
        None => url.to_string(),
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

fn lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all("/run/kiln-agent").context("creating /run/kiln-agent")?;
    let f = std::fs::File::create("/run/kiln-agent/monitor.lock").context("creating /run/kiln-agent/monitor.lock")?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking /run/kiln-agent/monitor.lock: {e}"))
}

/// Recorded at shutdown (kiln-monitor-stop.service): this boot ended cleanly.
pub fn stopping(state_dir: &Path) -> Result<()> {
    let _lock = lock()?;
    let mut record = Record::load(state_dir)?;
    note(&mut record, boot_id());
    record.clean_stop = boot_id();
    crate::state::write_record(state_dir, RECORD_FILE, &record)
}

/// Run at every boot (`kiln-agent boot`, before any look): notes this boot and how the one
/// before it ended, so a boot that ends before its first look is judged right either way.
pub fn note_boot(state_dir: &Path) -> Result<()> {
    let _lock = lock()?;
    let mut record = Record::load(state_dir)?;
    if note(&mut record, boot_id()) {
        crate::state::write_record(state_dir, RECORD_FILE, &record)?;
    }
    Ok(())
}

/// A boot not noted yet: how did the one before end (unknown for the first boot ever)? Returns
/// whether the record changed.
fn note(record: &mut Record, boot: Option<String>) -> bool {
    if boot.is_none() || record.boot_id == boot {
        return false;
    }
    record.previous_boot_clean = record.boot_id.as_ref().map(|b| record.clean_stop.as_ref() == Some(b));
    record.boot_id = boot;
    record.restarts.clear();
    true
}

/// One look: observe, judge, record, write the feed, deliver. Returns the events it made.
pub fn look(device: &DeviceConfig, state_dir: &Path) -> Result<Vec<Event>> {
    let _lock = lock()?;
    let cfg = &device.monitor;
    let now = Timestamp::now();
    let mut record = Record::load(state_dir)?;
    let watching_since = *record.watching_since.get_or_insert(now);
    let running = device.version.clone();
    let mut observed: Vec<Observed> = Vec::new();
    let mut notices = Vec::new();

    // A new boot (noted at boot, or now if `kiln-agent boot` did not run): how did the last end?
    let booted = Timestamp(now.0.saturating_sub(crate::system::uptime_secs()));
    note(&mut record, boot_id());
    if let Some(clean) = record.previous_boot_clean.take() {
        notices.extend(watch::judge_restart(Some(clean), watch::observe_watchdog_bootstatus(), booted));
    }
    // A clock set back: memories from "the future" would count for too long.
    record.failures.retain(|(t, _, _)| t.0 <= now.0);
    record.logins.retain(|_, (t, _)| t.0 <= now.0);
    for m in record.restarts.values_mut() {
        m.retain(|(t, _)| t.0 <= now.0);
    }

    let units = watch::observe_units();
    if let Err(e) = &units {
        println!("<4>kiln-agent: monitor: reading systemd's units: {e:#}");
    }
    observed.push(("unit:", units.as_ref().ok().map(|u| watch::judge_units(cfg, u, &record.restarts))));
    if let Ok(u) = &units {
        watch::remember_restarts(&mut record.restarts, u, now, watch::crash_window(cfg));
    }

    let data_error = std::fs::read_to_string(crate::data::ERROR_FILE).ok().map(|e| e.trim().to_string());
    let disk = watch::observe_disk(Path::new("/var"));
    let held: BTreeMap<String, Severity> = record.open.iter().map(|(k, e)| (k.clone(), e.severity)).collect();
    observed.push(("disk:", disk.as_ref().ok().map(|d| watch::judge_disk(cfg, d, data_error.as_deref(), &held))));
    observed.push(("inodes:", disk.as_ref().ok().map(|_| Vec::new())));
    if let Ok(d) = &disk {
        let last = record.samples.last();
        let spacing = cfg.interval_secs.saturating_mul(12);
        if last.is_none_or(|s| {
            now.0.saturating_sub(s.at.0) >= spacing || (s.data_used_percent - d.used_percent).abs() >= 5.0
        }) {
            record.samples.push(Sample { at: now, data_used_percent: (d.used_percent * 10.0).round() / 10.0 });
            let excess = record.samples.len().saturating_sub(SAMPLES_LIMIT);
            record.samples.drain(..excess);
        }
    }

    let mut last_good_backup = None;
    if let Some(b) = &device.backup {
        match crate::backup::Status::load(state_dir) {
            Ok(mut s) => {
                s.refresh_alerts(now, b.stale_after_secs);
                last_good_backup = s.last_good_backup.as_ref().map(|r| r.at);
                observed.push(("backup:", Some(watch::judge_backups(&s.alerts))));
            }
            Err(e) => {
                println!("<4>kiln-agent: monitor: reading the backup record: {e:#}");
                observed.push(("backup:", None));
            }
        }
    } else {
        observed.push(("backup:", Some(Vec::new())));
    }

    let state = State::load(state_dir);
    match (&state, &device.update) {
        (Ok(s), Some(_)) => {
            observed.push(("update:", Some(watch::judge_updates(cfg, &running, s, now, watching_since))))
        }
        (Ok(_), None) => observed.push(("update:", Some(Vec::new()))),
        (Err(e), _) => {
            println!("<4>kiln-agent: monitor: reading the update record: {e:#}");
            observed.push(("update:", None));
        }
    }
    if record.version.as_deref().is_some_and(|v| v != running.as_str()) {
        notices.push(Finding::new(
            "update:running",
            Severity::Info,
            format!("now running {running} (was {})", record.version.as_deref().unwrap_or("?")),
        ));
    }
    record.version = Some(running.to_string());
    if let Some(current) = state.as_ref().ok().and_then(|s| s.current_version.as_ref()).map(|v| v.to_string()) {
        if record.committed.as_ref().is_some_and(|c| c != &current) {
            notices.push(Finding::new(
                "update:committed",
                Severity::Info,
                format!("{current} committed: it passed its health check and is the version this device returns to (was {})", record.committed.as_deref().unwrap_or("?")),
            ));
        }
        record.committed = Some(current);
    }

    let clock = watch::observe_clock();
    observed.push(("clock", Some(watch::judge_clock(cfg, &clock))));
    observed.push((
        "cert:",
        Some(watch::judge_certificates(cfg, &watch::observe_certificates(Path::new(watch::CADDY_CERTIFICATES)), now)),
    ));
    let (alarm, throttled) = watch::observe_power();
    let power = watch::judge_power(alarm, throttled);
    observed.push(("power", Some(power.iter().filter(|f| f.key == "power").cloned().collect())));
    observed.push(("thermal", Some(power.into_iter().filter(|f| f.key == "thermal").collect())));
    observed.push((
        "storage:",
        Some(watch::observe_wear().into_iter().flat_map(|(d, pre, life)| watch::judge_wear(&d, pre, life)).collect()),
    ));
    match watch::observe_journal(record.journal_cursor.as_deref(), JOURNAL_LIMIT) {
        Ok((lines, cursor)) => {
            let window = watch::crash_window(cfg);
            record.failures.retain(|(t, _, _)| now.0.saturating_sub(t.0) < window);
            let (conditions, login_notices, failures) = watch::judge_logins(cfg, &lines, &record.failures);
            if failures.0 > 0 {
                record.failures.push((now, failures.0, failures.1));
            }
            observed.push(("logins:", Some(conditions)));
            notices.extend(quiet_logins(&mut record.logins, login_notices, now));
            record.journal_cursor = cursor;
        }
        Err(e) => {
            println!("<4>kiln-agent: monitor: reading the journal: {e:#}");
            observed.push(("logins:", None));
        }
    }

    let events = transition(&mut record.open, observed, notices, now, &mut record.seq);
    for e in &events {
        let prio = match (e.kind, e.severity) {
            (EventKind::Cleared, _) | (_, Severity::Info) => 6,
            (_, Severity::Warning) => 4,
            (_, Severity::Alert) => 3,
        };
        println!("<{prio}>kiln-agent: monitor: {}", e.headline());
    }
    let mut history = events.clone();
    history.reverse();
    history.append(&mut record.events);
    history.truncate(cfg.history.max(1) as usize);
    record.events = history;
    record.outbox.extend(events.iter().filter(|e| is_alert(e)).cloned());
    let excess = record.outbox.len().saturating_sub(OUTBOX_LIMIT);
    record.outbox.drain(..excess);
    record.dropped_alerts += excess as u64;
    record.last_look = Some(now);

    let host = crate::system::hostname();
    let feed = StatusFeed {
        format: STATUS_FORMAT,
        device: DeviceInfo {
            hostname: host.clone(),
            device_id: device_id(state_dir),
            profile: device.profile.clone(),
            image: device.image.clone(),
            arch: device.arch.clone(),
            version: running.to_string(),
            channel: device.update.as_ref().map(|u| u.channel.clone()),
            booted: Some(booted),
        },
        updated: now,
        interval_secs: cfg.interval_secs,
        summary: Summary {
            update: update_summary(device, state.as_ref().ok()),
            last_check: state.as_ref().ok().and_then(|s| s.last_check),
            available: state.as_ref().ok().and_then(|s| s.offered.as_ref()).map(|o| o.version.to_string()),
            last_good_backup,
            backup_configured: device.backup.is_some(),
            data_used_percent: disk.as_ref().ok().map(|d| (d.used_percent * 10.0).round() / 10.0),
            data_inodes_percent: disk.as_ref().ok().map(|d| (d.inodes_percent * 10.0).round() / 10.0),
            clock_synchronised: clock.synchronised,
        },
        open: {
            let mut o: Vec<Event> = record.open.values().cloned().collect();
            o.sort_by_key(|e| (e.since, e.id.clone()));
            o
        },
        events: record.events.clone(),
        samples: record.samples.clone(),
    };
    let targets = Targets::resolve(cfg, Path::new(MONITOR_PROVISION_DIR), &host);
    let atom = status::atom(&feed, targets.push.as_deref().map(redact).as_deref());
    let json = feed.to_json();
    // The record first (the feed files are derived from it); when /var is full it cannot be
    // written, and the alerts go out all the same (a full /var is what they may be about).
    let written = crate::state::write_record(state_dir, RECORD_FILE, &record);
    if let Err(e) = &written {
        println!("<3>kiln-agent: monitor: recording: {e:#}; delivering anyway");
    }
    for (name, body) in [(FEED_ATOM, &atom), (FEED_JSON, &json)] {
        if let Err(e) = kiln_device::fs::write_atomically(&state_dir.join(name), body.as_bytes()) {
            println!("<4>kiln-agent: monitor: writing {}: {e}", state_dir.join(name).display());
        }
    }
    deliver(&targets, &mut record, &host, &atom, &json, now);
    written?;
    crate::state::write_record(state_dir, RECORD_FILE, &record)?;
    Ok(events)
}

/// The device's id, when it has one (provisioned, or made by its first backup); never made here.
fn device_id(state_dir: &Path) -> Option<String> {
    [Path::new(crate::backup::PROVISIONED_ID).to_path_buf(), state_dir.join(crate::backup::DEVICE_ID_FILE)]
        .iter()
        .find_map(|p| kiln_device::fs::read_regular(p, 256).ok())
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|id| kiln_device::valid_device_id(id))
}

/// One line for `kiln status`'s UPDATE column.
pub fn update_summary(device: &DeviceConfig, state: Option<&State>) -> String {
    let running = &device.version;
    if device.update.is_none() {
        return "no [update] in the profile".into();
    }
    let Some(s) = state else { return "unknown (the update record cannot be read)".into() };
    if let Some(i) = &s.install {
        return if s.booted == Some(i.slot) && s.current_version.as_ref() != Some(&i.version) {
            format!("{} on trial", i.version)
        } else if s.slot(i.slot).status == crate::state::SlotStatus::Trial {
            format!("{} installed, waiting for its reboot", i.version)
        } else {
            format!("installing {}", i.version)
        };
    }
    if let Some(f) = s.failed.iter().filter(|f| &f.version > running).max_by(|a, b| a.version.cmp(&b.version)) {
        return format!("{} failed, running {running}", f.version);
    }
    if let Some(o) = s.offered.as_ref().filter(|o| &o.version > running) {
        return format!("{} available{}", o.version, if o.security { " (security)" } else { "" });
    }
    if s.last_check.is_none() {
        return "not checked yet".into();
    }
    "up to date".into()
}

/// Alerts (outbox, oldest first; stops at the first failure so the order holds), the feed,
/// the heartbeat. Failures are printed and recorded, never fatal.
fn deliver(t: &Targets, record: &mut Record, host: &str, atom: &str, json: &str, now: Timestamp) {
    let client = match crate::download::client() {
        Ok(c) => c,
        Err(e) => {
            record.delivery_error = Some(format!("no HTTP client: {e:#}"));
            return;
        }
    };
    let mut errors = Vec::new();
    if let Some(url) = &t.alert_url {
        while let Some(e) = record.outbox.first() {
            match post_alert(&client, url, host, e) {
                Ok(()) => {
                    record.outbox.remove(0);
                }
                Err(Delivery::Refused(status)) => {
                    // Refused for good (400, 413, ...): retrying cannot help, and it must not
                    // hold back the alerts after it.
                    errors.push(format!("alert to {} refused with HTTP {status}: dropped", redact(url)));
                    record.outbox.remove(0);
                    record.dropped_alerts += 1;
                }
                Err(Delivery::Failed(err)) => {
                    errors.push(format!("alert to {}: {err}", redact(url)));
                    break;
                }
            }
        }
    } else {
        record.outbox.clear();
    }
    if let Some(url) = &t.push {
        let mut ok = true;
        for (u, body, ty) in
            [(Some(url), atom, "application/atom+xml"), (t.push_json.as_ref(), json, "application/json")]
        {
            let Some(u) = u else { continue };
            if let Err(err) = put(&client, u, body, ty, t.push_authorization.as_deref()) {
                errors.push(format!("push to {}: {err}", redact(u)));
                ok = false;
            }
        }
        if ok {
            record.last_push = Some(now);
        }
    }
    if let Some(url) = &t.heartbeat_url {
        if record.open.values().any(|e| e.severity == Severity::Alert) {
            // Silence is the message: the heartbeat service alerts when it stops.
        } else {
            match client.get(url).timeout(Duration::from_secs(20)).send() {
                Ok(r) if r.status().is_success() => record.last_heartbeat = Some(now),
                Ok(r) => errors.push(format!("heartbeat {}: HTTP {}", redact(url), r.status())),
                Err(err) => errors.push(format!("heartbeat {}: {}", redact(url), err.without_url())),
            }
        }
    }
    for e in &errors {
        println!("<4>kiln-agent: monitor: could not deliver: {e}");
    }
    record.delivery_error = (!errors.is_empty()).then(|| errors.join("; "));
}

/// Why an alert was not delivered.
enum Delivery {
    /// The server refused it for good (a 4xx other than 408 and 429).
    Refused(u16),
    /// Worth trying again at the next look (no answer, 5xx, 408, 429).
    Failed(String),
}

/// The most of an event's text an alert carries (ntfy takes 4096 bytes as a message).
const ALERT_BODY_LIMIT: usize = 3800;

fn post_alert(client: &reqwest::blocking::Client, url: &str, host: &str, e: &Event) -> Result<(), Delivery> {
    let title = format!("{host}: {}", e.headline());
    let priority = match (e.kind, e.severity) {
        (EventKind::Cleared, _) => "low",
        (_, Severity::Alert) => "high",
        _ => "default",
    };
    let scope = e.key.split(':').next().unwrap_or("kiln");
    let mut body = format!("{host}: {}\n", e.text());
    if body.len() > ALERT_BODY_LIMIT {
        let mut cut = ALERT_BODY_LIMIT;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
        body.push_str("…\n");
    }
    // HTTP header values must be visible ASCII: the body carries the full text.
    let header: String = title.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(200).collect();
    let resp = client
        .post(url)
        .header("Title", header)
        .header("Priority", priority)
        .header("Tags", format!("kiln,{}", scope.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>()))
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(body)
        .timeout(Duration::from_secs(20))
        .send()
        // reqwest's errors name the URL, query and user info included: never printed.
        .map_err(|err| Delivery::Failed(format!("POST: {}", err.without_url())))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
        return Err(Delivery::Refused(status.as_u16()));
    }
    Err(Delivery::Failed(format!("HTTP {status}")))
}

fn put(client: &reqwest::blocking::Client, url: &str, body: &str, ty: &str, auth: Option<&str>) -> Result<(), String> {
    let mut req = client.put(url).header("Content-Type", ty).body(body.to_string()).timeout(Duration::from_secs(30));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().map_err(|err| format!("PUT: {}", err.without_url()))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(key: &str, sev: Severity) -> Finding {
        Finding::new(key, sev, format!("{key} title"))
    }

    #[test]
    fn one_event_per_change_not_per_look() {
        let mut open = BTreeMap::new();
        let mut seq = 0;
        let e = transition(
            &mut open,
            vec![("disk:", Some(vec![f("disk:/var", Severity::Warning)]))],
            vec![],
            Timestamp(10),
            &mut seq,
        );
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].kind, e[0].since), (EventKind::Raised, Timestamp(10)));
        // The same again: nothing new.
        let e = transition(
            &mut open,
            vec![("disk:", Some(vec![f("disk:/var", Severity::Warning)]))],
            vec![],
            Timestamp(20),
            &mut seq,
        );
        assert_eq!(e, []);
        // Worse: raised again, since when it first held.
        let e = transition(
            &mut open,
            vec![("disk:", Some(vec![f("disk:/var", Severity::Alert)]))],
            vec![],
            Timestamp(30),
            &mut seq,
        );
        assert_eq!((e[0].kind, e[0].severity, e[0].since), (EventKind::Raised, Severity::Alert, Timestamp(10)));
        // A watcher that could not look keeps what it raised.
        let e = transition(&mut open, vec![("disk:", None)], vec![], Timestamp(40), &mut seq);
        assert_eq!(e, []);
        assert!(open.contains_key("disk:/var"));
        // Fixed: cleared once, with the severity it had and since when it held.
        let e = transition(
            &mut open,
            vec![("disk:", Some(vec![]))],
            vec![f("login:a@b", Severity::Info)],
            Timestamp(50),
            &mut seq,
        );
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].kind, e[0].severity, e[0].since, e[0].at),
            (EventKind::Cleared, Severity::Alert, Timestamp(10), Timestamp(50))
        );
        assert_eq!(e[1].kind, EventKind::Notice);
        assert!(open.is_empty());
        assert!(!is_alert(&e[1]), "logins are in the feed, not sent as alerts");
        assert_eq!(seq, 4);
        assert_eq!(e[1].id, "50-4");
    }

    #[test]
    fn the_worst_finding_of_a_key_counts_and_open_ones_show_todays_figures() {
        let mut open = BTreeMap::new();
        let mut seq = 0;
        let two = vec![f("cert:a", Severity::Warning), f("cert:a", Severity::Alert)];
        let e = transition(&mut open, vec![("cert:", Some(two.clone()))], vec![], Timestamp(1), &mut seq);
        assert_eq!(e.iter().map(|e| e.severity).collect::<Vec<_>>(), [Severity::Alert]);
        let e = transition(
            &mut open,
            vec![("cert:", Some(two.into_iter().rev().collect()))],
            vec![],
            Timestamp(2),
            &mut seq,
        );
        assert_eq!(e, [], "the same two findings in another order are no news");
        let mut later = f("cert:a", Severity::Alert);
        later.title = "expires in 1 day(s)".into();
        assert_eq!(transition(&mut open, vec![("cert:", Some(vec![later]))], vec![], Timestamp(3), &mut seq), []);
        assert_eq!(open["cert:a"].title, "expires in 1 day(s)");
    }

    #[test]
    fn a_boot_is_noted_once_with_how_the_one_before_ended() {
        let mut r = Record::default();
        assert!(note(&mut r, Some("b1".into())));
        assert_eq!(r.previous_boot_clean, None, "the first boot ever: nothing to say");
        assert!(!note(&mut r, Some("b1".into())), "noted at boot, the look finds it noted");
        r.clean_stop = Some("b1".into());
        assert!(note(&mut r, Some("b2".into())));
        assert_eq!(r.previous_boot_clean, Some(true));
        // b2 ends without its stop unit (a power cut), even before any look.
        assert!(note(&mut r, Some("b3".into())));
        assert_eq!(r.previous_boot_clean, Some(false));
        let old: Record = serde_json::from_str(r#"{"seq": 3}"#).unwrap();
        assert_eq!(old.seq, 3, "a record of an older agent reads");
    }

    #[test]
    fn logins_are_reported_once_an_hour_per_user_and_address() {
        let login = |title: &str| {
            let mut f = Finding::new("login:admin@10.0.2.2", Severity::Info, title).detail("key: ED25519 SHA256:abc");
            f.count = if title.ends_with("(3 times)") { 3 } else { 1 };
            f
        };
        let mut seen = BTreeMap::new();
        let out = quiet_logins(&mut seen, vec![login("admin logged in over SSH from 10.0.2.2")], Timestamp(1000));
        assert_eq!(out.len(), 1);
        let other = Finding::new("sudo:eve", Severity::Warning, "sudo refused eve 1 time(s)");
        let out = quiet_logins(
            &mut seen,
            vec![login("admin logged in over SSH from 10.0.2.2 (3 times)"), other.clone()],
            Timestamp(1300),
        );
        assert_eq!(out, [other], "within the hour: counted, not reported");
        let out =
            quiet_logins(&mut seen, vec![login("admin logged in over SSH from 10.0.2.2")], Timestamp(1000 + 3600));
        assert_eq!(out.len(), 1);
        assert!(
            out[0].detail.ends_with("; 3 more login(s) since 1970-01-01T00:16:40Z not reported one by one"),
            "{}",
            out[0].detail
        );
        assert_eq!(seen["admin@10.0.2.2"], (Timestamp(4600), 0));
    }

    #[test]
    fn provisioned_urls_win_and_name_the_twin() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MonitorConfig {
            push: Some("https://dav.example/kiln/{hostname}.atom".into()),
            alert_url: Some("https://ntfy.example/home".into()),
            ..Default::default()
        };
        let t = Targets::resolve(&cfg, dir.path(), "home");
        assert_eq!(t.push.as_deref(), Some("https://dav.example/kiln/home.atom"));
        assert_eq!(t.push_json.as_deref(), Some("https://dav.example/kiln/home.json"));
        assert_eq!(t.heartbeat_url, None);
        std::fs::write(dir.path().join("push-url"), "https://s3.example/b/home.atom?X-Amz-Signature=secret\n").unwrap();
        std::fs::write(dir.path().join("heartbeat-url"), "https://hc.example/ping/uuid").unwrap();
        std::fs::write(dir.path().join("alert-url"), "ftp://nope").unwrap();
        std::fs::write(dir.path().join("push-authorization"), "Basic ZGV2OnB3\n").unwrap();
        let t = Targets::resolve(&cfg, dir.path(), "home");
        assert_eq!(t.push_json.as_deref(), Some("https://s3.example/b/home.json?X-Amz-Signature=secret"));
        assert_eq!(t.heartbeat_url.as_deref(), Some("https://hc.example/ping/uuid"));
        assert_eq!(t.alert_url, None, "a provisioned URL that is not http(s) is not used");
        assert_eq!(t.push_authorization.as_deref(), Some("Basic ZGV2OnB3"));
        assert_eq!(redact("https://s3.example/b/home.atom?X-Amz-Signature=secret"), "https://s3.example/b/home.atom");
        assert_eq!(redact("https://u:pw@dav.example/x.atom"), "https://***@dav.example/x.atom");
    }

    #[test]
    fn update_summary_says_where_the_device_stands() {
        let device = DeviceConfig::parse(crate::update::tests::DEVICE).unwrap();
        let mut s = State::default();
        assert_eq!(update_summary(&device, Some(&s)), "not checked yet");
        s.last_check = Some(Timestamp(1));
        assert_eq!(update_summary(&device, Some(&s)), "up to date");
        s.offered =
            Some(crate::state::Offered { version: "0.9.0".parse().unwrap(), since: Timestamp(1), security: true });
        assert_eq!(update_summary(&device, Some(&s)), "0.9.0 available (security)");
        s.failed.push(crate::state::Failure {
            version: "0.9.0".parse().unwrap(),
            at: Timestamp(2),
            reason: "x".into(),
        });
        assert_eq!(update_summary(&device, Some(&s)), format!("0.9.0 failed, running {}", device.version));
    }
}
