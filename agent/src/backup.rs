//! Backups with restic: scheduled snapshots of the device's data, restore drills that prove a
//! snapshot restores, the self-restore of a freshly flashed device, and pruning.
//!
//! The image holds only the plan (`device.json`'s `backup`): what to back up, where to, how to
//! quiesce each service. The repository password and the target's credentials are the
//! device's own, provisioned into `/var/kiln/provision/backup/` (`kiln flash --provision`):
//!
//! ```text
//! backup/password      the restic repository password (required)
//! backup/env           KEY=VALUE lines for restic: RESTIC_REST_USERNAME, RESTIC_REST_PASSWORD,
//!                      AWS_ACCESS_KEY_ID, B2_ACCOUNT_KEY, ... (optional)
//! backup/repository    this device's repository, instead of the profile's (optional)
//! backup/ssh_key       sftp: the private key, and backup/known_hosts the server's key (optional)
//! ```
//!
//! Every run records its result in `/var/lib/kiln-agent/backup.json` (shown by `kiln-agent
//! backup status` and `kiln-agent status --json`), and alerts go to the journal at priority
//! "err" and to the console. restic retries a target that does not answer for up to 15
//! minutes and reports some refusals only as messages: the agent reads its messages, stops it
//! early when the answer will not change (a full target, refused credentials) and never takes a
//! run that deleted nothing for a prune.

use crate::exec::Cmd;
use crate::state::write_record;
use crate::system;
use anyhow::{bail, Context as _, Result};
use kiln_device::{BackupConfig, Quiesce};
use kiln_feed::Timestamp;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const PROVISION_DIR: &str = "/var/kiln/provision/backup";
pub const CACHE_DIR: &str = "/var/cache/kiln-backup";
pub const STATUS_FILE: &str = "backup.json";
/// The provisioned identity (`kiln flash --provision` writes DIR/device-id).
pub const PROVISIONED_ID: &str = "/var/kiln/provision/device-id";
/// The identity a device without a provisioned one made itself, in the state directory.
pub const DEVICE_ID_FILE: &str = "device-id";
/// The image's own /var, which kiln-agent mount-data delivers onto the data partition.
const FACTORY_VAR: &str = crate::factory::FACTORY;
const RESTIC: &str = "/usr/bin/restic";
/// How long one restic run may take at most (a first backup of a big disk over a slow line).
const RUN_LIMIT: Duration = Duration::from_secs(12 * 3600);

/// Why a backup was taken (a restic tag on the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Scheduled,
    Manual,
    BeforeUpdate,
}

impl Reason {
    fn tag(self) -> &'static str {
        match self {
            Reason::Scheduled => "scheduled",
            Reason::Manual => "manual",
            Reason::BeforeUpdate => "before-update",
        }
    }
}

/// The record of backups on this device.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub last_backup: Option<Run>,
    pub last_good_backup: Option<Run>,
    pub last_drill: Option<Run>,
    pub last_prune: Option<Run>,
    /// What the first boot of this data partition decided (restored, fresh, failed, ...).
    pub self_restore: Option<Run>,
    /// What needs a human now: failed runs, a stale last good backup.
    #[serde(default)]
    pub alerts: Vec<String>,
    /// The repository this device backs up to, as it last opened it: a repository that is
    /// then missing or replaced is an alert, never a reason to create a new one.
    #[serde(default)]
    pub repository: Option<SeenRepository>,
}

/// A repository the device opened: where (credentials removed) and restic's id for it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SeenRepository {
    pub location: String,
    pub id: String,
}

/// One run's outcome.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Run {
    pub at: Timestamp,
    pub ok: bool,
    /// What happened, in a sentence (or the error).
    pub summary: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub files: Option<u64>,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub seconds: f64,
    /// Self-restore: "restored", "fresh", "data-present", "no-credentials", "disabled", "failed".
    #[serde(default)]
    pub outcome: Option<String>,
}

impl Status {
    pub fn load(dir: &Path) -> Result<Status> {
        let record = kiln_device::fs::read_json(&dir.join(STATUS_FILE))
            .map_err(|e| anyhow::anyhow!("{e} (not a kiln-agent backup record)"))?;
        Ok(record.unwrap_or_default())
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_record(dir, STATUS_FILE, self)
    }

    /// Takes every URL's password out of the summaries and alerts ([`redact`]).
    pub fn redact(&mut self) {
        for r in [
            &mut self.last_backup,
            &mut self.last_good_backup,
            &mut self.last_drill,
            &mut self.last_prune,
            &mut self.self_restore,
        ]
        .into_iter()
        .flatten()
        {
            r.summary = redact(&r.summary);
        }
        for a in &mut self.alerts {
            *a = redact(a);
        }
    }

