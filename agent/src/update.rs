//! One update check: fetch the signed metadata, decide, install into the other slot, reboot.
//!
//! Everything that can be refused without touching a disk is checked first (signature, expiry,
//! image, version, failed before, space). Then, in this order, so that a power cut at any
//! point leaves a device that boots its committed slot:
//! 1. the record says "installing X into slot B" (written);
//! 2. nothing may boot slot B any more (UEFI: other UKIs removed);
//! 3. the root image is streamed into slot B's partition, verified while streaming, with its
//!    progress recorded every few MiB so a later check resumes with an HTTP Range request;
//! 4. UEFI: slot B's PARTUUID becomes the one derived from the new root hash, then the new UKI
//!    is added with a boot counter; Pi: the boot partition image goes into boot slot B and its
//!    cmdline.txt is pointed at root slot B;
//! 5. the record says "slot B on trial" and the device reboots into it (Pi: one-shot tryboot).

use crate::agent::Agent;
use crate::boot::Medium;
use crate::download::{self, DownloadError, Expect};
use crate::state::{Slot, State};
use crate::system;
use anyhow::{bail, Context as _, Result};
use kiln_device::{BeforeUpdate, DeviceConfig, Role};
use kiln_feed::{Artifact, ArtifactKind, Metadata, Release, Timestamp, Version};
use std::path::Path;

/// Held by the running check.
const CHECK_LOCK: &str = "/run/kiln-agent/check.lock";

/// Metadata and signature documents are small; anything bigger is not ours.
const METADATA_LIMIT: u64 = 4 << 20;

/// What a check decided, for the status file and the console.
pub enum Outcome {
    UpToDate(String),
    /// Refused on purpose: a clear reason, the device keeps running what it runs.
    Refused(String),
    Installed {
        version: String,
        slot: Slot,
        downloaded: u64,
    },
    Skipped(String),
}

/// `[backup] before_update`: a snapshot of the data before a new version (whose services may
/// migrate their state) is installed. With "require", a failed backup holds the update back
/// until a later check; a device that has no backup credentials provisioned updates anyway.
fn backup_before_update(agent: &Agent, release: &Release) -> Result<Option<String>> {
    use crate::backup::{self, Backups, NoCredentials, Reason};
    let Some(cfg) = agent.config.backup.clone().filter(|c| c.before_update != BeforeUpdate::Off) else {
        return Ok(None);
    };
    let b = Backups::new(cfg.clone(), &agent.state_dir, &agent.running.to_string());
    let result = b.backup(Reason::BeforeUpdate, false, false);
    match &result {
        Ok(run) => {
            println!("kiln-agent: backup before the update: {}", run.summary);
            backup::record(&agent.state_dir, &cfg, |s| {
                s.last_backup = Some(run.clone());
                s.last_good_backup = Some(run.clone());
            })?;
            Ok(None)
        }
        Err(e) if e.downcast_ref::<NoCredentials>().is_some() => {
            println!("kiln-agent: no backup before the update: {}", backup::redact(&format!("{e:#}")));
            Ok(None)
        }
        Err(e) => {
            // The repository's password (a provisioned URL may carry one) is never printed.
            let e = backup::redact(&format!("{e:#}"));
            let failed = backup::Run {
                at: Timestamp::now(),
                ok: false,
                summary: e.clone(),
                snapshot: None,
                files: None,
                bytes: None,
                seconds: 0.0,
                outcome: Some("before-update".into()),
            };
            backup::record(&agent.state_dir, &cfg, |s| s.last_backup = Some(failed))?;
            if cfg.before_update == BeforeUpdate::Require {
                Ok(Some(format!(
                    "release {} waits: the backup before the update failed ({e}); the next check tries again",
                    release.version
                )))
            } else {
                println!("kiln-agent: the backup before the update failed ({e}); installing anyway (before_update = \"try\")");
                Ok(None)
            }
        }
    }
}

