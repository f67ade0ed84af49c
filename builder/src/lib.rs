//! kiln: bakes hardened, reproducible, auto-updating appliance OS images from TOML profiles.
//!
//! The pipeline is `profile` + `image` -> [`plan::Plan`] -> [`build::build`] (stages) ->
//! artifacts; `qemu` boots them, `inspect` reads them back. See ARCHITECTURE.md.

pub mod bmap;
pub mod build;
pub mod cache;
pub mod debian;
pub mod device;
pub mod doctor;
pub mod exec;
pub mod flash;
pub use kiln_device::{gpt, mbr, parttable};
pub mod image;
pub mod initramfs;
pub mod inspect;
pub mod lock;
pub mod mirror;
pub mod pe;
pub mod plan;
pub mod profile;
pub mod progress;
pub mod publish;
pub mod qemu;
pub mod rpi;
pub mod services;
pub mod stages;
pub mod templates;
#[cfg(test)]
mod testing;
pub mod units;