    /// Recomputes the alerts from the record: the last backup, drill and self-restore failed,
    /// or the last good backup is older than `stale_after` (or there never was one).
    pub fn refresh_alerts(&mut self, now: Timestamp, stale_after: u64) {
        let mut alerts = Vec::new();
        if let Some(r) = self.last_backup.as_ref().filter(|r| !r.ok) {
            alerts.push(format!("backup failed at {}: {}", r.at, r.summary));
        }
        if let Some(r) = self.last_drill.as_ref().filter(|r| !r.ok) {
            alerts.push(format!("restore drill failed at {}: {}", r.at, r.summary));
        }
        if let Some(r) = self.self_restore.as_ref().filter(|r| !r.ok) {
            alerts.push(format!(
                "self-restore failed at {}: {} (run `kiln-agent backup restore` once the target is reachable)",
                r.at, r.summary
            ));
        }
        match &self.last_good_backup {
            Some(g) if now.0.saturating_sub(g.at.0) > stale_after => {
                alerts.push(format!(
                    "the last good backup is from {} ({} ago; alert_after is {})",
                    g.at,
                    human(now.0 - g.at.0),
                    human(stale_after)
                ));
            }
            None if self.last_backup.is_some() => alerts.push("there is no good backup of this device yet".into()),
            _ => {}
        }
        self.alerts = alerts;
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The device's repository and the secrets that open it.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    /// As restic takes it: it may carry a password (`rest:https://user:secret@host/`).
    pub repository: String,
    /// As messages, the record and alerts show it: [`redact`]ed.
    pub shown: String,
    pub password_file: PathBuf,
    pub env: Vec<(String, String)>,
    /// sftp: extra ssh arguments (key, known hosts).
    pub sftp_args: Option<String>,
}

/// No credentials provisioned: a state, not a failure of the target.
#[derive(Debug)]
pub struct NoCredentials(pub String);

impl std::fmt::Display for NoCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoCredentials {}

/// restic's id of a repository, from `restic cat config`.
fn config_id(stdout: &[String]) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(&stdout.join("\n")).context("reading `restic cat config`")?;
    v["id"].as_str().map(str::to_string).context("`restic cat config` names no repository id")
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

impl Credentials {
    pub fn load(dir: &Path, cfg: &BackupConfig) -> Result<Credentials> {
        let password_file = dir.join("password");
        match std::fs::metadata(&password_file) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => bail!(NoCredentials(format!("{} is empty: provision the repository password there", password_file.display()))),
            Err(_) => bail!(NoCredentials(format!(
                "no repository password at {}: provision it with `kiln flash --provision DIR` (DIR/backup/password); the image never holds it",
                password_file.display()
            ))),
        }
        let repository = match std::fs::read_to_string(dir.join("repository")) {
            Ok(t) if !t.trim().is_empty() => t.lines().next().unwrap_or_default().trim().to_string(),
            _ => cfg.repository.clone(),
        };
        let mut env = match std::fs::read_to_string(dir.join("env")) {
            Ok(text) => kiln_device::parse_backup_env(&text)
                .map_err(|m| anyhow::anyhow!("{}: {m}", dir.join("env").display()))?,
            Err(_) => Vec::new(),
        };
        // RESTIC_REPOSITORY in env names the device's repository too (backup/repository wins).
        let from_env = env.iter().position(|(k, _)| k == "RESTIC_REPOSITORY").map(|i| env.remove(i).1);
        let repository = if dir.join("repository").exists() { repository } else { from_env.unwrap_or(repository) };
        let sftp_args = dir.join("ssh_key").exists().then(|| {
            let mut a = format!("-i {} -o IdentitiesOnly=yes -o BatchMode=yes", dir.join("ssh_key").display());
            if dir.join("known_hosts").exists() {
                a.push_str(&format!(
                    " -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
                    dir.join("known_hosts").display()
                ));
            }
            a
        });
        let shown = redact(&repository);
        Ok(Credentials { repository, shown, password_file, env, sftp_args })
    }
}

/// `text` with the password of every URL in it replaced by `***` (`scheme://user:***@host`):
/// a provisioned repository may carry one, and nothing the agent prints, records or sends may.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail.find(|c: char| c == '/' || c.is_whitespace()).unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***")),
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// This device's backup identity, restic's `--host` for its snapshots: the provisioned
/// `device-id` (made by `kiln flash --provision`, kept with the provisioning directory so a
/// re-flashed device finds its own snapshots), else one made at the first backup and kept on
/// the data partition. Never the hostname: devices without one, or with the same one, would
/// share snapshots, and a new device would restore another device's data.
pub fn device_id(provisioned: &Path, state_dir: &Path) -> Result<String> {
    if let Ok(text) = std::fs::read_to_string(provisioned) {
        let id = text.trim();
        if !kiln_device::valid_device_id(id) {
            bail!(
                "{}: expected 32 hex digits (as kiln flash --provision writes it), found {} characters",
                provisioned.display(),
                id.len()
            );
        }
        return Ok(id.to_string());
    }
    let own = state_dir.join(DEVICE_ID_FILE);
    if let Ok(text) = std::fs::read_to_string(&own) {
        let id = text.trim();
        if kiln_device::valid_device_id(id) {
            return Ok(id.to_string());
        }
    }
    let id = kiln_device::new_device_id().context("reading /dev/urandom for this device's id")?;
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    kiln_device::fs::write_atomically(&own, format!("{id}\n").as_bytes())
        .with_context(|| format!("keeping this device's id in {}", own.display()))?;
    Ok(id)
}

/// What went wrong, from restic's messages, in words a device owner can act on.
pub fn classify(lines: &[String], repository: &str) -> Option<String> {
    let text = lines.join("\n");
    let has = |s: &str| text.contains(s);
    if has("wrong password or no key found") {
        return Some(format!("wrong repository password: {PROVISION_DIR}/password does not open {repository}"));
    }
    if has("507 Insufficient Storage")
        || has("no space left on device")
        || has("QuotaExceeded")
        || has("quota exceeded")
    {
        return Some(format!("the backup target is full ({repository}): free space there or raise its quota; nothing on the device was changed"));
    }
    if has("(401)") || has("401 Unauthorized") || has("AccessDenied") || has("Permission denied (publickey") {
        return Some(format!(
            "the backup target refused this device's credentials ({PROVISION_DIR}/env or ssh_key) for {repository}"
        ));
    }
    if has("connection refused")
        || has("no such host")
        || has("i/o timeout")
        || has("network is unreachable")
        || has("no route to host")
    {
        return Some(format!("cannot reach the backup target {repository}"));
    }
    None
}

/// A retry message restic prints while it keeps trying: is the answer final?
fn final_refusal(line: &str) -> bool {
    line.contains("retrying after")
        && (line.contains("(507)")
            || line.contains("(401)")
            || line.contains("(403)")
            || line.contains("(413)")
            || line.contains("no space left"))
}

