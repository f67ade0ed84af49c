//! The agent's record of the two slots, and the A/B state machine over it.
//!
//! The shape follows Bottlerocket's signpost: [`State::load`] reads the record once, the
//! transitions below are pure (they change the value in memory and **do not write**), and
//! [`State::write`] persists it in one step (write a temporary file, fsync, rename, fsync the
//! directory), so a power cut leaves either the old or the new record, never a mix.
//!
//! What *boots* is decided by the boot medium (the ESP's UKI names on UEFI, autoboot.txt on a
//! Raspberry Pi; see `boot.rs`); this record adds what the medium cannot hold: versions,
//! download progress, failed versions that must not be retried, and the last check's outcome.
//! At every boot [`State::observe_boot`] reconciles the record with what actually booted.

use anyhow::{bail, Context as _, Result};
use kiln_feed::{Timestamp, Version};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATUS_FILE: &str = "status.json";

/// Writes the record `name` in `dir` (created if missing) in one step (`kiln_device::fs`).
pub fn write_record<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(kiln_device::fs::write_json(&dir.join(name), value)?)
}

/// Where downloads that are not written straight into a partition are staged (the UKI).
pub fn staging_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("download")
}

/// Drops the staged downloads (once the version they belong to has booted).
pub fn remove_staging(state_dir: &Path) {
    let dir = staging_dir(state_dir);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("kiln-agent: removing {}: {e}", dir.display());
        }
    }
}

/// The slot type of device.json and status.json (one definition, in `kiln-device`).
pub use kiln_device::Slot;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SlotStatus {
    /// Nothing bootable (a fresh image's second slot, or a write that was abandoned).
    Empty,
    /// Being written; never bootable in this state.
    Installing,
    /// Written and set up to boot (with tries left), not yet proven healthy.
    Trial,
    /// Booted, passed the health checks: the slot the device returns to.
    Committed,
    /// The slot that was committed before the current one: a working fallback.
    Previous,
    /// Booted and failed its health checks (or never came up); not retried.
    Failed,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SlotRecord {
    pub status: SlotStatus,
    pub version: Option<Version>,
    #[serde(default)]
    pub root_hash: Option<String>,
}

/// An install in progress: which release goes where and how far each artifact got.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Install {
    pub version: Version,
    pub slot: Slot,
    pub root_hash: String,
    pub started: Timestamp,
    /// Bytes known to be written durably, by artifact sha256 (for resuming with HTTP Range).
    #[serde(default)]
    pub done: BTreeMap<String, u64>,
    /// Reboots into this install started so far. The record stays until the new version is
    /// committed or failed, so a switch cut off by a power loss, or (Raspberry Pi, whose
    /// one-shot tryboot leaves no trace) a reset during the trial, is tried again up to
    /// `update.tries` reboots, not blamed on the release at once.
    #[serde(default)]
    pub switches: u32,
}

/// What the boot medium can tell about whether the version on trial was ever started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tried {
    /// Started at least once (UEFI: its boot counter moved or ran out).
    Yes,
    /// Never started (UEFI: no entry for it, or one with a fresh counter).
    No,
    /// The medium keeps no trace (the Pi's tryboot flag does not survive a reset).
    Unknown,
}

/// What [`State::observe_boot`] noticed about the other slot when the committed one booted.
#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// The new version was started and did not come up healthy: it is not tried again.
    Failed { version: Version, note: String },
    /// The switch into the new version was cut off before it started: the next check resumes
    /// the install (nothing is downloaded twice) and reboots into it again.
    Interrupted { version: Version, note: String },
}