pub fn check(agent: &Agent, ignore_window: bool) -> Result<Outcome> {
    let Some(update) = agent.config.update.clone() else {
        return Ok(Outcome::Skipped("this image's profile has no [update] section".into()));
    };
    // The timer's check and `check --now` must not both write the other slot.
    let Some(_lock) = system::try_lock(Path::new(CHECK_LOCK))? else {
        return Ok(Outcome::Skipped(
            "another update check is running (the timer's or `check --now`); this one stops".into(),
        ));
    };
    let mut state = agent.load_state()?;
    // What the medium says first: a failed trial whose record could not be written (a full
    // /var at the rollback) must read as failed here, not as an install to resume.
    agent.reconcile(&mut state)?;
    agent.record(&state);
    let now = Timestamp::now();
    if state.slot(agent.slot).status == crate::state::SlotStatus::Trial {
        return Ok(Outcome::Skipped(format!("slot {} is still on trial; updates wait for its commit", agent.slot)));
    }
    if let (Some(w), false) = (&update.window, ignore_window) {
        let w = system::Window::parse(w)?;
        if !w.contains(system::local_minutes(now.0)) {
            return Ok(Outcome::Skipped(format!(
                "outside the update window {}",
                update.window.as_deref().unwrap_or("")
            )));
        }
    }

    let client = download::client()?;
    let json = download::fetch_small(&client, &update.metadata, METADATA_LIMIT)?;
    let sig_url = format!("{}.sig", update.metadata);
    let sig = download::fetch_small(&client, &sig_url, METADATA_LIMIT)?;
    let sig_text = String::from_utf8_lossy(&sig);
    if let Err(e) = verify_signature(&json, &sig_text, &update.public_keys) {
        return Ok(Outcome::Refused(format!("metadata {} refused: {e}", update.metadata)));
    }
    let meta: Metadata = match serde_json::from_slice(&json) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Outcome::Refused(format!(
                "metadata {} refused: signed, but not kiln release metadata: {e}",
                update.metadata
            )))
        }
    };
    let synced = system::clock_synchronised();
    let judge = Judge { url: &update.metadata, config: &agent.config, running: &agent.running, now, synced };
    if let Err(refused) = judge.document(&meta, &state) {
        return Ok(Outcome::Refused(refused));
    }
    if let Some(note) = judge.clock_note(&state) {
        println!("kiln-agent: {note}");
    }
    // A current document from this channel: what the device now knows about time and about the
    // newest document is kept, so no older one is accepted again. Best effort: a full /var
    // must not stop a check.
    state.saw_metadata(meta.generated, now, synced);
    let c = &agent.config;
    let mine: Vec<&Release> =
        meta.releases.iter().filter(|r| r.image == c.image && r.arch == c.arch && r.profile == c.profile).collect();
    state.saw_offer(&mine, &agent.running, now);
    state.last_check = Some(now);
    if let Err(e) = state.write(&agent.state_dir) {
        eprintln!("kiln-agent: recording the metadata's time: {e:#}");
    }
    let release = match judge.release(&meta, &state) {
        Ok(r) => r,
        Err(outcome) => return Ok(outcome),
    };
    let target = !agent.slot;
    if let Err(e) = check_space(agent, release, target) {
        return Ok(Outcome::Refused(format!("release {} refused: {e:#}", release.version)));
    }

    if let Some(refused) = backup_before_update(agent, release)? {
        return Ok(Outcome::Refused(refused));
    }

    println!(
        "kiln-agent: installing {} into slot {target} (running {} in slot {})",
        release.version, agent.running, agent.slot
    );
    let resuming = state.install.as_ref().is_some_and(|i| i.version == release.version && i.slot == target);
    if !resuming {
        // Staged downloads of another release (a UKI of a version never installed) go.
        crate::state::remove_staging(&agent.state_dir);
    }
    if !resuming {
        state.last_delta.clear();
    }
    state.begin_install(target, &release.version, &release.root_hash, now)?;
    state.write(&agent.state_dir)?;
    let retired = agent.medium.retire_other(&agent.config, agent.slot, &agent.running)?;
    if !retired.is_empty() {
        println!("kiln-agent: slot {target} retired: {}", retired.join(", "));
    }

    let mut downloaded = 0;
    // The downloads' own deadline counts from here (a backup before the update may be long).
    let pace = download::Pace::standard(std::time::Instant::now());
    let result = install(agent, &mut state, release, target, &client, pace, &mut downloaded);
    if let Err(e) = result {
        // Bytes that hash wrong or overflow the artifact will not get better by retrying: the
        // slot is abandoned and the next check starts it afresh. Anything else (connections
        // dropped, a server that stops early, a deadline) keeps what was written: the next
        // check resumes from there.
        if abandons_the_slot(&e) {
            state.abandon_install();
            state.write(&agent.state_dir)?;
            return Ok(Outcome::Refused(format!(
                "release {} refused: {e:#}; slot {target} left empty, still running {}",
                release.version, agent.running
            )));
        }
        state.write(&agent.state_dir)?;
        let kept: u64 = state.install.as_ref().map_or(0, |i| i.done.values().sum());
        // A delta records no byte count: its chunks stay where they were written and the
        // next try finds them in place.
        let kept = if kept > 0 {
            format!("{kept} bytes written are kept; the next check resumes from there")
        } else {
            "what was written stays; the next check uses what it finds in place".into()
        };
        return Err(e.context(format!(
            "release {} not installed yet ({kept}), still running {}",
            release.version, agent.running
        )));
    }
    state.finish_install()?;
    state.last_download_bytes = downloaded;
    state.last_result = Some(format!("installed {} into slot {target}; rebooting into it", release.version));
    state.last_error = None;
    state.write(&agent.state_dir)?;
    Ok(Outcome::Installed { version: release.version.to_string(), slot: target, downloaded })
}