/// host:port of a network repository, for a quick reachability probe.
pub fn endpoint(repository: &str) -> Option<(String, u16)> {
    let (rest, default) = if let Some(r) = repository.strip_prefix("rest:") {
        let (scheme, after) = r.split_once("://")?;
        (after.split('/').next()?.to_string(), if scheme == "https" { 443 } else { 80 })
    } else if let Some(r) = repository.strip_prefix("sftp:") {
        if let Some(after) = r.strip_prefix("//") {
            (after.split('/').next()?.rsplit('@').next()?.to_string(), 22)
        } else {
            (r.split(':').next()?.rsplit('@').next()?.to_string(), 22)
        }
    } else {
        return None;
    };
    let hostport = rest.rsplit('@').next()?.to_string();
    if let Some(h) = hostport.strip_prefix('[') {
        let (host, tail) = h.split_once(']')?;
        let port = tail.strip_prefix(':').and_then(|p| p.parse().ok()).unwrap_or(default);
        return Some((host.to_string(), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
            Some((h.to_string(), p.parse().ok()?))
        }
        _ => Some((hostport, default)),
    }
}

/// Something that speaks the target's protocol is at the other end of `s`: an HTTP status
/// line for `rest:http://`, an SSH banner for `sftp:` (a proxy or relay that accepts the
/// connection and then closes it is not a backup target). TLS targets: the connection only.
fn answers(mut s: std::net::TcpStream, repository: &str, host: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let expect = if repository.starts_with("rest:http://") {
        let req = format!("HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        "HTTP/"
    } else if repository.starts_with("sftp:") {
        "SSH-"
    } else {
        return Ok(());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < expect.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err("the connection was closed without an answer".into()),
            Ok(n) => got += n,
            Err(e) => return Err(format!("no answer: {e}")),
        }
    }
    if &buf[..expect.len()] != expect.as_bytes() {
        return Err(format!("it does not answer as {} server", if expect == "SSH-" { "an SSH" } else { "an HTTP" }));
    }
    Ok(())
}

/// The restic keep flags of a retention policy.
pub fn keep_args(keep: &std::collections::BTreeMap<String, u32>) -> Vec<String> {
    keep.iter().flat_map(|(k, n)| [format!("--keep-{k}"), n.to_string()]).collect()
}

/// One device's backups.
pub struct Backups {
    pub cfg: BackupConfig,
    pub state_dir: PathBuf,
    pub provision: PathBuf,
    pub cache: PathBuf,
    pub hostname: String,
    pub version: String,
    /// Where the provisioned device id would be ([`device_id`]).
    pub provisioned_id: PathBuf,
}

/// A restic run's result.
struct Out {
    stdout: Vec<String>,
}

impl Backups {
    pub fn new(cfg: BackupConfig, state_dir: &Path, version: &str) -> Backups {
        let hostname = crate::system::hostname();
        Backups {
            cfg,
            state_dir: state_dir.into(),
            provision: PROVISION_DIR.into(),
            cache: CACHE_DIR.into(),
            hostname,
            version: version.into(),
            provisioned_id: PROVISIONED_ID.into(),
        }
    }

    /// restic's `--host` for this device's snapshots ([`device_id`]).
    fn id(&self) -> Result<String> {
        device_id(&self.provisioned_id, &self.state_dir)
    }

    /// Who the snapshots are of, for messages: the hostname and the identity.
    fn who(&self) -> String {
        match self.id() {
            Ok(id) => format!("{} (device {})", self.hostname, &id[..12]),
            Err(_) => self.hostname.clone(),
        }
    }

    fn credentials(&self) -> Result<Credentials> {
        Credentials::load(&self.provision, &self.cfg)
    }

    /// Runs restic with the device's credentials; an error says what to do about it.
    fn restic(&self, creds: &Credentials, args: &[String], keep: fn(&str) -> bool) -> Result<Out> {
        self.restic_judged(creds, args, keep, |_| false)
    }

    /// `restic`, also stopped (and failed) at the first message `refuse` matches.
    fn restic_judged(
        &self,
        creds: &Credentials,
        args: &[String],
        keep: fn(&str) -> bool,
        refuse: fn(&str) -> bool,
    ) -> Result<Out> {
        let mut full: Vec<String> =
            vec!["--repo".into(), creds.repository.clone(), "--cache-dir".into(), self.cache.display().to_string()];
        full.push("--password-file".into());
        full.push(creds.password_file.display().to_string());
        if let Some(a) = &creds.sftp_args {
            full.push("-o".into());
            full.push(format!("sftp.args={a}"));
        }
        full.extend(args.iter().cloned());
        let mut cmd = Cmd::new(RESTIC).args(&full);
        for (k, v) in &creds.env {
            cmd = cmd.env(k, v);
        }
        // restic's cache and password come as arguments (--cache-dir, --password-file): it
        // needs neither HOME nor XDG_CACHE_HOME, and gets only these variables.
        let cmd = cmd.env("RESTIC_PROGRESS_FPS", "0.016");
        let retry = Duration::from_secs(self.cfg.retry_secs.max(10));
        let mut first_retry: Option<Instant> = None;
        let judge = |line: &str| -> Option<String> {
            if final_refusal(line) || refuse(line) {
                return Some(line.trim().to_string());
            }
            if line.contains("retrying after") {
                let t = *first_retry.get_or_insert_with(Instant::now);
                if t.elapsed() > retry {
                    return Some(format!("the target kept failing for {}s: {}", retry.as_secs(), line.trim()));
                }
            }
            None
        };
        let f = cmd.watch(RUN_LIMIT, keep, judge)?;
        if f.success {
            return Ok(Out { stdout: f.stdout });
        }
        let mut lines = f.stderr.clone();
        lines.extend(f.stopped.iter().cloned());
        let what = classify(&lines, &creds.shown);
        let detail = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("Fatal:") || l.contains("error"))
            .cloned()
            .or_else(|| f.stopped.clone())
            .unwrap_or_else(|| lines.last().cloned().unwrap_or_default());
        let code = f.code.map(|c| format!("exit {c}")).unwrap_or_else(|| "stopped".into());
        match what {
            Some(w) => bail!(ResticError {
                code: f.code,
                message: format!(
                    "{w} (restic {} {code}: {})",
                    args.first().map(String::as_str).unwrap_or(""),
                    detail.trim()
                )
            }),
            None => bail!(ResticError {
                code: f.code,
                message: format!(
                    "restic {} failed ({code}): {}",
                    args.first().map(String::as_str).unwrap_or(""),
                    detail.trim()
                )
            }),
        }
    }

    /// The target answers at all (a TCP connection to it), so that an unreachable target is
    /// an error in seconds rather than after restic's 15 minutes of retries.
    fn probe(&self, creds: &Credentials) -> Result<()> {
        let Some((host, port)) = endpoint(&creds.repository) else {
            // A local path: it must exist (a disk that is not mounted is not a repository).
            let path = Path::new(&creds.repository);
            if creds.repository.starts_with('/') && !path.parent().is_some_and(|p| p.exists()) {
                bail!("the backup target {} is not there (is its disk mounted?)", creds.shown);
            }
            return Ok(());
        };
        use std::net::ToSocketAddrs;
        let deadline = Instant::now() + Duration::from_secs(self.cfg.retry_secs.clamp(5, 30));
        loop {
            let attempt = (host.as_str(), port).to_socket_addrs().map_err(|e| e.to_string()).and_then(|addrs| {
                let mut last = "no address".to_string();
                for a in addrs {
                    match std::net::TcpStream::connect_timeout(&a, Duration::from_secs(10))
                        .map_err(|e| e.to_string())
                        .and_then(|s| answers(s, &creds.repository, &host))
                    {
                        Ok(()) => return Ok(()),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            });
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("cannot reach the backup target {} ({host}:{port}: {e}); the next attempt is at the next scheduled run", creds.shown),
                Err(_) => std::thread::sleep(Duration::from_secs(2)),
            }
        }
    }

    /// Opens the repository. It is created (restic exit code 10: none there) only where this
    /// device never opened one at that location, or when the owner says so (`new_repository`):
    /// a repository that disappears (an unmounted NAS volume, a wrong address, someone in the
    /// middle of `rest:http`) or is replaced by another is an error with an alert. Returns
    /// whether it was created.
    fn open_or_init(&self, creds: &Credentials, new_repository: bool) -> Result<bool> {
        let mut status = Status::load(&self.state_dir)?;
        let seen = status.repository.clone().filter(|r| r.location == creds.shown);
        let opened = self.restic(creds, &["cat".into(), "config".into()], |_| true);
        let missing = matches!(&opened, Err(e) if e.downcast_ref::<ResticError>().is_some_and(|r| r.code == Some(10)));
        let (id, created) = match (opened, seen) {
            (Ok(out), seen) => {
                let id = config_id(&out.stdout)?;
                if let Some(seen) = seen.filter(|s| s.id != id && !new_repository) {
                    bail!(
                        "the repository at {} is not the one this device backed up to (its id is {}, was {}): another repository, or a target that is not what it was; nothing was backed up. Check the target; to back up into this repository from now on, run `kiln-agent backup now --new-repository`",
                        creds.shown,
                        short(&id),
                        short(&seen.id)
                    );
                }
                (id, false)
            }
            (Err(_), Some(seen)) if missing && !new_repository => bail!(
                "the repository at {}, which holds this device's backups (id {}), is not there: an unmounted volume, a wrong address, or someone in between; nothing was created or backed up. Check the target; if it is really gone, run `kiln-agent backup now --new-repository` to start a new one",
                creds.shown,
                short(&seen.id)
            ),
            (Err(_), _) if missing => {
                self.restic(creds, &["init".into()], |_| false).context("creating the repository")?;
                println!("kiln-agent: created a new restic repository at {}", creds.shown);
                let out = self.restic(creds, &["cat".into(), "config".into()], |_| true)?;
                (config_id(&out.stdout)?, true)
            }
            (Err(e), _) => return Err(e),
        };
        if status.repository.as_ref().map(|r| (&r.location, &r.id)) != Some((&creds.shown, &id)) {
            status.repository = Some(SeenRepository { location: creds.shown.clone(), id });
            status.write(&self.state_dir)?;
        }
        Ok(created)
    }

    /// The paths that exist now (restic refuses a missing one).
    fn existing_paths(&self) -> Vec<String> {
        self.cfg.paths.iter().filter(|p| Path::new(p).exists()).cloned().collect()
    }

    /// `kiln-agent backup now`: a snapshot of the declared paths, services quiesced.
    pub fn backup(&self, reason: Reason, force: bool, new_repository: bool) -> Result<Run> {
        let _lock = lock()?;
        let start = Instant::now();
        let status = Status::load(&self.state_dir)?;
        if let (Some(r), false) = (&status.self_restore, force) {
            if r.outcome.as_deref() == Some("failed") {
                bail!("this device's self-restore failed ({}); a backup now would start its history from the empty data partition: run `kiln-agent backup restore` first, or `kiln-agent backup now --force`", r.summary);
            }
        }
        let creds = self.credentials()?;
        self.probe(&creds)?;
        let created = self.open_or_init(&creds, new_repository)?;
        let paths = self.existing_paths();
        if paths.is_empty() {
            bail!("nothing to back up: none of {} exists", self.cfg.paths.join(", "));
        }
        let stopped = self.quiesce()?;
        let mut args: Vec<String> = vec!["backup".into(), "--json".into(), "--host".into(), self.id()?];
        let tags = [
            "kiln".to_string(),
            reason.tag().to_string(),
            format!("version={}", self.version),
            format!("hostname={}", self.hostname),
        ];
        for t in tags {
            args.push("--tag".into());
            args.push(t);
        }
        for x in &self.cfg.exclude {
            args.push("--exclude".into());
            args.push(x.clone());
        }
        args.extend(paths.iter().cloned());
        let result = self.restic(&creds, &args, |l| l.contains("\"message_type\":\"summary\""));
        let resumed = self.resume(&stopped);
        let out = result?;
        resumed?;
        let summary: serde_json::Value =
            out.stdout.last().and_then(|l| serde_json::from_str(l).ok()).context("restic backup printed no summary")?;
        let snapshot = summary["snapshot_id"].as_str().map(|s| s[..s.len().min(8)].to_string());
        let files = summary["total_files_processed"].as_u64();
        let bytes = summary["total_bytes_processed"].as_u64();
        let added = summary["data_added"].as_u64().unwrap_or(0);
        let quiesced =
            if stopped.is_empty() { String::new() } else { format!("; {} stopped meanwhile", stopped.join(", ")) };
        Ok(Run {
            at: Timestamp::now(),
            ok: true,
            summary: format!(
                "snapshot {} of {} ({} files, {} bytes, {added} bytes new){}{quiesced}",
                snapshot.as_deref().unwrap_or("?"),
                paths.join(" "),
                files.unwrap_or(0),
                bytes.unwrap_or(0),
                if created { "; new repository" } else { "" }
            ),
            snapshot,
            files,
            bytes,
            seconds: start.elapsed().as_secs_f64(),
            outcome: Some(reason.tag().into()),
        })
    }

    /// Stops the services that must not change under a backup; returns the ones it stopped.
    fn quiesce(&self) -> Result<Vec<String>> {
        let mut stopped = Vec::new();
        for s in self.cfg.services.iter().filter(|s| s.quiesce == Quiesce::Stop) {
            if system::is_active(&s.unit) {
                if let Err(e) = Cmd::new("systemctl").args(["stop", &s.unit]).run() {
                    let _ = self.resume(&stopped);
                    return Err(anyhow::Error::new(e).context(format!("stopping {} for the backup", s.unit)));
                }
                stopped.push(s.unit.clone());
            }
        }
        Ok(stopped)
    }

    fn resume(&self, units: &[String]) -> Result<()> {
        let mut failed = Vec::new();
        for u in units {
            if let Err(e) = Cmd::new("systemctl").args(["start", u]).run() {
                failed.push(format!("{u}: {e:#}"));
            }
        }
        if !failed.is_empty() {
            bail!("starting services again after the backup failed: {}", failed.join("; "));
        }
        Ok(())
    }

    /// The newest snapshot of this device (its hostname), if any: (id, time, paths).
    fn latest(&self, creds: &Credentials) -> Result<Option<serde_json::Value>> {
        let out = self.restic(
            creds,
            &["snapshots".into(), "--json".into(), "--latest".into(), "1".into(), "--host".into(), self.id()?],
            |_| true,
        )?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out.stdout.join("\n")).context("reading restic's snapshot list")?;
        Ok(list.into_iter().max_by_key(|s| s["time"].as_str().unwrap_or_default().to_string()))
    }

    /// `kiln-agent backup drill`: read back a share of the repository's data (restic check),
    /// restore the newest snapshot into a scratch directory with every file's contents verified
    /// against the snapshot, compare the restored tree with the snapshot's listing, clean up.
    pub fn drill(&self) -> Result<Run> {
        let _lock = lock()?;
        let start = Instant::now();
        let creds = self.credentials()?;
        self.probe(&creds)?;
        self.restic(&creds, &["check".into(), format!("--read-data-subset={}", self.cfg.check_subset)], |_| false)
            .context("restic check of the repository")?;
        let Some(snap) = self.latest(&creds)? else {
            bail!("there is no snapshot of {} in {} to restore", self.who(), creds.shown);
        };
        let id = snap["id"].as_str().context("snapshot without id")?.to_string();
        let short = id[..8.min(id.len())].to_string();
        let stats = self.restic(
            &creds,
            &["stats".into(), "--json".into(), "--mode".into(), "restore-size".into(), id.clone()],
            |_| true,
        )?;
        let stats: serde_json::Value =
            serde_json::from_str(&stats.stdout.join("\n")).context("reading restic stats")?;
        let need = stats["total_size"].as_u64().unwrap_or(0);
        let scratch = self.state_dir.join("drill");
        remove_all(&scratch)?;
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let free = system::free_bytes(&scratch)?;
        if need + need / 10 + (64 << 20) > free {
            remove_all(&scratch)?;
            bail!(
                "not enough room for the drill: snapshot {short} restores {need} bytes and {} has {free} bytes free",
                scratch.display()
            );
        }
        let result = self.restore_and_compare(&creds, &id, &scratch);
        remove_all(&scratch)?;
        let (files, bytes, digest) =
            result.with_context(|| format!("restoring snapshot {short} into {}", scratch.display()))?;
        Ok(Run {
            at: Timestamp::now(),
            ok: true,
            summary: format!(
                "snapshot {short} restored and verified: {files} files, {bytes} bytes, contents match the snapshot (sha256 of the restored tree {}); {} of the repository's data read back",
                &digest[..16],
                self.cfg.check_subset
            ),
            snapshot: Some(short),
            files: Some(files),
            bytes: Some(bytes),
            seconds: start.elapsed().as_secs_f64(),
            outcome: None,
        })
    }

    fn restore_and_compare(&self, creds: &Credentials, id: &str, scratch: &Path) -> Result<(u64, u64, String)> {
        self.restic(
            creds,
            &["restore".into(), id.into(), "--target".into(), scratch.display().to_string(), "--verify".into()],
            |_| false,
        )?;
        let ls =
            self.restic(creds, &["ls".into(), "--json".into(), id.into()], |l| l.contains("\"struct_type\":\"node\""))?;
        let nodes: Vec<Node> = ls.stdout.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
        compare_tree(&nodes, scratch)
    }

    /// `kiln-agent backup restore [SNAPSHOT]`: the snapshot (this device's own: another
    /// device's is refused) back into place, path by path: each of the profile's paths is made
    /// exactly what the snapshot holds (files made since are removed: a SQLite `-wal` left
    /// next to a restored database would corrupt it), and nothing outside them is touched
    /// (a snapshot holding more, an `authorized_keys` say, plants nothing). Every service of the
    /// profile is stopped meanwhile, crash-looping ones too, and started again after.
    pub fn restore(&self, snapshot: Option<&str>) -> Result<Run> {
        let _lock = lock()?;
        let start = Instant::now();
        let creds = self.credentials()?;
        self.probe(&creds)?;
        let snap = match snapshot {
            Some(s) => self.snapshot(&creds, s)?,
            None => match self.latest(&creds)? {
                Some(s) => s,
                None => bail!("there is no snapshot of {} in {}", self.who(), creds.shown),
            },
        };
        let id = snap["id"].as_str().context("snapshot without id")?.to_string();
        let mut stopped = Vec::new();
        for s in &self.cfg.services {
            // Not only the active ones: a crash-looping service restarts into the restore.
            let state = system::active_state(&s.unit);
            if state != "inactive" {
                Cmd::new("systemctl").args(["stop", &s.unit]).run()?;
                stopped.push(s.unit.clone());
            }
        }
        let result = self.restore_paths(&creds, &snap, false);
        let resumed = self.resume(&stopped);
        let (restored, skipped) = result?;
        resumed?;
        let short = id[..8.min(id.len())].to_string();
        let skipped = if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({} not in the snapshot: left as it is)", skipped.join(", "))
        };
        Ok(Run {
            at: Timestamp::now(),
            ok: true,
            summary: format!("snapshot {short} restored into place: {}{skipped}", restored.join(" ")),
            snapshot: Some(short),
            files: None,
            bytes: None,
            seconds: start.elapsed().as_secs_f64(),
            outcome: Some("restored".into()),
        })
    }

    /// One snapshot by id, which must be this device's.
    fn snapshot(&self, creds: &Credentials, id: &str) -> Result<serde_json::Value> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("{id:?} is not a snapshot id (hex digits, as `kiln-agent backup status` and restic show them)");
        }
        let out = self.restic(creds, &["snapshots".into(), "--json".into(), id.into()], |_| true)?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out.stdout.join("\n")).context("reading restic's snapshot list")?;
        let snap = list.into_iter().next().with_context(|| format!("there is no snapshot {id} in {}", creds.shown))?;
        let own = self.id()?;
        let host = snap["hostname"].as_str().unwrap_or_default();
        if host != own {
            bail!(
                "snapshot {id} is not this device's (it is of device {host:?}, this is {}): restoring it would bring another device's data and files here",
                self.who()
            );
        }
        Ok(snap)
    }

    /// Restores the profile's paths that `snap` holds, each into itself with files the snapshot
    /// does not have removed; returns (restored, not in the snapshot).
    fn restore_paths(
        &self,
        creds: &Credentials,
        snap: &serde_json::Value,
        verify: bool,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let id = snap["id"].as_str().context("snapshot without id")?;
        let in_snapshot: Vec<&str> =
            snap["paths"].as_array().map(|a| a.iter().filter_map(|p| p.as_str()).collect()).unwrap_or_default();
        let (mut restored, mut skipped) = (Vec::new(), Vec::new());
        for p in &self.cfg.paths {
            if !in_snapshot.iter().any(|s| s == p) {
                skipped.push(p.clone());
                continue;
            }
            std::fs::create_dir_all(p).with_context(|| format!("creating {p}"))?;
            let mut args: Vec<String> =
                vec!["restore".into(), format!("{id}:{p}"), "--target".into(), p.clone(), "--delete".into()];
            if verify {
                args.push("--verify".into());
            }
            // What was never backed up must not count as "not in the snapshot": restic deletes
            // only files its filters take in.
            for x in &self.cfg.exclude {
                args.push("--exclude".into());
                args.push(x.clone());
            }
            self.restic(creds, &args, |_| false).with_context(|| format!("restoring {p}"))?;
            restored.push(p.clone());
        }
        Ok((restored, skipped))
    }

    /// At boot, before the services: a data partition that never ran (only what the image
    /// brings) on a device with credentials gets the newest snapshot of this device.
    pub fn self_restore(&self) -> Run {
        let start = Instant::now();
        let run = |ok: bool, outcome: &str, summary: String| Run {
            at: Timestamp::now(),
            ok,
            summary,
            snapshot: None,
            files: None,
            bytes: None,
            seconds: start.elapsed().as_secs_f64(),
            outcome: Some(outcome.into()),
        };
        if !self.cfg.self_restore {
            return run(true, "disabled", "self_restore = false in the profile".into());
        }
        if let Some(p) = self
            .cfg
            .paths
            .iter()
            .find(|p| holds_data(Path::new(p), &Path::new(FACTORY_VAR).join(p.trim_start_matches("/var/"))))
        {
            return run(true, "data-present", format!("{p} already holds data: nothing restored"));
        }
        let creds = match self.credentials() {
            Ok(c) => c,
            Err(e) if e.downcast_ref::<NoCredentials>().is_some() => {
                return run(true, "no-credentials", format!("{e:#}: starting with empty data"))
            }
            Err(e) => return run(false, "failed", format!("{e:#}")),
        };
        let attempt = || -> Result<Option<(String, u64)>> {
            self.probe(&creds)?;
            let snap = match self.latest(&creds) {
                Ok(s) => s,
                // No repository yet: a new device.
                Err(e) if e.downcast_ref::<ResticError>().is_some_and(|r| r.code == Some(10)) => None,
                Err(e) => return Err(e),
            };
            let Some(snap) = snap else { return Ok(None) };
            let id = snap["id"].as_str().context("snapshot without id")?.to_string();
            self.restore_paths(&creds, &snap, true)?;
            let files = snap["summary"]["total_files_processed"].as_u64().unwrap_or(0);
            Ok(Some((id, files)))
        };
        match attempt() {
            Ok(None) => run(
                true,
                "fresh",
                format!("no snapshot of {} in {} yet: starting with empty data", self.who(), creds.shown),
            ),
            Ok(Some((id, files))) => {
                let short = id[..8.min(id.len())].to_string();
                let mut r = run(
                    true,
                    "restored",
                    format!(
                        "restored snapshot {short} ({files} files) from {} before the services started",
                        creds.shown
                    ),
                );
                r.snapshot = Some(short);
                r.files = Some(files);
                r
            }
            Err(e) => run(false, "failed", format!("{e:#}")),
        }
    }

    /// `kiln-agent backup prune`: `forget --prune` with the profile's retention. On an
    /// append-only target this fails, as it should; the message says how to prune instead.
    pub fn prune(&self) -> Result<Run> {
        let _lock = lock()?;
        let start = Instant::now();
        let creds = self.credentials()?;
        self.probe(&creds)?;
        let keep = keep_args(&self.cfg.keep);
        let id = self.id()?;
        let mut args: Vec<String> = vec!["forget".into(), "--prune".into(), "--host".into(), id.clone()];
        args.extend(keep.iter().cloned());
        let trusted = format!("restic -r {} forget --prune --host {id} {}", creds.shown, keep.join(" "));
        // restic reports a refused delete as a message and still exits 0: a prune that could
        // not delete is a failed prune.
        match self.restic_judged(&creds, &args, |_| false, |l| l.contains("(403)") || l.contains("403 Forbidden")) {
            Ok(_) => {}
            Err(e) if format!("{e:#}").contains("403") => bail!(
                "the target refused to delete snapshots ({e:#}): it is append-only, so this device's credentials cannot remove history (as recommended). Prune from a trusted machine with the repository's full credentials: {trusted}"
            ),
            Err(e) => return Err(e.context("restic forget --prune")),
        }
        Ok(Run {
            at: Timestamp::now(),
            ok: true,
            summary: format!("pruned with {}", keep.join(" ")),
            snapshot: None,
            files: None,
            bytes: None,
            seconds: start.elapsed().as_secs_f64(),
            outcome: None,
        })
    }
}

