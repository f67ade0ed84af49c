//! kiln: bakes hardened, reproducible, auto-updating appliance OS images from TOML profiles.
//!
//! The pipeline is `profile` + `image` -> [`config::plan::Plan`] -> [`build::build`] (stages) ->
//! artifacts; `boot::qemu` boots them, `release::inspect` reads them back. The folders follow
//! the pipeline (see ARCHITECTURE.md's code map):
//! - [`config`]: what to build: profiles, board images, the service catalog, the lock, the plan
//!   and the device.json it bakes;
//! - [`debian`]: the Debian archive: versions, deb822 indexes, fetching, the mirror, the cache;
//! - [`stages`]: the build stages, driven by [`build`];
//! - [`boot`]: what boots an image: initramfs, UKI (PE), Raspberry Pi boot files, QEMU;
//! - [`flash`]: writing images to SD cards and USB sticks (bmap, provisioning);
//! - [`release`]: publishing signed releases and reading built images back;
//! - [`host`]: the host: the one process spawner, the tools kiln needs, `kiln doctor`.

pub mod boot;
pub mod build;
pub mod config;
pub mod debian;
pub mod flash;
pub mod host;
pub mod init;
pub mod release;
pub mod stages;
#[cfg(test)]
mod testing;
pub mod units;

/// Partition tables: the types the device's agent reads too (`kiln-device`).
pub use kiln_device::{gpt, mbr, parttable};
