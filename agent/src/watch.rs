//! What `kiln-agent monitor` watches. Each watcher is an `observe_*` function that reads the
//! running system (sysfs, statvfs, systemd, the journal, the agent's own records) and a pure
//! `judge_*` function that turns what was seen into [`Finding`]s: the conditions that hold now
//! (raised while they hold, cleared when they stop) and one-off notices. The judges are
//! unit-tested on recorded inputs; `monitor` keeps the state between looks.

use crate::exec::Cmd;
use crate::state::State;
use kiln_device::MonitorConfig;
use kiln_feed::status::Severity;
use kiln_feed::{Timestamp, Version};
use std::collections::BTreeMap;
use std::path::Path;

/// A condition that holds now (or, from a notice watcher, something that just happened).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Its identity across looks: "disk:/var", "unit:x.service", "update:failed:0.3.0".
    pub key: String,
    pub severity: Severity,
    pub title: String,
    pub detail: String,
    pub what_to_do: String,
    /// Since when it holds, when the watcher knows better than "now" (a failure's record).
    pub since: Option<Timestamp>,
    /// How many times it happened (a notice that stands for several: logins).
    pub count: u32,
}

impl Finding {
    pub fn new(key: impl Into<String>, severity: Severity, title: impl Into<String>) -> Finding {
        Finding {
            key: key.into(),
            severity,
            title: title.into(),
            detail: String::new(),
            what_to_do: String::new(),
            since: None,
            count: 1,
        }
    }
    pub fn detail(mut self, d: impl Into<String>) -> Finding {
        self.detail = d.into();
        self
    }
    fn todo(mut self, d: impl Into<String>) -> Finding {
        self.what_to_do = d.into();
        self
    }
    fn since(mut self, t: Timestamp) -> Finding {
        self.since = Some(t);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Units: failed or crash-looping.

/// One service as systemd shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSeen {
    pub id: String,
    pub active: String,
    pub result: String,
    pub restarts: u32,
}

/// Units whose failures other watchers report (backups, update checks) or that are the monitor.
fn watched_elsewhere(id: &str) -> bool {
    id.starts_with("kiln-backup") || id.starts_with("kiln-monitor") || id == "kiln-agent.service"
}

/// Each unit's restart counts at recent looks, oldest first: (time, NRestarts).
pub type RestartMemory = BTreeMap<String, Vec<(Timestamp, u32)>>;

/// How far back restarts count towards a crash loop: ten minutes, or two looks when those are
/// further apart. A unit that stops restarting is cleared after that; one stopped at once.
pub fn crash_window(cfg: &MonitorConfig) -> u64 {
    (2 * cfg.interval_secs).max(600)
}

/// Failed units, and units restarted `cfg.restarts` times or more within [`crash_window`] that
/// are still being restarted (`memory`: their counts at earlier looks, [`remember_restarts`]).
pub fn judge_units(cfg: &MonitorConfig, units: &[UnitSeen], memory: &RestartMemory) -> Vec<Finding> {
    let mut out = Vec::new();
    for u in units.iter().filter(|u| !watched_elsewhere(&u.id)) {
        let baseline = memory.get(&u.id).and_then(|m| m.first()).map(|(_, n)| *n).unwrap_or(u.restarts);
        // A counter lower than before: the unit was started afresh, every restart is new.
        let restarted = if u.restarts >= baseline { u.restarts - baseline } else { u.restarts };
        let todo = format!(
            "read `journalctl -u {}` on the device; once it is fixed, `systemctl reset-failed {}` (or the next update) clears this",
            u.id, u.id
        );
        if u.active == "failed" {
            out.push(
                Finding::new(format!("unit:{}", u.id), Severity::Alert, format!("{} failed", u.id))
                    .detail(format!("result: {}; restarted {} time(s) since it was started", u.result, u.restarts))
                    .todo(todo),
            );
        } else if restarted >= cfg.restarts.max(1) && u.active != "inactive" {
            out.push(
                Finding::new(format!("unit:{}", u.id), Severity::Alert, format!("{} is crash-looping", u.id))
                    .detail(format!(
                        "restarted {restarted} time(s) in the last {} min ({} since it was started); now {}, last result {}",
                        crash_window(cfg) / 60,
                        u.restarts,
                        u.active,
                        u.result
                    ))
                    .todo(todo),
            );
        }
    }
    out
}

/// Adds this look's counts to `memory`, keeps the looks within the window plus the last one
/// before it (the baseline), and forgets units that are gone.
pub fn remember_restarts(memory: &mut RestartMemory, units: &[UnitSeen], now: Timestamp, window: u64) {
    memory.retain(|id, _| units.iter().any(|u| &u.id == id));
    for u in units {
        if u.restarts == 0 && !memory.contains_key(&u.id) {
            continue;
        }
        let m = memory.entry(u.id.clone()).or_default();
        m.push((now, u.restarts));
        let inside = m.iter().position(|(t, _)| now.0.saturating_sub(t.0) <= window).unwrap_or(m.len());
        m.drain(..inside.saturating_sub(1));
    }
}

/// Every loaded service's state and restart count, in two systemctl calls.
pub fn observe_units() -> anyhow::Result<Vec<UnitSeen>> {
    let list = Cmd::new("systemctl")
        .args(["list-units", "--type=service", "--all", "--plain", "--no-legend", "--no-pager"])
        .output()?;
    let names: Vec<String> = String::from_utf8_lossy(&list)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.ends_with(".service"))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let shown = Cmd::new("systemctl")
        .args(["show", "--property=Id,ActiveState,Result,NRestarts", "--no-pager"])
        .args(&names)
        .output()?;
    Ok(parse_units(&String::from_utf8_lossy(&shown)))
}

