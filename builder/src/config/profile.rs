//! Profiles: the user's TOML description of an appliance, with `extends` inheritance.
//!
//! Loading is strict. Every file is checked on its own against the schema before anything is
//! merged, so an error names the file that holds the mistake and the key path in it. Unknown
//! keys are errors: a typo in a security setting must never be silently ignored.
//!
//! Inheritance: `extends = "base"` names a profile next to this file or a built-in one. Tables
//! merge key by key (the child wins); lists replace the parent's list, except the lists in
//! [`APPENDING_LISTS`], which add to the parent's (so a profile adds packages to base's).

use kiln_device::{BeforeUpdate, Quiesce};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Lists that add to the parent's list instead of replacing it.
pub const APPENDING_LISTS: &[&str] =
    &["system.packages", "system.kernel_cmdline", "health.units", "health.commands", "hardening.disable_modules"];

/// The profiles compiled into kiln, used when no file of that name is found on disk.
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    ("base", include_str!("../../../profiles/base.toml")),
    ("minimal", include_str!("../../../profiles/minimal.toml")),
];

/// One profile file as written; every field optional because a child may set only a few.
#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// The parent profile: a name ("base") or a path relative to this file.
    pub extends: Option<String>,
    pub description: Option<String>,
    pub system: Option<System>,
    pub release: Option<Release>,
    /// Login users, by name. Root stays locked; users log in with SSH keys only.
    pub users: Option<BTreeMap<String, User>>,
    pub health: Option<Health>,
    /// Where devices get new releases from (the feed) and which key signs them.
    pub update: Option<Update>,
    /// Services the appliance runs, by name: a catalog entry (`caddy`, `syncthing`,
    /// `radicale`) or a program of your own (`exec`, and `binary` or `packages`).
    pub services: Option<BTreeMap<String, Service>>,
    /// The system-wide defaults: firewall, kernel settings, journal, watchdog, setuid binaries,
    /// and the exposure budget every service unit is scored against.
    pub hardening: Option<Hardening>,
    /// Encrypted backups with restic: where to, when, what to keep, and restore drills.
    /// The password and credentials are provisioned per device, never part of the image.
    pub backup: Option<Backup>,
    /// Networking beyond DHCP on every wired interface: Wi-Fi.
    pub network: Option<Network>,
    /// What the device watches (units, disk, backups, updates, clock, certificates, logins) and
    /// where it reports: a status feed, alerts, a heartbeat.
    pub monitor: Option<Monitor>,
}

/// `[monitor]`: what the device watches and where it reports. On by default with no URLs: the
/// status feed is kept on the device (`/var/lib/kiln-agent/status.atom`, `kiln-agent status`).
#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Monitor {
    /// How often the device looks (default "5m"): also the heartbeat's period.
    pub interval: Option<String>,
    /// The data partition's use in percent that raises a warning (default 85) and an alert (95).
    pub disk_warn: Option<i64>,
    pub disk_alert: Option<i64>,
    /// The same for its inodes (default 85 and 95).
    pub inodes_warn: Option<i64>,
    pub inodes_alert: Option<i64>,
    /// Restarts of a unit within ten minutes (or two looks) that count as crash-looping (default 3).
    pub restarts: Option<i64>,
    /// Warn when a TLS certificate caddy manages expires within this many days (default 14).
    pub cert_days: Option<i64>,
    /// Alert when a newer release has been offered and not installed for this long (default "7d").
    pub update_stale: Option<String>,
    /// Failed SSH logins and sudo denials within ten minutes (or two looks) that raise an alert (default 10).
    pub failed_logins: Option<i64>,
    /// Warn when the clock is not synchronised this long after boot (default "1h").
    pub clock_grace: Option<String>,
    /// Entries kept in the status feed (default 200).
    pub history: Option<i64>,
    /// Where the status feed is PUT after every look: "https://dav.example.org/kiln/{hostname}.atom"
    /// (the JSON twin next to it, `.json`). Credentials: per device, `provision/monitor/`.
    pub push: Option<String>,
    /// Where alerts are POSTed as plain text when raised and cleared ("https://ntfy.sh/my-home").
    pub alert_url: Option<String>,
    /// Fetched after every look while no alert is open: a dead man's switch
    /// ("https://hc-ping.com/<uuid>").
    pub heartbeat_url: Option<String>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Join the Wi-Fi networks provisioned per device (`provision/wifi/<name>.network`):
    /// wpa_supplicant and DHCP on every wireless interface (default false).
    pub wifi: Option<bool>,
    /// The regulatory country ("DE", "US", ...; ISO 3166-1 alpha-2): required with wifi.
    pub country: Option<String>,
    /// Firmware packages for the Wi-Fi chip (default: the image's, e.g. firmware-brcm80211 on
    /// a Raspberry Pi). Non-free firmware comes from Debian's non-free-firmware component.
    pub firmware: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// The restic repository: "rest:https://backup.example.org/home", "sftp:user@host:/srv/restic",
    /// "s3:...", "b2:...", ... A device's provisioned `backup/repository` wins over it.
    pub repository: Option<String>,
    /// When to back up: a systemd calendar expression (default "daily").
    pub schedule: Option<String>,
    /// Snapshots to keep when pruning (`keep = { daily = 7, weekly = 4, monthly = 12 }`).
    pub keep: Option<BTreeMap<String, i64>>,
    /// What to back up (default: every service's state directory, /home and /srv).
    pub paths: Option<Vec<String>>,
    /// restic exclude patterns ("*.tmp", "/var/lib/private/syncthing/index-*").
    pub exclude: Option<Vec<String>>,
    /// When to run a restore drill: a systemd calendar expression, or "off" (default "monthly").
    pub restore_drill: Option<String>,
    /// How much of the repository's data a drill reads back ("10%", "1/5"; default "10%").
    pub check_subset: Option<String>,
    /// Alert when the last good backup is older than this (default "2d").
    pub alert_after: Option<String>,
    /// The device prunes (`forget --prune`) after scheduled backups. Default false: targets
    /// should be append-only, and a trusted machine prunes them.
    pub prune: Option<bool>,
    /// Before installing an update: "require" a good backup (default), "try", or "off".
    pub before_update: Option<String>,
    /// A freshly flashed device restores its latest snapshot at first boot (default true).
    pub self_restore: Option<bool>,
    /// How long a target that does not answer is retried before a run fails (default "5m").
    pub retry: Option<String>,
    /// A URL alerts are POSTed to as plain text, when raised and when cleared
    /// ("https://ntfy.sh/my-backups", a webhook). Always: the journal and `kiln-agent backup status`.
    pub alert_url: Option<String>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// `false` drops a service a parent profile declared.
    pub enable: Option<bool>,
    /// The command line (absolute path first). Catalog services have their own.
    pub exec: Option<String>,
    /// A program to copy into the image (relative to the profile file that names it), installed
    /// as `/usr/local/bin/<file name>`.
    pub binary: Option<String>,
    /// Ports to open in the firewall: 8080 (TCP) or "8080/tcp", "51820/udp". Catalog services
    /// have their own; setting this replaces them.
    pub ports: Option<Vec<Port>>,
    /// A persistent state directory on the data partition (`/var/lib/<name>`).
    pub state: Option<bool>,
    /// Debian packages the service needs (added to the image).
    pub packages: Option<Vec<String>>,
    /// Environment variables for the service.
    pub environment: Option<BTreeMap<String, String>>,
    /// Sandbox directives to relax for this service only ("MemoryDenyWriteExecute" = "no").
    /// Shown in the build report and the manifest.
    pub loosen: Option<BTreeMap<String, String>>,
    /// This service's exposure budget (default: hardening.exposure_budget).
    pub exposure_budget: Option<f64>,
    /// caddy: the sites to serve.
    pub sites: Option<Vec<Site>>,
    /// How the state directory is backed up: "stop" (the service is stopped for the backup),
    /// "live" (its files are consistent at any moment), "skip" (not backed up).
    pub backup: Option<String>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The site's domain name: HTTPS with a certificate from Let's Encrypt/ZeroSSL. Without
    /// one, plain HTTP on port 80 for any name.
    pub domain: Option<String>,
    /// A directory to serve files from ("/srv/www").
    pub root: Option<String>,
    /// An address to forward requests to ("127.0.0.1:5232").
    pub proxy: Option<String>,
}