/// Only bytes that hash wrong or overflow the artifact abandon a slot being written.
fn abandons_the_slot(e: &anyhow::Error) -> bool {
    e.downcast_ref::<DownloadError>()
        .is_some_and(|d| matches!(d, DownloadError::HashMismatch { .. } | DownloadError::TooLarge { .. }))
}

fn artifact(release: &Release, kind: ArtifactKind) -> Result<&Artifact> {
    release.artifact(kind).with_context(|| format!("release {} has no {kind:?} artifact", release.version))
}

fn check_space(agent: &Agent, release: &Release, target: Slot) -> Result<()> {
    let root = artifact(release, ArtifactKind::Root)?;
    let dev = agent.partition_device(Role::Root, target)?;
    let room = system::device_size(&dev)?;
    if root.size > room {
        bail!(
            "not enough space: the root image is {} bytes, slot {target}'s partition {} holds {room}",
            root.size,
            dev.display()
        );
    }
    match &agent.medium {
        Medium::Uefi { esp } => {
            let uki = artifact(release, ArtifactKind::Uki)?;
            let free = Medium::uki_room(esp, &agent.running)?;
            // The new UKI is written beside the running one: both must fit, with slack for FAT.
            if uki.size + (1 << 20) > free {
                bail!("not enough space: the UKI is {} bytes, the ESP ({}) has {free} free", uki.size, esp.display());
            }
            let var_free = system::free_bytes(&agent.state_dir)?;
            if uki.size + (16 << 20) > var_free {
                bail!("not enough space: the UKI is staged in {} ({var_free} bytes free)", agent.state_dir.display());
            }
        }
        Medium::Rpi { .. } => {
            let b = artifact(release, ArtifactKind::Boot)?;
            let dev = agent.partition_device(Role::Boot, target)?;
            let room = system::device_size(&dev)?;
            if b.size > room {
                bail!(
                    "not enough space: the boot image is {} bytes, boot slot {target} ({}) holds {room}",
                    b.size,
                    dev.display()
                );
            }
        }
    }
    Ok(())
}

fn sha256_of(a: &Artifact) -> Result<[u8; 32]> {
    kiln_device::fs::parse_sha256(&a.sha256).map_err(|e| anyhow::anyhow!("artifact {}: sha256 {e}", a.name))
}

