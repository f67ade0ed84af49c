//! kiln-agent: the on-device updater. It follows the image's signed release feed, installs a
//! newer release into the other A/B slot, reboots into it as a trial, and commits it once the
//! health check passed or goes back to the committed slot when it did not.
//!
//! Run by systemd (units written by the builder): `boot` at every start, `commit` after
//! boot-complete.target, `rollback` when kiln-health.service fails, `check` from a timer.
//!
//! The modules use each other in one direction only (`use crate::` edges; no circles):
//!
//! ```text
//! main    -> agent, backup, data, monitor, state, update
//! monitor -> backup, data, download, state, watch           (one look: events, the status feed, delivery)
//! watch   -> backup, exec, state, system, x509              (what the monitor watches, judged)
//! data    -> exec, factory, system                          (/var: grown, formatted, mounted)
//! update  -> agent, backup, boot, download, state, system   (one update check)
//! agent   -> boot, state, system                            (boot, commit, rollback)
//! backup  -> download, exec, factory, state, system         (restic)
//! boot    -> exec, state, system                            (the boot medium: UKIs, autoboot.txt, cmdline.txt)
//! system  -> exec                                           (the running system: sysfs, /proc, systemd)
//! download, state, exec, factory, x509 -> (nothing of the agent's)    (exec: the only process spawner)
//! ```