/// A restic command failed; `code` is restic's exit code (10: no repository, 12: wrong password).
#[derive(Debug)]
pub struct ResticError {
    pub code: Option<i32>,
    pub message: String,
}

impl std::fmt::Display for ResticError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ResticError {}

/// One entry of `restic ls --json`.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct Node {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub size: Option<u64>,
}

/// Every node of the snapshot is in the restored tree under `root`, of the same type and (for
/// files) size. Returns the file count, their bytes and a sha256 over (path, contents' sha256)
/// of every file in path order.
pub fn compare_tree(nodes: &[Node], root: &Path) -> Result<(u64, u64, String)> {
    use sha2::{Digest, Sha256};
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut tree = Sha256::new();
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut problems = Vec::new();
    for n in sorted {
        let p = root.join(n.path.trim_start_matches('/'));
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(_) => {
                problems.push(format!("{} is missing", n.path));
                continue;
            }
        };
        let ok = match n.kind.as_str() {
            "dir" => meta.is_dir(),
            "symlink" => meta.file_type().is_symlink(),
            "file" => meta.is_file(),
            _ => true,
        };
        if !ok {
            problems.push(format!("{} is not a {}", n.path, n.kind));
            continue;
        }
        if n.kind == "file" {
            if let Some(size) = n.size {
                if meta.len() != size {
                    problems.push(format!("{} has {} bytes, the snapshot {size}", n.path, meta.len()));
                    continue;
                }
            }
            let data = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            tree.update(n.path.as_bytes());
            tree.update(Sha256::digest(&data));
            files += 1;
            bytes += meta.len();
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(5);
        bail!("the restored tree differs from the snapshot in {n} place(s): {}", problems.join("; "));
    }
    Ok((files, bytes, hex::encode(tree.finalize())))
}