/// What happened to one version on this device that it must not try again.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Failure {
    pub version: Version,
    pub at: Timestamp,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct State {
    pub slots: BTreeMap<Slot, SlotRecord>,
    /// The slot running now (filled in at every boot).
    pub booted: Option<Slot>,
    pub current_version: Option<Version>,
    pub previous_version: Option<Version>,
    pub install: Option<Install>,
    #[serde(default)]
    pub failed: Vec<Failure>,
    pub last_check: Option<Timestamp>,
    /// One line saying what the last check did ("up to date", "installed 0.2.0 into slot b").
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    /// Network bytes of the last install.
    #[serde(default)]
    pub last_download_bytes: u64,
    /// The newest `generated` of a signed metadata document this device accepted: an older
    /// document is a replay and is refused.
    #[serde(default)]
    pub newest_metadata: Option<Timestamp>,
    /// The latest time the clock said while it was synchronised: expiry is never checked
    /// against anything earlier (a device without a real-time clock starts in the past).
    #[serde(default)]
    pub trusted_time: Option<Timestamp>,
    /// The newest release of this device's profile, image and architecture that an accepted
    /// document offered, while it is newer than the running one, and since when (the monitor's
    /// "not installed for too long" and "security update pending").
    #[serde(default)]
    pub offered: Option<Offered>,
    /// How the last install's artifacts came: by delta (with its figures) or whole, and why.
    #[serde(default)]
    pub last_delta: Vec<DeltaNote>,
}

/// One artifact of an install: fetched as a delta, or whole after the delta path was left.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeltaNote {
    pub version: Version,
    pub artifact: String,
    #[serde(default)]
    pub report: Option<crate::delta::Report>,
    /// Why the whole artifact was downloaded instead (tampered chunk or index, a server that
    /// ignores Range, no index published, ...).
    #[serde(default)]
    pub full_download: Option<String>,
}

impl std::fmt::Display for DeltaNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.report, &self.full_download) {
            (Some(r), _) => write!(f, "{} {}: {r}", self.version, self.artifact),
            (None, Some(why)) => write!(f, "{} {}: downloaded whole: {why}", self.version, self.artifact),
            (None, None) => write!(f, "{} {}", self.version, self.artifact),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Offered {
    pub version: Version,
    /// When a document first offered this version.
    pub since: Timestamp,
    /// It, or a release between the running one and it, fixes security problems.
    pub security: bool,
}

impl Default for State {
    fn default() -> State {
        let empty = SlotRecord { status: SlotStatus::Empty, version: None, root_hash: None };
        State {
            slots: [(Slot::A, empty.clone()), (Slot::B, empty)].into_iter().collect(),
            booted: None,
            current_version: None,
            previous_version: None,
            install: None,
            failed: Vec::new(),
            last_check: None,
            last_result: None,
            last_error: None,
            last_download_bytes: 0,
            last_delta: Vec::new(),
            newest_metadata: None,
            trusted_time: None,
            offered: None,
        }
    }
}

/// How the running boot came about, as the boot medium tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct Booted {
    pub slot: Slot,
    pub version: Version,
    /// Booted as a trial (a counted UKI, or the Pi's tryboot slot), not yet committed.
    pub trial: bool,
}

impl State {
    /// Reads the record; a missing file is a fresh device (both slots unknown).
    pub fn load(dir: &Path) -> Result<State> {
        let record: Option<State> = kiln_device::fs::read_json(&dir.join(STATUS_FILE))
            .map_err(|e| anyhow::anyhow!("{e} (not a kiln-agent status file? move it away to start afresh)"))?;
        let mut state = record.unwrap_or_default();
        // A record missing a slot (damaged, or edited by hand) must not stop the agent (a
        // rollback included): the slot is unknown, as on a fresh device.
        for slot in [Slot::A, Slot::B] {
            state.slots.entry(slot).or_insert(SlotRecord { status: SlotStatus::Empty, version: None, root_hash: None });
        }
        Ok(state)
    }

    /// A signed, current metadata document was accepted: remember its time, and the clock's
    /// when it is synchronised. Does not write.
    pub fn saw_metadata(&mut self, generated: Timestamp, now: Timestamp, synced: bool) {
        self.newest_metadata = self.newest_metadata.max(Some(generated));
        if synced {
            self.trusted_time = self.trusted_time.max(Some(now));
        }
    }