/// A port a service listens on: 8080 (TCP) or "8080/tcp", "443/udp".
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Port {
    Number(i64),
    Text(String),
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hardening {
    /// Drop every inbound connection but SSH and the services' declared ports (nftables).
    pub firewall: Option<bool>,
    /// The highest `systemd-analyze security` exposure a service unit may have (0.0-10.0).
    pub exposure_budget: Option<f64>,
    /// Kernel settings (`sysctl.d`), merged with the parent's by key.
    pub sysctl: Option<BTreeMap<String, SysctlValue>>,
    /// Kernel modules that can never be loaded (appends).
    pub disable_modules: Option<Vec<String>>,
    /// The only files allowed to keep a setuid/setgid bit; every other one loses it.
    pub setuid_allow: Option<Vec<String>>,
    /// Allow compilers and assemblers in the image (default: the build fails when one is there).
    pub allow_compilers: Option<bool>,
    /// The hardware watchdog the service manager keeps alive ("30s"; "off").
    pub watchdog: Option<String>,
    /// Keep the journal on the data partition across boots, at most this big ("256MiB").
    pub journal_max_use: Option<crate::units::Bytes>,
    /// Record privileged actions with the Linux audit system (auditd; kiln's rules, the log on
    /// the data partition, bounded).
    pub audit: Option<bool>,
    /// Give every login session its own private temporary directory (libpam-tmpdir).
    pub pam_tmpdir: Option<bool>,
    /// Mount /proc with hidepid=invisible: a user sees only their own processes (root and
    /// services running as root see all).
    pub hide_processes: Option<bool>,
    /// Mount /tmp, /dev/shm and /dev noexec: programs run only from the verified root, not from
    /// where anyone can write (a service that unpacks and loads native code in /tmp needs `false`).
    pub noexec_tmp: Option<bool>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum SysctlValue {
    Number(i64),
    Text(String),
}

impl fmt::Display for SysctlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysctlValue::Number(n) => write!(f, "{n}"),
            SysctlValue::Text(s) => write!(f, "{s}"),
        }
    }
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct System {
    /// Debian suite (default "trixie").
    pub suite: Option<String>,
    /// Debian mirror URI; default: the host's apt sources.
    pub mirror: Option<String>,
    /// Extra Debian packages (appends to the parent's list).
    pub packages: Option<Vec<String>>,
    pub hostname: Option<String>,
    /// An IANA zone name such as "Europe/Berlin" (default "Etc/UTC").
    pub timezone: Option<String>,
    /// Default "C.UTF-8"; any other locale installs `locales` and generates it.
    pub locale: Option<String>,
    /// Additions to the kernel command line (appends to the parent's list).
    pub kernel_cmdline: Option<Vec<String>>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// The image version; releases of one profile must increase.
    pub version: Option<String>,
    /// Timestamp used for every file and filesystem in the image (default: the build's clock,
    /// or the `SOURCE_DATE_EPOCH` environment variable).
    pub source_date_epoch: Option<u64>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// OpenSSH public keys ("ssh-ed25519 AAAA... comment").
    pub ssh_keys: Option<Vec<String>>,
    /// Supplementary groups; "sudo" gives passwordless administration.
    pub groups: Option<Vec<String>>,
    pub shell: Option<String>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Units that must be active for the system to count as healthy (appends).
    pub units: Option<Vec<String>>,
    /// Shell commands that must exit 0 (appends).
    pub commands: Option<Vec<String>>,
    /// Seconds to wait for boot to settle before the checks count as failed.
    pub timeout: Option<u32>,
}

#[derive(Deserialize, Serialize, Default, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// The Atom (or RSS) feed URL devices follow ("https://updates.example.org/stable.atom").
    pub feed: Option<String>,
    /// The signed metadata URL (default: the feed's URL with `.json` instead of `.atom`/`.rss`).
    pub metadata: Option<String>,
    /// Channel name (default: the metadata file's stem, "stable").
    pub channel: Option<String>,
    /// The release signing key: a path, relative to this profile file, to the public key file
    /// `kiln keygen` wrote (`kiln-ed25519:<hex>`), or that line itself. Baked into the image.
    pub public_key: Option<String>,
    /// Local time of day installs may start, "HH:MM-HH:MM" (default: any time).
    pub window: Option<String>,
    /// Time between checks ("6h", "30m"; default "6h").
    pub interval: Option<String>,
    /// Random delay added to every check so a fleet does not arrive at once (default "30m").
    pub jitter: Option<String>,
    /// Boots a new version gets to come up healthy before the previous one boots again (default 3).
    pub tries: Option<u32>,
}

/// Where a profile's text came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Builtin(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Builtin(name) => write!(f, "<built-in>/profiles/{name}.toml"),
        }
    }
}

/// An error in a profile, naming the file and, where there is one, the key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError {
    pub file: String,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}: {}: {}", self.file, k, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ProfileError {}

impl ProfileError {
    pub fn new(file: impl fmt::Display, key: Option<&str>, message: impl Into<String>) -> Self {
        ProfileError { file: file.to_string(), key: key.map(str::to_string), message: message.into() }
    }
}

/// A profile with its whole `extends` chain merged.
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    /// The profile's name: the file stem of the profile the user named.
    pub name: String,
    /// The files merged, child first.
    pub chain: Vec<Source>,
    pub merged: ProfileFile,
}

/// Finds the profile a user named on the command line: a path (contains '/' or ends in
/// ".toml"), else `profiles/NAME.toml` under `cwd`, else a built-in profile.
pub fn locate(arg: &str, cwd: &Path) -> Result<Source, ProfileError> {
    if arg.contains('/') || arg.ends_with(".toml") {
        let p = PathBuf::from(arg);
        if !p.is_file() {
            return Err(ProfileError::new(arg, None, "no such profile file"));
        }
        return Ok(Source::File(p));
    }
    let local = cwd.join("profiles").join(format!("{arg}.toml"));
    if local.is_file() {
        return Ok(Source::File(PathBuf::from("profiles").join(format!("{arg}.toml"))));
    }
    builtin(arg).map(Source::Builtin).ok_or_else(|| {
        ProfileError::new(
            format!("--profile {arg}"),
            None,
            format!(
                "no profile named {arg:?}: looked for profiles/{arg}.toml and the built-in profiles ({})",
                builtin_names()
            ),
        )
    })
}

fn builtin(name: &str) -> Option<&'static str> {
    BUILTIN_PROFILES.iter().find(|(n, _)| *n == name).map(|(n, _)| *n)
}