/// A directory holds data when it has any file the image did not bring (factory files
/// unchanged do not count).
pub fn holds_data(dir: &Path, factory: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    for e in entries.flatten() {
        let path = e.path();
        let twin = factory.join(e.file_name());
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            if holds_data(&path, &twin) {
                return true;
            }
        } else if meta.is_file() {
            let same =
                std::fs::read(&twin).ok().is_some_and(|f| std::fs::read(&path).ok().as_deref() == Some(f.as_slice()));
            if !same {
                return true;
            }
        } else if !twin.exists() {
            return true;
        }
    }
    false
}

fn remove_all(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// One backup operation at a time (timers, a manual run and an update's backup may meet).
fn lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all("/run/kiln-agent").context("creating /run/kiln-agent")?;
    let f = std::fs::File::create("/run/kiln-agent/backup.lock").context("creating /run/kiln-agent/backup.lock")?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking /run/kiln-agent/backup.lock: {e}"))
}

/// Records a run's outcome, refreshes the alerts and reports every current alert to the journal
/// (priority err) and the console. Delivering them (`alert_url`, the status feed) is the
/// monitor's, which `main` runs after every backup command.
pub fn record(state_dir: &Path, cfg: &BackupConfig, update: impl FnOnce(&mut Status)) -> Result<Status> {
    let mut status = Status::load(state_dir)?;
    update(&mut status);
    status.refresh_alerts(Timestamp::now(), cfg.stale_after_secs);
    status.redact();
    status.write(state_dir)?;
    for a in &status.alerts {
        // sd-daemon priority prefix: the journal files the line at "err".
        println!("<3>kiln-agent: ALERT: {a}");
    }
    Ok(status)
}