    /// What an accepted document offers this device: its own releases newer than `running`
    /// (newest first in `releases`). Keeps the first time the newest was offered. Does not write.
    pub fn saw_offer(&mut self, releases: &[&kiln_feed::Release], running: &Version, now: Timestamp) {
        let newer: Vec<&&kiln_feed::Release> = releases.iter().filter(|r| &r.version > running).collect();
        let Some(newest) = newer.iter().map(|r| &r.version).max() else {
            self.offered = None;
            return;
        };
        let since = match &self.offered {
            Some(o) if &o.version == newest => o.since,
            _ => now,
        };
        self.offered = Some(Offered { version: newest.clone(), since, security: newer.iter().any(|r| r.security) });
    }

    /// Persists the record atomically: temp file, fsync, rename, fsync of the directory.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_record(dir, STATUS_FILE, self)
    }

    pub fn slot(&self, slot: Slot) -> &SlotRecord {
        &self.slots[&slot]
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut SlotRecord {
        self.slots.get_mut(&slot).expect("both slots exist")
    }

    pub fn has_failed(&self, version: &Version) -> Option<&Failure> {
        self.failed.iter().find(|f| &f.version == version)
    }

    fn remember_failure(&mut self, version: Version, reason: String, now: Timestamp) {
        if self.has_failed(&version).is_none() {
            self.failed.push(Failure { version, at: now, reason });
        }
    }

    /// Reconciles the record with what booted. Does not write. `other_tried` is what the boot
    /// medium shows about the other slot's version; `max_switches` how many reboots into a new
    /// version may be cut off before it counts as failed. Returns what it noticed when the
    /// committed slot booted while the other was on trial.
    pub fn observe_boot(
        &mut self,
        booted: &Booted,
        other_tried: Tried,
        max_switches: u32,
        now: Timestamp,
    ) -> Option<Fallback> {
        let mut fallback = None;
        self.booted = Some(booted.slot);
        let other = !booted.slot;
        let other_rec = self.slot(other).clone();
        if !booted.trial {
            match (other_rec.status, other_rec.version) {
                (SlotStatus::Trial, Some(version)) => {
                    fallback = Some(self.trial_not_running(other, version, other_tried, max_switches, now));
                }
                (SlotStatus::Trial, None) => self.slot_mut(other).status = SlotStatus::Failed,
                (SlotStatus::Committed, _) => self.slot_mut(other).status = SlotStatus::Previous,
                _ => {}
            }
        }
        let rec = self.slot_mut(booted.slot);
        rec.version = Some(booted.version.clone());
        if booted.trial {
            // The install record stays, with its count of reboots into the trial, until the
            // trial is committed or failed.
            rec.status = SlotStatus::Trial;
        } else {
            if rec.status != SlotStatus::Committed {
                rec.status = SlotStatus::Committed;
            }
            // Committed without `commit` recording it (systemd-bless-boot, or a record that
            // could not be written): the install into this slot is over.
            if self.install.as_ref().is_some_and(|i| i.slot == booted.slot) {
                self.install = None;
            }
            if self.current_version.as_ref() != Some(&booted.version) {
                if self.current_version.is_some() {
                    self.previous_version = self.current_version.take();
                }
                self.current_version = Some(booted.version.clone());
            }
        }
        fallback
    }

    /// The committed slot booted although `other` was set up to boot `version` on trial:
    /// either the trial was started and failed (the firmware went back), or the reboot into it
    /// was cut off before the firmware saw it (a power cut right after the switch).
    fn trial_not_running(
        &mut self,
        other: Slot,
        version: Version,
        tried: Tried,
        max_switches: u32,
        now: Timestamp,
    ) -> Fallback {
        let pending = self.install.as_ref().filter(|i| i.slot == other && i.version == version).map(|i| i.switches);
        let interrupted = match (tried, pending) {
            (Tried::Yes, _) => false,
            (_, Some(switches)) => switches < max_switches.max(1),
            (Tried::No, None) => {
                // An older record without the install: the slot is written again from scratch.
                *self.slot_mut(other) = SlotRecord { status: SlotStatus::Empty, version: None, root_hash: None };
                let note = format!("the switch to {version} in slot {other} was cut off before it booted; the next check installs it again");
                return Fallback::Interrupted { version, note };
            }
            (Tried::Unknown, None) => false,
        };
        if interrupted {
            self.slot_mut(other).status = SlotStatus::Installing;
            let n = pending.unwrap_or(0);
            let max = max_switches.max(1);
            let note = match tried {
                Tried::Unknown => format!(
                    "the trial of {version} in slot {other} ended in a reset or power cut, or never started (reboot {n} of {max}); the next check starts it again"
                ),
                _ => format!(
                    "the switch to {version} in slot {other} was cut off before it booted (attempt {n} of {max}); the next check resumes it"
                ),
            };
            return Fallback::Interrupted { version, note };
        }
        let reason = match (tried, pending) {
            (Tried::Yes, _) | (_, None) => {
                "did not boot healthy; the firmware went back to the committed slot".to_string()
            }
            (_, Some(n)) => {
                format!("did not come up in {n} reboots into it; the firmware stayed on the committed slot")
            }
        };
        let note = format!("{version} in slot {other} {reason}");
        self.remember_failure(version.clone(), reason, now);
        self.slot_mut(other).status = SlotStatus::Failed;
        if pending.is_some() {
            self.install = None;
        }
        Fallback::Failed { version, note }
    }

    /// Starts (or resumes) writing `version` into `slot`. Does not write.
    pub fn begin_install(&mut self, slot: Slot, version: &Version, root_hash: &str, now: Timestamp) -> Result<()> {
        if self.booted == Some(slot) {
            bail!("refusing to install into slot {slot}: it is the running slot");
        }
        let resuming =
            self.install.as_ref().is_some_and(|i| i.slot == slot && &i.version == version && i.root_hash == root_hash);
        if !resuming {
            self.install = Some(Install {
                version: version.clone(),
                slot,
                root_hash: root_hash.into(),
                started: now,
                done: BTreeMap::new(),
                switches: 0,
            });
        }
        let rec = self.slot_mut(slot);
        rec.status = SlotStatus::Installing;
        rec.version = Some(version.clone());
        rec.root_hash = Some(root_hash.into());
        Ok(())
    }

    /// Records durable progress of one artifact. Does not write.
    pub fn progress(&mut self, sha256: &str, bytes: u64) {
        if let Some(i) = self.install.as_mut() {
            i.done.insert(sha256.into(), bytes);
        }
    }

    /// The slot is written and its boot entry is in place; a reboot into it follows. The
    /// install record stays (with its progress) until the new version has booted. Does not write.
    pub fn finish_install(&mut self) -> Result<Slot> {
        let Some(install) = self.install.as_mut() else { bail!("no install in progress") };
        install.switches += 1;
        let slot = install.slot;
        self.slot_mut(slot).status = SlotStatus::Trial;
        Ok(slot)
    }

    /// An install that cannot go on: the slot holds nothing bootable. Does not write.
    pub fn abandon_install(&mut self) {
        if let Some(install) = self.install.take() {
            *self.slot_mut(install.slot) = SlotRecord { status: SlotStatus::Empty, version: None, root_hash: None };
        }
    }

    /// The running trial boot passed its health checks. Does not write.
    pub fn commit(&mut self, booted: Slot) -> Result<Version> {
        let rec = self.slot(booted).clone();
        let Some(version) = rec.version else { bail!("slot {booted} has no recorded version") };
        if rec.status != SlotStatus::Trial && rec.status != SlotStatus::Committed {
            bail!("slot {booted} is {:?}, not on trial", rec.status);
        }
        self.slot_mut(booted).status = SlotStatus::Committed;
        if self.install.as_ref().is_some_and(|i| i.slot == booted) {
            self.install = None;
        }
        if self.slot(!booted).status == SlotStatus::Committed {
            self.slot_mut(!booted).status = SlotStatus::Previous;
        }
        if self.current_version.as_ref() != Some(&version) {
            self.previous_version = self.current_version.take();
            self.current_version = Some(version.clone());
        }
        Ok(version)
    }

    /// The running trial boot failed its health checks. Does not write.
    pub fn fail_trial(&mut self, booted: Slot, reason: &str, now: Timestamp) -> Result<Version> {
        let rec = self.slot(booted).clone();
        let Some(version) = rec.version else { bail!("slot {booted} has no recorded version") };
        self.remember_failure(version.clone(), reason.into(), now);
        self.slot_mut(booted).status = SlotStatus::Failed;
        if self.install.as_ref().is_some_and(|i| i.slot == booted) {
            self.install = None;
        }
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }
    const NOW: Timestamp = Timestamp(1_800_000_000);

    fn fresh() -> State {
        let mut s = State::default();
        s.observe_boot(&Booted { slot: Slot::A, version: v("0.1.0"), trial: false }, Tried::Unknown, 3, NOW);
        s
    }

    #[test]
    fn a_fresh_device_commits_what_it_booted() {
        let s = fresh();
        assert_eq!(s.slot(Slot::A).status, SlotStatus::Committed);
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Empty);
        assert_eq!(s.current_version, Some(v("0.1.0")));
    }

    #[test]
    fn install_trial_commit() {
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.2.0"), "ab", NOW).unwrap();
        s.progress("sha", 8 << 20);
        assert_eq!(s.install.as_ref().unwrap().done["sha"], 8 << 20);
        // Resuming the same install keeps the progress.
        s.begin_install(Slot::B, &v("0.2.0"), "ab", NOW).unwrap();
        assert_eq!(s.install.as_ref().unwrap().done["sha"], 8 << 20);
        assert_eq!(s.finish_install().unwrap(), Slot::B);
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Trial);
        s.observe_boot(&Booted { slot: Slot::B, version: v("0.2.0"), trial: true }, Tried::Unknown, 3, NOW);
        assert_eq!(s.install.as_ref().unwrap().switches, 1, "the reboots into the trial are counted until it ends");
        assert_eq!(s.commit(Slot::B).unwrap(), v("0.2.0"));
        assert!(s.install.is_none(), "committed: nothing to resume");
        assert_eq!(s.slot(Slot::A).status, SlotStatus::Previous);
        assert_eq!(s.current_version, Some(v("0.2.0")));
        assert_eq!(s.previous_version, Some(v("0.1.0")));
    }

    #[test]
    fn never_installs_into_the_running_slot() {
        let mut s = fresh();
        let e = s.begin_install(Slot::A, &v("0.2.0"), "ab", NOW).unwrap_err();
        assert_eq!(e.to_string(), "refusing to install into slot a: it is the running slot");
    }

    #[test]
    fn a_failed_trial_is_remembered() {
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.finish_install().unwrap();
        s.observe_boot(&Booted { slot: Slot::B, version: v("0.3.0"), trial: true }, Tried::Yes, 3, NOW);
        s.fail_trial(Slot::B, "health check failed", NOW).unwrap();
        assert!(s.has_failed(&v("0.3.0")).is_some());
        s.observe_boot(&Booted { slot: Slot::A, version: v("0.1.0"), trial: false }, Tried::Yes, 3, NOW);
        assert_eq!(s.slot(Slot::A).status, SlotStatus::Committed);
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Failed);
        assert_eq!(s.current_version, Some(v("0.1.0")));
    }

    #[test]
    fn a_trial_that_was_started_and_never_came_up_counts_as_failed() {
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.finish_install().unwrap();
        let committed = Booted { slot: Slot::A, version: v("0.1.0"), trial: false };
        let Some(Fallback::Failed { version, note }) = s.observe_boot(&committed, Tried::Yes, 3, NOW) else {
            panic!("not failed")
        };
        assert_eq!(version, v("0.3.0"));
        assert!(note.starts_with("0.3.0 in slot b did not boot healthy"), "{note}");
        assert!(s.has_failed(&v("0.3.0")).is_some());
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Failed);
        assert!(s.install.is_none());
    }

    #[test]
    fn a_switch_cut_off_before_the_new_version_started_is_resumed_not_blamed() {
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.progress("root", 100);
        s.finish_install().unwrap();
        let committed = Booted { slot: Slot::A, version: v("0.1.0"), trial: false };
        // UEFI: the power went before the new entry reached the ESP (or before it was booted).
        let f = s.observe_boot(&committed, Tried::No, 3, NOW);
        let Some(Fallback::Interrupted { version, note }) = f else { panic!("{f:?}") };
        assert_eq!(version, v("0.3.0"));
        assert!(note.contains("cut off before it booted (attempt 1 of 3)"), "{note}");
        assert!(s.has_failed(&v("0.3.0")).is_none());
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Installing);
        // The next check resumes with the progress kept, and switches again.
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        assert_eq!(s.install.as_ref().unwrap().done["root"], 100);
        s.finish_install().unwrap();
        // The Pi cannot tell: it retries until the reboots are used up, then gives up on it.
        assert!(matches!(s.observe_boot(&committed, Tried::Unknown, 3, NOW), Some(Fallback::Interrupted { .. })));
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.finish_install().unwrap();
        let f = s.observe_boot(&committed, Tried::Unknown, 3, NOW);
        let Some(Fallback::Failed { note, .. }) = f else { panic!("{f:?}") };
        assert!(note.contains("did not come up in 3 reboots"), "{note}");
        assert!(s.has_failed(&v("0.3.0")).is_some());
        assert!(s.install.is_none());
        // The entry was started (its counter moved): failed at once, whatever the count.
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.4.0"), "ef", NOW).unwrap();
        s.finish_install().unwrap();
        assert!(matches!(s.observe_boot(&committed, Tried::Yes, 3, NOW), Some(Fallback::Failed { .. })));
    }

    #[test]
    fn a_pi_trial_reset_is_tried_again_up_to_tries_then_failed() {
        // Issue 16 item 6: before, the install record was dropped when the trial booted, so one
        // reset during a Pi trial (tryboot is one-shot, the firmware goes back) failed the
        // release for good.
        let mut s = fresh();
        let committed = Booted { slot: Slot::A, version: v("0.1.0"), trial: false };
        let trial = Booted { slot: Slot::B, version: v("0.2.0"), trial: true };
        s.begin_install(Slot::B, &v("0.2.0"), "ab", NOW).unwrap();
        for n in 1..=2 {
            s.finish_install().unwrap();
            assert!(s.observe_boot(&trial, Tried::Unknown, 3, NOW).is_none());
            // A reset during the trial: the firmware starts the committed slot.
            let f = s.observe_boot(&committed, Tried::Unknown, 3, NOW);
            let Some(Fallback::Interrupted { note, .. }) = f else { panic!("reset {n}: {f:?}") };
            assert!(
                note.contains(&format!("ended in a reset or power cut, or never started (reboot {n} of 3)")),
                "{note}"
            );
            assert!(s.has_failed(&v("0.2.0")).is_none());
            s.begin_install(Slot::B, &v("0.2.0"), "ab", NOW).unwrap();
        }
        s.finish_install().unwrap();
        s.observe_boot(&trial, Tried::Unknown, 3, NOW);
        let f = s.observe_boot(&committed, Tried::Unknown, 3, NOW);
        let Some(Fallback::Failed { note, .. }) = f else { panic!("{f:?}") };
        assert!(note.contains("did not come up in 3 reboots"), "{note}");
        assert!(s.has_failed(&v("0.2.0")).is_some());
        // A health check that failed is final at once (the record, or the medium, says so).
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.finish_install().unwrap();
        s.observe_boot(&Booted { slot: Slot::B, version: v("0.3.0"), trial: true }, Tried::Unknown, 3, NOW);
        s.fail_trial(Slot::B, "health check failed", NOW).unwrap();
        assert!(s.install.is_none());
        assert!(s.observe_boot(&committed, Tried::Unknown, 3, NOW).is_none());
        assert_eq!(s.slot(Slot::B).status, SlotStatus::Failed);
        // The record lost (a full /var) but the medium marked the trial rejected: failed too.
        let mut s = fresh();
        s.begin_install(Slot::B, &v("0.3.0"), "cd", NOW).unwrap();
        s.finish_install().unwrap();
        s.observe_boot(&Booted { slot: Slot::B, version: v("0.3.0"), trial: true }, Tried::Unknown, 3, NOW);
        assert!(matches!(s.observe_boot(&committed, Tried::Yes, 3, NOW), Some(Fallback::Failed { .. })));
    }

    #[test]
    fn writes_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = fresh();
        s.write(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
        assert!(!dir.path().join(".status.json.tmp").exists());
        std::fs::write(dir.path().join(STATUS_FILE), "{").unwrap();
        let e = format!("{:#}", State::load(dir.path()).unwrap_err());
        assert!(e.contains("not a kiln-agent status file"), "{e}");
    }

    #[test]
    fn a_record_missing_a_slot_reads_as_that_slot_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = fresh();
        s.slots.remove(&Slot::B);
        std::fs::write(dir.path().join(STATUS_FILE), serde_json::to_string(&s).unwrap()).unwrap();
        // Before: every command (rollback included) panicked on the missing slot.
        let back = State::load(dir.path()).unwrap();
        assert_eq!(back.slot(Slot::B).status, SlotStatus::Empty);
        assert_eq!(back.slot(Slot::A).status, SlotStatus::Committed);
        std::fs::write(dir.path().join(STATUS_FILE), r#"{"slots": {}, "booted": null, "current_version": null, "previous_version": null, "install": null, "last_check": null, "last_result": null, "last_error": null}"#).unwrap();
        let back = State::load(dir.path()).unwrap();
        assert_eq!(back.slot(Slot::A).status, SlotStatus::Empty);
    }

    #[test]
    fn metadata_times_only_move_forward_and_the_clock_counts_when_synchronised() {
        let mut s = State::default();
        s.saw_metadata(Timestamp(500), Timestamp(900), false);
        assert_eq!((s.newest_metadata, s.trusted_time), (Some(Timestamp(500)), None));
        s.saw_metadata(Timestamp(400), Timestamp(1_000), true);
        assert_eq!((s.newest_metadata, s.trusted_time), (Some(Timestamp(500)), Some(Timestamp(1_000))));
        s.saw_metadata(Timestamp(600), Timestamp(800), true);
        assert_eq!((s.newest_metadata, s.trusted_time), (Some(Timestamp(600)), Some(Timestamp(1_000))));
    }

    #[test]
    fn an_offer_keeps_its_first_time_until_a_newer_one_comes() {
        let rel = |v: &str, security: bool| kiln_feed::Release {
            version: v.parse().unwrap(),
            published: Timestamp(1),
            profile: "p".into(),
            image: "pc-uefi".into(),
            arch: "amd64".into(),
            root_hash: String::new(),
            artifacts: Vec::new(),
            changelog: Vec::new(),
            notes: String::new(),
            security,
        };
        let running: Version = "0.2.0".parse().unwrap();
        let mut s = State::default();
        let (v3, v4, v1) = (rel("0.3.0", true), rel("0.4.0", false), rel("0.1.0", false));
        s.saw_offer(&[&v3, &v1], &running, Timestamp(100));
        assert_eq!(
            s.offered,
            Some(Offered { version: "0.3.0".parse().unwrap(), since: Timestamp(100), security: true })
        );
        s.saw_offer(&[&v3], &running, Timestamp(200));
        assert_eq!(s.offered.as_ref().unwrap().since, Timestamp(100), "the same offer keeps its first time");
        // A newer one: a new time; the security release in between still counts.
        s.saw_offer(&[&v4, &v3], &running, Timestamp(300));
        assert_eq!(
            s.offered,
            Some(Offered { version: "0.4.0".parse().unwrap(), since: Timestamp(300), security: true })
        );
        s.saw_offer(&[&v1], &running, Timestamp(400));
        assert_eq!(s.offered, None, "nothing newer than the running release");
    }
}