fn builtin_names() -> String {
    BUILTIN_PROFILES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

fn read_source(src: &Source) -> Result<String, ProfileError> {
    match src {
        Source::File(p) => {
            std::fs::read_to_string(p).map_err(|e| ProfileError::new(p.display(), None, format!("cannot read: {e}")))
        }
        Source::Builtin(name) => {
            Ok(BUILTIN_PROFILES.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_string()).unwrap_or_default())
        }
    }
}

/// Parses and checks one file on its own. Returns the raw table (for merging) and the typed form.
pub fn parse_file(src: &Source, text: &str) -> Result<(toml::Table, ProfileFile), ProfileError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| line_col(text, s.start))
            .map(|(l, c)| format!(" (line {l}, column {c})"))
            .unwrap_or_default();
        ProfileError::new(src, None, format!("not valid TOML{at}: {msg}"))
    })?;
    check_no_control_characters(src, &table, "")?;
    let typed = typed_from_table(src, &table)?;
    check_values(src, &typed)?;
    Ok((table, typed))
}

/// No profile string (key or value) may hold a control character or a Unicode line break:
/// every one of them ends up in a line-based syntax somewhere (a unit file, a shell script, a
/// kernel command line, nftables, a Caddyfile), where a `\r` or `\n` starts a line of the
/// attacker's choosing. Checked once for every string, before any field's own rules.
fn check_no_control_characters(src: &Source, table: &toml::Table, prefix: &str) -> Result<(), ProfileError> {
    fn bad(s: &str) -> Option<char> {
        s.chars().find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    }
    fn walk(src: &Source, key: &str, v: &toml::Value) -> Result<(), ProfileError> {
        match v {
            toml::Value::String(s) => match bad(s) {
                Some(c) => Err(ProfileError::new(
                    src,
                    Some(key),
                    format!(
                        "holds the control character U+{:04X}: profile strings are one line of printable text",
                        c as u32
                    ),
                )),
                None => Ok(()),
            },
            toml::Value::Array(a) => a.iter().enumerate().try_for_each(|(i, v)| walk(src, &format!("{key}[{i}]"), v)),
            toml::Value::Table(t) => check_no_control_characters(src, t, key),
            _ => Ok(()),
        }
    }
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if let Some(c) = bad(k) {
            return Err(ProfileError::new(
                src,
                Some(&key.escape_debug().to_string()),
                format!("a key holds the control character U+{:04X}", c as u32),
            ));
        }
        walk(src, &key, v)?;
    }
    Ok(())
}

fn typed_from_table(src: &Source, table: &toml::Table) -> Result<ProfileFile, ProfileError> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize::<_, ProfileFile>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let (key, message) = explain_serde_error(&path, &inner);
        ProfileError { file: src.to_string(), key, message }
    })
}

/// Turns serde's wording into kiln's: `unknown key "x" (expected one of: ...)`,
/// `expected a string, found integer 5`.
fn explain_serde_error(path: &str, inner: &str) -> (Option<String>, String) {
    // toml's value deserializer appends "\nin `key`\n"; the key path is reported separately.
    let cleaned: String = inner.lines().filter(|l| !l.starts_with("in `")).collect::<Vec<_>>().join("");
    let cleaned = cleaned.replace("a sequence", "a list").replace("a map", "a table");
    let cleaned = ["u8", "u16", "u32", "u64"]
        .iter()
        .fold(cleaned, |c, t| c.replace(&format!("expected {t}"), "expected a whole number"));
    let inner = cleaned.as_str();
    let path = if path == "." || path.is_empty() { None } else { Some(path.to_string()) };
    if let Some(rest) = inner.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = tail.trim_start_matches(", expected one of ").trim_start_matches(", expected ").replace('`', "");
        // serde_path_to_error's path already ends with the unknown key.
        let key = path.unwrap_or_else(|| field.to_string());
        return (Some(key), format!("unknown key (expected one of: {expected})"));
    }
    if let Some(rest) = inner.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            let found = found.replace('`', "");
            return (path, format!("expected {expected}, found {found}"));
        }
    }
    (path, inner.to_string())
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Checks of values that the type alone does not express.
fn check_values(src: &Source, p: &ProfileFile) -> Result<(), ProfileError> {
    let err = |key: &str, msg: String| Err(ProfileError::new(src, Some(key), msg));
    if let Some(n) = &p.network {
        if let Some(c) = &n.country {
            if !kiln_device::wifi::valid_country(c) {
                return err(
                    "network.country",
                    format!("expected a two-letter country code in capitals such as \"DE\" or \"US\" (ISO 3166-1), or \"00\", found {c:?}"),
                );
            }
        }
        for f in n.firmware.iter().flatten() {
            if !valid_package(f) {
                return err("network.firmware", format!("expected Debian package names, found {f:?}"));
            }
        }
    }
    if let Some(sys) = &p.system {
        if let Some(suite) = &sys.suite {
            if suite.is_empty() || !suite.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
                return err(
                    "system.suite",
                    format!("expected a Debian suite name such as \"trixie\", found {suite:?}"),
                );
            }
        }
        if let Some(h) = &sys.hostname {
            if !valid_hostname(h) {
                return err("system.hostname", format!("expected a hostname (letters, digits and '-', at most 63 characters, not starting or ending with '-'), found {h:?}"));
            }
        }
        if let Some(tz) = &sys.timezone {
            let ok = !tz.is_empty()
                && !tz.starts_with('/')
                && !tz.contains("..")
                && tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
            if !ok {
                return err(
                    "system.timezone",
                    format!("expected an IANA time zone such as \"Europe/Berlin\", found {tz:?}"),
                );
            }
        }
        if let Some(loc) = &sys.locale {
            if !(loc == "C.UTF-8" || (loc.contains('_') && loc.ends_with(".UTF-8"))) {
                return err(
                    "system.locale",
                    format!("expected \"C.UTF-8\" or a UTF-8 locale such as \"de_DE.UTF-8\", found {loc:?}"),
                );
            }
        }
        if let Some(pkgs) = &sys.packages {
            for (i, name) in pkgs.iter().enumerate() {
                if !valid_package(name) {
                    return err(
                        &format!("system.packages[{i}]"),
                        format!("expected a Debian package name (optionally name=version), found {name:?}"),
                    );
                }
            }
        }
        if let Some(mirror) = &sys.mirror {
            if !(mirror.starts_with("http://") || mirror.starts_with("https://") || mirror.starts_with("file:/")) {
                return err("system.mirror", format!("expected an http://, https:// or file:/ URI, found {mirror:?}"));
            }
        }
        if let Some(args) = &sys.kernel_cmdline {
            for (i, a) in args.iter().enumerate() {
                if a.is_empty() || a.chars().any(char::is_whitespace) {
                    return err(
                        &format!("system.kernel_cmdline[{i}]"),
                        format!("expected one kernel argument without spaces, found {a:?}"),
                    );
                }
                if a.starts_with("root=") || a.starts_with("kiln.") {
                    return err(
                        &format!("system.kernel_cmdline[{i}]"),
                        format!("{a:?} is set by kiln itself (verified root) and cannot be overridden"),
                    );
                }
                if a.contains(['"', '\'']) {
                    return err(
                        &format!("system.kernel_cmdline[{i}]"),
                        format!("expected a kernel argument without quotes (a quote joins the arguments after it), found {a:?}"),
                    );
                }
                if let Some(why) = defeats_fallback(a) {
                    return err(&format!("system.kernel_cmdline[{i}]"), format!("{a:?} is refused: {why}"));
                }
            }
        }
    }
    if let Some(users) = &p.users {
        for (name, u) in users {
            if !valid_user_name(name) {
                return err(&format!("users.{name}"), "expected a user name: lowercase letters, digits, '_' or '-', starting with a letter, at most 32 characters".into());
            }
            if name == "root" {
                return err(
                    "users.root",
                    "the root account stays locked; add a user in the \"sudo\" group instead".into(),
                );
            }
            for (i, k) in u.ssh_keys.iter().flatten().enumerate() {
                if !valid_ssh_key(k) {
                    return err(
                        &format!("users.{name}.ssh_keys[{i}]"),
                        "expected an OpenSSH public key line such as \"ssh-ed25519 AAAA... comment\"".into(),
                    );
                }
            }
            for (i, g) in u.groups.iter().flatten().enumerate() {
                if !valid_user_name(g) {
                    return err(&format!("users.{name}.groups[{i}]"), format!("expected a group name, found {g:?}"));
                }
            }
        }
    }
    if let Some(rel) = &p.release {
        if let Some(v) = &rel.version {
            if !valid_version(v) {
                return err(
                    "release.version",
                    format!("expected a version starting with a digit, such as \"1.4.0\", found {v:?}"),
                );
            }
        }
    }
    if let Some(u) = &p.update {
        for (key, url) in [("update.feed", &u.feed), ("update.metadata", &u.metadata)] {
            if let Some(url) = url {
                if !(url.starts_with("http://") || url.starts_with("https://")) || url.chars().any(char::is_whitespace)
                {
                    return err(key, format!("expected an http:// or https:// URL, found {url:?}"));
                }
            }
        }
        if let Some(w) = &u.window {
            if !valid_window(w) {
                return err(
                    "update.window",
                    format!("expected a daily window \"HH:MM-HH:MM\" such as \"03:00-05:00\", found {w:?}"),
                );
            }
        }
        for (key, d) in [("update.interval", &u.interval), ("update.jitter", &u.jitter)] {
            if let Some(d) = d {
                if humantime::parse_duration(d).is_err() {
                    return err(key, format!("expected a duration such as \"6h\" or \"30m\", found {d:?}"));
                }
            }
        }
        if let Some(t) = u.tries {
            if !(1..=10).contains(&t) {
                return err("update.tries", format!("expected 1 to 10 boots, found {t}"));
            }
        }
        if let Some(c) = &u.channel {
            if c.is_empty() || !c.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return err("update.channel", format!("expected a channel name such as \"stable\", found {c:?}"));
            }
        }
    }
    for (name, svc) in p.services.iter().flatten() {
        check_service(src, name, svc)?;
    }
    if let Some(h) = &p.hardening {
        check_hardening(src, h)?;
    }
    if let Some(b) = &p.backup {
        check_backup(src, b)?;
    }
    if let Some(m) = &p.monitor {
        check_monitor(src, m)?;
    }
    if let Some(h) = &p.health {
        if h.timeout == Some(0) {
            return err("health.timeout", "expected a positive number of seconds, found 0".into());
        }
        for (i, u) in h.units.iter().flatten().enumerate() {
            if !valid_unit_name(u) {
                return err(
                    &format!("health.units[{i}]"),
                    format!("expected a systemd unit name such as \"caddy.service\" (letters, digits, \":-_.@\\\", and a unit type), found {u:?}"),
                );
            }
        }
        for (i, c) in h.commands.iter().flatten().enumerate() {
            if c.trim().is_empty() {
                return err(&format!("health.commands[{i}]"), "expected a shell command, found an empty string".into());
            }
        }
    }
    Ok(())
}