/// `systemctl show` of many units: blocks of `Key=value` lines separated by blank lines.
pub fn parse_units(text: &str) -> Vec<UnitSeen> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut u = UnitSeen { id: String::new(), active: String::new(), result: String::new(), restarts: 0 };
        for line in block.lines() {
            match line.split_once('=') {
                Some(("Id", v)) => u.id = v.to_string(),
                Some(("ActiveState", v)) => u.active = v.to_string(),
                Some(("Result", v)) => u.result = v.to_string(),
                Some(("NRestarts", v)) => u.restarts = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if !u.id.is_empty() {
            out.push(u);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The data partition.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskSeen {
    pub used_percent: f64,
    pub inodes_percent: f64,
    pub size: u64,
}

pub fn observe_disk(path: &Path) -> anyhow::Result<DiskSeen> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| anyhow::anyhow!("statvfs {}: {e}", path.display()))?;
    let frag = s.fragment_size() as u64;
    let (blocks, free, avail) = (s.blocks() as u64, s.blocks_free() as u64, s.blocks_available() as u64);
    // As df counts it: used / (used + available to users).
    let used = blocks.saturating_sub(free);
    let used_percent = if used + avail == 0 { 0.0 } else { 100.0 * used as f64 / (used + avail) as f64 };
    let (files, ffree) = (s.files() as u64, s.files_free() as u64);
    let inodes_percent = if files == 0 { 0.0 } else { 100.0 * files.saturating_sub(ffree) as f64 / files as f64 };
    Ok(DiskSeen { used_percent, inodes_percent, size: blocks * frag })
}

/// Percentage points below a threshold a value must fall before a condition eases: a disk at
/// 85 % give or take a file does not raise and clear at every look.
pub const HYSTERESIS: f64 = 2.0;

/// /var past the warning or the alert threshold, bytes or inodes (`open`: the severity each key
/// has now, which holds until the value is [`HYSTERESIS`] below its threshold); a /var that is a
/// temporary file system because the data partition could not be mounted (`data_error`).
pub fn judge_disk(
    cfg: &MonitorConfig,
    d: &DiskSeen,
    data_error: Option<&str>,
    open: &BTreeMap<String, Severity>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(e) = data_error {
        out.push(
            Finding::new("disk:data", Severity::Alert, "the data partition is not mounted: /var is temporary for this boot")
                .detail(e.to_string())
                .todo("nothing written to /var survives a reboot: check the medium (`kiln-agent status`), restore from backup if it is lost"),
        );
    }
    for (what, value, warn, alert, key) in [
        ("full", d.used_percent, cfg.disk_warn, cfg.disk_alert, "disk:/var"),
        ("of its inodes used", d.inodes_percent, cfg.inodes_warn, cfg.inodes_alert, "inodes:/var"),
    ] {
        let held = open.get(key).copied();
        let at_least = |threshold: u8, sev: Severity| {
            let margin = if held >= Some(sev) { HYSTERESIS } else { 0.0 };
            value >= f64::from(threshold) - margin
        };
        let severity = if at_least(alert, Severity::Alert) {
            Severity::Alert
        } else if at_least(warn, Severity::Warning) {
            Severity::Warning
        } else {
            continue;
        };
        out.push(
            Finding::new(key, severity, format!("/var is {value:.0} % {what}"))
                .detail(format!(
                    "the data partition ({:.1} GiB) is at {value:.1} %; warning at {warn} %, alert at {alert} %",
                    d.size as f64 / (1u64 << 30) as f64
                ))
                .todo("find what grew (`du -xh -d2 /var | sort -h | tail` on the device): logs, a service's data, backups' cache; give the data partition a larger medium if it is simply full"),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Backups: the backup record's own alerts, one finding each.

pub fn judge_backups(alerts: &[String]) -> Vec<Finding> {
    alerts
        .iter()
        .map(|a| {
            Finding::new(format!("backup:{}", crate::backup::alert_key(a)), Severity::Alert, a.clone())
                .todo("`kiln-agent backup status` on the device says more; check the target is reachable and the device's credentials (provision/backup/)")
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Updates.

/// A running version, the update record and the time: rolled back, refused, offered but not
/// installed for `update_stale_secs`, a security release pending, no successful check lately.
pub fn judge_updates(
    cfg: &MonitorConfig,
    running: &Version,
    state: &State,
    now: Timestamp,
    watching_since: Timestamp,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for f in state.failed.iter().filter(|f| &f.version > running) {
        out.push(
            Finding::new(
                format!("update:failed:{}", f.version),
                Severity::Alert,
                format!("update to {} failed and was rolled back to {running}", f.version),
            )
            .detail(f.reason.clone())
            .todo(format!(
                "the device will not try {} again: publish a fixed, newer release (its health check's output is in the journal of that boot)",
                f.version
            ))
            .since(f.at),
        );
    }
    if state.last_result.as_deref() == Some("refused") {
        let why = state.last_error.clone().unwrap_or_default();
        out.push(
            Finding::new("update:refused", Severity::Warning, "the last update check refused what the feed offered")
                .detail(why)
                .todo("`kiln-agent status` on the device; check the feed's signature, channel, expiry (publish again before it expires)"),
        );
    }
    if let Some(o) = &state.offered {
        let failed = state.has_failed(&o.version).is_some();
        if &o.version > running && !failed && now.0.saturating_sub(o.since.0) > cfg.update_stale_secs {
            out.push(
                Finding::new(
                    "update:stale",
                    Severity::Alert,
                    format!("release {} is not installed (offered since {}, running {running})", o.version, o.since),
                )
                .detail(state.last_error.clone().unwrap_or_default())
                .todo("`kiln-agent status` says why (the update window, a backup required first, no space); `kiln-agent check --now` installs it")
                .since(o.since),
            );
        }
        if o.security && &o.version > running && !failed {
            out.push(
                Finding::new(
                    "update:security",
                    Severity::Warning,
                    format!("security release {} is not installed yet (running {running})", o.version),
                )
                .todo(
                    "it installs at the next check in the update window; `kiln-agent check --now` installs it at once",
                )
                .since(o.since),
            );
        }
    }
    let last = state.last_check.unwrap_or(watching_since);
    if now.0.saturating_sub(last.0) > cfg.update_stale_secs {
        out.push(
            Finding::new(
                "update:unchecked",
                Severity::Warning,
                format!("no update check has read the feed since {last}"),
            )
            .detail(state.last_error.clone().unwrap_or_default())
            .todo("check that the device reaches the feed (`kiln-agent check` on the device says why not)")
            .since(last),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Unclean shutdowns and watchdog resets (notices, once per boot).

/// WDIOF_CARDRESET: the watchdog caused the last reboot.
const WDIOF_CARDRESET: u32 = 0x20;

pub fn judge_restart(
    previous_boot_clean: Option<bool>,
    watchdog_bootstatus: Option<u32>,
    booted: Timestamp,
) -> Vec<Finding> {
    if watchdog_bootstatus.is_some_and(|s| s & WDIOF_CARDRESET != 0) {
        return vec![Finding::new("restart", Severity::Warning, format!("the watchdog reset the device (boot at {booted})"))
            .detail("the system stopped answering its hardware watchdog, which restarted it")
            .todo("read the journal of the boot before (`journalctl -b -1 -e`): a hang, memory exhaustion or a kernel problem")];
    }
    match previous_boot_clean {
        Some(false) => vec![Finding::new(
            "restart",
            Severity::Warning,
            format!("the device restarted without shutting down cleanly (boot at {booted})"),
        )
        .detail("a power cut, a crash or a reset: the boot before did not reach its shutdown")
        .todo("if it repeats, check the power supply and `journalctl -b -1 -e` for the last messages before it")],
        _ => Vec::new(),
    }
}

pub fn observe_watchdog_bootstatus() -> Option<u32> {
    let s = std::fs::read_to_string("/sys/class/watchdog/watchdog0/bootstatus").ok()?;
    let s = s.trim();
    s.strip_prefix("0x").map_or_else(|| s.parse().ok(), |h| u32::from_str_radix(h, 16).ok())
}

// ---------------------------------------------------------------------------------------------
// The clock.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockSeen {
    /// The image has systemd-timesyncd.
    pub timesync_installed: bool,
    pub timesync_running: bool,
    pub synchronised: bool,
    pub uptime_secs: u64,
}

pub fn judge_clock(cfg: &MonitorConfig, c: &ClockSeen) -> Vec<Finding> {
    if c.timesync_installed && !c.timesync_running {
        return vec![Finding::new("clock", Severity::Warning, "time synchronisation is off")
            .detail("systemd-timesyncd is not running: the clock drifts, and certificates, signatures and logs depend on it")
            .todo("`timedatectl set-ntp true` on the device")];
    }
    if !c.synchronised && c.uptime_secs > cfg.clock_grace_secs {
        return vec![Finding::new(
            "clock",
            Severity::Warning,
            format!("the clock is not synchronised {} min after boot", c.uptime_secs / 60),
        )
        .detail("no time server answered: update expiry checks fall back to the last time the device trusted")
        .todo("let the device reach an NTP server (UDP port 123), or set one in timesyncd.conf")];
    }
    Vec::new()
}

pub fn observe_clock() -> ClockSeen {
    let installed = Path::new("/usr/lib/systemd/system/systemd-timesyncd.service").exists();
    ClockSeen {
        timesync_installed: installed,
        timesync_running: installed && crate::system::is_active("systemd-timesyncd.service"),
        // timesyncd's mark, or the kernel's own status (whoever set the clock: chrony, ntpd).
        synchronised: crate::system::clock_synchronised() || crate::system::kernel_clock_synchronised(),
        uptime_secs: crate::system::uptime_secs(),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS certificates caddy manages.

/// Where caddy keeps certificates (`XDG_DATA_HOME=/var/lib/caddy` in kiln's catalog).
pub const CADDY_CERTIFICATES: &str = "/var/lib/caddy/caddy/certificates";

pub fn judge_certificates(cfg: &MonitorConfig, certs: &[(String, Timestamp)], now: Timestamp) -> Vec<Finding> {
    let mut out = Vec::new();
    let days = u64::from(cfg.cert_days.max(1));
    for (name, not_after) in certs {
        let left = not_after.0 as i64 - now.0 as i64;
        if left > (days * 86400) as i64 {
            continue;
        }
        let severity = if left < (days * 86400 / 3) as i64 { Severity::Alert } else { Severity::Warning };
        let title = if left <= 0 {
            format!("the TLS certificate of {name} expired at {not_after}")
        } else {
            format!("the TLS certificate of {name} expires in {} day(s)", left / 86400)
        };
        out.push(
            Finding::new(format!("cert:{name}"), severity, title)
                .detail(format!("valid until {not_after}; caddy renews 30 days before, so renewal has been failing"))
                .todo("read `journalctl -u caddy` on the device: the ACME challenge needs the domain's DNS to point here and ports 80/443 reachable"),
        );
    }
    out
}

/// Every `<issuer>/<domain>/<domain>.crt` under `dir`, with its notAfter.
pub fn observe_certificates(dir: &Path) -> Vec<(String, Timestamp)> {
    let mut out = Vec::new();
    for issuer in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for domain in std::fs::read_dir(issuer.path()).into_iter().flatten().flatten() {
            let name = domain.file_name().to_string_lossy().into_owned();
            let crt = domain.path().join(format!("{name}.crt"));
            let Ok(pem) = kiln_device::fs::read_regular(&crt, 1 << 20) else { continue };
            match crate::x509::not_after_pem(&String::from_utf8_lossy(&pem)) {
                Some(t) => out.push((name, t)),
                None => println!("<4>kiln-agent: monitor: {} is not a certificate this agent can read", crt.display()),
            }
        }
    }
    // The same domain under two issuers (a switch from one CA to another): the later expiry counts.
    let mut latest: BTreeMap<String, Timestamp> = BTreeMap::new();
    for (name, t) in out {
        let e = latest.entry(name).or_insert(t);
        *e = (*e).max(t);
    }
    latest.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Raspberry Pi: power and temperature; SD/eMMC wear.

/// The firmware's throttling bits (`get_throttled`): bit 0 under-voltage now, 1 frequency
/// capped, 2 throttled, 3 soft temperature limit; bits 16-19 the same "since boot".
pub fn judge_power(undervoltage_alarm: Option<bool>, throttled: Option<u32>) -> Vec<Finding> {
    let mut out = Vec::new();
    let under = undervoltage_alarm.unwrap_or(false) || throttled.is_some_and(|t| t & 0x1 != 0);
    if under {
        out.push(
            Finding::new("power", Severity::Alert, "under-voltage: the power supply is too weak")
                .detail("the board reports its supply below 4.63 V: SD card corruption and random resets follow")
                .todo("use the board's official power supply and a short, thick cable; remove USB devices that draw power"),
        );
    }
    if let Some(t) = throttled.filter(|t| t & 0x6 != 0 || t & 0x8 != 0) {
        out.push(
            Finding::new("thermal", Severity::Warning, "the CPU is throttled")
                .detail(format!(
                    "firmware throttling flags 0x{t:x} (frequency capped or throttled: too hot, or too little power)"
                ))
                .todo("give the board a heat sink or a fan, and air around it"),
        );
    }
    out
}

pub fn observe_power() -> (Option<bool>, Option<u32>) {
    let mut alarm = None;
    for h in std::fs::read_dir("/sys/class/hwmon").into_iter().flatten().flatten() {
        if std::fs::read_to_string(h.path().join("name")).is_ok_and(|n| n.trim() == "rpi_volt") {
            alarm = std::fs::read_to_string(h.path().join("in0_lcrit_alarm")).ok().map(|v| v.trim() == "1");
        }
    }
    let throttled = std::fs::read_to_string("/sys/devices/platform/soc/soc:firmware/get_throttled")
        .ok()
        .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok());
    (alarm, throttled)
}

/// eMMC/SD wear as the card reports it: `pre_eol_info` (1 normal, 2 warning: 80 % of reserved
/// blocks used, 3 urgent) and `life_time` (two estimates, 0x01 = 0-10 % used ... 0x0A = 90-100 %,
/// 0x0B = exceeded).
pub fn judge_wear(device: &str, pre_eol: Option<u8>, life: Option<(u8, u8)>) -> Vec<Finding> {
    let worst = life.map(|(a, b)| a.max(b)).unwrap_or(0);
    let severity = if pre_eol == Some(3) || worst >= 0x0A {
        Severity::Alert
    } else if pre_eol == Some(2) || worst >= 0x09 {
        Severity::Warning
    } else {
        return Vec::new();
    };
    let used = match worst {
        0 => "unknown".to_string(),
        0x0B => "beyond its rated life".to_string(),
        w => format!("{}-{} % of its rated life", (w - 1) * 10, w * 10),
    };
    vec![Finding::new(format!("storage:{device}"), severity, format!("the storage {device} is wearing out"))
        .detail(format!(
            "the card reports {used} used (pre-EOL {})",
            pre_eol.map(|p| p.to_string()).unwrap_or("-".into())
        ))
        .todo("replace the card before it fails: flash a new one, provision it and let it restore its backup")]
}

/// One MMC device's wear figures: (name, pre_eol_info, life_time).
pub type Wear = (String, Option<u8>, Option<(u8, u8)>);

/// Every MMC device's wear figures.
pub fn observe_wear() -> Vec<Wear> {
    let hex = |s: &str| u8::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    let mut out = Vec::new();
    for b in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = b.file_name().to_string_lossy().into_owned();
        if !name.starts_with("mmcblk") || name.contains("boot") || name.contains("rpmb") {
            continue;
        }
        let dev = b.path().join("device");
        let pre = std::fs::read_to_string(dev.join("pre_eol_info")).ok().and_then(|s| hex(&s));
        let life = std::fs::read_to_string(dev.join("life_time")).ok().and_then(|s| {
            let mut it = s.split_whitespace();
            Some((hex(it.next()?)?, hex(it.next()?)?))
        });
        if pre.is_some() || life.is_some() {
            out.push((name, pre, life));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Logins: who logged in from where (a notice), bursts of failed logins and sudo denials.

/// One journal line of sshd or sudo.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub identifier: String,
    pub message: String,
}

/// Failed logins and sudo denials seen at recent looks: (time, count, count by address).
pub type FailureMemory = Vec<(Timestamp, u32, BTreeMap<String, u32>)>;

/// This look's failures: (count, count by address), for [`FailureMemory`].
pub type Failures = (u32, BTreeMap<String, u32>);

/// Logins grouped by user and address (notices), and failures counted with those of the
/// earlier looks in `earlier` (the caller keeps [`crash_window`] of them) against
/// `cfg.failed_logins` (a condition while the window holds that many).
pub fn judge_logins(
    cfg: &MonitorConfig,
    lines: &[LogLine],
    earlier: &FailureMemory,
) -> (Vec<Finding>, Vec<Finding>, Failures) {
    let mut logins: BTreeMap<(String, String), (u32, String)> = BTreeMap::new();
    let mut failed = 0u32;
    let mut sources: BTreeMap<String, u32> = BTreeMap::new();
    let mut sudo_denied: BTreeMap<String, u32> = BTreeMap::new();
    for l in lines {
        let m = l.message.as_str();
        if l.identifier.starts_with("sshd") {
            if let Some(rest) = m.strip_prefix("Accepted ") {
                // "publickey for admin from 10.0.2.2 port 5555 ssh2: ED25519 SHA256:..."
                let words: Vec<&str> = rest.split_whitespace().collect();
                if let (Some(user), Some(from)) = (word_after(&words, "for"), word_after(&words, "from")) {
                    let key = rest.split_once(": ").map(|(_, k)| k.to_string()).unwrap_or_else(|| words[0].to_string());
                    let e = logins.entry((user.to_string(), from.to_string())).or_insert((0, key));
                    e.0 += 1;
                }
            } else if m.starts_with("Invalid user ")
                || m.starts_with("Failed ")
                || m.starts_with("Connection closed by authenticating user ")
                || m.starts_with("Disconnected from authenticating user ")
                || m.contains("maximum authentication attempts exceeded")
            {
                failed += 1;
                // The address sshd names after "from" (or before "port": "closed by ... user X IP port N").
                let words: Vec<&str> = m.split_whitespace().collect();
                let ip = word_after(&words, "from").or_else(|| {
                    words.iter().position(|w| *w == "port").and_then(|i| i.checked_sub(1)).map(|i| words[i])
                });
                if let Some(ip) = ip.filter(|w| w.parse::<std::net::IpAddr>().is_ok()) {
                    *sources.entry(ip.to_string()).or_default() += 1;
                }
            }
        } else if l.identifier == "sudo"
            && (m.contains("NOT in sudoers")
                || m.contains("command not allowed")
                || m.contains("incorrect password attempt")
                || m.contains("a password is required"))
        {
            failed += 1;
            let user = m.split(" : ").next().unwrap_or("?").trim().to_string();
            *sudo_denied.entry(user).or_default() += 1;
        }
    }
    let mut notices: Vec<Finding> = logins
        .into_iter()
        .map(|((user, from), (n, key))| {
            let times = if n == 1 { String::new() } else { format!(" ({n} times)") };
            let mut f = Finding::new(
                format!("login:{user}@{from}"),
                Severity::Info,
                format!("{user} logged in over SSH from {from}{times}"),
            )
            .detail(format!("key: {key}"));
            f.count = n;
            f
        })
        .collect();
    if !sudo_denied.is_empty() {
        // One notice per look, however many users a flood names.
        let n: u32 = sudo_denied.values().sum();
        let users: Vec<String> = sudo_denied.iter().take(5).map(|(u, n)| format!("{u} ({n})")).collect();
        let more = if sudo_denied.len() > 5 { format!(" and {} more", sudo_denied.len() - 5) } else { String::new() };
        notices.push(
            Finding::new("sudo:denied", Severity::Warning, format!("sudo refused {n} time(s)"))
                .detail(format!("users: {}{more}", users.join(", ")))
                .todo("if that was not you, someone has a login on this device: rotate its SSH keys (provisioning) and read `journalctl _COMM=sudo`"),
        );
    }
    let mut conditions = Vec::new();
    let total = failed + earlier.iter().map(|(_, n, _)| n).sum::<u32>();
    if total >= cfg.failed_logins.max(1) {
        let mut all = sources.clone();
        for (_, _, by) in earlier {
            for (ip, n) in by {
                *all.entry(ip.clone()).or_default() += n;
            }
        }
        let mut top: Vec<(&String, &u32)> = all.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let from: Vec<String> = top.iter().take(5).map(|(ip, n)| format!("{ip} ({n})")).collect();
        conditions.push(
            Finding::new(
                "logins:failed",
                Severity::Alert,
                format!("{total} failed logins and sudo denials in the last {} min", crash_window(cfg) / 60),
            )
            .detail(if from.is_empty() { "no addresses logged".into() } else { format!("from {}", from.join(", ")) })
            .todo("SSH takes keys only, so guesses fail; if the addresses are not yours, keep port 22 off the internet (firewall, VPN)"),
        );
    }
    (conditions, notices, (failed, sources))
}

fn word_after<'a>(words: &[&'a str], marker: &str) -> Option<&'a str> {
    words.iter().position(|w| *w == marker).and_then(|i| words.get(i + 1)).copied()
}

/// The programs whose journal lines the login watch reads, matched on `_EXE` (set by journald
/// from the sending process, which a local user cannot choose, unlike SYSLOG_IDENTIFIER:
/// `logger -t sudo` forges nothing here).
pub const LOGIN_PROGRAMS: &[&str] =
    &["/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/lib/openssh/sshd-auth", "/usr/bin/sudo"];

/// sshd's and sudo's journal lines after `cursor` (this boot's when there is none, or when the
/// cursor is no longer valid: a vacuumed journal), and the cursor to start from next time. At
/// most `limit` lines are kept.
pub fn observe_journal(cursor: Option<&str>, limit: usize) -> anyhow::Result<(Vec<LogLine>, Option<String>)> {
    let run = |cursor: Option<&str>| {
        let cmd = Cmd::new("journalctl").args(["--no-pager", "-q", "-o", "json", "--output-fields=MESSAGE,_EXE"]);
        let cmd = match cursor {
            Some(c) => cmd.arg(format!("--after-cursor={c}")),
            None => cmd.arg("-b"),
        };
        cmd.args(LOGIN_PROGRAMS.iter().map(|p| format!("_EXE={p}"))).output()
    };
    let (out, cursor) = match run(cursor) {
        Ok(out) => (out, cursor),
        Err(e) if cursor.is_some() => {
            println!("<4>kiln-agent: monitor: the journal cursor did not work ({e}); reading this boot's lines");
            (run(None)?, None)
        }
        Err(e) => return Err(e.into()),
    };
    let mut lines = Vec::new();
    let mut last = cursor.map(str::to_string);
    for l in String::from_utf8_lossy(&out).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        if let Some(c) = v["__CURSOR"].as_str() {
            last = Some(c.to_string());
        }
        if lines.len() < limit {
            let exe = v["_EXE"].as_str().unwrap_or_default();
            lines.push(LogLine {
                identifier: exe.rsplit('/').next().unwrap_or_default().to_string(),
                message: v["MESSAGE"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    Ok((lines, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MonitorConfig {
        MonitorConfig::default()
    }

    #[test]
    fn units_failed_or_restarting_past_the_threshold() {
        // Recorded from `systemctl show` in a guest with a transient unit crash-looping.
        let shown = "Id=crashy.service\nActiveState=activating\nResult=exit-code\nNRestarts=7\n\n\
                     Id=ssh.service\nActiveState=active\nResult=success\nNRestarts=0\n\n\
                     Id=broken.service\nActiveState=failed\nResult=exit-code\nNRestarts=5\n\n\
                     Id=kiln-backup.service\nActiveState=failed\nResult=exit-code\nNRestarts=0\n";
        let units = parse_units(shown);
        assert_eq!(units.len(), 4);
        let mut memory = RestartMemory::new();
        // First sight: the count is the baseline, nothing is crash-looping yet.
        let f = judge_units(&cfg(), &units, &memory);
        assert_eq!(f.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["unit:broken.service"]);
        remember_restarts(&mut memory, &units, Timestamp(1000), 600);
        assert_eq!(memory["crashy.service"], [(Timestamp(1000), 7)]);
        assert!(!memory.contains_key("ssh.service"), "units that never restarted are not remembered");
        // Looks a few seconds apart, one or two restarts each: it adds up within the window.
        let at = |n: u32| {
            let mut u = units.clone();
            u[0].restarts = n;
            u
        };
        assert_eq!(judge_units(&cfg(), &at(9)[..1], &memory), []);
        remember_restarts(&mut memory, &at(9), Timestamp(1005), 600);
        let f = judge_units(&cfg(), &at(10)[..1], &memory);
        assert_eq!(f[0].title, "crashy.service is crash-looping");
        assert!(f[0].detail.starts_with("restarted 3 time(s) in the last 10 min"), "{}", f[0].detail);
        remember_restarts(&mut memory, &at(10), Timestamp(1010), 600);
        // Stopped by its owner: cleared at once.
        let mut stopped = at(10);
        stopped[0].active = "inactive".into();
        assert_eq!(judge_units(&cfg(), &stopped[..1], &memory), []);
        // No restart for longer than the window: the baseline moves up, cleared.
        remember_restarts(&mut memory, &at(10), Timestamp(1700), 600);
        assert_eq!(memory["crashy.service"], [(Timestamp(1010), 10), (Timestamp(1700), 10)]);
        remember_restarts(&mut memory, &at(10), Timestamp(2400), 600);
        assert_eq!(judge_units(&cfg(), &at(10)[..1], &memory), []);
        // Gone units are forgotten.
        remember_restarts(&mut memory, &units[1..2], Timestamp(2500), 600);
        assert!(memory.is_empty());
    }

    #[test]
    fn disk_warns_then_alerts_and_names_a_temporary_var() {
        let d = |used, inodes| DiskSeen { used_percent: used, inodes_percent: inodes, size: 1 << 30 };
        let none = BTreeMap::new();
        assert_eq!(judge_disk(&cfg(), &d(84.9, 10.0), None, &none), []);
        let w = judge_disk(&cfg(), &d(85.0, 10.0), None, &none);
        assert_eq!((w[0].key.as_str(), w[0].severity), ("disk:/var", Severity::Warning));
        assert_eq!(w[0].title, "/var is 85 % full");
        let a = judge_disk(&cfg(), &d(97.2, 96.0), None, &none);
        assert_eq!(
            a.iter().map(|f| (f.key.as_str(), f.severity)).collect::<Vec<_>>(),
            [("disk:/var", Severity::Alert), ("inodes:/var", Severity::Alert)]
        );
        let t = judge_disk(&cfg(), &d(1.0, 1.0), Some("mkfs.ext4 failed"), &none);
        assert_eq!((t[0].key.as_str(), t[0].detail.as_str()), ("disk:data", "mkfs.ext4 failed"));
        // Once raised, a condition holds until the value is 2 points below its threshold.
        let warned: BTreeMap<String, Severity> = [("disk:/var".to_string(), Severity::Warning)].into_iter().collect();
        assert_eq!(judge_disk(&cfg(), &d(83.5, 10.0), None, &warned)[0].severity, Severity::Warning);
        assert_eq!(judge_disk(&cfg(), &d(82.9, 10.0), None, &warned), []);
        let alerted: BTreeMap<String, Severity> = [("disk:/var".to_string(), Severity::Alert)].into_iter().collect();
        assert_eq!(judge_disk(&cfg(), &d(93.5, 10.0), None, &alerted)[0].severity, Severity::Alert);
        assert_eq!(judge_disk(&cfg(), &d(92.5, 10.0), None, &alerted)[0].severity, Severity::Warning);
    }

    fn state() -> State {
        State::default()
    }

    #[test]
    fn updates_rolled_back_refused_stale_security_unchecked() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        let day = 86400;
        let mut s = state();
        s.last_check = Some(Timestamp(10 * day));
        s.failed.push(crate::state::Failure { version: v("0.3.0"), at: Timestamp(9 * day), reason: "health".into() });
        let f = judge_updates(&cfg(), &v("0.2.0"), &s, Timestamp(10 * day), Timestamp(0));
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].key, "update:failed:0.3.0");
        assert_eq!(f[0].since, Some(Timestamp(9 * day)));
        // Running a newer release than the failed one clears it.
        assert_eq!(judge_updates(&cfg(), &v("0.4.0"), &s, Timestamp(10 * day), Timestamp(0)), []);

        let mut s = state();
        s.last_check = Some(Timestamp(10 * day));
        s.last_result = Some("refused".into());
        s.last_error = Some("metadata refused: bad signature".into());
        s.offered = Some(crate::state::Offered { version: v("0.4.0"), since: Timestamp(2 * day), security: true });
        let f = judge_updates(&cfg(), &v("0.2.0"), &s, Timestamp(10 * day), Timestamp(0));
        let keys: Vec<&str> = f.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["update:refused", "update:stale", "update:security"]);
        assert_eq!(f[0].detail, "metadata refused: bad signature");
        // Offered for less than update_stale (7 days): only the security warning.
        let f = judge_updates(&cfg(), &v("0.2.0"), &s, Timestamp(8 * day), Timestamp(0));
        assert_eq!(f.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["update:refused", "update:security"]);
        // No successful check for longer than update_stale.
        let mut s = state();
        s.last_check = Some(Timestamp(day));
        let f = judge_updates(&cfg(), &v("0.2.0"), &s, Timestamp(9 * day), Timestamp(0));
        assert_eq!(f[0].key, "update:unchecked");
        // Never checked, but only watching for a day: nothing yet.
        s.last_check = None;
        assert_eq!(judge_updates(&cfg(), &v("0.2.0"), &s, Timestamp(9 * day), Timestamp(8 * day)), []);
    }

    #[test]
    fn restarts_watchdog_first() {
        assert_eq!(judge_restart(Some(true), Some(0), Timestamp(5)), []);
        assert_eq!(judge_restart(None, None, Timestamp(5)), []);
        assert!(judge_restart(Some(false), None, Timestamp(5))[0].title.contains("without shutting down cleanly"));
        assert!(judge_restart(Some(false), Some(0x20), Timestamp(5))[0].title.starts_with("the watchdog reset"));
    }

    #[test]
    fn clock_off_at_once_unsynchronised_after_the_grace() {
        let c = |running, synced, up| ClockSeen {
            timesync_installed: true,
            timesync_running: running,
            synchronised: synced,
            uptime_secs: up,
        };
        assert_eq!(judge_clock(&cfg(), &c(false, true, 10))[0].title, "time synchronisation is off");
        assert_eq!(judge_clock(&cfg(), &c(true, false, 3000)), []);
        assert!(judge_clock(&cfg(), &c(true, false, 3700))[0].title.contains("not synchronised 61 min"));
        let none = ClockSeen { timesync_installed: false, ..c(false, false, 10) };
        assert_eq!(judge_clock(&cfg(), &none), [], "an image without timesyncd is judged by the grace only");
    }

    #[test]
    fn certificates_warn_within_cert_days_alert_within_a_third() {
        let day = 86400;
        let now = Timestamp(100 * day);
        let certs = vec![
            ("a.example".to_string(), Timestamp(130 * day)),
            ("b.example".to_string(), Timestamp(110 * day)),
            ("c.example".to_string(), Timestamp(102 * day)),
            ("d.example".to_string(), Timestamp(99 * day)),
        ];
        let f = judge_certificates(&cfg(), &certs, now);
        let got: Vec<(&str, Severity)> = f.iter().map(|f| (f.key.as_str(), f.severity)).collect();
        assert_eq!(
            got,
            [
                ("cert:b.example", Severity::Warning),
                ("cert:c.example", Severity::Alert),
                ("cert:d.example", Severity::Alert)
            ]
        );
        assert_eq!(f[0].title, "the TLS certificate of b.example expires in 10 day(s)");
        assert!(f[2].title.contains("expired at"));
    }

    #[test]
    fn pi_power_and_card_wear() {
        assert_eq!(judge_power(None, None), []);
        assert_eq!(judge_power(Some(false), Some(0x50000)), [], "only past events: nothing now");
        assert_eq!(judge_power(Some(true), None)[0].key, "power");
        let f = judge_power(None, Some(0x5));
        assert_eq!(f.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["power", "thermal"]);
        assert_eq!(judge_wear("mmcblk0", Some(1), Some((1, 2))), []);
        assert_eq!(judge_wear("mmcblk0", Some(2), Some((1, 2)))[0].severity, Severity::Warning);
        let f = judge_wear("mmcblk0", Some(1), Some((0x0A, 2)));
        assert_eq!(f[0].severity, Severity::Alert);
        assert!(f[0].detail.contains("90-100 % of its rated life"), "{}", f[0].detail);
    }

    #[test]
    fn logins_are_notices_bursts_of_failures_an_alert() {
        // Recorded from a trixie guest's journal (sshd-session and sudo).
        let l = |id: &str, m: &str| LogLine { identifier: id.into(), message: m.into() };
        let mut lines = vec![
            l("sshd-session", "Accepted publickey for admin from 10.0.2.2 port 40022 ssh2: ED25519 SHA256:abc"),
            l("sshd-session", "Accepted publickey for admin from 10.0.2.2 port 40024 ssh2: ED25519 SHA256:abc"),
            l("sshd-session", "pam_unix(sshd:session): session opened for user admin(uid=1000) by admin(uid=0)"),
            l("sudo", "  admin : user NOT in sudoers ; TTY=pts/0 ; PWD=/home/admin ; USER=root ; COMMAND=/bin/sh"),
        ];
        let (cond, notices, (failed, _)) = judge_logins(&cfg(), &lines, &Vec::new());
        assert_eq!((cond, failed), (vec![], 1));
        assert_eq!(notices[0].title, "admin logged in over SSH from 10.0.2.2 (2 times)");
        assert_eq!(notices[0].detail, "key: ED25519 SHA256:abc");
        assert_eq!(notices[0].count, 2);
        assert_eq!((notices[1].key.as_str(), notices[1].severity), ("sudo:denied", Severity::Warning));
        assert_eq!(notices[1].detail, "users: admin (1)");
        for i in 0..4 {
            lines.push(l("sshd-session", &format!("Invalid user oracle{i} from 203.0.113.9 port 5{i}000")));
        }
        // A user name that looks like an address does not take the blame.
        lines.push(l("sshd-session", "Invalid user 10.0.0.5 from 203.0.113.9 port 40000"));
        let (cond, _, failed) = judge_logins(&cfg(), &lines, &Vec::new());
        assert_eq!((cond, failed.0), (vec![], 6));
        // Spread over two looks, it adds up.
        let earlier = vec![(Timestamp(1), failed.0, failed.1)];
        let (cond, _, _) = judge_logins(&cfg(), &lines[4..], &earlier);
        assert_eq!(cond[0].title, "11 failed logins and sudo denials in the last 10 min");
        assert_eq!(cond[0].detail, "from 203.0.113.9 (10)");
    }
}
