//! `/usr/lib/kiln/device.json` (`kiln_device::DeviceConfig`): what the image tells its
//! on-device agent about itself, its disk layout and its update feed. (The agent binary itself
//! comes from `stages::agent`.)

use crate::config::plan::Plan;
use anyhow::Result;

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
        wifi: plan.wifi.clone(),
        monitor: plan.monitor.clone(),
    })
}