/// Streams one artifact into `dest` (a partition or a staging file), resuming from the
/// recorded progress, recording progress durably as it goes.
#[allow(clippy::too_many_arguments)]
fn fetch_into(
    agent: &Agent,
    state: &mut crate::state::State,
    client: &reqwest::blocking::Client,
    metadata_url: &str,
    a: &Artifact,
    dest: &Path,
    pace: download::Pace,
    downloaded: &mut u64,
    sources: &[crate::delta::Source],
) -> Result<()> {
    let url = kiln_feed::join_url(metadata_url, &a.url);
    let expect = Expect { size: a.size, sha256: sha256_of(a)? };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(dest.starts_with(&agent.state_dir))
        .truncate(false)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let mut start = state.install.as_ref().and_then(|i| i.done.get(&a.sha256).copied()).unwrap_or(0).min(a.size);
    // A staging file shorter than the record says (lost, or cleaned up) is downloaded again
    // from where it ends. (A partition's metadata has no length: it is always big enough.)
    let meta = file.metadata().with_context(|| format!("reading {}", dest.display()))?;
    if meta.is_file() && start > meta.len() {
        println!(
            "kiln-agent: {} holds {} of the {start} bytes recorded; downloading from there",
            dest.display(),
            meta.len()
        );
        start = meta.len();
    }
    // By delta when the release has a chunk index and no whole download of this artifact is
    // under way; a power cut during a delta leaves chunks in place that the next try keeps.
    if start == 0 {
        let mut note = crate::state::DeltaNote {
            version: state.install.as_ref().map(|i| i.version.clone()).unwrap_or_else(|| agent.running.clone()),
            artifact: a.name.clone(),
            report: None,
            full_download: None,
        };
        match &a.delta {
            None => note.full_download = Some("the release has no chunk index (published without deltas)".into()),
            Some(d) => match crate::delta::install(client, metadata_url, a, d, &file, sources, pace) {
                Ok(r) => {
                    println!("kiln-agent: {}: {r}", a.name);
                    *downloaded += r.downloaded();
                    note.report = Some(r);
                    state.last_delta.retain(|n| n.artifact != a.name);
                    state.last_delta.push(note);
                    state.progress(&a.sha256, a.size);
                    return Ok(());
                }
                Err(e) if crate::delta::is_fallback(&e) => {
                    println!("kiln-agent: {}: {e:#}; downloading it whole", a.name);
                    note.full_download = Some(format!("{e:#}"));
                }
                Err(e) => return Err(e.context(format!("{} by delta", a.name))),
            },
        }
        state.last_delta.retain(|n| n.artifact != a.name);
        state.last_delta.push(note);
        state.write(&agent.state_dir)?;
    }
    if start > 0 {
        println!("kiln-agent: resuming {} at {start} of {} bytes", a.name, a.size);
    }
    let state_dir = agent.state_dir.clone();
    let sha = a.sha256.clone();
    let mut last_print = 0u64;
    let mut progress = |done: u64| -> Result<()> {
        state.progress(&sha, done);
        state.write(&state_dir)?;
        if done >= last_print + (32 << 20) {
            last_print = done;
            println!("kiln-agent: {sha:.12}: {} of {} MiB", done >> 20, a.size >> 20);
        }
        Ok(())
    };
    let report = download::download(client, &url, &expect, &mut file, start, pace, &mut progress)?;
    *downloaded += report.downloaded_bytes;
    state.progress(&a.sha256, a.size);
    Ok(())
}