/// Kernel arguments that would keep a device from going back to its committed slot when an
/// update does not come up: a kernel that never reboots after a panic, a boot that ends in a
/// shell or another target instead of the health check, or a root shell on a console.
pub fn defeats_fallback(arg: &str) -> Option<&'static str> {
    let (name, value) = arg.split_once('=').map_or((arg, None), |(n, v)| (n, Some(v)));
    match (name, value) {
        ("panic", Some(v)) if v.parse::<i64>().map_or(true, |n| n == 0) => {
            Some("with panic=0 a kernel panic hangs instead of rebooting, and a trial that panics never falls back (kiln sets panic=10)")
        }
        ("init" | "rdinit", _) => Some("another init skips systemd, the health check and the commit or rollback"),
        ("single" | "emergency" | "rescue" | "s" | "S" | "1" | "-s" | "-b", None) => {
            Some("a rescue or emergency boot waits at a shell: no health check, no fallback")
        }
        ("systemd.unit" | "rd.systemd.unit" | "systemd.mask" | "rd.systemd.mask", _) => {
            Some("it changes which units start, so the health check or the agent may not run")
        }
        ("--", None) => Some("it hands every argument after it to init instead of the kernel"),
        ("rd.break" | "rd.shell" | "rd.emergency" | "break" | "systemd.debug_shell" | "systemd.debug-shell", _) => {
            Some("it opens a root shell on a console, and may stop the boot before the health check")
        }
        _ => None,
    }
}

/// A systemd unit name with its type: `name[@instance].type`.
pub fn valid_unit_name(u: &str) -> bool {
    const TYPES: &[&str] =
        &["service", "socket", "target", "timer", "mount", "automount", "path", "swap", "device", "slice", "scope"];
    let Some((name, kind)) = u.rsplit_once('.') else { return false };
    u.len() <= 255
        && TYPES.contains(&kind)
        && !name.is_empty()
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c))
}

/// A service's name becomes its unit's and state directory's name.
pub fn valid_service_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.ends_with('-')
}

impl Port {
    /// (number, "tcp" | "udp"), or what is wrong with it.
    pub fn parse(&self) -> Result<(u16, &'static str), String> {
        let (num, proto) = match self {
            Port::Number(n) => (*n, "tcp"),
            Port::Text(t) => {
                let (n, p) = t.split_once('/').unwrap_or((t.as_str(), "tcp"));
                let proto = match p {
                    "tcp" => "tcp",
                    "udp" => "udp",
                    _ => {
                        return Err(format!("expected a port such as 8080, \"8080/tcp\" or \"51820/udp\", found {t:?}"))
                    }
                };
                (
                    n.parse::<i64>().map_err(|_| {
                        format!("expected a port such as 8080, \"8080/tcp\" or \"51820/udp\", found {t:?}")
                    })?,
                    proto,
                )
            }
        };
        if !(1..=65535).contains(&num) {
            return Err(format!("expected a port number from 1 to 65535, found {num}"));
        }
        Ok((num as u16, proto))
    }
}

/// Characters with a meaning of their own in a Caddyfile token: placeholders, quotes, comments,
/// blocks, heredocs.
const CADDY_SPECIAL: &[char] = &['{', '}', '"', '\'', '`', '#', '<', '\\'];