/// An alert's identity: two alerts are the same one when they differ only in times and ages (a
/// stale backup that got a day older, a backup that failed again for the same reason, is not news).
pub fn alert_key(s: &str) -> String {
    if let Some((head, tail)) = s.split_once(" at ") {
        if let Some((_, reason)) = tail.split_once(": ") {
            return format!("{head}: {reason}");
        }
    }
    s.split(" (").next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_never_reach_a_message() {
        // Issue 16 item 12: a provisioned backup/repository with a password was echoed into
        // logs, backup.json and alert_url.
        assert_eq!(
            redact("rest:https://dev1:s3cr3t@backup.example.org/dev1/"),
            "rest:https://dev1:***@backup.example.org/dev1/"
        );
        assert_eq!(
            redact("cannot reach rest:http://u:p%40ss@10.0.2.2:8000/r (x) and s3:https://k:v@s3.example.org/b"),
            "cannot reach rest:http://u:***@10.0.2.2:8000/r (x) and s3:https://k:***@s3.example.org/b"
        );
        for same in
            ["rest:https://backup.example.org/x", "sftp:backup@nas:/srv/restic", "/var/backup", "no url here", "a://"]
        {
            assert_eq!(redact(same), same);
        }
        let mut st = Status {
            last_backup: Some(Run {
                at: Timestamp(1),
                ok: false,
                summary: "cannot reach the backup target rest:http://u:pw@h/r".into(),
                snapshot: None,
                files: None,
                bytes: None,
                seconds: 0.0,
                outcome: None,
            }),
            alerts: vec!["backup failed at x: rest:http://u:pw@h/r".into()],
            ..Status::default()
        };
        st.redact();
        let text = serde_json::to_string(&st).unwrap();
        assert!(!text.contains("pw@") && text.contains("u:***@h"), "{text}");
    }

    #[test]
    fn a_device_has_an_identity_of_its_own() {
        // Issue 16 item 10: identity was the hostname: devices without one shared snapshots.
        let t = tempfile::tempdir().unwrap();
        let (prov, state_a, state_b) = (t.path().join("device-id"), t.path().join("a"), t.path().join("b"));
        let a = device_id(&prov, &state_a).unwrap();
        let b = device_id(&prov, &state_b).unwrap();
        assert!(kiln_device::valid_device_id(&a) && kiln_device::valid_device_id(&b));
        assert_ne!(a, b, "two devices without a provisioned id get different ones");
        assert_eq!(device_id(&prov, &state_a).unwrap(), a, "kept on the data partition");
        std::fs::write(&prov, "0123456789abcdef0123456789abcdef\n").unwrap();
        assert_eq!(device_id(&prov, &state_a).unwrap(), "0123456789abcdef0123456789abcdef", "the provisioned one wins");
        std::fs::write(&prov, "dev1\n").unwrap();
        let e = device_id(&prov, &state_a).unwrap_err().to_string();
        assert!(e.ends_with("expected 32 hex digits (as kiln flash --provision writes it), found 4 characters"), "{e}");
    }

    #[test]
    fn endpoints_of_network_repositories() {
        assert_eq!(endpoint("rest:http://10.0.2.100/dev1"), Some(("10.0.2.100".into(), 80)));
        assert_eq!(endpoint("rest:https://u:p@backup.example.org:8443/x/"), Some(("backup.example.org".into(), 8443)));
        assert_eq!(endpoint("rest:https://[fd00::1]/r"), Some(("fd00::1".into(), 443)));
        assert_eq!(endpoint("sftp:backup@nas.example.org:/srv/restic/home"), Some(("nas.example.org".into(), 22)));
        assert_eq!(endpoint("sftp://backup@nas:2222//srv/restic"), Some(("nas".into(), 2222)));
        assert_eq!(endpoint("/var/backup/repo"), None);
        assert_eq!(endpoint("s3:s3.amazonaws.com/bucket"), None);
    }

    #[test]
    fn env_files_are_checked() {
        use kiln_device::parse_backup_env as parse_env;
        let env = parse_env("# rest-server login\nRESTIC_REST_USERNAME=dev1\nRESTIC_REST_PASSWORD = \"s3 cret\"\n\n")
            .unwrap();
        assert_eq!(
            env,
            vec![("RESTIC_REST_USERNAME".into(), "dev1".into()), ("RESTIC_REST_PASSWORD".into(), "s3 cret".into())]
        );
        assert_eq!(parse_env("oops").unwrap_err(), "line 1: expected KEY=VALUE, such as RESTIC_REST_USERNAME=device1");
        assert!(parse_env("lower=1").unwrap_err().contains("not an environment variable name"));
        assert!(parse_env("RESTIC_PASSWORD=x").unwrap_err().contains("belongs in backup/password"));
    }

    #[test]
    fn restic_messages_become_actions() {
        let l = |s: &str| vec![s.to_string()];
        assert!(classify(&l("Fatal: wrong password or no key found"), "rest:x")
            .unwrap()
            .starts_with("wrong repository password"));
        assert!(classify(&l("Save(<lock/1>) returned error, retrying after 6s: unexpected HTTP response (507): 507 Insufficient Storage"), "rest:x").unwrap().starts_with("the backup target is full"));
        assert!(classify(
            &l("Fatal: unable to open config file: unexpected HTTP response (401): 401 Unauthorized"),
            "rest:x"
        )
        .unwrap()
        .contains("refused this device's credentials"));
        assert!(classify(&l("dial tcp 10.0.2.100:80: connect: connection refused"), "rest:x")
            .unwrap()
            .starts_with("cannot reach"));
        assert_eq!(classify(&l("Fatal: something else"), "rest:x"), None);
        assert!(final_refusal("Save(<data/ab>) returned error, retrying after 1.2s: unexpected HTTP response (507): 507 Insufficient Storage"));
        assert!(!final_refusal(
            "Stat(<config/>) returned error, retrying after 610ms: dial tcp: connect: connection refused"
        ));
    }

    #[test]
    fn an_alert_that_only_got_older_is_not_raised_again() {
        let same_alert = |a: &str, b: &str| alert_key(a) == alert_key(b);
        assert!(same_alert("backup failed at 2026-12-01T03:00:00Z: x", "backup failed at 2026-12-02T03:00:00Z: x"));
        assert!(!same_alert("backup failed at 2026-12-01T03:00:00Z: x", "backup failed at 2026-12-02T03:00:00Z: y"));
        assert!(same_alert(
            "the last good backup is from 2026-11-28T03:00:00Z (3d ago; alert_after is 2d)",
            "the last good backup is from 2026-11-28T03:00:00Z (4d ago; alert_after is 2d)"
        ));
        assert!(!same_alert(
            "backup failed at 2026-12-01T03:00:00Z: x",
            "restore drill failed at 2026-12-01T03:00:00Z: x"
        ));
    }

    #[test]
    fn keep_flags() {
        let keep = [("daily".to_string(), 7), ("monthly".to_string(), 12)].into_iter().collect();
        assert_eq!(keep_args(&keep), ["--keep-daily", "7", "--keep-monthly", "12"]);
    }

    #[test]
    fn alerts_follow_the_record() {
        let run = |at: u64, ok: bool| Run {
            at: Timestamp(at),
            ok,
            summary: "s".into(),
            snapshot: None,
            files: None,
            bytes: None,
            seconds: 0.0,
            outcome: None,
        };
        let mut s = Status {
            last_backup: Some(run(1000, true)),
            last_good_backup: Some(run(1000, true)),
            ..Default::default()
        };
        s.refresh_alerts(Timestamp(2000), 86400);
        assert!(s.alerts.is_empty());
        s.refresh_alerts(Timestamp(1000 + 3 * 86400), 86400);
        assert_eq!(s.alerts.len(), 1);
        assert!(s.alerts[0].contains("the last good backup is from"), "{:?}", s.alerts);
        s.last_drill = Some(run(3000, false));
        s.last_backup = Some(run(3000, false));
        s.refresh_alerts(Timestamp(3000), 86400);
        assert_eq!(s.alerts.len(), 2, "{:?}", s.alerts);
        let never = Status { last_backup: Some(run(1, false)), ..Default::default() };
        let mut n = never.clone();
        n.refresh_alerts(Timestamp(2), 86400);
        assert!(n.alerts.iter().any(|a| a == "there is no good backup of this device yet"));
    }

    #[test]
    fn restored_trees_are_compared_with_the_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("var/lib/private/notes")).unwrap();
        std::fs::write(r.join("var/lib/private/notes/a"), b"hello").unwrap();
        std::os::unix::fs::symlink("a", r.join("var/lib/private/notes/l")).unwrap();
        let node = |p: &str, k: &str, s: Option<u64>| Node { path: p.into(), kind: k.into(), size: s };
        let nodes = vec![
            node("/var/lib/private/notes", "dir", None),
            node("/var/lib/private/notes/a", "file", Some(5)),
            node("/var/lib/private/notes/l", "symlink", None),
        ];
        let (files, bytes, digest) = compare_tree(&nodes, r).unwrap();
        assert_eq!((files, bytes, digest.len()), (1, 5, 64));
        let mut wrong = nodes.clone();
        wrong[1].size = Some(6);
        wrong.push(node("/var/lib/private/notes/b", "file", Some(1)));
        let e = compare_tree(&wrong, r).unwrap_err().to_string();
        assert!(
            e.contains("differs from the snapshot in 2 place(s)")
                && e.contains("notes/b is missing")
                && e.contains("has 5 bytes, the snapshot 6"),
            "{e}"
        );
    }

    #[test]
    fn factory_files_are_not_data() {
        let t = tempfile::tempdir().unwrap();
        let (live, factory) = (t.path().join("var/home"), t.path().join("factory/home"));
        for d in [&live, &factory] {
            std::fs::create_dir_all(d.join("alice")).unwrap();
            std::fs::write(d.join("alice/.profile"), b"umask 027\n").unwrap();
        }
        std::fs::create_dir_all(live.join("alice/.cache")).unwrap();
        assert!(!holds_data(&live, &factory));
        std::fs::write(live.join("alice/notes.txt"), b"mine").unwrap();
        assert!(holds_data(&live, &factory));
        std::fs::remove_file(live.join("alice/notes.txt")).unwrap();
        std::fs::write(live.join("alice/.profile"), b"changed\n").unwrap();
        assert!(holds_data(&live, &factory));
        assert!(!holds_data(&t.path().join("missing"), &factory));
    }
}