/// What this device already has that a delta can copy from: the running root image (its
/// partition up to the end of the image, `kiln.verity_offset=` on the kernel command line),
/// and the running UKI (UEFI) or boot partition (Raspberry Pi). Read directly, not through
/// dm-verity: every chunk is checked against the signed index anyway, and a read of a
/// damaged block through dm-verity (`--panic-on-corruption`) would reset the device in the
/// middle of its update.
fn local_sources(agent: &Agent, kind: ArtifactKind) -> Vec<crate::delta::Source> {
    let mut out = Vec::new();
    if kind == ArtifactKind::Root {
        let root = agent.partition_device(Role::Root, agent.slot).ok();
        let extent = agent.host.kernel_cmdline().ok().and_then(|c| crate::delta::root_extent(&c));
        if let (Some(path), Some(len)) = (root, extent) {
            out.push(crate::delta::Source { path, len });
        }
        return out;
    }
    match &agent.medium {
        Medium::Uefi { esp } => {
            for (name, uki) in Medium::ukis(esp).unwrap_or_default() {
                if uki.version == agent.running.as_str() {
                    let path = esp.join("EFI/Linux").join(name);
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    out.push(crate::delta::Source { path, len });
                }
            }
        }
        Medium::Rpi { .. } => {
            if let Ok(path) = agent.partition_device(Role::Boot, agent.slot) {
                let len = system::device_size(&path).unwrap_or(0);
                out.push(crate::delta::Source { path, len });
            }
        }
    }
    out
}

fn install(
    agent: &Agent,
    state: &mut crate::state::State,
    release: &Release,
    target: Slot,
    client: &reqwest::blocking::Client,
    pace: download::Pace,
    downloaded: &mut u64,
) -> Result<()> {
    let update = agent.config.update.as_ref().context("no [update]")?;
    let root = artifact(release, ArtifactKind::Root)?;
    let root_dev = agent.partition_device(Role::Root, target)?;
    let sources = local_sources(agent, ArtifactKind::Root);
    fetch_into(agent, state, client, &update.metadata, root, &root_dev, pace, downloaded, &sources)?;
    let sources = local_sources(agent, ArtifactKind::Uki);
    state.write(&agent.state_dir)?;
    match &agent.medium {
        Medium::Uefi { esp } => {
            agent.set_root_partuuid(target, &release.root_hash)?;
            let uki = artifact(release, ArtifactKind::Uki)?;
            let staging = crate::state::staging_dir(&agent.state_dir);
            std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
            let part = staging.join(format!("{}.part", uki.sha256));
            fetch_into(agent, state, client, &update.metadata, uki, &part, pace, downloaded, &sources)?;
            state.write(&agent.state_dir)?;
            let name = Medium::add_trial_uki(esp, &release.version, update.tries, &part)?;
            // The staged UKI stays until the new version has booted (`remove_staging`): a
            // switch cut off by a power loss adds it again without downloading it again.
            println!("kiln-agent: boot entry {name} added ({} tries)", update.tries);
        }
        Medium::Rpi { .. } => {
            let b = artifact(release, ArtifactKind::Boot)?;
            let boot_dev = agent.partition_device(Role::Boot, target)?;
            // Once written, the boot image's cmdline.txt is retargeted below, so its bytes no
            // longer hash to the artifact: a resumed install writes the (small) image again.
            state.progress(&b.sha256, 0);
            fetch_into(agent, state, client, &update.metadata, b, &boot_dev, pace, downloaded, &sources)?;
            state.write(&agent.state_dir)?;
            Medium::point_boot_slot_at_root(&agent.host, &agent.config, target, &boot_dev)?;
        }
    }
    Ok(())
}

/// What the device knows when it judges a signed metadata document: the document must be
/// kiln's format, of the channel the device follows, not older than one it already saw, and not
/// expired; the release it takes must be of its own profile, image and architecture, and newer
/// than the running version (TUF's mix-and-match, rollback, freeze and fast-forward attacks).
pub struct Judge<'a> {
    pub url: &'a str,
    pub config: &'a DeviceConfig,
    pub running: &'a Version,
    /// The system clock.
    pub now: Timestamp,
    /// Whether the clock was set from the network (systemd-timesyncd says so).
    pub synced: bool,
}