fn check_service(src: &Source, name: &str, s: &Service) -> Result<(), ProfileError> {
    let key = |k: &str| format!("services.{name}.{k}");
    let err = |k: String, msg: String| Err(ProfileError::new(src, Some(&k), msg));
    if !valid_service_name(name) {
        return err(
            format!("services.{name}"),
            "expected a service name: lowercase letters, digits and '-', starting with a letter, at most 32 characters"
                .into(),
        );
    }
    if let Some(e) = &s.exec {
        if !e.starts_with('/') {
            return err(key("exec"), format!("expected a command line starting with an absolute path, such as \"/usr/local/bin/{name} --port 8080\", found {e:?}"));
        }
        // systemd reads a lone ";" as the start of another command line.
        if e.split_whitespace().any(|w| w == ";") {
            return err(key("exec"), "expected one command: a lone \";\" would start a second one (put several in a script, shipped with binary = \"...\")".into());
        }
    }
    if let Some(b) = &s.binary {
        if b.is_empty() || b.ends_with('/') {
            return err(key("binary"), format!("expected the path of a program file, found {b:?}"));
        }
    }
    for (i, p) in s.ports.iter().flatten().enumerate() {
        if let Err(m) = p.parse() {
            return err(key(&format!("ports[{i}]")), m);
        }
    }
    for (i, pkg) in s.packages.iter().flatten().enumerate() {
        if !valid_package(pkg) {
            return err(key(&format!("packages[{i}]")), format!("expected a Debian package name, found {pkg:?}"));
        }
    }
    for (k, v) in s.environment.iter().flatten() {
        let ok = k.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
            && k.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return err(
                key(&format!("environment.{k}")),
                "expected a variable name of capital letters, digits and '_'".into(),
            );
        }
        if v.contains('\n') || v.contains('"') {
            return err(key(&format!("environment.{k}")), "expected a value on one line without '\"'".into());
        }
    }
    if let Some(b) = &s.backup {
        if !Quiesce::NAMES.contains(&b.as_str()) {
            return err(
                key("backup"),
                format!(
                    "expected one of {} (how the state directory is backed up), found {b:?}",
                    quoted(Quiesce::NAMES)
                ),
            );
        }
    }
    for (k, v) in s.loosen.iter().flatten() {
        if k.is_empty()
            || !k.starts_with(|c: char| c.is_ascii_uppercase())
            || !k.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return err(
                key(&format!("loosen.{k}")),
                "expected a systemd directive name such as \"MemoryDenyWriteExecute\"".into(),
            );
        }
        if v.contains('\\') {
            return err(key(&format!("loosen.{k}")), format!("expected a directive value without '\\', found {v:?}"));
        }
    }
    if let Some(b) = s.exposure_budget {
        if !(0.0..=10.0).contains(&b) {
            return err(key("exposure_budget"), format!("expected an exposure from 0.0 to 10.0, found {b}"));
        }
    }
    for (i, site) in s.sites.iter().flatten().enumerate() {
        let k = key(&format!("sites[{i}]"));
        match (&site.root, &site.proxy) {
            (Some(_), Some(_)) | (None, None) => return err(
                k,
                "expected either root (a directory to serve) or proxy (an address to forward to), not both or neither"
                    .into(),
            ),
            (Some(r), None) if !r.starts_with('/') || r.contains(char::is_whitespace) || r.contains(CADDY_SPECIAL) => {
                return err(
                    format!("{k}.root"),
                    format!("expected an absolute directory such as \"/srv/www\", found {r:?}"),
                )
            }
            (None, Some(p)) if p.is_empty() || p.contains(char::is_whitespace) || p.contains(CADDY_SPECIAL) => {
                return err(
                    format!("{k}.proxy"),
                    format!("expected an address such as \"127.0.0.1:5232\", found {p:?}"),
                )
            }
            _ => {}
        }
        if let Some(d) = &site.domain {
            let ok = !d.is_empty() && d.split('.').all(|l| valid_hostname(l) || l == "*") && d.contains('.');
            if !ok {
                return err(
                    format!("{k}.domain"),
                    format!("expected a domain name such as \"home.example.org\", found {d:?}"),
                );
            }
        }
    }
    Ok(())
}

/// restic's `--keep-*` policies.
pub const KEEP_KEYS: &[&str] = &["last", "hourly", "daily", "weekly", "monthly", "yearly"];
/// restic repository kinds a device can reach (a local path is the other form).
pub const REPOSITORY_KINDS: &[&str] = &["rest:", "sftp:", "s3:", "b2:", "azure:", "gs:", "swift:", "rclone:"];

fn quoted(list: &[&str]) -> String {
    list.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
}

fn check_backup(src: &Source, b: &Backup) -> Result<(), ProfileError> {
    let err = |k: &str, msg: String| Err(ProfileError::new(src, Some(&format!("backup.{k}")), msg));
    if let Some(r) = &b.repository {
        let kind = REPOSITORY_KINDS.iter().find(|k| r.starts_with(*k));
        if r.chars().any(char::is_whitespace) || (kind.is_none() && !r.starts_with('/')) {
            return err(
                "repository",
                format!("expected a restic repository such as \"rest:https://backup.example.org/home\" or \"sftp:backup@nas:/srv/restic/home\" (kinds: {}, or an absolute path), found {r:?}", REPOSITORY_KINDS.join(" ")),
            );
        }
        // rest:http://user:secret@host/ would bake a credential into every image.
        if let Some(rest) = r.strip_prefix("rest:") {
            let authority = rest.split_once("://").map(|(_, a)| a.split('/').next().unwrap_or("")).unwrap_or("");
            if authority.contains('@') {
                return err(
                    "repository",
                    "holds a user name or password: credentials are provisioned per device (backup/env: RESTIC_REST_USERNAME=..., RESTIC_REST_PASSWORD=...), never baked into the image".into(),
                );
            }
        }
    }
    for (k, v) in b.keep.iter().flatten() {
        if !KEEP_KEYS.contains(&k.as_str()) {
            return err(&format!("keep.{k}"), format!("unknown retention policy; known: {}", KEEP_KEYS.join(", ")));
        }
        if !(1..=100_000).contains(v) {
            return err(&format!("keep.{k}"), format!("expected a number of snapshots from 1 up, found {v}"));
        }
    }
    for (key, v) in [("schedule", &b.schedule), ("restore_drill", &b.restore_drill)] {
        if let Some(v) = v {
            if v.trim().is_empty() || v.contains('\n') {
                return err(
                    key,
                    format!("expected a systemd calendar expression such as \"daily\" or \"*-*-* 03:30\", found {v:?}"),
                );
            }
        }
    }
    for (i, p) in b.paths.iter().flatten().enumerate() {
        if let Err(m) = backup_path(p) {
            return err(&format!("paths[{i}]"), m);
        }
    }
    for (i, x) in b.exclude.iter().flatten().enumerate() {
        if x.is_empty() || x.contains('\n') {
            return err(
                &format!("exclude[{i}]"),
                format!("expected a restic exclude pattern on one line, found {x:?}"),
            );
        }
    }
    if let Some(s) = &b.check_subset {
        if !valid_subset(s) {
            return err(
                "check_subset",
                format!("expected a share of the repository's data such as \"10%\" or \"1/5\", found {s:?}"),
            );
        }
    }
    for (key, d) in [("alert_after", &b.alert_after), ("retry", &b.retry)] {
        if let Some(d) = d {
            if humantime::parse_duration(d).is_err() {
                return err(key, format!("expected a duration such as \"2d\" or \"5m\", found {d:?}"));
            }
        }
    }
    if let Some(u) = &b.alert_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.chars().any(char::is_whitespace) {
            return err("alert_url", format!("expected an http:// or https:// URL alerts are POSTed to, such as \"https://ntfy.sh/my-backups\", found {u:?}"));
        }
    }
    if let Some(u) = &b.before_update {
        if let Err(e) = u.parse::<BeforeUpdate>() {
            return err("before_update", e);
        }
    }
    Ok(())
}

