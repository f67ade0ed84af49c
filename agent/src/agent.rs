//! The running device as the agent sees it: its configuration (device.json), the slot it
//! booted, its boot medium, and the commands that act on them (boot, commit, rollback).

use crate::boot::Medium;
use crate::state::{Booted, Fallback, Slot, SlotStatus, State};
use crate::system::{self, BlockPartition, Host};
use anyhow::{bail, Context as _, Result};
use kiln_device::{DeviceConfig, Role};
use kiln_feed::{Timestamp, Version};
use std::path::{Path, PathBuf};

pub struct Agent {
    pub config: DeviceConfig,
    pub host: Host,
    pub medium: Medium,
    pub state_dir: PathBuf,
    /// This image's version (the running slot's).
    pub running: Version,
    /// The partition the verified root came from.
    pub root: BlockPartition,
    pub slot: Slot,
}

impl Agent {
    pub fn open(config_path: &Path, state_dir: &Path) -> Result<Agent> {
        let config = DeviceConfig::load(config_path).map_err(anyhow::Error::msg)?;
        let host = Host::default();
        let root = host.booted_root()?;
        let slot = config
            .partitions
            .iter()
            .find(|p| p.role == Role::Root && p.number == root.number)
            .and_then(|p| p.slot)
            .with_context(|| {
                format!(
                    "the verified root is on {} (partition {}), which {} does not list as a root slot",
                    root.name,
                    root.number,
                    config_path.display()
                )
            })?;
        let medium = Medium::for_device(&config)?;
        Ok(Agent { running: config.version.clone(), config, host, medium, state_dir: state_dir.into(), root, slot })
    }

    pub fn load_state(&self) -> Result<State> {
        State::load(&self.state_dir)
    }

    pub fn partition_device(&self, role: Role, slot: Slot) -> Result<PathBuf> {
        let n = self.config.partition_number(role, slot).map_err(anyhow::Error::msg)?;
        self.host.partition_device(&self.root.disk, n)
    }

    /// Reconciles `state` with how this boot came about, as the boot medium tells it
    /// (`trial` forced on when the record knows better, see `commit`). Does not write.
    fn observe(&self, state: &mut State, recorded_trial: bool) -> Result<(Booted, Option<Fallback>)> {
        let mut booted = self.medium.booted(&self.host, &self.config, self.slot, &self.running)?;
        booted.trial |= recorded_trial;
        let tried = match state.slot(!self.slot).version.clone() {
            Some(v) => self.medium.was_tried(&v)?,
            None => crate::state::Tried::Unknown,
        };
        let switches = self.config.update.as_ref().map_or(1, |u| u.tries);
        let fallback = state.observe_boot(&booted, tried, switches, Timestamp::now());
        Ok((booted, fallback))
    }

    /// Reconciles `state` with the boot medium and acts on what it shows: a failed trial's
    /// boot entry is rejected (the medium first: the record is written after, best effort, and
    /// a record that could not be written is derived again from the medium by the next boot or
    /// check), a staged download no longer needed goes. Does not write the record.
    pub fn reconcile(&self, state: &mut State) -> Result<Booted> {
        let (booted, fallback) = self.observe(state, false)?;
        let mut failed = false;
        match fallback {
            Some(Fallback::Failed { version, note }) => {
                println!("kiln-agent: {note}");
                self.medium.reject(&version)?;
                state.last_error = Some(note);
                failed = true;
            }
            Some(Fallback::Interrupted { note, .. }) => {
                println!("kiln-agent: {note}");
                state.last_result = Some(note);
            }
            None => {}
        }
        if booted.trial || failed {
            // The new version is running, or failed: its staged download is not needed again.
            crate::state::remove_staging(&self.state_dir);
        }
        Ok(booted)
    }

    /// At every boot: reconcile the record with what booted, clean up after a fallback, and
    /// say on the console what is running.
    pub fn boot(&self) -> Result<()> {
        let mut state = self.load_state()?;
        let booted = self.reconcile(&mut state)?;
        self.record(&state);
        let how = if booted.trial { "trial, waiting for the health check" } else { "committed" };
        println!("kiln-agent: booted {} from slot {} ({how})", self.running, self.slot);
        Ok(())
    }