impl Judge<'_> {
    /// The time expiry is checked against: the system clock, but never earlier than the newest
    /// document's `generated` (signed: no one else can move it), nor, while the clock is not
    /// synchronised, than the latest synchronised time seen. A Pi without a real-time clock
    /// starts in the past until it is synchronised; a replayed document that expired is still
    /// refused then. (A synchronised clock is believed as it is: a time server that lied once
    /// does not hold the device in the future after it stops.)
    pub fn trusted_now(&self, state: &State) -> Timestamp {
        let seen = if self.synced { None } else { state.trusted_time };
        [Some(self.now), state.newest_metadata, seen].into_iter().flatten().max().unwrap_or(self.now)
    }

    /// A line for the console when the clock is behind what the device already trusted.
    pub fn clock_note(&self, state: &State) -> Option<String> {
        let trusted = self.trusted_now(state);
        (trusted > self.now).then(|| {
            format!(
                "the clock says {} ({}), earlier than {trusted} that this device already trusted: expiry is checked against {trusted}",
                self.now,
                if self.synced { "synchronised" } else { "not synchronised" }
            )
        })
    }

    /// The document as a whole: format, channel, replay, expiry.
    pub fn document(&self, meta: &Metadata, state: &State) -> Result<(), String> {
        let url = self.url;
        if meta.format != kiln_feed::FORMAT {
            return Err(format!(
                "metadata {url} refused: format {} (this agent reads {})",
                meta.format,
                kiln_feed::FORMAT
            ));
        }
        let channel = self.config.update.as_ref().map(|u| u.channel.as_str()).unwrap_or_default();
        if meta.channel != channel {
            return Err(format!(
                "metadata {url} refused: it is the {:?} channel's, this device follows {channel:?} (a document of another channel served in its place)",
                meta.channel
            ));
        }
        if let Some(seen) = state.newest_metadata.filter(|seen| meta.generated < *seen) {
            return Err(format!(
                "metadata {url} refused: it was generated at {}, before the document of {seen} this device already read (an old document replayed)",
                meta.generated
            ));
        }
        let now = self.trusted_now(state);
        if now > meta.expires {
            return Err(format!(
                "metadata {url} refused: it expired at {} (now {now}); the publisher must re-sign it (a stale feed may be replayed to hold devices back)",
                meta.expires
            ));
        }
        Ok(())
    }

    /// The release of this device's profile, image and architecture, if it is one to install.
    pub fn release<'m>(&self, meta: &'m Metadata, state: &State) -> Result<&'m Release, Outcome> {
        let (url, c) = (self.url, self.config);
        let mine = |r: &&Release| r.image == c.image && r.arch == c.arch;
        let Some(release) = meta.releases.iter().filter(mine).find(|r| r.profile == c.profile) else {
            let other_profiles: Vec<&str> = meta.releases.iter().filter(mine).map(|r| r.profile.as_str()).collect();
            let others = meta.releases.len() - other_profiles.len();
            let profiles = if other_profiles.is_empty() {
                String::new()
            } else {
                format!("; releases of other profiles for this image ignored: {}", other_profiles.join(", "))
            };
            return Err(Outcome::Refused(format!(
                "metadata {url} has no release of profile {} for this device's image {} ({}){profiles}; {others} release(s) for other images ignored",
                c.profile, c.image, c.arch
            )));
        };
        if &release.version < self.running {
            return Err(Outcome::Refused(format!(
                "release {} refused: older than the running {} (versions only go forward)",
                release.version, self.running
            )));
        }
        if &release.version == self.running {
            return Err(Outcome::UpToDate(format!("running {}, the newest release", self.running)));
        }
        if let Some(f) = state.has_failed(&release.version) {
            return Err(Outcome::Refused(format!(
                "release {} skipped: it failed on this device at {} ({})",
                release.version, f.at, f.reason
            )));
        }
        Ok(release)
    }
}

