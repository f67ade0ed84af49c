//! The build stages, in the order `build::build` runs them. Each stage reads the frozen plan
//! and writes only below the build's work directory.

pub mod agent;
pub mod bootstrap;
pub mod customize;
pub mod disk;
pub mod esp;
pub mod harden;
pub mod manifest;
pub mod native;
pub mod rootfs;
pub mod rpi;
pub mod sbom;
pub mod templates;

use crate::config::image::{Role, Slot};
use crate::config::plan::Plan;
use std::path::PathBuf;

/// What a boot stage (`esp` or `rpi`) made.
pub struct BootOutput {
    /// Partition images to place on the disk, by role and slot.
    pub partitions: Vec<(Role, Option<Slot>, PathBuf)>,
    /// Files published next to the disk (the UKI; the boot slot's image).
    pub artifacts: Vec<PathBuf>,
    /// The kernel command line of slot A.
    pub cmdline: String,
}

/// Paths of one build. The plan is frozen; the context only says where things go.
pub struct Context<'a> {
    pub plan: &'a Plan,
    /// Scratch space for this build (`<out>/.work/<name>`).
    pub work: PathBuf,
    /// The root tree being built.
    pub tree: PathBuf,
    /// Outputs are written here, then moved to their final place.
    pub staging: PathBuf,
    /// kiln's templates, rendered with the plan as context.
    pub templates: crate::stages::templates::Templates,
}