    /// Writes the record where the boot medium is already right: a failure (a full /var) is
    /// said on the console and in the journal, and does not stop a rollback.
    pub fn record(&self, state: &State) {
        if let Err(e) = state.write(&self.state_dir) {
            eprintln!(
                "kiln-agent: could not record the update state in {} ({e:#}); the boot slots are right, the next boot records it again",
                self.state_dir.display()
            );
        }
    }

    /// After boot-complete.target (the health check passed): a trial becomes committed.
    pub fn commit(&self) -> Result<()> {
        let mut state = self.load_state()?;
        // systemd-bless-boot (where installed) may have renamed the UKI already: the record
        // still says this slot was on trial.
        let mut trial = state.slot(self.slot).status == SlotStatus::Trial;
        if self.medium.booted(&self.host, &self.config, self.slot, &self.running)?.trial {
            self.medium.commit(&self.config, self.slot, &self.running)?;
            trial = true;
        }
        let (booted, _) = self.observe(&mut state, trial)?;
        let version = state.commit(self.slot)?;
        state.last_result = Some(format!("committed {version} in slot {}", self.slot));
        state.write(&self.state_dir)?;
        if booted.trial {
            let previous = state
                .previous_version
                .as_ref()
                .map(|v| format!("; {v} stays in slot {} as the fallback", !self.slot))
                .unwrap_or_default();
            println!("kiln-agent: committed {version} in slot {}{previous}", self.slot);
        } else {
            println!("kiln-agent: {version} in slot {} is committed", self.slot);
        }
        Ok(())
    }

    /// The health check failed. A trial boot is abandoned and the device goes back to the
    /// committed slot; a committed slot only records the failure (there is nothing better to
    /// go back to automatically).
    pub fn rollback(&self, reboot: bool) -> Result<()> {
        let mut state = self.load_state()?;
        let (booted, _) = self.observe(&mut state, false)?;
        if !booted.trial {
            state.last_error =
                Some(format!("health check failed on the committed {} (slot {})", self.running, self.slot));
            self.record(&state);
            println!(
                "kiln-agent: health check failed on the committed {}; no rollback (nothing newer is on trial)",
                self.running
            );
            return Ok(());
        }
        let version = state.fail_trial(self.slot, "health check failed", Timestamp::now())?;
        let back = state.slot(!self.slot).version.clone();
        state.last_error = Some(format!("{version} failed its health check in slot {}; rolled back", self.slot));
        // The boot medium first (the way back must not depend on room in /var), then the
        // record, best effort: the next boot derives the failure again from the medium.
        self.medium.reject(&version)?;
        crate::state::remove_staging(&self.state_dir);
        self.record(&state);
        let back = back.map(|v| v.to_string()).unwrap_or_else(|| "the committed version".into());
        println!("kiln-agent: {version} failed its health check; rolling back to {back} in slot {}", !self.slot);
        if reboot {
            system::reboot(false)?;
        }
        Ok(())
    }

    /// UEFI: the root slot's PARTUUID becomes the first 128 bits of its root hash, which is how
    /// the new UKI's initramfs finds it.
    pub fn set_root_partuuid(&self, slot: Slot, root_hash: &str) -> Result<()> {
        use kiln_device::gpt::{GptTable, SECTOR};
        let hash = kiln_device::fs::parse_sha256(root_hash).map_err(|e| anyhow::anyhow!("root hash: {e}"))?;
        let name = self
            .config
            .partition(Role::Root, Some(slot))
            .map(|p| p.name.clone())
            .with_context(|| format!("no root partition for slot {slot}"))?;
        let disk = self.host.disk_device(&self.root.disk);
        let size = system::device_size(&disk)?;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .with_context(|| format!("opening {}", disk.display()))?;
        let mut table =
            GptTable::read(&mut f, size / SECTOR).with_context(|| format!("reading the GPT of {}", disk.display()))?;
        let Some(p) = table.partitions.iter_mut().find(|p| p.name == name) else {
            bail!("{} has no GPT partition named {name:?}", disk.display());
        };
        p.guid = kiln_device::Uuid::from_root_hash(&hash);
        table.write(&mut f).with_context(|| format!("writing the GPT of {}", disk.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", disk.display()))?;
        Ok(())
    }
}