/// Checks the metadata's signature against the keys baked into the image.
fn verify_signature(json: &[u8], sig: &str, keys: &[String]) -> Result<(), String> {
    let keys: Vec<kiln_feed::PublicKey> = keys
        .iter()
        .map(|k| {
            kiln_feed::PublicKey::parse(k)
                .map_err(|e| format!("{}: update.public_keys: {e}", kiln_device::DEVICE_CONFIG))
        })
        .collect::<Result<_, _>>()?;
    kiln_feed::verify(json, sig, &keys).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub const DEVICE: &str = r#"{
  "profile": "home", "image": "rpi4", "arch": "arm64", "version": "0.2.0",
  "bootloader": "rpi-firmware", "partition_table": "mbr",
  "partitions": [
    {"name": "boot-a", "number": 2, "role": "boot", "slot": "a", "size": 268435456},
    {"name": "boot-b", "number": 3, "role": "boot", "slot": "b", "size": 268435456},
    {"name": "root-a", "number": 5, "role": "root", "slot": "a", "size": 1073741824},
    {"name": "root-b", "number": 6, "role": "root", "slot": "b", "size": 1073741824},
    {"name": "data", "number": 7, "role": "data", "slot": null, "size": 536870912}
  ],
  "health_timeout": 120,
  "update": {"feed": "http://10.0.2.100/stable.atom", "metadata": "http://10.0.2.100/stable.json",
    "channel": "stable", "public_keys": ["ab"], "window": null, "interval_secs": 3600, "jitter_secs": 60, "tries": 3}
}"#;

    fn release(version: &str, profile: &str, image: &str) -> Release {
        Release {
            version: version.parse().unwrap(),
            published: Timestamp(1_000),
            profile: profile.into(),
            image: image.into(),
            arch: "arm64".into(),
            root_hash: "00".repeat(32),
            artifacts: Vec::new(),
            changelog: Vec::new(),
            notes: String::new(),
            security: false,
        }
    }

    fn meta(channel: &str, generated: u64, expires: u64, releases: Vec<Release>) -> Metadata {
        Metadata {
            format: kiln_feed::FORMAT,
            channel: channel.into(),
            generated: Timestamp(generated),
            expires: Timestamp(expires),
            releases,
        }
    }

    fn judged(m: &Metadata, state: &State, now: u64, synced: bool) -> Result<String, String> {
        let config = DeviceConfig::parse(DEVICE).unwrap();
        let running: Version = "0.2.0".parse().unwrap();
        let j = Judge {
            url: "http://10.0.2.100/stable.json",
            config: &config,
            running: &running,
            now: Timestamp(now),
            synced,
        };
        j.document(m, state)?;
        match j.release(m, state) {
            Ok(r) => Ok(format!("install {}", r.version)),
            Err(Outcome::Refused(s)) | Err(Outcome::UpToDate(s)) | Err(Outcome::Skipped(s)) => Err(s),
            Err(Outcome::Installed { .. }) => unreachable!(),
        }
    }

    #[test]
    fn a_document_of_another_channel_is_refused() {
        let m = meta("beta", 100, 10_000, vec![release("9.0.0", "home", "rpi4")]);
        let e = judged(&m, &State::default(), 200, true).unwrap_err();
        assert!(e.contains("it is the \"beta\" channel's, this device follows \"stable\""), "{e}");
        let m = meta("stable", 100, 10_000, vec![release("0.3.0", "home", "rpi4")]);
        assert_eq!(judged(&m, &State::default(), 200, true).unwrap(), "install 0.3.0");
    }

    #[test]
    fn only_a_release_of_the_devices_own_profile_is_taken() {
        // Another profile's release for the same board, with a version far ahead: ignored.
        let m =
            meta("stable", 100, 10_000, vec![release("99.0.0", "media", "rpi4"), release("0.3.0", "home", "pc-uefi")]);
        let e = judged(&m, &State::default(), 200, true).unwrap_err();
        assert!(e.contains("no release of profile home for this device's image rpi4 (arm64)"), "{e}");
        assert!(e.contains("other profiles for this image ignored: media"), "{e}");
        assert!(e.contains("1 release(s) for other images ignored"), "{e}");
        let m = meta("stable", 100, 10_000, vec![release("99.0.0", "media", "rpi4"), release("0.3.0", "home", "rpi4")]);
        assert_eq!(judged(&m, &State::default(), 200, true).unwrap(), "install 0.3.0");
    }

    #[test]
    fn an_older_document_is_a_replay_even_when_it_has_not_expired() {
        let mut state = State::default();
        state.saw_metadata(Timestamp(500), Timestamp(510), true);
        let old = meta("stable", 400, 10_000, vec![release("0.3.0", "home", "rpi4")]);
        let e = judged(&old, &state, 600, true).unwrap_err();
        assert!(e.contains("generated at 1970-01-01T00:06:40Z, before the document of 1970-01-01T00:08:20Z"), "{e}");
        // The same document again, or a newer one, is fine.
        let same = meta("stable", 500, 10_000, vec![release("0.3.0", "home", "rpi4")]);
        assert!(judged(&same, &state, 600, true).is_ok());
    }

    #[test]
    fn an_unset_clock_does_not_revive_an_expired_document() {
        let mut state = State::default();
        // Seen while synchronised at t=5000, newest document generated at 4000.
        state.saw_metadata(Timestamp(4_000), Timestamp(5_000), true);
        // Expired at 4500, generated at 4000 (the replay check passes: same document). The
        // clock now says 100 (a Pi without RTC, not synchronised yet).
        let m = meta("stable", 4_000, 4_500, vec![release("0.3.0", "home", "rpi4")]);
        let e = judged(&m, &state, 100, false).unwrap_err();
        assert!(e.contains("expired at 1970-01-01T01:15:00Z (now 1970-01-01T01:23:20Z)"), "{e}");
        // Still unexpired against the newest document's own time: accepted, with a note.
        let m = meta("stable", 4_000, 6_000, vec![release("0.3.0", "home", "rpi4")]);
        assert!(judged(&m, &state, 100, false).is_ok());
        let config = DeviceConfig::parse(DEVICE).unwrap();
        let running: Version = "0.2.0".parse().unwrap();
        let j = Judge { url: "u", config: &config, running: &running, now: Timestamp(100), synced: false };
        assert!(j.clock_note(&state).unwrap().contains("not synchronised"));
        // A synchronised clock is believed: the newest document is the only floor then.
        let j = Judge { url: "u", config: &config, running: &running, now: Timestamp(4_200), synced: true };
        assert_eq!(j.trusted_now(&state), Timestamp(4_200));
        assert!(j.clock_note(&state).is_none());
    }

    #[test]
    fn versions_only_go_forward_and_failed_ones_are_skipped() {
        let m = meta("stable", 100, 10_000, vec![release("0.1.0", "home", "rpi4")]);
        assert!(judged(&m, &State::default(), 200, true).unwrap_err().contains("older than the running 0.2.0"));
        let m = meta("stable", 100, 10_000, vec![release("0.2.0", "home", "rpi4")]);
        assert!(judged(&m, &State::default(), 200, true).unwrap_err().contains("the newest release"));
    }

    #[test]
    fn only_wrong_bytes_abandon_a_slot() {
        let url = "http://x/a".to_string();
        let keeps = [
            DownloadError::Truncated { url: url.clone(), got: 5, expected: 10 },
            DownloadError::TooSlow { url: url.clone(), got: 5, expected: 10, detail: "slow".into() },
            DownloadError::Http { url: url.clone(), status: reqwest::StatusCode::BAD_GATEWAY },
        ];
        for e in keeps {
            let what = e.to_string();
            assert!(!abandons_the_slot(&anyhow::Error::new(e)), "{what}");
        }
        let abandons = [
            DownloadError::TooLarge { url: url.clone(), expected: 10 },
            DownloadError::HashMismatch { url, expected: "a".into(), actual: "b".into() },
        ];
        for e in abandons {
            let what = e.to_string();
            assert!(abandons_the_slot(&anyhow::Error::new(e).context("release 0.3.0")), "{what}");
        }
    }
}