fn check_monitor(src: &Source, m: &Monitor) -> Result<(), ProfileError> {
    let err = |k: &str, msg: String| Err(ProfileError::new(src, Some(&format!("monitor.{k}")), msg));
    for (key, d) in [("interval", &m.interval), ("update_stale", &m.update_stale), ("clock_grace", &m.clock_grace)] {
        if let Some(d) = d {
            match humantime::parse_duration(d) {
                Err(_) => return err(key, format!("expected a duration such as \"5m\" or \"7d\", found {d:?}")),
                Ok(v) if key == "interval" && v.as_secs() < 10 => {
                    return err(key, format!("expected at least \"10s\" between looks, found {d:?}"))
                }
                Ok(_) => {}
            }
        }
    }
    let percent = |key: &str, v: Option<i64>| -> Result<(), ProfileError> {
        match v {
            Some(v) if !(1..=100).contains(&v) => err(key, format!("expected a percentage from 1 to 100, found {v}")),
            _ => Ok(()),
        }
    };
    for (what, warn, alert) in [("disk", m.disk_warn, m.disk_alert), ("inodes", m.inodes_warn, m.inodes_alert)] {
        percent(&format!("{what}_warn"), warn)?;
        percent(&format!("{what}_alert"), alert)?;
        let (w, a) = (warn.unwrap_or(85), alert.unwrap_or(95));
        if w > a {
            return err(
                &format!("{what}_warn"),
                format!("{w} is above {what}_alert ({a}): the warning comes first, so it must be the lower figure"),
            );
        }
    }
    for (key, v, max) in [
        ("restarts", m.restarts, 1000),
        ("cert_days", m.cert_days, 365),
        ("failed_logins", m.failed_logins, 100_000),
        ("history", m.history, 10_000),
    ] {
        if let Some(v) = v {
            if !(1..=max).contains(&v) {
                return err(key, format!("expected a whole number from 1 to {max}, found {v}"));
            }
        }
    }
    for (key, u) in [("push", &m.push), ("alert_url", &m.alert_url), ("heartbeat_url", &m.heartbeat_url)] {
        if let Some(u) = u {
            if let Err(e) = monitor_url(u) {
                return err(key, e);
            }
            if key == "push" && !u.ends_with(".atom") {
                return err(key, format!("expected a URL ending in .atom (the JSON twin goes next to it as .json), such as \"https://dav.example.org/kiln/{{hostname}}.atom\", found {u:?}"));
            }
        }
    }
    Ok(())
}

/// A monitor URL: http(s), one line without spaces, no credentials (they are provisioned per
/// device), and no placeholder but `{hostname}`.
pub fn monitor_url(u: &str) -> Result<(), String> {
    if !(u.starts_with("http://") || u.starts_with("https://"))
        || u.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("expected an http:// or https:// URL, found {u:?}"));
    }
    let authority = u.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!("{u:?} holds credentials: they are provisioned per device (provision/monitor/push-authorization, or the whole URL in provision/monitor/push-url), never baked into the image"));
    }
    if u.replace("{hostname}", "").contains(['{', '}']) {
        return Err(format!("the only placeholder is {{hostname}}, found {u:?}"));
    }
    Ok(())
}

/// A path to back up, as a user writes it, to its real place on the data partition:
/// `/home/...` and `/srv/...` are links into `/var`. Anything else is on the read-only root,
/// which needs no backup (the image rebuilds it) and could not be restored.
pub fn backup_path(p: &str) -> Result<String, String> {
    let clean = p.trim_end_matches('/');
    if !clean.starts_with('/') || clean.split('/').any(|c| c == ".." || c == ".") || p.contains('\n') {
        return Err(format!(
            "expected an absolute path such as \"/var/lib/private/myapp\" or \"/home/alice\", found {p:?}"
        ));
    }
    for (link, real) in [("/home", "/var/home"), ("/srv", "/var/srv")] {
        if clean == link || clean.starts_with(&format!("{link}/")) {
            return Ok(format!("{real}{}", &clean[link.len()..]));
        }
    }
    if clean == "/var" || clean.starts_with("/var/") {
        return Ok(clean.to_string());
    }
    Err(format!(
        "{p} is on the read-only root, which the image rebuilds: only /var, /home and /srv hold a device's data"
    ))
}

/// restic's `--read-data-subset`: "n%", "n/t" or a size is not supported here.
fn valid_subset(s: &str) -> bool {
    if let Some(pct) = s.strip_suffix('%') {
        return pct.parse::<f64>().is_ok_and(|v| v > 0.0 && v <= 100.0);
    }
    match s.split_once('/') {
        Some((n, t)) => matches!((n.parse::<u32>(), t.parse::<u32>()), (Ok(n), Ok(t)) if n >= 1 && n <= t),
        None => false,
    }
}