mod agent;
mod backup;
mod boot;
mod data;
mod delta;
mod download;
mod exec;
mod factory;
mod monitor;
mod state;
mod system;
mod update;
mod watch;
mod wifi;
mod x509;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kiln-agent",
    version,
    about = "kiln's on-device updater: signed feed, A/B slots, health-gated commit, rollback"
)]
struct Cli {
    /// The device description the builder baked into the image.
    #[arg(long, default_value = kiln_device::DEVICE_CONFIG, global = true)]
    config: PathBuf,
    /// Where the status record lives (on the data partition).
    #[arg(long, default_value = "/var/lib/kiln-agent", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile the record with what booted (run once per boot).
    Boot,
    /// Commit a trial boot that passed its health check.
    Commit,
    /// The health check failed: leave a trial boot and reboot into the committed slot.
    Rollback {
        /// Record and clean up, but do not reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Check the feed once; install a newer release and reboot into it.
    Check {
        /// Install even outside the profile's update window.
        #[arg(long)]
        now: bool,
        /// Install, but do not reboot.
        #[arg(long)]
        no_reboot: bool,
    },
    /// Show versions, slots and the last check.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run by kiln's initramfs, chrooted into the verified root: find the data partition on
    /// the root's disk, grow it to the end of the medium, make its file system on first boot,
    /// check and mount it (a tmpfs, and the reason in /run/kiln/data-error, when it cannot).
    MountData {
        #[arg(long, default_value = "/var")]
        target: PathBuf,
    },
    /// Wi-Fi on one interface with the provisioned networks (kiln-wifi@IFACE.service): runs
    /// wpa_supplicant and says what happens (connected, passphrase refused, nothing in range).
    Wifi { interface: String },
    /// Look at the device once (kiln-monitor.timer): failed units, disk, backups, updates,
    /// clock, certificates, power, logins; write the status feed and deliver it and the alerts.
    Monitor {
        /// Run at shutdown: record that this boot ends cleanly.
        #[arg(long)]
        stopping: bool,
        /// Print what the look cost: peak RSS, CPU time (its own and the programs it ran).
        #[arg(long)]
        stats: bool,
    },
    /// For `scripts/bench`: install one artifact of the newest release in a signed channel by
    /// delta into a file, from local files, as a device would (the same code), and print its
    /// figures as JSON (bytes, requests, seconds, peak RSS).
    #[command(hide = true)]
    DeltaBench {
        /// The channel's metadata URL (`.../stable.json`; its `.sig` beside it).
        #[arg(long)]
        metadata: String,
        /// The channel's public key file (`kiln-release.pub`).
        #[arg(long)]
        key: PathBuf,
        /// root, uki or boot.
        #[arg(long)]
        kind: String,
        /// What the device has (the old release's artifact files).
        #[arg(long)]
        source: Vec<PathBuf>,
        /// Where the artifact is assembled (created).
        #[arg(long)]
        dest: PathBuf,
    },
    /// Backups with restic: now, status, drill, restore, prune.
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
}

#[derive(Subcommand)]
enum BackupAction {
    /// Back up the profile's paths now (services quiesced as the catalog says).
    Now {
        /// Run by the timer: also prunes when the profile lets the device prune.
        #[arg(long)]
        scheduled: bool,
        /// Back up even though this device's self-restore failed.
        #[arg(long)]
        force: bool,
        /// Create the repository even though this device backed up to another one at that
        /// location before (which is missing or replaced now): only when it is really gone.
        #[arg(long)]
        new_repository: bool,
    },
    /// The last backup, drill, prune and self-restore, and the alerts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: check a share of the repository's data, restore the newest snapshot into
    /// a scratch area, verify it against the snapshot, record the result.
    Drill,
    /// Restore a snapshot (default: this device's newest) into place.
    Restore { snapshot: Option<String> },
    /// At boot: restore the newest snapshot onto a data partition that never ran.
    SelfRestore,
    /// forget --prune with the profile's retention (fails on append-only targets, as it should).
    Prune,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        println!("kiln-agent: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Status { json } = cli.command {
        return status(&cli.config, &cli.state_dir, json);
    }
    if let Command::DeltaBench { metadata, key, kind, source, dest } = &cli.command {
        return delta_bench(metadata, key, kind, source, dest);
    }
    if let Command::Monitor { stopping, stats } = cli.command {
        if stopping {
            return monitor::stopping(&cli.state_dir);
        }
        let config = kiln_device::DeviceConfig::load(&cli.config).map_err(anyhow::Error::msg)?;
        let started = std::time::Instant::now();
        let events = monitor::look(&config, &cli.state_dir)?;
        if stats {
            let (own, children) = (cpu_ms(libc::RUSAGE_SELF), cpu_ms(libc::RUSAGE_CHILDREN));
            println!(
                "kiln-agent: monitor: {} change(s) in {:.2}s; peak RSS {} KiB; CPU {own} ms (+{children} ms in systemctl and journalctl)",
                events.len(),
                started.elapsed().as_secs_f64(),
                peak_rss_kib()
            );
        }
        return Ok(());
    }
    if let Command::Backup { action } = &cli.command {
        // Nothing printed may carry a repository password (a provisioned URL can hold one).
        let result =
            backup(&cli.config, &cli.state_dir, action).map_err(|e| anyhow::anyhow!(backup::redact(&format!("{e:#}"))));
        if !matches!(action, BackupAction::Status { .. }) {
            look_after(&cli.config, &cli.state_dir);
        }
        return result;
    }
    if let Command::Wifi { interface } = &cli.command {
        let config = kiln_device::DeviceConfig::load(&cli.config).map_err(anyhow::Error::msg)?;
        return wifi::run(&config, interface);
    }
    if let Command::MountData { target } = &cli.command {
        let config = kiln_device::DeviceConfig::load(&cli.config);
        return data::mount_or_tmpfs(&system::Host::default(), config, target);
    }
    let agent = agent::Agent::open(&cli.config, &cli.state_dir)?;
    match cli.command {
        Command::Boot => {
            // Noted before anything else of this boot: how the one before it ended.
            if let Err(e) = monitor::note_boot(&cli.state_dir) {
                println!("<4>kiln-agent: monitor: noting this boot: {e:#}");
            }
            agent.boot()
        }
        // No look here: kiln-monitor.service is ordered after the commit, and the timer's first
        // look of the boot (OnBootSec) sees it. A look of its own made two per boot (~6 s of
        // guest time each on a TCG guest, 13-60 s under load).
        Command::Commit => agent.commit(),
        Command::Rollback { no_reboot } => agent.rollback(!no_reboot),
        Command::Check { now, no_reboot } => {
            let before = agent.load_state().ok().map(|s| update_view(&s));
            let outcome = update::check(&agent, now);
            let mut state = agent.load_state()?;
            let line = match &outcome {
                Ok(update::Outcome::UpToDate(s)) | Ok(update::Outcome::Skipped(s)) => {
                    state.last_result = Some(s.clone());
                    s.clone()
                }
                Ok(update::Outcome::Refused(s)) => {
                    state.last_result = Some("refused".into());
                    state.last_error = Some(s.clone());
                    s.clone()
                }
                Ok(update::Outcome::Installed { version, slot, downloaded }) => {
                    format!(
                        "installed {version} into slot {slot} ({downloaded} bytes downloaded, peak RSS {} KiB)",
                        peak_rss_kib()
                    )
                }
                Err(e) => {
                    state.last_error = Some(format!("{e:#}"));
                    agent.record(&state);
                    return Err(anyhow::anyhow!("{e:#}"));
                }
            };
            state.last_check = Some(kiln_feed::Timestamp::now());
            // Said first, recorded after, best effort: a full /var must not swallow the line.
            println!("kiln-agent: {line}");
            agent.record(&state);
            // A check that changed nothing the monitor judges (the same result as the one
            // before, nothing new offered) needs no look: with a short interval a look after
            // every check kept a device busy (the timer's looks still come, and clear
            // "no update check since" within an interval).
            let installed = matches!(outcome, Ok(update::Outcome::Installed { .. }));
            if installed || before.as_ref() != Some(&update_view(&state)) {
                look_after(&cli.config, &cli.state_dir);
            }
            if installed && !no_reboot {
                println!("kiln-agent: rebooting into the new slot");
                agent.medium.reboot_into_trial()?;
            }
            Ok(())
        }
        Command::Status { .. }
        | Command::Backup { .. }
        | Command::MountData { .. }
        | Command::Wifi { .. }
        | Command::Monitor { .. }
        | Command::DeltaBench { .. } => {
            unreachable!("handled above")
        }
    }
}

fn delta_bench(
    metadata: &str,
    key: &std::path::Path,
    kind: &str,
    sources: &[PathBuf],
    dest: &std::path::Path,
) -> Result<()> {
    let client = download::client()?;
    let json = download::fetch_small(&client, metadata, 4 << 20)?;
    let sig = download::fetch_small(&client, &format!("{metadata}.sig"), 4 << 20)?;
    let key_text = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = kiln_feed::PublicKey::parse(key_text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    kiln_feed::verify(&json, &String::from_utf8_lossy(&sig), &[key]).map_err(|e| anyhow::anyhow!("{metadata}: {e}"))?;
    let meta: kiln_feed::Metadata = serde_json::from_slice(&json)?;
    let release = meta.releases.first().context("the channel has no release")?;
    let a = release
        .artifacts
        .iter()
        .find(|a| serde_json::to_value(a.kind).ok().and_then(|v| v.as_str().map(|k| k == kind)).unwrap_or(false))
        .with_context(|| format!("release {} has no {kind} artifact", release.version))?;
    let d = a.delta.as_ref().with_context(|| format!("{} of {} has no chunk index", a.name, release.version))?;
    let sources: Vec<delta::Source> = sources
        .iter()
        .map(|p| {
            Ok(delta::Source {
                path: p.clone(),
                len: std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?.len(),
            })
        })
        .collect::<Result<_>>()?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let pace = download::Pace::standard(std::time::Instant::now());
    let r = delta::install(&client, metadata, a, d, &file, &sources, pace)?;
    let v = serde_json::json!({
        "artifact": a.name,
        "size": a.size,
        "report": r,
        "downloaded": r.downloaded(),
        "http_requests": r.requests + 1,
        "peak_rss_kib": peak_rss_kib(),
        "cpu_ms": cpu_ms(libc::RUSAGE_SELF),
    });
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

fn backup(config: &std::path::Path, state_dir: &std::path::Path, action: &BackupAction) -> Result<()> {
    let device = kiln_device::DeviceConfig::load(config).map_err(anyhow::Error::msg)?;
    let Some(cfg) = device.backup.clone() else {
        if let BackupAction::Status { .. } | BackupAction::SelfRestore = action {
            println!("kiln-agent: this image's profile has no [backup] section");
            return Ok(());
        }
        anyhow::bail!("this image's profile has no [backup] section: backups are set up in the profile ([backup] repository = ...)");
    };
    let b = backup::Backups::new(cfg.clone(), state_dir, &device.version.to_string());
    let failed = |what: &str, e: &anyhow::Error| backup::Run {
        at: kiln_feed::Timestamp::now(),
        ok: false,
        summary: backup::redact(&format!("{e:#}")),
        snapshot: None,
        files: None,
        bytes: None,
        seconds: 0.0,
        outcome: Some(what.into()),
    };
    match action {
        BackupAction::Now { scheduled, force, new_repository } => {
            let reason = if *scheduled { backup::Reason::Scheduled } else { backup::Reason::Manual };
            let result = b.backup(reason, *force, *new_repository);
            let run = result.as_ref().map(Clone::clone).unwrap_or_else(|e| failed("failed", e));
            backup::record(state_dir, &cfg, |s| {
                if run.ok {
                    s.last_good_backup = Some(run.clone());
                }
                s.last_backup = Some(run.clone());
            })?;
            let run = result?;
            println!("kiln-agent: backup: {} in {:.1}s", backup::redact(&run.summary), run.seconds);
            if *scheduled && cfg.prune {
                let pruned = b.prune();
                let r = pruned.as_ref().map(Clone::clone).unwrap_or_else(|e| failed("failed", e));
                backup::record(state_dir, &cfg, |s| s.last_prune = Some(r.clone()))?;
                pruned?;
            }
            Ok(())
        }
        BackupAction::Drill => {
            let result = b.drill();
            let run = result.as_ref().map(Clone::clone).unwrap_or_else(|e| failed("failed", e));
            backup::record(state_dir, &cfg, |s| s.last_drill = Some(run.clone()))?;
            let run = result.context("restore drill failed")?;
            println!("kiln-agent: restore drill passed: {} in {:.1}s", backup::redact(&run.summary), run.seconds);
            Ok(())
        }
        BackupAction::Restore { snapshot } => {
            let run = b.restore(snapshot.as_deref())?;
            backup::record(state_dir, &cfg, |s| {
                if s.self_restore.as_ref().is_some_and(|r| !r.ok) {
                    s.self_restore = Some(run.clone());
                }
            })?;
            println!("kiln-agent: {} in {:.1}s", backup::redact(&run.summary), run.seconds);
            Ok(())
        }
        BackupAction::SelfRestore => {
            let status = backup::Status::load(state_dir)?;
            if let Some(r) = status.self_restore.as_ref().filter(|r| r.ok) {
                println!(
                    "kiln-agent: self-restore: decided at {} ({}); nothing to do",
                    r.at,
                    r.outcome.as_deref().unwrap_or("?")
                );
                return Ok(());
            }
            let run = b.self_restore();
            backup::record(state_dir, &cfg, |s| s.self_restore = Some(run.clone()))?;
            // Never fails the unit: the device comes up either way, and the record says why.
            println!(
                "kiln-agent: self-restore: {}: {} ({:.1}s)",
                run.outcome.as_deref().unwrap_or("?"),
                backup::redact(&run.summary),
                run.seconds
            );
            Ok(())
        }
        BackupAction::Prune => {
            let result = b.prune();
            let run = result.as_ref().map(Clone::clone).unwrap_or_else(|e| failed("failed", e));
            backup::record(state_dir, &cfg, |s| s.last_prune = Some(run.clone()))?;
            let run = result?;
            println!("kiln-agent: {} in {:.1}s", backup::redact(&run.summary), run.seconds);
            Ok(())
        }
        BackupAction::Status { json } => {
            let mut status = backup::Status::load(state_dir)?;
            status.refresh_alerts(kiln_feed::Timestamp::now(), cfg.stale_after_secs);
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            println!(
                "repository: {} (password and credentials from {})",
                backup::redact(&cfg.repository),
                backup::PROVISION_DIR
            );
            println!("paths:      {}", cfg.paths.join(" "));
            let show = |name: &str, r: &Option<backup::Run>| match r {
                Some(r) => println!("{name:<11} {} {} {}", r.at, if r.ok { "ok" } else { "FAILED" }, r.summary),
                None => println!("{name:<11} -"),
            };
            show("backup:", &status.last_backup);
            show("last good:", &status.last_good_backup);
            show("drill:", &status.last_drill);
            show("prune:", &status.last_prune);
            show("restore:", &status.self_restore);
            for a in &status.alerts {
                println!("ALERT:      {a}");
            }
            Ok(())
        }
    }
}

/// A look by the monitor after a command that changed what it watches (a backup, an update
/// check), so the news goes out now rather than at the next timer. Best effort. A commit has
/// none: it happens once per boot, before the timer's first look (kiln-monitor.service).
fn look_after(config: &std::path::Path, state_dir: &std::path::Path) {
    let Ok(device) = kiln_device::DeviceConfig::load(config) else { return };
    if let Err(e) = monitor::look(&device, state_dir) {
        println!("<4>kiln-agent: monitor: {e:#}");
    }
}

/// What the monitor's update watcher (`watch::judge_updates`) reads of the update record and an
/// update check can change: the last result and error, and the release on offer.
fn update_view(s: &state::State) -> (Option<String>, Option<String>, Option<(String, bool)>) {
    (s.last_result.clone(), s.last_error.clone(), s.offered.as_ref().map(|o| (o.version.to_string(), o.security)))
}

/// User + system CPU time in milliseconds (`who`: RUSAGE_SELF or RUSAGE_CHILDREN).
fn cpu_ms(who: libc::c_int) -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return 0;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(u.ru_utime) + ms(u.ru_stime)
}

/// The process's peak resident set size (VmHWM), for the benchmark figures.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn status(config: &std::path::Path, state_dir: &std::path::Path, json: bool) -> Result<()> {
    let state = state::State::load(state_dir)?;
    // Status is shown even when device.json cannot be read (the record alone still says a lot).
    let config = kiln_device::DeviceConfig::load(config).ok();
    if json {
        let v = serde_json::json!({
            "image": config.as_ref().map(|c| &c.image),
            "running_version": config.as_ref().map(|c| c.version.to_string()),
            "feed": config.as_ref().and_then(|c| c.update.as_ref()).map(|u| &u.feed),
            "state": state,
            "data_error": std::fs::read_to_string(data::ERROR_FILE).ok().map(|e| e.trim().to_string()),
            "backup": backup::Status::load(state_dir).ok().map(|mut b| {
                if let Some(c) = config.as_ref().and_then(|c| c.backup.as_ref()) {
                    b.refresh_alerts(kiln_feed::Timestamp::now(), c.stale_after_secs);
                }
                b
            }),
            "wifi": wifi::statuses(std::path::Path::new(wifi::RUN_DIR)),
            "monitor": monitor::Record::load(state_dir).ok().map(|r| serde_json::json!({
                "open": r.open.values().collect::<Vec<_>>(),
                "last_look": r.last_look,
                "last_push": r.last_push,
                "last_heartbeat": r.last_heartbeat,
                "undelivered_alerts": r.outbox.len(),
                "delivery_error": r.delivery_error,
                "feed": state_dir.join(monitor::FEED_ATOM),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let none = || "-".to_string();
    if let Some(c) = &config {
        println!("image:     {} ({}), running {}", c.image, c.arch, c.version);
        println!(
            "feed:      {}",
            c.update
                .as_ref()
                .map(|u| u.feed.clone())
                .unwrap_or_else(|| "none ([update] not set in the profile)".into())
        );
    }
    if let Ok(e) = std::fs::read_to_string(data::ERROR_FILE) {
        println!("data:      /var is a temporary file system for this boot: {}", e.trim());
    }
    println!("booted:    slot {}", state.booted.map(|s| s.to_string()).unwrap_or_else(none));
    println!("current:   {}", state.current_version.as_ref().map(|v| v.to_string()).unwrap_or_else(none));
    println!("previous:  {}", state.previous_version.as_ref().map(|v| v.to_string()).unwrap_or_else(none));
    for (slot, rec) in &state.slots {
        println!(
            "slot {slot}:    {:?} {}",
            rec.status,
            rec.version.as_ref().map(|v| v.to_string()).unwrap_or_default()
        );
    }
    if let Some(i) = &state.install {
        if state.booted == Some(i.slot) {
            println!(
                "trial:     {} in slot {} (reboot {} into it), until its health check passes",
                i.version, i.slot, i.switches
            );
        } else if i.switches > 0 && state.slot(i.slot).status == state::SlotStatus::Trial {
            println!("switching: to {} in slot {} (reboot {} into it)", i.version, i.slot, i.switches);
        } else {
            println!("installing {} into slot {} ({} artifact(s) in progress)", i.version, i.slot, i.done.len());
        }
    }
    for f in &state.failed {
        println!("failed:    {} at {}: {}", f.version, f.at, f.reason);
    }
    for d in &state.last_delta {
        println!("delta:     {d}");
    }
    println!("checked:   {}", state.last_check.map(|t| t.to_string()).unwrap_or_else(none));
    println!("result:    {}", state.last_result.clone().unwrap_or_else(none));
    println!("error:     {}", state.last_error.clone().unwrap_or_else(none));
    if let Some(b) = config.as_ref().and_then(|c| c.backup.as_ref()) {
        let mut s = backup::Status::load(state_dir).unwrap_or_default();
        s.refresh_alerts(kiln_feed::Timestamp::now(), b.stale_after_secs);
        let good = s.last_good_backup.as_ref().map(|r| format!("{} ({})", r.at, r.summary)).unwrap_or_else(none);
        println!("backup:    last good {good}; {} alert(s) (kiln-agent backup status)", s.alerts.len());
    }
    if let Ok(r) = monitor::Record::load(state_dir) {
        println!(
            "monitor:   last look {}; {} open; feed {}",
            r.last_look.map(|t| t.to_string()).unwrap_or_else(none),
            r.open.len(),
            state_dir.join(monitor::FEED_ATOM).display()
        );
        let mut open: Vec<_> = r.open.values().collect();
        open.sort_by_key(|e| e.since);
        for e in open {
            println!("open:      {} (since {})", e.headline(), e.since);
        }
        if let Some(e) = &r.delivery_error {
            println!("delivery:  {e} ({} alert(s) waiting)", r.outbox.len());
        }
    }
    if config.as_ref().is_some_and(|c| c.wifi.is_some()) {
        let all = wifi::statuses(std::path::Path::new(wifi::RUN_DIR));
        if all.is_empty() {
            println!("wifi:      no wireless interface has appeared");
        }
        for w in all {
            println!("wifi:      {} since {}", w.message, kiln_feed::Timestamp(w.since));
        }
    }
    Ok(())
}
