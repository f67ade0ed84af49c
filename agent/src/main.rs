//! kiln-agent: the on-device updater. It follows the image's signed release feed, installs a
//! newer release into the other A/B slot, reboots into it as a trial, and commits it once the
//! health check passed or goes back to the committed slot when it did not.
//!
//! Run by systemd (units written by the builder): `boot` at every start, `commit` after
//! boot-complete.target, `rollback` when kiln-health.service fails, `check` from a timer.

mod agent;
mod boot;
mod download;
mod state;
mod system;
mod update;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln-agent", version, about = "kiln's on-device updater: signed feed, A/B slots, health-gated commit, rollback")]
struct Cli {
    /// The device description the builder baked into the image.
    #[arg(long, default_value = kiln_feed::DEVICE_CONFIG, global = true)]
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
    let agent = agent::Agent::open(&cli.config, &cli.state_dir)?;
    match cli.command {
        Command::Boot => agent.boot(),
        Command::Commit => agent.commit(),
        Command::Rollback { no_reboot } => agent.rollback(!no_reboot),
        Command::Check { now, no_reboot } => {
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
                    format!("installed {version} into slot {slot} ({downloaded} bytes downloaded, peak RSS {} KiB)", peak_rss_kib())
                }
                Err(e) => {
                    state.last_error = Some(format!("{e:#}"));
                    state.write(&agent.state_dir)?;
                    return Err(anyhow::anyhow!("{e:#}"));
                }
            };
            state.last_check = Some(kiln_feed::Timestamp::now());
            state.write(&agent.state_dir)?;
            println!("kiln-agent: {line}");
            if matches!(outcome, Ok(update::Outcome::Installed { .. })) && !no_reboot {
                println!("kiln-agent: rebooting into the new slot");
                agent.medium.reboot_into_trial()?;
            }
            Ok(())
        }
        Command::Status { .. } => unreachable!("handled above"),
    }
}

/// The process's peak resident set size (VmHWM), for the benchmark figures.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

fn status(config: &std::path::Path, state_dir: &std::path::Path, json: bool) -> Result<()> {
    let state = state::State::load(state_dir)?;
    let config: Option<kiln_feed::DeviceConfig> = std::fs::read(config).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if json {
        let v = serde_json::json!({
            "image": config.as_ref().map(|c| &c.image),
            "running_version": config.as_ref().map(|c| c.version.to_string()),
            "feed": config.as_ref().and_then(|c| c.update.as_ref()).map(|u| &u.feed),
            "state": state,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let none = || "-".to_string();
    if let Some(c) = &config {
        println!("image:     {} ({}), running {}", c.image, c.arch, c.version);
        println!("feed:      {}", c.update.as_ref().map(|u| u.feed.clone()).unwrap_or_else(|| "none ([update] not set in the profile)".into()));
    }
    println!("booted:    slot {}", state.booted.map(|s| s.to_string()).unwrap_or_else(none));
    println!("current:   {}", state.current_version.as_ref().map(|v| v.to_string()).unwrap_or_else(none));
    println!("previous:  {}", state.previous_version.as_ref().map(|v| v.to_string()).unwrap_or_else(none));
    for (slot, rec) in &state.slots {
        println!("slot {slot}:    {:?} {}", rec.status, rec.version.as_ref().map(|v| v.to_string()).unwrap_or_default());
    }
    if let Some(i) = &state.install {
        println!("installing {} into slot {} ({} artifact(s) in progress)", i.version, i.slot, i.done.len());
    }
    for f in &state.failed {
        println!("failed:    {} at {}: {}", f.version, f.at, f.reason);
    }
    println!("checked:   {}", state.last_check.map(|t| t.to_string()).unwrap_or_else(none));
    println!("result:    {}", state.last_result.clone().unwrap_or_else(none));
    println!("error:     {}", state.last_error.clone().unwrap_or_else(none));
    Ok(())
}
