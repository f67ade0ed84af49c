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
use crate::state::Slot;
use crate::system;
use anyhow::{bail, Context as _, Result};
use kiln_device::{BeforeUpdate, Role};
use kiln_feed::{Artifact, ArtifactKind, Metadata, Release, Timestamp};
use std::path::Path;

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
    let result = b.backup(Reason::BeforeUpdate, false);
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
            println!("kiln-agent: no backup before the update: {e:#}");
            Ok(None)
        }
        Err(e) => {
            let failed = backup::Run {
                at: Timestamp::now(),
                ok: false,
                summary: format!("{e:#}"),
                snapshot: None,
                files: None,
                bytes: None,
                seconds: 0.0,
                outcome: Some("before-update".into()),
            };
            backup::record(&agent.state_dir, &cfg, |s| s.last_backup = Some(failed))?;
            if cfg.before_update == BeforeUpdate::Require {
                Ok(Some(format!(
                    "release {} waits: the backup before the update failed ({e:#}); the next check tries again",
                    release.version
                )))
            } else {
                println!("kiln-agent: the backup before the update failed ({e:#}); installing anyway (before_update = \"try\")");
                Ok(None)
            }
        }
    }
}

pub fn check(agent: &Agent, ignore_window: bool) -> Result<Outcome> {
    let Some(update) = agent.config.update.clone() else {
        return Ok(Outcome::Skipped("this image's profile has no [update] section".into()));
    };
    let mut state = agent.load_state()?;
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
    if meta.format != kiln_feed::FORMAT {
        return Ok(Outcome::Refused(format!(
            "metadata {} refused: format {} (this agent reads {})",
            update.metadata,
            meta.format,
            kiln_feed::FORMAT
        )));
    }
    if now > meta.expires {
        return Ok(Outcome::Refused(format!(
            "metadata {} refused: it expired at {} (now {}); the publisher must re-sign it (a stale feed may be replayed to hold devices back)",
            update.metadata, meta.expires, now
        )));
    }
    state.last_check = Some(now);
    let others = meta.releases.iter().filter(|r| r.image != agent.config.image || r.arch != agent.config.arch).count();
    let Some(release) = meta.releases.iter().find(|r| r.image == agent.config.image && r.arch == agent.config.arch)
    else {
        return Ok(Outcome::Refused(format!(
            "metadata {} has no release for this device's image {} ({}); {others} release(s) for other images ignored",
            update.metadata, agent.config.image, agent.config.arch
        )));
    };
    if release.version < agent.running {
        return Ok(Outcome::Refused(format!(
            "release {} refused: older than the running {} (versions only go forward)",
            release.version, agent.running
        )));
    }
    if release.version == agent.running {
        return Ok(Outcome::UpToDate(format!("running {}, the newest release", agent.running)));
    }
    if let Some(f) = state.has_failed(&release.version) {
        return Ok(Outcome::Refused(format!(
            "release {} skipped: it failed on this device at {} ({})",
            release.version, f.at, f.reason
        )));
    }
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
    state.begin_install(target, &release.version, &release.root_hash, now)?;
    state.write(&agent.state_dir)?;
    let retired = agent.medium.retire_other(&agent.config, agent.slot, &agent.running)?;
    if !retired.is_empty() {
        println!("kiln-agent: slot {target} retired: {}", retired.join(", "));
    }

    let mut downloaded = 0;
    let result = install(agent, &mut state, release, target, &client, &mut downloaded);
    if let Err(e) = result {
        // A refused artifact (hash, size) will not get better by retrying the same bytes: the
        // slot is abandoned and the next check starts it afresh. Network errors keep progress.
        let fatal = e.downcast_ref::<DownloadError>().is_some_and(|d| {
            matches!(
                d,
                DownloadError::HashMismatch { .. } | DownloadError::Truncated { .. } | DownloadError::TooLarge { .. }
            )
        });
        if fatal {
            state.abandon_install();
            state.write(&agent.state_dir)?;
            return Ok(Outcome::Refused(format!(
                "release {} refused: {e:#}; slot {target} left empty, still running {}",
                release.version, agent.running
            )));
        }
        state.write(&agent.state_dir)?;
        return Err(e);
    }
    state.finish_install()?;
    state.last_download_bytes = downloaded;
    state.last_result = Some(format!("installed {} into slot {target}; rebooting into it", release.version));
    state.last_error = None;
    state.write(&agent.state_dir)?;
    Ok(Outcome::Installed { version: release.version.to_string(), slot: target, downloaded })
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
fn fetch_into(
    agent: &Agent,
    state: &mut crate::state::State,
    client: &reqwest::blocking::Client,
    metadata_url: &str,
    a: &Artifact,
    dest: &Path,
    downloaded: &mut u64,
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
    let report = download::download(client, &url, &expect, &mut file, start, &mut progress)?;
    *downloaded += report.downloaded_bytes;
    state.progress(&a.sha256, a.size);
    Ok(())
}

fn install(
    agent: &Agent,
    state: &mut crate::state::State,
    release: &Release,
    target: Slot,
    client: &reqwest::blocking::Client,
    downloaded: &mut u64,
) -> Result<()> {
    let update = agent.config.update.as_ref().context("no [update]")?;
    let root = artifact(release, ArtifactKind::Root)?;
    let root_dev = agent.partition_device(Role::Root, target)?;
    fetch_into(agent, state, client, &update.metadata, root, &root_dev, downloaded)?;
    state.write(&agent.state_dir)?;
    match &agent.medium {
        Medium::Uefi { esp } => {
            agent.set_root_partuuid(target, &release.root_hash)?;
            let uki = artifact(release, ArtifactKind::Uki)?;
            let staging = crate::state::staging_dir(&agent.state_dir);
            std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
            let part = staging.join(format!("{}.part", uki.sha256));
            fetch_into(agent, state, client, &update.metadata, uki, &part, downloaded)?;
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
            fetch_into(agent, state, client, &update.metadata, b, &boot_dev, downloaded)?;
            state.write(&agent.state_dir)?;
            Medium::point_boot_slot_at_root(&agent.host, &agent.config, target, &boot_dev)?;
        }
    }
    Ok(())
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