fn check_hardening(src: &Source, h: &Hardening) -> Result<(), ProfileError> {
    let err = |k: String, msg: String| Err(ProfileError::new(src, Some(&k), msg));
    if let Some(b) = h.exposure_budget {
        if !(0.0..=10.0).contains(&b) {
            return err(
                "hardening.exposure_budget".into(),
                format!("expected an exposure from 0.0 to 10.0, found {b}"),
            );
        }
    }
    for (k, v) in h.sysctl.iter().flatten() {
        let key_ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/*".contains(c));
        if !key_ok {
            return err(
                format!("hardening.sysctl.{k}"),
                "expected a kernel setting name such as \"kernel.kptr_restrict\"".into(),
            );
        }
        if v.to_string().contains('\n') {
            return err(format!("hardening.sysctl.{k}"), "expected a value on one line".into());
        }
    }
    for (i, m) in h.disable_modules.iter().flatten().enumerate() {
        if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return err(
                format!("hardening.disable_modules[{i}]"),
                format!("expected a kernel module name such as \"dccp\", found {m:?}"),
            );
        }
    }
    for (i, f) in h.setuid_allow.iter().flatten().enumerate() {
        if !f.starts_with('/') || f.contains("..") {
            return err(
                format!("hardening.setuid_allow[{i}]"),
                format!("expected an absolute path such as \"/usr/bin/sudo\", found {f:?}"),
            );
        }
    }
    if let Some(w) = &h.watchdog {
        if w != "off" && humantime::parse_duration(w).is_err() {
            return err(
                "hardening.watchdog".into(),
                format!("expected a duration such as \"30s\" or \"off\", found {w:?}"),
            );
        }
    }
    Ok(())
}

/// A release version: dot-separated numbers ("1.4.0"), which devices compare to refuse going
/// back (it also names the UKI on the ESP).
pub fn valid_version(v: &str) -> bool {
    v.len() <= 64 && v.parse::<kiln_feed::Version>().is_ok()
}

/// "HH:MM-HH:MM".
pub fn valid_window(w: &str) -> bool {
    let hm = |t: &str| {
        t.split_once(':').is_some_and(|(h, m)| {
            h.len() == 2
                && m.len() == 2
                && h.parse::<u32>().is_ok_and(|h| h < 24)
                && m.parse::<u32>().is_ok_and(|m| m < 60)
        })
    };
    w.split_once('-').is_some_and(|(a, b)| hm(a) && hm(b))
}

/// The public key a profile names: reads the file a path points to (relative to the profile
/// file that set `update.public_key`), and checks its form. Returns the key as 64 hex digits.
pub fn resolve_public_key(declared_in: &Source, value: &str) -> Result<String, ProfileError> {
    let err = |msg: String| ProfileError::new(declared_in, Some("update.public_key"), msg);
    // Inline (either half: a secret pasted by mistake must not be echoed as a file name).
    let v = value.trim_start();
    let line = if v.starts_with("kiln-ed25519:") || v.starts_with("kiln-ed25519-secret:") {
        value.trim().to_string()
    } else {
        let Source::File(profile) = declared_in else {
            return Err(err("a built-in profile cannot name a key file".into()));
        };
        let path = profile.parent().unwrap_or(Path::new("")).join(value);
        std::fs::read_to_string(&path)
            .map_err(|e| {
                err(format!(
                    "cannot read {}: {e}; make a key pair with `kiln keygen --out DIR` and name DIR/kiln-release.pub",
                    path.display()
                ))
            })?
            .trim()
            .to_string()
    };
    // Never echo what was found: a secret key given by mistake must not reach a terminal, a
    // CI log or a bug report. Say what it looks like instead.
    let expected = "expected a public key line \"kiln-ed25519:<64 hex digits>\" (the .pub file of `kiln keygen`)";
    match line.strip_prefix("kiln-ed25519:") {
        Some(hex) if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) => Ok(hex.to_ascii_lowercase()),
        _ if line.starts_with("kiln-ed25519-secret:") => Err(err(format!(
            "this is a SECRET release key, not the public one: never put it in a profile (the image would carry it); \
             name the .pub file next to it; {expected}"
        ))),
        Some(hex) => Err(err(format!(
            "{expected}, found \"kiln-ed25519:\" followed by {} characters{}",
            hex.chars().count(),
            if hex.chars().all(|c| c.is_ascii_hexdigit()) { "" } else { " that are not all hex digits" }
        ))),
        None => {
            Err(err(format!("{expected}, found {} characters of something else (not shown)", line.chars().count())))
        }
    }
}

/// A service's `binary`: made absolute against the profile file that names it; it must exist.
fn resolve_binary(declared_in: &Source, service: &str, value: &str) -> Result<String, ProfileError> {
    let key = format!("services.{service}.binary");
    let Source::File(profile) = declared_in else {
        return Err(ProfileError::new(declared_in, Some(&key), "a built-in profile cannot name a file"));
    };
    let dir = profile.parent().unwrap_or(Path::new(""));
    let path = dir.join(value);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(std::path::absolute(&path).unwrap_or(path).to_string_lossy().into_owned()),
        Ok(_) => Err(ProfileError::new(declared_in, Some(&key), format!("{} is not a file", path.display()))),
        Err(e) => Err(ProfileError::new(
            declared_in,
            Some(&key),
            format!("cannot read {}: {e} (the path is relative to {})", path.display(), profile.display()),
        )),
    }
}

pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

pub fn valid_user_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

pub fn valid_package(n: &str) -> bool {
    let name = n.split_once('=').map(|(a, _)| a).unwrap_or(n);
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && n.split_once('=').map(|(_, v)| !v.is_empty() && !v.contains(char::is_whitespace)).unwrap_or(true)
}

pub fn valid_ssh_key(k: &str) -> bool {
    let mut parts = k.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    let known = kind.starts_with("ssh-ed25519")
        || kind == "ssh-rsa"
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-ed25519@")
        || kind.starts_with("sk-ecdsa-sha2-");
    known
        && blob.len() >= 16
        && blob.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
        && !k.contains('\n')
}

/// Loads a profile and its `extends` chain, and merges it.
pub fn load(src: Source) -> Result<LoadedProfile, ProfileError> {
    let name = match &src {
        Source::File(p) => p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "profile".into()),
        Source::Builtin(n) => n.to_string(),
    };
    let mut chain: Vec<Source> = Vec::new();
    let mut tables: Vec<toml::Table> = Vec::new();
    let mut current = src;
    loop {
        let text = read_source(&current)?;
        let (table, typed) = parse_file(&current, &text)?;
        chain.push(current.clone());
        tables.push(table);
        let Some(parent) = typed.extends else { break };
        let next = resolve_extends(&current, &parent)?;
        if let Some(pos) = chain.iter().position(|s| same_source(s, &next)) {
            let cycle: Vec<String> = chain[pos..].iter().chain(std::iter::once(&next)).map(|s| s.to_string()).collect();
            return Err(ProfileError::new(
                &current,
                Some("extends"),
                format!("inheritance cycle: {}", cycle.join(" -> ")),
            ));
        }
        current = next;
    }
    // Merge from the root ancestor down to the child.
    let mut merged = toml::Table::new();
    for t in tables.iter().rev() {
        merge_tables(&mut merged, t, "");
    }
    merged.remove("extends");
    let mut typed = typed_from_table(chain.first().expect("chain has the profile itself"), &merged)?;
    if let Some(key) = typed.update.as_mut().and_then(|u| u.public_key.as_mut()) {
        // The file that set it, child first: a relative path is relative to that file.
        let declared =
            tables.iter().position(|t| t.get("update").and_then(|u| u.get("public_key")).is_some()).unwrap_or(0);
        *key = format!("kiln-ed25519:{}", resolve_public_key(&chain[declared], key)?);
    }
    if let Some(services) = typed.services.as_mut() {
        for (svc, s) in services.iter_mut() {
            let Some(bin) = s.binary.as_mut() else { continue };
            // The file that set it, child first: a relative path is relative to that file.
            let declared = tables
                .iter()
                .position(|t| {
                    t.get("services").and_then(|x| x.get(svc.as_str())).and_then(|x| x.get("binary")).is_some()
                })
                .unwrap_or(0);
            *bin = resolve_binary(&chain[declared], svc, bin)?;
        }
    }
    Ok(LoadedProfile { name, chain, merged: typed })
}

fn same_source(a: &Source, b: &Source) -> bool {
    match (a, b) {
        (Source::File(x), Source::File(y)) => {
            let cx = std::fs::canonicalize(x).unwrap_or_else(|_| x.clone());
            let cy = std::fs::canonicalize(y).unwrap_or_else(|_| y.clone());
            cx == cy
        }
        (Source::Builtin(x), Source::Builtin(y)) => x == y,
        _ => false,
    }
}

/// `extends` names a file next to the child (by name or relative path), or a built-in profile.
fn resolve_extends(child: &Source, parent: &str) -> Result<Source, ProfileError> {
    if let Source::File(p) = child {
        let dir = p.parent().unwrap_or(Path::new(""));
        let candidate = if parent.ends_with(".toml") || parent.contains('/') {
            dir.join(parent)
        } else {
            dir.join(format!("{parent}.toml"))
        };
        if candidate.is_file() {
            return Ok(Source::File(candidate));
        }
        if let Some(b) = builtin(parent) {
            return Ok(Source::Builtin(b));
        }
        return Err(ProfileError::new(
            child,
            Some("extends"),
            format!(
                "no profile {parent:?} to extend: looked for {} and the built-in profiles ({})",
                candidate.display(),
                builtin_names()
            ),
        ));
    }
    builtin(parent).map(Source::Builtin).ok_or_else(|| {
        ProfileError::new(child, Some("extends"), format!("no built-in profile {parent:?} ({})", builtin_names()))
    })
}

fn merge_tables(into: &mut toml::Table, from: &toml::Table, prefix: &str) {
    for (k, v) in from {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_tables(a, b, &path),
            (Some(toml::Value::Array(a)), toml::Value::Array(b)) if APPENDING_LISTS.contains(&path.as_str()) => {
                for item in b {
                    if !a.contains(item) {
                        a.push(item.clone());
                    }
                }
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProfileFile, ProfileError> {
        parse_file(&Source::File("p.toml".into()), text).map(|(_, t)| t)
    }

    #[test]
    fn hostile_strings_are_refused_where_they_would_change_the_syntax() {
        // Issue 16 item 14: a "\r" in exec put a root ExecStartPre=+ into the unit.
        let svc = |extra: &str| format!("[services.app]\nexec = \"/usr/bin/app\"\n{extra}");
        let e = parse("[services.app]\nexec = \"/usr/bin/app\\rExecStartPre=+/bin/sh -c evil\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.app.exec"));
        assert!(e.message.contains("control character U+000D"), "{e}");
        for (text, key) in [
            (svc("environment = { A = \"x\\u2028y\" }\n"), "services.app.environment.A"),
            ("[health]\ncommands = [\"true\", \"a\\u0085b\"]\n".to_string(), "health.commands[1]"),
            ("[system]\nkernel_cmdline = [\"quiet\\u0000\"]\n".to_string(), "system.kernel_cmdline[0]"),
        ] {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        }
        let e = parse(&svc("")).map(|_| ());
        assert!(e.is_ok(), "{e:?}");
        let e = parse("[services.app]\nexec = \"/usr/bin/app ; /bin/sh\"\n").unwrap_err();
        assert!(e.message.contains("a lone \";\""), "{e}");
        let e = parse(&svc("loosen = { ReadWritePaths = \"/srv\\\\x\" }\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("services.app.loosen.ReadWritePaths"));
        // Health units are unit names; commands are non-empty.
        for bad in ["caddy", "caddy.service; reboot", "-x.service", "a b.service", "x.exe"] {
            let e = parse(&format!("[health]\nunits = [{bad:?}]\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("health.units[0]"), "{bad}");
        }
        assert!(parse("[health]\nunits = [\"caddy.service\", \"getty@tty1.service\", \"x.timer\"]\n").is_ok());
        assert!(parse("[health]\ncommands = [\" \"]\n").is_err());
        // The kernel command line: no quotes, nothing that defeats the fallback.
        for bad in [
            "panic=0",
            "panic=00",
            "panic=-0",
            "--",
            "break=top",
            "-b",
            "panic=x",
            "init=/bin/sh",
            "single",
            "emergency",
            "systemd.unit=rescue.target",
            "rd.break",
            "systemd.mask=kiln-health.service",
            "a=\\\"b",
        ] {
            let e = parse(&format!("[system]\nkernel_cmdline = [{bad:?}]\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("system.kernel_cmdline[0]"), "{bad}: {e}");
        }
        assert!(parse("[system]\nkernel_cmdline = [\"panic=-1\", \"quiet\", \"console=ttyS0,115200\"]\n").is_ok());
        // Caddyfile tokens: no placeholders, quotes, comments or blocks.
        for (field, bad) in [("root", "/srv/{http.request.host}"), ("root", "/srv/a#b"), ("proxy", "127.0.0.1:80\\\"x")]
        {
            let e = parse(&svc(&format!("[[services.app.sites]]\n{field} = {bad:?}\n"))).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(format!("services.app.sites[0].{field}").as_str()), "{bad}: {e}");
        }
    }

    #[test]
    fn monitor_thresholds_and_urls_are_checked() {
        let ok = parse(
            "[monitor]\ninterval = \"1m\"\ndisk_warn = 80\ndisk_alert = 90\npush = \"https://dav.example.org/k/{hostname}.atom\"\nalert_url = \"https://ntfy.example.org/home\"\nheartbeat_url = \"https://hc.example.org/ping/x\"\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        for (text, key, says) in [
            ("disk_warn = 96", "monitor.disk_warn", "above disk_alert (95)"),
            ("inodes_alert = 101", "monitor.inodes_alert", "from 1 to 100"),
            ("disk_alert = 0", "monitor.disk_alert", "from 1 to 100"),
            ("restarts = 0", "monitor.restarts", "from 1 to 1000"),
            ("interval = \"2s\"", "monitor.interval", "at least \"10s\""),
            ("update_stale = \"soon\"", "monitor.update_stale", "a duration"),
            ("push = \"https://dav.example.org/k/home.json\"", "monitor.push", "ending in .atom"),
            ("push = \"https://me:pw@dav.example.org/k/h.atom\"", "monitor.push", "holds credentials"),
            ("alert_url = \"ntfy.sh/x\"", "monitor.alert_url", "http:// or https://"),
            ("heartbeat_url = \"https://hc.example.org/{uuid}\"", "monitor.heartbeat_url", "only placeholder"),
            ("disk_warning = 80", "monitor.disk_warning", "unknown key"),
        ] {
            let e = parse(&format!("[monitor]\n{text}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
            assert!(e.message.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn unknown_key_names_the_key_path() {
        let e = parse("[system]\nhostnme = \"x\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("system.hostnme"));
        assert!(e.message.starts_with("unknown key (expected one of: suite, mirror"), "{e}");
    }

    #[test]
    fn wrong_type_says_expected_and_found() {
        let e = parse("[system]\npackages = \"vim\"\n").unwrap_err();
        assert_eq!(e.to_string(), "p.toml: system.packages: expected a list, found string \"vim\"");
    }

    #[test]
    fn values_are_checked() {
        assert_eq!(parse("[system]\nhostname = \"-bad\"\n").unwrap_err().key.as_deref(), Some("system.hostname"));
        assert_eq!(parse("[users.root]\n").unwrap_err().key.as_deref(), Some("users.root"));
        assert_eq!(
            parse("[users.al]\nssh_keys = [\"not a key\"]\n").unwrap_err().key.as_deref(),
            Some("users.al.ssh_keys[0]")
        );
        assert_eq!(
            parse("[system]\nkernel_cmdline = [\"root=/dev/sda\"]\n").unwrap_err().key.as_deref(),
            Some("system.kernel_cmdline[0]")
        );
        assert!(parse("[system]\npackages = [\"vim\", \"curl=8.1-1\"]\n").is_ok());
    }

    #[test]
    fn tables_merge_and_lists_follow_their_rule() {
        let mut base: toml::Table =
            "[system]\nhostname = \"a\"\npackages = [\"x\"]\n[health]\ncommands=[\"true\"]\ntimeout = 5\n"
                .parse()
                .unwrap();
        let child: toml::Table = "[system]\npackages = [\"y\", \"x\"]\n[health]\ntimeout = 9\n".parse().unwrap();
        merge_tables(&mut base, &child, "");
        let sys = base["system"].as_table().unwrap();
        assert_eq!(sys["hostname"].as_str(), Some("a"));
        assert_eq!(sys["packages"].as_array().unwrap().len(), 2);
        assert_eq!(base["health"]["timeout"].as_integer(), Some(9));
    }

    #[test]
    fn builtin_profiles_parse() {
        for (name, _) in BUILTIN_PROFILES {
            load(Source::Builtin(name)).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
