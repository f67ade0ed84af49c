//! What the image carries for its on-device agent: the `kiln-agent` binary for the image's
//! architecture, and `/usr/lib/kiln/device.json` (`kiln_device::DeviceConfig`) describing the
//! image, its disk layout and its update feed.

use crate::config::image::Arch;
use crate::config::plan::Plan;
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Finds the agent binary for `arch`: `$KILN_AGENT`, else next to the running kiln
/// (`kiln-agent` for the host's architecture, `kiln-agent-<arch>` for another).
pub fn agent_binary(arch: Arch) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_AGENT") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("KILN_AGENT={} is not a file", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("locating the kiln executable: {e}"))?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let name = if arch.is_host() { "kiln-agent".to_string() } else { format!("kiln-agent-{}", arch.debian()) };
    let path = dir.join(&name);
    if path.is_file() {
        return Ok(path);
    }
    let how = if arch.is_host() {
        "cargo build -p kiln-agent (with the same profile as kiln)".to_string()
    } else {
        format!("scripts/build-agent --arch {}", arch.debian())
    };
    bail!(
        "the on-device agent for {} is missing: looked for {} (or $KILN_AGENT); build it with `{how}`",
        arch.debian(),
        path.display()
    )
}

/// The agent for this plan's image. A foreign-architecture agent that was not built is allowed
/// only for a profile without `[update]` (the image then has no updater, and kiln says so);
/// for the host's architecture or with `[update]` it is an error.
pub fn agent_for(plan: &Plan) -> Result<Option<PathBuf>> {
    match agent_binary(plan.arch) {
        Ok(p) => Ok(Some(p)),
        Err(e) if !plan.arch.is_host() && plan.update.is_none() => {
            eprintln!("warning: {e:#}; this image gets no kiln-agent (no updates, no A/B commit bookkeeping)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `/usr/lib/kiln/device.json` for this plan.
pub fn device_config(plan: &Plan) -> Result<kiln_device::DeviceConfig> {
    Ok(kiln_device::DeviceConfig {
        profile: plan.profile.clone(),
        image: plan.image.clone(),
        arch: plan.arch.debian().into(),
        version: plan.version.parse().map_err(|e: String| anyhow::anyhow!("release version: {e}"))?,
        bootloader: plan.bootloader,
        partition_table: plan.disk.table,
        partitions: plan
            .disk
            .partitions
            .iter()
            .map(|p| kiln_device::DevicePartition {
                name: p.name.clone(),
                number: p.number,
                role: p.role,
                slot: p.slot,
                size: p.size.0,
            })
            .collect(),
        health_timeout: plan.health.timeout_secs,
        update: plan.update.clone(),
        backup: plan.backup.as_ref().map(|b| b.device.clone()),
    })
}
